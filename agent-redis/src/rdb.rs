//! The RDB a Redis master sends after `+FULLRESYNC`, read as a stream: in either framing
//! (`$<len>\r\n` then exactly len bytes when the master dumps to disk, or `$EOF:<40-byte
//! mark>\r\n` then bytes up to the mark when it streams diskless), with the header checked
//! and the trailing CRC-64 (Jones, as Redis computes it) verified when the stream ends. A
//! mismatch is an I/O error at the end of the stream, so the backup fails before it commits.

use std::io::{self, Read};

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_REDIS);
const MARK_LEN: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Eof([u8; MARK_LEN]),
}

impl Framing {
    /// Parses the payload header line (without `\r\n`).
    pub fn parse(line: &str) -> Option<Framing> {
        let rest = line.strip_prefix('$')?;
        if let Some(mark) = rest.strip_prefix("EOF:") {
            return mark.as_bytes().try_into().ok().map(Framing::Eof);
        }
        rest.parse().ok().map(Framing::Length)
    }
}

/// What the stream turned out to hold, known once it has been read to the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdbSummary {
    pub bytes: u64,
    pub version: String,
    /// Hex CRC-64 from the trailer; `disabled` when the server writes none (`rdbchecksum no`).
    pub checksum: String,
}

pub struct RdbStream<R> {
    inner: R,
    framing: Framing,
    /// Bytes of the payload read from `inner` (Length framing).
    consumed: u64,
    /// Bytes not yet handed out: the last ones may be the trailer (and the EOF mark).
    held: Vec<u8>,
    digest: crc::Digest<'static, u64>,
    header: Vec<u8>,
    out: u64,
    /// No more payload bytes will come from `inner`.
    ended: bool,
    /// The checked trailer, handed out after everything else.
    tail: Vec<u8>,
    done: bool,
    summary: std::sync::Arc<std::sync::Mutex<Option<RdbSummary>>>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> RdbStream<R> {
    /// The summary slot is filled when the stream has been read and checked to the end.
    pub fn new(inner: R, framing: Framing) -> (Self, std::sync::Arc<std::sync::Mutex<Option<RdbSummary>>>) {
        let summary = std::sync::Arc::new(std::sync::Mutex::new(None));
        let s = RdbStream {
            inner,
            framing,
            consumed: 0,
            held: Vec::with_capacity(1 << 16),
            digest: CRC.digest(),
            header: Vec::with_capacity(9),
            out: 0,
            ended: false,
            tail: Vec::new(),
            done: false,
            summary: summary.clone(),
        };
        (s, summary)
    }

    /// Bytes at the end that may not be handed out yet.
    fn holdback(&self) -> usize {
        match self.framing {
            Framing::Length(_) => 8,
            Framing::Eof(_) => 8 + MARK_LEN,
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Framing::Eof(mark) = self.framing {
            if !self.held.ends_with(&mark) {
                return Err(bad("the RDB stream ended without its end mark (truncated)"));
            }
            self.held.truncate(self.held.len() - MARK_LEN);
        }
        if self.held.len() != 8 || self.out < 9 {
            return Err(bad("the RDB stream is too short to hold a header and a checksum (truncated)"));
        }
        let trailer = u64::from_le_bytes(self.held[..8].try_into().expect("8 bytes"));
        let computed = std::mem::replace(&mut self.digest, CRC.digest()).finalize();
        let checksum = if trailer == 0 {
            "disabled".to_string()
        } else if trailer == computed {
            format!("{trailer:016x}")
        } else {
            return Err(bad(format!(
                "RDB checksum mismatch: trailer says {trailer:016x}, the data hashes to {computed:016x} (corrupt or truncated)"
            )));
        };
        // The last byte before the checksum is the EOF opcode (0xFF).
        let version = String::from_utf8_lossy(&self.header[5..9]).into_owned();
        *self.summary.lock().expect("summary lock") = Some(RdbSummary { bytes: self.out + 8, version, checksum });
        Ok(())
    }

    fn fill(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 1 << 16];
        let want = match self.framing {
            Framing::Length(len) => ((len - self.consumed) as usize).min(buf.len()),
            Framing::Eof(_) => buf.len(),
        };
        if want == 0 {
            return Ok(false);
        }
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return match self.framing {
                Framing::Length(len) => {
                    Err(bad(format!("the connection closed after {} of {len} RDB bytes (truncated)", self.consumed)))
                }
                Framing::Eof(_) => Err(bad("the connection closed before the RDB's end mark (truncated)")),
            };
        }
        self.consumed += n as u64;
        self.held.extend_from_slice(&buf[..n]);
        if let Framing::Eof(mark) = self.framing
            && let Some(pos) = find(&self.held, &mark)
        {
            // Anything after the mark is the replication stream: not ours.
            self.held.truncate(pos + MARK_LEN);
            return Ok(false);
        }
        Ok(true)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<R: Read> Read for RdbStream<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                let n = self.tail.len().min(out.len());
                out[..n].copy_from_slice(&self.tail[..n]);
                self.tail.drain(..n);
                return Ok(n);
            }
            let ready = self.held.len().saturating_sub(self.holdback());
            if ready > 0 {
                let n = ready.min(out.len());
                out[..n].copy_from_slice(&self.held[..n]);
                self.digest.update(&out[..n]);
                if self.header.len() < 9 {
                    let take = (9 - self.header.len()).min(n);
                    self.header.extend_from_slice(&out[..take]);
                    if self.header.len() == 9 && !self.header.starts_with(b"REDIS") {
                        return Err(bad("not an RDB stream (no REDIS header)"));
                    }
                }
                self.held.drain(..n);
                self.out += n as u64;
                return Ok(n);
            }
            if !self.ended {
                if !self.fill()? {
                    self.ended = true;
                }
                continue;
            }
            self.finish()?;
            self.done = true;
            // What was held back is the trailer: it is part of the file too.
            self.tail = std::mem::take(&mut self.held);
        }
    }
}

