//! Conversations in an embedded SQLite file: the default store.
//!
//! WAL mode lets readers and a writer work at once, and a busy timeout makes concurrent writers
//! from several processes wait for each other instead of failing, so steps, the gateway and the
//! CLI on one machine can share one file. Leases are rows with an expiry time (wall clock, which
//! every process on the machine shares), taken with one atomic upsert that only replaces an
//! expired row. SQLite calls block, so each runs on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection};
use serde_json::Value;

use super::{new_token, wait_for_lease, Lease, Store, StoreError};

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, seq);
    CREATE TABLE IF NOT EXISTS leases (
        conversation TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    );
";

/// Conversations in one SQLite file, shared by every process that opens it.
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    path: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and its directory.
    pub fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let fail = |e: &dyn std::fmt::Display| {
            StoreError::new(format!(
                "cannot open the SQLite file {path}: {e}; check the path and its permissions"
            ))
        };
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let connection = Connection::open(path).map_err(|e| fail(&e))?;
        connection
            .busy_timeout(Duration::from_secs(30))
            .map_err(|e| fail(&e))?;
        // `journal_mode` answers with the mode in force; WAL is a property of the file.
        let _: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| fail(&e))?;
        connection
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .and_then(|_| connection.execute_batch(SCHEMA))
            .map_err(|e| fail(&e))?;
        Ok(SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
            path: path.to_string(),
        })
    }

    /// Runs `work` on the connection, off the async threads.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connection = self.connection.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().expect("connection lock");
            work(&mut connection)
        })
        .await
        .map_err(|e| StoreError::new(format!("SQLite worker failed: {e}")))?
        .map_err(|e| StoreError::new(format!("SQLite file {path}: {e}")))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        let id = id.to_string();
        let rows = self
            .with(move |c| {
                let mut query = c.prepare_cached(
                    "SELECT message FROM messages WHERE conversation = ?1 ORDER BY seq",
                )?;
                let rows = query.query_map([id], |row| row.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<Vec<String>>>()
            })
            .await?;
        rows.iter()
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|e| StoreError::new(format!("a stored message is not JSON: {e}")))
            })
            .collect()
    }

    async fn append(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        let id = id.to_string();
        let texts: Vec<String> = messages.iter().map(Value::to_string).collect();
        self.with(move |c| {
            let tx = c.transaction()?;
            insert(&tx, &id, &texts)?;
            tx.commit()
        })
        .await
    }

    async fn replace(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        let id = id.to_string();
        let texts: Vec<String> = messages.iter().map(Value::to_string).collect();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM messages WHERE conversation = ?1", [&id])?;
            insert(&tx, &id, &texts)?;
            tx.commit()
        })
        .await
    }

    async fn acquire(&self, id: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let token = new_token();
        let ttl_ms = ttl.as_millis() as i64;
        wait_for_lease(|| {
            let (id, token) = (id.to_string(), token.clone());
            self.with(move |c| {
                let now = now_ms();
                // One statement, so atomic: insert, or take over only an expired lease.
                let changed = c.execute(
                    "INSERT INTO leases (conversation, token, expires_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (conversation) DO UPDATE
                       SET token = excluded.token, expires_ms = excluded.expires_ms
                       WHERE leases.expires_ms <= ?4",
                    params![id, token, now + ttl_ms, now],
                )?;
                Ok(changed == 1)
            })
        })
        .await?;
        Ok(Lease {
            id: id.to_string(),
            token,
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let (id, token) = (lease.id.clone(), lease.token.clone());
        let ttl_ms = ttl.as_millis() as i64;
        self.with(move |c| {
            let changed = c.execute(
                "UPDATE leases SET expires_ms = ?3 WHERE conversation = ?1 AND token = ?2",
                params![id, token, now_ms() + ttl_ms],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let (id, token) = (lease.id.clone(), lease.token.clone());
        self.with(move |c| {
            c.execute(
                "DELETE FROM leases WHERE conversation = ?1 AND token = ?2",
                params![id, token],
            )
            .map(|_| ())
        })
        .await
    }
}

/// Adds messages to a conversation inside the caller's transaction.
fn insert(tx: &rusqlite::Transaction<'_>, id: &str, texts: &[String]) -> rusqlite::Result<()> {
    let mut insert =
        tx.prepare_cached("INSERT INTO messages (conversation, message) VALUES (?1, ?2)")?;
    for text in texts {
        insert.execute(params![id, text])?;
    }
    Ok(())
}
