//! Pack files: many encrypted chunks of one asset, sealed with an index footer.
//!
//! ```text
//! "COFFPK01"                       magic and format version
//! u16 asset length, asset name     (UTF-8)
//! chunk data ...                   stored chunks back to back, as the agent sent them
//! index: count × 48 bytes          chunk id [32], offset u64, length u32, CRC-32C u32
//! trailer, 32 bytes                index offset u64, count u32, CRC-32C of index u32,
//!                                  reserved u64 (0), "COFFPKE1"
//! ```
//!
//! All integers are little-endian. CRC-32C (hardware-accelerated) guards each chunk against
//! bit rot and lets `verify` check a repository without any keys; the chunks' AEAD tags,
//! checked by agents on restore, are the cryptographic integrity. A pack is written under
//! `tmp/`, fsynced and renamed into `packs/`, so a partial pack is never visible.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use coffer_common::crypto::ChunkId;
use rustix::buffer::spare_capacity;

use super::{StoreError, random_hex, sync_dir};

pub const PACK_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"COFFPK01";
const END_MAGIC: &[u8; 8] = b"COFFPKE1";
const ENTRY_LEN: usize = 48;
const TRAILER_LEN: usize = 32;
/// Sanity bound on entries per pack (checked before allocating the index).
const MAX_ENTRIES: u32 = 1 << 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: ChunkId,
    pub offset: u64,
    pub length: u32,
    pub crc: u32,
}

#[derive(Debug, Clone)]
pub struct SealedPack {
    pub id: String,
    pub asset: String,
    pub size: u64,
    pub entries: Vec<Entry>,
}

/// Appends chunks to a new pack under `tmp/`; `seal` makes it durable and visible.
pub struct PackWriter {
    id: String,
    asset: String,
    tmp: PathBuf,
    file: BufWriter<File>,
    offset: u64,
    entries: Vec<Entry>,
}

impl PackWriter {
    pub fn create(tmp_dir: &Path, asset: &str) -> Result<PackWriter, StoreError> {
        let id = random_hex(16);
        let tmp = tmp_dir.join(format!("{id}.pack.tmp"));
        let f = File::create(&tmp).map_err(StoreError::io(format!("creating {}", tmp.display())))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        let mut header = Vec::with_capacity(10 + asset.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(asset.len() as u16).to_le_bytes());
        header.extend_from_slice(asset.as_bytes());
        file.write_all(&header).map_err(StoreError::io(format!("writing {}", tmp.display())))?;
        Ok(PackWriter { id, asset: asset.to_string(), tmp, file, offset: header.len() as u64, entries: Vec::new() })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn append(&mut self, id: ChunkId, data: &[u8]) -> Result<Entry, StoreError> {
        self.file.write_all(data).map_err(StoreError::io(format!("writing pack {}", self.id)))?;
        let e = Entry { id, offset: self.offset, length: data.len() as u32, crc: crc32c::crc32c(data) };
        self.offset += data.len() as u64;
        self.entries.push(e);
        Ok(e)
    }

    /// Writes the index, fsyncs, and renames the pack into `packs/`. On error the temporary
    /// file is removed and nothing becomes visible.
    pub fn seal(mut self, pack_path: impl Fn(&str) -> PathBuf) -> Result<SealedPack, StoreError> {
        let dest = pack_path(&self.id);
        let result = self.seal_inner(&dest);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.map(|size| SealedPack { id: self.id, asset: self.asset, size, entries: self.entries })
    }

    fn seal_inner(&mut self, dest: &Path) -> Result<u64, StoreError> {
        let io = |what: &str| StoreError::io(format!("{what} pack {}", self.id));
        let index = encode_index(&self.entries);
        let mut trailer = Vec::with_capacity(TRAILER_LEN);
        trailer.extend_from_slice(&self.offset.to_le_bytes());
        trailer.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        trailer.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        trailer.extend_from_slice(&0u64.to_le_bytes());
        trailer.extend_from_slice(END_MAGIC);
        self.file.write_all(&index).map_err(io("writing"))?;
        self.file.write_all(&trailer).map_err(io("writing"))?;
        self.file.flush().map_err(io("writing"))?;
        self.file.get_ref().sync_all().map_err(io("syncing"))?;
        let dir = dest.parent().expect("pack paths have a parent");
        std::fs::create_dir_all(dir).map_err(io("creating directory for"))?;
        std::fs::rename(&self.tmp, dest).map_err(io("renaming"))?;
        sync_dir(dir)?;
        Ok(self.offset + index.len() as u64 + TRAILER_LEN as u64)
    }

    /// Drops the unsealed pack.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn encode_index(entries: &[Entry]) -> Vec<u8> {
    let mut index = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        index.extend_from_slice(&e.id.0);
        index.extend_from_slice(&e.offset.to_le_bytes());
        index.extend_from_slice(&e.length.to_le_bytes());
        index.extend_from_slice(&e.crc.to_le_bytes());
    }
    index
}

