//! Prometheus metrics for `GET /metrics`. One registry per gateway, so tests running several
//! gateways in one process do not share counters.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds: loopback replies take milliseconds, model answers up to minutes.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status code.
    pub requests: IntCounterVec,
    /// Time to answer a request, by route.
    pub request_seconds: HistogramVec,
    /// Upstream calls by outcome: the HTTP status, `transport`, or `invalid`.
    pub upstream_calls: IntCounterVec,
    pub upstream_seconds: HistogramVec,
    /// Tokens reported by the upstream, by kind (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// Requests admitted and waiting for an upstream slot.
    pub queue_depth: IntGauge,
    /// Upstream calls under way.
    pub in_flight: IntGauge,
    /// Requests refused because the queue was full.
    pub rejected: IntCounter,
    /// Calls refused by `everyday_limit`.
    pub daily_limit_refusals: IntCounter,
    /// Event deliveries to `target` by result: `delivered`, `retried`, `failed`.
    pub deliveries: IntCounterVec,
    pub dead_letters: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("chatgpt_gateway".into()), None)
            .expect("a valid metric prefix");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        Metrics {
            requests: counter_vec(
                "requests_total",
                "HTTP requests answered, by route and status.",
                &["route", "status"],
            ),
            request_seconds: histogram(
                "request_duration_seconds",
                "Time to answer an HTTP request.",
                &["route"],
            ),
            upstream_calls: counter_vec(
                "upstream_calls_total",
                "Chat completion calls by outcome (HTTP status, transport or invalid).",
                &["status"],
            ),
            upstream_seconds: histogram(
                "upstream_duration_seconds",
                "Time of one chat completion call, retries included.",
                &["status"],
            ),
            tokens: counter_vec(
                "tokens_total",
                "Tokens used, as reported by the upstream.",
                &["kind"],
            ),
            queue_depth: gauge("queue_depth", "Requests waiting for an upstream slot."),
            in_flight: gauge("upstream_in_flight", "Upstream calls under way."),
            rejected: counter(
                "queue_full_rejections_total",
                "Requests refused with 429 because the queue was full.",
            ),
            daily_limit_refusals: counter(
                "daily_limit_refusals_total",
                "Calls refused because everyday_limit was reached.",
            ),
            deliveries: counter_vec(
                "deliveries_total",
                "Event delivery attempts to the target, by result.",
                &["result"],
            ),
            dead_letters: counter(
                "dead_letters_total",
                "Events written to the dead-letter directory.",
            ),
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
