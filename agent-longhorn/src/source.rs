//! Block volumes: a device or raw image read in fixed 2 MiB blocks aligned to device
//! offsets. Holes (`SEEK_DATA`/`SEEK_HOLE`) and all-zero blocks are recorded as holes and
//! never uploaded; every other block is one manifest entry `blocks/<index hex>` holding
//! one chunk, so an unchanged block deduplicates against earlier backups and a changed one
//! costs exactly one chunk. Restore writes a sparse image (or a device) in parallel, each
//! block verified, then checks the whole-volume SHA-256.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Cursor, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer_common::chunker::Cut;
use coffer_common::crypto::FileHasher;
use coffer_common::manifest::Manifest;
use coffer_common::runtime::direct::{self, ALIGN, AlignedBuf, AlignedPool, Extent, ExtentSink, set_direct};
use coffer_common::runtime::{
    BackupSink, ClientError, FileCheck, Probe, SnapshotReader, Source, SourceError, VerifyReport,
};
use serde_json::{Value, json};

/// Block size: fixed, aligned to device offsets.
pub const BLOCK: u64 = 2 << 20;
/// Blocks handed to the pipeline per call.
const BATCH: usize = 8;

pub struct BlockSource {
    pub device: Option<PathBuf>,
    pub volume: Option<String>,
    /// Restore over an existing device or image of the same size.
    pub force: bool,
    /// Backups read the volume `O_DIRECT` (when the filesystem or device allows it).
    pub direct_reads: bool,
    /// The Longhorn manager, when the volume is a Longhorn volume.
    pub longhorn: Option<Arc<crate::longhorn::Client>>,
}

/// Runs a blocking Longhorn API call off the runtime's threads.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::longhorn::LonghornError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f).await.map_err(failed)?.map_err(failed)
}

/// A Longhorn snapshot name for a Coffer snapshot id (lowercase letters, digits, '-').
fn longhorn_snapshot_name(id: &str) -> String {
    let s: String = id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("coffer-{}", s.to_ascii_lowercase())
}

fn failed(e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(e.to_string())
}

fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    chunks.all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Size of a regular file or a block device.
fn volume_size(f: &mut File) -> std::io::Result<u64> {
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Data extents `(start, end)` by `SEEK_DATA`/`SEEK_HOLE`; the whole volume when the
/// filesystem or device does not say.
fn data_extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom as S, seek};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(f, S::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return vec![(0, size)],
        };
        let end = match seek(f, S::Hole(start)) {
            Ok(e) => e.min(size),
            Err(_) => size,
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    out
}

/// What the reader thread found.
struct Scan {
    sha256: [u8; 32],
    holes: u64,
    data: u64,
}

fn block_name(index: u64) -> String {
    format!("blocks/{index:012x}")
}

/// A restore error that names a block (`"blocks/<index>"`) also gets its byte offset in
/// the volume, which is what an operator compares with a device or filesystem report.
fn with_block_offset(msg: &str) -> String {
    let index = msg.split('"').find_map(block_index);
    match index {
        Some(i) => format!("{msg} (the block at volume offset {} = {} MiB)", i * BLOCK, (i * BLOCK) >> 20),
        None => msg.to_string(),
    }
}

fn block_index(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_prefix("blocks/")?, 16).ok()
}

/// A block read from the volume, shared by the volume hasher and the backup pipeline.
#[derive(Clone)]
struct Block(Arc<BlockBuf>);

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        &self.0.buf.as_ref().expect("held until dropped").as_slice()[..self.0.len]
    }
}

/// A block's bytes: the first `len` of an aligned buffer (so direct reads land in it),
/// which goes back to `BLOCK_POOL` when the last holder drops it: warm memory instead of
/// 2 MiB of fresh pages per block.
struct BlockBuf {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            BLOCK_POOL.give(b);
        }
    }
}

