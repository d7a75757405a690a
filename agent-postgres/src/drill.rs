//! `agent-postgres drill`: a point-in-time restore into a scratch directory, a throwaway
//! PostgreSQL on a free loopback port that replays the archived WAL to the target, checks
//! on the recovered database, and the measured RTO (drill start to a usable database) and
//! RPO (how far the recovered data is from the target, or from now). The server and the
//! scratch data are removed afterwards.
//!
//! The recovery point is proven by data, not by configuration: `agent-postgres run` writes
//! a heartbeat row every few seconds, and the newest heartbeat the restored database holds
//! is the point it actually reached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use coffer_common::runtime::cli::{AgentContext, DrillReport};
use coffer_common::runtime::command::free_loopback_port;
use coffer_common::runtime::{SnapshotReader, Source, SourceError};

use crate::recovery;
use crate::source::PgSource;

fn failed(e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(e.to_string())
}

pub struct DrillOptions {
    pub snapshot: String,
    pub scratch: Option<PathBuf>,
    /// Directory holding `postgres` (default: the installed server matching the backup).
    pub pg_bin: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    /// SQL checks: each must return a row whose first column is true (or not null).
    pub checks: Vec<String>,
    pub timeout: Duration,
    pub keep: bool,
    /// OS user the throwaway server runs as when the agent runs as root (PostgreSQL
    /// refuses to run as root).
    pub pg_user: String,
}

/// uid and gid of an OS user (through the stock `id`, so no NSS code here).
pub fn user_ids(name: &str) -> Result<(u32, u32), SourceError> {
    let id = |flag: &str| -> Result<u32, SourceError> {
        let out =
            std::process::Command::new("id").args([flag, name]).output().map_err(SourceError::io("running id"))?;
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| {
            failed(format!(
                "OS user {name:?} does not exist; PostgreSQL cannot run as root, so the drill runs it as --pg-user"
            ))
        })
    };
    Ok((id("-u")?, id("-g")?))
}

