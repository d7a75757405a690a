//! `agent-redis drill`: restores a snapshot's RDB into a throwaway `redis-server` on a free
//! loopback port, waits until it serves, checks the key count of every db against the
//! manifest and samples keys, and reports the time to a serving server (RTO) and the
//! snapshot's age (RPO). The server and its directory are removed afterwards.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffer_common::runtime::cli::AgentContext;
use coffer_common::runtime::{SnapshotReader, SourceError};
use serde_json::Value;

use crate::resp::{Conn, RedisUrl, Reply, keyspace};
use crate::source::RDB_PATH;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, SourceError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(SourceError::io("finding a free port"))?;
    l.local_addr().map(|a| a.port()).map_err(SourceError::io("finding a free port"))
}

pub struct DrillReport {
    pub snapshot: String,
    pub rto: Duration,
    pub rpo: Duration,
    pub checks: Vec<String>,
    pub problems: Vec<String>,
}

pub async fn drill(ctx: &AgentContext, snapshot: &str, redis_server: &str) -> Result<DrillReport, SourceError> {
    let started = Instant::now();
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, snapshot, ctx.args.restore_options()).await?;
    let work = std::env::temp_dir().join(format!("coffer-redis-drill-{}-{}", std::process::id(), free_port()?));
    std::fs::create_dir_all(&work).map_err(SourceError::io(format!("creating {}", work.display())))?;
    let cleanup = scopeguard(work.clone());
    reader.restore_to_path(RDB_PATH, &work.join("dump.rdb")).await?;
    reader.finish();
    let m = reader.manifest().clone();

    let port = free_port()?;
    let child = Command::new(redis_server)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(&work)
        .args(["--dbfilename", "dump.rdb", "--appendonly", "no", "--save", "", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(SourceError::io(format!("starting {redis_server}")))?;
    let server = Server(child);
    let url = RedisUrl { host: "127.0.0.1".into(), port, user: None, password: None };
    let report = tokio::task::spawn_blocking(move || -> Result<(Duration, Vec<String>, Vec<String>), SourceError> {
        let deadline = Instant::now() + Duration::from_secs(600);
        // Serving means PING answers PONG (not LOADING).
        let mut conn = loop {
            if let Ok(mut c) = Conn::open(&url, Duration::from_secs(30))
                && matches!(c.call(&[b"PING"]), Ok(Reply::Simple(ref p)) if p == "PONG")
            {
                break c;
            }
            if Instant::now() > deadline {
                return Err(SourceError::Failed("the drill server did not start serving within 10 minutes".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rto = started.elapsed();
        let info = conn.info().map_err(|e| SourceError::Failed(e.to_string()))?;
        let got = keyspace(&info);
        let want: Vec<(u32, u64)> = m
            .source
            .get("keys")
            .and_then(Value::as_object)
            .map(|o| {
                let mut v: Vec<(u32, u64)> =
                    o.iter().filter_map(|(k, n)| Some((k.strip_prefix("db")?.parse().ok()?, n.as_u64()?))).collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let exact = m.source.get("keys_exact").and_then(Value::as_bool).unwrap_or(false);
        let (mut checks, mut problems) = (Vec::new(), Vec::new());
        if got == want {
            checks.push(format!("key counts per db match the manifest: {got:?}"));
        } else if exact {
            problems.push(format!("key counts per db {got:?}, the manifest records {want:?}"));
        } else {
            checks.push(format!(
                "key counts per db {got:?}; the manifest's {want:?} are approximate (keys changed during the backup)"
            ));
        }
        let mut sampled = 0;
        for (db, n) in &got {
            conn.call(&[b"SELECT", db.to_string().as_bytes()]).map_err(|e| SourceError::Failed(e.to_string()))?;
            for _ in 0..(*n).min(20) {
                let key = match conn.call(&[b"RANDOMKEY"]) {
                    Ok(Reply::Bulk(Some(k))) => k,
                    _ => {
                        problems.push(format!("db{db}: RANDOMKEY returned no key"));
                        break;
                    }
                };
                match conn.call(&[b"TYPE", &key]) {
                    Ok(Reply::Simple(t)) if t != "none" => sampled += 1,
                    other => problems.push(format!("db{db}: sampled key has type {other:?}")),
                }
            }
        }
        checks.push(format!("{sampled} sampled keys readable"));
        let _ = conn.call(&[b"SHUTDOWN", b"NOSAVE"]);
        Ok((rto, checks, problems))
    })
    .await
    .map_err(|e| SourceError::Failed(format!("drill thread: {e}")))??;
    drop(server);
    drop(cleanup);
    let taken = coffer_common::time::parse_rfc3339(&m.finished_at).unwrap_or_else(coffer_common::time::now);
    let rpo = coffer_common::time::now().duration_since(taken).unwrap_or_default();
    Ok(DrillReport { snapshot: m.snapshot.clone(), rto: report.0, rpo, checks: report.1, problems: report.2 })
}

/// Removes the drill's directory when dropped.
struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scopeguard(p: PathBuf) -> Guard {
    Guard(p)
}
