//! The retention matrix as policy: how often each asset is backed up, which recovery points
//! are kept, how many copies it needs, how long they are locked, whether it may be rebuilt
//! instead of restored, and how often its restore is drilled.
//!
//! The design brief's matrix is the built-in default per asset kind. The config file
//! overrides any field per kind (`[policy.kinds.etcd]`) or per asset
//! (`[policy.assets."etcd/cp"]`); an asset's effective policy is built-in, then kind, then
//! asset, field by field (a `retention` table replaces the whole retention).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use coffer_common::units::{format_duration, parse_duration};
use serde::Deserialize;

/// `[policy]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyConfig {
    #[serde(default)]
    pub kinds: BTreeMap<String, PolicyOverride>,
    #[serde(default)]
    pub assets: BTreeMap<String, PolicyOverride>,
}

/// Any subset of a policy's fields, as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyOverride {
    /// `hourly`, `daily`, `weekly`, `every DURATION` (or just `DURATION`), a five-field
    /// cron expression (UTC), `continuous` (the agent streams, e.g. WAL) or `manual`.
    pub schedule: Option<String>,
    /// Expected interval between recovery points, when the schedule does not imply one
    /// (`continuous`, `manual`) or should be judged more loosely.
    pub expected_interval: Option<String>,
    pub retention: Option<RetentionConfig>,
    /// Copy targets every recovery point must reach (`local`, `s3`, `offsite`, ...).
    pub copies: Option<Vec<String>>,
    /// Object Lock retention in days for packs and manifests (0: none).
    pub lock_days: Option<i64>,
    /// The asset can be rebuilt from elsewhere; its staleness is a warning, not an outage.
    pub rebuildable: Option<bool>,
    /// Restore drill cadence: `daily`, `weekly`, `monthly`, `quarterly`, a duration, or `none`.
    pub drill: Option<String>,
}

/// GFS retention as written: keep everything within a window, the newest N, then the
/// newest recovery point of each hour/day/week/month/year bucket, by count (`daily = 7`)
/// or by window (`daily = "7d"`), or everything forever.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionConfig {
    pub forever: Option<bool>,
    pub within: Option<String>,
    pub last: Option<i64>,
    pub hourly: Option<KeepConfig>,
    pub daily: Option<KeepConfig>,
    pub weekly: Option<KeepConfig>,
    pub monthly: Option<KeepConfig>,
    pub yearly: Option<KeepConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeepConfig {
    Count(i64),
    Window(String),
}

/// When backups are triggered.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Once per interval (`hourly` is one hour, `daily` one day).
    Every(Duration),
    /// At the times of a cron expression (as written), evaluated in UTC.
    Cron(Box<croner::Cron>, String),
    /// The agent sends recovery points on its own (WAL); the coordinator never triggers.
    Continuous,
    /// Only when an operator or the agent asks.
    Manual,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Schedule::Every(a), Schedule::Every(b)) => a == b,
            (Schedule::Cron(_, a), Schedule::Cron(_, b)) => a == b,
            (Schedule::Continuous, Schedule::Continuous) | (Schedule::Manual, Schedule::Manual) => true,
            _ => false,
        }
    }
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let t = s.trim();
        match t {
            "hourly" => return Ok(Schedule::Every(Duration::from_secs(3600))),
            "daily" => return Ok(Schedule::Every(Duration::from_secs(86_400))),
            "weekly" => return Ok(Schedule::Every(Duration::from_secs(7 * 86_400))),
            "continuous" => return Ok(Schedule::Continuous),
            "manual" => return Ok(Schedule::Manual),
            _ => {}
        }
        if t.split_whitespace().count() == 5 {
            return <croner::Cron as std::str::FromStr>::from_str(t)
                .map(|c| Schedule::Cron(Box::new(c), t.to_string()))
                .map_err(|e| format!("{t:?} is not a valid cron expression: {e}"));
        }
        let d = t.strip_prefix("every ").unwrap_or(t);
        match parse_duration(d) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(Schedule::Every(d)),
            Ok(_) => Err(format!("{t:?}: the interval must be at least 1s")),
            Err(_) => Err(format!(
                "{t:?} is not a schedule (hourly, daily, weekly, every DURATION, a 5-field cron expression, continuous, manual)"
            )),
        }
    }

    /// The interval the schedule implies: the interval itself, or the longest gap between
    /// consecutive cron times over the next year's worth of them (up to 1000).
    pub fn interval(&self) -> Option<Duration> {
        match self {
            Schedule::Every(d) => Some(*d),
            Schedule::Cron(..) => {
                let start = 1_767_225_600; // 2026-01-01T00:00:00Z
                let mut prev = self.next_after(start)?;
                let mut longest = 0i64;
                for _ in 0..1000 {
                    let Some(t) = self.next_after(prev) else { break };
                    longest = longest.max(t - prev);
                    if t - start > 366 * 86_400 {
                        break;
                    }
                    prev = t;
                }
                (longest > 0).then(|| Duration::from_secs(longest as u64))
            }
            Schedule::Continuous | Schedule::Manual => None,
        }
    }

    /// The first time strictly after `after` (unix seconds) when a backup is due.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match self {
            Schedule::Every(d) => Some(after + d.as_secs() as i64),
            Schedule::Cron(c, _) => {
                let t = chrono::DateTime::<chrono::Utc>::from_timestamp(after, 0)?;
                c.find_next_occurrence(&t, false).ok().map(|n| n.timestamp())
            }
            Schedule::Continuous | Schedule::Manual => None,
        }
    }
}

