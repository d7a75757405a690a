//! What every agent binary shares: the common flags, connecting with keys and keyring, and
//! the `backup`, `restore` and `list` commands driven through the [`Source`] trait.

use std::path::{Path, PathBuf};

use coffer_proto::v1 as pb;
use tracing::Instrument;

use super::backup::{BackupSink, PipelineOptions};
use super::client::{ClientError, Coordinator};
use super::restore::{RestoreOptions, SnapshotReader};
use super::{Source, SourceError};
use crate::identity::AgentIdentity;
use crate::keyring::Keyring;
use crate::telemetry::LogFormat;
use crate::tls::ClientTls;
use crate::units::{format_size, parse_size};

/// Flags every agent takes (also `COFFER_*` variables and config file keys).
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Config file (TOML); keys are the flag names without dashes in front.
    #[arg(long, global = true, env = "COFFER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator URL.
    #[arg(long, global = true, env = "COFFER_COORDINATOR", default_value = "https://127.0.0.1:7443")]
    pub coordinator: String,
    /// CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, global = true, env = "COFFER_CA", default_value = "coffer-data/certs/ca.pem")]
    pub ca: PathBuf,
    /// This agent's client certificate (PEM), URI SAN spiffe://coffer/agent/NAME.
    #[arg(long, global = true, env = "COFFER_CERT", default_value = "coffer-data/certs/agent-dev.pem")]
    pub cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long, global = true, env = "COFFER_KEY", default_value = "coffer-data/certs/agent-dev.key")]
    pub key: PathBuf,
    /// age identity file: opens the asset keyring and derives the manifest-signing key.
    /// Created (mode 0600) if missing.
    #[arg(long, global = true, env = "COFFER_IDENTITY", default_value = "coffer-agent-identity.txt")]
    pub identity: PathBuf,
    /// Asset name, `kind/name`.
    #[arg(long, global = true, env = "COFFER_ASSET")]
    pub asset: Option<String>,
    /// Extra age recipients every new keyring is wrapped to (offline recovery).
    #[arg(long, global = true, env = "COFFER_RECOVERY_RECIPIENT", value_delimiter = ',')]
    pub recovery_recipient: Vec<String>,
    /// Bytes of chunk data in flight (reading to acknowledgement).
    #[arg(long, global = true, env = "COFFER_MEMORY_BUDGET", default_value = "24MiB", value_parser = parse_size)]
    pub memory_budget: u64,
    /// zstd level for chunks (default: the agent's own, 1 for most; higher compresses more
    /// and costs CPU).
    #[arg(long, global = true, env = "COFFER_COMPRESSION_LEVEL", value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: Option<i32>,
    /// Parallel download streams during restore.
    #[arg(long, global = true, env = "COFFER_RESTORE_PARALLEL", default_value_t = 4)]
    pub restore_parallel: usize,
    #[arg(long, global = true, env = "COFFER_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// No progress bar.
    #[arg(long, global = true, env = "COFFER_QUIET")]
    pub quiet: bool,
}

