//! Starting and stopping the coordinator: TLS material, repository, catalog reconciliation,
//! the gRPC server (agent, admin, health, reflection) and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer_common::manifest::Manifest;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::catalog::{Catalog, CatalogError, SnapshotRow};
use crate::config::Config;
use crate::service::{State, admin, agent};
use crate::store::{Repo, StoreError, pack};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Certs(#[from] crate::certs::CertError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "data directory {0} is in use by another coordinator process (serve or prune); \
         use the running coordinator's admin service, or stop it first"
    )]
    Locked(String),
}

pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// TLS files from config, or the development CA under `DATA_DIR/certs`, generated on first
/// start (with an agent `dev` and an admin `admin`).
pub fn tls_files(config: &Config, data_dir: &Path) -> Result<TlsFiles, ServeError> {
    let certs = data_dir.join("certs");
    let files = TlsFiles {
        cert: config.tls_cert.clone().unwrap_or_else(|| certs.join("coordinator.pem")),
        key: config.tls_key.clone().unwrap_or_else(|| certs.join("coordinator.key")),
        ca: config.tls_ca.clone().unwrap_or_else(|| certs.join("ca.pem")),
    };
    let configured = config.tls_cert.is_some() || config.tls_key.is_some() || config.tls_ca.is_some();
    if !configured && !files.cert.exists() && !files.ca.exists() {
        crate::certs::init(&certs, &["dev".into()], &["admin".into()])?;
        println!("generated a development CA and certificates in {}:", certs.display());
        println!("  CA:    {}", certs.join("ca.pem").display());
        println!("  agent: {} / {}", certs.join("agent-dev.pem").display(), certs.join("agent-dev.key").display());
        println!("  admin: {} / {}", certs.join("admin-admin.pem").display(), certs.join("admin-admin.key").display());
    }
    Ok(files)
}

/// What reconciliation changed in the catalog.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub packs_indexed: usize,
    pub snapshots_recorded: usize,
    /// Manifests on disk left out: (asset, snapshot, why).
    pub rejected: Vec<(String, String, String)>,
}

/// Brings the catalog in line with the repository after a crash (or builds it from a
/// repository copied from a target): backups left open are aborted, sealed packs missing
/// from the catalog are indexed, and committed manifests missing from the catalog are
/// recorded once their signature verifies against the signer's registered key.
pub async fn reconcile(repo: &Repo, catalog: &Catalog) -> Result<ReconcileReport, ServeError> {
    let mut report = ReconcileReport::default();
    let aborted = catalog.abort_open_backups("coordinator restarted before the backup was committed").await?;
    let failed = catalog
        .fail_running_attempts("coordinator restarted during the attempt", crate::scheduler::system_now_ms())
        .await?;
    if failed > 0 {
        tracing::warn!(count = failed, "backup attempts interrupted by a restart marked failed");
    }
    if aborted > 0 {
        tracing::warn!(count = aborted, "aborted backups interrupted by a restart");
    }
    let known: std::collections::HashSet<String> = catalog.pack_ids().await?.into_iter().collect();
    for id in repo.list_packs()? {
        if known.contains(&id) {
            continue;
        }
        let path = repo.pack_path(&id);
        let (asset, entries, size) = match pack::read_index(&path) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(pack = %id, "unreadable pack left out of the catalog: {e}");
                continue;
            }
        };
        let kind = asset.split('/').next().unwrap_or_default().to_string();
        let asset_id = catalog.ensure_asset(&asset, &kind).await?;
        catalog.index_pack(&pack::SealedPack { id: id.clone(), asset, size, entries }, asset_id, None).await?;
        tracing::info!(pack = %id, "indexed a sealed pack the catalog did not know");
        report.packs_indexed += 1;
    }
    for (asset, snapshot) in repo.list_manifests()? {
        if catalog.snapshot(&snapshot).await?.is_some() {
            continue;
        }
        match recover_snapshot(repo, catalog, &asset, &snapshot).await {
            Ok(()) => report.snapshots_recorded += 1,
            Err(e) => {
                tracing::error!(%asset, %snapshot, "manifest on disk left out of the catalog: {e}");
                report.rejected.push((asset, snapshot, e));
            }
        }
    }
    Ok(report)
}

