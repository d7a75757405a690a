//! agent-git: backs up a git repository (GitOps) to a Coffer coordinator.

mod git;
mod scan;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coffer_common::runtime::cli::{self, AgentArgs};

/// Coffer agent for git repositories.
#[derive(Parser, Debug)]
#[command(name = "agent-git", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Repository to protect: a URL (https, ssh, git) or a local path.
    #[arg(long, global = true, env = "COFFER_REPO")]
    repo: Option<String>,
    /// Where the agent keeps its mirror of the repository between runs.
    #[arg(long, global = true, env = "COFFER_WORK_DIR", default_value = "coffer-agent-git")]
    work_dir: PathBuf,
    /// Start a new chain with a full bundle every N snapshots.
    #[arg(long, global = true, env = "COFFER_FULL_EVERY", default_value_t = 24)]
    full_every: u32,
    #[command(subcommand)]
    cmd: cli::Command,
}

async fn run(cli: Cli) -> Result<(), cli::CliError> {
    let backup_source = |cli: &Cli, what: &str| {
        let repo = cli.repo.clone().ok_or_else(|| {
            cli::CliError::Source(coffer_common::runtime::SourceError::Failed(format!("--repo is required for {what}")))
        })?;
        // A relative local path means relative to where the agent was started, not to the
        // work directory git runs in.
        let repo = match std::fs::canonicalize(&repo) {
            Ok(abs) if std::path::Path::new(&repo).is_relative() => abs.to_string_lossy().into_owned(),
            _ => repo,
        };
        Ok::<_, cli::CliError>(source::GitSource {
            repo,
            work_dir: cli.work_dir.clone(),
            full_every: cli.full_every.max(1),
        })
    };
    if let cli::Command::Run = cli.cmd {
        // The daemon connects (and reconnects) on its own.
        let source = backup_source(&cli, "run")?;
        return coffer_common::runtime::daemon::run(&cli.agent, "git", &source).await;
    }
    let ctx = cli.agent.connect("git").await?;
    match cli.cmd {
        cli::Command::Run => unreachable!("handled above"),
        cli::Command::Backup => {
            let source = backup_source(&cli, "backup")?;
            let info = cli::backup(&ctx, &source).await?;
            cli::print_snapshot(&info);
            Ok(())
        }
        cli::Command::Restore { snapshot, to } => {
            let source =
                source::GitSource { repo: cli.repo.unwrap_or_default(), work_dir: cli.work_dir, full_every: 1 };
            cli::restore(&ctx, &source, &snapshot, &to).await
        }
        cli::Command::List => cli::list(&ctx).await,
    }
}

fn main() -> ExitCode {
    cli::agent_main("coffer-agent-git", |c: &Cli| c.agent.log_format, run)
}
