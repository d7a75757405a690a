//! Copies with a real S3-compatible server (moto, from PyPI) on loopback: the replication
//! job copies an asset's packs, keyring, signature and manifests (and the repository-wide
//! files) to the target its policy names, byte for byte, and the asset then reports the
//! copy as present.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};

/// moto with the buckets `setup` (boto3 code) creates, access-key files `ak`/`sk` in `dir`,
/// and certificates for agent git-1 and admin ops: what every copy test starts from.
fn s3_lab(dir: &Path, setup: &str) -> (KillOnDrop, u16, std::path::PathBuf) {
    let (proc, port) = kit::s3_server(dir);
    s3(port, setup);
    std::fs::write(dir.join("ak"), "test").unwrap();
    std::fs::write(dir.join("sk"), "test").unwrap();
    (proc, port, kit::certs(&dir.join("certs"), &["git-1"], &["ops"]))
}

/// The keys in a bucket of the test server, one per line.
fn keys(port: u16, bucket: &str) -> String {
    s3(port, &format!("for o in s3.list_objects_v2(Bucket='{bucket}').get('Contents', []): print(o['Key'])"))
}

/// AdminService/Verify with `body`, its answer as JSON.
fn admin_verify(coord: &Coordinator, certs: &Path, body: &str) -> serde_json::Value {
    coord.admin_json(certs, "Verify", body)
}

