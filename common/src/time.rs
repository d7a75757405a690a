//! Timestamps as they appear in manifests and the catalog: RFC 3339, UTC, whole seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now() -> SystemTime {
    SystemTime::now()
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn from_unix_seconds(s: i64) -> SystemTime {
    if s >= 0 { UNIX_EPOCH + Duration::from_secs(s as u64) } else { UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) }
}

pub fn from_unix_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// RFC 3339 with milliseconds, for event times (attempts, sessions).
pub fn rfc3339_millis(ms: i64) -> String {
    humantime::format_rfc3339_millis(from_unix_millis(ms)).to_string()
}

/// A snapshot id: sortable by time (millisecond resolution), unique by a random suffix,
/// safe in file names. Example: `20261124T095500.123Z-3fa81c2d`.
pub fn new_snapshot_id(t: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_millis(t).to_string().replace(['-', ':'], "");
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).expect("the operating system's random source failed");
    format!("{stamp}-{}", hex::encode(r))
}

pub fn is_valid_snapshot_id(s: &str) -> bool {
    s.len() == 29
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'.',
            19 => b == b'Z',
            20 => b == b'-',
            21.. => b.is_ascii_hexdigit() && !b.is_ascii_uppercase(),
            _ => b.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_sort_by_time_and_validate() {
        let a = new_snapshot_id(from_unix_seconds(1_700_000_000));
        let b = new_snapshot_id(from_unix_seconds(1_700_000_000) + Duration::from_millis(1));
        assert!(a < b);
        assert!(a.starts_with("20231114T221320.000Z-"), "{a}");
        assert!(is_valid_snapshot_id(&a));
        assert!(!is_valid_snapshot_id("../etc/passwd"));
        assert!(!is_valid_snapshot_id("latest"));
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = from_unix_seconds(1_800_000_000);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}
