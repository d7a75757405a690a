//! Layered configuration for every binary: command-line flag, then `COFFER_*` environment
//! variable, then config file key, then built-in default.
//!
//! Each flag `--foo-bar` is also `COFFER_FOO_BAR` (declared with clap's `env`) and the config
//! file key `foo-bar`. File values become the flags' defaults before parsing, so clap's own
//! precedence (flag > env > default) gives the order above. A key that names no flag is an
//! error, reported together with every other unknown key.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Command;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: unknown keys {keys:?} (known keys: {known})")]
    UnknownKeys { path: String, keys: Vec<String>, known: String },
    #[error(transparent)]
    Cli(#[from] clap::Error),
}

/// Parses `T` from the process's arguments, environment and config file.
pub fn parse<T: clap::Parser>() -> Result<T, ConfigError> {
    parse_from::<T, _>(std::env::args_os())
}

pub fn parse_from<T: clap::Parser, I: IntoIterator<Item = OsString>>(args: I) -> Result<T, ConfigError> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut cmd = T::command();
    if let Some(path) = config_path(&args) {
        cmd = apply_file(cmd, &path)?;
    }
    let matches = cmd.try_get_matches_from(args)?;
    Ok(T::from_arg_matches(&matches)?)
}

/// `--config FILE`, `--config=FILE`, or `COFFER_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if s == "--" {
            break;
        }
    }
    std::env::var_os("COFFER_CONFIG").map(PathBuf::from)
}

fn apply_file(mut cmd: Command, path: &std::path::Path) -> Result<Command, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: p.clone(), source })?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { path: p.clone(), message: e.to_string() })?;
    let mut unknown = Vec::new();
    for (key, value) in table {
        if key == "config" {
            unknown.push(key);
            continue;
        }
        let values = match to_strings(&value) {
            Some(v) => v,
            None => {
                return Err(ConfigError::Parse {
                    path: p,
                    message: format!("key {key:?}: tables are not allowed here"),
                });
            }
        };
        let mut found = false;
        if cmd.get_arguments().any(|a| a.get_long() == Some(key.as_str())) {
            found = true;
            let id = arg_id(&cmd, &key);
            cmd = cmd.mut_arg(id, |a| a.default_values(values.clone()));
        }
        let subs: Vec<String> = cmd
            .get_subcommands()
            .filter(|s| s.get_arguments().any(|a| a.get_long() == Some(key.as_str())))
            .map(|s| s.get_name().to_string())
            .collect();
        for sub in subs {
            found = true;
            let values = values.clone();
            let key = key.clone();
            cmd = cmd.mut_subcommand(sub, move |s| {
                let id = arg_id(&s, &key);
                s.mut_arg(id, |a| a.default_values(values))
            });
        }
        if !found {
            unknown.push(key);
        }
    }
    if unknown.is_empty() {
        Ok(cmd)
    } else {
        let mut known: Vec<String> = cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|l| l != "config" && l != "help" && l != "version")
            .collect();
        known.sort();
        known.dedup();
        Err(ConfigError::UnknownKeys { path: p, keys: unknown, known: known.join(", ") })
    }
}

fn arg_id(cmd: &Command, long: &str) -> String {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .map(|a| a.get_id().to_string())
        .expect("argument was found by its long name")
}

fn to_strings(v: &toml::Value) -> Option<Vec<String>> {
    Some(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Datetime(d) => vec![d.to_string()],
        toml::Value::Array(a) => a.iter().map(to_strings).collect::<Option<Vec<_>>>()?.concat(),
        toml::Value::Table(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true, env = "COFFER_TEST_LAYER_ASSET", default_value = "builtin/x")]
        asset: String,
        #[arg(long, global = true, env = "COFFER_TEST_LAYER_BUDGET", default_value = "1")]
        memory_budget: u64,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Restore {
            #[arg(long)]
            to: Option<String>,
        },
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn args(extra: &[&str]) -> Vec<OsString> {
        std::iter::once("prog").chain(extra.iter().copied()).map(OsString::from).collect()
    }

    #[test]
    fn file_then_flag_precedence_and_subcommand_keys() {
        let f = write("asset = \"git/file\"\nmemory-budget = 7\nto = \"/tmp/x\"\n");
        let path = f.path().to_str().unwrap();
        let c: Cli = parse_from(args(&["--config", path, "restore"])).unwrap();
        assert_eq!(c.asset, "git/file");
        assert_eq!(c.memory_budget, 7);
        let Sub::Restore { to } = c.cmd;
        assert_eq!(to.as_deref(), Some("/tmp/x"));
        let c: Cli = parse_from(args(&["--config", path, "restore", "--asset", "git/flag"])).unwrap();
        assert_eq!(c.asset, "git/flag");
        let c: Cli = parse_from(args(&["restore"])).unwrap();
        assert_eq!(c.asset, "builtin/x");
    }

    #[test]
    fn unknown_keys_are_all_reported() {
        let f = write("asset = \"git/a\"\nretension = 3\nfoo = 1\n");
        let err = parse_from::<Cli, _>(args(&["--config", f.path().to_str().unwrap(), "restore"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("retension") && msg.contains("foo"), "{msg}");
        assert!(msg.contains("memory-budget"), "lists known keys: {msg}");
    }

    #[test]
    fn malformed_file_is_an_error() {
        let f = write("asset = \n");
        assert!(matches!(
            parse_from::<Cli, _>(args(&["--config", f.path().to_str().unwrap(), "restore"])),
            Err(ConfigError::Parse { .. })
        ));
    }
}
