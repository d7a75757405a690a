//! Content-defined chunking (FastCDC 2020), as a sans-IO state machine.
//!
//! The cut points depend only on the bytes and the parameters, never on how the input was
//! split into `push` calls: a stream chunked in 1-byte pushes and the same stream chunked as
//! one slice give identical chunks. The gear table is seeded per asset (from its keyring), so
//! chunk lengths do not reveal content to someone who knows the public table.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{MASKS, Normalization, cut_gear, get_gear_with_seed, logarithm2};
use serde::{Deserialize, Serialize};

/// Name and pinned crate version of the algorithm, recorded in repository config and manifests.
pub const ALGORITHM: &str = "fastcdc-2020/fastcdc-3.2.1/level1";

/// Largest chunk any chunker or block source may produce (bytes of plaintext).
pub const MAX_CHUNK_SIZE: u32 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// Default for file-like sources. With 256 KiB average chunks a scattered 64 KiB change
    /// rewrites about 320 KiB instead of the ~1 MiB a 1 MiB-average chunker pays, while a
    /// 2 GiB data set still needs only ~8k index entries.
    pub const DEFAULT: ChunkerParams = ChunkerParams { min_size: 64 << 10, avg_size: 256 << 10, max_size: 1 << 20 };

    /// For snapshots that change in many small scattered places between recovery points
    /// (etcd's bbolt file, a Redis RDB): a smaller average keeps an unchanged region
    /// unchanged. bench/etcd: a snapshot taken after 1% of 200k keys changed stores 0.5% of
    /// its 276 MB, and the 2 GiB-class snapshots these sources produce still need only tens
    /// of thousands of index entries.
    pub const SNAPSHOTS: ChunkerParams = ChunkerParams { min_size: 16 << 10, avg_size: 64 << 10, max_size: 256 << 10 };

    /// The built-in parameters for an asset kind; a coordinator's `[chunker.KIND]` table
    /// overrides them.
    pub fn for_kind(kind: &str) -> ChunkerParams {
        match kind {
            "etcd" | "redis" => ChunkerParams::SNAPSHOTS,
            _ => ChunkerParams::DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020 as f;
        let ok = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&self.min_size)
            && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&self.avg_size)
            && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            && self.max_size <= MAX_CHUNK_SIZE;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "invalid chunker parameters min={} avg={} max={} (need {}..={} <= avg <= max <= {})",
                self.min_size,
                self.avg_size,
                self.max_size,
                f::MINIMUM_MIN,
                f::MINIMUM_MAX,
                MAX_CHUNK_SIZE
            ))
        }
    }
}

/// How a file is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cut {
    /// Content-defined (FastCDC) with the asset's parameters: insertions shift no boundary.
    #[default]
    Content,
    /// Fixed-size blocks aligned to file offsets (database pages, volume blocks): a changed
    /// block changes exactly one chunk. The size must be within 64 B ..= [`MAX_CHUNK_SIZE`].
    Fixed(u32),
}

/// Streaming chunker (FastCDC, or fixed blocks). Feed bytes with [`Chunker::push`]; at end
/// of input call [`Chunker::finish`] until it returns `None`.
pub struct Chunker {
    params: ChunkerParams,
    /// Fixed block size instead of content-defined cuts.
    fixed: Option<usize>,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    buf: BytesMut,
}

impl Chunker {
    /// `seed` keys the gear table (0 = the published table).
    pub fn new(params: ChunkerParams, seed: u64) -> Self {
        assert!(params.validate().is_ok(), "chunker parameters must be validated first");
        let bits = logarithm2(params.avg_size);
        let norm = Normalization::Level1.bits();
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Chunker {
            params,
            mask_s: MASKS[(bits + norm) as usize],
            mask_l: MASKS[(bits - norm) as usize],
            gear,
            gear_ls,
            buf: BytesMut::with_capacity(params.max_size as usize * 2),
            fixed: None,
        }
    }

    /// A chunker cutting as `cut` says (`params` and `seed` apply to [`Cut::Content`]).
    pub fn with_cut(params: ChunkerParams, seed: u64, cut: Cut) -> Self {
        let mut c = Chunker::new(params, seed);
        if let Cut::Fixed(size) = cut {
            assert!((64..=MAX_CHUNK_SIZE).contains(&size), "fixed block size out of range");
            c.fixed = Some(size as usize);
            c.buf = BytesMut::with_capacity(size as usize * 2);
        }
        c
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Feeds bytes; returns how many were consumed and a chunk if a boundary was found.
    /// Call again with the unconsumed rest until everything is consumed.
    pub fn push(&mut self, input: &[u8]) -> (usize, Option<Bytes>) {
        let max = self.fixed.unwrap_or(self.params.max_size as usize);
        let room = max.saturating_sub(self.buf.len());
        let take = room.min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        if self.buf.len() >= max { (take, Some(self.cut())) } else { (take, None) }
    }

    /// Returns the remaining chunks one by one at end of input.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() { None } else { Some(self.cut()) }
    }

