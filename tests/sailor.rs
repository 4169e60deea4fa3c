//! Platform mode end to end: the real binary as an elastic.io step, a private RabbitMQ node, the
//! fake platform API and the fake OpenAI server, all on loopback.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatgpt_component::modes::sailor::crypto::Cipher;
use chatgpt_component::secret::Secret;
use fake_openai::{ErrorReply, FakeOpenAi, Script};
use serde_json::{json, Value};
use support::{Platform, Rabbit, Received, Topology};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PASSWORD: &str = "testCryptoPassword";
const IV: &str = "iv=any16_symbols";
const API_KEY: &str = "sk-test-CANARY-sailor-8c1e4b2a";
const PLATFORM_KEY: &str = "platform-secret-key-5d2c";
const STORAGE_TOKEN: &str = "storage-jwt-token-9f3e";
const WAIT: Duration = Duration::from_secs(20);

fn cipher() -> Cipher {
    Cipher::new(&Secret::new(PASSWORD), IV).unwrap()
}

/// One step: the binary consuming a fresh topology.
struct Step {
    topology: Topology,
    platform: Platform,
    fake: FakeOpenAi,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Step {
    async fn start(rabbit: &Rabbit, env: &[(&str, &str)]) -> Step {
        Self::start_with(rabbit, env, json!({}), false).await
    }

    /// `config` is merged into the step's `cfg`; `passthrough` is the step's `is_passthrough`.
    async fn start_with(
        rabbit: &Rabbit,
        env: &[(&str, &str)],
        config: Value,
        passthrough: bool,
    ) -> Step {
        let topology = rabbit.declare_topology("flow").await;
        let fake = FakeOpenAi::start().await;
        let platform = Platform::start("task-user", PLATFORM_KEY, STORAGE_TOKEN).await;
        let mut cfg =
            json!({"apiKey": API_KEY, "baseUrl": fake.base_url(), "model": "gpt-4o-mini"});
        cfg.as_object_mut()
            .unwrap()
            .extend(config.as_object().unwrap().clone());
        // The first step-data request fails with a 500: every step proves the retry.
        platform.set_step(
            json!({"config": cfg, "snapshot": {}, "is_passthrough": passthrough}),
            1,
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"));
        command
            .arg("sailor")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let amqp_uri = rabbit.amqp_uri();
        let platform_uri = platform.uri();
        let vars = support::StepEnv {
            platform_uri: &platform_uri,
            platform_key: PLATFORM_KEY,
            amqp_uri: &amqp_uri,
            topology: &topology,
            crypto_password: PASSWORD,
            crypto_iv: IV,
            storage_token: STORAGE_TOKEN,
        }
        .vars();
        command.envs(vars);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let step = Step {
            topology,
            platform,
            fake,
            child,
            logs,
        };
        assert!(
            rabbit
                .wait_for_consumers(&step.topology.input_queue, 1, WAIT)
                .await,
            "the step never started consuming:\n{}",
            step.log_text()
        );
        step
    }

    fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Publishes an encrypted input message, as the previous step would.
    async fn send(&self, rabbit: &Rabbit, body: Value, headers: Value) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = headers;
        headers["messageId"] = json!(id);
        let version = headers["protocolVersion"].as_u64().unwrap_or(1) as u8;
        let message =
            json!({"id": id, "body": body, "headers": {}, "attachments": {}, "metadata": {}});
        let content = cipher().encode(&serde_json::to_vec(&message).unwrap(), version);
        rabbit
            .publish(&self.topology.input_queue, &content, headers)
            .await;
        id
    }

    /// Checks the logs for secrets, then stops the process.
    fn finish(&mut self) {
        let logs = self.log_text();
        for secret in [API_KEY, PLATFORM_KEY, PASSWORD, STORAGE_TOKEN] {
            assert!(!logs.contains(secret), "a secret leaked into the logs");
        }
        let _ = self.child.start_kill();
    }
}

fn hello() -> Value {
    json!({"messages": [{"role": "user", "content": "Hello there"}]})
}

fn decrypt(received: &Received) -> Value {
    let version = received.headers["protocolVersion"].as_u64().unwrap_or(1) as u8;
    serde_json::from_slice(&cipher().decode(&received.payload, version).unwrap()).unwrap()
}

/// The error envelope `{"error": b64(enc(...)), "errorInput": ...}`: the decrypted error and the
/// raw `errorInput` text.
fn error_of(received: &Received) -> (Value, Option<String>) {
    let envelope: Value = serde_json::from_slice(&received.payload).unwrap();
    let b64 = envelope["error"].as_str().unwrap();
    let error = serde_json::from_slice(&cipher().decode(b64.as_bytes(), 1).unwrap()).unwrap();
    (error, envelope["errorInput"].as_str().map(str::to_string))
}

fn open(b64: &str) -> Value {
    serde_json::from_slice(&cipher().decode(b64.as_bytes(), 1).unwrap()).unwrap()
}

fn incoming_headers() -> Value {
    json!({
        "parentMessageId": "msg-0", "threadId": "thread-9", "stepId": "step_1",
        "x-eio-meta-trace-id": "trace-9", "X-EIO-META-Tenant": "acme", "protocolVersion": 1,
        "execId": "exec-of-previous-step"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn emits_the_completion_with_sailors_exact_headers() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(
        &rabbit,
        &[
            (
                "ELASTICIO_ADDITIONAL_VARS_FOR_HEADERS",
                "ELASTICIO_TENANT_ID",
            ),
            ("ELASTICIO_TENANT_ID", "tenant-7"),
        ],
    )
    .await;
    let id = step.send(&rabbit, hello(), incoming_headers()).await;
    let data = rabbit.take(&step.topology.data_queue, 1, WAIT).await;
    assert_eq!(data.len(), 1, "no data message:\n{}", step.log_text());
    let out = &data[0];
    assert_eq!(out.content_type.as_deref(), Some("application/json"));
    assert_eq!(out.content_encoding.as_deref(), Some("utf8"));
    assert_eq!(out.delivery_mode, Some(1));
    let message = decrypt(out);
    assert_eq!(
        message["body"]["choices"][0]["message"]["content"],
        "echo: Hello there"
    );
    assert_eq!(
        out.headers["messageId"], message["id"],
        "data messageId is the emitted message's id"
    );
    assert_eq!(out.headers["parentMessageId"], json!(id));
    assert!(out.headers["end"].as_u64() >= out.headers["start"].as_u64());
    insta::assert_json_snapshot!("data_headers", out.headers, {
        ".messageId" => "[uuid]", ".parentMessageId" => "[input id]", ".start" => "[ms]", ".end" => "[ms]",
    });
    insta::assert_json_snapshot!("data_message", message, {
        ".id" => "[uuid]", ".body.id" => "[completion id]", ".headers.openaiRequestId" => "[request id]",
    });
    assert_eq!(
        rabbit.depth(&step.topology.input_queue).await,
        0,
        "the input was acknowledged"
    );
    assert!(rabbit
        .take(&step.topology.error_queue, 1, Duration::from_millis(200))
        .await
        .is_empty());
    let step_fetches = step
        .platform
        .requests()
        .iter()
        .filter(|(_, path)| path == "/v1/tasks/flow-1/steps/step_2")
        .count();
    assert_eq!(step_fetches, 2, "a 500 on the step data is retried");
    assert!(
        !step.log_text().contains("Hello there"),
        "message bodies are never logged, even at trace"
    );
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_protocol_1_and_2_and_writes_the_configured_version() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(&rabbit, &[("ELASTICIO_PROTOCOL_VERSION", "2")]).await;
    for version in [1, 2] {
        step.send(&rabbit, hello(), json!({"protocolVersion": version}))
            .await;
        let data = rabbit.take(&step.topology.data_queue, 1, WAIT).await;
        assert_eq!(data.len(), 1, "protocol {version}:\n{}", step.log_text());
        assert_eq!(data[0].headers["protocolVersion"], 2);
        // Version 2 is raw ciphertext: not base64 text.
        assert!(
            std::str::from_utf8(&data[0].payload).is_err()
                || !data[0].payload.iter().all(u8::is_ascii_alphanumeric)
        );
        assert_eq!(decrypt(&data[0])["body"]["object"], "chat.completion");
    }
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_message_is_rejected_and_reported_and_the_next_one_still_runs() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(&rabbit, &[]).await;
    // Not decryptable.
    rabbit
        .publish(
            &step.topology.input_queue,
            b"bm90IGNpcGhlcnRleHQ=",
            json!({"messageId": "bad-1"}),
        )
        .await;
    // Decryptable, but breaks the input schema.
    step.send(
        &rabbit,
        json!({"messages": [{"role": "robot"}], "temperature": 9}),
        json!({"reply_to": step.topology.reply_key}),
    )
    .await;
    // A good one after both.
    step.send(&rabbit, hello(), json!({})).await;

    let errors = rabbit.take(&step.topology.error_queue, 2, WAIT).await;
    assert_eq!(errors.len(), 2, "{}", step.log_text());
    let (undecryptable, input) = error_of(&errors[0]);
    assert_eq!(undecryptable["name"], "MessageDecodeError");
    assert!(undecryptable["message"]
        .as_str()
        .unwrap()
        .contains("cannot be decrypted"));
    assert_eq!(
        input.as_deref(),
        Some("bm90IGNpcGhlcnRleHQ="),
        "protocol 1 input is passed on as received"
    );
    let (invalid, input) = error_of(&errors[1]);
    assert_eq!(invalid["name"], "ValidationError");
    assert_eq!(
        invalid["details"]["violations"][0]["pointer"],
        "/messages/0/role"
    );
    assert_eq!(invalid["stack"], "Not Available");
    assert_eq!(
        open(&input.unwrap())["body"]["temperature"],
        9,
        "errorInput carries the original message"
    );

    // The error reply goes to reply_to, marked as an error response.
    let replies = rabbit.take(&step.topology.reply_queue, 1, WAIT).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].headers["x-eio-error-response"], true);

    assert_eq!(
        rabbit.take(&step.topology.data_queue, 1, WAIT).await.len(),
        1,
        "the good message ran"
    );
    assert_eq!(
        step.fake.chat_requests().len(),
        1,
        "invalid messages never reach OpenAI"
    );
    assert_eq!(
        rabbit.depth(&step.topology.input_queue).await,
        0,
        "rejected without requeue"
    );
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_is_an_error_and_a_rate_limit_a_rebound() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start_with(&rabbit, &[], json!({"maxRetries": "0"}), false).await;

    step.fake.push(Script::Error(ErrorReply::invalid_api_key()));
    step.send(&rabbit, hello(), json!({})).await;
    let errors = rabbit.take(&step.topology.error_queue, 1, WAIT).await;
    assert_eq!(errors.len(), 1, "{}", step.log_text());
    let (error, _) = error_of(&errors[0]);
    assert_eq!(error["details"]["status"], 401);
    assert_eq!(step.fake.chat_requests().len(), 1, "401 is not retried");

    step.fake
        .push(Script::Error(ErrorReply::rate_limited_ms(1)));
    let first = step
        .send(&rabbit, hello(), json!({"protocolVersion": 1}))
        .await;
    let rebound = rabbit.take(&step.topology.rebound_queue, 1, WAIT).await;
    assert_eq!(rebound.len(), 1, "{}", step.log_text());
    assert_eq!(rebound[0].expiration.as_deref(), Some("15000"));
    assert_eq!(rebound[0].headers["reboundIteration"], 1);
    assert_eq!(
        rebound[0].headers["messageId"],
        json!(first),
        "the original headers travel on"
    );
    assert!(rebound[0].headers["reboundReason"]
        .as_str()
        .unwrap()
        .contains("429"));
    assert_eq!(
        decrypt(&rebound[0])["body"],
        hello(),
        "the original content is republished"
    );

    // The third rebound of a message waits 2^2 x 15 s; past the limit it becomes an error.
    step.fake
        .push(Script::Error(ErrorReply::rate_limited_ms(1)));
    step.send(&rabbit, hello(), json!({"reboundIteration": 2}))
        .await;
    let rebound = rabbit.take(&step.topology.rebound_queue, 1, WAIT).await;
    assert_eq!(rebound[0].expiration.as_deref(), Some("60000"));
    assert_eq!(rebound[0].headers["reboundIteration"], 3);
    step.fake
        .push(Script::Error(ErrorReply::rate_limited_ms(1)));
    step.send(&rabbit, hello(), json!({"reboundIteration": 20}))
        .await;
    let errors = rabbit.take(&step.topology.error_queue, 1, WAIT).await;
    assert_eq!(error_of(&errors[0]).0["message"], "Rebound limit exceeded");
    assert_eq!(rabbit.depth(&step.topology.input_queue).await, 0);
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_attachments_are_downloaded_and_sent_inline() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(&rabbit, &[]).await;
    step.platform
        .put_object("obj-1", "application/pdf", b"%PDF-1.4 report".to_vec());
    step.platform
        .put_file("cat.png", "image/png", vec![0x89, b'P', b'N', b'G']);
    let maester = format!("{}?storage_type=maester", step.platform.object_url("obj-1"));
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarise"},
        {"type": "file", "file": {"file_url": maester, "filename": "report.pdf"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/public.png"}}
    ]}]});
    step.send(&rabbit, body, json!({})).await;
    assert_eq!(
        rabbit.take(&step.topology.data_queue, 1, WAIT).await.len(),
        1,
        "{}",
        step.log_text()
    );
    let sent = &step.fake.chat_requests()[0].body["messages"][0]["content"];
    assert_eq!(
        sent[1]["file"],
        json!({"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQgcmVwb3J0"})
    );
    assert_eq!(
        sent[2]["image_url"]["url"], "https://example.com/public.png",
        "public URLs pass through"
    );

    // A missing object is a clear error naming the part.
    let missing = format!("{}?storage_type=maester", step.platform.object_url("nope"));
    step.send(&rabbit, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": missing}}]}]}), json!({})).await;
    let errors = rabbit.take(&step.topology.error_queue, 1, WAIT).await;
    let (error, _) = error_of(&errors[0]);
    assert_eq!(error["name"], "AttachmentError");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("/messages/0/content/0/image_url/url: could not be downloaded"),
        "{error}"
    );
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_when_the_broker_restarts_mid_run() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(
        &rabbit,
        &[
            ("ELASTICIO_AMQP_PERSISTENT_MESSAGES", "true"),
            ("ELASTICIO_RABBITMQ_PREFETCH_SAILOR", "4"),
        ],
    )
    .await;
    for _ in 0..8 {
        step.fake
            .push(Script::SlowFirstByte(Duration::from_millis(400)));
    }
    let mut sent = Vec::new();
    for _ in 0..8 {
        sent.push(step.send(&rabbit, hello(), json!({})).await);
    }
    // Restart while messages are in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rabbit.restart().await;
    let data = rabbit
        .take(&step.topology.data_queue, 8, Duration::from_secs(60))
        .await;
    let mut parents: Vec<String> = data
        .iter()
        .map(|d| d.headers["parentMessageId"].as_str().unwrap().to_string())
        .collect();
    parents.sort();
    parents.dedup();
    sent.sort();
    assert_eq!(
        parents,
        sent,
        "every input produced a result:\n{}",
        step.log_text()
    );
    // Inputs whose acks died with the old channel are settled when the broker redelivers them
    // to the reopened consumer: wait for the queue to drain rather than checking once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rabbit.depth(&step.topology.input_queue).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the input queue never drained:\n{}",
            step.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Redelivered inputs are not processed twice.
    let extra = rabbit
        .take(&step.topology.data_queue, 8, Duration::from_secs(1))
        .await;
    assert!(extra.is_empty(), "{} duplicate results", extra.len());
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_messages_in_flight_then_exits_cleanly() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(&rabbit, &[("ELASTICIO_RABBITMQ_PREFETCH_SAILOR", "3")]).await;
    for _ in 0..3 {
        step.fake
            .push(Script::SlowFirstByte(Duration::from_millis(1500)));
    }
    for _ in 0..3 {
        step.send(&rabbit, hello(), json!({})).await;
    }
    // Wait until all three are being processed, then ask the step to stop.
    let deadline = tokio::time::Instant::now() + WAIT;
    while step.fake.chat_requests().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            step.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = step.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    // A message published now must not be taken: consuming has stopped.
    step.send(&rabbit, hello(), json!({})).await;
    let status = tokio::time::timeout(WAIT, step.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", step.log_text());
    assert_eq!(
        rabbit.take(&step.topology.data_queue, 3, WAIT).await.len(),
        3,
        "in-flight results were published"
    );
    assert_eq!(
        rabbit.depth(&step.topology.input_queue).await,
        1,
        "the late message stays queued"
    );
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_fast_naming_the_missing_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"))
        .arg("sailor")
        .env_clear()
        .env("ELASTICIO_FLOW_ID", "f")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("ELASTICIO_EXEC_ID is missing"));
}

