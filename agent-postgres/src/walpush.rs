//! `wal-push` (archive_command) and `wal-fetch` (restore_command).
//!
//! wal-push exits 0 only once the coordinator has committed the segment, so PostgreSQL
//! never recycles WAL Coffer does not hold. It pushes ahead the other segments PostgreSQL
//! has marked `.ready` in the same commit and leaves a marker for each; when PostgreSQL then
//! asks for one of them, the marker (checked against the file's SHA-256) answers without a
//! connection. A name already archived with the same content succeeds; with different
//! content it fails loudly (two servers archiving into one stream).
//!
//! wal-fetch exits 0 with the file in place, 1 when the archive does not hold it (recovery
//! treats that as the end of the archive), and 126 on any other failure, which PostgreSQL
//! treats as fatal, so an unreachable coordinator stops recovery instead of ending it early
//! at the wrong point.

use std::path::{Path, PathBuf};

use coffer_common::chunker::Cut;
use coffer_common::runtime::SourceError;
use coffer_common::runtime::backup::{BackupSink, PipelineOptions};
use coffer_common::runtime::cli::AgentContext;
use coffer_common::runtime::restore::SnapshotReader;
use serde_json::json;

use crate::WAL_STREAM;
use coffer_common::pgwal::{self as wal, WalFile};

/// Marker directory (inside pg_wal) for segments pushed ahead of PostgreSQL's request.
const PUSHED_DIR: &str = ".coffer-pushed";
/// Prefetched segments (inside pg_wal) waiting for recovery to ask for them.
const PREFETCH_DIR: &str = ".coffer-prefetch";

fn failed(e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(e.to_string())
}

fn sha256_file(path: &Path) -> Result<(String, u64), SourceError> {
    let (digest, len) =
        coffer_common::crypto::sha256_file(path).map_err(SourceError::io(format!("reading {}", path.display())))?;
    Ok((hex::encode(digest), len))
}

fn file_name(path: &Path) -> Result<String, SourceError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| failed(format!("{} has no file name", path.display())))
}

/// Answers from a push-ahead marker without connecting: Some(()) when `path` was pushed
/// with exactly this content.
pub fn pushed_already(path: &Path) -> Result<bool, SourceError> {
    let name = file_name(path)?;
    let Some(dir) = path.parent() else { return Ok(false) };
    let marker = dir.join(PUSHED_DIR).join(&name);
    let Ok(recorded) = std::fs::read_to_string(&marker) else { return Ok(false) };
    let (sha, _) = sha256_file(path)?;
    let _ = std::fs::remove_file(&marker);
    Ok(recorded.trim() == sha)
}

/// Segments PostgreSQL has marked ready for archiving, other than `name`, oldest first.
fn ready_segments(wal_dir: &Path, name: &str, max: usize) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(wal_dir.join("archive_status")) else { return Vec::new() };
    let mut ready: Vec<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
        .filter(|n| n != name && wal_dir.join(n).is_file())
        .collect();
    // Timeline history files first (recovery needs them to follow a switch), then by name.
    ready.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    ready.truncate(max);
    ready
}

pub struct PushOutcome {
    pub pushed: Vec<String>,
    pub already: Vec<String>,
}

