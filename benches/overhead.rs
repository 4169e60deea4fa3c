//! Per-message overhead of the Send Request action, upstream excluded.
//!
//! `pipeline/<size>` runs everything the component does to one message except the network round
//! trip: parse the incoming bytes, `prepare` (validate, resolve credentials, read settings, build
//! the request), serialize the request, parse the upstream answer, build the output message and
//! serialize the emitted event. `baseline/<size>` is the JSON work no implementation can avoid:
//! parse + serialize the input and parse + serialize the response. `validate/<size>` is the
//! input-schema check alone, to show how much of the pipeline it takes.
//!
//! After the run, a markdown table of medians is printed from criterion's `estimates.json` files
//! (skipped in test mode, or when a benchmark was filtered out or not saved).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use chatgpt_component::actions::{send_request, Context};
use chatgpt_component::emit::Event;
use chatgpt_component::message::Message;
use chatgpt_component::openai::client::parse_completion;
use chatgpt_component::openai::{Completion, OpenAi, RetryPolicy};
use criterion::{BenchmarkId, Criterion};
use serde_json::{json, Value};

const GROUP: &str = "overhead";
const KB: usize = 1024;

/// One message size: its label in benchmark ids, the incoming message bytes and the upstream
/// answer bytes.
struct Case {
    label: &'static str,
    title: &'static str,
    goal: &'static str,
    input: Vec<u8>,
    response: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

const WORDS: &[&str] = &[
    "the",
    "invoice",
    "customer",
    "order",
    "shipment",
    "was",
    "delayed",
    "because",
    "warehouse",
    "in",
    "Rotterdam",
    "reported",
    "a",
    "missing",
    "pallet",
    "and",
    "please",
    "summarise",
    "status",
    "for",
    "account",
    "manager",
    "with",
    "next",
    "steps",
    "including",
    "refund",
    "options",
    "\"priority\"",
    "SLA",
    "of",
    "48",
    "hours",
    "—",
    "über",
    "contract",
    "clause",
    "7.2",
    "applies",
    "to",
    "all",
    "EU",
    "deliveries",
    "after",
    "2024-03-01",
];

/// Deterministic prose of exactly `len` bytes: words, punctuation, quotes, a few non-ASCII
/// characters and paragraph breaks, so serializing it exercises escaping like real text does.
fn prose(seed: usize, len: usize) -> String {
    let mut text = String::with_capacity(len + 16);
    let mut i = seed;
    while text.len() < len {
        let word = WORDS[(i * 7 + i / 3) % WORDS.len()];
        text.push_str(word);
        text.push_str(match i % 29 {
            28 => ".\n\n",
            13 | 21 => ". ",
            5 => ", ",
            _ => " ",
        });
        i += 1;
    }
    // Cut at a char boundary at or below `len`, then pad with ASCII to hit `len` exactly.
    let mut cut = len.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    while text.len() < len {
        text.push('.');
    }
    text
}

/// Wraps a chat request body into a full platform message, as elastic.io delivers it.
fn platform_message(body: Value) -> Value {
    json!({
        "id": "6f1c2f7e-3b9a-4c1e-9a51-0d2f6b8e4a17",
        "body": body,
        "headers": {"x-flow-id": "flow-42", "x-step-id": "step_3"},
        "attachments": {},
        "metadata": {"source": "salesforce", "threadId": "thread-9001"}
    })
}

/// ~1 KB: a system and a user message plus the usual options, JSON output requested.
fn small_input(fill: usize) -> Value {
    platform_message(json!({
        "messages": [
            {"role": "system", "content": "You are a support assistant for a logistics company. Answer in JSON with the keys summary, sentiment and next_steps."},
            {"role": "user", "content": prose(1, fill)}
        ],
        "temperature": 0.2,
        "max_completion_tokens": 512,
        "response_format": {"type": "json_object"},
        "metadata": {"tenant": "acme-eu", "ticket": "SUP-31337"}
    }))
}

/// ~100 KB: a long conversation, ~5 KB per turn, one user turn with text + image parts.
fn large_input(fill: usize) -> Value {
    let mut messages = vec![json!({
        "role": "system",
        "content": "You are a support assistant for a logistics company. Answer in JSON with the keys summary, sentiment, open_questions and next_steps."
    })];
    for turn in 0..20 {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        let text = prose(turn * 31, fill);
        messages.push(if turn == 4 {
            json!({"role": role, "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {
                    "url": "https://files.example.com/tickets/SUP-31337/damaged-pallet-photo-0007.jpg?sig=3f9a0c1d2e",
                    "detail": "low"
                }}
            ]})
        } else {
            json!({"role": role, "content": text})
        });
    }
    messages.push(json!({"role": "user", "content": "Summarise the whole conversation as JSON."}));
    platform_message(json!({
        "messages": messages,
        "temperature": 0.2,
        "max_completion_tokens": 4096,
        "response_format": {"type": "json_object"},
        "metadata": {"tenant": "acme-eu", "ticket": "SUP-31337"}
    }))
}

