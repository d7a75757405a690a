//! The repository on local disk: packs, manifests, keyring envelopes and agent keys, laid out
//! so that the directory alone can rebuild the catalog.
//!
//! ```text
//! DATA_DIR/repo/config.json                      repository id and format
//! DATA_DIR/repo/packs/ab/<pack id>.pack          sealed packs (immutable)
//! DATA_DIR/repo/manifests/<kind>/<name>/<snapshot>.manifest (+ .sig)
//! DATA_DIR/repo/keyrings/<kind>/<name>.age       age envelopes of asset keyrings
//! DATA_DIR/repo/agents/<name>.pub                registered manifest-signing keys
//! DATA_DIR/repo/tmp/                             packs being written (discarded at start)
//! ```
//!
//! Every file becomes visible by rename after its contents and then its directory are
//! fsynced, so a crash leaves either the whole file or nothing.

pub mod pack;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const REPO_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("coordinator disk is full or nearly full: {0}")]
    DiskFull(String),
}

impl StoreError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
                StoreError::DiskFull(format!("{context}: {source}"))
            } else {
                StoreError::Io { context, source }
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepoConfig {
    pub format: u32,
    pub id: String,
    pub created_at: String,
    pub chunk_format: u8,
    pub pack_format: u32,
    pub manifest_format: u32,
    pub chunker_algorithm: String,
}

#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
    pub config: RepoConfig,
}

