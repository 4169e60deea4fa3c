//! `POST .../chat/completions`: request validation, the completion and its SSE
//! chunks, and playing a [`Script`] out over HTTP.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::server::{self, Frame};
use crate::{ErrorReply, Options, Reply, Script, ToolCall};

/// Fixed so responses are deterministic (snapshot-friendly).
const CREATED: u64 = 1_700_000_000;
const FINGERPRINT: &str = "fp_fake";
/// Model families that reject `max_tokens` in favour of `max_completion_tokens`.
const REASONING_PREFIXES: [&str; 4] = ["o1", "o3", "o4", "gpt-5"];
/// What [`Script::MalformedJson`] sends: valid start, then nothing.
const TRUNCATED_JSON: &str = r#"{"id":"chatcmpl-x","choices":[{"#;

/// The parts of a valid request that shape the answer.
pub(crate) struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    n: usize,
    prompt_tokens: u64,
    last_user_text: String,
}

/// Validates a request body the way OpenAI does, in OpenAI's order.
/// `deployment` is set on Azure routes, where the deployment picks the model.
pub(crate) fn parse(
    body: &[u8],
    deployment: Option<&str>,
    options: &Options,
) -> Result<ChatRequest, Box<ErrorReply>> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| Box::new(ErrorReply::unparsable_json()))?;
    let model = match (value.get("model").and_then(Value::as_str), deployment) {
        (Some(model), _) => model.to_string(),
        (None, Some(deployment)) => deployment.to_string(),
        (None, None) => {
            return Err(Box::new(ErrorReply::bad_request(
                "model",
                "you must provide a model parameter",
            )))
        }
    };
    let messages =
        match value.get("messages") {
            None | Some(Value::Null) => {
                return Err(Box::new(
                    ErrorReply::new(
                        400,
                        "invalid_request_error",
                        Some("missing_required_parameter"),
                        "Missing required parameter: 'messages'.",
                    )
                    .with_param("messages"),
                ))
            }
            Some(Value::Array(messages)) if messages.is_empty() => return Err(Box::new(
                ErrorReply::new(
                    400,
                    "invalid_request_error",
                    Some("empty_array"),
                    "Invalid 'messages': empty array. Expected an array with minimum length 1, \
                 but got an empty array instead.",
                )
                .with_param("messages"),
            )),
            Some(Value::Array(messages)) => messages,
            Some(_) => {
                return Err(Box::new(
                    ErrorReply::new(
                        400,
                        "invalid_request_error",
                        Some("invalid_type"),
                        "Invalid type for 'messages': expected an array of objects.",
                    )
                    .with_param("messages"),
                ))
            }
        };
    // Azure deployments can have any name, so only the v1 route checks the model list.
    if deployment.is_none() && !options.models.contains(&model) {
        return Err(Box::new(ErrorReply::model_not_found(&model)));
    }
    let has_max_tokens = value.get("max_tokens").is_some_and(|v| !v.is_null());
    if has_max_tokens && REASONING_PREFIXES.iter().any(|p| model.starts_with(p)) {
        return Err(Box::new(
            ErrorReply::new(
                400,
                "invalid_request_error",
                Some("unsupported_parameter"),
                "Unsupported parameter: 'max_tokens' is not supported with this model. \
             Use 'max_completion_tokens' instead.",
            )
            .with_param("max_tokens"),
        ));
    }

    let last_user_text = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .unwrap_or_default();
    let prompt_tokens = messages.iter().map(|m| words(&message_text(m))).sum();
    Ok(ChatRequest {
        model,
        stream: value.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: value.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)),
        // OpenAI caps n at 128; clamping keeps a silly value from building a huge reply.
        n: value
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 128) as usize,
        prompt_tokens,
        last_user_text,
    })
}