/// Block buffers kept for reuse: about what the pipeline's memory budget and the hash
/// queue hold at once.
static BLOCK_POOL: AlignedPool = AlignedPool::new(BLOCK as usize, 40);

/// Blocks the volume hasher may lag behind the reader (2 MiB each).
const HASH_QUEUE: usize = 8;

/// Reads the volume block by block on its own thread and sends non-zero blocks on, counting
/// holes. A second thread hashes the whole volume (holes as zeros) from the same buffers:
/// SHA-256 is one sequential stream, and on the reader's thread it was most of the backup's
/// wall time (4 GiB hashed for a 4 GiB volume, whatever its allocation).
/// `size` is the volume's size when the backup began. A volume whose size changes while it
/// is read fails the backup: past a shrunken end `SEEK_DATA` finds no data, so without the
/// check the lost tail would be recorded as holes, a restore would quietly give zeros there.
fn read_volume(
    mut f: File,
    size: u64,
    direct: bool,
    tx: tokio::sync::mpsc::Sender<(u64, Block)>,
) -> Result<Scan, SourceError> {
    let mut direct = direct && set_direct(&f, true);
    let extents = data_extents(&f, size);
    // `None`: a hole of that many bytes.
    let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<(Option<Block>, usize)>(HASH_QUEUE);
    let hasher = std::thread::spawn(move || {
        let zeros = vec![0u8; BLOCK as usize];
        let mut h = FileHasher::default();
        for (block, len) in hash_rx {
            h.update(block.as_ref().map_or(&zeros[..len], |b| b.as_ref()));
        }
        h.finish()
    });
    let mut scan = Scan { sha256: [0; 32], holes: 0, data: 0 };
    let read = (|| {
        let blocks = size.div_ceil(BLOCK);
        // Blocks and extents both go up: one cursor walks the extents (no rescan per block).
        let mut ext = 0;
        for i in 0..blocks {
            let off = i * BLOCK;
            let len = BLOCK.min(size - off) as usize;
            while ext < extents.len() && extents[ext].1 <= off {
                ext += 1;
            }
            let has_data = extents.get(ext).is_some_and(|&(s, _)| s < off + len as u64);
            let data = if has_data { Some(read_block(&f, &mut direct, off, len)?) } else { None };
            let block = data.map(|b| Block(Arc::new(b))).filter(|b| !is_zero(b.as_ref()));
            if hash_tx.send((block.clone(), len)).is_err() {
                return Err(failed("the volume hasher stopped"));
            }
            let Some(block) = block else {
                scan.holes += 1;
                continue;
            };
            scan.data += 1;
            if tx.blocking_send((i, block)).is_err() {
                return Err(failed("backup pipeline stopped"));
            }
        }
        Ok(())
    })();
    drop(hash_tx);
    let sha256 = hasher.join().map_err(|_| failed("the volume hasher panicked"))?;
    read?;
    let now = volume_size(&mut f).map_err(SourceError::io("sizing the volume again"))?;
    if now != size {
        return Err(failed(format!(
            "the volume changed size while it was read ({size} bytes at the start, {now} now); \
             back up a point-in-time snapshot or clone of it"
        )));
    }
    scan.sha256 = sha256;
    Ok(scan)
}

/// `len` bytes of the volume at `off` (a multiple of [`BLOCK`]) into a pooled buffer. While
/// `direct`, reads go past the page cache in whole aligned units (the last block of an
/// image whose size is not aligned reads short at the end); see [`direct::read_at`] for
/// when they stop being direct.
fn read_block(f: &File, direct: &mut bool, off: u64, len: usize) -> Result<BlockBuf, SourceError> {
    let mut buf = BLOCK_POOL.take();
    let mut got = 0;
    while got < len {
        let at = off + got as u64;
        let want = if *direct { len.next_multiple_of(ALIGN).min(buf.len()) } else { len };
        match direct::read_at(f, direct, &mut buf.as_mut_slice()[got..want], at) {
            Ok(0) => return Err(failed(format!("the volume ended at {at} while reading the block at {off}"))),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SourceError::io(format!("reading the volume at {at}"))(e)),
        }
    }
    Ok(BlockBuf { buf: Some(buf), len })
}

