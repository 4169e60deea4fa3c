//! Conversations in Redis: one history for every replica that points at the same server.
//!
//! The spec is a Redis URL, `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ttl=SECONDS]`
//! (`rediss://` for TLS, checked against the web's root certificates). `ttl` is
//! ours (it is taken out before the URL reaches the `redis` crate); every other query parameter
//! (`protocol=resp3`) is the crate's.
//!
//! # Keys
//!
//! * `chatgpt-component:conversation:<id>`: the history, a **list** of JSON-serialised message
//!   objects, oldest first. A list because a turn only ever adds to the end (`RPUSH`, one round
//!   trip whatever the number of messages, no read-modify-write), reading is one `LRANGE 0 -1`,
//!   and forgetting is one `DEL`. Nothing is ever rewritten in place, so a reader never sees half
//!   a message; a restarted conversation is `DEL` + `RPUSH` in one `MULTI`/`EXEC`, under the
//!   lease.
//! * `chatgpt-component:lock:<id>`: the lease, a string holding the holder's random token, set
//!   with `SET … NX PX <ttl>`: it is taken only if free, and it **expires** on its own, so a
//!   replica that dies (or loses its connection) mid-turn blocks the conversation for at most the
//!   lease's ttl, never for good. Waiting is polling (`wait_for_lease`) rather than
//!   blocking commands or pub/sub: turns are seconds long, and polling survives reconnects.
//!   Releasing is a compare-and-delete in one Lua script: the key is deleted only if it still
//!   holds the caller's token, so a holder whose lease lapsed (and was taken by someone else)
//!   cannot delete the new holder's lease. Renewing (while a long call runs) is the same kind of
//!   script: extend the expiry only if the token is still ours.
//!
//! # TTL
//!
//! Without `ttl` a history is kept until cleared. With `ttl=SECONDS` it is deleted by Redis once
//! `SECONDS` passed without a write: every append sets `EXPIRE` again, in the same `MULTI`/`EXEC`
//! transaction as the `RPUSH`, so there is never a list without its expiry. Reading does not
//! extend it. A conversation that expired starts afresh, exactly like an unknown id.
//!
//! # Connection
//!
//! [`RedisStore::open`] only parses and checks the URL; the connection is made on first use and
//! shared by every call (one multiplexed connection, pipelining concurrent commands). A call that
//! finds the connection broken fails (with a [`StoreError`] naming the server and what to check)
//! and drops it; the next call connects again. The connection belongs to the Tokio runtime that
//! made it (its driver task runs there): a call from another runtime (the store is shared by the
//! process, see [`super::open`]) makes one of its own. Connecting gives up after
//! [`CONNECT_TIMEOUT`], a command after [`RESPONSE_TIMEOUT`], so an unreachable server is an
//! error, not a hang. Error texts name the server by host, port and database, never with the
//! URL's password.
//!
//! (The `redis` crate's `ConnectionManager` reconnects too, but it is bound to one runtime as
//! well; the slot below is the few lines of it that a store needs, plus the runtime check.)

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, Script};
use serde_json::Value;
use tokio::runtime::{Handle, Id as RuntimeId};
use tokio::sync::Mutex;

use super::{new_token, wait_for_lease, Lease, Store, StoreError};

/// Prefix of the history lists.
pub const CONVERSATION_PREFIX: &str = "chatgpt-component:conversation:";
/// Prefix of the lease keys.
pub const LOCK_PREFIX: &str = "chatgpt-component:lock:";
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a command may wait for its answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Deletes the lease only if it still holds the caller's token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the lease if it still holds the caller's token, or takes it again if it lapsed and
/// nobody else took it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
";

/// What the spec says to use, with everything that prints already stripped of the password.
#[derive(Debug, PartialEq)]
struct Spec {
    /// The URL for the `redis` crate (our `ttl` removed).
    url: String,
    /// The history's time to live, in seconds.
    ttl: Option<u64>,
    /// Forms of the password that must never be printed.
    secrets: Vec<String>,
}

