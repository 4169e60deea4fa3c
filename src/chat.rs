//! The library API for Rust programs: conversations with ChatGPT in a few lines, in the shape of
//! the `openai-flows` crate (`chat_completion(conversation_id, text, &ChatOptions)`), but on any
//! OpenAI-compatible server, with history in a store you choose, typed errors and streaming.
//!
//! ```
//! use std::sync::Arc;
//!
//! use chatgpt_component::chat::{ChatClient, ChatOptions};
//! use chatgpt_component::conversations::memory::MemoryStore;
//! use chatgpt_component::credentials;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let fake = fake_openai::FakeOpenAi::start().await; // this example runs against the fake
//! # let base_url = fake.base_url();
//! // Credentials resolved as the component resolves them: a key, and here an OpenAI-compatible
//! // server. `ChatClient::from_env()` takes OPENAI_API_KEY, OPENAI_BASE_URL, ... and the store
//! // named by CONVERSATION_STORE (default: a SQLite file in the user's data directory).
//! let cfg = json!({"apiKey": "sk-...", "baseUrl": base_url});
//! let credentials = credentials::resolve(&cfg, &|_: &str| None)?;
//! let chat = ChatClient::new(credentials, Arc::new(MemoryStore::default()));
//!
//! let options = ChatOptions {
//!     system_prompt: Some("You are a terse assistant.".into()),
//!     ..ChatOptions::default()
//! };
//! let first = chat.chat_completion("user-42", "My name is Ana.", &options).await?;
//! assert!(first.restarted); // a new conversation
//! let second = chat.chat_completion("user-42", "What is my name?", &options).await?;
//! assert!(!second.restarted); // the request carried the first turn
//! println!("{}", second.choice);
//! assert_eq!(chat.chat_history("user-42", 0).await?.len(), 4); // two questions, two answers
//! # Ok(())
//! # }
//! ```
//!
//! Every call on one conversation id is serialised by the store (across processes for SQLite
//! and Redis), a failed call leaves the history as it was, and
//! [`ChatOptions::token_budget`] trims the oldest turns so a long conversation keeps fitting the
//! model's context.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::Stream;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::conversations::{self, Store, StoreError, Turn};
use crate::credentials::{self, Credentials, Env};
use crate::openai::{CallError, CallOptions, OpenAi, RetryPolicy, TransportKind};

/// The model used when [`ChatOptions::model`] is not set.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// Options for one call. Everything is optional; `Default` sends only the text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatOptions {
    /// Any model id; the openai-flows names (`GPT35Turbo`, `GPT4`, ...) are accepted too.
    pub model: Option<String>,
    /// Forget the conversation's history and start again.
    pub restart: bool,
    /// The conversation's system message: stored, kept first, never trimmed; a different one
    /// replaces it.
    pub system_prompt: Option<String>,
    /// Put before this call's text, not stored in the history.
    pub pre_prompt: Option<String>,
    /// Put after this call's text, not stored in the history.
    pub post_prompt: Option<String>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f32>,
    /// Nucleus sampling: only the tokens within this probability mass.
    pub top_p: Option<f32>,
    /// Up to 4 sequences where the reply stops.
    pub stop: Option<Vec<String>>,
    /// Sent as `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// -2 to 2: positive values favour new topics.
    pub presence_penalty: Option<f32>,
    /// -2 to 2: positive values discourage repeating the same words.
    pub frequency_penalty: Option<f32>,
    /// Token id (as text) to a bias from -100 to 100.
    pub logit_bias: Option<HashMap<String, i8>>,
    /// Text (default), any JSON object, or JSON matching a schema.
    pub response_format: Option<ResponseFormat>,
    /// Trim the history (oldest turns first, the system prompt kept) so the request stays within
    /// this many tokens, counted with the model's tokenizer. `None`: send all of it.
    pub token_budget: Option<usize>,
}

/// The reply's format.
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    /// Plain text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching `schema` (structured outputs).
    JsonSchema {
        /// The schema's name, as OpenAI requires one.
        name: String,
        /// A JSON Schema object.
        schema: Value,
        /// Enforce the schema exactly (OpenAI's strict mode).
        strict: bool,
    },
}

/// The answer to one call.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// This call started the conversation (a new id, or `restart`).
    pub restarted: bool,
    /// The reply text.
    pub choice: String,
    /// OpenAI's request id, for support requests.
    pub request_id: Option<String>,
}

/// A stored message, as [`ChatClient::chat_history`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
}

