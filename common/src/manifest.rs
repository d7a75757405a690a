//! The snapshot manifest: what one recovery point holds, signed by the agent that took it.
//!
//! Encoding: compact JSON with a fixed field order and sorted maps. Decoding re-encodes and
//! requires the same bytes back, so exactly one byte string represents a manifest and the
//! signature is always over that canonical form. The coordinator reads manifests (to check
//! that every chunk is stored and to serve restores) but never the chunk contents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::crypto::ChunkId;

pub const MANIFEST_FORMAT: u32 = 1;
/// Upper bound on an encoded manifest (about 800k chunk references).
pub const MAX_MANIFEST_SIZE: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub snapshot: String,
    pub asset: String,
    pub kind: String,
    pub agent: String,
    pub agent_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// Chunker that cut the files (algorithm name and parameters); the gear seed is secret.
    pub chunker: ChunkerRecord,
    /// Source metadata (git refs, etcd revision, Postgres LSNs, ...), kind-specific.
    pub source: BTreeMap<String, serde_json::Value>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerRecord {
    pub algorithm: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl From<ChunkerParams> for ChunkerRecord {
    fn from(p: ChunkerParams) -> Self {
        ChunkerRecord {
            algorithm: crate::chunker::ALGORITHM.to_string(),
            min_size: p.min_size,
            avg_size: p.avg_size,
            max_size: p.max_size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the snapshot, `/`-separated, no `..`.
    pub path: String,
    pub size: u64,
    /// Plaintext SHA-256 of the whole file, hex.
    pub sha256: String,
    pub chunks: Vec<ChunkRef>,
}

/// A chunk and its plaintext length, encoded as `["<id hex>", len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub ChunkId, pub u32);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("manifest is {0} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("manifest is not valid: {0}")]
    Invalid(String),
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat(u32),
    #[error("manifest is not in canonical encoding")]
    NotCanonical,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if probe.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(probe.format));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if m.encode() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        m.validate()?;
        Ok(m)
    }

    /// Structural checks that do not depend on who reads the manifest.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        if !crate::time::is_valid_snapshot_id(&self.snapshot) {
            return bad(format!("snapshot id {:?} is malformed", self.snapshot));
        }
        if !is_valid_asset_name(&self.asset) {
            return bad(format!("asset name {:?} is malformed", self.asset));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            if !is_safe_relative_path(&f.path) {
                return bad(format!("file path {:?} is not a safe relative path", f.path));
            }
            if !seen.insert(f.path.as_str()) {
                return bad(format!("file path {:?} appears twice", f.path));
            }
            let sum: u64 = f.chunks.iter().map(|c| c.1 as u64).sum();
            if sum != f.size {
                return bad(format!("file {:?}: chunk lengths add up to {sum}, size says {}", f.path, f.size));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("file {:?}: sha256 is not 64 hex digits", f.path));
            }
        }
        Ok(())
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Every distinct chunk the manifest names.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.0)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// `kind/name`: lowercase letters, digits, `-`, `_`, `.`; the name may contain `/`.
pub fn is_valid_asset_name(s: &str) -> bool {
    let Some((kind, name)) = s.split_once('/') else { return false };
    let ok = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
            && p != "."
            && p != ".."
    };
    s.len() <= 200 && ok(kind) && name.split('/').all(ok)
}

pub fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        let mut source = BTreeMap::new();
        source.insert("zeta".into(), serde_json::json!({"b": 1, "a": [1, 2]}));
        source.insert("alpha".into(), serde_json::json!("x"));
        Manifest {
            format: MANIFEST_FORMAT,
            snapshot: "20261124T095500.000Z-3fa81c2d".into(),
            asset: "git/gitops".into(),
            kind: "git".into(),
            agent: "git-1".into(),
            agent_version: "0.1.0".into(),
            started_at: "2026-11-24T09:55:00Z".into(),
            finished_at: "2026-11-24T09:55:02Z".into(),
            chunker: ChunkerParams::DEFAULT.into(),
            source,
            files: vec![FileEntry {
                path: "bundles/0001.bundle".into(),
                size: 12,
                sha256: "ab".repeat(32),
                chunks: vec![ChunkRef(ChunkId([7; 32]), 5), ChunkRef(ChunkId([8; 32]), 7)],
            }],
        }
    }

    #[test]
    fn round_trip_is_byte_identical() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.find("\"alpha\"").unwrap() < text.find("\"zeta\"").unwrap(), "maps are sorted");
        assert!(text.contains(&format!("[\"{}\",5]", "07".repeat(32))), "{text}");
    }

    #[test]
    fn non_canonical_and_unknown_inputs_are_rejected() {
        let m = sample();
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert!(matches!(Manifest::decode(&pretty), Err(ManifestError::NotCanonical)));
        let mut v: serde_json::Value = serde_json::from_slice(&m.encode()).unwrap();
        v["format"] = 2.into();
        assert!(matches!(Manifest::decode(&serde_json::to_vec(&v).unwrap()), Err(ManifestError::UnsupportedFormat(2))));
        v["format"] = 1.into();
        v["extra"] = 1.into();
        assert!(matches!(Manifest::decode(&serde_json::to_vec(&v).unwrap()), Err(ManifestError::Invalid(_))));
    }

    #[test]
    fn unsafe_paths_and_bad_sizes_are_rejected() {
        let mut m = sample();
        m.files[0].path = "../escape".into();
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        m.files[0].size = 13;
        assert!(Manifest::decode(&m.encode()).unwrap_err().to_string().contains("add up"));
    }

    #[test]
    fn asset_names() {
        assert!(is_valid_asset_name("postgres/main"));
        assert!(is_valid_asset_name("longhorn/pvc-1234"));
        assert!(!is_valid_asset_name("Postgres/main"));
        assert!(!is_valid_asset_name("postgres"));
        assert!(!is_valid_asset_name("git/../x"));
    }

    proptest! {
        #[test]
        fn arbitrary_manifests_round_trip(
            paths in proptest::collection::btree_set("[a-z]{1,8}(/[a-z0-9_-][a-z0-9._-]{0,7}){0,2}", 0..5),
            lens in proptest::collection::vec(0u32..1_000_000, 1..6),
            meta in proptest::collection::btree_map("[a-z_]{1,6}", any::<i64>(), 0..4),
        ) {
            let mut m = sample();
            m.source = meta.into_iter().map(|(k, v)| (k, v.into())).collect();
            m.files = paths.into_iter().enumerate().map(|(i, p)| FileEntry {
                path: p,
                size: lens.iter().map(|&l| l as u64).sum(),
                sha256: format!("{:064x}", i),
                chunks: lens.iter().enumerate().map(|(j, &l)| ChunkRef(ChunkId([j as u8; 32]), l)).collect(),
            }).collect();
            let bytes = m.encode();
            prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        }
    }
}
