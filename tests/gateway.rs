//! The HTTP gateway over loopback: `gateway::serve` in-process, the fake OpenAI upstream, and a
//! CloudEvents receiver that parses every delivery with cloudevents-sdk.

mod common;
mod gateway_support;

use std::time::Duration;

use chrono::Utc;
use cloudevents::AttributesReader;
use common::API_KEY;
use fake_openai::{ErrorReply, FakeOpenAi, Reply, Script};
use gateway_support::*;
use serde_json::{json, Value};

const SYNC: Option<&str> = Some("sync");
const ASYNC: Option<&str> = Some("async");
const DEFAULT_SOURCE: &str = "vanus-chatGPT-source";
const DEFAULT_TYPE: &str = "vanus-chatGPT-type";
const DAILY_NOTICE: &str =
    "You've reached the daily limit (2/day). Your quota will be restored tomorrow.";

fn reply_content(text: &str) -> Script {
    Script::Reply(Reply {
        content: Some(text.into()),
        ..Reply::default()
    })
}

fn upstream_401() -> Script {
    Script::Error(ErrorReply::new(
        401,
        "invalid_request_error",
        Some("invalid_api_key"),
        "Incorrect API key provided: sk-...abcd.",
    ))
}

/// The id of an accepted asynchronous `POST /`.
fn accepted_id(reply: &HttpReply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["id"].as_str().expect("an id").to_string()
}

// --- POST / (Vanus) ---

#[tokio::test]
async fn async_text_prompt_is_delivered_as_a_structured_cloudevent() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let mut gw = Gateway::start(&fake, json!({"target": receiver.url(), "model": "gpt-4.1"})).await;
    let before = Utc::now();
    let reply = gw.prompt("What is a CloudEvent?", None).await;
    let after = Utc::now();
    let id = accepted_id(&reply);
    uuid::Uuid::parse_str(&id).expect("the id is a UUID");

    let received = receiver.wait_for_id(&id).await;
    assert_eq!(received.content_type, "application/cloudevents+json");
    let event = &received.event;
    assert_eq!(event.specversion().as_str(), "1.0");
    assert_eq!(event.source().as_str(), DEFAULT_SOURCE);
    assert_eq!(event.ty(), DEFAULT_TYPE);
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let time = *event.time().expect("time is set");
    let slack = chrono::TimeDelta::seconds(1);
    assert!(
        time >= before - slack && time <= after + slack,
        "{time} not within {before}..{after}"
    );
    assert_eq!(
        received.data,
        json!({"content": "echo: What is a CloudEvent?"})
    );

    let requests = fake.chat_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].body["model"], "gpt-4.1");
    assert_eq!(
        requests[0].body["messages"],
        json!([{"role": "user", "content": "What is a CloudEvent?"}])
    );
    gw.stop().await;
    assert_eq!(receiver.events().len(), 1, "delivered exactly once");
}

#[tokio::test]
async fn vanus_source_and_type_headers_override_the_defaults_in_any_case() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(&fake, json!({"target": receiver.url()})).await;

    let reply = gw
        .send(
            gw.prompt_request("first", None)
                .header("Vanus-Source", "https://example.com/app")
                .header("VANUS-TYPE", "com.example.answer"),
        )
        .await;
    let first = receiver.wait_for_id(&accepted_id(&reply)).await;
    assert_eq!(first.event.source().as_str(), "https://example.com/app");
    assert_eq!(first.event.ty(), "com.example.answer");

    // Header names spelled on the wire exactly as written.
    let body = "second";
    let (status, text) = raw_http(
        gw.addr,
        &format!(
            "POST / HTTP/1.1\r\nHost: gateway\r\nContent-Type: text/plain\r\nVANUS-SOURCE: raw-source\r\nvAnUs-TyPe: raw.type\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let id = serde_json::from_str::<Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = receiver.wait_for_id(&id).await;
    assert_eq!(second.event.source().as_str(), "raw-source");
    assert_eq!(second.event.ty(), "raw.type");
    assert_eq!(second.data["content"], "echo: second");
    gw.finish().await;
}

/// CloudEvents requires a non-empty source and type: a blank override is no override, in async
/// and in sync mode.
#[tokio::test]
async fn blank_vanus_source_and_type_headers_fall_back_to_the_defaults() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(&fake, json!({"target": receiver.url()})).await;
    for mode in [None, SYNC] {
        let reply = gw
            .send(
                gw.prompt_request("blank", mode)
                    .header("vanus-source", "")
                    .header("vanus-type", " "),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        if mode.is_some() {
            assert_eq!(reply.json(), json!({"content": "echo: blank"}));
        }
    }
    for received in receiver.wait_for(2).await {
        assert_eq!(received.event.source().as_str(), DEFAULT_SOURCE);
        assert_eq!(received.event.ty(), DEFAULT_TYPE);
    }
    gw.finish().await;
}

#[tokio::test]
async fn json_body_takes_the_prompt_from_message_and_carries_other_keys_into_data() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(&fake, json!({"target": receiver.url()})).await;
    let reply = gw
        .send(
            gw.post("/")
                .header("content-type", "application/json; charset=utf-8")
                .body(r#"{"message": "Tell me a joke", "user": "u1", "chat": {"id": 7}}"#),
        )
        .await;
    let received = receiver.wait_for_id(&accepted_id(&reply)).await;
    assert_eq!(
        received.data,
        json!({"content": "echo: Tell me a joke", "user": "u1", "chat": {"id": 7}})
    );
    let requests = fake.chat_requests();
    assert_eq!(
        requests[0].body["messages"],
        json!([{"role": "user", "content": "Tell me a joke"}])
    );
    gw.finish().await;
}

#[tokio::test]
async fn system_prompt_and_max_tokens_shape_the_upstream_request() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(
        &fake,
        json!({"system_prompt": "Answer in French.", "max_tokens": 50}),
    )
    .await;
    assert_eq!(gw.prompt("Hello", SYNC).await.status, 200);
    let requests = fake.chat_requests();
    let body = &requests[0].body;
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"}
        ])
    );
    assert_eq!(body["max_completion_tokens"], 50);
    assert!(body.get("max_tokens").is_none());
    gw.finish().await;
}

