//! Retention applied: forget the snapshots the plan deletes, then free the packs no
//! remaining snapshot needs.
//!
//! Phase 1 (forget): for each snapshot the planner deletes, its catalog row goes first, then
//! its manifest file (the manifest is the commit point, so removing it is the un-commit). A
//! crash between the two leaves a manifest that start-up reconciliation records again and
//! the next prune forgets again: nothing is lost, the work is redone.
//!
//! Phase 2 (collect), per asset, for packs older than `gc-grace` (a younger one may hold
//! chunks of an interrupted backup that its retry will deduplicate against), and only while
//! no backup of the asset is open (a backup in
//! flight may deduplicate against any stored chunk), and with new backups of the asset held
//! off (`BeginBackup` answers UNAVAILABLE, which agents retry) until it ends:
//! - the live set is every chunk named by a manifest still on disk for the asset (the
//!   repository, not the catalog, is the authority);
//! - a pack with no live chunk is forgotten by the catalog, then its file is removed;
//! - a pack whose dead bytes exceed `repack-waste` of its size has its live chunks copied
//!   (ciphertext as stored) into a new sealed pack, the catalog moves those chunks to it in
//!   one transaction, then the old file is removed.
//!
//! Every step leaves the catalog pointing only at files that exist, so a crash at any point
//! loses no live chunk; reconciliation re-indexes files the catalog forgot and the next
//! prune finishes the job.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use coffer_common::crypto::ChunkId;
use coffer_common::manifest::Manifest;
use coffer_common::units::format_size;

use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use crate::retention::{self, Plan, Point};
use crate::store::pack::{self, PackWriter};
use crate::store::{Repo, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("asset {asset}, snapshot {snapshot}: {detail}")]
    Manifest { asset: String, snapshot: String, detail: String },
    #[error("no asset {0:?}")]
    NoAsset(String),
    #[error("worker thread: {0}")]
    Join(String),
}

/// What prune does (or would do) to one asset.
#[derive(Debug, Clone, Default)]
pub struct AssetPrune {
    pub asset: String,
    pub retention: String,
    pub plan: Plan,
    pub gc: GcPlan,
    /// Per copy target: objects to delete there, and how many of them Object Lock holds
    /// until a later date (the latest such date, unix seconds).
    pub remote: std::collections::BTreeMap<String, RemoteDeletions>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteDeletions {
    pub objects: usize,
    pub held: usize,
    pub held_until: i64,
}

#[derive(Debug, Clone, Default)]
pub struct GcPlan {
    /// Packs with no live chunk: (id, size).
    pub delete: Vec<(String, i64)>,
    /// Packs to rewrite: (id, size, live bytes).
    pub repack: Vec<(String, i64, i64)>,
    /// Why collection was skipped, if it was.
    pub deferred: Option<String>,
}

impl GcPlan {
    pub fn freed_bytes(&self) -> i64 {
        self.delete.iter().map(|(_, s)| s).sum::<i64>() + self.repack.iter().map(|(_, s, l)| s - l).sum::<i64>()
    }
}

/// Test hook: `COFFER_TEST_CRASH_AT=STEP:N` aborts the process at the N-th (1-based) step
/// `forget`, `delete-pack` or `repack`, after the catalog change and before the file change,
/// to prove a prune interrupted there can be completed.
fn crash_point(step: &str, n: usize) {
    if let Ok(v) = std::env::var("COFFER_TEST_CRASH_AT")
        && v == format!("{step}:{n}")
    {
        eprintln!("COFFER_TEST_CRASH_AT={v}: aborting");
        std::process::abort();
    }
}

/// Everything prune needs; the server passes its own, the offline CLI opens them.
pub struct PruneCtx<'a> {
    pub config: &'a Config,
    pub repo: &'a Repo,
    pub catalog: &'a Catalog,
    /// Assets whose packs are being collected: `BeginBackup` refuses them meanwhile.
    pub collecting: &'a tokio::sync::Mutex<HashSet<String>>,
}

