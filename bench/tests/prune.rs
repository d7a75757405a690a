//! Retention applied with real processes: a plan that keeps exactly what the policy says,
//! pack collection that deletes dead packs and rewrites partly dead ones, an offline prune
//! crashed at each step and rerun to completion, and every kept snapshot restored bit-exact.

use std::path::Path;
use std::process::Command;

use coffer_testkit::{self as kit, Coordinator};

const CONFIG: &str = "gc-grace = \"0s\"\nretention-interval = \"0s\"\n[agents.bench]\nassets = [\"files/*\"]\n\
                      [policy.assets.\"files/p\"]\nretention = { last = 1 }\n";
const SIZE: usize = 400_000;

fn agent(coord: &Coordinator, certs: &Path, dir: &Path) -> Command {
    kit::agent("bench-agent", coord, certs, "bench", dir, "files/p")
}

fn backup(coord: &Coordinator, certs: &Path, dir: &Path, data: &Path) -> String {
    let out = kit::ok(agent(coord, certs, dir).arg("--dir").arg(data).arg("backup"));
    out.split_whitespace().find_map(|w| w.strip_prefix("snapshot=")).expect("snapshot id").to_string()
}

fn snapshots(coord: &Coordinator, certs: &Path, dir: &Path) -> Vec<String> {
    let out = kit::ok(agent(coord, certs, dir).arg("list"));
    out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// `coordinator prune` on the stopped coordinator's data; `crash_at` makes it abort there.
fn prune(coord: &Coordinator, apply: bool, crash_at: Option<&str>) -> std::process::Output {
    let mut c = Command::new(kit::bin("coordinator"));
    c.arg("prune").arg("--config").arg(&coord.config);
    if apply {
        c.arg("--apply");
    }
    match crash_at {
        Some(step) => c.env("COFFER_TEST_CRASH_AT", step),
        None => c.env_remove("COFFER_TEST_CRASH_AT"),
    };
    kit::run(&mut c)
}

#[test]
fn prune_keeps_the_plan_survives_crashes_and_every_kept_snapshot_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["bench"], &["ops"]);
    let mut coord = Coordinator::start(dir, &certs, CONFIG);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Three snapshots: `b` never changes, `a` changes every time. The first snapshot's pack
    // then holds a dead `a` and a live `b` (a repack), the second's only a dead `a`.
    std::fs::write(data.join("b"), kit::random_bytes(SIZE, 2)).unwrap();
    let mut ids = Vec::new();
    for seed in [10, 11, 12] {
        std::fs::write(data.join("a"), kit::random_bytes(SIZE, seed)).unwrap();
        ids.push(backup(&coord, &certs, dir, &data));
    }
    let packs_before = coord.packs().len();
    assert_eq!(packs_before, 3, "one pack per backup");

    // The plan over the admin service, while the coordinator runs.
    let o =
        coord.grpcurl(&certs, "admin-ops", &["-d", "{\"asset\":\"files/p\"}"], "coffer.v1.AdminService/RetentionPlan");
    assert!(o.status.success(), "{}", kit::stderr(&o));
    let plan: serde_json::Value = serde_json::from_str(&kit::stdout(&o)).unwrap();
    let a = &plan["assets"][0];
    let kept: Vec<&str> = a["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["snapshotId"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [ids[2].as_str()], "{plan}");
    assert_eq!(a["decisions"][0]["reasons"][0], "last 1/1", "{plan}");
    assert_eq!((a["packsDeleted"].as_str(), a["packsRepacked"].as_str()), (Some("1"), Some("1")), "{plan}");
    assert_eq!(snapshots(&coord, &certs, dir).len(), 3, "a plan changes nothing");

    // Offline: the CLI refuses while the coordinator holds the data directory.
    let o = prune(&coord, false, None);
    assert!(!o.status.success() && kit::stderr(&o).contains("in use by another coordinator"), "{}", kit::stderr(&o));
    assert_eq!(coord.stop(), Some(0));
    let o = prune(&coord, false, None);
    assert!(o.status.success(), "{}", kit::stderr(&o));
    let report = kit::stdout(&o);
    assert!(report.contains("1 kept, 2 to delete") && report.contains("dry run"), "{report}");

    // Apply, crashing after each kind of catalog change and before the file change; each
    // rerun starts by reconciling and carries on.
    for step in ["forget:2", "delete-pack:1", "repack:1"] {
        let o = prune(&coord, true, Some(step));
        assert!(!o.status.success(), "the prune was meant to crash at {step}: {}", kit::stdout(&o));
        assert!(kit::stderr(&o).contains("aborting"), "{}", kit::stderr(&o));
    }
    let o = prune(&coord, true, None);
    assert!(o.status.success(), "{}", kit::stderr(&o));
    coord.restart();

    // Exactly the planned set remains, the dead pack and the old copy are gone, and the
    // repository verifies.
    assert_eq!(snapshots(&coord, &certs, dir), [ids[2].clone()]);
    assert_eq!(coord.packs().len(), 2, "the third backup's pack and the rewritten first one");
    let v = kit::run(Command::new(kit::bin("coordinator")).args(["verify", "--config"]).arg(&coord.config));
    assert!(v.status.success() && kit::stdout(&v).contains("0 problem(s)"), "{}", kit::stdout(&v));
    // Every kept snapshot restores bit-exact (the live `b` was moved by the repack).
    let out = dir.join("restored");
    kit::ok(agent(&coord, &certs, dir).args(["restore", "--snapshot", &ids[2]]).arg("--to").arg(&out));
    assert_eq!(std::fs::read(out.join("a")).unwrap(), kit::random_bytes(SIZE, 12));
    assert_eq!(std::fs::read(out.join("b")).unwrap(), kit::random_bytes(SIZE, 2));
    // And the next backup still deduplicates against what prune kept.
    let again = kit::ok(agent(&coord, &certs, dir).arg("--dir").arg(&data).arg("backup"));
    assert!(again.contains("new_bytes=0"), "{again}");
}
