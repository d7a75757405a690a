//! The `redis` source: one RDB per snapshot, pulled over the replication protocol (as
//! `redis-cli --rdb` does), so nothing is written to the server's disk when it replicates
//! diskless; the RDB's CRC-64 is checked before the snapshot can commit.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use coffer_common::manifest::{FileEntry, Manifest};
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use serde_json::{Value, json};

use crate::delta::{BASE_PATH, PATCH_PATH, PatchReader};
use crate::rdb::{Framing, RdbStream, check_file};
use crate::resp::{Conn, RedisUrl, Reply, RespError, keyspace};

/// Path of the RDB inside every snapshot.
pub const RDB_PATH: &str = "dump.rdb";
/// How long a silent server may keep us waiting (it sends newlines while it prepares the
/// RDB, so this only fires on a server that stopped talking).
const READ_TIMEOUT: Duration = Duration::from_secs(300);

pub struct RedisSource {
    pub url: Option<RedisUrl>,
    /// `restore --to redis://` may replace the keys of a non-empty server.
    pub force: bool,
    /// The redis-server binary for restores into a server and for drills.
    pub redis_server: String,
    /// The server's data directory, when the agent runs beside it (sidecar): backups then
    /// use `BGSAVE` and read the RDB file instead of replicating.
    pub data_dir: Option<std::path::PathBuf>,
    /// TLS files for `rediss://` URLs (the backup's and a restore target's).
    pub tls: crate::resp::TlsFiles,
    /// Where the agent keeps the RDB of the newest full snapshot (plaintext, mode 0600),
    /// so that delta snapshots need not download it. `None`: deltas download their base.
    pub cache_dir: Option<std::path::PathBuf>,
    /// A full snapshot at least every this many backups (deltas in between); 1: always full.
    pub full_every: u64,
}

/// The full snapshot a delta patches against.
#[derive(Debug, Clone)]
struct Base {
    id: String,
    /// The base RDB's file entry (reused in the delta as [`BASE_PATH`]).
    entry: FileEntry,
    /// Deltas since that full snapshot, this one included.
    chain: u64,
    /// Where the previous snapshot holds the base content (to download it from there).
    previous: (String, String),
}

/// Whether the next backup can be a delta, and against which base: the newest snapshot's
/// own RDB if it is full, else its base, unless `full_every` says a full one is due or the
/// last patch grew past a quarter of its RDB.
fn plan_delta(previous: Option<&Manifest>, full_every: u64) -> Option<Base> {
    let m = previous?;
    if full_every <= 1 || m.kind != "redis" {
        return None;
    }
    match m.source.get("delta") {
        None => Some(Base {
            id: m.snapshot.clone(),
            entry: m.file(RDB_PATH)?.clone(),
            chain: 1,
            previous: (m.snapshot.clone(), RDB_PATH.into()),
        }),
        Some(d) => {
            let chain = d.get("chain")?.as_u64()? + 1;
            let patch = d.get("patch_bytes")?.as_u64()?;
            let rdb = m.source.get("rdb_bytes")?.as_u64()?;
            if chain >= full_every || patch.saturating_mul(4) > rdb {
                return None;
            }
            Some(Base {
                id: d.get("base")?.as_str()?.to_string(),
                entry: m.file(BASE_PATH)?.clone(),
                chain,
                previous: (m.snapshot.clone(), BASE_PATH.into()),
            })
        }
    }
}

/// Copies everything read into a cache file on the side; a failed write only ends the copy.
struct Tee<R> {
    inner: R,
    copy: Option<(std::fs::File, std::path::PathBuf)>,
}

impl<R: std::io::Read> std::io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some((f, path)) = &mut self.copy
            && let Err(e) = std::io::Write::write_all(f, &buf[..n])
        {
            tracing::warn!(path = %path.display(), error = %e, "not caching the RDB for delta snapshots");
            let _ = std::fs::remove_file(&*path);
            self.copy = None;
        }
        if n == 0
            && let Some((_, path)) = self.copy.take()
        {
            let done = path.with_extension("");
            if let Err(e) = std::fs::rename(&path, &done) {
                tracing::warn!(path = %path.display(), error = %e, "not caching the RDB for delta snapshots");
            }
        }
        Ok(n)
    }
}

