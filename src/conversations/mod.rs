//! Conversations: chat history kept per conversation id, so each request can carry what was said
//! before (what openai-flows kept server-side).
//!
//! A [`Store`] keeps, per id, the messages of the conversation as chat-completion message
//! objects (`{"role", "content"}`), oldest first, and hands out leases that serialise the turns
//! of one conversation: two calls on the same id never interleave, even across processes
//! (SQLite on one machine, Redis across replicas). A lease expires, so a crashed holder cannot
//! block a conversation for good.
//!
//! [`Turn`] is the one road every caller takes (the library's `chat_completion`, Send Request
//! with `conversationId`, the gateway): [`Turn::begin`] takes the lease and reads the history,
//! [`Turn::messages`] puts the request together (trimmed to a token budget), and
//! [`Turn::commit`] stores the new messages and the reply, only after the upstream answered. A
//! failed call never changes the history.

#![warn(missing_docs)]

pub mod budget;
pub mod memory;
pub mod redis;
pub mod sqlite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

/// How long a lease lasts unless renewed or released. A turn renews it while its call runs, so
/// this only bounds how long a crashed holder blocks a conversation.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// The environment variable naming the store, when the configuration does not.
pub const STORE_ENV: &str = "CONVERSATION_STORE";

/// A store failed: unreachable, corrupt, or misconfigured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("conversation store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    /// An error with this text.
    pub fn new(what: impl std::fmt::Display) -> Self {
        StoreError(what.to_string())
    }
}

/// Proof of holding a conversation's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The conversation.
    pub id: String,
    /// The holder's random token: only its holder can renew or release the lease.
    pub token: String,
}

/// Conversation storage. Implementations: [`memory::MemoryStore`], [`sqlite::SqliteStore`],
/// [`redis::RedisStore`].
#[async_trait]
pub trait Store: Send + Sync {
    /// The conversation's messages, oldest first; empty if it does not exist.
    async fn load(&self, id: &str) -> Result<Vec<Value>, StoreError>;
    /// Appends messages to the conversation, creating it if needed.
    async fn append(&self, id: &str, messages: &[Value]) -> Result<(), StoreError>;
    /// Replaces the conversation's messages at once (none: forgets it); a crash cannot leave
    /// it half-written.
    async fn replace(&self, id: &str, messages: &[Value]) -> Result<(), StoreError>;
    /// Takes the conversation's lease, waiting while someone else holds it. It lapses after
    /// `ttl` if never released.
    async fn acquire(&self, id: &str, ttl: Duration) -> Result<Lease, StoreError>;
    /// Extends a lease for another `ttl`. `Ok(false)`: it lapsed and someone else holds it now.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives the lease back (a lease that already lapsed is left alone).
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
}

/// A conversation id: 1 to 128 ASCII letters, digits and `_ - # . : @ +` (the input schema's
/// pattern says the same). openai-flows allowed letters, digits and `_ - #` up to 50; the extra
/// characters let ids like `whatsapp:+4917…` or `user@example.com#support` through unchanged.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.chars().count() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-#.:@+".contains(c));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 128 ASCII letters, digits or _ - # . : @ +".into())
    }
}

/// Where conversations are kept by default: `<user data dir>/chatgpt-component/conversations.db`.
pub fn default_path() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("chatgpt-component")
        .join("conversations.db")
}

/// Opens a store from its spec: `redis://…` or `rediss://…`, `memory:` (this process only;
/// `memory:NAME` shares one store per name), `sqlite:PATH` or a plain file path. Stores are
/// opened once per spec and shared, so every message of a step reuses the same connections.
pub fn open(spec: &str) -> Result<Arc<dyn Store>, StoreError> {
    static OPEN: OnceLock<Mutex<HashMap<String, Arc<dyn Store>>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("store registry lock");
    if let Some(store) = open.get(spec) {
        return Ok(store.clone());
    }
    let store: Arc<dyn Store> = if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        Arc::new(redis::RedisStore::open(spec)?)
    } else if spec.starts_with("memory:") {
        Arc::new(memory::MemoryStore::default())
    } else {
        let path = spec.strip_prefix("sqlite:").unwrap_or(spec);
        if path.is_empty() {
            return Err(StoreError::new(
                "the store is blank: give a file path, sqlite:PATH, redis://HOST or memory:",
            ));
        }
        Arc::new(sqlite::SqliteStore::open(path)?)
    };
    open.insert(spec.to_string(), store.clone());
    Ok(store)
}

/// The store a setting names, else `CONVERSATION_STORE`, else the default file.
pub fn open_configured(
    setting: Option<&str>,
    env: crate::credentials::Env,
) -> Result<Arc<dyn Store>, StoreError> {
    let spec = setting
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env(STORE_ENV).filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| default_path().display().to_string());
    open(&spec)
}

