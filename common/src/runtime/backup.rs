//! The streaming backup pipeline.
//!
//! ```text
//! reader thread ──(chunk, permit)──▶ id workers ──▶ dedup batcher ──missing──▶ seal workers ──▶ uploader
//!  read+SHA-256+CDC     cap 8      HMAC (ordered)  FindMissingChunks         zstd+AES-GCM     one stream,
//!                                   cap 64          cap 16                    cap 16           per-chunk acks
//! ```
//!
//! Every chunk holds a permit from a byte-counting semaphore (the memory budget) from the
//! moment it is read until the coordinator acknowledges it (or it is found to be stored
//! already), so a slow coordinator stalls the reader instead of filling memory. CPU work
//! runs on blocking threads, never on the runtime's workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use coffer_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::SourceError;
use super::client::{ClientError, Coordinator, SignedManifest};
use super::direct::{AlignedBuf, AlignedPool};
use super::progress::Progress;
use crate::chunker::{Chunker, ChunkerParams, Cut};
use crate::crypto::{ChunkCipher, ChunkId, FileHasher};
use crate::identity::AgentIdentity;
use crate::keyring::Keyring;
use crate::manifest::{ChunkRef, FileEntry, MANIFEST_FORMAT, Manifest};
use crate::signing::MANIFEST_NAMESPACE;

/// Where a self-hashing reader leaves the SHA-256 of everything it returned
/// ([`BackupSink::add_file_hashed`]).
pub type DigestSlot = Arc<std::sync::OnceLock<[u8; 32]>>;

/// Chunk ids per FindMissingChunks call.
const DEDUP_BATCH: usize = 512;
/// How long the dedup stage waits for more chunks before asking about a partial batch. A
/// source that trickles (a snapshot streamed from a server) would otherwise cost one
/// FindMissingChunks round trip per chunk: 3,200 calls for a 270 MB etcd snapshot instead
/// of ~100.
const DEDUP_LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// A batch stops waiting for more chunks once it holds this many bytes.
const DEDUP_LINGER_BYTES: usize = 4 << 20;
const READ_BUFFER: usize = 1 << 20;
const CHUNK_CHANNEL: usize = 8;
const ID_CHANNEL: usize = 64;
const SEAL_CHANNEL: usize = 16;
const UPLOAD_CHANNEL: usize = 16;
/// Files read at once by `add_files`.
const FILES_IN_FLIGHT: usize = 2;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Bytes of chunk data in flight between reading and acknowledgement.
    pub memory_budget: usize,
    /// Parallel CPU workers for ids and sealing.
    pub workers: usize,
    pub quiet: bool,
    /// The coordinator job this backup carries out (empty: started by the agent itself).
    pub job_id: String,
    /// Fetch the asset's newest snapshot for [`BackupSink::previous`]. Off for stream
    /// entries (WAL segments), which never build on an earlier snapshot.
    pub fetch_previous: bool,
    /// zstd level chunks are compressed at.
    pub zstd_level: i32,
    /// The source's choice of level per chunk, given the chunk and `zstd_level`
    /// ([`crate::runtime::Source::chunk_level`]).
    pub chunk_level: Option<ChunkLevel>,
}

/// Picks a chunk's zstd level from its plaintext and the backup's level.
pub type ChunkLevel = fn(&[u8], i32) -> i32;

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            memory_budget: 24 << 20,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2),
            quiet: false,
            job_id: String::new(),
            fetch_previous: true,
            zstd_level: crate::crypto::DEFAULT_ZSTD_LEVEL,
            chunk_level: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct BackupStats {
    pub bytes_read: AtomicU64,
    pub chunks: AtomicU64,
    pub new_chunks: AtomicU64,
    pub new_plain_bytes: AtomicU64,
}

struct Pending {
    id: ChunkId,
    chunk: Bytes,
    permit: OwnedSemaphorePermit,
}

struct Sealed {
    id: ChunkId,
    data: Vec<u8>,
    permit: OwnedSemaphorePermit,
}

type Stage = JoinHandle<Result<(), ClientError>>;

