//! Base backups: the non-exclusive low-level API in one session, the data directory read
//! directly (relation files cut in page-aligned blocks, so a daily base backup uploads only
//! the blocks that changed), and restore into a data directory set up for archive recovery.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_common::chunker::Cut;
use coffer_common::manifest::Manifest;
use coffer_common::runtime::direct::DirectReader;
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use serde_json::{Value, json};

use crate::pg;
use crate::recovery::{self, RecoveryTarget};
use coffer_common::pgwal::{self as wal, Lsn};

/// Directories whose contents PostgreSQL documents as safe to leave out of a base backup
/// (they are recreated or rebuilt at start-up); the directories themselves are kept.
const EMPTY_DIRS: &[&str] =
    &["pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_stat_tmp", "pg_subtrans"];

/// Files never copied: the running server's lock and options, relcache init files, labels
/// of other backups, and recovery signals (restore writes its own).
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "pg_internal.init",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "recovery.signal",
    "standby.signal",
    recovery::RESTORE_CONFIG,
];

pub struct PgSource {
    /// Connection string for the server.
    pub conn: Option<String>,
    /// Data directory (default: what the server reports).
    pub pgdata: Option<PathBuf>,
    pub fast_checkpoint: bool,
    /// Large files are read `O_DIRECT` (see `LazyFile`); off: through the page cache.
    pub direct_reads: bool,
    /// Block size relation files are cut into.
    pub block_size: u32,
    /// How a restore sets up recovery.
    pub recovery: RecoveryTarget,
    /// The agent's own flags, written into the restored server's `restore_command`.
    pub restore_config: Option<recovery::RestoreConfig>,
}

impl PgSource {
    fn conn(&self) -> Result<&str, SourceError> {
        self.conn.as_deref().ok_or_else(|| {
            SourceError::Failed("--pg-conn is required (e.g. \"host=/run/postgresql user=postgres\")".into())
        })
    }
}

/// How long a base backup waits for its stop segment to reach the archive.
const ARCHIVE_WAIT: Duration = Duration::from_secs(600);

/// Polls the coordinator until it holds `segment`: quickly at first (the archiver usually
/// pushes it within a few hundred milliseconds), then once a second, saying so every
/// half minute; fails after [`ARCHIVE_WAIT`] naming the likely cause.
async fn wait_for_archived(sink: &BackupSink, segment: &str, stop_lsn: &str) -> Result<(), SourceError> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(25);
    let mut said = started;
    loop {
        let held = sink
            .coordinator()
            .stream_files(sink.asset(), crate::WAL_STREAM, std::slice::from_ref(&segment.to_string()))
            .await?;
        if !held.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= ARCHIVE_WAIT {
            return Err(failed(format!(
                "WAL segment {segment} (holding the backup's stop LSN {stop_lsn}) was not archived in {} within {}s: \
                 is archive_command set to 'agent-postgres wal-push %p' for this asset, and does it succeed \
                 (PostgreSQL's log says)?",
                sink.asset(),
                ARCHIVE_WAIT.as_secs()
            )));
        }
        if said.elapsed() >= Duration::from_secs(30) {
            tracing::warn!(segment, waited_s = started.elapsed().as_secs(), "still waiting for the archiver");
            said = tokio::time::Instant::now();
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

fn failed(e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(e.to_string())
}

/// One file to copy: its path in the snapshot and on disk.
struct Entry {
    rel: String,
    path: PathBuf,
    relation: bool,
}

/// Reads a file opened on first read; a file removed since the walk reads as empty (WAL
/// replay removes or rewrites it). Large files (relation segments) are read `O_DIRECT`:
/// the backup neither pays for copying them through the page cache nor evicts the
/// server's cached pages (`DirectReader`).
struct LazyFile {
    path: PathBuf,
    file: Option<DirectReader>,
    gone: bool,
    direct: bool,
}

impl Read for LazyFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.gone {
            return Ok(0);
        }
        if self.file.is_none() {
            match DirectReader::open(&self.path, self.direct) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.gone = true;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
        match self.file.as_mut().expect("opened above").read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            r => r,
        }
    }
}

