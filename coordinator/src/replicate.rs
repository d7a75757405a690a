//! Copies: the repository replicated to S3-compatible targets.
//!
//! A target holds the same layout as the local repository (`config.json`, `packs/`,
//! `manifests/`, `keyrings/`, `agents/`) under its prefix, so any single copy is enough to
//! rebuild from. The replication job scans the local repository, records every object each
//! target must hold in the catalog's `replication` table (a persistent queue: it survives
//! restarts, and the next scan refills anything missing), and uploads what is pending:
//! everything else before manifest signatures, signatures before manifests, so a manifest
//! never reaches a target before the packs it names. Objects of assets whose policy sets
//! lock days are written with Object Lock retention until `now + lock days`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::ObjectLockMode;
use serde::Deserialize;

use crate::service::Shared;

/// `[targets.NAME]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetConfig {
    /// S3 endpoint URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`).
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket (`coffer/` or empty).
    #[serde(default)]
    pub prefix: String,
    /// Files holding the access key id and the secret key; without them the standard
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment variables are used.
    pub access_key_file: Option<PathBuf>,
    pub secret_key_file: Option<PathBuf>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Object Lock mode for locked assets: `compliance` (default) or `governance`.
    #[serde(default = "default_lock_mode")]
    pub lock_mode: String,
    /// Upload at most this many bytes per second to this target (`50MiB`; none by default).
    #[serde(default, deserialize_with = "de_rate")]
    pub bandwidth_limit: Option<u64>,
    /// Objects uploaded at once (default 4). Memory: at most this many multipart parts are
    /// held at a time; single PUTs stream from the file.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Objects at least this large go up as multipart uploads (default 64MiB).
    #[serde(default = "default_multipart_threshold", deserialize_with = "de_size")]
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (default 16MiB; S3 allows 5MiB..=5GiB).
    #[serde(default = "default_part_size", deserialize_with = "de_size")]
    pub multipart_part_size: u64,
    /// Attempts per request on throttling, 5xx answers and network errors, with
    /// exponential backoff and jitter between them (default 5).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    coffer_common::units::parse_size(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}
fn default_concurrency() -> usize {
    4
}
fn default_multipart_threshold() -> u64 {
    64 << 20
}
fn default_part_size() -> u64 {
    16 << 20
}
fn default_max_attempts() -> u32 {
    5
}

fn de_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| coffer_common::units::parse_size(&s).map_err(serde::de::Error::custom)).transpose()
}

/// When the next upload may start so that `bytes` just sent keep the average under `limit`
/// bytes per second: the pacing clock moves on by `bytes / limit` from the later of itself
/// and now (idle time is not saved up as a burst).
pub fn pace(next: std::time::Instant, now: std::time::Instant, bytes: u64, limit: u64) -> std::time::Instant {
    next.max(now) + std::time::Duration::from_secs_f64(bytes as f64 / limit.max(1) as f64)
}

