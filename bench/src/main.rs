//! bench-agent: feeds a directory tree through the agent runtime, for `bench/ingest`.
//!
//! It is an ordinary agent (same flags, keyring, pipeline, protocol and verified restore as
//! every other) whose source is a directory. Each command ends with one machine-readable
//! line on stdout, `BENCH <command> key=value ...`, that the benchmark script parses.

mod source;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use coffer_common::runtime::cli::{self, AgentArgs};
use coffer_common::runtime::{Source, SourceError};

use crate::source::DirSource;

/// Coffer bench agent: backs up and restores a directory tree (asset kind `files`).
#[derive(Parser, Debug)]
#[command(name = "bench-agent", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Directory to back up.
    #[arg(long, global = true, env = "COFFER_DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: cli::Command,
}

async fn run(cli: Cli) -> Result<(), cli::CliError> {
    let started = Instant::now();
    let source = DirSource { dir: cli.dir };
    if let cli::Command::Run = cli.cmd {
        return coffer_common::runtime::daemon::run(&cli.agent, "files", &source).await;
    }
    let ctx = cli.agent.connect(source.kind()).await?;
    match cli.cmd {
        cli::Command::Run => unreachable!("handled above"),
        cli::Command::Backup => {
            let info = cli::backup(&ctx, &source).await?;
            println!(
                "BENCH backup seconds={:.3} bytes={} new_bytes={} files={} snapshot={}",
                started.elapsed().as_secs_f64(),
                info.size,
                info.new_bytes,
                info.files,
                info.id
            );
        }
        cli::Command::Restore { snapshot, to } => {
            cli::restore(&ctx, &source, &snapshot, &to).await?;
            let files = source::walk(&to)?;
            let mut bytes = 0;
            for f in &files {
                bytes += std::fs::metadata(&f.abs).map_err(SourceError::io(format!("{}", f.abs.display())))?.len();
            }
            println!(
                "BENCH restore seconds={:.3} bytes={bytes} files={}",
                started.elapsed().as_secs_f64(),
                files.len()
            );
        }
        cli::Command::List => cli::list(&ctx).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    cli::agent_main("coffer-bench-agent", |c: &Cli| c.agent.log_format, run)
}
