//! AdminService: what operators ask with grpcurl.

use std::collections::BTreeMap;

use coffer_proto::v1 as pb;
use pb::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{Result, ServiceError, Shared, blocking, snapshot_info};
use crate::catalog::{AssetRow, AttemptRow, SnapshotRow};

#[derive(Debug, Default)]
struct Copies {
    present: Vec<String>,
    summary: String,
    lag: BTreeMap<String, u64>,
}

pub struct AdminApi {
    pub state: Shared,
}

/// Freshness of an asset: `ok` while the newest recovery point is at most one expected
/// interval old, `late` up to two, `stale` beyond (or with none), `unscheduled` without an
/// expected interval.
pub fn freshness(age_s: Option<u64>, expected_s: u64) -> (&'static str, f64) {
    if expected_s == 0 {
        return ("unscheduled", 0.0);
    }
    match age_s {
        None => ("stale", 0.0),
        Some(age) => {
            let ratio = age as f64 / expected_s as f64;
            let state = if age > 2 * expected_s {
                "stale"
            } else if age > expected_s {
                "late"
            } else {
                "ok"
            };
            (state, ratio)
        }
    }
}

/// [`freshness`], and a copy that falls behind by more than the expected interval makes an
/// otherwise fresh asset late.
pub fn asset_state(age_s: Option<u64>, expected_s: u64, copy_lags: impl Iterator<Item = u64>) -> (&'static str, f64) {
    let (state, ratio) = freshness(age_s, expected_s);
    let mut lags = copy_lags;
    if state == "ok" && expected_s > 0 && lags.any(|lag| lag > expected_s) {
        return ("late", ratio);
    }
    (state, ratio)
}

pub fn attempt_info(a: &AttemptRow) -> pb::Attempt {
    pb::Attempt {
        job_id: a.job_id.clone(),
        asset: a.asset.clone(),
        agent: a.agent.clone(),
        trigger: a.trigger.clone(),
        started_at: coffer_common::time::rfc3339_millis(a.started_ms),
        ended_at: a.ended_ms.map(coffer_common::time::rfc3339_millis).unwrap_or_default(),
        outcome: a.outcome.clone(),
        snapshot_id: a.snapshot_id.clone().unwrap_or_default(),
        error: a.error.clone().unwrap_or_default(),
    }
}

impl AdminApi {
    /// Copies holding every object of the asset (`local` once it has a snapshot, each
    /// target with nothing pending), a one-line summary, and each required target's lag.
    /// `target_errors` is [`crate::catalog::Catalog::target_errors`], read once per call.
    async fn copies(&self, a: &AssetRow, target_errors: &BTreeMap<String, String>) -> Result<Copies> {
        let policy = self.state.config.policy_for(&a.name);
        let states = self.state.catalog.replication_state(&a.name).await?;
        let now = crate::scheduler::system_now_ms();
        let mut c = Copies::default();
        // `local` counts where the policy asks for it (elsewhere its packs may be dropped
        // once the targets hold them: crate::remote).
        if a.snapshots > 0 && policy.copies.iter().any(|c| c == "local") {
            c.present.push("local".to_string());
        }
        let mut notes = Vec::new();
        for name in policy.copies.iter().filter(|n| n.as_str() != "local") {
            // Longhorn's own replicas: a copy while the newest backup saw the volume healthy
            // with every replica it wants.
            if name == "replicas" {
                match self.state.replica_health(a).await {
                    Some(h) if h.ok() => c.present.push(name.clone()),
                    Some(h) => notes.push(format!("replicas {}: {}/{} healthy", h.robustness, h.healthy, h.desired)),
                    None => notes.push("replicas unknown (no Longhorn health in the newest backup)".into()),
                }
                continue;
            }
            match (self.state.config.targets.contains_key(name), states.get(name)) {
                (false, _) => notes.push(format!("{name} not configured")),
                (true, Some(s)) if s.done > 0 && s.pending == 0 => {
                    c.present.push(name.clone());
                    c.lag.insert(name.clone(), 0);
                }
                (true, Some(s)) if s.pending > 0 => {
                    let age = ((now - s.oldest_pending_ms.unwrap_or(now)) / 1000).max(0) as u64;
                    c.lag.insert(name.clone(), age);
                    notes.push(pending_note(name, age, s.last_error.as_deref(), target_errors));
                }
                (true, _) => notes.push(format!("{name} pending")),
            }
        }
        c.summary = copies_line(&c.present, policy.copies.len(), &notes);
        Ok(c)
    }

