//! Coordinator configuration: a TOML file whose keys mirror the `serve` flags, plus the
//! access grants, chunker parameters and freshness policy. Unknown keys are errors, and
//! `validate` reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_common::chunker::ChunkerParams;
use coffer_common::telemetry::LogFormat;
use coffer_common::units::{serde_duration, serde_size};

use crate::policy::{Policy, PolicyConfig};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP), or `off`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    pub log_format: Option<LogFormat>,
    /// Server certificate, key and the CA that client certificates must chain to.
    /// Default: `DATA_DIR/certs/{coordinator.pem,coordinator.key,ca.pem}`, generated with a
    /// development CA on first start when none exist.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Every keyring is also wrapped to these age recipients (offline recovery).
    #[serde(default)]
    pub recovery_recipients: Vec<String>,
    /// Target size of a pack before it is sealed.
    #[serde(default = "default_pack_size", with = "serde_size")]
    pub pack_size: u64,
    /// Backups are refused while the data directory has less free space than this.
    #[serde(default = "default_min_free", with = "serde_size")]
    pub min_free_space: u64,
    /// Grace period for in-flight calls at shutdown.
    #[serde(default = "default_grace", with = "serde_duration")]
    pub shutdown_grace: Duration,
    /// How often agent daemons send heartbeats; three missed ones end a session.
    #[serde(default = "default_heartbeat", with = "serde_duration")]
    pub heartbeat_interval: Duration,
    /// How often the scheduler looks for due backups.
    #[serde(default = "default_tick", with = "serde_duration")]
    pub scheduler_tick: Duration,
    /// How often retention is applied in the background (`0s`: never; `coordinator prune`
    /// and the admin service still work).
    #[serde(default = "default_retention_interval", with = "serde_duration")]
    pub retention_interval: Duration,
    /// A pack whose dead bytes exceed this fraction of its size is rewritten by prune.
    #[serde(default = "default_repack_waste")]
    pub repack_waste: f64,
    /// Prune leaves packs younger than this alone: they may hold chunks of an interrupted
    /// backup that its retry will deduplicate against.
    #[serde(default = "default_gc_grace", with = "serde_duration")]
    pub gc_grace: Duration,
    /// An open backup with no upload stream running and no sign of its agent for this long
    /// is aborted: the agent is gone, and an open backup holds off prune's pack collection
    /// for its asset. `0s`: never (a coordinator restart still aborts them).
    #[serde(default = "default_open_backup_timeout", with = "serde_duration")]
    pub open_backup_timeout: Duration,
    /// Agents by name (the NAME of spiffe://coffer/agent/NAME).
    #[serde(default)]
    pub agents: BTreeMap<String, AgentGrant>,
    /// Admin names allowed to use the admin service; empty allows every admin certificate
    /// issued by the CA.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Chunker parameters per asset kind (default: 64 KiB / 256 KiB / 1 MiB).
    #[serde(default)]
    pub chunker: BTreeMap<String, ChunkerConfig>,
    /// The retention matrix: schedule, retention, copies, lock, drills per kind or asset,
    /// over the built-in matrix (see `policy`).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// S3-compatible copy targets by name (policies name them in `copies`).
    #[serde(default)]
    pub targets: BTreeMap<String, crate::replicate::TargetConfig>,
    /// How often the replication job looks for objects to copy.
    #[serde(default = "default_replication_interval", with = "serde_duration")]
    pub replication_interval: Duration,
    /// How often the background job verifies copies (fast mode, objects new or due).
    #[serde(default = "default_verify_interval", with = "serde_duration")]
    pub verify_interval: Duration,
    /// A routine copy verification re-checks an object verified longer ago than this.
    #[serde(default = "default_verify_recheck", with = "serde_duration")]
    pub verify_recheck: Duration,
    /// The verify job also checks every local pack (keyless, all chunk CRCs) and replaces a
    /// corrupt or missing one with a copy from a target that verifies (`coordinator repair`
    /// done automatically). Off by default: it reads the whole local repository each run.
    #[serde(default)]
    pub auto_repair: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentGrant {
    /// Asset patterns this agent may write and read; `*` matches any run of characters.
    pub assets: Vec<String>,
    /// Pins the agent's manifest-signing key (OpenSSH line); otherwise the first key the
    /// agent presents is registered and later ones must match it.
    pub signing_key: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChunkerConfig {
    #[serde(with = "serde_size")]
    pub min_size: u64,
    #[serde(with = "serde_size")]
    pub avg_size: u64,
    #[serde(with = "serde_size")]
    pub max_size: u64,
}

fn default_pack_size() -> u64 {
    32 << 20
}
fn default_min_free() -> u64 {
    256 << 20
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_replication_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_verify_interval() -> Duration {
    Duration::from_secs(86_400)
}
fn default_verify_recheck() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_gc_grace() -> Duration {
    Duration::from_secs(86_400)
}
fn default_open_backup_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_repack_waste() -> f64 {
    0.3
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_tick() -> Duration {
    Duration::from_secs(1)
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("the empty config is valid")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// What `serve` runs with when no config file is given: the development agent `dev`
    /// may use every asset.
    pub fn embedded() -> Config {
        let mut c = Config::default();
        c.agents.insert("dev".into(), AgentGrant { assets: vec!["*".into()], signing_key: None });
        c
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: p.clone(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: p, message: e.to_string() })
    }

    /// Checks everything and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (name, grant) in &self.agents {
            if !coffer_common::tls::is_valid_principal_name(name) {
                problems.push(format!("agents.{name}: not a valid agent name (lowercase letters, digits, - and _)"));
            }
            if grant.assets.is_empty() {
                problems.push(format!("agents.{name}.assets: grants nothing"));
            }
            if let Some(k) = &grant.signing_key
                && coffer_common::signing::parse_public_key(k).is_err()
            {
                problems.push(format!("agents.{name}.signing-key: not an OpenSSH Ed25519 public key"));
            }
        }
        for r in &self.recovery_recipients {
            if !r.starts_with("age1") || r.len() < 40 {
                problems.push(format!("recovery-recipients: {r:?} is not an age recipient (age1...)"));
            }
        }
        for (kind, c) in &self.chunker {
            if let Err(e) = c.params().validate() {
                problems.push(format!("chunker.{kind}: {e}"));
            }
        }
        problems.extend(self.policy.validate());
        for (name, t) in &self.targets {
            problems.extend(t.validate(name));
        }
        if self.metrics_listen != "off" && self.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "metrics-listen: {:?} is not an address like 127.0.0.1:9464 (or \"off\")",
                self.metrics_listen
            ));
        }
        if self.heartbeat_interval < Duration::from_secs(1) || self.heartbeat_interval > Duration::from_secs(3600) {
            problems.push("heartbeat-interval: must be between 1s and 1h".to_string());
        }
        if self.scheduler_tick < Duration::from_millis(100) || self.scheduler_tick > Duration::from_secs(60) {
            problems.push("scheduler-tick: must be between 100ms and 1m".to_string());
        }
        if !(0.0..1.0).contains(&self.repack_waste) {
            problems.push(format!("repack-waste: {} is outside 0 (inclusive) to 1", self.repack_waste));
        }
        if self.pack_size < (4 << 20) || self.pack_size > (1 << 30) {
            problems.push(format!("pack-size: {} is outside 4MiB..=1GiB", self.pack_size));
        }
        if let Some(l) = &self.listen
            && l.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!("listen: {l:?} is not an address like 127.0.0.1:7443"));
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
    }

    /// Whether `agent` may write and read `asset`.
    pub fn agent_may(&self, agent: &str, asset: &str) -> bool {
        self.agents.get(agent).is_some_and(|g| g.assets.iter().any(|p| glob_match(p, asset)))
    }

    pub fn admin_may(&self, admin: &str) -> bool {
        self.admins.is_empty() || self.admins.iter().any(|a| a == admin)
    }

    pub fn chunker_for(&self, kind: &str) -> ChunkerParams {
        self.chunker.get(kind).map(ChunkerConfig::params).unwrap_or_else(|| ChunkerParams::for_kind(kind))
    }

    /// The effective policy of `asset`. Config validation has checked every override, so
    /// this only fails for a config that skipped `validate`; such an asset gets the
    /// never-trigger, never-delete policy.
    pub fn policy_for(&self, asset: &str) -> Policy {
        self.policy.resolve(asset).unwrap_or_else(|problems| {
            tracing::error!(asset, ?problems, "invalid policy; nothing is triggered or deleted for this asset");
            Policy::inert()
        })
    }
}

