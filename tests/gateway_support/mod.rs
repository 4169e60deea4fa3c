//! Helpers for `tests/gateway.rs`: a gateway served in-process on a free loopback port, a
//! CloudEvents receiver that checks every request with cloudevents-sdk, a settable clock,
//! temporary directories and a reader for the metrics text.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chatgpt_component::modes::gateway::{self, config, quota::Clock, Options};
use chrono::{DateTime, Utc};
use cloudevents::{AttributesReader, Event};
use fake_openai::FakeOpenAi;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{fast_retry, no_env, API_KEY};

/// How long any poll waits before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `probe` every 10 ms until it gives a value; fails the test after [`PATIENCE`].
pub async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Arc<TempDir> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "gateway-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Arc::new(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A clock the test moves by hand (whole seconds).
#[derive(Clone)]
pub struct TestClock(Arc<AtomicI64>);

impl TestClock {
    pub fn at(rfc3339: &str) -> TestClock {
        TestClock(Arc::new(AtomicI64::new(seconds(rfc3339))))
    }

    pub fn set(&self, rfc3339: &str) {
        self.0.store(seconds(rfc3339), Ordering::SeqCst);
    }

    pub fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.0.load(Ordering::SeqCst), 0).unwrap()
    }

    pub fn clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || this.now())
    }
}

fn seconds(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp()
}

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// An HTTP reply as the test saw it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("reply {} is not JSON ({e}): {}", self.status, self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A gateway served in-process by `gateway::serve` on 127.0.0.1 with a free port.
pub struct Gateway {
    pub addr: SocketAddr,
    pub dir: Arc<TempDir>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// Every reply's status, headers and body, for the secret scan.
    transcript: Mutex<String>,
}

impl Gateway {
    /// Keys of the test on top of: the canary key, the fake as `base_url`, a fresh `data_dir`
    /// and fast delivery retries. A key set to `null` is removed.
    pub async fn start(fake: &FakeOpenAi, keys: Value) -> Gateway {
        Gateway::start_with(fake, keys, system_clock(), TempDir::new()).await
    }

    pub async fn start_with(
        fake: &FakeOpenAi,
        keys: Value,
        clock: Clock,
        dir: Arc<TempDir>,
    ) -> Gateway {
        let mut map = json!({
            "token": API_KEY,
            "base_url": fake.base_url(),
            "data_dir": dir.path().to_str().unwrap(),
            "send_event_backoff_ms": 20,
            "send_event_timeout": 5,
        })
        .as_object()
        .unwrap()
        .clone();
        for (key, value) in keys.as_object().expect("keys are an object") {
            if value.is_null() {
                map.remove(key);
            } else {
                map.insert(key.clone(), value.clone());
            }
        }
        let config = config::from_map(map, &no_env).expect("a valid gateway config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = Options {
            clock,
            retry: fast_retry(),
            shutdown_grace: Duration::from_secs(2),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway::serve(config, listener, options, shutdown.clone()));
        Gateway {
            addr,
            dir,
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
            transcript: Mutex::new(String::new()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path))
    }

    /// `POST /` with a text prompt; `mode` is the `Process-Mode` header, if any.
    pub fn prompt_request(&self, text: &str, mode: Option<&str>) -> reqwest::RequestBuilder {
        let request = self
            .post("/")
            .header("content-type", "text/plain")
            .body(text.to_string());
        match mode {
            Some(mode) => request.header("process-mode", mode),
            None => request,
        }
    }

    pub async fn prompt(&self, text: &str, mode: Option<&str>) -> HttpReply {
        self.send(self.prompt_request(text, mode)).await
    }

    pub async fn post_json(&self, path: &str, body: Value) -> HttpReply {
        self.send(self.post(path).json(&body)).await
    }

    /// Sends a request, records the reply in the transcript and returns it.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> HttpReply {
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a readable body");
        let mut transcript = self.transcript.lock().unwrap();
        transcript.push_str(&format!("{status} {headers:?}\n{text}\n"));
        HttpReply {
            status,
            headers,
            text,
        }
    }

    pub fn transcript(&self) -> String {
        self.transcript.lock().unwrap().clone()
    }

    pub async fn metrics(&self) -> String {
        let reply = self.send(self.get("/metrics")).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.text
    }

    /// The value of one series, such as `chatgpt_gateway_dead_letters_total` or
    /// `chatgpt_gateway_deliveries_total{result="retried"}`; 0 when it is not there yet.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Polls `series` until `accept` holds; fails the test after [`PATIENCE`].
    pub async fn wait_metric(&self, series: &str, accept: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = self.metric(series).await;
            if accept(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {series} (last value {value})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancels the token (as SIGTERM does) without waiting.
    pub fn signal_stop(&self) {
        self.shutdown.cancel();
    }

    /// Cancels the token and waits for `serve` to return; returns how long that took.
    pub async fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        let task = self.task.take().expect("the gateway is running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve does not panic")
            .expect("serve ends without an error");
        started.elapsed()
    }

    /// [`Gateway::stop`] at the end of a test: `serve` must return cleanly, and only then is
    /// `data_dir` removed (a still-running gateway would write into it again).
    pub async fn finish(mut self) {
        self.stop().await;
    }

    pub fn dead_letter_dir(&self) -> PathBuf {
        self.dir.path().join("dead-letters")
    }

    /// The records in `data_dir/dead-letters/` (finished files only).
    pub fn dead_letters(&self) -> Vec<Value> {
        let Ok(entries) = std::fs::read_dir(self.dead_letter_dir()) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            records.push(serde_json::from_slice(&bytes).expect("a dead letter is JSON"));
        }
        records
    }

    /// Every file under `data_dir`, as text, for the secret scan.
    pub fn files_text(&self) -> String {
        fn walk(dir: &Path, out: &mut String) {
            for entry in std::fs::read_dir(dir).into_iter().flatten() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
                    out.push('\n');
                }
            }
        }
        let mut out = String::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The value of `series` in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Sends raw bytes as one HTTP/1.1 request (the test controls header spelling) and returns the
