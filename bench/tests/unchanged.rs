//! `bench-agent` against a real coordinator: files whose size, mtime, ctime and inode are
//! unchanged are not read again, and no change is ever missed because of it, including a
//! write right before a backup (in the same timestamp tick as the walk).

use std::path::Path;
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator};

/// The source's racy window (`RACY` in bench/src/source.rs) plus a margin.
const SETTLE: Duration = Duration::from_millis(1200);

fn backup(coord: &Coordinator, certs: &Path, dir: &Path, data: &Path) -> (String, u64) {
    let out = kit::run(
        kit::agent("bench-agent", coord, certs, "bench", dir, "files/t")
            .env("RUST_LOG", "info")
            .arg("--dir")
            .arg(data)
            .arg("backup"),
    );
    assert!(out.status.success(), "backup failed: {}", kit::stderr(&out));
    let log = kit::stderr(&out);
    let unchanged = log
        .lines()
        .find(|l| l.contains("files backed up"))
        .and_then(|l| l.split("unchanged=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no unchanged count in {log}"))
        .parse()
        .unwrap();
    let snapshot = kit::stdout(&out)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("snapshot="))
        .expect("snapshot id")
        .to_string();
    (snapshot, unchanged)
}

fn restore(coord: &Coordinator, certs: &Path, dir: &Path, snapshot: &str, to: &Path) {
    kit::ok(
        kit::agent("bench-agent", coord, certs, "bench", dir, "files/t")
            .args(["restore", "--snapshot", snapshot])
            .arg("--to")
            .arg(to),
    );
}

#[test]
fn unchanged_files_are_reused_and_changes_are_never_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["bench"], &[]);
    let coord = Coordinator::start(dir, &certs, "[agents.bench]\nassets = [\"files/*\"]\n");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    for (name, seed) in [("a", 1), ("b", 2), ("sub/c", 3)] {
        std::fs::write(data.join(name), kit::random_bytes(300_000, seed)).unwrap();
    }
    std::thread::sleep(SETTLE);

    let (_, unchanged) = backup(&coord, &certs, dir, &data);
    assert_eq!(unchanged, 0, "nothing to reuse on the first backup");

    // Same size, new content, written right after the walk of the first backup.
    std::fs::write(data.join("a"), kit::random_bytes(300_000, 10)).unwrap();
    let (second, unchanged) = backup(&coord, &certs, dir, &data);
    assert_eq!(unchanged, 2, "b and sub/c are unchanged");
    let out = dir.join("r2");
    restore(&coord, &certs, dir, &second, &out);
    assert_eq!(std::fs::read(out.join("a")).unwrap(), kit::random_bytes(300_000, 10));
    assert_eq!(std::fs::read(out.join("sub/c")).unwrap(), kit::random_bytes(300_000, 3));

    // `a` was written just before the second walk, so it is read again even though its
    // stat is the same; `b` changes; only `sub/c` is reused.
    std::fs::write(data.join("b"), kit::random_bytes(300_000, 20)).unwrap();
    let (third, unchanged) = backup(&coord, &certs, dir, &data);
    assert_eq!(unchanged, 1);
    let out = dir.join("r3");
    restore(&coord, &certs, dir, &third, &out);
    for (name, seed) in [("a", 10), ("b", 20), ("sub/c", 3)] {
        assert_eq!(std::fs::read(out.join(name)).unwrap(), kit::random_bytes(300_000, seed), "{name}");
    }
}