/// agent-git for `asset`, working in `work` on the source repository `repo`.
fn git_agent(coord: &Coordinator, certs: &Path, dir: &Path, asset: &str, work: &Path, repo: &Path) -> Command {
    let mut c = kit::agent("agent-git", coord, certs, "git-1", dir, asset);
    c.arg("--work-dir").arg(work).arg("--repo").arg(repo);
    c
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
        git_agent(&coord, &certs, dir, asset, &dir.join(format!("work-{}", asset.replace('/', "-"))), &repo)
    };
    kit::ok(agent("git/a").arg("backup"));
    kit::commit(&repo, &[("b.txt", &kit::random_bytes(200_000, 3))], "more");
    kit::ok(agent("git/a").arg("backup"));
    // Another asset whose policy keeps it local only (the built-in git row would copy it).
    kit::ok(agent("git/b").arg("backup"));

    kit::wait_for("git/a copied to s3", Duration::from_secs(60), || {
        let listed = keys(port, "primary");
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
    let listed = keys(port, "primary");
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
    let out = kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup"));
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
    let o =
        coord.grpcurl(&certs, "admin-ops", &["-d", "{\"asset\":\"git/a\"}"], "coffer.v1.AdminService/ListSnapshots");
    let v: serde_json::Value = serde_json::from_str(&kit::stdout(&o)).unwrap();
    let copies = v["snapshots"][0]["copies"].as_str().unwrap_or_default().to_string();
    assert!(copies.starts_with("1/2: local; offsite pending") && copies.contains("last error"), "{v}");
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
    let agent = |c: &Coordinator| git_agent(c, &certs, dir, "git/a", &dir.join("work"), &repo);
    let (good, _, _) = kit::backup_line(&kit::ok(agent(&coord).arg("backup")));
    let refs_at_good = kit::refs(&repo);
    kit::commit(&repo, &[("b.txt", b"second")], "second");
    let (bad, _, _) = kit::backup_line(&kit::ok(agent(&coord).arg("backup")));
    kit::wait_for("both manifests copied", Duration::from_secs(60), || {
        let listed = keys(port, "offsite");
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
    let (snap, _, _) =
        kit::backup_line(&kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup")));
    let manifest_key = format!("manifests/git/a/{snap}.manifest");
    let verify = |body: &str| admin_verify(&coord, &certs, body);
    let listed = || keys(port, "primary");
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
    // The gauge counts objects whose last verification failed; the replication job may
    // already have re-uploaded (and re-verified) one of the two by the time it is scraped.
    let (_, text) = kit::http_get(&coord.metrics_url);
    let failures = kit::metric(&text, "coffer_target_verify_failures{target=\"s3\"}");
    assert!(failures.is_some_and(|n| (1.0..=2.0).contains(&n)), "{text}");

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
        git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo)
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
            git_agent(&coord, &certs, dir, asset, &dir.join(format!("w-{}", asset.replace('/', "-"))), &repo)
                .arg("backup"),
        );
        kit::backup_line(&out).0
    };
    let (old_cache, old_ledger) = (backup("git/cache"), backup("git/ledger"));
    kit::commit(&repo, &[("b.txt", b"two")], "two");
    backup("git/cache");
    backup("git/ledger");
    let listed = |bucket: &str| keys(port, bucket);
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

/// The copy status of an asset from AdminService/AssetStatus.
fn asset_status(coord: &Coordinator, certs: &Path, asset: &str) -> serde_json::Value {
    coord.admin_json(certs, "AssetStatus", &serde_json::json!({ "asset": asset }).to_string())
}

fn copies_present(coord: &Coordinator, certs: &Path, asset: &str) -> Vec<String> {
    asset_status(coord, certs, asset)["status"]["copiesPresent"]
        .as_array()
        .map(|a| a.iter().map(|c| c.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn large_packs_go_up_in_parts_and_a_throttling_store_is_retried_with_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='vault', ObjectLockEnabledForBucket=True)");
    // The store is real; the relay in front answers the first requests `503 Slow Down`.
    let relay = kit::FaultProxy::start(port);
    relay.throttle(3);
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\nlock-days = 2\n\
         [targets.s3]\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"vault\"\nconcurrency = 2\n\
         multipart-threshold = \"5MiB\"\nmultipart-part-size = \"5MiB\"\n\
         access-key-file = {:?}\nsecret-key-file = {:?}\n",
        relay.port,
        dir.join("ak"),
        dir.join("sk")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("big.bin", &kit::random_bytes(12 << 20, 7))]);
    kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup"));
    kit::wait_for("git/a copied to s3", Duration::from_secs(90), || {
        copies_present(&coord, &certs, "git/a").contains(&"s3".to_string()).then_some(())
    });
    assert_eq!(relay.throttled(), 3, "the relay refused the first requests");
    // Each refused request was retried within its upload (backoff in the client): no upload
    // failed, so none waited for another pass.
    assert!(!coord.logs().contains("replication: target s3"), "{}", coord.logs());

    // The big pack went up in three parts: the store's composite checksum is the SHA-256 of
    // the parts' SHA-256s, and the lock asked for at creation is on the object.
    let packs: Vec<String> = walk(&coord.data_dir.join("repo")).into_iter().filter(|k| k.ends_with(".pack")).collect();
    let big = packs
        .iter()
        .max_by_key(|k| std::fs::metadata(coord.data_dir.join("repo").join(k)).unwrap().len())
        .unwrap()
        .clone();
    let local = coord.data_dir.join("repo").join(&big);
    assert!(std::fs::metadata(&local).unwrap().len() > 10 << 20, "a pack above the multipart threshold");
    let facts = s3(
        port,
        &format!(
            "import hashlib, base64, datetime\n\
             h = s3.head_object(Bucket='vault', Key='{big}', ChecksumMode='ENABLED')\n\
             data = open({local:?}, 'rb').read()\n\
             parts = [data[i:i + (5 << 20)] for i in range(0, len(data), 5 << 20)]\n\
             comp = base64.b64encode(hashlib.sha256(b''.join(hashlib.sha256(p).digest() for p in parts)).digest()).decode()\n\
             body = s3.get_object(Bucket='vault', Key='{big}')['Body'].read()\n\
             days = (h['ObjectLockRetainUntilDate'] - datetime.datetime.now(datetime.timezone.utc)).days\n\
             print(len(parts), h['ChecksumSHA256'].split('-')[0] == comp, body == data, h['ObjectLockMode'], days)"
        ),
    );
    assert_eq!(facts.trim(), "3 True True COMPLIANCE 1", "parts, checksum, bytes, lock mode, days left");
    // Fast verify compares the composite checksum; deep verify downloads and checks chunks.
    for body in ["{\"target\":\"s3\",\"all\":true}", "{\"target\":\"s3\",\"all\":true,\"deep\":true}"] {
        let v = admin_verify(&coord, &certs, body);
        assert!(v.get("copyProblems").is_none() && v["objects"].as_str().is_some(), "{body}: {v}");
    }
}

#[test]
fn a_store_that_goes_away_mid_replication_is_caught_up_with_nothing_lost_or_duplicated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(
        dir,
        "s3.create_bucket(Bucket='primary')\n\
         s3.put_bucket_versioning(Bucket='primary', VersioningConfiguration={'Status': 'Enabled'})",
    );
    let relay = kit::FaultProxy::start(port);
    // Slow uploads (1 MiB/s) so the store can vanish in the middle of the queue.
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\n\
         [targets.s3]\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"primary\"\nconcurrency = 1\n\
         bandwidth-limit = \"1MiB\"\nmax-attempts = 2\naccess-key-file = {:?}\nsecret-key-file = {:?}\n",
        relay.port,
        dir.join("ak"),
        dir.join("sk")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    relay.set_down(true);
    let repo = kit::git_repo(&dir.join("src"), &[("a.bin", &kit::random_bytes(1_500_000, 1))]);
    let backup = || kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup"));
    backup();
    for i in 2..=4u64 {
        kit::commit(&repo, &[(&format!("{i}.bin"), &kit::random_bytes(1_500_000, i))], "more");
        backup();
    }
    let local: Vec<String> =
        walk(&coord.data_dir.join("repo")).into_iter().filter(|k| !k.starts_with("tmp/")).collect();
    let listed = || keys(port, "primary").lines().map(str::to_string).collect::<Vec<_>>();
    // Up: uploads start; as soon as some objects are in, the store goes away again.
    relay.set_down(false);
    let partial = kit::wait_for("the first objects copied", Duration::from_secs(60), || {
        let l = listed();
        (!l.is_empty()).then_some(l.len())
    });
    relay.set_down(true);
    assert!(partial < local.len(), "the store went away mid-queue ({partial} of {})", local.len());
    kit::wait_for("the failure in the copy status", Duration::from_secs(60), || {
        let v = asset_status(&coord, &certs, "git/a");
        let summary = v["status"]["copiesSummary"].as_str()?.to_string();
        (summary.contains("s3 pending") && summary.contains("last error")).then_some(summary)
    });
    relay.set_down(false);
    kit::wait_for("git/a caught up in s3", Duration::from_secs(120), || {
        copies_present(&coord, &certs, "git/a").contains(&"s3".to_string()).then_some(())
    });
    // Everything is there once: one version per key, no delete markers.
    let versions = s3(
        port,
        "r = s3.list_object_versions(Bucket='primary')\n\
         for v in r.get('Versions', []): print('V', v['Key'])\n\
         for d in r.get('DeleteMarkers', []): print('D', d['Key'])",
    );
    let mut keys: Vec<&str> = versions.lines().map(|l| l.strip_prefix("V ").unwrap_or(l)).collect();
    keys.sort();
    let mut expected: Vec<&str> = local.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(keys, expected, "each local object exactly once in the bucket");
    for key in local.iter().filter(|k| k.ends_with(".pack") || k.ends_with(".manifest")) {
        let here = std::fs::read(coord.data_dir.join("repo").join(key)).unwrap();
        let there =
            s3(port, &format!("sys.stdout.write(s3.get_object(Bucket='primary', Key='{key}')['Body'].read().hex())"));
        assert_eq!(there.trim(), hex(&here), "{key}");
    }
}

