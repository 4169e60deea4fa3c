//! One delivery, start to finish: decode it, run the action, publish what it emits, settle it.
//!
//! The input is acknowledged only at `end`, after every publish for it was confirmed, and it is
//! settled exactly once: ack, or reject without requeue when an error was emitted. If results
//! cannot be published at all, the input is requeued rather than dropped.
//! Redeliveries are deduplicated by [`Runtime`].

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::amqp::Outgoing;
use super::headers::{self, now_ms, Incoming};
use super::runtime::{self, Runtime};
use super::settings::Settings;
use crate::actions::{self, Context};
use crate::emit::{Emitter, ErrorEvent, Event};
use crate::message::Message;
use crate::openai::RetryPolicy;

/// Publishes a snapshot as sailor does: plain JSON (snapshots are not encrypted) to the snapshot
/// routing key, with `snapshotEvent` (`snapshot` or `updateSnapshot`). Send Request is stateless
/// and never emits one; this is the runtime's side of the protocol.
pub async fn publish_snapshot(
    rt: &Runtime,
    outgoing: &Map<String, Value>,
    snapshot: &Value,
    update: bool,
) -> Result<(), String> {
    let mut headers = outgoing.clone();
    headers.insert(
        "snapshotEvent".into(),
        json!(if update { "updateSnapshot" } else { "snapshot" }),
    );
    let payload = serde_json::to_vec(snapshot).map_err(|e| e.to_string())?;
    rt.publisher
        .publish(Outgoing {
            routing_key: &rt.settings.snapshot_routing_key,
            payload: &payload,
            headers,
            properties: None,
            expiration: None,
        })
        .await
}

/// Publishes an HTTP reply (`{statusCode, body, headers}`) to the caller waiting on `reply_to`,
/// always encrypted with protocol 1, as sailor does. Without `reply_to` there is no caller.
pub async fn publish_http_reply(
    rt: &Runtime,
    outgoing: &Map<String, Value>,
    reply_to: Option<&str>,
    reply: &Value,
) -> Result<(), String> {
    let reply_to =
        reply_to.ok_or("an HTTP reply needs a caller, but the message has no reply_to")?;
    let mut headers = outgoing.clone();
    headers.insert("protocolVersion".into(), json!(1));
    let plain = serde_json::to_vec(reply).map_err(|e| e.to_string())?;
    let payload = rt.cipher.encode(&plain, 1);
    rt.publisher
        .publish(Outgoing {
            routing_key: reply_to,
            payload: &payload,
            headers,
            properties: None,
            expiration: None,
        })
        .await
}

/// Processes one admitted delivery.
pub async fn process(
    rt: Arc<Runtime>,
    delivery: Delivery,
    headers: Map<String, Value>,
    incoming: Incoming,
) {
    let span = tracing::info_span!(
        "message",
        threadId = %incoming.thread_id,
        messageId = incoming.message_id.as_deref().unwrap_or("unknown"),
        parentMessageId = incoming.parent_message_id.as_deref().unwrap_or("unknown"),
    );
    async move {
        let outgoing = headers::outgoing(&incoming, &rt.settings, now_ms());
        let decoded = match decode(&rt, &delivery.data, &incoming) {
            Ok(mut msg) => resolve_lightweight(&rt, &mut msg).await.map(|()| msg),
            Err(reason) => Err(reason),
        };
        let mut emitter = AmqpEmitter {
            rt: &rt,
            delivery: &delivery,
            original_headers: headers,
            incoming: &incoming,
            outgoing,
            errors: 0,
            settled: false,
            input: None,
        };
        let msg = match decoded {
            Ok(msg) => msg,
            Err(reason) => {
                tracing::error!(reason = %reason, "cannot read the incoming message; rejecting it");
                let error = ErrorEvent::new("MessageDecodeError", reason, Value::Null);
                if emitter.emit(Event::Error { error }).await.is_err()
                    || emitter.emit(Event::End).await.is_err()
                {
                    emitter.requeue().await;
                }
                return;
            }
        };
        if rt.step.is_passthrough {
            emitter.input = Some(msg.clone());
        }
        tracing::debug!("processing message");
        let ctx = Context {
            client: &rt.client,
            // On the platform the step's configuration is the only source of credentials.
            env: &|_| None,
            retry: RetryPolicy::default(),
            storage: crate::actions::attachments::Storage {
                uri: rt.settings.object_storage_uri.clone(),
                token: rt.settings.object_storage_token.clone(),
            },
        };
        if let Err(e) = actions::run(
            &rt.settings.function,
            &ctx,
            &rt.step.config,
            msg,
            &mut emitter,
        )
        .await
        {
            tracing::error!(error = %e, "results could not be published; requeueing the message");
            emitter.requeue().await;
        }
    }
    .instrument(span)
    .await
}

