//! Retention planning: which recovery points a policy keeps, each with the reasons it is
//! kept, and which it deletes. Pure: policy + recovery points + now in, plan out; all times
//! are UTC unix seconds, so there is no daylight-saving ambiguity.
//!
//! Rules (a point is kept if any rule keeps it):
//! - `forever` keeps everything;
//! - `within D` keeps every point newer than `now - D`;
//! - `last N` keeps the N newest;
//! - a bucket rule (`hourly`, `daily`, `weekly` (ISO, Monday first), `monthly`, `yearly`)
//!   walks the points newest first and keeps the newest point of each bucket, for the N
//!   newest buckets that have one (`daily = 7`: gaps do not use up the count) or for every
//!   bucket whose newest point is newer than `now - D` (`daily = "7d"`).
//!
//! Safety rules: a backup in flight is never touched; a point dated after `now` (clock skew)
//! is kept; and a plan never leaves an asset with no recovery point: if no rule keeps any,
//! the newest is kept.

use std::collections::BTreeSet;

use coffer_common::units::format_duration;

use crate::policy::{Bucket, Keep, Retention};

/// A recovery point as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub id: String,
    /// When it was taken (unix seconds, UTC).
    pub time: i64,
    /// A backup still being written: never planned for deletion.
    pub in_flight: bool,
}

/// One point's fate: kept for these reasons, or deleted when there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub time: i64,
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Every point, newest first, with its decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.keep())
    }

    pub fn deleted(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep())
    }
}

/// The bucket a time falls in, as a number that orders like the buckets do.
pub fn bucket_key(bucket: Bucket, t: i64) -> i64 {
    let days = t.div_euclid(86_400);
    match bucket {
        Bucket::Hourly => t.div_euclid(3600),
        Bucket::Daily => days,
        // 1970-01-01 was a Thursday: shifting by three days makes weeks start on Monday.
        Bucket::Weekly => (days + 3).div_euclid(7),
        Bucket::Monthly | Bucket::Yearly => {
            let date = time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let year = i64::from(date.year());
            if bucket == Bucket::Yearly { year } else { year * 12 + i64::from(u8::from(date.month())) - 1 }
        }
    }
}

pub fn plan(rules: &Retention, points: &[Point], now: i64) -> Plan {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];
    // Indices of committed points, newest first: the ones rules count.
    let committed: Vec<usize> = (0..sorted.len()).filter(|&i| !sorted[i].in_flight).collect();

    for (i, p) in sorted.iter().enumerate() {
        if p.in_flight {
            reasons[i].push("in flight".into());
        } else if p.time > now {
            reasons[i].push("dated after now (clock skew)".into());
        }
    }
    if rules.forever {
        for &i in &committed {
            reasons[i].push("forever".into());
        }
    }
    if let Some(w) = rules.within {
        let cutoff = now - w.as_secs() as i64;
        for &i in &committed {
            if sorted[i].time > cutoff {
                reasons[i].push(format!("within {}", format_duration(w)));
            }
        }
    }
    if let Some(n) = rules.last {
        for (rank, &i) in committed.iter().take(n as usize).enumerate() {
            reasons[i].push(format!("last {}/{n}", rank + 1));
        }
    }
    for (bucket, keep) in rules.buckets() {
        let mut seen = BTreeSet::new();
        for &i in &committed {
            let p = sorted[i];
            let key = bucket_key(bucket, p.time);
            if seen.contains(&key) {
                continue;
            }
            let taken = seen.len() + 1;
            match keep {
                Keep::Count(n) if taken > n as usize => break,
                Keep::Window(w) if p.time <= now - w.as_secs() as i64 => break,
                _ => {}
            }
            seen.insert(key);
            reasons[i].push(match keep {
                Keep::Count(n) => format!("{} {taken}/{n}", bucket.name()),
                Keep::Window(w) => format!("{} {taken} within {}", bucket.name(), format_duration(w)),
            });
        }
    }
    if let Some(&newest) = committed.first()
        && committed.iter().all(|&i| reasons[i].is_empty())
    {
        reasons[newest].push("newest (an asset always keeps one)".into());
    }
    Plan {
        decisions: sorted
            .iter()
            .zip(reasons)
            .map(|(p, reasons)| Decision { id: p.id.clone(), time: p.time, reasons })
            .collect(),
    }
}

/// A kept snapshot's span: a stream entry committed inside it is needed to make that
/// snapshot consistent (Postgres: the WAL between a base backup's start and stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub end: i64,
}

