//! `POST /`: the Vanus ChatGPT Source.
//!
//! The body is the prompt: raw text, or with `Content-Type: application/json` an object whose
//! `message` is the prompt (other keys are carried into the event data, as Vanus's successor
//! does). By default the caller gets `200` at once and the answer is delivered to `target` as a
//! CloudEvent (`data: {"content": ...}`); with `Process-Mode: sync` the reply also carries the
//! data. A `conversationId` key in the JSON body (or a `Conversation-Id` header) continues a
//! stored conversation, as Vanus's old `context_count` did. Where Vanus emits its canned texts ("Get response failed.", the daily-limit notice) we
//! emit them too, plus an `error` object that says what happened.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::config::ProcessMode;
use super::delivery::{answer_event, new_id, DEFAULT_SOURCE, DEFAULT_TYPE};
use super::ops::header_text;
use super::{json_reply, Gateway, Refusal};
use crate::message::Message;

/// Vanus's texts, kept so existing consumers keep working.
pub const EMPTY_ANSWER: &str = "Get response empty.";
pub const FAILED_ANSWER: &str = "Get response failed.";

/// A bad request, answered as Vanus's successor does: `{"status": 400, "msg": ...}`.
fn bad_request(status: StatusCode, msg: impl Into<String>) -> Response {
    json_reply(
        status,
        json!({"status": status.as_u16(), "msg": msg.into()}),
    )
}

pub async fn handle(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = gateway.now();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return bad_request(
                rejection.status(),
                format!(
                    "cannot read the body ({}); the limit is max_body_bytes = {} bytes",
                    rejection.body_text(),
                    gateway.config().max_body_bytes
                ),
            )
        }
    };
    let (prompt, extra) = match parse_body(&headers, &body) {
        Ok(parsed) => parsed,
        Err(msg) => return bad_request(StatusCode::BAD_REQUEST, msg),
    };
    let sync = match header_text(&headers, "process-mode").map(str::to_ascii_lowercase) {
        None => gateway.config().default_process_mode == ProcessMode::Sync,
        Some(mode) if mode == "sync" => true,
        Some(mode) if mode == "async" => false,
        Some(_) => {
            return bad_request(
                StatusCode::BAD_REQUEST,
                "header Process-Mode must be `sync` or `async`",
            )
        }
    };
    if !sync && !gateway.delivery().has_target() {
        return bad_request(
            StatusCode::BAD_REQUEST,
            "no `target` is configured to deliver the answer to: send `Process-Mode: sync` to get it in the reply, or set `target`",
        );
    }
    // A blank override is no override: CloudEvents requires a non-empty source and type.
    let attribute = |name: &str, default: &str| {
        header_text(&headers, name)
            .map(str::trim)
            .filter(|value| !value.is_empty())
            .unwrap_or(default)
            .to_string()
    };
    let source = attribute("vanus-source", DEFAULT_SOURCE);
    let ty = attribute("vanus-type", DEFAULT_TYPE);
    let ticket = match gateway.admit() {
        Ok(ticket) => ticket,
        Err(refusal) => {
            let event = refusal.to_event();
            let response = bad_request(refusal.status(), event.message);
            return refusal.decorate(response);
        }
    };
    let cfg = gateway.action_cfg().clone();
    let conversation = match super::conversation_id("conversationId", extra.get("conversationId")) {
        Ok(Some(id)) => Some(id),
        Ok(None) => header_text(&headers, "conversation-id").map(str::to_string),
        Err(msg) => return bad_request(StatusCode::BAD_REQUEST, msg),
    };
    let msg = request_message(&gateway, prompt, conversation);
    if sync {
        let result = gateway.call(&ticket, &cfg, msg).await;
        let data = event_data(&result, extra);
        if gateway.delivery().has_target() {
            let event = answer_event(new_id(), &source, &ty, arrived, data.clone());
            let worker = gateway.clone();
            gateway.spawn(async move {
                let _ticket = ticket;
                worker.delivery().deliver(event).await;
            });
        }
        return match result {
            Ok(_) => json_reply(StatusCode::OK, data),
            Err(refusal) => {
                let mut body = data;
                body["status"] = json!(refusal.status().as_u16());
                body["msg"] = json!(refusal.to_event().message);
                refusal.decorate(json_reply(refusal.status(), body))
            }
        };
    }
    let id = new_id();
    let event_id = id.clone();
    let worker = gateway.clone();
    gateway.spawn(async move {
        let result = worker.call(&ticket, &cfg, msg).await;
        let data = event_data(&result, extra);
        let event = answer_event(event_id, &source, &ty, arrived, data);
        worker.delivery().deliver(event).await;
    });
    json_reply(
        StatusCode::OK,
        json!({"status": 200, "msg": "accepted; the answer will be delivered to the target", "id": id}),
    )
}

