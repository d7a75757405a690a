//! agent-longhorn: backs up a block volume (a device that is a point-in-time clone, or a raw
//! image) in 2 MiB blocks, uploading only blocks the coordinator lacks and never holes;
//! restores sparse and verified; drills a restore with a filesystem check.
//!
//! With `--longhorn-url` it also asks the Longhorn manager for the volume's health and
//! replicas (recorded in the manifest: the coordinator counts the `replicas` copy from
//! them) and marks the backup's point with a Longhorn snapshot, deleted afterwards.
//! Not yet: on-change triggering.

mod longhorn;
mod source;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use coffer_common::runtime::cli::{self, AgentArgs, DrillReport};
use coffer_common::runtime::{SnapshotReader, Source, SourceError};

use crate::source::BlockSource;

/// Coffer agent for block volumes.
#[derive(Parser, Debug)]
#[command(name = "agent-longhorn", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// The volume: a block device (a CSI snapshot restored to a `volumeMode: Block` PVC) or a
    /// raw image file.
    #[arg(long, global = true, env = "COFFER_DEVICE")]
    device: Option<PathBuf>,
    /// The Longhorn volume's name, recorded in the manifest.
    #[arg(long, global = true, env = "COFFER_VOLUME")]
    volume: Option<String>,
    /// Longhorn manager API, e.g. http://longhorn-backend.longhorn-system:9500 (needs --volume).
    #[arg(long, global = true, env = "COFFER_LONGHORN_URL", requires = "volume")]
    longhorn_url: Option<String>,
    /// `run` with --longhorn-url: back up when this much has been written since the last
    /// snapshot (the volume head's size), besides the schedule.
    #[arg(long, global = true, env = "COFFER_CHANGE_THRESHOLD", default_value = "256MiB", value_parser = coffer_common::units::parse_size)]
    change_threshold: u64,
    /// `run`: at most one on-change backup per this interval.
    #[arg(long, global = true, env = "COFFER_CHANGE_MIN_INTERVAL", default_value = "15m", value_parser = humantime::parse_duration)]
    change_min_interval: std::time::Duration,
    /// `run`: how often the volume head's size is polled.
    #[arg(long, global = true, env = "COFFER_CHANGE_POLL", default_value = "30s", value_parser = humantime::parse_duration)]
    change_poll: std::time::Duration,
    /// How backups read the volume: `direct` (`O_DIRECT`: the node's page cache is neither
    /// filled with the volume nor paid for) or `cached` (through the page cache).
    #[arg(long, global = true, env = "COFFER_READ", default_value = "direct", value_parser = ["direct", "cached"])]
    read: String,
    /// `restore --to` an existing device or image of the same size: overwrite it.
    #[arg(long, global = true, env = "COFFER_FORCE")]
    force: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Common(cli::Command),
    /// Restore into a scratch image, check every block and the whole-volume SHA-256, run a
    /// read-only filesystem check (ext4, xfs), report RTO and RPO.
    Drill {
        /// Snapshot id, or `latest`.
        #[arg(long, env = "COFFER_SNAPSHOT", default_value = "latest")]
        snapshot: String,
        /// Where the scratch image goes (default: the system temp directory).
        #[arg(long, env = "COFFER_SCRATCH")]
        scratch: Option<PathBuf>,
    },
}

/// The filesystem a volume image holds, by its superblock magic.
fn filesystem(image: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image).ok()?;
    let mut magic = [0u8; 4];
    if f.read_exact_at(&mut magic, 0).is_ok() && &magic == b"XFSB" {
        return Some("xfs");
    }
    let mut m = [0u8; 2];
    (f.read_exact_at(&mut m, 1080).is_ok() && m == [0x53, 0xEF]).then_some("ext4")
}

