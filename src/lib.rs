//! The ChatGPT component for low-code integration platforms.
//!
//! A flow step that sends a chat completion request to OpenAI (or any OpenAI-compatible server)
//! and passes the answer on. Every way of running it is a thin shell around one action core, and
//! every message travels the same road, visible in the module layout:
//!
//! ```text
//!  message in ──> validate ─────────> resolve ──────────> build ──────> call ─────────> emit
//!  (a mode)      component::validate  credentials         actions::     openai::client  emit::Event
//!                (input schema)       (key, org, project)  send_request  (retry, SSE)    (data | error
//!                                                                                         | rebound, end)
//! ```
//!
//! Where to start reading:
//! - [`actions::run`]: the road above, for any action; [`actions::send_request`] is its one action,
//!   each step a function of its own.
//! - [`component`]: `component.json` and the metadata schemas (compiled in), the one converter from
//!   the elastic.io dialect to JSON Schema, validation errors that name the field, and the
//!   manifest-vs-code self-check.
//! - [`openai`]: the pooled HTTP client, the retry policy, error classification and stream
//!   aggregation.
//! - [`modes`]: how messages arrive and where events go. [`modes::exec`] is the local CLI runner;
//!   [`modes::sailor`] runs the component as an elastic.io step on RabbitMQ (the production
//!   mode: settings, AMQP, message cipher, sailor's headers, rebounds, service calls, bunyan logs);
//!   [`modes::gateway`] serves the action over HTTP (`serve`): the Vanus ChatGPT Source with
//!   CloudEvent delivery, Glific's `parse_via_chat_gpt` webhook, and a generic action route.
//! - [`services`]: credential verification and the model dropdown.
//! - [`chat`]: the library API for Rust programs (openai-flows style conversations), over
//!   [`conversations`]: history per conversation id in SQLite, Redis or memory, one turn at a
//!   time, trimmed to a token budget.
//!
//! Invariants: secrets live only in [`secret::Secret`] (and header values marked sensitive); the
//! dialect is converted in exactly one function; every error a user sees names the field or
//! setting at fault and says what to do.

pub mod actions;
pub mod chat;
pub mod component;
pub mod conversations;
pub mod credentials;
pub mod emit;
pub mod message;
pub mod modes;
pub mod openai;
pub mod secret;
pub mod services;