#[test]
fn built_in_copy_rows_end_verified_and_locked_in_two_stores_and_the_offsite_alone_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Two independent S3 servers: the primary region's and the offsite one.
    let (_primary, p_port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='primary', ObjectLockEnabledForBucket=True)");
    let (_offsite, o_port) = kit::s3_server(dir);
    s3(o_port, "s3.create_bucket(Bucket='offsite', ObjectLockEnabledForBucket=True)");
    let targets =
        format!("{}{}", target_toml(dir, p_port, "s3", "primary"), target_toml(dir, o_port, "offsite", "offsite"));
    // Git assets given the built-in etcd row (local + offsite, 30 days locked) and the
    // built-in postgres row (local + s3 + offsite, 30 days locked).
    let rows = "[policy.assets.\"git/etcd-like\"]\ncopies = [\"local\", \"offsite\"]\nlock-days = 30\n\
                [policy.assets.\"git/pg-like\"]\ncopies = [\"local\", \"s3\", \"offsite\"]\nlock-days = 30\n";
    let first = dir.join("first");
    std::fs::create_dir_all(&first).unwrap();
    let config = format!("replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n{rows}{targets}");
    let coord = Coordinator::start(&first, &certs, &config);
    let mut repos = Vec::new();
    for (i, asset) in ["git/etcd-like", "git/pg-like"].into_iter().enumerate() {
        let repo = kit::git_repo(
            &dir.join(format!("src-{i}")),
            &[("data.bin", &kit::random_bytes(400_000, 10 + i as u64)), ("README", asset.as_bytes())],
        );
        let out = kit::ok(git_agent(&coord, &certs, dir, asset, &dir.join(format!("w-{i}")), &repo).arg("backup"));
        repos.push((asset, repo, kit::backup_line(&out).0));
    }
    kit::wait_for("every copy present", Duration::from_secs(90), || {
        (copies_present(&coord, &certs, "git/etcd-like") == ["local", "offsite"]
            && copies_present(&coord, &certs, "git/pg-like") == ["local", "s3", "offsite"])
        .then_some(())
    });
    let summary = asset_status(&coord, &certs, "git/pg-like")["status"]["copiesSummary"].as_str().unwrap().to_string();
    assert!(summary.starts_with("3/3: local, s3, offsite"), "{summary}");
    // Each snapshot says which copies hold it.
    let o = coord.grpcurl(
        &certs,
        "admin-ops",
        &["-d", "{\"asset\":\"git/pg-like\"}"],
        "coffer.v1.AdminService/ListSnapshots",
    );
    let v: serde_json::Value = serde_json::from_str(&kit::stdout(&o)).unwrap();
    assert_eq!(v["snapshots"][0]["copies"], "3/3: local, s3, offsite", "{v}");
    // Deep verify of both stores finds nothing wrong.
    for target in ["s3", "offsite"] {
        let v = admin_verify(&coord, &certs, &format!("{{\"target\":\"{target}\",\"all\":true,\"deep\":true}}"));
        assert!(v.get("copyProblems").is_none() && v["objects"].as_str().is_some(), "{target}: {v}");
    }
    // Locked for 30 days in both stores; the etcd-like asset is not in the primary store.
    let lock_of = |port: u16, bucket: &str, asset: &str| {
        s3(
            port,
            &format!(
                "import datetime\n\
                 k = [o['Key'] for o in s3.list_objects_v2(Bucket='{bucket}', Prefix='manifests/{asset}/')['Contents']][0]\n\
                 h = s3.head_object(Bucket='{bucket}', Key=k)\n\
                 print(h['ObjectLockMode'], (h['ObjectLockRetainUntilDate'] - datetime.datetime.now(datetime.timezone.utc)).days)"
            ),
        )
    };
    assert_eq!(lock_of(o_port, "offsite", "git/etcd-like").trim(), "COMPLIANCE 29");
    assert_eq!(lock_of(o_port, "offsite", "git/pg-like").trim(), "COMPLIANCE 29");
    assert_eq!(lock_of(p_port, "primary", "git/pg-like").trim(), "COMPLIANCE 29");
    let primary = keys(p_port, "primary");
    assert!(!primary.contains("etcd-like"), "{primary}");
    drop(coord);

    // Another region: a new coordinator with only the offsite bucket restores both exactly.
    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let mut fresh = Coordinator::prepare(
        &second,
        &certs,
        &format!("[agents.git-1]\nassets = [\"git/*\"]\n{rows}{}", target_toml(dir, o_port, "offsite", "offsite")),
    );
    let o = kit::run(
        Command::new(kit::bin("coordinator")).args(["rebuild", "--from", "offsite", "--config"]).arg(&fresh.config),
    );
    assert!(o.status.success(), "{}{}", kit::stdout(&o), kit::stderr(&o));
    assert!(kit::stdout(&o).contains("recorded 2 snapshots"), "{}", kit::stdout(&o));
    fresh.launch();
    for (i, (asset, repo, snap)) in repos.iter().enumerate() {
        let to = dir.join(format!("restored-{i}.git"));
        kit::ok(
            git_agent(&fresh, &certs, dir, asset, &dir.join(format!("w-{i}")), repo)
                .args(["restore", "--snapshot", snap, "--to"])
                .arg(&to),
        );
        // Git object ids are content hashes: equal refs are an exact restore.
        assert_eq!(kit::refs(&to), kit::refs(repo), "{asset}");
    }
}

