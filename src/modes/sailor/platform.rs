//! The platform's REST API: the step's data before consuming, service results after a service
//! call. Both authenticate with HTTP Basic and retry server errors, as elasticio-rest-node does.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::settings::Settings;

/// What the platform says about this step (`GET /v1/tasks/{flow}/steps/{step}`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StepData {
    /// Credentials merged with the step's configuration: the action's `cfg`.
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub snapshot: Value,
    #[serde(default)]
    pub is_passthrough: bool,
}

/// Fetches the step's data. Server errors and network failures are retried
/// `API_REQUEST_RETRY_ATTEMPTS` times (delay doubling from `API_REQUEST_RETRY_DELAY`); a 4xx is
/// final.
pub async fn fetch_step(http: &reqwest::Client, settings: &Settings) -> Result<StepData, String> {
    let url = format!(
        "{}/v1/tasks/{}/steps/{}",
        settings.api_uri.trim_end_matches('/'),
        settings.flow_id,
        settings.step_id
    );
    let request = || {
        http.get(&url)
            .basic_auth(&settings.api_username, Some(settings.api_key.expose()))
    };
    let retries = (
        settings.api_request_retry_attempts,
        settings.api_request_retry_delay_ms,
    );
    let response = send_with_retries(request, retries).await.map_err(|e| match e {
        Failure::Refused(status) => format!(
            "the platform refused the step data request ({url}): HTTP {status}; check ELASTICIO_API_USERNAME/ELASTICIO_API_KEY and the flow and step ids"
        ),
        Failure::Unavailable(why) => format!("cannot fetch the step data from {url}: {why}"),
    })?;
    response
        .json::<StepData>()
        .await
        .map_err(|e| format!("the step data from {url} is not valid: {e}"))
}

/// Posts a service result to `ELASTICIO_POST_RESULT_URL`. Credentials in the URL's userinfo
/// become Basic auth. Server errors are retried; anything but a 2xx in the end is an error.
pub async fn post_result(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    retries: u64,
    retry_delay_ms: u64,
) -> Result<(), String> {
    let mut parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("ELASTICIO_POST_RESULT_URL is not a URL: {e}"))?;
    let user = parsed.username().to_string();
    let password = parsed.password().map(str::to_string);
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let request = || {
        let request = http.post(parsed.clone()).json(body);
        if user.is_empty() {
            request
        } else {
            request.basic_auth(&user, password.as_deref())
        }
    };
    match send_with_retries(request, (retries, retry_delay_ms)).await {
        Ok(_) => Ok(()),
        Err(Failure::Refused(status)) => Err(format!(
            "the platform refused the service result: HTTP {status}"
        )),
        Err(Failure::Unavailable(why)) => Err(format!("cannot post the service result: {why}")),
    }
}

enum Failure {
    /// A 4xx (or other non-retryable status): final.
    Refused(reqwest::StatusCode),
    /// Server errors or network failures, still failing after the retries.
    Unavailable(String),
}

/// Sends, retrying server errors and network failures `retries.0` times, `retries.1` ms apart,
/// doubling, as elasticio-rest-node does.
async fn send_with_retries(
    request: impl Fn() -> reqwest::RequestBuilder,
    (retries, delay_ms): (u64, u64),
) -> Result<reqwest::Response, Failure> {
    let mut attempt = 0;
    loop {
        let why = match request().timeout(Duration::from_secs(30)).send().await {
            Ok(response) if response.status().is_success() => return Ok(response),
            Ok(response) if response.status().is_server_error() => {
                format!("HTTP {}", response.status())
            }
            Ok(response) => return Err(Failure::Refused(response.status())),
            Err(e) => crate::openai::client::error_chain(&e.without_url()),
        };
        if attempt >= retries {
            return Err(Failure::Unavailable(why));
        }
        let delay = delay_ms.saturating_mul(1 << attempt.min(16));
        tracing::warn!(attempt, delay_ms = delay, error = %why, "platform request failed; retrying");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        attempt += 1;
    }
}
