//! Send Request with a `conversationId`: the stored history goes before the message's own
//! messages, and the new messages and the reply are stored once the reply arrived.
//!
//! The three fields (`conversationId`, `restartConversation`, `conversationTokenBudget`) are
//! taken out of the body before it becomes the request, so OpenAI never sees them. A leading
//! system or developer message is the conversation's instructions: it replaces the stored one
//! rather than piling up a copy per turn.

use serde_json::{json, Map, Value};

use super::send_request::ConversationRef;
use super::Context;
use crate::conversations::{self, Turn};
use crate::emit::{ErrorEvent, Outcome};
use crate::openai::{CallError, Completion};

/// Takes the conversation fields out of the body.
pub fn take_fields(body: &mut Map<String, Value>, cfg: &Value) -> Option<ConversationRef> {
    let id = body.remove("conversationId");
    let restart = body.remove("restartConversation");
    let budget = body.remove("conversationTokenBudget");
    let id = id?.as_str()?.to_string();
    Some(ConversationRef {
        id,
        restart: restart.and_then(|r| r.as_bool()).unwrap_or(false),
        token_budget: budget.and_then(|b| b.as_u64()).map(|b| b as usize),
        store: crate::credentials::text(cfg, "conversationStore"),
    })
}

/// A conversation turn under way, with the messages it will store.
pub struct OpenTurn {
    turn: Turn,
    new: Vec<Value>,
}

/// Takes the conversation's lease and puts its history into `request`. Fails with the outcome
/// to emit: an error for an unusable store setting, a rebound when the store is unreachable.
pub async fn begin(
    ctx: &Context<'_>,
    wanted: &ConversationRef,
    request: &mut Value,
) -> Result<OpenTurn, Outcome> {
    let store = conversations::open_configured(wanted.store.as_deref(), ctx.env).map_err(|e| {
        Outcome::Error(ErrorEvent::new(
            "ConfigurationError",
            format!("conversationStore: {e}"),
            json!({"field": "conversationStore"}),
        ))
    })?;
    let mut new: Vec<Value> = match request["messages"].take() {
        Value::Array(messages) => messages,
        _ => Vec::new(),
    };
    let system = match new.first() {
        Some(first) if conversations::is_instruction(first) => Some(new.remove(0)),
        _ => None,
    };
    let turn = Turn::begin(store, &wanted.id, wanted.restart, system)
        .await
        .map_err(|e| {
            Outcome::Rebound(ErrorEvent::new(
                "ConversationStoreError",
                format!("{e}; the message will be retried"),
                json!({"conversationId": wanted.id}),
            ))
        })?;
    let model = request["model"].as_str().unwrap_or_default().to_string();
    request["messages"] = Value::Array(turn.messages(&new, &model, wanted.token_budget));
    Ok(OpenTurn { turn, new })
}

impl OpenTurn {
    /// Stores the turn if the call succeeded; the history stays as it was if it failed. A store
    /// that fails now does not turn the answer into an error (that would call OpenAI again on
    /// retry): the answer is emitted and the failure logged.
    pub async fn finish(
        self,
        result: Result<Completion, CallError>,
    ) -> Result<Completion, CallError> {
        let completion = match result {
            Ok(completion) => completion,
            Err(error) => {
                self.turn.abandon().await;
                return Err(error);
            }
        };
        let message = &completion.body["choices"][0]["message"];
        let content = message["content"].as_str().filter(|c| !c.is_empty());
        let calls = message.get("tool_calls").filter(|c| !c.is_null());
        if content.is_none() && calls.is_none() {
            // A refusal or an empty answer: storing it would leave an assistant message without
            // content, which OpenAI rejects on every later turn.
            tracing::warn!(
                "the answer has no text; it is emitted but not added to the conversation"
            );
            self.turn.abandon().await;
            return Ok(completion);
        }
        let mut reply = json!({"role": "assistant", "content": content});
        if let Some(calls) = calls {
            reply["tool_calls"] = calls.clone();
        }
        if let Err(error) = self.turn.commit(&self.new, reply).await {
            tracing::error!(error = %error, "the answer could not be added to the conversation's history");
        }
        Ok(completion)
    }
}
