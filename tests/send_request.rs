//! Send Request against the fake OpenAI server over loopback: what we send, what we emit, and
//! every retry rule.

mod common;

use std::time::{Duration, Instant};

use chatgpt_component::component::{validate::Schema, Component, Direction};
use chatgpt_component::emit::{Event, Outcome};
use common::*;
use fake_openai::{ErrorReply, FakeOpenAi, Reply, Script, ToolCall};
use serde_json::{json, Value};

fn data(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Data(message) => message.body,
        other => panic!("expected data, got {other:?}"),
    }
}

fn out_schema() -> Schema {
    Schema::compile(
        &Component::embedded()
            .schema("sendRequest", Direction::Out)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn sends_the_model_headers_and_only_the_fields_set() {
    let fake = FakeOpenAi::start().await;
    let cfg = with(
        cfg(&fake),
        json!({"organization": "org-acme", "project": "proj_42"}),
    );
    let body = json!({
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
            ]}
        ],
        "max_completion_tokens": 200,
        "temperature": null,
        "response_format": {"type": "json_object"},
        "metadata": {"flow": "f1"}
    });
    data(send(&cfg, body).await);
    let requests = fake.chat_requests();
    assert_eq!(requests.len(), 1);
    insta::assert_json_snapshot!("chat_request", wire(&requests[0]), {
        ".headers.authorization" => "[redacted]",
        ".headers[\"user-agent\"]" => "[version]",
    });
    assert_eq!(
        requests[0].headers["authorization"],
        format!("Bearer {API_KEY}")
    );
}

