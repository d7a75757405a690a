//! An etcd snapshot is the bbolt database followed by a 32-byte SHA-256 of everything before
//! it. This reader passes the whole stream through (the file a stock tool restores is
//! byte-identical) and fails at the end if the trailer does not match, so a truncated or
//! corrupted snapshot never commits.

use std::io::{self, Read};

pub const TRAILER: usize = 32;

pub struct Checked<R> {
    inner: R,
    held: Vec<u8>,
    digest: ring::digest::Context,
    tail: Vec<u8>,
    done: bool,
    total: u64,
    /// Filled with the SHA-256 of the whole stream (trailer included) once it checks out,
    /// so the backup pipeline need not hash the bytes a second time.
    whole: Option<coffer_common::runtime::DigestSlot>,
}

impl<R: Read> Checked<R> {
    pub fn new(inner: R) -> Self {
        Checked {
            inner,
            held: Vec::with_capacity(1 << 16),
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            tail: Vec::new(),
            done: false,
            total: 0,
            whole: None,
        }
    }

    /// Also reports the SHA-256 of the whole stream into `slot` when the trailer checks out.
    pub fn with_digest(inner: R, slot: coffer_common::runtime::DigestSlot) -> Self {
        Checked { whole: Some(slot), ..Checked::new(inner) }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                let n = self.tail.len().min(out.len());
                out[..n].copy_from_slice(&self.tail[..n]);
                self.tail.drain(..n);
                return Ok(n);
            }
            let ready = self.held.len().saturating_sub(TRAILER);
            if ready > 0 {
                let n = ready.min(out.len());
                out[..n].copy_from_slice(&self.held[..n]);
                self.digest.update(&out[..n]);
                self.held.drain(..n);
                self.total += n as u64;
                return Ok(n);
            }
            let mut buf = [0u8; 1 << 16];
            let n = match self.inner.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n > 0 {
                self.held.extend_from_slice(&buf[..n]);
                continue;
            }
            if self.held.len() != TRAILER || self.total == 0 {
                return Err(bad(format!(
                    "the snapshot stream ended after {} bytes, too short for a database and its SHA-256 trailer",
                    self.total + self.held.len() as u64
                )));
            }
            let digest = std::mem::replace(&mut self.digest, ring::digest::Context::new(&ring::digest::SHA256));
            let mut whole = self.whole.as_ref().map(|_| digest.clone());
            let computed = digest.finish();
            if computed.as_ref() != self.held.as_slice() {
                return Err(bad(format!(
                    "snapshot integrity trailer mismatch: trailer {}, the data hashes to {} (truncated or corrupted)",
                    hex::encode(&self.held),
                    hex::encode(computed.as_ref())
                )));
            }
            if let (Some(slot), Some(mut whole)) = (&self.whole, whole.take()) {
                whole.update(&self.held);
                let _ = slot.set(whole.finish().as_ref().try_into().expect("SHA-256 is 32 bytes"));
            }
            self.tail = std::mem::take(&mut self.held);
            self.done = true;
        }
    }
}

/// Checks a whole snapshot file.
pub fn check(bytes: &[u8]) -> io::Result<()> {
    io::copy(&mut Checked::new(bytes), &mut io::sink()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(db: &[u8]) -> Vec<u8> {
        let mut v = db.to_vec();
        v.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, db).as_ref());
        v
    }

    #[test]
    fn passes_through_and_checks() {
        let s = snapshot(&[7u8; 200_000]);
        let mut out = Vec::new();
        io::copy(&mut Checked::new(&s[..]), &mut out).unwrap();
        assert!(out == s);
        for i in [0, 1000, s.len() - 1] {
            let mut bad = s.clone();
            bad[i] ^= 1;
            assert!(check(&bad).unwrap_err().to_string().contains("mismatch"), "flip at {i}");
        }
        assert!(check(&s[..s.len() - 10]).is_err());
        assert!(check(&s[..20]).unwrap_err().to_string().contains("too short"));
    }

    #[test]
    fn reports_the_whole_stream_digest_only_when_the_trailer_checks_out() {
        let s = snapshot(&[9u8; 300_000]);
        let slot = coffer_common::runtime::DigestSlot::default();
        let mut out = Vec::new();
        io::copy(&mut Checked::with_digest(&s[..], slot.clone()), &mut out).unwrap();
        assert_eq!(slot.get().copied(), Some(coffer_common::crypto::sha256(&s)));
        let mut bad = s.clone();
        bad[5] ^= 1;
        let slot = coffer_common::runtime::DigestSlot::default();
        assert!(io::copy(&mut Checked::with_digest(&bad[..], slot.clone()), &mut io::sink()).is_err());
        assert!(slot.get().is_none());
    }
}
