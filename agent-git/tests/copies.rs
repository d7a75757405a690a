//! Copies with a real S3-compatible server (moto, from PyPI) on loopback: the replication
//! job copies an asset's packs, keyring, signature and manifests (and the repository-wide
//! files) to the target its policy names, byte for byte, and the asset then reports the
//! copy as present.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};

fn moto(dir: &Path) -> (KillOnDrop, u16) {
    let port = kit::free_port();
    let proc = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("moto.log")).unwrap())
        .spawn()
        .expect("moto_server is required (scripts/install-deps.sh installs moto[server] from PyPI)");
    kit::wait_for("moto serving", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    (KillOnDrop(proc), port)
}

/// moto with the buckets `setup` (boto3 code) creates, access-key files `ak`/`sk` in `dir`,
/// and certificates for agent git-1 and admin ops: what every copy test starts from.
fn s3_lab(dir: &Path, setup: &str) -> (KillOnDrop, u16, std::path::PathBuf) {
    let (proc, port) = moto(dir);
    s3(port, setup);
    std::fs::write(dir.join("ak"), "test").unwrap();
    std::fs::write(dir.join("sk"), "test").unwrap();
    (proc, port, kit::certs(&dir.join("certs"), &["git-1"], &["ops"]))
}

/// A `[targets.NAME]` block for a bucket on the lab's moto, credentials from the key files.
fn target_toml(dir: &Path, port: u16, name: &str, bucket: &str) -> String {
    format!(
        "[targets.{name}]\nendpoint = \"http://127.0.0.1:{port}\"\nbucket = \"{bucket}\"\n\
         access-key-file = {:?}\nsecret-key-file = {:?}\n",
        dir.join("ak"),
        dir.join("sk")
    )
}

/// boto3 (installed with moto) against the test server: create a bucket or list/fetch keys.
fn s3(port: u16, script: &str) -> String {
    let prog = format!(
        "import boto3, sys\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n{script}"
    );
    kit::ok(Command::new("python3").arg("-c").arg(prog))
}