impl ChunkerConfig {
    pub fn params(&self) -> ChunkerParams {
        let c = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        ChunkerParams { min_size: c(self.min_size), avg_size: c(self.avg_size), max_size: c(self.max_size) }
    }
}

/// `*` matches any run of characters (including `/`); everything else matches itself.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "git/a"));
        assert!(glob_match("git/*", "git/a"));
        assert!(!glob_match("git/*", "etcd/a"));
        assert!(glob_match("git/a", "git/a"));
        assert!(!glob_match("git/a", "git/ab"));
        assert!(glob_match("*/cp", "etcd/cp"));
        assert!(glob_match("g*t/*x", "git/abx"));
    }

    #[test]
    fn unknown_keys_and_every_problem_reported() {
        let err = toml::from_str::<Config>("retension = 3").unwrap_err();
        assert!(err.to_string().contains("retension"), "{err}");
        let c: Config = toml::from_str(
            r#"
            listen = "nowhere"
            recovery-recipients = ["bob"]
            [agents.Bad]
            assets = []
            [policy.kinds.git]
            schedule = "often"
            "#,
        )
        .unwrap();
        let msg = c.validate().unwrap_err().to_string();
        for needle in ["listen", "recovery-recipients", "agents.Bad", "grants nothing", "policy.kinds.git.schedule"] {
            assert!(msg.contains(needle), "missing {needle} in {msg}");
        }
    }

    #[test]
    fn defaults_and_grants() {
        let c: Config = toml::from_str(
            r#"
            [agents.git-1]
            assets = ["git/*"]
            [policy.assets."git/slow"]
            schedule = "weekly"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.agent_may("git-1", "git/x"));
        assert!(!c.agent_may("git-1", "etcd/x"));
        assert!(!c.agent_may("other", "git/x"));
        assert_eq!(c.policy_for("git/x").expected_interval, Some(Duration::from_secs(3600)));
        assert_eq!(c.policy_for("git/slow").expected_interval, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.pack_size, 32 << 20);
        assert_eq!(Config::default().chunker_for("git"), ChunkerParams::DEFAULT);
        assert_eq!(Config::default().chunker_for("etcd"), ChunkerParams::SNAPSHOTS);
        assert_eq!(Config::default().chunker_for("redis"), ChunkerParams::SNAPSHOTS);
        assert!(ChunkerParams::SNAPSHOTS.validate().is_ok());
    }
}
