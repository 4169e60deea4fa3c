//! AMQP headers: reading the platform's, building ours exactly as sailor does.
//!
//! Headers are handled as a JSON map (what sailor's code sees) and converted to and from AMQP
//! field tables at the edges. Number encoding follows amqplib: an integer that fits 32 bits is a
//! signed 32-bit field, a larger one (timestamps) a signed 64-bit field.

use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::{json, Map, Value};

use super::settings::Settings;

/// The header prefix whose entries travel with a message from step to step.
const META_PREFIX: &str = "x-eio-meta-";

/// What sailor reads from an incoming delivery's headers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Incoming {
    pub message_id: Option<String>,
    pub parent_message_id: Option<String>,
    /// `threadId`, else `x-eio-meta-trace-id`, else a new UUID: every message belongs to a thread.
    pub thread_id: String,
    /// The previous step (used by `NO_SELF_PASSTRHOUGH`).
    pub step_id: Option<String>,
    /// `x-eio-meta-*` headers, names lower-cased.
    pub meta: Map<String, Value>,
    pub reply_to: Option<String>,
    /// `protocolVersion`, default 1: decides how the content is decoded.
    pub protocol_version: u8,
    pub rebound_iteration: Option<i64>,
}

impl Incoming {
    pub fn read(headers: &Map<String, Value>) -> Incoming {
        let text = |key: &str| match headers.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let meta: Map<String, Value> = headers
            .iter()
            .filter(|(k, _)| k.to_lowercase().starts_with(META_PREFIX))
            .map(|(k, v)| (k.to_lowercase(), v.clone()))
            .collect();
        let thread_id = text("threadId")
            .or_else(|| {
                meta.get("x-eio-meta-trace-id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let protocol_version = match headers.get("protocolVersion") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(1.0),
            Some(Value::String(s)) => s.trim().parse().unwrap_or(1.0),
            _ => 1.0,
        };
        Incoming {
            message_id: text("messageId"),
            parent_message_id: text("parentMessageId"),
            thread_id,
            step_id: text("stepId"),
            meta,
            reply_to: text("reply_to"),
            protocol_version: if protocol_version >= 2.0 { 2 } else { 1 },
            rebound_iteration: headers.get("reboundIteration").and_then(Value::as_i64),
        }
    }
}

/// The headers every event for one incoming message starts from (sailor's
/// `outgoingMessageHeaders`): the incoming ones it keeps, the step's identity, and `start`.
pub fn outgoing(incoming: &Incoming, settings: &Settings, start_ms: u64) -> Map<String, Value> {
    let mut h = Map::new();
    if let Some(step) = &incoming.step_id {
        h.insert("stepId".into(), json!(step));
    }
    h.extend(incoming.meta.clone());
    if let Some(reply_to) = &incoming.reply_to {
        h.insert("reply_to".into(), json!(reply_to));
    }
    for (name, value) in &settings.additional_headers {
        h.insert(name.clone(), json!(value));
    }
    if let Some(parent) = &incoming.message_id {
        h.insert("parentMessageId".into(), json!(parent));
    }
    h.insert("threadId".into(), json!(incoming.thread_id));
    h.insert("messageId".into(), json!(uuid::Uuid::new_v4().to_string()));
    for (name, value) in [
        ("execId", &settings.exec_id),
        ("taskId", &settings.flow_id),
        ("workspaceId", &settings.workspace_id),
        ("containerId", &settings.container_id),
        ("userId", &settings.user_id),
        ("stepId", &settings.step_id),
        ("compId", &settings.comp_id),
        ("function", &settings.function),
    ] {
        h.insert(name.into(), json!(value));
    }
    h.insert("start".into(), json!(start_ms));
    h
}

/// Milliseconds since the epoch, as sailor's `new Date().getTime()`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// An AMQP field table as JSON.
pub fn to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), value_to_json(v)))
        .collect()
}

/// JSON headers as an AMQP field table (nulls are left out, as amqplib skips `undefined`).
pub fn to_table(headers: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        if let Some(v) = json_to_value(v) {
            table.insert(ShortString::from(k.as_str()), v);
        }
    }
    table
}

fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldTable(t) => Value::Object(to_json(t)),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        other => json!(format!("{other:?}")),
    }
}

fn json_to_value(value: &Value) -> Option<AMQPValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) if i32::try_from(i).is_ok() => AMQPValue::LongInt(i as i32),
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            _ => return None,
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().filter_map(json_to_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(to_table(map)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_incoming_headers_like_sailor() {
        let h = json!({
            "messageId": "m1", "parentMessageId": "p0", "stepId": "step_0",
            "X-EIO-META-Trace-Id": "trace-7", "x-eio-meta-tenant": "t1", "other": "x",
            "reply_to": "amq.gen-reply", "protocolVersion": 2, "reboundIteration": 3
        });
        let incoming = Incoming::read(h.as_object().unwrap());
        assert_eq!(incoming.message_id.as_deref(), Some("m1"));
        assert_eq!(
            incoming.thread_id, "trace-7",
            "falls back to x-eio-meta-trace-id"
        );
        assert_eq!(
            incoming.meta,
            *json!({"x-eio-meta-trace-id": "trace-7", "x-eio-meta-tenant": "t1"})
                .as_object()
                .unwrap()
        );
        assert_eq!(incoming.protocol_version, 2);
        assert_eq!(incoming.rebound_iteration, Some(3));
        let bare = Incoming::read(&Map::new());
        assert_eq!(bare.protocol_version, 1);
        assert_eq!(bare.thread_id.len(), 36, "a new thread id is a UUID");
    }

    #[test]
    fn tables_round_trip_with_amqplib_number_widths() {
        let h = json!({"s": "text", "small": 2, "big": 1_700_000_000_000u64, "f": 1.5, "t": true, "o": {"a": [1, "b"]}, "n": null});
        let table = to_table(h.as_object().unwrap());
        assert!(matches!(
            table.inner()[&ShortString::from("small")],
            AMQPValue::LongInt(2)
        ));
        assert!(matches!(
            table.inner()[&ShortString::from("big")],
            AMQPValue::LongLongInt(_)
        ));
        assert!(!table.inner().contains_key(&ShortString::from("n")));
        let mut back = h.as_object().unwrap().clone();
        back.remove("n");
        assert_eq!(to_json(&table), back);
    }
}