/// Whether a file name is a relation fork (`12345`, `12345.2`, `12345_fsm`, `12345_vm`,
/// `12345_init`) and its relfilenode.
fn relation_node(name: &str) -> Option<&str> {
    let end = name.find(|c: char| !c.is_ascii_digit()).unwrap_or(name.len());
    (end > 0 && (end == name.len() || name[end..].starts_with('.') || name[end..].starts_with('_')))
        .then(|| &name[..end])
}

#[derive(Default)]
struct Walk {
    files: Vec<Entry>,
    dirs: Vec<String>,
}

/// Walks `dir` (shown as `rel` in the snapshot).
fn walk(dir: &Path, rel: &str, out: &mut Walk, top: bool) -> Result<(), SourceError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // A database directory dropped while we walk.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(SourceError::io(format!("reading {}", dir.display()))(e)),
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    // Unlogged relations: only their init fork is copied (the rest is reset at start-up).
    let unlogged: HashSet<String> = entries
        .iter()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix("_init")).map(str::to_string))
        .collect();
    let in_relation_dir = rel.starts_with("base/") || rel == "global" || rel.starts_with("pg_tblspc/");
    for e in entries {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            return Err(failed(format!("{}: file name is not UTF-8", e.path().display())));
        };
        let child_rel = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if name.starts_with("pgsql_tmp") || SKIP_FILES.contains(&name.as_str()) {
            continue;
        }
        let path = e.path();
        // Follows symlinks (tablespaces under pg_tblspc, a relocated pg_wal).
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SourceError::io(format!("reading {}", path.display()))(e)),
        };
        if meta.is_dir() {
            out.dirs.push(child_rel.clone());
            if top && EMPTY_DIRS.contains(&name.as_str()) {
                if name == "pg_wal" {
                    out.dirs.push("pg_wal/archive_status".into());
                }
                continue;
            }
            walk(&path, &child_rel, out, false)?;
        } else if meta.is_file() {
            let node = in_relation_dir.then(|| relation_node(&name)).flatten();
            if let Some(n) = node
                && unlogged.contains(n)
                && !name.ends_with("_init")
            {
                continue;
            }
            out.files.push(Entry { rel: child_rel, path, relation: node.is_some() });
        }
    }
    Ok(())
}

/// True when `chunk` starts with a PostgreSQL page (layout version 4, 8 KiB) that has a
/// special space: index access methods keep their per-page data there (B-tree, hash, GiST,
/// SP-GiST, GIN, BRIN); heap pages have none (`pd_special` is the page size).
fn starts_with_special_space_page(chunk: &[u8]) -> bool {
    const PAGE: u16 = 8192;
    if chunk.len() < PAGE as usize {
        return false;
    }
    let u16_at = |i: usize| u16::from_le_bytes([chunk[i], chunk[i + 1]]);
    let (lower, upper, special, size_version) = (u16_at(12), u16_at(14), u16_at(16), u16_at(18));
    size_version == PAGE | 4 && special < PAGE && 24 <= lower && lower <= upper && upper <= special
}

/// The zstd level for a relation block: at least 4 for index pages.
fn index_level(chunk: &[u8], level: i32) -> i32 {
    if starts_with_special_space_page(chunk) { level.max(4) } else { level }
}