/// One backup in progress: files go in, a signed manifest is committed at the end.
pub struct BackupSink {
    coord: Coordinator,
    asset: String,
    kind: String,
    snapshot: String,
    started: SystemTime,
    previous: Option<SignedManifest>,
    cipher: Arc<ChunkCipher>,
    params: ChunkerParams,
    seed: u64,
    budget: Arc<Semaphore>,
    opts: PipelineOptions,
    files: Vec<FileEntry>,
    id_tx: Option<mpsc::Sender<Pending>>,
    stages: Vec<Stage>,
    stats: Arc<BackupStats>,
    progress: Progress,
}

impl BackupSink {
    /// Opens a backup of `asset` on the coordinator and starts the pipeline stages.
    pub async fn begin(
        coord: &Coordinator,
        keyring: &Keyring,
        asset: &str,
        kind: &str,
        opts: PipelineOptions,
    ) -> Result<BackupSink, ClientError> {
        let begun = coord
            .retry
            .run("BeginBackup", || {
                let mut c = coord.raw();
                let req = pb::BeginBackupRequest {
                    asset: asset.to_string(),
                    kind: kind.to_string(),
                    job_id: opts.job_id.clone(),
                };
                async move { c.begin_backup(req).await }
            })
            .await
            .map_err(ClientError::rpc("BeginBackup"))?
            .into_inner();
        let params = begun
            .chunker
            .map(|c| ChunkerParams { min_size: c.min_size, avg_size: c.avg_size, max_size: c.max_size })
            .ok_or_else(|| ClientError::Protocol("BeginBackup returned no chunker parameters".into()))?;
        params.validate().map_err(ClientError::Protocol)?;
        let budget_floor = 2 * params.max_size as usize;
        let opts = PipelineOptions { memory_budget: opts.memory_budget.max(budget_floor), ..opts };
        let previous = if opts.fetch_previous { coord.manifest(asset, "latest").await? } else { None };
        let stats = Arc::new(BackupStats::default());
        let cipher = Arc::new(keyring.cipher());

        let (id_tx, id_rx) = mpsc::channel(ID_CHANNEL);
        let (seal_tx, seal_rx) = mpsc::channel(SEAL_CHANNEL);
        let (up_tx, up_rx) = mpsc::channel(UPLOAD_CHANNEL);
        // Stages run in the caller's span, so their calls carry the backup's trace context.
        let stages = vec![
            tokio::spawn(
                dedup_stage(
                    coord.clone(),
                    asset.to_string(),
                    id_rx,
                    seal_tx,
                    stats.clone(),
                    (opts.memory_budget / 8).min(DEDUP_LINGER_BYTES),
                )
                .in_current_span(),
            ),
            tokio::spawn(
                seal_stage(cipher.clone(), seal_rx, up_tx, opts.workers, (opts.zstd_level, opts.chunk_level))
                    .in_current_span(),
            ),
            tokio::spawn(upload_stage(coord.clone(), begun.snapshot_id.clone(), up_rx).in_current_span()),
        ];
        tracing::info!(asset, snapshot = %begun.snapshot_id, incremental_from = previous.as_ref().map(|p| p.info.id.as_str()), "backup started");
        Ok(BackupSink {
            coord: coord.clone(),
            asset: asset.to_string(),
            kind: kind.to_string(),
            snapshot: begun.snapshot_id,
            started: crate::time::now(),
            previous,
            cipher,
            params,
            seed: keyring.chunker_seed(),
            budget: Arc::new(Semaphore::new(opts.memory_budget)),
            progress: Progress::start("backup", None, opts.quiet),
            opts,
            files: Vec::new(),
            id_tx: Some(id_tx),
            stages,
            stats,
        })
    }

    pub fn snapshot_id(&self) -> &str {
        &self.snapshot
    }

    pub fn asset(&self) -> &str {
        &self.asset
    }