#[tokio::test]
async fn binary_event_mode_sends_ce_headers_and_the_data_as_body() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "event_mode": "binary"}),
    )
    .await;
    let id = accepted_id(&gw.prompt("binary please", None).await);
    let received = receiver.wait_for_id(&id).await;
    assert!(
        received.content_type.starts_with("application/json"),
        "{}",
        received.content_type
    );
    let header = |name: &str| received.headers[name].to_str().unwrap().to_string();
    assert_eq!(header("ce-specversion"), "1.0");
    assert_eq!(header("ce-id"), id);
    assert_eq!(header("ce-source"), DEFAULT_SOURCE);
    assert_eq!(header("ce-type"), DEFAULT_TYPE);
    assert!(received.headers.contains_key("ce-time"));
    let body: Value = serde_json::from_slice(&received.body).expect("the body is the data");
    assert_eq!(body, json!({"content": "echo: binary please"}));
    assert_eq!(received.data, body);
    assert_eq!(received.event.id(), id);
    gw.finish().await;
}

#[tokio::test]
async fn sync_mode_replies_with_the_data_and_still_delivers_the_event() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(&fake, json!({"target": receiver.url()})).await;
    let reply = gw.prompt("in sync", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"content": "echo: in sync"}));
    let events = receiver.wait_for(1).await;
    assert_eq!(events[0].data, json!({"content": "echo: in sync"}));
    assert_eq!(events[0].content_type, "application/cloudevents+json");
    gw.finish().await;
}

#[tokio::test]
async fn without_a_target_sync_works_and_async_is_refused_naming_target() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    let reply = gw.prompt("no target", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"content": "echo: no target"}));

    for mode in [None, ASYNC] {
        let reply = gw.prompt("nowhere to go", mode).await;
        assert_eq!(reply.status, 400, "{}", reply.text);
        let body = reply.json();
        assert_eq!(body["status"], 400);
        assert!(body["msg"].as_str().unwrap().contains("`target`"), "{body}");
    }
    let reply = gw.prompt("when?", Some("later")).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.json()["msg"]
        .as_str()
        .unwrap()
        .contains("Process-Mode"));
    assert_eq!(fake.chat_requests().len(), 1, "only the sync call went out");
    gw.finish().await;

    // `default_process_mode: sync` makes the header optional.
    let gw = Gateway::start(&fake, json!({"default_process_mode": "sync"})).await;
    let reply = gw.prompt("sync by default", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"content": "echo: sync by default"}));
    gw.finish().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_with_a_reason_and_never_reach_upstream() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let mut gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "max_body_bytes": 1024}),
    )
    .await;
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        ("text/plain", Vec::new(), 400, "empty"),
        ("text/plain", vec![0xff, 0xfe], 400, "UTF-8"),
        ("text/plain", vec![b'a'; 2000], 413, "max_body_bytes"),
        ("application/json", b"{\"message\":".to_vec(), 400, "JSON"),
        (
            "application/json",
            b"{\"msg\": \"hi\"}".to_vec(),
            400,
            "/message",
        ),
    ];
    for (content_type, body, status, needle) in cases {
        for mode in [None, SYNC] {
            let mut request = gw
                .post("/")
                .header("content-type", content_type)
                .body(body.clone());
            if let Some(mode) = mode {
                request = request.header("process-mode", mode);
            }
            let reply = gw.send(request).await;
            assert_eq!(
                reply.status, status,
                "{content_type} {body:?}: {}",
                reply.text
            );
            let json = reply.json();
            let mut keys: Vec<&str> = json
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            assert_eq!(keys, ["msg", "status"], "{json}");
            assert_eq!(json["status"], status);
            assert!(json["msg"].as_str().unwrap().contains(needle), "{json}");
        }
    }
    // The other routes honour the limit too.
    let big = "q".repeat(2000);
    let reply = gw
        .post_json("/glific/parse_via_chat_gpt", json!({"question_text": big}))
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text);
    assert_eq!(reply.json()["success"], false);

    gw.stop().await;
    assert!(fake.chat_requests().is_empty());
    assert_eq!(receiver.requests(), 0);
}

