//! HTTP gateway (`chatgpt-component serve`) throughput, latency and memory, release binary.
//!
//! Everything on loopback: an in-process fake OpenAI, the gateway as a child process pointed at
//! it, and an in-process load generator (reqwest, one task per connection). The bench
//!
//! 1. for upstream latencies of 0 ms (CPU-bound worst case) and 20 ms (closer to a real model),
//!    starts a fake OpenAI with that latency and a gateway in front of it, warms both up, then
//!    measures N requests at C connections, alternating (best of three each):
//!    - the ceiling: the same chat completion sent straight to the fake's
//!      `POST /v1/chat/completions`;
//!    - through the gateway: `POST /` with `Process-Mode: sync` and the same ~200-byte text;
//! 2. starts a fake answering after 5 s and a fresh gateway in front of it, reads the gateway's
//!    idle RSS, fires 1,000 concurrent sync requests, samples `VmRSS` once all 1,000 have reached
//!    the fake (so all are in flight) and before any answer arrives, then `VmHWM` at the end;
//! 3. prints a markdown table and the goal lines.
//!
//! Every response is checked (status 200, a non-empty `content`); errors are counted, the first
//! few printed, and any error makes the bench exit non-zero.
//!
//! `cargo bench --bench gateway_load`. `GATEWAY_BENCH_N` (default 5000) and `GATEWAY_BENCH_C`
//! (default 64) override N and C; `GATEWAY_BENCH_LATENCIES=20` runs only those upstream
//! latencies (a comma list of milliseconds; `none`: the memory test only). Everything is
//! bounded by a global timeout; on expiry what was measured is printed and the bench exits
//! non-zero. Gateways are killed on drop (and by a watchdog thread if even that hangs); the
//! gateway logs at `LOG_LEVEL=warn`.

mod common;

use common::{machine_jiffies, proc_cpu_ms, proc_status_kb};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_openai::{FakeOpenAi, Options};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

const API_KEY: &str = "sk-bench-0000";
const MODEL: &str = "gpt-4o-mini";
/// ~200 bytes of user text, the prompt of every request.
const PROMPT: &str = "Hello, this is ticket #004217. Our 48 pallets of packaging were due at the \
Rotterdam warehouse on Tuesday, but tracking still shows them in transit. Where is the shipment \
and when will it arrive?";

/// Everything.
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(480);
/// Spawn → `GET /healthz` answers.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// One request, as the load generator sees it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests sent to each target before it is measured.
const WARMUP: usize = 300;
/// Alternating ceiling/gateway rounds per latency; the best of each is reported.
const RUNS: usize = 3;
const LATENCIES_MS: [u64; 2] = [0, 20];
/// The gateway's `concurrency` and `queue_size` for the throughput runs (C is far below).
const LOAD_CONCURRENCY: usize = 512;
const LOAD_QUEUE: usize = 2048;

/// The memory test: this many sync requests held by an upstream this slow.
const IN_FLIGHT: usize = 1000;
const SLOW_UPSTREAM: Duration = Duration::from_secs(3);
/// The memory test's gateway `concurrency`: the default (64 upstream calls, the rest waiting
/// in the queue), then all 1,000 upstream at once.
const MEMORY_CONCURRENCY: [usize; 2] = [64, IN_FLIGHT + 100];

const SHARE_GOAL: f64 = 0.90;
const RSS_GOAL_MB: f64 = 64.0;

/// `GATEWAY_BENCH_LATENCIES`: which of [`LATENCIES_MS`] to run (all by default).
fn latencies() -> Vec<u64> {
    match std::env::var("GATEWAY_BENCH_LATENCIES") {
        Ok(list) => list
            .split(',')
            .filter_map(|l| l.trim().parse().ok())
            .filter(|l| LATENCIES_MS.contains(l))
            .collect(),
        Err(_) => LATENCIES_MS.to_vec(),
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ceiling,
    Gateway,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ceiling => "ceiling: straight to the fake upstream",
            Kind::Gateway => "gateway: POST / (Process-Mode: sync)",
        }
    }
}

struct Run {
    kind: Kind,
    latency_ms: u64,
    n: usize,
    c: usize,
    elapsed: Duration,
    ok: usize,
    errors: usize,
    p50: Duration,
    p99: Duration,
    first_errors: Vec<String>,
    cpu: String,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn detail(&self) -> String {
        format!(
            "{} at {} ms, N={} C={}: {} ok in {:.2} s = {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, \
             {} errors; {}",
            self.kind.name(),
            self.latency_ms,
            self.n,
            self.c,
            self.ok,
            self.elapsed.as_secs_f64(),
            self.rate(),
            ms(self.p50),
            ms(self.p99),
            self.errors,
            self.cpu
        )
    }
}