impl Schedule {
    /// [`Schedule::next_after`] in milliseconds.
    pub fn next_after_ms(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(d) => Some(after_ms.saturating_add(d.as_millis() as i64)),
            _ => self.next_after(after_ms.div_euclid(1000)).map(|s| s * 1000),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) if d.as_secs() == 3600 => f.write_str("hourly"),
            Schedule::Every(d) if d.as_secs() == 86_400 => f.write_str("daily"),
            Schedule::Every(d) if d.as_secs() == 7 * 86_400 => f.write_str("weekly"),
            Schedule::Every(d) => write!(f, "every {}", format_duration(*d)),
            Schedule::Cron(_, text) => write!(f, "cron {text}"),
            Schedule::Continuous => f.write_str("continuous"),
            Schedule::Manual => f.write_str("manual"),
        }
    }
}

/// How many buckets of one size a rule keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The newest recovery point of each of the `n` newest buckets that have one.
    Count(u32),
    /// The newest recovery point of every bucket that has one newer than `now - window`.
    Window(Duration),
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Count(n) => write!(f, "{n}"),
            Keep::Window(d) => f.write_str(&format_duration(*d)),
        }
    }
}

/// Validated retention rules. A recovery point is kept if any rule keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub forever: bool,
    pub within: Option<Duration>,
    pub last: Option<u32>,
    pub hourly: Option<Keep>,
    pub daily: Option<Keep>,
    pub weekly: Option<Keep>,
    pub monthly: Option<Keep>,
    pub yearly: Option<Keep>,
}

