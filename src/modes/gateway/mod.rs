//! The HTTP gateway (`chatgpt-component serve`): the Send Request action behind plain HTTP, in
//! the shapes the Vanus ChatGPT Source and Glific's `parse_via_chat_gpt` callers already use.
//!
//! Routes:
//! - `POST /` ([`vanus`]): text in; the answer goes to `target` as a CloudEvent ([`delivery`]),
//!   and also comes back in the reply with `Process-Mode: sync`.
//! - `POST /glific/parse_via_chat_gpt` ([`glific`]): Glific's webhook fields in,
//!   `{"success", "parsed_msg"}` out.
//! - `POST /actions/{action}` ([`generic`]): `{"cfg", "msg"}` in, the emitted events out.
//! - `GET /healthz`, `/readyz`, `/metrics` ([`ops`]).
//!
//! Every route turns its request into a Send Request message and goes through
//! [`Gateway::call`]: admission to a bounded queue (429 when full), the daily limit
//! ([`quota`]), a slot among `concurrency` upstream calls, then [`actions::process`] — the same
//! core every other mode uses. Work that outlives a request (asynchronous answers, deliveries)
//! runs on a task tracker, and shutdown waits for it.

pub mod config;
pub mod delivery;
pub mod generic;
pub mod glific;
pub mod metrics;
pub mod ops;
pub mod quota;
pub mod vanus;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::{self, Context};
use crate::credentials::process_env;
use crate::emit::{ErrorEvent, Outcome};
use crate::message::Message;
use crate::openai::{OpenAi, RetryPolicy};
use config::Config;
use delivery::Delivery;
use metrics::Metrics;
use quota::{Clock, Exhausted, Quota};

/// How long shutdown lets queued work finish before delivery retries give up (and dead-letter).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// What the embedding program may change; the defaults are what `serve` uses.
#[derive(Clone)]
pub struct Options {
    pub clock: Clock,
    /// Upstream backoff; `max_retries` from the config overrides the count.
    pub retry: RetryPolicy,
    pub shutdown_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: quota::system_clock(),
            retry: RetryPolicy::default(),
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// The gateway's shared state; cheap to clone.
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    config: Config,
    /// The Send Request `cfg` every route starts from (holds the key: never log it).
    action_cfg: Value,
    client: OpenAi,
    retry: RetryPolicy,
    clock: Clock,
    quota: Arc<Quota>,
    delivery: Delivery,
    metrics: Arc<Metrics>,
    /// Requests admitted: running plus waiting. Its size is `concurrency + queue_size`.
    admission: Arc<Semaphore>,
    /// Upstream calls under way.
    upstream: Semaphore,
    tasks: TaskTracker,
    /// Set when shutdown begins: `/readyz` fails, requests are still served (for
    /// `shutdown_delay`, while load balancers take the replica out).
    stopping: CancellationToken,
    /// Set when the server stops accepting: new work is refused.
    draining: CancellationToken,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Refusal {
    /// The queue is full: try again shortly.
    QueueFull,
    /// The gateway is shutting down.
    Draining,
    DailyLimit(Exhausted),
    /// The action failed in a way the caller must fix (input, configuration, a refused request).
    Failed(ErrorEvent),
    /// The upstream kept failing transiently (rate limit, overload, network) through retries.
    Transient(ErrorEvent),
}

impl Refusal {
    /// The HTTP status that tells a caller what happened.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::QueueFull | Refusal::DailyLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Draining | Refusal::Transient(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Failed(e)
                if matches!(e.name.as_str(), "ValidationError" | "ConfigurationError") =>
            {
                StatusCode::BAD_REQUEST
            }
            Refusal::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Seconds a caller should wait before trying again, when waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::QueueFull => Some(1),
            Refusal::Draining | Refusal::Transient(_) => Some(5),
            Refusal::DailyLimit(e) => Some(e.retry_after.as_secs().max(1)),
            Refusal::Failed(_) => None,
        }
    }

    /// The refusal as an error event: what the generic route emits and the others summarise.
    pub fn to_event(&self) -> ErrorEvent {
        match self {
            Refusal::QueueFull => ErrorEvent::new(
                "QueueFull",
                "the gateway's queue is full; retry after the Retry-After delay, or raise `queue_size` / `concurrency`",
                Value::Null,
            ),
            Refusal::Draining => ErrorEvent::new(
                "ShuttingDown",
                "the gateway is shutting down; retry against another replica",
                Value::Null,
            ),
            Refusal::DailyLimit(e) => ErrorEvent::new(
                "DailyLimitReached",
                format!(
                    "the daily limit of {} successful calls (everyday_limit) is reached; it resets at 00:00 UTC",
                    e.limit
                ),
                serde_json::json!({ "limit": e.limit }),
            ),
            Refusal::Failed(e) | Refusal::Transient(e) => e.clone(),
        }
    }

    /// Adds `Retry-After` to a response when waiting helps.
    pub fn decorate(&self, mut response: Response) -> Response {
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

/// A request's place in the queue; held until its work (and delivery) is done.
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
}

