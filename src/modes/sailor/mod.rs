//! Platform mode: the component as an elastic.io step, speaking sailor's protocol to RabbitMQ.
//!
//! Start-up follows sailor: read the environment, fetch the step's data from the platform API,
//! connect (separate read and write connections), consume. Each delivery runs on its own task,
//! up to the prefetch count at once; the broker never hands out more. The consumer is reopened
//! after a broker restart or a closed channel. SIGTERM or SIGINT stops consuming, lets the
//! messages in flight finish and publish, closes both connections and returns.

pub mod amqp;
pub mod crypto;
pub mod delivery;
pub mod headers;
pub mod logging;
pub mod platform;
pub mod runtime;
pub mod service;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::headers::{to_json, Incoming};
use self::runtime::{Admission, Runtime};
use self::settings::Settings;
use crate::openai::OpenAi;

/// Longest pause between attempts to reopen the consumer after the broker went away: short, so
/// consuming resumes soon after the broker is back (and redeliveries get settled).
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Runs the step until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), String> {
    if settings.hook_shutdown {
        // This component has no shutdown hook: nothing to clean up.
        tracing::info!("shutdown hook mode: the component has no shutdown hook");
        return Ok(());
    }
    let cipher = crypto::Cipher::new(
        &settings.message_crypto_password,
        &settings.message_crypto_iv,
    )?;
    // Start-up latency is the sum of what runs in sequence: building the HTTP client (it loads
    // the TLS roots) and fetching the step overlap with connecting the publisher.
    let client_and_step = async {
        let client = tokio::task::spawn_blocking(OpenAi::new)
            .await
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let step = platform::fetch_step(client.http(), &settings).await?;
        Ok::<_, String>((client, step))
    };
    let publisher = connect_with_retries(&settings, || amqp::Publisher::connect(&settings));
    let (client_and_step, publisher) = tokio::join!(client_and_step, publisher);
    let ((client, step), publisher) = (client_and_step?, publisher?);
    let rt = Arc::new(Runtime::new(settings, step, cipher, publisher, client));
    let tracker = TaskTracker::new();
    let consumer = consume(&rt, &tracker, &shutdown).await;
    tracker.close();
    tracing::info!(
        in_flight = rt.in_flight(),
        "stopped consuming; waiting for messages in flight"
    );
    tracker.wait().await;
    if let Some((connection, channel)) = consumer {
        let _ = channel.close(200, "shutdown".into()).await;
        let _ = connection.close(200, "shutdown".into()).await;
    }
    rt.publisher.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Connects at start-up, retrying `AMQP_RECONNECT_ATTEMPTS` times `AMQP_RECONNECT_TIMEOUT` apart.
async fn connect_with_retries<T, F, Fut>(settings: &Settings, mut connect: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = lapin::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match connect().await {
            Ok(value) => return Ok(value),
            Err(e) if attempt >= settings.amqp_reconnect_attempts => {
                return Err(format!(
                    "cannot connect to RabbitMQ (ELASTICIO_AMQP_URI): {e}"
                ))
            }
            Err(e) => tracing::warn!(attempt, error = %e, "cannot connect to RabbitMQ; retrying"),
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(settings.amqp_reconnect_timeout_ms)).await;
    }
}

/// Consumes until shutdown, reopening the consumer whenever it is lost. Returns the live
/// consumer connection so in-flight messages can still be acknowledged on it.
async fn consume(
    rt: &Arc<Runtime>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Option<(lapin::Connection, lapin::Channel)> {
    let tag = format!("chatgpt-component-{}", uuid::Uuid::new_v4());
    let mut delay = Duration::from_millis(rt.settings.amqp_reconnect_timeout_ms.max(50));
    let mut first = true;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return None,
            opened = amqp::open_consumer(&rt.settings, &tag) => opened,
        };
        let (connection, channel, mut consumer) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "cannot open the consumer; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                continue;
            }
        };
        delay = Duration::from_millis(rt.settings.amqp_reconnect_timeout_ms.max(50));
        tracing::info!(queue = %rt.settings.listen_messages_on, prefetch = rt.settings.prefetch, reconnected = !first, "consuming");
        first = false;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    return Some((connection, channel));
                }
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => dispatch(rt, tracker, delivery),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the consumer failed; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("the consumer was closed; reconnecting");
                    break;
                }
            }
        }
        let _ = connection.close(200, "reconnecting".into()).await;
    }
}

/// Admits a delivery (in arrival order, for deduplication) and processes it on its own task.
fn dispatch(rt: &Arc<Runtime>, tracker: &TaskTracker, delivery: lapin::message::Delivery) {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(to_json)
        .unwrap_or_default();
    let incoming = Incoming::read(&headers);
    match rt.admit(incoming.message_id.as_deref(), &delivery.acker) {
        Admission::Process => {
            tracker.spawn(delivery::process(rt.clone(), delivery, headers, incoming));
        }
        Admission::Duplicate => {
            tracing::warn!(
                messageId = incoming.message_id.as_deref(),
                "duplicate delivery ignored; the first one's handler settles it"
            );
        }
        Admission::SettleNow { ack } => {
            let rt = rt.clone();
            let id = incoming.message_id;
            tracker.spawn(async move {
                if !runtime::settle(&delivery.acker, ack).await {
                    // Its channel died too: settle the next redelivery.
                    rt.remember_settlement(id.as_deref(), ack);
                }
            });
        }
    }
}
