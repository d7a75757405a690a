//! agent-postgres: continuous WAL archiving (`wal-push` as `archive_command`), base backups
//! read from the data directory with page-level deduplication, point-in-time restore
//! (`wal-fetch` as `restore_command`) and PITR drills, against a Coffer coordinator.

mod drill;
mod pg;
mod recovery;
mod source;
mod walpush;
mod walsock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use coffer_common::runtime::cli::{self, AgentArgs, CliError};
use coffer_common::runtime::{Source, SourceError};
use coffer_common::units::parse_size;

use crate::recovery::{RecoveryTarget, RestoreConfig};
use crate::source::PgSource;
use coffer_common::pgwal::Lsn;

/// The stream WAL files are archived in.
pub const WAL_STREAM: &str = "wal";

/// Coffer agent for PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "agent-postgres", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Server connection (libpq key=value string or URL), for base backups, the heartbeat
    /// and `info`-like queries: e.g. "host=/run/postgresql user=postgres".
    #[arg(long, global = true, env = "COFFER_PG_CONN")]
    pg_conn: Option<String>,
    /// The server's data directory (default: what the server reports).
    #[arg(long, global = true, env = "COFFER_PGDATA")]
    pgdata: Option<PathBuf>,
    /// Checkpoint at the start of a base backup: `fast` (at once) or `spread` (paced by
    /// checkpoint_completion_target; can take minutes).
    #[arg(long, global = true, env = "COFFER_CHECKPOINT", default_value = "fast", value_parser = ["fast", "spread"])]
    checkpoint: String,
    /// How base backups read files of 1 MiB and more: `direct` (`O_DIRECT`: the backup
    /// neither evicts the server's cached pages nor pays to copy through the page cache) or
    /// `cached` (through the page cache: better when the data is mostly cached already and
    /// the disk is slow or metered).
    #[arg(long, global = true, env = "COFFER_READ", default_value = "direct", value_parser = ["direct", "cached"])]
    read: String,
    /// Relation files are cut into page-aligned blocks of this size (a multiple of the 8 KiB
    /// page): a changed page costs one block. Smaller blocks deduplicate scattered updates
    /// better but compress worse (measured on pgbench tables: 8 KiB blocks store 1.9x the
    /// bytes of 256 KiB blocks), and cost more per-chunk work.
    #[arg(long, global = true, env = "COFFER_BLOCK_SIZE", default_value = "256KiB", value_parser = parse_size)]
    block_size: u64,
    /// Directory with the `postgres` binary for drills (default: the installed server
    /// matching the backup's major version).
    #[arg(long, global = true, env = "COFFER_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// OS user the drill's throwaway server runs as when the agent runs as root.
    #[arg(long, global = true, env = "COFFER_PG_USER", default_value = "postgres")]
    pg_user: String,
    /// `run`: how often the heartbeat row is written (0 turns it off).
    #[arg(long, global = true, env = "COFFER_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// `wal-push`: other `.ready` WAL files archived in the same call.
    #[arg(long, global = true, env = "COFFER_WAL_PUSH_AHEAD", default_value_t = 8)]
    wal_push_ahead: usize,
    /// Unix socket between `run` and `wal-push`: `run` listens there and archives WAL over
    /// its open connection; `wal-push` hands its file to that daemon (and archives it itself
    /// when no daemon answers). Both must run as the same OS user (or wal-push as root).
    #[arg(long, global = true, env = "COFFER_WAL_SOCKET")]
    wal_socket: Option<PathBuf>,
    /// `wal-fetch`: following segments fetched ahead of recovery.
    #[arg(long, global = true, env = "COFFER_WAL_PREFETCH", default_value_t = 4)]
    wal_prefetch: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct TargetArgs {
    /// Base backup id, or `latest` (the newest that ends before the target).
    #[arg(long, env = "COFFER_SNAPSHOT", default_value = "latest")]
    snapshot: String,
    /// Recover to this time (RFC 3339, e.g. 2026-11-24T10:00:00Z).
    #[arg(long, conflicts_with_all = ["target_lsn", "target_name"])]
    target_time: Option<String>,
    /// Recover to this LSN (e.g. 0/3000060).
    #[arg(long, conflicts_with = "target_name")]
    target_lsn: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long)]
    target_name: Option<String>,
    /// What the server does at the target.
    #[arg(long, default_value = "promote", value_parser = ["promote", "pause"])]
    target_action: String,
}

