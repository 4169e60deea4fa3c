//! `fake-openai [--host 127.0.0.1] [--port 0] [--latency-ms 0]`: serves the fake OpenAI API
//! until SIGINT/SIGTERM, for manual runs and out-of-process benchmarks. `--latency-ms` delays
//! every chat completion by that many milliseconds, like a model that takes a while to answer.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use fake_openai::{FakeOpenAi, Options};

const USAGE: &str = "usage: fake-openai [--host 127.0.0.1] [--port 0] [--latency-ms 0]";

/// What the command line asks for.
struct Args {
    addr: SocketAddr,
    /// [`Options::latency`].
    latency: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let Args { addr, latency } = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("fake-openai: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let options = Options {
        latency,
        ..Options::default()
    };
    let server = match FakeOpenAi::start_on(addr, options).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("fake-openai: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts wait for this line to learn the port, so it must not sit in a buffer.
    println!("listening on {}", server.base_url());
    let _ = std::io::stdout().flush();
    wait_for_shutdown().await;
    ExitCode::SUCCESS
}

/// `Ok(None)` means help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    // Loopback by default: the fake accepts any key, so it should not face a network.
    let mut host = "127.0.0.1".to_string();
    let mut port: u16 = 0;
    let mut latency = Duration::ZERO;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--host" => host = args.next().ok_or("--host needs a value")?,
            "--port" => {
                let value = args.next().ok_or("--port needs a value")?;
                port = value
                    .parse()
                    .map_err(|_| format!("invalid port {value:?}"))?;
            }
            "--latency-ms" => {
                let value = args.next().ok_or("--latency-ms needs a value")?;
                let ms: u64 = value
                    .parse()
                    .map_err(|_| format!("invalid latency {value:?}: milliseconds expected"))?;
                latency = Duration::from_millis(ms);
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|error| format!("invalid host {host:?}: {error}"))?
        .next()
        .ok_or_else(|| format!("host {host:?} has no address"))?;
    Ok(Some(Args { addr, latency }))
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