#[test]
fn wrong_credentials_and_a_bucket_without_object_lock_are_named_and_local_backups_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The store checks credentials after its first five requests (the set-up below).
    let (_s3, port) = kit::s3_server_with_env(dir, &[("INITIAL_NO_AUTH_ACTION_COUNT", "5")]);
    let keys = s3(
        port,
        "import json\niam = boto3.client('iam', endpoint_url=s3.meta.endpoint_url, region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n\
         s3.create_bucket(Bucket='primary')\ns3.create_bucket(Bucket='plain')\n\
         iam.create_user(UserName='coffer')\n\
         iam.put_user_policy(UserName='coffer', PolicyName='s3', PolicyDocument=json.dumps({'Version': '2012-10-17', \
         'Statement': [{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}]}))\n\
         k = iam.create_access_key(UserName='coffer')['AccessKey']\nprint(k['AccessKeyId'], k['SecretAccessKey'])",
    );
    let (ak, sk) = keys.trim().split_once(' ').unwrap();
    std::fs::write(dir.join("good-ak"), ak).unwrap();
    std::fs::write(dir.join("good-sk"), sk).unwrap();
    std::fs::write(dir.join("ak"), "AKIAWRONGWRONGWRONG0").unwrap();
    std::fs::write(dir.join("sk"), "not-the-secret").unwrap();
    let certs = kit::certs(&dir.join("certs"), &["git-1"], &["ops"]);
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\n\
         [policy.assets.\"git/ledger\"]\ncopies = [\"local\", \"vault\"]\nlock-days = 30\n{}\
         [targets.vault]\nendpoint = \"http://127.0.0.1:{port}\"\nbucket = \"plain\"\n\
         access-key-file = {:?}\nsecret-key-file = {:?}\n",
        target_toml(dir, port, "s3", "primary"),
        dir.join("good-ak"),
        dir.join("good-sk")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    // At start: the bucket lacks Object Lock that git/ledger's policy needs.
    let drift = kit::wait_for("the drift report", Duration::from_secs(30), || {
        coord.logs().lines().find(|l| l.contains("copy target drift") && l.contains("plain")).map(str::to_string)
    });
    assert!(drift.contains("has no Object Lock") && drift.contains("git/ledger") && drift.contains("30"), "{drift}");
    let (_, text) = kit::http_get(&coord.metrics_url);
    assert_eq!(kit::metric(&text, "coffer_target_config_drift{target=\"vault\"}"), Some(1.0), "{text}");
    // The built-in postgres row also locks its s3 copies; that bucket cannot even be read
    // with the wrong key, and the report says why.
    let s3_drift =
        coord.logs().lines().find(|l| l.contains("copy target drift") && l.contains("target=s3")).map(str::to_string);
    assert!(s3_drift.as_deref().is_some_and(|l| l.contains("InvalidAccessKeyId")), "{s3_drift:?}");

    // Backups go on locally; the target with the wrong key says so, by name.
    let repo = kit::git_repo(&dir.join("src"), &[("a.txt", b"hello")]);
    let out = kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup"));
    assert!(out.starts_with("snapshot "), "{out}");
    let summary = kit::wait_for("the credential failure in the status", Duration::from_secs(30), || {
        let v = asset_status(&coord, &certs, "git/a");
        let s = v["status"]["copiesSummary"].as_str()?.to_string();
        s.contains("InvalidAccessKeyId").then_some(s)
    });
    assert!(summary.starts_with("1/2: local; s3 pending"), "{summary}");
}