/// The restore target: a buffered handle, and an `O_DIRECT` one when the filesystem or
/// device allows it (whole aligned blocks skip the page cache: on this kind of VM filling
/// fresh page-cache pages is the costliest part of writing).
struct Target {
    buffered: File,
    direct: Option<File>,
}

/// Writes restored blocks at their offsets in the target.
struct AtOffset {
    target: Arc<Target>,
    base: u64,
}

impl ExtentSink for AtOffset {
    fn write_extent(&mut self, e: &mut Extent) -> std::io::Result<()> {
        let at = self.base + e.file_offset();
        let data = e.data();
        let aligned = at.is_multiple_of(ALIGN as u64)
            && data.len().is_multiple_of(ALIGN)
            && (data.as_ptr() as usize).is_multiple_of(ALIGN);
        match &self.target.direct {
            Some(d) if aligned => match d.write_all_at(data, at) {
                Err(err) if err.raw_os_error() == Some(libc_einval()) => self.target.buffered.write_all_at(data, at),
                other => other,
            },
            _ => self.target.buffered.write_all_at(data, at),
        }
    }
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

pub fn manifest_size(m: &Manifest) -> Result<u64, SourceError> {
    m.source
        .get("volume_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| failed(format!("{} has no volume_size", m.snapshot)))
}

/// SHA-256 of the first `size` bytes of `path`.
pub fn sha256_of(path: &Path, size: u64) -> Result<String, SourceError> {
    let f = File::open(path).map_err(SourceError::io(format!("opening {}", path.display())))?;
    let mut h = FileHasher::default();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut off = 0u64;
    while off < size {
        let n = BLOCK.min(size - off) as usize;
        f.read_exact_at(&mut buf[..n], off).map_err(SourceError::io(format!("reading {}", path.display())))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(h.finish()))
}

impl BlockSource {
    fn device(&self) -> Result<&Path, SourceError> {
        self.device.as_deref().ok_or_else(|| failed("--device is required (a block device or a raw image file)"))
    }
}

impl Source for BlockSource {
    fn kind(&self) -> &'static str {
        "longhorn"
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let dev = self.device()?;
        let mut f = File::open(dev).map_err(SourceError::io(format!("opening {}", dev.display())))?;
        let size = volume_size(&mut f).map_err(SourceError::io("sizing the volume"))?;
        Ok(Probe { description: format!("{} ({size} bytes)", dev.display()), details: BTreeMap::new() })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let Some(client) = self.longhorn.clone() else {
            return self.read_device(sink).await;
        };
        let volume = self.volume.clone().ok_or_else(|| failed("--longhorn-url needs --volume"))?;
        let (c, v) = (client.clone(), volume.clone());
        let vol = off_thread(move || c.volume(&v)).await?;
        if vol.robustness == "faulted" {
            return Err(failed(format!(
                "Longhorn reports volume {volume} faulted: no replica is usable; not backing it up"
            )));
        }
        // The device must be this volume (or a clone of it): same size.
        let dev = self.device()?;
        let dev_size = File::open(dev)
            .and_then(|mut f| volume_size(&mut f))
            .map_err(SourceError::io(format!("sizing {}", dev.display())))?;
        if vol.size.parse::<u64>().ok() != Some(dev_size) {
            return Err(failed(format!(
                "{} is {dev_size} bytes but Longhorn volume {volume} is {} bytes: wrong device?",
                dev.display(),
                vol.size
            )));
        }
        let name = longhorn_snapshot_name(sink.snapshot_id());
        let (c, v, n) = (client.clone(), volume.clone(), name.clone());
        let snap = off_thread(move || c.snapshot_create(&v, &n)).await?;
        tracing::info!(volume = %volume, snapshot = %name, "Longhorn snapshot created");
        let result = self.read_device(sink).await;
        // The snapshot marked the point; it is not kept (Longhorn snapshots cost space).
        let (c, v, n) = (client.clone(), volume.clone(), name.clone());
        if let Err(e) = off_thread(move || c.snapshot_delete(&v, &n)).await {
            tracing::warn!(volume = %volume, snapshot = %name, "deleting the Longhorn snapshot failed: {e}");
        }
        let mut meta = result?;
        meta.insert("volume".into(), json!(volume));
        meta.insert("longhorn_snapshot".into(), json!(snap.name));
        meta.insert("longhorn_snapshot_created".into(), json!(snap.created));
        meta.insert("robustness".into(), json!(vol.robustness));
        meta.insert("volume_state".into(), json!(vol.state));
        meta.insert("replicas_desired".into(), json!(vol.number_of_replicas));
        meta.insert("replicas_healthy".into(), json!(vol.healthy_replicas()));
        meta.insert(
            "replicas".into(),
            json!(
                vol.replicas
                    .iter()
                    .map(|r| json!({"name": r.name, "node": r.host_id, "mode": r.mode, "running": r.running}))
                    .collect::<Vec<_>>()
            ),
        );
        Ok(meta)
    }

    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        self.restore_blocks(reader, target).await
    }