#[derive(Default)]
struct Memory {
    /// The gateway's `concurrency`: calls upstream at once; the rest wait in its queue.
    concurrency: usize,
    idle_kb: Option<u64>,
    /// Highest `VmRSS` sampled while all requests were in flight, and `RssAnon` then.
    in_flight_kb: Option<u64>,
    in_flight_anon_kb: Option<u64>,
    idle_anon_kb: Option<u64>,
    samples: usize,
    /// `VmHWM` once every answer is back.
    hwm_kb: Option<u64>,
    threads: Option<u64>,
    /// First request sent → the fake holds all of them.
    all_in_after: Option<Duration>,
    ok: usize,
    errors: usize,
    first_errors: Vec<String>,
}

#[derive(Default)]
struct Results {
    runs: Vec<Run>,
    memory: Vec<Memory>,
    notes: Vec<String>,
}

type Shared = Arc<Mutex<Results>>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0))
}

fn best(results: &Results, kind: Kind, latency_ms: u64) -> Option<&Run> {
    results
        .runs
        .iter()
        .filter(|r| r.kind == kind && r.latency_ms == latency_ms)
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Prints the report; returns how many failed requests it saw.
fn print_report(results: &Results) -> usize {
    println!();
    println!("## gateway load (release binary, in-process fake OpenAI, loopback, LOG_LEVEL=warn)");
    println!();
    println!("Best of {RUNS} alternating runs per row; latencies are per request, sent → whole answer read.");
    println!();
    println!("| scenario | upstream latency | N | C | req/s | p50 ms | p99 ms | gateway / ceiling | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut shares = Vec::new();
    for latency in LATENCIES_MS {
        let ceiling = best(results, Kind::Ceiling, latency);
        for kind in [Kind::Ceiling, Kind::Gateway] {
            let Some(run) = best(results, kind, latency) else {
                println!(
                    "| {} | {latency} ms | n/a | n/a | n/a | n/a | n/a | n/a | n/a |",
                    kind.name()
                );
                continue;
            };
            let share = match (kind, ceiling) {
                (Kind::Gateway, Some(c)) => {
                    let share = run.rate() / c.rate();
                    shares.push((latency, share));
                    format!("{:.0}%", 100.0 * share)
                }
                (Kind::Ceiling, _) => "100%".into(),
                _ => "n/a".into(),
            };
            let errors: usize = results
                .runs
                .iter()
                .filter(|r| r.kind == kind && r.latency_ms == latency)
                .map(|r| r.errors)
                .sum();
            println!(
                "| {} | {latency} ms | {} | {} | {:.0} | {:.2} | {:.2} | {share} | {errors} |",
                kind.name(),
                run.n,
                run.c,
                run.rate(),
                ms(run.p50),
                ms(run.p99),
            );
        }
    }
    println!();
    for m in &results.memory {
        let upstream = m.concurrency.min(IN_FLIGHT);
        println!(
            "- concurrency {}: {upstream} upstream at once, {} waiting in the gateway's queue",
            m.concurrency,
            IN_FLIGHT - upstream
        );
        println!(
            "  - idle RSS (fresh process, before any request): {} (anonymous {})",
            mb(m.idle_kb),
            mb(m.idle_anon_kb)
        );
        println!(
            "  - RSS with {IN_FLIGHT} sync requests in flight (upstream answering after {:.0} s): {} \
             (anonymous {}, {} per request over idle; highest of {} samples; all {IN_FLIGHT} in \
             the gateway {} after the first was sent; {} threads)",
            SLOW_UPSTREAM.as_secs_f64(),
            mb(m.in_flight_kb),
            mb(m.in_flight_anon_kb),
            match (m.in_flight_anon_kb, m.idle_anon_kb) {
                (Some(busy), Some(idle)) => format!(
                    "{:.0} KB",
                    busy.saturating_sub(idle) as f64 / IN_FLIGHT as f64
                ),
                _ => "n/a".into(),
            },
            m.samples,
            m.all_in_after
                .map_or("never".into(), |d| format!("{:.0} ms", ms(d))),
            m.threads.map_or("?".into(), |t| t.to_string()),
        );
        println!(
            "  - peak RSS (VmHWM) after all {IN_FLIGHT} answers: {} ({} ok, {} errors)",
            mb(m.hwm_kb),
            m.ok,
            m.errors
        );
    }
    if results.memory.is_empty() {
        println!("- memory test: not run");
    }
    println!();
    let share_text: Vec<String> = shares
        .iter()
        .map(|(latency, share)| {
            format!(
                "{latency} ms: {:.0}% {}",
                100.0 * share,
                met(*share >= SHARE_GOAL)
            )
        })
        .collect();
    println!(
        "goal: >= {:.0}% of ceiling: {}",
        100.0 * SHARE_GOAL,
        if share_text.is_empty() {
            "n/a".to_string()
        } else {
            share_text.join("; ")
        }
    );
    let peaks: Vec<String> = results
        .memory
        .iter()
        .filter_map(|m| Some((m.concurrency, m.in_flight_kb.max(m.hwm_kb)?)))
        .map(|(concurrency, kb)| {
            format!(
                "concurrency {concurrency}: {} {}",
                mb(Some(kb)),
                met((kb as f64 / 1024.0) < RSS_GOAL_MB)
            )
        })
        .collect();
    println!(
        "goal: < {RSS_GOAL_MB:.0} MB with 1,000 in flight (the higher of in-flight RSS and VmHWM): {}",
        if peaks.is_empty() {
            "n/a".to_string()
        } else {
            peaks.join("; ")
        }
    );
    println!();
    println!("Runs:");
    for run in &results.runs {
        println!("- {}", run.detail());
    }
    let mut failed = 0;
    for run in &results.runs {
        failed += run.errors;
        for error in &run.first_errors {
            println!(
                "  error ({}, {} ms): {error}",
                run.kind.name(),
                run.latency_ms
            );
        }
    }
    for m in &results.memory {
        failed += m.errors;
        for error in &m.first_errors {
            println!("  error (memory test): {error}");
        }
    }
    for note in &results.notes {
        println!("note: {note}");
    }
    failed
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let results: Shared = Arc::default();
    let shared = results.clone();
    let outcome = common::run("gateway_load", GLOBAL_TIMEOUT, bench(shared));
    let failed = print_report(&results.lock().unwrap());
    match outcome {
        Ok(()) if failed == 0 => ExitCode::SUCCESS,
        Ok(()) => {
            println!("\nFAILED: {failed} requests got no proper answer (see the errors above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nINCOMPLETE: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(results: Shared) -> Result<(), String> {
    let n = env_number("GATEWAY_BENCH_N", 5000);
    let c = env_number("GATEWAY_BENCH_C", 64);
    if let Some(limit) = open_files_limit() {
        // The memory test holds 2,000 sockets here (client and fake ends) and as many in the
        // gateway, which inherits the limit.
        if limit < (2 * IN_FLIGHT + 200) as u64 {
            results.lock().unwrap().notes.push(format!(
                "the open-files limit is {limit}: the {IN_FLIGHT}-in-flight test needs about {}; raise it with `ulimit -n`",
                2 * IN_FLIGHT + 200
            ));
        }
    }
    let client = load_client(c);
    for latency_ms in latencies() {
        let fake = FakeOpenAi::start_with(Options {
            latency: Duration::from_millis(latency_ms),
            api_key: Some(API_KEY.into()),
            ..Options::default()
        })
        .await;
        let mut gateway = GatewayProcess::start(&fake, LOAD_CONCURRENCY, LOAD_QUEUE).await?;
        let targets = [
            (Kind::Ceiling, Target::upstream(&fake)),
            (Kind::Gateway, Target::gateway(&gateway)),
        ];
        for (kind, target) in &targets {
            let warm = load(&client, target, WARMUP, c).await;
            if warm.errors > 0 {
                return Err(format!(
                    "warming up {} at {latency_ms} ms: {} errors, first: {:?}\n{}",
                    kind.name(),
                    warm.errors,
                    warm.first_errors,
                    gateway.tail()
                ));
            }
        }
        for round in 0..RUNS {
            for (kind, target) in &targets {
                let pid = (*kind == Kind::Gateway).then_some(gateway.pid);
                let before = Cpu::now(pid);
                let outcome = load(&client, target, n, c).await;
                let cpu = Cpu::now(pid).since(&before, n);
                let run = outcome.into_run(*kind, latency_ms, n, c, cpu);
                eprintln!("round {}: {}", round + 1, run.detail());
                results.lock().unwrap().runs.push(run);
            }
        }
        let (lines, first) = gateway.warnings();
        if lines > 0 {
            results.lock().unwrap().notes.push(format!(
                "the gateway logged {lines} lines at warn level during the {latency_ms} ms runs, first: {first:?}"
            ));
        }
        if let Some(problem) = gateway.stop().await {
            results.lock().unwrap().notes.push(problem);
        }
        drop(fake);
    }
    for concurrency in MEMORY_CONCURRENCY {
        let memory = memory_test(&results, concurrency).await?;
        results.lock().unwrap().memory.push(memory);
    }
    Ok(())
}

/// The soft `Max open files` of this process (the gateway inherits it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

struct GatewayProcess {
    child: Child,
    pid: u32,
    port: u16,
    dir: PathBuf,
    /// stderr lines: count, first few, last few.
    log: Arc<Mutex<Log>>,
}

#[derive(Default)]
struct Log {
    lines: usize,
    first: Vec<String>,
    tail: VecDeque<String>,
}

impl GatewayProcess {
    /// Writes a config pointing at `fake`, spawns `serve` and waits for `GET /healthz`.
    async fn start(
        fake: &FakeOpenAi,
        concurrency: usize,
        queue_size: usize,
    ) -> Result<GatewayProcess, String> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gateway-load-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port()?;
        let config = format!(
            "token: {API_KEY}\n\
             base_url: {}\n\
             bind: 127.0.0.1\n\
             port: {port}\n\
             model: {MODEL}\n\
             everyday_limit: unlimited\n\
             concurrency: {concurrency}\n\
             queue_size: {queue_size}\n\
             data_dir: {}\n",
            fake.base_url(),
            dir.join("data").display()
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| format!("config: {e}"))?;

        let mut command = Command::new(env!("CARGO_BIN_EXE_chatgpt-component"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the gateway: {e}"))?;
        let pid = child.id().ok_or("the gateway has no pid")?;
        common::PIDS.lock().unwrap().push(pid);
        let log = Arc::new(Mutex::new(Log::default()));
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.lines += 1;
                if log.first.len() < 5 {
                    log.first.push(line.clone());
                }
                log.tail.push_back(line);
                if log.tail.len() > 20 {
                    log.tail.pop_front();
                }
            }
        });
        let mut gateway = GatewayProcess {
            child,
            pid,
            port,
            dir,
            log,
        };
        gateway.wait_healthy().await?;
        Ok(gateway)
    }

    async fn wait_healthy(&mut self) -> Result<(), String> {
        let probe = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("{}/healthz", self.url());
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the gateway exited with {status} before it was healthy:\n{}",
                    self.tail()
                ));
            }
            if let Ok(response) = probe.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(format!(
            "the gateway was not healthy within {READY_TIMEOUT:?}:\n{}",
            self.tail()
        ))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn status_kb(&self, field: &str) -> Option<u64> {
        proc_status_kb(self.pid, field)
    }

    fn tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Lines logged (at warn, each one is a warning or worse) and the first few.
    fn warnings(&self) -> (usize, Vec<String>) {
        let log = self.log.lock().unwrap();
        (log.lines, log.first.clone())
    }

    /// SIGTERM, then waits for a clean exit (the gateway drains for up to 25 s; killed after
    /// 30 s). Returns a problem, if any.
    async fn stop(&mut self) -> Option<String> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let problem = match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!(
                "the gateway exited with {status}:\n{}",
                self.tail()
            )),
            Ok(Err(e)) => Some(format!("waiting for the gateway: {e}")),
            Err(_) => {
                let _ = self.child.start_kill();
                Some("the gateway did not exit within 30 s of SIGTERM; killed".into())
            }
        };
        common::PIDS.lock().unwrap().retain(|p| *p != self.pid);
        problem
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // `kill_on_drop` ends the process when `child` drops, right after this.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port (bound, then released for the gateway to take).
fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

