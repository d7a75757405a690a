//! The catalog: assets, agents, packs, chunk locations, backups in flight and snapshots, in
//! SQLite (WAL, synchronous=FULL). It is a cache of the repository: everything in it can be
//! rebuilt from the repository's files (see `server::reconcile`). Queries are plain SQL kept
//! close to what PostgreSQL accepts (placeholders and `WITHOUT ROWID` aside), so a shared
//! catalog can follow behind the same methods.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use coffer_common::crypto::ChunkId;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::store::pack::{Entry, SealedPack};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS assets (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS agents (
        name TEXT PRIMARY KEY,
        signing_key TEXT NOT NULL,
        age_recipient TEXT NOT NULL,
        version TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS packs (
        id TEXT PRIMARY KEY,
        asset_id INTEGER NOT NULL REFERENCES assets(id),
        size INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chunks (
        asset_id INTEGER NOT NULL,
        id BLOB NOT NULL,
        pack_id TEXT NOT NULL REFERENCES packs(id),
        off INTEGER NOT NULL,
        length INTEGER NOT NULL,
        crc INTEGER NOT NULL,
        PRIMARY KEY (asset_id, id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack_id)",
    "CREATE TABLE IF NOT EXISTS backups (
        snapshot_id TEXT PRIMARY KEY,
        asset_id INTEGER NOT NULL REFERENCES assets(id),
        agent TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        state TEXT NOT NULL,
        bytes_stored INTEGER NOT NULL DEFAULT 0,
        error TEXT)",
    "CREATE TABLE IF NOT EXISTS snapshots (
        id TEXT PRIMARY KEY,
        asset_id INTEGER NOT NULL REFERENCES assets(id),
        kind TEXT NOT NULL,
        agent TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        finished_at INTEGER NOT NULL,
        size INTEGER NOT NULL,
        new_bytes INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        files INTEGER NOT NULL,
        committed_at INTEGER NOT NULL,
        stream TEXT NOT NULL DEFAULT '')",
    "CREATE INDEX IF NOT EXISTS snapshots_asset ON snapshots(asset_id, id)",
    // Files of stream entries (Postgres WAL segments, ...) by name: one row per name, the
    // first entry that held it. A name never changes content (commit refuses that).
    "CREATE TABLE IF NOT EXISTS stream_files (
        asset_id INTEGER NOT NULL,
        stream TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        snapshot_id TEXT NOT NULL,
        committed_at INTEGER NOT NULL,
        PRIMARY KEY (asset_id, stream, path)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS stream_files_snapshot ON stream_files(snapshot_id)",
    // One row per backup attempt: triggered by the scheduler or an operator (job id from
    // the coordinator) or started by the agent on its own (job id = snapshot id).
    "CREATE TABLE IF NOT EXISTS attempts (
        job_id TEXT PRIMARY KEY,
        asset TEXT NOT NULL,
        agent TEXT NOT NULL,
        trigger TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        outcome TEXT NOT NULL,
        snapshot_id TEXT,
        error TEXT)",
    "CREATE INDEX IF NOT EXISTS attempts_asset ON attempts(asset, started_ms)",
    "CREATE INDEX IF NOT EXISTS attempts_snapshot ON attempts(snapshot_id)",
    // Objects to delete from copy targets (pruned locally), not before their Object Lock
    // retain-until date.
    "CREATE TABLE IF NOT EXISTS remote_deletions (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        not_before_ms INTEGER NOT NULL,
        enqueued_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        PRIMARY KEY (target, key))",
    // The replication queue: every object each copy target must hold, and whether it does.
    "CREATE TABLE IF NOT EXISTS replication (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        asset TEXT,
        ord INTEGER NOT NULL,
        enqueued_ms INTEGER NOT NULL,
        done_ms INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        PRIMARY KEY (target, key))",
];

#[derive(Debug, thiserror::Error)]
#[error("catalog: {0}")]
pub struct CatalogError(#[from] sqlx::Error);

type Result<T> = std::result::Result<T, CatalogError>;

/// An object a copy target holds, due for verification: its SHA-256 (hex) and the
/// checksum the store keeps (none for objects uploaded before checksums were recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyToVerify {
    pub key: String,
    pub sha256: Option<String>,
    pub checksum: Option<String>,
}

#[derive(Clone)]
pub struct Catalog {
    pool: SqlitePool,
    asset_ids: std::sync::Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub name: String,
    pub signing_key: String,
    pub age_recipient: String,
}

#[derive(Debug, Clone)]
pub struct BackupRow {
    pub snapshot_id: String,
    pub asset_id: i64,
    pub asset: String,
    pub kind: String,
    pub agent: String,
    pub state: String,
    pub bytes_stored: i64,
}

/// How far one copy target is with one asset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyState {
    pub done: i64,
    pub pending: i64,
    pub oldest_pending_ms: Option<i64>,
    pub last_error: Option<String>,
}

/// A backup attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    pub job_id: String,
    pub asset: String,
    pub agent: String,
    pub trigger: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// `running`, `ok` or `failed`.
    pub outcome: String,
    pub snapshot_id: Option<String>,
    pub error: Option<String>,
}

const ATTEMPT_COLUMNS: &str = "job_id, asset, agent, trigger, started_ms, ended_ms, outcome, snapshot_id, error";