fn fail(e: RespError) -> SourceError {
    SourceError::Failed(e.to_string())
}

impl RedisSource {
    /// A `--to` server URL, with the TLS files when it is `rediss://`.
    fn target_url(&self, url: &str) -> Result<RedisUrl, SourceError> {
        let mut u = RedisUrl::parse(url).map_err(fail)?;
        if u.tls.is_some() {
            u.tls = Some(self.tls.clone());
        }
        Ok(u)
    }

    fn url(&self) -> Result<&RedisUrl, SourceError> {
        self.url.as_ref().ok_or_else(|| SourceError::Failed("--redis-url is required".into()))
    }

    /// This asset's cache directory (created, mode 0700), or `None` without a usable one.
    fn cache_for(&self, asset: &str) -> Option<std::path::PathBuf> {
        let dir = self.cache_dir.as_ref()?.join(asset.replace('/', "_"));
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
        match made {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no cache for delta snapshots");
                None
            }
        }
    }

    /// A local copy of the base RDB, checked against its SHA-256: the cached one, or one
    /// downloaded from the previous snapshot. `None` (with a warning) makes this backup a
    /// full one: a delta is an optimisation and never the reason a backup fails.
    async fn base_copy(&self, sink: &BackupSink, base: &Base) -> Option<std::path::PathBuf> {
        let dir = self.cache_for(sink.asset())?;
        let path = dir.join(format!("{}.rdb", base.id));
        let (want_size, want_sha) = (base.entry.size, base.entry.sha256.clone());
        let check = path.clone();
        let cached =
            tokio::task::spawn_blocking(move || file_matches(&check, want_size, &want_sha)).await.unwrap_or(false);
        if !cached {
            let (snapshot, file) = &base.previous;
            let partial = dir.join(format!("{}.rdb.partial", base.id));
            let _ = std::fs::remove_file(&partial);
            let fetched = match sink.reader(snapshot).await {
                Ok(r) => r.restore_to_path(file, &partial).await,
                Err(e) => Err(e),
            };
            if let Err(e) = fetched.map_err(SourceError::from).and_then(|()| {
                std::fs::rename(&partial, &path).map_err(SourceError::io(format!("renaming {}", partial.display())))
            }) {
                tracing::warn!(base = %base.id, error = %e, "cannot get the base RDB; taking a full snapshot");
                let _ = std::fs::remove_file(&partial);
                return None;
            }
            tracing::info!(base = %base.id, path = %path.display(), "downloaded the base RDB for a delta snapshot");
        }
        // Only the base in use stays cached (a full snapshot in progress keeps its copy).
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let keep = e.path() == path || e.file_name().to_string_lossy().starts_with(sink.snapshot_id());
                if !keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Some(path)
    }
}

/// A new file readable by its owner only (the cache holds plaintext RDBs).
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// True when `path` exists with `size` bytes and SHA-256 `sha256` (hex).
fn file_matches(path: &Path, size: u64, sha256: &str) -> bool {
    // The size first: a stale or partial copy is not worth hashing.
    std::fs::metadata(path).is_ok_and(|m| m.len() == size)
        && coffer_common::crypto::sha256_file(path).is_ok_and(|(d, n)| n == size && hex::encode(d) == sha256)
}

