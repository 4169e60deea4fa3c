//! Shared test helpers: a context with fast backoff, configs pointing at the fake server, and
//! the wire view of a recorded request.
#![allow(dead_code)]

use std::time::Duration;

use chatgpt_component::actions::{self, Context};
use chatgpt_component::emit::Outcome;
use chatgpt_component::message::Message;
use chatgpt_component::openai::{OpenAi, RetryPolicy};
use fake_openai::{FakeOpenAi, RecordedRequest};
use serde_json::{json, Value};

/// A key that must never appear in any output.
pub const API_KEY: &str = "sk-test-CANARY-5f1d0c9e7a3b4e2f";

pub fn no_env(_: &str) -> Option<String> {
    None
}

/// Backoff shortened so retry tests run in milliseconds; the rules are unchanged.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        ..RetryPolicy::default()
    }
}

pub fn cfg(fake: &FakeOpenAi) -> Value {
    json!({"apiKey": API_KEY, "baseUrl": fake.base_url(), "model": "gpt-4o-mini"})
}

pub fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

pub fn hello() -> Value {
    json!({"messages": [{"role": "user", "content": "Hello there"}]})
}

/// Runs Send Request in-process against the fake.
pub async fn send(cfg: &Value, body: Value) -> Outcome {
    let client = OpenAi::new();
    let ctx = Context {
        client: &client,
        env: &no_env,
        retry: fast_retry(),
        storage: Default::default(),
    };
    actions::process(
        "sendRequest",
        &ctx,
        cfg,
        Message {
            body,
            ..Message::default()
        },
    )
    .await
}

/// What went over the wire, minus what changes per run (the port in `host`).
pub fn wire(request: &RecordedRequest) -> Value {
    let headers: serde_json::Map<String, Value> = request
        .headers
        .iter()
        .filter(|(name, _)| name.as_str() != "host")
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    json!({
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": headers,
        "body": request.body,
    })
}

/// The kind of an outcome, for table-driven assertions.
pub fn kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Data(_) => "data",
        Outcome::Error(_) => "error",
        Outcome::Rebound(_) => "rebound",
    }
}
