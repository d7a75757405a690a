//! Delta snapshots: a new RDB stored as a patch against the RDB of an earlier full snapshot.
//!
//! An RDB lists keys in hash-table order and rewrites every key on each save, so when 1% of
//! the keys change the changes fall in nearly every content-defined chunk and chunk dedup
//! stores about half the RDB again. A patch stores only what differs: the new RDB is cut
//! into segments of [`SEGMENT`] bytes and each is compressed by zstd with the matching
//! region of the base RDB (plus [`SLACK`] on either side) as a reference prefix, so bytes
//! equal to the base cost a few bytes of match description.
//!
//! A delta snapshot holds two files: [`BASE_PATH`], the base snapshot's RDB file entry
//! reused as is (its chunks are stored already, and because the new manifest references
//! them, retention keeps them while the delta exists; the base snapshot itself may expire),
//! and [`PATCH_PATH`]. Its source metadata names the base and records the new RDB's size
//! and SHA-256, which the restore checks after applying the patch. Deltas are always one
//! level deep: the next delta patches against the same base, until a full snapshot is due.
//!
//! Patch format: the 8-byte magic `CFRDBP01`, then per segment a header of little-endian
//! `base_offset: u64, base_len: u32, out_len: u32, frame_len: u32` and one zstd frame that
//! decompresses to `out_len` bytes with `base[base_offset..][..base_len]` as its prefix.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use coffer_common::crypto::FileHasher;
use zstd::zstd_safe::{CCtx, CParameter, DCtx, DParameter};

/// The base RDB inside a delta snapshot.
pub const BASE_PATH: &str = "base.rdb";
/// The patch inside a delta snapshot.
pub const PATCH_PATH: &str = "dump.rdb.patch";
const MAGIC: &[u8; 8] = b"CFRDBP01";
/// New RDB bytes per patch frame.
pub const SEGMENT: usize = 8 << 20;
/// Base bytes before and after the aligned region that a segment may match against.
pub const SLACK: u64 = 4 << 20;
/// zstd window: covers the prefix (at most `SEGMENT + 2 * SLACK`) plus the segment.
const WINDOW_LOG: u32 = 25;
const LEVEL: i32 = 3;
const HEADER_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    #[error("{context}: {source}")]
    Io { context: &'static str, source: io::Error },
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("the patch is malformed: {0}")]
    Malformed(String),
}

fn zstd_err(code: usize) -> DeltaError {
    DeltaError::Zstd(zstd::zstd_safe::get_error_name(code))
}

/// What a finished patch recorded about the new RDB.
#[derive(Debug, Clone, Default)]
pub struct PatchSummary {
    pub rdb_bytes: u64,
    pub rdb_sha256: String,
    pub patch_bytes: u64,
}

/// Reads an RDB stream and yields its patch against `base`. `expected_len`, when the
/// stream's length is known up front, spreads any growth or shrinkage of the RDB evenly
/// when aligning segments with the base.
pub struct PatchReader<R> {
    input: R,
    base: File,
    base_len: u64,
    expected_len: Option<u64>,
    consumed: u64,
    segment: Vec<u8>,
    prefix: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    hasher: Option<FileHasher>,
    patch_bytes: u64,
    summary: Arc<Mutex<Option<PatchSummary>>>,
}

impl<R: Read> PatchReader<R> {
    pub fn new(
        input: R,
        base: File,
        expected_len: Option<u64>,
    ) -> io::Result<(Self, Arc<Mutex<Option<PatchSummary>>>)> {
        let base_len = base.metadata()?.len();
        let summary = Arc::new(Mutex::new(None));
        let reader = PatchReader {
            input,
            base,
            base_len,
            expected_len,
            consumed: 0,
            segment: Vec::with_capacity(SEGMENT),
            prefix: Vec::new(),
            out: MAGIC.to_vec(),
            out_pos: 0,
            hasher: Some(FileHasher::default()),
            patch_bytes: MAGIC.len() as u64,
            summary: summary.clone(),
        };
        Ok((reader, summary))
    }

