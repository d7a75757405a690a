use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coffer_common::telemetry::{self, LogFormat};
use coffer_coordinator::config::Config;
use tokio_util::sync::CancellationToken;

/// Coffer coordinator.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Config file (TOML). Without one the built-in defaults apply: data in ./coffer-data,
    /// a development CA, agent `dev` granted every asset.
    #[arg(long, env = "COFFER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (repository, catalog, development certificates).
    #[arg(long, env = "COFFER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "COFFER_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the coordinator.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, env = "COFFER_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address of the Prometheus /metrics endpoint, or `off`.
        #[arg(long, env = "COFFER_METRICS_LISTEN")]
        metrics_listen: Option<String>,
    },
    /// Check every stored chunk's checksum (reads the repository; needs no keys), or with
    /// --target the copies in an S3 target (the coordinator must be stopped; while it runs,
    /// use AdminService/Verify with `target`). Exit 2 when anything is wrong.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Verify this copy target's objects instead of the local repository.
        #[arg(long)]
        target: Option<String>,
        /// With --target: download each object and check it (packs chunk by chunk)
        /// instead of comparing the store's checksums.
        #[arg(long, requires = "target")]
        deep: bool,
        /// With --target: every object, not only those new or due (verify-recheck).
        #[arg(long, requires = "target")]
        all: bool,
    },
    /// Replace corrupt or missing local packs with verified copies from the copy targets
    /// (the coordinator must be stopped). Exit 2 if any pack could not be repaired.
    Repair {
        #[command(flatten)]
        common: Common,
    },
    /// Apply retention offline (the coordinator must be stopped; while it runs, use
    /// AdminService/RetentionPlan and ApplyRetention). Dry run unless --apply.
    Prune {
        #[command(flatten)]
        common: Common,
        /// Delete what the plan deletes and free unused packs.
        #[arg(long)]
        apply: bool,
        /// Only this asset.
        #[arg(long)]
        asset: Option<String>,
    },
    /// Build a new coordinator's repository and catalog from one copy target alone (DR):
    /// download the target's objects into an empty data directory, then index every pack
    /// and record every manifest whose signature verifies.
    Rebuild {
        #[command(flatten)]
        common: Common,
        /// The copy target to rebuild from (a `[targets.NAME]` in the config).
        #[arg(long)]
        from: String,
    },
    /// The retention matrix as this coordinator applies it.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Print the effective policy of every asset kind, of every asset named in the config,
    /// and of every asset in the catalog (when the data directory has one).
    Show {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Write a development CA, the coordinator's certificate and client certificates.
    Init {
        #[arg(long, env = "COFFER_OUT")]
        out: PathBuf,
        /// Agent names (spiffe://coffer/agent/NAME); repeatable.
        #[arg(long = "agent", env = "COFFER_AGENT", value_delimiter = ',')]
        agents: Vec<String>,
        /// Admin names (spiffe://coffer/admin/NAME); repeatable.
        #[arg(long = "admin", env = "COFFER_ADMIN", value_delimiter = ',')]
        admins: Vec<String>,
    },
}

/// File, then environment and flags (already merged by clap), then built-in defaults.
fn load(common: &Common) -> anyhow::Result<(Config, PathBuf)> {
    let mut config = match &common.config {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    };
    if let Some(d) = &common.data_dir {
        config.data_dir = Some(d.clone());
    }
    if let Some(f) = common.log_format {
        config.log_format = Some(f);
    }
    config.validate()?;
    let data_dir = config.data_dir.clone().unwrap_or_else(|| PathBuf::from("coffer-data"));
    Ok((config, data_dir))
}