    /// After a restore: every block was already authenticated under its chunk id (AES-GCM
    /// with a key derived from the id the signed manifest names) as it was written, and
    /// holes are zeros of a fresh sparse file (or were zeroed), so this checks the size and
    /// reports the allocation. The drill re-reads the whole volume.
    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let size = manifest_size(manifest)?;
        let mut f = File::open(target).map_err(SourceError::io(format!("opening {}", target.display())))?;
        let got = volume_size(&mut f).map_err(SourceError::io("sizing the target"))?;
        let mut r = VerifyReport { ok: got == size, ..Default::default() };
        if r.ok {
            r.checks.push(format!(
                "{} bytes, {} data block(s) each authenticated under its chunk id",
                size,
                manifest.files.len()
            ));
        } else {
            r.problems.push(format!("the target is {got} bytes, the volume {size}"));
        }
        if let Ok(meta) = std::fs::metadata(target)
            && meta.is_file()
        {
            use std::os::unix::fs::MetadataExt;
            r.checks.push(format!("image is sparse: {} of {} bytes allocated", meta.blocks() * 512, meta.len()));
        }
        Ok(r)
    }
}

impl BlockSource {
    async fn read_device(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let dev = self.device()?.to_path_buf();
        let mut f = File::open(&dev).map_err(SourceError::io(format!("opening {}", dev.display())))?;
        let size = volume_size(&mut f).map_err(SourceError::io("sizing the volume"))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Block)>(BATCH);
        let direct = self.direct_reads;
        let reader = tokio::task::spawn_blocking(move || read_volume(f, size, direct, tx));
        let mut batch: Vec<(String, Cursor<Block>)> = Vec::with_capacity(BATCH);
        while let Some((i, buf)) = rx.recv().await {
            batch.push((block_name(i), Cursor::new(buf)));
            if batch.len() == BATCH {
                sink.add_files_cut(std::mem::take(&mut batch), Cut::Fixed(BLOCK as u32)).await?;
            }
        }
        if !batch.is_empty() {
            sink.add_files_cut(batch, Cut::Fixed(BLOCK as u32)).await?;
        }
        let scan = reader.await.map_err(failed)??;
        tracing::info!(size, data_blocks = scan.data, hole_blocks = scan.holes, "volume read");
        let mut meta = BTreeMap::new();
        meta.insert("device".into(), json!(dev.display().to_string()));
        if let Some(v) = &self.volume {
            meta.insert("volume".into(), json!(v));
        }
        meta.insert("volume_size".into(), json!(size));
        meta.insert("block_size".into(), json!(BLOCK));
        meta.insert("data_blocks".into(), json!(scan.data));
        meta.insert("hole_blocks".into(), json!(scan.holes));
        meta.insert("volume_sha256".into(), json!(hex::encode(scan.sha256)));
        Ok(meta)
    }

    async fn restore_blocks(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        let m = reader.manifest();
        let size = manifest_size(m)?;
        let existed = target.exists();
        let buffered = open_target(target, size, self.force)?;
        // From here on the target is being written: an existing device or image (--force)
        // cannot be put back, so a failure says what it now holds.
        let partial = |msg: String| -> SourceError {
            if existed {
                failed(format!("{msg}; {} now holds a partial restore", target.display()))
            } else {
                failed(msg)
            }
        };
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(target)
                .ok()
        };
        let file = Arc::new(Target { buffered, direct });
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        for p in &paths {
            if block_index(p).is_none_or(|i| i * BLOCK >= size) {
                return Err(failed(format!("manifest names {p:?}, not a block of this volume")));
            }
        }
        let names: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let t = file.clone();
        let open = move |i: usize| -> Result<AtOffset, ClientError> {
            Ok(AtOffset { target: t.clone(), base: block_index(&names[i]).expect("checked above") * BLOCK })
        };
        // Each block is one chunk, authenticated as it is decrypted; hashing it again would
        // double the restore's CPU. The drill hashes the whole volume against the manifest.
        reader.restore_into(&paths, FileCheck::ChunksOnly, open, |_, _| Ok(())).await.map_err(|e| match e {
            ClientError::Corrupt { .. } => partial(with_block_offset(&e.to_string())),
            ClientError::Io { context, source } => {
                partial(format!("{} into {}: {source}", with_block_offset(&context), target.display()))
            }
            e if existed => partial(e.to_string()),
            e => e.into(),
        })?;
        let sync = |f: &File| f.sync_all().map_err(|e| partial(format!("syncing {}: {e}", target.display())));
        if let Some(d) = &file.direct {
            sync(d)?;
        }
        sync(&file.buffered)
    }

    /// The drill's check: the whole restored volume hashed against the manifest.
    pub async fn verify_full(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let size = manifest_size(manifest)?;
        let want = manifest.source.get("volume_sha256").and_then(Value::as_str).unwrap_or_default().to_string();
        let t = target.to_path_buf();
        let got = tokio::task::spawn_blocking(move || sha256_of(&t, size)).await.map_err(failed)??;
        let mut r = VerifyReport { ok: got == want, ..Default::default() };
        if r.ok {
            r.checks.push(format!("whole-volume SHA-256 {got} matches"));
        } else {
            r.problems.push(format!("whole-volume SHA-256 is {got}, the manifest says {want}"));
        }
        r.checks.push(format!("{} data block(s) each matched its chunk id", manifest.files.len()));
        if let Ok(meta) = std::fs::metadata(target)
            && meta.is_file()
        {
            use std::os::unix::fs::MetadataExt;
            r.checks.push(format!("image is sparse: {} of {} bytes allocated", meta.blocks() * 512, meta.len()));
        }
        Ok(r)
    }
}