/// Plans (and with `apply`, carries out) retention for one asset or all.
pub async fn prune(
    ctx: &PruneCtx<'_>,
    only: Option<&str>,
    now_s: i64,
    apply: bool,
) -> Result<Vec<AssetPrune>, PruneError> {
    let assets = ctx.catalog.assets().await?;
    if let Some(a) = only
        && !assets.iter().any(|x| x.name == a)
    {
        return Err(PruneError::NoAsset(a.to_string()));
    }
    let mut out = Vec::new();
    let mut counters = Counters::default();
    for a in assets.iter().filter(|a| only.is_none_or(|o| o == a.name)) {
        let policy = ctx.config.policy_for(&a.name);
        let snapshots = ctx.catalog.snapshots(Some(&a.name), "", 0).await?;
        let mut points: Vec<Point> =
            snapshots.iter().map(|s| Point { id: s.id.clone(), time: s.started_at, in_flight: false }).collect();
        let open = ctx.catalog.open_backups(Some(a.id)).await?;
        for (id, started) in &open {
            points.push(Point { id: id.clone(), time: *started, in_flight: true });
        }
        let mut plan = retention::plan(&policy.retention, &points, now_s);
        // Stream entries (WAL) follow the snapshots they make restorable.
        let kept: HashSet<&str> = plan.kept().map(|d| d.id.as_str()).collect();
        let mut spans: Vec<retention::Span> = snapshots
            .iter()
            .filter(|s| kept.contains(s.id.as_str()))
            .map(|s| retention::Span { start: s.started_at, end: s.finished_at })
            .collect();
        spans.extend(open.iter().map(|(_, started)| retention::Span { start: *started, end: now_s }));
        for stream in ctx.catalog.asset_streams(a.id).await? {
            let entries: Vec<Point> = ctx
                .catalog
                .snapshots(Some(&a.name), &stream, 0)
                .await?
                .into_iter()
                .map(|s| Point { id: s.id, time: s.finished_at, in_flight: false })
                .collect();
            plan.decisions.extend(retention::plan_stream(&spans, policy.retention.within, &entries, now_s));
        }
        let doomed: BTreeSet<String> = plan.deleted().map(|d| d.id.clone()).collect();
        let now_ms = now_s * 1000;
        let mut remote = std::collections::BTreeMap::<String, RemoteDeletions>::new();
        let mut note = |targets: Vec<(String, i64)>| {
            for (t, not_before) in targets {
                let r = remote.entry(t).or_default();
                r.objects += 1;
                if not_before > now_ms {
                    r.held += 1;
                    r.held_until = r.held_until.max(not_before / 1000);
                }
            }
        };
        for id in &doomed {
            for key in manifest_keys(&a.name, id) {
                let targets = if apply {
                    ctx.catalog.schedule_remote_deletion(&key, policy.lock_days, now_ms).await?
                } else {
                    ctx.catalog.remote_deletion_plan(&key, policy.lock_days, now_ms).await?
                };
                note(targets);
            }
            if apply {
                ctx.catalog.delete_snapshot(id).await?;
                counters.forget += 1;
                crash_point("forget", counters.forget);
                ctx.repo.delete_manifest(&a.name, id)?;
                tracing::info!(asset = %a.name, snapshot = %id, "snapshot deleted by retention");
            }
        }
        let gc = collect(ctx, &a.name, a.id, &doomed, apply, &mut counters).await?;
        for pack in gc.delete.iter().map(|(p, _)| p).chain(gc.repack.iter().map(|(p, _, _)| p)) {
            let key = pack_key(ctx.repo, pack);
            let targets = if apply {
                ctx.catalog.schedule_remote_deletion(&key, policy.lock_days, now_ms).await?
            } else {
                ctx.catalog.remote_deletion_plan(&key, policy.lock_days, now_ms).await?
            };
            note(targets);
        }
        out.push(AssetPrune { asset: a.name.clone(), retention: policy.retention.to_string(), plan, gc, remote });
    }
    Ok(out)
}