#[test]
fn packs_and_manifests_reach_the_target_the_policy_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='primary')");
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\n\
         [policy.assets.\"git/b\"]\ncopies = [\"local\"]\n\
         [targets.s3]\nendpoint = \"http://127.0.0.1:{port}\"\nbucket = \"primary\"\nprefix = \"coffer/\"\nbandwidth-limit = \"200MiB\"\n\
         access-key-file = {:?}\nsecret-key-file = {:?}\n",
        dir.join("ak"),
        dir.join("sk")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", b"hello")]);
    let agent = |asset: &str| {
        let mut c = kit::agent("agent-git", &coord, &certs, "git-1", dir, asset);
        c.arg("--work-dir").arg(dir.join(format!("work-{}", asset.replace('/', "-")))).arg("--repo").arg(&repo);
        c
    };
    kit::ok(agent("git/a").arg("backup"));
    kit::commit(&repo, &[("b.txt", &kit::random_bytes(200_000, 3))], "more");
    kit::ok(agent("git/a").arg("backup"));
    // Another asset whose policy keeps it local only (the built-in git row would copy it).
    kit::ok(agent("git/b").arg("backup"));

    kit::wait_for("git/a copied to s3", Duration::from_secs(60), || {
        let listed = s3(port, "for o in s3.list_objects_v2(Bucket='primary').get('Contents', []): print(o['Key'])");
        let local: Vec<String> = walk(&coord.data_dir.join("repo"))
            .into_iter()
            .filter(|k| !k.starts_with("tmp/") && !k.contains("git/b") && !is_pack_of(&coord, k, "git/b"))
            .collect();
        let remote: Vec<&str> = listed.lines().collect();
        local.iter().all(|k| remote.contains(&format!("coffer/{k}").as_str())).then_some(())
    });
    // The asset reports the copy; the local-only asset does not.
    let status = |asset: &str| {
        let o = coord.grpcurl(
            &certs,
            "admin-ops",
            &["-d", &format!("{{\"asset\":\"{asset}\"}}")],
            "coffer.v1.AdminService/AssetStatus",
        );
        assert!(o.status.success(), "{}", kit::stderr(&o));
        kit::stdout(&o)
    };
    kit::wait_for("git/a reports the s3 copy", Duration::from_secs(30), || {
        status("git/a").contains("\"s3\"").then_some(())
    });
    let b = status("git/b");
    assert!(b.contains("\"local\"") && !b.contains("\"s3\""), "{b}");
    // Byte for byte, and nothing of git/b.
    let listed = s3(port, "for o in s3.list_objects_v2(Bucket='primary').get('Contents', []): print(o['Key'])");
    assert!(!listed.contains("git/b"), "{listed}");
    for key in listed.lines().filter(|k| k.ends_with(".manifest") || k.ends_with(".pack")) {
        let local = std::fs::read(coord.data_dir.join("repo").join(key.trim_start_matches("coffer/"))).unwrap();
        let remote =
            s3(port, &format!("sys.stdout.write(s3.get_object(Bucket='primary', Key='{key}')['Body'].read().hex())"));
        assert_eq!(remote.trim(), hex(&local), "{key}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Whether `key` is a pack of `asset` (from the pack's own index).
fn is_pack_of(coord: &Coordinator, key: &str, asset: &str) -> bool {
    if !key.ends_with(".pack") {
        return false;
    }
    let db = coord.data_dir.join("catalog.db");
    let id = key.rsplit('/').next().unwrap().trim_end_matches(".pack");
    let out = kit::ok(
        Command::new("sqlite3")
            .arg(db)
            .arg(format!("SELECT a.name FROM packs p JOIN assets a ON a.id = p.asset_id WHERE p.id = '{id}'")),
    );
    out.trim() == asset
}

#[test]
fn an_unreachable_target_keeps_local_backups_working_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let closed = kit::free_port();
    let certs = kit::certs(&dir.join("certs"), &["git-1"], &["ops"]);
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"offsite\"]\n\
         [targets.offsite]\nendpoint = \"http://127.0.0.1:{closed}\"\nbucket = \"nowhere\"\n"
    );
    let coord = Coordinator::start_with_env(
        dir,
        &certs,
        &config,
        &[("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y")],
    );
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", b"hello")]);
    let out = kit::ok(
        kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/a")
            .arg("--work-dir")
            .arg(dir.join("w"))
            .arg("--repo")
            .arg(&repo)
            .arg("backup"),
    );
    assert!(out.starts_with("snapshot "), "the local backup succeeds: {out}");
    kit::wait_for("the offsite failure in the status", Duration::from_secs(30), || {
        let o =
            coord.grpcurl(&certs, "admin-ops", &["-d", "{\"asset\":\"git/a\"}"], "coffer.v1.AdminService/AssetStatus");
        let v: serde_json::Value = serde_json::from_str(&kit::stdout(&o)).ok()?;
        let summary = v["status"]["copiesSummary"].as_str()?.to_string();
        (summary.starts_with("1/2: local; offsite pending") && summary.contains("last error")).then_some(summary)
    });
    let o = coord.grpcurl(&certs, "admin-ops", &["-d", "{}"], "coffer.v1.AdminService/ListJobs");
    assert!(kit::stdout(&o).contains("offsite"), "the replication job names the failing target: {}", kit::stdout(&o));
}

#[test]
fn a_new_coordinator_rebuilt_from_the_copy_alone_restores_and_names_a_tampered_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='offsite')");
    let target = target_toml(dir, port, "offsite", "offsite");
    let first = dir.join("first");
    std::fs::create_dir_all(&first).unwrap();
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"offsite\"]\n{target}"
    );
    let coord = Coordinator::start(&first, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", b"hello")]);
    let agent = |c: &Coordinator| {
        let mut cmd = kit::agent("agent-git", c, &certs, "git-1", dir, "git/a");
        cmd.arg("--work-dir").arg(dir.join("work")).arg("--repo").arg(&repo);
        cmd
    };
    let (good, _, _) = kit::backup_line(&kit::ok(agent(&coord).arg("backup")));
    let refs_at_good = kit::refs(&repo);
    kit::commit(&repo, &[("b.txt", b"second")], "second");
    let (bad, _, _) = kit::backup_line(&kit::ok(agent(&coord).arg("backup")));
    kit::wait_for("both manifests copied", Duration::from_secs(60), || {
        let listed = s3(port, "for o in s3.list_objects_v2(Bucket='offsite').get('Contents', []): print(o['Key'])");
        (listed.contains(&format!("{good}.manifest\n")) && listed.contains(&format!("{bad}.manifest\n"))).then_some(())
    });
    // Someone with write access to the bucket alters the second manifest.
    s3(
        port,
        &format!(
            "k = 'manifests/git/a/{bad}.manifest'\nb = s3.get_object(Bucket='offsite', Key=k)['Body'].read()\n\
             i = b.index(b'\"sha256\":\"') + 10\n\
             b = b[:i] + (b'0' if b[i:i+1] != b'0' else b'1') + b[i+1:]\n\
             s3.put_object(Bucket='offsite', Key=k, Body=b)"
        ),
    );
    drop(coord);

    // A new coordinator somewhere else: only the bucket, its credentials and the config.
    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let mut fresh = Coordinator::prepare(&second, &certs, &format!("[agents.git-1]\nassets = [\"git/*\"]\n{target}"));
    let o = kit::run(
        Command::new(kit::bin("coordinator")).args(["rebuild", "--from", "offsite", "--config"]).arg(&fresh.config),
    );
    let out = kit::stdout(&o);
    assert_eq!(o.status.code(), Some(2), "a rejected manifest makes rebuild exit 2: {out}{}", kit::stderr(&o));
    assert!(out.contains("recorded 1 snapshots"), "{out}");
    let rejected =
        out.lines().find(|l| l.starts_with(&format!("REJECTED git/a {bad}"))).unwrap_or_else(|| panic!("{out}"));
    assert!(rejected.contains("signature"), "rejected for its signature: {rejected}");
    fresh.launch();
    let list = kit::ok(agent(&fresh).arg("list"));
    assert!(list.contains(&good) && !list.contains(&bad), "{list}");
    let to = dir.join("restored.git");
    kit::ok(agent(&fresh).args(["restore", "--snapshot", &good]).arg("--to").arg(&to));
    assert_eq!(kit::refs(&to), refs_at_good);
}

