//! Chunk ids, compression and encryption: everything between plaintext and the bytes the
//! coordinator stores.
//!
//! Stored chunk format, version 1:
//!
//! ```text
//! [0]      format version (1)
//! [1]      compression: 0 = none, 1 = zstd
//! [2..14]  96-bit random nonce
//! [14..]   AES-256-GCM(key = HKDF-SHA256(data key, "coffer-chunk-v1" || id),
//!                      aad = id || bytes[0..2]) of the (maybe compressed) plaintext, with tag
//! ```
//!
//! Every distinct plaintext gets its own key (its id is a keyed hash of it), and a key only
//! ever encrypts that one plaintext, a handful of times at most (a chunk is re-sealed only
//! when an upload is retried). The random nonce makes even those re-seals safe when their
//! bodies differ (another zstd version, or a chunk stored raw once and compressed once): no
//! key and nonce pair can repeat in practice. The coordinator deduplicates by chunk id, so
//! ciphertext need not be deterministic.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::{hkdf, hmac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::chunker::MAX_CHUNK_SIZE;

pub const CHUNK_FORMAT: u8 = 1;
const HEADER_LEN: usize = 2;
const NONCE_LEN: usize = 12;
/// Bytes before the ciphertext: format, compression, nonce.
const PREFIX_LEN: usize = HEADER_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Largest stored chunk: the largest plaintext, uncompressed, plus header, nonce and tag.
pub const MAX_STORED_CHUNK: usize = MAX_CHUNK_SIZE as usize + PREFIX_LEN + TAG_LEN;
/// Default zstd level for chunks: level 1 keeps compression off the critical path. Sources
/// whose data pays for more (database indexes) ask for a higher one per backup.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Keyed HMAC-SHA256 of a chunk's plaintext: storage never learns plaintext hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn from_slice(b: &[u8]) -> Option<ChunkId> {
        Some(ChunkId(b.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }

    /// First 12 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("chunk id must be 64 hex digits"))
    }
}

/// A 256-bit secret. No Clone, no Serialize; zeroized on drop; never printed.
#[derive(Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretKey(pub(crate) [u8; 32]);

impl SecretKey {
    pub fn generate() -> SecretKey {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).expect("the operating system's random source failed");
        SecretKey(k)
    }

    pub fn from_bytes(b: [u8; 32]) -> SecretKey {
        SecretKey(b)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Integrity failure of stored data: AEAD tag, checksum or hash mismatch. Names the object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("chunk {id} is corrupt or was tampered with: {detail}")]
    Tampered { id: ChunkId, detail: String },
    #[error("chunk {id} is {len} bytes, over the {max}-byte limit")]
    TooLarge { id: ChunkId, len: usize, max: usize },
}

/// Computes ids and seals/opens chunks for one asset. Cheap to share across threads.
pub struct ChunkCipher {
    id_key: hmac::Key,
    prk: hkdf::Prk,
}

impl fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkCipher(..)")
    }
}