// ---------------------------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------------------------

/// CPU used by the gateway and by this process (load generator and fake upstream).
struct Cpu {
    gateway: Option<u64>,
    bench: Option<u64>,
    machine: Option<(u64, u64)>,
}

impl Cpu {
    fn now(gateway: Option<u32>) -> Cpu {
        Cpu {
            gateway: gateway.and_then(proc_cpu_ms),
            bench: proc_cpu_ms(std::process::id()),
            machine: machine_jiffies(),
        }
    }

    /// `CPU per request: gateway X µs, bench Y µs, rest R µs; machine busy Z%`.
    fn since(&self, before: &Cpu, n: usize) -> String {
        let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 * 1e3 / n as f64),
            _ => None,
        };
        let mut parts = Vec::new();
        if let Some(us) = per(self.gateway, before.gateway) {
            parts.push(format!("gateway {us:.0} µs"));
        }
        if let Some(us) = per(self.bench, before.bench) {
            parts.push(format!("bench (client + fake upstream) {us:.0} µs"));
        }
        let mut machine = "n/a".to_string();
        if let (Some((b1, t1)), Some((b0, t0))) = (self.machine, before.machine) {
            if t1 > t0 {
                machine = format!("{:.0}%", 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64);
                // Busy jiffies (10 ms each) charged to neither process: the loopback network's
                // softirq work, and anything else running on the machine.
                let ours: f64 = [
                    per(self.gateway, before.gateway),
                    per(self.bench, before.bench),
                ]
                .iter()
                .flatten()
                .sum();
                let busy = (b1 - b0) as f64 * 10.0 * 1e3 / n as f64;
                parts.push(format!(
                    "rest (kernel softirq, other processes) {:.0} µs",
                    (busy - ours).max(0.0)
                ));
            }
        }
        format!(
            "CPU per request: {}; machine busy {machine}",
            parts.join(", ")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

fn load_client(c: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(c.max(IN_FLIGHT))
        .pool_idle_timeout(Duration::from_secs(120))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("reqwest client")
}

/// Where requests go and how each answer is checked.
#[derive(Clone)]
enum Target {
    /// `POST {base}/chat/completions` with a chat-completion body.
    Upstream { url: String, body: Bytes },
    /// `POST /` with `Process-Mode: sync` and the prompt as text.
    Gateway { url: String, body: Bytes },
}

impl Target {
    fn upstream(fake: &FakeOpenAi) -> Target {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]});
        Target::Upstream {
            url: format!("{}/chat/completions", fake.base_url()),
            body: Bytes::from(serde_json::to_vec(&body).expect("json")),
        }
    }

    fn gateway(gateway: &GatewayProcess) -> Target {
        Target::Gateway {
            url: format!("{}/", gateway.url()),
            body: Bytes::from_static(PROMPT.as_bytes()),
        }
    }

    /// Sends one request and checks its answer.
    async fn send(&self, client: &reqwest::Client) -> Result<(), String> {
        let request = match self {
            Target::Upstream { url, body } => client
                .post(url)
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(body.clone()),
            Target::Gateway { url, body } => client
                .post(url)
                .header("process-mode", "sync")
                .header("content-type", "text/plain; charset=utf-8")
                .body(body.clone()),
        };
        let response = request.send().await.map_err(|e| format!("send: {e}"))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| format!("body: {e}"))?;
        let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        if status != reqwest::StatusCode::OK {
            return Err(format!("status {status}: {}", text()));
        }
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("not JSON ({e}): {}", text()))?;
        let content = match self {
            Target::Upstream { .. } => &value["choices"][0]["message"]["content"],
            Target::Gateway { .. } => {
                if value.get("error").is_some() {
                    return Err(format!("an error in a 200 answer: {}", text()));
                }
                &value["content"]
            }
        };
        match content.as_str() {
            Some(content) if !content.is_empty() => Ok(()),
            _ => Err(format!("no content: {}", text())),
        }
    }
}

