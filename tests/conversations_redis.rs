//! The Redis conversation store against a real `redis-server` (one private server per test,
//! started by `redis_support`), through the `Store` trait only, as the rest of the component
//! uses it. Keys are looked at directly (with a connection of the test's own) only to check
//! what the store promises about them: expiry, lease ownership.

mod redis_support;
mod store_contract;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatgpt_component::conversations::redis::RedisStore;
use chatgpt_component::conversations::Store;
use redis_support::{free_port, RedisServer};
use serde_json::{json, Value};

/// How long anything that should happen may take before the test fails (a hang guard, not a
/// performance bound).
const PATIENCE: Duration = Duration::from_secs(10);

fn open(url: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::open(url).expect("open the store"))
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
}

async fn raw(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut connection = server.connection().await;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

async fn raw_int(server: &RedisServer, args: &[&str]) -> i64 {
    match raw(server, args).await {
        redis::Value::Int(n) => n,
        other => panic!("{args:?}: expected an integer, got {other:?}"),
    }
}

async fn raw_string(server: &RedisServer, args: &[&str]) -> Option<String> {
    match raw(server, args).await {
        redis::Value::Nil => None,
        redis::Value::BulkString(bytes) => Some(String::from_utf8(bytes).unwrap()),
        redis::Value::SimpleString(text) => Some(text),
        other => panic!("{args:?}: expected a string, got {other:?}"),
    }
}

fn messages() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You are terse."}),
        json!({
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "What is in this picture? Ünïcödé ✓, \"quotes\", \\ and\nnewlines"
                },
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}
                },
                {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0x"}}
            ],
            "name": "ana"
        }),
        json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": "{\"q\": [1, 2.5, -3e-7]}"}
            }],
            "refusal": null,
            "annotations": [],
            "n": 12345678901234567_i64,
            "f": 0.1,
            "nested": {"deep": {"deeper": [true, false, null, {"x": []}]}}
        }),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "42"}),
    ]
}

#[tokio::test]
async fn an_unknown_conversation_is_empty() {
    let server = RedisServer::start();
    let store = open(&server.url());
    assert_eq!(store.load("nobody").await.unwrap(), Vec::<Value>::new());
    assert_eq!(
        raw_int(&server, &["DBSIZE"]).await,
        0,
        "loading created nothing"
    );
}

#[tokio::test]
async fn appended_messages_come_back_in_order_and_unchanged() {
    let server = RedisServer::start();
    let store = open(&server.url());
    let all = messages();
    store.append("c1", &all[..2]).await.unwrap();
    store.append("c1", &all[2..3]).await.unwrap();
    store.append("c1", &[]).await.unwrap();
    store.append("c1", &all[3..]).await.unwrap();
    let loaded = store.load("c1").await.unwrap();
    assert_eq!(loaded, all);
    // Byte for byte, not just equal as values (key order, number formatting).
    let expected: Vec<String> = all.iter().map(Value::to_string).collect();
    let got: Vec<String> = loaded.iter().map(Value::to_string).collect();
    assert_eq!(got, expected);

    // One list per conversation, under the documented key, without expiry when no ttl is set.
    let key = "chatgpt-component:conversation:c1";
    assert_eq!(
        raw_string(&server, &["TYPE", key]).await.as_deref(),
        Some("list")
    );
    assert_eq!(raw_int(&server, &["LLEN", key]).await, 4);
    assert_eq!(raw_int(&server, &["PTTL", key]).await, -1);
    assert_eq!(store.load("c2").await.unwrap(), Vec::<Value>::new());
}

#[tokio::test]
async fn clear_forgets_a_conversation_and_only_that_one() {
    let server = RedisServer::start();
    let store = open(&server.url());
    store.append("a", &messages()).await.unwrap();
    store.append("b", &messages()[..1]).await.unwrap();
    store.replace("a", &[]).await.unwrap();
    assert_eq!(store.load("a").await.unwrap(), Vec::<Value>::new());
    assert_eq!(store.load("b").await.unwrap(), messages()[..1].to_vec());
    store.replace("never-existed", &[]).await.unwrap();
    // A cleared conversation starts afresh.
    store.append("a", &messages()[1..2]).await.unwrap();
    assert_eq!(store.load("a").await.unwrap(), messages()[1..2].to_vec());
}