/// A chat completion as OpenAI returns it, whose content is JSON text with `items` entries.
fn response(items: usize, fill: usize) -> Value {
    let content = json!({
        "summary": prose(3, fill),
        "sentiment": "negative",
        "next_steps": (0..items).map(|i| json!({
            "id": i + 1,
            "owner": "account manager",
            "action": prose(i * 5, 60),
            "due": "2025-01-17",
            "priority": if i % 3 == 0 { "high" } else { "normal" }
        })).collect::<Vec<_>>()
    });
    json!({
        "id": "chatcmpl-BxQ1d2e3f4g5h6i7j8k9l0mNoPqR",
        "object": "chat.completion",
        "created": 1_736_900_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": content.to_string(),
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 24_816,
            "completion_tokens": 2_377,
            "total_tokens": 27_193,
            "prompt_tokens_details": {"cached_tokens": 23_552, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        },
        "service_tier": "default",
        "system_fingerprint": "fp_b8bc95a0ac"
    })
}

/// Picks the `fill` that makes `build(fill)` serialize to about `target` bytes (the size grows
/// linearly with `fill`), and checks the result is within 10% of it.
fn sized(what: &str, target: usize, build: impl Fn(usize) -> Value) -> Vec<u8> {
    let size = |fill| serde_json::to_vec(&build(fill)).unwrap().len() as f64;
    let (at_100, at_200) = (size(100), size(200));
    let per_fill = (at_200 - at_100) / 100.0;
    let fill = (100.0 + (target as f64 - at_100) / per_fill).max(0.0) as usize;
    let bytes = serde_json::to_vec(&build(fill)).unwrap();
    let off = bytes.len() as f64 / target as f64 - 1.0;
    assert!(
        off.abs() <= 0.10,
        "{what} is {} bytes, not within 10% of {target}",
        bytes.len()
    );
    bytes
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            label: "1KB",
            title: "1 KB",
            goal: "< 20 µs median",
            input: sized("the 1 KB input", KB, small_input),
            response: sized("the 1 KB response", KB, |fill| response(2, fill)),
        },
        Case {
            label: "100KB",
            title: "100 KB",
            goal: "-",
            input: sized("the 100 KB input", 100 * KB, |fill| large_input(fill / 20)),
            response: sized("the 10 KB response", 10 * KB, |fill| response(40, fill)),
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// What is measured
// ---------------------------------------------------------------------------------------------

fn cfg() -> Value {
    json!({"apiKey": "sk-bench-0123456789", "model": "gpt-4o-mini", "organization": "org-bench"})
}

/// Everything the component does to one message except the network round trip. Returns the
/// request bytes and the emitted event bytes.
fn pipeline(ctx: &Context<'_>, cfg: &Value, input: &[u8], response: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let value: Value = serde_json::from_slice(input).expect("the input is JSON");
    let msg = Message::from_json(value).expect("the input is a message");
    let prepared = match send_request::prepare(ctx, cfg, msg) {
        Ok(prepared) => prepared,
        Err(outcome) => panic!("prepare failed: {outcome:?}"),
    };
    let request = serde_json::to_vec(&prepared.request).expect("the request serializes");
    let body = parse_completion(response, &None).expect("the response is a completion");
    let completion = Completion {
        body,
        request_id: Some("req_1".into()),
    };
    let message = send_request::output(completion, prepared.wants_json);
    let event = serde_json::to_vec(&Event::Data { message }).expect("the event serializes");
    (request, event)
}

/// The JSON work any implementation must do: parse and serialize the input and the response.
fn baseline(input: &[u8], response: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let input: Value = serde_json::from_slice(input).expect("the input is JSON");
    let request = serde_json::to_vec(&input).expect("serializes");
    let response: Value = serde_json::from_slice(response).expect("the response is JSON");
    let event = serde_json::to_vec(&response).expect("serializes");
    (request, event)
}

fn bench(c: &mut Criterion, cases: &[Case]) {
    let env = |_: &str| None;
    let ctx = Context {
        client: OpenAi::shared(),
        env: &env,
        retry: RetryPolicy::default(),
        storage: Default::default(),
    };
    let cfg = cfg();

    let mut group = c.benchmark_group(GROUP);
    for case in cases {
        // Also compiles and caches the input schema, so no sample pays for it.
        let (request, event) = pipeline(&ctx, &cfg, &case.input, &case.response);
        let event: Value = serde_json::from_slice(&event).unwrap();
        assert!(
            event["message"]["body"]["choices"][0]["message"]["parsed"].is_object(),
            "the JSON content is given parsed"
        );
        assert!(
            request.len() < case.input.len(),
            "the request is the body only"
        );

        let msg = Message::from_json(serde_json::from_slice(&case.input).unwrap()).unwrap();
        group.bench_function(BenchmarkId::new("pipeline", case.label), |b| {
            b.iter(|| {
                pipeline(
                    &ctx,
                    &cfg,
                    black_box(&case.input),
                    black_box(&case.response),
                )
            })
        });
        group.bench_function(BenchmarkId::new("baseline", case.label), |b| {
            b.iter(|| baseline(black_box(&case.input), black_box(&case.response)))
        });
        group.bench_function(BenchmarkId::new("validate", case.label), |b| {
            b.iter_batched(
                || msg.body.clone(),
                |body| send_request::validate(black_box(body)).expect("valid"),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

/// Where criterion writes its results: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else `target/criterion` (relative to the package, where `cargo bench` runs benches).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("criterion")
}

/// Whether criterion measures (rather than test, list or profile), decided as criterion does.
fn benchmark_mode() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    has("--bench") && !has("--test") && !has("--list") && !has("--profile-time")
}

/// The median in ns of `<function>/<label>`, if this run saved it.
fn median_ns(dir: &std::path::Path, function: &str, label: &str, since: SystemTime) -> Option<f64> {
    let path = dir
        .join(GROUP)
        .join(function)
        .join(label)
        .join("new")
        .join("estimates.json");
    let fresh = std::fs::metadata(&path).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let estimates: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn duration(ns: f64) -> String {
    match ns {
        ns if ns < 1e3 => format!("{ns:.0} ns"),
        ns if ns < 1e6 => format!("{:.1} µs", ns / 1e3),
        ns => format!("{:.2} ms", ns / 1e6),
    }
}

fn print_table(cases: &[Case], since: SystemTime) {
    let dir = criterion_dir();
    let mut rows = Vec::new();
    let mut split = Vec::new();
    for case in cases {
        let median = |function| median_ns(&dir, function, case.label, since);
        let (Some(pipeline), Some(baseline)) = (median("pipeline"), median("baseline")) else {
            continue;
        };
        rows.push(format!(
            "| {} | {} | {} | {:.1}x | {} |",
            case.title,
            duration(pipeline),
            duration(baseline),
            pipeline / baseline,
            case.goal
        ));
        if let Some(validate) = median("validate") {
            split.push(format!(
                "| {} | {} | {:.0}% | {} |",
                case.title,
                duration(validate),
                100.0 * validate / pipeline,
                duration(pipeline - validate)
            ));
        }
    }
    if rows.is_empty() {
        eprintln!(
            "overhead: no fresh results under {}; table skipped",
            dir.display()
        );
        return;
    }
    println!();
    println!("| message | pipeline median | JSON-only baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    rows.iter().for_each(|row| println!("{row}"));
    if !split.is_empty() {
        println!();
        println!("| message | validate median | share of pipeline | pipeline without validate |");
        println!("|---|---|---|---|");
        split.iter().for_each(|row| println!("{row}"));
    }
    println!();
    for case in cases {
        println!(
            "{}: input {} bytes, response {} bytes",
            case.title,
            case.input.len(),
            case.response.len()
        );
    }
}

fn main() {
    // File times can be coarse; a second of slack still excludes any earlier run's results.
    let started = SystemTime::now() - Duration::from_secs(1);
    let cases = cases();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut criterion, &cases);
    criterion.final_summary();
    if benchmark_mode() {
        print_table(&cases, started);
    }
}
