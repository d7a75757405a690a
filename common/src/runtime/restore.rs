//! Verified restore: chunks are fetched in parallel batches, decrypted and checked on
//! blocking threads, reassembled in order, and every file's SHA-256 is compared with the
//! signed manifest before the restore is reported good.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use coffer_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::client::{ClientError, Coordinator, SignedManifest};
use super::direct::{Extent, ExtentPool, ExtentSink, Plain, RestoreFile};
use super::progress::Progress;
use crate::crypto::{ChunkCipher, ChunkId, FileHasher};
use crate::keyring::Keyring;
use crate::manifest::{ChunkRef, FileEntry, Manifest};

#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Download streams in flight at once.
    pub parallel: usize,
    /// Target plaintext bytes per download batch.
    pub batch_bytes: usize,
    /// Files written at once (each lane has its own download window, writer and hasher).
    pub lanes: usize,
    /// Plaintext bytes of batches in flight (downloading, decrypted, being written or
    /// hashed) over all lanes together.
    pub memory_budget: usize,
    /// Plaintext bytes kept of chunks the restore needs again (a volume's repeated blocks,
    /// a file stored twice): each is downloaded and decrypted once, then copied.
    pub repeat_cache: usize,
    pub quiet: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            parallel: 4,
            batch_bytes: 4 << 20,
            lanes: 4,
            memory_budget: 48 << 20,
            repeat_cache: 16 << 20,
            quiet: false,
        }
    }
}

/// What `restore_into` checks for each file beyond the chunks themselves. Every chunk is
/// always authenticated (AES-GCM under a key derived from its id, the id in the associated
/// data, the id named by the signed manifest), so a coordinator cannot substitute data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// Also hash each restored file and compare it with the manifest's SHA-256 (catches an
    /// agent that cut or hashed a file wrongly at backup time).
    Sha256,
    /// Sizes only: for files that are single chunks (volume blocks), where the whole-file
    /// hash would re-hash every byte the chunk check has just authenticated.
    ChunksOnly,
}

pub struct SnapshotReader {
    coord: Coordinator,
    cipher: Arc<ChunkCipher>,
    signed: SignedManifest,
    opts: RestoreOptions,
    progress: Progress,
    /// Plaintext bytes copied from the repeat cache instead of downloaded.
    reused: Arc<AtomicU64>,
}

impl SnapshotReader {
    /// Fetches and verifies the manifest of `snapshot` (an id or `latest`).
    pub async fn open(
        coord: &Coordinator,
        keyring: &Keyring,
        asset: &str,
        snapshot: &str,
        opts: RestoreOptions,
    ) -> Result<SnapshotReader, ClientError> {
        Self::open_with_cipher(coord, Arc::new(keyring.cipher()), asset, snapshot, opts).await
    }