/// The author of a [`ChatMessage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The caller's text.
    User,
    /// The model's reply.
    Assistant,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A setting or argument is unusable (no key, a bad conversation id, ...).
    #[error("{field}: {problem}")]
    Config {
        /// The setting or argument at fault.
        field: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The server answered with an error.
    #[error("OpenAI answered {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Api {
        /// The HTTP status (200 for an error inside a stream).
        status: u16,
        /// OpenAI's `error.type`, such as `invalid_request_error`.
        error_type: Option<String>,
        /// OpenAI's `error.code`, such as `insufficient_quota` or `model_not_found`.
        code: Option<String>,
        /// The request field at fault, when OpenAI names one.
        param: Option<String>,
        /// OpenAI's message, with the API key scrubbed.
        message: String,
        /// OpenAI's request id, for support requests.
        request_id: Option<String>,
    },
    /// No usable answer arrived: the connection failed, was cut, or timed out.
    #[error("{kind}: {message}")]
    Transport {
        /// Connecting, a timeout, or a cut connection.
        kind: TransportKind,
        /// What happened.
        message: String,
    },
    /// The server's answer is not a chat completion.
    #[error("the answer is not a chat completion: {message}")]
    InvalidResponse {
        /// What was wrong with it.
        message: String,
        /// OpenAI's request id, if the answer had one.
        request_id: Option<String>,
    },
    /// The model declined to answer (or returned no text).
    #[error("the model gave no answer: {0}")]
    NoAnswer(String),
    /// The conversation store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Api(api) => Error::Api {
                status: api.status,
                error_type: api.error_type,
                code: api.code,
                param: api.param,
                message: api.message,
                request_id: api.request_id,
            },
            CallError::Transport { kind, detail } => Error::Transport {
                kind,
                message: detail,
            },
            CallError::InvalidResponse { detail, request_id } => Error::InvalidResponse {
                message: detail,
                request_id,
            },
        }
    }
}

impl From<credentials::ConfigError> for Error {
    fn from(error: credentials::ConfigError) -> Self {
        Error::Config {
            field: error.field,
            problem: error.problem,
        }
    }
}

/// The model id for a name: openai-flows' `ChatModel` names map to what they stood for; any
/// other name is used as given.
pub fn model_id(name: &str) -> &str {
    match name {
        "GPT4Turbo" => "gpt-4-1106-preview",
        "GPT4_32K" => "gpt-4-32k",
        "GPT4" => "gpt-4",
        "GPT35Turbo16K" => "gpt-3.5-turbo-16k",
        "GPT35Turbo" => "gpt-3.5-turbo",
        other => other,
    }
}

/// A chat client: credentials, a conversation store and call settings. Cheap to clone.
#[derive(Clone)]
pub struct ChatClient {
    client: OpenAi,
    credentials: Credentials,
    store: Arc<dyn Store>,
    call: CallOptions,
}

impl ChatClient {
    /// A client for these credentials and this store.
    pub fn new(credentials: Credentials, store: Arc<dyn Store>) -> Self {
        ChatClient {
            client: OpenAi::new(),
            credentials,
            store,
            call: CallOptions::default(),
        }
    }

    /// Credentials resolved as the component resolves them (`apiKey`, `baseUrl`, `project`,
    /// `organization`, `authStyle`, `apiVersion` in `cfg`, else `OPENAI_*` in `env`); the store
    /// from `cfg.conversationStore`, else `CONVERSATION_STORE`, else the default SQLite file.
    pub fn from_cfg(cfg: &Value, env: Env) -> Result<Self, Error> {
        let credentials = credentials::resolve(cfg, env)?;
        let setting = credentials::text(cfg, "conversationStore");
        let store = conversations::open_configured(setting.as_deref(), env)?;
        Ok(ChatClient::new(credentials, store))
    }

    /// [`ChatClient::from_cfg`] with no `cfg`: everything from the process environment.
    pub fn from_env() -> Result<Self, Error> {
        ChatClient::from_cfg(&json!({}), &credentials::process_env)
    }

    /// Retries of transient failures (429, 5xx, cut connections); 2 by default.
    pub fn with_max_retries(mut self, retries: u32) -> Self {
        self.call.retry = RetryPolicy {
            max_retries: retries,
            ..self.call.retry
        };
        self
    }

