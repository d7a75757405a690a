//! `run`: the agent daemon. It dials the coordinator, opens a session stream naming the
//! asset it serves, sends heartbeats, and runs the backups the coordinator commands, one at
//! a time, reporting each result. When the connection drops (or cannot be made) it
//! reconnects with exponential backoff and jitter, forever, until SIGTERM or Ctrl-C.

use std::time::Duration;

use coffer_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Source;
use super::cli::{AgentArgs, AgentContext, CliError, backup_job};
use super::client::ClientError;

/// Reconnect delays: 1 s doubling to 60 s, each with up to 50% jitter; reset after a session
/// that lasted long enough to count as healthy.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Runs the daemon until a termination signal. Only configuration errors (bad asset name,
/// unreadable identity) end it early; everything else is retried.
pub async fn run<S: Source>(args: &AgentArgs, kind: &'static str, source: &S) -> Result<(), CliError> {
    // Fail fast on what retrying cannot fix.
    args.asset(kind)?;
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            r = session(args, kind, source) => r,
            _ = terminated() => {
                tracing::info!("stopping the agent daemon");
                return Ok(());
            }
        };
        match outcome {
            Ok(()) => tracing::warn!("the coordinator ended the session"),
            Err(e @ (CliError::NoAsset { .. } | CliError::BadAsset { .. } | CliError::Identity(_))) => return Err(e),
            Err(e) => tracing::warn!("session failed: {e}"),
        }
        if started.elapsed() >= HEALTHY_SESSION {
            failures = 0;
        }
        failures += 1;
        let wait = backoff(failures);
        tracing::info!(seconds = wait.as_secs_f64(), "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = terminated() => return Ok(()),
        }
    }
}

/// Delay before reconnect attempt `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let base = BACKOFF_INITIAL.saturating_mul(1 << n.saturating_sub(1).min(16)).min(BACKOFF_MAX);
    let mut r = [0u8; 2];
    let _ = getrandom::getrandom(&mut r);
    let jitter = f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) * 0.5;
    base.mul_f64(1.0 - jitter)
}

async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// One connection: register, open the session, serve commands until the stream ends.
async fn session<S: Source>(args: &AgentArgs, kind: &'static str, source: &S) -> Result<(), CliError> {
    let ctx = args.connect(kind).await?;
    let (up, up_rx) = mpsc::channel::<pb::SessionUp>(16);
    let open = pb::SessionUp {
        msg: Some(pb::session_up::Msg::Open(pb::SessionOpen {
            agent_version: crate::VERSION.to_string(),
            assets: vec![ctx.asset.clone()],
        })),
    };
    up.send(open).await.map_err(|_| ClientError::Protocol("session channel closed".into()))?;
    let mut down =
        ctx.coord.raw().session(ReceiverStream::new(up_rx)).await.map_err(ClientError::rpc("Session"))?.into_inner();
    let interval = match down.message().await.map_err(ClientError::rpc("Session"))? {
        Some(pb::SessionDown { msg: Some(pb::session_down::Msg::Accepted(a)) }) => {
            Duration::from_secs(u64::from(a.heartbeat_interval_seconds.max(1)))
        }
        other => return Err(ClientError::Protocol(format!("session: expected an acceptance, got {other:?}")).into()),
    };
    tracing::info!(asset = %ctx.asset, heartbeat_seconds = interval.as_secs(), "session open");
    let beats = {
        let up = up.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let beat = pb::SessionUp { msg: Some(pb::session_up::Msg::Heartbeat(pb::Heartbeat {})) };
                if up.send(beat).await.is_err() {
                    break;
                }
            }
        })
    };
    let served = serve(&ctx, source, &up, &mut down).await;
    beats.abort();
    served
}

async fn serve<S: Source>(
    ctx: &AgentContext,
    source: &S,
    up: &mpsc::Sender<pb::SessionUp>,
    down: &mut tonic::Streaming<pb::SessionDown>,
) -> Result<(), CliError> {
    while let Some(m) = down.message().await.map_err(ClientError::rpc("Session"))? {
        let Some(pb::session_down::Msg::Backup(cmd)) = m.msg else { continue };
        let result = if cmd.asset != ctx.asset {
            pb::JobResult {
                job_id: cmd.job_id.clone(),
                ok: false,
                error: format!("this daemon serves {}, not {}", ctx.asset, cmd.asset),
                ..Default::default()
            }
        } else {
            tracing::info!(job = %cmd.job_id, trigger = %cmd.trigger, "backup commanded");
            match backup_job(ctx, source, &cmd.job_id).await {
                Ok(info) => {
                    pb::JobResult { job_id: cmd.job_id.clone(), ok: true, snapshot_id: info.id, error: String::new() }
                }
                Err(e) => {
                    tracing::error!(job = %cmd.job_id, "backup failed: {e}");
                    pb::JobResult { job_id: cmd.job_id.clone(), ok: false, error: e.to_string(), ..Default::default() }
                }
            }
        };
        let msg = pb::SessionUp { msg: Some(pb::session_up::Msg::Result(result)) };
        if up.send(msg).await.is_err() {
            return Err(ClientError::Protocol("session closed while reporting a result".into()).into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        for n in 1..20 {
            let d = backoff(n);
            let base = BACKOFF_INITIAL.saturating_mul(1 << (n - 1).min(16)).min(BACKOFF_MAX);
            assert!(d <= base && d >= base / 2, "attempt {n}: {d:?} vs {base:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