/// Archives `path` (and up to `ahead` other ready segments) into the asset's WAL stream.
pub async fn push(ctx: &AgentContext, path: &Path, ahead: usize) -> Result<PushOutcome, SourceError> {
    let name = file_name(path)?;
    if wal::parse_name(&name, 16 << 20).is_none() && wal::parse_name(&name, 1 << 30).is_none() {
        return Err(failed(format!("{name} is not a WAL file name PostgreSQL archives")));
    }
    let wal_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    if !path.is_file() {
        return Err(failed(format!("{} is not a file", path.display())));
    }
    let mut batch = vec![(name.clone(), path.to_path_buf())];
    for n in ready_segments(&wal_dir, &name, ahead) {
        batch.push((n.clone(), wal_dir.join(&n)));
    }
    let names: Vec<String> = batch.iter().map(|b| b.0.clone()).collect();
    let held = ctx.coord.stream_files(&ctx.asset, WAL_STREAM, &names).await?;
    let mut out = PushOutcome { pushed: Vec::new(), already: Vec::new() };
    let mut todo = Vec::new();
    // Only names the archive holds are hashed here (to compare); the others are hashed as
    // they are uploaded, so a file is read once.
    for (n, p) in batch {
        match held.iter().find(|h| h.path == n) {
            None => todo.push((n, p)),
            Some(h) => {
                let sha = match sha256_file(&p) {
                    Ok((sha, _)) => sha,
                    Err(e) if n == name => return Err(e),
                    // A ready file archived and removed meanwhile: only the requested one matters.
                    Err(_) => continue,
                };
                if h.sha256 == sha {
                    out.already.push(n);
                } else if n == name {
                    return Err(failed(format!(
                        "{n} is already archived in {} with different content (archived sha256 {}, local {sha}, entry {}): \
                         refusing to overwrite it. Two servers may be archiving into one asset; check which is the primary",
                        ctx.asset, h.sha256, h.snapshot_id
                    )));
                }
                // A pushed-ahead conflict is reported when PostgreSQL asks for that file.
            }
        }
    }
    // What was uploaded, with the SHA-256 of the bytes read.
    let mut uploaded: Vec<(String, String)> = Vec::new();
    let mut files: Vec<(String, std::fs::File)> = Vec::new();
    for (n, p) in &todo {
        match std::fs::File::open(p) {
            Ok(f) => files.push((n.clone(), f)),
            // A ready file archived and removed meanwhile: only the requested one matters.
            Err(_) if *n != name => {}
            Err(e) => return Err(SourceError::io(format!("opening {}", p.display()))(e)),
        }
    }
    if !files.is_empty() {
        let sent: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
        let opts = PipelineOptions { fetch_previous: false, quiet: true, ..ctx.args.pipeline() };
        let mut sink = BackupSink::begin(&ctx.coord, &ctx.keyring, &ctx.asset, "postgres", opts).await?;
        if let Err(e) = sink.add_files_cut(files, Cut::Content).await {
            sink.abort(&e.to_string()).await;
            return Err(e);
        }
        uploaded = sink.files().iter().map(|f| (f.path.clone(), f.sha256.clone())).collect();
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("stream".into(), json!(WAL_STREAM));
        meta.insert("files".into(), json!(sent));
        sink.commit(&ctx.identity, meta).await?;
        out.pushed.extend(sent);
    }
    // Markers for what was archived ahead of PostgreSQL's request: the SHA-256 of what the
    // archive holds, which the file must still have when PostgreSQL asks for it.
    let marker_dir = wal_dir.join(PUSHED_DIR);
    for n in out.pushed.iter().chain(&out.already).filter(|n| **n != name) {
        let Some(sha) = held
            .iter()
            .find(|h| &h.path == n)
            .map(|h| h.sha256.clone())
            .or_else(|| uploaded.iter().find(|u| &u.0 == n).map(|u| u.1.clone()))
        else {
            continue;
        };
        if std::fs::create_dir_all(&marker_dir).is_ok() {
            let _ = std::fs::write(marker_dir.join(n), sha);
        }
    }
    Ok(out)
}

/// Why wal-fetch did not deliver a file.
pub enum FetchError {
    /// The archive does not hold it (exit 1: the end of the archive for recovery).
    NotFound(String),
    /// Anything else (exit 126: recovery must stop, not end early).
    Failed(SourceError),
}

impl From<SourceError> for FetchError {
    fn from(e: SourceError) -> Self {
        FetchError::Failed(e)
    }
}

impl From<coffer_common::runtime::ClientError> for FetchError {
    fn from(e: coffer_common::runtime::ClientError) -> Self {
        FetchError::Failed(e.into())
    }
}

/// Takes a file prefetched by an earlier wal-fetch, if there is one.
pub fn take_prefetched(name: &str, dest: &Path) -> bool {
    let Some(dir) = dest.parent() else { return false };
    let p = dir.join(PREFETCH_DIR).join(name);
    p.is_file() && std::fs::rename(&p, dest).is_ok()
}

