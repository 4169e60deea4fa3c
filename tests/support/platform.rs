//! A fake elastic.io platform API: the step-info endpoint, a result URL, object storage
//! (Maester) and a plain file server, on `127.0.0.1:<free port>`.
//!
//! The server runs on its own thread with its own Tokio runtime, so it keeps answering while
//! the test's runtime is blocked (e.g. waiting synchronously for the component's process) and
//! it can outlive a single `#[tokio::test]` runtime. Dropping the [`Platform`] stops it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/v1/tasks/f1/steps/s1`.
    pub path: String,
    /// Header names are lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Data {
    step: Option<Value>,
    /// Step calls still to be answered with 500.
    step_failures_left: usize,
    objects: HashMap<String, (String, Vec<u8>)>,
    files: HashMap<String, (String, Vec<u8>)>,
    results: Vec<Value>,
    requests: Vec<Request>,
}

struct Shared {
    username: String,
    api_key: String,
    storage_token: String,
    data: Mutex<Data>,
}

/// The fake platform. See the module documentation.
pub struct Platform {
    port: u16,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Platform {
    /// Starts the fake. Routes:
    ///
    /// * `GET /v1/tasks/{flow_id}/steps/{step_id}`: HTTP Basic auth with `username`/`api_key`
    ///   (401 otherwise); 500 for the first `fail_first` authorised calls after
    ///   [`set_step`](Self::set_step); then the step JSON (404 if none was set).
    /// * `POST /result`: records the JSON body (non-JSON bodies as a string), answers 200 `{}`.
    /// * `GET /objects/{id}`: object storage; `Authorization: Bearer <storage_token>` required
    ///   (401 otherwise); the stored bytes with their content type, 404 if unknown.
    /// * `GET /files/{name}`: public file server, no auth; 404 if unknown.
    ///
    /// Anything else is 404. Every request is logged (see [`requests`](Self::requests)).
    pub async fn start(username: &str, api_key: &str, storage_token: &str) -> Platform {
        let shared = Arc::new(Shared {
            username: username.to_string(),
            api_key: api_key.to_string(),
            storage_token: storage_token.to_string(),
            data: Mutex::new(Data::default()),
        });
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-platform".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake platform runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the fake platform");
                    let port = listener.local_addr().expect("local_addr").port();
                    let _ = port_tx.send(port);
                    let app = Router::new().fallback(handle).with_state(state);
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            result.expect("fake platform server");
                        }
                        _ = shutdown_rx => {}
                    }
                });
            })
            .expect("spawn the fake platform thread");
        let port = port_rx.await.expect("fake platform did not start");
        Platform {
            port,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where services post their results: `uri() + "/result"`.
    pub fn result_url(&self) -> String {
        format!("{}/result", self.uri())
    }

    /// The URL of an object in storage: `uri() + "/objects/" + id`.
    pub fn object_url(&self, id: &str) -> String {
        format!("{}/objects/{id}", self.uri())
    }

    /// The URL of a public file: `uri() + "/files/" + name`.
    pub fn file_url(&self, name: &str) -> String {
        format!("{}/files/{name}", self.uri())
    }

    /// Sets the step JSON served by the step-info endpoint; its next `fail_first` authorised
    /// calls answer 500.
    pub fn set_step(&self, step: Value, fail_first: usize) {
        let mut data = self.shared.data.lock().unwrap();
        data.step = Some(step);
        data.step_failures_left = fail_first;
    }

    pub fn put_object(&self, id: &str, content_type: &str, bytes: Vec<u8>) {
        let mut data = self.shared.data.lock().unwrap();
        data.objects
            .insert(id.to_string(), (content_type.to_string(), bytes));
    }

    pub fn put_file(&self, name: &str, content_type: &str, bytes: Vec<u8>) {
        let mut data = self.shared.data.lock().unwrap();
        data.files
            .insert(name.to_string(), (content_type.to_string(), bytes));
    }

    /// The bodies posted to the result URL, in order.
    pub fn results(&self) -> Vec<Value> {
        self.shared.data.lock().unwrap().results.clone()
    }

    /// `(method, path+query)` of every request, in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared
            .data
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect()
    }

    /// Every request with headers and body, in order.
    pub fn requests_detailed(&self) -> Vec<Request> {
        self.shared.data.lock().unwrap().requests.clone()
    }

    /// Polls [`results`](Self::results) until there are at least `n`; returns them (fewer if
    /// `timeout` passes).
    pub async fn wait_results(&self, n: usize, timeout: std::time::Duration) -> Vec<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let results = self.results();
            if results.len() >= n || std::time::Instant::now() >= deadline {
                return results;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    {
        let mut data = shared.data.lock().unwrap();
        data.requests.push(Request {
            method: method.to_string(),
            path: uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| path.clone()),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        });
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");

    match (method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "tasks", _flow, "steps", _step]) => {
            if !basic_auth_ok(authorization, &shared.username, &shared.api_key) {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Basic realm=\"platform\"")],
                    axum::Json(json!({"error": "Unauthorized"})),
                )
                    .into_response();
            }
            let mut data = shared.data.lock().unwrap();
            if data.step_failures_left > 0 {
                data.step_failures_left -= 1;
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"error": "Internal Server Error"})),
                )
                    .into_response();
            }
            match &data.step {
                Some(step) => axum::Json(step.clone()).into_response(),
                None => not_found(),
            }
        }
        ("POST", ["result"]) => {
            let value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            shared.data.lock().unwrap().results.push(value);
            axum::Json(json!({})).into_response()
        }
        ("GET", ["objects", id]) => {
            let expected = format!("Bearer {}", shared.storage_token);
            if authorization != expected {
                return (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "Unauthorized"})),
                )
                    .into_response();
            }
            let data = shared.data.lock().unwrap();
            match data.objects.get(*id) {
                Some((content_type, bytes)) => stored(content_type, bytes),
                None => not_found(),
            }
        }
        ("GET", ["files", ..]) => {
            let name = path.strip_prefix("/files/").unwrap_or("");
            let data = shared.data.lock().unwrap();
            match data.files.get(name) {
                Some((content_type, bytes)) => stored(content_type, bytes),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

fn basic_auth_ok(authorization: &str, username: &str, password: &str) -> bool {
    let Some(encoded) = authorization
        .strip_prefix("Basic ")
        .or_else(|| authorization.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    decoded == format!("{username}:{password}").as_bytes()
}

fn stored(content_type: &str, bytes: &[u8]) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type.to_string())],
        bytes.to_vec(),
    )
        .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": "Not Found"})),
    )
        .into_response()
}