/// HKDF output length marker for a 32-byte AES key.
struct KeyLen;
impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl ChunkCipher {
    pub fn new(id_key: &SecretKey, data_key: &SecretKey) -> ChunkCipher {
        ChunkCipher {
            id_key: hmac::Key::new(hmac::HMAC_SHA256, &id_key.0),
            // The data key is uniformly random, so it serves directly as the HKDF PRK.
            prk: hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &data_key.0),
        }
    }

    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        let tag = hmac::sign(&self.id_key, plaintext);
        ChunkId(tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes"))
    }

    fn chunk_key(&self, id: &ChunkId) -> LessSafeKey {
        let info = [b"coffer-chunk-v1".as_slice(), id.0.as_slice()];
        let okm = self.prk.expand(&info, KeyLen).expect("32 bytes is a valid HKDF length");
        let mut key = [0u8; 32];
        okm.fill(&mut key).expect("32 bytes is a valid HKDF length");
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32-byte key"));
        key.zeroize();
        k
    }

    /// Compresses (unless it does not help) and encrypts one chunk. Compression writes
    /// straight into the output buffer with a per-thread zstd context.
    pub fn seal(&self, id: &ChunkId, plaintext: &[u8]) -> Vec<u8> {
        self.seal_level(id, plaintext, DEFAULT_ZSTD_LEVEL)
    }

    /// [`ChunkCipher::seal`] at zstd `level` (the stored format is the same at any level).
    pub fn seal_level(&self, id: &ChunkId, plaintext: &[u8], level: i32) -> Vec<u8> {
        let bound = zstd::zstd_safe::compress_bound(plaintext.len());
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the operating system's random source failed");
        let mut out = std::io::Cursor::new(Vec::with_capacity(PREFIX_LEN + bound.max(plaintext.len()) + TAG_LEN));
        out.get_mut().extend_from_slice(&[CHUNK_FORMAT, 1]);
        out.get_mut().extend_from_slice(&nonce);
        out.set_position(PREFIX_LEN as u64);
        let compressed = COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            // Switching levels reuses the context (sources mix levels chunk by chunk).
            if let Some((l, z)) = c.as_mut()
                && *l != level
            {
                *l = level;
                if z.set_compression_level(level).is_err() {
                    *c = None;
                }
            }
            if c.is_none() {
                *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
            }
            match c.as_mut() {
                Some((_, c)) => c.compress_to_buffer(plaintext, &mut out).ok(),
                None => None,
            }
        });
        let mut out = out.into_inner();
        // Store raw unless compression saves at least 1/32 of the chunk.
        let mode = match compressed {
            Some(n) if n + plaintext.len() / 32 < plaintext.len() => 1,
            _ => {
                out.truncate(PREFIX_LEN);
                out[1] = 0;
                out.extend_from_slice(plaintext);
                0
            }
        };
        let aad = aad(id, [CHUNK_FORMAT, mode]);
        let tag = self
            .chunk_key(id)
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut out[PREFIX_LEN..])
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Decrypts and decompresses a chunk, checking that it is `expected_len` bytes long.
    /// Authentication binds the chunk to `id`: its key is derived from the id and the id is
    /// in the associated data, so only a holder of the data key could have sealed these
    /// bytes as this chunk. Restore relies on that plus each file's SHA-256;
    /// [`ChunkCipher::open_and_check_id`] also recomputes the keyed id of the plaintext.
    pub fn open(&self, id: &ChunkId, stored: &[u8], expected_len: usize) -> Result<Vec<u8>, CryptoError> {
        if expected_len > MAX_CHUNK_SIZE as usize {
            return Err(CryptoError::TooLarge { id: *id, len: expected_len, max: MAX_CHUNK_SIZE as usize });
        }
        let mut out = vec![0u8; expected_len];
        self.open_into(id, stored, &mut out)?;
        Ok(out)
    }

    /// [`ChunkCipher::open`] into `out`, whose length is the plaintext length the manifest
    /// gives: restore decrypts each chunk straight into its place in the file's buffer.
    pub fn open_into(&self, id: &ChunkId, stored: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        let tampered = |detail: &str| CryptoError::Tampered { id: *id, detail: detail.to_string() };
        if stored.len() > MAX_STORED_CHUNK {
            return Err(CryptoError::TooLarge { id: *id, len: stored.len(), max: MAX_STORED_CHUNK });
        }
        if stored.len() < PREFIX_LEN + TAG_LEN {
            return Err(tampered("shorter than header, nonce and tag"));
        }
        let header = [stored[0], stored[1]];
        if header[0] != CHUNK_FORMAT {
            return Err(tampered(&format!("unknown chunk format {}", header[0])));
        }
        let aad = aad(id, header);
        let nonce: [u8; NONCE_LEN] = stored[HEADER_LEN..PREFIX_LEN].try_into().expect("12 bytes");
        let (body, tag) = stored[PREFIX_LEN..].split_at(stored.len() - PREFIX_LEN - TAG_LEN);
        let tag = Tag::try_from(tag).expect("16 bytes");
        let key = self.chunk_key(id);
        let decrypt = |buf: &mut [u8]| {
            key.open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), tag, buf, 0..)
                .map(|_| ())
                .map_err(|_| tampered("authentication tag does not verify"))
        };
        let plain_len = match header[1] {
            0 => {
                if body.len() != out.len() {
                    return Err(tampered(&format!("plaintext is {} bytes, expected {}", body.len(), out.len())));
                }
                out.copy_from_slice(body);
                decrypt(out)?;
                out.len()
            }
            1 => SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.extend_from_slice(body);
                decrypt(&mut scratch)?;
                DECOMPRESSOR
                    .with(|d| match d.borrow_mut().as_mut() {
                        Some(d) => d.decompress_to_buffer(&scratch[..], &mut *out).map_err(|e| e.to_string()),
                        None => Err("no zstd context".to_string()),
                    })
                    .map_err(|e| tampered(&format!("zstd: {e}")))
            })?,
            m => return Err(tampered(&format!("unknown compression {m}"))),
        };
        if plain_len != out.len() {
            return Err(tampered(&format!("plaintext is {plain_len} bytes, expected {}", out.len())));
        }
        Ok(())
    }

    /// [`ChunkCipher::open`], then checks that the plaintext hashes to `id` under the id key
    /// (for single-chunk checks with no whole-file hash to fall back on).
    pub fn open_and_check_id(&self, id: &ChunkId, stored: &[u8], expected_len: usize) -> Result<Vec<u8>, CryptoError> {
        let plaintext = self.open(id, stored, expected_len)?;
        if self.chunk_id(&plaintext) != *id {
            return Err(CryptoError::Tampered { id: *id, detail: "plaintext does not hash to its id".into() });
        }
        Ok(plaintext)
    }
}