#[test]
fn copies_verify_fast_and_deep_and_a_bad_copy_is_uploaded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='primary')");
    let config = format!(
        "replication-interval = \"1s\"\nverify-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\n{}",
        target_toml(dir, port, "s3", "primary")
    );
    let mut coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", &kit::random_bytes(300_000, 1))]);
    let (snap, _, _) = kit::backup_line(&kit::ok(
        kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/a")
            .arg("--work-dir")
            .arg(dir.join("w"))
            .arg("--repo")
            .arg(&repo)
            .arg("backup"),
    ));
    let manifest_key = format!("manifests/git/a/{snap}.manifest");
    let verify = |body: &str| -> serde_json::Value {
        let o = coord.grpcurl(&certs, "admin-ops", &["-d", body], "coffer.v1.AdminService/Verify");
        assert!(o.status.success(), "Verify: {}", kit::stderr(&o));
        serde_json::from_str(&kit::stdout(&o)).unwrap()
    };
    let listed = || s3(port, "for o in s3.list_objects_v2(Bucket='primary').get('Contents', []): print(o['Key'])");
    kit::wait_for("the manifest copied", Duration::from_secs(60), || listed().contains(&manifest_key).then_some(()));
    let pack_key = listed().lines().find(|k| k.ends_with(".pack")).expect("a pack in the bucket").to_string();

    // The routine job verifies new copies on its own (fast mode).
    kit::wait_for("the verify job to check the copies", Duration::from_secs(60), || {
        let (_, text) = kit::http_get(&coord.metrics_url);
        kit::metric(&text, "coffer_target_verified_objects{target=\"s3\"}").filter(|n| *n >= 4.0)
    });
    // Fast: the store's SHA-256 of every object matches what was sent; nothing downloaded.
    let v = verify("{\"target\":\"s3\",\"all\":true}");
    assert!(v["objects"].as_str().is_some_and(|n| n.parse::<u64>().unwrap() >= 4), "{v}");
    assert!(v.get("copyProblems").is_none(), "{v}");
    // Routine (not --all): everything was just verified, nothing is due.
    let v = verify("{\"target\":\"s3\"}");
    assert!(v.get("objects").is_none(), "nothing due: {v}");

    // Damage the copy behind the coordinator's back: a pack overwritten, a manifest deleted.
    s3(
        port,
        &format!(
            "b = bytearray(s3.get_object(Bucket='primary', Key='{pack_key}')['Body'].read())\nb[40] ^= 0xff\n\
             s3.put_object(Bucket='primary', Key='{pack_key}', Body=bytes(b))\n\
             s3.delete_object(Bucket='primary', Key='{manifest_key}')"
        ),
    );
    let deep = verify("{\"target\":\"s3\",\"all\":true,\"deep\":true}");
    let problems = deep["copyProblems"].as_array().cloned().unwrap_or_default();
    let about =
        |key: &str| problems.iter().find(|p| p["key"] == key).map(|p| p["problem"].as_str().unwrap().to_string());
    assert!(about(&pack_key).is_some_and(|p| p.contains("hashes to")), "{deep}");
    assert!(about(&manifest_key).is_some_and(|p| p.contains("missing")), "{deep}");
    assert_eq!(problems.len(), 2, "{deep}");
    let (_, text) = kit::http_get(&coord.metrics_url);
    assert_eq!(kit::metric(&text, "coffer_target_verify_failures{target=\"s3\"}"), Some(2.0), "{text}");

    // Repair: the replication job uploads both again from the local copy.
    let local_pack = std::fs::read(coord.data_dir.join("repo").join(&pack_key)).unwrap();
    kit::wait_for("the pack and manifest uploaded again", Duration::from_secs(60), || {
        let remote = s3(
            port,
            &format!("sys.stdout.write(s3.get_object(Bucket='primary', Key='{pack_key}')['Body'].read().hex())"),
        );
        (remote.trim() == hex(&local_pack) && listed().contains(&manifest_key)).then_some(())
    });
    let v = verify("{\"target\":\"s3\",\"all\":true,\"deep\":true}");
    assert!(v.get("copyProblems").is_none(), "after repair: {v}");

    // The other way round: the local pack rots; `coordinator repair` takes the verified copy.
    coord.stop();
    let local = coord.data_dir.join("repo").join(&pack_key);
    let mut rotten = local_pack.clone();
    rotten[100] ^= 0x01;
    std::fs::write(&local, &rotten).unwrap();
    let offline =
        |cmd: &str| kit::run(Command::new(kit::bin("coordinator")).args([cmd, "--config"]).arg(&coord.config));
    let o = offline("verify");
    assert_eq!(o.status.code(), Some(2), "{}", kit::stdout(&o));
    let o = offline("repair");
    let out = kit::stdout(&o);
    assert!(o.status.success(), "{out}{}", kit::stderr(&o));
    assert!(out.contains("REPAIRED pack") && out.contains("from s3"), "{out}");
    assert_eq!(std::fs::read(&local).unwrap(), local_pack);
    // A pack missing locally is fetched too.
    std::fs::remove_file(&local).unwrap();
    assert!(kit::stdout(&offline("repair")).contains("missing from the local repository"));
    assert_eq!(std::fs::read(&local).unwrap(), local_pack);
    assert!(offline("verify").status.success());
    coord.launch();
    let to = dir.join("restored.git");
    kit::ok(
        kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/a")
            .arg("--work-dir")
            .arg(dir.join("w"))
            .arg("--repo")
            .arg(&repo)
            .args(["restore", "--snapshot", &snap, "--to"])
            .arg(&to),
    );
    assert_eq!(kit::refs(&to), kit::refs(&repo));
}

