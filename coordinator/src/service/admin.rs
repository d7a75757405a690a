//! AdminService: what operators ask with grpcurl.

use coffer_proto::v1 as pb;
use pb::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{Result, ServiceError, Shared, blocking, snapshot_info};
use crate::catalog::AssetRow;

pub struct AdminApi {
    pub state: Shared,
}

impl AdminApi {
    fn status(&self, a: &AssetRow) -> pb::AssetStatus {
        let now = coffer_common::time::unix_seconds(coffer_common::time::now());
        let expected = self.state.config.policy_for(&a.name).expected_interval.map(|d| d.as_secs()).unwrap_or(0);
        let (latest, at, age) = match &a.latest {
            Some((id, at)) => (
                id.clone(),
                coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(*at)),
                (now - at).max(0) as u64,
            ),
            None => (String::new(), String::new(), 0),
        };
        pb::AssetStatus {
            asset: a.name.clone(),
            kind: a.kind.clone(),
            snapshots: a.snapshots as u64,
            latest_snapshot: latest,
            latest_at: at,
            latest_age_seconds: age,
            expected_interval_seconds: expected,
            stale: expected > 0 && (a.latest.is_none() || age > 2 * expected),
            stored_bytes: a.stored_bytes as u64,
        }
    }

    async fn list_assets_inner(&self, req: Request<pb::ListAssetsRequest>) -> Result<pb::ListAssetsResponse> {
        self.state.authorize_admin(&req)?;
        let assets = self.state.catalog.assets().await?;
        Ok(pb::ListAssetsResponse { assets: assets.iter().map(|a| self.status(a)).collect() })
    }

    async fn asset_status_inner(&self, req: Request<pb::AssetStatusRequest>) -> Result<pb::AssetStatusResponse> {
        self.state.authorize_admin(&req)?;
        let name = &req.get_ref().asset;
        let assets = self.state.catalog.assets().await?;
        let a = assets
            .iter()
            .find(|a| &a.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("no asset {name:?}")))?;
        Ok(pb::AssetStatusResponse { status: Some(self.status(a)) })
    }

    async fn list_snapshots_inner(
        &self,
        req: Request<pb::AdminListSnapshotsRequest>,
    ) -> Result<pb::ListSnapshotsResponse> {
        self.state.authorize_admin(&req)?;
        let r = req.get_ref();
        let asset = (!r.asset.is_empty()).then_some(r.asset.as_str());
        let rows = self.state.catalog.snapshots(asset, r.limit).await?;
        Ok(pb::ListSnapshotsResponse { snapshots: rows.iter().map(snapshot_info).collect() })
    }

    async fn verify_inner(&self, req: Request<pb::VerifyRequest>) -> Result<pb::VerifyResponse> {
        let who = self.state.authorize_admin(&req)?;
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
        })
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
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

pub fn service(state: Shared) -> pb::admin_service_server::AdminServiceServer<AdminApi> {
    pb::admin_service_server::AdminServiceServer::new(AdminApi { state })
}