thread_local! {
    /// zstd contexts are reused per thread instead of allocated per chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
    /// A compressed chunk is decrypted here before it is decompressed into its place.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn aad(id: &ChunkId, header: [u8; 2]) -> [u8; 34] {
    let mut a = [0u8; 34];
    a[..32].copy_from_slice(&id.0);
    a[32..].copy_from_slice(&header);
    a
}

/// SHA-256 of a whole file, streamed.
pub struct FileHasher(ring::digest::Context);

impl Default for FileHasher {
    fn default() -> Self {
        FileHasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl FileHasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = FileHasher::default();
    h.update(data);
    h.finish()
}

/// SHA-256 and length of a whole file, read in 1 MiB pieces.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<([u8; 32], u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = FileHasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok((h.finish(), len)),
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cipher() -> ChunkCipher {
        ChunkCipher::new(&SecretKey::from_bytes([1; 32]), &SecretKey::from_bytes([2; 32]))
    }

    #[test]
    fn compressible_chunks_shrink_and_random_ones_stay_raw() {
        let c = cipher();
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        let id = c.chunk_id(&text);
        let sealed = c.seal(&id, &text);
        assert_eq!(sealed[1], 1);
        assert!(sealed.len() < text.len() / 10);
        assert_eq!(c.open(&id, &sealed, text.len()).unwrap(), text);

        let random: Vec<u8> = (0..1600u32).flat_map(|i| sha256(&i.to_le_bytes())).collect();
        let id = c.chunk_id(&random);
        let sealed = c.seal(&id, &random);
        assert_eq!(sealed[1], 0);
        assert_eq!(sealed.len(), random.len() + PREFIX_LEN + TAG_LEN);
    }

    #[test]
    fn ids_are_keyed() {
        let a = cipher();
        let b = ChunkCipher::new(&SecretKey::from_bytes([9; 32]), &SecretKey::from_bytes([2; 32]));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x").0, sha256(b"x"));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let c = cipher();
        let data = b"some chunk".repeat(10);
        let id = c.chunk_id(&data);
        let sealed = c.seal(&id, &data);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            let err = c.open(&id, &bad, data.len()).unwrap_err();
            assert!(err.to_string().contains(&id.to_hex()), "{err}");
        }
        let other = c.chunk_id(b"other");
        assert!(c.open(&other, &sealed, data.len()).is_err(), "a chunk presented under another id must fail");
        assert!(c.open_and_check_id(&other, &sealed, data.len()).is_err());
        assert_eq!(c.open_and_check_id(&id, &sealed, data.len()).unwrap(), data);
        assert!(c.open(&id, &sealed, data.len() + 1).is_err(), "a wrong length must fail");
    }

    #[test]
    fn wrong_key_fails() {
        let c = cipher();
        let d = ChunkCipher::new(&SecretKey::from_bytes([1; 32]), &SecretKey::from_bytes([3; 32]));
        let id = c.chunk_id(b"hello");
        assert!(matches!(d.open(&id, &c.seal(&id, b"hello"), 5), Err(CryptoError::Tampered { .. })));
    }

    #[test]
    fn re_sealing_uses_a_fresh_nonce() {
        let c = cipher();
        let id = c.chunk_id(b"same plaintext");
        let (a, b) = (c.seal(&id, b"same plaintext"), c.seal(&id, b"same plaintext"));
        assert_ne!(a[HEADER_LEN..PREFIX_LEN], b[HEADER_LEN..PREFIX_LEN]);
        assert_eq!(c.open(&id, &a, 14).unwrap(), c.open(&id, &b, 14).unwrap());
    }

    #[test]
    fn every_level_opens_the_same_and_higher_levels_compress_more() {
        let c = cipher();
        let text: Vec<u8> =
            (0..200_000u32).flat_map(|i| format!("row {} value {}\n", i % 977, i % 13).into_bytes()).collect();
        let id = c.chunk_id(&text);
        let fast = c.seal_level(&id, &text, 1);
        let small = c.seal_level(&id, &text, 9);
        assert!(small.len() < fast.len(), "level 9 {} vs level 1 {}", small.len(), fast.len());
        // Alternating levels on one thread reuse the right context each time.
        assert_eq!(c.seal_level(&id, &text, 1).len(), fast.len());
        for s in [&fast, &small] {
            assert_eq!(c.open(&id, s, text.len()).unwrap(), text);
        }
    }

    #[test]
    fn keys_do_not_print() {
        let k = SecretKey::from_bytes([7; 32]);
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let c = cipher();
            let id = c.chunk_id(&data);
            let sealed = c.seal(&id, &data);
            prop_assert_eq!(c.open(&id, &sealed, data.len()).unwrap(), data);
        }
    }
}