#[test]
fn prune_deletes_copies_but_never_before_their_object_lock_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(
        dir,
        "s3.create_bucket(Bucket='plain')\ns3.create_bucket(Bucket='vault', ObjectLockEnabledForBucket=True)",
    );
    let target = |name: &str, bucket: &str| target_toml(dir, port, name, bucket);
    let config = format!(
        "replication-interval = \"1s\"\ngc-grace = \"0s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/cache\"]\ncopies = [\"local\", \"s3\"]\nretention = {{ last = 1 }}\nlock-days = 0\n\
         [policy.assets.\"git/ledger\"]\ncopies = [\"local\", \"vault\"]\nretention = {{ last = 1 }}\nlock-days = 30\n{}{}",
        target("s3", "plain"),
        target("vault", "vault")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", b"one")]);
    let backup = |asset: &str| {
        let out = kit::ok(
            kit::agent("agent-git", &coord, &certs, "git-1", dir, asset)
                .arg("--work-dir")
                .arg(dir.join(format!("w-{}", asset.replace('/', "-"))))
                .arg("--repo")
                .arg(&repo)
                .arg("backup"),
        );
        kit::backup_line(&out).0
    };
    let (old_cache, old_ledger) = (backup("git/cache"), backup("git/ledger"));
    kit::commit(&repo, &[("b.txt", b"two")], "two");
    backup("git/cache");
    backup("git/ledger");
    let listed = |bucket: &str| {
        s3(port, &format!("for o in s3.list_objects_v2(Bucket='{bucket}').get('Contents', []): print(o['Key'])"))
    };
    let old_cache_key = format!("manifests/git/cache/{old_cache}.manifest");
    let old_ledger_key = format!("manifests/git/ledger/{old_ledger}.manifest");
    kit::wait_for("both old manifests copied", Duration::from_secs(60), || {
        (listed("plain").contains(&old_cache_key) && listed("vault").contains(&old_ledger_key)).then_some(())
    });
    // Wait until the newest manifests are there too (the queue drains in order).
    kit::wait_for("every manifest copied", Duration::from_secs(60), || {
        (listed("plain").matches(".manifest\n").count() == 2 && listed("vault").matches(".manifest\n").count() == 2)
            .then_some(())
    });

    let o = coord.grpcurl(&certs, "admin-ops", &["-d", "{}"], "coffer.v1.AdminService/ApplyRetention");
    assert!(o.status.success(), "{}", kit::stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&kit::stdout(&o)).unwrap();
    let report = v["report"].as_str().unwrap().to_string();
    assert!(report.contains("copies in s3: ") && report.contains("scheduled for deletion"), "{report}");
    let vault_line = report.lines().find(|l| l.contains("copies in vault:")).unwrap_or_else(|| panic!("{report}"));
    assert!(vault_line.contains("held by Object Lock until"), "{vault_line}");

    // The unlocked copy goes on the next pass; the locked one stays until its date.
    kit::wait_for("the pruned manifest deleted from s3", Duration::from_secs(60), || {
        (!listed("plain").contains(&old_cache_key)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(listed("vault").contains(&old_ledger_key), "a locked copy must outlive the local prune");
    let queued = kit::ok(
        Command::new("sqlite3")
            .arg(coord.data_dir.join("catalog.db"))
            .arg("SELECT target, key FROM remote_deletions ORDER BY key"),
    );
    assert!(queued.contains(&format!("vault|{old_ledger_key}")), "{queued}");
    let (_, text) = kit::http_get(&coord.metrics_url);
    assert!(
        kit::metric(&text, "coffer_target_pending_deletions{target=\"vault\"}").is_some_and(|n| n >= 2.0),
        "{text}"
    );
}
