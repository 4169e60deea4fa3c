//! Service mode: one platform service call, its result POSTed to `ELASTICIO_POST_RESULT_URL`.
//!
//! The platform runs these when a user saves credentials (`verifyCredentials`), opens the model
//! dropdown (`selectModel`) or asks for metadata (`getMetaModel`). Failures inside the call are
//! reported to the platform as `{"status":"error","data":{"message":...}}`; only a missing
//! result URL or an unreachable platform makes the process fail.

use serde_json::{json, Value};

use super::platform::post_result;
use crate::actions::Context;
use crate::component::{Component, Direction};
use crate::openai::{OpenAi, RetryPolicy};
use crate::services;

/// The service methods sailor accepts.
pub const METHODS: &[&str] = &["verifyCredentials", "getMetaModel", "selectModel"];

/// Runs `method` and posts its result. `Err` means nothing could be reported.
pub async fn run(method: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    let var = |name: &str| env(&format!("ELASTICIO_{name}")).filter(|v| !v.is_empty());
    let url = var("POST_RESULT_URL").ok_or("ELASTICIO_POST_RESULT_URL is not provided")?;
    let client = OpenAi::new();
    let body = match call(method, &var, &client).await {
        Ok(data) => json!({"status": "success", "data": data}),
        Err(message) => {
            tracing::error!(method, error = %message, "service call failed");
            json!({"status": "error", "data": {"message": message}})
        }
    };
    let retries = var("API_REQUEST_RETRY_ATTEMPTS")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(3);
    let delay = var("API_REQUEST_RETRY_DELAY")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(100);
    post_result(client.http(), &url, &body, retries, delay).await
}

async fn call(
    method: &str,
    var: &dyn Fn(&str) -> Option<String>,
    client: &OpenAi,
) -> Result<Value, String> {
    if !METHODS.contains(&method) {
        return Err(format!("Unknown service method \"{method}\""));
    }
    let required =
        |name: &str| var(name).ok_or_else(|| format!("ELASTICIO_{name} is not provided"));
    let cfg: Value =
        serde_json::from_str(&required("CFG")?).map_err(|_| "Unable to parse CFG".to_string())?;
    for name in ["API_URI", "API_USERNAME", "API_KEY"] {
        required(name)?;
    }
    let ctx = Context {
        client,
        env: &|_| None,
        retry: RetryPolicy::default(),
        storage: Default::default(),
    };
    match method {
        "verifyCredentials" => {
            let verification = services::verify_credentials(&ctx, &cfg).await;
            Ok(serde_json::to_value(verification).expect("serializes"))
        }
        "getMetaModel" => {
            let action = required("ACTION_OR_TRIGGER")?;
            let component = Component::embedded();
            Ok(json!({
                "in": component.metadata(&action, Direction::In)?,
                "out": component.metadata(&action, Direction::Out)?,
            }))
        }
        _ => {
            let action = required("ACTION_OR_TRIGGER")?;
            let function = required("GET_MODEL_METHOD")?;
            let models = services::select_model(&ctx, &action, &function, &cfg)
                .await
                .map_err(|e| e.message)?;
            Ok(serde_json::to_value(models).expect("serializes"))
        }
    }
}