/// Plays one script (or the default reply when the queue is empty) for a valid request,
/// after waiting `latency` ([`Options::latency`]).
pub(crate) async fn respond(
    request: &ChatRequest,
    script: Option<Script>,
    id: &str,
    latency: Duration,
) -> Response {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let default = Reply {
        content: Some(format!("echo: {}", request.last_user_text)),
        ..Reply::default()
    };
    match script {
        None => deliver(request, &default, id, Duration::ZERO),
        Some(Script::Reply(reply)) => deliver(request, &reply, id, Duration::ZERO),
        Some(Script::Error(error)) => error.response(),
        Some(Script::SlowFirstByte(delay)) => {
            tokio::time::sleep(delay).await;
            deliver(request, &default, id, Duration::ZERO)
        }
        Some(Script::SlowTrickle(delay)) => deliver(request, &default, id, delay),
        Some(Script::CutConnection) => {
            let mut frames: Vec<Frame> = if request.stream {
                let events = stream_events(request, &default, id);
                events.into_iter().take(2).map(Frame::now).collect()
            } else {
                let body = Bytes::from(completion(request, &default, id).to_string());
                vec![Frame::now(body.slice(..body.len() / 2))]
            };
            frames.push(Frame::Abort);
            let content_type = if request.stream {
                server::EVENT_STREAM
            } else {
                server::JSON
            };
            server::framed(StatusCode::OK, content_type, frames)
        }
        Some(Script::MalformedJson) => server::framed(
            StatusCode::OK,
            server::JSON,
            vec![Frame::now(TRUNCATED_JSON)],
        ),
        Some(Script::ErrorMidStream(error)) if request.stream => {
            // Role chunk plus two content chunks for each choice, then the error event.
            let mut frames: Vec<Frame> = chunks(request, &default, id)
                .into_iter()
                .take(3 * request.n)
                .map(|chunk| Frame::now(sse(&chunk)))
                .collect();
            frames.push(Frame::now(sse(&error.body())));
            server::framed(StatusCode::OK, server::EVENT_STREAM, frames)
        }
        Some(Script::ErrorMidStream(error)) => error.response(),
    }
}

/// Sends a full reply, streamed or not; `pace` > 0 spreads it out over time.
fn deliver(request: &ChatRequest, reply: &Reply, id: &str, pace: Duration) -> Response {
    if request.stream {
        let frames = stream_events(request, reply, id)
            .into_iter()
            .map(|event| Frame::after(pace, event))
            .collect();
        return server::framed(StatusCode::OK, server::EVENT_STREAM, frames);
    }
    let body = Bytes::from(completion(request, reply, id).to_string());
    if pace.is_zero() {
        return server::framed(StatusCode::OK, server::JSON, vec![Frame::now(body)]);
    }
    let piece = body.len().div_ceil(4).max(1);
    let frames = (0..body.len())
        .step_by(piece)
        .map(|start| {
            let data = body.slice(start..(start + piece).min(body.len()));
            // The first piece goes out at once: the delay is *between* pieces.
            if start == 0 {
                Frame::now(data)
            } else {
                Frame::after(pace, data)
            }
        })
        .collect();
    server::framed(StatusCode::OK, server::JSON, frames)
}

/// The non-stream `chat.completion` object.
fn completion(request: &ChatRequest, reply: &Reply, id: &str) -> Value {
    let mut message = json!({
        "role": "assistant",
        "content": reply.content,
        "refusal": reply.refusal,
        "annotations": [],
    });
    if !reply.tool_calls.is_empty() {
        let calls: Vec<Value> = reply
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments },
                })
            })
            .collect();
        message["tool_calls"] = Value::Array(calls);
    }
    let choices: Vec<Value> = (0..request.n)
        .map(|index| {
            json!({
                "index": index,
                "message": message,
                "logprobs": null,
                "finish_reason": finish_reason(reply),
            })
        })
        .collect();
    json!({
        "id": id,
        "object": "chat.completion",
        "created": CREATED,
        "model": request.model,
        "choices": choices,
        "usage": usage(request, reply),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    })
}