impl Gateway {
    /// Creates `data_dir` (so an unwritable one stops start-up, not the first write) and loads
    /// today's count.
    pub fn new(config: Config, options: Options) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "config key `data_dir`: cannot create {}: {e}",
                    config.data_dir.display()
                ),
            )
        })?;
        let metrics = Arc::new(Metrics::new());
        let quota = Quota::open(
            config.everyday_limit,
            options.clock.clone(),
            Some(config.data_dir.join("daily-usage.json")),
        )?;
        let draining = CancellationToken::new();
        let delivery = Delivery::new(&config, metrics.clone());
        Ok(Gateway(Arc::new(Inner {
            action_cfg: config.action_cfg(),
            client: OpenAi::new(),
            retry: options.retry,
            clock: options.clock,
            quota: Arc::new(quota),
            delivery,
            metrics,
            admission: Arc::new(Semaphore::new(config.concurrency + config.queue_size)),
            upstream: Semaphore::new(config.concurrency),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            draining,
            config,
        })))
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.0.clock)()
    }

    /// The Send Request `cfg` built from the server config.
    pub fn action_cfg(&self) -> &Value {
        &self.0.action_cfg
    }

    pub fn delivery(&self) -> &Delivery {
        &self.0.delivery
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.is_cancelled()
    }

    /// Shutdown has begun: not ready for new traffic.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.is_cancelled()
    }

    /// Admits a request to the queue, or refuses at once when it is full.
    pub fn admit(&self) -> Result<Ticket, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        match self.0.admission.clone().try_acquire_owned() {
            Ok(permit) => Ok(Ticket { _permit: permit }),
            Err(_) => {
                self.0.metrics.rejected.inc();
                Err(Refusal::QueueFull)
            }
        }
    }

    /// Runs Send Request on `msg` for an admitted request: the daily limit, an upstream slot,
    /// then the action core.
    pub async fn call(
        &self,
        _ticket: &Ticket,
        cfg: &Value,
        msg: Message,
    ) -> Result<Message, Refusal> {
        let inner = &self.0;
        let reservation = inner.quota.reserve().map_err(|e| {
            inner.metrics.daily_limit_refusals.inc();
            tracing::warn!(limit = e.limit, "daily limit reached; call refused");
            Refusal::DailyLimit(e)
        })?;
        // Guards, not inc/dec pairs: a caller that hangs up drops this future mid-way.
        let waiting = GaugeGuard::up(&inner.metrics.queue_depth);
        let slot = inner.upstream.acquire().await.expect("never closed");
        drop(waiting);
        let running = GaugeGuard::up(&inner.metrics.in_flight);
        let env = process_env;
        let ctx = Context {
            client: &inner.client,
            env: &env,
            retry: inner.retry.clone(),
            storage: Default::default(),
        };
        let started = Instant::now();
        let outcome = actions::process("sendRequest", &ctx, cfg, msg).await;
        drop(slot);
        drop(running);
        if let Some(status) = upstream_status(&outcome) {
            inner
                .metrics
                .upstream_calls
                .with_label_values(&[&status])
                .inc();
            inner
                .metrics
                .upstream_seconds
                .with_label_values(&[&status])
                .observe(started.elapsed().as_secs_f64());
        }
        match outcome {
            Outcome::Data(message) => {
                reservation.commit();
                self.count_tokens(&message.body);
                Ok(message)
            }
            Outcome::Error(error) => Err(Refusal::Failed(error)),
            Outcome::Rebound(error) => Err(Refusal::Transient(error)),
        }
    }

    fn count_tokens(&self, body: &Value) {
        for kind in ["prompt", "completion"] {
            if let Some(n) = body["usage"][format!("{kind}_tokens")].as_u64() {
                self.0.metrics.tokens.with_label_values(&[kind]).inc_by(n);
            }
        }
    }

    /// Runs work that outlives its request; shutdown waits for it.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.0.tasks.spawn(work);
    }
}