/// A new sparse image, or an existing image or device of the same size with `force` (its
/// hole blocks are zeroed).
fn open_target(target: &Path, size: u64, force: bool) -> Result<File, SourceError> {
    let io = |what: &str| SourceError::io(format!("{what} {}", target.display()));
    match std::fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::OpenOptions::new().write(true).create_new(true).open(target).map_err(io("creating"))?;
            f.set_len(size).map_err(io("sizing"))?;
            Ok(f)
        }
        Err(e) => Err(io("reading")(e)),
        Ok(meta) => {
            let mut f = std::fs::OpenOptions::new().read(true).write(true).open(target).map_err(io("opening"))?;
            let existing = volume_size(&mut f).map_err(io("sizing"))?;
            if existing != size {
                return Err(failed(format!(
                    "{} is {existing} bytes but the volume is {size}; restore into a new image or a device of the same size",
                    target.display()
                )));
            }
            if !force {
                return Err(failed(format!("{} exists; pass --force to overwrite it", target.display())));
            }
            if meta.file_type().is_block_device() {
                // Every block not in the backup must read as zeros afterwards.
                let zeros = vec![0u8; BLOCK as usize];
                let mut off = 0;
                while off < size {
                    let n = BLOCK.min(size - off) as usize;
                    f.write_all_at(&zeros[..n], off).map_err(io("zeroing"))?;
                    off += n as u64;
                }
            } else {
                f.set_len(0).map_err(io("truncating"))?;
                f.set_len(size).map_err(io("sizing"))?;
            }
            Ok(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_and_block_names() {
        assert!(is_zero(&[0u8; 100]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 9;
        assert!(!is_zero(&b));
        assert_eq!(block_index(&block_name(0x1234)), Some(0x1234));
        let m = with_block_offset(r#"snapshot X is corrupt: file "blocks/000000000064": chunk c: checksum mismatch"#);
        assert!(m.ends_with("(the block at volume offset 209715200 = 200 MiB)"), "{m}");
        assert_eq!(with_block_offset("file \"PG_VERSION\": x"), "file \"PG_VERSION\": x");
        assert_eq!(block_index("etc/passwd"), None);
    }

    #[test]
    fn sparse_files_report_their_data_extents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).read(true).open(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 10 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&f, 64 << 20);
        assert!(!ext.is_empty(), "the written range is data");
        assert!(ext.iter().any(|&(s, e)| s <= 10 << 20 && e >= (10 << 20) + 4096), "{ext:?}");
        let covered: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 64 << 20, "holes are reported: {ext:?}");
    }

    #[test]
    fn blocks_read_the_same_direct_or_cached_up_to_an_unaligned_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        // Two whole blocks and a last one of 5000 bytes (an image size no sector divides).
        let size = 2 * BLOCK as usize + 5000;
        let content: Vec<u8> = (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
        std::fs::write(&p, &content).unwrap();
        for asked in [true, false] {
            let f = File::open(&p).unwrap();
            let mut direct = asked && set_direct(&f, true);
            assert_eq!(direct, asked && fs_takes_direct(&p), "O_DIRECT exactly when asked and possible");
            for i in 0..3u64 {
                let off = i * BLOCK;
                let len = BLOCK.min(size as u64 - off) as usize;
                let b = Block(Arc::new(read_block(&f, &mut direct, off, len).unwrap()));
                assert!(b.as_ref() == &content[off as usize..off as usize + len], "block {i}, direct asked: {asked}");
            }
            // A volume that ends before the block does: an error naming where, not short data.
            let err = read_block(&f, &mut direct, 3 * BLOCK, BLOCK as usize).err().expect("past the end");
            assert!(err.to_string().contains("ended"), "{err}");
        }
    }

    fn fs_takes_direct(p: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(p).is_ok()
    }

    #[test]
    fn a_volume_that_shrinks_while_it_is_read_fails_the_backup() {
        // An image that shrank after it was sized: what is left is read (and handed on), the
        // missing tail is not taken for holes, and the read fails naming both sizes.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![7u8; 3 * BLOCK as usize]).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let err = read_volume(File::open(&p).unwrap(), 5 * BLOCK, true, tx).err().expect("the volume is short");
        let msg = err.to_string();
        assert!(msg.contains("changed size") && msg.contains(&(3 * BLOCK).to_string()), "{msg}");
        let mut sent = Vec::new();
        while let Ok((i, _)) = rx.try_recv() {
            sent.push(i);
        }
        assert_eq!(sent, vec![0, 1, 2]);
    }
}
