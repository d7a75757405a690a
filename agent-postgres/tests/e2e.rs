//! agent-postgres against a real PostgreSQL (initdb'd in a temp dir, on a private socket)
//! and a real coordinator on loopback: WAL archiving through `archive_command`, base
//! backups, point-in-time restore that a stock server replays exactly to the target, the
//! drill, the recovery-window refusals, and wal-push/wal-fetch exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};

/// Base backups only when the test takes them (the built-in policy is daily, due at once).
const GRANTS: &str =
    "[agents.pg-1]\nassets = [\"postgres/*\"]\n[policy.assets.\"postgres/main\"]\nschedule = \"manual\"\n";

/// Directory of the newest installed PostgreSQL server binaries.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("postgres").is_file()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL server binaries are required (scripts/install-deps.sh installs postgresql)")
}

fn is_root() -> bool {
    kit::stdout(&kit::run(Command::new("id").arg("-u"))).trim() == "0"
}

/// A PostgreSQL command: as the `postgres` OS user when the test runs as root (the server
/// refuses root), with the environment kept.
fn pg_command(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Hands a directory tree to the `postgres` user when running as root.
fn give_to_postgres(path: &Path) {
    if is_root() {
        kit::ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path));
    }
}

/// The common agent flags as `COFFER_*` variables (what `archive_command` runs with).
fn agent_env(coord: &Coordinator, certs: &Path, dir: &Path, asset: &str) -> Vec<(String, String)> {
    vec![
        ("COFFER_COORDINATOR".into(), coord.url.clone()),
        ("COFFER_CA".into(), certs.join("ca.pem").display().to_string()),
        ("COFFER_CERT".into(), certs.join("agent-pg-1.pem").display().to_string()),
        ("COFFER_KEY".into(), certs.join("agent-pg-1.key").display().to_string()),
        ("COFFER_IDENTITY".into(), dir.join("pg-1.identity").display().to_string()),
        ("COFFER_ASSET".into(), asset.into()),
        ("COFFER_QUIET".into(), "true".into()),
        ("RUST_LOG".into(), "warn".into()),
    ]
}

struct Pg {
    proc: Option<KillOnDrop>,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
}

impl Pg {
    /// initdb + start with WAL archiving through agent-postgres.
    fn init(dir: &Path, env: &[(String, String)]) -> Pg {
        let data = dir.join("pgdata");
        let sock = dir.join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        give_to_postgres(dir);
        kit::ok(
            pg_command(pg_bin().join("initdb"))
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"])
                .arg(&data)
                .stdout(Stdio::null()),
        );
        let conf = format!(
            "archive_mode = on\narchive_command = '{} wal-push %p'\nwal_level = replica\n\
             max_wal_size = 256MB\nfsync = off\nsynchronous_commit = on\nlisten_addresses = ''\n",
            kit::bin("agent-postgres").display()
        );
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        let mut pg = Pg { proc: None, data, sock, port: kit::free_port() };
        pg.start(env, &[]);
        pg
    }

    fn start(&mut self, env: &[(String, String)], extra: &[&str]) {
        let log_path = self.sock.parent().unwrap().join(format!("pg-{}.log", self.port));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut c = pg_command(pg_bin().join("postgres"));
        c.arg("-D").arg(&self.data).args(["-p", &self.port.to_string(), "-c"]);
        c.arg(format!("unix_socket_directories={}", self.sock.display()));
        for e in extra {
            c.args(["-c", e]);
        }
        c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = KillOnDrop(c.spawn().expect("starting postgres"));
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let o = self.psql_raw("SELECT 1");
            if o.status.success() && kit::stdout(&o).trim() == "1" {
                break;
            }
            let exited = child.0.try_wait().unwrap();
            if exited.is_some() || std::time::Instant::now() > deadline {
                panic!(
                    "postgres did not come up ({exited:?}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(child);
    }

    /// Fast shutdown, waiting until the postmaster and its children are gone (a SIGKILLed
    /// postmaster's children may still hold the shared memory a restart needs).
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            kit::signal(p.0.id(), "INT");
            let _ = p.0.wait();
        }
    }

