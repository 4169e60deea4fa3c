//! The platform message: what a step receives and what it emits.
//!
//! This is the elastic.io message model (`{id, body, headers, attachments, metadata,
//! passthrough}`), used by every mode so a message looks the same whether it came from RabbitMQ,
//! the CLI or HTTP. Fields the platform may omit default to empty.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One message on the road through a flow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id; emitted messages get a fresh UUID v4.
    #[serde(default)]
    pub id: String,
    /// The payload: for Send Request, the chat completion request (input) or response (output).
    #[serde(default)]
    pub body: Value,
    #[serde(default)]
    pub headers: Map<String, Value>,
    #[serde(default)]
    pub attachments: Map<String, Value>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Map<String, Value>>,
}

impl Message {
    /// A new message with a fresh id and this body, as `messages.newMessageWithBody` makes it.
    pub fn with_body(body: Value) -> Self {
        Message {
            id: uuid::Uuid::new_v4().to_string(),
            body,
            ..Message::default()
        }
    }

    /// Reads a message given either in full (`{"body": ...}`) or as a bare body.
    ///
    /// A chat request never has a top-level `body` key, so the two forms cannot be confused.
    /// Fields are moved out of the parsed value rather than deserialized again: re-building a
    /// large body through `serde_json::from_value` was the biggest avoidable per-message cost.
    pub fn from_json(value: Value) -> Result<Self, String> {
        let mut map = match value {
            Value::Object(map) if map.contains_key("body") => map,
            body => {
                return Ok(Message {
                    body,
                    ..Message::default()
                })
            }
        };
        let mut object = |key: &str| match map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(format!("the message's `{key}` must be an object")),
        };
        let headers = object("headers")?.unwrap_or_default();
        let attachments = object("attachments")?.unwrap_or_default();
        let metadata = object("metadata")?.unwrap_or_default();
        let passthrough = object("passthrough")?;
        let id = match map.remove("id") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(id)) => id,
            Some(other) => other.to_string(),
        };
        Ok(Message {
            id,
            body: map.remove("body").unwrap_or_default(),
            headers,
            attachments,
            metadata,
            passthrough,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_full_message_or_a_bare_body() {
        let full = Message::from_json(
            json!({"id": "m1", "body": {"a": 1}, "headers": {"h": "v"}, "passthrough": {"s": {}}}),
        )
        .unwrap();
        assert_eq!(full.id, "m1");
        assert_eq!(full.body, json!({"a": 1}));
        assert_eq!(full.headers["h"], "v");
        assert!(full.passthrough.unwrap().contains_key("s"));
        assert_eq!(
            Message::from_json(json!({"body": {}, "headers": []})).unwrap_err(),
            "the message's `headers` must be an object"
        );
        let bare = Message::from_json(json!({"messages": []})).unwrap();
        assert_eq!(bare.body, json!({"messages": []}));
    }

    #[test]
    fn new_messages_get_unique_ids() {
        assert_ne!(
            Message::with_body(Value::Null).id,
            Message::with_body(Value::Null).id
        );
    }
}