struct Outcome {
    elapsed: Duration,
    /// Latencies of the successful requests.
    latencies: Vec<Duration>,
    errors: usize,
    first_errors: Vec<String>,
}

impl Outcome {
    fn into_run(mut self, kind: Kind, latency_ms: u64, n: usize, c: usize, cpu: String) -> Run {
        self.latencies.sort();
        let pick = |q: f64| {
            let len = self.latencies.len();
            if len == 0 {
                return Duration::ZERO;
            }
            let rank = ((q * len as f64).ceil() as usize).clamp(1, len);
            self.latencies[rank - 1]
        };
        Run {
            kind,
            latency_ms,
            n,
            c,
            elapsed: self.elapsed,
            ok: self.latencies.len(),
            errors: self.errors,
            p50: pick(0.50),
            p99: pick(0.99),
            first_errors: self.first_errors,
            cpu,
        }
    }
}

/// `n` requests over `c` connections, each connection sending its next request as soon as the
/// previous answer is read.
async fn load(client: &reqwest::Client, target: &Target, n: usize, c: usize) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..c.min(n) {
        let (client, target, next) = (client.clone(), target.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(n / c + 1);
            let mut errors = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let sent = Instant::now();
                match target.send(&client).await {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(e) => errors.push(e),
                }
            }
            (latencies, errors)
        });
    }
    let mut outcome = Outcome {
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(n),
        errors: 0,
        first_errors: Vec::new(),
    };
    while let Some(joined) = workers.join_next().await {
        let (latencies, errors) = joined.unwrap_or_else(|e| (Vec::new(), vec![e.to_string()]));
        outcome.latencies.extend(latencies);
        outcome.errors += errors.len();
        for e in errors {
            if outcome.first_errors.len() < 5 {
                outcome.first_errors.push(e);
            }
        }
    }
    outcome.elapsed = started.elapsed();
    outcome
}

