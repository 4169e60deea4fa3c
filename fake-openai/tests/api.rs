//! Drives the fake over real HTTP with reqwest, the way the component's client does.

use std::time::{Duration, Instant};

use fake_openai::{ErrorReply, FakeOpenAi, Options, Reply, Script, ToolCall};
use futures_util::StreamExt;
use serde_json::{json, Value};

const KEY: &str = "sk-test-key-0000";

fn chat_body() -> Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hello there"},
        ],
    })
}

async fn post(server: &FakeOpenAi, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads a whole SSE body into its `data:` payloads.
async fn events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect(e).to_string())
        .collect()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

#[tokio::test]
async fn default_reply_has_openai_shape_and_headers() {
    let server = FakeOpenAi::start().await;
    let response = post(&server, &chat_body()).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "x-request-id").starts_with("req_"));
    assert_eq!(header(&response, "openai-version"), "2020-10-01");
    header(&response, "openai-processing-ms");
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "10000");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "9999");
    header(&response, "x-ratelimit-limit-tokens");
    header(&response, "x-ratelimit-remaining-tokens");
    assert_eq!(header(&response, "x-ratelimit-reset-requests"), "6ms");
    assert_eq!(header(&response, "x-ratelimit-reset-tokens"), "1s");
    assert_eq!(header(&response, "content-type"), "application/json");

    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-fake-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["created"], 1_700_000_000);
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["system_fingerprint"], "fp_fake");
    assert_eq!(body["service_tier"], "default");
    assert_eq!(
        body["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello there", "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop",
        }])
    );
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 7);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[tokio::test]
async fn n_choices_and_array_content() {
    let server = FakeOpenAi::start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "n": 3,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            {"type": "text", "text": "here"},
        ]}],
    });
    let reply: Value = post(&server, &body).await.json().await.unwrap();
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index);
        assert_eq!(choice["message"]["content"], "echo: look here");
    }
}

#[tokio::test]
async fn request_ids_are_unique() {
    let server = FakeOpenAi::start().await;
    let a = post(&server, &chat_body()).await;
    let b = post(&server, &chat_body()).await;
    assert_ne!(header(&a, "x-request-id"), header(&b, "x-request-id"));
}

#[tokio::test]
async fn stream_ends_with_usage_chunk_and_done() {
    let server = FakeOpenAi::start().await;
    let mut body = streaming(chat_body());
    body["stream_options"] = json!({"include_usage": true});
    let response = post(&server, &body).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    let events = events(response).await;
    assert_eq!(events.last().unwrap(), "[DONE]");

    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let id = first["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["model"] == "gpt-4o"));

    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"], 7);
    let content_chunks = &chunks[..chunks.len() - 1];
    assert!(content_chunks.iter().all(|c| c["usage"].is_null()));

    let text: String = content_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: hello there");
    let finish = content_chunks.last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let server = FakeOpenAi::start().await;
    let events = events(post(&server, &streaming(chat_body())).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 1));
}

fn weather_calls() -> Reply {
    Reply {
        tool_calls: vec![
            ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris","unit":"c"}"#.into(),
            },
            ToolCall {
                id: "call_2".into(),
                name: "get_time".into(),
                arguments: r#"{"tz":"Europe/Paris"}"#.into(),
            },
        ],
        ..Reply::default()
    }
}

#[tokio::test]
async fn tool_calls_stream_in_fragments() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Reply(weather_calls()));
    let mut body = streaming(chat_body());
    body["n"] = json!(2);
    let events = events(post(&server, &body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");

    // Assemble per (choice, tool-call index) the way a client must.
    let mut calls: std::collections::BTreeMap<(u64, u64), (String, String, String)> =
        Default::default();
    let mut finishes = Vec::new();
    let mut choice_order = Vec::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        let choice_index = choice["index"].as_u64().unwrap();
        choice_order.push(choice_index);
        if let Some(reason) = choice["finish_reason"].as_str() {
            finishes.push((choice_index, reason.to_string()));
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let entry = calls
                .entry((choice_index, call["index"].as_u64().unwrap()))
                .or_default();
            if let Some(id) = call["id"].as_str() {
                assert_eq!(call["type"], "function");
                assert_eq!(call["function"]["arguments"], "");
                entry.0 = id.to_string();
                entry.1 = call["function"]["name"].as_str().unwrap().to_string();
            } else {
                assert!(call.get("type").is_none() && call["function"].get("name").is_none());
            }
            entry.2 += call["function"]["arguments"].as_str().unwrap();
        }
    }
    assert_eq!(&choice_order[..4], [0, 1, 0, 1], "choices are interleaved");
    for choice in 0..2 {
        assert_eq!(
            calls[&(choice, 0)],
            (
                "call_1".into(),
                "get_weather".into(),
                r#"{"city":"Paris","unit":"c"}"#.into()
            )
        );
        assert_eq!(calls[&(choice, 1)].2, r#"{"tz":"Europe/Paris"}"#);
    }
    assert_eq!(
        finishes,
        [(0, "tool_calls".to_string()), (1, "tool_calls".to_string())]
    );
}

#[tokio::test]
async fn tool_calls_non_stream() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Reply(weather_calls()));
    let body: Value = post(&server, &chat_body()).await.json().await.unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    assert_eq!(
        choice["message"]["tool_calls"][0],
        json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": r#"{"city":"Paris","unit":"c"}"#}})
    );
}