#[test]
fn packs_of_an_asset_without_a_local_copy_leave_the_disk_and_restore_from_the_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='primary')\ns3.create_bucket(Bucket='offsite')");
    // Like the built-in Longhorn row (Longhorn's replicas + S3): no `local` copy.
    let config = format!(
        "replication-interval = \"1s\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
         [policy.assets.\"git/a\"]\ncopies = [\"s3\", \"offsite\"]\n{}{}",
        target_toml(dir, port, "s3", "primary"),
        target_toml(dir, port, "offsite", "offsite")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.bin", &kit::random_bytes(400_000, 5))]);
    let agent = || git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo);
    let (snap, _, _) = kit::backup_line(&kit::ok(agent().arg("backup")));
    kit::wait_for("the local packs dropped", Duration::from_secs(60), || coord.packs().is_empty().then_some(()));
    // The line is logged just after the file goes: wait for it rather than race it.
    kit::wait_for("the drop logged", Duration::from_secs(10), || {
        coord.logs().contains("local pack dropped").then_some(())
    });
    let summary = asset_status(&coord, &certs, "git/a")["status"]["copiesSummary"].as_str().unwrap().to_string();
    assert!(summary.starts_with("2/2: s3, offsite"), "{summary}");
    // The manifests stay local; the chunks come from the targets.
    assert!(walk(&coord.data_dir.join("repo")).iter().any(|k| k.ends_with(&format!("{snap}.manifest"))));
    let restore = |to: &str| {
        let to = dir.join(to);
        kit::ok(agent().args(["restore", "--snapshot", &snap, "--to"]).arg(&to));
        assert_eq!(kit::refs(&to), kit::refs(&repo));
    };
    restore("restored-1.git");

    // The pack vanishes from s3: deep verify finds it, and the replication job copies it
    // back from offsite (no local file to take it from); restores read from offsite meanwhile.
    let listed = |bucket: &str| keys(port, bucket);
    let pack_key = listed("primary").lines().find(|k| k.ends_with(".pack")).unwrap().to_string();
    s3(port, &format!("s3.delete_object(Bucket='primary', Key='{pack_key}')"));
    let v = admin_verify(&coord, &certs, "{\"target\":\"s3\",\"all\":true,\"deep\":true}");
    assert!(v.to_string().contains("missing"), "{v}");
    restore("restored-2.git");
    kit::wait_for("the pack copied back to s3 from offsite", Duration::from_secs(60), || {
        listed("primary").contains(&pack_key).then_some(())
    });
    let v = admin_verify(&coord, &certs, "{\"target\":\"s3\",\"all\":true,\"deep\":true}");
    assert!(v.get("copyProblems").is_none(), "{v}");
    assert!(coord.packs().is_empty(), "the pack was not brought back to the local disk");
}