/// Fate of an asset's stream entries (WAL), given the snapshots retention keeps.
///
/// Every entry from the start of the oldest kept snapshot inside the `within` window (or of
/// the oldest kept snapshot when there is no window) onwards is kept: that is the continuous
/// point-in-time window. Older kept snapshots keep the entries committed during their own
/// span, so each stays restorable to its own consistent point. With no kept snapshot at all
/// nothing is deleted.
pub fn plan_stream(kept: &[Span], within: Option<std::time::Duration>, entries: &[Point], now: i64) -> Vec<Decision> {
    let horizon = within.map(|w| now - w.as_secs() as i64);
    let anchor = kept.iter().filter(|s| horizon.is_none_or(|h| s.start >= h)).map(|s| s.start).min();
    // Nothing inside the window (e.g. the newest base is older than it): the newest kept
    // snapshot anchors the window instead, so the newest recovery points stay replayable.
    let anchor = anchor.or_else(|| kept.iter().map(|s| s.start).max());
    let mut out: Vec<Decision> = entries
        .iter()
        .map(|e| {
            let mut reasons = Vec::new();
            if e.in_flight {
                reasons.push("being written".to_string());
            } else if anchor.is_none_or(|a| e.time >= a) {
                reasons.push("point-in-time window".to_string());
            } else if kept.iter().any(|s| e.time >= s.start && e.time <= s.end) {
                reasons.push("consistency of a kept snapshot".to_string());
            }
            Decision { id: e.id.clone(), time: e.time, reasons }
        })
        .collect();
    out.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86_400;
    /// 2026-03-02T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_772_409_600;

    fn pts(times: &[i64]) -> Vec<Point> {
        times.iter().enumerate().map(|(i, &t)| Point { id: format!("s{i:03}"), time: t, in_flight: false }).collect()
    }

    fn kept_times(p: &Plan) -> Vec<i64> {
        p.kept().map(|d| d.time).collect()
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn day_boundaries_split_buckets() {
        let r = Retention { daily: Some(Keep::Count(2)), ..Default::default() };
        // 23:59:59 and 00:00:00 are different days; the newest of each day is kept.
        let times = [MONDAY - 1, MONDAY - 2 * H, MONDAY, MONDAY + 5 * H];
        let p = plan(&r, &pts(&times), MONDAY + 6 * H);
        assert_eq!(kept_times(&p), [MONDAY + 5 * H, MONDAY - 1]);
        let reasons: Vec<_> = p.kept().map(|d| d.reasons.join(",")).collect();
        assert_eq!(reasons, ["daily 1/2", "daily 2/2"]);
    }

    #[test]
    fn hour_boundaries_split_buckets() {
        let r = Retention { hourly: Some(Keep::Window(Duration::from_secs(3 * 3600))), ..Default::default() };
        let now = MONDAY + 10 * H;
        let times = [now - 1, now - 30 * 60, now - H - 1, now - 2 * H - 1, now - 3 * H - 1, now - 3 * H + 1];
        let p = plan(&r, &pts(&times), now);
        // The newest of hours 9, 8 and 7 (07:59:59, not 07:00:01); hour 6 is outside the window.
        assert_eq!(kept_times(&p), [now - 1, now - H - 1, now - 2 * H - 1]);
    }

    #[test]
    fn counts_skip_gaps_and_windows_do_not() {
        // One point every other day for 30 days.
        let now = MONDAY + 30 * D;
        let times: Vec<i64> = (0..15).map(|i| now - i * 2 * D - H).collect();
        let by_count = plan(&Retention { daily: Some(Keep::Count(7)), ..Default::default() }, &pts(&times), now);
        assert_eq!(by_count.kept().count(), 7, "seven days that have a point, spanning two weeks");
        let by_window =
            plan(&Retention { daily: Some(Keep::Window(days(7))), ..Default::default() }, &pts(&times), now);
        assert_eq!(by_window.kept().count(), 4, "only the days within the last week");
    }

    #[test]
    fn weeks_start_on_monday_and_months_are_calendar_months() {
        assert_eq!(bucket_key(Bucket::Weekly, MONDAY), bucket_key(Bucket::Weekly, MONDAY + 6 * D + 23 * H));
        assert_ne!(bucket_key(Bucket::Weekly, MONDAY), bucket_key(Bucket::Weekly, MONDAY - 1));
        // 2026-02-28T23:59:59Z and 2026-03-01T00:00:00Z.
        let march = MONDAY - D;
        assert_ne!(bucket_key(Bucket::Monthly, march - 1), bucket_key(Bucket::Monthly, march));
        assert_eq!(bucket_key(Bucket::Monthly, march), bucket_key(Bucket::Monthly, march + 30 * D));
        assert_eq!(bucket_key(Bucket::Yearly, march), 2026);
    }

    #[test]
    fn the_etcd_row_of_the_matrix() {
        // Hourly backups for ten days: 24h hourly + 7d daily keeps 24 + 6 older days.
        let r =
            Retention { hourly: Some(Keep::Window(days(1))), daily: Some(Keep::Window(days(7))), ..Default::default() };
        let now = MONDAY + 10 * D + 30 * 60;
        let times: Vec<i64> = (0..240).map(|i| MONDAY + 10 * D - i * H).collect();
        let p = plan(&r, &pts(&times), now);
        let kept = kept_times(&p);
        assert_eq!(kept.iter().filter(|&&t| t > now - D).count(), 24);
        // Daily keeps the newest of each of the 7 days within the week (today's is already
        // kept by hourly): 6 more.
        assert_eq!(kept.len(), 24 + 6, "{kept:?}");
        assert!(
            p.kept().any(|d| d.reasons.iter().any(|r| r.starts_with("hourly"))
                && d.reasons.iter().any(|r| r.starts_with("daily")))
        );
    }

    #[test]
    fn a_lone_old_point_is_never_deleted() {
        let r = Retention { within: Some(days(1)), ..Default::default() };
        let now = MONDAY + 30 * D;
        let p = plan(&r, &pts(&[MONDAY, MONDAY - D]), now);
        let kept: Vec<_> = p.kept().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].time, MONDAY);
        assert_eq!(kept[0].reasons, ["newest (an asset always keeps one)"]);
        assert!(plan(&r, &[], now).decisions.is_empty());
    }

    #[test]
    fn in_flight_and_future_points_are_kept() {
        let r = Retention { last: Some(1), ..Default::default() };
        let now = MONDAY;
        let mut points = pts(&[now - 3 * D, now - 2 * D, now + H]);
        points.push(Point { id: "running".into(), time: now - 10, in_flight: true });
        let p = plan(&r, &points, now);
        let reasons = |id: &str| p.decisions.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(reasons("running"), ["in flight"]);
        assert_eq!(reasons("s002"), ["dated after now (clock skew)", "last 1/1"]);
        assert!(reasons("s001").is_empty());
        assert!(reasons("s000").is_empty());
    }

    fn rules() -> impl Strategy<Value = Retention> {
        let keep = prop_oneof![
            Just(None),
            (0u32..10).prop_map(|n| Some(Keep::Count(n))),
            (0u64..40 * 86_400).prop_map(|s| Some(Keep::Window(Duration::from_secs(s)))),
        ];
        (
            prop::bool::weighted(0.05),
            prop::option::of(0u64..20 * 86_400),
            prop::option::of(0u32..5),
            keep.clone(),
            keep.clone(),
            keep.clone(),
            keep.clone(),
            keep,
        )
            .prop_map(|(forever, within, last, hourly, daily, weekly, monthly, yearly)| Retention {
                forever,
                within: within.map(Duration::from_secs),
                last,
                hourly,
                daily,
                weekly,
                monthly,
                yearly,
            })
    }

    fn points() -> impl Strategy<Value = Vec<Point>> {
        prop::collection::vec((-400 * D..2 * H, prop::bool::weighted(0.05)), 0..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (dt, in_flight))| Point { id: format!("p{i:03}"), time: MONDAY + dt, in_flight })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn plans_are_safe_and_idempotent(r in rules(), points in points()) {
            let now = MONDAY;
            let p = plan(&r, &points, now);
            prop_assert_eq!(p.decisions.len(), points.len());
            for d in &p.decisions {
                let src = points.iter().find(|x| x.id == d.id).unwrap();
                if src.in_flight || src.time > now {
                    prop_assert!(d.keep(), "{:?} must be kept", src);
                }
            }
            if points.iter().any(|x| !x.in_flight) {
                prop_assert!(p.kept().any(|d| points.iter().any(|x| x.id == d.id && !x.in_flight)));
            }
            for w in p.decisions.windows(2) {
                prop_assert!(w[0].time >= w[1].time, "newest first");
            }
            // Applying the plan and planning again deletes nothing more.
            let survivors: Vec<Point> =
                points.iter().filter(|x| p.kept().any(|d| d.id == x.id)).cloned().collect();
            let again = plan(&r, &survivors, now);
            prop_assert_eq!(again.deleted().count(), 0);
            // Each count rule keeps at most its count, one per bucket, each the newest of its bucket.
            for (bucket, keep) in r.buckets() {
                let name = bucket.name();
                let by_rule: Vec<&Decision> =
                    p.kept().filter(|d| d.reasons.iter().any(|x| x.starts_with(&format!("{name} ")))).collect();
                if let Keep::Count(n) = keep {
                    prop_assert!(by_rule.len() <= n as usize);
                }
                let keys: BTreeSet<i64> = by_rule.iter().map(|d| bucket_key(bucket, d.time)).collect();
                prop_assert_eq!(keys.len(), by_rule.len());
                for d in by_rule {
                    let newest_in_bucket = points
                        .iter()
                        .filter(|x| !x.in_flight && bucket_key(bucket, x.time) == bucket_key(bucket, d.time))
                        .map(|x| x.time)
                        .max()
                        .unwrap();
                    prop_assert_eq!(d.time, newest_in_bucket);
                }
            }
        }
    }
}
