//! Prometheus metrics on the coordinator's own HTTP port (`metrics-listen`, `GET /metrics`,
//! OpenMetrics text).
//!
//! Asset, job and agent metrics are computed from the catalog and the in-memory state at
//! each scrape, so they are never stale and need no bookkeeping. gRPC request counts and
//! latencies are recorded by a tower layer around every service (latency is to the response
//! headers: for a streaming call, the time to open the stream).
//!
//! The freshness alert needs one generic expression for every asset:
//! `time() - coffer_asset_newest_recovery_point_timestamp_seconds
//!    > 2 * coffer_asset_expected_interval_seconds`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::service::Shared;

type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Metrics recorded as things happen (the rest are computed at scrape time).
pub struct Metrics {
    grpc_requests: Family<Labels, Counter>,
    grpc_latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            grpc_requests: Family::default(),
            grpc_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

impl Metrics {
    pub fn observe_grpc(&self, method: &str, code: &str, elapsed: Duration) {
        let m = ("method".to_string(), method.to_string());
        self.grpc_requests.get_or_create(&vec![m.clone(), ("code".to_string(), code.to_string())]).inc();
        self.grpc_latency.get_or_create(&vec![m]).observe(elapsed.as_secs_f64());
    }
}

fn asset_labels(asset: &str, kind: &str) -> Labels {
    vec![("asset".into(), asset.into()), ("kind".into(), kind.into())]
}

/// The exposition text for one scrape.
pub async fn render(state: &Shared) -> Result<String, String> {
    let now_ms = crate::scheduler::system_now_ms();
    let assets = state.catalog.assets().await.map_err(|e| e.to_string())?;
    let logical = state.catalog.logical_bytes().await.map_err(|e| e.to_string())?;
    let last = state.catalog.last_attempts().await.map_err(|e| e.to_string())?;
    let mut reg = Registry::with_prefix("coffer");

    let newest = Family::<Labels, FGauge>::default();
    let expected = Family::<Labels, FGauge>::default();
    let attempt_at = Family::<Labels, FGauge>::default();
    let attempt_ok = Family::<Labels, Gauge>::default();
    let stored = Family::<Labels, Gauge>::default();
    let dedup = Family::<Labels, Gauge>::default();
    let snapshots = Family::<Labels, Gauge>::default();
    let rebuildable = Family::<Labels, Gauge>::default();
    let copy_lag = Family::<Labels, FGauge>::default();
    let stream_newest = Family::<Labels, FGauge>::default();
    let stream_gaps = Family::<Labels, Gauge>::default();
    let window_start = Family::<Labels, FGauge>::default();
    let replicas_healthy = Family::<Labels, Gauge>::default();
    let replicas_desired = Family::<Labels, Gauge>::default();
    for a in &assets {
        if a.kind == "longhorn"
            && let Some(h) = state.replica_health(a).await
        {
            let l = asset_labels(&a.name, &a.kind);
            replicas_healthy.get_or_create(&l).set(h.healthy as i64);
            replicas_desired.get_or_create(&l).set(h.desired as i64);
        }
        for s in state.stream_summaries(a).await.map_err(|e| e.to_string())? {
            let mut l = asset_labels(&a.name, &a.kind);
            l.push(("stream".into(), s.stream.clone()));
            if let Some(at) = s.newest_at {
                stream_newest.get_or_create(&l).set(at as f64);
            }
            stream_gaps.get_or_create(&l).set(s.gaps.len() as i64);
            if let Some((start, _)) = s.window {
                window_start.get_or_create(&l).set(start as f64);
            }
        }
        let policy = state.config.policy_for(&a.name);
        let copies = state.catalog.replication_state(&a.name).await.map_err(|e| e.to_string())?;
        for target in policy.copies.iter().filter(|t| state.config.targets.contains_key(t.as_str())) {
            let lag = copies
                .get(target)
                .and_then(|c| c.oldest_pending_ms)
                .map_or(0.0, |t| ((now_ms - t).max(0) as f64) / 1000.0);
            let mut l = asset_labels(&a.name, &a.kind);
            l.push(("target".into(), target.clone()));
            copy_lag.get_or_create(&l).set(lag);
        }
        let l = asset_labels(&a.name, &a.kind);
        let policy = state.config.policy_for(&a.name);
        if let Some((_, at)) = &a.latest {
            newest.get_or_create(&l).set(*at as f64);
        }
        if let Some(d) = policy.expected_interval {
            expected.get_or_create(&l).set(d.as_secs_f64());
        }
        if let Some(att) = last.get(&a.name) {
            attempt_at.get_or_create(&l).set(att.started_ms as f64 / 1000.0);
            attempt_ok.get_or_create(&l).set(match att.outcome.as_str() {
                "ok" => 1,
                "failed" => 0,
                _ => -1,
            });
        }
        stored.get_or_create(&l).set(a.stored_bytes);
        let logical_bytes = logical.get(&a.name).copied().unwrap_or(0);
        dedup.get_or_create(&l).set((logical_bytes - a.stored_bytes).max(0));
        snapshots.get_or_create(&l).set(a.snapshots);
        rebuildable.get_or_create(&l).set(i64::from(policy.rebuildable));
    }
    reg.register(
        "asset_newest_recovery_point_timestamp_seconds",
        "Unix time the asset's newest recovery point was taken",
        newest,
    );
    reg.register(
        "asset_stream_newest_timestamp_seconds",
        "Unix time the newest entry of the asset's stream (Postgres WAL) was committed",
        stream_newest,
    );
    reg.register(
        "asset_replicas_healthy",
        "Longhorn replicas running read-write when the asset's newest backup was taken",
        replicas_healthy,
    );
    reg.register("asset_replicas_desired", "Replicas the Longhorn volume wants", replicas_desired);
    reg.register("asset_stream_gaps", "Missing ranges in the asset's stream (Postgres WAL segments)", stream_gaps);
    reg.register(
        "asset_recovery_window_start_timestamp_seconds",
        "Start of the continuous point-in-time window (Postgres: the oldest base backup the archived WAL replays from)",
        window_start,
    );
    reg.register(
        "asset_expected_interval_seconds",
        "Expected interval between recovery points, from the asset's policy",
        expected,
    );
    reg.register(
        "asset_last_attempt_timestamp_seconds",
        "Unix time the asset's last backup attempt started",
        attempt_at,
    );
    reg.register(
        "asset_last_attempt_success",
        "Outcome of the asset's last backup attempt: 1 ok, 0 failed, -1 running",
        attempt_ok,
    );
    reg.register("asset_stored_bytes", "Bytes of packs stored for the asset (compressed, encrypted)", stored);
    reg.register(
        "asset_deduplicated_bytes",
        "Bytes the asset's snapshots hold that are not stored again (sum of snapshot sizes minus stored bytes)",
        dedup,
    );
    reg.register("asset_snapshots", "Committed snapshots of the asset", snapshots);
    reg.register("asset_rebuildable", "1 when the asset's policy marks it rebuildable", rebuildable);
    reg.register(
        "asset_copy_lag_seconds",
        "Age of the oldest object of the asset not yet copied to the target (0 when up to date)",
        copy_lag,
    );
    let verified = Family::<Labels, Gauge>::default();
    let verify_failed = Family::<Labels, Gauge>::default();
    let oldest_verify = Family::<Labels, FGauge>::default();
    for (target, (ok, failed, oldest)) in state.catalog.verify_state().await.map_err(|e| e.to_string())? {
        let l: Labels = vec![("target".into(), target)];
        verified.get_or_create(&l).set(ok);
        verify_failed.get_or_create(&l).set(failed);
        if let Some(ms) = oldest {
            oldest_verify.get_or_create(&l).set(ms as f64 / 1000.0);
        }
    }
    let drift = Family::<Labels, Gauge>::default();
    for c in state.bucket_checks.lock().expect("bucket checks").iter() {
        drift.get_or_create(&vec![("target".into(), c.target.clone())]).set(c.drift.len() as i64);
    }
    reg.register(
        "target_config_drift",
        "Problems found in the copy target bucket's versioning / Object Lock configuration at start-up (0: matches the policy)",
        drift,
    );
    let pending_del = Family::<Labels, Gauge>::default();
    for (target, (n, _)) in state.catalog.remote_deletion_state().await.map_err(|e| e.to_string())? {
        pending_del.get_or_create(&vec![("target".into(), target)]).set(n);
    }
    reg.register(
        "target_pending_deletions",
        "Pruned objects still to delete from the copy target (Object Lock holds some until their date)",
        pending_del,
    );
    reg.register("target_verified_objects", "Objects of the copy target whose last verification passed", verified);
    reg.register(
        "target_verify_failures",
        "Objects of the copy target whose last verification failed (queued for re-upload)",
        verify_failed,
    );
    reg.register(
        "target_oldest_verification_timestamp_seconds",
        "Unix time of the copy target's least recent object verification",
        oldest_verify,
    );

    let job_up = Family::<Labels, Gauge>::default();
    let job_runs = Family::<Labels, Gauge>::default();
    let job_failures = Family::<Labels, Gauge>::default();
    let job_error_at = Family::<Labels, FGauge>::default();
    for (name, s) in state.jobs.view() {
        let l = vec![("job".to_string(), name.to_string())];
        job_up.get_or_create(&l).set(i64::from(s.state == "running"));
        job_runs.get_or_create(&l).set(s.runs as i64);
        job_failures.get_or_create(&l).set(s.failures as i64);
        if let Some(t) = s.last_error_ms {
            job_error_at.get_or_create(&l).set(t as f64 / 1000.0);
        }
    }
    reg.register("job_up", "1 while the background job runs normally, 0 while it backs off or has stopped", job_up);
    reg.register("job_runs", "Runs of the background job since start", job_runs);
    reg.register("job_failures", "Failed runs of the background job since start", job_failures);
    reg.register("job_last_error_timestamp_seconds", "Unix time of the job's last failure", job_error_at);

    let agents: Gauge = Gauge::default();
    agents.set(state.sessions.view().iter().filter(|a| a.connected).count() as i64);
    reg.register("agents_connected", "Agent daemons with an open session", agents);
    let scrape: FGauge = Gauge::default();
    scrape.set(now_ms as f64 / 1000.0);
    reg.register("scrape_timestamp_seconds", "When the coordinator rendered these metrics", scrape);

    reg.register("grpc_requests", "gRPC requests by method and status code", state.metrics.grpc_requests.clone());
    reg.register(
        "grpc_request_duration_seconds",
        "gRPC request latency to the response headers",
        state.metrics.grpc_latency.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Binds the metrics listener (failing clearly if the address is taken).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, std::io::Error> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                match render(&state).await {
                    Ok(body) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        body,
                    )
                        .into_response(),
                    Err(e) => {
                        tracing::error!("rendering metrics: {e}");
                        (StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
                    }
                }
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

pub fn local_addr(l: &tokio::net::TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

/// Tower layer recording every gRPC call's method, status code and latency.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<crate::service::State>);

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, state: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    state: Shared,
}

impl<S, B, RB> tower_service::Service<axum::http::Request<B>> for GrpcMetricsService<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = axum::http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let start = Instant::now();
        // The clone that was made ready stays in `self`'s place for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            let r = inner.call(req).await;
            let code = match &r {
                // A status in the headers is a trailers-only response (an error, usually);
                // otherwise it comes in the trailers and the call has started fine.
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or_else(|| "OK".to_string(), |c| format!("{:?}", tonic::Code::from_i32(c))),
                Err(_) => "Unknown".to_string(),
            };
            state.metrics.observe_grpc(&method, &code, start.elapsed());
            r
        })
    }
}
