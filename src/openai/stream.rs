//! Turning a chat completion stream back into one chat completion.
//!
//! Chunks carry fragments keyed by choice index, and tool-call fragments keyed by tool-call index
//! (with `id` and `name` only in the first). Everything is read leniently from JSON values, so a
//! compatible server's odd or missing fields never break aggregation; the result has the shape of
//! a non-streamed response.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// Header fields copied from the chunks to the completion (last non-null wins).
const HEAD: &[&str] = &[
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

/// The completion so far.
#[derive(Debug, Default)]
pub struct Aggregate {
    head: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
}

#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    /// URL citations (web search) arrive as whole items; OpenAI's plain shape always has the list.
    annotations: Vec<Value>,
    tool_calls: BTreeMap<u64, ToolCall>,
    function_call: Option<(String, String)>,
    logprobs: Option<Map<String, Value>>,
    finish_reason: Option<Value>,
}

#[derive(Debug, Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

impl Aggregate {
    /// Adds one `chat.completion.chunk`.
    pub fn push(&mut self, chunk: &Value) {
        for key in HEAD {
            if let Some(v) = chunk.get(*key).filter(|v| !v.is_null()) {
                self.head.insert(key.to_string(), v.clone());
            }
        }
        if let Some(usage) = chunk
            .get("usage")
            .filter(|u| u.as_object().is_some_and(|u| !u.is_empty()))
        {
            self.usage = Some(usage.clone());
        }
        let choices = chunk.get("choices").and_then(Value::as_array);
        for (position, c) in choices.into_iter().flatten().enumerate() {
            let index = c
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let choice = self.choices.entry(index).or_default();
            if let Some(delta) = c.get("delta") {
                choice.apply(delta);
            }
            if let Some(logprobs) = c.get("logprobs").and_then(Value::as_object) {
                let acc = choice.logprobs.get_or_insert_with(Map::new);
                for (key, value) in logprobs {
                    match (acc.get_mut(key), value) {
                        (Some(Value::Array(have)), Value::Array(more)) => {
                            have.extend(more.iter().cloned())
                        }
                        _ => {
                            acc.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
            if let Some(reason) = c.get("finish_reason").filter(|r| !r.is_null()) {
                choice.finish_reason = Some(reason.clone());
            }
        }
    }

    /// True when every choice seen has a finish reason: the answer is complete even if the
    /// server closed the stream without `[DONE]`.
    pub fn is_complete(&self) -> bool {
        !self.choices.is_empty() && self.choices.values().all(|c| c.finish_reason.is_some())
    }

    /// The completion, shaped like a non-streamed response.
    pub fn finish(self) -> Value {
        let mut out = self.head;
        out.insert("object".into(), json!("chat.completion"));
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| c.finish(index))
            .collect();
        out.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            out.insert("usage".into(), usage);
        }
        Value::Object(out)
    }
}

impl Choice {
    fn apply(&mut self, delta: &Value) {
        let text = |key: &str| delta.get(key).and_then(Value::as_str);
        if let Some(role) = text("role") {
            self.role = Some(role.to_string());
        }
        if let Some(content) = text("content") {
            self.content
                .get_or_insert_with(String::new)
                .push_str(content);
        }
        if let Some(refusal) = text("refusal") {
            self.refusal
                .get_or_insert_with(String::new)
                .push_str(refusal);
        }
        if let Some(items) = delta.get("annotations").and_then(Value::as_array) {
            self.annotations.extend(items.iter().cloned());
        }
        for (position, fragment) in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = fragment
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let call = self.tool_calls.entry(index).or_default();
            if let Some(id) = fragment.get("id").and_then(Value::as_str) {
                call.id = Some(id.to_string());
            }
            if let Some(kind) = fragment.get("type").and_then(Value::as_str) {
                call.kind = Some(kind.to_string());
            }
            let function = fragment.get("function");
            let part = |key: &str| function.and_then(|f| f.get(key)).and_then(Value::as_str);
            // Some servers repeat the name in every fragment; it is never split.
            if let Some(name) = part("name").filter(|_| call.name.is_empty()) {
                call.name = name.to_string();
            }
            if let Some(arguments) = part("arguments") {
                call.arguments.push_str(arguments);
            }
        }
        if let Some(function) = delta.get("function_call") {
            let call = self.function_call.get_or_insert_with(Default::default);
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                call.0 = name.to_string();
            }
            if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                call.1.push_str(arguments);
            }
        }
    }

    fn finish(self, index: u64) -> Value {
        // Streams open with `content: ""`; a plain tool-call answer has `content: null`.
        let content = self
            .content
            .filter(|c| !c.is_empty() || self.tool_calls.is_empty());
        let mut message = json!({
            "role": self.role.unwrap_or_else(|| "assistant".into()),
            "content": content,
            "refusal": self.refusal,
            "annotations": self.annotations,
        });
        if !self.tool_calls.is_empty() {
            let calls: Vec<Value> = self
                .tool_calls
                .into_values()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "type": c.kind.unwrap_or_else(|| "function".into()),
                        "function": {"name": c.name, "arguments": c.arguments},
                    })
                })
                .collect();
            message["tool_calls"] = Value::Array(calls);
        }
        if let Some((name, arguments)) = self.function_call {
            message["function_call"] = json!({"name": name, "arguments": arguments});
        }
        json!({
            "index": index,
            "message": message,
            "logprobs": self.logprobs.map(Value::Object),
            "finish_reason": self.finish_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(choices: Value) -> Value {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices, "usage": null})
    }

    #[test]
    fn assembles_content_and_tool_calls_per_index() {
        let mut agg = Aggregate::default();
        agg.push(&chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        ));
        agg.push(&chunk(json!([{"index": 1, "delta": {"role": "assistant", "content": "", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
        ]}}])));
        agg.push(&chunk(json!([{"index": 0, "delta": {"content": "Hel"}}])));
        agg.push(&chunk(json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}}])));
        agg.push(&chunk(
            json!([{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]),
        ));
        agg.push(&chunk(json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "finish_reason": "tool_calls"}])));
        assert!(agg.is_complete());
        agg.push(&json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}));
        assert_eq!(
            agg.finish(),
            json!({
                "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": null, "annotations": []},
                     "logprobs": null, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": null, "refusal": null, "annotations": [], "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":1}"}}
                    ]}, "logprobs": null, "finish_reason": "tool_calls"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            })
        );
    }

    #[test]
    fn tolerates_compatible_servers() {
        let mut agg = Aggregate::default();
        // No index, no role, empty usage object, odd finish reason, logprobs split over chunks.
        agg.push(&json!({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [1]}}], "usage": {}}));
        agg.push(&json!({"choices": [{"delta": {"content": "b"}, "logprobs": {"content": [2]}, "finish_reason": "eos"}]}));
        let done = agg.finish();
        assert_eq!(done["choices"][0]["message"]["content"], "ab");
        assert_eq!(done["choices"][0]["finish_reason"], "eos");
        assert_eq!(done["choices"][0]["logprobs"], json!({"content": [1, 2]}));
        assert!(done.get("usage").is_none());
    }

    #[test]
    fn an_unfinished_stream_is_not_complete() {
        let mut agg = Aggregate::default();
        assert!(!agg.is_complete());
        agg.push(&chunk(
            json!([{"index": 0, "delta": {"content": "partial"}}]),
        ));
        assert!(!agg.is_complete());
    }
}
