//! Human-written durations (`90s`, `24h`, `7d`, `4w`, `12mo`, `1y`) and sizes (`64MiB`).

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

/// Calendar units are fixed lengths here: a month is 30 days and a year 365 days, which is
/// what retention windows and freshness checks need (DST-free UTC).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let err = |reason| ParseError { what: "duration", input: s.to_string(), reason };
    let (n, unit) = split_number(s).ok_or_else(|| err("expected a number followed by a unit"))?;
    if unit == "ms" {
        return Ok(Duration::from_millis(n));
    }
    let secs = match unit {
        "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        "mo" | "month" | "months" => 30 * 86_400,
        "y" | "year" | "years" => 365 * 86_400,
        "" => return Err(err("missing unit (ms, s, m, h, d, w, mo, y)")),
        _ => return Err(err("unknown unit (use ms, s, m, h, d, w, mo, y)")),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(|| err("too large"))
}

pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    for (unit, len) in [("y", 365 * 86_400), ("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= len && s.is_multiple_of(len) {
            return format!("{}{unit}", s / len);
        }
    }
    format!("{s}s")
}

pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let err = |reason| ParseError { what: "size", input: s.to_string(), reason };
    let (n, unit) = split_number(s).ok_or_else(|| err("expected a number followed by a unit"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err("unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| err("too large"))
}

pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

/// Serde adapters so config structs can hold `Duration` and byte counts written by humans.
pub mod serde_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

pub mod serde_size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_size(*n))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_size(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("12mo").unwrap(), Duration::from_secs(360 * 86_400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert!(parse_duration("7").unwrap_err().to_string().contains("missing unit"));
        assert!(parse_duration("7x").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "1w");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("10 GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(format_size(3 << 20), "3.0 MiB");
    }
}