// --- daily limit ---

#[tokio::test]
async fn daily_limit_counts_successes_only_and_resets_at_utc_midnight() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let clock = TestClock::at("2026-03-10T23:59:00Z");
    let gw = Gateway::start_with(
        &fake,
        json!({"target": receiver.url(), "everyday_limit": 2}),
        clock.clock(),
        TempDir::new(),
    )
    .await;

    // Failures do not count: a permanent error, then a transient one that outlasts retries.
    fake.push(Script::Error(ErrorReply::bad_request("messages", "bad")));
    assert_eq!(gw.prompt("refused upstream", SYNC).await.status, 502);
    for _ in 0..3 {
        fake.push(Script::Error(ErrorReply::server_error()));
    }
    let reply = gw.prompt("overloaded", SYNC).await;
    assert_eq!(reply.status, 503, "{}", reply.text);
    assert_eq!(reply.header("retry-after"), Some("5"));
    for n in 1..=2 {
        let reply = gw.prompt(&format!("call {n}"), SYNC).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let upstream_calls = fake.chat_requests().len();

    let refused = gw.prompt("one too many", SYNC).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.header("retry-after"), Some("60"), "until 00:00 UTC");
    let body = refused.json();
    assert_eq!(body["content"], DAILY_NOTICE);
    assert!(
        body["msg"].as_str().unwrap().contains("daily limit"),
        "{body}"
    );

    let id = accepted_id(&gw.prompt("async, one too many", None).await);
    let event = receiver.wait_for_id(&id).await;
    assert_eq!(event.data["content"], DAILY_NOTICE);
    assert_eq!(event.data["error"]["name"], "DailyLimitReached");
    assert_eq!(*event.event.time().unwrap(), clock.now());
    assert_eq!(
        fake.chat_requests().len(),
        upstream_calls,
        "no upstream call"
    );
    assert_eq!(
        gw.metric("chatgpt_gateway_daily_limit_refusals_total")
            .await,
        2.0
    );

    clock.set("2026-03-11T00:00:01Z");
    let reply = gw.prompt("a new day", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["content"], "echo: a new day");
    gw.finish().await;
}

#[tokio::test]
async fn daily_count_survives_a_restart_on_the_same_day() {
    let fake = FakeOpenAi::start().await;
    let clock = TestClock::at("2026-05-01T12:00:00Z");
    let dir = TempDir::new();
    let keys = json!({"everyday_limit": 1});
    let mut gw = Gateway::start_with(&fake, keys.clone(), clock.clock(), dir.clone()).await;
    assert_eq!(gw.prompt("first", SYNC).await.status, 200);
    assert_eq!(gw.prompt("second", SYNC).await.status, 429);
    gw.stop().await;
    assert!(dir.path().join("daily-usage.json").exists());

    let mut gw = Gateway::start_with(&fake, keys.clone(), clock.clock(), dir.clone()).await;
    let reply = gw.prompt("after restart", SYNC).await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert!(reply.header("retry-after").is_some());
    gw.stop().await;
    assert_eq!(fake.chat_requests().len(), 1);

    clock.set("2026-05-02T00:00:00Z");
    let gw = Gateway::start_with(&fake, keys, clock.clock(), dir).await;
    assert_eq!(gw.prompt("next day", SYNC).await.status, 200);
    gw.finish().await;
}

// --- queue ---

