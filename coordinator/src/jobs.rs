//! The coordinator's background jobs (the scheduler today; retention, replication and drills
//! later) run under one runner that owns their pacing and backoff and records each job's
//! state for the admin `ListJobs` call and the metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Longest wait after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// `running`, `backing-off` or `stopped`.
    pub state: &'static str,
    pub runs: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    pub last_run_ms: Option<i64>,
}

/// The wait after `failures` failures in a row: doubling from `period` (at least a second)
/// up to five minutes.
pub fn backoff(period: Duration, failures: u32) -> Duration {
    period.max(Duration::from_secs(1)).saturating_mul(1 << failures.min(16)).min(MAX_BACKOFF)
}

#[derive(Default)]
pub struct Jobs {
    states: Mutex<BTreeMap<&'static str, JobState>>,
}

impl Jobs {
    /// Records one run of `name` at `now_ms` and returns how long to wait before the next:
    /// `period` after a success, doubling from `period` up to five minutes after failures.
    pub fn record(&self, name: &'static str, now_ms: i64, period: Duration, result: Result<(), String>) -> Duration {
        let mut states = self.states.lock().expect("jobs lock");
        let s = states.entry(name).or_default();
        s.runs += 1;
        s.last_run_ms = Some(now_ms);
        match result {
            Ok(()) => {
                s.state = "running";
                s.consecutive_failures = 0;
                period
            }
            Err(e) => {
                tracing::error!(job = name, "background job failed: {e}");
                s.state = "backing-off";
                s.failures += 1;
                s.consecutive_failures += 1;
                s.last_error = Some(e);
                s.last_error_ms = Some(now_ms);
                backoff(period, s.consecutive_failures)
            }
        }
    }

    pub fn stopped(&self, name: &'static str) {
        self.states.lock().expect("jobs lock").entry(name).or_default().state = "stopped";
    }

    pub fn view(&self) -> Vec<(&'static str, JobState)> {
        self.states.lock().expect("jobs lock").iter().map(|(n, s)| (*n, s.clone())).collect()
    }

    /// Runs `step` every `period` until `shutdown`, with backoff after failures.
    pub fn spawn<F, Fut>(
        self: &Arc<Self>,
        name: &'static str,
        period: Duration,
        now_ms: fn() -> i64,
        shutdown: CancellationToken,
        mut step: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let jobs = self.clone();
        jobs.states.lock().expect("jobs lock").insert(name, JobState { state: "running", ..Default::default() });
        tokio::spawn(async move {
            loop {
                let result = tokio::select! {
                    r = step() => r,
                    _ = shutdown.cancelled() => break,
                };
                let wait = jobs.record(name, now_ms(), period, result);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            jobs.stopped(name);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_resets() {
        let j = Jobs::default();
        let p = Duration::from_secs(1);
        assert_eq!(j.record("scheduler", 1, p, Ok(())), p);
        assert_eq!(j.record("scheduler", 2, p, Err("catalog locked".into())), Duration::from_secs(2));
        assert_eq!(j.record("scheduler", 3, p, Err("catalog locked".into())), Duration::from_secs(4));
        for _ in 0..20 {
            j.record("scheduler", 4, p, Err("still".into()));
        }
        assert_eq!(j.record("scheduler", 5, p, Err("still".into())), MAX_BACKOFF);
        let (_, s) = j.view().into_iter().next().unwrap();
        assert_eq!(
            (s.state, s.failures, s.last_error.as_deref(), s.last_error_ms),
            ("backing-off", 23, Some("still"), Some(5))
        );
        assert_eq!(j.record("scheduler", 6, p, Ok(())), p);
        let (_, s) = j.view().into_iter().next().unwrap();
        assert_eq!((s.state, s.consecutive_failures, s.runs), ("running", 0, 25));
    }
}
