//! `everyday_limit`: successful upstream calls per UTC calendar day.
//!
//! Vanus compares only the day of the month and resets lazily, so the same date a month later
//! looks like "today". Here the count belongs to a calendar date and a new date starts at zero.
//! A call reserves a slot before it goes upstream and commits it only on success, so concurrent
//! calls cannot overshoot the limit and failed calls do not count (as in Vanus). The count is
//! written to a file, so a restart does not hand out a fresh day's quota.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::config::DailyLimit;

/// The time source; tests inject one to cross a UTC midnight.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// What is stored in `daily-usage.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Usage {
    day: NaiveDate,
    used: u64,
}

#[derive(Debug)]
struct State {
    usage: Usage,
    /// Calls under way that hold a slot.
    reserved: u64,
}

/// The limit was reached for today.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub limit: u64,
    /// Until the next UTC midnight.
    pub retry_after: Duration,
}

impl Exhausted {
    /// Vanus's notice, emitted as the event's content.
    pub fn vanus_notice(&self) -> String {
        format!(
            "You've reached the daily limit ({}/day). Your quota will be restored tomorrow.",
            self.limit
        )
    }
}

/// The daily counter, shared by every route.
pub struct Quota {
    limit: DailyLimit,
    clock: Clock,
    state: Mutex<State>,
    file: Option<PathBuf>,
    changed: Notify,
}

/// A slot held by one call: [`Reservation::commit`] on success; dropping it gives it back.
pub struct Reservation {
    quota: Option<Arc<Quota>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reservation")
    }
}

impl Quota {
    /// Loads today's count from `file` (if any); a count from an earlier day is discarded.
    pub fn open(limit: DailyLimit, clock: Clock, file: Option<PathBuf>) -> std::io::Result<Self> {
        let today = clock().date_naive();
        let stored = match &file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice::<Usage>(&bytes).ok(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let usage = stored.filter(|u| u.day == today).unwrap_or(Usage {
            day: today,
            used: 0,
        });
        Ok(Quota {
            limit,
            clock,
            state: Mutex::new(State { usage, reserved: 0 }),
            file,
            changed: Notify::new(),
        })
    }

    /// Takes a slot for one upstream call, or says the day's calls are used up.
    pub fn reserve(self: &Arc<Self>) -> Result<Reservation, Exhausted> {
        let DailyLimit::Calls(limit) = self.limit else {
            return Ok(Reservation { quota: None });
        };
        let now = (self.clock)();
        let mut state = self.state.lock().expect("quota lock");
        roll_over(&mut state.usage, now.date_naive());
        if state.usage.used + state.reserved >= limit {
            return Err(Exhausted {
                limit,
                retry_after: until_midnight(now),
            });
        }
        state.reserved += 1;
        Ok(Reservation {
            quota: Some(self.clone()),
        })
    }

    /// Successful calls counted today.
    #[cfg(test)]
    fn used_today(&self) -> u64 {
        let mut state = self.state.lock().expect("quota lock");
        roll_over(&mut state.usage, (self.clock)().date_naive());
        state.usage.used
    }

    /// Writes the count whenever it changes, at most every 100 ms, until `stop`; then a last
    /// time. Writing in the background keeps disk latency out of the request path.
    pub async fn persist(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let mut written = None;
        loop {
            let stopping = tokio::select! {
                _ = self.changed.notified() => false,
                _ = stop.cancelled() => true,
            };
            let usage = self.state.lock().expect("quota lock").usage;
            if written != Some(usage) {
                let path = file.clone();
                let result =
                    tokio::task::spawn_blocking(move || write_atomically(&path, &usage)).await;
                match result {
                    Ok(Ok(())) => written = Some(usage),
                    Ok(Err(e)) => tracing::error!(
                        file = %file.display(), error = %e,
                        "cannot save the daily usage; a restart would forget today's count"
                    ),
                    Err(e) => tracing::error!(error = %e, "daily usage writer failed"),
                }
            }
            if stopping {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Reservation {
    /// The call succeeded: it counts.
    pub fn commit(mut self) {
        if let Some(quota) = self.quota.take() {
            {
                let mut state = quota.state.lock().expect("quota lock");
                state.reserved -= 1;
                roll_over(&mut state.usage, (quota.clock)().date_naive());
                state.usage.used += 1;
            }
            quota.changed.notify_one();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(quota) = self.quota.take() {
            quota.state.lock().expect("quota lock").reserved -= 1;
        }
    }
}

fn roll_over(usage: &mut Usage, today: NaiveDate) {
    if usage.day != today {
        *usage = Usage {
            day: today,
            used: 0,
        };
    }
}

fn until_midnight(now: DateTime<Utc>) -> Duration {
    let tomorrow = now.date_naive().succ_opt().unwrap_or(now.date_naive());
    let midnight = tomorrow
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (midnight - now).to_std().unwrap_or(Duration::from_secs(1))
}

fn write_atomically(path: &std::path::Path, usage: &Usage) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(usage).expect("serializes"))?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn clock_at(start: &str) -> (Clock, Arc<AtomicI64>) {
        let t = Arc::new(AtomicI64::new(
            DateTime::parse_from_rfc3339(start).unwrap().timestamp(),
        ));
        let read = t.clone();
        let clock: Clock =
            Arc::new(move || DateTime::from_timestamp(read.load(Ordering::SeqCst), 0).unwrap());
        (clock, t)
    }

    #[test]
    fn counts_successes_only_and_resets_on_a_new_utc_date() {
        let (clock, t) = clock_at("2026-01-31T23:59:58Z");
        let quota = Arc::new(Quota::open(DailyLimit::Calls(2), clock, None).unwrap());
        quota.reserve().unwrap().commit();
        drop(quota.reserve().unwrap()); // a failed call gives its slot back
        let held = quota.reserve().unwrap();
        let refused = quota.reserve().unwrap_err();
        assert_eq!(refused.limit, 2);
        assert_eq!(refused.retry_after, Duration::from_secs(2));
        held.commit();
        assert_eq!(quota.used_today(), 2);
        // Vanus would still refuse on 2026-02-... only the day of month differs here; a month
        // later the same day of month must not look like "today".
        t.store(
            DateTime::parse_from_rfc3339("2026-02-01T00:00:00Z")
                .unwrap()
                .timestamp(),
            Ordering::SeqCst,
        );
        assert_eq!(quota.used_today(), 0);
        quota.reserve().unwrap().commit();
        t.store(
            DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
                .unwrap()
                .timestamp(),
            Ordering::SeqCst,
        );
        assert_eq!(quota.used_today(), 0, "same day of month, another date");
    }

    #[test]
    fn unlimited_never_refuses() {
        let (clock, _) = clock_at("2026-01-01T00:00:00Z");
        let quota = Arc::new(Quota::open(DailyLimit::Unlimited, clock, None).unwrap());
        for _ in 0..5 {
            quota.reserve().unwrap().commit();
        }
    }
}
