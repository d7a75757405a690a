//! Repository verification without keys: every pack's framing and index checksum, and every
//! stored chunk's CRC-32C. Corrupt chunks are traced to the snapshots that name them.

use std::collections::{BTreeMap, BTreeSet};

use coffer_common::crypto::ChunkId;
use coffer_common::manifest::Manifest;

use crate::store::pack::{read_chunk, read_index};
use crate::store::{Repo, StoreError};

#[derive(Debug, Clone)]
pub struct Problem {
    pub pack: String,
    pub chunk: Option<ChunkId>,
    pub asset: String,
    pub snapshots: Vec<String>,
    pub detail: String,
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub packs: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads every pack in full. Blocking; run it on a blocking thread.
pub fn verify_repo(repo: &Repo) -> Result<Report, StoreError> {
    let mut report = Report::default();
    for pack_id in repo.list_packs()? {
        let path = repo.pack_path(&pack_id);
        report.packs += 1;
        let (asset, entries, len) = match read_index(&path) {
            Ok(x) => x,
            Err(e) => {
                report.problems.push(Problem {
                    pack: pack_id,
                    chunk: None,
                    asset: String::new(),
                    snapshots: Vec::new(),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        report.bytes += len;
        let f = std::fs::File::open(&path).map_err(StoreError::io(format!("opening {}", path.display())))?;
        for e in &entries {
            report.chunks += 1;
            if let Err(err) = read_chunk(&f, &pack_id, e) {
                report.problems.push(Problem {
                    pack: pack_id.clone(),
                    chunk: Some(e.id),
                    asset: asset.clone(),
                    snapshots: Vec::new(),
                    detail: err.to_string(),
                });
            }
        }
    }
    attribute(repo, &mut report)?;
    Ok(report)
}

/// Fills in which snapshots name each corrupt chunk.
fn attribute(repo: &Repo, report: &mut Report) -> Result<(), StoreError> {
    let wanted: BTreeMap<String, BTreeSet<ChunkId>> = report.problems.iter().fold(BTreeMap::new(), |mut m, p| {
        if let Some(c) = p.chunk {
            m.entry(p.asset.clone()).or_default().insert(c);
        }
        m
    });
    if wanted.is_empty() {
        return Ok(());
    }
    let mut hits: BTreeMap<(String, ChunkId), Vec<String>> = BTreeMap::new();
    for (asset, snapshot) in repo.list_manifests()? {
        let Some(ids) = wanted.get(&asset) else { continue };
        let Ok((bytes, _)) = repo.read_manifest(&asset, &snapshot) else { continue };
        let Ok(m) = Manifest::decode(&bytes) else { continue };
        for id in m.chunk_ids() {
            if ids.contains(&id) {
                hits.entry((asset.clone(), id)).or_default().push(snapshot.clone());
            }
        }
    }
    for p in &mut report.problems {
        if let Some(c) = p.chunk {
            p.snapshots = hits.remove(&(p.asset.clone(), c)).unwrap_or_default();
        }
    }
    Ok(())
}