impl Retention {
    /// The bucket rules with their names, in increasing bucket size.
    pub fn buckets(&self) -> impl Iterator<Item = (Bucket, Keep)> + '_ {
        [
            (Bucket::Hourly, self.hourly),
            (Bucket::Daily, self.daily),
            (Bucket::Weekly, self.weekly),
            (Bucket::Monthly, self.monthly),
            (Bucket::Yearly, self.yearly),
        ]
        .into_iter()
        .filter_map(|(b, k)| k.map(|k| (b, k)))
    }

    fn keeps_anything(&self) -> bool {
        self.forever
            || self.within.is_some_and(|d| !d.is_zero())
            || self.last.is_some_and(|n| n > 0)
            || self.buckets().any(|(_, k)| k != Keep::Count(0) && k != Keep::Window(Duration::ZERO))
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.forever {
            return f.write_str("forever");
        }
        let mut parts = Vec::new();
        if let Some(d) = self.within {
            parts.push(format!("all {}", format_duration(d)));
        }
        if let Some(n) = self.last {
            parts.push(format!("last {n}"));
        }
        for (b, k) in self.buckets() {
            parts.push(format!("{} {k}", b.name()));
        }
        f.write_str(&parts.join(", "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bucket {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }
}

/// An asset's effective policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub schedule: Schedule,
    /// Age at which the newest recovery point is late (stale at twice this).
    pub expected_interval: Option<Duration>,
    pub retention: Retention,
    pub copies: Vec<String>,
    pub lock_days: u32,
    pub rebuildable: bool,
    pub drill: Option<Duration>,
    /// Where the policy came from: `built-in`, `kind`, `asset` (the most specific layer).
    pub origin: &'static str,
}

impl Policy {
    /// Never triggers, never deletes, no expectations.
    pub fn inert() -> Policy {
        Policy {
            schedule: Schedule::Manual,
            expected_interval: None,
            retention: Retention { forever: true, ..Default::default() },
            copies: vec!["local".into()],
            lock_days: 0,
            rebuildable: false,
            drill: None,
            origin: "built-in",
        }
    }
}

/// The design brief's retention matrix, one row per asset kind, in the config format.
pub const BUILT_IN: &str = r#"
[kinds.etcd]
schedule = "hourly"
retention = { hourly = "24h", daily = "7d" }
copies = ["local", "offsite"]
lock-days = 30
rebuildable = false
drill = "monthly"

[kinds.postgres]
# Base backups daily; WAL streams continuously alongside them.
schedule = "daily"
retention = { within = "14d", monthly = 12 }
copies = ["local", "s3", "offsite"]
lock-days = 30
rebuildable = false
drill = "weekly"

[kinds.longhorn]
schedule = "hourly"
retention = { daily = "7d", weekly = "4w" }
copies = ["replicas", "s3"]
lock-days = 0
rebuildable = false
drill = "none"

[kinds.redis]
schedule = "daily"
retention = { within = "7d" }
copies = ["local", "offsite"]
lock-days = 0
rebuildable = false
drill = "none"

[kinds.objectstore]
schedule = "daily"
retention = { within = "90d" }
copies = ["primary", "cross-region", "warm"]
lock-days = 0
rebuildable = false
drill = "none"

[kinds.git]
schedule = "hourly"
retention = { forever = true }
copies = ["git-host", "s3"]
lock-days = 0
rebuildable = false
drill = "none"
"#;

/// For kinds the matrix does not name: nothing is triggered and nothing is deleted.
const FALLBACK: &str = r#"
schedule = "manual"
retention = { forever = true }
copies = ["local"]
lock-days = 0
rebuildable = false
drill = "none"
"#;

/// Parsed once: policies are resolved on every scheduler tick, scrape and replication pass.
pub fn built_in() -> &'static PolicyConfig {
    static PARSED: std::sync::LazyLock<PolicyConfig> =
        std::sync::LazyLock::new(|| toml::from_str(BUILT_IN).expect("the built-in policy parses"));
    &PARSED
}

fn fallback() -> &'static PolicyOverride {
    static PARSED: std::sync::LazyLock<PolicyOverride> =
        std::sync::LazyLock::new(|| toml::from_str(FALLBACK).expect("the fallback policy parses"));
    &PARSED
}

impl PolicyOverride {
    fn layer(&mut self, top: &PolicyOverride) {
        macro_rules! take {
            ($($f:ident),*) => { $( if top.$f.is_some() { self.$f = top.$f.clone(); } )* };
        }
        take!(schedule, expected_interval, retention, copies, lock_days, rebuildable, drill);
    }
}

impl PolicyConfig {
    /// The effective policy of `asset` (`kind/name`), or every problem with it.
    pub fn resolve(&self, asset: &str) -> Result<Policy, Vec<String>> {
        let kind = asset.split('/').next().unwrap_or(asset);
        self.resolve_layers(kind, Some(asset))
    }

    /// The effective policy of a kind with no asset-level override.
    pub fn resolve_kind(&self, kind: &str) -> Result<Policy, Vec<String>> {
        self.resolve_layers(kind, None)
    }

    fn resolve_layers(&self, kind: &str, asset: Option<&str>) -> Result<Policy, Vec<String>> {
        let mut merged = built_in().kinds.get(kind).unwrap_or_else(fallback).clone();
        let mut origin = "built-in";
        if let Some(k) = self.kinds.get(kind) {
            merged.layer(k);
            origin = "kind";
        }
        if let Some(a) = asset.and_then(|a| self.assets.get(a)) {
            merged.layer(a);
            origin = "asset";
        }
        let ctx = match asset {
            Some(a) if self.assets.contains_key(a) => format!("policy.assets.\"{a}\""),
            _ => format!("policy.kinds.{kind}"),
        };
        validate(&merged, &ctx, origin)
    }

