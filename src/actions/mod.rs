//! The component's actions, and the one road every message travels.
//!
//! `run` is what every mode calls: it processes one message with the named action and emits the
//! outcome followed by `end`. Modes differ only in the [`Emitter`] they pass.

pub mod attachments;
pub mod conversation;
pub mod send_request;

use serde_json::Value;

use crate::credentials::Env;
use crate::emit::{Emitter, ErrorEvent, Event, Outcome};
use crate::message::Message;
use crate::openai::{OpenAi, RetryPolicy};

/// What the code knows about an action; `check` compares it with `component.json`.
#[derive(Debug)]
pub struct ActionDef {
    pub name: &'static str,
    /// Functions a select field's `model` may name.
    pub model_functions: &'static [&'static str],
    /// Action configuration keys the code reads.
    pub cfg_keys: &'static [&'static str],
}

/// Every action the code implements.
pub const ACTIONS: &[ActionDef] = &[send_request::DEF];

/// Looks an action up by its `component.json` key.
pub fn find(name: &str) -> Option<&'static ActionDef> {
    ACTIONS.iter().find(|def| def.name == name)
}

/// What an action needs besides `cfg` and the message: shared, process-wide things.
pub struct Context<'a> {
    pub client: &'a OpenAi,
    /// Where credentials fall back to when `cfg` lacks them.
    pub env: Env<'a>,
    /// Backoff settings; `maxRetries` from `cfg` overrides the count.
    pub retry: RetryPolicy,
    /// The platform's object storage, for attachments (empty outside the platform).
    pub storage: attachments::Storage,
}

/// Processes one message and returns how it ended, without emitting anything.
pub async fn process(action: &str, ctx: &Context<'_>, cfg: &Value, msg: Message) -> Outcome {
    match action {
        "sendRequest" => send_request::process(ctx, cfg, msg).await,
        other => Outcome::Error(ErrorEvent::new(
            "ConfigurationError",
            format!(
                "unknown action `{other}`; this component has: {}",
                ACTIONS
                    .iter()
                    .map(|a| a.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::Null,
        )),
    }
}

/// Processes one message, emits its outcome and then `end`, and returns the outcome so the mode
/// can acknowledge (or reject) the input accordingly.
pub async fn run(
    action: &str,
    ctx: &Context<'_>,
    cfg: &Value,
    msg: Message,
    emitter: &mut dyn Emitter,
) -> std::io::Result<Outcome> {
    let outcome = process(action, ctx, cfg, msg).await;
    emitter.emit(Event::from(outcome.clone())).await?;
    emitter.emit(Event::End).await?;
    Ok(outcome)
}
