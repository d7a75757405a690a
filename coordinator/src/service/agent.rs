//! AgentService: registration, deduplicated upload into packs, the commit protocol, and
//! verified download.

use std::collections::{HashMap, HashSet};

use coffer_common::crypto::{ChunkId, MAX_STORED_CHUNK};
use coffer_common::keyring::MAX_ENVELOPE_SIZE;
use coffer_common::manifest::Manifest;
use coffer_common::signing;
use coffer_common::tls::{PeerIdentity, Role};
use coffer_proto::v1 as pb;
use pb::agent_service_server::AgentService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{Result, ServiceError, Shared, blocking, peer, rpc_span, snapshot_info};
use crate::catalog::{AttemptRow, BackupRow, SnapshotRow, is_valid_stream_name, manifest_stream};
use crate::sessions::SESSION_QUEUE;
use crate::store::pack::{self, PackWriter};

/// Most chunk ids one FindMissingChunks or DownloadChunks call may carry.
pub const MAX_IDS_PER_CALL: usize = 4096;

pub struct AgentApi {
    pub state: Shared,
}

fn parse_ids(raw: &[Vec<u8>]) -> Result<Vec<ChunkId>> {
    if raw.len() > MAX_IDS_PER_CALL {
        return Err(ServiceError::InvalidArgument(format!(
            "{} chunk ids in one call; the limit is {MAX_IDS_PER_CALL}",
            raw.len()
        )));
    }
    raw.iter()
        .map(|b| {
            ChunkId::from_slice(b).ok_or_else(|| {
                ServiceError::InvalidArgument(format!("chunk id of {} bytes; ids are 32 bytes", b.len()))
            })
        })
        .collect()
}

fn kind_of(asset: &str) -> &str {
    asset.split('/').next().unwrap_or_default()
}

impl AgentApi {
    /// The backup `snapshot` must belong to the calling agent, still granted its asset.
    async fn own_backup(&self, who: &PeerIdentity, snapshot: &str) -> Result<BackupRow> {
        let b = self
            .state
            .catalog
            .backup(snapshot)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no backup {snapshot:?} was begun")))?;
        if who.role != Role::Agent || b.agent != who.name || !self.state.config.agent_may(&who.name, &b.asset) {
            return Err(ServiceError::PermissionDenied(format!("{who} does not own backup {snapshot}")));
        }
        Ok(b)
    }