/// The commands every agent has (agents with more add their own around these).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Take one snapshot now.
    Backup,
    /// Restore a snapshot into a new target and verify it.
    Restore {
        /// Snapshot id, or `latest`.
        #[arg(long, env = "COFFER_SNAPSHOT", default_value = "latest")]
        snapshot: String,
        /// Where to restore (must not exist, or be empty).
        #[arg(long, env = "COFFER_TO")]
        to: PathBuf,
    },
    /// List the asset's snapshots.
    List,
    /// Run as a daemon: hold a session with the coordinator and back up when it says so.
    Run,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error("--asset is required (kind/name, e.g. {kind}/main)")]
    NoAsset { kind: &'static str },
    #[error("asset {asset:?} is not a valid {kind} asset name (expected {kind}/NAME, lowercase)")]
    BadAsset { asset: String, kind: &'static str },
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A restore that failed, with what became of what it had written.
    #[error("{source}; {aftermath}")]
    RestoreFailed { source: Box<CliError>, aftermath: String },
}

/// A connected agent: coordinator session, identity, asset and its keyring.
pub struct AgentContext {
    pub coord: Coordinator,
    pub identity: AgentIdentity,
    pub asset: String,
    pub keyring: Keyring,
    pub args: AgentArgs,
}

impl AgentArgs {
    pub fn asset(&self, kind: &'static str) -> Result<String, CliError> {
        let asset = self.asset.clone().ok_or(CliError::NoAsset { kind })?;
        if !crate::manifest::is_valid_asset_name(&asset) || !asset.starts_with(&format!("{kind}/")) {
            return Err(CliError::BadAsset { asset, kind });
        }
        Ok(asset)
    }

    pub fn pipeline(&self) -> PipelineOptions {
        PipelineOptions {
            memory_budget: self.memory_budget as usize,
            quiet: self.quiet,
            zstd_level: self.compression_level.unwrap_or(crate::crypto::DEFAULT_ZSTD_LEVEL),
            ..Default::default()
        }
    }

    pub fn restore_options(&self) -> RestoreOptions {
        RestoreOptions { parallel: self.restore_parallel.max(1), quiet: self.quiet, ..Default::default() }
    }

    /// Loads (or creates) the identity, connects, registers and opens the asset keyring.
    pub async fn connect(&self, kind: &'static str) -> Result<AgentContext, CliError> {
        let asset = self.asset(kind)?;
        let (identity, created) = AgentIdentity::load_or_create(&self.identity, &format!("coffer agent {kind}"))?;
        if created {
            eprintln!(
                "created identity {} (age recipient {}); keep a copy offline",
                self.identity.display(),
                identity.recipient()
            );
        } else if let Some(w) = crate::identity::permission_warning(&self.identity) {
            tracing::warn!("{w}");
        }
        let tls = ClientTls { url: &self.coordinator, ca: &self.ca, cert: &self.cert, key: &self.key };
        let coord = Coordinator::connect(&tls, &identity, &[kind]).await?;
        let keyring = coord.keyring(&asset, &identity, &self.recovery_recipient).await?;
        Ok(AgentContext { coord, identity, asset, keyring, args: self.clone() })
    }
}

/// The whole `main` of an agent binary: parse flags, environment and config file (exit 2 on
/// a config error), start the runtime and telemetry, run, and print any error (exit 1).
pub fn agent_main<C, F, Fut>(service: &'static str, log_format: fn(&C) -> LogFormat, run: F) -> std::process::ExitCode
where
    C: clap::Parser,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    use std::process::ExitCode;
    let cli: C = match crate::layered::parse() {
        Ok(c) => c,
        Err(crate::layered::ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    tune_malloc();
    let rt = match tokio_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = log_format(&cli);
    rt.block_on(async move {
        let _telemetry = crate::telemetry::init(service, format);
        match run(cli).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Tunes glibc's malloc for the data path, at start-up before other threads exist:
/// - arenas capped at two. The pipeline allocates chunk buffers on one thread and frees
///   them on another; with glibc's default of up to 8 arenas per core that fragments into a
///   peak RSS far above the memory budget (measured: 146-172 MiB with a 32-64 MiB budget;
///   about 100 MiB with two arenas, and less time in the allocator). `MALLOC_ARENA_MAX`
///   still wins if set.
/// - chunk-sized buffers (up to 16 MiB) come from the heap instead of fresh mappings, and up
///   to 64 MiB of freed heap is kept instead of handed back at once. Otherwise every 2 MiB
///   buffer is a new mapping the kernel zeroes page by page: a third of the coordinator's
///   CPU while serving a volume restore went to page faults (bench/longhorn restore: 2.3 ->
///   1.5 CPU seconds on the coordinator). Memory stays bounded by the budgets, which cap
///   how many such buffers exist. `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` still
///   win if set.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |name: &str| std::env::var_os(name).is_none();
        let settings = [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 16 << 20),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 64 << 20),
        ];
        for (env, param, value) in settings {
            if unset(env) {
                // SAFETY: mallopt only adjusts allocator tuning; it is called at start-up
                // before other threads exist, with documented parameters and values.
                #[allow(unsafe_code)]
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        }
    }
}

/// The async runtime every agent runs on. Blocking threads (reads, hashing, sealing) are
/// capped so per-thread allocator arenas and zstd contexts stay few.
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .max_blocking_threads(4 * cores + 4)
        .enable_all()
        .build()
}

/// One backup: begin, let the source stream into the sink, commit; abort on any failure so
/// nothing partial becomes visible.
pub async fn backup<S: Source>(ctx: &AgentContext, source: &S) -> Result<pb::SnapshotInfo, CliError> {
    backup_job(ctx, source, "").await
}

/// [`backup`] carrying out coordinator job `job_id` (empty: the agent's own initiative).
pub async fn backup_job<S: Source>(ctx: &AgentContext, source: &S, job_id: &str) -> Result<pb::SnapshotInfo, CliError> {
    // One span for the whole backup: every call below carries its trace context.
    let span = tracing::info_span!("backup", asset = %ctx.asset, kind = source.kind(), job = job_id);
    backup_inner(ctx, source, job_id).instrument(span).await
}

async fn backup_inner<S: Source>(ctx: &AgentContext, source: &S, job_id: &str) -> Result<pb::SnapshotInfo, CliError> {
    let opts = PipelineOptions {
        job_id: job_id.to_string(),
        zstd_level: ctx.args.compression_level.unwrap_or(source.compression_level()),
        // An explicit --compression-level applies to every chunk.
        chunk_level: if ctx.args.compression_level.is_some() { None } else { source.chunk_level() },
        ..ctx.args.pipeline()
    };
    let mut sink = BackupSink::begin(&ctx.coord, &ctx.keyring, &ctx.asset, source.kind(), opts).await?;
    match source.backup(&mut sink).await {
        Ok(meta) => Ok(sink.commit(&ctx.identity, meta).await?),
        Err(e) => {
            sink.abort(&e.to_string()).await;
            Err(e.into())
        }
    }
}

/// Restore a snapshot into `to`, then verify it with the source's own check. A restore that
/// fails or does not verify takes away what it wrote, so that nothing half-restored is
/// mistaken for a good copy and the same command can simply be run again: a destination
/// that did not exist is removed, a directory that was empty is emptied again. A
/// destination that held something is left alone (a source that overwrites one, such as a
/// device with `--force`, says so in its own error).
pub async fn restore<S: Source>(ctx: &AgentContext, source: &S, snapshot: &str, to: &Path) -> Result<(), CliError> {
    let span = tracing::info_span!("restore", asset = %ctx.asset, snapshot);
    let before = Destination::inspect(to);
    match restore_inner(ctx, source, snapshot, to).instrument(span).await {
        Ok(()) => Ok(()),
        Err(e) => match before.discard_partial(to) {
            Some(aftermath) => Err(CliError::RestoreFailed { source: Box::new(e), aftermath }),
            None => Err(e),
        },
    }
}

/// Removes `path`: a directory with everything under it, anything else as a file (a
/// symbolic link itself, never what it points to).
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        _ => std::fs::remove_file(path),
    }
}

