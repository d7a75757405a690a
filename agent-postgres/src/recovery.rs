//! Point-in-time recovery: choosing the base backup for a target, checking the target is
//! inside the recovery window, and configuring the restored data directory for archive
//! recovery through `wal-fetch`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use coffer_common::manifest::Manifest;
use coffer_common::runtime::{Coordinator, SourceError};
use coffer_proto::v1 as pb;
use serde_json::Value;

use crate::WAL_STREAM;
use coffer_common::pgwal::{self as wal, Continuity, Lsn};

/// The agent config a restored server's `restore_command` runs `wal-fetch` with.
pub const RESTORE_CONFIG: &str = "coffer-restore.toml";

fn failed(e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(e.to_string())
}

/// Where recovery stops.
#[derive(Debug, Clone, Default)]
pub struct RecoveryTarget {
    pub time: Option<SystemTime>,
    pub lsn: Option<Lsn>,
    pub name: Option<String>,
    /// `promote` (default) or `pause`.
    pub action: String,
}

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        if let Some(t) = self.time {
            format!("time {}", humantime::format_rfc3339_micros(t))
        } else if let Some(l) = self.lsn {
            format!("LSN {l}")
        } else if let Some(n) = &self.name {
            format!("restore point {n:?}")
        } else {
            "the end of the archived WAL".into()
        }
    }
}

/// The agent flags `wal-fetch` needs, written beside the restored data.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub coordinator: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: PathBuf,
    pub asset: String,
}