#[tokio::test]
async fn refusal_and_custom_finish_reason() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Reply(Reply {
        refusal: Some("I can't help with that.".into()),
        finish_reason: Some("content_filter".into()),
        ..Reply::default()
    }));
    let body: Value = post(&server, &chat_body()).await.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["refusal"],
        "I can't help with that."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
}

#[tokio::test]
async fn error_constructors_send_status_body_and_headers() {
    let cases: Vec<(ErrorReply, u16, &str, Option<&str>)> = vec![
        (
            ErrorReply::rate_limited("20"),
            429,
            "requests",
            Some("rate_limit_exceeded"),
        ),
        (
            ErrorReply::rate_limited_ms(250),
            429,
            "requests",
            Some("rate_limit_exceeded"),
        ),
        (
            ErrorReply::insufficient_quota(),
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
        (ErrorReply::server_error(), 500, "server_error", None),
        (
            ErrorReply::overloaded(),
            503,
            "server_error",
            Some("server_is_overloaded"),
        ),
        (
            ErrorReply::invalid_api_key(),
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        (
            ErrorReply::permission_denied(),
            403,
            "request_forbidden",
            Some("unsupported_country_region_territory"),
        ),
        (
            ErrorReply::model_not_found("gpt-9"),
            404,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        (
            ErrorReply::bad_request("temperature", "bad temperature"),
            400,
            "invalid_request_error",
            None,
        ),
    ];
    let server = FakeOpenAi::start().await;
    for (error, ..) in &cases {
        server.push(Script::Error(error.clone()));
    }
    for (error, status, error_type, code) in &cases {
        let response = post(&server, &chat_body()).await;
        assert_eq!(response.status().as_u16(), *status, "{error:?}");
        let headers = response.headers().clone();
        assert!(headers.contains_key("x-request-id"));
        for (name, value) in &error.headers {
            assert_eq!(headers[name.as_str()], value.as_str(), "{name}");
        }
        let body: Value = response.json().await.unwrap();
        let object = body["error"].as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["code", "message", "param", "type"]);
        assert_eq!(body["error"]["type"], *error_type);
        assert_eq!(body["error"]["code"], json!(code));
        assert_eq!(body["error"]["message"], error.message);
    }

    let limited = ErrorReply::rate_limited("20");
    assert!(limited.message.contains("Please try again in 20s."));
    let names: Vec<&str> = limited.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"retry-after"));
    assert!(limited
        .headers
        .contains(&("x-ratelimit-remaining-requests".into(), "0".into())));
    let limited_ms = ErrorReply::rate_limited_ms(250);
    assert!(limited_ms
        .headers
        .contains(&("retry-after-ms".into(), "250".into())));
    assert_eq!(
        ErrorReply::model_not_found("gpt-9").message,
        "The model `gpt-9` does not exist or you do not have access to it."
    );
    assert_eq!(
        ErrorReply::bad_request("temperature", "x").param.as_deref(),
        Some("temperature")
    );
    assert!(ErrorReply::invalid_api_key().message.contains("sk-...abcd"));
}

#[tokio::test]
async fn custom_error_with_header_and_param() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Error(
        ErrorReply::new(418, "teapot_error", Some("teapot"), "short and stout")
            .with_param("spout")
            .with_header("x-custom", "yes"),
    ));
    let response = post(&server, &chat_body()).await;
    assert_eq!(response.status(), 418);
    assert_eq!(header(&response, "x-custom"), "yes");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"message": "short and stout", "type": "teapot_error", "param": "spout", "code": "teapot"}})
    );
}