    async fn hello_inner(&self, req: Request<pb::HelloRequest>) -> Result<pb::HelloResponse> {
        let who = peer(&req)?;
        if who.role != Role::Agent {
            return Err(ServiceError::PermissionDenied(format!("{who} is not an agent identity")));
        }
        let st = &self.state;
        let grant = st.config.agents.get(&who.name).ok_or_else(|| {
            ServiceError::PermissionDenied(format!(
                "{who} has no grants in the coordinator config (agents.{})",
                who.name
            ))
        })?;
        let r = req.into_inner();
        signing::parse_public_key(&r.signing_key).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        if !r.age_recipient.starts_with("age1") {
            return Err(ServiceError::InvalidArgument(format!("{:?} is not an age recipient", r.age_recipient)));
        }
        // From the key check to the binding of a first key, one Hello at a time: a racing
        // first Hello with another key then finds this one's key bound and is refused.
        let registering = st.registration_lock.lock().await;
        let expected = match &grant.signing_key {
            Some(pinned) => Some(pinned.clone()),
            None => st.agent_key(&who.name).await?,
        };
        if let Some(expected) = expected
            && !signing::same_key(&expected, &r.signing_key)
        {
            return Err(ServiceError::PermissionDenied(format!(
                "{who} presented signing key {} but {} is registered; if the agent's identity was replaced on \
                 purpose, pin the new key as agents.{}.signing-key in the coordinator config",
                r.signing_key.trim(),
                expected.trim(),
                who.name
            )));
        }
        // A known agent's Hello changes nothing on disk unless its details changed, so a full
        // disk never stops restores; only a first registration must be written.
        let known = match st.repo.read_agent_key(&who.name)? {
            Some(k) => signing::same_key(&k, &r.signing_key),
            None => false,
        };
        if !known {
            let (repo, name, key) = (st.repo.clone(), who.name.clone(), r.signing_key.clone());
            blocking(move || repo.write_agent_key(&name, &key)).await??;
        }
        drop(registering);
        match st.catalog.upsert_agent(&who.name, r.signing_key.trim(), &r.age_recipient, &r.agent_version).await {
            Ok(()) => {}
            Err(e) if known => tracing::warn!(agent = %who, "could not record the agent's last contact: {e}"),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(agent = %who, version = %r.agent_version, "agent registered");
        Ok(pb::HelloResponse {
            identity: who.uri(),
            granted_assets: grant.assets.clone(),
            repository_id: st.repo.config.id.clone(),
            recovery_recipients: st.config.recovery_recipients.clone(),
            max_chunk_size: coffer_common::chunker::MAX_CHUNK_SIZE as u64,
            coordinator_version: coffer_common::VERSION.to_string(),
        })
    }

    async fn begin_inner(&self, req: Request<pb::BeginBackupRequest>) -> Result<pb::BeginBackupResponse> {
        let asset = req.get_ref().asset.clone();
        let who = self.state.authorize_asset(&req, &asset)?;
        let kind = kind_of(&asset).to_string();
        if req.get_ref().kind != kind {
            return Err(ServiceError::InvalidArgument(format!(
                "asset {asset} is of kind {kind}, not {:?}",
                req.get_ref().kind
            )));
        }
        let repo = self.state.repo.clone();
        let free = blocking(move || repo.free_space()).await??;
        if free < self.state.config.min_free_space {
            return Err(ServiceError::ResourceExhausted(format!(
                "coordinator disk has {} free, below the {} minimum (min-free-space); refusing new backups",
                coffer_common::units::format_size(free),
                coffer_common::units::format_size(self.state.config.min_free_space)
            )));
        }
        let asset_id = self.state.catalog.ensure_asset(&asset, &kind).await?;
        let snapshot = coffer_common::time::new_snapshot_id(coffer_common::time::now());
        {
            // Prune collects an asset's packs only while none of its backups is open.
            let collecting = self.state.collecting.lock().await;
            if collecting.contains(&asset) {
                return Err(ServiceError::Unavailable(format!(
                    "retention is collecting unused packs of {asset}; retry shortly"
                )));
            }
            self.state.catalog.begin_backup(&snapshot, asset_id, &who.name).await?;
        }
        self.state.backup_activity.touch(&snapshot, crate::scheduler::system_now_ms());
        let job = &req.get_ref().job_id;
        if job.is_empty() {
            // The agent's own initiative ("on change" sources, an operator's CLI run).
            let now = crate::scheduler::system_now_ms();
            self.state
                .catalog
                .start_attempt(&AttemptRow {
                    job_id: snapshot.clone(),
                    asset: asset.clone(),
                    agent: who.name.clone(),
                    trigger: "agent".into(),
                    started_ms: now,
                    ended_ms: None,
                    outcome: "running".into(),
                    snapshot_id: Some(snapshot.clone()),
                    error: None,
                })
                .await?;
        } else if !self.state.catalog.attempt_snapshot(job, &snapshot).await? {
            tracing::warn!(%asset, %snapshot, job = %job, "backup names a job that is not running; recorded without it");
        }
        let p = self.state.config.chunker_for(&kind);
        tracing::info!(%asset, %snapshot, agent = %who, job = %job, "backup begun");
        Ok(pb::BeginBackupResponse {
            snapshot_id: snapshot,
            chunker: Some(pb::ChunkerParams {
                algorithm: coffer_common::chunker::ALGORITHM.to_string(),
                min_size: p.min_size,
                avg_size: p.avg_size,
                max_size: p.max_size,
            }),
        })
    }

    async fn find_missing_inner(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> Result<pb::FindMissingChunksResponse> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let ids = parse_ids(&req.get_ref().ids)?;
        let missing = match self.state.catalog.asset_id(&asset).await? {
            Some(a) => self.state.catalog.missing(a, &ids).await?,
            None => ids,
        };
        Ok(pb::FindMissingChunksResponse { missing: missing.iter().map(|i| i.0.to_vec()).collect() })
    }

    async fn commit_inner(&self, req: Request<pb::CommitBackupRequest>) -> Result<pb::CommitBackupResponse> {
        let snapshot = req.get_ref().snapshot_id.clone();
        let b = self.own_backup(&peer(&req)?, &snapshot).await?;
        let st = &self.state;
        match b.state.as_str() {
            "open" => {}
            "committed" => {
                // A retried commit whose first attempt succeeded.
                let s = st
                    .catalog
                    .snapshot(&snapshot)
                    .await?
                    .ok_or_else(|| ServiceError::Internal("committed backup has no snapshot".into()))?;
                return Ok(pb::CommitBackupResponse { snapshot: Some(snapshot_info(&s)) });
            }
            other => {
                return Err(ServiceError::FailedPrecondition(format!("backup {snapshot} is {other}; begin a new one")));
            }
        }
        let r = req.into_inner();
        let m = Manifest::decode(&r.manifest)
            .map_err(|e| ServiceError::InvalidArgument(format!("snapshot {snapshot}: {e}")))?;
        if m.snapshot != snapshot || m.asset != b.asset || m.agent != b.agent || m.kind != b.kind {
            return Err(ServiceError::InvalidArgument(format!(
                "manifest names snapshot {} of {} ({}) by {}, but backup {snapshot} is of {} ({}) by {}",
                m.snapshot, m.asset, m.kind, m.agent, b.asset, b.kind, b.agent
            )));
        }
        let key = st.agent_key(&b.agent).await?.ok_or_else(|| {
            ServiceError::FailedPrecondition(format!("agent {} has no registered signing key", b.agent))
        })?;
        signing::verify(&key, signing::MANIFEST_NAMESPACE, &r.manifest, &r.signature).map_err(|e| {
            ServiceError::PermissionDenied(format!("snapshot {snapshot}: manifest signature rejected: {e}"))
        })?;
        let ids = m.chunk_ids();
        let missing = st.catalog.missing(b.asset_id, &ids).await?;
        if !missing.is_empty() {
            return Err(ServiceError::FailedPrecondition(format!(
                "snapshot {snapshot}: manifest names {} chunk(s) the coordinator does not hold durably (first: {}); \
                 upload them and commit again",
                missing.len(),
                missing[0]
            )));
        }
        let stream =
            manifest_stream(&m).map_err(|e| ServiceError::InvalidArgument(format!("snapshot {snapshot}: {e}")))?;
        // A stream entry's names must not change content: check and commit under one lock.
        let _stream_guard = match &stream {
            Some(_) => Some(st.stream_lock.lock().await),
            None => None,
        };
        // The manifest's snapshot, asset, kind and agent were checked against the backup above.
        let row = SnapshotRow::from_manifest(&m, ids.len(), b.bytes_stored);
        let files = row.stream_files(&m);
        if let Some(stream) = &stream {
            let names: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
            let held = st.catalog.stream_files(b.asset_id, stream, &names, "", 0).await?;
            let ours: HashMap<&str, &str> = files.iter().map(|f| (f.path.as_str(), f.sha256.as_str())).collect();
            if let Some(h) = held.iter().find(|h| ours.get(h.path.as_str()).is_some_and(|sha| *sha != h.sha256)) {
                return Err(ServiceError::FailedPrecondition(format!(
                    "snapshot {snapshot}: stream {stream} of {} already holds {} with different content \
                     (sha256 {}, entry {}); refusing to replace it (two servers writing one stream?)",
                    b.asset, h.path, h.sha256, h.snapshot_id
                )));
            }
        }
        // Commit point: the manifest file is renamed into place after its signature.
        let (repo, asset, snap, bytes, sig) =
            (st.repo.clone(), b.asset.clone(), snapshot.clone(), r.manifest, r.signature);
        blocking(move || repo.write_manifest(&asset, &snap, &bytes, &sig)).await??;
        st.catalog.insert_snapshot(&row, b.asset_id, &files).await?;
        tracing::info!(asset = %b.asset, %snapshot, size = row.size, new_bytes = row.new_bytes, "snapshot committed");
        Ok(pb::CommitBackupResponse { snapshot: Some(snapshot_info(&row)) })
    }

    async fn abort_inner(&self, req: Request<pb::AbortBackupRequest>) -> Result<pb::AbortBackupResponse> {
        let snapshot = req.get_ref().snapshot_id.clone();
        self.own_backup(&peer(&req)?, &snapshot).await?;
        let reason = req.get_ref().reason.chars().take(1000).collect::<String>();
        self.state.catalog.end_backup(&snapshot, "aborted", Some(&reason)).await?;
        tracing::warn!(%snapshot, %reason, "backup aborted by the agent");
        Ok(pb::AbortBackupResponse {})
    }

    async fn resolve_snapshot(&self, asset: &str, snapshot: &str) -> Result<SnapshotRow> {
        let not_found = || ServiceError::NotFound(format!("no snapshot {snapshot:?} of asset {asset}"));
        if snapshot == "latest" {
            return self.state.catalog.snapshots(Some(asset), "", 1).await?.into_iter().next().ok_or_else(not_found);
        }
        if !coffer_common::time::is_valid_snapshot_id(snapshot) {
            return Err(ServiceError::InvalidArgument(format!("{snapshot:?} is not a snapshot id or \"latest\"")));
        }
        self.state.catalog.snapshot(snapshot).await?.filter(|s| s.asset == asset).ok_or_else(not_found)
    }

    async fn get_manifest_inner(&self, req: Request<pb::GetManifestRequest>) -> Result<pb::GetManifestResponse> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let s = self.resolve_snapshot(&asset, &req.get_ref().snapshot).await?;
        let (repo, a, id) = (self.state.repo.clone(), asset.clone(), s.id.clone());
        let (manifest, signature) = blocking(move || repo.read_manifest(&a, &id)).await??;
        let signing_key = self.state.agent_key(&s.agent).await?.unwrap_or_default();
        Ok(pb::GetManifestResponse { manifest, signature, snapshot: Some(snapshot_info(&s)), signing_key })
    }

