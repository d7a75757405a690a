//! agent-redis against real `redis-server` 7 processes and a real coordinator on loopback:
//! backup over the replication protocol, restore to a file that a fresh redis-server loads
//! with an identical dataset digest, a drill, wrong credentials, and a second day's upload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};

const GRANTS: &str = "[agents.redis-1]\nassets = [\"redis/*\"]\n[chunker.redis]\nmin-size = \"4KiB\"\navg-size = \"16KiB\"\nmax-size = \"64KiB\"\n";

struct Redis {
    _proc: KillOnDrop,
    port: u16,
    password: Option<String>,
}

impl Redis {
    fn start(dir: &Path, name: &str, password: Option<&str>, rdb: Option<&Path>) -> Redis {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        if let Some(r) = rdb {
            std::fs::copy(r, data.join("dump.rdb")).unwrap();
        }
        let port = kit::free_port();
        let mut c = Command::new("redis-server");
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0", "--enable-debug-command", "yes", "--dir"])
            .arg(&data)
            .args(["--dbfilename", "dump.rdb"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = password {
            c.args(["--requirepass", p]);
        }
        let r = Redis {
            _proc: KillOnDrop(c.spawn().expect("redis-server is required (scripts/install-deps.sh)")),
            port,
            password: password.map(str::to_string),
        };
        kit::wait_for("redis serving", Duration::from_secs(30), || (r.cli(&["PING"]).trim() == "PONG").then_some(()));
        r
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut c = Command::new("redis-cli");
        c.args(["-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            c.args(["--no-auth-warning", "-a", p]);
        }
        let o = kit::run(c.args(args));
        kit::stdout(&o)
    }

    fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Loads keys of every type through `redis-cli --pipe`.
    fn populate(&self, keys: usize, seed: u64) {
        let mut cmds = Vec::new();
        let val =
            |i: usize| format!("{:0>600}", (i as u64).wrapping_mul(seed).wrapping_mul(2654435761) % 1_000_000_007);
        for i in 0..keys {
            let line = match i % 6 {
                0 => format!("SET s:{i} {}\n", val(i)),
                1 => format!("HSET h:{i} a {} b {i}\n", val(i)),
                2 => format!("RPUSH l:{i} {} x y\n", val(i)),
                3 => format!("SADD t:{i} {} m n\n", val(i)),
                4 => format!("ZADD z:{i} 1 {} 2 b\n", val(i)),
                _ => format!("XADD x:{i} * f {}\n", val(i)),
            };
            cmds.extend_from_slice(line.as_bytes());
        }
        let mut c = Command::new("redis-cli");
        c.args(["-p", &self.port.to_string(), "--pipe"]).stdin(Stdio::piped()).stdout(Stdio::null());
        if let Some(p) = &self.password {
            c.args(["--no-auth-warning", "-a", p]);
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(&cmds).unwrap();
        assert!(child.wait().unwrap().success());
    }

    fn digest(&self) -> String {
        self.cli(&["DEBUG", "DIGEST"]).trim().to_string()
    }
}

fn agent(coord: &Coordinator, certs: &Path, dir: &Path, url: &str) -> Command {
    let mut c = kit::agent("agent-redis", coord, certs, "redis-1", dir, "redis/cache");
    c.args(["--redis-url", url]).arg("--cache-dir").arg(dir.join("agent-cache"));
    c
}

/// Sets the string keys `s:{i}` for each i in `keys` to `{tag}-{i}` through redis-cli --pipe.
fn set_keys(redis: &Redis, keys: impl Iterator<Item = usize>, tag: &str) {
    let mut cmds = String::new();
    for i in keys {
        cmds.push_str(&format!("SET s:{i} {tag}-{i}\n"));
    }
    let mut c = Command::new("redis-cli");
    c.args(["-p", &redis.port.to_string(), "--no-auth-warning", "-a", "s3cret", "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(cmds.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn backup_restore_drill_and_second_day() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["redis-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);
    let redis = Redis::start(dir, "primary", Some("s3cret"), None);
    redis.populate(60_000, 7);
    let digest = redis.digest();
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "60000");

    let out = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("backup"));
    let (first, _, _) = kit::backup_line(&out);

    // Restore to a file, load it into a fresh server: the same dataset.
    let file: PathBuf = dir.join("restored.rdb");
    let r = kit::ok(
        agent(&coord, &certs, dir, &redis.url()).args(["restore", "--snapshot", &first]).arg("--to").arg(&file),
    );
    assert!(r.contains("verified"), "{r}");
    let copy = Redis::start(dir, "copy", None, Some(&file));
    assert_eq!(copy.cli(&["DBSIZE"]).trim(), "60000");
    assert_eq!(copy.digest(), digest, "every key's type and value");

    // The drill does the same on its own and reports RTO and RPO.
    let d = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("drill"));
    assert!(d.contains("passed") && d.contains("RTO") && d.contains("key counts per db match"), "{d}");

    // Second day: 1% of the keys change (in place: a server that reloads its dataset, as
    // the restore into the running server below does, writes its keys in another order,
    // and the next patch is large; see delta.rs). The backup is a delta: a patch against the first
    // snapshot's RDB (cached by the agent), a small fraction of the RDB.
    set_keys(&redis, (0..60_000).filter(|i| i % 6 == 0).step_by(10), "changed");
    let day2 = redis.digest();
    let out = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("backup"));
    let (second, _, new2) = kit::backup_line(&out);
    let rdb = std::fs::metadata(&file).unwrap().len();
    eprintln!("second day: uploaded {new2} bytes for an RDB of {rdb}");
    assert!(new2 < rdb / 20, "second day uploaded {new2} for an RDB of {rdb}: {out}");
    let manifest = kit::ok(agent(&coord, &certs, dir, &redis.url()).args(["list"]));
    assert!(manifest.contains(&second), "{manifest}");
    let restore_to = |snapshot: &str, name: &str| -> PathBuf {
        let to = dir.join(name);
        let r = kit::ok(
            agent(&coord, &certs, dir, &redis.url()).args(["restore", "--snapshot", snapshot]).arg("--to").arg(&to),
        );
        assert!(r.contains("verified"), "{r}");
        to
    };
    let f2 = restore_to(&second, "day2.rdb");
    let left: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains("partial")), "the restore left its base and patch behind: {left:?}");
    let copy2 = Redis::start(dir, "copy2", None, Some(&f2));
    assert_eq!(copy2.digest(), day2, "the delta snapshot restores the second day exactly");
    // The first snapshot is unchanged by the delta built on it.
    let f1 = restore_to(&first, "day1-again.rdb");
    assert_eq!(std::fs::read(&f1).unwrap(), std::fs::read(&file).unwrap());

    // Third day with the agent's cached base damaged: it fails its SHA-256 check, the base
    // is downloaded again (as in a new pod without the cache), and the backup is still a
    // delta against the same full snapshot; the drill restores through the patch.
    let cache = dir.join("agent-cache/redis_cache");
    let cached: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "one cached base: {cached:?}");
    assert!(cached[0].ends_with(format!("{first}.rdb")), "{cached:?}");
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(&cached[0], bytes).unwrap();
    set_keys(&redis, (0..60_000).filter(|i| i % 6 == 0).skip(3).step_by(10), "third");
    let day3 = redis.digest();
    let out = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("backup"));
    let (third, _, new3) = kit::backup_line(&out);
    assert_eq!(std::fs::read(&cached[0]).unwrap(), std::fs::read(&file).unwrap(), "the base was fetched again");
    assert!(new3 < rdb / 10, "third day uploaded {new3} for an RDB of {rdb}: {out}");
    let copy3 = Redis::start(dir, "copy3", None, Some(&restore_to(&third, "day3.rdb")));
    assert_eq!(copy3.digest(), day3, "the second delta restores the third day exactly");
    let d = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("drill"));
    assert!(d.contains("passed") && d.contains(&third), "{d}");

    // --full-every 1 asks for a full snapshot: it uploads the changed chunks again.
    let out = kit::ok(agent(&coord, &certs, dir, &redis.url()).args(["--full-every", "1", "backup"]));
    let (_, _, new4) = kit::backup_line(&out);
    assert!(new4 > rdb / 10, "a full snapshot uploaded only {new4} of {rdb}: {out}");

    // Flush the live server and restore into it while it runs (it syncs from a throwaway
    // server loaded with the snapshot): the same dataset again.
    redis.cli(&["FLUSHALL"]);
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0");
    let r =
        kit::ok(agent(&coord, &certs, dir, &redis.url()).args(["restore", "--snapshot", &third, "--to", &redis.url()]));
    assert!(r.contains("verified"), "{r}");
    assert_eq!(redis.digest(), day3, "restored into the running server");
    assert_eq!(redis.cli(&["ROLE"]).lines().next(), Some("master"), "promoted back after the sync");
    // A server that holds keys is not overwritten without --force.
    let o = kit::run(agent(&coord, &certs, dir, &redis.url()).args(["restore", "--to", &copy.url()]));
    assert!(!o.status.success() && kit::stderr(&o).contains("--force"), "{}", kit::stderr(&o));
}

