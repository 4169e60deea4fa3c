//! Test support for the elastic.io (sailor) mode: a private RabbitMQ node per test or per test
//! file ([`rabbit`]) and a fake platform HTTP API ([`platform`]).
//!
//! Use from an integration test with `mod support;`.
#![allow(dead_code, unused_imports)]

pub mod platform;
pub mod rabbit;
pub mod step;

pub use platform::Platform;
pub use rabbit::{free_port, Rabbit, Received, Topology};
pub use step::StepEnv;