/// One turn of a conversation, from lease to commit.
pub struct Turn {
    store: Arc<dyn Store>,
    lease: Option<Lease>,
    /// Renews the lease while the call runs, however long it takes.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    history: Vec<Value>,
    /// The conversation starts with this turn (new id, or restarted).
    pub restarted: bool,
    /// The stored history must be replaced, not appended to (restart, new system prompt).
    rewrite: bool,
}

impl Turn {
    /// Takes the lease and reads the history. `restart` forgets it; a `system` message (role
    /// `system` or `developer`) different from the stored one replaces it (kept first, never
    /// trimmed).
    pub async fn begin(
        store: Arc<dyn Store>,
        id: &str,
        restart: bool,
        system: Option<Value>,
    ) -> Result<Turn, StoreError> {
        let lease = store.acquire(id, DEFAULT_LEASE).await?;
        let heartbeat = tokio::spawn(keep_alive(store.clone(), lease.clone()));
        let mut turn = Turn {
            store,
            lease: Some(lease),
            heartbeat: Some(heartbeat),
            history: Vec::new(),
            restarted: restart,
            rewrite: restart,
        };
        if !restart {
            match turn.store.load(id).await {
                Ok(history) => turn.history = history,
                Err(e) => {
                    turn.finish().await;
                    return Err(e);
                }
            }
            turn.restarted = turn.history.is_empty();
        }
        if let Some(message) = system {
            match turn.history.first() {
                Some(first) if is_instruction(first) => {
                    if *first != message {
                        turn.history[0] = message;
                        turn.rewrite = true;
                    }
                }
                _ => {
                    turn.history.insert(0, message);
                    turn.rewrite = true;
                }
            }
        }
        Ok(turn)
    }

    /// The stored history, oldest first (the system prompt first, if any).
    pub fn history(&self) -> &[Value] {
        &self.history
    }

    /// The messages to send: the history, trimmed to `budget` tokens (when given) counting the
    /// new messages too, then the new messages.
    pub fn messages(&self, new: &[Value], model: &str, budget: Option<usize>) -> Vec<Value> {
        let history = match budget {
            Some(budget) => budget::trim(&self.history, new, model, budget),
            None => self.history.clone(),
        };
        history.into_iter().chain(new.iter().cloned()).collect()
    }

    /// Stores the new messages and the reply, then releases the lease. Refuses (storing nothing)
    /// if the lease was lost meanwhile: someone else's turn may have written since.
    pub async fn commit(mut self, new: &[Value], reply: Value) -> Result<(), StoreError> {
        self.stop_heartbeat();
        let lease = self.lease.clone().expect("held until finish");
        let mut added: Vec<Value> = new.to_vec();
        added.push(reply);
        let result = async {
            if !self.store.renew(&lease, DEFAULT_LEASE).await? {
                return Err(StoreError::new(
                    "the conversation's lease lapsed during the call and another turn took it; this turn was not stored",
                ));
            }
            if self.rewrite {
                let mut all = std::mem::take(&mut self.history);
                all.extend(added);
                self.store.replace(&lease.id, &all).await
            } else {
                self.store.append(&lease.id, &added).await
            }
        }
        .await;
        self.finish().await;
        result
    }

    fn stop_heartbeat(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }

    /// Releases the lease without storing anything (the call failed).
    pub async fn abandon(mut self) {
        self.finish().await;
    }

    async fn finish(&mut self) {
        self.stop_heartbeat();
        if let Some(lease) = self.lease.take() {
            if let Err(e) = self.store.release(&lease).await {
                tracing::warn!(error = %e, "cannot release a conversation lease; it lapses on its own");
            }
        }
    }
}

impl Drop for Turn {
    /// A turn dropped mid-way (its caller went away) still gives the lease back, so the
    /// conversation is not blocked until the lease lapses.
    fn drop(&mut self) {
        self.stop_heartbeat();
        if let (Some(lease), Ok(runtime)) =
            (self.lease.take(), tokio::runtime::Handle::try_current())
        {
            let store = self.store.clone();
            runtime.spawn(async move {
                let _ = store.release(&lease).await;
            });
        }
    }
}

/// Renews `lease` every third of its life until aborted (by the turn's end).
async fn keep_alive(store: Arc<dyn Store>, lease: Lease) {
    loop {
        tokio::time::sleep(DEFAULT_LEASE / 3).await;
        match store.renew(&lease, DEFAULT_LEASE).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "a conversation's lease lapsed during a call; its turn will not be stored"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew a conversation's lease; retrying"),
        }
    }
}

/// A system or developer message: the conversation's instructions.
pub fn is_instruction(message: &Value) -> bool {
    matches!(message["role"].as_str(), Some("system" | "developer"))
}

/// A new random lease token.
pub(crate) fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Polls `try_take` with a growing pause until it succeeds: how the stores wait for a lease.
pub(crate) async fn wait_for_lease<F, Fut>(mut try_take: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, StoreError>>,
{
    let mut pause = Duration::from_millis(5);
    loop {
        if try_take().await? {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "user_1-2#x", "whatsapp:+4917612345", "ana@example.com"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "new\nline", &"x".repeat(129), "a/b", "Zoë"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