impl Spec {
    fn parse(spec: &str) -> Result<Spec, String> {
        let mut secrets = password_candidates(spec);
        // The URL ends its authority at `/`, `?` or `#`; our query is after the first `?`, and
        // ends at a fragment.
        let (before, query_and_fragment) = match spec.find('?') {
            Some(at) => (&spec[..at], Some(&spec[at + 1..])),
            None => (spec, None),
        };
        let mut ttl = None;
        let mut url = before.to_string();
        if let Some(rest) = query_and_fragment {
            let (query, fragment) = match rest.find('#') {
                Some(at) => (&rest[..at], Some(&rest[at..])),
                None => (rest, None),
            };
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key != "ttl" {
                    kept.push(pair);
                    continue;
                }
                if ttl.is_some() {
                    return Err("give ttl only once".into());
                }
                ttl = Some(
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|seconds| (1..=i64::MAX as u64).contains(seconds))
                        .ok_or_else(|| {
                            "ttl must be a whole number of seconds above 0 (how long a \
                             conversation is kept after its last message), as in \
                             redis://HOST:6379?ttl=86400"
                                .to_string()
                        })?,
                );
            }
            if !kept.is_empty() {
                url.push('?');
                url.push_str(&kept.join("&"));
            }
            url.push_str(fragment.unwrap_or(""));
        }
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Ok(Spec { url, ttl, secrets })
    }
}

/// Everything in `spec` that may be the password, raw and percent-decoded: what lies between
/// the first `:` of the user info and its `@`, where the user info ends at the authority's last
/// `@` (a well-formed URL) or at the spec's last `@` (a malformed one).
fn password_candidates(spec: &str) -> Vec<String> {
    let rest = spec.split_once("://").map_or(spec, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut candidates = Vec::new();
    for user_info in [
        rest[..authority_end].rsplit_once('@').map(|(info, _)| info),
        rest.rsplit_once('@').map(|(info, _)| info),
    ]
    .into_iter()
    .flatten()
    {
        if let Some((_, password)) = user_info.split_once(':') {
            if !password.is_empty() {
                candidates.push(password.to_string());
                candidates.push(percent_decode(password));
            }
        }
    }
    candidates
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The spec as printed when it could not be parsed: everything before the last `@` (the user
/// info, even malformed) and the query are left out.
fn redacted(spec: &str) -> String {
    let (scheme, rest) = spec.split_once("://").unwrap_or(("redis", spec));
    let (hidden, rest) = match rest.rsplit_once('@') {
        Some((_, host)) => ("***@", host),
        None => ("", rest),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    format!("{scheme}://{hidden}{rest}")
}

fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), "***")
        })
}

/// The connection, once made, with the runtime it runs on, and how many were made (so that a
/// call that saw a connection fail drops that one, not a newer one another call already made).
#[derive(Default)]
struct Slot {
    generation: u64,
    connection: Option<(Option<RuntimeId>, MultiplexedConnection)>,
}

/// Conversations in Redis. See the module documentation.
pub struct RedisStore {
    client: Client,
    /// The server as printed: `redis://HOST:PORT/DB`.
    name: String,
    secrets: Vec<String>,
    ttl: Option<u64>,
    slot: Mutex<Slot>,
    release: Script,
    renew: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Parses and checks the URL; connects on first use.
    pub fn open(spec: &str) -> Result<RedisStore, StoreError> {
        let parsed = Spec::parse(spec).map_err(|problem| {
            StoreError::new(format!("Redis store {}: {problem}", redacted(spec)))
        })?;
        let client = Client::open(parsed.url.as_str()).map_err(|e| {
            StoreError::new(format!(
                "Redis store {}: the URL is not valid ({}); expected \
                 redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ttl=SECONDS] (rediss:// for TLS)",
                redacted(spec),
                scrub(&e.to_string(), &parsed.secrets)
            ))
        })?;
        let info = client.get_connection_info();
        let mut secrets = parsed.secrets;
        if let Some(password) = info.redis_settings().password() {
            secrets.push(password.to_string());
            secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
            secrets.dedup();
        }
        let name = format!("redis://{}/{}", info.addr(), info.redis_settings().db());
        Ok(RedisStore {
            name: scrub(&name, &secrets),
            client,
            secrets,
            ttl: parsed.ttl,
            slot: Mutex::default(),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
        })
    }

    /// The history's time to live in seconds, if the spec set one.
    pub fn ttl(&self) -> Option<u64> {
        self.ttl
    }

    /// The shared connection (made now if there is none) and its generation.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), StoreError> {
        // A connection is driven by a task on the runtime that made it, and dies with it; a
        // store shared by the process can be used from a later runtime (one per test, a CLI run
        // in a fresh one), which then gets a connection of its own.
        let runtime = Handle::try_current().ok().map(|handle| handle.id());
        let mut slot = self.slot.lock().await;
        if let Some((on, connection)) = &slot.connection {
            if *on == runtime {
                return Ok((slot.generation, connection.clone()));
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.error(&e, "connecting"))?;
        slot.generation += 1;
        slot.connection = Some((runtime, connection.clone()));
        Ok((slot.generation, connection))
    }

