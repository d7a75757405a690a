//! The scheduler: a background job that triggers each asset's backup when its policy says
//! it is due, through the session of a connected agent that serves the asset.
//!
//! Due time: the schedule's next time after the last attempt's start (any trigger, so a
//! backup the agent took on its own counts; without attempts, the newest recovery point),
//! plus a per-asset
//! jitter of up to a tenth of the interval (at most five minutes) so assets on the same
//! schedule do not all start at once. An asset with neither is due at once. After downtime
//! the due time is in the past, so exactly one backup starts (`catch-up`), and the next is
//! due an interval after it: never one per missed slot. An asset whose agent is busy or
//! whose last scheduled or manual attempt is still running is skipped.
//!
//! The decisions are pure functions of the time given (`due`), so tests drive them with a
//! controlled clock; `step` applies them to the live state.

use std::time::Duration;

use coffer_proto::v1 as pb;

use crate::catalog::AttemptRow;
use crate::policy::Policy;
use crate::service::{ServiceError, Shared};

/// Where the time comes from: the system clock in the server, a controlled one in tests.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_now_ms()
    }
}

pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A stable offset for `asset` within `[0, min(interval / 10, 5 min)]`.
pub fn jitter_ms(asset: &str, interval: Duration) -> i64 {
    let span = (interval.as_millis() as i64 / 10).min(300_000);
    if span <= 0 {
        return 0;
    }
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in asset.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % (span as u64 + 1)) as i64
}

/// When the next backup of `asset` is due; `None` if the schedule never triggers.
pub fn next_due_ms(asset: &str, policy: &Policy, last_start_ms: Option<i64>, newest_ms: Option<i64>) -> Option<i64> {
    let interval = policy.schedule.interval()?;
    let Some(base) = last_start_ms.or(newest_ms) else { return Some(i64::MIN) };
    Some(policy.schedule.next_after_ms(base)? + jitter_ms(asset, interval))
}

/// One asset as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub asset: &'a str,
    pub policy: &'a Policy,
    pub last_start_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    /// Its agent is busy or a scheduled/manual attempt of it is still running.
    pub busy: bool,
}

/// The assets to trigger at `now_ms`, each with its trigger (`schedule` or `catch-up` when
/// a whole interval or more was missed).
pub fn due(now_ms: i64, candidates: &[Candidate<'_>]) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for c in candidates {
        if c.busy {
            continue;
        }
        let (Some(at), Some(interval)) =
            (next_due_ms(c.asset, c.policy, c.last_start_ms, c.newest_ms), c.policy.schedule.interval())
        else {
            continue;
        };
        if now_ms < at {
            continue;
        }
        let missed = at != i64::MIN && now_ms - at >= interval.as_millis() as i64;
        out.push((c.asset.to_string(), if missed { "catch-up" } else { "schedule" }));
    }
    out
}