impl PgSource {
    /// [`Source::restore`] into a prepared `target`, tablespaces under `tablespace_root`.
    async fn restore_into(
        &self,
        reader: &SnapshotReader,
        target: &Path,
        tablespace_root: &Path,
    ) -> Result<(), SourceError> {
        let m = reader.manifest();
        let str_list = |k: &str| -> Vec<String> {
            m.source
                .get(k)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let tablespaces: Vec<String> = m
            .source
            .get("tablespaces")
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        // pg_tblspc/<oid>/... lands in <target>.tablespaces/<oid>/..., linked from pg_tblspc.
        let place = |rel: &str| -> PathBuf {
            for oid in &tablespaces {
                let prefix = format!("pg_tblspc/{oid}");
                if rel == prefix {
                    return tablespace_root.join(oid);
                }
                if let Some(rest) = rel.strip_prefix(&format!("{prefix}/")) {
                    return tablespace_root.join(oid).join(rest);
                }
            }
            target.join(rel)
        };
        for d in str_list("dirs") {
            if !coffer_common::manifest::is_safe_relative_path(&d) {
                return Err(failed(format!("manifest names an unsafe directory {d:?}")));
            }
            let p = place(&d);
            std::fs::create_dir_all(&p).map_err(SourceError::io(format!("creating {}", p.display())))?;
        }
        for oid in &tablespaces {
            let link = target.join("pg_tblspc").join(oid);
            let dest = tablespace_root.join(oid);
            std::fs::create_dir_all(&dest).map_err(SourceError::io(format!("creating {}", dest.display())))?;
            if link.is_dir() && !link.is_symlink() {
                std::fs::remove_dir(&link).map_err(SourceError::io(format!("replacing {}", link.display())))?;
            }
            std::os::unix::fs::symlink(&dest, &link).map_err(SourceError::io(format!("linking {}", link.display())))?;
        }
        let files: Vec<(String, PathBuf)> = m.files.iter().map(|f| (f.path.clone(), place(&f.path))).collect();
        reader.restore_files(&files).await?;
        recovery::write_recovery(target, m, &self.recovery, self.restore_config.as_ref())?;
        Ok(())
    }
}

impl Source for PgSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// Level 3: B-tree indexes store 30% less than at level 1 (pgbench's accounts index:
    /// 3.9 MB instead of 5.4 MB in 256 KiB blocks) for about twice the compression CPU.
    fn compression_level(&self) -> i32 {
        3
    }

