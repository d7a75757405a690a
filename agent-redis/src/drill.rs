//! `agent-redis drill`: restores a snapshot's RDB into a throwaway `redis-server` on a free
//! loopback port, waits until it serves, checks the key count of every db against the
//! manifest and samples keys, and reports the time to a serving server (RTO) and the
//! snapshot's age (RPO). The server and its directory are removed afterwards.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffer_common::runtime::cli::{AgentContext, DrillReport};
use coffer_common::runtime::command::free_loopback_port;
use coffer_common::runtime::{SnapshotReader, SourceError};
use serde_json::Value;

use crate::resp::{Conn, RedisUrl, Reply, keyspace};

/// A throwaway `redis-server` on a free loopback port, serving `dump.rdb` from its own
/// directory; killed and its directory removed when dropped.
pub struct TempServer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for TempServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TempServer {
    /// A directory for the server's `dump.rdb` (write it there, then `start`).
    pub fn dir() -> Result<PathBuf, SourceError> {
        let dir = std::env::temp_dir().join(format!("coffer-redis-{}-{}", std::process::id(), free_loopback_port()?));
        std::fs::create_dir_all(&dir).map_err(SourceError::io(format!("creating {}", dir.display())))?;
        Ok(dir)
    }

    /// Starts `redis_server` on `dir/dump.rdb` (AOF and saving off; replicas it serves sync
    /// at once, diskless) and waits until it answers PING (the RDB is loaded).
    pub fn start(redis_server: &str, dir: PathBuf) -> Result<TempServer, SourceError> {
        let port = free_loopback_port()?;
        let child = Command::new(redis_server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(&dir)
            .args(["--dbfilename", "dump.rdb", "--appendonly", "no", "--save", "", "--daemonize", "no"])
            .args(["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(SourceError::io(format!("starting {redis_server}")))?;
        let server = TempServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(mut c) = Conn::open(&server.url(), Duration::from_secs(30))
                && matches!(c.call(&[b"PING"]), Ok(Reply::Simple(ref p)) if p == "PONG")
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(SourceError::Failed("the temporary redis-server did not serve within 10 minutes".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> RedisUrl {
        RedisUrl::plain("127.0.0.1", self.port)
    }
}

pub async fn drill(ctx: &AgentContext, snapshot: &str, redis_server: &str) -> Result<DrillReport, SourceError> {
    let started = Instant::now();
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, snapshot, ctx.args.restore_options()).await?;
    let work = TempServer::dir()?;
    if let Err(e) = crate::source::write_rdb(&reader, &work.join("dump.rdb")).await {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    reader.finish();
    let m = reader.manifest().clone();
    let (snapshot_id, finished_at) = (m.snapshot.clone(), m.finished_at.clone());
    let server_bin = redis_server.to_string();
    let report = tokio::task::spawn_blocking(move || -> Result<(Duration, Vec<String>, Vec<String>), SourceError> {
        let server = TempServer::start(&server_bin, work)?;
        let rto = started.elapsed();
        let mut conn =
            Conn::open(&server.url(), Duration::from_secs(30)).map_err(|e| SourceError::Failed(e.to_string()))?;
        let info = conn.info().map_err(|e| SourceError::Failed(e.to_string()))?;
        let got = keyspace(&info);
        let want = manifest_keys(&m);
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
        Ok((rto, checks, problems))
    })
    .await
    .map_err(|e| SourceError::Failed(format!("drill thread: {e}")))??;
    let taken = coffer_common::time::parse_rfc3339(&finished_at).unwrap_or_else(coffer_common::time::now);
    let rpo = coffer_common::time::now().duration_since(taken).unwrap_or_default();
    Ok(DrillReport { snapshot: snapshot_id, rto: report.0, rpo, checks: report.1, problems: report.2 })
}

/// Per-db key counts a manifest records.
pub fn manifest_keys(m: &coffer_common::manifest::Manifest) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = m
        .source
        .get("keys")
        .and_then(Value::as_object)
        .map(|o| o.iter().filter_map(|(k, n)| Some((k.strip_prefix("db")?.parse().ok()?, n.as_u64()?))).collect())
        .unwrap_or_default();
    v.sort();
    v
}
