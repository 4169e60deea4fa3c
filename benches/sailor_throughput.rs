//! Platform-mode throughput, memory and start-up latency of the release binary.
//!
//! One private RabbitMQ node, the fake platform API and a fake OpenAI that answers at once, all
//! on loopback. The bench
//!
//! 1. starts the step on an empty input queue five times: spawn → its `consuming` log line
//!    (and → its consumer visible on the broker), then idle RSS one second later;
//! 2. for prefetch 1 and 32, pre-fills the input queue with N encrypted ~1 KB chat requests,
//!    starts the step and times its `consuming` line → the Nth result on the data queue
//!    (best of two runs), with peak RSS (`VmHWM`) at the end; once more with `LOG_LEVEL=warn`
//!    (start: consumer visible on the broker) to show what info logging costs;
//! 3. runs the ceiling on the same broker with the same N, payloads and prefetch: an in-process
//!    lapin loop, consume → publish a copy of the component's output on a confirm channel →
//!    wait for the confirm → ack, one task per delivery, separate read and write connections;
//! 4. prints a markdown table.
//!
//! `cargo bench --bench sailor_throughput`. `SAILOR_BENCH_N1` / `SAILOR_BENCH_N32` override N;
//! `SAILOR_BENCH_PREFETCH=32` runs one prefetch only (`none`: start-up only);
//! `SAILOR_BENCH_AMQP_QUERY=frame_max=8192` is appended to the step's AMQP URI.
//! Everything is bounded by a global timeout; on expiry what was measured is printed and the
//! bench exits non-zero. Spawned steps are killed on drop, the node by the harness's `Drop`.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use common::{machine_jiffies, proc_cpu_ms, proc_status_kb};

use std::collections::{BTreeMap, HashSet};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatgpt_component::modes::sailor::crypto::Cipher;
use chatgpt_component::secret::Secret;
use fake_openai::FakeOpenAi;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use support::{Platform, Rabbit, Topology};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

const PASSWORD: &str = "benchCryptoPassword";
const IV: &str = "iv=any16_symbols";
const API_KEY: &str = "sk-bench-0000";
const PLATFORM_KEY: &str = "platform-bench-key";
const STORAGE_TOKEN: &str = "storage-bench-token";

/// Everything, broker start included.
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(300);
/// One throughput run (N results).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Spawn → `consuming`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STARTS: usize = 5;
const RUNS: usize = 2;
const PREFETCHES: [u16; 2] = [1, 32];

fn cipher() -> Cipher {
    Cipher::new(&Secret::new(PASSWORD), IV).expect("cipher")
}

/// `SAILOR_BENCH_PREFETCH=32` (a comma list) runs only those; both by default.
fn prefetches() -> Vec<u16> {
    match std::env::var("SAILOR_BENCH_PREFETCH") {
        Ok(list) => list
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .filter(|p| PREFETCHES.contains(p))
            .collect(),
        Err(_) => PREFETCHES.to_vec(),
    }
}

fn n_for(prefetch: u16) -> usize {
    let (var, default) = match prefetch {
        1 => ("SAILOR_BENCH_N1", 6000),
        _ => ("SAILOR_BENCH_N32", 20000),
    };
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

struct Startup {
    ready: Duration,
    on_broker: Option<Duration>,
    idle_rss_kb: Option<u64>,
    /// `RssAnon`, `RssFile` and `Threads` at the same moment.
    idle_split: (Option<u64>, Option<u64>, Option<u64>),
}

#[derive(Clone)]
struct Run {
    n: usize,
    /// Start (`consuming` line, or consumer visible / consume-ok) → Nth result.
    elapsed: Duration,
    /// First result → Nth result.
    steady: Duration,
    peak_rss_kb: Option<u64>,
    detail: String,
}

impl Run {
    fn rate(&self) -> f64 {
        self.n as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Default)]
struct Results {
    startups: Vec<Startup>,
    /// (prefetch, LOG_LEVEL) → runs.
    component: BTreeMap<(u16, &'static str), Vec<Run>>,
    ceiling: BTreeMap<u16, Vec<Run>>,
    notes: Vec<String>,
}

type Shared = Arc<Mutex<Results>>;

fn best(runs: Option<&Vec<Run>>) -> Option<&Run> {
    runs?.iter().max_by(|a, b| a.rate().total_cmp(&b.rate()))
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0))
}

fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    values.get(values.len() / 2).copied()
}

fn print_report(results: &Results) {
    println!();
    println!(
        "## sailor throughput (release binary, 1 RabbitMQ node, fake OpenAI answering at once)"
    );
    println!();
    println!("Component runs at LOG_LEVEL=info (its `consuming` line starts the clock); best of {RUNS} runs each.");
    println!();
    println!("| prefetch | N | component msg/s | bare loop msg/s (ceiling) | share of ceiling | peak RSS |");
    println!("|---|---|---|---|---|---|");
    for prefetch in PREFETCHES {
        let component = best(results.component.get(&(prefetch, "info")));
        let ceiling = best(results.ceiling.get(&prefetch));
        let n = component
            .or(ceiling)
            .map_or("n/a".into(), |r| r.n.to_string());
        let rate = |r: Option<&Run>| r.map_or("n/a".into(), |r| format!("{:.0}", r.rate()));
        let share = match (component, ceiling) {
            (Some(c), Some(b)) => format!("{:.0}%", 100.0 * c.rate() / b.rate()),
            _ => "n/a".into(),
        };
        println!(
            "| {prefetch} | {n} | {} | {} | {share} | {} |",
            rate(component),
            rate(ceiling),
            mb(component.and_then(|c| c.peak_rss_kb))
        );
    }
    println!();
    let ready = median(results.startups.iter().map(|s| s.ready).collect());
    let on_broker = median(
        results
            .startups
            .iter()
            .filter_map(|s| s.on_broker)
            .collect(),
    );
    let idle = {
        let mut kb: Vec<u64> = results
            .startups
            .iter()
            .filter_map(|s| s.idle_rss_kb)
            .collect();
        kb.sort();
        kb.get(kb.len() / 2).copied()
    };
    let ms = |d: Option<Duration>| {
        d.map_or("n/a".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
    };
    println!(
        "idle RSS: {} (goal < 20 MB); ready to consume: {} median of {} starts (goal < 50 ms); consumer visible on the broker: {}",
        mb(idle),
        ms(ready),
        results.startups.len(),
        ms(on_broker)
    );
    let warn: Vec<String> = PREFETCHES
        .iter()
        .filter_map(|p| {
            let w = best(results.component.get(&(*p, "warn")))?;
            let i = best(results.component.get(&(*p, "info")));
            Some(format!(
                "prefetch {p}: {:.0} msg/s at warn vs {} at info",
                w.rate(),
                i.map_or("n/a".into(), |i| format!("{:.0}", i.rate()))
            ))
        })
        .collect();
    if !warn.is_empty() {
        println!(
            "LOG_LEVEL=warn (clock starts when the consumer shows on the broker): {}",
            warn.join("; ")
        );
    }
    println!();
    println!("Runs:");
    for s in &results.startups {
        println!(
            "- start: consuming after {}, on the broker after {}, idle RSS {} (anon {}, file {}, {} threads)",
            ms(Some(s.ready)),
            ms(s.on_broker),
            mb(s.idle_rss_kb),
            mb(s.idle_split.0),
            mb(s.idle_split.1),
            s.idle_split.2.map_or("?".into(), |t| t.to_string()),
        );
    }
    for ((prefetch, level), runs) in &results.component {
        for r in runs {
            println!(
                "- component prefetch {prefetch} LOG_LEVEL={level}: {}",
                r.detail
            );
        }
    }
    for (prefetch, runs) in &results.ceiling {
        for r in runs {
            println!("- ceiling prefetch {prefetch}: {}", r.detail);
        }
    }
    for note in &results.notes {
        println!("note: {note}");
    }
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let results: Shared = Arc::default();
    let shared = results.clone();
    let outcome = common::run("sailor_throughput", GLOBAL_TIMEOUT, bench(shared));
    print_report(&results.lock().unwrap());
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("\nINCOMPLETE: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(results: Shared) -> Result<(), String> {
    let started = Instant::now();
    let rabbit = Rabbit::start().await;
    eprintln!(
        "broker up after {:.1} s on port {}",
        started.elapsed().as_secs_f64(),
        rabbit.port()
    );
    let platform = Platform::start("task-user", PLATFORM_KEY, STORAGE_TOKEN).await;

    // Start-up and idle memory.
    let topology = rabbit.declare_topology("idle").await;
    for i in 0..STARTS {
        let fake = FakeOpenAi::start().await;
        set_step(&platform, &fake);
        let startup = measure_start(&rabbit, &platform, &topology).await?;
        eprintln!(
            "start {}: consuming after {:?}, idle RSS {}",
            i + 1,
            startup.ready,
            mb(startup.idle_rss_kb)
        );
        results.lock().unwrap().startups.push(startup);
    }

    for prefetch in prefetches() {
        let n = n_for(prefetch);
        // Interleaved so drift (the broker's memory, page cache) hits both sides alike.
        let mut sample = None;
        for round in 0..RUNS {
            let run = component_run(&rabbit, &platform, prefetch, n, "info").await?;
            eprintln!(
                "prefetch {prefetch} component round {round}: {}",
                run.0.detail
            );
            sample.get_or_insert(run.1);
            results
                .lock()
                .unwrap()
                .component
                .entry((prefetch, "info"))
                .or_default()
                .push(run.0);
            let sample = sample.as_ref().expect("a sample output");
            let run = ceiling_run(&rabbit, prefetch, n, sample).await?;
            eprintln!("prefetch {prefetch} ceiling round {round}: {}", run.detail);
            results
                .lock()
                .unwrap()
                .ceiling
                .entry(prefetch)
                .or_default()
                .push(run);
        }
        let run = component_run(&rabbit, &platform, prefetch, n, "warn").await?;
        eprintln!("prefetch {prefetch} component at warn: {}", run.0.detail);
        results
            .lock()
            .unwrap()
            .component
            .entry((prefetch, "warn"))
            .or_default()
            .push(run.0);
    }
    drop(platform);
    drop(rabbit);
    Ok(())
}

fn set_step(platform: &Platform, fake: &FakeOpenAi) {
    let config = json!({"apiKey": API_KEY, "baseUrl": fake.base_url(), "model": "gpt-4o-mini"});
    platform.set_step(
        json!({"config": config, "snapshot": {}, "is_passthrough": false}),
        0,
    );
}

// ---------------------------------------------------------------------------------------------
// The step process
// ---------------------------------------------------------------------------------------------

/// What the step's log shows, read from its stdout/stderr as it runs.
#[derive(Default)]
struct LogStats {
    lines: usize,
    /// `level` ≥ 40 (bunyan warn), first few kept.
    warnings: Vec<String>,
    warning_count: usize,
    tail: std::collections::VecDeque<String>,
}

struct Step {
    child: Child,
    pid: u32,
    spawned: Instant,
    ready: tokio::sync::watch::Receiver<Option<Instant>>,
    logs: Arc<Mutex<LogStats>>,
}

impl Step {
    fn spawn(
        rabbit: &Rabbit,
        platform: &Platform,
        topology: &Topology,
        prefetch: u16,
        level: &str,
    ) -> Step {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"));
        command
            .arg("sailor")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let amqp_uri = step_amqp_uri(rabbit);
        let platform_uri = platform.uri();
        let vars = support::StepEnv {
            platform_uri: &platform_uri,
            platform_key: PLATFORM_KEY,
            amqp_uri: &amqp_uri,
            topology,
            crypto_password: PASSWORD,
            crypto_iv: IV,
            storage_token: STORAGE_TOKEN,
        }
        .vars();
        command
            .envs(vars)
            .env("ELASTICIO_RABBITMQ_PREFETCH_SAILOR", prefetch.to_string());
        let spawned = Instant::now();
        let mut child = command.spawn().expect("the binary starts");
        let pid = child.id().expect("a pid");
        common::PIDS.lock().unwrap().push(pid);
        let (ready_tx, ready) = tokio::sync::watch::channel(None);
        let ready_tx = Arc::new(ready_tx);
        let logs = Arc::new(Mutex::new(LogStats::default()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            let ready_tx = ready_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // Cheap checks first: at info the step writes three lines per message.
                    if line.contains("\"consuming\"") && ready_tx.borrow().is_none() {
                        let now = Instant::now();
                        let parsed: Value = serde_json::from_str(&line).unwrap_or_default();
                        if parsed["msg"] == "consuming" {
                            let _ = ready_tx.send(Some(now));
                        }
                    }
                    let mut logs = logs.lock().unwrap();
                    logs.lines += 1;
                    if line.contains("\"level\":40")
                        || line.contains("\"level\":50")
                        || line.contains("\"level\":60")
                        || !line.starts_with('{')
                    {
                        logs.warning_count += 1;
                        if logs.warnings.len() < 5 {
                            logs.warnings.push(line.clone());
                        }
                    }
                    logs.tail.push_back(line);
                    if logs.tail.len() > 20 {
                        logs.tail.pop_front();
                    }
                }
            });
        }
        Step {
            child,
            pid,
            spawned,
            ready,
            logs,
        }
    }

    /// Waits for the `consuming` line.
    async fn wait_ready(&mut self) -> Result<Instant, String> {
        let waited = tokio::time::timeout(READY_TIMEOUT, self.ready.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|seen| seen.ok().and_then(|at| *at));
        waited.ok_or_else(|| {
            format!(
                "the step did not log `consuming` within {READY_TIMEOUT:?}:\n{}",
                self.tail()
            )
        })
    }

    fn tail(&self) -> String {
        let logs = self.logs.lock().unwrap();
        logs.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn status(&self, field: &str) -> Option<u64> {
        proc_status_kb(self.pid, field)
    }

    /// SIGTERM, then waits for a clean exit (kills after 20 s). Returns a problem, if any.
    async fn stop(mut self) -> Option<String> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let problem = match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!("the step exited with {status}:\n{}", self.tail())),
            Ok(Err(e)) => Some(format!("waiting for the step: {e}")),
            Err(_) => {
                let _ = self.child.start_kill();
                Some("the step did not exit within 20 s of SIGTERM; killed".into())
            }
        };
        common::PIDS.lock().unwrap().retain(|p| *p != self.pid);
        problem
    }
}