    /// Checks every override (as applied over the built-in policy of its kind) and reports
    /// every problem at once.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for kind in self.kinds.keys() {
            if let Err(p) = self.resolve_kind(kind) {
                problems.extend(p);
            }
        }
        for asset in self.assets.keys() {
            match asset.split_once('/') {
                Some((k, n)) if !k.is_empty() && !n.is_empty() => {
                    if let Err(p) = self.resolve(asset) {
                        problems.extend(p);
                    }
                }
                _ => problems.push(format!("policy.assets.\"{asset}\": asset names are KIND/NAME")),
            }
        }
        problems
    }
}

fn validate(o: &PolicyOverride, ctx: &str, origin: &'static str) -> Result<Policy, Vec<String>> {
    let mut problems = Vec::new();
    let schedule_text = o.schedule.as_deref().unwrap_or("manual");
    let schedule = Schedule::parse(schedule_text).unwrap_or_else(|e| {
        problems.push(format!("{ctx}.schedule: {e}"));
        Schedule::Manual
    });
    let expected_interval = match &o.expected_interval {
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                problems.push(format!("{ctx}.expected-interval: must be more than zero"));
                None
            }
            Err(e) => {
                problems.push(format!("{ctx}.expected-interval: {e}"));
                None
            }
        },
        None => schedule.interval(),
    };
    let retention = retention(o.retention.as_ref(), ctx, &mut problems);
    if !retention.keeps_anything() {
        problems.push(format!("{ctx}.retention: keeps nothing (set forever, within, last or a bucket rule)"));
    }
    if let Some(interval) = expected_interval {
        let short = |what: String, window: Duration| {
            (window < interval).then(|| {
                format!(
                    "{ctx}.retention.{what}: {} is shorter than the interval between recovery points ({})",
                    format_duration(window),
                    format_duration(interval)
                )
            })
        };
        if let Some(d) = retention.within {
            problems.extend(short("within".into(), d));
        }
        for (b, k) in retention.buckets() {
            if let Keep::Window(d) = k {
                problems.extend(short(b.name().into(), d));
            }
        }
    }
    let copies = o.copies.clone().unwrap_or_default();
    if copies.is_empty() {
        problems.push(format!("{ctx}.copies: at least one copy is required"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &copies {
        if c.is_empty() || !c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            problems.push(format!("{ctx}.copies: {c:?} is not a copy target name (lowercase letters, digits, -)"));
        }
        if !seen.insert(c) {
            problems.push(format!("{ctx}.copies: {c:?} is listed twice"));
        }
    }
    let lock_days = match o.lock_days.unwrap_or(0) {
        n @ 0..=36_500 => n as u32,
        n => {
            problems.push(format!("{ctx}.lock-days: {n} is outside 0..=36500"));
            0
        }
    };
    let drill = match o.drill.as_deref().unwrap_or("none") {
        "none" => None,
        "daily" => Some(Duration::from_secs(86_400)),
        "weekly" => Some(Duration::from_secs(7 * 86_400)),
        "monthly" => Some(Duration::from_secs(30 * 86_400)),
        "quarterly" => Some(Duration::from_secs(91 * 86_400)),
        s => match parse_duration(s) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                problems.push(format!(
                    "{ctx}.drill: {s:?} is not a cadence (daily, weekly, monthly, quarterly, a duration, none)"
                ));
                None
            }
        },
    };
    if problems.is_empty() {
        Ok(Policy {
            schedule,
            expected_interval,
            retention,
            copies,
            lock_days,
            rebuildable: o.rebuildable.unwrap_or(false),
            drill,
            origin,
        })
    } else {
        Err(problems)
    }
}

