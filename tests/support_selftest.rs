//! Checks the test harness itself: private RabbitMQ nodes and the fake platform.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Platform, Rabbit};

/// Processes whose command line mentions `needle` (e.g. a node's temp dir).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let out = std::process::Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(needle) && !line.contains("ps -eo"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn rabbit_round_trip_restart_and_cleanup() {
    let started = Instant::now();
    let rabbit = Rabbit::start().await;
    eprintln!("TIMING node start: {:?}", started.elapsed());
    assert!(rabbit
        .amqp_uri()
        .starts_with(&format!("amqp://guest:guest@127.0.0.1:{}/", rabbit.port())));
    let dir = rabbit.dir().to_path_buf();

    let t = rabbit.declare_topology("selftest").await;
    assert!(t.exchange.ends_with("_exchange"));
    assert_eq!(t.data_key, format!("{}.message", t.prefix));

    // Headers of every kind survive a round trip.
    let headers = json!({
        "taskId": "flow-1",
        "stepId": "step_1",
        "small": 42,
        "negative": -7,
        "big": 1_700_000_000_000i64,
        "flag": true,
        "ratio": 0.5,
        "nested": {"a": "b", "n": 1},
        "list": ["x", 2],
        "skipped": null,
    });
    rabbit
        .publish(&t.input_queue, br#"{"body":{"n":1}}"#, headers)
        .await;
    assert_eq!(rabbit.depth(&t.input_queue).await, 1);
    let got = rabbit.take(&t.input_queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.json(), json!({"body": {"n": 1}}));
    assert_eq!(
        m.headers,
        json!({
            "taskId": "flow-1",
            "stepId": "step_1",
            "small": 42,
            "negative": -7,
            "big": 1_700_000_000_000i64,
            "flag": true,
            "ratio": 0.5,
            "nested": {"a": "b", "n": 1},
            "list": ["x", 2],
        })
    );
    assert_eq!(m.delivery_mode, Some(2));
    assert_eq!(m.routing_key, t.input_queue);
    assert_eq!(rabbit.depth(&t.input_queue).await, 0);

    // The bindings route each key to its queue.
    for (key, queue) in [
        (&t.data_key, &t.data_queue),
        (&t.error_key, &t.error_queue),
        (&t.rebound_key, &t.rebound_queue),
        (&t.snapshot_key, &t.snapshot_queue),
        (&t.reply_key, &t.reply_queue),
    ] {
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf8".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into());
        rabbit
            .publish_with(&t.exchange, key, key.as_bytes(), properties)
            .await;
        let got = rabbit.take(queue, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{key} -> {queue}");
        assert_eq!(got[0].payload, key.as_bytes());
        assert_eq!(got[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(got[0].content_encoding.as_deref(), Some("utf8"));
        assert_eq!(got[0].expiration.as_deref(), Some("60000"));
        assert_eq!(got[0].message_id.as_deref(), Some("m-1"));
        assert_eq!(got[0].headers, json!({}));
        assert_eq!(got[0].exchange, t.exchange);
    }

    // take() returns fewer after the timeout.
    let waited = Instant::now();
    assert!(rabbit
        .take(&t.data_queue, 1, Duration::from_millis(300))
        .await
        .is_empty());
    assert!(waited.elapsed() >= Duration::from_millis(300));

    // Persistent messages survive an orderly restart, on the same port.
    let port = rabbit.port();
    rabbit
        .publish(&t.input_queue, b"before restart", json!({"k": "v"}))
        .await;
    let restarted = Instant::now();
    rabbit.restart().await;
    eprintln!("TIMING node restart: {:?}", restarted.elapsed());
    assert_eq!(rabbit.port(), port);
    assert_eq!(rabbit.depth(&t.input_queue).await, 1);
    let got = rabbit.take(&t.input_queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].payload, b"before restart");
    assert_eq!(got[0].headers, json!({"k": "v"}));

    // stop(): the port is closed and connections fail; start_again() brings it back.
    rabbit
        .publish(&t.input_queue, b"across stop", json!({}))
        .await;
    let stopping = Instant::now();
    rabbit.stop().await;
    eprintln!("TIMING node stop: {:?}", stopping.elapsed());
    assert!(!rabbit.is_running());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(
        lapin::Connection::connect(&rabbit.amqp_uri(), Default::default())
            .await
            .is_err()
    );
    let again = Instant::now();
    rabbit.start_again().await;
    eprintln!("TIMING node start_again: {:?}", again.elapsed());
    assert!(rabbit.is_running());

    // kill(): a crash; confirmed persistent messages survive it too.
    rabbit
        .publish(&t.input_queue, b"across crash", json!({}))
        .await;
    rabbit.kill().await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let again = Instant::now();
    rabbit.start_again().await;
    eprintln!("TIMING node start after kill: {:?}", again.elapsed());
    let got = rabbit
        .take(&t.input_queue, 2, Duration::from_secs(10))
        .await;
    let payloads: Vec<_> = got.iter().map(|m| m.text()).collect();
    assert_eq!(
        payloads,
        ["across stop", "across crash"],
        "{got:#?}\nlog: {}",
        rabbit.log_path().display()
    );

    // Drop stops everything and removes the directory.
    let dir_text = dir.to_str().unwrap().to_string();
    assert!(!processes_mentioning(&dir_text).is_empty());
    let dropping = Instant::now();
    drop(rabbit);
    eprintln!("TIMING node drop: {:?}", dropping.elapsed());
    assert!(!dir.exists());
    assert_eq!(processes_mentioning(&dir_text), Vec::<String>::new());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn two_nodes_start_concurrently() {
    let started = Instant::now();
    let (a, b) = tokio::join!(Rabbit::start(), Rabbit::start());
    eprintln!("TIMING two concurrent node starts: {:?}", started.elapsed());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.node(), b.node());
    a.declare_queue("only-on-a").await;
    a.publish("only-on-a", b"a", json!({})).await;
    assert_eq!(a.depth("only-on-a").await, 1);
    // The nodes are independent.
    b.declare_queue("only-on-a").await;
    assert_eq!(b.depth("only-on-a").await, 0);
}

#[tokio::test]
async fn platform_serves_step_results_objects_and_files() {
    let platform = Platform::start("user@example.com", "api-key-1", "storage-token").await;
    let http = reqwest::Client::new();
    let step_url = format!("{}/v1/tasks/flow-1/steps/step_1", platform.uri());
    let step = json!({"id": "step_1", "config": {"apiKey": "sk-x"}, "snapshot": {}});
    platform.set_step(step.clone(), 2);

    // No auth, then wrong auth: 401 (and they don't use up the failures).
    let r = http.get(&step_url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(&step_url)
        .basic_auth("user@example.com", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Two 500s, then the step.
    for _ in 0..2 {
        let r = http
            .get(&step_url)
            .basic_auth("user@example.com", Some("api-key-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
    }
    let r = http
        .get(&step_url)
        .basic_auth("user@example.com", Some("api-key-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap(), step);

    // Results are recorded.
    let r = http
        .post(platform.result_url())
        .json(&json!({"status": "success", "data": {"x": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        platform.wait_results(1, Duration::from_secs(1)).await,
        [json!({"status": "success", "data": {"x": 1}})]
    );

    // Object storage needs the bearer token.
    platform.put_object("obj-1", "image/png", vec![0x89, b'P', b'N', b'G']);
    let r = http.get(platform.object_url("obj-1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(platform.object_url("obj-1"))
        .bearer_auth("bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(platform.object_url("obj-1"))
        .bearer_auth("storage-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), [0x89, b'P', b'N', b'G']);
    let r = http
        .get(platform.object_url("missing"))
        .bearer_auth("storage-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Public files need nothing.
    platform.put_file("notes.txt", "text/plain", b"hello".to_vec());
    let r = http
        .get(platform.file_url("notes.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = http
        .get(platform.file_url("nope.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let requests = platform.requests();
    assert_eq!(requests.len(), 12);
    assert_eq!(
        requests[0],
        (
            "GET".to_string(),
            "/v1/tasks/flow-1/steps/step_1".to_string()
        )
    );
    assert_eq!(requests[5], ("POST".to_string(), "/result".to_string()));
    let detailed = platform.requests_detailed();
    assert!(detailed[2]
        .header("Authorization")
        .unwrap()
        .starts_with("Basic "));
}

/// The platform keeps answering while the test's runtime is blocked.
#[tokio::test]
async fn platform_answers_while_the_test_runtime_is_blocked() {
    let platform = Platform::start("u", "k", "t").await;
    platform.put_file("f", "text/plain", b"ok".to_vec());
    let url = platform.file_url("f");
    let body = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(
            url.trim_start_matches("http://").split('/').next().unwrap(),
        )
        .unwrap();
        use std::io::{Read, Write};
        stream
            .write_all(b"GET /files/f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .join()
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("ok"), "{body}");
}

/// Run by `rabbit_is_cleaned_up_when_the_test_process_dies` in a child process: starts a node,
/// prints its directory and waits to be killed.
#[tokio::test]
#[ignore = "helper, run by rabbit_is_cleaned_up_when_the_test_process_dies"]
async fn orphan_helper() {
    if std::env::var_os("CGC_ORPHAN_HELPER").is_none() {
        return;
    }
    let rabbit = Rabbit::start().await;
    println!("DIR={}", rabbit.dir().display());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    drop(rabbit);
}

/// A node whose owner dies without dropping it (a `static`, SIGKILL) stops and deletes its
/// directory by itself.
#[tokio::test]
async fn rabbit_is_cleaned_up_when_the_test_process_dies() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "orphan_helper", "--nocapture"])
        .env("CGC_ORPHAN_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let dir = tokio::task::spawn_blocking(move || {
        stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("DIR=").map(str::to_string))
    })
    .await
    .unwrap()
    .expect("the helper printed its node's directory");
    assert!(!processes_mentioning(&dir).is_empty());
    child.kill().unwrap(); // SIGKILL: no destructors run
    child.wait().unwrap();
    let killed = Instant::now();
    while (std::path::Path::new(&dir).exists() || !processes_mentioning(&dir).is_empty())
        && killed.elapsed() < Duration::from_secs(40)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("TIMING orphan cleanup: {:?}", killed.elapsed());
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} was not removed"
    );
    assert_eq!(processes_mentioning(&dir), Vec::<String>::new());
}
