//! agent-longhorn against real block data: raw images made with `truncate` and
//! `mkfs.ext4`, files written into them with `debugfs` (no mount needed), and a real
//! coordinator on loopback. Longhorn itself (its manager API) is not exercised here.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator};

const GRANTS: &str = "[agents.lh-1]\nassets = [\"longhorn/*\"]\n";
const MIB: u64 = 1 << 20;

fn agent(coord: &Coordinator, certs: &Path, dir: &Path, device: &Path) -> Command {
    let mut c = kit::agent("agent-longhorn", coord, certs, "lh-1", dir, "longhorn/pvc-1");
    c.arg("--device").arg(device).args(["--volume", "pvc-1"]);
    c
}

fn sha256(path: &Path) -> String {
    kit::ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_string()
}

#[test]
fn blocks_holes_changed_blocks_sparse_restore_and_drill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["lh-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);

    // A 256 MiB sparse image with an ext4 filesystem holding 24 MiB of random data.
    let img = dir.join("volume.img");
    kit::ok(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    kit::ok(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1"]).arg(&img));
    let payload = dir.join("payload.bin");
    std::fs::write(&payload, kit::random_bytes(24 << 20, 11)).unwrap();
    kit::ok(
        Command::new("debugfs").args(["-w", "-R"]).arg(format!("write {} payload.bin", payload.display())).arg(&img),
    );
    let original = sha256(&img);

    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (first, size, new) = kit::backup_line(&out);
    assert!(size < 64 * MIB, "only data blocks are in the snapshot ({size} bytes of a 256 MiB volume): {out}");
    assert!((24 * MIB..40 * MIB).contains(&new), "random data is stored once, holes never: {out}");

    // Restore into a new image: sparse, and the whole volume identical.
    let restored = dir.join("restored.img");
    let o = kit::ok(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", &first, "--to"]).arg(&restored));
    assert!(o.contains("verified"), "{o}");
    assert_eq!(sha256(&restored), original);
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&restored).unwrap().blocks() * 512
    };
    assert!(allocated < 64 * MIB, "holes stay holes: {allocated} bytes allocated");

    // An existing target: refused without --force, refused at another size even with it.
    let o = kit::run(agent(&coord, &certs, dir, &img).args(["restore", "--to"]).arg(&restored));
    assert!(!o.status.success() && kit::stderr(&o).contains("--force"), "{}", kit::stderr(&o));
    let small = dir.join("small.img");
    kit::ok(Command::new("truncate").args(["-s", "128M"]).arg(&small));
    let o = kit::run(agent(&coord, &certs, dir, &img).args(["--force", "restore", "--to"]).arg(&small));
    assert!(!o.status.success() && kit::stderr(&o).contains("same size"), "{}", kit::stderr(&o));
    // With --force over a same-size image full of other data: the volume exactly.
    std::fs::write(&restored, vec![0xAB; 256 << 20]).unwrap();
    kit::ok(agent(&coord, &certs, dir, &img).args(["--force", "restore", "--snapshot", &first, "--to"]).arg(&restored));
    assert_eq!(sha256(&restored), original);

    // A destination whose disk is too small for the volume's data: the restore fails naming
    // the block (by volume offset), the destination and the cause, and leaves no image.
    let small_fs = dir.join("small-fs");
    std::fs::create_dir(&small_fs).unwrap();
    let mut restore = agent(&coord, &certs, dir, &img);
    restore.args(["restore", "--snapshot", &first, "--to"]).arg(small_fs.join("full.img"));
    let o = kit::run(&mut kit::on_small_tmpfs(&restore, &small_fs, "8m"));
    let err = kit::stderr(&o);
    assert!(!o.status.success(), "24 MiB of data cannot fit in 8 MiB: {err}");
    for want in ["No space left on device", "volume offset", "full.img", "partial restore", "removed"] {
        assert!(err.contains(want), "{want:?} in: {err}");
    }
    assert_eq!(kit::stdout(&o).lines().last(), Some("left: "), "no image left behind");

    // The drill: restore, every block and the whole-volume hash, then e2fsck read-only.
    let d = kit::ok(agent(&coord, &certs, dir, &img).args(["drill", "--scratch"]).arg(dir));
    assert!(d.contains("passed") && d.contains("e2fsck -f -n found the ext4 filesystem clean"), "{d}");
    assert!(d.contains("RTO") && d.contains("RPO"), "{d}");

    // Change 1% of the volume's blocks (2 of 128 blocks hold new data): the next backup
    // stores about that much.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&kit::random_bytes(2 * MIB as usize, 99), 200 * MIB).unwrap();
    f.write_all_at(&kit::random_bytes(2 * MIB as usize, 98), 220 * MIB).unwrap();
    f.sync_all().unwrap();
    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (second, _, new) = kit::backup_line(&out);
    assert!((4 * MIB..5 * MIB).contains(&new), "two changed blocks cost two blocks: {out}");
    let again = dir.join("again.img");
    kit::ok(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", &second, "--to"]).arg(&again));
    let second_sha = sha256(&img);
    assert_eq!(sha256(&again), second_sha);

    // The volume grows, then shrinks, between backups: each backup holds the whole volume at
    // its size then (unchanged blocks still deduplicate), and older snapshots restore at theirs.
    kit::ok(Command::new("truncate").args(["-s", "320M"]).arg(&img));
    f.write_all_at(&kit::random_bytes(MIB as usize, 97), 300 * MIB).unwrap();
    f.sync_all().unwrap();
    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (grown, _, new) = kit::backup_line(&out);
    assert!(new < 2 * MIB, "growing by one written block stores about that block: {out}");
    kit::ok(Command::new("truncate").args(["-s", "192M"]).arg(&img));
    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (shrunk, _, _) = kit::backup_line(&out);
    for (snapshot, expected) in [(&grown, None), (&shrunk, Some(sha256(&img))), (&second, Some(second_sha))] {
        let to = dir.join(format!("sized-{snapshot}.img"));
        kit::ok(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", snapshot, "--to"]).arg(&to));
        match expected {
            Some(sha) => assert_eq!(sha256(&to), sha, "snapshot {snapshot}"),
            None => {
                let len = std::fs::metadata(&to).unwrap().len();
                assert_eq!(len, 320 * MIB, "the grown snapshot restores at its size");
                let mut tail = vec![0u8; MIB as usize];
                std::fs::File::open(&to).unwrap().read_exact_at(&mut tail, 300 * MIB).unwrap();
                assert!(tail == kit::random_bytes(MIB as usize, 97), "the block written past the old end");
            }
        }
        std::fs::remove_file(&to).unwrap();
    }

    // A corrupted block in a pack: the restore fails and names the block by its offset.
    // Every pack's first chunk is hit, so the first snapshot's pack is among them.
    for pack in coord.packs() {
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[64] ^= 0x01; // inside the pack's first chunk
        std::fs::write(&pack, &bytes).unwrap();
    }
    let to = dir.join("corrupt.img");
    let o = kit::run(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", &first, "--to"]).arg(&to));
    let err = kit::stderr(&o);
    assert!(!o.status.success() && err.contains("corrupt") && err.contains("volume offset"), "{err}");
    assert!(!to.exists(), "a restore that failed leaves no image behind");
}

/// A fake Longhorn manager: Longhorn itself cannot run here. It serves the v1 API's shapes
/// as Longhorn documents and serves them (docs/longhorn-api-notes.md): the volume resource
/// (sizes as decimal strings, robustness, replicas with mode/running/failedAt) and the
/// volume actions snapshotCreate and snapshotDelete; an unknown volume is a bare 404.
struct FakeLonghorn {
    url: String,
    state: std::sync::Arc<std::sync::Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    robustness: String,
    failed_replicas: usize,
    /// Bytes written since the newest snapshot (the volume head).
    head: u64,
    snapshots: Vec<String>,
    calls: Vec<String>,
}

fn fake_volume(st: &FakeState) -> String {
    let replicas: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            let bad = i < st.failed_replicas;
            serde_json::json!({
                "name": format!("pvc-1-r-{i}"), "hostId": format!("node-{i}"),
                "mode": if bad { "ERR" } else { "RW" }, "running": !bad,
                "failedAt": if bad { "2026-11-24T10:00:00Z" } else { "" },
                "dataPath": format!("/var/lib/longhorn/replicas/pvc-1-{i}"),
            })
        })
        .collect();
    serde_json::json!({
        "id": "pvc-1", "type": "volume",
        "links": {"self": "http://longhorn-backend:9500/v1/volumes/pvc-1"},
        "actions": {"snapshotCreate": "http://longhorn-backend:9500/v1/volumes/pvc-1?action=snapshotCreate"},
        "name": "pvc-1", "size": "268435456", "state": "attached", "robustness": st.robustness,
        "numberOfReplicas": 3, "created": "2026-11-24 09:00:00 +0000 UTC",
        "replicas": replicas,
        "controllers": [{"name": "pvc-1-e-0", "hostId": "node-0", "size": "268435456", "actualSize": "33554432",
                         "endpoint": "/dev/longhorn/pvc-1", "running": true}],
    })
    .to_string()
}

impl FakeLonghorn {
    fn start() -> FakeLonghorn {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = std::sync::Arc::new(std::sync::Mutex::new(FakeState {
            robustness: "healthy".into(),
            ..Default::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut length = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let mut st = shared.lock().unwrap();
                st.calls.push(format!("{method} {target}"));
                let (code, reply) = match (method.as_str(), target.as_str()) {
                    ("GET", "/v1/volumes/pvc-1") => (200, fake_volume(&st)),
                    ("POST", "/v1/volumes/pvc-1?action=snapshotList") => {
                        let mut data: Vec<serde_json::Value> = st
                            .snapshots
                            .iter()
                            .map(|n| {
                                serde_json::json!({
                            "id": n, "type": "snapshot", "name": n, "usercreated": true, "removed": false,
                            "created": "2026-11-24T10:00:00Z", "size": "1048576", "children": {}})
                            })
                            .collect();
                        data.push(serde_json::json!({"id": "volume-head", "type": "snapshot", "name": "volume-head",
                            "usercreated": false, "removed": false, "created": "2026-11-24T10:00:01Z",
                            "size": st.head.to_string(), "children": {}}));
                        (
                            200,
                            serde_json::json!({"type": "collection", "resourceType": "snapshot", "data": data})
                                .to_string(),
                        )
                    }
                    ("POST", "/v1/volumes/pvc-1?action=snapshotCreate") => {
                        let name = body["name"].as_str().unwrap_or("snap").to_string();
                        st.snapshots.push(name.clone());
                        // What the head held moves into the new snapshot.
                        st.head = 0;
                        (
                            200,
                            serde_json::json!({"id": name, "type": "snapshot", "name": name, "parent": "",
                            "children": {"volume-head": true}, "removed": false, "usercreated": true,
                            "created": "2026-11-24T10:00:00Z", "size": "0", "labels": body["labels"]})
                            .to_string(),
                        )
                    }
                    ("POST", "/v1/volumes/pvc-1?action=snapshotDelete") => {
                        let name = body["name"].as_str().unwrap_or("").to_string();
                        st.snapshots.retain(|s| *s != name);
                        (200, fake_volume(&st))
                    }
                    _ => (404, String::new()),
                };
                drop(st);
                let reason = if code == 200 { "OK" } else { "Not Found" };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        FakeLonghorn { url, state }
    }
}

#[test]
fn longhorn_api_snapshot_marks_the_point_and_replica_health_is_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["lh-1"], &["ops"]);
    let config = format!("{GRANTS}[policy.assets.\"longhorn/pvc-1\"]\ncopies = [\"local\", \"replicas\"]\n");
    let coord = Coordinator::start(dir, &certs, &config);
    let fake = FakeLonghorn::start();
    let img = dir.join("volume.img");
    kit::ok(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&kit::random_bytes(3 << 20, 5), 8 << 20)
        .unwrap();
    let lh = || {
        let mut c = agent(&coord, &certs, dir, &img);
        c.args(["--longhorn-url", &fake.url]);
        c
    };
    let status = || -> serde_json::Value {
        let o = coord.grpcurl(
            &certs,
            "admin-ops",
            &["-d", "{\"asset\":\"longhorn/pvc-1\"}"],
            "coffer.v1.AdminService/AssetStatus",
        );
        assert!(o.status.success(), "{}", kit::stderr(&o));
        serde_json::from_str::<serde_json::Value>(&kit::stdout(&o)).unwrap()["status"].clone()
    };

    // Healthy: a Longhorn snapshot is taken before the read and deleted after; the replicas
    // count as a copy.
    let out = kit::ok(lh().arg("backup"));
    let (snap, _, _) = kit::backup_line(&out);
    {
        let st = fake.state.lock().unwrap();
        let creates: Vec<&String> = st.calls.iter().filter(|c| c.contains("snapshotCreate")).collect();
        let deletes: Vec<&String> = st.calls.iter().filter(|c| c.contains("snapshotDelete")).collect();
        assert_eq!((creates.len(), deletes.len()), (1, 1), "{:?}", st.calls);
        assert!(st.snapshots.is_empty(), "the Longhorn snapshot is removed after the backup");
    }
    let s = status();
    assert!(s["copiesPresent"].as_array().unwrap().iter().any(|c| c == "replicas"), "{s}");
    let (_, text) = kit::http_get(&coord.metrics_url);
    let series = |n: &str| format!("coffer_asset_replicas_{n}{{asset=\"longhorn/pvc-1\",kind=\"longhorn\"}}");
    assert_eq!(kit::metric(&text, &series("healthy")), Some(3.0), "{text}");
    assert_eq!(kit::metric(&text, &series("desired")), Some(3.0), "{text}");
    let m = coord.data_dir.join(format!("repo/manifests/longhorn/pvc-1/{snap}.manifest"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(m).unwrap()).unwrap();
    assert_eq!(m["source"]["replicas_healthy"], 3);
    assert!(m["source"]["longhorn_snapshot"].as_str().unwrap().starts_with("coffer-"), "{m}");

    // Degraded: the backup still runs (the data is readable), but the replicas are no copy.
    {
        let mut st = fake.state.lock().unwrap();
        st.robustness = "degraded".into();
        st.failed_replicas = 1;
    }
    kit::ok(lh().arg("backup"));
    let s = status();
    assert!(!s["copiesPresent"].as_array().unwrap().iter().any(|c| c == "replicas"), "{s}");
    assert!(s["copiesSummary"].as_str().unwrap().contains("replicas degraded: 2/3 healthy"), "{s}");

    // Faulted: refused. A device of another size: refused. An unknown volume: the API's 404.
    fake.state.lock().unwrap().robustness = "faulted".into();
    let o = kit::run(lh().arg("backup"));
    assert!(!o.status.success() && kit::stderr(&o).contains("faulted"), "{}", kit::stderr(&o));
    fake.state.lock().unwrap().robustness = "healthy".into();
    let small = dir.join("small.img");
    kit::ok(Command::new("truncate").args(["-s", "64M"]).arg(&small));
    let o = kit::run(agent(&coord, &certs, dir, &small).args(["--longhorn-url", &fake.url, "backup"]));
    assert!(!o.status.success() && kit::stderr(&o).contains("wrong device"), "{}", kit::stderr(&o));
    let mut other = kit::agent("agent-longhorn", &coord, &certs, "lh-1", dir, "longhorn/pvc-1");
    other.arg("--device").arg(&img).args(["--volume", "pvc-9", "--longhorn-url", &fake.url, "backup"]);
    let o = kit::run(&mut other);
    assert!(!o.status.success() && kit::stderr(&o).contains("HTTP 404"), "{}", kit::stderr(&o));
}

#[test]
fn run_backs_up_when_the_volume_head_passes_the_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["lh-1"], &[]);
    // Only on-change backups here: the schedule is manual.
    let config = format!(
        "{GRANTS}[policy.assets.\"longhorn/pvc-1\"]\nschedule = \"manual\"\ncopies = [\"local\", \"replicas\"]\n"
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let fake = FakeLonghorn::start();
    let img = dir.join("volume.img");
    kit::ok(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    let mut daemon = agent(&coord, &certs, dir, &img);
    daemon
        .args(["--longhorn-url", &fake.url, "--change-threshold", "1MiB", "--change-min-interval", "1s"])
        .args(["--change-poll", "100ms", "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    let _daemon = kit::KillOnDrop(daemon.spawn().unwrap());
    let listed = || kit::ok(agent(&coord, &certs, dir, &img).arg("list")).lines().count() - 1;
    // Quiet volume: polled, no backup.
    kit::wait_for("the head polled", Duration::from_secs(30), || {
        fake.state.lock().unwrap().calls.iter().any(|c| c.contains("snapshotList")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(listed(), 0, "nothing changed, nothing backed up");
    // 5 MB written since the last snapshot: one backup, whose snapshot resets the head.
    fake.state.lock().unwrap().head = 5_000_000;
    kit::wait_for("an on-change backup", Duration::from_secs(60), || (listed() == 1).then_some(()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(listed(), 1, "the head was reset by the backup's snapshot: no second backup");
    let creates = fake.state.lock().unwrap().calls.iter().filter(|c| c.contains("snapshotCreate")).count();
    assert_eq!(creates, 1);
}