/// What a restore's destination held before the restore began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// Nothing there: everything at the path afterwards is the restore's.
    Absent,
    /// An empty directory: everything in it afterwards is the restore's.
    EmptyDir,
    /// Anything else (a device, an image, a directory with files): not ours to remove.
    Occupied,
}

impl Destination {
    fn inspect(to: &Path) -> Destination {
        match std::fs::symlink_metadata(to) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Destination::Absent,
            Ok(m) if m.is_dir() && std::fs::read_dir(to).is_ok_and(|mut d| d.next().is_none()) => Destination::EmptyDir,
            _ => Destination::Occupied,
        }
    }

    /// Takes away what a failed restore wrote at `to`; says what it did, or `None` when
    /// it did nothing (the restore never wrote there, or the destination is not ours).
    fn discard_partial(self, to: &Path) -> Option<String> {
        let shown = to.display();
        let result = match self {
            Destination::Occupied => return None,
            Destination::Absent if std::fs::symlink_metadata(to).is_err() => return None,
            Destination::Absent => remove(to),
            Destination::EmptyDir => {
                std::fs::read_dir(to).and_then(|mut entries| entries.try_for_each(|e| remove(&e?.path())))
            }
        };
        Some(match result {
            Ok(()) => format!("the partial restore at {shown} was removed"),
            Err(e) => {
                format!("the partial restore at {shown} could not be removed ({e}); remove it before using the path")
            }
        })
    }
}

async fn restore_inner<S: Source>(ctx: &AgentContext, source: &S, snapshot: &str, to: &Path) -> Result<(), CliError> {
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, snapshot, ctx.args.restore_options()).await?;
    source.restore(&reader, to).await?;
    reader.finish();
    let secs = reader.progress().elapsed().as_secs_f64();
    let bytes = reader.progress().bytes();
    let report = source.verify(reader.manifest(), to).await?;
    for c in &report.checks {
        eprintln!("  ok: {c}");
    }
    if !report.ok {
        return Err(SourceError::Failed(format!(
            "restored {} from snapshot {} but verification failed: {}",
            to.display(),
            reader.manifest().snapshot,
            report.problems.join("; ")
        ))
        .into());
    }
    let reused = match reader.reused_bytes() {
        0 => String::new(),
        n => format!(", {} copied from chunks already downloaded", format_size(n)),
    };
    println!(
        "restored snapshot {} of {} to {} ({} in {:.1}s, {:.0} MB/s{reused}), verified",
        reader.manifest().snapshot,
        ctx.asset,
        to.display(),
        format_size(bytes),
        secs,
        bytes as f64 / secs.max(1e-6) / 1e6
    );
    Ok(())
}