    fn psql_raw(&self, sql: &str) -> std::process::Output {
        kit::run(
            Command::new("psql")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
                .arg(&self.sock)
                .args(["-p", &self.port.to_string(), "-c", sql]),
        )
    }

    fn sql(&self, sql: &str) -> String {
        let o = self.psql_raw(sql);
        assert!(o.status.success(), "psql {sql}: {}", kit::stderr(&o));
        kit::stdout(&o).trim().to_string()
    }

    fn conn(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.sock.display(), self.port)
    }

    /// Switches WAL and waits until the archiver has archived the closed segment.
    fn switch_and_archive(&self) -> String {
        let seg = self.sql("SELECT pg_walfile_name(pg_switch_wal())");
        kit::wait_for(&format!("{seg} archived"), Duration::from_secs(60), || {
            let last = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            (last.as_str() >= seg.as_str()).then_some(())
        });
        seg
    }

    /// A digest of table t: count, id sum, and an md5 over every row in order.
    fn digest(&self) -> String {
        self.sql("SELECT count(*) || ' ' || coalesce(sum(id), 0) || ' ' || md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) FROM t")
    }

    fn now_utc(&self) -> String {
        self.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    }
}

fn asset_status(coord: &Coordinator, certs: &Path, asset: &str) -> serde_json::Value {
    coord.admin_json(certs, "AssetStatus", &serde_json::json!({ "asset": asset }).to_string())["status"].clone()
}

fn pg_agent(coord: &Coordinator, certs: &Path, dir: &Path, pg: &Pg) -> Command {
    let mut c = kit::agent("agent-postgres", coord, certs, "pg-1", dir, "postgres/main");
    c.args(["--pg-conn", &pg.conn()]);
    c
}