impl Repo {
    /// Opens the repository at `root`, creating it if empty, and discards unsealed packs.
    pub fn open(root: &Path) -> Result<Repo, StoreError> {
        for d in ["packs", "manifests", "keyrings", "agents", "tmp"] {
            fs::create_dir_all(root.join(d)).map_err(StoreError::io(format!("creating {}", root.join(d).display())))?;
        }
        let cfg_path = root.join("config.json");
        let config = match fs::read(&cfg_path) {
            Ok(b) => {
                let c: RepoConfig = serde_json::from_slice(&b)
                    .map_err(|e| StoreError::Corrupt { what: cfg_path.display().to_string(), detail: e.to_string() })?;
                if c.format != REPO_FORMAT {
                    return Err(StoreError::Corrupt {
                        what: cfg_path.display().to_string(),
                        detail: format!("repository format {} is not supported by this build", c.format),
                    });
                }
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let c = RepoConfig {
                    format: REPO_FORMAT,
                    id: random_hex(16),
                    created_at: coffer_common::time::rfc3339(coffer_common::time::now()),
                    chunk_format: coffer_common::crypto::CHUNK_FORMAT,
                    pack_format: pack::PACK_FORMAT,
                    manifest_format: coffer_common::manifest::MANIFEST_FORMAT,
                    chunker_algorithm: coffer_common::chunker::ALGORITHM.to_string(),
                };
                let mut text = serde_json::to_vec_pretty(&c).expect("config serializes");
                text.push(b'\n');
                write_atomic(root, &cfg_path, &text)?;
                c
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", cfg_path.display()))(e)),
        };
        let repo = Repo { root: root.to_path_buf(), config };
        repo.clear_tmp()?;
        Ok(repo)
    }

    /// Opens an existing repository without changing anything (for read-only tools such as
    /// `verify`, which may run beside a live coordinator).
    pub fn open_existing(root: &Path) -> Result<Repo, StoreError> {
        let cfg_path = root.join("config.json");
        let b = fs::read(&cfg_path).map_err(StoreError::io(format!("reading {}", cfg_path.display())))?;
        let config: RepoConfig = serde_json::from_slice(&b)
            .map_err(|e| StoreError::Corrupt { what: cfg_path.display().to_string(), detail: e.to_string() })?;
        Ok(Repo { root: root.to_path_buf(), config })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn clear_tmp(&self) -> Result<(), StoreError> {
        let dir = self.tmp_dir();
        for e in fs::read_dir(&dir).map_err(StoreError::io(format!("listing {}", dir.display())))? {
            let p = e.map_err(StoreError::io("listing tmp"))?.path();
            tracing::info!(path = %p.display(), "discarding unsealed file from an interrupted upload");
            fs::remove_file(&p).map_err(StoreError::io(format!("removing {}", p.display())))?;
        }
        Ok(())
    }

    pub fn pack_path(&self, id: &str) -> PathBuf {
        self.root.join("packs").join(&id[..2]).join(format!("{id}.pack"))
    }

    /// Every sealed pack id on disk.
    pub fn list_packs(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let packs = self.root.join("packs");
        for d in fs::read_dir(&packs).map_err(StoreError::io("listing packs"))? {
            let d = d.map_err(StoreError::io("listing packs"))?.path();
            if !d.is_dir() {
                continue;
            }
            for f in fs::read_dir(&d).map_err(StoreError::io(format!("listing {}", d.display())))? {
                let name = f.map_err(StoreError::io("listing packs"))?.file_name();
                if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pack")) {
                    out.push(id.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn manifest_path(&self, asset: &str, snapshot: &str) -> PathBuf {
        self.root.join("manifests").join(asset).join(format!("{snapshot}.manifest"))
    }

    pub fn signature_path(&self, asset: &str, snapshot: &str) -> PathBuf {
        self.root.join("manifests").join(asset).join(format!("{snapshot}.manifest.sig"))
    }

    /// Every (asset, snapshot) with a manifest on disk.
    pub fn list_manifests(&self) -> Result<Vec<(String, String)>, StoreError> {
        let base = self.root.join("manifests");
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).map_err(StoreError::io(format!("listing {}", dir.display())))? {
                let p = e.map_err(StoreError::io("listing manifests"))?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(snap) =
                    p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".manifest"))
                {
                    let asset =
                        p.parent().and_then(|d| d.strip_prefix(&base).ok()).map(|a| a.to_string_lossy().into_owned());
                    if let Some(asset) = asset {
                        out.push((asset, snap.to_string()));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Snapshot ids with a manifest on disk for one asset.
    pub fn list_asset_manifests(&self, asset: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("manifests").join(asset);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()))(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let name = e.map_err(StoreError::io(format!("listing {}", dir.display())))?.file_name();
            if let Some(snap) = name.to_str().and_then(|n| n.strip_suffix(".manifest")) {
                out.push(snap.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Commit point of a snapshot: signature first, then the manifest, each atomically.
    pub fn write_manifest(
        &self,
        asset: &str,
        snapshot: &str,
        manifest: &[u8],
        signature: &str,
    ) -> Result<(), StoreError> {
        let dir = self.root.join("manifests").join(asset);
        fs::create_dir_all(&dir).map_err(StoreError::io(format!("creating {}", dir.display())))?;
        write_atomic(&self.tmp_dir(), &self.signature_path(asset, snapshot), signature.as_bytes())?;
        write_atomic(&self.tmp_dir(), &self.manifest_path(asset, snapshot), manifest)
    }

    /// Removes a snapshot: the manifest first (from then on the snapshot does not exist),
    /// then its signature. Removing what is already gone is not an error.
    pub fn delete_manifest(&self, asset: &str, snapshot: &str) -> Result<(), StoreError> {
        let m = self.manifest_path(asset, snapshot);
        remove_if_exists(&m)?;
        remove_if_exists(&self.signature_path(asset, snapshot))?;
        sync_dir(m.parent().unwrap_or(Path::new(".")))
    }

    /// Removes a pack file (already gone is fine).
    pub fn delete_pack(&self, id: &str) -> Result<(), StoreError> {
        let p = self.pack_path(id);
        remove_if_exists(&p)?;
        sync_dir(p.parent().unwrap_or(Path::new(".")))
    }

    pub fn read_manifest(&self, asset: &str, snapshot: &str) -> Result<(Vec<u8>, String), StoreError> {
        let m = self.manifest_path(asset, snapshot);
        let s = self.signature_path(asset, snapshot);
        let bytes = fs::read(&m).map_err(StoreError::io(format!("reading {}", m.display())))?;
        let sig = fs::read_to_string(&s).map_err(StoreError::io(format!("reading {}", s.display())))?;
        Ok((bytes, sig))
    }

    pub fn keyring_path(&self, asset: &str) -> PathBuf {
        self.root.join("keyrings").join(format!("{asset}.age"))
    }

    /// Stores the envelope unless one exists; returns the stored envelope and whether it is new.
    pub fn put_keyring_if_absent(&self, asset: &str, envelope: &[u8]) -> Result<(Vec<u8>, bool), StoreError> {
        let path = self.keyring_path(asset);
        if let Some(existing) = self.get_keyring(asset)? {
            return Ok((existing, false));
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(StoreError::io(format!("creating {}", dir.display())))?;
        }
        write_atomic(&self.tmp_dir(), &path, envelope)?;
        Ok((envelope.to_vec(), true))
    }

    pub fn get_keyring(&self, asset: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.keyring_path(asset);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()))(e)),
        }
    }

    pub fn write_agent_key(&self, agent: &str, key_line: &str) -> Result<(), StoreError> {
        let path = self.root.join("agents").join(format!("{agent}.pub"));
        write_atomic(&self.tmp_dir(), &path, format!("{}\n", key_line.trim()).as_bytes())
    }

    pub fn read_agent_key(&self, agent: &str) -> Result<Option<String>, StoreError> {
        let path = self.root.join("agents").join(format!("{agent}.pub"));
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Free bytes on the repository's filesystem.
    pub fn free_space(&self) -> Result<u64, StoreError> {
        free_space(&self.root)
    }
}

pub fn free_space(path: &Path) -> Result<u64, StoreError> {
    let st = rustix::fs::statvfs(path)
        .map_err(|e| StoreError::io(format!("statvfs {}", path.display()))(std::io::Error::from(e)))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Writes `contents` to `dest` atomically: temp file in `tmp_dir`, fsync, rename, fsync dir.
pub fn write_atomic(tmp_dir: &Path, dest: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_dir.join(format!(".{}.tmp", random_hex(8)));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(StoreError::io(format!("creating {}", tmp.display())))?;
        f.write_all(contents).map_err(StoreError::io(format!("writing {}", tmp.display())))?;
        f.sync_all().map_err(StoreError::io(format!("syncing {}", tmp.display())))?;
        fs::rename(&tmp, dest).map_err(StoreError::io(format!("renaming to {}", dest.display())))?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn remove_if_exists(p: &Path) -> Result<(), StoreError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("removing {}", p.display()))(e)),
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("syncing directory {}", dir.display())))
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("the operating system's random source failed");
    hex::encode(b)
}