fn default_region() -> String {
    "us-east-1".into()
}
fn yes() -> bool {
    true
}
fn default_lock_mode() -> String {
    "compliance".into()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicateError {
    #[error("target {target}: {detail}")]
    Config { target: String, detail: String },
    #[error("target {target}: uploading {key}: {detail}")]
    Upload { target: String, key: String, detail: String },
    #[error("target {target}: {key}: {detail}")]
    Read { target: String, key: String, detail: String },
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl TargetConfig {
    pub fn validate(&self, name: &str) -> Vec<String> {
        let mut p = Vec::new();
        if name == "local" {
            p.push("targets.local: `local` is the coordinator's own data directory, not a configurable target".into());
        }
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            p.push(format!("targets.{name}.endpoint: {:?} is not an http(s) URL", self.endpoint));
        }
        if self.bucket.is_empty() {
            p.push(format!("targets.{name}.bucket: required"));
        }
        if self.access_key_file.is_some() != self.secret_key_file.is_some() {
            p.push(format!("targets.{name}: access-key-file and secret-key-file go together"));
        }
        if !matches!(self.lock_mode.as_str(), "compliance" | "governance") {
            p.push(format!("targets.{name}.lock-mode: {:?} is not compliance or governance", self.lock_mode));
        }
        if !(1..=64).contains(&self.concurrency) {
            p.push(format!("targets.{name}.concurrency: {} is outside 1..=64", self.concurrency));
        }
        if !((5 << 20)..=(5 << 30)).contains(&self.multipart_part_size) {
            p.push(format!("targets.{name}.multipart-part-size: {} is outside 5MiB..=5GiB", self.multipart_part_size));
        }
        if self.multipart_threshold < (5 << 20) {
            p.push(format!("targets.{name}.multipart-threshold: {} is below 5MiB", self.multipart_threshold));
        }
        if !(1..=20).contains(&self.max_attempts) {
            p.push(format!("targets.{name}.max-attempts: {} is outside 1..=20", self.max_attempts));
        }
        p
    }

    fn credentials(&self, name: &str) -> Result<Credentials, ReplicateError> {
        let err = |detail: String| ReplicateError::Config { target: name.to_string(), detail };
        let (ak, sk) = match (&self.access_key_file, &self.secret_key_file) {
            (Some(a), Some(s)) => (
                std::fs::read_to_string(a).map_err(|e| err(format!("reading {}: {e}", a.display())))?,
                std::fs::read_to_string(s).map_err(|e| err(format!("reading {}: {e}", s.display())))?,
            ),
            _ => (
                std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                    err("no credentials: set access-key-file/secret-key-file or AWS_ACCESS_KEY_ID".into())
                })?,
                std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| err("AWS_SECRET_ACCESS_KEY is not set".into()))?,
            ),
        };
        Ok(Credentials::new(ak.trim(), sk.trim(), None, None, "coffer-config"))
    }

    pub fn client(&self, name: &str) -> Result<aws_sdk_s3::Client, ReplicateError> {
        use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(self.path_style)
            .credentials_provider(self.credentials(name)?)
            // Throttling (SlowDown, 503), 5xx answers and dropped connections are retried
            // with exponential backoff and jitter, each request up to max-attempts times.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(self.max_attempts))
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .build(),
            )
            .http_client(http)
            .build();
        Ok(aws_sdk_s3::Client::from_conf(conf))
    }
}

/// An object the repository holds: its key (relative, `/`-separated), the asset it belongs
/// to (none for repository-wide files) and its upload order class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoObject {
    pub key: String,
    pub asset: Option<String>,
    /// 0: everything else, 1: manifest signatures, 2: manifests.
    pub order: i64,
}

/// Every object of the local repository (no `tmp/`), with the asset packs belong to from
/// the catalog.
pub fn scan(root: &Path, pack_assets: &BTreeMap<String, String>) -> std::io::Result<Vec<RepoObject>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/");
            if p.is_dir() {
                if rel != "tmp" {
                    stack.push(p);
                }
                continue;
            }
            if rel.ends_with(".tmp") || rel.starts_with('.') || rel.contains("/.") {
                continue;
            }
            let (asset, order) = if let Some(rest) = rel.strip_prefix("manifests/") {
                let asset = rest.rsplit_once('/').map(|(a, _)| a.to_string());
                (asset, if rel.ends_with(".manifest.sig") { 1 } else { 2 })
            } else if let Some(rest) = rel.strip_prefix("keyrings/") {
                (rest.strip_suffix(".age").map(str::to_string), 0)
            } else if let Some(rest) = rel.strip_prefix("packs/") {
                let id = rest.rsplit('/').next().unwrap_or_default().trim_end_matches(".pack");
                (pack_assets.get(id).cloned(), 0)
            } else {
                (None, 0)
            };
            out.push(RepoObject { key: rel, asset, order });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// One replication pass: enqueue what each target lacks, then upload what is pending.