/// The stock read-only check for a filesystem image.
fn fs_check(fs: &str, image: &Path) -> Result<String, String> {
    let mut cmd = match fs {
        "xfs" => {
            let mut c = std::process::Command::new("xfs_repair");
            c.arg("-n");
            c
        }
        _ => {
            let mut c = std::process::Command::new("e2fsck");
            c.args(["-f", "-n"]);
            c
        }
    };
    let name = if fs == "xfs" { "xfs_repair -n" } else { "e2fsck -f -n" };
    let out = cmd.arg(image).output().map_err(|e| format!("{name}: {e}"))?;
    if out.status.success() {
        Ok(format!("{name} found the {fs} filesystem clean"))
    } else {
        Err(format!(
            "{name} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .take(8)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    }
}

async fn drill(
    ctx: &cli::AgentContext,
    source: &BlockSource,
    snapshot: &str,
    scratch: Option<PathBuf>,
) -> Result<DrillReport, SourceError> {
    let started = Instant::now();
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, snapshot, ctx.args.restore_options()).await?;
    let dir = scratch.unwrap_or_else(std::env::temp_dir).join(format!("coffer-volume-drill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(SourceError::io(format!("creating {}", dir.display())))?;
    let image = dir.join("volume.img");
    let result = async {
        source.restore(&reader, &image).await?;
        reader.finish();
        let v = source.verify_full(reader.manifest(), &image).await?;
        let mut report = DrillReport {
            snapshot: reader.manifest().snapshot.clone(),
            checks: v.checks,
            problems: v.problems,
            ..Default::default()
        };
        match filesystem(&image) {
            Some(fs) => match tokio::task::spawn_blocking({
                let image = image.clone();
                move || fs_check(fs, &image)
            })
            .await
            .map_err(|e| SourceError::Failed(e.to_string()))?
            {
                Ok(c) => report.checks.push(c),
                Err(p) => report.problems.push(p),
            },
            None => report.checks.push("no ext4 or xfs superblock: filesystem check skipped".into()),
        }
        report.rto = started.elapsed();
        let taken = coffer_common::time::parse_rfc3339(&reader.manifest().finished_at);
        report.rpo = taken.and_then(|t| std::time::SystemTime::now().duration_since(t).ok()).unwrap_or_default();
        Ok::<_, SourceError>(report)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(cli: Cli) -> Result<(), cli::CliError> {
    let source = BlockSource {
        device: cli.device.clone(),
        volume: cli.volume.clone(),
        force: cli.force,
        direct_reads: cli.read == "direct",
        longhorn: cli.longhorn_url.as_deref().map(|u| std::sync::Arc::new(longhorn::Client::new(u))),
    };
    let source = std::sync::Arc::new(source);
    if let Cmd::Common(cli::Command::Run) = cli.cmd {
        let on_change = match (&source.longhorn, &source.volume) {
            (Some(client), Some(volume)) => Some(tokio::spawn(on_change(
                cli.agent.clone(),
                source.clone(),
                client.clone(),
                volume.clone(),
                cli.change_threshold,
                cli.change_min_interval,
                cli.change_poll,
            ))),
            _ => None,
        };
        let r = coffer_common::runtime::daemon::run(&cli.agent, "longhorn", source.as_ref()).await;
        if let Some(t) = on_change {
            t.abort();
        }
        return r;
    }
    let source = source.as_ref();
    let ctx = cli.agent.connect(source.kind()).await?;
    match cli.cmd {
        Cmd::Common(cli::Command::Backup) => {
            let info = cli::backup(&ctx, source).await?;
            cli::print_snapshot(&info);
            Ok(())
        }
        Cmd::Common(cli::Command::Restore { snapshot, to }) => cli::restore(&ctx, source, &snapshot, &to).await,
        Cmd::Common(cli::Command::List) => cli::list(&ctx).await,
        Cmd::Common(cli::Command::Run) => Ok(()),
        Cmd::Drill { snapshot, scratch } => {
            drill(&ctx, source, &snapshot, scratch).await?.finish(&ctx.asset, "verified volume image")
        }
    }
}

/// Backs up when the volume head (bytes written since the newest Longhorn snapshot) passes
/// `threshold`, at most once per `min_interval`. Each backup's own Longhorn snapshot resets
/// the head, so the head measures what changed since the last backup.
async fn on_change(
    args: AgentArgs,
    source: std::sync::Arc<BlockSource>,
    client: std::sync::Arc<longhorn::Client>,
    volume: String,
    threshold: u64,
    min_interval: std::time::Duration,
    poll: std::time::Duration,
) {
    let mut last: Option<Instant> = None;
    loop {
        tokio::time::sleep(poll).await;
        let (c, v) = (client.clone(), volume.clone());
        let head = match tokio::task::spawn_blocking(move || c.head_size(&v)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(%volume, "on-change: reading the volume head: {e}");
                continue;
            }
            Err(_) => continue,
        };
        if head < threshold || last.is_some_and(|t| t.elapsed() < min_interval) {
            continue;
        }
        tracing::info!(%volume, head, threshold, "on-change: the volume changed enough; backing up");
        last = Some(Instant::now());
        let result = async {
            let ctx = args.connect(source.kind()).await?;
            cli::backup(&ctx, source.as_ref()).await
        }
        .await;
        match result {
            Ok(info) => tracing::info!(snapshot = %info.id, "on-change backup committed"),
            Err(e) => tracing::warn!("on-change backup failed: {e}"),
        }
    }
}

fn main() -> ExitCode {
    cli::agent_main("coffer-agent-longhorn", |c: &Cli| c.agent.log_format, run)
}