    async fn streams(&self, a: &AssetRow) -> Result<Vec<pb::StreamStatus>> {
        let now = coffer_common::time::unix_seconds(coffer_common::time::now());
        let t = |s: i64| coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(s));
        Ok(self
            .state
            .stream_summaries(a)
            .await?
            .into_iter()
            .map(|s| pb::StreamStatus {
                stream: s.stream,
                files: s.files,
                newest_file: s.newest_file,
                newest_at: s.newest_at.map(t).unwrap_or_default(),
                newest_age_seconds: s.newest_at.map(|n| (now - n).max(0) as u64).unwrap_or(0),
                gaps: s.gaps,
                window_start: s.window.map(|w| t(w.0)).unwrap_or_default(),
                window_end: s.window.map(|w| t(w.1)).unwrap_or_default(),
            })
            .collect())
    }

    fn status(&self, a: &AssetRow, last: Option<&AttemptRow>, copies: Copies) -> pb::AssetStatus {
        let now = coffer_common::time::unix_seconds(coffer_common::time::now());
        let policy = self.state.config.policy_for(&a.name);
        let expected = policy.expected_interval.map(|d| d.as_secs()).unwrap_or(0);
        let (latest, at, age) = match &a.latest {
            Some((id, at)) => (
                id.clone(),
                coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(*at)),
                Some((now - at).max(0) as u64),
            ),
            None => (String::new(), String::new(), None),
        };
        let (state, ratio) = asset_state(age, expected, copies.lag.values().copied());
        let next_due = crate::scheduler::next_due_ms(
            &a.name,
            &policy,
            last.map(|l| l.started_ms),
            a.latest.as_ref().map(|(_, at)| at * 1000),
        );
        pb::AssetStatus {
            asset: a.name.clone(),
            kind: a.kind.clone(),
            snapshots: a.snapshots as u64,
            latest_snapshot: latest,
            latest_at: at,
            latest_age_seconds: age.unwrap_or(0),
            expected_interval_seconds: expected,
            stale: state == "stale",
            stored_bytes: a.stored_bytes as u64,
            age_ratio: ratio,
            state: state.to_string(),
            schedule: policy.schedule.to_string(),
            last_attempt: last.map(attempt_info),
            copies_present: copies.present,
            copies_summary: copies.summary,
            copy_lag_seconds: copies.lag.into_iter().collect(),
            copies_required: policy.copies.clone(),
            next_due_at: match next_due {
                Some(i64::MIN) => coffer_common::time::rfc3339_millis(crate::scheduler::system_now_ms()),
                Some(ms) => coffer_common::time::rfc3339_millis(ms),
                None => String::new(),
            },
            rebuildable: policy.rebuildable,
            streams: Vec::new(),
        }
    }

    async fn list_assets_inner(&self, req: Request<pb::ListAssetsRequest>) -> Result<pb::ListAssetsResponse> {
        self.state.authorize_admin(&req)?;
        let assets = self.state.catalog.assets().await?;
        let last = self.state.catalog.last_attempts().await?;
        let target_errors = self.state.catalog.target_errors().await?;
        let mut out = Vec::with_capacity(assets.len());
        for a in &assets {
            let mut st = self.status(a, last.get(&a.name), self.copies(a, &target_errors).await?);
            st.streams = self.streams(a).await?;
            out.push(st);
        }
        Ok(pb::ListAssetsResponse { assets: out })
    }

    async fn asset_status_inner(&self, req: Request<pb::AssetStatusRequest>) -> Result<pb::AssetStatusResponse> {
        self.state.authorize_admin(&req)?;
        let name = &req.get_ref().asset;
        let assets = self.state.catalog.assets().await?;
        let a = assets
            .iter()
            .find(|a| &a.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("no asset {name:?}")))?;
        let last = self.state.catalog.last_attempts().await?;
        let target_errors = self.state.catalog.target_errors().await?;
        let mut status = self.status(a, last.get(name), self.copies(a, &target_errors).await?);
        status.streams = self.streams(a).await?;
        Ok(pb::AssetStatusResponse { status: Some(status) })
    }

    async fn list_snapshots_inner(
        &self,
        req: Request<pb::AdminListSnapshotsRequest>,
    ) -> Result<pb::ListSnapshotsResponse> {
        self.state.authorize_admin(&req)?;
        let r = req.get_ref();
        let asset = (!r.asset.is_empty()).then_some(r.asset.as_str());
        let rows = self.state.catalog.snapshots(asset, &r.stream, r.limit).await?;
        let mut snapshots = Vec::with_capacity(rows.len());
        let target_errors = self.state.catalog.target_errors().await?;
        for row in &rows {
            let mut info = snapshot_info(row);
            info.copies = self.snapshot_copies(row, &target_errors).await?;
            snapshots.push(info);
        }
        Ok(pb::ListSnapshotsResponse { snapshots })
    }

    /// Which copies hold one snapshot: `local` where the policy keeps it, each target whose
    /// copy of the manifest is uploaded (the manifest goes only after its packs), and for
    /// the others how long they have been pending, with the target's last upload error.
    async fn snapshot_copies(&self, s: &SnapshotRow, target_errors: &BTreeMap<String, String>) -> Result<String> {
        let policy = self.state.config.policy_for(&s.asset);
        let rows = self.state.catalog.copy_rows(&format!("manifests/{}/{}.manifest", s.asset, s.id)).await?;
        let now = crate::scheduler::system_now_ms();
        let (mut present, mut notes) = (Vec::new(), Vec::new());
        for name in &policy.copies {
            if name == "local" {
                present.push(name.clone());
            } else if crate::remote::EXTERNAL_COPIES.contains(&name.as_str()) {
                notes.push(format!("{name} kept outside Coffer"));
            } else if !self.state.config.targets.contains_key(name) {
                notes.push(format!("{name} not configured"));
            } else {
                match rows.get(name) {
                    Some((Some(_), _, _)) => present.push(name.clone()),
                    Some((None, enqueued, err)) => {
                        let age = ((now - enqueued) / 1000).max(0) as u64;
                        notes.push(pending_note(name, age, err.as_deref(), target_errors));
                    }
                    None => notes.push(format!("{name} pending")),
                }
            }
        }
        Ok(copies_line(&present, policy.copies.len(), &notes))
    }

    async fn verify_inner(&self, req: Request<pb::VerifyRequest>) -> Result<pb::VerifyResponse> {
        let who = self.state.authorize_admin(&req)?;
        let r = req.get_ref();
        if !r.target.is_empty() {
            let target = self
                .state
                .config
                .targets
                .get(&r.target)
                .ok_or_else(|| ServiceError::NotFound(format!("no copy target {:?} in the config", r.target)))?;
            tracing::info!(admin = %who, target = %r.target, deep = r.deep, "verifying copies");
            let now = crate::scheduler::system_now_ms();
            let due = if r.all { i64::MAX } else { now - self.state.config.verify_recheck.as_millis() as i64 };
            let scratch = self.state.repo.root().join("tmp");
            let report =
                crate::copyverify::verify_target(&self.state.catalog, &scratch, &r.target, target, r.deep, due, now)
                    .await
                    .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            return Ok(pb::VerifyResponse {
                target: report.target,
                objects: report.checked,
                bytes: report.bytes,
                copy_problems: report
                    .problems
                    .into_iter()
                    .map(|(key, problem)| pb::CopyProblem { key, problem })
                    .collect(),
                ..Default::default()
            });
        }
        tracing::info!(admin = %who, "verifying the repository");
        let repo = self.state.repo.clone();
        let report = blocking(move || crate::verify::verify_repo(&repo)).await??;
        Ok(pb::VerifyResponse {
            packs: report.packs,
            chunks: report.chunks,
            bytes: report.bytes,
            corrupt: report
                .problems
                .into_iter()
                .map(|p| pb::CorruptChunk {
                    pack: p.pack,
                    chunk: p.chunk.map(|c| c.to_hex()).unwrap_or_default(),
                    asset: p.asset,
                    snapshots: p.snapshots,
                    problem: p.detail,
                })
                .collect(),
            ..Default::default()
        })
    }
}

