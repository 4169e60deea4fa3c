//! What an action produces, and where it goes.
//!
//! An action never talks to RabbitMQ, stdout or HTTP itself: it returns an [`Outcome`], and
//! [`run`](crate::actions::run) hands the resulting [`Event`]s to an [`Emitter`] supplied by the
//! mode. This is what keeps the modes thin: each one only implements `emit`.

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::message::Message;

/// How one message's processing ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Success: emit this message as `data`.
    Data(Message),
    /// Failure the user must act on: emit `error`; the input is rejected.
    Error(ErrorEvent),
    /// Transient failure (rate limit, overload, unreachable upstream): the platform should retry
    /// the same input later (elastic.io `rebound`); the input is acknowledged.
    Rebound(ErrorEvent),
}

/// An event as the platform sees it. Serialized, it is one line of `exec` output.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Data { message: Message },
    Error { error: ErrorEvent },
    Rebound { reason: ErrorEvent },
    End,
}

/// A user-facing error: a name, a message that says what to do, and machine-readable details.
///
/// The shape extends sailor's `{name, message, stack}` normalisation with `details`, so the
/// platform shows `message` and downstream error handlers can branch on `details`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorEvent {
    pub name: String,
    pub message: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl ErrorEvent {
    pub fn new(name: &str, message: impl Into<String>, details: Value) -> Self {
        ErrorEvent {
            name: name.to_string(),
            message: message.into(),
            details,
        }
    }
}

impl From<Outcome> for Event {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Data(message) => Event::Data { message },
            Outcome::Error(error) => Event::Error { error },
            Outcome::Rebound(reason) => Event::Rebound { reason },
        }
    }
}

/// Where a mode sends events. Implementations decide what "sent" means (a line on stdout, a
/// confirmed AMQP publish, an HTTP reply) and report failures so the caller never acks early.
#[async_trait]
pub trait Emitter: Send {
    async fn emit(&mut self, event: Event) -> std::io::Result<()>;
}

/// Collects events in memory: for the HTTP route that returns them and for tests.
#[derive(Debug, Default)]
pub struct Collect(pub Vec<Event>);

#[async_trait]
impl Emitter for Collect {
    async fn emit(&mut self, event: Event) -> std::io::Result<()> {
        self.0.push(event);
        Ok(())
    }
}