/// The prompt and any other JSON keys.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<(String, Map<String, Value>), String> {
    if body.is_empty() {
        return Err(
            "the body is empty: send the prompt as text, or as JSON {\"message\": ...}".into(),
        );
    }
    let is_json = header_text(headers, "content-type").is_some_and(|t| {
        t.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    });
    if !is_json {
        let text =
            std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text".to_string())?;
        if text.trim().is_empty() {
            return Err("the body is blank: send the prompt as text".into());
        }
        return Ok((text.to_string(), Map::new()));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("the JSON body must be an object: {\"message\": \"...\"}".into());
    };
    match map.remove("message") {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok((text, map)),
        Some(Value::String(_)) => Err("/message is blank: it must hold the prompt".into()),
        Some(_) => Err("/message must be a string: the prompt".into()),
        None => Err("/message is missing: send {\"message\": \"<prompt>\"}".into()),
    }
}

/// The Send Request message for one prompt, in a conversation if one is named.
fn request_message(gateway: &Gateway, prompt: String, conversation: Option<String>) -> Message {
    let config = gateway.config();
    let mut messages = Vec::new();
    if let Some(system) = &config.system_prompt {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    let mut body = json!({ "messages": messages });
    if let Some(max) = config.max_tokens {
        body["max_completion_tokens"] = json!(max);
    }
    if let Some(id) = conversation {
        body["conversationId"] = json!(id);
    }
    Message::with_body(body)
}

/// `data` of the event: `{"content": ...}`, the request's extra keys, and `error` on failure.
fn event_data(result: &Result<Message, Refusal>, extra: Map<String, Value>) -> Value {
    let mut data = extra;
    match result {
        Ok(message) => {
            let answer = &message.body["choices"][0]["message"];
            let content = answer["content"]
                .as_str()
                .or_else(|| answer["refusal"].as_str())
                .filter(|text| !text.is_empty())
                .unwrap_or(EMPTY_ANSWER);
            data.insert("content".into(), json!(content));
        }
        Err(refusal) => {
            let content = match refusal {
                Refusal::DailyLimit(limit) => limit.vanus_notice(),
                _ => FAILED_ANSWER.to_string(),
            };
            let error = refusal.to_event();
            data.insert("content".into(), json!(content));
            data.insert(
                "error".into(),
                json!({"name": error.name, "message": error.message}),
            );
        }
    }
    Value::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        headers
    }

    #[test]
    fn bodies_are_text_or_a_message_object() {
        let (text, extra) = parse_body(&HeaderMap::new(), b"hello").unwrap();
        assert_eq!((text.as_str(), extra.len()), ("hello", 0));
        // Without the JSON content type, JSON is just text (as Vanus).
        let (text, _) = parse_body(&HeaderMap::new(), br#"{"message":"x"}"#).unwrap();
        assert_eq!(text, r#"{"message":"x"}"#);
        let (text, extra) =
            parse_body(&json_headers(), br#"{"message":"hi","user":"u1"}"#).unwrap();
        assert_eq!(text, "hi");
        assert_eq!(extra["user"], "u1");
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        for (headers, body, needle) in [
            (HeaderMap::new(), &b""[..], "empty"),
            (HeaderMap::new(), &b"  \n"[..], "blank"),
            (HeaderMap::new(), &b"\xff\xfe"[..], "UTF-8"),
            (json_headers(), &b"{\"message\":"[..], "not valid JSON"),
            (json_headers(), &b"[1]"[..], "must be an object"),
            (
                json_headers(),
                &b"{\"msg\":\"x\"}"[..],
                "/message is missing",
            ),
            (
                json_headers(),
                &b"{\"message\":5}"[..],
                "/message must be a string",
            ),
        ] {
            let error = parse_body(&headers, body).unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
    }
}
