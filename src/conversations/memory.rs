//! Conversations in this process's memory: for tests, and for runs that need no history after
//! exit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use super::{new_token, wait_for_lease, Lease, Store, StoreError};

/// Conversations and leases in maps of this process.
#[derive(Default)]
pub struct MemoryStore {
    conversations: Mutex<HashMap<String, Vec<Value>>>,
    leases: Mutex<HashMap<String, (String, Instant)>>,
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        let conversations = self.conversations.lock().expect("store lock");
        Ok(conversations.get(id).cloned().unwrap_or_default())
    }

    async fn append(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        let mut conversations = self.conversations.lock().expect("store lock");
        conversations
            .entry(id.to_string())
            .or_default()
            .extend_from_slice(messages);
        Ok(())
    }

    async fn replace(&self, id: &str, messages: &[Value]) -> Result<(), StoreError> {
        let mut conversations = self.conversations.lock().expect("store lock");
        if messages.is_empty() {
            conversations.remove(id);
        } else {
            conversations.insert(id.to_string(), messages.to_vec());
        }
        Ok(())
    }

    async fn acquire(&self, id: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let token = new_token();
        wait_for_lease(|| async {
            let mut leases = self.leases.lock().expect("store lock");
            let now = Instant::now();
            let free = leases.get(id).is_none_or(|(_, until)| *until <= now);
            if free {
                leases.insert(id.to_string(), (token.clone(), now + ttl));
            }
            Ok(free)
        })
        .await?;
        Ok(Lease {
            id: id.to_string(),
            token,
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut leases = self.leases.lock().expect("store lock");
        match leases.get_mut(&lease.id) {
            Some((token, until)) if *token == lease.token => {
                *until = Instant::now() + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().expect("store lock");
        if leases
            .get(&lease.id)
            .is_some_and(|(token, _)| *token == lease.token)
        {
            leases.remove(&lease.id);
        }
        Ok(())
    }
}
