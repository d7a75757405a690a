//! The `files` source: a directory tree, backed up file by file in sorted path order.
//!
//! It exists to measure the runtime and protocol every agent uses. Like restic's file
//! cache, a file whose size, mtime, ctime and inode equal those recorded in the previous
//! snapshot is not read again: its entry (chunk list and SHA-256) is reused and the
//! coordinator checks at commit that every chunk it names is stored. A file changed less
//! than [`RACY`] before the previous walk is always read again, since a write in the same
//! timestamp tick would not move its mtime. No permissions or ownership are recorded.
//! Only regular files are captured; symlinks and special files are skipped with a warning.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_common::manifest::{Manifest, is_safe_relative_path};
use coffer_common::runtime::direct::DirectReader;
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use serde_json::{Value, json};

pub struct DirSource {
    /// Root of the tree to back up; not needed for restore.
    pub dir: Option<PathBuf>,
}

/// A regular file found by [`walk`]: its path relative to the root (`/`-separated) and on disk,
/// and what identifies its content between backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub rel: String,
    pub abs: PathBuf,
    pub stat: Stat,
}

/// Size, mtime and ctime (nanoseconds since the epoch) and inode of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl Stat {
    fn of(m: &std::fs::Metadata) -> Stat {
        Stat {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
        }
    }

    fn to_json(self) -> Value {
        json!([self.size, self.mtime_ns, self.ctime_ns, self.ino])
    }

    fn from_json(v: &Value) -> Option<Stat> {
        let a = v.as_array()?;
        match a.as_slice() {
            [size, m, c, ino] => {
                Some(Stat { size: size.as_u64()?, mtime_ns: m.as_i64()?, ctime_ns: c.as_i64()?, ino: ino.as_u64()? })
            }
            _ => None,
        }
    }
}

/// Changes this close to a walk may share a timestamp tick with a later write.
pub const RACY: Duration = Duration::from_secs(1);

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The unchanged-file record of a previous snapshot: when its walk started, and each file's stat.
struct Previous<'a> {
    walked_at_ns: i64,
    stats: &'a serde_json::Map<String, Value>,
    entries: std::collections::HashMap<&'a str, &'a coffer_common::manifest::FileEntry>,
}

impl Previous<'_> {
    /// The previous entry of `f` if the file is certainly unchanged since.
    fn unchanged(&self, f: &Found) -> Option<coffer_common::manifest::FileEntry> {
        let old = Stat::from_json(self.stats.get(&f.rel)?)?;
        let settled = self.walked_at_ns - RACY.as_nanos() as i64;
        if old != f.stat || old.mtime_ns >= settled || old.ctime_ns >= settled {
            return None;
        }
        self.entries.get(f.rel.as_str()).filter(|e| e.size == f.stat.size).map(|e| (*e).clone())
    }
}

