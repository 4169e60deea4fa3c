//! The ways the component runs. Each is a thin shell: it gets a message in, calls
//! [`actions::run`](crate::actions::run) with an emitter, and delivers what comes out.

/// The local CLI runner.
pub mod exec;
pub mod sailor;
