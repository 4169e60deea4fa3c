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
    pub fn from_json(value: Value) -> Result<Self, serde_json::Error> {
        match value {
            Value::Object(ref map) if map.contains_key("body") => serde_json::from_value(value),
            body => Ok(Message {
                body,
                ..Message::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_full_message_or_a_bare_body() {
        let full = Message::from_json(json!({"id": "m1", "body": {"a": 1}})).unwrap();
        assert_eq!(full.id, "m1");
        assert_eq!(full.body, json!({"a": 1}));
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