#[tokio::test]
async fn a_full_queue_refuses_with_429_and_retry_after() {
    let fake = FakeOpenAi::start().await;
    fake.push(Script::SlowFirstByte(Duration::from_millis(800)));
    fake.push(Script::SlowFirstByte(Duration::from_millis(800)));
    let gw = Gateway::start(&fake, json!({"concurrency": 1, "queue_size": 1})).await;

    let running = tokio::spawn(gw.prompt_request("running", SYNC).send());
    gw.wait_metric("chatgpt_gateway_upstream_in_flight", |v| v == 1.0)
        .await;
    let waiting = tokio::spawn(gw.prompt_request("waiting", SYNC).send());
    gw.wait_metric("chatgpt_gateway_queue_depth", |v| v == 1.0)
        .await;

    let refused = gw.prompt("no room", SYNC).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["status"], 429);
    let generic = gw
        .post_json(
            "/actions/sendRequest",
            json!({"msg": {"body": {"messages": [{"role": "user", "content": "no room"}]}}}),
        )
        .await;
    assert_eq!(generic.status, 429, "{}", generic.text);
    assert!(generic.header("retry-after").is_some());

    for task in [running, waiting] {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(fake.chat_requests().len(), 2);
    assert_eq!(
        gw.metric("chatgpt_gateway_queue_full_rejections_total")
            .await,
        2.0
    );
    // Room again once the queue drained.
    assert_eq!(gw.prompt("room", SYNC).await.status, 200);
    gw.finish().await;
}

#[tokio::test]
async fn gauges_return_to_zero_when_sync_callers_disconnect() {
    let fake = FakeOpenAi::start().await;
    fake.push(Script::SlowFirstByte(Duration::from_millis(1000)));
    fake.push(Script::SlowFirstByte(Duration::from_millis(1000)));
    let gw = Gateway::start(&fake, json!({"concurrency": 1})).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let request = |text: &str| {
        impatient
            .post(gw.url("/"))
            .header("process-mode", "sync")
            .body(text.to_string())
            .send()
    };
    let (in_flight, queued) = tokio::join!(request("in flight"), request("queued"));
    assert!(
        in_flight.is_err() && queued.is_err(),
        "both callers gave up"
    );
    let reply = gw.prompt("patient", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "chatgpt_gateway_upstream_in_flight"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "chatgpt_gateway_queue_depth"),
        Some(0.0),
        "{metrics}"
    );
    gw.finish().await;
}

// --- delivery ---

#[tokio::test]
async fn delivery_retries_until_the_target_answers_2xx() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    receiver.fail_next(2);
    let mut gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "send_event_attempts": 5, "send_event_backoff_ms": 100}),
    )
    .await;
    let id = accepted_id(&gw.prompt("retry me", None).await);
    let received = receiver.wait_for_id(&id).await;
    assert_eq!(received.data["content"], "echo: retry me");
    assert_eq!(receiver.requests(), 3, "two 500s, then the delivery");
    assert_eq!(
        gw.metric(r#"chatgpt_gateway_deliveries_total{result="retried"}"#)
            .await,
        2.0
    );
    gw.wait_metric(
        r#"chatgpt_gateway_deliveries_total{result="delivered"}"#,
        |v| v == 1.0,
    )
    .await;
    gw.stop().await;
    let events = receiver.events();
    assert_eq!(events.len(), 1, "delivered exactly once");
    assert_eq!(events[0].event.id(), id);
    assert!(gw.dead_letters().is_empty());
}

#[tokio::test]
async fn delivery_retries_while_the_target_is_not_listening_yet() {
    let fake = FakeOpenAi::start().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut gw = Gateway::start(
        &fake,
        json!({"target": format!("http://{addr}/events"), "send_event_attempts": 6, "send_event_backoff_ms": 100}),
    )
    .await;
    let id = accepted_id(&gw.prompt("anyone there?", None).await);
    gw.wait_metric(
        r#"chatgpt_gateway_deliveries_total{result="retried"}"#,
        |v| v >= 1.0,
    )
    .await;
    let receiver = Receiver::start_on(addr).await;
    let received = receiver.wait_for_id(&id).await;
    assert_eq!(received.data["content"], "echo: anyone there?");
    gw.stop().await;
    assert_eq!(receiver.events().len(), 1);
    assert!(gw.dead_letters().is_empty());
}