/// Writes a snapshot's RDB to the new file `dest`: the RDB itself for a full snapshot; for
/// a delta, the base and the patch (into hidden files beside `dest`, removed afterwards),
/// then the patch applied and the result checked against the recorded size and SHA-256.
pub async fn write_rdb(reader: &SnapshotReader, dest: &Path) -> Result<(), SourceError> {
    let m = reader.manifest();
    let Some(delta) = m.source.get("delta") else {
        return Ok(reader.restore_to_path(RDB_PATH, dest).await?);
    };
    let corrupt = |detail: String| SourceError::Failed(format!("snapshot {}: {detail}", m.snapshot));
    let want_sha = delta.get("rdb_sha256").and_then(Value::as_str).unwrap_or_default().to_string();
    let want_len = m.source.get("rdb_bytes").and_then(Value::as_u64);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let beside = |what: &str| dest.with_file_name(format!(".{name}.{what}.partial"));
    let (base, patch) = (beside("base"), beside("patch"));
    let cleanup = |also_dest: bool| {
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&patch);
        if also_dest {
            let _ = std::fs::remove_file(dest);
        }
    };
    let fetched = async {
        reader.restore_to_path(BASE_PATH, &base).await?;
        reader.restore_to_path(PATCH_PATH, &patch).await
    }
    .await;
    if let Err(e) = fetched {
        cleanup(false);
        return Err(e.into());
    }
    let (b, p, d) = (base.clone(), patch.clone(), dest.to_path_buf());
    let applied = tokio::task::spawn_blocking(move || -> Result<(u64, String), SourceError> {
        let base = std::fs::File::open(&b).map_err(SourceError::io(format!("opening {}", b.display())))?;
        let patch = std::fs::File::open(&p).map_err(SourceError::io(format!("opening {}", p.display())))?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&d)
            .map_err(SourceError::io(format!("creating {}", d.display())))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
        let got = crate::delta::apply(&base, patch, &mut w).map_err(|e| SourceError::Failed(e.to_string()))?;
        let out = w.into_inner().map_err(|e| SourceError::io(format!("writing {}", d.display()))(e.into_error()))?;
        out.sync_all().map_err(SourceError::io(format!("syncing {}", d.display())))?;
        Ok(got)
    })
    .await
    .map_err(|e| SourceError::Failed(format!("patch thread: {e}")))?;
    match applied {
        Ok((len, sha)) if sha == want_sha && want_len.is_none_or(|n| n == len) => {
            cleanup(false);
            Ok(())
        }
        Ok((len, sha)) => {
            cleanup(true);
            Err(corrupt(format!(
                "the patched RDB is {len} bytes with SHA-256 {sha}, the manifest records {want_len:?} bytes, {want_sha}"
            )))
        }
        Err(e) => {
            cleanup(true);
            Err(corrupt(format!("applying the patch: {e}")))
        }
    }
}