fn main() -> anyhow::Result<()> {
    coffer_common::runtime::cli::tune_malloc();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Certs { cmd: CertsCmd::Init { out, agents, admins } } => {
            let issued = coffer_coordinator::certs::init(&out, &agents, &admins)?;
            for f in issued.files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Cmd::Prune { common, apply, asset } => {
            let (config, data_dir) = load(&common)?;
            let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
            let _lock = coffer_coordinator::server::lock_data_dir(&data_dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let repo = coffer_coordinator::store::Repo::open_existing(&data_dir.join("repo"))
                    .with_context(|| format!("opening the repository in {}", data_dir.display()))?;
                let catalog = coffer_coordinator::catalog::Catalog::open(&data_dir.join("catalog.db")).await?;
                coffer_coordinator::server::reconcile(&repo, &catalog).await?;
                let collecting = Default::default();
                let ctx = coffer_coordinator::prune::PruneCtx {
                    config: &config,
                    repo: &repo,
                    catalog: &catalog,
                    collecting: &collecting,
                };
                let now = coffer_common::time::unix_seconds(coffer_common::time::now());
                let report = coffer_coordinator::prune::prune(&ctx, asset.as_deref(), now, apply).await;
                catalog.close().await;
                print!("{}", coffer_coordinator::prune::render(&report?, apply));
                anyhow::Ok(())
            })
        }
        Cmd::Rebuild { common, from } => {
            let (config, data_dir) = load(&common)?;
            let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
            let target = config
                .targets
                .get(&from)
                .ok_or_else(|| anyhow::anyhow!("no copy target {from:?} in the config ([targets.{from}])"))?
                .clone();
            std::fs::create_dir_all(&data_dir)?;
            let _lock = coffer_coordinator::server::lock_data_dir(&data_dir)?;
            let root = data_dir.join("repo");
            if data_dir.join("catalog.db").exists() || root.join("config.json").exists() {
                anyhow::bail!(
                    "{} already holds a repository or catalog; rebuild into an empty data directory",
                    data_dir.display()
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let n = coffer_coordinator::replicate::download_all(&from, &target, &root).await?;
                println!("fetched {n} objects from {from} ({}/{})", target.bucket, target.prefix);
                // Keys pinned in the config win over the copy's (a tampered copy could
                // carry a forger's key).
                for (agent, grant) in &config.agents {
                    if let Some(key) = &grant.signing_key {
                        let p = root.join("agents").join(format!("{agent}.pub"));
                        std::fs::create_dir_all(root.join("agents"))?;
                        std::fs::write(&p, format!("{}\n", key.trim()))?;
                    }
                }
                let repo = coffer_coordinator::store::Repo::open(&root)?;
                let catalog = coffer_coordinator::catalog::Catalog::open(&data_dir.join("catalog.db")).await?;
                let report = coffer_coordinator::server::reconcile(&repo, &catalog).await?;
                catalog.close().await;
                println!("indexed {} packs, recorded {} snapshots", report.packs_indexed, report.snapshots_recorded);
                for (asset, snap, why) in &report.rejected {
                    println!("REJECTED {asset} {snap}: {why}");
                }
                if report.rejected.is_empty() { anyhow::Ok(()) } else { std::process::exit(2) }
            })
        }
        Cmd::Policy { cmd: PolicyCmd::Show { common } } => {
            let (config, data_dir) = load(&common)?;
            let catalog = data_dir.join("catalog.db");
            let assets = if catalog.exists() {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let c = coffer_coordinator::catalog::Catalog::open(&catalog).await?;
                    let names = c.assets().await?.into_iter().map(|a| a.name).collect::<Vec<_>>();
                    c.close().await;
                    anyhow::Ok(names)
                })
                .with_context(|| format!("reading assets from {}", catalog.display()))?
            } else {
                Vec::new()
            };
            let table = coffer_coordinator::policy::show(&config.policy, &assets)
                .map_err(|p| anyhow::anyhow!("invalid policy:\n  - {}", p.join("\n  - ")))?;
            print!("{table}");
            Ok(())
        }
        Cmd::Repair { common } => {
            let (config, data_dir) = load(&common)?;
            let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
            let _lock = coffer_coordinator::server::lock_data_dir(&data_dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let repaired = rt.block_on(async {
                let repo = coffer_coordinator::store::Repo::open_existing(&data_dir.join("repo"))
                    .with_context(|| format!("opening the repository in {}", data_dir.display()))?;
                let catalog = coffer_coordinator::catalog::Catalog::open(&data_dir.join("catalog.db")).await?;
                let r = coffer_coordinator::copyverify::repair_local(&repo, &catalog, &config.targets).await;
                catalog.close().await;
                anyhow::Ok(r?)
            })?;
            for r in &repaired {
                let verdict = if r.from.is_some() { "REPAIRED" } else { "UNREPAIRED" };
                println!("{verdict} pack {}: {}", r.pack, r.detail);
            }
            println!(
                "{} pack(s) needed repair, {} repaired",
                repaired.len(),
                repaired.iter().filter(|r| r.from.is_some()).count()
            );
            if repaired.iter().all(|r| r.from.is_some()) { Ok(()) } else { std::process::exit(2) }
        }
        Cmd::Verify { common, target: Some(name), deep, all } => {
            let (config, data_dir) = load(&common)?;
            let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
            let target = config
                .targets
                .get(&name)
                .ok_or_else(|| anyhow::anyhow!("no copy target {name:?} in the config ([targets.{name}])"))?;
            let _lock = coffer_coordinator::server::lock_data_dir(&data_dir)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(async {
                let catalog = coffer_coordinator::catalog::Catalog::open(&data_dir.join("catalog.db")).await?;
                let now = coffer_coordinator::scheduler::system_now_ms();
                let due = if all { i64::MAX } else { now - config.verify_recheck.as_millis() as i64 };
                let scratch = data_dir.join("repo").join("tmp");
                let r =
                    coffer_coordinator::copyverify::verify_target(&catalog, &scratch, &name, target, deep, due, now)
                        .await;
                catalog.close().await;
                anyhow::Ok(r?)
            })?;
            print!("{}", coffer_coordinator::copyverify::render(&report));
            if report.problems.is_empty() { Ok(()) } else { std::process::exit(2) }
        }
        Cmd::Verify { common, .. } => {
            let (config, data_dir) = load(&common)?;
            let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
            let repo = coffer_coordinator::store::Repo::open_existing(&data_dir.join("repo"))
                .with_context(|| format!("opening the repository in {}", data_dir.display()))?;
            let report = coffer_coordinator::verify::verify_repo(&repo)?;
            println!(
                "verified {} packs, {} chunks, {} bytes: {} problem(s)",
                report.packs,
                report.chunks,
                report.bytes,
                report.problems.len()
            );
            for p in &report.problems {
                let chunk = p.chunk.map(|c| c.to_hex()).unwrap_or_else(|| "-".into());
                println!(
                    "CORRUPT pack {} chunk {} asset {} snapshots [{}]: {}",
                    p.pack,
                    chunk,
                    p.asset,
                    p.snapshots.join(", "),
                    p.detail
                );
            }
            if report.ok() { Ok(()) } else { std::process::exit(2) }
        }
        Cmd::Serve { common, listen, metrics_listen } => {
            let (mut config, data_dir) = load(&common)?;
            if let Some(l) = listen {
                config.listen = Some(l.to_string());
            }
            if let Some(m) = metrics_listen {
                config.metrics_listen = m;
                config.validate()?;
            }
            let listen: SocketAddr = config.listen.as_deref().unwrap_or("127.0.0.1:7443").parse()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let _t = telemetry::init("coffer-coordinator", config.log_format.unwrap_or_default());
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signals.cancel();
                });
                coffer_coordinator::server::serve(config, data_dir, listen, shutdown, None).await?;
                Ok(())
            })
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