/// Fetches `name` into `dest`, and the next `prefetch` segments into the prefetch directory.
pub async fn fetch(ctx: &AgentContext, name: &str, dest: &Path, prefetch: usize) -> Result<(), FetchError> {
    let seg_size = 16u64 << 20;
    let mut names = vec![name.to_string()];
    if let Some(WalFile::Segment { timeline, segno }) = wal::parse_name(name, seg_size) {
        names.extend((1..=prefetch as u64).map(|i| wal::segment_name(timeline, segno + i, seg_size)));
    }
    let held = ctx.coord.stream_files(&ctx.asset, WAL_STREAM, &names).await?;
    let Some(first) = held.iter().find(|h| h.path == name) else {
        return Err(FetchError::NotFound(format!("{name} is not in the archive of {}", ctx.asset)));
    };
    let dir = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let prefetch_dir = dir.join(PREFETCH_DIR);
    // Group by the entry that holds each file; the requested file's entry first.
    let mut entries: Vec<String> = vec![first.snapshot_id.clone()];
    for h in &held {
        if !entries.contains(&h.snapshot_id) {
            entries.push(h.snapshot_id.clone());
        }
    }
    for (i, entry) in entries.iter().enumerate() {
        let reader =
            SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, entry, ctx.args.restore_options()).await?;
        let mut files = Vec::new();
        for h in held.iter().filter(|h| &h.snapshot_id == entry) {
            if h.path == name {
                files.push((h.path.clone(), tmp_path(dest)));
            } else if !prefetch_dir.join(&h.path).exists() {
                files.push((h.path.clone(), prefetch_dir.join(format!("{}.tmp", h.path))));
            }
        }
        for (_, p) in &files {
            let _ = std::fs::remove_file(p);
        }
        let fetched = reader.restore_files(&files).await;
        reader.finish();
        match fetched {
            Ok(()) => {}
            // Prefetching is best effort; the requested file is not.
            Err(e) if i > 0 => {
                tracing::debug!("prefetch failed: {e}");
                continue;
            }
            Err(e) => return Err(FetchError::Failed(e.into())),
        }
        for (n, p) in files {
            let final_path = if n == name { dest.to_path_buf() } else { prefetch_dir.join(&n) };
            std::fs::rename(&p, &final_path)
                .map_err(|e| FetchError::Failed(SourceError::io(format!("placing {}", final_path.display()))(e)))?;
        }
    }
    Ok(())
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_os_string();
    s.push(".coffer-tmp");
    PathBuf::from(s)
}

/// Removes prefetched segments older than `name` (recovery has passed them).
pub fn trim_prefetch(dest: &Path, name: &str) {
    let Some(dir) = dest.parent().map(|d| d.join(PREFETCH_DIR)) else { return };
    let Ok(rd) = std::fs::read_dir(&dir) else { return };
    for e in rd.filter_map(Result::ok) {
        if let Some(n) = e.file_name().to_str()
            && (n.ends_with(".tmp") || (n.len() == 24 && n < name))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_segments_lists_history_first_and_skips_the_requested_one() {
        let d = tempfile::tempdir().unwrap();
        let wal = d.path();
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        for n in
            ["000000010000000000000003", "000000010000000000000002", "00000002.history", "000000010000000000000004"]
        {
            std::fs::write(wal.join(n), b"x").unwrap();
            std::fs::write(wal.join("archive_status").join(format!("{n}.ready")), b"").unwrap();
        }
        // Marked ready but already gone.
        std::fs::write(wal.join("archive_status").join("000000010000000000000009.ready"), b"").unwrap();
        std::fs::write(wal.join("archive_status").join("000000010000000000000001.done"), b"").unwrap();
        assert_eq!(
            ready_segments(wal, "000000010000000000000002", 2),
            ["00000002.history", "000000010000000000000003"]
        );
    }

    #[test]
    fn markers_answer_only_for_the_same_content() {
        let d = tempfile::tempdir().unwrap();
        let seg = d.path().join("000000010000000000000002");
        std::fs::write(&seg, b"wal bytes").unwrap();
        std::fs::create_dir_all(d.path().join(PUSHED_DIR)).unwrap();
        let (sha, _) = sha256_file(&seg).unwrap();
        std::fs::write(d.path().join(PUSHED_DIR).join("000000010000000000000002"), &sha).unwrap();
        assert!(pushed_already(&seg).unwrap());
        assert!(!pushed_already(&seg).unwrap(), "a marker is used once");
        std::fs::write(d.path().join(PUSHED_DIR).join("000000010000000000000002"), "0".repeat(64)).unwrap();
        assert!(!pushed_already(&seg).unwrap(), "a marker for other content is not trusted");
    }
}