async fn recover_snapshot(repo: &Repo, catalog: &Catalog, asset: &str, snapshot: &str) -> Result<(), String> {
    let (bytes, sig) = repo.read_manifest(asset, snapshot).map_err(|e| e.to_string())?;
    let m = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
    let key = repo.read_agent_key(&m.agent).map_err(|e| e.to_string())?.ok_or("signer's key is unknown")?;
    coffer_common::signing::verify(&key, coffer_common::signing::MANIFEST_NAMESPACE, &bytes, &sig)
        .map_err(|e| e.to_string())?;
    let asset_id = catalog.ensure_asset(asset, &m.kind).await.map_err(|e| e.to_string())?;
    let ids = m.chunk_ids();
    let missing = catalog.missing(asset_id, &ids).await.map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        return Err(format!("{} chunks are missing", missing.len()));
    }
    let row = SnapshotRow::from_manifest(&m, ids.len(), 0);
    catalog.insert_snapshot(&row, asset_id, &row.stream_files(&m)).await.map_err(|e| e.to_string())?;
    tracing::info!(asset, snapshot, "recorded a committed snapshot the catalog did not know");
    Ok(())
}

/// An exclusive lock on the data directory, held while it is in use (`serve`, offline
/// `prune`), so two processes never change one repository at once.
pub struct DataDirLock(#[allow(dead_code)] std::fs::File);

pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, ServeError> {
    let path = data_dir.join("coordinator.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServeError::Io { path: path.display().to_string(), source })?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(DataDirLock(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServeError::Locked(data_dir.display().to_string())),
        Err(e) => Err(ServeError::Io { path: path.display().to_string(), source: e.into() }),
    }
}

/// Runs the coordinator until `shutdown` is cancelled; `ready` receives the bound address.
pub async fn serve(
    config: Config,
    data_dir: PathBuf,
    listen: SocketAddr,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&data_dir)
        .map_err(|source| ServeError::Io { path: data_dir.display().to_string(), source })?;
    let _lock = lock_data_dir(&data_dir)?;
    let tls = tls_files(&config, &data_dir)?;
    let read = |p: &Path| std::fs::read(p).map_err(|source| ServeError::Io { path: p.display().to_string(), source });
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .client_ca_root(Certificate::from_pem(read(&tls.ca)?))
        .client_auth_optional(false);

    let repo = Repo::open(&data_dir.join("repo"))?;
    let catalog = Catalog::open(&data_dir.join("catalog.db")).await?;
    let report = reconcile(&repo, &catalog).await?;
    if !report.rejected.is_empty() {
        tracing::warn!(
            count = report.rejected.len(),
            "manifests on disk are not in the catalog (see the errors above)"
        );
    }
    let grace = config.shutdown_grace;
    let state = Arc::new(State::new(config, repo, catalog.clone()));
    let scheduler = {
        let state = state.clone();
        let tick = state.config.scheduler_tick;
        let jobs = state.jobs.clone();
        jobs.spawn("scheduler", tick, crate::scheduler::system_now_ms, shutdown.clone(), move || {
            let state = state.clone();
            async move { crate::scheduler::step(&state, crate::scheduler::system_now_ms()).await }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<coffer_proto::v1::agent_service_server::AgentServiceServer<agent::AgentApi>>().await;
    health.set_serving::<coffer_proto::v1::admin_service_server::AdminServiceServer<admin::AdminApi>>().await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(coffer_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ServeError::Tls(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ServeError::Tls(format!("reflection: {e}")))?;

    let retention = (!state.config.retention_interval.is_zero()).then(|| {
        let state = state.clone();
        let every = state.config.retention_interval;
        let jobs = state.jobs.clone();
        jobs.spawn("retention", every, crate::scheduler::system_now_ms, shutdown.clone(), move || {
            let state = state.clone();
            async move {
                let report = state.prune(None, true).await.map_err(|e| e.to_string())?;
                let deleted: usize = report.iter().map(|a| a.plan.deleted().count()).sum();
                if deleted > 0 {
                    tracing::info!(snapshots = deleted, "retention applied");
                }
                Ok(())
            }
        })
    });
    let abandoned = (!state.config.open_backup_timeout.is_zero()).then(|| {
        let state = state.clone();
        let timeout = state.config.open_backup_timeout;
        let every = (timeout / 4).clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(60));
        let jobs = state.jobs.clone();
        jobs.spawn("abandoned-backups", every, crate::scheduler::system_now_ms, shutdown.clone(), move || {
            let state = state.clone();
            async move {
                state
                    .abort_abandoned_backups(crate::scheduler::system_now_ms())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
    });
    if !state.config.targets.is_empty() {
        let state = state.clone();
        tokio::spawn(async move {
            let checks = crate::replicate::check_buckets(&state).await;
            *state.bucket_checks.lock().expect("bucket checks") = checks;
        });
    }
    let replication = (!state.config.targets.is_empty()).then(|| {
        let state = state.clone();
        let every = state.config.replication_interval;
        let jobs = state.jobs.clone();
        jobs.spawn("replication", every, crate::scheduler::system_now_ms, shutdown.clone(), move || {
            let state = state.clone();
            async move { crate::replicate::step(&state, crate::scheduler::system_now_ms()).await }
        })
    });
    // Routine copy verification: fast mode, only objects new or due for a recheck.
    let verify = (!state.config.targets.is_empty()).then(|| {
        let state = state.clone();
        let every = state.config.verify_interval;
        let jobs = state.jobs.clone();
        jobs.spawn("verify", every, crate::scheduler::system_now_ms, shutdown.clone(), move || {
            let state = state.clone();
            async move {
                let now = crate::scheduler::system_now_ms();
                let due = now - state.config.verify_recheck.as_millis() as i64;
                let scratch = state.repo.root().join("tmp");
                let mut failed = Vec::new();
                for (name, target) in &state.config.targets {
                    match crate::copyverify::verify_target(&state.catalog, &scratch, name, target, false, due, now).await {
                        Ok(r) if !r.problems.is_empty() => {
                            tracing::warn!(target = %name, problems = r.problems.len(), "copies failed verification; queued for re-upload")
                        }
                        Ok(_) => {}
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                if state.config.auto_repair {
                    // Under the prune lock: a pack prune is deleting must not come back.
                    let _one = state.prune_lock.lock().await;
                    match crate::copyverify::repair_local(&state.repo, &state.catalog, &state.config.targets).await {
                        Ok(done) => {
                            for r in &done {
                                match &r.from {
                                    Some(t) => tracing::warn!(pack = %r.pack, from = %t, "local pack repaired: {}", r.detail),
                                    None => failed.push(format!("pack {} not repaired: {}", r.pack, r.detail)),
                                }
                            }
                        }
                        Err(e) => failed.push(format!("repairing local packs: {e}")),
                    }
                }
                if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
            }
        })
    });
    // The gRPC port first: on a restart with the same explicit port, a metrics port of 0
    // could otherwise be handed the gRPC port just freed and make the restart fail.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { addr: listen.to_string(), source })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: listen.to_string(), source })?;
    let metrics = match state.config.metrics_listen.as_str() {
        "off" => None,
        a => {
            let l = crate::metrics::bind(a).await.map_err(|source| ServeError::Bind { addr: a.to_string(), source })?;
            let addr = crate::metrics::local_addr(&l);
            if let Some(addr) = addr {
                println!("metrics on http://{addr}/metrics");
            }
            Some(tokio::spawn(crate::metrics::serve(l, state.clone(), shutdown.clone())))
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));

    let router = Server::builder()
        .layer(crate::metrics::GrpcMetricsLayer(state.clone()))
        .tls_config(tls_config)?
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agent::service(state.clone()))
        .add_service(admin::service(state.clone()));

    println!("coordinator listening on https://{addr} (data in {})", data_dir.display());
    tracing::info!(%addr, data_dir = %data_dir.display(), "coordinator started");
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    let stop = shutdown.clone();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }));
    shutdown.cancelled().await;
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down: draining in-flight calls");
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => tracing::error!("server task: {e}"),
        Err(_) => tracing::warn!("grace period over; dropping remaining calls"),
    }
    let _ = scheduler.await;
    if let Some(r) = retention {
        let _ = r.await;
    }
    if let Some(r) = replication {
        let _ = r.await;
    }
    if let Some(a) = abandoned {
        let _ = a.await;
    }
    if let Some(v) = verify {
        let _ = v.await;
    }
    if let Some(m) = metrics {
        let _ = m.await;
    }
    catalog.close().await;
    tracing::info!("coordinator stopped");
    Ok(())
}
