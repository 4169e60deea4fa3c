//! `chatgpt-component`: the command line. Each subcommand is a few lines over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use chatgpt_component::actions::{self, Context};
use chatgpt_component::chat::{ChatClient, ChatOptions};
use chatgpt_component::component::{check, Component, Direction};
use chatgpt_component::credentials::process_env;
use chatgpt_component::emit::Outcome;
use chatgpt_component::message::Message;
use chatgpt_component::modes::exec::JsonLines;
use chatgpt_component::modes::{gateway, sailor};
use chatgpt_component::openai::{OpenAi, RetryPolicy};
use chatgpt_component::services;

/// Exit status of `exec` when the message was rebounded (EX_TEMPFAIL: try again later).
const EXIT_REBOUND: u8 = 75;
/// Exit status for unusable command-line input.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "chatgpt-component",
    version,
    about = "The ChatGPT component: send chat completion requests to OpenAI or any OpenAI-compatible server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that component.json and the code agree (handlers, schemas, model functions, views).
    Check {
        /// Read component.json and schemas from this directory instead of the copies built in.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print an action's metadata schema, converted to standard JSON Schema.
    Schema {
        action: String,
        direction: Side,
        /// Print the elastic.io dialect as written, not the converted schema.
        #[arg(long)]
        dialect: bool,
    },
    /// Run an action on one message; print each emitted event as a JSON line.
    Exec {
        action: String,
        /// Step configuration (credentials + fields): a JSON text, a file, or - for stdin.
        #[arg(long, default_value = "{}")]
        cfg: String,
        /// The message ({"body": ...}) or just its body: a JSON text, a file, or - for stdin.
        #[arg(long)]
        msg: String,
    },
    /// Verify credentials: prints {"verified":true} or {"verified":false,"reason":...}.
    Verify {
        #[arg(long, default_value = "{}")]
        cfg: String,
    },
    /// Run as an elastic.io platform step: consume from RabbitMQ (configured by ELASTICIO_* env).
    Sailor,
    /// Chat in a stored conversation: prints the reply (as it arrives with --stream).
    /// Credentials from OPENAI_API_KEY (and OPENAI_BASE_URL, ...) or --cfg.
    Chat {
        /// The conversation's ID: letters, digits and _ - # . : @ +.
        #[arg(long)]
        conversation: String,
        /// Forget the conversation's history first.
        #[arg(long)]
        restart: bool,
        /// The conversation's system prompt (replaces a stored one).
        #[arg(long)]
        system: Option<String>,
        /// Print the reply as it arrives.
        #[arg(long)]
        stream: bool,
        /// Any model ID (default gpt-4o-mini).
        #[arg(long)]
        model: Option<String>,
        /// Trim the history to this many tokens.
        #[arg(long)]
        token_budget: Option<usize>,
        /// Where conversations are kept: a SQLite file path, redis://HOST, or memory:.
        /// Default: CONVERSATION_STORE, else a file in the user's data directory.
        #[arg(long)]
        store: Option<String>,
        /// Credentials as JSON (apiKey, baseUrl, ...), a file, or - for stdin.
        #[arg(long, default_value = "{}")]
        cfg: String,
        /// The message.
        text: String,
    },
    /// Run the HTTP gateway: Vanus ChatGPT Source (POST /), Glific's parse_via_chat_gpt webhook
    /// and POST /actions/{action}.
    Serve {
        /// The YAML config; else CONNECTOR_CONFIG, else /vanus-connect/config/config.yml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run one platform service call and POST its result to ELASTICIO_POST_RESULT_URL.
    Service {
        /// verifyCredentials, getMetaModel or selectModel.
        method: String,
    },
    /// Run a select-model function: prints the {value: label} map, sorted.
    SelectModel {
        action: String,
        function: String,
        #[arg(long, default_value = "{}")]
        cfg: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    In,
    Out,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sailor => return sailor_mode().await,
        Command::Service { method } => return service_mode(&method).await,
        Command::Serve { config } => return serve_mode(config).await,
        _ => init_logging_as(false, "warn"),
    }
    match run(cli.command).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("chatgpt-component: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    let env = process_env;
    let ctx = Context {
        client: OpenAi::shared(),
        env: &env,
        retry: RetryPolicy::default(),
        storage: Default::default(),
    };
    match command {
        Command::Check { dir } => {
            let problems = match dir {
                Some(dir) => check::check(&Component::from_dir(&dir)?),
                None => check::check(Component::embedded()),
            };
            if problems.is_empty() {
                println!("ok: component.json and the code agree");
                return Ok(ExitCode::SUCCESS);
            }
            for problem in &problems {
                eprintln!("problem: {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
        Command::Schema {
            action,
            direction,
            dialect,
        } => {
            let direction = match direction {
                Side::In => Direction::In,
                Side::Out => Direction::Out,
            };
            let component = Component::embedded();
            let schema = if dialect {
                component.metadata(&action, direction)?
            } else {
                component.schema(&action, direction)?
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("serializes")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec { action, cfg, msg } => {
            let cfg = read_json("--cfg", &cfg)?;
            let msg = Message::from_json(read_json("--msg", &msg)?)
                .map_err(|e| format!("--msg is not a message: {e}"))?;
            let mut out = JsonLines::new(tokio::io::stdout());
            let outcome = actions::run(&action, &ctx, &cfg, msg, &mut out)
                .await
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
            Ok(match outcome {
                Outcome::Data(_) => ExitCode::SUCCESS,
                Outcome::Error(_) => ExitCode::FAILURE,
                Outcome::Rebound(_) => ExitCode::from(EXIT_REBOUND),
            })
        }
        Command::Verify { cfg } => {
            let cfg = read_json("--cfg", &cfg)?;
            let verification = services::verify_credentials(&ctx, &cfg).await;
            println!(
                "{}",
                serde_json::to_string(&verification).expect("serializes")
            );
            Ok(if verification.verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Sailor | Command::Service { .. } | Command::Serve { .. } => {
            unreachable!("handled in main")
        }
        Command::Chat {
            conversation,
            restart,
            system,
            stream,
            model,
            token_budget,
            store,
            cfg,
            text,
        } => {
            let mut cfg = read_json("--cfg", &cfg)?;
            if let Some(store) = store {
                cfg["conversationStore"] = Value::String(store);
            }
            let options = ChatOptions {
                model,
                restart,
                system_prompt: system,
                token_budget,
                ..ChatOptions::default()
            };
            match chat(&cfg, &conversation, &text, &options, stream).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(error) => {
                    eprintln!("chatgpt-component: {error}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::SelectModel {
            action,
            function,
            cfg,
        } => {
            let cfg = read_json("--cfg", &cfg)?;
            match services::select_model(&ctx, &action, &function, &cfg).await {
                Ok(models) => {
                    println!("{}", serde_json::to_string(&models).expect("serializes"));
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("chatgpt-component: {}", error.message);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// One turn of `chat`: the reply on stdout, streamed or at once.
async fn chat(
    cfg: &Value,
    conversation: &str,
    text: &str,
    options: &ChatOptions,
    stream: bool,
) -> Result<(), chatgpt_component::chat::Error> {
    use futures_util::StreamExt;
    use std::io::Write;
    let client = ChatClient::from_cfg(cfg, &process_env)?;
    if !stream {
        let response = client.chat_completion(conversation, text, options).await?;
        println!("{}", response.choice);
        return Ok(());
    }
    let mut pieces = client
        .chat_completion_stream(conversation, text, options)
        .await?;
    let mut stdout = std::io::stdout();
    while let Some(piece) = pieces.next().await {
        let _ = write!(stdout, "{}", piece?);
        let _ = stdout.flush();
    }
    println!();
    Ok(())
}

/// Platform mode. Bunyan JSON logs on stdout, as the platform's log collector expects.
async fn sailor_mode() -> ExitCode {
    let settings = match sailor::settings::read(&process_env) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("chatgpt-component: {e}");
            return ExitCode::FAILURE;
        }
    };
    sailor::logging::init(&log_level(), settings.log_context());
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        chatgpt_component::modes::signalled().await;
        trigger.cancel();
    });
    match sailor::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the step cannot run");
            ExitCode::FAILURE
        }
    }
}

/// The HTTP gateway. A bad config is reported (naming the key) before anything starts.
async fn serve_mode(path: Option<PathBuf>) -> ExitCode {
    let path = gateway::config::locate(path.as_deref(), &process_env);
    let config = match gateway::config::load(path.as_deref(), &process_env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chatgpt-component: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging_as(
        config.log_format == gateway::config::LogFormat::Json,
        "info",
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        chatgpt_component::modes::signalled().await;
        trigger.cancel();
    });
    match gateway::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the gateway cannot run");
            ExitCode::FAILURE
        }
    }
}

/// Platform service call.
async fn service_mode(method: &str) -> ExitCode {
    sailor::logging::init(&log_level(), Vec::new());
    match sailor::service::run(method, &process_env).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the service result could not be reported");
            ExitCode::FAILURE
        }
    }
}

fn log_level() -> String {
    std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into())
}

/// Reads a JSON argument: inline JSON, `-` for stdin, or a file path.
fn read_json(flag: &str, arg: &str) -> Result<Value, String> {
    let trimmed = arg.trim_start();
    let text = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        arg.to_string()
    } else if arg == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("{flag}: cannot read stdin: {e}"))?
    } else {
        std::fs::read_to_string(arg).map_err(|e| format!("{flag}: cannot read {arg}: {e}"))?
    };
    serde_json::from_str(&text).map_err(|e| format!("{flag} is not valid JSON: {e}"))
}

/// Logs go to stderr (stdout carries results). `RUST_LOG` or `LOG_LEVEL` set the level (the
/// CLI defaults to warn, so retries show; the gateway to info); `json` gives one JSON object per
/// line for log collectors.
fn init_logging_as(json: bool, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| {
            EnvFilter::try_new(std::env::var("LOG_LEVEL").unwrap_or_else(|_| default_level.into()))
        })
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