/// Hands a directory tree to `uid:gid` (symlinks themselves, not their targets).
pub fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), SourceError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(SourceError::io(format!("chown {}", path.display())))?;
    let meta = std::fs::symlink_metadata(path).map_err(SourceError::io(format!("reading {}", path.display())))?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(SourceError::io(format!("reading {}", path.display())))? {
            let e = e.map_err(SourceError::io(format!("reading {}", path.display())))?;
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// The `postgres` binary for a major version: `pg_bin`, else the Debian layout, else PATH.
pub fn postgres_binary(pg_bin: Option<&Path>, major: i64) -> PathBuf {
    if let Some(d) = pg_bin {
        return d.join("postgres");
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/postgres"));
    if debian.is_file() { debian } else { PathBuf::from("postgres") }
}

/// A throwaway server; stopped (fast shutdown, then kill) when dropped.
struct Server {
    child: Child,
    port: u16,
    socket_dir: PathBuf,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown.
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with a pid this process spawned and still owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn conn(&self, user: &str) -> String {
        format!("host={} port={} user={user} dbname=postgres", self.socket_dir.display(), self.port)
    }
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub async fn drill(ctx: &AgentContext, source: &PgSource, opts: &DrillOptions) -> Result<DrillReport, SourceError> {
    let started = Instant::now();
    let rt = &source.recovery;
    let (base, archive) = recovery::choose_base(&ctx.coord, &ctx.asset, &opts.snapshot, rt).await?;
    let scratch_parent = opts.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = scratch_parent.join(format!("coffer-pg-drill-{}-{}", std::process::id(), free_loopback_port()?));
    let data = scratch.join("data");
    std::fs::create_dir_all(&scratch).map_err(SourceError::io(format!("creating {}", scratch.display())))?;
    let result = run_drill(ctx, source, opts, &base.id, &data, &scratch, started, archive.newest).await;
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let mut report = result?;
    report.snapshot = format!("{} + WAL to {}", base.id, rt.describe());
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn run_drill(
    ctx: &AgentContext,
    source: &PgSource,
    opts: &DrillOptions,
    base_id: &str,
    data: &Path,
    scratch: &Path,
    started: Instant,
    newest_wal: Option<SystemTime>,
) -> Result<DrillReport, SourceError> {
    // As root, the server (and the wal-fetch its restore_command runs) is another user:
    // give it private copies of the agent's credentials inside the scratch directory.
    let owner = if running_as_root() { Some(user_ids(&opts.pg_user)?) } else { None };
    let mut restore_config = source.restore_config.clone();
    if let (Some(_), Some(rc)) = (owner, restore_config.as_mut()) {
        let creds = scratch.join("credentials");
        std::fs::create_dir_all(&creds).map_err(SourceError::io("creating the credentials directory"))?;
        for (name, path) in [
            ("ca.pem", &mut rc.ca),
            ("cert.pem", &mut rc.cert),
            ("key.pem", &mut rc.key),
            ("identity", &mut rc.identity),
        ] {
            let copy = creds.join(name);
            std::fs::copy(&*path, &copy).map_err(SourceError::io(format!("copying {}", path.display())))?;
            *path = copy;
        }
    }
    let drill_source = PgSource {
        conn: None,
        pgdata: None,
        fast_checkpoint: true,
        direct_reads: source.direct_reads,
        block_size: source.block_size,
        recovery: source.recovery.clone(),
        restore_config,
    };
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, base_id, ctx.args.restore_options()).await?;
    drill_source.restore(&reader, data).await?;
    reader.finish();
    let manifest = reader.manifest().clone();
    let major = manifest.source.get("pg_version_num").and_then(serde_json::Value::as_i64).unwrap_or(0) / 10_000;
    let mut report = DrillReport::default();
    report.checks.push(format!(
        "restored base backup {base_id} ({} files) to {}",
        manifest.files.len(),
        data.display()
    ));

    // Drill-only access and isolation: local trust on a private socket, no archiving.
    let hba = scratch.join("pg_hba.conf");
    let ident = scratch.join("pg_ident.conf");
    std::fs::write(&hba, "local all all trust\nhost all all 127.0.0.1/32 trust\n")
        .map_err(SourceError::io("writing pg_hba.conf"))?;
    std::fs::write(&ident, "").map_err(SourceError::io("writing pg_ident.conf"))?;
    if !data.join("postgresql.conf").exists() {
        // Packaged layouts keep the config outside the data directory.
        std::fs::write(data.join("postgresql.conf"), "").map_err(SourceError::io("writing postgresql.conf"))?;
    }
    if let Some((uid, gid)) = owner {
        chown_tree(scratch, uid, gid)?;
        let ts = recovery::tablespace_root(data);
        if ts.exists() {
            chown_tree(&ts, uid, gid)?;
        }
    }
    let port = free_loopback_port()?;
    let log = scratch.join("postgres.log");
    let log_file = std::fs::File::create(&log).map_err(SourceError::io("creating the server log"))?;
    let bin = postgres_binary(opts.pg_bin.as_deref(), major);
    let setting = |k: &str, v: &str| ["-c".to_string(), format!("{k}={v}")];
    let mut cmd = Command::new(&bin);
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    cmd.arg("-D").arg(data);
    for (k, v) in [
        ("port", port.to_string()),
        ("listen_addresses", "127.0.0.1".into()),
        ("unix_socket_directories", scratch.display().to_string()),
        ("hba_file", hba.display().to_string()),
        ("ident_file", ident.display().to_string()),
        ("archive_mode", "off".into()),
        ("ssl", "off".into()),
        ("logging_collector", "off".into()),
        ("wal_level", "replica".into()),
        ("hot_standby", "on".into()),
        ("cluster_name", "coffer-drill".into()),
    ] {
        cmd.args(setting(k, &v));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(SourceError::io("log"))?)
        .stderr(log_file)
        .spawn()
        .map_err(SourceError::io(format!(
            "starting {} (install the PostgreSQL {major} server, or pass --pg-bin)",
            bin.display()
        )))?;
    let mut server = Server { child, port, socket_dir: scratch.to_path_buf(), log };

    // Wait until recovery has finished (promoted) or paused at the target.
    let pause = source.recovery.action == "pause";
    let deadline = Instant::now() + opts.timeout;
    let users = {
        let mut u = vec![std::env::var("USER").unwrap_or_default(), opts.pg_user.clone(), "postgres".to_string()];
        u.retain(|s| !s.is_empty());
        u
    };
    let session = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(failed(format!(
                "the restored server exited ({status}) before it was usable; its log ends:\n{}",
                server.log_tail()
            )));
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "the restored server was not usable within {:?}; its log ends:\n{}",
                opts.timeout,
                server.log_tail()
            )));
        }
        let mut ready = None;
        for u in &users {
            if let Ok(s) = crate::pg::connect(&server.conn(u)).await {
                let done = if pause {
                    s.client
                        .query_one("SELECT pg_is_in_recovery() AND pg_get_wal_replay_pause_state() = 'paused'", &[])
                        .await
                        .map(|r| r.get::<_, bool>(0))
                        .unwrap_or(false)
                } else {
                    s.client
                        .query_one("SELECT NOT pg_is_in_recovery()", &[])
                        .await
                        .map(|r| r.get::<_, bool>(0))
                        .unwrap_or(false)
                };
                if done {
                    ready = Some(s);
                }
                break;
            }
        }
        if let Some(s) = ready {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    report.rto = started.elapsed();
    report.checks.push(format!(
        "PostgreSQL {major} serving on 127.0.0.1:{} after {}",
        server.port,
        if pause { "pausing at the recovery target" } else { "recovery and promotion" }
    ));
    let c = &session.client;
    let sysid: String =
        c.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.map_err(failed)?.get(0);
    let want = manifest.source.get("system_identifier").and_then(serde_json::Value::as_str).unwrap_or_default();
    if sysid == want {
        report.checks.push(format!("system identifier {sysid} matches the backup"));
    } else {
        report.problems.push(format!("system identifier {sysid}, the backup's is {want}"));
    }

    // The recovery point achieved, from the heartbeat.
    let hb = c
        .query_opt("SELECT extract(epoch FROM at)::float8 FROM coffer.heartbeat WHERE id = 1", &[])
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, f64>(0));
    let now = epoch(SystemTime::now());
    let slack = 2.0 * opts.heartbeat_interval.as_secs_f64() + 5.0;
    match (hb, source.recovery.time) {
        (Some(h), Some(t)) => {
            let t = epoch(t);
            if h > t + 0.001 {
                report.problems.push(format!(
                    "the newest heartbeat ({}) is after the target: recovery went too far",
                    fmt_epoch(h)
                ));
            } else if t - h > slack {
                report.problems.push(format!(
                    "the newest heartbeat ({}) is {:.1}s before the target; expected within {slack:.0}s",
                    fmt_epoch(h),
                    t - h
                ));
            } else {
                report.checks.push(format!("newest heartbeat {} is {:.1}s before the target", fmt_epoch(h), t - h));
            }
            report.rpo = Duration::from_secs_f64((t - h).max(0.0));
        }
        (Some(h), None) => {
            report.checks.push(format!("newest heartbeat {} ({:.0}s ago)", fmt_epoch(h), now - h));
            report.rpo = Duration::from_secs_f64((now - h).max(0.0));
        }
        (None, _) => {
            report.checks.push("no heartbeat table (run `agent-postgres run` to prove recovery points)".into());
            let newest = newest_wal.map(epoch).unwrap_or(now);
            report.rpo = Duration::from_secs_f64((now - newest).max(0.0));
        }
    }
    for sql in &opts.checks {
        match c.query_opt(sql.as_str(), &[]).await {
            Ok(Some(row)) if check_value(&row) => report.checks.push(format!("check passed: {sql}")),
            Ok(_) => report.problems.push(format!("check returned no true value: {sql}")),
            Err(e) => report.problems.push(format!("check failed: {sql}: {e}")),
        }
    }
    drop(session);
    drop(server);
    Ok(report)
}

/// A check row passes when its first column is true, or any non-null non-boolean value.
fn check_value(row: &tokio_postgres::Row) -> bool {
    if let Ok(b) = row.try_get::<_, Option<bool>>(0) {
        return b == Some(true);
    }
    if let Ok(v) = row.try_get::<_, Option<i64>>(0) {
        return v.is_some_and(|v| v != 0);
    }
    if let Ok(v) = row.try_get::<_, Option<i32>>(0) {
        return v.is_some_and(|v| v != 0);
    }
    row.try_get::<_, Option<String>>(0).is_ok_and(|v| v.is_some())
}

fn fmt_epoch(e: f64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(e.max(0.0))).to_string()
}