/// Heartbeats the coordinator asks agents for.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// One scheduler pass at `now_ms`: expire silent sessions, then trigger what is due.
pub async fn step(state: &Shared, now_ms: i64) -> Result<(), String> {
    let heartbeat = state.config.heartbeat_interval.as_millis() as i64;
    for (agent, job) in state.sessions.expire(now_ms - 3 * heartbeat, now_ms) {
        tracing::warn!(%agent, "agent session expired: no heartbeat for three intervals");
        if let Some(j) = job {
            state
                .catalog
                .end_attempt(&j, false, Some("the agent stopped sending heartbeats"), now_ms)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let latest = state.catalog.asset_latest().await.map_err(|e| e.to_string())?;
    let last = state.catalog.last_attempts().await.map_err(|e| e.to_string())?;
    let mut names: Vec<String> = latest.keys().cloned().collect();
    names.extend(state.sessions.served_assets());
    names.sort();
    names.dedup();
    let policies: Vec<(String, Policy)> = names.iter().map(|n| (n.clone(), state.config.policy_for(n))).collect();
    let mut candidates = Vec::new();
    for (name, policy) in &policies {
        let Some((_, agent_busy)) = state.sessions.serving(name) else { continue };
        let last_attempt = last.get(name);
        let attempt_running = last_attempt.is_some_and(|a| a.outcome == "running" && a.trigger != "agent");
        candidates.push(Candidate {
            asset: name,
            policy,
            last_start_ms: last_attempt.map(|a| a.started_ms),
            newest_ms: latest.get(name).copied().flatten().map(|at| at * 1000),
            busy: agent_busy || attempt_running,
        });
    }
    for (asset, trigger) in due(now_ms, &candidates) {
        match trigger_backup(state, &asset, trigger, now_ms).await {
            Ok((job, agent)) => tracing::info!(%asset, %job, %agent, trigger, "backup triggered"),
            Err(e) => tracing::warn!(%asset, trigger, "could not trigger a backup: {e}"),
        }
    }
    Ok(())
}

/// Starts a backup of `asset` on the agent serving it: records the attempt, then sends the
/// command. Returns the job id and the agent.
pub async fn trigger_backup(
    state: &Shared,
    asset: &str,
    trigger: &str,
    now_ms: i64,
) -> Result<(String, String), ServiceError> {
    let _one_at_a_time = state.trigger_lock.lock().await;
    let (agent, busy) = state
        .sessions
        .serving(asset)
        .ok_or_else(|| ServiceError::FailedPrecondition(format!("no connected agent serves {asset}")))?;
    if busy {
        return Err(ServiceError::FailedPrecondition(format!("agent {agent} is busy with another backup")));
    }
    if let Some(a) = state.catalog.last_attempts().await?.get(asset)
        && a.outcome == "running"
        && a.trigger != "agent"
    {
        return Err(ServiceError::FailedPrecondition(format!(
            "a backup of {asset} is already running (job {})",
            a.job_id
        )));
    }
    let job_id = format!("job-{}", coffer_common::time::new_snapshot_id(coffer_common::time::from_unix_millis(now_ms)));
    state
        .catalog
        .start_attempt(&AttemptRow {
            job_id: job_id.clone(),
            asset: asset.to_string(),
            agent: agent.clone(),
            trigger: trigger.to_string(),
            started_ms: now_ms,
            ended_ms: None,
            outcome: "running".into(),
            snapshot_id: None,
            error: None,
        })
        .await?;
    let cmd = pb::BackupCommand { job_id: job_id.clone(), asset: asset.to_string(), trigger: trigger.to_string() };
    if let Err(e) = state.sessions.dispatch(&agent, cmd) {
        state.catalog.end_attempt(&job_id, false, Some(&e), now_ms).await?;
        return Err(ServiceError::FailedPrecondition(e));
    }
    Ok((job_id, agent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyConfig, Schedule};

    const H: i64 = 3_600_000;
    const T0: i64 = 1_772_409_600_000;

    fn hourly() -> Policy {
        PolicyConfig::default().resolve("etcd/cp").unwrap()
    }

    /// A controlled timeline: the scheduler decides at each tick, triggered backups take
    /// `took` milliseconds, and the returned list is every trigger with its time.
    fn simulate(policy: &Policy, ticks: &[i64], took: i64) -> Vec<(i64, &'static str)> {
        let mut last_start = None;
        let mut newest = None;
        let mut running_until: Option<i64> = None;
        let mut fired = Vec::new();
        for &now in ticks {
            if let Some(end) = running_until
                && now >= end
            {
                newest = Some(end);
                running_until = None;
            }
            let c = Candidate {
                asset: "etcd/cp",
                policy,
                last_start_ms: last_start,
                newest_ms: newest,
                busy: running_until.is_some(),
            };
            for (_, trigger) in due(now, &[c]) {
                fired.push((now, trigger));
                last_start = Some(now);
                running_until = Some(now + took);
            }
        }
        fired
    }

    #[test]
    fn first_backup_at_once_then_every_interval() {
        let p = hourly();
        let ticks: Vec<i64> = (0..=3 * 3600).map(|s| T0 + s * 1000).collect();
        let fired = simulate(&p, &ticks, 30_000);
        let jitter = jitter_ms("etcd/cp", Duration::from_secs(3600));
        assert_eq!(fired[0], (T0, "schedule"));
        assert_eq!(fired.len(), 3, "{fired:?}");
        for (i, (t, trig)) in fired.iter().enumerate().skip(1) {
            assert_eq!(*trig, "schedule");
            // Each start is one interval (plus the asset's jitter) after the previous one.
            assert!((t - fired[i - 1].0 - H - jitter).abs() <= 1000, "{fired:?}");
        }
    }

    #[test]
    fn a_day_long_clock_jump_triggers_one_catch_up() {
        let p = hourly();
        let mut ticks = vec![T0, T0 + 1000, T0 + 60_000];
        // The clock jumps a day ahead; the scheduler keeps ticking every second after it.
        ticks.extend((0..600).map(|s| T0 + 24 * H + s * 1000));
        let fired = simulate(&p, &ticks, 5_000);
        assert_eq!(fired, vec![(T0, "schedule"), (T0 + 24 * H, "catch-up")]);
    }

    #[test]
    fn busy_assets_wait_and_manual_ones_never_fire() {
        let p = hourly();
        let c = Candidate { asset: "etcd/cp", policy: &p, last_start_ms: None, newest_ms: None, busy: true };
        assert!(due(T0, &[c]).is_empty());
        let manual = Policy { schedule: Schedule::Manual, ..hourly() };
        let c = Candidate { asset: "etcd/cp", policy: &manual, last_start_ms: None, newest_ms: None, busy: false };
        assert!(due(T0, &[c]).is_empty());
        let cont = Policy { schedule: Schedule::Continuous, ..hourly() };
        let c = Candidate { asset: "etcd/cp", policy: &cont, last_start_ms: None, newest_ms: None, busy: false };
        assert!(due(T0, &[c]).is_empty());
    }

    #[test]
    fn a_backup_the_agent_took_itself_resets_the_clock() {
        let p = hourly();
        let jitter = jitter_ms("etcd/cp", Duration::from_secs(3600));
        // The agent's own backup at T0 + 50 min is the last attempt.
        let c = Candidate {
            asset: "etcd/cp",
            policy: &p,
            last_start_ms: Some(T0 + 50 * 60_000),
            newest_ms: Some(T0 + 51 * 60_000),
            busy: false,
        };
        assert!(due(T0 + H + jitter, std::slice::from_ref(&c)).is_empty());
        assert_eq!(due(T0 + 110 * 60_000 + jitter, &[c]).len(), 1);
    }

    #[test]
    fn jitter_spreads_assets_within_a_tenth_of_the_interval() {
        let day = Duration::from_secs(86_400);
        let offsets: std::collections::BTreeSet<i64> =
            (0..50).map(|i| jitter_ms(&format!("redis/cache-{i}"), day)).collect();
        assert!(offsets.len() > 40, "assets get different offsets");
        assert!(offsets.iter().all(|&o| (0..=300_000).contains(&o)));
        assert!((0..50).all(|i| jitter_ms(&format!("git/r{i}"), Duration::from_secs(5)) <= 500));
        assert_eq!(jitter_ms("git/a", Duration::from_millis(5)), 0);
    }
}
