//! What the out-of-process benches share: running within a time limit, and reading a
//! process's memory and CPU from `/proc`.
//!
//! The bench runs on its own two-thread runtime; on the global timeout it is cancelled and the
//! caller prints what was measured. If even cancelling hangs, a watchdog thread kills the child
//! processes registered in [`PIDS`] and exits.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// Child processes the watchdog kills as a last resort.
pub static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Runs `bench` for at most `limit`; `Err` says why it did not finish.
pub fn run<F>(name: &'static str, limit: Duration, bench: F) -> Result<(), String>
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    std::thread::spawn(move || {
        std::thread::sleep(limit + Duration::from_secs(60));
        eprintln!("{name}: hard timeout; killing the child processes");
        for pid in PIDS.lock().unwrap().iter() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::process::exit(3);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async move {
        let mut task = tokio::spawn(bench);
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(format!("the bench panicked: {join}")),
            Err(_) => {
                task.abort();
                let _ = task.await;
                Err(format!("global timeout of {limit:?} reached"))
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    outcome
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, `RssAnon`, `Threads`, ...).
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// utime + stime of a process in ms (clock ticks assumed 100 Hz, as on every Linux build).
pub fn proc_cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10)
}

/// Machine-wide (busy, total) jiffies from `/proc/stat`: other processes count too.
pub fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}