#[test]
fn point_in_time_restore_is_exact_and_the_drill_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = kit::certs(&d.join("certs"), &["pg-1"], &["ops"]);
    let mut coord = Coordinator::start(d, &certs, GRANTS);
    let env = agent_env(&coord, &certs, d, "postgres/main");
    // The agent identity exists before the server's archive_command first needs it.
    kit::ok(kit::agent("agent-postgres", &coord, &certs, "pg-1", d, "postgres/main").arg("list"));
    let pg = Pg::init(d, &env);

    // The daemon writes the heartbeat the drill reads back.
    let mut daemon = pg_agent(&coord, &certs, d, &pg);
    daemon.args(["--heartbeat-interval", "1s", "run"]).stdout(Stdio::null()).stderr(Stdio::null());
    let _daemon = KillOnDrop(daemon.spawn().unwrap());
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)");
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    kit::wait_for("the first heartbeat", Duration::from_secs(30), || {
        (pg.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'coffer'") == "1").then_some(())
    });

    let out = kit::ok(pg_agent(&coord, &certs, d, &pg).arg("backup"));
    let (base1, size1, _) = kit::backup_line(&out);
    assert!(size1 > 10 << 20, "a base backup of a fresh cluster is over 10 MB: {out}");

    // Phase A, then the target time, then phase B (which the restore must not contain).
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 25000) g");
    pg.sql("UPDATE t SET v = 'phase a' WHERE id % 100 = 0");
    let at_target = pg.digest();
    std::thread::sleep(Duration::from_millis(1100));
    let target = pg.now_utc();
    std::thread::sleep(Duration::from_millis(1100));
    pg.sql("UPDATE t SET v = 'phase b' WHERE id % 7 = 0");
    pg.sql("DELETE FROM t WHERE id > 24000");
    let at_end = pg.digest();
    assert_ne!(at_target, at_end);
    // Heartbeats after the target, then everything archived.
    std::thread::sleep(Duration::from_millis(2500));
    pg.switch_and_archive();

    // The second (daily) base backup uploads only changed blocks.
    let out = kit::ok(pg_agent(&coord, &certs, d, &pg).arg("backup"));
    let (_base2, size2, new2) = kit::backup_line(&out);
    assert!(new2 * 4 < size2, "second base backup stored {new2} new bytes of {size2}: {out}");
    pg.switch_and_archive();

    let info = kit::ok(pg_agent(&coord, &certs, d, &pg).arg("info"));
    assert!(info.contains("base backups: 2"), "{info}");
    assert!(info.contains("recovery window:") && info.contains("(continuous)"), "{info}");
    assert!(!info.contains("GAP"), "{info}");
    // The coordinator knows the stream and the window too: status and metrics.
    let status = asset_status(&coord, &certs, "postgres/main");
    let wal = &status["streams"][0];
    assert_eq!(wal["stream"], "wal", "{status}");
    assert!(wal["windowStart"].as_str().is_some_and(|w| !w.is_empty()), "{status}");
    assert!(wal.get("gaps").is_none(), "{status}");
    let (_, text) = kit::http_get(&coord.metrics_url);
    let series = "coffer_asset_stream_gaps{asset=\"postgres/main\",kind=\"postgres\",stream=\"wal\"}";
    assert_eq!(kit::metric(&text, series), Some(0.0), "{text}");

    // Point-in-time restore: chooses the first base (the second starts after the target).
    let restored = d.join("restored");
    let o =
        kit::run(pg_agent(&coord, &certs, d, &pg).args(["restore", "--target-time", &target, "--to"]).arg(&restored));
    assert!(o.status.success(), "restore: {}", kit::stderr(&o));
    assert!(kit::stderr(&o).contains(&base1), "must restore base {base1}: {}", kit::stderr(&o));
    let mut copy = Pg { proc: None, data: restored.clone(), sock: d.join("sock2"), port: kit::free_port() };
    std::fs::create_dir_all(&copy.sock).unwrap();
    give_to_postgres(d);
    copy.start(&env, &["archive_mode=off"]);
    kit::wait_for("recovery to finish", Duration::from_secs(120), || {
        (copy.sql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    assert_eq!(copy.digest(), at_target, "the restored database must equal the source at the target time");
    drop(copy);

    // Latest: everything archived.
    let latest = d.join("latest");
    kit::ok(pg_agent(&coord, &certs, d, &pg).args(["restore", "--to"]).arg(&latest));
    let mut copy = Pg { proc: None, data: latest, sock: d.join("sock3"), port: kit::free_port() };
    std::fs::create_dir_all(&copy.sock).unwrap();
    give_to_postgres(d);
    copy.start(&env, &["archive_mode=off"]);
    kit::wait_for("recovery to finish", Duration::from_secs(120), || {
        (copy.sql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    assert_eq!(copy.digest(), at_end);
    drop(copy);

    // The drill proves the target with the heartbeat and a user check.
    let o = kit::run(
        pg_agent(&coord, &certs, d, &pg)
            .args(["--heartbeat-interval", "1s", "drill", "--target-time", &target, "--check-sql"])
            .arg("SELECT count(*) = 25000 FROM t")
            .arg("--scratch")
            .arg(d),
    );
    let text = format!("{}{}", kit::stdout(&o), kit::stderr(&o));
    assert!(o.status.success(), "drill: {text}");
    assert!(text.contains("passed") && text.contains("RTO") && text.contains("heartbeat"), "{text}");
    assert!(text.contains("check passed: SELECT count(*) = 25000 FROM t"), "{text}");
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("coffer-pg-drill"))
        .collect();
    assert!(leftovers.is_empty(), "the drill removes its scratch data");

    // A failing user check fails the drill.
    let o = kit::run(
        pg_agent(&coord, &certs, d, &pg)
            .args(["drill", "--target-time", &target, "--check-sql", "SELECT count(*) = 1 FROM t", "--scratch"])
            .arg(d),
    );
    assert!(!o.status.success(), "a failing check must fail the drill");
    assert!(kit::stdout(&o).contains("FAILED"), "{}", kit::stdout(&o));

    // Targets outside the recovery window are refused with the window in the message.
    let o = kit::run(
        pg_agent(&coord, &certs, d, &pg)
            .args(["restore", "--target-time", "2020-01-01T00:00:00Z", "--to"])
            .arg(d.join("x")),
    );
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("before the recovery window"), "{}", kit::stderr(&o));
    let o = kit::run(
        pg_agent(&coord, &certs, d, &pg)
            .args(["restore", "--target-time", "2099-01-01T00:00:00Z", "--to"])
            .arg(d.join("y")),
    );
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("after the recovery window"), "{}", kit::stderr(&o));
    assert!(!d.join("x").exists() && !d.join("y").exists(), "a refused restore writes nothing");

    // A restore onto a disk too small for the cluster fails naming the file and the cause,
    // and takes away the partial data directory.
    let small = d.join("small-fs");
    std::fs::create_dir(&small).unwrap();
    let mut restore = pg_agent(&coord, &certs, d, &pg);
    restore.args(["restore", "--to"]).arg(small.join("pgdata"));
    let o = kit::run(&mut kit::on_small_tmpfs(&restore, &small, "8m"));
    let err = kit::stderr(&o);
    assert!(!o.status.success(), "the cluster cannot fit in 8 MiB: {err}");
    for want in ["writing \"", "No space left on device", "partial restore", "removed"] {
        assert!(err.contains(want), "{want:?} in: {err}");
    }
    assert_eq!(kit::stdout(&o).lines().last(), Some("left: "), "no partial data directory left behind");
    coord.stop();
}

#[test]
fn wal_push_is_idempotent_refuses_changed_content_and_wal_fetch_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = kit::certs(&d.join("certs"), &["pg-1"], &["ops"]);
    let mut coord = Coordinator::start(d, &certs, GRANTS);
    let wal = d.join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let seg = |n: u64| format!("0000000100000000{n:08X}");
    for n in 1..=3 {
        std::fs::write(wal.join(seg(n)), kit::random_bytes(1 << 20, n)).unwrap();
        std::fs::write(wal.join("archive_status").join(format!("{}.ready", seg(n))), b"").unwrap();
    }
    // As PostgreSQL runs them: in the data directory, flags from the environment.
    let agent = |coord: &Coordinator, args: &[&str]| {
        let env = agent_env(coord, &certs, d, "postgres/wal");
        let mut c = Command::new(kit::bin("agent-postgres"));
        c.args(args).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).env_remove("COFFER_CONFIG").current_dir(d);
        c
    };
    // Pushing segment 1 pushes 2 and 3 ahead.
    kit::ok(&mut agent(&coord, &["wal-push", &format!("pg_wal/{}", seg(1))]));
    assert!(wal.join(".coffer-pushed").join(seg(2)).is_file(), "a marker for the pushed-ahead segment");
    // PostgreSQL then asks for 2: answered from the marker (works with the coordinator down).
    coord.stop();
    kit::ok(&mut agent(&coord, &["wal-push", &format!("pg_wal/{}", seg(2))]));
    // wal-fetch with the coordinator unreachable: 126, so recovery stops instead of ending.
    let o = kit::run(&mut agent(&coord, &["wal-fetch", &seg(1), "pg_wal/RECOVERYXLOG"]));
    assert_eq!(o.status.code(), Some(126), "{}", kit::stderr(&o));
    coord.launch();
    // Identical content again: 0. Changed content: refused, loudly.
    std::fs::remove_file(wal.join(".coffer-pushed").join(seg(3))).unwrap();
    kit::ok(&mut agent(&coord, &["wal-push", &format!("pg_wal/{}", seg(3))]));
    std::fs::write(wal.join(seg(3)), kit::random_bytes(1 << 20, 99)).unwrap();
    let o = kit::run(&mut agent(&coord, &["wal-push", &format!("pg_wal/{}", seg(3))]));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("different content"), "{}", kit::stderr(&o));

    // wal-fetch: the file, byte for byte; a missing one is exit 1.
    kit::ok(&mut agent(&coord, &["--wal-prefetch", "0", "wal-fetch", &seg(2), "pg_wal/RECOVERYXLOG"]));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), kit::random_bytes(1 << 20, 2));
    let o = kit::run(&mut agent(&coord, &["wal-fetch", &seg(7), "pg_wal/RECOVERYXLOG"]));
    assert_eq!(o.status.code(), Some(1), "{}", kit::stderr(&o));
    let o = kit::run(&mut agent(&coord, &["wal-fetch", "00000002.history", "pg_wal/RECOVERYHISTORY"]));
    assert_eq!(o.status.code(), Some(1));
    // Segment 5 without 4: the coordinator reports the gap.
    std::fs::write(wal.join(seg(5)), kit::random_bytes(1 << 20, 5)).unwrap();
    kit::ok(&mut agent(&coord, &["wal-push", &format!("pg_wal/{}", seg(5))]));
    let status = asset_status(&coord, &certs, "postgres/wal");
    assert_eq!(status["streams"][0]["gaps"][0], format!("timeline 1: {}..{}", seg(4), seg(4)), "{status}");
    assert_eq!(status["streams"][0]["files"], "4", "{status}");

    // Prefetch: fetching 1 brings 2 and 3 along; asking for 2 then needs no coordinator.
    kit::ok(&mut agent(&coord, &["wal-fetch", &seg(1), "pg_wal/RECOVERYXLOG"]));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), kit::random_bytes(1 << 20, 1));
    coord.stop();
    kit::ok(&mut agent(&coord, &["wal-fetch", &seg(2), "pg_wal/RECOVERYXLOG"]));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), kit::random_bytes(1 << 20, 2));
}