    /// The coordinator session, for sources that ask it something mid-backup.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coord
    }

    /// Opens an earlier snapshot of this asset for reading (quietly), for sources that
    /// build on one: a delta needs its base's content.
    pub async fn reader(&self, snapshot: &str) -> Result<super::SnapshotReader, ClientError> {
        let opts = super::restore::RestoreOptions { quiet: true, ..Default::default() };
        super::SnapshotReader::open_with_cipher(&self.coord, self.cipher.clone(), &self.asset, snapshot, opts).await
    }

    /// The asset's newest snapshot before this one, for incremental sources.
    pub fn previous(&self) -> Option<&SignedManifest> {
        self.previous.as_ref()
    }

    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// Streams one file through the pipeline (reads happen on blocking threads).
    pub async fn add_file<R: Read + Send + 'static>(
        &mut self,
        path: &str,
        reader: R,
    ) -> Result<&FileEntry, SourceError> {
        self.add_files(vec![(path.to_string(), reader)]).await?;
        Ok(self.files.last().expect("just added"))
    }

    /// Streams several files, two at a time so one file's reads and setup overlap with the
    /// other's hashing; the manifest lists them in the given order.
    pub async fn add_files<R: Read + Send + 'static>(&mut self, files: Vec<(String, R)>) -> Result<(), SourceError> {
        self.add_files_cut(files, Cut::Content).await
    }

    /// [`BackupSink::add_files`] with the files cut as `cut` says.
    pub async fn add_files_cut<R: Read + Send + 'static>(
        &mut self,
        files: Vec<(String, R)>,
        cut: Cut,
    ) -> Result<(), SourceError> {
        self.add_files_inner(files.into_iter().map(|(p, r)| (p, r, None)).collect(), cut).await
    }

    /// Streams one file whose reader computes the SHA-256 of everything it returns (because
    /// the source hashes the stream anyway, as etcd's integrity trailer needs): the pipeline
    /// skips its own whole-file hash and takes the digest from `digest`, which the reader
    /// must have filled by the time it returns end of file.
    pub async fn add_file_hashed<R: Read + Send + 'static>(
        &mut self,
        path: &str,
        reader: R,
        digest: DigestSlot,
    ) -> Result<&FileEntry, SourceError> {
        self.add_files_inner(vec![(path.to_string(), reader, Some(digest))], Cut::Content).await?;
        Ok(self.files.last().expect("just added"))
    }

    async fn add_files_inner<R: Read + Send + 'static>(
        &mut self,
        files: Vec<(String, R, Option<DigestSlot>)>,
        cut: Cut,
    ) -> Result<(), SourceError> {
        if let Cut::Fixed(size) = cut
            && !(64..=crate::chunker::MAX_CHUNK_SIZE).contains(&size)
        {
            return Err(SourceError::Failed(format!("fixed block size {size} is out of range")));
        }
        let mut seen: std::collections::HashSet<&str> = self.files.iter().map(|f| f.path.as_str()).collect();
        for (path, _, _) in &files {
            if !crate::manifest::is_safe_relative_path(path) || !seen.insert(path.as_str()) {
                return Err(SourceError::Failed(format!("invalid or duplicate file path {path:?} in snapshot")));
            }
        }
        let id_tx = self.id_tx.clone().ok_or_else(|| SourceError::Failed("backup already finished".into()))?;
        let ctx = FileContext {
            id_tx,
            params: self.params,
            seed: self.seed,
            budget: self.budget.clone(),
            progress: self.progress.clone(),
            stats: self.stats.clone(),
            cipher: self.cipher.clone(),
            workers: self.opts.workers,
            cut,
        };
        let mut streamed = futures::stream::iter(files)
            .map(|(path, reader, digest)| stream_file(ctx.clone(), path, reader, digest))
            .buffered(FILES_IN_FLIGHT);
        while let Some(r) = streamed.next().await {
            match r {
                Ok(entry) => {
                    self.stats.chunks.fetch_add(entry.chunks.len() as u64, Ordering::Relaxed);
                    self.files.push(entry);
                }
                Err(FileError::Stopped) => {
                    drop(streamed);
                    return Err(self.stage_failure().await);
                }
                Err(FileError::Source(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Streams an in-memory file.
    pub async fn add_bytes(&mut self, path: &str, data: Vec<u8>) -> Result<&FileEntry, SourceError> {
        self.add_file(path, std::io::Cursor::new(data)).await
    }

    /// Includes a file of an earlier snapshot unchanged (its chunks are already stored;
    /// the coordinator checks that at commit).
    pub fn reuse_file(&mut self, entry: FileEntry) -> Result<(), SourceError> {
        if self.files.iter().any(|f| f.path == entry.path) {
            return Err(SourceError::Failed(format!("duplicate file path {:?} in snapshot", entry.path)));
        }
        self.stats.chunks.fetch_add(entry.chunks.len() as u64, Ordering::Relaxed);
        self.files.push(entry);
        Ok(())
    }

    /// A stage ended early: returns the error that stopped it.
    async fn stage_failure(&mut self) -> SourceError {
        self.id_tx = None;
        for stage in std::mem::take(&mut self.stages) {
            match stage.await {
                Ok(Err(e)) => return e.into(),
                Err(e) => return SourceError::Failed(format!("pipeline stage: {e}")),
                Ok(Ok(())) => {}
            }
        }
        SourceError::Failed("pipeline stopped".into())
    }

    /// Drains the pipeline, signs the manifest and commits it. The snapshot is visible once
    /// this returns.
    /// On failure the backup is aborted on the coordinator, so it does not stay open.
    pub async fn commit(
        mut self,
        identity: &AgentIdentity,
        source: BTreeMap<String, serde_json::Value>,
    ) -> Result<pb::SnapshotInfo, SourceError> {
        match self.commit_inner(identity, source).await {
            Ok(info) => Ok(info),
            Err(e) => {
                self.abort_inner(&e.to_string()).await;
                Err(e)
            }
        }
    }

    async fn commit_inner(
        &mut self,
        identity: &AgentIdentity,
        source: BTreeMap<String, serde_json::Value>,
    ) -> Result<pb::SnapshotInfo, SourceError> {
        self.id_tx = None;
        for stage in std::mem::take(&mut self.stages) {
            stage.await.map_err(|e| SourceError::Failed(format!("pipeline stage: {e}")))??;
        }
        self.progress.finish();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            snapshot: self.snapshot.clone(),
            asset: self.asset.clone(),
            kind: self.kind.clone(),
            agent: self.coord.agent_name().to_string(),
            agent_version: crate::VERSION.to_string(),
            started_at: crate::time::rfc3339(self.started),
            finished_at: crate::time::rfc3339(crate::time::now()),
            chunker: self.params.into(),
            source,
            files: std::mem::take(&mut self.files),
        };
        manifest.validate().map_err(|e| SourceError::Failed(e.to_string()))?;
        let bytes = manifest.encode();
        let signature = identity.signer().sign(MANIFEST_NAMESPACE, &bytes);
        let info = self
            .coord
            .retry
            .run("CommitBackup", || {
                let mut c = self.coord.raw();
                let req = pb::CommitBackupRequest {
                    snapshot_id: self.snapshot.clone(),
                    manifest: bytes.clone(),
                    signature: signature.clone(),
                };
                async move { c.commit_backup(req).await }
            })
            .await
            .map_err(ClientError::rpc("CommitBackup"))?
            .into_inner()
            .snapshot
            .ok_or_else(|| ClientError::Protocol("CommitBackup returned no snapshot".into()))?;
        let elapsed = self.progress.elapsed().as_secs_f64();
        tracing::info!(
            asset = %self.asset,
            snapshot = %info.id,
            size = info.size,
            new_bytes = info.new_bytes,
            bytes_read = self.stats.bytes_read.load(Ordering::Relaxed),
            chunks = self.stats.chunks.load(Ordering::Relaxed),
            new_chunks = self.stats.new_chunks.load(Ordering::Relaxed),
            new_plain_bytes = self.stats.new_plain_bytes.load(Ordering::Relaxed),
            seconds = format!("{elapsed:.2}"),
            mb_per_s = format!("{:.1}", info.size as f64 / elapsed.max(1e-6) / 1e6),
            "backup committed"
        );
        Ok(info)
    }

    /// Abandons the backup: nothing becomes visible; stored chunks remain for the next try.
    pub async fn abort(mut self, reason: &str) {
        self.abort_inner(reason).await;
    }

    async fn abort_inner(&mut self, reason: &str) {
        self.id_tx = None;
        for stage in std::mem::take(&mut self.stages) {
            stage.abort();
        }
        self.progress.finish();
        let mut c = self.coord.raw();
        let req = pb::AbortBackupRequest { snapshot_id: self.snapshot.clone(), reason: reason.to_string() };
        if let Err(e) = c.abort_backup(req).await {
            tracing::warn!(snapshot = %self.snapshot, "could not abort the backup on the coordinator: {}", e.message());
        }
    }
}

/// What streaming one file needs from its sink.
#[derive(Clone)]
struct FileContext {
    id_tx: mpsc::Sender<Pending>,
    params: ChunkerParams,
    seed: u64,
    budget: Arc<Semaphore>,
    progress: Progress,
    stats: Arc<BackupStats>,
    cipher: Arc<ChunkCipher>,
    workers: usize,
    cut: Cut,
}

enum FileError {
    /// A later stage stopped; the sink reports why.
    Stopped,
    Source(SourceError),
}

/// Reads and chunks one file, computes its chunk ids (in order) and hands the chunks to the
/// dedup stage; returns the file's manifest entry.
async fn stream_file<R: Read + Send + 'static>(
    ctx: FileContext,
    path: String,
    reader: R,
    digest: Option<DigestSlot>,
) -> Result<FileEntry, FileError> {
    let (chunk_tx, chunk_rx) = mpsc::channel::<(Bytes, OwnedSemaphorePermit)>(CHUNK_CHANNEL);
    let handle = tokio::runtime::Handle::current();
    let reader_path = path.clone();
    let (params, seed, budget, progress, stats) =
        (ctx.params, ctx.seed, ctx.budget.clone(), ctx.progress.clone(), ctx.stats.clone());
    let cut = ctx.cut;
    let reader_task = tokio::task::spawn_blocking(move || {
        let chunker = Chunker::with_cut(params, seed, cut);
        read_and_chunk(reader, digest, chunker, &budget, &chunk_tx, &handle, &progress, &stats)
            .map_err(SourceError::io(format!("reading {reader_path}")))
    });
    let cipher = ctx.cipher.clone();
    let mut ids = ReceiverStream::new(chunk_rx)
        .map(|(chunk, permit)| {
            let cipher = cipher.clone();
            tokio::task::spawn_blocking(move || (cipher.chunk_id(&chunk), chunk, permit))
        })
        .buffered(ctx.workers);
    let mut chunks = Vec::new();
    while let Some(r) = ids.next().await {
        let (id, chunk, permit) =
            r.map_err(|e| FileError::Source(SourceError::Failed(format!("chunk id worker: {e}"))))?;
        chunks.push(ChunkRef(id, chunk.len() as u32));
        if ctx.id_tx.send(Pending { id, chunk, permit }).await.is_err() {
            return Err(FileError::Stopped);
        }
    }
    drop(ids);
    let (size, sha) = reader_task
        .await
        .map_err(|e| FileError::Source(SourceError::Failed(format!("reader thread: {e}"))))?
        .map_err(FileError::Source)?;
    Ok(FileEntry { path, size, sha256: hex::encode(sha), chunks })
}

/// Reads, hashes and chunks one file on three threads joined by bounded channels: a reader
/// (so disk waits overlap with CPU work), a hasher (the whole-file SHA-256, unless `digest`
/// says the reader computes it) and the chunker (this thread). A fixed set of read buffers
/// travels reader -> hasher -> chunker -> reader, so nothing is allocated per read.
#[allow(clippy::too_many_arguments)]
fn read_and_chunk<R: Read + Send + 'static>(
    mut reader: R,
    digest: Option<DigestSlot>,
    mut chunker: Chunker,
    budget: &Arc<Semaphore>,
    tx: &mpsc::Sender<(Bytes, OwnedSemaphorePermit)>,
    handle: &tokio::runtime::Handle,
    progress: &Progress,
    stats: &BackupStats,
) -> std::io::Result<(u64, [u8; 32])> {
    use std::sync::mpsc::{TryRecvError, sync_channel};
    const BUFFERS: usize = 4;
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(BUFFERS);
    let (read_tx, read_rx) = sync_channel::<(AlignedBuf, usize)>(BUFFERS);
    let reader_thread = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut total = 0u64;
        let mut allocated = 0;
        loop {
            // Buffers come from the shared pool as needed (a small file takes one), then
            // circulate; a closed channel means the consumer stopped (it reports why).
            let mut buf = match free_rx.try_recv() {
                Ok(b) => b,
                Err(TryRecvError::Empty) if allocated < BUFFERS => {
                    allocated += 1;
                    READ_BUFFERS.take()
                }
                Err(_) => match free_rx.recv() {
                    Ok(b) => b,
                    Err(_) => break,
                },
            };
            // Fill the buffer: a stream (a snapshot relayed from a server) returns a few KiB
            // per read, and handing each piece on would cost two thread wake-ups apiece.
            let mut n = 0;
            let mut eof = false;
            while n < buf.len() {
                match reader.read(&mut buf.as_mut_slice()[n..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        READ_BUFFERS.give(buf);
                        return Err(e);
                    }
                }
            }
            if n == 0 {
                READ_BUFFERS.give(buf);
                break;
            }
            if let Err(e) = read_tx.send((buf, n)) {
                READ_BUFFERS.give(e.0.0);
                break;
            }
            total += n as u64;
            if eof {
                break;
            }
        }
        for b in free_rx.try_iter() {
            READ_BUFFERS.give(b);
        }
        Ok(total)
    });
    // The whole-file hash runs on its own thread, unless the reader computes it.
    let (hasher, hashed_rx) = if let Some(slot) = digest {
        (WholeHash::Reader(slot), read_rx)
    } else {
        let (hashed_tx, hashed_rx) = sync_channel::<(AlignedBuf, usize)>(BUFFERS);
        let hasher = std::thread::spawn(move || {
            let mut h = FileHasher::default();
            for (buf, n) in read_rx {
                h.update(&buf.as_slice()[..n]);
                if hashed_tx.send((buf, n)).is_err() {
                    break;
                }
            }
            h.finish()
        });
        (WholeHash::Thread(hasher), hashed_rx)
    };
    let stopped = || std::io::Error::other("backup pipeline stopped");
    let emit = |chunk: Bytes| -> std::io::Result<()> {
        let permit = handle.block_on(budget.clone().acquire_many_owned(chunk.len() as u32)).map_err(|_| stopped())?;
        tx.blocking_send((chunk, permit)).map_err(|_| stopped())
    };
    let chunked = (move || {
        for (buf, n) in hashed_rx {
            progress.add(n as u64);
            stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            let mut rest = &buf.as_slice()[..n];
            while !rest.is_empty() {
                let (used, chunk) = chunker.push(rest);
                rest = &rest[used..];
                if let Some(c) = chunk {
                    emit(c)?;
                }
            }
            if let Err(e) = free_tx.send(buf) {
                READ_BUFFERS.give(e.0);
            }
        }
        while let Some(c) = chunker.finish() {
            emit(c)?;
        }
        Ok(())
    })();
    let size = reader_thread.join().map_err(|_| std::io::Error::other("reader thread panicked"))??;
    let sha = match hasher {
        WholeHash::Thread(h) => h.join().map_err(|_| std::io::Error::other("hash thread panicked"))?,
        WholeHash::Reader(slot) => match (slot.get(), &chunked) {
            (Some(d), _) => *d,
            (None, Err(_)) => [0; 32], // the error below is what counts
            (None, Ok(())) => {
                return Err(std::io::Error::other("the source did not report the SHA-256 of what it read"));
            }
        },
    };
    chunked.map(|()| (size, sha))
}

