//! Bad input and failures that must get a clear error and lose nothing: corrupted packs,
//! a coordinator or agent killed mid-upload, a full disk, shutdown. Real processes, real
//! mTLS on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator};

const GRANTS: &str = "[agents.git-1]\nassets = [\"git/*\"]\n";

struct Env {
    dir: tempfile::TempDir,
    certs: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let certs = kit::certs(&dir.path().join("certs"), &["git-1"], &["ops"]);
        Env { dir, certs }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn agent(&self, coord: &Coordinator, asset: &str) -> Command {
        let mut c = kit::agent("agent-git", coord, &self.certs, "git-1", self.dir.path(), asset);
        c.arg("--work-dir").arg(self.path("work"));
        // Random blobs do not delta-compress; skipping the search keeps bundling fast.
        c.env("GIT_CONFIG_COUNT", "1").env("GIT_CONFIG_KEY_0", "core.bigFileThreshold").env("GIT_CONFIG_VALUE_0", "1m");
        c
    }

    fn list(&self, coord: &Coordinator, asset: &str) -> Vec<String> {
        kit::ok(self.agent(coord, asset).arg("list"))
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

/// A repository with `files` random files of `size` bytes each.
fn big_repo(dir: &Path, files: usize, size: usize) -> PathBuf {
    let data: Vec<(String, Vec<u8>)> =
        (0..files).map(|i| (format!("data/{i:03}.bin"), kit::random_bytes(size, i as u64 + 100))).collect();
    let refs: Vec<(&str, &[u8])> = data.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    kit::git_repo(dir, &refs)
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning the agent")
}

#[test]
fn flipped_byte_in_a_pack_is_named_by_restore_and_verify() {
    let e = Env::new();
    let coord = Coordinator::start(e.dir.path(), &e.certs, GRANTS);
    let src = big_repo(&e.path("src"), 2, 300_000);
    let (snap, _, _) =
        kit::backup_line(&kit::ok(e.agent(&coord, "git/a").args(["--repo", src.to_str().unwrap(), "backup"])));

    let packs = coord.packs();
    assert!(!packs.is_empty());
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[64] ^= 0x01; // inside the first chunk's data (header is 8 + 2 + 5 bytes)
    std::fs::write(&packs[0], &bytes).unwrap();

    let o = kit::run(e.agent(&coord, "git/a").args(["restore", "--to", e.path("out").to_str().unwrap()]));
    assert!(!o.status.success(), "restore of a corrupted pack must fail");
    let err = kit::stderr(&o);
    assert!(err.contains(&snap) && err.contains("chunk ") && err.contains("corrupt"), "{err}");

    // The operator's check finds it without any keys and names the affected snapshot.
    let v = kit::run(Command::new(kit::bin("coordinator")).args(["verify", "--config"]).arg(&coord.config));
    assert_eq!(v.status.code(), Some(2), "{}", kit::stdout(&v));
    let report = kit::stdout(&v);
    assert!(report.contains("CORRUPT") && report.contains(&snap) && report.contains("checksum mismatch"), "{report}");

    // Restoring the byte makes everything good again: nothing else was touched.
    bytes[64] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();
    let v = kit::run(Command::new(kit::bin("coordinator")).args(["verify", "--config"]).arg(&coord.config));
    assert_eq!(v.status.code(), Some(0), "{}", kit::stdout(&v));
}

#[test]
fn coordinator_killed_mid_upload_loses_nothing_and_resumes() {
    let e = Env::new();
    let mut coord = Coordinator::start(e.dir.path(), &e.certs, &format!("pack-size = \"4MiB\"\n{GRANTS}"));
    let src = big_repo(&e.path("src"), 40, 2 << 20);
    let repo = src.to_str().unwrap().to_string();

    let mut agent = spawn(e.agent(&coord, "git/big").args(["--repo", &repo, "--memory-budget", "8MiB", "backup"]));
    kit::wait_for("two sealed packs", Duration::from_secs(120), || (coord.packs().len() >= 2).then_some(()));
    kit::signal(agent.id(), "STOP");
    coord.kill9();
    let _ = agent.kill();
    let _ = agent.wait();

    coord.restart();
    assert!(e.list(&coord, "git/big").is_empty(), "no snapshot is visible after the crash");
    assert_eq!(std::fs::read_dir(coord.data_dir.join("repo/tmp")).unwrap().count(), 0, "unsealed packs are discarded");
    let v = kit::run(Command::new(kit::bin("coordinator")).args(["verify", "--config"]).arg(&coord.config));
    assert_eq!(v.status.code(), Some(0), "nothing is corrupted: {}", kit::stdout(&v));

    let out = kit::ok(e.agent(&coord, "git/big").args(["--repo", &repo, "backup"]));
    let (_, size, new) = kit::backup_line(&out);
    assert!(new < size * 95 / 100, "the retry uploads only what is missing: {out}");
    let o = kit::ok(e.agent(&coord, "git/big").args(["restore", "--to", e.path("out").to_str().unwrap()]));
    assert!(o.contains("verified"));
    assert_eq!(kit::refs(&e.path("out")), kit::refs(&src));
}

#[test]
fn agent_killed_mid_backup_loses_nothing_and_resumes() {
    let e = Env::new();
    let coord = Coordinator::start(e.dir.path(), &e.certs, &format!("pack-size = \"4MiB\"\n{GRANTS}"));
    let src = big_repo(&e.path("src"), 40, 2 << 20);
    let repo = src.to_str().unwrap().to_string();

    let mut agent = spawn(e.agent(&coord, "git/big").args(["--repo", &repo, "--memory-budget", "8MiB", "backup"]));
    kit::wait_for("two sealed packs", Duration::from_secs(120), || (coord.packs().len() >= 2).then_some(()));
    let _ = agent.kill(); // SIGKILL
    let _ = agent.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !coord.logs().contains("upload stream broke") {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator did not see the stream break:\n{}",
            coord.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(e.list(&coord, "git/big").is_empty(), "no snapshot is visible");
    kit::wait_for("the dead agent's backup to be closed", Duration::from_secs(30), || {
        let state =
            kit::ok(Command::new("sqlite3").arg(coord.data_dir.join("catalog.db")).arg("SELECT state FROM backups"));
        (state.trim() == "aborted").then_some(())
    });
    let out = kit::ok(e.agent(&coord, "git/big").args(["--repo", &repo, "backup"]));
    let (_, size, new) = kit::backup_line(&out);
    assert!(new < size * 95 / 100, "acknowledged chunks were kept; only the rest is uploaded: {out}");
    kit::ok(e.agent(&coord, "git/big").args(["restore", "--to", e.path("out").to_str().unwrap()]));
    assert_eq!(kit::refs(&e.path("out")), kit::refs(&src));
}

#[test]
fn full_disk_fails_the_backup_cleanly_and_keeps_earlier_snapshots() {
    let e = Env::new();
    let data = e.path("coffer-data");
    std::fs::create_dir_all(&data).unwrap();
    // A 48 MiB filesystem of its own for the coordinator's data, in a private mount namespace
    // (no root needed): the real ENOSPC path, not a simulation.
    let script = format!("mount -t tmpfs -o size=48m tmpfs {} && exec \"$0\" \"$@\"", data.display());
    let wrapper = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script.as_str()];
    let coord = Coordinator::start_wrapped(
        e.dir.path(),
        &e.certs,
        &format!("min-free-space = \"1MiB\"\npack-size = \"4MiB\"\n{GRANTS}"),
        &wrapper,
    );

    let src = big_repo(&e.path("src"), 2, 200_000);
    let repo = src.to_str().unwrap().to_string();
    let (first, _, _) = kit::backup_line(&kit::ok(e.agent(&coord, "git/a").args(["--repo", &repo, "backup"])));

    let more: Vec<(String, Vec<u8>)> =
        (0..30).map(|i| (format!("more/{i}.bin"), kit::random_bytes(2 << 20, 900 + i))).collect();
    let refs: Vec<(&str, &[u8])> = more.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    kit::commit(&src, &refs, "too big for the disk");
    let o = kit::run(e.agent(&coord, "git/a").args(["--repo", &repo, "backup"]));
    assert!(!o.status.success(), "the backup cannot fit");
    let err = kit::stderr(&o);
    assert!(err.contains("disk") && (err.contains("full") || err.contains("free")), "{err}");

    assert_eq!(e.list(&coord, "git/a"), vec![first.clone()], "only the earlier snapshot is visible");
    let o = kit::ok(e.agent(&coord, "git/a").args([
        "restore",
        "--snapshot",
        &first,
        "--to",
        e.path("out").to_str().unwrap(),
    ]));
    assert!(o.contains("verified"), "{o}");
}

#[test]
fn low_free_space_refuses_new_backups_up_front() {
    let e = Env::new();
    let coord = Coordinator::start(e.dir.path(), &e.certs, &format!("min-free-space = \"1000TiB\"\n{GRANTS}"));
    let src = kit::git_repo(&e.path("src"), &[("a", b"a")]);
    let o = kit::run(e.agent(&coord, "git/a").args(["--repo", src.to_str().unwrap(), "backup"]));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("below the 1000.0 TiB minimum"), "{}", kit::stderr(&o));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let e = Env::new();
    let mut coord = Coordinator::start(e.dir.path(), &e.certs, GRANTS);
    let src = kit::git_repo(&e.path("src"), &[("a", b"a")]);
    kit::ok(e.agent(&coord, "git/a").args(["--repo", src.to_str().unwrap(), "backup"]));
    assert_eq!(coord.stop(), Some(0), "{}", coord.logs());
    assert!(coord.logs().contains("coordinator stopped"));
}

#[test]
fn grpcurl_lists_and_calls_the_admin_service() {
    let e = Env::new();
    let coord = Coordinator::start(e.dir.path(), &e.certs, GRANTS);
    let src = kit::git_repo(&e.path("src"), &[("a", b"a")]);
    let (snap, _, _) =
        kit::backup_line(&kit::ok(e.agent(&coord, "git/ops-demo").args(["--repo", src.to_str().unwrap(), "backup"])));
    let addr = coord.url.trim_start_matches("https://").to_string();
    let grpcurl = |who: &str, args: &[&str]| {
        let mut c = Command::new("grpcurl");
        c.arg("-cacert")
            .arg(e.certs.join("ca.pem"))
            .arg("-cert")
            .arg(e.certs.join(format!("{who}.pem")))
            .arg("-key")
            .arg(e.certs.join(format!("{who}.key")))
            .args(args);
        kit::run(&mut c)
    };
    let o = grpcurl("admin-ops", &[&addr, "list"]);
    assert!(o.status.success(), "grpcurl is required (scripts/install-deps.sh): {}", kit::stderr(&o));
    let services = kit::stdout(&o);
    for s in ["coffer.v1.AdminService", "coffer.v1.AgentService", "grpc.health.v1.Health"] {
        assert!(services.contains(s), "{services}");
    }
    let o = grpcurl("admin-ops", &["-d", "{}", &addr, "coffer.v1.AdminService/ListAssets"]);
    let json = kit::stdout(&o);
    assert!(o.status.success() && json.contains("git/ops-demo") && json.contains(&snap), "{json}{}", kit::stderr(&o));
    let o = grpcurl("admin-ops", &["-d", "{\"asset\":\"git/ops-demo\"}", &addr, "coffer.v1.AdminService/AssetStatus"]);
    assert!(kit::stdout(&o).contains("expectedIntervalSeconds"), "{}", kit::stdout(&o));
    let o = grpcurl("admin-ops", &[&addr, "grpc.health.v1.Health/Check"]);
    assert!(kit::stdout(&o).contains("SERVING"), "{}", kit::stdout(&o));
    let o = grpcurl("admin-ops", &["-d", "{}", &addr, "coffer.v1.AdminService/Verify"]);
    assert!(o.status.success() && !kit::stdout(&o).contains("corrupt"), "{}", kit::stdout(&o));
    // An agent certificate is not an admin.
    let o = grpcurl("agent-git-1", &["-d", "{}", &addr, "coffer.v1.AdminService/ListAssets"]);
    assert!(!o.status.success() && kit::stderr(&o).contains("PermissionDenied"), "{}", kit::stderr(&o));
}