/// Checks a whole RDB file: header and trailing CRC-64.
pub fn check_file(bytes: &[u8]) -> Result<RdbSummary, io::Error> {
    let (mut s, summary) = RdbStream::new(bytes, Framing::Length(bytes.len() as u64));
    io::copy(&mut s, &mut io::sink())?;
    let out = summary.lock().expect("summary lock").clone();
    out.ok_or_else(|| bad("RDB not checked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rdb(body: &[u8]) -> Vec<u8> {
        let mut v = b"REDIS0011".to_vec();
        v.extend_from_slice(body);
        v.push(0xff);
        let crc = CRC.checksum(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    fn read_all(mut s: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn length_framing_round_trips_and_checks_the_crc() {
        let file = rdb(&[1u8; 100_000]);
        let (s, sum) = RdbStream::new(&file[..], Framing::Length(file.len() as u64));
        assert_eq!(read_all(s).unwrap(), file);
        let sum = sum.lock().unwrap().clone().unwrap();
        assert_eq!((sum.bytes, sum.version.as_str()), (file.len() as u64, "0011"));
        assert_eq!(check_file(&file).unwrap(), sum);

        for i in [0, 20, file.len() - 3] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(check_file(&bad).is_err(), "flipped byte {i} accepted");
        }
        let (s, _) = RdbStream::new(&file[..file.len() - 5], Framing::Length(file.len() as u64));
        assert!(read_all(s).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn eof_framing_stops_at_the_mark_and_ignores_what_follows() {
        let file = rdb(b"some keys");
        let mark = [b'x'; MARK_LEN];
        let mut wire = file.clone();
        wire.extend_from_slice(&mark);
        wire.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        let (s, sum) = RdbStream::new(&wire[..], Framing::Eof(mark));
        assert_eq!(read_all(s).unwrap(), file);
        assert!(sum.lock().unwrap().is_some());
        let (s, _) = RdbStream::new(&file[..], Framing::Eof(mark));
        assert!(read_all(s).unwrap_err().to_string().contains("end mark"));
        assert_eq!(Framing::parse("$123"), Some(Framing::Length(123)));
        assert_eq!(Framing::parse(&format!("$EOF:{}", "x".repeat(40))), Some(Framing::Eof(mark)));
        assert_eq!(Framing::parse("+OK"), None);
    }
}