/// Opens a replication stream: handshake, `PSYNC ? -1`, and the payload header. Returns the
/// connection positioned at the first RDB byte, the framing and the master's replication
/// offset.
fn start_sync(url: &RedisUrl) -> Result<(Conn, Framing, String), SourceError> {
    let mut c = Conn::open(url, READ_TIMEOUT).map_err(fail)?;
    let refused = |e: RespError| {
        SourceError::Failed(format!(
            "redis at {} refused replication ({e}); the backup user needs the PSYNC and REPLCONF commands \
             (ACL: +psync +replconf)",
            url.addr()
        ))
    };
    c.call(&[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"]).map_err(refused)?;
    c.send(&[b"PSYNC", b"?", b"-1"]).map_err(refused)?;
    // The master may send keep-alive newlines before its answer.
    let answer = loop {
        let line = c.line().map_err(refused)?;
        if !line.is_empty() {
            break line;
        }
    };
    let full = match answer.strip_prefix('+') {
        Some(s) if s.starts_with("FULLRESYNC") => s.to_string(),
        _ => {
            return Err(match answer.strip_prefix('-') {
                Some(e) => refused(RespError::Server(e.to_string())),
                None => SourceError::Failed(format!("redis answered PSYNC with {answer:?}, not FULLRESYNC")),
            });
        }
    };
    let offset = full.split_whitespace().nth(2).unwrap_or_default().to_string();
    // Newlines keep the link alive while the master prepares the RDB.
    let header = loop {
        let line = c.line().map_err(fail)?;
        if !line.is_empty() {
            break line;
        }
    };
    let framing = Framing::parse(&header)
        .ok_or_else(|| SourceError::Failed(format!("unexpected replication payload header {header:?}")))?;
    Ok((c, framing, offset))
}

/// Sidecar mode: `BGSAVE`, wait for it to finish successfully, open the RDB file. The open
/// file stays readable even if a later save renames a new one over it.
fn bgsave(url: &RedisUrl, data_dir: &Path) -> Result<std::fs::File, SourceError> {
    let mut c = Conn::open(url, READ_TIMEOUT).map_err(fail)?;
    let persistence = |c: &mut Conn| -> Result<(bool, i64, String), SourceError> {
        let info = c.info().map_err(fail)?;
        let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        Ok((
            get("rdb_bgsave_in_progress") == "1",
            get("rdb_last_save_time").parse().unwrap_or(0),
            get("rdb_last_bgsave_status"),
        ))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(6 * 3600);
    let wait = |c: &mut Conn, after: i64| -> Result<(), SourceError> {
        loop {
            let (running, last, status) = persistence(c)?;
            if !running && last > after {
                return if status == "ok" {
                    Ok(())
                } else {
                    Err(SourceError::Failed(format!("redis BGSAVE failed (rdb_last_bgsave_status:{status})")))
                };
            }
            if std::time::Instant::now() > deadline {
                return Err(SourceError::Failed("redis BGSAVE did not finish within 6 hours".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A save already running started before this backup: let it finish, then take ours.
    let (running, last, _) = persistence(&mut c)?;
    if running {
        wait(&mut c, last)?;
    }
    let (_, before, _) = persistence(&mut c)?;
    // LASTSAVE has one-second resolution: start after the second of the previous save.
    while coffer_common::time::unix_seconds(coffer_common::time::now()) <= before {
        std::thread::sleep(Duration::from_millis(50));
    }
    c.call(&[b"BGSAVE"]).map_err(fail)?;
    wait(&mut c, before)?;
    let name = match c.call(&[b"CONFIG", b"GET", b"dbfilename"]) {
        Ok(Reply::Array(Some(v))) => v.get(1).and_then(Reply::text).unwrap_or_else(|| "dump.rdb".into()),
        _ => "dump.rdb".into(),
    };
    let path = data_dir.join(&name);
    std::fs::File::open(&path).map_err(SourceError::io(format!("opening {}", path.display())))
}

impl Source for RedisSource {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let url = self.url()?.clone();
        let info = tokio::task::spawn_blocking(move || Conn::open(&url, READ_TIMEOUT)?.info())
            .await
            .map_err(|e| SourceError::Failed(format!("probe thread: {e}")))?
            .map_err(fail)?;
        let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        Ok(Probe {
            description: format!("redis {} ({})", get("redis_version"), get("role")),
            details: [("keys".to_string(), format!("{:?}", keyspace(&info)))].into_iter().collect(),
        })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let url = self.url()?.clone();
        // INFO first (version, role, key counts, memory), then the RDB.
        let data_dir = self.data_dir.clone();
        let (info, input, framing, offset) = tokio::task::spawn_blocking(move || {
            let info = Conn::open(&url, READ_TIMEOUT).and_then(|mut c| c.info()).map_err(fail)?;
            if let Some(dir) = data_dir {
                let file = bgsave(&url, &dir)?;
                let len = file.metadata().map_err(SourceError::io("reading the RDB file's size"))?.len();
                let offset =
                    info.iter().find(|(k, _)| k == "master_repl_offset").map(|(_, v)| v.clone()).unwrap_or_default();
                let input: Box<dyn std::io::Read + Send> = Box::new(file);
                return Ok::<_, SourceError>((info, input, Framing::Length(len), offset));
            }
            let (conn, framing, offset) = start_sync(&url)?;
            let input: Box<dyn std::io::Read + Send> = Box::new(conn.reader);
            Ok((info, input, framing, offset))
        })
        .await
        .map_err(|e| SourceError::Failed(format!("redis thread: {e}")))??;
        let expected_len = match framing {
            Framing::Length(n) => Some(n),
            Framing::Eof(_) => None,
        };
        let (stream, summary) = RdbStream::new(input, framing);
        let previous = sink.previous().map(|p| p.manifest.clone());
        let base = match plan_delta(previous.as_ref(), self.full_every) {
            Some(b) => self.base_copy(sink, &b).await.map(|path| (b, path)),
            None => None,
        };
        let mut delta = None;
        if let Some((b, path)) = base {
            let file = std::fs::File::open(&path).map_err(SourceError::io(format!("opening {}", path.display())))?;
            let (patch, patched) = PatchReader::new(stream, file, expected_len)
                .map_err(SourceError::io(format!("reading {}", path.display())))?;
            sink.reuse_file(FileEntry { path: BASE_PATH.into(), ..b.entry.clone() })?;
            sink.add_file(PATCH_PATH, patch).await?;
            let p = patched
                .lock()
                .expect("patch lock")
                .clone()
                .ok_or_else(|| SourceError::Failed("the RDB stream was not read to its end".into()))?;
            tracing::info!(base = %b.id, chain = b.chain, rdb_bytes = p.rdb_bytes, patch_bytes = p.patch_bytes, "delta snapshot");
            delta = Some(json!({
                "base": b.id,
                "chain": b.chain,
                "patch_bytes": p.patch_bytes,
                "rdb_sha256": p.rdb_sha256,
            }));
        } else {
            let copy = self.cache_for(sink.asset()).and_then(|dir| {
                let path = dir.join(format!("{}.rdb.partial", sink.snapshot_id()));
                match private_file(&path) {
                    Ok(f) => Some((f, path)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "not caching the RDB for delta snapshots");
                        None
                    }
                }
            });
            sink.add_file(RDB_PATH, Tee { inner: stream, copy }).await?;
        }
        // Key counts again: equal before and after means the RDB holds exactly these.
        let url = self.url()?.clone();
        let after = tokio::task::spawn_blocking(move || Conn::open(&url, READ_TIMEOUT).and_then(|mut c| c.info()))
            .await
            .map_err(|e| SourceError::Failed(format!("redis thread: {e}")))?
            .map_err(fail)?;
        let keys_exact = keyspace(&info) == keyspace(&after);
        let summary = summary
            .lock()
            .expect("summary lock")
            .clone()
            .ok_or_else(|| SourceError::Failed("the RDB stream was not read to its end".into()))?;
        let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let keys: serde_json::Map<String, Value> =
            keyspace(&after).into_iter().map(|(db, n)| (format!("db{db}"), json!(n))).collect();
        let mut meta = BTreeMap::new();
        meta.insert("redis_version".into(), json!(get("redis_version")));
        meta.insert("role".into(), json!(get("role")));
        meta.insert("keys".into(), Value::Object(keys));
        // False when keys changed while the RDB was taken: counts are then approximate.
        meta.insert("keys_exact".into(), json!(keys_exact));
        meta.insert("used_memory".into(), json!(get("used_memory").parse::<u64>().unwrap_or(0)));
        meta.insert("replication_offset".into(), json!(offset));
        meta.insert("rdb_version".into(), json!(summary.version));
        meta.insert("rdb_checksum".into(), json!(summary.checksum));
        meta.insert("rdb_bytes".into(), json!(summary.bytes));
        meta.insert("source".into(), json!(format!("{:?}", self.url()?)));
        meta.insert("method".into(), json!(if self.data_dir.is_some() { "bgsave" } else { "replication" }));
        if let Some(d) = delta {
            meta.insert("delta".into(), d);
        }
        tracing::info!(bytes = summary.bytes, checksum = %summary.checksum, "RDB received and checked");
        Ok(meta)
    }

    /// Writes the snapshot's RDB to `target` (a file that must not exist), or loads it into
    /// the running server `redis://…` (see [`restore_into_server`]).
    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        if let Some(url) = target.to_str().filter(|t| t.starts_with("redis://") || t.starts_with("rediss://")) {
            let url = self.target_url(url)?;
            return restore_into_server(reader, &url, self.force, &self.redis_server).await;
        }
        if target.exists() {
            return Err(SourceError::Failed(format!("{} exists; restore into a new file", target.display())));
        }
        write_rdb(reader, target).await
    }

    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        if let Some(url) = target.to_str().filter(|t| t.starts_with("redis://") || t.starts_with("rediss://")) {
            let url = self.target_url(url)?;
            let info = tokio::task::spawn_blocking(move || Conn::open(&url, READ_TIMEOUT)?.info())
                .await
                .map_err(|e| SourceError::Failed(format!("redis thread: {e}")))?
                .map_err(fail)?;
            let (got, want) = (keyspace(&info), crate::drill::manifest_keys(manifest));
            let exact = manifest.source.get("keys_exact").and_then(Value::as_bool).unwrap_or(false);
            let mut report = VerifyReport::default();
            if got == want {
                report.checks.push(format!("key counts per db match the manifest: {got:?}"));
            } else if exact {
                report.problems.push(format!("key counts per db {got:?}, the manifest records {want:?}"));
            } else {
                report.checks.push(format!("key counts per db {got:?} (the manifest's {want:?} are approximate)"));
            }
            report.ok = report.problems.is_empty();
            return Ok(report);
        }
        let bytes = std::fs::read(target).map_err(SourceError::io(format!("reading {}", target.display())))?;
        let mut report = VerifyReport::default();
        match check_file(&bytes) {
            Ok(s) => {
                let want = manifest.source.get("rdb_checksum").and_then(Value::as_str).unwrap_or_default();
                if s.checksum == want {
                    report.checks.push(format!(
                        "RDB {} bytes, version {}, CRC-64 {} as recorded",
                        s.bytes, s.version, s.checksum
                    ));
                } else {
                    report.problems.push(format!("RDB CRC-64 {} but the manifest records {want}", s.checksum));
                }
            }
            Err(e) => report.problems.push(format!("RDB check failed: {e}")),
        }
        report.ok = report.problems.is_empty();
        Ok(report)
    }
}

/// Loads a snapshot into a running server without touching its disk or restarting it: the
/// RDB is restored (verified) into a throwaway `redis-server` on a free loopback port, the
/// target is made its replica (`REPLICAOF 127.0.0.1 PORT`), which replaces the target's
/// dataset by a full sync, and once the link is up and the sync done the target is promoted
/// back (`REPLICAOF NO ONE`). The target must be able to reach this agent on loopback (the
/// agent runs next to it) and must be empty unless `force`.
async fn restore_into_server(
    reader: &SnapshotReader,
    url: &RedisUrl,
    force: bool,
    redis_server: &str,
) -> Result<(), SourceError> {
    let target = url.clone();
    let keys = tokio::task::spawn_blocking(move || Conn::open(&target, READ_TIMEOUT)?.info())
        .await
        .map_err(|e| SourceError::Failed(format!("redis thread: {e}")))?
        .map_err(fail)?;
    let present: u64 = keyspace(&keys).iter().map(|(_, n)| n).sum();
    if present > 0 && !force {
        return Err(SourceError::Failed(format!(
            "redis at {} holds {present} keys; restoring would replace them (use --force to do so)",
            url.addr()
        )));
    }
    let dir = crate::drill::TempServer::dir()?;
    if let Err(e) = write_rdb(reader, &dir.join("dump.rdb")).await {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    let (target, bin) = (url.clone(), redis_server.to_string());
    tokio::task::spawn_blocking(move || -> Result<(), SourceError> {
        let source = crate::drill::TempServer::start(&bin, dir)?;
        let mut c = Conn::open(&target, READ_TIMEOUT).map_err(fail)?;
        c.call(&[b"REPLICAOF", b"127.0.0.1", source.port.to_string().as_bytes()]).map_err(fail)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(3600);
        loop {
            let info = c.info().map_err(fail)?;
            let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_default();
            if get("master_link_status") == "up" && get("master_sync_in_progress") == "0" {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.call(&[b"REPLICAOF", b"NO", b"ONE"]);
                return Err(SourceError::Failed("the target did not finish syncing within an hour".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c.call(&[b"REPLICAOF", b"NO", b"ONE"]).map_err(fail)?;
        let want = keyspace(&Conn::open(&source.url(), READ_TIMEOUT).and_then(|mut s| s.info()).map_err(fail)?);
        let got = keyspace(&c.info().map_err(fail)?);
        if got != want {
            return Err(SourceError::Failed(format!(
                "after the sync the target has {got:?} keys, the snapshot {want:?}"
            )));
        }
        Ok(())
    })
    .await
    .map_err(|e| SourceError::Failed(format!("redis thread: {e}")))?
}