/// Reads the asset name and index of a sealed pack, checking its framing and index checksum.
pub fn read_index(path: &Path) -> Result<(String, Vec<Entry>, u64), StoreError> {
    let what = path.display().to_string();
    let corrupt = |d: &str| StoreError::Corrupt { what: what.clone(), detail: d.to_string() };
    let mut f = File::open(path).map_err(StoreError::io(format!("opening {what}")))?;
    let len = f.metadata().map_err(StoreError::io(format!("stat {what}")))?.len();
    if len < (10 + TRAILER_LEN) as u64 {
        return Err(corrupt("too short to be a pack"));
    }
    let mut head = [0u8; 10];
    f.read_exact(&mut head).map_err(StoreError::io(format!("reading {what}")))?;
    if &head[..8] != MAGIC {
        return Err(corrupt("bad magic (not a pack, or an unsupported format)"));
    }
    let alen = u16::from_le_bytes([head[8], head[9]]) as usize;
    let mut asset = vec![0u8; alen];
    f.read_exact(&mut asset).map_err(StoreError::io(format!("reading {what}")))?;
    let asset = String::from_utf8(asset).map_err(|_| corrupt("asset name is not UTF-8"))?;
    let mut trailer = [0u8; TRAILER_LEN];
    f.seek(SeekFrom::End(-(TRAILER_LEN as i64))).map_err(StoreError::io(format!("seeking {what}")))?;
    f.read_exact(&mut trailer).map_err(StoreError::io(format!("reading {what}")))?;
    if &trailer[24..] != END_MAGIC {
        return Err(corrupt("bad trailer magic (truncated?)"));
    }
    let index_off = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(trailer[8..12].try_into().expect("4 bytes"));
    let index_crc = u32::from_le_bytes(trailer[12..16].try_into().expect("4 bytes"));
    let index_len = count as u64 * ENTRY_LEN as u64;
    if count > MAX_ENTRIES || index_off.checked_add(index_len + TRAILER_LEN as u64) != Some(len) {
        return Err(corrupt("index bounds do not match the file size"));
    }
    let mut index = vec![0u8; index_len as usize];
    f.read_exact_at(&mut index, index_off).map_err(StoreError::io(format!("reading {what}")))?;
    if crc32c::crc32c(&index) != index_crc {
        return Err(corrupt("index checksum mismatch"));
    }
    let entries = index
        .chunks_exact(ENTRY_LEN)
        .map(|e| Entry {
            id: ChunkId(e[..32].try_into().expect("32 bytes")),
            offset: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(e[44..48].try_into().expect("4 bytes")),
        })
        .collect::<Vec<_>>();
    if entries.iter().any(|e| e.offset + e.length as u64 > index_off) {
        return Err(corrupt("an index entry points past the chunk data"));
    }
    Ok((asset, entries, len))
}

/// Reads one stored chunk and checks its CRC-32C.
pub fn read_chunk(file: &File, pack_id: &str, e: &Entry) -> Result<Vec<u8>, StoreError> {
    let len = e.length as usize;
    // Read into spare capacity: zeroing the buffer first would cost as much as the read.
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = e.offset + buf.len() as u64;
        let n = match rustix::io::pread(file, spare_capacity(&mut buf), at) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(StoreError::Io { context: format!("reading pack {pack_id}"), source: err.into() }),
        };
        if n == 0 {
            return Err(StoreError::Corrupt {
                what: format!("chunk {} in pack {pack_id} at offset {}", e.id, e.offset),
                detail: "pack file is shorter than its index says".into(),
            });
        }
    }
    if crc32c::crc32c(&buf) != e.crc {
        return Err(StoreError::Corrupt {
            what: format!("chunk {} in pack {pack_id} at offset {}", e.id, e.offset),
            detail: "checksum mismatch (bit rot or tampering)".into(),
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let packs = dir.path().join("packs");
        (dir, packs)
    }

    #[test]
    fn write_seal_read_round_trip() {
        let (dir, packs) = setup();
        let mut w = PackWriter::create(&dir.path().join("tmp"), "git/a").unwrap();
        let chunks: Vec<(ChunkId, Vec<u8>)> =
            (0..10u8).map(|i| (ChunkId([i; 32]), vec![i; 1000 + i as usize])).collect();
        for (id, d) in &chunks {
            w.append(*id, d).unwrap();
        }
        let sealed = w.seal(|id| packs.join(format!("{id}.pack"))).unwrap();
        let path = packs.join(format!("{}.pack", sealed.id));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), sealed.size);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let (asset, entries, _) = read_index(&path).unwrap();
        assert_eq!(asset, "git/a");
        assert_eq!(entries, sealed.entries);
        let f = File::open(&path).unwrap();
        for ((_, d), e) in chunks.iter().zip(&entries) {
            assert_eq!(&read_chunk(&f, &sealed.id, e).unwrap(), d);
        }
    }

    #[test]
    fn flipped_bytes_are_found() {
        let (dir, packs) = setup();
        let mut w = PackWriter::create(&dir.path().join("tmp"), "git/a").unwrap();
        w.append(ChunkId([1; 32]), &[7u8; 4096]).unwrap();
        let sealed = w.seal(|id| packs.join(format!("{id}.pack"))).unwrap();
        let path = packs.join(format!("{}.pack", sealed.id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, entries, _) = read_index(&path).unwrap();
        let err = read_chunk(&File::open(&path).unwrap(), &sealed.id, &entries[0]).unwrap_err();
        assert!(err.to_string().contains(&ChunkId([1; 32]).to_hex()), "{err}");
        // A flipped byte in the index is caught by the index checksum.
        bytes[100] ^= 1;
        let n = bytes.len();
        bytes[n - TRAILER_LEN - 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_index(&path).unwrap_err().to_string().contains("index checksum"));
        // Truncation is caught by the trailer.
        std::fs::write(&path, &bytes[..n - 5]).unwrap();
        assert!(read_index(&path).is_err());
    }

    #[test]
    fn unsealed_packs_are_invisible() {
        let (dir, packs) = setup();
        let mut w = PackWriter::create(&dir.path().join("tmp"), "git/a").unwrap();
        w.append(ChunkId([1; 32]), b"abc").unwrap();
        w.discard();
        assert!(!packs.exists() || std::fs::read_dir(&packs).unwrap().count() == 0);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