    async fn list_inner(&self, req: Request<pb::ListSnapshotsRequest>) -> Result<pb::ListSnapshotsResponse> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let r = req.get_ref();
        let rows = self.state.catalog.snapshots(Some(&asset), &r.stream, r.limit).await?;
        Ok(pb::ListSnapshotsResponse { snapshots: rows.iter().map(snapshot_info).collect() })
    }

    async fn stream_files_inner(
        &self,
        req: Request<pb::ListStreamFilesRequest>,
    ) -> Result<pb::ListStreamFilesResponse> {
        let r = req.get_ref();
        self.state.authorize_asset(&req, &r.asset)?;
        if !is_valid_stream_name(&r.stream) {
            return Err(ServiceError::InvalidArgument(format!("{:?} is not a stream name", r.stream)));
        }
        if r.paths.len() > MAX_IDS_PER_CALL {
            return Err(ServiceError::InvalidArgument(format!(
                "{} paths in one call; at most {MAX_IDS_PER_CALL}",
                r.paths.len()
            )));
        }
        let Some(asset_id) = self.state.catalog.asset_id(&r.asset).await? else {
            return Ok(pb::ListStreamFilesResponse::default());
        };
        let limit = if r.limit == 0 { 10_000 } else { r.limit.min(10_000) };
        let rows = self.state.catalog.stream_files(asset_id, &r.stream, &r.paths, &r.after, limit).await?;
        let t = |secs: i64| coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(secs));
        Ok(pb::ListStreamFilesResponse {
            files: rows
                .into_iter()
                .map(|f| pb::StreamFile {
                    path: f.path,
                    size: f.size as u64,
                    sha256: f.sha256,
                    snapshot_id: f.snapshot_id,
                    committed_at: t(f.committed_at),
                })
                .collect(),
        })
    }

    async fn put_keyring_inner(&self, req: Request<pb::PutKeyringRequest>) -> Result<pb::PutKeyringResponse> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let envelope = req.into_inner().envelope;
        if envelope.len() > MAX_ENVELOPE_SIZE || !envelope.starts_with(b"age-encryption.org/v1\n") {
            return Err(ServiceError::InvalidArgument("keyring envelope must be an age file of at most 64 KiB".into()));
        }
        let _guard = self.state.keyring_lock.lock().await;
        let repo = self.state.repo.clone();
        let a = asset.clone();
        let (envelope, created) = blocking(move || repo.put_keyring_if_absent(&a, &envelope)).await??;
        if created {
            tracing::info!(%asset, "keyring stored");
        }
        Ok(pb::PutKeyringResponse { created, envelope })
    }

    async fn get_keyring_inner(&self, req: Request<pb::GetKeyringRequest>) -> Result<pb::GetKeyringResponse> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let repo = self.state.repo.clone();
        let a = asset.clone();
        let envelope = blocking(move || repo.get_keyring(&a))
            .await??
            .ok_or_else(|| ServiceError::NotFound(format!("asset {asset} has no keyring yet")))?;
        Ok(pb::GetKeyringResponse { envelope })
    }
}