    /// Reads the next segment and encodes it into `out`; false at the end of the input.
    fn next_frame(&mut self) -> io::Result<bool> {
        self.segment.resize(SEGMENT, 0);
        let filled = read_full(&mut self.input, &mut self.segment)?;
        self.segment.truncate(filled);
        if filled == 0 {
            return Ok(false);
        }
        if let Some(h) = &mut self.hasher {
            h.update(&self.segment);
        }
        let center = match self.expected_len {
            Some(n) if n > 0 => (u128::from(self.consumed) * u128::from(self.base_len) / u128::from(n)) as u64,
            _ => self.consumed,
        };
        let start = center.saturating_sub(SLACK).min(self.base_len);
        let end = (center + filled as u64 + SLACK).min(self.base_len);
        self.prefix.resize((end - start) as usize, 0);
        self.base.read_exact_at(&mut self.prefix, start)?;
        self.consumed += filled as u64;

        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(filled));
        let mut c = CCtx::create();
        let params = [
            CParameter::CompressionLevel(LEVEL),
            CParameter::WindowLog(WINDOW_LOG),
            CParameter::EnableLongDistanceMatching(true),
        ];
        for p in params {
            c.set_parameter(p).map_err(|code| io::Error::other(zstd_err(code)))?;
        }
        c.ref_prefix(&self.prefix).map_err(|code| io::Error::other(zstd_err(code)))?;
        c.compress2(&mut frame, &self.segment).map_err(|code| io::Error::other(zstd_err(code)))?;

        self.out.clear();
        self.out.extend_from_slice(&start.to_le_bytes());
        self.out.extend_from_slice(&((end - start) as u32).to_le_bytes());
        self.out.extend_from_slice(&(filled as u32).to_le_bytes());
        self.out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&frame);
        self.out_pos = 0;
        self.patch_bytes += self.out.len() as u64;
        Ok(true)
    }
}