    /// Maps a command's error; drops the connection it ran on if that one is broken.
    async fn check<T>(
        &self,
        generation: u64,
        result: RedisResult<T>,
        what: &str,
    ) -> Result<T, StoreError> {
        let e = match result {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if broken(&e) || e.is_unrecoverable_error() {
            let mut slot = self.slot.lock().await;
            if slot.generation == generation {
                slot.connection = None;
            }
        }
        Err(self.error(&e, what))
    }

    /// A store error that names the server, what failed and what to check.
    fn error(&self, e: &RedisError, what: &str) -> StoreError {
        let advice = if e.kind() == ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        {
            "check the user name and password in the store URL"
        } else if broken(e) {
            "check that the server runs and that the store URL's host and port reach it"
        } else if e.code() == Some("WRONGTYPE") {
            "a key under chatgpt-component: holds something else: another program uses the \
             prefix, or the database number in the URL is wrong"
        } else if e.code() == Some("READONLY") {
            "the server is a read-only replica: point the store URL at the primary"
        } else if e.code() == Some("OOM") {
            "the server is out of memory: raise maxmemory, or set ?ttl= so histories expire"
        } else if e.code() == Some("LOADING") {
            "the server is still loading its data: try again shortly"
        } else {
            "check the server's log"
        };
        StoreError::new(format!(
            "Redis store {}: {what} failed ({}); {advice}",
            self.name,
            scrub(&e.to_string(), &self.secrets)
        ))
    }
}

/// The error means the connection (or the server) is gone, not that a command was refused.
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn conversation_key(id: &str) -> String {
    format!("{CONVERSATION_PREFIX}{id}")
}

fn lock_key(id: &str) -> String {
    format!("{LOCK_PREFIX}{id}")
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        let key = conversation_key(id);
        let (generation, mut connection) = self.connection().await?;
        let result = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async::<Vec<String>>(&mut connection)
            .await;
        let entries = self
            .check(generation, result, "reading a conversation")
            .await?;
        entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                serde_json::from_str(entry).map_err(|e| {
                    StoreError::new(format!(
                        "Redis store {}: entry {index} of {key} is not a JSON message ({e}); \
                         another program writes to the key: clear the conversation",
                        self.name
                    ))
                })
            })
            .collect()
    }

    async fn append(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let key = conversation_key(id);
        let entries: Vec<String> = messages.iter().map(Value::to_string).collect();
        let (generation, mut connection) = self.connection().await?;
        let result = match self.ttl {
            Some(ttl) => {
                redis::pipe()
                    .atomic()
                    .cmd("RPUSH")
                    .arg(&key)
                    .arg(&entries)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(ttl)
                    .ignore()
                    .exec_async(&mut connection)
                    .await
            }
            None => {
                redis::cmd("RPUSH")
                    .arg(&key)
                    .arg(&entries)
                    .exec_async(&mut connection)
                    .await
            }
        };
        self.check(generation, result, "adding to a conversation")
            .await
    }

    async fn replace(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        let key = conversation_key(id);
        let entries: Vec<String> = messages.iter().map(Value::to_string).collect();
        let (generation, mut connection) = self.connection().await?;
        // One MULTI/EXEC: readers see the old history or the new one, never none.
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&key).ignore();
        if !entries.is_empty() {
            pipe.cmd("RPUSH").arg(&key).arg(&entries).ignore();
            if let Some(ttl) = self.ttl {
                pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
            }
        }
        let result = pipe.exec_async(&mut connection).await;
        self.check(generation, result, "replacing a conversation")
            .await
    }

    async fn acquire(&self, id: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let key = &lock_key(id);
        let token = &new_token();
        // PX 0 is refused; a lease shorter than a millisecond is one millisecond.
        let millis = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, i64::MAX as u64 / 2);
        wait_for_lease(move || async move {
            let (generation, mut connection) = self.connection().await?;
            let result = redis::cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(millis)
                .query_async::<Option<String>>(&mut connection)
                .await;
            let taken = self
                .check(generation, result, "taking a conversation's lease")
                .await?;
            Ok(taken.is_some())
        })
        .await?;
        Ok(Lease {
            id: id.to_string(),
            token: token.clone(),
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let millis = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, i64::MAX as u64 / 2);
        let (generation, mut connection) = self.connection().await?;
        let result = self
            .renew
            .key(lock_key(&lease.id))
            .arg(&lease.token)
            .arg(millis)
            .invoke_async::<i64>(&mut connection)
            .await;
        self.check(generation, result, "renewing a conversation's lease")
            .await
            .map(|renewed| renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let (generation, mut connection) = self.connection().await?;
        let result = self
            .release
            .key(lock_key(&lease.id))
            .arg(&lease.token)
            .invoke_async::<i64>(&mut connection)
            .await;
        self.check(generation, result, "releasing a conversation's lease")
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_taken_out_of_the_url() {
        let spec = Spec::parse("redis://127.0.0.1:6379/2?ttl=60").unwrap();
        assert_eq!(spec.url, "redis://127.0.0.1:6379/2");
        assert_eq!(spec.ttl, Some(60));

        let spec = Spec::parse("redis://h?protocol=resp3&ttl=5&x=1#frag").unwrap();
        assert_eq!(spec.url, "redis://h?protocol=resp3&x=1#frag");
        assert_eq!(spec.ttl, Some(5));

        let spec = Spec::parse("redis://h?ttl=5#frag").unwrap();
        assert_eq!(spec.url, "redis://h#frag");

        let spec = Spec::parse("redis://h").unwrap();
        assert_eq!(spec.url, "redis://h");
        assert_eq!(spec.ttl, None);

        let store = RedisStore::open("redis://127.0.0.1:6379?ttl=86400").unwrap();
        assert_eq!(store.ttl(), Some(86400));
        assert_eq!(store.name, "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn a_bad_ttl_says_what_is_expected() {
        for bad in ["abc", "", "0", "-1", "1.5", "99999999999999999999"] {
            let e = RedisStore::open(&format!("redis://:hunter2@h:6379?ttl={bad}")).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("whole number of seconds"), "{bad}: {text}");
            assert!(text.contains("Redis store redis://***@h:6379"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
        let e = RedisStore::open("redis://h?ttl=1&ttl=2").unwrap_err();
        assert!(e.to_string().contains("only once"), "{e}");
    }

    #[test]
    fn an_invalid_url_names_the_store_without_the_password() {
        for spec in [
            "redis://:s3cr%65t@h:notaport",
            "redis://user:s3cret@h:99999",
            "redis://:s3c/ret@h",
            "redis://:s3c?ret@h?ttl=5",
            "redis://:s3c#ret@h",
            "redis://:s3cret@0.0.0.0",
        ] {
            let e = RedisStore::open(spec).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("conversation store: Redis store "),
                "{text}"
            );
            assert!(!text.contains("s3c"), "{spec}: {text}");
        }
        assert!(
            RedisStore::open("rediss://:s3cret@h").is_ok(),
            "TLS is built in"
        );
    }

    #[test]
    fn the_password_is_scrubbed_from_error_texts() {
        let spec = Spec::parse("redis://user:p%40ss@h:6379?ttl=3").unwrap();
        assert!(spec.secrets.contains(&"p%40ss".to_string()));
        assert!(spec.secrets.contains(&"p@ss".to_string()));
        assert_eq!(
            scrub("auth p@ss / p%40ss failed", &spec.secrets),
            "auth *** / *** failed"
        );
        assert_eq!(
            redacted("redis://user:p%40ss@h:6379?ttl=3"),
            "redis://***@h:6379"
        );
        assert_eq!(redacted("redis://h:6379/1?ttl=3"), "redis://h:6379/1");

        let store = RedisStore::open("redis://user:p%40ss@h:6379/3").unwrap();
        assert_eq!(store.name, "redis://h:6379/3");
        let error = RedisError::from((ErrorKind::AuthenticationFailed, "bad", "p@ss".to_string()));
        let text = store.error(&error, "connecting").to_string();
        assert!(!text.contains("p@ss"), "{text}");
        assert!(text.contains("redis://h:6379/3"), "{text}");
        assert!(text.contains("password"), "{text}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    #[test]
    fn keys() {
        assert_eq!(
            conversation_key("a:b"),
            "chatgpt-component:conversation:a:b"
        );
        assert_eq!(lock_key("a"), "chatgpt-component:lock:a");
    }
}