async fn service(platform: &Platform, method: &str, cfg: Value, extra: &[(&str, &str)]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"));
    command
        .args(["service", method])
        .env_clear()
        .env("ELASTICIO_POST_RESULT_URL", platform.result_url())
        .env("ELASTICIO_CFG", cfg.to_string())
        .env("ELASTICIO_API_URI", platform.uri())
        .env("ELASTICIO_API_USERNAME", "task-user")
        .env("ELASTICIO_API_KEY", PLATFORM_KEY);
    for (k, v) in extra {
        command.env(k, v);
    }
    let before = platform.results().len();
    let output = command.output().await.unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(!logs.contains(API_KEY) && !logs.contains(PLATFORM_KEY));
    platform.results()[before].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn service_mode_posts_results_to_the_platform() {
    let fake = FakeOpenAi::start().await;
    let platform = Platform::start("task-user", PLATFORM_KEY, STORAGE_TOKEN).await;
    let cfg = json!({"apiKey": API_KEY, "baseUrl": fake.base_url()});
    assert_eq!(
        service(&platform, "verifyCredentials", cfg.clone(), &[]).await,
        json!({"status": "success", "data": {"verified": true}})
    );

    let models = service(
        &platform,
        "selectModel",
        cfg.clone(),
        &[
            ("ELASTICIO_ACTION_OR_TRIGGER", "sendRequest"),
            ("ELASTICIO_GET_MODEL_METHOD", "getModels"),
        ],
    )
    .await;
    assert_eq!(models["status"], "success");
    assert_eq!(models["data"]["gpt-4o-mini"], "gpt-4o-mini");

    let meta = service(
        &platform,
        "getMetaModel",
        cfg.clone(),
        &[("ELASTICIO_ACTION_OR_TRIGGER", "sendRequest")],
    )
    .await;
    assert_eq!(
        meta["data"]["in"]["properties"]["messages"]["required"],
        true
    );

    let bad = service(
        &platform,
        "selectModel",
        cfg,
        &[
            ("ELASTICIO_ACTION_OR_TRIGGER", "sendRequest"),
            ("ELASTICIO_GET_MODEL_METHOD", "listEverything"),
        ],
    )
    .await;
    assert_eq!(bad["status"], "error");
    assert!(bad["data"]["message"]
        .as_str()
        .unwrap()
        .contains("listEverything"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_publishes_snapshots_and_http_replies_as_sailor_does() {
    use chatgpt_component::modes::sailor::{
        amqp::Publisher, delivery, platform::StepData, runtime::Runtime, settings,
    };
    use chatgpt_component::openai::OpenAi;

    let rabbit = Rabbit::start().await;
    let topology = rabbit.declare_topology("flow").await;
    let amqp_uri = rabbit.amqp_uri();
    let vars: std::collections::HashMap<String, String> = support::StepEnv {
        platform_uri: "http://127.0.0.1:1",
        platform_key: PLATFORM_KEY,
        amqp_uri: &amqp_uri,
        topology: &topology,
        crypto_password: PASSWORD,
        crypto_iv: IV,
        storage_token: STORAGE_TOKEN,
    }
    .vars()
    .into_iter()
    .collect();
    let settings = settings::read(&|name| vars.get(name).cloned()).unwrap();
    let publisher = Publisher::connect(&settings).await.unwrap();
    let rt = Runtime::new(
        settings,
        StepData::default(),
        cipher(),
        publisher,
        OpenAi::new(),
    );
    let outgoing = json!({"messageId": "m-1", "stepId": "step_2"})
        .as_object()
        .unwrap()
        .clone();

    delivery::publish_snapshot(&rt, &outgoing, &json!({"lastId": 7}), false)
        .await
        .unwrap();
    delivery::publish_snapshot(&rt, &outgoing, &json!({"cursor": "c"}), true)
        .await
        .unwrap();
    let snapshots = rabbit.take(&topology.snapshot_queue, 2, WAIT).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&snapshots[0].payload).unwrap(),
        json!({"lastId": 7}),
        "snapshots are plain JSON"
    );
    assert_eq!(snapshots[0].headers["snapshotEvent"], "snapshot");
    assert_eq!(snapshots[1].headers["snapshotEvent"], "updateSnapshot");

    let reply = json!({"statusCode": 200, "body": {"answer": "hi"}, "headers": {"content-type": "application/json"}});
    delivery::publish_http_reply(&rt, &outgoing, Some(&topology.reply_key), &reply)
        .await
        .unwrap();
    let replies = rabbit.take(&topology.reply_queue, 1, WAIT).await;
    assert_eq!(replies[0].headers["protocolVersion"], 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&cipher().decode(&replies[0].payload, 1).unwrap()).unwrap(),
        reply
    );
    assert!(delivery::publish_http_reply(&rt, &outgoing, None, &reply)
        .await
        .is_err());
    rt.publisher.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lightweight_messages_are_fetched_from_object_storage() {
    let rabbit = Rabbit::start().await;
    let mut step = Step::start(&rabbit, &[]).await;
    let stored =
        serde_json::to_vec(&json!({"messages": [{"role": "user", "content": "from storage"}]}))
            .unwrap();
    step.platform.put_object(
        "body-1",
        "application/octet-stream",
        cipher().encrypt(&stored),
    );
    for object in ["body-1", "missing-body"] {
        let message =
            json!({"id": "m", "body": {}, "headers": {"x-ipaas-object-storage-id": object}});
        let content = cipher().encode(&serde_json::to_vec(&message).unwrap(), 1);
        rabbit
            .publish(
                &step.topology.input_queue,
                &content,
                json!({"messageId": object}),
            )
            .await;
    }
    let data = rabbit.take(&step.topology.data_queue, 1, WAIT).await;
    assert_eq!(data.len(), 1, "{}", step.log_text());
    assert_eq!(
        decrypt(&data[0])["body"]["choices"][0]["message"]["content"],
        "echo: from storage"
    );
    let errors = rabbit.take(&step.topology.error_queue, 1, WAIT).await;
    let (error, _) = error_of(&errors[0]);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to get message body with id=missing-body"),
        "{error}"
    );
    step.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_and_the_outgoing_size_limit_work_as_in_sailor() {
    let rabbit = Rabbit::start().await;

    // Passthrough: earlier steps' entries are kept and this step's own output is added.
    let mut step = Step::start_with(&rabbit, &[], json!({}), true).await;
    let earlier = json!({"step_1": {"id": "m0", "body": {"from": "trigger"}, "headers": {}}});
    let message = json!({"id": "m1", "body": hello(), "headers": {}, "passthrough": earlier});
    let content = cipher().encode(&serde_json::to_vec(&message).unwrap(), 1);
    rabbit
        .publish(
            &step.topology.input_queue,
            &content,
            json!({"messageId": "m1", "stepId": "step_1"}),
        )
        .await;
    let data = rabbit.take(&step.topology.data_queue, 1, WAIT).await;
    assert_eq!(data.len(), 1, "{}", step.log_text());
    let out = decrypt(&data[0]);
    assert_eq!(out["passthrough"]["step_1"], earlier["step_1"]);
    assert_eq!(
        out["passthrough"]["step_2"]["body"], out["body"],
        "this step's own output"
    );
    assert!(out["passthrough"]["step_2"].get("passthrough").is_none());
    step.finish();

    // A result larger than OUTGOING_MESSAGE_SIZE_LIMIT is an error, and the input is rejected.
    let mut step = Step::start(&rabbit, &[("ELASTICIO_OUTGOING_MESSAGE_SIZE_LIMIT", "200")]).await;
    step.send(&rabbit, hello(), json!({})).await;
    let errors = rabbit.take(&step.topology.error_queue, 1, WAIT).await;
    assert_eq!(errors.len(), 1, "{}", step.log_text());
    let message = error_of(&errors[0]).0["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("Outgoing message size ")
            && message.ends_with(" exceeds limit of 200."),
        "{message}"
    );
    assert!(rabbit
        .take(&step.topology.data_queue, 1, Duration::from_millis(300))
        .await
        .is_empty());
    assert_eq!(rabbit.depth(&step.topology.input_queue).await, 0);
    step.finish();
}
