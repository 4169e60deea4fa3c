//! What every conversation store must do, run against each (memory, SQLite, Redis): replace is
//! all-or-nothing, a renewed lease outlives its first ttl, a lapsed lease taken by someone else
//! cannot be renewed.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chatgpt_component::conversations::Store;
use serde_json::{json, Value};

fn messages(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect()
}

/// `name` says which store failed.
pub async fn replace_and_leases(name: &str, store: Arc<dyn Store>, other: Arc<dyn Store>) {
    // Replace swaps the whole history; an empty one forgets it.
    store.append("r", &messages(3)).await.unwrap();
    store.replace("r", &messages(2)).await.unwrap();
    assert_eq!(store.load("r").await.unwrap(), messages(2), "{name}");
    assert_eq!(
        other.load("r").await.unwrap(),
        messages(2),
        "{name}: seen by another handle"
    );
    store.replace("r", &[]).await.unwrap();
    assert!(store.load("r").await.unwrap().is_empty(), "{name}");

    // A renewed lease holds past its first ttl: another acquire keeps waiting.
    let held = store
        .acquire("l", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        store.renew(&held, Duration::from_secs(60)).await.unwrap(),
        "{name}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = tokio::spawn({
        let other = other.clone();
        async move { other.acquire("l", Duration::from_secs(60)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "{name}: a renewed lease was taken");
    store.release(&held).await.unwrap();
    let current = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{name}: the released lease was not handed on"))
        .unwrap();

    // The first holder's lease lapsed and was taken: it cannot be renewed; the new one can.
    assert!(
        !store.renew(&held, Duration::from_secs(60)).await.unwrap(),
        "{name}"
    );
    assert!(
        other
            .renew(&current, Duration::from_secs(60))
            .await
            .unwrap(),
        "{name}"
    );
    other.release(&current).await.unwrap();
}