#[tokio::test]
async fn missing_key_is_rejected_on_every_route() {
    let server = FakeOpenAi::start().await;
    let client = reqwest::Client::new();
    let chat = client
        .post(format!("{}/chat/completions", server.base_url()))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    let models = client
        .get(format!("{}/models", server.base_url()))
        .send()
        .await
        .unwrap();
    for response in [chat, models] {
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["code"].is_null());
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("You didn't provide an API key."));
    }
}

#[tokio::test]
async fn wrong_key_is_masked_and_right_key_accepted() {
    let server = FakeOpenAi::start_with(Options {
        api_key: Some("sk-right-key-1234".into()),
        ..Options::default()
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    let wrong = "sk-wrong-secret-7777";
    let response = client
        .post(&url)
        .bearer_auth(wrong)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let text = response.text().await.unwrap();
    assert!(!text.contains(wrong) && !text.contains("secret"), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Incorrect API key provided: sk-...7777."));

    // A short key is not echoed at all, not even its tail.
    let short = client
        .post(&url)
        .header("api-key", "abcd")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(short.status(), 401);
    assert!(!short.text().await.unwrap().contains("abcd"));

    let bearer = client
        .post(&url)
        .bearer_auth("sk-right-key-1234")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let azure_style = client
        .post(&url)
        .header("api-key", "sk-right-key-1234")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(azure_style.status(), 200);
}

#[tokio::test]
async fn validation_errors_do_not_consume_scripts() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Reply(Reply {
        content: Some("kept".into()),
        ..Reply::default()
    }));

    let mut reasoning = chat_body();
    reasoning["model"] = json!("o3-mini");
    reasoning["max_tokens"] = json!(100);
    let response = post(&server, &reasoning).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_parameter");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert_eq!(
        body["error"]["message"],
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    );

    let no_model = json!({"messages": [{"role": "user", "content": "x"}]});
    let body: Value = post(&server, &no_model).await.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");

    for messages in [json!(null), json!([])] {
        let body: Value = post(&server, &json!({"model": "gpt-4o", "messages": messages}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["error"]["param"], "messages");
    }

    let mut unknown = chat_body();
    unknown["model"] = json!("gpt-unknown");
    let response = post(&server, &unknown).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let not_json = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let body: Value = not_json.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("We could not parse the JSON body of your request."));

    // max_tokens is fine for non-reasoning models, and the script is still there.
    let mut classic = chat_body();
    classic["max_tokens"] = json!(100);
    let body: Value = post(&server, &classic).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "kept");
}

#[tokio::test]
async fn scripts_are_consumed_in_order_then_default() {
    let server = FakeOpenAi::start().await;
    server.push(Script::Error(ErrorReply::server_error()));
    server.push(Script::Reply(Reply {
        content: Some("second".into()),
        ..Reply::default()
    }));
    assert_eq!(post(&server, &chat_body()).await.status(), 500);
    let body: Value = post(&server, &chat_body()).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "second");
    let body: Value = post(&server, &chat_body()).await.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: hello there"
    );
}

