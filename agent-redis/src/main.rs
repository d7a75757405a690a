//! agent-redis: backs up a Redis server's dataset (an RDB taken over the replication
//! protocol) to a Coffer coordinator, restores it as a file, and drills restores.

mod delta;
mod drill;
mod rdb;
mod resp;
mod source;

use std::process::ExitCode;

use clap::Parser;
use coffer_common::runtime::cli::{self, AgentArgs};
use coffer_common::runtime::{Source, SourceError};

use crate::resp::RedisUrl;

/// Coffer agent for Redis.
#[derive(Parser, Debug)]
#[command(name = "agent-redis", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Server to back up: redis://[user:password@]HOST:PORT (rediss:// for TLS).
    #[arg(long, global = true, env = "COFFER_REDIS_URL")]
    redis_url: Option<String>,
    /// redis-server binary for drills and restores into a server.
    #[arg(long, global = true, env = "COFFER_REDIS_SERVER", default_value = "redis-server")]
    redis_server: String,
    /// The server's data directory, when the agent runs beside it: back up with BGSAVE and
    /// read the RDB file instead of replicating.
    #[arg(long, global = true, env = "COFFER_REDIS_DATA_DIR")]
    redis_data_dir: Option<std::path::PathBuf>,
    /// rediss://: CA certificate (PEM) that signed the server's certificate.
    #[arg(long, global = true, env = "COFFER_REDIS_CA")]
    redis_ca: Option<std::path::PathBuf>,
    /// rediss://: client certificate (PEM) for servers that ask for one (Redis does by default).
    #[arg(long, global = true, env = "COFFER_REDIS_CERT", requires = "redis_key")]
    redis_cert: Option<std::path::PathBuf>,
    /// rediss://: the client certificate's private key (PEM).
    #[arg(long, global = true, env = "COFFER_REDIS_KEY", requires = "redis_cert")]
    redis_key: Option<std::path::PathBuf>,
    /// Keeps the RDB of the newest full snapshot here (plaintext, owner-only), so delta
    /// snapshots patch against it without downloading it. Per asset, about one RDB.
    #[arg(long, global = true, env = "COFFER_CACHE_DIR", default_value = "coffer-cache")]
    cache_dir: std::path::PathBuf,
    /// A full snapshot at least every N backups; in between, a backup stores only a patch
    /// against the last full one (1: every backup full).
    #[arg(long, global = true, env = "COFFER_REDIS_FULL_EVERY", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..))]
    full_every: u64,
    /// `restore --to redis://…`: replace the keys of a server that is not empty.
    #[arg(long, global = true, env = "COFFER_FORCE")]
    force: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Common(cli::Command),
    /// Restore a snapshot into a throwaway redis-server, check it, report RTO and RPO.
    Drill {
        /// Snapshot id, or `latest`.
        #[arg(long, env = "COFFER_SNAPSHOT", default_value = "latest")]
        snapshot: String,
    },
}

async fn run(cli: Cli) -> Result<(), cli::CliError> {
    let tls = resp::TlsFiles { ca: cli.redis_ca.clone(), cert: cli.redis_cert.clone(), key: cli.redis_key.clone() };
    let url = cli
        .redis_url
        .as_deref()
        .map(RedisUrl::parse)
        .transpose()
        .map_err(|e| cli::CliError::Source(SourceError::Failed(e.to_string())))?
        .map(|mut u| {
            if u.tls.is_some() {
                u.tls = Some(tls.clone());
            }
            u
        });
    let source = source::RedisSource {
        url,
        force: cli.force,
        redis_server: cli.redis_server.clone(),
        data_dir: cli.redis_data_dir.clone(),
        tls,
        cache_dir: Some(cli.cache_dir.clone()),
        full_every: cli.full_every,
    };
    if let Cmd::Common(cli::Command::Run) = cli.cmd {
        return coffer_common::runtime::daemon::run(&cli.agent, "redis", &source).await;
    }
    let ctx = cli.agent.connect(source.kind()).await?;
    match cli.cmd {
        Cmd::Common(cli::Command::Backup) => {
            let info = cli::backup(&ctx, &source).await?;
            cli::print_snapshot(&info);
            Ok(())
        }
        Cmd::Common(cli::Command::Restore { snapshot, to }) => cli::restore(&ctx, &source, &snapshot, &to).await,
        Cmd::Common(cli::Command::List) => cli::list(&ctx).await,
        Cmd::Common(cli::Command::Run) => Ok(()),
        Cmd::Drill { snapshot } => {
            drill::drill(&ctx, &snapshot, &cli.redis_server).await?.finish(&ctx.asset, "redis-server")
        }
    }
}

fn main() -> ExitCode {
    cli::agent_main("coffer-agent-redis", |c: &Cli| c.agent.log_format, run)
}