impl<R: Read> Read for PatchReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_pos == self.out.len() {
            if self.hasher.is_none() {
                return Ok(0);
            }
            if !self.next_frame()? {
                let sha = self.hasher.take().expect("checked above").finish();
                *self.summary.lock().expect("summary lock") = Some(PatchSummary {
                    rdb_bytes: self.consumed,
                    rdb_sha256: hex::encode(sha),
                    patch_bytes: self.patch_bytes,
                });
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.out_pos);
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

/// Rebuilds the RDB from `base` and `patch` into `out`; returns its size and SHA-256 (hex)
/// for the caller to compare with the manifest.
pub fn apply(base: &File, patch: impl Read, out: &mut impl Write) -> Result<(u64, String), DeltaError> {
    let io_err = |context| move |source| DeltaError::Io { context, source };
    let base_len = base.metadata().map_err(io_err("reading the base RDB's size"))?.len();
    let mut patch = io::BufReader::with_capacity(1 << 20, patch);
    let mut magic = [0u8; 8];
    patch.read_exact(&mut magic).map_err(io_err("reading the patch"))?;
    if &magic != MAGIC {
        return Err(DeltaError::Malformed("it does not start with the patch magic".into()));
    }
    let (mut prefix, mut frame, mut seg) = (Vec::new(), Vec::new(), Vec::with_capacity(SEGMENT));
    let mut hasher = FileHasher::default();
    let mut total = 0u64;
    loop {
        let mut header = [0u8; HEADER_LEN];
        match read_full(&mut patch, &mut header).map_err(io_err("reading the patch"))? {
            0 => break,
            HEADER_LEN => {}
            n => return Err(DeltaError::Malformed(format!("it ends inside a segment header ({n} bytes)"))),
        }
        let start = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
        let base_n = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        let out_n = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
        let frame_n = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
        if out_n == 0 || out_n > SEGMENT {
            return Err(DeltaError::Malformed(format!("segment at {total} has {out_n} bytes")));
        }
        if base_n > SEGMENT + 2 * SLACK as usize || start.checked_add(base_n as u64).is_none_or(|e| e > base_len) {
            return Err(DeltaError::Malformed(format!(
                "segment at {total} refers to base bytes {start}+{base_n} of {base_len}"
            )));
        }
        if frame_n > zstd::zstd_safe::compress_bound(SEGMENT) {
            return Err(DeltaError::Malformed(format!("segment at {total} has a {frame_n}-byte frame")));
        }
        frame.resize(frame_n, 0);
        patch.read_exact(&mut frame).map_err(io_err("reading the patch"))?;
        prefix.resize(base_n, 0);
        base.read_exact_at(&mut prefix, start).map_err(io_err("reading the base RDB"))?;
        seg.clear();
        let mut d = DCtx::create();
        d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG)).map_err(zstd_err)?;
        d.ref_prefix(&prefix).map_err(zstd_err)?;
        let got = d.decompress(&mut seg, &frame).map_err(zstd_err)?;
        if got != out_n {
            return Err(DeltaError::Malformed(format!("segment at {total} decoded to {got} bytes, not {out_n}")));
        }
        hasher.update(&seg);
        out.write_all(&seg).map_err(io_err("writing the RDB"))?;
        total += out_n as u64;
    }
    Ok((total, hex::encode(hasher.finish())))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_testkit::random_bytes;

    fn patch_of(base: &[u8], new: &[u8], known_len: bool) -> (Vec<u8>, PatchSummary, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(base).unwrap();
        let file = f.reopen().unwrap();
        let expected = known_len.then_some(new.len() as u64);
        let (mut r, summary) = PatchReader::new(io::Cursor::new(new.to_vec()), file, expected).unwrap();
        let mut patch = Vec::new();
        r.read_to_end(&mut patch).unwrap();
        let s = summary.lock().unwrap().clone().unwrap();
        (patch, s, f)
    }

    #[test]
    fn small_changes_make_a_small_patch_that_rebuilds_the_new_file() {
        let base = random_bytes(20 << 20, 7);
        let mut new = base.clone();
        // Scattered edits, one insertion and one deletion: offsets drift both ways.
        for i in (1000..new.len()).step_by(1 << 20) {
            new[i..i + 64].copy_from_slice(&random_bytes(64, i as u64));
        }
        new.splice(5 << 20..5 << 20, random_bytes(3000, 1));
        new.drain(12 << 20..(12 << 20) + 5000);
        for known in [true, false] {
            let (patch, summary, f) = patch_of(&base, &new, known);
            assert!(patch.len() < new.len() / 100, "patch {} bytes for {} changed", patch.len(), new.len());
            assert_eq!(summary.patch_bytes, patch.len() as u64);
            assert_eq!(summary.rdb_bytes, new.len() as u64);
            let mut out = Vec::new();
            let (n, sha) = apply(&f.reopen().unwrap(), io::Cursor::new(&patch), &mut out).unwrap();
            assert_eq!(out, new);
            assert_eq!(n, new.len() as u64);
            assert_eq!(sha, summary.rdb_sha256);
            assert_eq!(sha, hex::encode(coffer_common::crypto::sha256(&new)));
        }
    }

    #[test]
    fn unrelated_data_still_round_trips() {
        let base = random_bytes(3 << 20, 1);
        let new = random_bytes(9 << 20, 2);
        let (patch, _, f) = patch_of(&base, &new, true);
        let mut out = Vec::new();
        apply(&f.reopen().unwrap(), io::Cursor::new(&patch), &mut out).unwrap();
        assert_eq!(out, new);
        // An empty input is a patch of just the magic, rebuilding an empty file.
        let (patch, s, f) = patch_of(&base, &[], true);
        assert_eq!(patch, MAGIC);
        assert_eq!(s.rdb_bytes, 0);
        let mut out = Vec::new();
        assert_eq!(apply(&f.reopen().unwrap(), io::Cursor::new(&patch), &mut out).unwrap().0, 0);
    }

    #[test]
    fn damaged_patches_and_wrong_bases_are_errors() {
        let base = random_bytes(2 << 20, 3);
        let mut new = base.clone();
        new[100..200].fill(0);
        let (patch, _, f) = patch_of(&base, &new, true);
        let bad = |p: &[u8], base: &File| apply(base, io::Cursor::new(p.to_vec()), &mut Vec::new()).unwrap_err();
        let file = f.reopen().unwrap();
        assert!(matches!(bad(&patch[..4], &file), DeltaError::Io { .. }));
        assert!(matches!(bad(b"NOTAPATCH", &file), DeltaError::Malformed(_)));
        assert!(matches!(bad(&patch[..MAGIC.len() + 7], &file), DeltaError::Malformed(_)));
        assert!(matches!(bad(&patch[..patch.len() - 1], &file), DeltaError::Io { .. }));
        let mut flipped = patch.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        let e = apply(&file, io::Cursor::new(flipped), &mut Vec::new());
        // A flipped frame byte is a zstd error or wrong output (caught by the caller's SHA-256).
        if let Ok((_, sha)) = e {
            assert_ne!(sha, hex::encode(coffer_common::crypto::sha256(&new)));
        }
        // A base shorter than the patch refers to.
        let short = tempfile::NamedTempFile::new().unwrap();
        short.as_file().write_all(&base[..1000]).unwrap();
        assert!(matches!(bad(&patch, short.as_file()), DeltaError::Malformed(_)));
    }
}