/// Every regular file under `root`, sorted by relative path.
pub fn walk(root: &Path) -> Result<Vec<Found>, SourceError> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(SourceError::io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(SourceError::io(format!("listing {}", dir.display())))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| SourceError::Failed(format!("{}: file name {n:?} is not UTF-8", dir.display())))?;
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let ty = entry.file_type().map_err(SourceError::io(format!("inspecting {}", entry.path().display())))?;
            if ty.is_dir() {
                stack.push((entry.path(), rel));
            } else if ty.is_file() {
                let meta =
                    entry.metadata().map_err(SourceError::io(format!("inspecting {}", entry.path().display())))?;
                out.push(Found { rel, abs: entry.path(), stat: Stat::of(&meta) });
            } else {
                tracing::warn!(path = %entry.path().display(), "skipping: not a regular file or directory");
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn is_empty_or_missing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

impl Source for DirSource {
    fn kind(&self) -> &'static str {
        "files"
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let dir = self.dir.clone().ok_or_else(|| SourceError::Failed("--dir is required".into()))?;
        let files = tokio::task::spawn_blocking(move || walk(&dir))
            .await
            .map_err(|e| SourceError::Failed(format!("walk thread: {e}")))??;
        Ok(Probe { description: format!("{} regular file(s)", files.len()), ..Default::default() })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let dir = self.dir.clone().ok_or_else(|| SourceError::Failed("--dir is required for backup".into()))?;
        let root = dir.clone();
        let walked_at_ns = now_ns();
        let files = tokio::task::spawn_blocking(move || walk(&root))
            .await
            .map_err(|e| SourceError::Failed(format!("walk thread: {e}")))??;
        // Unchanged files first (entries reused, nothing read), then the rest streamed.
        let previous = sink.previous().and_then(|p| {
            let m = &p.manifest;
            Some(Previous {
                walked_at_ns: m.source.get("walked_at_ns")?.as_i64()?,
                stats: m.source.get("stat")?.as_object()?,
                entries: m.files.iter().map(|e| (e.path.as_str(), e)).collect(),
            })
        });
        let mut changed = Vec::new();
        let mut reused = Vec::new();
        for f in &files {
            match previous.as_ref().and_then(|p| p.unchanged(f)) {
                Some(entry) => reused.push(entry),
                None => changed.push(f),
            }
        }
        let unchanged = reused.len();
        for entry in reused {
            sink.reuse_file(entry)?;
        }
        // Changed files go to the sink in groups, which streams two at a time; a group's
        // files are open only while it is being streamed.
        for group in changed.chunks(32) {
            let opened = group
                .iter()
                .map(|f| {
                    let file = DirectReader::open(&f.abs, true)
                        .map_err(SourceError::io(format!("opening {}", f.abs.display())))?;
                    Ok((f.rel.clone(), file))
                })
                .collect::<Result<Vec<_>, SourceError>>()?;
            sink.add_files(opened).await?;
        }
        let bytes: u64 = sink.files().iter().map(|f| f.size).sum();
        tracing::info!(files = files.len(), unchanged, "files backed up");
        let stats: serde_json::Map<String, Value> = files.iter().map(|f| (f.rel.clone(), f.stat.to_json())).collect();
        let mut meta = BTreeMap::new();
        meta.insert("root".into(), json!(dir.display().to_string()));
        meta.insert("files".into(), json!(files.len()));
        meta.insert("unchanged".into(), json!(unchanged));
        meta.insert("bytes".into(), json!(bytes));
        meta.insert("walked_at_ns".into(), json!(walked_at_ns));
        meta.insert("stat".into(), Value::Object(stats));
        Ok(meta)
    }

    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        if !is_empty_or_missing(target) {
            return Err(SourceError::Failed(format!(
                "{} exists and is not empty; restore into a new directory",
                target.display()
            )));
        }
        std::fs::create_dir_all(target).map_err(SourceError::io(format!("creating {}", target.display())))?;
        let mut files = Vec::with_capacity(reader.manifest().files.len());
        for f in &reader.manifest().files {
            // The manifest was validated when it was read; this is the last line of defence
            // before a path from the snapshot is joined onto the target.
            if !is_safe_relative_path(&f.path) {
                return Err(SourceError::Failed(format!("snapshot names an unsafe path {:?}", f.path)));
            }
            files.push((f.path.clone(), target.join(&f.path)));
        }
        reader.restore_files(&files).await?;
        Ok(())
    }

    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let mut report = VerifyReport { ok: true, ..Default::default() };
        for f in &manifest.files {
            match std::fs::symlink_metadata(target.join(&f.path)) {
                Ok(m) if m.is_file() && m.len() == f.size => {}
                Ok(m) => report.problems.push(format!("{}: {} bytes, the snapshot says {}", f.path, m.len(), f.size)),
                Err(e) => report.problems.push(format!("{}: {e}", f.path)),
            }
        }
        let found = walk(target)?.len();
        if found != manifest.files.len() {
            report.problems.push(format!("{found} files under the target, the snapshot has {}", manifest.files.len()));
        }
        report.ok = report.problems.is_empty();
        if report.ok {
            report.checks.push(format!(
                "{} files present with the snapshot's sizes (contents checked by SHA-256 while restoring)",
                manifest.files.len()
            ));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_is_sorted_relative_and_regular_files_only() {
        let root = &std::env::temp_dir().join(format!("coffer-bench-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        for p in ["z", "b/c/y", "b/x", "a/w"] {
            std::fs::write(root.join(p), p).unwrap();
        }
        std::os::unix::fs::symlink(root.join("z"), root.join("link")).unwrap();
        let rels: Vec<String> = walk(root).unwrap().into_iter().map(|f| f.rel).collect();
        assert_eq!(rels, ["a/w", "b/c/y", "b/x", "z"]);
        assert!(is_empty_or_missing(&root.join("empty")));
        assert!(is_empty_or_missing(&root.join("nope")));
        assert!(!is_empty_or_missing(root));
        std::fs::remove_dir_all(root).unwrap();
    }
}
