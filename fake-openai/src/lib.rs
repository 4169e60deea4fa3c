//! A fake OpenAI HTTP API for tests and benchmarks, since the real one cannot be
//! reached from them.
//!
//! It answers like OpenAI does: the same status codes, error bodies
//! (`{"error":{"message","type","param","code"}}`), `x-request-id`, rate-limit and
//! `retry-after` headers, and SSE streaming. Scripts make the next chat completions
//! fail, stall or break in the ways real networks and APIs do, and every request is
//! logged so tests can assert on what the client sent.
//!
//! ```no_run
//! use fake_openai::{ErrorReply, FakeOpenAi, Reply, Script};
//!
//! # async fn demo() {
//! let server = FakeOpenAi::start().await;
//! // Point the client under test at `server.base_url()` ("http://127.0.0.1:PORT/v1").
//! server.push(Script::Error(ErrorReply::rate_limited("1")));
//! server.push(Script::Reply(Reply {
//!     content: Some("hello".into()),
//!     ..Reply::default()
//! }));
//! // ... run the client: its first attempt gets a 429, the retry gets "hello" and any
//! // further request the default reply, "echo: <last user message>".
//! assert_eq!(server.chat_requests().len(), 2);
//! # }
//! ```
//!
//! [`Options::latency`] delays every valid chat completion by a fixed time, like a model that
//! takes a while to answer (for load tests); by default the fake answers at once.
//!
//! Routes: `POST /v1/chat/completions`, `GET /v1/models`, and the Azure forms
//! `POST /openai/deployments/{deployment}/chat/completions` and
//! `GET /openai/deployments/{deployment}/models`. Anything else is OpenAI's 404
//! "Invalid URL". All routes need a key (`Authorization: Bearer` or `api-key`).
//!
//! The `fake-openai` binary serves the same fake on a fixed port for manual runs
//! (`--latency-ms N` sets [`Options::latency`]).

mod chat;
mod script;
mod server;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::sync::oneshot;

pub use script::{ErrorReply, Reply, Script, ToolCall};

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// A running fake server. It serves from a spawned tokio task until dropped.
pub struct FakeOpenAi {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// How the fake presents itself.
#[derive(Clone, Debug)]
pub struct Options {
    /// `false` makes `GET /v1/models` a 404, like compatible servers without a model list.
    pub models_endpoint: bool,
    /// Ids listed by `/v1/models` and accepted by `/v1/chat/completions`.
    pub models: Vec<String>,
    /// `Some`: only this key is accepted. `None`: any non-empty key is.
    pub api_key: Option<String>,
    /// Waited before answering every chat completion that passed authentication and
    /// validation, scripted or not (a script's own delays come on top). Rejected requests and
    /// the model list answer at once. Zero by default.
    pub latency: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let models = [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-5",
            "o3-mini",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-instruct",
            "text-embedding-3-small",
            "whisper-1",
            "tts-1",
            "dall-e-3",
            "omni-moderation-latest",
            "ft:gpt-4o-mini:acme::abc123",
        ];
        Options {
            models_endpoint: true,
            models: models.iter().map(|m| m.to_string()).collect(),
            api_key: None,
            latency: Duration::ZERO,
        }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names lowercased; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// `Null` when the body is empty or not JSON.
    pub body: serde_json::Value,
}

impl FakeOpenAi {
    /// Starts with [`Options::default`] on a free port of 127.0.0.1.
    pub async fn start() -> FakeOpenAi {
        FakeOpenAi::start_with(Options::default()).await
    }

    /// Starts on a free port of 127.0.0.1.
    pub async fn start_with(options: Options) -> FakeOpenAi {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        FakeOpenAi::start_on(addr, options)
            .await
            .expect("fake-openai: cannot bind 127.0.0.1:0")
    }

    /// Starts on the given address (port 0 picks a free one); fails if it cannot bind.
    pub async fn start_on(addr: SocketAddr, options: Options) -> std::io::Result<FakeOpenAi> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        #[cfg(not(windows))]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deep accept queue: a load test (or a gateway under one) opens a thousand
        // connections at once, and past `TcpListener::bind`'s 128 the kernel drops SYNs, each
        // costing the client a retransmit a second or more later.
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(server::Shared::new(options));
        let app = server::router(shared.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                // Resolves on `send` and also when the handle is dropped without sending.
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                eprintln!("fake-openai: server error: {error}");
            }
        });
        Ok(FakeOpenAi {
            addr,
            shared,
            shutdown: Some(shutdown),
        })
    }

    /// `http://127.0.0.1:PORT/v1`, what an OpenAI client takes as its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a script for a later chat completion; scripts are used first in, first out,
    /// one per valid request, and the default reply is used once the queue is empty.
    pub fn push(&self, script: Script) {
        self.shared.scripts.lock().unwrap().push_back(script);
    }

    /// Every request received so far, any path, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let log = self.shared.log.lock().unwrap();
        log.iter().map(|logged| logged.request.clone()).collect()
    }

    /// Only the chat-completion requests (v1 and Azure), including rejected ones.
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        let log = self.shared.log.lock().unwrap();
        log.iter()
            .filter(|logged| logged.chat)
            .map(|logged| logged.request.clone())
            .collect()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}
