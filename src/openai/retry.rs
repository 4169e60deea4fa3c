//! When to try again, and how long to wait: the official SDKs' policy, minus their mistakes.
//!
//! Retried: connection failures, timeouts, 408, 409, 429 and 5xx, unless the server says
//! `x-should-retry: false` (or forces a retry with `true`). Never retried: `insufficient_quota`
//! (billing; the SDKs retry it, which only burns time) and every other status. The wait honours
//! `retry-after-ms`, then `retry-after`, up to a cap; a server asking for longer than the cap is
//! not retried here at all, so the platform can rebound the message instead of a step sleeping.

use std::time::Duration;

use rand::Rng;
use reqwest::header::HeaderMap;

use super::error::CallError;

/// Retry settings for one call.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff delay; doubles per retry.
    pub base_delay: Duration,
    /// Backoff cap.
    pub max_delay: Duration,
    /// The longest `retry-after` worth waiting for in-process.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    RetryAfter(Duration),
    GiveUp,
}

impl RetryPolicy {
    /// Decides after `retries_done` retries have already failed.
    pub fn decide(&self, retries_done: u32, error: &CallError) -> Decision {
        if retries_done >= self.max_retries {
            return Decision::GiveUp;
        }
        let api = match error {
            CallError::Transport { .. } => {
                return Decision::RetryAfter(self.backoff(retries_done));
            }
            CallError::InvalidResponse { .. } => return Decision::GiveUp,
            CallError::Api(api) => api,
        };
        if api.is_insufficient_quota() || api.status == 200 {
            return Decision::GiveUp;
        }
        let retry = api
            .should_retry
            .unwrap_or(matches!(api.status, 408 | 409 | 429 | 500..));
        if !retry {
            return Decision::GiveUp;
        }
        match api.retry_after {
            Some(wait) if wait > self.max_retry_after => Decision::GiveUp,
            Some(wait) if !wait.is_zero() => Decision::RetryAfter(wait),
            _ => Decision::RetryAfter(self.backoff(retries_done)),
        }
    }

    /// Exponential backoff with up to 25% negative jitter, so replicas do not retry in step.
    fn backoff(&self, retries_done: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retries_done))
            .min(self.max_delay);
        exp.mul_f64(1.0 - rand::rng().random_range(0.0..0.25))
    }
}

/// Reads `x-should-retry`.
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()? {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Reads `retry-after-ms` (milliseconds), then `retry-after` (seconds, fractional allowed, or an
/// HTTP date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let value = get("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::error::{parse_error_body, TransportKind};
    use reqwest::header::HeaderValue;

    fn api(
        status: u16,
        code: Option<&str>,
        retry_after: Option<u64>,
        should: Option<bool>,
    ) -> CallError {
        let mut e = parse_error_body(status, b"{}");
        e.code = code.map(str::to_string);
        e.retry_after = retry_after.map(Duration::from_secs);
        e.should_retry = should;
        CallError::Api(Box::new(e))
    }

    fn retries(error: &CallError) -> bool {
        matches!(
            RetryPolicy::default().decide(0, error),
            Decision::RetryAfter(_)
        )
    }

    #[test]
    fn retries_transient_statuses_only() {
        for status in [408, 409, 429, 500, 502, 503, 504] {
            assert!(retries(&api(status, None, None, None)), "{status}");
        }
        for status in [400, 401, 403, 404, 413, 422] {
            assert!(!retries(&api(status, None, None, None)), "{status}");
        }
        assert!(!retries(&api(429, Some("insufficient_quota"), None, None)));
        assert!(retries(&CallError::Transport {
            kind: TransportKind::Connect,
            detail: String::new()
        }));
        assert!(!retries(&CallError::InvalidResponse {
            detail: String::new(),
            request_id: None
        }));
    }

    #[test]
    fn x_should_retry_overrides_the_status_but_not_quota() {
        assert!(!retries(&api(500, None, None, Some(false))));
        assert!(retries(&api(400, None, None, Some(true))));
        assert!(!retries(&api(
            429,
            Some("insufficient_quota"),
            None,
            Some(true)
        )));
    }

    #[test]
    fn honours_retry_after_up_to_the_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.decide(0, &api(429, None, Some(7), None)),
            Decision::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(
            policy.decide(0, &api(429, None, Some(121), None)),
            Decision::GiveUp
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_limit() {
        let policy = RetryPolicy::default();
        let err = api(500, None, None, None);
        for (n, full) in [(0, 500), (1, 1000), (2, 2000), (5, 8000)] {
            let policy = RetryPolicy {
                max_retries: 10,
                ..policy.clone()
            };
            let Decision::RetryAfter(d) = policy.decide(n, &err) else {
                panic!()
            };
            let full = Duration::from_millis(full);
            assert!(d <= full && d >= full.mul_f64(0.75), "{n}: {d:?}");
        }
        assert_eq!(policy.decide(2, &err), Decision::GiveUp);
    }

    #[test]
    fn parses_retry_after_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", HeaderValue::from_static("20"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(20)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert("x-should-retry", HeaderValue::from_static("false"));
        assert_eq!(should_retry(&h), Some(false));
    }
}