#[tokio::test]
async fn two_stores_share_one_history() {
    let server = RedisServer::start();
    // Two stores, two connections: two replicas of the gateway.
    let one = open(&server.url());
    let two = open(&server.url());
    let all = messages();
    one.append("shared", &all[..1]).await.unwrap();
    assert_eq!(two.load("shared").await.unwrap(), all[..1].to_vec());
    two.append("shared", &all[1..]).await.unwrap();
    assert_eq!(one.load("shared").await.unwrap(), all);
    one.replace("shared", &[]).await.unwrap();
    assert_eq!(two.load("shared").await.unwrap(), Vec::<Value>::new());
}

#[tokio::test]
async fn with_a_ttl_a_conversation_expires_without_writes() {
    let server = RedisServer::start();
    let store = open(&format!("{}?ttl=1", server.url()));
    let key = "chatgpt-component:conversation:brief";
    store.append("brief", &messages()[..1]).await.unwrap();
    let set = Instant::now();
    let pttl = raw_int(&server, &["PTTL", key]).await;
    assert!(
        (1..=1000).contains(&pttl),
        "PTTL right after an append: {pttl}"
    );
    assert_eq!(store.load("brief").await.unwrap().len(), 1);

    // Gone after about a second without writes (reading does not keep it).
    let deadline = Instant::now() + PATIENCE;
    while !store.load("brief").await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "still there after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lived = set.elapsed();
    assert!(
        lived >= Duration::from_millis(900),
        "expired after only {lived:?}"
    );
    assert_eq!(raw_int(&server, &["EXISTS", key]).await, 0);
}