/// A target directory must be new or empty.
pub fn prepare_target(target: &Path) -> Result<(), SourceError> {
    if target.exists() {
        let empty = std::fs::read_dir(target)
            .map_err(SourceError::io(format!("reading {}", target.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(failed(format!("{} is not empty; restore into a new directory", target.display())));
        }
    }
    std::fs::create_dir_all(target).map_err(SourceError::io(format!("creating {}", target.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
        .map_err(SourceError::io(format!("setting the mode of {}", target.display())))
}

/// Where tablespaces of a restore into `target` go: `<target>.tablespaces/<oid>`.
pub fn tablespace_root(target: &Path) -> PathBuf {
    let mut name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tablespaces");
    target.with_file_name(name)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Sets up archive recovery: `restore_command` through this binary's `wal-fetch`, the
/// recovery target, and `recovery.signal`.
pub fn write_recovery(
    target: &Path,
    m: &Manifest,
    rt: &RecoveryTarget,
    config: Option<&RestoreConfig>,
) -> Result<(), SourceError> {
    let io = |what: &Path| SourceError::io(format!("writing {}", what.display()));
    let exe = std::env::current_exe().map_err(SourceError::io("locating the agent binary"))?;
    let mut command = quote_shell(&exe.display().to_string());
    if let Some(c) = config {
        let path = absolute(&target.join(RESTORE_CONFIG));
        let toml = format!(
            "# Written by agent-postgres restore: the flags restore_command's wal-fetch runs with.\n\
             coordinator = {}\nca = {}\ncert = {}\nkey = {}\nidentity = {}\nasset = {}\nquiet = true\n",
            toml_str(&c.coordinator),
            toml_str(&absolute(&c.ca).display().to_string()),
            toml_str(&absolute(&c.cert).display().to_string()),
            toml_str(&absolute(&c.key).display().to_string()),
            toml_str(&absolute(&c.identity).display().to_string()),
            toml_str(&c.asset),
        );
        std::fs::write(&path, toml).map_err(io(&path))?;
        command.push_str(&format!(" --config {}", quote_shell(&path.display().to_string())));
    }
    command.push_str(" wal-fetch %f %p");
    let mut conf = format!(
        "\n# agent-postgres restore of snapshot {} of {}: recover to {}\nrestore_command = {}\nrecovery_target_timeline = 'latest'\n",
        m.snapshot,
        m.asset,
        rt.describe(),
        quote(&command)
    );
    if let Some(t) = rt.time {
        conf.push_str(&format!("recovery_target_time = {}\n", quote(&pg_timestamp(t))));
    } else if let Some(l) = rt.lsn {
        conf.push_str(&format!("recovery_target_lsn = {}\n", quote(&l.to_string())));
    } else if let Some(n) = &rt.name {
        conf.push_str(&format!("recovery_target_name = {}\n", quote(n)));
    }
    if rt.time.is_some() || rt.lsn.is_some() || rt.name.is_some() {
        let action = if rt.action.is_empty() { "promote" } else { rt.action.as_str() };
        conf.push_str(&format!("recovery_target_action = {}\n", quote(action)));
    }
    let auto = target.join("postgresql.auto.conf");
    let mut existing = std::fs::read_to_string(&auto).unwrap_or_default();
    existing.push_str(&conf);
    std::fs::write(&auto, existing).map_err(io(&auto))?;
    let signal = target.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(io(&signal))?;
    Ok(())
}

/// A timestamp as PostgreSQL's recovery_target_time accepts it (`YYYY-MM-DD HH:MM:SS.ffffff+00`).
pub fn pg_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string().replacen('T', " ", 1).replace('Z', "+00")
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Quotes a word for the shell PostgreSQL runs `restore_command` with.
fn quote_shell(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,".contains(&b)) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`"))
    }
}

/// A base backup's facts from its manifest.
#[derive(Debug, Clone)]
pub struct Base {
    pub id: String,
    pub timeline: u32,
    pub start_wal: String,
    pub stop_lsn: Lsn,
    pub stop_time: SystemTime,
    pub seg_size: u64,
}

impl Base {
    pub fn of(m: &Manifest) -> Result<Base, SourceError> {
        let s = |k: &str| {
            m.source
                .get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| failed(format!("snapshot {} has no {k}: not a base backup", m.snapshot)))
        };
        let n = |k: &str| {
            m.source.get(k).and_then(Value::as_u64).ok_or_else(|| failed(format!("snapshot {} has no {k}", m.snapshot)))
        };
        Ok(Base {
            id: m.snapshot.clone(),
            timeline: n("timeline")? as u32,
            start_wal: s("start_wal")?.to_string(),
            stop_lsn: Lsn::parse(s("stop_lsn")?).ok_or_else(|| failed("bad stop_lsn"))?,
            stop_time: coffer_common::time::parse_rfc3339(s("stop_time")?).ok_or_else(|| failed("bad stop_time"))?,
            seg_size: n("wal_segment_size")?,
        })
    }
}

/// The archived WAL of an asset: every file name, and the newest entry's commit time.
pub struct Archive {
    pub names: Vec<String>,
    pub newest: Option<SystemTime>,
}

impl Archive {
    pub async fn load(coord: &Coordinator, asset: &str) -> Result<Archive, SourceError> {
        let files = coord.stream_files(asset, WAL_STREAM, &[]).await?;
        let newest = coord
            .list_stream(asset, WAL_STREAM, 1)
            .await?
            .first()
            .and_then(|s| coffer_common::time::parse_rfc3339(&s.finished_at));
        Ok(Archive { names: files.into_iter().map(|f| f.path).collect(), newest })
    }

    pub fn continuity(&self, seg_size: u64) -> Continuity {
        Continuity::of(self.names.iter().map(String::as_str), seg_size)
    }
}

fn time_str(t: SystemTime) -> String {
    coffer_common::time::rfc3339(t)
}

/// Picks the base backup to restore for `snapshot` (an id or `latest`) and `rt`, and checks
/// the target lies inside the recovery window. Never picks a base backup that ends after
/// the target.
pub async fn choose_base(
    coord: &Coordinator,
    asset: &str,
    snapshot: &str,
    rt: &RecoveryTarget,
) -> Result<(Base, Archive), SourceError> {
    let bases: Vec<pb::SnapshotInfo> = if snapshot == "latest" {
        coord.list_snapshots(asset, 0).await?
    } else {
        let m = coord
            .manifest(asset, snapshot)
            .await?
            .ok_or_else(|| failed(format!("no snapshot {snapshot} of {asset}")))?;
        vec![m.info]
    };
    if bases.is_empty() {
        return Err(failed(format!("{asset} has no base backup yet")));
    }
    let mut chosen = None;
    let mut oldest_stop = None;
    for info in &bases {
        let started = coffer_common::time::parse_rfc3339(&info.started_at).unwrap_or(SystemTime::UNIX_EPOCH);
        if rt.time.is_some_and(|t| started > t) {
            continue;
        }
        let m =
            coord.manifest(asset, &info.id).await?.ok_or_else(|| failed(format!("snapshot {} vanished", info.id)))?;
        let base = Base::of(&m.manifest)?;
        oldest_stop = Some(base.stop_time);
        let fits = match (rt.time, rt.lsn) {
            (Some(t), _) => base.stop_time <= t,
            (None, Some(l)) => base.stop_lsn <= l,
            _ => true,
        };
        if fits {
            chosen = Some(base);
            break;
        }
    }
    let Some(base) = chosen else {
        let oldest = bases.last().map(|b| b.finished_at.clone()).unwrap_or_default();
        return Err(failed(match (rt.time, snapshot) {
            (Some(t), "latest") => format!(
                "target time {} is before the recovery window of {asset}: the oldest base backup ends at {}",
                time_str(t),
                oldest_stop.map(time_str).unwrap_or(oldest)
            ),
            (Some(t), id) => {
                format!("base backup {id} ends after the target time {}; choose an older one or `latest`", time_str(t))
            }
            _ => format!("no base backup of {asset} ends before {}", rt.describe()),
        }));
    };
    let archive = Archive::load(coord, asset).await?;
    if let (Some(t), Some(newest)) = (rt.time, archive.newest)
        && t > newest
    {
        return Err(failed(format!(
            "target time {} is after the recovery window of {asset}: the newest archived WAL was committed at {}",
            time_str(t),
            time_str(newest)
        )));
    }
    let start_seg = match wal::parse_name(&base.start_wal, base.seg_size) {
        Some(wal::WalFile::Segment { segno, .. }) => segno,
        _ => return Err(failed(format!("snapshot {} names a malformed start segment {}", base.id, base.start_wal))),
    };
    let c = archive.continuity(base.seg_size);
    if !c.continuous_from(base.timeline, start_seg) {
        let gap = c
            .gaps
            .iter()
            .find(|g| g.0 >= base.timeline && g.1 >= start_seg)
            .map(|g| {
                format!(
                    "segments {} to {} are missing",
                    wal::segment_name(g.0, g.1, base.seg_size),
                    wal::segment_name(g.0, g.2, base.seg_size)
                )
            })
            .unwrap_or_else(|| format!("segment {} is not archived", base.start_wal));
        return Err(failed(format!(
            "the WAL after base backup {} is not continuous ({gap}); recovery would stop there. \
             Choose a target before the gap with --target-time / --target-lsn",
            base.id
        )));
    }
    Ok((base, archive))
}

/// `agent-postgres info`: base backups, WAL ranges, gaps and the recovery window.
pub async fn info(coord: &Coordinator, asset: &str) -> Result<String, SourceError> {
    use std::fmt::Write;
    let bases = coord.list_snapshots(asset, 0).await?;
    let mut out = String::new();
    let _ = writeln!(out, "asset {asset}");
    let _ = writeln!(out, "base backups: {}", bases.len());
    let mut seg_size = 16 << 20;
    let mut parsed = Vec::new();
    for b in &bases {
        let m = coord.manifest(asset, &b.id).await?.ok_or_else(|| failed(format!("snapshot {} vanished", b.id)))?;
        let base = Base::of(&m.manifest)?;
        seg_size = base.seg_size;
        let _ = writeln!(
            out,
            "  {}  timeline {}  start {}  stop {} at {}  {}",
            b.id,
            base.timeline,
            base.start_wal,
            base.stop_lsn,
            time_str(base.stop_time),
            coffer_common::units::format_size(b.size)
        );
        parsed.push(base);
    }
    let archive = Archive::load(coord, asset).await?;
    let c = archive.continuity(seg_size);
    let _ = writeln!(
        out,
        "WAL: {} file(s), newest segment {}",
        archive.names.len(),
        c.newest().map(|(t, s)| wal::segment_name(t, s, seg_size)).unwrap_or_else(|| "none".into())
    );
    for r in &c.ranges {
        let _ = writeln!(
            out,
            "  timeline {}: {} .. {}",
            r.timeline,
            wal::segment_name(r.timeline, r.first, seg_size),
            wal::segment_name(r.timeline, r.last, seg_size)
        );
    }
    for g in &c.gaps {
        let _ = writeln!(
            out,
            "  GAP on timeline {}: {} .. {} missing",
            g.0,
            wal::segment_name(g.0, g.1, seg_size),
            wal::segment_name(g.0, g.2, seg_size)
        );
    }
    // The window starts at the oldest base backup the continuous WAL reaches from.
    let earliest = parsed.iter().rev().find(|b| match wal::parse_name(&b.start_wal, seg_size) {
        Some(wal::WalFile::Segment { segno, .. }) => c.continuous_from(b.timeline, segno),
        _ => false,
    });
    match (earliest, archive.newest) {
        (Some(b), Some(newest)) => {
            let _ = writeln!(out, "recovery window: {} .. {} (continuous)", time_str(b.stop_time), time_str(newest));
        }
        _ => {
            let _ = writeln!(out, "recovery window: none (no base backup with continuous WAL after it)");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_conf_and_shell() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote_shell("/usr/bin/agent-postgres"), "/usr/bin/agent-postgres");
        assert_eq!(quote_shell("/a b/$x"), "\"/a b/\\$x\"");
        let t = coffer_common::time::parse_rfc3339("2026-11-24T10:00:01Z").unwrap();
        assert_eq!(pg_timestamp(t), "2026-11-24 10:00:01.000000+00");
        assert_eq!(tablespace_root(Path::new("/r/pg")), PathBuf::from("/r/pg.tablespaces"));
    }
}
