//! Conversations end to end against the fake OpenAI server on loopback: the library API
//! (`chat::ChatClient`) over the memory and SQLite stores, Send Request with `conversationId`,
//! the gateway routes and the `chat` CLI. (The Redis store has tests of its own.)

mod common;
mod gateway_support;
mod store_contract;

use std::future::Future;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chatgpt_component::chat::{
    ChatClient, ChatMessage, ChatOptions, ChatResponse, Error, ResponseFormat, Role,
};
use chatgpt_component::conversations::memory::MemoryStore;
use chatgpt_component::conversations::sqlite::SqliteStore;
use chatgpt_component::conversations::{self, budget, Store};
use chatgpt_component::credentials;
use chatgpt_component::emit::Outcome;
use chatgpt_component::openai::TransportKind;
use common::{no_env, send, with, API_KEY};
use fake_openai::{ErrorReply, FakeOpenAi, Reply, Script};
use futures_util::StreamExt;
use gateway_support::{eventually, Gateway, TempDir};
use serde_json::{json, Value};

/// How long anything that should finish may take before the test fails (a hang guard).
const PATIENCE: Duration = Duration::from_secs(10);

/// The model `ChatOptions::default()` asks for, and so the one budgets are counted with.
const MODEL: &str = chatgpt_component::chat::DEFAULT_MODEL;

// ---------------------------------------------------------------------------------------------
// Messages as they go over the wire and into the store.

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

fn system(text: &str) -> Value {
    json!({"role": "system", "content": text})
}

/// The fake's default reply.
fn echo(text: &str) -> String {
    format!("echo: {text}")
}

/// Turns answered with the fake's default reply: user, assistant, user, assistant, ...
fn turns(texts: &[&str]) -> Vec<Value> {
    texts
        .iter()
        .flat_map(|text| [user(text), assistant(&echo(text))])
        .collect()
}

fn messages_of(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("a request without messages: {body}"))
}

fn as_json(history: Vec<ChatMessage>) -> Vec<Value> {
    history
        .into_iter()
        .map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": m.content})
        })
        .collect()
}

fn with_system(prompt: &str) -> ChatOptions {
    ChatOptions {
        system_prompt: Some(prompt.into()),
        ..ChatOptions::default()
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    within_limit(PATIENCE, what, future).await
}

async fn within_limit<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// A memory store name no other test uses (`conversations::open` shares stores per spec).
fn unique_memory_spec() -> String {
    format!("memory:{}", uuid::Uuid::new_v4())
}

// ---------------------------------------------------------------------------------------------
// A fake upstream, a store of one kind and a client on both.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Memory,
    Sqlite,
}

/// Scenarios about storage run against each kind.
const KINDS: [Kind; 2] = [Kind::Memory, Kind::Sqlite];

fn client(fake: &FakeOpenAi, store: Arc<dyn Store>) -> ChatClient {
    let cfg = json!({"apiKey": API_KEY, "baseUrl": fake.base_url()});
    let credentials = credentials::resolve(&cfg, &no_env).expect("valid credentials");
    ChatClient::new(credentials, store).with_max_retries(0)
}

struct Setup {
    kind: Kind,
    fake: FakeOpenAi,
    store: Arc<dyn Store>,
    chat: ChatClient,
    /// Holds the SQLite file; removed when the setup is dropped (after the store).
    dir: Arc<TempDir>,
}

impl Setup {
    async fn new(kind: Kind) -> Setup {
        let fake = FakeOpenAi::start().await;
        let dir = TempDir::new();
        let store: Arc<dyn Store> = match kind {
            Kind::Memory => Arc::new(MemoryStore::default()),
            Kind::Sqlite => Arc::new(SqliteStore::open(&db_path(&dir)).expect("open SQLite")),
        };
        let chat = client(&fake, store.clone());
        Setup {
            kind,
            fake,
            store,
            chat,
            dir,
        }
    }

    /// Another client on the same SQLite file through its own connection, as a second process
    /// would have it.
    fn second_sqlite_client(&self) -> ChatClient {
        assert_eq!(self.kind, Kind::Sqlite);
        let store = SqliteStore::open(&db_path(&self.dir)).expect("open SQLite again");
        client(&self.fake, Arc::new(store))
    }

    async fn say(&self, id: &str, text: &str, options: &ChatOptions) -> ChatResponse {
        within("a chat call", self.chat.chat_completion(id, text, options))
            .await
            .unwrap_or_else(|e| panic!("{:?} store: {id}: {text:?} failed: {e}", self.kind))
    }

    fn request_count(&self) -> usize {
        self.fake.chat_requests().len()
    }

    /// The body of the `n`-th chat request.
    fn request(&self, n: usize) -> Value {
        let requests = self.fake.chat_requests();
        let request = requests
            .get(n)
            .unwrap_or_else(|| panic!("{:?} store: no request #{n}", self.kind));
        request.body.clone()
    }