/// Decrypts and parses the content; `reply_to` is copied into the message headers as sailor does.
/// The header that marks a lightweight message: its body is in object storage.
const OBJECT_ID: &str = "x-ipaas-object-storage-id";

/// Fetches the bodies of a lightweight message and of lightweight passthrough entries, as sailor
/// does before processing (`autoResolveObjectReferences`). Objects hold the body as JSON
/// encrypted with the message cipher (raw ciphertext).
async fn resolve_lightweight(rt: &Runtime, msg: &mut Message) -> Result<(), String> {
    if let Some(id) = msg.headers.get(OBJECT_ID).and_then(Value::as_str) {
        msg.body = fetch_object(rt, id).await?;
    }
    for entry in msg.passthrough.iter_mut().flat_map(|p| p.values_mut()) {
        let id = entry
            .pointer(&format!("/headers/{OBJECT_ID}"))
            .and_then(Value::as_str);
        if let Some(id) = id.map(str::to_string) {
            entry["body"] = fetch_object(rt, &id).await?;
        }
    }
    Ok(())
}

async fn fetch_object(rt: &Runtime, id: &str) -> Result<Value, String> {
    let failed = |why: String| format!("Failed to get message body with id={id}: {why}");
    let settings = &rt.settings;
    let (Some(uri), Some(token)) = (&settings.object_storage_uri, &settings.object_storage_token)
    else {
        return Err(failed(
            "ELASTICIO_OBJECT_STORAGE_URI and ELASTICIO_OBJECT_STORAGE_TOKEN are needed for lightweight messages".into(),
        ));
    };
    let response = rt
        .client
        .http()
        .get(format!("{}/objects/{id}", uri.trim_end_matches('/')))
        .bearer_auth(token.expose())
        .timeout(std::time::Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| failed(crate::openai::client::error_chain(&e.without_url())))?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "object storage answered HTTP {}",
            response.status()
        )));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| failed(e.without_url().to_string()))?;
    let plain = rt
        .cipher
        .decrypt(&bytes)
        .map_err(|e| failed(e.to_string()))?;
    serde_json::from_slice(&plain).map_err(|e| failed(format!("the stored body is not JSON: {e}")))
}

fn decode(rt: &Runtime, content: &[u8], incoming: &Incoming) -> Result<Message, String> {
    let plain = rt
        .cipher
        .decode(content, incoming.protocol_version)
        .map_err(|e| format!("the message cannot be decrypted: {e}"))?;
    let value: Value = serde_json::from_slice(&plain)
        .map_err(|e| format!("the decrypted message is not JSON: {e}"))?;
    let mut msg = Message::from_json(value)?;
    if let Some(reply_to) = &incoming.reply_to {
        msg.headers.insert("reply_to".into(), json!(reply_to));
    }
    Ok(msg)
}

/// Publishes one delivery's events.
struct AmqpEmitter<'a> {
    rt: &'a Runtime,
    delivery: &'a Delivery,
    original_headers: Map<String, Value>,
    incoming: &'a Incoming,
    outgoing: Map<String, Value>,
    errors: u32,
    settled: bool,
    /// The decoded input, kept only for passthrough.
    input: Option<Message>,
}