    /// The whole-call timeout (streams: between chunks); 10 minutes by default.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.call.timeout = timeout;
        self
    }

    /// Sends `text` as the next user message of the conversation and returns the reply. The
    /// request carries the stored history; the text and the reply are stored once the reply
    /// arrived.
    pub async fn chat_completion(
        &self,
        conversation_id: &str,
        text: &str,
        options: &ChatOptions,
    ) -> Result<ChatResponse, Error> {
        let (turn, request) = self.begin(conversation_id, text, options, false).await?;
        let result = self
            .client
            .chat_completion(&self.credentials, &request, &self.call)
            .await;
        finish(turn, text, result).await
    }

    /// Like [`ChatClient::chat_completion`], but the reply arrives as a stream of text pieces.
    /// The full reply is stored when the stream ends; an error ends the stream with `Err`, and
    /// then nothing is stored.
    pub async fn chat_completion_stream(
        &self,
        conversation_id: &str,
        text: &str,
        options: &ChatOptions,
    ) -> Result<ChatStream, Error> {
        let (turn, request) = self.begin(conversation_id, text, options, true).await?;
        let restarted = turn.restarted;
        let (sender, receiver) = mpsc::unbounded_channel();
        let this = self.clone();
        let text = text.to_string();
        tokio::spawn(async move {
            let delivered = Arc::new(AtomicBool::new(false));
            let (pieces, flag) = (sender.clone(), delivered.clone());
            let on_delta = move |piece: &str| {
                flag.store(true, Ordering::SeqCst);
                let _ = pieces.send(Ok(piece.to_string()));
            };
            let result = this
                .client
                .chat_completion_streamed(&this.credentials, &request, &this.call, &on_delta)
                .await;
            // The stream ends (the sender drops) only after the reply is stored.
            match finish(turn, &text, result).await {
                // A server that ignored `stream` answered at once: the reply is one piece.
                Ok(response) if !delivered.load(Ordering::SeqCst) => {
                    let _ = sender.send(Ok(response.choice));
                }
                Ok(_) => {}
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        });
        Ok(ChatStream {
            restarted,
            receiver,
        })
    }

    /// The conversation's last `limit` user and assistant messages (0: all), oldest first.
    pub async fn chat_history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, Error> {
        check_id(conversation_id)?;
        let stored = self.store.load(conversation_id).await?;
        let mut messages: Vec<ChatMessage> = stored
            .iter()
            .filter_map(|m| {
                let role = match m["role"].as_str()? {
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    _ => return None,
                };
                Some(ChatMessage {
                    role,
                    content: text_of(&m["content"]),
                })
            })
            .collect();
        if limit > 0 && messages.len() > limit {
            messages.drain(..messages.len() - limit);
        }
        Ok(messages)
    }

    /// Takes the conversation's lease and builds the request.
    async fn begin(
        &self,
        conversation_id: &str,
        text: &str,
        options: &ChatOptions,
        stream: bool,
    ) -> Result<(Turn, Value), Error> {
        check_id(conversation_id)?;
        let model = model_id(options.model.as_deref().unwrap_or(DEFAULT_MODEL)).to_string();
        let turn = Turn::begin(
            self.store.clone(),
            conversation_id,
            options.restart,
            options
                .system_prompt
                .as_ref()
                .map(|system| json!({"role": "system", "content": system})),
        )
        .await?;
        let sent = [
            options.pre_prompt.as_deref(),
            Some(text),
            options.post_prompt.as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
        let messages = turn.messages(
            &[json!({"role": "user", "content": sent})],
            &model,
            options.token_budget,
        );
        let mut request = sampling(options);
        request.insert("model".into(), json!(model));
        request.insert("messages".into(), Value::Array(messages));
        if stream {
            request.insert("stream".into(), json!(true));
            request.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Ok((turn, Value::Object(request)))
    }
}

/// Stores the turn if the call succeeded with text; releases the lease either way.
async fn finish(
    turn: Turn,
    text: &str,
    result: Result<crate::openai::Completion, CallError>,
) -> Result<ChatResponse, Error> {
    let completion = match result {
        Ok(completion) => completion,
        Err(error) => {
            turn.abandon().await;
            return Err(error.into());
        }
    };
    let message = &completion.body["choices"][0]["message"];
    let Some(choice) = message["content"].as_str().filter(|c| !c.is_empty()) else {
        turn.abandon().await;
        let why = message["refusal"]
            .as_str()
            .unwrap_or("the reply has no text");
        return Err(Error::NoAnswer(why.to_string()));
    };
    let restarted = turn.restarted;
    turn.commit(
        &[json!({"role": "user", "content": text})],
        json!({"role": "assistant", "content": choice}),
    )
    .await?;
    Ok(ChatResponse {
        restarted,
        choice: choice.to_string(),
        request_id: completion.request_id,
    })
}

/// The request's optional settings: only those the caller set.
fn sampling(options: &ChatOptions) -> Map<String, Value> {
    let mut request = Map::new();
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            request.insert(key.to_string(), value);
        }
    };
    set("temperature", options.temperature.map(|v| json!(v)));
    set("top_p", options.top_p.map(|v| json!(v)));
    set("stop", options.stop.as_ref().map(|v| json!(v)));
    set(
        "max_completion_tokens",
        options.max_tokens.map(|v| json!(v)),
    );
    set(
        "presence_penalty",
        options.presence_penalty.map(|v| json!(v)),
    );
    set(
        "frequency_penalty",
        options.frequency_penalty.map(|v| json!(v)),
    );
    set("logit_bias", options.logit_bias.as_ref().map(|v| json!(v)));
    set(
        "response_format",
        options.response_format.as_ref().map(|format| match format {
            ResponseFormat::Text => json!({"type": "text"}),
            ResponseFormat::JsonObject => json!({"type": "json_object"}),
            ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            } => json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}),
        }),
    );
    request
}

fn check_id(id: &str) -> Result<(), Error> {
    conversations::check_id(id).map_err(|problem| Error::Config {
        field: "conversation_id".into(),
        problem,
    })
}

/// The text of a message's content: the string, or its text parts joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The reply of [`ChatClient::chat_completion_stream`]: text pieces as they arrive.
pub struct ChatStream {
    /// This call started the conversation.
    pub restarted: bool,
    receiver: mpsc::UnboundedReceiver<Result<String, Error>>,
}

impl Stream for ChatStream {
    type Item = Result<String, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}
