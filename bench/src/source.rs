//! The `files` source: a directory tree, backed up file by file in sorted path order.
//!
//! It exists to measure the runtime and protocol every agent uses, so it adds nothing of
//! its own: no metadata-based skipping of unchanged files, no permissions or ownership.
//! Only regular files are captured; symlinks and special files are skipped with a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coffer_common::manifest::{Manifest, is_safe_relative_path};
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use serde_json::{Value, json};

pub struct DirSource {
    /// Root of the tree to back up; not needed for restore.
    pub dir: Option<PathBuf>,
}

/// A regular file found by [`walk`]: its path relative to the root (`/`-separated) and on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub rel: String,
    pub abs: PathBuf,
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
                out.push(Found { rel, abs: entry.path() });
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
        let files = tokio::task::spawn_blocking(move || walk(&root))
            .await
            .map_err(|e| SourceError::Failed(format!("walk thread: {e}")))??;
        // Files go to the sink in groups, which streams two at a time; a group's files are
        // open only while it is being streamed.
        for group in files.chunks(32) {
            let opened = group
                .iter()
                .map(|f| {
                    let file =
                        std::fs::File::open(&f.abs).map_err(SourceError::io(format!("opening {}", f.abs.display())))?;
                    Ok((f.rel.clone(), file))
                })
                .collect::<Result<Vec<_>, SourceError>>()?;
            sink.add_files(opened).await?;
        }
        let bytes: u64 = sink.files().iter().map(|f| f.size).sum();
        let mut meta = BTreeMap::new();
        meta.insert("root".into(), json!(dir.display().to_string()));
        meta.insert("files".into(), json!(files.len()));
        meta.insert("bytes".into(), json!(bytes));
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