fn attempt_row(r: &sqlx::sqlite::SqliteRow) -> AttemptRow {
    AttemptRow {
        job_id: r.get(0),
        asset: r.get(1),
        agent: r.get(2),
        trigger: r.get(3),
        started_ms: r.get(4),
        ended_ms: r.get(5),
        outcome: r.get(6),
        snapshot_id: r.get(7),
        error: r.get(8),
    }
}

#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub id: String,
    pub asset: String,
    pub kind: String,
    pub agent: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub size: i64,
    pub new_bytes: i64,
    pub chunks: i64,
    pub files: i64,
    /// Empty for a snapshot (recovery point), else the stream this entry belongs to.
    pub stream: String,
}

/// One file of a stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFileRow {
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub snapshot_id: String,
    pub committed_at: i64,
}

/// The stream a manifest belongs to (`source.stream`), or None for a snapshot.
pub fn manifest_stream(m: &coffer_common::manifest::Manifest) -> std::result::Result<Option<String>, String> {
    match m.source.get("stream") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) if is_valid_stream_name(s) => Ok(Some(s.clone())),
        Some(v) => Err(format!("source.stream {v} is not a stream name (lowercase letters, digits, '-', 1-32)")),
    }
}

pub fn is_valid_stream_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl SnapshotRow {
    /// The catalog row of a committed manifest naming `chunks` distinct chunks.
    pub fn from_manifest(m: &coffer_common::manifest::Manifest, chunks: usize, new_bytes: i64) -> SnapshotRow {
        let secs = |t: &str| coffer_common::time::parse_rfc3339(t).map(coffer_common::time::unix_seconds).unwrap_or(0);
        SnapshotRow {
            id: m.snapshot.clone(),
            asset: m.asset.clone(),
            kind: m.kind.clone(),
            agent: m.agent.clone(),
            started_at: secs(&m.started_at),
            finished_at: secs(&m.finished_at),
            size: m.total_size() as i64,
            new_bytes,
            chunks: chunks as i64,
            files: m.files.len() as i64,
            stream: manifest_stream(m).ok().flatten().unwrap_or_default(),
        }
    }

    /// The stream-file rows a committed stream entry adds (none for a snapshot).
    pub fn stream_files(&self, m: &coffer_common::manifest::Manifest) -> Vec<StreamFileRow> {
        if self.stream.is_empty() {
            return Vec::new();
        }
        m.files
            .iter()
            .map(|f| StreamFileRow {
                path: f.path.clone(),
                size: f.size as i64,
                sha256: f.sha256.clone(),
                snapshot_id: self.id.clone(),
                committed_at: now(),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct AssetRow {
    pub id: i64,
    pub name: String,
    pub kind: String,
    pub snapshots: i64,
    pub latest: Option<(String, i64)>,
    pub stored_bytes: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct Location {
    pub entry: Entry,
}

/// What happens to a chunk the catalog already locates in another pack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkConflict {
    /// Keep the existing location (a second copy uploaded by a concurrent backup).
    Keep,
    /// Move it to the new pack (a repack).
    Move,
}

/// The `packs` row of a sealed pack and a `chunks` row per entry.
async fn insert_pack_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    pack: &SealedPack,
    asset_id: i64,
    conflict: ChunkConflict,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO packs (id, asset_id, size, chunks, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&pack.id)
    .bind(asset_id)
    .bind(pack.size as i64)
    .bind(pack.entries.len() as i64)
    .bind(now())
    .execute(&mut **tx)
    .await?;
    let sql = match conflict {
        ChunkConflict::Keep => {
            "INSERT INTO chunks (asset_id, id, pack_id, off, length, crc) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
        }
        ChunkConflict::Move => {
            "INSERT INTO chunks (asset_id, id, pack_id, off, length, crc) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (asset_id, id) DO UPDATE SET pack_id = excluded.pack_id, off = excluded.off,
             length = excluded.length, crc = excluded.crc"
        }
    };
    for e in &pack.entries {
        sqlx::query(sql)
            .bind(asset_id)
            .bind(e.id.0.as_slice())
            .bind(&pack.id)
            .bind(e.offset as i64)
            .bind(e.length as i64)
            .bind(e.crc as i64)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn now() -> i64 {
    coffer_common::time::unix_seconds(coffer_common::time::now())
}

fn now_ms() -> i64 {
    crate::scheduler::system_now_ms()
}

const SNAPSHOT_COLUMNS: &str = "s.id, a.name AS asset, s.kind, s.agent, s.started_at, s.finished_at, s.size, s.new_bytes, \
                                s.chunks, s.files, s.stream";

fn snapshot_row(r: &sqlx::sqlite::SqliteRow) -> SnapshotRow {
    SnapshotRow {
        id: r.get("id"),
        asset: r.get("asset"),
        kind: r.get("kind"),
        agent: r.get("agent"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        size: r.get("size"),
        new_bytes: r.get("new_bytes"),
        chunks: r.get("chunks"),
        files: r.get("files"),
        stream: r.get("stream"),
    }
}

impl Catalog {
    pub async fn open(path: &Path) -> Result<Catalog> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        // Catalogs created before streams existed.
        let has_stream = sqlx::query("SELECT 1 FROM pragma_table_info('snapshots') WHERE name = 'stream'")
            .fetch_optional(&pool)
            .await?
            .is_some();
        if !has_stream {
            sqlx::query("ALTER TABLE snapshots ADD COLUMN stream TEXT NOT NULL DEFAULT ''").execute(&pool).await?;
        }
        // Copy verification columns (catalogs from before it).
        // `checksum`: what the store keeps (composite for multipart); `next_try_ms`: backoff
        // of an object the store refused.
        for (col, ty) in [
            ("sha256", "TEXT"),
            ("verified_ms", "INTEGER"),
            ("verify_error", "TEXT"),
            ("checksum", "TEXT"),
            ("next_try_ms", "INTEGER"),
        ] {
            let has = sqlx::query("SELECT 1 FROM pragma_table_info('replication') WHERE name = ?")
                .bind(col)
                .fetch_optional(&pool)
                .await?
                .is_some();
            if !has {
                sqlx::query(&format!("ALTER TABLE replication ADD COLUMN {col} {ty}")).execute(&pool).await?;
            }
        }
        // Packs kept only in copy targets (catalogs from before that).
        let has_remote = sqlx::query("SELECT 1 FROM pragma_table_info('packs') WHERE name = 'remote_ms'")
            .fetch_optional(&pool)
            .await?
            .is_some();
        if !has_remote {
            sqlx::query("ALTER TABLE packs ADD COLUMN remote_ms INTEGER").execute(&pool).await?;
        }
        Ok(Catalog { pool, asset_ids: Default::default() })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn ensure_asset(&self, name: &str, kind: &str) -> Result<i64> {
        sqlx::query("INSERT INTO assets (name, kind, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(kind)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query("SELECT id FROM assets WHERE name = ?").bind(name).fetch_one(&self.pool).await?.get(0))
    }

    /// The catalog id of asset `name`. Assets are never removed, so ids are remembered:
    /// every DownloadChunks and FindMissingChunks call asks.
    pub async fn asset_id(&self, name: &str) -> Result<Option<i64>> {
        if let Some(id) = self.asset_ids.lock().expect("asset id cache").get(name) {
            return Ok(Some(*id));
        }
        let id: Option<i64> = sqlx::query("SELECT id FROM assets WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0));
        if let Some(id) = id {
            self.asset_ids.lock().expect("asset id cache").insert(name.to_string(), id);
        }
        Ok(id)
    }

    pub async fn agent(&self, name: &str) -> Result<Option<AgentRow>> {
        Ok(sqlx::query("SELECT name, signing_key, age_recipient FROM agents WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| AgentRow { name: r.get(0), signing_key: r.get(1), age_recipient: r.get(2) }))
    }

    pub async fn upsert_agent(&self, name: &str, signing_key: &str, recipient: &str, version: &str) -> Result<()> {
        let t = now();
        sqlx::query(
            "INSERT INTO agents (name, signing_key, age_recipient, version, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET signing_key = excluded.signing_key, age_recipient = excluded.age_recipient,
                version = excluded.version, last_seen = excluded.last_seen",
        )
        .bind(name)
        .bind(signing_key)
        .bind(recipient)
        .bind(version)
        .bind(t)
        .bind(t)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn begin_backup(&self, snapshot: &str, asset_id: i64, agent: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO backups (snapshot_id, asset_id, agent, started_at, state) VALUES (?, ?, ?, ?, 'open')",
        )
        .bind(snapshot)
        .bind(asset_id)
        .bind(agent)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn backup(&self, snapshot: &str) -> Result<Option<BackupRow>> {
        Ok(sqlx::query(
            "SELECT b.snapshot_id, b.asset_id, a.name, a.kind, b.agent, b.state, b.bytes_stored
             FROM backups b JOIN assets a ON a.id = b.asset_id WHERE b.snapshot_id = ?",
        )
        .bind(snapshot)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| BackupRow {
            snapshot_id: r.get(0),
            asset_id: r.get(1),
            asset: r.get(2),
            kind: r.get(3),
            agent: r.get(4),
            state: r.get(5),
            bytes_stored: r.get(6),
        }))
    }

    /// Ends an open backup (`aborted`), failing the attempt it carried out.
    pub async fn end_backup(&self, snapshot: &str, state: &str, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE backups SET state = ?, error = ? WHERE snapshot_id = ? AND state = 'open'")
            .bind(state)
            .bind(error)
            .bind(snapshot)
            .execute(&self.pool)
            .await?;
        self.end_attempt_of_snapshot(snapshot, false, error, now_ms()).await
    }

    /// Backups left open by a previous run can never complete: their upload streams died.
    pub async fn abort_open_backups(&self, reason: &str) -> Result<u64> {
        Ok(sqlx::query("UPDATE backups SET state = 'aborted', error = ? WHERE state = 'open'")
            .bind(reason)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Records a sealed pack and its chunks, crediting the stored bytes to `snapshot`. A
    /// chunk the catalog already locates elsewhere keeps that location.
    pub async fn index_pack(&self, pack: &SealedPack, asset_id: i64, snapshot: Option<&str>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_pack_rows(&mut tx, pack, asset_id, ChunkConflict::Keep).await?;
        if let Some(s) = snapshot {
            let stored: u64 = pack.entries.iter().map(|e| e.length as u64).sum();
            sqlx::query("UPDATE backups SET bytes_stored = bytes_stored + ? WHERE snapshot_id = ?")
                .bind(stored as i64)
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records that `target` must hold `key` (no-op if already recorded).
    pub async fn enqueue_replication(
        &self,
        target: &str,
        key: &str,
        asset: Option<&str>,
        order: i64,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO replication (target, key, asset, ord, enqueued_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (target, key) DO NOTHING",
        )
        .bind(target)
        .bind(key)
        .bind(asset)
        .bind(order)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every object key recorded for `target` (copied or not).
    pub async fn replication_keys(&self, target: &str) -> Result<std::collections::HashSet<String>> {
        Ok(sqlx::query("SELECT key FROM replication WHERE target = ?")
            .bind(target)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Objects `target` still lacks and may try now, in upload order.
    pub async fn pending_replication(&self, target: &str, now_ms: i64) -> Result<Vec<crate::replicate::RepoObject>> {
        Ok(sqlx::query(
            "SELECT key, asset, ord FROM replication
             WHERE target = ? AND done_ms IS NULL AND (next_try_ms IS NULL OR next_try_ms <= ?) ORDER BY ord, key",
        )
        .bind(target)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| crate::replicate::RepoObject { key: r.get(0), asset: r.get(1), order: r.get(2) })
        .collect())
    }

    /// An object is in the target; `sha256` (hex) is what was sent and `checksum` what the
    /// store keeps for it, for verification.
    pub async fn replication_done(
        &self,
        target: &str,
        key: &str,
        now_ms: i64,
        sha256: Option<&str>,
        checksum: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE replication SET done_ms = ?, attempts = attempts + 1, last_error = NULL, sha256 = ?, checksum = ?,
                    verified_ms = NULL, verify_error = NULL, next_try_ms = NULL
             WHERE target = ? AND key = ?",
        )
        .bind(now_ms)
        .bind(sha256)
        .bind(checksum)
        .bind(target)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Objects a target holds (by the catalog) whose last verification is older than
    /// `due_before_ms` or absent.
    pub async fn copies_to_verify(&self, target: &str, due_before_ms: i64) -> Result<Vec<CopyToVerify>> {
        Ok(sqlx::query(
            "SELECT key, sha256, checksum FROM replication
             WHERE target = ? AND done_ms IS NOT NULL AND (verified_ms IS NULL OR verified_ms < ?) ORDER BY key",
        )
        .bind(target)
        .bind(due_before_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| CopyToVerify { key: r.get(0), sha256: r.get(1), checksum: r.get(2) })
        .collect())
    }

    /// Where a local object about to be deleted must also go away: per target holding (or
    /// queued to hold) it, the earliest time it may be deleted there. With `lock_days`, an
    /// uploaded object's retain-until date is its upload time plus the lock (what the
    /// upload set); a pending one was never confirmed and may go at once.
    pub async fn remote_deletion_plan(&self, key: &str, lock_days: u32, now_ms: i64) -> Result<Vec<(String, i64)>> {
        let lock_ms = i64::from(lock_days) * 86_400_000;
        Ok(sqlx::query("SELECT target, done_ms FROM replication WHERE key = ? ORDER BY target")
            .bind(key)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let done: Option<i64> = r.get(1);
                let not_before = match done {
                    Some(d) if lock_ms > 0 => (d + lock_ms).max(now_ms),
                    _ => now_ms,
                };
                (r.get(0), not_before)
            })
            .collect())
    }

    /// Moves `key` from the replication queue to the deletion queue of every target.
    pub async fn schedule_remote_deletion(&self, key: &str, lock_days: u32, now_ms: i64) -> Result<Vec<(String, i64)>> {
        let plan = self.remote_deletion_plan(key, lock_days, now_ms).await?;
        let mut tx = self.pool.begin().await?;
        for (target, not_before) in &plan {
            sqlx::query(
                "INSERT INTO remote_deletions (target, key, not_before_ms, enqueued_ms) VALUES (?, ?, ?, ?)
                 ON CONFLICT (target, key) DO UPDATE SET not_before_ms = MAX(not_before_ms, excluded.not_before_ms)",
            )
            .bind(target)
            .bind(key)
            .bind(not_before)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM replication WHERE key = ?").bind(key).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(plan)
    }

    /// Deletions due in `target` by `now_ms`.
    pub async fn due_remote_deletions(&self, target: &str, now_ms: i64) -> Result<Vec<String>> {
        Ok(sqlx::query("SELECT key FROM remote_deletions WHERE target = ? AND not_before_ms <= ? ORDER BY key")
            .bind(target)
            .bind(now_ms)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub async fn remote_deletion_done(&self, target: &str, key: &str, error: Option<&str>) -> Result<()> {
        let q = match error {
            None => sqlx::query("DELETE FROM remote_deletions WHERE target = ? AND key = ?").bind(target).bind(key),
            Some(e) => sqlx::query(
                "UPDATE remote_deletions SET attempts = attempts + 1, last_error = ? WHERE target = ? AND key = ?",
            )
            .bind(e)
            .bind(target)
            .bind(key),
        };
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Per target: deletions waiting, and the latest not-before time among them.
    pub async fn remote_deletion_state(&self) -> Result<BTreeMap<String, (i64, i64)>> {
        Ok(sqlx::query("SELECT target, COUNT(*), MAX(not_before_ms) FROM remote_deletions GROUP BY target")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// The SHA-256 (hex) recorded when `key` was uploaded to `target`.
    pub async fn copy_sha256(&self, target: &str, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT sha256 FROM replication WHERE target = ? AND key = ? AND done_ms IS NOT NULL")
            .bind(target)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .and_then(|r| r.get(0)))
    }

    /// The checksum the store keeps for `key` in `target` (the base64 SHA-256 for objects
    /// uploaded before it was recorded separately).
    pub async fn copy_checksum(&self, target: &str, key: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT checksum, sha256 FROM replication WHERE target = ? AND key = ? AND done_ms IS NOT NULL",
        )
        .bind(target)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|r| crate::copyverify::expected_checksum(r.get(0), r.get::<Option<String>, _>(1).as_deref())))
    }

    /// Records a verification. A failed one puts the object back in the queue (the next
    /// replication pass uploads it again from the local copy: repair).
    pub async fn record_verify(&self, target: &str, key: &str, now_ms: i64, error: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE replication SET verified_ms = ?, verify_error = ?,
                    done_ms = CASE WHEN ? IS NULL THEN done_ms ELSE NULL END
             WHERE target = ? AND key = ?",
        )
        .bind(now_ms)
        .bind(error)
        .bind(error)
        .bind(target)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Per target: objects verified, failing verification, and the oldest verification time.
    pub async fn verify_state(&self) -> Result<BTreeMap<String, (i64, i64, Option<i64>)>> {
        Ok(sqlx::query(
            "SELECT target, SUM(verified_ms IS NOT NULL AND verify_error IS NULL), SUM(verify_error IS NOT NULL),
                    MIN(verified_ms)
             FROM replication GROUP BY target",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect())
    }

    /// An upload failed. With `retry_after_ms` (the store refused this object) the next
    /// attempt waits that long doubled per attempt so far, at most five minutes.
    pub async fn replication_failed(
        &self,
        target: &str,
        key: &str,
        error: &str,
        retry_after_ms: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE replication SET attempts = attempts + 1, last_error = ?,
                    next_try_ms = CASE WHEN ? IS NULL THEN NULL
                                       ELSE ? + MIN(? * (1 << MIN(attempts, 16)), 300000) END
             WHERE target = ? AND key = ?",
        )
        .bind(error)
        .bind(retry_after_ms)
        .bind(crate::scheduler::system_now_ms())
        .bind(retry_after_ms)
        .bind(target)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Per target, for one asset: objects done and pending, the oldest pending one's
    /// enqueue time, and the last upload error among pending ones.
    pub async fn replication_state(&self, asset: &str) -> Result<BTreeMap<String, CopyState>> {
        Ok(sqlx::query(
            "SELECT target, SUM(done_ms IS NOT NULL), SUM(done_ms IS NULL),
                    MIN(CASE WHEN done_ms IS NULL THEN enqueued_ms END),
                    MAX(CASE WHEN done_ms IS NULL THEN last_error END)
             FROM replication WHERE asset = ? GROUP BY target",
        )
        .bind(asset)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                CopyState { done: r.get(1), pending: r.get(2), oldest_pending_ms: r.get(3), last_error: r.get(4) },
            )
        })
        .collect())
    }

    /// Per target, an upload error among its pending objects (any asset), if there is one.
    pub async fn target_errors(&self) -> Result<BTreeMap<String, String>> {
        Ok(sqlx::query(
            "SELECT target, MAX(last_error) FROM replication WHERE done_ms IS NULL AND last_error IS NOT NULL GROUP BY target",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    /// Which asset every pack belongs to.
    pub async fn pack_assets(&self) -> Result<BTreeMap<String, String>> {
        Ok(sqlx::query("SELECT p.id, a.name FROM packs p JOIN assets a ON a.id = p.asset_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Forgets a snapshot (its manifest is removed from the repository right after).
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM stream_files WHERE snapshot_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM snapshots WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Packs of an asset created at or before `created_before` (unix seconds) with, for
    /// each, the chunks the catalog locates in it (the copies restores and deduplication
    /// use): (pack id, size, [(chunk id, length)]).
    pub async fn asset_packs(
        &self,
        asset_id: i64,
        created_before: i64,
    ) -> Result<Vec<(String, i64, Vec<(ChunkId, i64)>)>> {
        let packs = sqlx::query("SELECT id, size FROM packs WHERE asset_id = ? AND created_at <= ? ORDER BY id")
            .bind(asset_id)
            .bind(created_before)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(packs.len());
        for p in packs {
            let id: String = p.get(0);
            let chunks = sqlx::query("SELECT id, length FROM chunks WHERE pack_id = ?")
                .bind(&id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .filter_map(|r| {
                    let raw: Vec<u8> = r.get(0);
                    ChunkId::from_slice(&raw).map(|c| (c, r.get::<i64, _>(1)))
                })
                .collect();
            out.push((id, p.get(1), chunks));
        }
        Ok(out)
    }

    /// Forgets a pack and every chunk location in it (the file is removed right after).
    pub async fn delete_pack(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM chunks WHERE pack_id = ?").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM packs WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Points the chunks of a repacked pack at their new copies in `pack` and forgets the
    /// old pack, in one transaction.
    pub async fn replace_pack(&self, old: &str, pack: &SealedPack, asset_id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_pack_rows(&mut tx, pack, asset_id, ChunkConflict::Move).await?;
        sqlx::query("DELETE FROM chunks WHERE pack_id = ?").bind(old).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM packs WHERE id = ?").bind(old).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether any backup of the asset is open.
    pub async fn has_open_backup(&self, asset_id: i64) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM backups WHERE asset_id = ? AND state = 'open' LIMIT 1")
            .bind(asset_id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Open backups of an asset, or of every asset: (snapshot id, started_at).
    pub async fn open_backups(&self, asset_id: Option<i64>) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query(
            "SELECT snapshot_id, started_at FROM backups WHERE state = 'open' AND (?1 IS NULL OR asset_id = ?1)",
        )
        .bind(asset_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    /// Packs whose local file was dropped because the asset's policy keeps them only in
    /// copy targets.
    pub async fn remote_pack_ids(&self) -> Result<std::collections::HashSet<String>> {
        Ok(sqlx::query("SELECT id FROM packs WHERE remote_ms IS NOT NULL")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Whether a pack is kept only in copy targets.
    pub async fn is_remote_pack(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM packs WHERE id = ? AND remote_ms IS NOT NULL")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Records that a pack's local file is (about to be) dropped.
    pub async fn mark_pack_remote(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE packs SET remote_ms = ? WHERE id = ?").bind(now_ms).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Per target recorded for `key`: when it was uploaded (none: pending), when it was
    /// enqueued, and the last upload error.
    pub async fn copy_rows(&self, key: &str) -> Result<BTreeMap<String, (Option<i64>, i64, Option<String>)>> {
        Ok(sqlx::query("SELECT target, done_ms, enqueued_ms, last_error FROM replication WHERE key = ?")
            .bind(key)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect())
    }

    /// Targets holding `key` by the catalog: uploaded, and not failing verification.
    pub async fn copy_holders(&self, key: &str) -> Result<Vec<String>> {
        Ok(sqlx::query(
            "SELECT target FROM replication WHERE key = ? AND done_ms IS NOT NULL AND verify_error IS NULL ORDER BY target",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
    }

    /// Local packs of `asset` that every one of `targets` holds (uploaded, not failing
    /// verification): candidates for dropping the local file.
    pub async fn packs_held_by_all(&self, asset: &str, targets: &[String]) -> Result<Vec<String>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; targets.len()].join(", ");
        let sql = format!(
            "SELECT p.id FROM packs p JOIN assets a ON a.id = p.asset_id
             WHERE a.name = ? AND p.remote_ms IS NULL
               AND (SELECT COUNT(*) FROM replication r
                    WHERE r.key = 'packs/' || substr(p.id, 1, 2) || '/' || p.id || '.pack'
                      AND r.target IN ({marks}) AND r.done_ms IS NOT NULL AND r.verify_error IS NULL) = ?
             ORDER BY p.id"
        );
        let mut q = sqlx::query(&sql).bind(asset);
        for t in targets {
            q = q.bind(t);
        }
        Ok(q.bind(targets.len() as i64).fetch_all(&self.pool).await?.iter().map(|r| r.get(0)).collect())
    }

    pub async fn pack_ids(&self) -> Result<Vec<String>> {
        Ok(sqlx::query("SELECT id FROM packs ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Locations of the given chunks (those the catalog knows).
    pub async fn locate(&self, asset_id: i64, ids: &[ChunkId]) -> Result<HashMap<ChunkId, (String, Entry)>> {
        let mut out = HashMap::with_capacity(ids.len());
        for batch in ids.chunks(500) {
            let marks = vec!["?"; batch.len()].join(",");
            let sql =
                format!("SELECT id, pack_id, off, length, crc FROM chunks WHERE asset_id = ? AND id IN ({marks})");
            let mut q = sqlx::query(&sql).bind(asset_id);
            for id in batch {
                q = q.bind(id.0.as_slice());
            }
            for r in q.fetch_all(&self.pool).await? {
                let raw: Vec<u8> = r.get(0);
                let Some(id) = ChunkId::from_slice(&raw) else { continue };
                let entry = Entry {
                    id,
                    offset: r.get::<i64, _>(2) as u64,
                    length: r.get::<i64, _>(3) as u32,
                    crc: r.get::<i64, _>(4) as u32,
                };
                out.insert(id, (r.get(1), entry));
            }
        }
        Ok(out)
    }

    pub async fn missing(&self, asset_id: i64, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let found = self.locate(asset_id, ids).await?;
        Ok(ids.iter().filter(|id| !found.contains_key(id)).copied().collect())
    }

    /// Records a committed snapshot or stream entry (with its stream files; a name the
    /// stream already holds keeps its first entry).
    pub async fn insert_snapshot(&self, s: &SnapshotRow, asset_id: i64, files: &[StreamFileRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for f in files {
            sqlx::query(
                "INSERT INTO stream_files (asset_id, stream, path, size, sha256, snapshot_id, committed_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(asset_id)
            .bind(&s.stream)
            .bind(&f.path)
            .bind(f.size)
            .bind(&f.sha256)
            .bind(&f.snapshot_id)
            .bind(f.committed_at)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO snapshots (id, asset_id, kind, agent, started_at, finished_at, size, new_bytes, chunks, files, committed_at, stream)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&s.id)
        .bind(asset_id)
        .bind(&s.kind)
        .bind(&s.agent)
        .bind(s.started_at)
        .bind(s.finished_at)
        .bind(s.size)
        .bind(s.new_bytes)
        .bind(s.chunks)
        .bind(s.files)
        .bind(now())
        .bind(&s.stream)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE backups SET state = 'committed' WHERE snapshot_id = ?")
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
        // The attempt this backup carried out succeeded.
        sqlx::query("UPDATE attempts SET outcome = 'ok', ended_ms = ? WHERE snapshot_id = ? AND outcome = 'running'")
            .bind(now_ms())
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>> {
        let sql =
            format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN assets a ON a.id = s.asset_id WHERE s.id = ?");
        Ok(sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await?.as_ref().map(snapshot_row))
    }

    /// Snapshots (`stream` empty) or the entries of one stream, newest first; all assets
    /// when `asset` is None; `limit` 0 means no limit.
    pub async fn snapshots(&self, asset: Option<&str>, stream: &str, limit: u32) -> Result<Vec<SnapshotRow>> {
        let limit = if limit == 0 { i64::MAX } else { limit as i64 };
        let sql = format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN assets a ON a.id = s.asset_id
             WHERE (? IS NULL OR a.name = ?) AND s.stream = ? ORDER BY s.id DESC LIMIT ?"
        );
        Ok(sqlx::query(&sql)
            .bind(asset)
            .bind(asset)
            .bind(stream)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(snapshot_row)
            .collect())
    }

    /// Names of the streams an asset has entries in.
    pub async fn asset_streams(&self, asset_id: i64) -> Result<Vec<String>> {
        Ok(sqlx::query("SELECT DISTINCT stream FROM snapshots WHERE asset_id = ? AND stream != '' ORDER BY stream")
            .bind(asset_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Files of an asset's stream: the named ones (those held), or with no names every file
    /// after `after` in path order, at most `limit`.
    pub async fn stream_files(
        &self,
        asset_id: i64,
        stream: &str,
        paths: &[String],
        after: &str,
        limit: u32,
    ) -> Result<Vec<StreamFileRow>> {
        let row = |r: &sqlx::sqlite::SqliteRow| StreamFileRow {
            path: r.get(0),
            size: r.get(1),
            sha256: r.get(2),
            snapshot_id: r.get(3),
            committed_at: r.get(4),
        };
        const COLS: &str = "path, size, sha256, snapshot_id, committed_at";
        if paths.is_empty() {
            let sql = format!(
                "SELECT {COLS} FROM stream_files WHERE asset_id = ? AND stream = ? AND path > ? ORDER BY path LIMIT ?"
            );
            let rows = sqlx::query(&sql)
                .bind(asset_id)
                .bind(stream)
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            return Ok(rows.iter().map(row).collect());
        }
        let mut out = Vec::new();
        for batch in paths.chunks(500) {
            let marks = vec!["?"; batch.len()].join(",");
            let sql = format!(
                "SELECT {COLS} FROM stream_files WHERE asset_id = ? AND stream = ? AND path IN ({marks}) ORDER BY path"
            );
            let mut q = sqlx::query(&sql).bind(asset_id).bind(stream);
            for p in batch {
                q = q.bind(p);
            }
            out.extend(q.fetch_all(&self.pool).await?.iter().map(row));
        }
        Ok(out)
    }

    pub async fn start_attempt(&self, a: &AttemptRow) -> Result<()> {
        sqlx::query(&format!("INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"))
            .bind(&a.job_id)
            .bind(&a.asset)
            .bind(&a.agent)
            .bind(&a.trigger)
            .bind(a.started_ms)
            .bind(a.ended_ms)
            .bind(&a.outcome)
            .bind(&a.snapshot_id)
            .bind(&a.error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Links a running attempt to the backup that carries it out.
    pub async fn attempt_snapshot(&self, job_id: &str, snapshot: &str) -> Result<bool> {
        Ok(sqlx::query("UPDATE attempts SET snapshot_id = ? WHERE job_id = ? AND outcome = 'running'")
            .bind(snapshot)
            .bind(job_id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    /// Ends a running attempt (by job id); an attempt already ended is left as it is.
    pub async fn end_attempt(&self, job_id: &str, ok: bool, error: Option<&str>, ended_ms: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE attempts SET outcome = ?, error = ?, ended_ms = ? WHERE job_id = ? AND outcome = 'running'",
        )
        .bind(if ok { "ok" } else { "failed" })
        .bind(error)
        .bind(ended_ms)
        .bind(job_id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Ends the running attempt carried out by backup `snapshot`, if any.
    pub async fn end_attempt_of_snapshot(
        &self,
        snapshot: &str,
        ok: bool,
        error: Option<&str>,
        ended_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET outcome = ?, error = ?, ended_ms = ? WHERE snapshot_id = ? AND outcome = 'running'",
        )
        .bind(if ok { "ok" } else { "failed" })
        .bind(error)
        .bind(ended_ms)
        .bind(snapshot)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Attempts still running when the coordinator stopped can no longer report.
    pub async fn fail_running_attempts(&self, reason: &str, ended_ms: i64) -> Result<u64> {
        Ok(sqlx::query("UPDATE attempts SET outcome = 'failed', error = ?, ended_ms = ? WHERE outcome = 'running'")
            .bind(reason)
            .bind(ended_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Attempts newest first; all assets when `asset` is None; `limit` 0 means no limit.
    pub async fn attempts(&self, asset: Option<&str>, limit: u32) -> Result<Vec<AttemptRow>> {
        let limit = if limit == 0 { i64::MAX } else { limit as i64 };
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE (? IS NULL OR asset = ?)
             ORDER BY started_ms DESC, job_id DESC LIMIT ?"
        );
        Ok(sqlx::query(&sql)
            .bind(asset)
            .bind(asset)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(attempt_row)
            .collect())
    }

    /// The newest attempt of every asset.
    pub async fn last_attempts(&self) -> Result<HashMap<String, AttemptRow>> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE job_id = (
                SELECT job_id FROM attempts b WHERE b.asset = a.asset ORDER BY started_ms DESC, job_id DESC LIMIT 1)"
        );
        Ok(sqlx::query(&sql).fetch_all(&self.pool).await?.iter().map(|r| (r.get(1), attempt_row(r))).collect())
    }

    /// Sum of the sizes of every committed snapshot, per asset: what the repository would
    /// hold without deduplication or compression.
    pub async fn logical_bytes(&self) -> Result<HashMap<String, i64>> {
        Ok(sqlx::query(
            "SELECT a.name, COALESCE(SUM(s.size), 0) FROM assets a LEFT JOIN snapshots s ON s.asset_id = a.id GROUP BY a.name",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    /// Every asset's name and the finish time of its newest snapshot, if any: what the
    /// scheduler needs each tick, without the counts and sums of [`Catalog::assets`].
    pub async fn asset_latest(&self) -> Result<BTreeMap<String, Option<i64>>> {
        Ok(sqlx::query(
            "SELECT a.name, (SELECT MAX(s.finished_at) FROM snapshots s WHERE s.asset_id = a.id AND s.stream = '')
             FROM assets a",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    pub async fn assets(&self) -> Result<Vec<AssetRow>> {
        let rows = sqlx::query(
            "SELECT a.id, a.name, a.kind,
                (SELECT COUNT(*) FROM snapshots s WHERE s.asset_id = a.id AND s.stream = ''),
                (SELECT s.id FROM snapshots s WHERE s.asset_id = a.id AND s.stream = '' ORDER BY s.id DESC LIMIT 1),
                (SELECT s.finished_at FROM snapshots s WHERE s.asset_id = a.id AND s.stream = ''
                 ORDER BY s.id DESC LIMIT 1),
                (SELECT COALESCE(SUM(p.size), 0) FROM packs p WHERE p.asset_id = a.id)
             FROM assets a ORDER BY a.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let latest: Option<String> = r.get(4);
                let at: Option<i64> = r.get(5);
                AssetRow {
                    id: r.get(0),
                    name: r.get(1),
                    kind: r.get(2),
                    snapshots: r.get(3),
                    latest: latest.zip(at),
                    stored_bytes: r.get(6),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packs_chunks_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        let a = c.ensure_asset("git/a", "git").await.unwrap();
        assert_eq!(c.ensure_asset("git/a", "git").await.unwrap(), a);
        c.begin_backup("20261124T000000.000Z-00000001", a, "git-1").await.unwrap();
        let pack = SealedPack {
            id: "ab".repeat(16),
            asset: "git/a".into(),
            size: 100,
            entries: vec![Entry { id: ChunkId([1; 32]), offset: 10, length: 20, crc: 5 }],
        };
        c.index_pack(&pack, a, Some("20261124T000000.000Z-00000001")).await.unwrap();
        let missing = c.missing(a, &[ChunkId([1; 32]), ChunkId([2; 32])]).await.unwrap();
        assert_eq!(missing, vec![ChunkId([2; 32])]);
        let other = c.ensure_asset("git/b", "git").await.unwrap();
        assert_eq!(c.missing(other, &[ChunkId([1; 32])]).await.unwrap().len(), 1, "chunks are per asset");
        let b = c.backup("20261124T000000.000Z-00000001").await.unwrap().unwrap();
        assert_eq!((b.state.as_str(), b.bytes_stored), ("open", 20));
        assert_eq!(c.abort_open_backups("restart").await.unwrap(), 1);
        let row = SnapshotRow {
            id: "20261124T000000.000Z-00000002".into(),
            asset: "git/a".into(),
            kind: "git".into(),
            agent: "git-1".into(),
            started_at: 1,
            finished_at: 2,
            size: 3,
            new_bytes: 4,
            chunks: 1,
            files: 1,
            stream: String::new(),
        };
        c.insert_snapshot(&row, a, &[]).await.unwrap();
        assert_eq!(c.snapshots(Some("git/a"), "", 0).await.unwrap().len(), 1);
        assert_eq!(c.snapshots(None, "", 0).await.unwrap().len(), 1);
        assert!(c.snapshots(Some("git/b"), "", 0).await.unwrap().is_empty());
        // A stream entry is listed with its stream only, and indexes its files by name.
        let wal = SnapshotRow { id: "20261124T000000.000Z-00000003".into(), stream: "wal".into(), ..row.clone() };
        let file = |snap: &str, sha: &str| StreamFileRow {
            path: "000000010000000000000001".into(),
            size: 16,
            sha256: sha.into(),
            snapshot_id: snap.into(),
            committed_at: 5,
        };
        c.insert_snapshot(&wal, a, &[file(&wal.id, "aa")]).await.unwrap();
        assert_eq!(c.snapshots(Some("git/a"), "", 0).await.unwrap().len(), 1);
        assert_eq!(c.snapshots(Some("git/a"), "wal", 0).await.unwrap()[0].id, wal.id);
        let wal2 = SnapshotRow { id: "20261124T000000.000Z-00000004".into(), ..wal.clone() };
        c.insert_snapshot(&wal2, a, &[file(&wal2.id, "aa")]).await.unwrap();
        let held = c.stream_files(a, "wal", &["000000010000000000000001".into()], "", 0).await.unwrap();
        assert_eq!(held, vec![file(&wal.id, "aa")], "the first entry holding a name keeps it");
        assert_eq!(c.stream_files(a, "wal", &[], "", 10).await.unwrap().len(), 1);
        assert!(c.stream_files(a, "wal", &[], "000000010000000000000001", 10).await.unwrap().is_empty());
        c.delete_snapshot(&wal.id).await.unwrap();
        assert!(c.stream_files(a, "wal", &[], "", 10).await.unwrap().is_empty());
        let assets = c.assets().await.unwrap();
        assert_eq!(assets[0].latest.as_ref().unwrap().0, row.id);
        assert_eq!(assets[0].stored_bytes, 100);
    }
}