/// Holds a gauge one higher while it lives.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn up(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The label for an upstream call's outcome; `None` when no call was made.
fn upstream_status(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Data(_) => Some("200".into()),
        Outcome::Error(e) | Outcome::Rebound(e) if e.name == "OpenAIError" => {
            Some(match (&e.details["status"], &e.details["transport"]) {
                (Value::Number(status), _) => status.to_string(),
                (_, Value::String(_)) => "transport".into(),
                _ => "invalid".into(),
            })
        }
        _ => None,
    }
}

/// The gateway's routes, with auth, the body limit and request metrics.
pub fn router(gateway: Gateway) -> Router {
    let api = Router::new()
        .route("/", any(vanus::handle))
        .route("/glific/parse_via_chat_gpt", post(glific::handle))
        .route("/actions/{action}", post(generic::handle))
        .route_layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            ops::authenticate,
        ));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(api)
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            ops::observe,
        ))
        .layer(DefaultBodyLimit::max(gateway.config().max_body_bytes))
        .with_state(gateway)
}

/// Serves on `listener` until `shutdown`; then stops accepting, finishes queued work (giving
/// delivery retries `shutdown_grace`), saves the daily count and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    for key in &config.ignored_keys {
        tracing::warn!(key, "config key has no meaning for this gateway; ignored");
    }
    let grace = options.shutdown_grace;
    let gateway = Gateway::new(config, options)?;
    let inner = gateway.0.clone();
    let stop_persisting = CancellationToken::new();
    let persist = tokio::spawn(inner.quota.clone().persist(stop_persisting.clone()));
    tracing::info!(
        address = %listener.local_addr()?,
        target = inner.config.target.as_deref().unwrap_or("(none)"),
        model = inner.config.model,
        "gateway listening"
    );
    let (stopping, draining) = (inner.stopping.clone(), inner.draining.clone());
    let delay = Duration::from_secs_f64(inner.config.shutdown_delay);
    let app = router(gateway);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            stopping.cancel();
            if !delay.is_zero() {
                tracing::info!(?delay, "shutting down: not ready, still serving");
                tokio::time::sleep(delay).await;
            }
            draining.cancel();
        })
        .await?;
    inner.tasks.close();
    if tokio::time::timeout(grace, inner.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = inner.tasks.len(),
            "queued work still running after the grace period; delivery retries stop and dead-letter"
        );
        inner.delivery.stop_retrying();
        inner.tasks.wait().await;
    }
    stop_persisting.cancel();
    let _ = persist.await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Pending connections the kernel queues for us; its default of 128 drops connection attempts
/// of a burst (and clients retry only after a second).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `bind:port` from the config and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> std::io::Result<()> {
    let address = std::net::SocketAddr::from((config.bind, config.port));
    let listen = || {
        let socket = match address {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let listener = listen()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
    serve(config, listener, Options::default(), shutdown).await
}

/// A conversation id from a request field: text, or a number (flow templates often expand
/// `@contact.id` to one). Whether it is a valid id is checked by Send Request's schema.
pub fn conversation_id(field: &str, value: Option<&Value>) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(Value::Number(id)) => Ok(Some(id.to_string())),
        Some(_) => Err(format!("/{field} must be a string or a number")),
    }
}

/// A JSON response with a status.
pub fn json_reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}