/// Repository keys of a snapshot's manifest and signature.
fn manifest_keys(asset: &str, id: &str) -> [String; 2] {
    [format!("manifests/{asset}/{id}.manifest"), format!("manifests/{asset}/{id}.manifest.sig")]
}

/// Repository key of a pack.
fn pack_key(repo: &Repo, id: &str) -> String {
    repo.pack_path(id).strip_prefix(repo.root()).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Default)]
struct Counters {
    forget: usize,
    delete: usize,
    repack: usize,
}

/// Chunk ids named by the asset's manifests on disk, except `excluded` snapshots.
fn live_chunks(repo: &Repo, asset: &str, excluded: &BTreeSet<String>) -> Result<HashSet<ChunkId>, PruneError> {
    let mut live = HashSet::new();
    for snap in repo.list_asset_manifests(asset)? {
        if excluded.contains(&snap) {
            continue;
        }
        let (bytes, _) = repo.read_manifest(asset, &snap)?;
        let m = Manifest::decode(&bytes).map_err(|e| PruneError::Manifest {
            asset: asset.to_string(),
            snapshot: snap.clone(),
            detail: format!("{e}; refusing to collect packs of an asset with an unreadable manifest"),
        })?;
        live.extend(m.chunk_ids());
    }
    Ok(live)
}

async fn collect(
    ctx: &PruneCtx<'_>,
    asset: &str,
    asset_id: i64,
    doomed: &BTreeSet<String>,
    apply: bool,
    counters: &mut Counters,
) -> Result<GcPlan, PruneError> {
    let mut gc = GcPlan::default();
    // Hold new backups of this asset off while collecting; skip if one is in flight.
    {
        let mut busy = ctx.collecting.lock().await;
        if ctx.catalog.has_open_backup(asset_id).await? {
            gc.deferred = Some("a backup of the asset is in flight; packs are collected on a later run".into());
            return Ok(gc);
        }
        if apply {
            busy.insert(asset.to_string());
        }
    }
    let result = collect_inner(ctx, asset, asset_id, doomed, apply, counters, &mut gc).await;
    if apply {
        ctx.collecting.lock().await.remove(asset);
    }
    result.map(|()| gc)
}

async fn collect_inner(
    ctx: &PruneCtx<'_>,
    asset: &str,
    asset_id: i64,
    doomed: &BTreeSet<String>,
    apply: bool,
    counters: &mut Counters,
    gc: &mut GcPlan,
) -> Result<(), PruneError> {
    let repo = ctx.repo.clone();
    let (a, excluded) = (asset.to_string(), doomed.clone());
    let live = tokio::task::spawn_blocking(move || live_chunks(&repo, &a, &excluded))
        .await
        .map_err(|e| PruneError::Join(e.to_string()))??;
    let now = coffer_common::time::unix_seconds(coffer_common::time::now());
    let settled = now - ctx.config.gc_grace.as_secs() as i64;
    // Dead packs first (they free space at once), then rewrites.
    let mut rewrite = Vec::new();
    // Packs kept only in copy targets are deleted when dead but never rewritten (that would
    // download them); their garbage waits until the whole pack is dead.
    let remote_only = ctx.catalog.remote_pack_ids().await?;
    for (pack_id, size, chunks) in ctx.catalog.asset_packs(asset_id, settled).await? {
        let live_bytes: i64 = chunks.iter().filter(|(id, _)| live.contains(id)).map(|(_, l)| l).sum();
        if live_bytes == 0 {
            gc.delete.push((pack_id.clone(), size));
            if apply {
                ctx.catalog.delete_pack(&pack_id).await?;
                counters.delete += 1;
                crash_point("delete-pack", counters.delete);
                ctx.repo.delete_pack(&pack_id)?;
                tracing::info!(%asset, pack = %pack_id, size, "pack deleted: no live chunk");
            }
        } else if (size - live_bytes) as f64 > ctx.config.repack_waste * size as f64 && !remote_only.contains(&pack_id)
        {
            gc.repack.push((pack_id.clone(), size, live_bytes));
            let keep: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).filter(|id| live.contains(id)).collect();
            rewrite.push((pack_id, size, live_bytes, keep));
        }
    }
    if !apply {
        return Ok(());
    }
    for (pack_id, size, live_bytes, keep) in rewrite {
        let repo = ctx.repo.clone();
        let (old, a) = (pack_id.clone(), asset.to_string());
        let sealed = tokio::task::spawn_blocking(move || repack(&repo, &a, &old, &keep))
            .await
            .map_err(|e| PruneError::Join(e.to_string()))??;
        ctx.catalog.replace_pack(&pack_id, &sealed, asset_id).await?;
        counters.repack += 1;
        crash_point("repack", counters.repack);
        ctx.repo.delete_pack(&pack_id)?;
        tracing::info!(%asset, old = %pack_id, new = %sealed.id, size, live_bytes, "pack repacked");
    }
    Ok(())
}