#[test]
fn wrong_password_and_a_refused_sync_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["redis-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);
    let redis = Redis::start(dir, "primary", Some("s3cret"), None);
    redis.populate(100, 1);
    let bad = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let o = kit::run(agent(&coord, &certs, dir, &bad).arg("backup"));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("WRONGPASS") || kit::stderr(&o).contains("invalid"), "{}", kit::stderr(&o));
    // An ACL user without the replication commands.
    redis.cli(&["ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+info", "+ping"]);
    let limited = format!("redis://reader:pw@127.0.0.1:{}", redis.port);
    let o = kit::run(agent(&coord, &certs, dir, &limited).arg("backup"));
    assert!(!o.status.success());
    assert!(
        kit::stderr(&o).contains("refused replication") && kit::stderr(&o).contains("+psync"),
        "{}",
        kit::stderr(&o)
    );
    // Nothing was committed.
    let l = kit::ok(agent(&coord, &certs, dir, &redis.url()).arg("list"));
    assert_eq!(l.lines().count(), 1, "{l}");
}

#[test]
fn sidecar_mode_backs_up_with_bgsave() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["redis-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);
    let redis = Redis::start(dir, "primary", Some("s3cret"), None);
    redis.populate(3000, 3);
    let digest = redis.digest();
    let out = kit::ok(
        agent(&coord, &certs, dir, &redis.url()).arg("--redis-data-dir").arg(dir.join("primary")).arg("backup"),
    );
    let (snap, _, _) = kit::backup_line(&out);
    assert!(dir.join("primary/dump.rdb").exists(), "the server saved its RDB");
    let file = dir.join("restored.rdb");
    kit::ok(agent(&coord, &certs, dir, &redis.url()).args(["restore", "--snapshot", &snap]).arg("--to").arg(&file));
    let copy = Redis::start(dir, "copy", None, Some(&file));
    assert_eq!(copy.digest(), digest);
}