#[tokio::test]
async fn an_undeliverable_event_is_written_to_the_dead_letter_directory() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    receiver.fail_always(true);
    let gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "send_event_attempts": 2}),
    )
    .await;
    let id = accepted_id(&gw.prompt("lost?", None).await);
    let letters = eventually("a dead letter", || {
        let letters = gw.dead_letters();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["event"]["id"], id.as_str());
    assert_eq!(letter["event"]["data"], json!({"content": "echo: lost?"}));
    assert_eq!(letter["event"]["source"], DEFAULT_SOURCE);
    assert_eq!(letter["target"], receiver.url());
    assert_eq!(letter["attempts"], 2);
    assert!(
        letter["error"].as_str().unwrap().contains("500"),
        "{letter}"
    );
    assert_eq!(receiver.requests(), 2);
    assert!(receiver.events().is_empty());
    assert_eq!(gw.metric("chatgpt_gateway_dead_letters_total").await, 1.0);
    assert_eq!(
        gw.metric(r#"chatgpt_gateway_deliveries_total{result="failed"}"#)
            .await,
        1.0
    );
    gw.finish().await;
}

#[tokio::test]
async fn shutdown_stops_endless_delivery_retries_and_dead_letters_the_event() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    receiver.fail_always(true);
    let mut gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "send_event_attempts": 0, "send_event_backoff_ms": 50}),
    )
    .await;
    let id = accepted_id(&gw.prompt("never delivered", None).await);
    gw.wait_metric(
        r#"chatgpt_gateway_deliveries_total{result="retried"}"#,
        |v| v >= 2.0,
    )
    .await;
    let took = gw.stop().await;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "shutdown took {took:?} with a 2 s grace"
    );
    let letters = gw.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["event"]["id"], id.as_str());
    assert!(
        letters[0]["error"].as_str().unwrap().contains("shutdown"),
        "{}",
        letters[0]
    );
    assert!(receiver.events().is_empty());
}

// --- Glific ---

const GLIFIC: &str = "/glific/parse_via_chat_gpt";

#[tokio::test]
async fn glific_answers_with_parsed_msg_from_system_and_user_messages() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    let reply = gw
        .post_json(
            GLIFIC,
            json!({"question_text": "Is it raining?", "prompt": "sys", "gpt_model": "gpt-4.1", "flow_id": 3}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"success": true, "parsed_msg": "echo: Is it raining?"})
    );
    let requests = fake.chat_requests();
    let request = &requests[0].body;
    assert_eq!(request["model"], "gpt-4.1");
    assert_eq!(request["temperature"], 0);
    assert_eq!(
        request["messages"],
        json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Is it raining?"}
        ])
    );
    assert!(request.get("response_format").is_none());

    for (content, parsed) in [(r#"{"a": 1}"#, json!({"a": 1})), ("42", json!(42))] {
        fake.push(reply_content(content));
        let reply = gw.post_json(GLIFIC, json!({"question_text": "q"})).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json(), json!({"success": true, "parsed_msg": parsed}));
    }

    let reply = gw
        .post_json(
            GLIFIC,
            json!({"question_text": "q", "model": "gpt-4o", "gpt_model": "gpt-4.1", "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let requests = fake.chat_requests();
    let request = &requests.last().unwrap().body;
    assert_eq!(request["model"], "gpt-4o", "model wins over gpt_model");
    assert_eq!(request["response_format"], json!({"type": "json_object"}));
    gw.finish().await;
}

#[tokio::test]
async fn glific_refuses_bad_fields_without_calling_upstream() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    for (body, error) in [
        (
            json!({"question_text": "q", "response_format": {"type": "text"}}),
            "response_format type should be json_schema or json_object",
        ),
        (json!({"question_text": ""}), "question_text is empty"),
        (json!({"prompt": "sys"}), "question_text is empty"),
    ] {
        let reply = gw.post_json(GLIFIC, body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text);
        assert_eq!(reply.json(), json!({"success": false, "error": error}));
    }
    assert!(fake.chat_requests().is_empty());
    gw.finish().await;
}

#[tokio::test]
async fn glific_reports_upstream_failures_as_unsuccessful() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    fake.push(upstream_401());
    let reply = gw.post_json(GLIFIC, json!({"question_text": "q"})).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["success"], false);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("401") && error.contains("API key"),
        "{error}"
    );

    fake.push(Script::Reply(Reply {
        content: None,
        refusal: Some("I cannot help with that.".into()),
        ..Reply::default()
    }));
    let reply = gw.post_json(GLIFIC, json!({"question_text": "q"})).await;
    assert!(!(200..300).contains(&reply.status), "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["success"], false);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("I cannot help with that."),
        "{body}"
    );
    assert_eq!(
        gw.metric(r#"chatgpt_gateway_upstream_calls_total{status="401"}"#)
            .await,
        1.0
    );
    gw.finish().await;
}

// --- POST /actions/{action} ---

const SEND_REQUEST: &str = "/actions/sendRequest";