impl TargetArgs {
    fn target(&self) -> Result<RecoveryTarget, SourceError> {
        let time = self
            .target_time
            .as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t.trim_end_matches('Z').trim_end_matches("+00:00"))
                    .map_err(|e| SourceError::Failed(format!("--target-time {t:?}: {e} (use RFC 3339 UTC)")))
            })
            .transpose()?;
        let lsn = self
            .target_lsn
            .as_deref()
            .map(|l| {
                Lsn::parse(l).ok_or_else(|| SourceError::Failed(format!("--target-lsn {l:?} is not an LSN (X/Y)")))
            })
            .transpose()?;
        Ok(RecoveryTarget { time, lsn, name: self.target_name.clone(), action: self.target_action.clone() })
    }
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Take a base backup now.
    Backup,
    /// Restore a base backup into a new data directory set up to replay the archived WAL to
    /// the target (start PostgreSQL on it to recover).
    Restore {
        #[command(flatten)]
        target: TargetArgs,
        /// The new data directory (must not exist, or be empty).
        #[arg(long, env = "COFFER_TO")]
        to: PathBuf,
    },
    /// List base backups.
    List,
    /// Base backups, WAL ranges and gaps, and the recovery window.
    Info,
    /// Run as a daemon: base backups when the coordinator asks, and the heartbeat.
    Run,
    /// archive_command: archive one WAL file (`wal-push %p`); exits 0 once it is durable.
    WalPush {
        /// Path of the WAL file (%p).
        path: PathBuf,
    },
    /// restore_command: fetch one WAL file (`wal-fetch %f %p`); exit 1 when the archive
    /// does not hold it, 126 on other failures (recovery stops rather than ending early).
    WalFetch {
        /// File name (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// Point-in-time restore into a throwaway server, checks, RTO and RPO.
    Drill {
        #[command(flatten)]
        target: TargetArgs,
        /// Where the scratch data directory goes (default: the system temp directory).
        #[arg(long, env = "COFFER_SCRATCH")]
        scratch: Option<PathBuf>,
        /// SQL that must return true (repeatable), run on the recovered database.
        #[arg(long = "check-sql", env = "COFFER_CHECK_SQL")]
        check_sql: Vec<String>,
        /// How long recovery may take.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Keep the scratch directory (for inspection).
        #[arg(long)]
        keep: bool,
    },
}

impl Cli {
    fn source(&self, target: RecoveryTarget) -> Result<PgSource, SourceError> {
        if self.block_size < 8192 || !self.block_size.is_multiple_of(8192) || self.block_size > 8 << 20 {
            return Err(SourceError::Failed(format!(
                "--block-size {} must be a multiple of 8 KiB, at most 8 MiB",
                self.block_size
            )));
        }
        let a = &self.agent;
        Ok(PgSource {
            conn: self.pg_conn.clone(),
            pgdata: self.pgdata.clone(),
            fast_checkpoint: self.checkpoint == "fast",
            direct_reads: self.read == "direct",
            block_size: self.block_size as u32,
            recovery: target,
            restore_config: a.asset.clone().map(|asset| RestoreConfig {
                coordinator: a.coordinator.clone(),
                ca: a.ca.clone(),
                cert: a.cert.clone(),
                key: a.key.clone(),
                identity: a.identity.clone(),
                asset,
            }),
        })
    }
}