#[test]
fn with_auto_repair_the_verify_job_replaces_a_rotten_local_pack_from_the_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_moto, port, certs) = s3_lab(dir, "s3.create_bucket(Bucket='primary')");
    let config = format!(
        "replication-interval = \"1s\"\nverify-interval = \"1s\"\nauto-repair = true\n\
         [agents.git-1]\nassets = [\"git/*\"]\n[policy.assets.\"git/a\"]\ncopies = [\"local\", \"s3\"]\n{}",
        target_toml(dir, port, "s3", "primary")
    );
    let coord = Coordinator::start(dir, &certs, &config);
    let repo = kit::git_repo(&dir.join("src"), &[("a.bin", &kit::random_bytes(300_000, 9))]);
    kit::ok(git_agent(&coord, &certs, dir, "git/a", &dir.join("w"), &repo).arg("backup"));
    kit::wait_for("git/a copied", Duration::from_secs(60), || {
        copies_present(&coord, &certs, "git/a").contains(&"s3".to_string()).then_some(())
    });
    let pack = coord.packs().into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let good = std::fs::read(&pack).unwrap();
    let mut rotten = good.clone();
    rotten[good.len() / 2] ^= 0x10;
    std::fs::write(&pack, &rotten).unwrap();
    kit::wait_for("the rotten pack replaced from s3", Duration::from_secs(60), || {
        (std::fs::read(&pack).ok()? == good).then_some(())
    });
    // The repair is logged just after the good pack is renamed into place.
    kit::wait_for("the repair logged", Duration::from_secs(10), || {
        coord.logs().contains("local pack repaired").then_some(())
    });
}