/// Who computes a file's whole SHA-256.
enum WholeHash {
    Thread(std::thread::JoinHandle<[u8; 32]>),
    Reader(DigestSlot),
}

/// Read buffers kept between files, so a backup of many small files does not allocate and
/// zero four fresh 1 MiB buffers per file (measured: 4 GB of memset for a 1000-file
/// PostgreSQL data directory); at most 16 are kept. They are aligned, so a source
/// reading with [`super::direct::DirectReader`] fills them straight from the disk.
static READ_BUFFERS: AlignedPool = AlignedPool::new(READ_BUFFER, 16);
/// Batches ids, asks the coordinator which are missing, forwards only those (once each).
async fn dedup_stage(
    coord: Coordinator,
    asset: String,
    mut rx: mpsc::Receiver<Pending>,
    tx: mpsc::Sender<Pending>,
    stats: Arc<BackupStats>,
    linger_bytes: usize,
) -> Result<(), ClientError> {
    let mut queued: HashSet<ChunkId> = HashSet::new();
    while let Some(first) = rx.recv().await {
        // Gather a batch: whatever is queued, and while the batch is still small, more for
        // up to DEDUP_LINGER. The wait is capped in bytes (`linger_bytes`, a small share of
        // the memory budget) so a fast source never stalls behind a batch being filled.
        let deadline = tokio::time::Instant::now() + DEDUP_LINGER;
        let mut bytes = first.chunk.len();
        let mut batch = vec![first];
        while batch.len() < DEDUP_BATCH {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Empty) if bytes < linger_bytes => {
                    tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                }
                Err(_) => None,
            };
            let Some(p) = next else { break };
            bytes += p.chunk.len();
            batch.push(p);
        }
        let mut ask: Vec<Vec<u8>> = batch.iter().filter(|p| !queued.contains(&p.id)).map(|p| p.id.0.to_vec()).collect();
        ask.sort_unstable();
        ask.dedup();
        let missing: HashSet<Vec<u8>> = if ask.is_empty() {
            HashSet::new()
        } else {
            coord
                .retry
                .run("FindMissingChunks", || {
                    let mut c = coord.raw();
                    let req = pb::FindMissingChunksRequest { asset: asset.clone(), ids: ask.clone() };
                    async move { c.find_missing_chunks(req).await }
                })
                .await
                .map_err(ClientError::rpc("FindMissingChunks"))?
                .into_inner()
                .missing
                .into_iter()
                .collect()
        };
        for p in batch {
            if missing.contains(p.id.0.as_slice()) && queued.insert(p.id) {
                stats.new_chunks.fetch_add(1, Ordering::Relaxed);
                stats.new_plain_bytes.fetch_add(p.chunk.len() as u64, Ordering::Relaxed);
                if tx.send(p).await.is_err() {
                    return Ok(()); // the seal stage stopped; its error is reported there
                }
            }
            // Chunks already stored drop here, releasing their memory permit.
        }
    }
    Ok(())
}

