//! Answers as CloudEvents, delivered to `target`; what cannot be delivered goes to a dead-letter
//! directory.
//!
//! Vanus delivers in structured mode, retries `send_event_attempts` times with a doubling
//! backoff capped at 5 s and 5 s per attempt, and then only logs the loss. We keep the same
//! rules and defaults, but an event that still cannot be delivered is written to
//! `data_dir/dead-letters/` (and logged in full if even that fails): never dropped silently.
//! A shutdown stops the retrying and dead-letters what is left, so it cannot hang on a dead
//! target.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudevents::binding::http::{Builder, Serializer};
use cloudevents::message::{BinaryDeserializer, StructuredDeserializer};
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::config::{Config, EventMode};
use super::metrics::Metrics;

/// Vanus's default `source` and `type`.
pub const DEFAULT_SOURCE: &str = "vanus-chatGPT-source";
pub const DEFAULT_TYPE: &str = "vanus-chatGPT-type";
/// Vanus's backoff cap.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A new event id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Builds the event for one answer, `data` as JSON.
pub fn answer_event(id: String, source: &str, ty: &str, time: DateTime<Utc>, data: Value) -> Event {
    EventBuilderV10::new()
        .id(id)
        .source(source)
        .ty(ty)
        .time(time)
        .data("application/json", data)
        .build()
        .expect("id, source and type are set")
}

/// An HTTP request body and headers, as the cloudevents serializer produces them.
#[derive(Default)]
struct Encoded {
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Builder<Encoded> for Encoded {
    fn header(&mut self, key: &str, value: reqwest::header::HeaderValue) {
        if let Ok(name) = reqwest::header::HeaderName::from_bytes(key.as_bytes()) {
            self.headers.insert(name, value);
        }
    }
    fn body(&mut self, bytes: Vec<u8>) -> cloudevents::message::Result<Encoded> {
        Ok(Encoded {
            headers: std::mem::take(&mut self.headers),
            body: bytes,
        })
    }
    fn finish(&mut self) -> cloudevents::message::Result<Encoded> {
        self.body(Vec::new())
    }
}

fn encode(event: Event, mode: EventMode) -> cloudevents::message::Result<Encoded> {
    let serializer = Serializer::new(Encoded::default());
    match mode {
        EventMode::Structured => event.deserialize_structured(serializer),
        EventMode::Binary => event.deserialize_binary(serializer),
    }
}

/// Sends events to `target`.
pub struct Delivery {
    http: reqwest::Client,
    target: Option<String>,
    mode: EventMode,
    /// Total attempts; 0 means until shutdown.
    attempts: u32,
    backoff: Duration,
    timeout: Duration,
    dead_letters: PathBuf,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Delivery {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Delivery {
            http: reqwest::Client::new(),
            target: config.target.clone(),
            mode: config.event_mode,
            attempts: config.send_event_attempts.max(0) as u32,
            backoff: config.delivery_backoff(),
            timeout: Duration::from_secs_f64(config.send_event_timeout),
            dead_letters: config.data_dir.join("dead-letters"),
            metrics,
            stop: CancellationToken::new(),
        }
    }

    /// Makes retrying deliveries give up at once and dead-letter (at the end of shutdown).
    pub fn stop_retrying(&self) {
        self.stop.cancel();
    }

    pub fn has_target(&self) -> bool {
        self.target.is_some()
    }

    /// Delivers `event`, retrying; dead-letters it when every attempt failed.
    pub async fn deliver(&self, event: Event) {
        let Some(target) = &self.target else { return };
        let id = event.id().to_string();
        let mut attempt = 0u32;
        let error = loop {
            attempt += 1;
            let error = match self.send(target, event.clone()).await {
                Ok(()) => {
                    self.metrics
                        .deliveries
                        .with_label_values(&["delivered"])
                        .inc();
                    tracing::debug!(id, attempt, "event delivered");
                    return;
                }
                Err(error) => error,
            };
            if self.attempts != 0 && attempt >= self.attempts {
                break error;
            }
            self.metrics
                .deliveries
                .with_label_values(&["retried"])
                .inc();
            let delay = self
                .backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF.max(self.backoff));
            tracing::warn!(
                id,
                attempt,
                error,
                ?delay,
                "event delivery failed; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => break format!("{error}; stopped retrying at shutdown"),
            }
        };
        self.metrics.deliveries.with_label_values(&["failed"]).inc();
        self.dead_letter(event, target, attempt, &error).await;
    }

    async fn send(&self, target: &str, event: Event) -> Result<(), String> {
        let encoded = encode(event, self.mode).map_err(|e| format!("cannot encode: {e}"))?;
        let response = self
            .http
            .post(target)
            .headers(encoded.headers)
            .body(encoded.body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| crate::openai::client::error_chain(&e))?;
        // As sdk-go: only a 2xx is an acknowledgement.
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the target answered {}", response.status()))
        }
    }

    async fn dead_letter(&self, event: Event, target: &str, attempts: u32, error: &str) {
        self.metrics.dead_letters.inc();
        let record = json!({
            "event": event,
            "target": target,
            "attempts": attempts,
            "error": error,
            "failedAt": Utc::now().to_rfc3339(),
        });
        let dir = self.dead_letters.clone();
        let name = format!(
            "{}-{}.json",
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            event.id()
        );
        let bytes = serde_json::to_vec_pretty(&record).expect("serializes");
        let written = tokio::task::spawn_blocking(move || write_new(&dir, &name, &bytes)).await;
        match written {
            Ok(Ok(path)) => tracing::error!(
                id = event.id(), attempts, error, file = %path.display(),
                "event could not be delivered; written to the dead-letter directory"
            ),
            other => tracing::error!(
                id = event.id(), attempts, error,
                write_error = ?other.map(|r| r.err()),
                record = %record,
                "event could not be delivered nor dead-lettered; it is logged here in full"
            ),
        }
    }
}

/// Writes a file under a temporary name and renames it, so readers never see half a record.
fn write_new(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_and_binary_encodings_round_trip_through_the_sdk() {
        let time = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let event = answer_event(new_id(), "s", "t", time, json!({"content": "hi"}));
        let structured = encode(event.clone(), EventMode::Structured).unwrap();
        assert_eq!(
            structured.headers["content-type"],
            "application/cloudevents+json"
        );
        let parsed: Value = serde_json::from_slice(&structured.body).unwrap();
        assert_eq!(parsed["data"], json!({"content": "hi"}));
        assert_eq!(parsed["datacontenttype"], "application/json");
        let binary = encode(event.clone(), EventMode::Binary).unwrap();
        assert_eq!(binary.headers["ce-source"], "s");
        let back = cloudevents::binding::http::to_event(&binary.headers, binary.body).unwrap();
        assert_eq!(
            (back.id(), back.source().as_str(), back.ty(), back.time()),
            (event.id(), "s", "t", Some(&time))
        );
        let data: Vec<u8> = back.data().unwrap().clone().try_into().unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&data).unwrap(),
            json!({"content": "hi"})
        );
    }
}