/// Writes the heartbeat row every `interval` while the daemon runs.
async fn heartbeat(conn: String, interval: Duration) {
    let mut session = None;
    let mut failing = false;
    loop {
        if session.is_none() {
            session = pg::connect(&conn)
                .await
                .map_err(|e| {
                    if !failing {
                        tracing::warn!("heartbeat: {e}")
                    }
                })
                .ok();
        }
        if let Some(s) = &session {
            match s.heartbeat().await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!("heartbeat: {e}");
                    }
                    failing = true;
                    session = None;
                }
            }
        } else {
            failing = true;
        }
        tokio::time::sleep(interval).await;
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.cmd {
        Cmd::Run => {
            let source = cli.source(RecoveryTarget::default())?;
            // Bound before anything else starts: a socket that cannot be served is a
            // configuration error, not something to retry.
            let wal_socket = match &cli.wal_socket {
                Some(path) => {
                    let (listener, uid) = walsock::bind(path).await?;
                    tracing::info!(socket = %path.display(), "serving wal-push on a local socket");
                    Some(tokio::spawn(walsock::serve(listener, uid, cli.agent.clone())))
                }
                None => None,
            };
            let hb = match (&cli.pg_conn, cli.heartbeat_interval.is_zero()) {
                (Some(conn), false) => Some(tokio::spawn(heartbeat(conn.clone(), cli.heartbeat_interval))),
                _ => None,
            };
            let r = coffer_common::runtime::daemon::run(&cli.agent, "postgres", &source).await;
            for task in [hb, wal_socket].into_iter().flatten() {
                task.abort();
            }
            if let Some(path) = &cli.wal_socket {
                let _ = std::fs::remove_file(path);
            }
            r
        }
        Cmd::WalPush { path } => {
            // Pushed ahead by an earlier call with this exact content: nothing to do.
            if walpush::pushed_already(path)? {
                return Ok(());
            }
            if let Some(socket) = &cli.wal_socket {
                match walsock::hand_off(socket, path, cli.wal_push_ahead).await {
                    walsock::HandOff::Done(out) => {
                        tracing::info!(pushed = ?out.pushed, already = ?out.already, "WAL archived by the daemon");
                        return Ok(());
                    }
                    walsock::HandOff::Failed(e) => return Err(SourceError::Failed(e).into()),
                    walsock::HandOff::Unavailable(why) => {
                        tracing::warn!("no agent daemon took the WAL file ({why}); archiving it directly");
                    }
                }
            }
            let ctx = cli.agent.connect("postgres").await?;
            let out = walpush::push(&ctx, path, cli.wal_push_ahead).await?;
            tracing::info!(pushed = ?out.pushed, already = ?out.already, "WAL archived");
            Ok(())
        }
        Cmd::WalFetch { name, dest } => {
            if walpush::take_prefetched(name, dest) {
                walpush::trim_prefetch(dest, name);
                return Ok(());
            }
            let ctx = match cli.agent.connect("postgres").await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: wal-fetch {name}: {e}");
                    std::process::exit(126);
                }
            };
            match walpush::fetch(&ctx, name, dest, cli.wal_prefetch).await {
                Ok(()) => {
                    walpush::trim_prefetch(dest, name);
                    Ok(())
                }
                Err(walpush::FetchError::NotFound(msg)) => {
                    eprintln!("{msg}");
                    std::process::exit(1);
                }
                Err(walpush::FetchError::Failed(e)) => {
                    eprintln!("error: wal-fetch {name}: {e}");
                    std::process::exit(126);
                }
            }
        }
        Cmd::Backup => {
            let source = cli.source(RecoveryTarget::default())?;
            let ctx = cli.agent.connect(source.kind()).await?;
            let info = cli::backup(&ctx, &source).await?;
            cli::print_snapshot(&info);
            Ok(())
        }
        Cmd::List => cli::list(&cli.agent.connect("postgres").await?).await,
        Cmd::Info => {
            let ctx = cli.agent.connect("postgres").await?;
            print!("{}", recovery::info(&ctx.coord, &ctx.asset).await?);
            Ok(())
        }
        Cmd::Restore { target, to } => {
            let rt = target.target()?;
            let source = cli.source(rt.clone())?;
            let ctx = cli.agent.connect(source.kind()).await?;
            let (base, _) = recovery::choose_base(&ctx.coord, &ctx.asset, &target.snapshot, &rt).await?;
            eprintln!("restoring base backup {} (stops at {}) to recover to {}", base.id, base.stop_lsn, rt.describe());
            cli::restore(&ctx, &source, &base.id, to).await?;
            println!(
                "start PostgreSQL on {} to replay the archived WAL to {} (restore_command fetches it through wal-fetch)",
                to.display(),
                rt.describe()
            );
            Ok(())
        }
        Cmd::Drill { target, scratch, check_sql, timeout, keep } => {
            let rt = target.target()?;
            let source = cli.source(rt)?;
            let ctx = cli.agent.connect(source.kind()).await?;
            let opts = drill::DrillOptions {
                snapshot: target.snapshot.clone(),
                scratch: scratch.clone(),
                pg_bin: cli.pg_bin.clone(),
                heartbeat_interval: cli.heartbeat_interval,
                checks: check_sql.clone(),
                timeout: *timeout,
                keep: *keep,
                pg_user: cli.pg_user.clone(),
            };
            drill::drill(&ctx, &source, &opts).await?.finish(&ctx.asset, "PostgreSQL")
        }
    }
}

fn main() -> ExitCode {
    cli::agent_main("coffer-agent-postgres", |c: &Cli| c.agent.log_format, run)
}
