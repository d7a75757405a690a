//! agent-etcd: backs up etcd through the maintenance Snapshot API to a Coffer coordinator,
//! restores byte-identical snapshot files for the stock restore tools, and drills restores.

mod drill;
mod source;
mod trailer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coffer_common::runtime::Source;
use coffer_common::runtime::cli::{self, AgentArgs};

/// Coffer agent for etcd.
#[derive(Parser, Debug)]
#[command(name = "agent-etcd", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// etcd client URLs (https:// for TLS), comma-separated.
    #[arg(long, global = true, env = "COFFER_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA that signed the etcd members' certificates.
    #[arg(long, global = true, env = "COFFER_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key etcd accepts (client-cert-auth).
    #[arg(long, global = true, env = "COFFER_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "COFFER_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// Which member to take the snapshot from.
    #[arg(long, global = true, env = "COFFER_ETCD_PREFER", value_enum, default_value = "follower")]
    prefer: source::Prefer,
    /// Stock restore tool for drills: `etcdctl` (3.4) or `etcdutl` (3.5+).
    #[arg(long, global = true, env = "COFFER_ETCD_RESTORE_TOOL", default_value = "etcdctl")]
    restore_tool: String,
    /// etcd binary for drills.
    #[arg(long, global = true, env = "COFFER_ETCD_BINARY", default_value = "etcd")]
    etcd_binary: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Common(cli::Command),
    /// Restore a snapshot with the stock tool into a throwaway etcd, check it, report RTO/RPO.
    Drill {
        /// Snapshot id, or `latest`.
        #[arg(long, env = "COFFER_SNAPSHOT", default_value = "latest")]
        snapshot: String,
    },
}

async fn run(cli: Cli) -> Result<(), cli::CliError> {
    let source = source::EtcdSource {
        endpoints: cli.etcd_endpoints.clone(),
        tls: source::EtcdTls { ca: cli.etcd_ca.clone(), cert: cli.etcd_cert.clone(), key: cli.etcd_key.clone() },
        prefer: cli.prefer,
    };
    if let Cmd::Common(cli::Command::Run) = cli.cmd {
        return coffer_common::runtime::daemon::run(&cli.agent, "etcd", &source).await;
    }
    let ctx = cli.agent.connect(source.kind()).await?;
    match cli.cmd {
        Cmd::Common(cli::Command::Backup) => {
            let info = cli::backup(&ctx, &source).await?;
            cli::print_snapshot(&info);
            Ok(())
        }
        Cmd::Common(cli::Command::Restore { snapshot, to }) => {
            cli::restore(&ctx, &source, &snapshot, &to).await?;
            let t = to.display();
            println!("verify it with stock tools before restoring it:");
            println!(
                "  ssh-keygen -Y verify -f {t}.allowed_signers -I \"$(cut -d' ' -f1 {t}.allowed_signers)\" -n coffer-manifest -s {t}.manifest.sig < {t}.manifest"
            );
            println!("  sha256sum {t}   # must equal the sha256 of \"snapshot.db\" in {t}.manifest");
            println!(
                "then restore it: ETCDCTL_API=3 etcdctl snapshot restore {t} --data-dir NEW_DIR (or etcdutl / talosctl etcd restore)"
            );
            Ok(())
        }
        Cmd::Common(cli::Command::List) => cli::list(&ctx).await,
        Cmd::Common(cli::Command::Run) => Ok(()),
        Cmd::Drill { snapshot } => {
            drill::drill(&ctx, &snapshot, &cli.restore_tool, &cli.etcd_binary).await?.finish(&ctx.asset, "etcd")
        }
    }
}

fn main() -> ExitCode {
    cli::agent_main("coffer-agent-etcd", |c: &Cli| c.agent.log_format, run)
}