/// `run --wal-socket`: wal-push hands its file to the daemon, which archives it over its
/// own connection; the caller's credentials are never used (here they cannot connect).
/// With no daemon, or one that refuses the caller, wal-push archives the file itself.
#[test]
fn wal_push_hands_files_to_the_daemon_over_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = kit::certs(&d.join("certs"), &["pg-1"], &["ops"]);
    let coord = Coordinator::start(d, &certs, GRANTS);
    let wal = d.join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let seg = |n: u64| format!("0000000100000000{n:08X}");
    let write_seg = |n: u64, seed: u64| {
        std::fs::write(wal.join(seg(n)), kit::random_bytes(1 << 20, seed)).unwrap();
        std::fs::write(wal.join("archive_status").join(format!("{}.ready", seg(n))), b"").unwrap();
    };
    let socket = d.join("wal.sock");
    let env = agent_env(&coord, &certs, d, "postgres/wal");
    let agent = |args: &[&str]| {
        let mut c = Command::new(kit::bin("agent-postgres"));
        c.args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("COFFER_WAL_SOCKET", &socket)
            .env_remove("COFFER_CONFIG")
            .current_dir(d);
        c
    };
    // As archive_command, with a key that does not exist: only a daemon can archive.
    let push_via_daemon = |n: u64| {
        let mut c = agent(&["wal-push", &format!("pg_wal/{}", seg(n))]);
        c.env("COFFER_KEY", d.join("no-such.key"));
        c
    };
    let files = || asset_status(&coord, &certs, "postgres/wal")["streams"][0]["files"].clone();
    kit::ok(&mut agent(&["list"]));
    let start_daemon = |log: &str| {
        let mut c = agent(&["--heartbeat-interval", "0s", "run"]);
        c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(std::fs::File::create(d.join(log)).unwrap());
        let daemon = KillOnDrop(c.spawn().unwrap());
        kit::wait_for("the daemon's WAL socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        daemon
    };
    let daemon = start_daemon("daemon-1.log");

    // Segment 1 through the daemon, which also pushes 2 ahead.
    write_seg(1, 1);
    write_seg(2, 2);
    kit::ok(&mut push_via_daemon(1));
    assert!(wal.join(".coffer-pushed").join(seg(2)).is_file(), "the daemon pushed segment 2 ahead");
    let log = std::fs::read_to_string(d.join("daemon-1.log")).unwrap();
    assert!(log.contains("WAL archived for wal-push"), "{log}");
    assert_eq!(files(), "2");
    // Changed content through the daemon: refused loudly, as a direct push is.
    std::fs::write(wal.join(seg(1)), kit::random_bytes(1 << 20, 99)).unwrap();
    let o = kit::run(&mut push_via_daemon(1));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("different content"), "{}", kit::stderr(&o));

    // Another user may not use the socket: even with the file opened up to everyone, the
    // daemon refuses the caller, which then archives by itself (and here cannot).
    write_seg(3, 3);
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(kit::bin("agent-postgres"))
            .args(["wal-push", &format!("pg_wal/{}", seg(3))])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("COFFER_WAL_SOCKET", &socket)
            .env_remove("COFFER_CONFIG")
            .current_dir(d);
        let o = kit::run(&mut c);
        let err = kit::stderr(&o);
        assert!(!o.status.success());
        assert!(err.contains("serves only its own user") && err.contains("archiving it directly"), "{err}");
        assert_eq!(files(), "2", "the refused caller archived nothing");
    }

    // The daemon dies, leaving its socket file: wal-push archives directly (3 goes ahead).
    drop(daemon);
    assert!(socket.exists());
    write_seg(4, 4);
    let o = kit::run(&mut agent(&["wal-push", &format!("pg_wal/{}", seg(4))]));
    assert!(o.status.success(), "{}", kit::stderr(&o));
    assert!(kit::stderr(&o).contains("archiving it directly"), "{}", kit::stderr(&o));
    assert_eq!(files(), "4");
    // A new daemon takes over the stale socket file.
    let _daemon = start_daemon("daemon-2.log");
    write_seg(5, 5);
    kit::ok(&mut push_via_daemon(5));
    assert_eq!(files(), "5");
}

