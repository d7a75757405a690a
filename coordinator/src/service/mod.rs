//! gRPC services. Handlers authorize the caller from its certificate, translate protobuf
//! messages at the edge, and map every failure to a status code in one place
//! (`impl From<ServiceError> for Status`).

pub mod admin;
pub mod agent;

use std::sync::Arc;

use coffer_common::tls::{PeerIdentity, Role, identity_from_cert};
use tonic::{Request, Status};

use crate::catalog::{Catalog, CatalogError, SnapshotRow};
use crate::config::Config;
use crate::store::{Repo, StoreError};
use coffer_proto::v1 as pb;

/// Shared state of all handlers.
pub struct State {
    pub config: Config,
    pub repo: Repo,
    pub catalog: Catalog,
    /// Serializes keyring creation so exactly one envelope wins per asset.
    pub keyring_lock: tokio::sync::Mutex<()>,
    /// When each open backup last showed life, for aborting those whose agent is gone.
    pub backup_activity: std::sync::Arc<BackupActivity>,
    /// Serializes the check and the binding of agents' signing keys, so two first Hellos of
    /// one identity with different keys cannot both be accepted.
    pub registration_lock: tokio::sync::Mutex<()>,
    /// Connected agent daemons.
    pub sessions: crate::sessions::Sessions,
    /// Background jobs and their state.
    pub jobs: std::sync::Arc<crate::jobs::Jobs>,
    /// Serializes backup triggers (scheduler and operators) so one asset never gets two.
    pub trigger_lock: tokio::sync::Mutex<()>,
    /// Metrics recorded as calls happen.
    pub metrics: crate::metrics::Metrics,
    /// Assets whose packs prune is collecting; their new backups wait.
    pub collecting: tokio::sync::Mutex<std::collections::HashSet<String>>,
    /// One prune at a time (background job and operators).
    pub prune_lock: tokio::sync::Mutex<()>,
    /// Serializes stream-entry commits, so a name's content check and its commit are one step.
    pub stream_lock: tokio::sync::Mutex<()>,
    /// The start-up check of each copy target's bucket (drift is reported, never fatal).
    pub bucket_checks: std::sync::Mutex<Vec<crate::replicate::BucketCheck>>,
    /// Facts status and metrics read from manifests (Postgres bases, Longhorn replicas).
    pub facts_cache: crate::streams::FactsCache,
    /// Copy targets whose last passes failed every upload: failures in a row and when the
    /// next pass may try (ms).
    pub target_backoff: std::sync::Mutex<std::collections::HashMap<String, (u32, i64)>>,
    /// S3 clients of the copy targets, built once (`State::target_client`).
    pub s3_clients: std::sync::Mutex<std::collections::HashMap<String, aws_sdk_s3::Client>>,
}

impl State {
    pub fn new(config: Config, repo: Repo, catalog: Catalog) -> State {
        State {
            config,
            repo,
            catalog,
            keyring_lock: Default::default(),
            registration_lock: Default::default(),
            backup_activity: Default::default(),
            sessions: Default::default(),
            jobs: Default::default(),
            trigger_lock: Default::default(),
            metrics: Default::default(),
            stream_lock: Default::default(),
            facts_cache: Default::default(),
            target_backoff: Default::default(),
            s3_clients: Default::default(),
            bucket_checks: Default::default(),
            collecting: Default::default(),
            prune_lock: Default::default(),
        }
    }

    /// Plans or applies retention (one prune at a time).
    pub async fn prune(
        &self,
        asset: Option<&str>,
        apply: bool,
    ) -> std::result::Result<Vec<crate::prune::AssetPrune>, crate::prune::PruneError> {
        let _one = self.prune_lock.lock().await;
        let ctx = crate::prune::PruneCtx {
            config: &self.config,
            repo: &self.repo,
            catalog: &self.catalog,
            collecting: &self.collecting,
        };
        let now = coffer_common::time::unix_seconds(coffer_common::time::now());
        crate::prune::prune(&ctx, asset, now, apply).await
    }
}