pub async fn step(state: &Shared, now_ms: i64) -> Result<(), String> {
    if state.config.targets.is_empty() {
        return Ok(());
    }
    let pack_assets = state.catalog.pack_assets().await.map_err(|e| e.to_string())?;
    let root = state.repo.root().to_path_buf();
    let objects = tokio::task::spawn_blocking(move || scan(&root, &pack_assets))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("scanning the repository: {e}"))?;
    let mut failures = Vec::new();
    // Which targets each asset's policy names, resolved once per pass.
    let mut copies_of: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for a in objects.iter().filter_map(|o| o.asset.as_deref()) {
        copies_of.entry(a).or_insert_with(|| state.config.policy_for(a).copies);
    }
    for (name, target) in &state.config.targets {
        // Repository-wide objects go everywhere; an asset's objects go where its policy says.
        // Only objects the queue does not know yet are recorded.
        let known = state.catalog.replication_keys(name).await.map_err(|e| e.to_string())?;
        for o in objects.iter().filter(|o| !known.contains(&o.key)) {
            let wanted =
                o.asset.as_deref().is_none_or(|a| copies_of.get(a).is_some_and(|c| c.iter().any(|c| c == name)));
            if wanted {
                state
                    .catalog
                    .enqueue_replication(name, &o.key, o.asset.as_deref(), o.order, now_ms)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        // A target that failed every upload of its last passes waits (doubling from the
        // replication interval up to five minutes) before it is tried again.
        let waiting = state.target_backoff.lock().expect("backoff lock").get(name).is_some_and(|b| b.1 > now_ms);
        if waiting {
            continue;
        }
        let drained = drain(state, name, target, now_ms).await;
        {
            let mut backoff = state.target_backoff.lock().expect("backoff lock");
            if drained.failed > 0 && drained.uploaded == 0 {
                let b = backoff.entry(name.clone()).or_default();
                b.0 += 1;
                let wait = crate::jobs::backoff(state.config.replication_interval, b.0);
                b.1 = now_ms + wait.as_millis() as i64;
            } else {
                backoff.remove(name);
            }
        }
        if let Some(e) = drained.first_error {
            failures.push(e.to_string());
        }
        if let Err(e) = delete_due(state, name, target, now_ms).await {
            failures.push(e.to_string());
        }
    }
    // Packs of assets whose policy does not keep `local` leave the disk once every target
    // it names holds them (crate::remote).
    match crate::remote::drop_local_packs(state, now_ms).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(packs = n, "local pack files dropped (kept only in copy targets)"),
        Err(e) => failures.push(format!("dropping local packs: {e}")),
    }
    // One unreachable target must not slow the others down with the runner's backoff: the
    // job reports a failure (and backs off) only when no target could be served. Each
    // target's errors stay visible per object in the queue and in the asset status.
    if failures.is_empty() || failures.len() < state.config.targets.len() {
        for f in &failures {
            tracing::warn!("replication: {f}");
        }
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Deletes from the target the objects prune removed locally whose retain-until date has
/// passed (Object Lock: never earlier; on a versioned bucket this leaves a delete marker
/// and the bucket's lifecycle expires the old version).
async fn delete_due(state: &Shared, name: &str, target: &TargetConfig, now_ms: i64) -> Result<(), ReplicateError> {
    let due = state.catalog.due_remote_deletions(name, now_ms).await?;
    if due.is_empty() {
        return Ok(());
    }
    let client = state.target_client(name)?;
    let mut first_error = None;
    for key in due {
        let full = format!("{}{}", target.prefix, key);
        match client.delete_object().bucket(&target.bucket).key(&full).send().await {
            Ok(_) => {
                state.catalog.remote_deletion_done(name, &key, None).await?;
                tracing::info!(target = name, %key, "deleted from the copy target (pruned)");
            }
            Err(e) => {
                let detail = brief(&e);
                state.catalog.remote_deletion_done(name, &key, Some(&detail)).await?;
                first_error.get_or_insert(ReplicateError::Read { target: name.into(), key: full, detail });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What a target bucket's configuration says against what the policies need of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketCheck {
    pub target: String,
    /// Largest lock (days) any asset copied here asks for, and those assets' names.
    pub lock_days: u32,
    pub locked_assets: Vec<String>,
    /// Problems found (empty: the bucket matches).
    pub drift: Vec<String>,
}

/// Checks each target bucket's versioning and Object Lock configuration against the
/// policies of the assets the coordinator knows (and the per-kind policies). Never fails
/// the start-up: a bucket that cannot be read is reported as drift.
pub async fn check_buckets(state: &Shared) -> Vec<BucketCheck> {
    // Known assets, every asset the config names, and every kind (as `kind/*`).
    let mut subjects: Vec<(String, crate::policy::Policy)> = Vec::new();
    let mut names: std::collections::BTreeSet<String> = match state.catalog.assets().await {
        Ok(a) => a.into_iter().map(|a| a.name).collect(),
        Err(_) => Default::default(),
    };
    names.extend(state.config.policy.assets.keys().cloned());
    for a in names {
        let p = state.config.policy_for(&a);
        subjects.push((a, p));
    }
    let mut kinds: std::collections::BTreeSet<String> = crate::policy::built_in().kinds.keys().cloned().collect();
    kinds.extend(state.config.policy.kinds.keys().cloned());
    for k in kinds {
        if let Ok(p) = state.config.policy.resolve_kind(&k) {
            subjects.push((format!("{k}/*"), p));
        }
    }
    let mut out = Vec::new();
    for (name, target) in &state.config.targets {
        let mut check = BucketCheck { target: name.clone(), ..Default::default() };
        for (a, p) in &subjects {
            if p.lock_days > 0 && p.copies.iter().any(|c| c == name) {
                check.lock_days = check.lock_days.max(p.lock_days);
                check.locked_assets.push(a.clone());
            }
        }
        let client = match target.client(name) {
            Ok(c) => c,
            Err(e) => {
                check.drift.push(e.to_string());
                out.push(check);
                continue;
            }
        };
        let lock = client.get_object_lock_configuration().bucket(&target.bucket).send().await;
        let lock_enabled = match &lock {
            Ok(r) => r
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled"),
            Err(_) => false,
        };
        if check.lock_days > 0 && !lock_enabled {
            let why = match &lock {
                Err(e) => format!(" ({})", brief(e)),
                Ok(_) => String::new(),
            };
            check.drift.push(format!(
                "bucket {} has no Object Lock{why}, but {} need {} day(s) of lock: their copies here are NOT immutable \
                 (create the bucket with Object Lock enabled, or drop the target from their copies)",
                target.bucket,
                check.locked_assets.join(", "),
                check.lock_days
            ));
        }
        if lock_enabled
            && let Ok(r) = &lock
            && let Some(mode) = r
                .object_lock_configuration()
                .and_then(|c| c.rule())
                .and_then(|r| r.default_retention())
                .and_then(|d| d.mode())
            && !mode.as_str().eq_ignore_ascii_case(&target.lock_mode)
        {
            check.drift.push(format!(
                "bucket {} defaults to {} retention but the target's lock-mode is {}",
                target.bucket,
                mode.as_str(),
                target.lock_mode
            ));
        }
        match client.get_bucket_versioning().bucket(&target.bucket).send().await {
            Ok(v) if v.status().is_some_and(|s| s.as_str() == "Enabled") => {}
            Ok(_) if lock_enabled => {
                check.drift.push(format!("bucket {} has Object Lock but versioning is not enabled", target.bucket))
            }
            Ok(_) => {}
            // Versioning is advisory without a lock; an unreadable answer is only logged.
            Err(e) => tracing::debug!(target = %name, "reading the bucket's versioning: {}", brief(&e)),
        }
        for d in &check.drift {
            tracing::warn!(target = %name, bucket = %target.bucket, "copy target drift: {d}");
        }
        if check.drift.is_empty() {
            tracing::info!(target = %name, bucket = %target.bucket, lock_enabled, "copy target bucket checked");
        }
        out.push(check);
    }
    out
}

/// After this many failed uploads in a row a pass gives up on the target (it is likely
/// down or refusing us); the next pass tries again.
const GIVE_UP_AFTER: usize = 3;

/// How one pass over a target went.
#[derive(Debug, Default)]
struct Drained {
    uploaded: usize,
    failed: usize,
    first_error: Option<ReplicateError>,
}

/// Uploads what `name` lacks, `concurrency` objects at a time. Classes go in order
/// (everything else, then signatures, then manifests), and an item waits while an
/// earlier-class item of its asset is still not copied after being tried in this pass, so
/// a manifest never goes before its packs and signature.
async fn drain(state: &Shared, name: &str, target: &TargetConfig, now_ms: i64) -> Drained {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let client = match state.target_client(name) {
        Ok(c) => c,
        Err(e) => return Drained { failed: 1, first_error: Some(e), ..Default::default() },
    };
    let pending = match state.catalog.pending_replication(name, now_ms).await {
        Ok(p) => p,
        Err(e) => return Drained { failed: 1, first_error: Some(e.into()), ..Default::default() },
    };
    let unfinished: Mutex<std::collections::HashSet<(Option<String>, i64)>> = Default::default();
    let (in_a_row, uploaded, failed) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let first_error: Mutex<Option<ReplicateError>> = Mutex::new(None);
    let next_start = tokio::sync::Mutex::new(std::time::Instant::now());
    for class in 0..=2 {
        let items = pending.iter().filter(|i| i.order == class);
        futures::StreamExt::for_each_concurrent(futures::stream::iter(items), target.concurrency, |item| async {
            if in_a_row.load(Relaxed) >= GIVE_UP_AFTER {
                return;
            }
            {
                let mut u = unfinished.lock().expect("unfinished lock");
                if (0..item.order).any(|o| u.contains(&(item.asset.clone(), o))) {
                    u.insert((item.asset.clone(), item.order));
                    return;
                }
            }
            if let Some(limit) = target.bandwidth_limit {
                let bytes = std::fs::metadata(state.repo.root().join(&item.key)).map(|m| m.len()).unwrap_or(0);
                let start = {
                    let mut next = next_start.lock().await;
                    let now = std::time::Instant::now();
                    let start = (*next).max(now);
                    *next = pace(*next, now, bytes, limit);
                    start
                };
                tokio::time::sleep_until(start.into()).await;
            }
            match upload(state, name, target, &client, item).await {
                Ok(()) => {
                    in_a_row.store(0, Relaxed);
                    uploaded.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    unfinished.lock().expect("unfinished lock").insert((item.asset.clone(), item.order));
                    tracing::warn!(target = name, key = %item.key, "replication: {e}");
                    first_error.lock().expect("error lock").get_or_insert(e);
                    in_a_row.fetch_add(1, Relaxed);
                    failed.fetch_add(1, Relaxed);
                }
            }
        })
        .await;
    }
    Drained {
        uploaded: uploaded.into_inner(),
        failed: failed.into_inner(),
        first_error: first_error.into_inner().expect("error lock"),
    }
}

/// What an upload stored: the SHA-256 of the object and the checksum the store keeps for
/// it (the base64 SHA-256 for a single PUT; for a multipart upload the SHA-256 of the
/// parts' SHA-256s followed by `-<parts>`, S3's composite checksum).
struct Sent {
    sha256: [u8; 32],
    checksum: String,
}

/// Why an upload failed, and whether the store answered (an error about this object, which
/// backs off per object) rather than being unreachable (the whole target backs off).
struct Failed {
    detail: String,
    answered: bool,
}

impl Failed {
    fn local(detail: impl Into<String>) -> Failed {
        Failed { detail: detail.into(), answered: false }
    }
    fn s3<E>(what: &str, e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failed
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        Failed {
            detail: format!("{what}: {}", brief(e)),
            answered: matches!(e, aws_sdk_s3::error::SdkError::ServiceError(_)),
        }
    }
}

async fn upload(
    state: &Shared,
    name: &str,
    target: &TargetConfig,
    client: &aws_sdk_s3::Client,
    item: &RepoObject,
) -> Result<(), ReplicateError> {
    let mut path = state.repo.root().join(&item.key);
    let key = format!("{}{}", target.prefix, item.key);
    // A pack kept only in copy targets (its local file dropped) that this target lacks or
    // holds badly is copied from another target whose copy verifies.
    let mut scratch = None;
    if let Some(id) = item.key.strip_prefix("packs/").and_then(|k| k.rsplit('/').next()?.strip_suffix(".pack"))
        && !path.exists()
        && state.catalog.is_remote_pack(id).await?
    {
        match crate::remote::fetch_for_reupload(state, id, name).await {
            Ok(p) => {
                path = p.clone();
                scratch = Some(p);
            }
            Err(detail) => {
                state.catalog.replication_failed(name, &item.key, &detail, None).await?;
                return Err(ReplicateError::Upload { target: name.into(), key, detail });
            }
        }
    }
    let result = upload_from(state, name, target, client, item, &path, key).await;
    if let Some(p) = scratch {
        let _ = std::fs::remove_file(p);
    }
    result
}

async fn upload_from(
    state: &Shared,
    name: &str,
    target: &TargetConfig,
    client: &aws_sdk_s3::Client,
    item: &RepoObject,
    path: &Path,
    key: String,
) -> Result<(), ReplicateError> {
    let size = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        // Gone locally (pruned meanwhile): nothing to copy.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            state.catalog.replication_done(name, &item.key, crate::scheduler::system_now_ms(), None, None).await?;
            return Ok(());
        }
        Err(e) => return Err(ReplicateError::Upload { target: name.into(), key, detail: e.to_string() }),
    };
    let lock = item.asset.as_deref().and_then(|asset| {
        let days = state.config.policy_for(asset).lock_days;
        (days > 0).then(|| {
            let until = crate::scheduler::system_now_ms() / 1000 + i64::from(days) * 86_400;
            let mode =
                if target.lock_mode == "governance" { ObjectLockMode::Governance } else { ObjectLockMode::Compliance };
            (mode, DateTime::from_secs(until))
        })
    });
    let sent = if size >= target.multipart_threshold {
        upload_multipart(client, target, &key, path, size, lock).await
    } else {
        upload_single(client, target, &key, path, lock).await
    };
    match sent {
        Ok(sent) => Ok(state
            .catalog
            .replication_done(
                name,
                &item.key,
                crate::scheduler::system_now_ms(),
                Some(&hex::encode(sent.sha256)),
                Some(&sent.checksum),
            )
            .await?),
        Err(f) => {
            // An object the store refuses waits longer each time (up to five minutes), so
            // one bad object does not cost a request every pass; an unreachable store is
            // handled per target instead.
            let retry_after = f.answered.then_some(state.config.replication_interval.as_millis() as i64);
            state.catalog.replication_failed(name, &item.key, &f.detail, retry_after).await?;
            Err(ReplicateError::Upload { target: name.into(), key, detail: f.detail })
        }
    }
}

/// One PUT streamed from the file, with its SHA-256 for the store to check and keep (S3
/// flexible checksums), so `verify` can compare without downloading.
async fn upload_single(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    path: &Path,
    lock: Option<(ObjectLockMode, DateTime)>,
) -> Result<Sent, Failed> {
    let p = path.to_path_buf();
    let (digest, _) = tokio::task::spawn_blocking(move || coffer_common::crypto::sha256_file(&p))
        .await
        .map_err(|e| Failed::local(e.to_string()))?
        .map_err(|e| Failed::local(format!("reading {}: {e}", path.display())))?;
    let body = ByteStream::from_path(path).await.map_err(|e| Failed::local(e.to_string()))?;
    let mut put = client
        .put_object()
        .bucket(&target.bucket)
        .key(key)
        .body(body)
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
        .checksum_sha256(crate::copyverify::b64(&digest));
    if let Some((mode, until)) = lock {
        put = put.object_lock_mode(mode).object_lock_retain_until_date(until);
    }
    put.send().await.map_err(|e| Failed::s3("PutObject", &e))?;
    Ok(Sent { sha256: digest, checksum: crate::copyverify::b64(&digest) })
}

/// A multipart upload of a large object: parts of `multipart-part-size` read one at a time
/// (memory: one part per upload), each with its SHA-256 for the store to check. An upload
/// that fails is aborted so no orphaned parts stay billed.
async fn upload_multipart(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    path: &Path,
    size: u64,
    lock: Option<(ObjectLockMode, DateTime)>,
) -> Result<Sent, Failed> {
    use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
    let mut create =
        client.create_multipart_upload().bucket(&target.bucket).key(key).checksum_algorithm(ChecksumAlgorithm::Sha256);
    if let Some((mode, until)) = &lock {
        create = create.object_lock_mode(mode.clone()).object_lock_retain_until_date(*until);
    }
    let created = create.send().await.map_err(|e| Failed::s3("CreateMultipartUpload", &e))?;
    let upload_id = created.upload_id().ok_or_else(|| Failed::local("CreateMultipartUpload returned no upload id"))?;
    let parts = async {
        let file = std::sync::Arc::new(
            std::fs::File::open(path).map_err(|e| Failed::local(format!("opening {}: {e}", path.display())))?,
        );
        let mut whole = coffer_common::crypto::FileHasher::default();
        let (mut completed, mut part_digests) = (Vec::new(), Vec::new());
        let mut offset = 0u64;
        while offset < size {
            let len = target.multipart_part_size.min(size - offset) as usize;
            let f = file.clone();
            let (buf, digest) = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset).map(|()| {
                    let d = coffer_common::crypto::sha256(&buf);
                    (buf, d)
                })
            })
            .await
            .map_err(|e| Failed::local(e.to_string()))?
            .map_err(|e| Failed::local(format!("reading {}: {e}", path.display())))?;
            whole.update(&buf);
            let number = completed.len() as i32 + 1;
            let b64 = crate::copyverify::b64(&digest);
            let part = client
                .upload_part()
                .bucket(&target.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&b64)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| Failed::s3(&format!("UploadPart {number}"), &e))?;
            completed.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .checksum_sha256(b64)
                    .build(),
            );
            part_digests.extend_from_slice(&digest);
            offset += len as u64;
        }
        client
            .complete_multipart_upload()
            .bucket(&target.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed.clone())).build())
            .send()
            .await
            .map_err(|e| Failed::s3("CompleteMultipartUpload", &e))?;
        Ok::<_, Failed>((whole.finish(), part_digests, completed.len()))
    }
    .await;
    let (sha256, part_digests, count) = match parts {
        Ok(p) => p,
        Err(f) => {
            if let Err(e) =
                client.abort_multipart_upload().bucket(&target.bucket).key(key).upload_id(upload_id).send().await
            {
                tracing::warn!(%key, "aborting the failed multipart upload: {}", brief(&e));
            }
            return Err(f);
        }
    };
    if let Some((mode, until)) = lock {
        ensure_retention(client, target, key, mode, until).await?;
    }
    let composite = coffer_common::crypto::sha256(&part_digests);
    Ok(Sent { sha256, checksum: format!("{}-{count}", crate::copyverify::b64(&composite)) })
}