#[test]
fn archiving_survives_a_coordinator_outage_and_base_backups_need_archiving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = kit::certs(&d.join("certs"), &["pg-1"], &[]);
    let mut coord = Coordinator::start(d, &certs, GRANTS);
    let env = agent_env(&coord, &certs, d, "postgres/main");
    kit::ok(kit::agent("agent-postgres", &coord, &certs, "pg-1", d, "postgres/main").arg("list"));
    let mut pg = Pg::init(d, &env);
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)");
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g");
    kit::ok(pg_agent(&coord, &certs, d, &pg).arg("backup"));

    // The coordinator goes away: archive_command fails, PostgreSQL keeps the segments and
    // retries; nothing is recycled.
    coord.stop();
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1001, 3000) g");
    let pending = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
    kit::wait_for("a failed archive attempt", Duration::from_secs(60), || {
        (pg.sql("SELECT failed_count FROM pg_stat_archiver") != "0").then_some(())
    });
    assert!(pg.data.join("pg_wal/archive_status").join(format!("{pending}.ready")).exists(), "the segment waits");
    let at_outage = pg.digest();

    // Back on the same address: the backlog is archived and the stream has no gap.
    coord.launch();
    kit::wait_for(&format!("{pending} archived after the outage"), Duration::from_secs(120), || {
        (pg.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").as_str() >= pending.as_str())
            .then_some(())
    });
    let info = kit::ok(pg_agent(&coord, &certs, d, &pg).arg("info"));
    assert!(!info.contains("GAP") && info.contains("(continuous)"), "{info}");
    pg.switch_and_archive();
    let restored = d.join("restored");
    kit::ok(pg_agent(&coord, &certs, d, &pg).args(["restore", "--to"]).arg(&restored));
    let mut copy = Pg { proc: None, data: restored, sock: d.join("sock2"), port: kit::free_port() };
    std::fs::create_dir_all(&copy.sock).unwrap();
    give_to_postgres(d);
    copy.start(&env, &["archive_mode=off"]);
    kit::wait_for("recovery to finish", Duration::from_secs(120), || {
        (copy.sql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    assert_eq!(copy.digest(), at_outage, "everything written during the outage is restorable");
    drop(copy);

    // Without archiving a base backup could never be made consistent: refused, clearly.
    pg.stop();
    pg.start(&env, &["archive_mode=off"]);
    let o = kit::run(pg_agent(&coord, &certs, d, &pg).arg("backup"));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("archive_mode is off"), "{}", kit::stderr(&o));
    coord.stop();
}
