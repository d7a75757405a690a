//! Restored bytes land in aligned buffers and go to disk with `O_DIRECT`; large source
//! files are read the same way ([`DirectReader`]).
//!
//! Each download batch is decrypted straight into an [`Extent`]: a pooled buffer whose
//! start is aligned in memory *and* corresponds to an aligned file offset, so the writer can
//! hand most of it to the disk as is, with no copy and without passing through the page
//! cache. On the machines we measure, filling fresh page-cache pages costs more CPU than
//! decrypting and hashing the same bytes, and a restore of gigabytes would also evict the
//! data the host is actually using. Filesystems that refuse `O_DIRECT` (tmpfs, some FUSE and
//! network filesystems) get ordinary buffered writes of the same bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};

/// Offsets, lengths and buffer addresses of direct writes are multiples of this. 4 KiB
/// satisfies every logical block size Linux filesystems use for `O_DIRECT` in practice; a
/// filesystem that wants more fails a write with `EINVAL` and we fall back.
pub const ALIGN: usize = 4096;

/// Buffers kept for reuse; more than the restore pipeline holds at once.
const POOL_KEEP: usize = 16;

/// Reusable extent buffers: reusing warm memory avoids zeroing and faulting in fresh pages
/// for every batch.
#[derive(Default)]
pub struct ExtentPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl ExtentPool {
    /// An extent for `len` bytes that start at file offset `file_offset`.
    pub fn extent(self: &Arc<Self>, file_offset: u64, len: usize) -> Extent {
        let lead = (file_offset % ALIGN as u64) as usize;
        // Room for the lead, the data, and the slack needed to align the start in memory.
        let need = lead + len + ALIGN;
        let reused = {
            let mut free = self.free.lock().expect("pool lock");
            // Best fit: a small file's batch must not take the buffer a large one needs.
            let fit = free.iter().enumerate().filter(|(_, b)| b.len() >= need).min_by_key(|(_, b)| b.len());
            fit.map(|(i, _)| i).map(|i| free.swap_remove(i))
        };
        // Sizes rounded up so that buffers fit later batches of slightly different shapes.
        let buf = reused.unwrap_or_else(|| vec![0u8; need.next_multiple_of(1 << 20)]);
        let base = buf.as_ptr().align_offset(ALIGN);
        Extent { buf, base, lead, len, file_offset, pool: Arc::clone(self) }
    }
}

/// `len` bytes of a file starting at `file_offset`, held at `buf[base + lead..]` where
/// `buf[base..]` is aligned in memory and `file_offset - lead` is aligned in the file.
pub struct Extent {
    buf: Vec<u8>,
    base: usize,
    lead: usize,
    len: usize,
    file_offset: u64,
    pool: Arc<ExtentPool>,
}

impl Extent {
    pub fn data(&self) -> &[u8] {
        &self.buf[self.base + self.lead..self.base + self.lead + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.base + self.lead..self.base + self.lead + self.len]
    }

    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }
}

