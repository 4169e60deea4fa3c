//! Talking to OpenAI or an OpenAI-compatible server.
//!
//! [`OpenAi`] wraps one pooled `reqwest` client per process. A call is: serialize the request
//! once, then attempt, classify the failure, wait as [`retry::RetryPolicy`] says, attempt again.
//! Streams are consumed here and aggregated by [`stream::Aggregate`], so callers always get one
//! completion, streamed or not.

pub mod client;
pub mod error;
pub mod retry;
pub mod stream;

pub use client::{CallOptions, Completion, OpenAi};
pub use error::{ApiError, CallError, TransportKind};
pub use retry::RetryPolicy;
