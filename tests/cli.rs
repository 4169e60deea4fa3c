//! The `chatgpt-component` binary, driven as a user would, against the fake server on loopback.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{cfg, with, API_KEY};
use fake_openai::{ErrorReply, FakeOpenAi, Options, Script};
use serde_json::{json, Value};

/// Runs the binary off the async runtime (the fake server keeps serving meanwhile), with trace
/// logging on so the secret scan sees everything that could be logged.
async fn cli(args: Vec<String>, stdin: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"))
            .args(&args)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env("RUST_LOG", "trace")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap();
        drop(input);
        let output = child.wait_with_output().unwrap();
        for stream in [&output.stdout, &output.stderr] {
            let text = String::from_utf8_lossy(stream);
            assert!(
                !text.contains(API_KEY),
                "the API key leaked from `{}`",
                args[0]
            );
        }
        output
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect()
}

fn events(output: &Output) -> Vec<String> {
    lines(output)
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_prints_events_as_json_lines_with_an_exit_status_per_outcome() {
    let fake = FakeOpenAi::start().await;
    let cfg_text = cfg(&fake).to_string();
    let msg = json!({"body": {"messages": [{"role": "user", "content": "Hi"}]}}).to_string();

    let ok = cli(
        args(&["exec", "sendRequest", "--cfg", &cfg_text, "--msg", "-"]),
        Some(msg.clone()),
    )
    .await;
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(events(&ok), ["data", "end"]);
    assert_eq!(
        lines(&ok)[0]["message"]["body"]["choices"][0]["message"]["content"],
        "echo: Hi"
    );

    fake.push(Script::Error(ErrorReply::invalid_api_key()));
    let error = cli(
        args(&["exec", "sendRequest", "--cfg", &cfg_text, "--msg", &msg]),
        None,
    )
    .await;
    assert_eq!(error.status.code(), Some(1));
    assert_eq!(events(&error), ["error", "end"]);
    assert_eq!(lines(&error)[0]["error"]["details"]["status"], 401);

    let limited = with(cfg(&fake), json!({"maxRetries": 0})).to_string();
    fake.push(Script::Error(ErrorReply::rate_limited_ms(1)));
    let rebound = cli(
        args(&["exec", "sendRequest", "--cfg", &limited, "--msg", &msg]),
        None,
    )
    .await;
    assert_eq!(rebound.status.code(), Some(75));
    assert_eq!(events(&rebound), ["rebound", "end"]);

    // A compatible server that echoes the key: the scan in `cli` fails unless it is scrubbed.
    let echo = format!("Key {API_KEY} is not valid for this server");
    fake.push(Script::Error(ErrorReply::new(
        403,
        "permission_error",
        None,
        &echo,
    )));
    let echoed = cli(
        args(&["exec", "sendRequest", "--cfg", &cfg_text, "--msg", &msg]),
        None,
    )
    .await;
    assert!(lines(&echoed)[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Key *** is not valid"));

    // A message that breaks the schema is an error event, not a crash.
    let bad = json!({"messages": [{"role": "user"}], "n": "two"}).to_string();
    let invalid = cli(
        args(&["exec", "sendRequest", "--cfg", &cfg_text, "--msg", &bad]),
        None,
    )
    .await;
    assert_eq!(invalid.status.code(), Some(1));
    let violations = &lines(&invalid)[0]["error"]["details"]["violations"];
    assert_eq!(violations[0]["pointer"], "/n");
    assert_eq!(
        fake.chat_requests().len(),
        4,
        "an invalid message must not reach OpenAI"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_reads_cfg_and_msg_from_files_and_rejects_unreadable_input() {
    let fake = FakeOpenAi::start().await;
    let dir = std::env::temp_dir().join(format!("cgc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_file = dir.join("cfg.json");
    let msg_file = dir.join("msg.json");
    std::fs::write(&cfg_file, cfg(&fake).to_string()).unwrap();
    std::fs::write(
        &msg_file,
        r#"{"messages":[{"role":"user","content":"from a file"}]}"#,
    )
    .unwrap();
    let ok = cli(
        args(&[
            "exec",
            "sendRequest",
            "--cfg",
            cfg_file.to_str().unwrap(),
            "--msg",
            msg_file.to_str().unwrap(),
        ]),
        None,
    )
    .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let broken = cli(
        args(&["exec", "sendRequest", "--cfg", "{not json", "--msg", "{}"]),
        None,
    )
    .await;
    assert_eq!(broken.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&broken.stderr).contains("--cfg is not valid JSON"));
    let missing = cli(
        args(&["exec", "sendRequest", "--msg", "/nonexistent/msg.json"]),
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("--msg: cannot read /nonexistent/msg.json"));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_good_bad_and_listless_servers() {
    let fake = FakeOpenAi::start_with(Options {
        api_key: Some(API_KEY.into()),
        ..Options::default()
    })
    .await;
    let good = cli(args(&["verify", "--cfg", &cfg(&fake).to_string()]), None).await;
    assert_eq!(
        (good.status.code(), lines(&good)),
        (Some(0), vec![json!({"verified": true})])
    );

    let wrong =
        json!({"apiKey": "sk-wrong-key-000000abcd", "baseUrl": fake.base_url()}).to_string();
    let bad = cli(args(&["verify", "--cfg", &wrong]), None).await;
    assert_eq!(bad.status.code(), Some(1));
    let answer = &lines(&bad)[0];
    assert_eq!(answer["verified"], false);
    assert!(
        answer["reason"].as_str().unwrap().contains("401"),
        "{answer}"
    );

    let listless = FakeOpenAi::start_with(Options {
        models_endpoint: false,
        ..Options::default()
    })
    .await;
    let compatible = cli(
        args(&["verify", "--cfg", &cfg(&listless).to_string()]),
        None,
    )
    .await;
    assert_eq!(lines(&compatible), vec![json!({"verified": true})]);

    let no_key = cli(args(&["verify"]), None).await;
    assert_eq!(lines(&no_key)[0]["verified"], false);
    assert!(lines(&no_key)[0]["reason"]
        .as_str()
        .unwrap()
        .contains("apiKey"));
}

#[tokio::test(flavor = "multi_thread")]
async fn select_model_prints_the_sorted_model_map() {
    let fake = FakeOpenAi::start_with(Options {
        models: vec!["llama3".into(), "gpt-4o".into(), "mistral".into()],
        ..Options::default()
    })
    .await;
    let out = cli(
        args(&[
            "select-model",
            "sendRequest",
            "getModels",
            "--cfg",
            &cfg(&fake).to_string(),
        ]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        r#"{"gpt-4o":"gpt-4o","llama3":"llama3","mistral":"mistral"}"#
    );

    let listless = FakeOpenAi::start_with(Options {
        models_endpoint: false,
        ..Options::default()
    })
    .await;
    let out = cli(
        args(&[
            "select-model",
            "sendRequest",
            "getModels",
            "--cfg",
            &cfg(&listless).to_string(),
        ]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("customModel"));

    let out = cli(
        args(&[
            "select-model",
            "sendRequest",
            "listAll",
            "--cfg",
            &cfg(&fake).to_string(),
        ]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_here_and_reports_drift_in_a_broken_copy() {
    let ok = cli(args(&["check", "--dir", env!("CARGO_MANIFEST_DIR")]), None).await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let embedded = cli(args(&["check"]), None).await;
    assert_eq!(embedded.status.code(), Some(0));

    let dir = std::env::temp_dir().join(format!("cgc-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest: Value = serde_json::from_str(include_str!("../component.json")).unwrap();
    manifest["actions"]["sendRequest"]["fields"]["model"]["model"] = json!("getEverything");
    manifest["actions"]["sendRequest"]["fields"]["requestTimeout"]["viewClass"] =
        json!("SliderView");
    std::fs::write(dir.join("component.json"), manifest.to_string()).unwrap();
    let broken = cli(args(&["check", "--dir", dir.to_str().unwrap()]), None).await;
    assert_eq!(broken.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    for expected in [
        "model function `getEverything` does not exist",
        "unknown viewClass `SliderView`",
        "cannot be read",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_prints_the_converted_schemas() {
    for side in ["in", "out"] {
        let out = cli(args(&["schema", "sendRequest", side]), None).await;
        assert_eq!(out.status.code(), Some(0));
        let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
        insta::assert_json_snapshot!(format!("schema_{side}"), schema);
    }
    let dialect = cli(args(&["schema", "sendRequest", "in", "--dialect"]), None).await;
    let dialect: Value = serde_json::from_slice(&dialect.stdout).unwrap();
    assert_eq!(dialect["properties"]["messages"]["required"], true);
    let unknown = cli(args(&["schema", "nope", "in"]), None).await;
    assert_eq!(unknown.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_reports_a_bad_config_by_key_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("cli-serve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yml");
    std::fs::write(&file, format!("token: {API_KEY}\nport: eighty\n")).unwrap();
    let out = cli(args(&["serve", "--config", file.to_str().unwrap()]), None).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config key `port`"), "{stderr}");
    std::fs::remove_dir_all(dir).ok();
}

/// The gateway binary from a config file: answers, then on SIGTERM finishes the request in
/// flight before exiting 0; the key never shows in its logs (trace level).
#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_and_drains_on_sigterm() {
    let fake = FakeOpenAi::start().await;
    let dir = std::env::temp_dir().join(format!("cli-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.join("config.yml");
    std::fs::write(
        &file,
        format!(
            "token: {API_KEY}\nbase_url: {}\nport: {port}\ndata_dir: {}\nlog_format: json\n",
            fake.base_url(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .env_remove("OPENAI_API_KEY")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let reply = http
        .post(&url)
        .header("process-mode", "sync")
        .body("ping")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(
        reply.json::<Value>().await.unwrap(),
        json!({"content": "echo: ping"})
    );
    // A slow answer is in flight when SIGTERM arrives: it must still be answered.
    fake.push(Script::SlowFirstByte(std::time::Duration::from_millis(800)));
    let slow = tokio::spawn(
        http.post(&url)
            .header("process-mode", "sync")
            .body("slow")
            .send(),
    );
    while fake.chat_requests().len() < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let slow = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(slow.status(), 200);
    let output = tokio::task::spawn_blocking(move || {
        let _ = child.stdout.take();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(!logs.contains(API_KEY), "the API key leaked into the logs");
    for line in logs.lines() {
        serde_json::from_str::<Value>(line).expect("log_format json: every line is JSON");
    }
    assert!(logs.contains("gateway stopped"), "{logs}");
    std::fs::remove_dir_all(dir).ok();
}