    /// Index pages one level higher (4): measured on pgbench's accounts index in 256 KiB
    /// blocks, level 4 stores 8% less than level 3, while heap pages gain 3% for the same
    /// extra CPU, so they stay at 3.
    fn chunk_level(&self) -> Option<coffer_common::runtime::backup::ChunkLevel> {
        Some(index_level)
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let s = pg::connect(self.conn()?).await.map_err(failed)?;
        let info = s.info().await.map_err(failed)?;
        let mut details = BTreeMap::new();
        details.insert("system_identifier".into(), info.system_identifier.clone());
        details.insert("archive_mode".into(), info.archive_mode.clone());
        Ok(Probe { description: format!("PostgreSQL {} at {}", info.version, info.data_directory), details })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let session = pg::connect(self.conn()?).await.map_err(failed)?;
        let info = session.info().await.map_err(failed)?;
        if info.in_recovery {
            return Err(failed("the server is a standby; take base backups from the primary"));
        }
        if info.archive_mode == "off" {
            return Err(failed(
                "archive_mode is off: a base backup is restorable only with the WAL written during it; \
                 set archive_mode = on and archive_command = 'agent-postgres wal-push %p'",
            ));
        }
        let pgdata = self.pgdata.clone().unwrap_or_else(|| PathBuf::from(&info.data_directory));
        if !pgdata.join("PG_VERSION").is_file() {
            return Err(failed(format!(
                "{} is not a PostgreSQL data directory this agent can read (no PG_VERSION); the agent must run beside the server",
                pgdata.display()
            )));
        }
        let tablespaces = session.tablespaces().await.map_err(failed)?;
        let label = format!("coffer {}", sink.snapshot_id());
        let (start_lsn, timeline) = session.backup_start(&info, &label, self.fast_checkpoint).await.map_err(failed)?;
        tracing::info!(%start_lsn, timeline, checkpoint = if self.fast_checkpoint { "fast" } else { "spread" }, "base backup started");

        let root = pgdata.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let mut w = Walk::default();
            walk(&root, "", &mut w, true).map(|()| w)
        })
        .await
        .map_err(failed)??;
        let (relations, others): (Vec<Entry>, Vec<Entry>) = walked.files.into_iter().partition(|e| e.relation);
        let lazy = |v: Vec<Entry>| -> Vec<(String, LazyFile)> {
            v.into_iter()
                .map(|e| (e.rel, LazyFile { path: e.path, file: None, gone: false, direct: self.direct_reads }))
                .collect()
        };
        sink.add_files_cut(lazy(others), Cut::Content).await?;
        sink.add_files_cut(lazy(relations), Cut::Fixed(self.block_size)).await?;

        let (stop_lsn, backup_label, tablespace_map) = session.backup_stop(&info).await.map_err(failed)?;
        let stop_time = coffer_common::time::rfc3339(coffer_common::time::now());
        sink.add_bytes("backup_label", backup_label.clone().into_bytes()).await?;

        let seg = info.wal_segment_size;
        let (start, stop) = (
            Lsn::parse(&start_lsn).ok_or_else(|| failed(format!("start LSN {start_lsn:?}")))?,
            Lsn::parse(&stop_lsn).ok_or_else(|| failed(format!("stop LSN {stop_lsn:?}")))?,
        );
        let stop_wal = wal::segment_name(timeline, stop.segment(seg), seg);
        // The backup is complete only once the coordinator holds the segment with the stop
        // LSN (the archiver pushes it after the switch pg_backup_stop made).
        wait_for_archived(sink, &stop_wal, &stop_lsn).await?;
        let mut meta = BTreeMap::new();
        meta.insert("pg_version".into(), json!(info.version));
        meta.insert("pg_version_num".into(), json!(info.version_num));
        meta.insert("system_identifier".into(), json!(info.system_identifier));
        meta.insert("timeline".into(), json!(timeline));
        meta.insert("start_lsn".into(), json!(start_lsn));
        meta.insert("stop_lsn".into(), json!(stop_lsn));
        meta.insert("start_wal".into(), json!(wal::segment_name(timeline, start.segment(seg), seg)));
        meta.insert("stop_wal".into(), json!(stop_wal));
        meta.insert("stop_time".into(), json!(stop_time));
        meta.insert("label".into(), json!(label));
        meta.insert("backup_label".into(), json!(backup_label));
        meta.insert("tablespace_map".into(), json!(tablespace_map));
        meta.insert("tablespaces".into(), json!(tablespaces.into_iter().collect::<BTreeMap<_, _>>()));
        meta.insert("checkpoint".into(), json!(if self.fast_checkpoint { "fast" } else { "spread" }));
        meta.insert("data_directory".into(), json!(pgdata.display().to_string()));
        meta.insert("wal_segment_size".into(), json!(seg));
        meta.insert("block_size".into(), json!(info.block_size));
        meta.insert("relation_chunks".into(), json!(format!("fixed {} bytes", self.block_size)));
        meta.insert("dirs".into(), json!(walked.dirs));
        tracing::info!(%stop_lsn, %stop_wal, "base backup stopped");
        Ok(meta)
    }

    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        let m = reader.manifest();
        if m.source.contains_key("stream") {
            return Err(failed(format!("{} is a WAL stream entry, not a base backup", m.snapshot)));
        }
        recovery::prepare_target(target)?;
        // Tablespaces land beside the target; if that directory is this restore's, a failed
        // restore takes it away as the caller takes away the target.
        let tablespace_root = recovery::tablespace_root(target);
        let ours = !tablespace_root.exists();
        let restored = self.restore_into(reader, target, &tablespace_root).await;
        if restored.is_err()
            && ours
            && tablespace_root.exists()
            && let Err(e) = std::fs::remove_dir_all(&tablespace_root)
        {
            tracing::warn!("could not remove the partial restore's {}: {e}", tablespace_root.display());
        }
        restored
    }

    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let mut r = VerifyReport { ok: true, ..Default::default() };
        let version = std::fs::read_to_string(target.join("PG_VERSION")).unwrap_or_default();
        let want = manifest.source.get("pg_version_num").and_then(Value::as_i64).unwrap_or(0) / 10_000;
        if version.trim() == want.to_string() {
            r.checks.push(format!("PG_VERSION is {want}"));
        } else {
            r.ok = false;
            r.problems.push(format!("PG_VERSION is {:?}, the backup was of PostgreSQL {want}", version.trim()));
        }
        for f in ["backup_label", "recovery.signal", "global/pg_control"] {
            if target.join(f).is_file() {
                r.checks.push(format!("{f} present"));
            } else {
                r.ok = false;
                r.problems.push(format!("{f} is missing"));
            }
        }
        r.checks.push(format!("{} files restored, each matching its SHA-256", manifest.files.len()));
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_are_recognised() {
        assert_eq!(relation_node("16384"), Some("16384"));
        assert_eq!(relation_node("16384.12"), Some("16384"));
        assert_eq!(relation_node("16384_fsm"), Some("16384"));
        assert_eq!(relation_node("16384_init"), Some("16384"));
        assert_eq!(relation_node("PG_VERSION"), None);
        assert_eq!(relation_node("pg_filenode.map"), None);
        assert_eq!(relation_node("1x"), None);
    }

    /// A page header as PostgreSQL writes it: lower, upper, special, size and version 4.
    fn page(lower: u16, upper: u16, special: u16) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        for (at, v) in [(12, lower), (14, upper), (16, special), (18, 8192 | 4)] {
            p[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    #[test]
    fn index_pages_get_the_higher_level() {
        let level = index_level;
        let btree = page(400, 1000, 8192 - 16);
        let heap = page(400, 1000, 8192);
        assert_eq!(level(&btree, 3), 4);
        assert_eq!(level(&[btree.clone(), heap.clone()].concat(), 3), 4, "the block's first page decides");
        assert_eq!(level(&heap, 3), 3);
        assert_eq!(level(&btree, 6), 6, "never lower");
        assert_eq!(level(&btree[..4096], 3), 3, "shorter than a page");
        assert_eq!(level(&vec![0u8; 8192], 3), 3, "a zeroed page");
        assert_eq!(level(&page(400, 300, 8176), 3), 3, "lower past upper is not a page");
        let mut old_layout = btree.clone();
        old_layout[18..20].copy_from_slice(&(8192u16 | 3).to_le_bytes());
        assert_eq!(level(&old_layout, 3), 3);
    }

    #[test]
    fn walk_skips_what_postgres_rebuilds_and_unlogged_relations() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in ["base/5", "global", "pg_wal/archive_status", "pg_stat_tmp", "pg_tblspc"] {
            std::fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "base/5/100",
            "base/5/100_vm",
            "base/5/200",
            "base/5/200_init",
            "base/5/200_fsm",
            "base/5/pg_internal.init",
            "base/5/pgsql_tmp123",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        let mut w = Walk::default();
        walk(p, "", &mut w, true).unwrap();
        let files: Vec<(&str, bool)> = w.files.iter().map(|e| (e.rel.as_str(), e.relation)).collect();
        assert_eq!(
            files,
            [
                ("PG_VERSION", false),
                ("base/5/100", true),
                ("base/5/100_vm", true),
                ("base/5/200_init", true),
                ("global/pg_control", false),
            ]
        );
        for d in ["base", "base/5", "global", "pg_wal", "pg_wal/archive_status", "pg_stat_tmp", "pg_tblspc"] {
            assert!(w.dirs.iter().any(|x| x == d), "{d} missing from {:?}", w.dirs);
        }
    }
}