/// Makes sure a multipart object carries the retention asked for at creation: some
/// S3-compatible stores ignore the lock headers of CreateMultipartUpload, so the object's
/// retention is read back and set with PutObjectRetention when it is missing or shorter.
async fn ensure_retention(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    mode: ObjectLockMode,
    until: DateTime,
) -> Result<(), Failed> {
    use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};
    let head =
        client.head_object().bucket(&target.bucket).key(key).send().await.map_err(|e| Failed::s3("HeadObject", &e))?;
    if head.object_lock_retain_until_date().is_some_and(|d| d.secs() >= until.secs()) {
        return Ok(());
    }
    let mode = if mode == ObjectLockMode::Governance {
        ObjectLockRetentionMode::Governance
    } else {
        ObjectLockRetentionMode::Compliance
    };
    client
        .put_object_retention()
        .bucket(&target.bucket)
        .key(key)
        .retention(ObjectLockRetention::builder().mode(mode).retain_until_date(until).build())
        .send()
        .await
        .map_err(|e| Failed::s3("PutObjectRetention", &e))?;
    Ok(())
}

/// Copies every object under the target's prefix into `repo_root` (the repository layout),
/// each written atomically. Returns how many objects were fetched.
pub async fn download_all(name: &str, target: &TargetConfig, repo_root: &Path) -> Result<usize, ReplicateError> {
    let client = target.client(name)?;
    let tmp = repo_root.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(crate::store::StoreError::io(format!("creating {}", tmp.display())))?;
    let mut fetched = 0;
    let mut token = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(&target.bucket)
            .prefix(&target.prefix)
            .set_continuation_token(token.take())
            .send()
            .await
            .map_err(|e| ReplicateError::Upload {
                target: name.into(),
                key: target.prefix.clone(),
                detail: brief(&e),
            })?;
        for obj in page.contents() {
            let Some(key) = obj.key() else { continue };
            let rel = key.strip_prefix(&target.prefix).unwrap_or(key);
            if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
                continue;
            }
            let got =
                client.get_object().bucket(&target.bucket).key(key).send().await.map_err(|e| {
                    ReplicateError::Upload { target: name.into(), key: key.to_string(), detail: brief(&e) }
                })?;
            let bytes = got
                .body
                .collect()
                .await
                .map_err(|e| ReplicateError::Upload {
                    target: name.into(),
                    key: key.to_string(),
                    detail: e.to_string(),
                })?
                .into_bytes();
            let dest = repo_root.join(rel);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(crate::store::StoreError::io(format!("creating {}", dir.display())))?;
            }
            crate::store::write_atomic(&tmp, &dest, &bytes)?;
            fetched += 1;
        }
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => return Ok(fetched),
        }
    }
}