fn generic_msg(text: &str) -> Value {
    json!({"body": {"messages": [{"role": "user", "content": text}]}})
}

#[tokio::test]
async fn generic_action_returns_the_data_event_then_end() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({"model": "gpt-4o"})).await;
    let reply = gw
        .post_json(SEND_REQUEST, json!({"msg": generic_msg("hello generic")}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let events = reply.json();
    let events = events.as_array().expect("an array of events");
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["event"], "data");
    assert_eq!(
        events[0]["message"]["body"]["choices"][0]["message"]["content"],
        "echo: hello generic"
    );
    assert_eq!(events[1], json!({"event": "end"}));
    let requests = fake.chat_requests();
    assert_eq!(requests[0].body["model"], "gpt-4o");
    assert_eq!(
        requests[0].headers["authorization"],
        format!("Bearer {API_KEY}")
    );

    let reply = gw
        .post_json("/actions/noSuchAction", json!({"msg": generic_msg("x")}))
        .await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    assert_eq!(reply.json()[0]["event"], "error");
    gw.finish().await;
}

#[tokio::test]
async fn generic_action_refuses_invalid_messages_naming_the_field() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    let reply = gw
        .post_json(SEND_REQUEST, json!({"msg": {"body": {"temperature": 1}}}))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let events = reply.json();
    assert_eq!(events[0]["event"], "error");
    assert_eq!(events[0]["error"]["name"], "ValidationError");
    assert!(
        events[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/messages"),
        "{events}"
    );
    assert_eq!(events[1], json!({"event": "end"}));
    assert!(fake.chat_requests().is_empty());
    gw.finish().await;
}

#[tokio::test]
async fn generic_action_never_sends_the_server_key_to_a_caller_chosen_endpoint() {
    let fake = FakeOpenAi::start().await;
    let elsewhere = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    for (key, value) in [
        ("baseUrl", json!(elsewhere.base_url())),
        ("authStyle", json!("azure")),
        ("apiVersion", json!("2024-10-21")),
    ] {
        let reply = gw
            .post_json(
                SEND_REQUEST,
                json!({"cfg": {key: value}, "msg": generic_msg("steal")}),
            )
            .await;
        assert_eq!(reply.status, 400, "{key}: {}", reply.text);
        let events = reply.json();
        let message = events[0]["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(&format!("/cfg/{key}")), "{message}");
        assert_eq!(events[1], json!({"event": "end"}));
    }
    assert!(
        elsewhere.requests().is_empty(),
        "nothing reached the other server"
    );
    assert!(fake.requests().is_empty());

    // With its own key, the caller may point it anywhere.
    let reply = gw
        .post_json(
            SEND_REQUEST,
            json!({"cfg": {"apiKey": "sk-caller-own-key", "baseUrl": elsewhere.base_url()}, "msg": generic_msg("mine")}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let requests = elsewhere.chat_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].headers["authorization"],
        "Bearer sk-caller-own-key"
    );
    assert!(fake.requests().is_empty());
    gw.finish().await;
}

// --- auth ---

#[tokio::test]
async fn bearer_auth_protects_the_api_but_not_health_or_metrics() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({"auth_token": "gw-token-123"})).await;
    for request in [
        gw.prompt_request("no auth", SYNC),
        gw.prompt_request("wrong", SYNC).bearer_auth("gw-token-124"),
        gw.post(GLIFIC).json(&json!({"question_text": "q"})),
        gw.post(SEND_REQUEST)
            .json(&json!({"msg": generic_msg("x")})),
    ] {
        let reply = gw.send(request).await;
        assert_eq!(reply.status, 401, "{}", reply.text);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert_eq!(reply.json()["status"], 401);
    }
    assert!(fake.chat_requests().is_empty());

    let reply = gw
        .send(
            gw.prompt_request("authorized", SYNC)
                .bearer_auth("gw-token-123"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["content"], "echo: authorized");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(gw.send(gw.get(path)).await.status, 200, "{path}");
    }
    gw.finish().await;
}

