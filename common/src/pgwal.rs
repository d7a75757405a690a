//! PostgreSQL WAL naming (shared by agent-postgres and the coordinator's stream status):
//! segment file names, LSNs, and the continuity of an archived stream (runs and gaps).
//!
//! A segment file is named `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number
//! split into "log" and "seg" parts (`segments per log = 0x1_0000_0000 / segment size`).
//! Beside segments the archive holds timeline history files (`TTTTTTTT.history`), backup
//! history files (`<segment>.XXXXXXXX.backup`) and partial segments (`<segment>.partial`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A write-ahead log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `X/Y` text form.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }

    pub fn segment(self, seg_size: u64) -> u64 {
        self.0 / seg_size
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// What an archived WAL file name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFile {
    Segment { timeline: u32, segno: u64 },
    Partial { timeline: u32, segno: u64 },
    History { timeline: u32 },
    BackupHistory { timeline: u32, segno: u64 },
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u32::from_str_radix(s, 16).ok())?
}

/// Segments per "log" file number for a segment size.
fn per_log(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size
}

/// Parses an archived file name (`seg_size` is the cluster's WAL segment size in bytes).
pub fn parse_name(name: &str, seg_size: u64) -> Option<WalFile> {
    let seg = |s: &str| -> Option<(u32, u64)> {
        if s.len() != 24 {
            return None;
        }
        let (t, log, seg) = (hex8(&s[..8])?, hex8(&s[8..16])?, hex8(&s[16..])?);
        (u64::from(seg) < per_log(seg_size)).then_some((t, u64::from(log) * per_log(seg_size) + u64::from(seg)))
    };
    if let Some(t) = name.strip_suffix(".history") {
        return Some(WalFile::History { timeline: hex8(t)? });
    }
    if let Some(base) = name.strip_suffix(".partial") {
        let (timeline, segno) = seg(base)?;
        return Some(WalFile::Partial { timeline, segno });
    }
    if let Some(rest) = name.strip_suffix(".backup") {
        let (base, off) = rest.split_once('.')?;
        hex8(off)?;
        let (timeline, segno) = seg(base)?;
        return Some(WalFile::BackupHistory { timeline, segno });
    }
    let (timeline, segno) = seg(name)?;
    Some(WalFile::Segment { timeline, segno })
}

/// The file name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, seg_size: u64) -> String {
    let per = per_log(seg_size);
    format!("{timeline:08X}{:08X}{:08X}", segno / per, segno % per)
}

/// A run of consecutive segments `first..=last` on one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub timeline: u32,
    pub first: u64,
    pub last: u64,
}

/// The archived stream as runs per timeline, and the gaps inside each timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Continuity {
    pub ranges: Vec<Range>,
    /// Missing segments `(timeline, first, last)` between two runs of the same timeline.
    pub gaps: Vec<(u32, u64, u64)>,
    pub histories: BTreeSet<u32>,
}

impl Continuity {
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>, seg_size: u64) -> Continuity {
        let mut by_tl: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        let mut histories = BTreeSet::new();
        for n in names {
            match parse_name(n, seg_size) {
                Some(WalFile::Segment { timeline, segno }) => {
                    by_tl.entry(timeline).or_default().insert(segno);
                }
                Some(WalFile::History { timeline }) => {
                    histories.insert(timeline);
                }
                _ => {}
            }
        }
        let mut c = Continuity { histories, ..Default::default() };
        for (tl, segs) in by_tl {
            let mut run: Option<Range> = None;
            for s in segs {
                match &mut run {
                    Some(r) if r.last + 1 == s => r.last = s,
                    Some(r) => {
                        c.gaps.push((tl, r.last + 1, s - 1));
                        c.ranges.push(*r);
                        run = Some(Range { timeline: tl, first: s, last: s });
                    }
                    None => run = Some(Range { timeline: tl, first: s, last: s }),
                }
            }
            c.ranges.extend(run);
        }
        c
    }

    /// Whether every segment from `from` (on `timeline`) up to the newest archived one can
    /// be replayed: no gap after it on its timeline or a later one. A later timeline takes
    /// over from the segment where it begins.
    pub fn continuous_from(&self, timeline: u32, from: u64) -> bool {
        let mut covered = false;
        let mut next = from;
        for r in self.ranges.iter().filter(|r| r.timeline >= timeline) {
            if r.timeline == timeline && r.first <= next && r.last >= next {
                covered = true;
                next = r.last + 1;
            } else if r.timeline > timeline && covered && r.first <= next {
                next = next.max(r.last + 1);
            }
        }
        covered && !self.gaps.iter().any(|&(tl, first, _)| tl >= timeline && first >= from)
    }

    /// The newest segment: (timeline, segno).
    pub fn newest(&self) -> Option<(u32, u64)> {
        self.ranges.iter().map(|r| (r.timeline, r.last)).max_by_key(|&(t, s)| (s, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn names_round_trip_and_classify() {
        assert_eq!(segment_name(1, 0x1FF, SEG), "0000000100000001000000FF");
        assert_eq!(parse_name("0000000100000001000000FF", SEG), Some(WalFile::Segment { timeline: 1, segno: 0x1FF }));
        assert_eq!(parse_name("00000002.history", SEG), Some(WalFile::History { timeline: 2 }));
        assert_eq!(
            parse_name("000000010000000000000003.00000028.backup", SEG),
            Some(WalFile::BackupHistory { timeline: 1, segno: 3 })
        );
        assert_eq!(
            parse_name("000000020000000000000004.partial", SEG),
            Some(WalFile::Partial { timeline: 2, segno: 4 })
        );
        // Seg part beyond the segments of one log file, wrong lengths, not hex.
        assert_eq!(parse_name("000000010000000000000100", SEG), None);
        assert_eq!(parse_name("00000001000000000000001", SEG), None);
        assert_eq!(parse_name("00000001000000000000001G", SEG), None);
        assert_eq!(parse_name("postmaster.pid", SEG), None);
        // 64 MiB segments: 64 per log.
        assert_eq!(segment_name(1, 64, 64 << 20), "000000010000000100000000");
    }

    #[test]
    fn lsns_parse_print_and_locate() {
        let l = Lsn::parse("1/2000028").unwrap();
        assert_eq!(l.0, 0x1_0200_0028);
        assert_eq!(l.to_string(), "1/2000028");
        assert_eq!(l.segment(SEG), 0x102);
        assert_eq!(Lsn::parse("nope"), None);
    }

    #[test]
    fn continuity_finds_runs_gaps_and_timeline_switches() {
        let names: Vec<String> = [(1, 1), (1, 2), (1, 3), (1, 6), (1, 7), (2, 7), (2, 8)]
            .iter()
            .map(|&(t, s)| segment_name(t, s, SEG))
            .chain(["00000002.history".to_string()])
            .collect();
        let c = Continuity::of(names.iter().map(String::as_str), SEG);
        assert_eq!(c.gaps, vec![(1, 4, 5)]);
        assert_eq!(c.ranges.len(), 3);
        assert!(c.histories.contains(&2));
        assert_eq!(c.newest(), Some((2, 8)));
        assert!(!c.continuous_from(1, 2), "segments 4-5 are missing");
        assert!(c.continuous_from(1, 6), "timeline 2 continues from segment 7");
        assert!(!c.continuous_from(1, 9), "nothing archived from segment 9");
    }
}