/// Every SSE event of a complete stream, `[DONE]` included.
fn stream_events(request: &ChatRequest, reply: &Reply, id: &str) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = chunks(request, reply, id).iter().map(sse).collect();
    if request.include_usage {
        let mut last = chunk(request, id, None);
        last["usage"] = usage(request, reply);
        events.push(sse(&last));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// The `chat.completion.chunk` objects, choices interleaved (role of 0, role of 1,
/// first piece of 0, first piece of 1, ...) so clients must assemble by `index`.
fn chunks(request: &ChatRequest, reply: &Reply, id: &str) -> Vec<Value> {
    let deltas = deltas(reply);
    let mut chunks = Vec::with_capacity(deltas.len() * request.n);
    for (step, delta) in deltas.iter().enumerate() {
        let finish = if step + 1 == deltas.len() {
            Value::from(finish_reason(reply))
        } else {
            Value::Null
        };
        for index in 0..request.n {
            let choice = json!({
                "index": index,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish,
            });
            chunks.push(chunk(request, id, Some(choice)));
        }
    }
    chunks
}

/// The deltas of one choice, in order: role, content words, refusal words,
/// tool-call headers with argument fragments, and the empty final delta.
fn deltas(reply: &Reply) -> Vec<Value> {
    let mut deltas = vec![json!({"role": "assistant", "content": "", "refusal": null})];
    // `split_inclusive` keeps the spaces, so concatenating the pieces is exact.
    for piece in reply.content.iter().flat_map(|c| c.split_inclusive(' ')) {
        deltas.push(json!({ "content": piece }));
    }
    for piece in reply.refusal.iter().flat_map(|r| r.split_inclusive(' ')) {
        deltas.push(json!({ "refusal": piece }));
    }
    for (index, call) in reply.tool_calls.iter().enumerate() {
        deltas.push(json!({ "tool_calls": [{
            "index": index,
            "id": call.id,
            "type": "function",
            "function": { "name": call.name, "arguments": "" },
        }]}));
        for fragment in thirds(&call.arguments) {
            deltas.push(json!({ "tool_calls": [{
                "index": index,
                "function": { "arguments": fragment },
            }]}));
        }
    }
    deltas.push(json!({}));
    deltas
}

fn chunk(request: &ChatRequest, id: &str, choice: Option<Value>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": request.model,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
        "choices": choice.into_iter().collect::<Vec<_>>(),
        "usage": null,
    })
}

fn finish_reason(reply: &Reply) -> String {
    match &reply.finish_reason {
        Some(reason) => reason.clone(),
        None if !reply.tool_calls.is_empty() => "tool_calls".to_string(),
        None => "stop".to_string(),
    }
}

/// Deterministic "token" counts: words, not BPE tokens. Completion tokens count every choice.
fn usage(request: &ChatRequest, reply: &Reply) -> Value {
    let per_choice = words(reply.content.as_deref().unwrap_or(""))
        + words(reply.refusal.as_deref().unwrap_or(""))
        + reply.tool_calls.iter().map(tool_call_words).sum::<u64>();
    let completion = per_choice * request.n as u64;
    json!({
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": request.prompt_tokens + completion,
        "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

fn tool_call_words(call: &ToolCall) -> u64 {
    words(&call.name) + words(&call.arguments)
}

/// A message's text: string content, or the `text` parts of an array joined by a space.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits tool-call arguments into about three fragments (on char boundaries),
/// as the real API streams them in several pieces.
fn thirds(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(3).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> ChatRequest {
        ChatRequest {
            model: "gpt-4o".into(),
            stream: true,
            include_usage: false,
            n,
            prompt_tokens: 1,
            last_user_text: "hi".into(),
        }
    }

    #[test]
    fn content_pieces_concatenate_exactly() {
        let reply = Reply {
            content: Some("a  b c ".into()),
            ..Reply::default()
        };
        let text: String = deltas(&reply)
            .iter()
            .filter_map(|d| d.get("content").and_then(Value::as_str))
            .collect();
        assert_eq!(text, "a  b c ");
    }

    #[test]
    fn argument_fragments_reassemble() {
        let args = r#"{"city":"Zürich"}"#;
        let pieces = thirds(args);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces.concat(), args);
        assert!(thirds("").is_empty());
    }

    #[test]
    fn choices_are_interleaved() {
        let reply = Reply {
            content: Some("x".into()),
            ..Reply::default()
        };
        let indexes: Vec<u64> = chunks(&request(2), &reply, "id")
            .iter()
            .map(|c| c["choices"][0]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn text_parts_are_joined() {
        let message = json!({"role": "user", "content": [
            {"type": "text", "text": "one"},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": "two"},
        ]});
        assert_eq!(message_text(&message), "one two");
    }
}
