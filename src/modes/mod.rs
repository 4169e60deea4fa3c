//! The ways the component runs. Each is a thin shell: it gets a message in, calls
//! [`actions::run`](crate::actions::run) (or [`actions::process`](crate::actions::process)) and
//! delivers what comes out.

/// The local CLI runner.
pub mod exec;
pub mod gateway;
pub mod sailor;

/// Resolves on SIGTERM or SIGINT: how platforms and terminals ask a long-running mode to stop.
pub async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}