/// The line every agent prints for a committed snapshot (scripts parse it).
pub fn print_snapshot(info: &pb::SnapshotInfo) {
    println!(
        "snapshot {} of {}: {} in {} file(s), {} new",
        info.id,
        info.asset,
        format_size(info.size),
        info.files,
        format_size(info.new_bytes)
    );
}

/// A restore drill's outcome, reported the same way by every agent.
#[derive(Debug, Clone, Default)]
pub struct DrillReport {
    pub snapshot: String,
    /// From the start of the drill to a serving target.
    pub rto: std::time::Duration,
    /// Age of the snapshot when the drill ran.
    pub rpo: std::time::Duration,
    pub checks: Vec<String>,
    pub problems: Vec<String>,
}

impl DrillReport {
    /// Prints the checks and the verdict; an error if any check failed.
    pub fn finish(&self, asset: &str, serving: &str) -> Result<(), CliError> {
        for c in &self.checks {
            println!("  ok: {c}");
        }
        for p in &self.problems {
            println!("  FAILED: {p}");
        }
        println!(
            "drill of snapshot {} of {asset}: {}; RTO {:.2}s (restore to a serving {serving}), RPO {}s (snapshot age)",
            self.snapshot,
            if self.problems.is_empty() { "passed" } else { "FAILED" },
            self.rto.as_secs_f64(),
            self.rpo.as_secs()
        );
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(SourceError::Failed(format!("drill failed: {}", self.problems.join("; "))).into())
        }
    }
}

/// Prints the asset's snapshots, newest first.
pub async fn list(ctx: &AgentContext) -> Result<(), CliError> {
    let snaps = ctx.coord.list_snapshots(&ctx.asset, 0).await?;
    println!("{:<30} {:<21} {:>12} {:>12} {:>7}", "SNAPSHOT", "TIME", "SIZE", "NEW", "FILES");
    for s in snaps {
        println!(
            "{:<30} {:<21} {:>12} {:>12} {:>7}",
            s.id,
            s.finished_at,
            format_size(s.size),
            format_size(s.new_bytes),
            s.files
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_restore_takes_away_only_what_it_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let at = |p: &str| tmp.path().join(p);

        // Nothing there before: a file or a whole tree written since is removed.
        let file = at("restored.img");
        let before = Destination::inspect(&file);
        assert_eq!(before, Destination::Absent);
        assert_eq!(before.discard_partial(&file), None, "nothing written, nothing to say");
        std::fs::write(&file, b"partial").unwrap();
        assert!(before.discard_partial(&file).unwrap().contains("removed"));
        assert!(!file.exists());
        let dir = at("pgdata");
        let before = Destination::inspect(&dir);
        std::fs::create_dir_all(dir.join("base/5")).unwrap();
        std::fs::write(dir.join("base/5/1259"), b"page").unwrap();
        assert!(before.discard_partial(&dir).unwrap().contains("removed"));
        assert!(!dir.exists());

        // An empty directory: emptied again, and kept.
        let empty = at("empty");
        std::fs::create_dir(&empty).unwrap();
        let before = Destination::inspect(&empty);
        assert_eq!(before, Destination::EmptyDir);
        std::fs::create_dir_all(empty.join("global")).unwrap();
        std::fs::write(empty.join("PG_VERSION"), b"15").unwrap();
        std::os::unix::fs::symlink("/nonexistent", empty.join("link")).unwrap();
        assert!(before.discard_partial(&empty).unwrap().contains("removed"));
        assert!(empty.is_dir() && std::fs::read_dir(&empty).unwrap().next().is_none());

        // Something there before (a directory with files, an image): never touched.
        let full = at("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("keep"), b"mine").unwrap();
        let before = Destination::inspect(&full);
        assert_eq!(before, Destination::Occupied);
        assert_eq!(before.discard_partial(&full), None);
        assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");
        let image = at("existing.img");
        std::fs::write(&image, b"old").unwrap();
        assert_eq!(Destination::inspect(&image).discard_partial(&image), None);
        assert!(image.exists());
    }
}