    fn cut(&mut self) -> Bytes {
        if let Some(size) = self.fixed {
            let chunk = self.buf.split_to(size.min(self.buf.len())).freeze();
            if self.buf.capacity() < size {
                self.buf.reserve(size * 2);
            }
            return chunk;
        }
        let p = self.params;
        let (_, end) = cut_gear(
            &self.buf,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        let end = end.clamp(1, self.buf.len());
        let chunk = self.buf.split_to(end).freeze();
        if self.buf.capacity() < p.max_size as usize {
            self.buf.reserve(p.max_size as usize * 2);
        }
        chunk
    }
}

/// Chunks a whole slice (tests and tools).
pub fn chunk_all(params: ChunkerParams, seed: u64, data: &[u8]) -> Vec<Bytes> {
    let mut c = Chunker::new(params, seed);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (n, chunk) = c.push(rest);
        rest = &rest[n..];
        out.extend(chunk);
    }
    while let Some(chunk) = c.finish() {
        out.push(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMALL: ChunkerParams = ChunkerParams { min_size: 256, avg_size: 1024, max_size: 4096 };

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn chunks_concatenate_to_input_and_respect_bounds() {
        let data = pseudo_random(200_000, 7);
        let chunks = chunk_all(SMALL, 0, &data);
        assert_eq!(chunks.concat(), data);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= 256 && c.len() <= 4096, "chunk of {} bytes", c.len());
        }
        assert!(chunks.len() > 100, "expected about 200 chunks, got {}", chunks.len());
    }

    #[test]
    fn fixed_cut_gives_aligned_blocks_whatever_the_push_sizes() {
        let data = pseudo_random(100_000, 3);
        let mut c = Chunker::with_cut(SMALL, 0, Cut::Fixed(8192));
        let mut chunks = Vec::new();
        for piece in data.chunks(777) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (used, chunk) = c.push(rest);
                rest = &rest[used..];
                chunks.extend(chunk);
            }
        }
        chunks.extend(std::iter::from_fn(|| c.finish()));
        assert_eq!(chunks.concat(), data);
        assert_eq!(chunks.len(), 13);
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(&chunk[..], &data[i * 8192..((i + 1) * 8192).min(data.len())]);
        }
    }

    #[test]
    fn resynchronises_after_an_insert() {
        let data = pseudo_random(400_000, 11);
        let mut edited = data.clone();
        edited.splice(100_000..100_000, pseudo_random(17, 3));
        let a = chunk_all(SMALL, 0, &data);
        let b = chunk_all(SMALL, 0, &edited);
        let set: std::collections::HashSet<_> = a.iter().collect();
        let shared = b.iter().filter(|c| set.contains(c)).count();
        // Only the chunks around the insert differ.
        assert!(shared + 4 >= b.len(), "{shared} of {} chunks shared", b.len());
        assert_ne!(a, b);
    }

    #[test]
    fn seed_changes_cut_points() {
        let data = pseudo_random(100_000, 5);
        let a: Vec<usize> = chunk_all(SMALL, 0, &data).iter().map(|c| c.len()).collect();
        let b: Vec<usize> = chunk_all(SMALL, 42, &data).iter().map(|c| c.len()).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunk_all(SMALL, 0, &[]).is_empty());
    }

    proptest! {
        #[test]
        fn push_granularity_does_not_change_chunks(
            seed in any::<u64>(),
            len in 0usize..40_000,
            step in 1usize..5000,
        ) {
            let data = pseudo_random(len, seed);
            let whole = chunk_all(SMALL, seed, &data);
            let mut c = Chunker::new(SMALL, seed);
            let mut pieces = Vec::new();
            for part in data.chunks(step) {
                let mut rest = part;
                while !rest.is_empty() {
                    let (n, chunk) = c.push(rest);
                    rest = &rest[n..];
                    pieces.extend(chunk);
                }
            }
            while let Some(chunk) = c.finish() { pieces.push(chunk); }
            prop_assert_eq!(whole, pieces);
        }
    }
}