impl AdminApi {
    async fn trigger_inner(&self, req: Request<pb::TriggerBackupRequest>) -> Result<pb::TriggerBackupResponse> {
        let who = self.state.authorize_admin(&req)?;
        let asset = &req.get_ref().asset;
        if !coffer_common::manifest::is_valid_asset_name(asset) {
            return Err(ServiceError::InvalidArgument(format!("{asset:?} is not an asset name (kind/name)")));
        }
        let now = crate::scheduler::system_now_ms();
        let (job_id, agent) = crate::scheduler::trigger_backup(&self.state, asset, "manual", now).await?;
        tracing::info!(admin = %who, %asset, job = %job_id, %agent, "backup triggered by an operator");
        Ok(pb::TriggerBackupResponse { job_id, agent })
    }

    async fn list_agents_inner(&self, req: Request<pb::ListAgentsRequest>) -> Result<pb::ListAgentsResponse> {
        self.state.authorize_admin(&req)?;
        let t = coffer_common::time::rfc3339_millis;
        Ok(pb::ListAgentsResponse {
            agents: self
                .state
                .sessions
                .view()
                .into_iter()
                .map(|a| pb::AgentInfo {
                    name: a.name,
                    version: a.version,
                    connected: a.connected,
                    assets: a.assets,
                    connected_since: a.since_ms.map(t).unwrap_or_default(),
                    last_seen: t(a.last_seen_ms),
                    running_job: a.running.unwrap_or_default(),
                })
                .collect(),
        })
    }

