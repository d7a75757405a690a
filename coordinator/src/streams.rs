//! What the coordinator knows about an asset's streams: how many files, the newest, and for
//! a Postgres WAL stream the gaps and the continuous point-in-time window, computed from the
//! `stream_files` index and the base backups' manifests (start segment, stop time).

use std::collections::HashMap;
use std::sync::Mutex;

use coffer_common::manifest::Manifest;
use coffer_common::pgwal::{self, Continuity, WalFile};

use crate::catalog::{AssetRow, CatalogError};
use crate::service::State;

/// A base backup's facts the window needs (manifests are immutable: cached by snapshot id).
#[derive(Debug, Clone)]
pub struct BaseFacts {
    timeline: u32,
    start_segno: u64,
    stop_time: i64,
    seg_size: u64,
}

/// What status and metrics read from a snapshot's manifest, decoded once per snapshot id
/// (manifests never change; a big one is megabytes of JSON).
#[derive(Debug, Clone, Default)]
pub struct SnapshotFacts {
    /// A Postgres base backup's start segment and stop time.
    base: Option<BaseFacts>,
    /// Longhorn replica health at backup time.
    replicas: Option<ReplicaHealth>,
}

/// Cache of [`SnapshotFacts`] by snapshot id.
#[derive(Default)]
pub struct FactsCache(Mutex<HashMap<String, SnapshotFacts>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub stream: String,
    pub files: u64,
    pub newest_file: String,
    /// Commit time of the newest entry (unix seconds).
    pub newest_at: Option<i64>,
    pub gaps: Vec<String>,
    pub window: Option<(i64, i64)>,
}

fn base_facts(m: &Manifest) -> Option<BaseFacts> {
    let seg_size = m.source.get("wal_segment_size")?.as_u64()?;
    let start = m.source.get("start_wal")?.as_str()?;
    let Some(WalFile::Segment { timeline, segno }) = pgwal::parse_name(start, seg_size) else { return None };
    let stop = coffer_common::time::parse_rfc3339(m.source.get("stop_time")?.as_str()?)?;
    Some(BaseFacts { timeline, start_segno: segno, stop_time: coffer_common::time::unix_seconds(stop), seg_size })
}

/// Longhorn replica health as the asset's newest backup recorded it (agent-longhorn with
/// the Longhorn API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub robustness: String,
    pub healthy: u64,
    pub desired: u64,
}

impl ReplicaHealth {
    /// Counts as a copy: the volume healthy with every replica it wants.
    pub fn ok(&self) -> bool {
        self.robustness == "healthy" && self.desired > 0 && self.healthy >= self.desired
    }
}

fn replica_health(m: &Manifest) -> Option<ReplicaHealth> {
    Some(ReplicaHealth {
        robustness: m.source.get("robustness")?.as_str()?.to_string(),
        healthy: m.source.get("replicas_healthy")?.as_u64()?,
        desired: m.source.get("replicas_desired")?.as_u64()?,
    })
}

impl State {
    /// Replica health from the newest snapshot's manifest, if it recorded any.
    pub async fn replica_health(&self, a: &AssetRow) -> Option<ReplicaHealth> {
        let (id, _) = a.latest.as_ref()?;
        self.facts(&a.name, id).await.replicas
    }

    async fn facts(&self, asset: &str, id: &str) -> SnapshotFacts {
        if let Some(f) = self.facts_cache.0.lock().expect("facts cache").get(id) {
            return f.clone();
        }
        let (repo, a, i) = (self.repo.clone(), asset.to_string(), id.to_string());
        let facts = tokio::task::spawn_blocking(move || {
            let m = repo.read_manifest(&a, &i).ok().and_then(|(bytes, _)| Manifest::decode(&bytes).ok());
            m.map(|m| SnapshotFacts { base: base_facts(&m), replicas: replica_health(&m) }).unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        self.facts_cache.0.lock().expect("facts cache").insert(id.to_string(), facts.clone());
        facts
    }

    /// Summaries of the asset's streams (none for most kinds).
    pub async fn stream_summaries(&self, a: &AssetRow) -> Result<Vec<StreamSummary>, CatalogError> {
        let mut out = Vec::new();
        for stream in self.catalog.asset_streams(a.id).await? {
            let mut files = Vec::new();
            loop {
                let after = files.last().map(|f: &crate::catalog::StreamFileRow| f.path.clone()).unwrap_or_default();
                let page = self.catalog.stream_files(a.id, &stream, &[], &after, 10_000).await?;
                if page.is_empty() {
                    break;
                }
                files.extend(page);
            }
            let newest = self.catalog.snapshots(Some(&a.name), &stream, 1).await?;
            let newest_at = newest.first().map(|s| s.finished_at);
            let newest_file = files.iter().max_by_key(|f| f.committed_at).map(|f| f.path.clone()).unwrap_or_default();
            let mut s = StreamSummary {
                stream: stream.clone(),
                files: files.len() as u64,
                newest_file,
                newest_at,
                ..Default::default()
            };
            if a.kind == "postgres" && stream == "wal" {
                // Oldest first: the window starts at the oldest base the WAL replays from.
                let mut bases = self.catalog.snapshots(Some(&a.name), "", 0).await?;
                bases.reverse();
                let mut facts: Vec<BaseFacts> = Vec::with_capacity(bases.len());
                for b in &bases {
                    facts.extend(self.facts(&a.name, &b.id).await.base);
                }
                let seg_size = facts.last().map(|f| f.seg_size).unwrap_or(16 << 20);
                let c = Continuity::of(files.iter().map(|f| f.path.as_str()), seg_size);
                s.gaps = c
                    .gaps
                    .iter()
                    .map(|&(tl, first, last)| {
                        format!(
                            "timeline {tl}: {}..{}",
                            pgwal::segment_name(tl, first, seg_size),
                            pgwal::segment_name(tl, last, seg_size)
                        )
                    })
                    .collect();
                let start = facts.iter().find(|f| c.continuous_from(f.timeline, f.start_segno)).map(|f| f.stop_time);
                s.window = start.zip(newest_at).filter(|(a, b)| a <= b);
            }
            out.push(s);
        }
        Ok(out)
    }
}