fn retention(r: Option<&RetentionConfig>, ctx: &str, problems: &mut Vec<String>) -> Retention {
    let Some(r) = r else { return Retention::default() };
    let mut out = Retention { forever: r.forever.unwrap_or(false), ..Default::default() };
    if let Some(w) = &r.within {
        match parse_duration(w) {
            Ok(d) => out.within = Some(d),
            Err(e) => problems.push(format!("{ctx}.retention.within: {e}")),
        }
    }
    if let Some(n) = r.last {
        match u32::try_from(n) {
            Ok(n) => out.last = Some(n),
            Err(_) => problems.push(format!("{ctx}.retention.last: {n} is not a count (0 or more)")),
        }
    }
    let keep = |name: &str, k: &Option<KeepConfig>, problems: &mut Vec<String>| -> Option<Keep> {
        match k.as_ref()? {
            KeepConfig::Count(n) => match u32::try_from(*n) {
                Ok(n) => Some(Keep::Count(n)),
                Err(_) => {
                    problems.push(format!("{ctx}.retention.{name}: {n} is not a count (0 or more)"));
                    None
                }
            },
            KeepConfig::Window(w) => match parse_duration(w) {
                Ok(d) => Some(Keep::Window(d)),
                Err(e) => {
                    problems.push(format!("{ctx}.retention.{name}: {e}"));
                    None
                }
            },
        }
    };
    out.hourly = keep("hourly", &r.hourly, problems);
    out.daily = keep("daily", &r.daily, problems);
    out.weekly = keep("weekly", &r.weekly, problems);
    out.monthly = keep("monthly", &r.monthly, problems);
    out.yearly = keep("yearly", &r.yearly, problems);
    if out.forever
        && r.forever == Some(true)
        && (out.within.is_some() || out.last.is_some() || out.buckets().count() > 0)
    {
        problems.push(format!("{ctx}.retention: forever keeps everything; drop the other rules"));
    }
    out
}