/// The broker URI the step gets; `SAILOR_BENCH_AMQP_QUERY` (e.g. `frame_max=8192`) is appended
/// to try connection settings without touching the component.
fn step_amqp_uri(rabbit: &Rabbit) -> String {
    match std::env::var("SAILOR_BENCH_AMQP_QUERY") {
        Ok(query) if !query.is_empty() => format!("{}?{query}", rabbit.amqp_uri()),
        _ => rabbit.amqp_uri(),
    }
}

/// Polls the queue's consumer count on one channel until it is positive.
async fn wait_consumer(channel: &Channel, queue: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        if declared.consumer_count() > 0 {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

async fn measure_start(
    rabbit: &Rabbit,
    platform: &Platform,
    topology: &Topology,
) -> Result<Startup, String> {
    let probe = rabbit.connect().await;
    let channel = probe.create_channel().await.map_err(|e| e.to_string())?;
    let mut step = Step::spawn(rabbit, platform, topology, 1, "info");
    let on_broker = wait_consumer(&channel, &topology.input_queue, READY_TIMEOUT).await;
    let ready = step.wait_ready().await?;
    let _ = probe.close(200, "bye".into()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kb = step.status("VmRSS");
    let idle_split = (
        step.status("RssAnon"),
        step.status("RssFile"),
        step.status("Threads"),
    );
    let spawned = step.spawned;
    if let Some(problem) = step.stop().await {
        return Err(problem);
    }
    Ok(Startup {
        ready: ready - spawned,
        on_broker: on_broker.map(|t| t - spawned),
        idle_rss_kb,
        idle_split,
    })
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

const SYSTEM: &str = "You are a careful assistant for the customer-service team of a logistics \
company. Answer in plain English, in at most three short paragraphs, and never invent order \
numbers, dates or amounts: when something is not in the customer's message, say that it must be \
checked in the order system. Keep a friendly, professional tone and end with one concrete next step.";

/// N encrypted input messages (protocol 1), each ~1 KB of chat request, with unique messageIds.
fn inputs(n: usize) -> Vec<(Vec<u8>, BasicProperties)> {
    let cipher = cipher();
    (0..n)
        .map(|i| {
            let id = uuid::Uuid::new_v4().to_string();
            let user = format!(
                "Hello, this is ticket #{i:06}. Our order of 48 pallets of packaging material was \
                 due at the Rotterdam warehouse on Tuesday, but the tracking page still shows it \
                 in transit and nobody has called us. The invoice was already paid in full. Can \
                 you tell us where the shipment is, when it will arrive and whether we will be \
                 compensated for the delay? Please answer today if at all possible."
            );
            let body = json!({
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": user}
                ],
                "temperature": 0.2
            });
            let message =
                json!({"id": id, "body": body, "headers": {}, "attachments": {}, "metadata": {}});
            let content = cipher.encode(&serde_json::to_vec(&message).expect("json"), 1);
            let headers = json!({
                "messageId": id, "parentMessageId": format!("parent-{i}"), "threadId": "thread-1",
                "stepId": "step_1", "execId": "exec-0", "protocolVersion": 1,
                "x-eio-meta-trace-id": format!("trace-{i}")
            });
            let properties = BasicProperties::default()
                .with_headers(support::rabbit::json_to_table(&headers))
                // sailor's default (AMQP_PERSISTENT_MESSAGES unset): transient messages.
                .with_delivery_mode(1);
            (content, properties)
        })
        .collect()
}

/// Publishes everything to `queue` on one confirm channel, 500 confirms in flight at most.
async fn prefill(
    rabbit: &Rabbit,
    queue: &str,
    messages: &[(Vec<u8>, BasicProperties)],
) -> Result<(), String> {
    let connection = rabbit.connect().await;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    for chunk in messages.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (payload, properties) in chunk {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    payload,
                    properties.clone(),
                )
                .await
                .map_err(|e| e.to_string())?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirm = confirm.await.map_err(|e| e.to_string())?;
            if confirm.is_nack() {
                return Err("the broker nacked a pre-filled message".into());
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sinks: auto-ack consumers on the output queues
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SinkState {
    first: Option<Instant>,
    nth: Option<Instant>,
    sample: Option<(Vec<u8>, BasicProperties)>,
    parents: HashSet<String>,
}

struct Sink {
    connection: Connection,
    count: Arc<AtomicUsize>,
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    async fn start(rabbit: &Rabbit, queue: &str, n: usize) -> Result<Sink, String> {
        let connection = rabbit.connect().await;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "bench-sink".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(Mutex::new(SinkState::default()));
        let (c, s) = (count.clone(), state.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let seen = c.fetch_add(1, Ordering::SeqCst) + 1;
                let mut state = s.lock().unwrap();
                state.first.get_or_insert(now);
                if seen == n {
                    state.nth = Some(now);
                }
                if state.sample.is_none() {
                    state.sample = Some((delivery.data.clone(), delivery.properties.clone()));
                }
                let parent = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("parentMessageId").cloned());
                if let Some(parent) = parent {
                    state.parents.insert(format!("{parent:?}"));
                }
            }
        });
        Ok(Sink {
            connection,
            count,
            state,
        })
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Closes the connection and hands back what was recorded.
    async fn close(self) -> SinkState {
        let _ = self.connection.close(200, "bye".into()).await;
        let mut state = self.state.lock().unwrap();
        std::mem::take(&mut *state)
    }
}

/// Waits until `data` has `n` results or `data + errors` reaches `n` (or the run timeout).
async fn wait_done(data: &Sink, errors: &Sink, n: usize) {
    let deadline = Instant::now() + RUN_TIMEOUT;
    while data.count() < n && data.count() + errors.count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

/// One component run; also returns one of its outputs (payload and properties) for the ceiling.
async fn component_run(
    rabbit: &Rabbit,
    platform: &Platform,
    prefetch: u16,
    n: usize,
    level: &'static str,
) -> Result<(Run, (Vec<u8>, BasicProperties)), String> {
    let topology = rabbit.declare_topology("bench").await;
    prefill(rabbit, &topology.input_queue, &inputs(n)).await?;
    let fake = FakeOpenAi::start().await;
    set_step(platform, &fake);
    let data = Sink::start(rabbit, &topology.data_queue, n).await?;
    let errors = Sink::start(rabbit, &topology.error_queue, n).await?;
    let probe = rabbit.connect().await;
    let channel = probe.create_channel().await.map_err(|e| e.to_string())?;

    let mut step = Step::spawn(rabbit, platform, &topology, prefetch, level);
    let start = if level == "info" {
        step.wait_ready().await?
    } else {
        wait_consumer(&channel, &topology.input_queue, READY_TIMEOUT)
            .await
            .ok_or_else(|| format!("the step never consumed:\n{}", step.tail()))?
    };
    let broker = broker_pid(rabbit);
    let cpu_before = Cpu::now(Some(step.pid), broker);
    wait_done(&data, &errors, n).await;
    let cpu = Cpu::now(Some(step.pid), broker).since(&cpu_before, n);
    let peak = step.status("VmHWM");
    let (got, failed) = (data.count(), errors.count());
    let (lines, warnings, first_warnings) = {
        let logs = step.logs.lock().unwrap();
        (logs.lines, logs.warning_count, logs.warnings.clone())
    };
    let stopped = step.stop().await;
    let _ = probe.close(200, "bye".into()).await;
    let upstream = fake.chat_requests().len();
    let left = rabbit.depth(&topology.input_queue).await;
    let state = data.close().await;
    errors.close().await;
    if got < n {
        return Err(format!(
            "prefetch {prefetch} {level}: only {got} of {n} results ({failed} errors, {left} left in the input queue); first warnings: {first_warnings:#?}"
        ));
    }
    let nth = state.nth.expect("n results seen");
    let first = state.first.expect("a first result");
    let sample = state.sample.expect("a sample");
    let run = Run {
        n,
        elapsed: nth - start,
        steady: nth - first,
        peak_rss_kb: peak,
        detail: String::new(),
    };
    let mut detail = format!(
        "{n} in {:.2} s = {:.0} msg/s (first→last result {:.0} msg/s), peak RSS {}, \
         upstream requests {upstream}, distinct parents {}, errors {failed}, log lines {lines} \
         ({warnings} warn+), output {} B; {cpu}",
        run.elapsed.as_secs_f64(),
        run.rate(),
        (n - 1) as f64 / run.steady.as_secs_f64(),
        mb(peak),
        state.parents.len(),
        sample.0.len(),
    );
    if let Some(problem) = stopped {
        detail.push_str(&format!("; STOP PROBLEM: {problem}"));
    }
    if !first_warnings.is_empty() {
        detail.push_str(&format!("; first warnings: {first_warnings:?}"));
    }
    Ok((Run { detail, ..run }, sample))
}

/// CPU time used by the step, the broker and this process, for a CPU budget per message.
struct Cpu {
    step: Option<u64>,
    broker: Option<u64>,
    bench: Option<u64>,
    /// Machine-wide (busy, total) jiffies from `/proc/stat`: other processes count too.
    machine: Option<(u64, u64)>,
    at: Instant,
}

impl Cpu {
    fn now(step: Option<u32>, broker: Option<u32>) -> Cpu {
        Cpu {
            step: step.and_then(proc_cpu_ms),
            broker: broker.and_then(proc_cpu_ms),
            bench: proc_cpu_ms(std::process::id()),
            machine: machine_jiffies(),
            at: Instant::now(),
        }
    }

    /// `CPU per message: step X µs, broker Y µs, bench Z µs; busy B% of the machine`.
    fn since(&self, before: &Cpu, n: usize) -> String {
        let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b)),
            _ => None,
        };
        let parts = [
            ("step", per(self.step, before.step)),
            ("broker", per(self.broker, before.broker)),
            (
                "bench (fake OpenAI, sinks, loop)",
                per(self.bench, before.bench),
            ),
        ];
        let total: u64 = parts.iter().filter_map(|(_, ms)| *ms).sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = (self.at - before.at).as_secs_f64() * 1e3;
        let text: Vec<String> = parts
            .iter()
            .filter_map(|(name, ms)| {
                Some(format!("{name} {:.0} µs", (*ms)? as f64 * 1e3 / n as f64))
            })
            .collect();
        let machine = match (self.machine, before.machine) {
            (Some((b1, t1)), Some((b0, t0))) if t1 > t0 => {
                format!("{:.0}%", 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => "n/a".into(),
        };
        format!(
            "CPU per message: {}; together {:.0}% of {cores} cores, machine busy {machine}",
            text.join(", "),
            100.0 * total as f64 / (wall * cores)
        )
    }
}

/// The broker's Erlang VM (from the pid file the harness has it write).
fn broker_pid(rabbit: &Rabbit) -> Option<u32> {
    std::fs::read_to_string(rabbit.dir().join("rabbit.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The bare loop: consume (prefetch) → publish `sample` with confirm → ack, a task per delivery.
async fn ceiling_run(
    rabbit: &Rabbit,
    prefetch: u16,
    n: usize,
    sample: &(Vec<u8>, BasicProperties),
) -> Result<Run, String> {
    let topology = rabbit.declare_topology("ceiling").await;
    prefill(rabbit, &topology.input_queue, &inputs(n)).await?;
    let data = Sink::start(rabbit, &topology.data_queue, n).await?;
    let errors = Sink::start(rabbit, &topology.error_queue, n).await?;

    let read = rabbit.connect().await;
    let write = rabbit.connect().await;
    let out = write.create_channel().await.map_err(|e| e.to_string())?;
    out.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = read.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            topology.input_queue.as_str().into(),
            "bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let broker = broker_pid(rabbit);
    let cpu_before = Cpu::now(None, broker);
    let payload = Arc::new(sample.0.clone());
    let properties = sample.1.clone();
    let exchange = topology.exchange.clone();
    let key = topology.data_key.clone();
    let failures = Arc::new(AtomicUsize::new(0));
    let failed = failures.clone();
    let loop_task = tokio::spawn(async move {
        let mut taken = 0;
        while taken < n {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            taken += 1;
            let (out, payload, properties) = (out.clone(), payload.clone(), properties.clone());
            let (exchange, key, failed) = (exchange.clone(), key.clone(), failed.clone());
            tokio::spawn(async move {
                let confirmed = async {
                    out.basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &payload,
                        properties,
                    )
                    .await?
                    .await
                }
                .await;
                match confirmed {
                    Ok(confirm) if confirm.is_ack() => {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    wait_done(&data, &errors, n).await;
    let cpu = Cpu::now(None, broker).since(&cpu_before, n);
    loop_task.abort();
    let got = data.count();
    let _ = read.close(200, "bye".into()).await;
    let _ = write.close(200, "bye".into()).await;
    let state = data.close().await;
    errors.close().await;
    let failed = failures.load(Ordering::SeqCst);
    if got < n {
        return Err(format!(
            "ceiling prefetch {prefetch}: only {got} of {n} results ({failed} failed publishes)"
        ));
    }
    let nth = state.nth.expect("n results seen");
    let first = state.first.expect("a first result");
    let run = Run {
        n,
        elapsed: nth - start,
        steady: nth - first,
        peak_rss_kb: None,
        detail: String::new(),
    };
    let detail = format!(
        "{n} in {:.2} s = {:.0} msg/s (first→last result {:.0} msg/s), failed publishes {failed}; {cpu}",
        run.elapsed.as_secs_f64(),
        run.rate(),
        (n - 1) as f64 / run.steady.as_secs_f64(),
    );
    Ok(Run { detail, ..run })
}