    async fn list_jobs_inner(&self, req: Request<pb::ListJobsRequest>) -> Result<pb::ListJobsResponse> {
        self.state.authorize_admin(&req)?;
        let t = coffer_common::time::rfc3339_millis;
        Ok(pb::ListJobsResponse {
            jobs: self
                .state
                .jobs
                .view()
                .into_iter()
                .map(|(name, s)| pb::JobStatus {
                    name: name.to_string(),
                    state: s.state.to_string(),
                    runs: s.runs,
                    failures: s.failures,
                    last_error: s.last_error.unwrap_or_default(),
                    last_error_at: s.last_error_ms.map(t).unwrap_or_default(),
                    last_run_at: s.last_run_ms.map(t).unwrap_or_default(),
                })
                .collect(),
        })
    }

    async fn list_attempts_inner(&self, req: Request<pb::ListAttemptsRequest>) -> Result<pb::ListAttemptsResponse> {
        self.state.authorize_admin(&req)?;
        let r = req.get_ref();
        let asset = (!r.asset.is_empty()).then_some(r.asset.as_str());
        let rows = self.state.catalog.attempts(asset, r.limit).await?;
        Ok(pb::ListAttemptsResponse { attempts: rows.iter().map(attempt_info).collect() })
    }
}

pub fn retention_response(report: &[crate::prune::AssetPrune], applied: bool) -> pb::RetentionResponse {
    let t = |s: i64| coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(s));
    pb::RetentionResponse {
        assets: report
            .iter()
            .map(|a| pb::AssetRetention {
                asset: a.asset.clone(),
                retention: a.retention.clone(),
                decisions: a
                    .plan
                    .decisions
                    .iter()
                    .map(|d| pb::RetentionDecision {
                        snapshot_id: d.id.clone(),
                        time: t(d.time),
                        keep: d.keep(),
                        reasons: d.reasons.clone(),
                    })
                    .collect(),
                packs_deleted: a.gc.delete.len() as u64,
                packs_repacked: a.gc.repack.len() as u64,
                bytes_freed: a.gc.freed_bytes().max(0) as u64,
                deferred: a.gc.deferred.clone().unwrap_or_default(),
            })
            .collect(),
        report: crate::prune::render(report, applied),
        applied,
    }
}