pub type Shared = Arc<State>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DataLoss(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let msg = e.to_string();
        match e {
            ServiceError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServiceError::PermissionDenied(_) => Status::permission_denied(msg),
            ServiceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServiceError::NotFound(_) => Status::not_found(msg),
            ServiceError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ServiceError::ResourceExhausted(_) | ServiceError::Store(StoreError::DiskFull(_)) => {
                Status::resource_exhausted(msg)
            }
            ServiceError::DataLoss(_) | ServiceError::Store(StoreError::Corrupt { .. }) => Status::data_loss(msg),
            ServiceError::Unavailable(_) => Status::unavailable(msg),
            ServiceError::Store(_) | ServiceError::Catalog(_) | ServiceError::Internal(_) => {
                tracing::error!("internal error: {msg}");
                Status::internal(msg)
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

/// The caller's identity, from the URI SAN of its verified client certificate.
pub fn peer<T>(req: &Request<T>) -> Result<PeerIdentity> {
    let certs =
        req.peer_certs().ok_or_else(|| ServiceError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs.first().ok_or_else(|| ServiceError::Unauthenticated("a client certificate is required".into()))?;
    identity_from_cert(leaf.as_ref()).map_err(|e| ServiceError::Unauthenticated(e.to_string()))
}

impl State {
    /// An agent identity that may write and read `asset`.
    pub fn authorize_asset<T>(&self, req: &Request<T>, asset: &str) -> Result<PeerIdentity> {
        let who = peer(req)?;
        if who.role != Role::Agent {
            return Err(ServiceError::PermissionDenied(format!("{who} is not an agent identity")));
        }
        if !coffer_common::manifest::is_valid_asset_name(asset) {
            return Err(ServiceError::InvalidArgument(format!(
                "asset name {asset:?} is malformed (expected kind/name, lowercase)"
            )));
        }
        if !self.config.agent_may(&who.name, asset) {
            return Err(ServiceError::PermissionDenied(format!("{who} is not granted asset {asset}")));
        }
        Ok(who)
    }

    pub fn authorize_admin<T>(&self, req: &Request<T>) -> Result<PeerIdentity> {
        let who = peer(req)?;
        if who.role != Role::Admin || !self.config.admin_may(&who.name) {
            return Err(ServiceError::PermissionDenied(format!("{who} may not use the admin service")));
        }
        Ok(who)
    }

    /// The registered signing key of an agent (catalog, then repository).
    /// Aborts the open backups that [`BackupActivity::idle`] finds idle for longer than
    /// `open-backup-timeout`; returns their snapshot ids.
    pub async fn abort_abandoned_backups(&self, now_ms: i64) -> Result<Vec<String>> {
        let timeout = self.config.open_backup_timeout;
        let open: Vec<(String, i64)> =
            self.catalog.open_backups(None).await?.into_iter().map(|(id, begun)| (id, begun * 1000)).collect();
        let idle = self.backup_activity.idle(&open, now_ms, timeout.as_millis() as i64);
        for (snapshot, idle_ms) in &idle {
            let reason = format!(
                "abandoned: no upload stream and no call from its agent for {}s (open-backup-timeout {})",
                idle_ms / 1000,
                coffer_common::units::format_duration(timeout)
            );
            self.catalog.end_backup(snapshot, "aborted", Some(&reason)).await?;
            tracing::warn!(%snapshot, "backup aborted: {reason}");
        }
        Ok(idle.into_iter().map(|(id, _)| id).collect())
    }

    pub async fn agent_key(&self, agent: &str) -> Result<Option<String>> {
        if let Some(a) = self.catalog.agent(agent).await? {
            return Ok(Some(a.signing_key));
        }
        Ok(self.repo.read_agent_key(agent)?)
    }
}

/// Signs of life of open backups: when each was begun or last had an upload stream open or
/// end, and how many upload streams it has open now. In memory only: a restart aborts
/// every open backup anyway.
#[derive(Default)]
pub struct BackupActivity(std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>);

impl BackupActivity {
    /// `snapshot` shows life at `now_ms` (begun, or an upload stream opened or ended).
    pub fn touch(&self, snapshot: &str, now_ms: i64) {
        let mut m = self.0.lock().expect("backup activity");
        m.entry(snapshot.to_string()).or_insert((now_ms, 0)).0 = now_ms;
    }

    /// An upload stream of `snapshot` is open until the returned guard is dropped.
    pub fn stream(self: &std::sync::Arc<Self>, snapshot: &str, now_ms: fn() -> i64) -> StreamGuard {
        let mut m = self.0.lock().expect("backup activity");
        let e = m.entry(snapshot.to_string()).or_insert((now_ms(), 0));
        *e = (now_ms(), e.1 + 1);
        StreamGuard { activity: self.clone(), snapshot: snapshot.to_string(), now_ms }
    }

    /// Of the open backups `open` (snapshot id, begun at in ms), those with no upload
    /// stream open and no sign of life for longer than `timeout_ms`, each with its idle
    /// time in ms. Entries of backups no longer open are dropped.
    pub fn idle(&self, open: &[(String, i64)], now_ms: i64, timeout_ms: i64) -> Vec<(String, i64)> {
        let mut m = self.0.lock().expect("backup activity");
        let ids: std::collections::HashSet<&str> = open.iter().map(|(id, _)| id.as_str()).collect();
        m.retain(|id, _| ids.contains(id.as_str()));
        open.iter()
            .filter_map(|(id, begun_ms)| {
                let (last, streams) = m.get(id).copied().unwrap_or((*begun_ms, 0));
                let idle = now_ms - last;
                (streams == 0 && idle > timeout_ms).then(|| (id.clone(), idle))
            })
            .collect()
    }
}

/// An open upload stream (see [`BackupActivity::stream`]); its end is a sign of life too.
pub struct StreamGuard {
    activity: std::sync::Arc<BackupActivity>,
    snapshot: String,
    now_ms: fn() -> i64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut m = self.activity.0.lock().expect("backup activity");
        if let Some(e) = m.get_mut(&self.snapshot) {
            *e = ((self.now_ms)(), e.1.saturating_sub(1));
        }
    }
}

pub fn snapshot_info(s: &SnapshotRow) -> pb::SnapshotInfo {
    let t = |secs: i64| coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(secs));
    pb::SnapshotInfo {
        id: s.id.clone(),
        asset: s.asset.clone(),
        kind: s.kind.clone(),
        agent: s.agent.clone(),
        started_at: t(s.started_at),
        finished_at: t(s.finished_at),
        size: s.size as u64,
        new_bytes: s.new_bytes as u64,
        chunks: s.chunks as u64,
        files: s.files as u64,
        stream: s.stream.clone(),
        copies: String::new(),
    }
}

/// Runs blocking work (file IO, checksums) off the runtime's worker threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ServiceError::Internal(format!("worker thread: {e}")))
}

/// A span for one call, joined to the caller's trace when the request carries one.
pub fn rpc_span<T>(method: &'static str, req: &Request<T>) -> tracing::Span {
    let peer = peer(req).map(|p| p.to_string()).unwrap_or_default();
    let span = tracing::info_span!("rpc", method, peer = %peer);
    coffer_common::telemetry::link_to_caller(&span, req.metadata());
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    static NOW: AtomicI64 = AtomicI64::new(0);
    fn now() -> i64 {
        NOW.load(Ordering::Relaxed)
    }

    #[test]
    fn a_backup_is_idle_only_with_no_stream_and_no_sign_of_life_for_the_timeout() {
        let a = std::sync::Arc::new(BackupActivity::default());
        let open = |ids: &[(&str, i64)]| ids.iter().map(|(id, t)| (id.to_string(), *t)).collect::<Vec<_>>();
        a.touch("begun", 1_000);
        NOW.store(2_000, Ordering::Relaxed);
        let stream = a.stream("streaming", now);
        // "unknown" was begun by an earlier coordinator process: its begin time counts.
        let all = open(&[("begun", 1_000), ("streaming", 500), ("unknown", 0)]);
        assert_eq!(a.idle(&all, 5_000, 10_000), vec![], "nothing idle for 10 s yet");
        let idle = a.idle(&all, 12_500, 10_000);
        assert_eq!(idle, vec![("begun".to_string(), 11_500), ("unknown".to_string(), 12_500)]);
        assert!(a.idle(&all, 1_000_000, 10_000).iter().all(|(id, _)| id != "streaming"), "an open stream is alive");
        // The stream's end is its last sign of life.
        NOW.store(20_000, Ordering::Relaxed);
        drop(stream);
        assert!(a.idle(&all, 25_000, 10_000).iter().all(|(id, _)| id != "streaming"));
        assert!(a.idle(&all, 30_001, 10_000).iter().any(|(id, idle)| id == "streaming" && *idle == 10_001));
        // Backups no longer open are forgotten.
        assert_eq!(a.idle(&open(&[]), 40_000, 10_000), vec![]);
        assert!(a.0.lock().unwrap().is_empty());
    }
}