// ---------------------------------------------------------------------------------------------
// Memory with 1,000 in flight
// ---------------------------------------------------------------------------------------------

async fn memory_test(results: &Shared, concurrency: usize) -> Result<Memory, String> {
    let fake = FakeOpenAi::start_with(Options {
        latency: SLOW_UPSTREAM,
        api_key: Some(API_KEY.into()),
        ..Options::default()
    })
    .await;
    let mut gateway = GatewayProcess::start(&fake, concurrency, IN_FLIGHT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut memory = Memory {
        concurrency,
        idle_kb: gateway.status_kb("VmRSS"),
        idle_anon_kb: gateway.status_kb("RssAnon"),
        ..Memory::default()
    };
    eprintln!("memory test: idle RSS {}", mb(memory.idle_kb));

    let client = load_client(IN_FLIGHT);
    let target = Target::gateway(&gateway);
    let answered = Arc::new(AtomicUsize::new(0));
    let first_sent = Instant::now();
    let mut requests = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (client, target, answered) = (client.clone(), target.clone(), answered.clone());
        requests.spawn(async move {
            let result = target.send(&client).await;
            answered.fetch_add(1, Ordering::SeqCst);
            result
        });
    }
    // All in flight: the gateway holds them all, upstream or waiting in its queue.
    let deadline = first_sent + SLOW_UPSTREAM + Duration::from_secs(10);
    let metrics = reqwest::Client::new();
    while Instant::now() < deadline && answered.load(Ordering::SeqCst) == 0 {
        if held(&metrics, &gateway.url()).await >= IN_FLIGHT {
            memory.all_in_after = Some(first_sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if memory.all_in_after.is_none() {
        let held = held(&metrics, &gateway.url()).await;
        results.lock().unwrap().notes.push(format!(
            "memory test: only {held} of {IN_FLIGHT} requests were in the gateway before the first answer"
        ));
    }
    // Sample until the first answer is near (the fake answers SLOW_UPSTREAM after each arrival).
    let stop_sampling = first_sent + SLOW_UPSTREAM - Duration::from_millis(200);
    loop {
        if let Some(kb) = gateway.status_kb("VmRSS") {
            if Some(kb) > memory.in_flight_kb {
                memory.in_flight_kb = Some(kb);
                memory.in_flight_anon_kb = gateway.status_kb("RssAnon");
            }
            memory.samples += 1;
        }
        memory.threads = gateway.status_kb("Threads").max(memory.threads);
        if Instant::now() >= stop_sampling || answered.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Some(joined) = requests.join_next().await {
        match joined.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(()) => memory.ok += 1,
            Err(e) => {
                memory.errors += 1;
                if memory.first_errors.len() < 5 {
                    memory.first_errors.push(e);
                }
            }
        }
    }
    memory.hwm_kb = gateway.status_kb("VmHWM");
    eprintln!(
        "memory test: in flight {}, VmHWM {}, {} ok, {} errors",
        mb(memory.in_flight_kb),
        mb(memory.hwm_kb),
        memory.ok,
        memory.errors
    );
    let (lines, first) = gateway.warnings();
    if lines > 0 {
        results.lock().unwrap().notes.push(format!(
            "the gateway logged {lines} lines at warn level during the memory test, first: {first:?}"
        ));
    }
    if let Some(problem) = gateway.stop().await {
        results.lock().unwrap().notes.push(problem);
    }
    Ok(memory)
}

/// Requests the gateway holds: upstream calls under way plus requests waiting in its queue.
async fn held(client: &reqwest::Client, gateway: &str) -> usize {
    let Ok(response) = client.get(format!("{gateway}/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    [
        "chatgpt_gateway_upstream_in_flight ",
        "chatgpt_gateway_queue_depth ",
    ]
    .iter()
    .filter_map(|series| {
        let line = text.lines().find(|l| l.starts_with(series))?;
        line[series.len()..].trim().parse::<f64>().ok()
    })
    .sum::<f64>() as usize
}