#[tokio::test]
async fn azure_style_sends_api_key_and_api_version() {
    let fake = FakeOpenAi::start().await;
    let base = format!("http://{}/openai/deployments/gpt4o", fake.addr());
    let cfg = json!({"apiKey": API_KEY, "baseUrl": base, "authStyle": "azure", "apiVersion": "2024-10-21", "customModel": "gpt4o"});
    data(send(&cfg, hello()).await);
    let request = &fake.chat_requests()[0];
    assert_eq!(request.path, "/openai/deployments/gpt4o/chat/completions");
    assert_eq!(request.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(request.headers["api-key"], API_KEY);
    assert!(!request.headers.contains_key("authorization"));
}

#[tokio::test]
async fn emits_the_completion_as_the_message_body() {
    let fake = FakeOpenAi::start().await;
    let outcome = send(&cfg(&fake), hello()).await;
    let event = Event::from(outcome);
    insta::assert_json_snapshot!("data_event", event, {".message.id" => "[uuid]"});
    let Event::Data { message } = event else {
        unreachable!()
    };
    out_schema().check(&message.body).unwrap();
}

#[tokio::test]
async fn json_output_is_also_given_parsed() {
    let fake = FakeOpenAi::start().await;
    fake.push(Script::Reply(Reply {
        content: Some(r#"{"city":"Paris","population":2102650}"#.into()),
        ..Reply::default()
    }));
    let body = with(hello(), json!({"response_format": {"type": "json_object"}}));
    let out = data(send(&cfg(&fake), body).await);
    assert_eq!(
        out["choices"][0]["message"]["parsed"],
        json!({"city": "Paris", "population": 2102650})
    );
    out_schema().check(&out).unwrap();
}

/// The body of a streamed answer equals the plain one, except the completion id.
#[tokio::test]
async fn a_streamed_answer_is_emitted_like_a_plain_one() {
    let fake = FakeOpenAi::start().await;
    let tool = Reply {
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris","unit":"c"}"#.into(),
        }],
        ..Reply::default()
    };
    for (label, script, body) in [
        ("text", None, with(hello(), json!({"n": 2}))),
        ("tool calls", Some(tool), hello()),
    ] {
        let mut answers = Vec::new();
        for stream in [false, true] {
            if let Some(reply) = &script {
                fake.push(Script::Reply(reply.clone()));
            }
            let mut body = body.clone();
            body["stream"] = json!(stream);
            let mut out = data(send(&cfg(&fake), body).await);
            out_schema().check(&out).unwrap();
            out.as_object_mut().unwrap().remove("id");
            answers.push(out);
        }
        assert_eq!(answers[0], answers[1], "{label}");
        assert!(
            answers[1]["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{label}"
        );
    }
    let streamed = &fake.chat_requests()[1];
    assert_eq!(
        streamed.body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(streamed.headers["accept"], "text/event-stream");
}

/// One case of the retry table: scripts to play, retries allowed, expected requests and outcome.
async fn case(scripts: Vec<Script>, max_retries: u32) -> (usize, Outcome) {
    let fake = FakeOpenAi::start().await;
    for script in scripts {
        fake.push(script);
    }
    let cfg = with(cfg(&fake), json!({"maxRetries": max_retries}));
    let outcome = send(&cfg, hello()).await;
    (fake.chat_requests().len(), outcome)
}

#[tokio::test]
async fn retries_rate_limits_conflicts_timeouts_and_server_errors() {
    let status = |code: u16, t: &str| Script::Error(ErrorReply::new(code, t, None, "try again"));
    for (label, script) in [
        ("429", Script::Error(ErrorReply::rate_limited_ms(5))),
        ("408", status(408, "timeout")),
        ("409", status(409, "conflict")),
        ("500", Script::Error(ErrorReply::server_error())),
        ("503", Script::Error(ErrorReply::overloaded())),
        (
            "x-should-retry true on 400",
            Script::Error(
                ErrorReply::bad_request("messages", "odd").with_header("x-should-retry", "true"),
            ),
        ),
        ("cut connection", Script::CutConnection),
    ] {
        let (requests, outcome) = case(vec![script], 2).await;
        assert_eq!((requests, kind(&outcome)), (2, "data"), "{label}");
    }
}

#[tokio::test]
async fn never_retries_what_cannot_succeed() {
    for (label, reply, expected) in [
        (
            "insufficient_quota",
            ErrorReply::insufficient_quota(),
            "error",
        ),
        (
            "400",
            ErrorReply::bad_request("temperature", "Invalid type for 'temperature'"),
            "error",
        ),
        ("401", ErrorReply::invalid_api_key(), "error"),
        ("403", ErrorReply::permission_denied(), "error"),
        ("404", ErrorReply::model_not_found("gpt-4o-mini"), "error"),
        (
            "422",
            ErrorReply::new(422, "invalid_request_error", None, "unprocessable"),
            "error",
        ),
        (
            "x-should-retry false on 500",
            ErrorReply::server_error().with_header("x-should-retry", "false"),
            "error",
        ),
        // Longer than the in-process cap: hand the message back to the platform at once.
        (
            "retry-after 121 s",
            ErrorReply::rate_limited("121"),
            "rebound",
        ),
    ] {
        let (requests, outcome) = case(vec![Script::Error(reply)], 2).await;
        assert_eq!((requests, kind(&outcome)), (1, expected), "{label}");
    }
    let (requests, outcome) = case(vec![Script::MalformedJson], 2).await;
    assert_eq!((requests, kind(&outcome)), (1, "error"), "malformed JSON");
}

#[tokio::test]
async fn exhausted_rate_limits_and_server_errors_become_rebounds() {
    let (requests, outcome) = case(vec![Script::Error(ErrorReply::rate_limited_ms(1)); 3], 2).await;
    assert_eq!(requests, 3);
    let Outcome::Rebound(reason) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(reason.details["status"], 429);
    assert_eq!(reason.details["code"], "rate_limit_exceeded");
    assert!(reason.details["requestId"]
        .as_str()
        .unwrap()
        .starts_with("req_"));

    let (requests, outcome) = case(vec![Script::Error(ErrorReply::overloaded()); 2], 1).await;
    assert_eq!((requests, kind(&outcome)), (2, "rebound"));

    let unreachable = json!({"apiKey": API_KEY, "baseUrl": "http://127.0.0.1:1/v1", "model": "m", "maxRetries": 1});
    assert_eq!(kind(&send(&unreachable, hello()).await), "rebound");
}

#[tokio::test]
async fn honours_retry_after() {
    let started = Instant::now();
    let (requests, outcome) = case(vec![Script::Error(ErrorReply::rate_limited_ms(300))], 1).await;
    assert_eq!((requests, kind(&outcome)), (2, "data"));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited only {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_timeout_cuts_a_silent_server_but_not_a_stream_that_keeps_talking() {
    let fake = FakeOpenAi::start().await;
    let cfg = with(
        cfg(&fake),
        json!({"requestTimeout": "0.3", "maxRetries": 0}),
    );

    fake.push(Script::SlowFirstByte(Duration::from_secs(3)));
    let Outcome::Error(error) = send(&cfg, hello()).await else {
        panic!("expected a timeout error")
    };
    assert_eq!(error.details["transport"], "timeout");
    assert!(
        error.message.contains("requestTimeout"),
        "{}",
        error.message
    );

    // Each event arrives within the timeout, the whole answer takes longer: not cut.
    fake.push(Script::SlowTrickle(Duration::from_millis(100)));
    let started = Instant::now();
    let body = with(hello(), json!({"stream": true}));
    let out = data(send(&cfg, body).await);
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "the trickle was too short to prove anything"
    );
    assert_eq!(out["choices"][0]["message"]["content"], "echo: Hello there");

    // The same trickle without streaming exceeds the whole-request timeout.
    fake.push(Script::SlowTrickle(Duration::from_millis(150)));
    assert_eq!(kind(&send(&cfg, hello()).await), "error");
}

#[tokio::test]
async fn a_cut_stream_is_retried_and_an_error_inside_a_stream_is_reported() {
    let body = with(hello(), json!({"stream": true}));
    let fake = FakeOpenAi::start().await;
    fake.push(Script::CutConnection);
    let out = data(send(&cfg(&fake), body.clone()).await);
    assert_eq!(out["choices"][0]["message"]["content"], "echo: Hello there");
    assert_eq!(fake.chat_requests().len(), 2);

    let fake = FakeOpenAi::start().await;
    fake.push(Script::ErrorMidStream(ErrorReply::server_error()));
    let Outcome::Error(error) = send(&cfg(&fake), body).await else {
        panic!("expected an error")
    };
    assert_eq!(fake.chat_requests().len(), 1);
    assert!(
        error.message.contains("The server had an error"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn error_events_say_what_happened_and_what_to_do() {
    let fake = FakeOpenAi::start().await;
    fake.push(Script::Error(ErrorReply::insufficient_quota()));
    fake.push(Script::Error(ErrorReply::invalid_api_key()));
    let cfg = cfg(&fake);
    let quota = Event::from(send(&cfg, hello()).await);
    let auth = Event::from(send(&cfg, hello()).await);
    let invalid = Event::from(
        send(
            &cfg,
            json!({"messages": [], "temperature": 3, "stop": ["a", "b", "c", "d", "e"]}),
        )
        .await,
    );
    let no_key = Event::from(send(&json!({"model": "gpt-4o"}), hello()).await);
    let no_model = Event::from(send(&json!({"apiKey": API_KEY}), hello()).await);
    insta::assert_json_snapshot!("error_events", [quota, auth, invalid, no_key, no_model], {
        "[].error.details.requestId" => "[request id]",
        "[].error.message" => insta::dynamic_redaction(|value, _| {
            // Request ids vary; everything else in the text is reviewed in the snapshot.
            let text = value.as_str().unwrap().to_string();
            match text.find(" (request id ") {
                Some(at) => format!("{} (request id [id])", &text[..at]),
                None => text,
            }
        }),
    });
}