#[tokio::test]
async fn basic_auth_checks_user_and_password_and_no_auth_lets_requests_pass() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(
        &fake,
        json!({"auth_username": "alice", "auth_password": "s3cret"}),
    )
    .await;
    let reply = gw
        .send(
            gw.prompt_request("basic", SYNC)
                .basic_auth("alice", Some("s3cret")),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for request in [
        gw.prompt_request("wrong", SYNC)
            .basic_auth("alice", Some("s3cret!")),
        gw.prompt_request("who", SYNC)
            .basic_auth("bob", Some("s3cret")),
        gw.prompt_request("none", SYNC),
    ] {
        let reply = gw.send(request).await;
        assert_eq!(reply.status, 401, "{}", reply.text);
        assert!(reply
            .header("www-authenticate")
            .is_some_and(|c| c.starts_with("Basic")));
    }
    assert_eq!(fake.chat_requests().len(), 1);
    gw.finish().await;

    let open = Gateway::start(&fake, json!({})).await;
    let reply = open.prompt("open", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    open.finish().await;
}

#[tokio::test]
async fn auth_schemes_are_case_insensitive() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({"auth_token": "gw-token-123"})).await;
    let reply = gw
        .send(
            gw.prompt_request("lower-case scheme", SYNC)
                .header("authorization", "bearer gw-token-123"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    gw.finish().await;

    let gw = Gateway::start(
        &fake,
        json!({"auth_username": "alice", "auth_password": "s3cret"}),
    )
    .await;
    let reply = gw
        .send(
            gw.prompt_request("upper-case scheme", SYNC)
                .header("authorization", "BASIC YWxpY2U6czNjcmV0"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    gw.finish().await;
}

// --- operations ---

#[tokio::test]
async fn health_readiness_and_metrics_describe_the_gateway() {
    let fake = FakeOpenAi::start().await;
    let gw = Gateway::start(&fake, json!({})).await;
    let health = gw.send(gw.get("/healthz")).await;
    assert_eq!((health.status, health.text.as_str()), (200, "ok"));
    assert_eq!(gw.send(gw.get("/readyz")).await.status, 200);
    assert_eq!(gw.prompt("count me", SYNC).await.status, 200);
    let missing = gw.send(gw.get("/nowhere")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["status"], 404);

    let response = gw.send(gw.get("/metrics")).await;
    assert!(response
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = response.text;
    for (series, expected) in [
        (
            r#"chatgpt_gateway_requests_total{route="/",status="200"}"#,
            1.0,
        ),
        (
            r#"chatgpt_gateway_requests_total{route="/healthz",status="200"}"#,
            1.0,
        ),
        (r#"chatgpt_gateway_upstream_calls_total{status="200"}"#, 1.0),
        (
            r#"chatgpt_gateway_request_duration_seconds_count{route="/"}"#,
            1.0,
        ),
    ] {
        assert_eq!(
            metric_value(&text, series),
            Some(expected),
            "{series}\n{text}"
        );
    }
    for kind in ["prompt", "completion"] {
        let series = format!(r#"chatgpt_gateway_tokens_total{{kind="{kind}"}}"#);
        assert!(
            metric_value(&text, &series).is_some_and(|n| n > 0.0),
            "{series}\n{text}"
        );
    }
    gw.finish().await;
}

#[tokio::test]
async fn shutdown_waits_until_queued_answers_are_delivered() {
    let fake = FakeOpenAi::start().await;
    fake.push(Script::SlowFirstByte(Duration::from_millis(500)));
    let receiver = Receiver::start().await;
    let mut gw = Gateway::start(&fake, json!({"target": receiver.url()})).await;
    let id = accepted_id(&gw.prompt("slow answer", None).await);
    let took = gw.stop().await;
    // serve() has returned: the answer must already be at the receiver.
    let events = receiver.events();
    assert_eq!(events.len(), 1, "nothing lost at shutdown");
    assert_eq!(events[0].event.id(), id);
    assert_eq!(events[0].data["content"], "echo: slow answer");
    assert!(took >= Duration::from_millis(300), "stopped after {took:?}");
    assert!(gw.dead_letters().is_empty());
}

// --- secrets ---

#[tokio::test]
async fn the_api_key_never_appears_in_replies_events_or_files() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let mut gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "send_event_attempts": 1}),
    )
    .await;
    // An upstream that echoes the key it was given.
    let echo = || {
        Script::Error(ErrorReply::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            &format!("Incorrect API key provided: {API_KEY}."),
        ))
    };

    accepted_id(&gw.prompt("fine, async", None).await);
    assert_eq!(gw.prompt("fine, sync", SYNC).await.status, 200);
    fake.push(echo());
    assert_eq!(gw.prompt("echo, sync", SYNC).await.status, 502);
    fake.push(echo());
    accepted_id(&gw.prompt("echo, async", None).await);
    receiver.wait_for(4).await;

    assert_eq!(
        gw.post_json(GLIFIC, json!({"question_text": "fine"}))
            .await
            .status,
        200
    );
    fake.push(echo());
    assert_eq!(
        gw.post_json(GLIFIC, json!({"question_text": "echo"}))
            .await
            .status,
        502
    );
    assert_eq!(
        gw.post_json(SEND_REQUEST, json!({"msg": generic_msg("fine")}))
            .await
            .status,
        200
    );
    fake.push(echo());
    assert_eq!(
        gw.post_json(SEND_REQUEST, json!({"msg": generic_msg("echo")}))
            .await
            .status,
        502
    );

    receiver.fail_always(true);
    fake.push(echo());
    accepted_id(&gw.prompt("echo, dead-lettered", None).await);
    eventually("a dead letter", || {
        (!gw.dead_letters().is_empty()).then_some(())
    })
    .await;
    for path in ["/metrics", "/healthz", "/readyz", "/nowhere"] {
        gw.send(gw.get(path)).await;
    }
    gw.stop().await;

    let requests = fake.chat_requests();
    assert_eq!(requests.len(), 9);
    assert!(
        requests
            .iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {API_KEY}")),
        "the canary key is the one in use"
    );
    let everything = format!(
        "{}\n{}\n{}",
        gw.transcript(),
        receiver.raw_text(),
        gw.files_text()
    );
    assert!(
        everything.contains("Incorrect API key provided: ***"),
        "the echoed, scrubbed error was seen: {everything}"
    );
    assert!(!everything.contains(API_KEY), "{everything}");
    assert!(!everything.contains("CANARY"), "{everything}");
}

// --- Wire formats (snapshots) ---

/// What goes over the wire, frozen: the structured CloudEvent as the target receives it, the
/// binary mode's headers, the upstream request `POST /` and Glific send, and the replies.
#[tokio::test]
async fn wire_formats_are_stable() {
    let fake = FakeOpenAi::start().await;
    let receiver = Receiver::start().await;
    let gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "system_prompt": "Be brief.", "max_tokens": 256}),
    )
    .await;
    let reply = gw
        .send(
            gw.post("/")
                .header("content-type", "application/json")
                .header("process-mode", "sync")
                .body(r#"{"message": "Hello", "ticket": 7}"#),
        )
        .await;
    let structured = receiver.wait_for(1).await.remove(0);
    let event: Value = serde_json::from_slice(&structured.body).unwrap();
    insta::assert_json_snapshot!("gateway_structured_event", event, {
        ".id" => "[uuid]",
        ".time" => "[time]",
    });
    insta::assert_json_snapshot!("gateway_vanus_sync_reply", reply.json());
    insta::assert_json_snapshot!("gateway_vanus_upstream_request", common::wire(&fake.chat_requests()[0]), {
        ".headers.authorization" => "[redacted]",
    });
    fake.push(reply_content(r#"{"ok": true, "items": [1, 2]}"#));
    let glific = gw
        .post_json(
            GLIFIC,
            json!({"question_text": "Is it ok?", "prompt": "Reply in JSON", "gpt_model": "gpt-4o", "response_format": {"type": "json_object"}, "organization_id": 1}),
        )
        .await;
    insta::assert_json_snapshot!("gateway_glific_reply", glific.json());
    insta::assert_json_snapshot!(
        "gateway_glific_upstream_request",
        fake.chat_requests()[1].body
    );
    gw.finish().await;

    let receiver = Receiver::start().await;
    let gw = Gateway::start(
        &fake,
        json!({"target": receiver.url(), "event_mode": "binary"}),
    )
    .await;
    let reply = gw.prompt("Hi", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let binary = receiver.wait_for(1).await.remove(0);
    let headers: std::collections::BTreeMap<_, _> = binary
        .headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("ce-") || *name == "content-type")
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    insta::assert_json_snapshot!("gateway_binary_event_headers", headers, {
        "[\"ce-id\"]" => "[uuid]",
        "[\"ce-time\"]" => "[time]",
    });
    assert_eq!(
        serde_json::from_slice::<Value>(&binary.body).unwrap(),
        json!({"content": "echo: Hi"})
    );
    gw.finish().await;
}

/// With `shutdown_delay`, a stopping gateway says it is not ready but keeps serving for that
/// long (load balancers take it out first), then stops.
#[tokio::test]
async fn shutdown_delay_keeps_serving_while_not_ready() {
    let fake = FakeOpenAi::start().await;
    let mut gw = Gateway::start(&fake, json!({"shutdown_delay": 1.0})).await;
    assert_eq!(gw.send(gw.get("/readyz")).await.status, 200);
    gw.signal_stop();
    let ready = gw.send(gw.get("/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    let reply = gw.prompt("still there?", SYNC).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let took = gw.stop().await;
    assert!(took >= Duration::from_millis(500), "stopped after {took:?}");
}