async fn seal_stage(
    cipher: Arc<ChunkCipher>,
    rx: mpsc::Receiver<Pending>,
    tx: mpsc::Sender<Sealed>,
    workers: usize,
    (level, chunk_level): (i32, Option<ChunkLevel>),
) -> Result<(), ClientError> {
    let mut sealed = ReceiverStream::new(rx)
        .map(|p| {
            let cipher = cipher.clone();
            let level = chunk_level.map_or(level, |f| f(&p.chunk, level));
            tokio::task::spawn_blocking(move || Sealed {
                data: cipher.seal_level(&p.id, &p.chunk, level),
                id: p.id,
                permit: p.permit,
            })
        })
        .buffer_unordered(workers);
    while let Some(s) = sealed.next().await {
        let s = s.map_err(|e| ClientError::Protocol(format!("seal worker: {e}")))?;
        if tx.send(s).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Holds the upload stream; releases each chunk's permit when its acknowledgement arrives.
async fn upload_stage(coord: Coordinator, snapshot: String, mut rx: mpsc::Receiver<Sealed>) -> Result<(), ClientError> {
    let (frame_tx, frame_rx) = mpsc::channel::<pb::UploadChunksRequest>(4);
    frame_tx
        .send(pb::UploadChunksRequest { snapshot_id: snapshot.clone(), id: Vec::new(), data: Default::default() })
        .await
        .map_err(|_| ClientError::Protocol("upload stream closed".into()))?;
    let mut acks = coord
        .raw()
        .upload_chunks(ReceiverStream::new(frame_rx))
        .await
        .map_err(ClientError::rpc("UploadChunks"))?
        .into_inner();
    let inflight: Arc<Mutex<HashMap<ChunkId, OwnedSemaphorePermit>>> = Arc::default();

    let acked = inflight.clone();
    let failed = tokio_util::sync::CancellationToken::new();
    let ack_failed = failed.clone();
    let ack_task = tokio::spawn(async move {
        let _cancel_on_exit = ack_failed.drop_guard();
        loop {
            match acks.message().await {
                Ok(Some(ack)) if ack.sealed => return Ok(()),
                Ok(Some(ack)) => {
                    let id = ChunkId::from_slice(&ack.id)
                        .ok_or_else(|| ClientError::Protocol("acknowledgement with a malformed id".into()))?;
                    acked.lock().expect("inflight lock").remove(&id);
                }
                Ok(None) => return Err(ClientError::Protocol("upload stream ended before the pack was sealed".into())),
                Err(status) => return Err(ClientError::Rpc { call: "UploadChunks", status }),
            }
        }
    });

    while let Some(s) = rx.recv().await {
        inflight.lock().expect("inflight lock").insert(s.id, s.permit);
        let frame = pb::UploadChunksRequest { snapshot_id: String::new(), id: s.id.0.to_vec(), data: s.data.into() };
        tokio::select! {
            sent = frame_tx.send(frame) => if sent.is_err() { break },
            // The stream failed (or ended early); the ack task has the reason.
            _ = failed.cancelled() => break,
        }
    }
    drop(frame_tx);
    drop(rx);
    ack_task.await.map_err(|e| ClientError::Protocol(format!("ack task: {e}")))??;
    Ok(())
}