/// An S3 error in one line: the service's code and message, or the chain of causes of a
/// failure to reach it (the SDK's full context is a page of debug output).
pub(crate) fn brief<E>(e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            format!(
                "{} ({}, HTTP {})",
                err.message().unwrap_or("no message"),
                err.code().unwrap_or("unknown error"),
                se.raw().status().as_u16()
            )
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(x) = src {
                s.push_str(": ");
                s.push_str(&x.to_string());
                src = x.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_keeps_the_average_under_the_limit_without_saving_up_bursts() {
        let t0 = std::time::Instant::now();
        let mb = 1_000_000;
        // 3 MB at 1 MB/s: the next upload may start 3 s later.
        let n = pace(t0, t0, 3 * mb, mb);
        assert_eq!(n - t0, std::time::Duration::from_secs(3));
        // Sending again before that: the clock moves on from where it was.
        assert_eq!(pace(n, t0, mb, mb) - t0, std::time::Duration::from_secs(4));
        // After a long idle time: from now, not from the old clock (no burst).
        let later = t0 + std::time::Duration::from_secs(100);
        assert_eq!(pace(n, later, mb, mb) - later, std::time::Duration::from_secs(1));
    }

    #[test]
    fn scan_orders_manifests_last_and_skips_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for f in [
            "config.json",
            "packs/ab/abcd.pack",
            "manifests/git/a/S1.manifest",
            "manifests/git/a/S1.manifest.sig",
            "keyrings/git/a.age",
            "agents/git-1.pub",
            "tmp/.x.tmp",
        ] {
            std::fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            std::fs::write(r.join(f), b"x").unwrap();
        }
        let packs: BTreeMap<String, String> = [("abcd".to_string(), "git/a".to_string())].into();
        let got = scan(r, &packs).unwrap();
        let keys: Vec<(&str, Option<&str>, i64)> =
            got.iter().map(|o| (o.key.as_str(), o.asset.as_deref(), o.order)).collect();
        assert_eq!(
            keys,
            [
                ("agents/git-1.pub", None, 0),
                ("config.json", None, 0),
                ("keyrings/git/a.age", Some("git/a"), 0),
                ("manifests/git/a/S1.manifest", Some("git/a"), 2),
                ("manifests/git/a/S1.manifest.sig", Some("git/a"), 1),
                ("packs/ab/abcd.pack", Some("git/a"), 0),
            ]
        );
    }
}