/// Copies the chunks `keep` of pack `old` (ciphertext, checked against their CRC) into a
/// new sealed pack.
fn repack(repo: &Repo, asset: &str, old: &str, keep: &[ChunkId]) -> Result<pack::SealedPack, StoreError> {
    let path = repo.pack_path(old);
    let (_, entries, _) = pack::read_index(&path)?;
    let file = std::fs::File::open(&path).map_err(StoreError::io(format!("opening {}", path.display())))?;
    let wanted: HashSet<&ChunkId> = keep.iter().collect();
    let mut w = PackWriter::create(&repo.tmp_dir(), asset)?;
    for e in entries.iter().filter(|e| wanted.contains(&e.id)) {
        let data = pack::read_chunk(&file, old, e)?;
        if let Err(err) = w.append(e.id, &data) {
            w.discard();
            return Err(err);
        }
    }
    w.seal(|id| repo.pack_path(id))
}

/// The plan as operators read it.
pub fn render(report: &[AssetPrune], applied: bool) -> String {
    let mut out = String::new();
    let t = |s: i64| coffer_common::time::rfc3339(coffer_common::time::from_unix_seconds(s));
    for a in report {
        let _ = writeln!(out, "asset {} (retention: {})", a.asset, a.retention);
        for d in &a.plan.decisions {
            let verdict = if d.keep() {
                "keep  "
            } else if applied {
                "deleted"
            } else {
                "delete"
            };
            let _ = writeln!(out, "  {verdict:<7} {}  {}  {}", d.id, t(d.time), d.reasons.join(", "));
        }
        let kept = a.plan.kept().count();
        let deleted = a.plan.deleted().count();
        let _ = writeln!(out, "  {kept} kept, {deleted} {}", if applied { "deleted" } else { "to delete" });
        for (target, r) in &a.remote {
            let verb = if applied { "scheduled" } else { "to schedule" };
            if r.held > 0 {
                let _ = writeln!(
                    out,
                    "  copies in {target}: {} object(s) {verb} for deletion, {} held by Object Lock until {}",
                    r.objects,
                    r.held,
                    t(r.held_until)
                );
            } else {
                let _ = writeln!(out, "  copies in {target}: {} object(s) {verb} for deletion", r.objects);
            }
        }
        match &a.gc.deferred {
            Some(why) => {
                let _ = writeln!(out, "  packs: not collected: {why}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "  packs: {} {} ({}), {} {} ({} live): {} freed",
                    a.gc.delete.len(),
                    if applied { "deleted" } else { "to delete" },
                    format_size(a.gc.delete.iter().map(|(_, s)| *s as u64).sum()),
                    a.gc.repack.len(),
                    if applied { "repacked" } else { "to repack" },
                    format_size(a.gc.repack.iter().map(|(_, _, l)| *l as u64).sum()),
                    format_size(a.gc.freed_bytes().max(0) as u64),
                );
            }
        }
    }
    if !applied {
        out.push_str("dry run: nothing was changed (run with --apply to carry it out)\n");
    }
    out
}