    /// [`SnapshotReader::open`] with the asset's chunk cipher already at hand.
    pub async fn open_with_cipher(
        coord: &Coordinator,
        cipher: Arc<ChunkCipher>,
        asset: &str,
        snapshot: &str,
        opts: RestoreOptions,
    ) -> Result<SnapshotReader, ClientError> {
        let signed = coord
            .manifest(asset, snapshot)
            .await?
            .ok_or_else(|| ClientError::NoSnapshot { asset: asset.to_string(), snapshot: snapshot.to_string() })?;
        let total = signed.manifest.total_size();
        Ok(SnapshotReader {
            coord: coord.clone(),
            cipher,
            signed,
            opts,
            progress: Progress::start("restore", Some(total), opts.quiet),
            reused: Arc::default(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.signed.manifest
    }

    pub fn signed(&self) -> &SignedManifest {
        &self.signed
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Plaintext bytes restored so far from chunks already downloaded for an earlier
    /// occurrence (see [`RestoreOptions::repeat_cache`]).
    pub fn reused_bytes(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    fn corrupt(&self, detail: String) -> ClientError {
        ClientError::Corrupt { snapshot: self.signed.info.id.clone(), detail }
    }

    /// Writes the verified contents of file `path` to a new file at `dest` (fsynced).
    pub async fn restore_to_path(&self, path: &str, dest: &Path) -> Result<(), ClientError> {
        self.restore_files(&[(path.to_string(), dest.to_path_buf())]).await
    }

    /// Restores many files into new files, in lanes whose download windows cross file
    /// boundaries; each file is checked against its SHA-256. Before this returns, every
    /// filesystem the files landed on is synced (`syncfs`: the files' data, their sizes and
    /// the directory entries, with any writeback error since the restore began reported).
    pub async fn restore_files(&self, files: &[(String, PathBuf)]) -> Result<(), ClientError> {
        let dests: Vec<PathBuf> = files.iter().map(|(_, d)| d.clone()).collect();
        let filesystems = {
            let dests = dests.clone();
            tokio::task::spawn_blocking(move || filesystems(dests.iter().map(PathBuf::as_path)))
                .await
                .map_err(|e| ClientError::Protocol(format!("sync thread: {e}")))??
        };
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        let entries = self.entries(&paths)?;
        let sizes: Vec<u64> = entries.iter().map(|e| e.size).collect();
        let io = |context: String| move |source| ClientError::Io { context, source };
        let open = {
            let dests = dests.clone();
            move |i: usize| -> Result<RestoreFile, ClientError> {
                let dest = &dests[i];
                if let Some(dir) = dest.parent() {
                    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
                }
                RestoreFile::create(dest, sizes[i] >= DIRECT_MIN).map_err(io(format!("creating {}", dest.display())))
            }
        };
        let finish = move |i: usize, f: RestoreFile| -> Result<(), ClientError> {
            f.finish().map(drop).map_err(io(format!("writing {}", dests[i].display())))
        };
        self.restore_entries(entries, FileCheck::Sha256, open, finish).await?;
        tokio::task::spawn_blocking(move || {
            for (dir, fs) in filesystems {
                rustix::fs::syncfs(&fs).map_err(|e| ClientError::Io {
                    context: format!("syncing the filesystem of {}", dir.display()),
                    source: e.into(),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("sync thread: {e}")))?
    }

    /// Streams the verified contents of file `path` into `writer` and returns it.
    pub async fn restore_file<W: Write + Send + 'static>(&self, path: &str, writer: W) -> Result<W, ClientError> {
        let path_owned = path.to_string();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut writer = Some(Plain(writer));
        let open = move |_| writer.take().ok_or_else(|| ClientError::Protocol("file opened twice".into()));
        let finish = move |_, mut w: Plain<W>| {
            w.0.flush().map_err(|source| ClientError::Io { context: format!("writing {path_owned}"), source })?;
            tx.send(w.0).map_err(|_| ClientError::Protocol("receiver gone".into()))
        };
        self.restore_into(&[path], FileCheck::Sha256, open, finish).await?;
        rx.recv().map_err(|_| ClientError::Protocol("restored writer lost".into()))
    }

    /// The restore engine. Files are shared out over `lanes` (largest first, to the lane
    /// with the fewest bytes; manifest order within a lane). Each lane is one ordered stream
    /// of download batches, fetched `parallel` at a time, each decrypted and checked on a
    /// blocking thread straight into an aligned [`Extent`], written in order by the lane's
    /// writer thread; the lane's hasher thread then checks each file's size and (with
    /// [`FileCheck::Sha256`]) SHA-256, before `finish`. Lanes let one file's writes wait on
    /// the disk while another file's go on: a single writer was the limit for data
    /// directories of many files. The first lane to fail stops the others.
    pub async fn restore_into<W, O, F>(
        &self,
        paths: &[&str],
        check_files: FileCheck,
        open: O,
        finish: F,
    ) -> Result<(), ClientError>
    where
        W: ExtentSink + Send + 'static,
        O: FnMut(usize) -> Result<W, ClientError> + Send + 'static,
        F: FnMut(usize, W) -> Result<(), ClientError> + Send + 'static,
    {
        self.restore_entries(self.entries(paths)?, check_files, open, finish).await
    }

    /// The manifest's entries for `paths`, in order.
    fn entries(&self, paths: &[&str]) -> Result<Vec<FileEntry>, ClientError> {
        paths
            .iter()
            .map(|p| self.manifest().file(p).cloned().ok_or_else(|| self.corrupt(format!("has no file {p:?}"))))
            .collect()
    }

    /// [`SnapshotReader::restore_into`] for entries already looked up.
    async fn restore_entries<W, O, F>(
        &self,
        entries: Vec<FileEntry>,
        check_files: FileCheck,
        open: O,
        finish: F,
    ) -> Result<(), ClientError>
    where
        W: ExtentSink + Send + 'static,
        O: FnMut(usize) -> Result<W, ClientError> + Send + 'static,
        F: FnMut(usize, W) -> Result<(), ClientError> + Send + 'static,
    {
        let open = Arc::new(Mutex::new(open));
        let finish = Arc::new(Mutex::new(finish));
        let shared = Lanes {
            repeats: Arc::new(RepeatCache::new(&entries, self.opts.repeat_cache)),
            entries: Arc::new(entries),
            check_files,
            stop: AtomicBool::new(false),
            budget: Arc::new(Semaphore::new(self.budget_permits())),
            pool: Arc::new(ExtentPool::default()),
        };
        let lanes = assign_lanes(&shared.entries, self.opts.lanes);
        let results = futures::future::join_all(lanes.into_iter().map(|files| {
            let (open, finish) = (open.clone(), finish.clone());
            let open = move |j: usize| (open.lock().expect("open lock"))(j);
            let finish = move |j: usize, w: W| (finish.lock().expect("finish lock"))(j, w);
            self.restore_lane(&shared, files, open, finish)
        }))
        .await;
        results.into_iter().collect()
    }

    /// One lane of [`SnapshotReader::restore_into`]: the files `files` (indices into
    /// `entries`, ascending) restored in order.
    async fn restore_lane<W, O, F>(
        &self,
        shared: &Lanes,
        files: Vec<usize>,
        mut open: O,
        mut finish: F,
    ) -> Result<(), ClientError>
    where
        W: ExtentSink + Send + 'static,
        O: FnMut(usize) -> Result<W, ClientError> + Send + 'static,
        F: FnMut(usize, W) -> Result<(), ClientError> + Send + 'static,
    {
        let Lanes { entries, check_files, stop, budget, pool, repeats } = shared;
        let check_files = *check_files;
        // Inside the lane, files are numbered 0..files.len(); `files[j]` is the caller's index.
        let files = Arc::new(files);
        let (tx, mut rx) = mpsc::channel::<(usize, Held)>(2);
        let progress = self.progress.clone();
        let snapshot = self.signed.info.id.clone();
        let total = files.len();
        // Two threads consume the ordered extents: the writer, then (handed each extent after
        // writing it) the hasher, which checks every file's size and SHA-256.
        let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<(usize, Held)>(2);
        let (hash_entries, hash_files) = (entries.clone(), files.clone());
        let hasher = std::thread::spawn(move || -> Result<(), ClientError> {
            let mut check = |j: usize, (h, size): (Option<FileHasher>, u64)| -> Result<(), ClientError> {
                let e = &hash_entries[hash_files[j]];
                let sha = h.map_or_else(|| e.sha256.clone(), |h| hex::encode(h.finish()));
                if size != e.size || sha != e.sha256 {
                    return Err(ClientError::Corrupt {
                        snapshot: snapshot.clone(),
                        detail: format!(
                            "file {:?} restored to {size} bytes with SHA-256 {sha} but the manifest says {} bytes, {}",
                            e.path, e.size, e.sha256
                        ),
                    });
                }
                Ok(())
            };
            let hash = check_files == FileCheck::Sha256;
            let mut fresh = |_| Ok((hash.then(FileHasher::default), 0u64));
            let mut walk = Walk::default();
            for (j, (extent, _permit)) in hash_rx {
                let (h, size) = walk.at(j, &mut fresh, &mut check)?;
                let data = extent.data();
                if let Some(h) = h {
                    h.update(data);
                }
                *size += data.len() as u64;
                progress.add(data.len() as u64);
            }
            walk.end(total, &mut fresh, &mut check)
        });
        // Download jobs in lane order: (lane index, manifest index, offset, chunks).
        let mut jobs: Vec<(usize, usize, u64, Vec<ChunkRef>)> = Vec::new();
        for (j, &i) in files.iter().enumerate() {
            let mut offset = 0u64;
            for b in batch_refs(&entries[i].chunks, self.opts.batch_bytes) {
                let len: u64 = b.iter().map(|r| u64::from(r.1)).sum();
                jobs.push((j, i, offset, b));
                offset += len;
            }
        }
        // The writer is a thread of its own, not a blocking-pool task: it lives as long as the
        // lane, and lanes must not use up the pool the batches are decrypted on.
        let (written_tx, written_rx) = tokio::sync::oneshot::channel();
        let write_entries = entries.clone();
        let mut writer = move || {
            let mut open = |j: usize| open(files[j]);
            let mut finish = |j: usize, w: W| finish(files[j], w);
            let mut walk = Walk::default();
            while let Some((j, (mut extent, permit))) = rx.blocking_recv() {
                let w = walk.at(j, &mut open, &mut finish)?;
                // Named by its path in the snapshot: under the restore's destination for a
                // directory, or a volume block that the source turns into a device offset.
                w.write_extent(&mut extent).map_err(|source| ClientError::Io {
                    context: format!("writing {:?}", write_entries[files[j]].path),
                    source,
                })?;
                if hash_tx.send((j, (extent, permit))).is_err() {
                    return Ok(()); // the hasher stopped; its error is reported
                }
            }
            // Files after the last batch (and empty files) still have to exist.
            walk.end(total, &mut open, &mut finish)
        };
        std::thread::spawn(move || {
            let _ = written_tx.send(writer());
        });

        let mut fetched = futures::stream::iter(jobs)
            .map(|(j, i, offset, b)| {
                let entry = &entries[i];
                let pool = pool.clone();
                let budget = budget.clone();
                let repeats = repeats.clone();
                async move {
                    let len: u64 = b.iter().map(|r| u64::from(r.1)).sum();
                    let want = (len as usize).clamp(1, self.budget_permits()) as u32;
                    let permit = budget
                        .acquire_many_owned(want)
                        .await
                        .map_err(|_| ClientError::Protocol("restore budget closed".into()))?;
                    self.fetch_batch(entry, offset, b, pool, repeats).await.map(|v| (j, (v, permit)))
                }
            })
            .buffered(self.opts.parallel);
        let (mut failure, mut stopped) = (None, false);
        while let Some(batch) = fetched.next().await {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break;
            }
            match batch {
                Ok(b) => {
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(fetched);
        drop(tx);
        let written = written_rx.await.map_err(|_| ClientError::Protocol("writer thread panicked".into()))?;
        let hashed = hasher.join().map_err(|_| ClientError::Protocol("hash thread panicked".into()))?;
        if let Some(e) = failure {
            return Err(e);
        }
        if stopped {
            // Another lane failed and reports why; this lane's unfinished files say nothing.
            return Ok(());
        }
        let done = written.and(hashed);
        if done.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        done
    }

    /// Downloads one batch of a file's chunks (starting at plaintext offset `offset`) and
    /// decrypts each into its place in one extent; chunks held by `repeats` are copied
    /// from there instead, and chunks needed again later are offered to it.
    async fn fetch_batch(
        &self,
        entry: &FileEntry,
        offset: u64,
        refs: Vec<ChunkRef>,
        pool: Arc<ExtentPool>,
        repeats: Arc<RepeatCache>,
    ) -> Result<Extent, ClientError> {
        let held: Vec<Option<Arc<[u8]>>> = refs.iter().map(|r| repeats.take(&r.0)).collect();
        let ids: Vec<Vec<u8>> =
            refs.iter().zip(&held).filter(|(_, h)| h.is_none()).map(|(r, _)| r.0.0.to_vec()).collect();
        let wanted = ids.len();
        let frames = if ids.is_empty() { Vec::new() } else { self.download(entry, ids).await? };
        if frames.len() != wanted {
            return Err(ClientError::Protocol(format!("asked for {wanted} chunks, got {}", frames.len())));
        }
        let cipher = self.cipher.clone();
        let snapshot = self.signed.info.id.clone();
        let path = entry.path.clone();
        let reused = self.reused.clone();
        tokio::task::spawn_blocking(move || {
            let len: u64 = refs.iter().map(|r| u64::from(r.1)).sum();
            let mut extent = pool.extent(offset, len as usize);
            let out = extent.data_mut();
            let mut at = 0usize;
            let mut frames = frames.into_iter();
            let corrupt = |detail: String| ClientError::Corrupt { snapshot: snapshot.clone(), detail };
            for (r, h) in refs.iter().zip(held) {
                let end = at + r.1 as usize;
                let dst = &mut out[at..end];
                match h {
                    Some(plain) if plain.len() == dst.len() => {
                        dst.copy_from_slice(&plain);
                        reused.fetch_add(plain.len() as u64, Ordering::Relaxed);
                    }
                    Some(plain) => {
                        return Err(corrupt(format!(
                            "file {path:?}: chunk {} is {} bytes here and {} bytes elsewhere in the manifest",
                            r.0,
                            r.1,
                            plain.len()
                        )));
                    }
                    None => {
                        let f = frames.next().expect("one frame per chunk not held (counted above)");
                        if f.id != r.0.0 {
                            return Err(ClientError::Protocol(format!("chunk {} arrived out of order", r.0)));
                        }
                        cipher.open_into(&r.0, &f.data, dst).map_err(|e| corrupt(format!("file {path:?}: {e}")))?;
                        repeats.offer(&r.0, dst);
                    }
                }
                at = end;
            }
            Ok(extent)
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("decrypt worker: {e}")))?
    }

    /// One DownloadChunks call (retried when transient) for the stored chunks `ids` of
    /// `entry`'s batch.
    async fn download(
        &self,
        entry: &FileEntry,
        ids: Vec<Vec<u8>>,
    ) -> Result<Vec<pb::DownloadChunksResponse>, ClientError> {
        let asset = self.manifest().asset.clone();
        self.coord
            .retry
            .run("DownloadChunks", || {
                let mut c = self.coord.raw();
                let req = pb::DownloadChunksRequest { asset: asset.clone(), ids: ids.clone() };
                let expected = ids.len();
                async move {
                    let mut s = c.download_chunks(req).await?.into_inner();
                    let mut out = Vec::with_capacity(expected);
                    while let Some(m) = s.message().await? {
                        out.push(m);
                    }
                    Ok(out)
                }
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::DataLoss | tonic::Code::NotFound => {
                    self.corrupt(format!("file {:?}: {}", entry.path, status.message()))
                }
                _ => ClientError::Rpc { call: "DownloadChunks", status },
            })
    }

    pub fn finish(&self) {
        self.progress.finish();
    }

    /// The memory budget as semaphore permits (one per byte, at least one batch's worth).
    fn budget_permits(&self) -> usize {
        self.opts.memory_budget.max(self.opts.batch_bytes).min(u32::MAX as usize)
    }
}

/// Files smaller than this are written through the page cache: a direct write makes the
/// writer wait on the disk for every small file, while their writeback overlaps the rest
/// of the restore and the final `syncfs` (a data directory of a thousand small files
/// restored about 6% faster on the bench machine, in alternating runs).
const DIRECT_MIN: u64 = 1 << 20;

/// One open directory per filesystem that `dests` will land on: the nearest existing
/// ancestor of each destination, opened now so that `syncfs` on it later also reports
/// writeback errors from the restore.
fn filesystems<'a>(dests: impl Iterator<Item = &'a Path>) -> Result<Vec<(PathBuf, File)>, ClientError> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs = std::collections::HashSet::new();
    let mut devices = std::collections::HashSet::new();
    let mut out = Vec::new();
    // The directory holding `p` ("." for a bare name).
    let parent = |p: &Path| match p.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for dest in dests {
        let mut dir = parent(dest);
        if !dirs.insert(dir.clone()) {
            continue;
        }
        let meta = loop {
            match std::fs::metadata(&dir) {
                Ok(m) => break m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != Path::new(".") => dir = parent(&dir),
                Err(source) => {
                    return Err(ClientError::Io { context: format!("inspecting {}", dir.display()), source });
                }
            }
        };
        if devices.insert(meta.dev()) {
            let f = File::open(&dir)
                .map_err(|source| ClientError::Io { context: format!("opening {}", dir.display()), source })?;
            out.push((dir, f));
        }
    }
    Ok(out)
}

/// Walks files `0..total` in order as batches for them arrive: each file is opened once and
/// closed when a later file (or the end) is reached, including files that get no batch.
struct Walk<T> {
    current: Option<(usize, T)>,
    next: usize,
}

impl<T> Default for Walk<T> {
    fn default() -> Self {
        Walk { current: None, next: 0 }
    }
}

type Open<'a, T> = dyn FnMut(usize) -> Result<T, ClientError> + 'a;
type Close<'a, T> = dyn FnMut(usize, T) -> Result<(), ClientError> + 'a;

impl<T> Walk<T> {
    /// The open state of file `target` (targets never decrease).
    fn at(&mut self, target: usize, open: &mut Open<'_, T>, close: &mut Close<'_, T>) -> Result<&mut T, ClientError> {
        while self.current.as_ref().is_none_or(|(i, _)| *i < target) {
            if let Some((i, t)) = self.current.take() {
                close(i, t)?;
            }
            let i = self.next;
            self.next += 1;
            self.current = Some((i, open(i)?));
        }
        Ok(&mut self.current.as_mut().expect("walked to a file").1)
    }

    fn end(mut self, total: usize, open: &mut Open<'_, T>, close: &mut Close<'_, T>) -> Result<(), ClientError> {
        if total > 0 {
            self.at(total - 1, open, close)?;
        }
        match self.current.take() {
            Some((i, t)) => close(i, t),
            None => Ok(()),
        }
    }
}

/// What the lanes of one restore share.
struct Lanes {
    entries: Arc<Vec<FileEntry>>,
    check_files: FileCheck,
    /// Set by the first lane that fails.
    stop: AtomicBool,
    /// The memory budget, one permit per plaintext byte in flight.
    budget: Arc<Semaphore>,
    pool: Arc<ExtentPool>,
    repeats: Arc<RepeatCache>,
}

/// Decrypted chunks the restore needs again. A chunk that occurs more than once in the
/// restore is kept after its first download (while the cache has room) until its last
/// occurrence has been served; every occurrence, served from here or not, counts down.
/// What it holds was authenticated under its id when it was decrypted.
struct RepeatCache {
    limit: usize,
    state: Mutex<RepeatState>,
}

#[derive(Default)]
struct RepeatState {
    /// Occurrences still to be served, for chunks that occur more than once.
    left: HashMap<ChunkId, u32>,
    held: HashMap<ChunkId, Arc<[u8]>>,
    bytes: usize,
}

impl RepeatCache {
    fn new(entries: &[FileEntry], limit: usize) -> RepeatCache {
        let mut state = RepeatState::default();
        if limit > 0 {
            // Sorting a copy of the ids finds the repeats without a map of every chunk.
            let mut ids: Vec<ChunkId> = entries.iter().flat_map(|e| e.chunks.iter().map(|r| r.0)).collect();
            ids.sort_unstable();
            for run in ids.chunk_by(|a, b| a == b).filter(|run| run.len() > 1) {
                state.left.insert(run[0], u32::try_from(run.len()).unwrap_or(u32::MAX));
            }
        }
        RepeatCache { limit, state: Mutex::new(state) }
    }

    /// Counts one occurrence of `id` and returns its plaintext when held.
    fn take(&self, id: &ChunkId) -> Option<Arc<[u8]>> {
        let mut s = self.state.lock().expect("repeat cache lock");
        let left = s.left.get_mut(id)?;
        *left -= 1;
        if *left > 0 {
            return s.held.get(id).cloned();
        }
        s.left.remove(id);
        let data = s.held.remove(id)?;
        s.bytes -= data.len();
        Some(data)
    }

    /// Keeps a copy of `plain`, just decrypted for one occurrence of `id`, while later
    /// occurrences need it and it fits.
    fn offer(&self, id: &ChunkId, plain: &[u8]) {
        let mut s = self.state.lock().expect("repeat cache lock");
        if !s.left.contains_key(id) || s.held.contains_key(id) || s.bytes + plain.len() > self.limit {
            return;
        }
        s.bytes += plain.len();
        s.held.insert(*id, Arc::from(plain));
    }
}

/// A decrypted batch and its share of the restore's memory budget, released once hashed.
type Held = (Extent, OwnedSemaphorePermit);

/// Shares files out over at most `lanes` lanes: largest first, each to the lane with the
/// fewest bytes so far (an empty file still costs a create); ascending indices in each lane.
fn assign_lanes(entries: &[FileEntry], lanes: usize) -> Vec<Vec<usize>> {
    let lanes = lanes.clamp(1, entries.len().max(1));
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(entries[i].size));
    let mut load = vec![0u64; lanes];
    let mut out = vec![Vec::new(); lanes];
    for i in order {
        let l = (0..lanes).min_by_key(|&l| load[l]).expect("at least one lane");
        load[l] += entries[i].size.max(4096);
        out[l].push(i);
    }
    for lane in &mut out {
        lane.sort_unstable();
    }
    out.retain(|l| !l.is_empty());
    if out.is_empty() {
        out.push(Vec::new());
    }
    out
}

/// Splits a file's chunk list into download batches of about `bytes` plaintext each.
fn batch_refs(refs: &[ChunkRef], bytes: usize) -> Vec<Vec<ChunkRef>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for r in refs {
        if !cur.is_empty() && (size + r.1 as usize > bytes || cur.len() >= 256) {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += r.1 as usize;
        cur.push(*r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_balance_bytes_and_keep_manifest_order() {
        let entry = |size: u64| FileEntry { path: format!("f{size}"), size, sha256: String::new(), chunks: Vec::new() };
        let files: Vec<FileEntry> = [10_000, 7_000_000, 20_000, 30_000, 0, 40_000].into_iter().map(entry).collect();
        let lanes = assign_lanes(&files, 2);
        // The big file alone; the rest together, in manifest order.
        assert_eq!(lanes, vec![vec![1], vec![0, 2, 3, 4, 5]]);
        let mut all: Vec<usize> = assign_lanes(&files, 4).concat();
        all.sort_unstable();
        assert_eq!(all, (0..files.len()).collect::<Vec<_>>(), "every file in exactly one lane");
        assert_eq!(assign_lanes(&files[..1], 4), vec![vec![0]], "no empty lanes");
        assert_eq!(assign_lanes(&[], 4), vec![Vec::<usize>::new()], "one empty lane for no files");
    }

    #[test]
    fn repeat_cache_serves_repeats_until_their_last_use() {
        let (a, b, once) = (ChunkId([1; 32]), ChunkId([2; 32]), ChunkId([3; 32]));
        let entry = |refs: &[ChunkId]| FileEntry {
            path: String::new(),
            size: 0,
            sha256: String::new(),
            chunks: refs.iter().map(|&id| ChunkRef(id, 4)).collect(),
        };
        // `a` three times, `b` twice (across files), `once` once.
        let files = [entry(&[a, once, b]), entry(&[a, b, a])];
        let cache = RepeatCache::new(&files, 6);
        assert!(cache.take(&once).is_none());
        cache.offer(&once, b"nope");
        assert!(cache.state.lock().unwrap().held.is_empty(), "a chunk used once is not kept");
        assert!(cache.take(&a).is_none(), "first use: not held yet");
        cache.offer(&a, b"aaaa");
        assert!(cache.take(&b).is_none());
        cache.offer(&b, b"bbbb");
        assert!(!cache.state.lock().unwrap().held.contains_key(&b), "over the byte limit: not kept");
        assert_eq!(cache.take(&a).as_deref(), Some(&b"aaaa"[..]));
        assert!(cache.take(&b).is_none(), "second use of b, which did not fit");
        assert_eq!(cache.take(&a).as_deref(), Some(&b"aaaa"[..]), "last use");
        let s = cache.state.lock().unwrap();
        assert!(s.held.is_empty() && s.left.is_empty() && s.bytes == 0, "everything released after its last use");
        drop(s);
        assert!(RepeatCache::new(&files, 0).state.lock().unwrap().left.is_empty(), "a zero limit keeps nothing");
    }

    #[test]
    fn one_sync_handle_per_filesystem_from_the_nearest_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let dests = [dir.path().join("new/deeper/f1"), dir.path().join("new/deeper/f2"), dir.path().join("f3")];
        let fs = filesystems(dests.iter().map(PathBuf::as_path)).unwrap();
        assert_eq!(fs.len(), 1, "one filesystem");
        assert_eq!(fs[0].0, dir.path().join("new/deeper").ancestors().find(|p| p.exists()).unwrap());
        rustix::fs::syncfs(&fs[0].1).unwrap();
    }

    #[test]
    fn batches_cover_all_refs_in_order() {
        let refs: Vec<ChunkRef> = (0..100u8).map(|i| ChunkRef(ChunkId([i; 32]), 1000)).collect();
        let b = batch_refs(&refs, 10_000);
        assert_eq!(b.len(), 10);
        assert_eq!(b.concat(), refs);
        assert!(batch_refs(&[], 10).is_empty());
        // A chunk larger than the batch size still goes out, alone.
        let big = vec![ChunkRef(ChunkId([1; 32]), 50_000), ChunkRef(ChunkId([2; 32]), 10)];
        assert_eq!(batch_refs(&big, 1000).len(), 2);
    }
}