#[test]
fn rediss_with_client_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // One CA for everything: the coordinator's certificate (valid for 127.0.0.1) serves as
    // the Redis server's, the agent's as the Redis client's.
    let certs = kit::certs(&dir.join("certs"), &["redis-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);
    let data = dir.join("tls");
    std::fs::create_dir_all(&data).unwrap();
    let port = kit::free_port();
    let _server = KillOnDrop(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--enable-debug-command", "yes", "--dir"])
            .arg(&data)
            .arg("--tls-cert-file")
            .arg(certs.join("coordinator.pem"))
            .arg("--tls-key-file")
            .arg(certs.join("coordinator.key"))
            .arg("--tls-ca-cert-file")
            .arg(certs.join("ca.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let cli = |args: &[&str]| {
        let mut c = Command::new("redis-cli");
        c.args(["--tls", "-p", &port.to_string()])
            .arg("--cacert")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("agent-redis-1.pem"))
            .arg("--key")
            .arg(certs.join("agent-redis-1.key"))
            .args(args);
        kit::stdout(&kit::run(&mut c))
    };
    kit::wait_for("redis serving TLS", Duration::from_secs(30), || (cli(&["PING"]).trim() == "PONG").then_some(()));
    cli(&["DEBUG", "POPULATE", "5000", "k", "64"]);
    let url = format!("rediss://127.0.0.1:{port}");
    let tls = |c: &mut Command, client_cert: bool| {
        c.arg("--redis-ca").arg(certs.join("ca.pem"));
        if client_cert {
            c.arg("--redis-cert")
                .arg(certs.join("agent-redis-1.pem"))
                .arg("--redis-key")
                .arg(certs.join("agent-redis-1.key"));
        }
    };
    let mut backup = agent(&coord, &certs, dir, &url);
    tls(&mut backup, true);
    let out = kit::ok(backup.arg("backup"));
    let (snap, _, _) = kit::backup_line(&out);
    let file = dir.join("tls.rdb");
    let mut restore = agent(&coord, &certs, dir, &url);
    tls(&mut restore, true);
    kit::ok(restore.args(["restore", "--snapshot", &snap]).arg("--to").arg(&file));
    let copy = Redis::start(dir, "copy", None, Some(&file));
    assert_eq!(copy.cli(&["DBSIZE"]).trim(), "5000");

    // Without the client certificate the server refuses the handshake; without the CA the
    // agent refuses to start TLS at all.
    let mut no_cert = agent(&coord, &certs, dir, &url);
    tls(&mut no_cert, false);
    let o = kit::run(no_cert.arg("backup"));
    assert!(!o.status.success(), "{}", kit::stdout(&o));
    let o = kit::run(agent(&coord, &certs, dir, &url).arg("backup"));
    assert!(!o.status.success() && kit::stderr(&o).contains("--redis-ca"), "{}", kit::stderr(&o));
}