#[tokio::test]
async fn with_a_ttl_every_append_refreshes_the_expiry() {
    let server = RedisServer::start();
    let store = open(&format!("{}?ttl=1", server.url()));
    let key = "chatgpt-component:conversation:kept";
    store.append("kept", &messages()[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = raw_int(&server, &["PTTL", key]).await;
    assert!(
        (1..=700).contains(&before),
        "PTTL 300 ms after an append: {before}"
    );
    store.append("kept", &messages()[1..2]).await.unwrap();
    let after = raw_int(&server, &["PTTL", key]).await;
    assert!(
        after > before,
        "the append did not refresh the expiry: {before} → {after}"
    );
    assert_eq!(store.load("kept").await.unwrap(), messages()[..2].to_vec());
}

#[tokio::test]
async fn a_lease_waits_for_the_holder_to_release() {
    let server = RedisServer::start();
    let one = open(&server.url());
    let two = open(&server.url());
    let held = within("the first acquire", one.acquire("c", PATIENCE * 6))
        .await
        .unwrap();

    let released = Arc::new(AtomicBool::new(false));
    let waiter = tokio::spawn({
        let two = two.clone();
        let released = released.clone();
        async move {
            let lease = two.acquire("c", PATIENCE * 6).await.unwrap();
            // Taken only once the first holder let go.
            let after_release = released.load(Ordering::SeqCst);
            (lease, after_release)
        }
    });
    // Give the waiter every chance to (wrongly) take the lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the second acquire did not wait");
    released.store(true, Ordering::SeqCst);
    one.release(&held).await.unwrap();

    let (lease, after_release) = within("the second acquire", waiter).await.unwrap();
    assert!(after_release, "the lease was taken while still held");
    assert_ne!(lease.token, held.token);
    assert_eq!(lease.id, "c");
    two.release(&lease).await.unwrap();
    assert_eq!(
        raw_int(&server, &["EXISTS", "chatgpt-component:lock:c"]).await,
        0
    );
}

#[tokio::test]
async fn leases_on_other_conversations_do_not_wait() {
    let server = RedisServer::start();
    let one = open(&server.url());
    let two = open(&server.url());
    let held = one.acquire("x", PATIENCE * 6).await.unwrap();
    // Completes while "x" is still held.
    let other = within("an acquire on another id", two.acquire("y", PATIENCE * 6))
        .await
        .unwrap();
    assert_eq!(other.id, "y");
    assert_eq!(
        raw_string(&server, &["GET", "chatgpt-component:lock:x"]).await,
        Some(held.token.clone())
    );
    two.release(&other).await.unwrap();
    one.release(&held).await.unwrap();
}

#[tokio::test]
async fn a_lease_never_released_lapses_after_its_ttl() {
    let server = RedisServer::start();
    let one = open(&server.url());
    let two = open(&server.url());
    let ttl = Duration::from_millis(300);
    let asked = Instant::now();
    let forgotten = one.acquire("c", ttl).await.unwrap();
    let pttl = raw_int(&server, &["PTTL", "chatgpt-component:lock:c"]).await;
    assert!((1..=300).contains(&pttl), "lock PTTL: {pttl}");

    let lease = within("an acquire after the lapse", two.acquire("c", PATIENCE * 6))
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(290),
        "taken after only {waited:?}"
    );
    assert_ne!(lease.token, forgotten.token);
    two.release(&lease).await.unwrap();
}

#[tokio::test]
async fn a_stale_release_leaves_the_new_holders_lease_alone() {
    let server = RedisServer::start();
    let one = open(&server.url());
    let two = open(&server.url());
    let lock = "chatgpt-component:lock:c";
    let stale = one.acquire("c", Duration::from_millis(300)).await.unwrap();
    let current = within("an acquire after the lapse", two.acquire("c", PATIENCE * 6))
        .await
        .unwrap();

    // The first holder comes back late and releases what it thinks it holds.
    one.release(&stale).await.unwrap();
    assert_eq!(
        raw_string(&server, &["GET", lock]).await,
        Some(current.token.clone()),
        "a stale release deleted the new holder's lease"
    );
    // The lease is still held: a third party waits.
    let three = open(&server.url());
    let waiting = tokio::spawn(async move { three.acquire("c", PATIENCE * 6).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the lease was free after a stale release"
    );

    two.release(&current).await.unwrap();
    let third = within("the third acquire", waiting).await.unwrap();
    assert_eq!(
        raw_string(&server, &["GET", lock]).await,
        Some(third.token.clone())
    );
    // Releasing twice is harmless.
    two.release(&current).await.unwrap();
    assert_eq!(raw_string(&server, &["GET", lock]).await, Some(third.token));
}

#[tokio::test]
async fn concurrent_turns_on_one_conversation_lose_nothing() {
    let server = RedisServer::start();
    let replicas = [open(&server.url()), open(&server.url())];
    let order = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..10)
        .map(|index| {
            let store = replicas[index % 2].clone();
            let order = order.clone();
            tokio::spawn(async move {
                let lease = store.acquire("busy", PATIENCE * 6).await.unwrap();
                let history = store.load("busy").await.unwrap();
                // Widen the window in which an unserialised turn would interleave.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let message = json!({
                    "role": "user",
                    "content": format!("turn {index}"),
                    "index": index,
                    "seen": history.len(),
                });
                store.append("busy", &[message]).await.unwrap();
                order.lock().unwrap().push(index);
                store.release(&lease).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        within("a turn", task).await.unwrap();
    }
    let history = replicas[0].load("busy").await.unwrap();
    assert_eq!(history.len(), 10, "{history:#?}");
    // Each turn saw every turn before it: no two turns read the same history.
    let seen: Vec<u64> = history
        .iter()
        .map(|m| m["seen"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, (0..10).collect::<Vec<u64>>());
    let indexes: Vec<usize> = history
        .iter()
        .map(|m| m["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(indexes, *order.lock().unwrap());
    let mut sorted = indexes.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<usize>>());
    assert_eq!(
        raw_int(&server, &["EXISTS", "chatgpt-component:lock:busy"]).await,
        0
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_quick_error_that_names_the_store() {
    let port = free_port(); // nothing listens there
    let store = open(&format!("redis://:topsecret@127.0.0.1:{port}/2"));
    let started = Instant::now();
    let e = within("load from a closed port", store.load("c"))
        .await
        .unwrap_err();
    let text = e.to_string();
    eprintln!("closed port: {text}");
    assert!(
        text.starts_with(&format!(
            "conversation store: Redis store redis://127.0.0.1:{port}/2: connecting failed ("
        )),
        "{text}"
    );
    assert!(text.contains("check that the server runs"), "{text}");
    assert!(!text.contains("topsecret"), "{text}");
    // Every operation fails the same way; acquiring does not wait for a server that is not there.
    let e = within(
        "acquire on a closed port",
        store.acquire("c", Duration::from_secs(60)),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("Redis store"), "{e}");
    within("append on a closed port", store.append("c", &messages()))
        .await
        .unwrap_err();
    eprintln!(
        "three calls on a closed port failed in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_wrong_password_is_an_error_that_does_not_show_it() {
    let server = RedisServer::start_with(&["--requirepass", "right-pass"]);
    let port = server.port();
    let wrong = open(&format!("redis://:wrong-pass@127.0.0.1:{port}"));
    let e = within("load with a wrong password", wrong.load("c"))
        .await
        .unwrap_err();
    let text = e.to_string();
    eprintln!("wrong password: {text}");
    assert!(
        text.contains(&format!("Redis store redis://127.0.0.1:{port}/0")),
        "{text}"
    );
    assert!(text.contains("password"), "{text}");
    assert!(!text.contains("wrong-pass"), "{text}");

    let none = open(&format!("redis://127.0.0.1:{port}"));
    let e = within("load without a password", none.load("c"))
        .await
        .unwrap_err();
    eprintln!("no password: {e}");
    assert!(e.to_string().contains("password"), "{e}");

    let right = open(&format!("redis://:right-pass@127.0.0.1:{port}"));
    right.append("c", &messages()[..1]).await.unwrap();
    assert_eq!(right.load("c").await.unwrap(), messages()[..1].to_vec());
}

#[tokio::test]
async fn the_store_reconnects_after_the_server_comes_back() {
    let server = RedisServer::start();
    let port = server.port();
    let store = open(&server.url());
    store.append("c", &messages()[..1]).await.unwrap();

    drop(server); // the connection breaks
    let e = within("load while the server is down", store.load("c"))
        .await
        .unwrap_err();
    eprintln!("server down: {e}");
    assert!(e.to_string().contains("Redis store"), "{e}");

    // A new, empty server on the same port: the store connects again by itself.
    let _server = RedisServer::start_on(port, &[]);
    let mut attempts = 0;
    let loaded = loop {
        attempts += 1;
        match within("load after the restart", store.load("c")).await {
            Ok(loaded) => break loaded,
            Err(e) if attempts < 3 => eprintln!("attempt {attempts}: {e}"),
            Err(e) => panic!("no reconnect after {attempts} attempts: {e}"),
        }
    };
    assert_eq!(loaded, Vec::<Value>::new(), "the new server is empty");
    store.append("c", &messages()[..1]).await.unwrap();
    assert_eq!(store.load("c").await.unwrap().len(), 1);
}

#[tokio::test]
async fn foreign_data_under_a_key_is_an_error_that_says_so() {
    let server = RedisServer::start();
    let store = open(&server.url());
    raw(&server, &["SET", "chatgpt-component:conversation:s", "x"]).await;
    let e = store.load("s").await.unwrap_err().to_string();
    eprintln!("not a list: {e}");
    assert!(e.contains("another program uses the prefix"), "{e}");
    store.append("s", &messages()).await.unwrap_err();

    raw(
        &server,
        &[
            "RPUSH",
            "chatgpt-component:conversation:j",
            "{}",
            "not json",
        ],
    )
    .await;
    let e = store.load("j").await.unwrap_err().to_string();
    eprintln!("not JSON: {e}");
    assert!(
        e.contains("entry 1 of chatgpt-component:conversation:j is not a JSON message"),
        "{e}"
    );
    // Clearing is the way out.
    store.replace("j", &[]).await.unwrap();
    assert_eq!(store.load("j").await.unwrap(), Vec::<Value>::new());
}

/// `conversations::open` shares one store per spec in the process, so a store can outlive the
/// runtime it first connected on (each `#[tokio::test]` has its own).
#[test]
fn a_store_works_from_one_runtime_to_the_next() {
    let server = RedisServer::start();
    let store = open(&server.url());
    for round in 0..3 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            store
                .append("c", &[json!({"role": "user", "content": round})])
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        });
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let history = runtime.block_on(store.load("c")).unwrap();
    assert_eq!(history.len(), 3);
}

#[tokio::test]
async fn the_redis_store_keeps_the_store_contract() {
    let server = RedisServer::start();
    store_contract::replace_and_leases("redis", open(&server.url()), open(&server.url())).await;
}