impl AdminApi {
    async fn retention_inner(&self, req: Request<pb::RetentionRequest>, apply: bool) -> Result<pb::RetentionResponse> {
        let who = self.state.authorize_admin(&req)?;
        let asset = (!req.get_ref().asset.is_empty()).then(|| req.get_ref().asset.clone());
        if apply {
            tracing::info!(admin = %who, asset = asset.as_deref().unwrap_or("*"), "retention applied by an operator");
        }
        let report = self.state.prune(asset.as_deref(), apply).await.map_err(|e| match e {
            crate::prune::PruneError::NoAsset(a) => ServiceError::NotFound(format!("no asset {a:?}")),
            other => ServiceError::Internal(other.to_string()),
        })?;
        Ok(retention_response(&report, apply))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn retention_plan(
        &self,
        req: Request<pb::RetentionRequest>,
    ) -> std::result::Result<Response<pb::RetentionResponse>, Status> {
        Ok(Response::new(self.retention_inner(req, false).await?))
    }

    async fn apply_retention(
        &self,
        req: Request<pb::RetentionRequest>,
    ) -> std::result::Result<Response<pb::RetentionResponse>, Status> {
        Ok(Response::new(self.retention_inner(req, true).await?))
    }

    async fn trigger_backup(
        &self,
        req: Request<pb::TriggerBackupRequest>,
    ) -> std::result::Result<Response<pb::TriggerBackupResponse>, Status> {
        Ok(Response::new(self.trigger_inner(req).await?))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> std::result::Result<Response<pb::ListAgentsResponse>, Status> {
        Ok(Response::new(self.list_agents_inner(req).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> std::result::Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(self.list_jobs_inner(req).await?))
    }

    async fn list_attempts(
        &self,
        req: Request<pb::ListAttemptsRequest>,
    ) -> std::result::Result<Response<pb::ListAttemptsResponse>, Status> {
        Ok(Response::new(self.list_attempts_inner(req).await?))
    }

    async fn list_assets(
        &self,
        req: Request<pb::ListAssetsRequest>,
    ) -> std::result::Result<Response<pb::ListAssetsResponse>, Status> {
        Ok(Response::new(self.list_assets_inner(req).await?))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::AdminListSnapshotsRequest>,
    ) -> std::result::Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list_snapshots_inner(req).await?))
    }

    async fn asset_status(
        &self,
        req: Request<pb::AssetStatusRequest>,
    ) -> std::result::Result<Response<pb::AssetStatusResponse>, Status> {
        Ok(Response::new(self.asset_status_inner(req).await?))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> std::result::Result<Response<pb::VerifyResponse>, Status> {
        Ok(Response::new(self.verify_inner(req).await?))
    }
}

/// `NAME pending 4m (last error: ...)`: a copy waiting for `age_secs`, with its own last
/// upload error or else its target's.
fn pending_note(name: &str, age_secs: u64, err: Option<&str>, target_errors: &BTreeMap<String, String>) -> String {
    let err =
        err.or(target_errors.get(name).map(String::as_str)).map(|e| format!(" (last error: {e})")).unwrap_or_default();
    format!("{name} pending {}{err}", coffer_common::units::format_duration(std::time::Duration::from_secs(age_secs)))
}

/// `2/3: local, s3; offsite pending 4m`: the copies present out of those required, then
/// notes on the others.
fn copies_line(present: &[String], required: usize, notes: &[String]) -> String {
    let mut out = format!(
        "{}/{required}: {}",
        present.len(),
        if present.is_empty() { "none".into() } else { present.join(", ") }
    );
    if !notes.is_empty() {
        out.push_str("; ");
        out.push_str(&notes.join("; "));
    }
    out
}

pub fn service(state: Shared) -> pb::admin_service_server::AdminServiceServer<AdminApi> {
    pb::admin_service_server::AdminServiceServer::new(AdminApi { state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_and_copy_lag() {
        assert_eq!(freshness(None, 0).0, "unscheduled");
        assert_eq!(freshness(None, 3600).0, "stale");
        assert_eq!(freshness(Some(3600), 3600).0, "ok");
        assert_eq!(freshness(Some(3601), 3600).0, "late");
        assert_eq!(freshness(Some(7201), 3600).0, "stale");
        assert_eq!(asset_state(Some(10), 3600, [0, 3600].into_iter()).0, "ok");
        assert_eq!(
            asset_state(Some(10), 3600, [0, 3601].into_iter()).0,
            "late",
            "a copy behind by more than the interval"
        );
        assert_eq!(asset_state(Some(7201), 3600, [4000].into_iter()).0, "stale", "stale stays stale");
        assert_eq!(asset_state(Some(10), 0, [99_999].into_iter()).0, "unscheduled");
    }
}