#[tokio::test]
async fn requests_are_logged() {
    let server = FakeOpenAi::start().await;
    let client = reqwest::Client::new();
    client
        .post(format!("{}/chat/completions?trace=1", server.base_url()))
        .bearer_auth(KEY)
        .header("X-Custom-Header", "Value")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    let unknown = client
        .post(format!("{}/xyz", server.base_url()))
        .bearer_auth(KEY)
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Invalid URL (POST /v1/xyz)");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    client
        .get(format!("{}/models", server.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();

    let all = server.requests();
    assert_eq!(all.len(), 3);
    let chat = &all[0];
    assert_eq!(chat.method, "POST");
    assert_eq!(chat.path, "/v1/chat/completions");
    assert_eq!(chat.query.as_deref(), Some("trace=1"));
    assert_eq!(chat.headers["x-custom-header"], "Value");
    assert_eq!(chat.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(chat.body, chat_body());
    assert_eq!(all[1].path, "/v1/xyz");
    assert!(all[1].body.is_null());
    assert_eq!(all[2].method, "GET");
    assert_eq!(all[2].query, None);

    let chats = server.chat_requests();
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0].path, "/v1/chat/completions");
}

#[tokio::test]
async fn models_endpoint_on_and_off() {
    let on = FakeOpenAi::start().await;
    let response = reqwest::Client::new()
        .get(format!("{}/models", on.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, Options::default().models);
    assert_eq!(body["data"][0]["object"], "model");

    let off = FakeOpenAi::start_with(Options {
        models_endpoint: false,
        ..Options::default()
    })
    .await;
    let response = reqwest::Client::new()
        .get(format!("{}/models", off.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Invalid URL (GET /v1/models)");
}

#[tokio::test]
async fn azure_routes_accept_any_deployment() {
    let server = FakeOpenAi::start().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}/openai/deployments/my-deploy", server.addr());
    let response = client
        .post(format!("{base}/chat/completions?api-version=2024-10-21"))
        .header("api-key", KEY)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "my-deploy");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hi");

    let models = client
        .get(format!("{base}/models?api-version=2024-10-21"))
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(server.chat_requests().len(), 1);
    assert_eq!(
        server.chat_requests()[0].query.as_deref(),
        Some("api-version=2024-10-21")
    );
}

#[tokio::test]
async fn cut_connection_is_a_body_error() {
    let server = FakeOpenAi::start().await;
    server.push(Script::CutConnection);
    let response = post(&server, &chat_body()).await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());

    server.push(Script::CutConnection);
    let response = post(&server, &streaming(chat_body())).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the stream must end in a transport error");
    let text = String::from_utf8(received).unwrap();
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn malformed_json_is_truncated() {
    let server = FakeOpenAi::start().await;
    server.push(Script::MalformedJson);
    let response = post(&server, &chat_body()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    let text = response.text().await.unwrap();
    assert_eq!(text, r#"{"id":"chatcmpl-x","choices":[{"#);
    assert!(serde_json::from_str::<Value>(&text).is_err());
}

#[tokio::test]
async fn error_mid_stream() {
    let server = FakeOpenAi::start().await;
    server.push(Script::ErrorMidStream(ErrorReply::server_error()));
    server.push(Script::ErrorMidStream(ErrorReply::overloaded()));
    let response = post(&server, &streaming(chat_body())).await;
    assert_eq!(response.status(), 200);
    let events = events(response).await;
    assert_eq!(events.len(), 4, "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(last["error"]["code"].is_null());
    assert!(!events.contains(&"[DONE]".to_string()));

    // The same script on a non-stream request is a plain error.
    assert_eq!(post(&server, &chat_body()).await.status(), 503);
}

#[tokio::test]
async fn slow_first_byte_is_logged_before_the_delay() {
    let server = FakeOpenAi::start().await;
    server.push(Script::SlowFirstByte(Duration::from_millis(300)));
    let started = Instant::now();
    let url = format!("{}/chat/completions", server.base_url());
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(KEY)
            .json(&chat_body())
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.chat_requests().len(), 1, "recorded while in flight");
    assert_eq!(request.await.unwrap(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn slow_trickle_spreads_the_body_out() {
    let server = FakeOpenAi::start().await;
    let pace = Duration::from_millis(40);
    server.push(Script::SlowTrickle(pace));
    let started = Instant::now();
    let response = post(&server, &chat_body()).await;
    let headers_after = started.elapsed();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert!(headers_after < Duration::from_millis(100));
    assert!(started.elapsed() >= pace * 3, "3 pauses between 4 chunks");

    server.push(Script::SlowTrickle(pace));
    let started = Instant::now();
    let events = events(post(&server, &streaming(chat_body())).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(started.elapsed() >= pace * events.len() as u32);
}

#[tokio::test]
async fn latency_delays_every_chat_answer_scripted_or_not() {
    let latency = Duration::from_millis(200);
    let server = FakeOpenAi::start_with(Options {
        latency,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let response = post(&server, &chat_body()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert!(started.elapsed() >= latency);

    server.push(Script::Error(ErrorReply::rate_limited("1")));
    let started = Instant::now();
    assert_eq!(post(&server, &chat_body()).await.status(), 429);
    assert!(
        started.elapsed() >= latency,
        "scripts still apply, after it"
    );
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-openai"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base_url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    assert!(base_url.starts_with("http://127.0.0.1:") && base_url.ends_with("/v1"));
    let status = reqwest::Client::new()
        .get(format!("{base_url}/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .map(|r| r.status());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status.unwrap(), 200);
}