    /// The messages of the `n`-th chat request.
    fn sent(&self, n: usize) -> Vec<Value> {
        messages_of(&self.request(n))
    }

    /// `chat_history` as role/content objects.
    async fn history(&self, id: &str, limit: usize) -> Vec<Value> {
        let history = within("chat_history", self.chat.chat_history(id, limit))
            .await
            .expect("the history can be read");
        as_json(history)
    }

    /// What the store holds, system prompt included.
    async fn stored(&self, id: &str) -> Vec<Value> {
        self.store.load(id).await.expect("the store can be read")
    }
}

fn db_path(dir: &TempDir) -> String {
    dir.path()
        .join("conversations.db")
        .to_str()
        .expect("a UTF-8 temp path")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// The library API.

#[tokio::test(flavor = "multi_thread")]
async fn history_is_carried_across_calls_and_listed_by_chat_history() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        let options = ChatOptions::default();
        let first = t.say("ana", "My name is Ana", &options).await;
        assert!(first.restarted, "{kind:?}: a new id starts a conversation");
        assert_eq!(first.choice, echo("My name is Ana"));
        assert_eq!(first.request_id.as_deref(), Some("req_1"));
        let second = t.say("ana", "What is my name?", &options).await;
        assert!(!second.restarted, "{kind:?}: the second call continues it");

        assert_eq!(t.sent(0), [user("My name is Ana")]);
        assert_eq!(
            t.sent(1),
            [turns(&["My name is Ana"]), vec![user("What is my name?")]].concat(),
            "{kind:?}: the second request carries the first turn"
        );

        let all = turns(&["My name is Ana", "What is my name?"]);
        assert_eq!(t.history("ana", 0).await, all, "{kind:?}");
        assert_eq!(t.history("ana", 1).await, all[3..], "{kind:?}");
        assert_eq!(t.history("ana", 3).await, all[1..], "{kind:?}");
        assert_eq!(t.history("ana", 50).await, all, "{kind:?}");
        assert!(t.history("bob", 0).await.is_empty(), "{kind:?}");

        // Another id is another conversation.
        let other = t.say("bob", "Hi", &options).await;
        assert!(other.restarted, "{kind:?}");
        assert_eq!(t.sent(2), [user("Hi")], "{kind:?}");
        assert_eq!(t.history("ana", 0).await, all, "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_system_prompt_is_stored_first_once_and_a_new_one_replaces_it() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        let brief = with_system("Be brief.");
        t.say("c", "one", &brief).await;
        t.say("c", "two", &brief).await;
        assert_eq!(t.sent(0), [system("Be brief."), user("one")], "{kind:?}");
        assert_eq!(
            t.sent(1),
            [
                vec![system("Be brief.")],
                turns(&["one"]),
                vec![user("two")]
            ]
            .concat(),
            "{kind:?}: the same prompt again is not repeated"
        );

        t.say("c", "three", &with_system("Be verbose.")).await;
        assert_eq!(
            t.sent(2),
            [
                vec![system("Be verbose.")],
                turns(&["one", "two"]),
                vec![user("three")]
            ]
            .concat(),
            "{kind:?}: a different prompt replaces the stored one"
        );

        // No prompt given: the stored one is kept.
        t.say("c", "four", &ChatOptions::default()).await;
        assert_eq!(
            t.sent(3),
            [
                vec![system("Be verbose.")],
                turns(&["one", "two", "three"]),
                vec![user("four")]
            ]
            .concat(),
            "{kind:?}"
        );

        let all = turns(&["one", "two", "three", "four"]);
        assert_eq!(
            t.stored("c").await,
            [vec![system("Be verbose.")], all.clone()].concat(),
            "{kind:?}: one system message, first"
        );
        assert_eq!(t.history("c", 0).await, all, "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_forgets_the_history() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        t.say("c", "one", &with_system("Old rules.")).await;
        t.say("c", "two", &ChatOptions::default()).await;

        let restart = ChatOptions {
            restart: true,
            ..with_system("New rules.")
        };
        let fresh = t.say("c", "fresh start", &restart).await;
        assert!(fresh.restarted, "{kind:?}");
        assert_eq!(
            t.sent(2),
            [system("New rules."), user("fresh start")],
            "{kind:?}: nothing of the old conversation is sent"
        );
        assert_eq!(t.history("c", 0).await, turns(&["fresh start"]), "{kind:?}");

        let next = t.say("c", "more", &ChatOptions::default()).await;
        assert!(!next.restarted, "{kind:?}");
        assert_eq!(
            t.sent(3),
            [
                vec![system("New rules.")],
                turns(&["fresh start"]),
                vec![user("more")]
            ]
            .concat(),
            "{kind:?}"
        );

        // Without a system prompt, a restart forgets the stored one too.
        let bare = ChatOptions {
            restart: true,
            ..ChatOptions::default()
        };
        assert!(t.say("c", "again", &bare).await.restarted, "{kind:?}");
        assert_eq!(t.sent(4), [user("again")], "{kind:?}");
        assert_eq!(t.stored("c").await, turns(&["again"]), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_and_post_prompts_are_sent_around_the_text_but_not_stored() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        let options = ChatOptions {
            pre_prompt: Some("PRE: answer in French.".into()),
            post_prompt: Some("POST: one sentence.".into()),
            ..ChatOptions::default()
        };
        let reply = t.say("c", "Where is Porto?", &options).await;

        let sent = t.sent(0);
        assert_eq!(sent.len(), 1, "{kind:?}: {sent:?}");
        assert_eq!(sent[0]["role"], "user");
        let content = sent[0]["content"].as_str().expect("text content");
        let (pre, text, post) = (
            content.find("PRE: answer in French."),
            content.find("Where is Porto?"),
            content.find("POST: one sentence."),
        );
        assert!(
            content.starts_with("PRE: answer in French.")
                && content.ends_with("POST: one sentence.")
                && pre < text
                && text < post
                && text.is_some(),
            "{kind:?}: pre prompt, text, post prompt in that order: {content:?}"
        );

        // Only the bare text is stored, and so sent again.
        let stored = vec![user("Where is Porto?"), assistant(&reply.choice)];
        assert_eq!(t.history("c", 0).await, stored, "{kind:?}");
        t.say("c", "And Lisbon?", &ChatOptions::default()).await;
        assert_eq!(
            t.sent(1),
            [stored, vec![user("And Lisbon?")]].concat(),
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn history_is_trimmed_to_the_token_budget_oldest_first_but_stored_in_full() {
    const PROMPT: &str = "You are a patient travel assistant.";
    let texts = [
        "First question: what is the weather like in Lisbon in spring?",
        "Second question: how long does the train from Lisbon to Porto take?",
        "Third question: which museums in Porto open on Mondays?",
        "Fourth question: is the tram to Belem worth it?",
        "Fifth question: where can I eat pasteis de nata?",
        "Sixth question: how do I get to the airport?",
        "Seventh question: thanks, anything else?",
    ];
    for kind in KINDS {
        let t = Setup::new(kind).await;
        let budgeted = |budget: usize| ChatOptions {
            token_budget: Some(budget),
            ..with_system(PROMPT)
        };
        let sys = system(PROMPT);
        for text in &texts[..3] {
            t.say("trip", text, &with_system(PROMPT)).await;
        }

        // One token short of everything: the oldest turn goes, question and answer together.
        let new = user(texts[3]);
        let everything = [vec![sys.clone()], turns(&texts[..3]), vec![new.clone()]].concat();
        let budget = budget::tokens(&everything, MODEL) - 1;
        t.say("trip", texts[3], &budgeted(budget)).await;
        let sent = t.sent(3);
        assert_eq!(
            sent,
            [vec![sys.clone()], turns(&texts[1..3]), vec![new]].concat(),
            "{kind:?}: the oldest turn is dropped first"
        );
        assert!(budget::tokens(&sent, MODEL) <= budget, "{kind:?}");

        // A budget whose longest fitting tail starts with an answer: the answer goes too.
        let new = user(texts[4]);
        let tail_from_answer = [
            vec![sys.clone(), assistant(&echo(texts[2]))],
            turns(&texts[3..4]),
            vec![new.clone()],
        ]
        .concat();
        let budget = budget::tokens(&tail_from_answer, MODEL);
        t.say("trip", texts[4], &budgeted(budget)).await;
        let sent = t.sent(4);
        assert_eq!(
            sent,
            [vec![sys.clone()], turns(&texts[3..4]), vec![new]].concat(),
            "{kind:?}: the kept history never starts with an assistant message"
        );
        assert!(budget::tokens(&sent, MODEL) <= budget, "{kind:?}");

        // Room for nothing but the system prompt and the new message.
        let new = user(texts[5]);
        let budget = budget::tokens(&[sys.clone(), new.clone()], MODEL);
        t.say("trip", texts[5], &budgeted(budget)).await;
        assert_eq!(
            t.sent(5),
            [sys.clone(), new],
            "{kind:?}: the system prompt stays"
        );

        // A large budget drops nothing.
        t.say("trip", texts[6], &budgeted(100_000)).await;
        assert_eq!(
            t.sent(6),
            [vec![sys.clone()], turns(&texts[..6]), vec![user(texts[6])]].concat(),
            "{kind:?}"
        );

        // Trimming is about the request only: the store keeps every turn.
        assert_eq!(t.history("trip", 0).await, turns(&texts), "{kind:?}");
        assert_eq!(
            t.stored("trip").await,
            [vec![sys], turns(&texts)].concat(),
            "{kind:?}"
        );
    }
}

/// 8 concurrent calls on one id through `clients` (round robin), each answered after 50 ms.
async fn assert_concurrent_calls_are_serialised(t: &Setup, clients: &[ChatClient]) {
    const CALLS: usize = 8;
    let first_request = t.request_count();
    for _ in 0..CALLS {
        t.fake
            .push(Script::SlowFirstByte(Duration::from_millis(50)));
    }
    let tasks: Vec<_> = (0..CALLS)
        .map(|i| {
            let chat = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                chat.chat_completion("busy", &format!("message {i}"), &ChatOptions::default())
                    .await
            })
        })
        .collect();
    for task in tasks {
        within("a concurrent call", task)
            .await
            .expect("the call does not panic")
            .unwrap_or_else(|e| panic!("{:?} store: a concurrent call failed: {e}", t.kind));
    }

    let history = t.history("busy", 0).await;
    assert_eq!(history.len(), 2 * CALLS, "{:?}: {history:#?}", t.kind);
    for pair in history.chunks(2) {
        let question = pair[0]["content"].as_str().unwrap_or_default();
        assert_eq!(pair[0]["role"], "user", "{:?}: {history:#?}", t.kind);
        assert_eq!(pair[1], assistant(&echo(question)), "{:?}", t.kind);
    }
    let mut asked: Vec<&str> = history
        .iter()
        .step_by(2)
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    asked.sort();
    let expected: Vec<String> = (0..CALLS).map(|i| format!("message {i}")).collect();
    assert_eq!(asked, expected, "{:?}: every call stored once", t.kind);

    // Each request carried exactly the turns stored before it, and its own question.
    let mut lengths = Vec::new();
    for n in first_request..first_request + CALLS {
        let sent = t.sent(n);
        assert_eq!(
            sent[..],
            history[..sent.len()],
            "{:?}: request {n} is the history as it was",
            t.kind
        );
        lengths.push(sent.len());
    }
    lengths.sort();
    assert_eq!(
        lengths,
        (0..CALLS).map(|i| 2 * i + 1).collect::<Vec<_>>(),
        "{:?}",
        t.kind
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_one_id_are_serialised_and_other_ids_do_not_wait() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        assert_concurrent_calls_are_serialised(&t, std::slice::from_ref(&t.chat)).await;

        // A call on another id is not held up by a slow one.
        t.fake
            .push(Script::SlowFirstByte(Duration::from_millis(2000)));
        let before = t.request_count();
        let chat = t.chat.clone();
        let slow = tokio::spawn(async move {
            chat.chat_completion("slow", "take your time", &ChatOptions::default())
                .await
        });
        eventually("the slow call to reach the upstream", || {
            (t.request_count() > before).then_some(())
        })
        .await;
        let fast = within_limit(
            Duration::from_secs(1),
            &format!("{kind:?} store: a call on another id while a slow call runs"),
            t.chat
                .chat_completion("fast", "quick", &ChatOptions::default()),
        )
        .await;
        assert_eq!(fast.expect("the fast call succeeds").choice, echo("quick"));
        assert!(
            !slow.is_finished(),
            "{kind:?}: the slow call is still running"
        );
        within("the slow call", slow)
            .await
            .unwrap()
            .expect("the slow call succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_through_two_sqlite_stores_on_one_file_are_serialised() {
    let t = Setup::new(Kind::Sqlite).await;
    let clients = [t.chat.clone(), t.second_sqlite_client()];
    assert_concurrent_calls_are_serialised(&t, &clients).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_call_leaves_the_history_unchanged_and_releases_the_lease() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        t.say("c", "hello", &ChatOptions::default()).await;
        let before = turns(&["hello"]);
        let options = ChatOptions::default();

        // A permanent error, with OpenAI's fields.
        t.fake.push(Script::Error(ErrorReply::new(
            400,
            "invalid_request_error",
            None,
            "bad",
        )));
        let error = within(
            "a failing call",
            t.chat.chat_completion("c", "rejected", &options),
        )
        .await
        .expect_err("a 400 fails the call");
        match error {
            Error::Api {
                status,
                error_type,
                code,
                message,
                request_id,
                ..
            } => {
                assert_eq!(status, 400, "{kind:?}");
                assert_eq!(error_type.as_deref(), Some("invalid_request_error"));
                assert_eq!(code, None);
                assert_eq!(message, "bad");
                assert_eq!(request_id.as_deref(), Some("req_2"));
            }
            other => panic!("{kind:?}: expected Error::Api, got {other:?}"),
        }
        assert_eq!(t.history("c", 0).await, before, "{kind:?}");

        // Transient errors until the retries run out.
        let retrying = t.chat.clone().with_max_retries(2);
        let sent_before = t.request_count();
        for _ in 0..3 {
            let quick = ErrorReply::server_error().with_header("retry-after-ms", "1");
            t.fake.push(Script::Error(quick));
        }
        let error = within(
            "a retried call",
            retrying.chat_completion("c", "flaky", &options),
        )
        .await
        .expect_err("500 after every retry fails the call");
        assert!(
            matches!(error, Error::Api { status: 500, .. }),
            "{kind:?}: {error:?}"
        );
        assert_eq!(
            t.request_count(),
            sent_before + 3,
            "{kind:?}: 1 + 2 retries"
        );
        assert_eq!(t.history("c", 0).await, before, "{kind:?}");

        // A connection cut mid-answer.
        t.fake.push(Script::CutConnection);
        let error = within("a cut call", t.chat.chat_completion("c", "cut", &options))
            .await
            .expect_err("a cut connection fails the call");
        assert!(
            matches!(
                error,
                Error::Transport {
                    kind: TransportKind::Interrupted,
                    ..
                }
            ),
            "{kind:?}: {error:?}"
        );
        assert_eq!(t.history("c", 0).await, before, "{kind:?}");

        // A refusal is no answer.
        t.fake.push(Script::Reply(Reply {
            content: None,
            refusal: Some("no".into()),
            ..Reply::default()
        }));
        let error = within(
            "a refused call",
            t.chat.chat_completion("c", "refused", &options),
        )
        .await
        .expect_err("a refusal fails the call");
        assert_eq!(error, Error::NoAnswer("no".into()), "{kind:?}");
        assert_eq!(t.history("c", 0).await, before, "{kind:?}");

        // The lease was given back each time, and nothing of the failed calls is sent again.
        let reply = within_limit(
            Duration::from_secs(5),
            &format!("{kind:?} store: the call after the failed ones (the lease must be free)"),
            t.chat.chat_completion("c", "works", &options),
        )
        .await
        .expect("the next call succeeds");
        assert!(!reply.restarted, "{kind:?}");
        let last = t.request_count() - 1;
        assert_eq!(
            t.sent(last),
            [before.clone(), vec![user("works")]].concat(),
            "{kind:?}"
        );
        assert_eq!(
            t.history("c", 0).await,
            turns(&["hello", "works"]),
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_dropped_mid_way_releases_the_lease_and_stores_nothing() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        t.say("c", "hello", &ChatOptions::default()).await;
        t.fake.push(Script::SlowFirstByte(Duration::from_secs(3)));
        let chat = t.chat.clone();
        let abandoned = tokio::spawn(async move {
            chat.chat_completion("c", "abandoned", &ChatOptions::default())
                .await
        });
        eventually("the abandoned call to reach the upstream", || {
            (t.request_count() == 2).then_some(())
        })
        .await;
        // The caller goes away mid-call: its future is dropped.
        abandoned.abort();
        assert!(
            abandoned.await.is_err_and(|e| e.is_cancelled()),
            "{kind:?}: the slow call was cut short"
        );

        let reply = within_limit(
            Duration::from_secs(2),
            &format!("{kind:?} store: the call after the dropped one (the lease must be free)"),
            t.chat.chat_completion("c", "next", &ChatOptions::default()),
        )
        .await
        .expect("the next call succeeds");
        assert_eq!(reply.choice, echo("next"));
        assert_eq!(
            t.history("c", 0).await,
            turns(&["hello", "next"]),
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_stores_the_full_reply_and_a_cut_stream_stores_nothing() {
    for kind in KINDS {
        let t = Setup::new(kind).await;
        let options = ChatOptions::default();
        let text = "one two three four";
        let stream = within(
            "starting a stream",
            t.chat.chat_completion_stream("s", text, &options),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: the stream does not start: {e}"));
        assert!(stream.restarted, "{kind:?}");
        let pieces: Vec<String> = within("the stream", stream.collect::<Vec<_>>())
            .await
            .into_iter()
            .map(|piece| piece.unwrap_or_else(|e| panic!("{kind:?}: a piece failed: {e}")))
            .collect();
        assert!(pieces.len() > 1, "{kind:?}: streamed in pieces: {pieces:?}");
        assert_eq!(pieces.concat(), echo(text), "{kind:?}");
        assert_eq!(t.request(0)["stream"], true, "{kind:?}");
        assert_eq!(t.sent(0), [user(text)], "{kind:?}");
        // Stored by the time the stream ended.
        assert_eq!(t.history("s", 0).await, turns(&[text]), "{kind:?}");

        // A stream cut after the first piece: an error ends it, nothing is stored, and it is
        // not retried (the caller already has part of the text).
        let retrying = t.chat.clone().with_max_retries(2);
        t.fake.push(Script::CutConnection);
        let stream = within(
            "starting a stream",
            retrying.chat_completion_stream("s", "five six seven", &options),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: the stream does not start: {e}"));
        assert!(!stream.restarted, "{kind:?}");
        let items = within("the cut stream", stream.collect::<Vec<_>>()).await;
        let (last, before_last) = items.split_last().expect("the stream says something");
        assert!(
            matches!(last, Err(Error::Transport { .. })),
            "{kind:?}: the stream ends with the failure: {items:?}"
        );
        assert!(before_last.iter().all(Result::is_ok), "{kind:?}: {items:?}");
        assert_eq!(
            t.request_count(),
            2,
            "{kind:?}: no retry after text arrived"
        );
        assert_eq!(
            t.sent(1),
            [turns(&[text]), vec![user("five six seven")]].concat()
        );
        assert_eq!(t.history("s", 0).await, turns(&[text]), "{kind:?}");

        // The lease was released: the conversation goes on.
        let reply = t.say("s", "eight", &options).await;
        assert_eq!(reply.choice, echo("eight"));
        assert_eq!(t.history("s", 0).await, turns(&[text, "eight"]), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn model_names_formats_and_sampling_fields_are_sent_only_as_set() {
    let t = Setup::new(Kind::Memory).await;

    t.say("defaults", "hi", &ChatOptions::default()).await;
    assert_eq!(
        t.request(0),
        json!({"model": MODEL, "messages": [user("hi")]}),
        "default options send only model and messages"
    );

    let alias = ChatOptions {
        model: Some("GPT35Turbo".into()),
        ..ChatOptions::default()
    };
    t.say("alias", "hi", &alias).await;
    assert_eq!(t.request(1)["model"], "gpt-3.5-turbo", "openai-flows name");
    let plain = ChatOptions {
        model: Some("gpt-4.1".into()),
        ..ChatOptions::default()
    };
    t.say("plain", "hi", &plain).await;
    assert_eq!(t.request(2)["model"], "gpt-4.1", "other names as given");

    let json_mode = ChatOptions {
        response_format: Some(ResponseFormat::JsonObject),
        ..ChatOptions::default()
    };
    t.say("json", "hi", &json_mode).await;
    assert_eq!(
        t.request(3)["response_format"],
        json!({"type": "json_object"})
    );

    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let everything = ChatOptions {
        temperature: Some(0.5),
        top_p: Some(0.25),
        stop: Some(vec!["END".into()]),
        max_tokens: Some(64),
        presence_penalty: Some(1.5),
        frequency_penalty: Some(-0.5),
        logit_bias: Some([("50256".to_string(), -100)].into_iter().collect()),
        response_format: Some(ResponseFormat::JsonSchema {
            name: "answer".into(),
            schema: schema.clone(),
            strict: true,
        }),
        ..ChatOptions::default()
    };
    t.say("all", "hi", &everything).await;
    assert_eq!(
        t.request(4),
        json!({
            "model": MODEL,
            "messages": [user("hi")],
            "temperature": 0.5,
            "top_p": 0.25,
            "stop": ["END"],
            "max_completion_tokens": 64,
            "presence_penalty": 1.5,
            "frequency_penalty": -0.5,
            "logit_bias": {"50256": -100},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": true}
            }
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_conversation_ids_are_refused_before_any_request() {
    let t = Setup::new(Kind::Memory).await;
    let options = ChatOptions::default();
    let too_long = "x".repeat(129);
    for id in ["", "a b", too_long.as_str(), "a/b"] {
        let is_id_error = |error: &Error| matches!(error, Error::Config { field, problem } if field == "conversation_id" && !problem.is_empty());
        let error = t
            .chat
            .chat_completion(id, "hi", &options)
            .await
            .expect_err("a bad id fails");
        assert!(is_id_error(&error), "{id:?}: {error:?}");
        let error = t
            .chat
            .chat_completion_stream(id, "hi", &options)
            .await
            .err()
            .expect("a bad id fails the stream");
        assert!(is_id_error(&error), "{id:?}: {error:?}");
        let error = t.chat.chat_history(id, 0).await.expect_err("bad id");
        assert!(is_id_error(&error), "{id:?}: {error:?}");
    }
    assert_eq!(t.request_count(), 0, "nothing was sent");

    // The longest allowed id and the extra characters work.
    for id in [
        "x".repeat(128),
        "whatsapp:+4917612345".into(),
        "ana@example.com#1".into(),
    ] {
        t.say(&id, "hi", &options).await;
    }
    assert_eq!(t.request_count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Send Request with `conversationId`.

fn data_body(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Data(message) => message.body,
        other => panic!("expected data, got {other:?}"),
    }
}

fn reply_text(outcome: Outcome) -> String {
    data_body(outcome)["choices"][0]["message"]["content"]
        .as_str()
        .expect("text content")
        .to_string()
}

/// A Send Request `cfg` for the fake with a memory store of its own; returns it and the spec.
fn send_request_cfg(fake: &FakeOpenAi) -> (Value, String) {
    let spec = unique_memory_spec();
    let cfg = with(common::cfg(fake), json!({"conversationStore": spec}));
    (cfg, spec)
}

async fn load(spec: &str, id: &str) -> Vec<Value> {
    let store = conversations::open(spec).expect("the store is open");
    store.load(id).await.expect("readable")
}

#[tokio::test(flavor = "multi_thread")]
async fn send_request_continues_a_conversation_by_id() {
    let fake = FakeOpenAi::start().await;
    let (cfg, spec) = send_request_cfg(&fake);
    let body = |system_prompt: &str, text: &str, extra: Value| {
        let messages = json!([system(system_prompt), user(text)]);
        with(json!({"messages": messages}), extra)
    };

    let first = send(
        &cfg,
        body("Be brief.", "Hi", json!({"conversationId": "c1"})),
    )
    .await;
    assert_eq!(reply_text(first), echo("Hi"));
    let second = send(
        &cfg,
        body(
            "Be kind.",
            "Again",
            json!({"conversationId": "c1", "restartConversation": false, "conversationTokenBudget": 100000}),
        ),
    )
    .await;
    assert_eq!(reply_text(second), echo("Again"));
    let requests = fake.chat_requests();
    assert_eq!(
        messages_of(&requests[0].body),
        [system("Be brief."), user("Hi")]
    );
    assert_eq!(
        messages_of(&requests[1].body),
        [
            vec![system("Be kind.")],
            turns(&["Hi"]),
            vec![user("Again")]
        ]
        .concat(),
        "the first turn is carried, and the new system message replaced the stored one"
    );
    assert_eq!(
        load(&spec, "c1").await,
        [vec![system("Be kind.")], turns(&["Hi", "Again"])].concat()
    );

    // The budget field trims like the library's.
    let new = [system("Be kind."), user("Short?")];
    let budget = budget::tokens(&new, "gpt-4o-mini");
    let third = send(
        &cfg,
        body(
            "Be kind.",
            "Short?",
            json!({"conversationId": "c1", "conversationTokenBudget": budget}),
        ),
    )
    .await;
    assert_eq!(reply_text(third), echo("Short?"));
    assert_eq!(messages_of(&fake.chat_requests()[2].body), new);

    // A failure stores nothing.
    fake.push(Script::Error(ErrorReply::new(
        400,
        "invalid_request_error",
        None,
        "bad",
    )));
    let failed = send(
        &cfg,
        body("Be kind.", "Fails", json!({"conversationId": "c1"})),
    )
    .await;
    assert!(matches!(failed, Outcome::Error(_)), "{failed:?}");
    let kept = [vec![system("Be kind.")], turns(&["Hi", "Again", "Short?"])].concat();
    assert_eq!(load(&spec, "c1").await, kept);

    // Restart forgets.
    let restarted = send(
        &cfg,
        body(
            "Be kind.",
            "New topic",
            json!({"conversationId": "c1", "restartConversation": true}),
        ),
    )
    .await;
    assert_eq!(reply_text(restarted), echo("New topic"));
    let last = fake.chat_requests().len() - 1;
    assert_eq!(
        messages_of(&fake.chat_requests()[last].body),
        [system("Be kind."), user("New topic")]
    );

    // The conversation fields never reach OpenAI.
    for request in fake.chat_requests() {
        for field in [
            "conversationId",
            "restartConversation",
            "conversationTokenBudget",
        ] {
            assert!(request.body.get(field).is_none(), "{field} was sent");
        }
    }

    // An unusable id is a validation error naming the field, before any request.
    let sent = fake.chat_requests().len();
    let outcome = send(
        &cfg,
        body("Be kind.", "Hi", json!({"conversationId": "a b"})),
    )
    .await;
    let Outcome::Error(error) = outcome else {
        panic!("expected an error, got {outcome:?}");
    };
    assert_eq!(error.name, "ValidationError");
    let pointers: Vec<&str> = error.details["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(|v| v["pointer"].as_str())
        .collect();
    assert_eq!(pointers, ["/conversationId"], "{error:?}");
    assert_eq!(fake.chat_requests().len(), sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_request_does_not_store_an_answer_without_content() {
    let fake = FakeOpenAi::start().await;
    let (cfg, _spec) = send_request_cfg(&fake);
    let ask = |text: &str| json!({"messages": [user(text)], "conversationId": "c1"});
    send(&cfg, ask("Hi")).await;
    fake.push(Script::Reply(Reply {
        content: None,
        refusal: Some("I can't help with that.".into()),
        ..Reply::default()
    }));
    let refused = send(&cfg, ask("Something I should not ask")).await;
    assert!(matches!(refused, Outcome::Data(_)), "{refused:?}");
    send(&cfg, ask("Something else")).await;

    // OpenAI: an assistant message needs `content` unless it has `tool_calls`.
    let sent = messages_of(&fake.chat_requests()[2].body);
    for message in &sent {
        if message["role"] == "assistant" {
            assert!(
                message["content"].is_string() || message.get("tool_calls").is_some(),
                "an assistant message OpenAI rejects was sent: {message}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway.

#[tokio::test(flavor = "multi_thread")]
async fn gateway_routes_continue_conversations() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({"conversation_store": unique_memory_spec()})).await;
    let vanus = |text: &str| {
        gw.prompt_request(text, Some("sync"))
            .header("conversation-id", "c1")
    };

    let reply = gw.send(vanus("My name is Ana")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["content"], echo("My name is Ana"));
    let reply = gw.send(vanus("What is my name?")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["content"], echo("What is my name?"));
    let requests = fake.chat_requests();
    assert_eq!(messages_of(&requests[0].body), [user("My name is Ana")]);
    assert_eq!(
        messages_of(&requests[1].body),
        [turns(&["My name is Ana"]), vec![user("What is my name?")]].concat()
    );

    // The same conversation named by the JSON key.
    let reply = gw
        .send(
            gw.post("/")
                .header("process-mode", "sync")
                .json(&json!({"message": "And now?", "conversationId": "c1"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        messages_of(&fake.chat_requests()[2].body),
        [
            turns(&["My name is Ana", "What is my name?"]),
            vec![user("And now?")]
        ]
        .concat()
    );

    // Glific, with the contact id as a number.
    let glific = |text: &str| json!({"question_text": text, "conversation_id": 42});
    let reply = gw
        .post_json("/glific/parse_via_chat_gpt", glific("Hola"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"success": true, "parsed_msg": echo("Hola")})
    );
    let reply = gw
        .post_json("/glific/parse_via_chat_gpt", glific("Adios"))
        .await;
    assert_eq!(reply.json()["parsed_msg"], echo("Adios"), "{}", reply.text);
    let requests = fake.chat_requests();
    assert_eq!(messages_of(&requests[3].body), [user("Hola")]);
    assert_eq!(
        messages_of(&requests[4].body),
        [turns(&["Hola"]), vec![user("Adios")]].concat(),
        "conversation 42 is its own"
    );
    assert!(!gw.transcript().contains(API_KEY));
    gw.finish().await;
}

// ---------------------------------------------------------------------------------------------
// The `chat` CLI.

/// Runs the binary off the async runtime (the fake keeps serving), at trace level, and checks
/// the key appears in none of its output.
async fn cli_chat(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"))
            .arg("chat")
            .args(&args)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("CONVERSATION_STORE")
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .output()
            .expect("the binary runs");
        for stream in [&output.stdout, &output.stderr] {
            assert!(
                !String::from_utf8_lossy(stream).contains(API_KEY),
                "the API key leaked from `chat {args:?}`"
            );
        }
        output
    })
    .await
    .expect("the runner does not panic")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 stdout")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_chat_keeps_a_conversation_in_a_sqlite_file() {
    let fake = FakeOpenAi::start().await;
    let dir = TempDir::new();
    let store = db_path(&dir);
    let cfg = json!({"apiKey": API_KEY, "baseUrl": fake.base_url()}).to_string();
    let args = |extra: &[&str], text: &str| -> Vec<String> {
        let base = [
            "--conversation",
            "c1",
            "--store",
            store.as_str(),
            "--cfg",
            cfg.as_str(),
        ];
        base.iter()
            .chain(extra)
            .chain([&text])
            .map(|s| s.to_string())
            .collect()
    };

    let out = cli_chat(args(&[], "My name is Ana")).await;
    assert_eq!(stdout_of(&out), format!("{}\n", echo("My name is Ana")));
    let out = cli_chat(args(&[], "What is my name?")).await;
    assert_eq!(stdout_of(&out), format!("{}\n", echo("What is my name?")));
    let requests = fake.chat_requests();
    assert_eq!(messages_of(&requests[0].body), [user("My name is Ana")]);
    assert_eq!(
        messages_of(&requests[1].body),
        [turns(&["My name is Ana"]), vec![user("What is my name?")]].concat(),
        "the second process read the first one's turn from the file"
    );

    let out = cli_chat(args(&["--stream"], "Tell me more")).await;
    assert_eq!(stdout_of(&out), format!("{}\n", echo("Tell me more")));
    let streamed = &fake.chat_requests()[2].body;
    assert_eq!(streamed["stream"], true);
    assert_eq!(
        messages_of(streamed),
        [
            turns(&["My name is Ana", "What is my name?"]),
            vec![user("Tell me more")]
        ]
        .concat()
    );

    let out = cli_chat(args(&["--restart"], "Start over")).await;
    assert_eq!(stdout_of(&out), format!("{}\n", echo("Start over")));
    assert_eq!(
        messages_of(&fake.chat_requests()[3].body),
        [user("Start over")]
    );
    let stored = SqliteStore::open(&store)
        .expect("the file opens")
        .load("c1")
        .await
        .expect("readable");
    assert_eq!(stored, turns(&["Start over"]));
}

/// The store contract (replace, lease renewal) on memory, and on SQLite through two handles on
/// one file, as two processes would.
#[tokio::test]
async fn memory_and_sqlite_stores_keep_the_store_contract() {
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::default());
    store_contract::replace_and_leases("memory", memory.clone(), memory).await;
    let dir = TempDir::new();
    let path = db_path(&dir);
    let one: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let two: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    store_contract::replace_and_leases("sqlite", one, two).await;
}