#[async_trait]
impl Emitter for AmqpEmitter<'_> {
    async fn emit(&mut self, event: Event) -> io::Result<()> {
        match event {
            Event::Data { message } => {
                if let Err(problem) = self.publish_data(message).await {
                    self.publish_error(ErrorEvent::new("Error", problem, Value::Null))
                        .await?;
                }
                Ok(())
            }
            Event::Error { error } => self.publish_error(error).await,
            Event::Rebound { reason } => self.publish_rebound(reason).await,
            Event::End => {
                self.settle(self.errors == 0).await;
                Ok(())
            }
        }
    }
}

impl AmqpEmitter<'_> {
    fn settings(&self) -> &Settings {
        &self.rt.settings
    }

    async fn publish_data(&mut self, mut message: Message) -> Result<(), String> {
        let settings = self.settings();
        // `x-eio-routing-key` (any case) overrides the routing key and is not sent on.
        let override_key = message
            .headers
            .keys()
            .find(|k| k.eq_ignore_ascii_case("x-eio-routing-key"))
            .cloned();
        let routing_key = override_key
            .and_then(|k| message.headers.remove(&k))
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| settings.data_routing_key.clone());
        if self.rt.step.is_passthrough {
            message.passthrough = Some(self.passthrough(&message));
        }
        let plain = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
        let payload = self.rt.cipher.encode(&plain, settings.protocol_version);
        if payload.len() as u64 > settings.outgoing_message_size_limit {
            return Err(format!(
                "Outgoing message size {} exceeds limit of {}.",
                payload.len(),
                settings.outgoing_message_size_limit
            ));
        }
        let mut headers = self.outgoing.clone();
        if !message.id.is_empty() {
            headers.insert("messageId".into(), json!(message.id));
        }
        headers.insert("end".into(), json!(now_ms()));
        headers.insert("protocolVersion".into(), json!(settings.protocol_version));
        self.rt
            .publisher
            .publish(Outgoing {
                routing_key: &routing_key,
                payload: &payload,
                headers,
                properties: None,
                expiration: None,
            })
            .await
    }

    /// sailor's passthrough: what earlier steps emitted, plus this step's own output (or, with
    /// `NO_SELF_PASSTRHOUGH`, the previous step's message).
    fn passthrough(&self, message: &Message) -> Map<String, Value> {
        let input = self.input.as_ref();
        let mut passthrough = input
            .and_then(|m| m.passthrough.clone())
            .unwrap_or_default();
        let without_passthrough = |m: &Message| {
            let mut v = serde_json::to_value(m).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("passthrough");
            }
            v
        };
        if self.settings().no_self_passthrough {
            if let (Some(step), Some(input)) = (&self.incoming.step_id, input) {
                passthrough.insert(step.clone(), without_passthrough(input));
            }
        } else {
            passthrough.insert(
                self.settings().step_id.clone(),
                without_passthrough(message),
            );
        }
        passthrough
    }

    /// Publishes `{"error": b64(enc({name, message, stack})), "errorInput": ...}` to the error
    /// routing key, and the encrypted error to `reply_to` when the caller waits for a reply.
    async fn publish_error(&mut self, error: ErrorEvent) -> io::Result<()> {
        self.errors += 1;
        let settings = self.settings();
        let plain = json!({
            "name": error.name,
            "message": error.message,
            "stack": "Not Available",
            "details": error.details,
        });
        let encrypted = self.rt.cipher.encode(&serde_json::to_vec(&plain)?, 1);
        let encrypted = String::from_utf8_lossy(&encrypted).into_owned();
        let mut payload = json!({ "error": encrypted });
        if let Some(input) = self.error_input() {
            payload["errorInput"] = json!(input);
        }
        let mut headers = self.outgoing.clone();
        headers.insert("end".into(), json!(now_ms()));
        let body = serde_json::to_vec(&payload)?;
        self.rt
            .publisher
            .publish(Outgoing {
                routing_key: &settings.error_routing_key,
                payload: &body,
                headers: headers.clone(),
                properties: None,
                expiration: None,
            })
            .await
            .map_err(io::Error::other)?;
        if let Some(reply_to) = self
            .incoming
            .reply_to
            .as_deref()
            .filter(|_| !settings.no_error_replies)
        {
            headers.insert("x-eio-error-response".into(), json!(true));
            self.rt
                .publisher
                .publish(Outgoing {
                    routing_key: reply_to,
                    payload: encrypted.as_bytes(),
                    headers,
                    properties: None,
                    expiration: None,
                })
                .await
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// The input for the error envelope: as received for protocol 1 (already base64), re-encoded
    /// as base64 for protocol 2; none when it cannot be decrypted at all.
    fn error_input(&self) -> Option<String> {
        let content = &self.delivery.data;
        if self.incoming.protocol_version < 2 {
            return Some(String::from_utf8_lossy(content).into_owned());
        }
        let plain = self.rt.cipher.decrypt(content).ok()?;
        let encoded = self.rt.cipher.encode(&plain, 1);
        Some(String::from_utf8_lossy(&encoded).into_owned())
    }

    /// Republishes the original content for a later retry: `expiration` doubles per iteration
    /// from `REBOUND_INITIAL_EXPIRATION`; past `REBOUND_LIMIT` it becomes an error instead.
    async fn publish_rebound(&mut self, reason: ErrorEvent) -> io::Result<()> {
        let settings = self.settings();
        let iteration = self.incoming.rebound_iteration.map_or(1, |n| n + 1);
        if iteration > settings.rebound_limit as i64 {
            tracing::warn!(iteration, "rebound limit exceeded");
            let error = ErrorEvent::new(
                "Error",
                "Rebound limit exceeded",
                json!({ "lastReason": reason.message }),
            );
            // sailor publishes the error but does not count it: the input is acknowledged.
            let result = self.publish_error(error).await;
            self.errors -= 1;
            return result;
        }
        let expiration = 2u64
            .saturating_pow((iteration - 1).min(62) as u32)
            .saturating_mul(settings.rebound_initial_expiration_ms);
        tracing::info!(iteration, expiration_ms = expiration, reason = %reason.message, "rebounding message");
        let mut headers = self.original_headers.clone();
        headers.insert("end".into(), json!(now_ms()));
        headers.insert("reboundReason".into(), json!(reason.message));
        headers.insert("reboundIteration".into(), json!(iteration));
        self.rt
            .publisher
            .publish(Outgoing {
                routing_key: &settings.rebound_routing_key,
                payload: &self.delivery.data,
                headers,
                properties: Some(self.delivery.properties.clone()),
                expiration: Some(expiration.to_string()),
            })
            .await
            .map_err(io::Error::other)
    }

    async fn settle(&mut self, ack: bool) {
        if std::mem::replace(&mut self.settled, true) {
            tracing::warn!("end emitted twice; the message was already settled");
            return;
        }
        let id = self.incoming.message_id.as_deref();
        let acker = self.rt.take_acker(id, &self.delivery.acker);
        if !runtime::settle(&acker, ack).await {
            // The channel is gone; the broker will redeliver, and `admit` settles it then.
            tracing::warn!("could not settle the message; it will be settled on redelivery");
            self.rt.remember_settlement(id, ack);
        }
    }

    /// Gives the input back to the broker: used only when results could not be published.
    async fn requeue(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let acker = self
            .rt
            .take_acker(self.incoming.message_id.as_deref(), &self.delivery.acker);
        let options = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if !matches!(acker.nack(options).await, Ok(true)) {
            tracing::warn!("could not requeue the message; the broker will redeliver it");
        }
    }
}
