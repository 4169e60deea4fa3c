//! `POST /glific/parse_via_chat_gpt`: Glific's webhook of that name.
//!
//! Fields as Glific reads them: `question_text` (required), `prompt` (the system message),
//! `model`, `temperature` (default 0) and `response_format`. Glific's own flows send the model
//! as `gpt_model`, which Glific ignores; we honour it (`model` wins when both are set). Unlike
//! Glific, a `json_schema` response format does not pin the model to gpt-4o-2024-08-06: every
//! current model supports it. Template-expanded bodies often carry numbers as text, so
//! `temperature` may be `"0.5"`. `conversation_id` (ours) continues a stored conversation, e.g.
//! one per contact. Other keys (`organization_id`, `flow_id`, `contact`, ...) are
//! ignored, as in Glific.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{json_reply, Gateway, Refusal};
use crate::message::Message;

fn failure(status: StatusCode, error: impl Into<String>) -> Response {
    json_reply(status, json!({"success": false, "error": error.into()}))
}

/// A refusal in Glific's failure shape, with `Retry-After` when waiting helps.
fn refused(refusal: Refusal) -> Response {
    refusal.decorate(failure(refusal.status(), refusal.to_event().message))
}

pub async fn handle(
    State(gateway): State<Gateway>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return failure(rejection.status(), rejection.body_text()),
    };
    let (model, request) = match parse(&body) {
        Ok(parsed) => parsed,
        Err(error) => return failure(StatusCode::BAD_REQUEST, error),
    };
    let ticket = match gateway.admit() {
        Ok(ticket) => ticket,
        Err(refusal) => return refused(refusal),
    };
    let mut cfg = gateway.action_cfg().clone();
    if let Some(model) = model {
        cfg["model"] = json!(model);
    }
    match gateway
        .call(&ticket, &cfg, Message::with_body(request))
        .await
    {
        Ok(message) => answer(&message.body),
        Err(refusal) => refused(refusal),
    }
}

/// The model to use (if the request names one) and the chat completion body.
fn parse(body: &[u8]) -> Result<(Option<String>, Value), String> {
    let fields: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Err("the body must be a JSON object of webhook fields".into()),
        Err(e) => return Err(format!("the body is not valid JSON: {e}")),
    };
    let text = |key: &str| -> Result<Option<String>, String> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("/{key} must be a string")),
        }
    };
    let question = text("question_text")?
        .filter(|q| !q.is_empty())
        .ok_or("question_text is empty")?;
    let model = text("model")?
        .filter(|m| !m.is_empty())
        .or(text("gpt_model")?.filter(|m| !m.is_empty()));
    let temperature = match fields.get("temperature") {
        None | Some(Value::Null) => json!(0),
        Some(Value::Number(n)) => Value::Number(n.clone()),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or("/temperature must be a number from 0 to 2")?,
        Some(_) => return Err("/temperature must be a number from 0 to 2".into()),
    };
    let response_format = match fields.get("response_format") {
        None | Some(Value::Null) => None,
        Some(format) => match format["type"].as_str() {
            Some("json_object" | "json_schema") => Some(format.clone()),
            _ => return Err("response_format type should be json_schema or json_object".into()),
        },
    };
    let mut messages = Vec::new();
    if let Some(prompt) = text("prompt")?.filter(|p| !p.is_empty()) {
        messages.push(json!({"role": "system", "content": prompt}));
    }
    messages.push(json!({"role": "user", "content": question}));
    let mut request = json!({"messages": messages, "temperature": temperature});
    if let Some(id) = super::conversation_id("conversation_id", fields.get("conversation_id"))? {
        request["conversationId"] = json!(id);
    }
    if let Some(format) = response_format {
        request["response_format"] = format;
    }
    Ok((model, request))
}

/// `{"success": true, "parsed_msg": ...}`: the answer decoded as JSON when it is JSON.
fn answer(completion: &Value) -> Response {
    let Some(message) = completion["choices"].get(0).map(|c| &c["message"]) else {
        return failure(
            StatusCode::BAD_GATEWAY,
            "Got empty response: the model returned no choices",
        );
    };
    let Some(content) = message["content"].as_str() else {
        let why = message["refusal"]
            .as_str()
            .map(|r| format!("the model refused: {r}"))
            .unwrap_or_else(|| "the model returned no content".into());
        return failure(StatusCode::UNPROCESSABLE_ENTITY, why);
    };
    let parsed = serde_json::from_str::<Value>(content).unwrap_or_else(|_| json!(content));
    json_reply(
        StatusCode::OK,
        json!({"success": true, "parsed_msg": parsed}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_become_a_chat_request() {
        let (model, request) = parse(
            br#"{"question_text":"2+2?","prompt":"Be terse","gpt_model":"gpt-4.1","temperature":"0.5","organization_id":1}"#,
        )
        .unwrap();
        assert_eq!(model.as_deref(), Some("gpt-4.1"));
        assert_eq!(
            request,
            json!({"messages": [
                {"role": "system", "content": "Be terse"},
                {"role": "user", "content": "2+2?"}
            ], "temperature": 0.5})
        );
        let (model, request) =
            parse(br#"{"question_text":"q","model":"gpt-4o","gpt_model":"gpt-4.1"}"#).unwrap();
        assert_eq!(model.as_deref(), Some("gpt-4o"));
        assert_eq!(request["temperature"], 0);
        assert!(request.get("response_format").is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, needle) in [
            (&br#"{"question_text":""}"#[..], "question_text is empty"),
            (br#"{"prompt":"p"}"#, "question_text is empty"),
            (br#"{"question_text":5}"#, "/question_text must be a string"),
            (
                br#"{"question_text":"q","temperature":"warm"}"#,
                "/temperature",
            ),
            (
                br#"{"question_text":"q","response_format":{"type":"text"}}"#,
                "response_format type should be json_schema or json_object",
            ),
            (br#"["q"]"#, "JSON object"),
            (br#"{"question_text":"#, "not valid JSON"),
        ] {
            let error = parse(body).unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
    }
}