/// status and body. The request must say `Connection: close`.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut bytes))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    let text = String::from_utf8(bytes).expect("a UTF-8 reply");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// One event the receiver accepted.
#[derive(Clone, Debug)]
pub struct Received {
    pub event: Event,
    /// The request's `content-type`: tells structured from binary mode.
    pub content_type: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The event data, decoded as JSON.
    pub data: Value,
}

#[derive(Default)]
struct ReceiverState {
    accepted: Mutex<Vec<Received>>,
    /// Every request, whatever the answer: headers and body as text.
    raw: Mutex<Vec<String>>,
    /// Requests that were not valid CloudEvents as the gateway must send them.
    problems: Mutex<Vec<String>>,
    failures_left: AtomicUsize,
    always_fail: AtomicBool,
}

/// A CloudEvents sink: parses every request with cloudevents-sdk and checks every attribute.
/// It can answer 500 for a while, or for good.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Receiver {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Answers 500 to the next `n` requests.
    pub fn fail_next(&self, n: usize) {
        self.state.failures_left.store(n, Ordering::SeqCst);
    }

    pub fn fail_always(&self, on: bool) {
        self.state.always_fail.store(on, Ordering::SeqCst);
    }

    /// Requests received, whatever the answer.
    pub fn requests(&self) -> usize {
        self.state.raw.lock().unwrap().len()
    }

    pub fn raw_text(&self) -> String {
        self.state.raw.lock().unwrap().join("\n")
    }

    fn assert_no_problems(&self) {
        let problems = self.state.problems.lock().unwrap();
        assert!(problems.is_empty(), "invalid events arrived: {problems:#?}");
    }

    /// The events accepted (answered 2xx) so far.
    pub fn events(&self) -> Vec<Received> {
        self.assert_no_problems();
        self.state.accepted.lock().unwrap().clone()
    }

    /// Waits until at least `n` events were accepted.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(&format!("{n} event(s) at the receiver"), || {
            let events = self.events();
            (events.len() >= n).then_some(events)
        })
        .await
    }

    /// Waits for the accepted event with this id.
    pub async fn wait_for_id(&self, id: &str) -> Received {
        eventually(&format!("event {id} at the receiver"), || {
            self.events().into_iter().find(|e| e.event.id() == id)
        })
        .await
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state
        .raw
        .lock()
        .unwrap()
        .push(format!("{headers:?}\n{}", String::from_utf8_lossy(&body)));
    let checked = cloudevents::binding::http::to_event(&headers, body.to_vec())
        .map_err(|e| format!("cloudevents-sdk cannot parse the request: {e}"))
        .and_then(|event| check(&event).map(|data| (event, data)));
    let (event, data) = match checked {
        Ok(parsed) => parsed,
        Err(problem) => {
            state.problems.lock().unwrap().push(problem);
            return StatusCode::BAD_REQUEST;
        }
    };
    if state.always_fail.load(Ordering::SeqCst)
        || state
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    state.accepted.lock().unwrap().push(Received {
        event,
        content_type,
        headers,
        body: body.to_vec(),
        data,
    });
    StatusCode::ACCEPTED
}

/// Every attribute the gateway must set, as the spec and Vanus consumers expect them; the data
/// as a JSON object with a text `content`.
fn check(event: &Event) -> Result<Value, String> {
    let mut problems = Vec::new();
    if event.specversion().as_str() != "1.0" {
        problems.push(format!("specversion {}", event.specversion()));
    }
    if uuid::Uuid::parse_str(event.id()).is_err() {
        problems.push(format!("id {:?} is not a UUID", event.id()));
    }
    if event.source().is_empty() {
        problems.push("source is empty".into());
    }
    if event.ty().is_empty() {
        problems.push("type is empty".into());
    }
    if event.time().is_none() {
        problems.push("time is not set".into());
    }
    if event.datacontenttype() != Some("application/json") {
        problems.push(format!("datacontenttype {:?}", event.datacontenttype()));
    }
    let data = event
        .data()
        .cloned()
        .map(Value::try_from)
        .map(|r| r.map_err(|e| e.to_string()));
    let data = match data {
        Some(Ok(data)) if data["content"].is_string() => Some(data),
        other => {
            problems.push(format!("data {other:?} has no text content"));
            None
        }
    };
    match data {
        Some(data) if problems.is_empty() => Ok(data),
        _ => Err(format!("event {}: {}", event.id(), problems.join("; "))),
    }
}