impl Drop for Extent {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().expect("pool lock");
        if free.len() < POOL_KEEP {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Where restored extents go, in file order.
pub trait ExtentSink {
    fn write_extent(&mut self, e: &mut Extent) -> io::Result<()>;
}

/// Any writer, for restores that stream a file somewhere other than a new file on disk.
pub struct Plain<W>(pub W);

impl<W: Write> ExtentSink for Plain<W> {
    fn write_extent(&mut self, e: &mut Extent) -> io::Result<()> {
        self.0.write_all(e.data())
    }
}

/// Files at least this large are read with `O_DIRECT` by [`DirectReader::open`]; smaller
/// ones are one or two reads either way and stay in the page cache like any other file.
pub const DIRECT_READ_MIN: u64 = 1 << 20;

/// A file read from start to end, with `O_DIRECT` when it is large and the filesystem
/// allows it: the disk fills the caller's buffer and no page-cache page is touched.
///
/// Measured on the benchmark VM, reading 671 MB through the page cache right after other
/// work had churned it cost 1.2-1.4 CPU-seconds of kernel copying (against 0.06 s direct),
/// on a backup that is CPU-bound; and a backup should not evict the pages of the database it
/// runs next to. A direct read needs an aligned buffer, length and file offset: a read that
/// does not have them (a caller's odd-sized buffer, the position after a short read at the
/// end of the file) switches the file to ordinary buffered reads for good, as does a
/// filesystem that refuses `O_DIRECT` (tmpfs, some FUSE and network filesystems). Reads see
/// what the kernel holds: a direct read first writes back dirty cached pages of its range,
/// so a file another process is writing through the page cache reads as with `read(2)`.
pub struct DirectReader {
    file: File,
    direct: bool,
    pos: u64,
}

impl DirectReader {
    /// Opens `path` for reading, direct when `direct` is asked for and the file is at least
    /// [`DIRECT_READ_MIN`] bytes.
    pub fn open(path: &Path, direct: bool) -> io::Result<DirectReader> {
        let file = File::open(path)?;
        // A filesystem without O_DIRECT refuses the flag here (or at the first read).
        let direct = direct && file.metadata()?.len() >= DIRECT_READ_MIN && set_direct(&file, true);
        Ok(DirectReader { file, direct, pos: 0 })
    }

    /// Whether the next read goes past the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

impl Read for DirectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = read_at(&self.file, &mut self.direct, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// One read of `file` at `at` into `buf`. While `*direct`, the read goes past the page
/// cache in whole aligned units (the aligned prefix of `buf`); a read that cannot be direct
/// (`buf` or `at` not aligned, or `EINVAL`: the filesystem wants another alignment) turns
/// `O_DIRECT` off on the file and `*direct` to false for good, and is done buffered.
pub fn read_at(file: &File, direct: &mut bool, buf: &mut [u8], at: u64) -> io::Result<usize> {
    if *direct {
        let whole = buf.len() / ALIGN * ALIGN;
        if whole > 0 && buf.as_ptr().align_offset(ALIGN) == 0 && at.is_multiple_of(ALIGN as u64) {
            match file.read_at(&mut buf[..whole], at) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        if !set_direct(file, false) {
            return Err(io::Error::other("could not turn O_DIRECT off"));
        }
        *direct = false;
    }
    file.read_at(buf, at)
}

/// Turns `O_DIRECT` on or off for an open file; false when the filesystem refuses it.
pub fn set_direct(file: &File, on: bool) -> bool {
    let Ok(flags) = fcntl_getfl(file) else { return false };
    let flags = if on { flags | OFlags::DIRECT } else { flags - OFlags::DIRECT };
    fcntl_setfl(file, flags).is_ok()
}

/// A read buffer whose usable part starts at an [`ALIGN`]ed address, so that a
/// [`DirectReader`] can fill it without a bounce copy.
pub struct AlignedBuf {
    buf: Vec<u8>,
    base: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` usable bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + ALIGN];
        let base = buf.as_ptr().align_offset(ALIGN);
        AlignedBuf { buf, base, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.base..self.base + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.base..self.base + self.len]
    }
}

/// Aligned buffers of one size kept for reuse, at most `keep` of them: warm memory instead
/// of fresh pages zeroed and faulted in for every use. Usable as a `static`.
pub struct AlignedPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<AlignedBuf>>,
}

impl AlignedPool {
    pub const fn new(size: usize, keep: usize) -> AlignedPool {
        AlignedPool { size, keep, free: Mutex::new(Vec::new()) }
    }

    /// A buffer of the pool's size (its contents are whatever the last user left).
    pub fn take(&self) -> AlignedBuf {
        self.free.lock().expect("buffer pool").pop().unwrap_or_else(|| AlignedBuf::new(self.size))
    }

    /// Returns `buf` for reuse (dropped when the pool is full or it is another size).
    pub fn give(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().expect("buffer pool");
        if free.len() < self.keep && buf.len() == self.size {
            free.push(buf);
        }
    }
}

/// A new file written from start to end. `finish` returns it at its exact length, ready to
/// be fsynced.
pub struct RestoreFile {
    file: File,
    direct: bool,
    /// Bytes of the file already on disk; aligned while `direct`.
    written: u64,
    /// The partial block after `written` (direct mode): `tail[tail_base..tail_base + tail_len]`.
    tail: Vec<u8>,
    tail_base: usize,
    tail_len: usize,
}

impl RestoreFile {
    /// Creates (or truncates) `path`; with `direct`, opened `O_DIRECT` if the filesystem
    /// allows it.
    pub fn create(path: &Path, direct: bool) -> io::Result<RestoreFile> {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if !direct {
            return Ok(RestoreFile::new(opts.open(path)?, false));
        }
        match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Ok(RestoreFile::new(f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(RestoreFile::new(opts.open(path)?, false)),
            Err(e) => Err(e),
        }
    }

    fn new(file: File, direct: bool) -> RestoreFile {
        let tail = vec![0u8; 2 * ALIGN];
        let tail_base = tail.as_ptr().align_offset(ALIGN);
        RestoreFile { file, direct, written: 0, tail, tail_base, tail_len: 0 }
    }

    /// Writes `bytes` at `at`: directly if we can (both aligned), else through the page
    /// cache, switching the file over for good if the filesystem refuses our alignment.
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(bytes, at);
        }
        match self.file.write_all_at(bytes, at) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let flags = fcntl_getfl(&self.file)?;
                fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
                self.direct = false;
                self.file.write_all_at(bytes, at)
            }
            other => other,
        }
    }

    /// Flushes the partial block and returns the file at its exact length.
    pub fn finish(mut self) -> io::Result<File> {
        if self.tail_len > 0 {
            let (base, len) = (self.tail_base, self.tail_len);
            let mut tail = std::mem::take(&mut self.tail);
            tail[base + len..base + ALIGN].fill(0);
            let at = self.written;
            if self.direct {
                self.write_at(&tail[base..base + ALIGN], at)?;
                // The zero padding past the end is cut off again.
                self.file.set_len(at + len as u64)?;
            } else {
                self.file.write_all_at(&tail[base..base + len], at)?;
            }
            self.written += len as u64;
            self.tail_len = 0;
        }
        Ok(self.file)
    }
}

impl ExtentSink for RestoreFile {
    fn write_extent(&mut self, e: &mut Extent) -> io::Result<()> {
        let expected = self.written + self.tail_len as u64;
        if e.file_offset != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("extent at offset {} written where {expected} was expected", e.file_offset),
            ));
        }
        if !self.direct {
            self.file.write_all_at(e.data(), expected)?;
            self.written += e.len as u64;
            return Ok(());
        }
        // Direct: the extent's lead is exactly our partial block. Put it in front of the new
        // bytes, write every whole block, keep the rest as the next partial block.
        debug_assert_eq!(e.lead, self.tail_len);
        let (base, lead, len) = (e.base, e.lead, e.len);
        e.buf[base..base + lead].copy_from_slice(&self.tail[self.tail_base..self.tail_base + lead]);
        let total = lead + len;
        let whole = total / ALIGN * ALIGN;
        let at = self.written;
        if whole > 0 {
            self.write_at(&e.buf[base..base + whole], at)?;
            if !self.direct {
                // Fell back during that write: the rest goes through the page cache too.
                self.file.write_all_at(&e.buf[base + whole..base + total], at + whole as u64)?;
                self.written = at + total as u64;
                self.tail_len = 0;
                return Ok(());
            }
        }
        self.written = at + whole as u64;
        self.tail_len = total - whole;
        let tb = self.tail_base;
        self.tail[tb..tb + self.tail_len].copy_from_slice(&e.buf[base + whole..base + total]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn write_pieces(mut f: RestoreFile, sizes: &[usize]) -> (File, Vec<u8>) {
        let pool = Arc::new(ExtentPool::default());
        let mut expected = Vec::new();
        for (i, &s) in sizes.iter().enumerate() {
            let piece = pattern(s, i as u8);
            let mut e = pool.extent(expected.len() as u64, s);
            e.data_mut().copy_from_slice(&piece);
            f.write_extent(&mut e).unwrap();
            expected.extend_from_slice(&piece);
        }
        (f.finish().unwrap(), expected)
    }

    #[test]
    fn writes_exact_content_at_any_length() {
        for sizes in [
            &[][..],
            &[1],
            &[ALIGN],
            &[ALIGN + 1, 3],
            &[4 << 20],
            &[(4 << 20) - 1, 2, ALIGN * 3 + 5],
            &[700_000, 1_300_000, 5_000_000, 17, 0, 4095],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let (file, expected) = write_pieces(RestoreFile::create(&path, true).unwrap(), sizes);
            file.sync_all().unwrap();
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), expected.len(), "length for sizes {sizes:?}");
            assert!(got == expected, "content differs for sizes {sizes:?}");
        }
    }

    #[test]
    fn buffered_mode_writes_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = RestoreFile::create(&path, false).unwrap();
        assert!(!file.direct, "asked for buffered writes");
        let (_, expected) = write_pieces(file, &[5000, 4 << 20, 123]);
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn an_extent_out_of_order_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RestoreFile::create(&dir.path().join("f"), true).unwrap();
        let pool = Arc::new(ExtentPool::default());
        let err = f.write_extent(&mut pool.extent(10, 5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// Reads `path` to the end with `reader`, `step` bytes of `buf` at a time.
    fn read_all(mut reader: DirectReader, buf: &mut [u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let n = reader.read(&mut buf[..step]).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn direct_reads_return_the_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for len in [DIRECT_READ_MIN as usize, 3 * (1 << 20) + 123, (2 << 20) + ALIGN] {
            let path = dir.path().join(format!("f{len}"));
            let content = pattern(len, 7);
            std::fs::write(&path, &content).unwrap();
            let reader = DirectReader::open(&path, true).unwrap();
            // Direct exactly when the filesystem under the temporary directory takes it
            // (ext4 does; tmpfs before Linux 6.6 does not).
            let supported = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).is_ok();
            assert_eq!(reader.is_direct(), supported, "a {len}-byte file on {}", dir.path().display());
            let mut buf = AlignedBuf::new(1 << 20);
            let got = read_all(reader, buf.as_mut_slice(), 1 << 20);
            assert_eq!(got.len(), len);
            assert!(got == content, "content of the {len}-byte file");
        }
    }

    #[test]
    fn unaligned_reads_fall_back_to_the_page_cache_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content = pattern(5 << 20, 3);
        std::fs::write(&path, &content).unwrap();
        // An aligned first read, then odd-sized ones from an unaligned position.
        let mut reader = DirectReader::open(&path, true).unwrap();
        let mut buf = AlignedBuf::new(1 << 20);
        let mut got = vec![0u8; ALIGN * 2];
        assert_eq!(reader.read(&mut buf.as_mut_slice()[..ALIGN * 2]).unwrap(), ALIGN * 2);
        got.copy_from_slice(&buf.as_slice()[..ALIGN * 2]);
        got.extend(read_all(reader, &mut buf.as_mut_slice()[1..], 10_007));
        assert!(got == content);
        // A buffer that is not aligned in memory from the start.
        let reader = DirectReader::open(&path, true).unwrap();
        assert!(read_all(reader, &mut buf.as_mut_slice()[5..], 1 << 19) == content);
    }

    #[test]
    fn small_files_are_read_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, pattern(8192, 1)).unwrap();
        let reader = DirectReader::open(&path, true).unwrap();
        assert!(!reader.is_direct());
        let mut buf = AlignedBuf::new(1 << 20);
        assert!(read_all(reader, buf.as_mut_slice(), 1 << 20) == pattern(8192, 1));
        // Nor are large ones when the caller says so.
        std::fs::write(&path, pattern(2 << 20, 1)).unwrap();
        let reader = DirectReader::open(&path, false).unwrap();
        assert!(!reader.is_direct());
        assert!(read_all(reader, buf.as_mut_slice(), 1 << 20) == pattern(2 << 20, 1));
    }
}