type RespStream<T> = ReceiverStream<std::result::Result<T, Status>>;

/// Bytes of stored chunks handed from a DownloadChunks reader thread to the response stream
/// at once.
const DOWNLOAD_GROUP_BYTES: usize = 1 << 20;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> std::result::Result<Response<pb::HelloResponse>, Status> {
        let span = rpc_span("Hello", &req);
        Ok(Response::new(self.hello_inner(req).instrument(span).await?))
    }

    async fn begin_backup(
        &self,
        req: Request<pb::BeginBackupRequest>,
    ) -> std::result::Result<Response<pb::BeginBackupResponse>, Status> {
        let span = rpc_span("BeginBackup", &req);
        Ok(Response::new(self.begin_inner(req).instrument(span).await?))
    }

    async fn find_missing_chunks(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> std::result::Result<Response<pb::FindMissingChunksResponse>, Status> {
        Ok(Response::new(self.find_missing_inner(req).await?))
    }

    type UploadChunksStream = RespStream<pb::UploadChunksResponse>;

    async fn upload_chunks(
        &self,
        req: Request<Streaming<pb::UploadChunksRequest>>,
    ) -> std::result::Result<Response<Self::UploadChunksStream>, Status> {
        let span = rpc_span("UploadChunks", &req);
        let who = peer(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty upload stream"))?;
        let backup = self.own_backup(&who, &first.snapshot_id).await?;
        if backup.state != "open" {
            return Err(
                ServiceError::FailedPrecondition(format!("backup {} is {}", backup.snapshot_id, backup.state)).into()
            );
        }
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        // While the stream is open the backup is alive, however long its upload takes.
        let alive = state.backup_activity.stream(&backup.snapshot_id, crate::scheduler::system_now_ms);
        tokio::spawn(
            async move {
                let _alive = alive;
                if let Err(e) = upload(state, backup, first, inbound, tx.clone()).await {
                    tracing::warn!("upload failed: {e}");
                    let _ = tx.send(Err(e.into())).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn commit_backup(
        &self,
        req: Request<pb::CommitBackupRequest>,
    ) -> std::result::Result<Response<pb::CommitBackupResponse>, Status> {
        let span = rpc_span("CommitBackup", &req);
        Ok(Response::new(self.commit_inner(req).instrument(span).await?))
    }

    async fn abort_backup(
        &self,
        req: Request<pb::AbortBackupRequest>,
    ) -> std::result::Result<Response<pb::AbortBackupResponse>, Status> {
        Ok(Response::new(self.abort_inner(req).await?))
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> std::result::Result<Response<pb::GetManifestResponse>, Status> {
        Ok(Response::new(self.get_manifest_inner(req).await?))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list_inner(req).await?))
    }

    async fn list_stream_files(
        &self,
        req: Request<pb::ListStreamFilesRequest>,
    ) -> std::result::Result<Response<pb::ListStreamFilesResponse>, Status> {
        Ok(Response::new(self.stream_files_inner(req).await?))
    }

    type SessionStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<pb::SessionDown, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionUp>>,
    ) -> std::result::Result<Response<Self::SessionStream>, Status> {
        let span = rpc_span("Session", &req);
        let who = peer(&req)?;
        if who.role != Role::Agent {
            return Err(ServiceError::PermissionDenied(format!("{who} is not an agent identity")).into());
        }
        let mut inbound = req.into_inner();
        let open = match inbound.message().await? {
            Some(pb::SessionUp { msg: Some(pb::session_up::Msg::Open(o)) }) => o,
            _ => return Err(Status::invalid_argument("a session starts with an `open` message")),
        };
        let refused: Vec<&String> = open
            .assets
            .iter()
            .filter(|a| !coffer_common::manifest::is_valid_asset_name(a) || !self.state.config.agent_may(&who.name, a))
            .collect();
        if !refused.is_empty() {
            return Err(ServiceError::PermissionDenied(format!(
                "{who} is not granted (or names malformed) assets: {}",
                refused.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
            ))
            .into());
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let accepted = pb::SessionDown {
            msg: Some(pb::session_down::Msg::Accepted(pb::SessionAccepted {
                heartbeat_interval_seconds: self.state.config.heartbeat_interval.as_secs().max(1) as u32,
            })),
        };
        tx.send(accepted).await.map_err(|_| Status::internal("session channel closed"))?;
        let state = self.state.clone();
        let now = crate::scheduler::system_now_ms();
        let (session, replaced) = state.sessions.register(&who.name, &open.agent_version, open.assets.clone(), tx, now);
        if let Some(job) = replaced {
            let _ = state
                .catalog
                .end_attempt(&job, false, Some("the agent opened a new session during the job"), now)
                .await;
        }
        tracing::info!(agent = %who, version = %open.agent_version, assets = ?open.assets, "agent session opened");
        tokio::spawn(
            async move {
                let agent = who.name.clone();
                loop {
                    let msg = match inbound.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(%agent, "session stream ended: {e}");
                            break;
                        }
                    };
                    let now = crate::scheduler::system_now_ms();
                    state.sessions.heartbeat(&agent, session, now);
                    match msg.msg {
                        Some(pb::session_up::Msg::Result(r)) => {
                            state.sessions.finished(&agent, &r.job_id);
                            let error = (!r.ok).then_some(r.error.as_str());
                            match state.catalog.end_attempt(&r.job_id, r.ok, error, now).await {
                                Ok(_) => tracing::info!(%agent, job = %r.job_id, ok = r.ok, error = %r.error, "job finished"),
                                Err(e) => tracing::error!(%agent, job = %r.job_id, "recording the job result: {e}"),
                            }
                        }
                        Some(pb::session_up::Msg::Progress(p)) => {
                            tracing::debug!(%agent, job = %p.job_id, done = p.bytes_done, total = p.bytes_total, "progress");
                        }
                        Some(pb::session_up::Msg::Heartbeat(_)) | None => {}
                        Some(pb::session_up::Msg::Open(_)) => tracing::warn!(%agent, "ignoring a second open"),
                    }
                }
                let now = crate::scheduler::system_now_ms();
                if let Some(job) = state.sessions.unregister(&agent, session, now) {
                    let _ = state.catalog.end_attempt(&job, false, Some("the agent disconnected during the job"), now).await;
                }
                tracing::info!(%agent, "agent session closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(futures::StreamExt::map(ReceiverStream::new(rx), Ok))))
    }

    type DownloadChunksStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = std::result::Result<pb::DownloadChunksResponse, Status>> + Send>,
    >;

    async fn download_chunks(
        &self,
        req: Request<pb::DownloadChunksRequest>,
    ) -> std::result::Result<Response<Self::DownloadChunksStream>, Status> {
        let asset = req.get_ref().asset.clone();
        self.state.authorize_asset(&req, &asset)?;
        let ids = parse_ids(&req.get_ref().ids)?;
        let asset_id = self
            .state
            .catalog
            .asset_id(&asset)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| Status::not_found(format!("asset {asset} has no stored chunks")))?;
        let locations = self.state.catalog.locate(asset_id, &ids).await.map_err(ServiceError::from)?;
        if let Some(missing) = ids.iter().find(|i| !locations.contains_key(i)) {
            return Err(ServiceError::NotFound(format!("chunk {missing} is not stored for asset {asset}")).into());
        }
        // Chunks go to the response stream in groups of up to DOWNLOAD_GROUP_BYTES: one
        // hand-off between this reader thread and the async side per group, not per chunk
        // (measured: 10,000 context switches for a 790 MB restore, most of the
        // coordinator's CPU time on a 2-core VM).
        let (tx, rx) = mpsc::channel::<Vec<std::result::Result<pb::DownloadChunksResponse, Status>>>(2);
        let state = self.state.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // The pack file open for the current run of chunks; `None` inside: the pack is
            // kept only in copy targets, so its chunks come by ranged GETs (crate::remote).
            let mut open: Option<(String, Option<std::fs::File>)> = None;
            let (mut group, mut group_bytes) = (Vec::new(), 0usize);
            for id in ids {
                let (pack_id, entry) = &locations[&id];
                let result = (|| {
                    if open.as_ref().is_none_or(|(p, _)| p != pack_id) {
                        let path = state.repo.pack_path(pack_id);
                        let f = match std::fs::File::open(&path) {
                            Ok(f) => Some(f),
                            Err(e)
                                if e.kind() == std::io::ErrorKind::NotFound
                                    && runtime.block_on(state.catalog.is_remote_pack(pack_id)).unwrap_or(false) =>
                            {
                                None
                            }
                            Err(e) => {
                                return Err(crate::store::StoreError::io(format!("opening {}", path.display()))(e));
                            }
                        };
                        open = Some((pack_id.clone(), f));
                    }
                    match open.as_ref().expect("just opened") {
                        (_, Some(f)) => pack::read_chunk(f, pack_id, entry),
                        (_, None) => runtime.block_on(crate::remote::read_chunk(&state, pack_id, entry)),
                    }
                })();
                let msg = result
                    .map(|data| pb::DownloadChunksResponse { id: id.0.to_vec(), data: data.into() })
                    .map_err(|e| Status::from(ServiceError::from(e)));
                let failed = msg.is_err();
                group_bytes += msg.as_ref().map_or(0, |m| m.data.len());
                group.push(msg);
                if failed || group_bytes >= DOWNLOAD_GROUP_BYTES {
                    if tx.blocking_send(std::mem::take(&mut group)).is_err() || failed {
                        return;
                    }
                    group_bytes = 0;
                }
            }
            if !group.is_empty() {
                let _ = tx.blocking_send(group);
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::flat_map(ReceiverStream::new(rx), futures::stream::iter))))
    }

    async fn put_keyring(
        &self,
        req: Request<pb::PutKeyringRequest>,
    ) -> std::result::Result<Response<pb::PutKeyringResponse>, Status> {
        Ok(Response::new(self.put_keyring_inner(req).await?))
    }

    async fn get_keyring(
        &self,
        req: Request<pb::GetKeyringRequest>,
    ) -> std::result::Result<Response<pb::GetKeyringResponse>, Status> {
        Ok(Response::new(self.get_keyring_inner(req).await?))
    }
}

/// Receives chunk frames into packs. Every acknowledged chunk is in an open pack; packs are
/// sealed when full and when the stream ends (cleanly or not), then indexed in the catalog.
async fn upload(
    state: Shared,
    backup: BackupRow,
    first: pb::UploadChunksRequest,
    mut inbound: Streaming<pb::UploadChunksRequest>,
    tx: mpsc::Sender<std::result::Result<pb::UploadChunksResponse, Status>>,
) -> Result<()> {
    let mut writer: Option<PackWriter> = None;
    let mut sealing: Vec<tokio::task::JoinHandle<Result<()>>> = Vec::new();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut next = Some(first);
    let outcome: Result<bool> = async {
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => match inbound.message().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok(true),
                    Err(status) => {
                        // The client went away, or sent what could not be decoded (e.g. a
                        // message over the size limit): tell it if it is still listening.
                        tracing::warn!(snapshot = %backup.snapshot_id, "upload stream broke: {}", status.message());
                        let reason = format!("upload stream failed: {}", status.message());
                        let _ = tx.send(Err(Status::new(status.code(), reason))).await;
                        return Ok(false);
                    }
                },
            };
            if frame.id.is_empty() {
                continue;
            }
            let id = ChunkId::from_slice(&frame.id).ok_or_else(|| {
                ServiceError::InvalidArgument(format!("chunk id of {} bytes; ids are 32 bytes", frame.id.len()))
            })?;
            if frame.data.len() > MAX_STORED_CHUNK {
                return Err(ServiceError::InvalidArgument(format!(
                    "chunk {id} frame is {} bytes, over the {MAX_STORED_CHUNK}-byte chunk limit",
                    frame.data.len()
                )));
            }
            if seen.insert(id) {
                let w = match writer.take() {
                    Some(w) => w,
                    None => {
                        let tmp = state.repo.tmp_dir();
                        let asset = backup.asset.clone();
                        blocking(move || PackWriter::create(&tmp, &asset)).await??
                    }
                };
                let data = frame.data;
                let (w, appended) = blocking(move || {
                    let mut w = w;
                    let r = w.append(id, &data);
                    (w, r)
                })
                .await?;
                if let Err(e) = appended {
                    w.discard();
                    return Err(e.into());
                }
                if w.size() >= state.config.pack_size {
                    // Seal in the background so acknowledgements keep flowing; at most two
                    // packs are sealing at once.
                    if sealing.len() >= 2 {
                        sealing.remove(0).await.map_err(|e| ServiceError::Internal(format!("seal task: {e}")))??;
                    }
                    let (state, backup) = (state.clone(), backup.clone());
                    sealing.push(tokio::spawn(async move { seal(&state, &backup, w).await }));
                } else {
                    writer = Some(w);
                }
            }
            if tx
                .send(Ok(pb::UploadChunksResponse { id: id.0.to_vec(), sealed: false, bytes_stored: 0 }))
                .await
                .is_err()
            {
                // The response side is gone first (the agent died or hung up): the same break,
                // noticed from the other direction.
                tracing::warn!(snapshot = %backup.snapshot_id, "upload stream broke: the agent stopped receiving acknowledgements");
                return Ok(false);
            }
        }
    }
    .await;
    // Whatever ended the stream, acknowledged chunks are sealed so a retry skips them (unless
    // the write itself failed, e.g. disk full: then the open pack is discarded, and nothing
    // unsealed was ever indexed).
    let mut sealed = match writer {
        Some(w) => seal(&state, &backup, w).await,
        None => Ok(()),
    };
    for task in sealing {
        let r = task.await.map_err(|e| ServiceError::Internal(format!("seal task: {e}"))).and_then(|r| r);
        if sealed.is_ok() {
            sealed = r;
        }
    }
    let clean = outcome?;
    sealed?;
    if clean {
        let stored = state.catalog.backup(&backup.snapshot_id).await?.map(|b| b.bytes_stored).unwrap_or(0);
        let _ =
            tx.send(Ok(pb::UploadChunksResponse { id: Vec::new(), sealed: true, bytes_stored: stored as u64 })).await;
    } else {
        // The agent is gone (or sent what could not be decoded): this backup cannot be
        // committed any more; its sealed chunks stay for the next one.
        state.catalog.end_backup(&backup.snapshot_id, "aborted", Some("upload stream broke")).await?;
    }
    Ok(())
}

async fn seal(state: &Shared, backup: &BackupRow, w: PackWriter) -> Result<()> {
    if w.is_empty() {
        w.discard();
        return Ok(());
    }
    let repo = state.repo.clone();
    let sealed = blocking(move || w.seal(|id| repo.pack_path(id))).await??;
    state.catalog.index_pack(&sealed, backup.asset_id, Some(&backup.snapshot_id)).await?;
    tracing::debug!(pack = %sealed.id, chunks = sealed.entries.len(), size = sealed.size, "pack sealed");
    Ok(())
}

pub fn service(state: Shared) -> pb::agent_service_server::AgentServiceServer<AgentApi> {
    pb::agent_service_server::AgentServiceServer::new(AgentApi { state })
        .max_decoding_message_size(coffer_common::tls::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(coffer_common::tls::MAX_MESSAGE_SIZE)
}