/// Rows of `coordinator policy show`: one per built-in or configured kind and per asset
/// that is configured or known to the catalog, with its effective policy.
pub fn show(config: &PolicyConfig, assets: &[String]) -> Result<String, Vec<String>> {
    let mut subjects: Vec<(String, Policy)> = Vec::new();
    let mut kinds: std::collections::BTreeSet<String> = built_in().kinds.keys().cloned().collect();
    kinds.extend(config.kinds.keys().cloned());
    let mut problems = Vec::new();
    for k in &kinds {
        match config.resolve_kind(k) {
            Ok(p) => subjects.push((format!("{k}/*"), p)),
            Err(p) => problems.extend(p),
        }
    }
    let mut names: std::collections::BTreeSet<String> = assets.iter().cloned().collect();
    names.extend(config.assets.keys().cloned());
    for a in &names {
        match config.resolve(a) {
            Ok(p) => subjects.push((a.clone(), p)),
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let header = ["ASSET", "SCHEDULE", "EXPECTED", "RETENTION", "COPIES", "LOCK", "REBUILDABLE", "DRILL", "FROM"];
    let rows: Vec<[String; 9]> = subjects
        .iter()
        .map(|(name, p)| {
            [
                name.clone(),
                p.schedule.to_string(),
                p.expected_interval.map_or("-".into(), format_duration),
                p.retention.to_string(),
                p.copies.join(","),
                if p.lock_days == 0 { "-".into() } else { format!("{}d", p.lock_days) },
                if p.rebuildable { "yes".into() } else { "no".into() },
                p.drill.map_or("-".into(), format_duration),
                p.origin.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> PolicyConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_built_in_matrix() {
        let c = PolicyConfig::default();
        let etcd = c.resolve("etcd/cp").unwrap();
        assert_eq!(etcd.schedule, Schedule::Every(Duration::from_secs(3600)));
        assert_eq!(etcd.expected_interval, Some(Duration::from_secs(3600)));
        assert_eq!(etcd.retention.hourly, Some(Keep::Window(Duration::from_secs(86_400))));
        assert_eq!(etcd.retention.daily, Some(Keep::Window(Duration::from_secs(7 * 86_400))));
        assert_eq!(etcd.copies, ["local", "offsite"]);
        assert_eq!(etcd.lock_days, 30);
        assert_eq!(etcd.drill, Some(Duration::from_secs(30 * 86_400)));
        let pg = c.resolve("postgres/main").unwrap();
        assert_eq!(pg.retention.within, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(pg.retention.monthly, Some(Keep::Count(12)));
        assert_eq!(pg.copies.len(), 3);
        let vol = c.resolve("longhorn/pvc-1").unwrap();
        assert_eq!(vol.retention.weekly, Some(Keep::Window(Duration::from_secs(28 * 86_400))));
        assert_eq!(c.resolve("redis/cache").unwrap().retention.within, Some(Duration::from_secs(7 * 86_400)));
        assert!(c.resolve("git/platform").unwrap().retention.forever);
        // A kind the matrix does not name is never triggered and never pruned.
        let other = c.resolve("files/x").unwrap();
        assert_eq!(other.schedule, Schedule::Manual);
        assert!(other.retention.forever);
        assert_eq!(other.expected_interval, None);
    }

    #[test]
    fn overrides_layer_field_by_field() {
        let c = config(
            r#"
            [kinds.etcd]
            schedule = "every 30m"
            [assets."etcd/cp"]
            copies = ["local"]
            retention = { last = 3 }
            "#,
        );
        let kind = c.resolve("etcd/other").unwrap();
        assert_eq!(kind.schedule, Schedule::Every(Duration::from_secs(1800)));
        assert_eq!(kind.copies, ["local", "offsite"], "untouched fields come from the built-in row");
        assert_eq!(kind.origin, "kind");
        let asset = c.resolve("etcd/cp").unwrap();
        assert_eq!(asset.schedule, Schedule::Every(Duration::from_secs(1800)));
        assert_eq!(asset.copies, ["local"]);
        assert_eq!(asset.retention, Retention { last: Some(3), ..Default::default() }, "retention is replaced whole");
        assert_eq!(asset.lock_days, 30);
        assert_eq!(asset.origin, "asset");
    }

    #[test]
    fn schedules() {
        assert_eq!(Schedule::parse("5s").unwrap(), Schedule::Every(Duration::from_secs(5)));
        assert_eq!(Schedule::parse("every 2h").unwrap().interval(), Some(Duration::from_secs(7200)));
        let cron = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(cron.interval(), Some(Duration::from_secs(86_400)));
        // 2026-01-01T00:00:00Z -> 03:00 the same day.
        assert_eq!(cron.next_after(1_767_225_600), Some(1_767_225_600 + 3 * 3600));
        let weekdays = Schedule::parse("0 1 * * 1-5").unwrap();
        assert_eq!(weekdays.interval(), Some(Duration::from_secs(3 * 86_400)), "Friday to Monday");
        assert_eq!(Schedule::parse("continuous").unwrap().interval(), None);
        assert!(Schedule::parse("sometimes").is_err());
        assert!(Schedule::parse("0 99 * * *").is_err());
        assert!(Schedule::parse("0s").is_err());
        assert_eq!(Schedule::parse("hourly").unwrap().to_string(), "hourly");
        assert_eq!(Schedule::parse("every 90s").unwrap().to_string(), "every 90s");
    }

    #[test]
    fn every_problem_is_reported() {
        let c = config(
            r#"
            [kinds.etcd]
            schedule = "hourly"
            retention = { hourly = "30m", daily = -3 }
            copies = []
            lock-days = -1
            drill = "sometimes"
            [kinds.redis]
            schedule = "whenever"
            [assets.nokind]
            rebuildable = true
            "#,
        );
        let problems = c.validate();
        let joined = problems.join("\n");
        for want in [
            "policy.kinds.etcd.retention.hourly: 30m is shorter than the interval between recovery points (1h)",
            "policy.kinds.etcd.retention.daily: -3 is not a count",
            "policy.kinds.etcd.copies: at least one copy is required",
            "policy.kinds.etcd.lock-days: -1",
            "policy.kinds.etcd.drill",
            "policy.kinds.redis.schedule",
            "policy.assets.\"nokind\": asset names are KIND/NAME",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<PolicyConfig>("[kinds.etcd]\nschedul = \"hourly\"\n").unwrap_err();
        assert!(err.to_string().contains("schedul"), "{err}");
        let err = toml::from_str::<PolicyConfig>("[kinds.etcd.retention]\nfortnightly = 2\n").unwrap_err();
        assert!(err.to_string().contains("fortnightly"), "{err}");
    }

    #[test]
    fn empty_retention_is_refused() {
        let c = config("[kinds.etcd]\nretention = { last = 0 }\n");
        assert!(c.validate().join("\n").contains("keeps nothing"));
    }

    #[test]
    fn show_prints_one_row_per_kind_and_asset() {
        let c = config("[assets.\"git/platform\"]\nschedule = \"every 10s\"\n");
        let table = show(&c, &["etcd/cp".to_string()]).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ASSET"));
        let row = |name: &str| lines.iter().find(|l| l.starts_with(&format!("{name} "))).copied().unwrap_or("");
        assert!(row("etcd/*").contains("hourly 1d, daily 1w"), "{table}");
        assert!(row("etcd/cp").contains("built-in"), "{table}");
        assert!(row("git/platform").contains("every 10s"), "{table}");
        assert!(row("git/platform").contains("asset"), "{table}");
        assert!(row("postgres/*").contains("all 2w, monthly 12"), "{table}");
    }
}
