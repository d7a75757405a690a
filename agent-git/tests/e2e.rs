//! Black-box tests of `agent-git` against a real coordinator process over mTLS on 127.0.0.1,
//! with real git repositories (a local path and one served by `git daemon`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator};

const GRANTS: &str = "[agents.git-1]\nassets = [\"git/*\"]\n";

struct Env {
    dir: tempfile::TempDir,
    certs: std::path::PathBuf,
    coord: Coordinator,
}

fn env(extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let certs = kit::certs(&dir.path().join("certs"), &["git-1", "other"], &["ops"]);
    let coord = Coordinator::start(dir.path(), &certs, &format!("{GRANTS}{extra}"));
    Env { dir, certs, coord }
}

impl Env {
    fn agent(&self, asset: &str) -> Command {
        let mut c = kit::agent("agent-git", &self.coord, &self.certs, "git-1", self.dir.path(), asset);
        c.arg("--work-dir").arg(self.dir.path().join("work"));
        c
    }

    fn backup(&self, asset: &str, repo: &str) -> String {
        kit::ok(self.agent(asset).args(["--repo", repo, "backup"]))
    }

    fn snapshot_ids(&self, asset: &str) -> Vec<String> {
        kit::ok(self.agent(asset).arg("list"))
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

fn new_bytes(backup_stdout: &str) -> u64 {
    kit::backup_line(backup_stdout).2
}

fn snapshot_of(backup_stdout: &str) -> String {
    kit::backup_line(backup_stdout).0
}

#[test]
fn backup_incremental_restore_and_exact_refs() {
    let e = env("");
    let src = e.dir.path().join("src");
    kit::git_repo(&src, &[("README.md", b"hello\n"), ("apps/a.yaml", b"kind: Deployment\n")]);
    kit::ok(kit::git(&src).args(["tag", "-a", "v1", "-m", "release 1"]));
    kit::ok(kit::git(&src).args(["branch", "feature"]));
    let repo = src.to_str().unwrap();

    let first = e.backup("git/gitops", repo);
    let first_id = snapshot_of(&first);
    let first_refs = kit::refs(&src);

    // An unchanged repository is still a recovery point, and costs nothing.
    let same = e.backup("git/gitops", repo);
    assert_eq!(new_bytes(&same), 0, "{same}");

    let big = kit::random_bytes(300_000, 1);
    kit::commit(&src, &[("apps/b.yaml", b"kind: Service\n"), ("blob.bin", &big)], "second");
    kit::ok(kit::git(&src).args(["tag", "light"]));
    let third = e.backup("git/gitops", repo);
    assert!(new_bytes(&third) > 200_000, "the new blob is uploaded: {third}");
    kit::commit(&src, &[("apps/c.yaml", b"x: 1\n")], "third");
    let fourth = e.backup("git/gitops", repo);
    assert!(new_bytes(&fourth) < 50_000, "only the new bundle is uploaded: {fourth}");

    // Latest restores to exactly the source's refs and passes git fsck.
    let out = e.dir.path().join("restored-latest");
    let o = kit::ok(e.agent("git/gitops").args(["restore", "--to", out.to_str().unwrap()]));
    assert!(o.contains("verified"), "{o}");
    assert_eq!(kit::refs(&out), kit::refs(&src));
    kit::ok(kit::git(&out).args(["fsck", "--full"]));
    assert_eq!(kit::ok(kit::git(&out).args(["symbolic-ref", "HEAD"])).trim(), "refs/heads/main");
    assert_eq!(kit::ok(kit::git(&out).args(["cat-file", "-p", "main:apps/c.yaml"])), "x: 1\n");

    // An older snapshot restores to its own point in time.
    let out1 = e.dir.path().join("restored-first");
    kit::ok(e.agent("git/gitops").args(["restore", "--snapshot", &first_id, "--to", out1.to_str().unwrap()]));
    assert_eq!(kit::refs(&out1), first_refs);

    // Restoring over a non-empty directory is refused.
    let o = kit::run(e.agent("git/gitops").args(["restore", "--to", out.to_str().unwrap()]));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("not empty"), "{}", kit::stderr(&o));

    assert_eq!(e.snapshot_ids("git/gitops").len(), 4);
}

#[test]
fn backs_up_over_git_daemon() {
    let e = env("");
    let base = e.dir.path().join("served");
    let src = base.join("repo.git");
    let work = e.dir.path().join("work-src");
    kit::git_repo(&work, &[("a.txt", b"served over git://\n")]);
    kit::ok(Command::new("git").args(["clone", "-q", "--bare"]).arg(&work).arg(&src));
    let port = kit::free_port();
    let _daemon = kit::KillOnDrop(
        Command::new("git")
            .args(["daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={port}")])
            .arg(format!("--base-path={}", base.display()))
            .arg(&base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("git daemon (part of Debian's git package)"),
    );
    let url = format!("git://127.0.0.1:{port}/repo.git");
    kit::wait_for("git daemon", Duration::from_secs(20), || {
        Command::new("git").args(["ls-remote", &url]).output().ok().filter(|o| o.status.success())
    });
    e.backup("git/served", &url);
    let out = e.dir.path().join("restored");
    kit::ok(e.agent("git/served").args(["restore", "--to", out.to_str().unwrap()]));
    assert_eq!(kit::refs(&out), kit::refs(&src));
}

fn refused(e: &Env, asset: &str, repo: &Path) -> String {
    let o = kit::run(e.agent(asset).args(["--repo", repo.to_str().unwrap(), "backup"]));
    assert!(!o.status.success(), "backup of a repository with key material must fail");
    kit::stderr(&o)
}

#[test]
fn refuses_key_material_naming_path_and_commit() {
    let e = env("");
    // An age key committed once and deleted later is still in history.
    let src = e.dir.path().join("age");
    kit::git_repo(&src, &[("README.md", b"ok\n")]);
    kit::commit(
        &src,
        &[(
            "keys/cluster.agekey",
            b"# created: now\nAGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
        )],
        "oops",
    );
    let bad_commit = kit::ok(kit::git(&src).args(["rev-parse", "HEAD"])).trim().to_string();
    kit::ok(kit::git(&src).args(["rm", "-q", "keys/cluster.agekey"]));
    kit::commit(&src, &[], "remove key");
    let err = refused(&e, "git/age", &src);
    assert!(
        err.contains("age secret key") && err.contains("keys/cluster.agekey") && err.contains(&bad_commit),
        "{err}"
    );
    assert!(e.snapshot_ids("git/age").is_empty(), "nothing was committed");

    let src = e.dir.path().join("pgp");
    kit::git_repo(
        &src,
        &[("k.asc", b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nxyz\n-----END PGP PRIVATE KEY BLOCK-----\n")],
    );
    let err = refused(&e, "git/pgp", &src);
    assert!(err.contains("PGP private key block") && err.contains("k.asc"), "{err}");

    // SOPS: an encrypted file matching a creation rule is fine; a decrypted one is refused.
    let src = e.dir.path().join("sops");
    let sops_yaml = b"creation_rules:\n  - path_regex: secrets/.*\\.yaml$\n    age: age1qqqq\n";
    let encrypted =
        b"password: ENC[AES256_GCM,data:abc,iv:def,tag:ghi,type:str]\nsops:\n    age: []\n    version: 3.8.1\n";
    kit::git_repo(&src, &[(".sops.yaml", sops_yaml), ("secrets/db.yaml", encrypted), ("apps/x.yaml", b"plain: ok\n")]);
    let repo = src.to_str().unwrap().to_string();
    e.backup("git/sops", &repo);
    kit::commit(&src, &[("secrets/db.yaml", b"password: hunter2\n")], "decrypted by mistake");
    let err = refused(&e, "git/sops", &src);
    assert!(err.contains("secrets/db.yaml") && err.contains(".sops.yaml"), "{err}");
    assert_eq!(e.snapshot_ids("git/sops").len(), 1, "the refused backup left no snapshot");
}

#[test]
fn wrong_ca_and_ungranted_assets_are_rejected() {
    let e = env("[agents.other]\nassets = [\"git/others-only\"]\n");
    let src = e.dir.path().join("src");
    kit::git_repo(&src, &[("a", b"a")]);
    let repo = src.to_str().unwrap();

    // A client certificate from another CA never gets a session.
    let foreign = kit::certs(&e.dir.path().join("foreign"), &["git-1"], &[]);
    // It trusts the real coordinator but presents a certificate the coordinator's CA never issued.
    let mixed = e.dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(e.certs.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["agent-git-1.pem", "agent-git-1.key"] {
        std::fs::copy(foreign.join(f), mixed.join(f)).unwrap();
    }
    let mut c = kit::agent("agent-git", &e.coord, &mixed, "git-1", e.dir.path(), "git/x");
    c.args(["--repo", repo, "backup"]);
    let o = kit::run(&mut c);
    assert!(!o.status.success());
    let err = kit::stderr(&o);
    assert!(
        err.contains("Hello failed") || err.contains("transport") || err.to_lowercase().contains("certificate"),
        "{err}"
    );

    // A valid agent writing an asset it is not granted.
    let mut c = kit::agent("agent-git", &e.coord, &e.certs, "other", e.dir.path(), "git/not-yours");
    let o = kit::run(c.args(["--repo", repo, "backup"]));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("not granted asset git/not-yours"), "{}", kit::stderr(&o));
    // Nor may it read another agent's asset.
    e.backup("git/mine", repo);
    let mut c = kit::agent("agent-git", &e.coord, &e.certs, "other", e.dir.path(), "git/mine");
    let o = kit::run(c.arg("list"));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("not granted"), "{}", kit::stderr(&o));
}

#[test]
fn flag_env_and_file_layering() {
    let e = env("");
    let src = e.dir.path().join("src");
    kit::git_repo(&src, &[("a", b"a")]);
    let cfg = e.dir.path().join("agent.toml");
    std::fs::write(&cfg, format!("asset = \"git/from-file\"\nrepo = {:?}\nfull-every = 3\n", src)).unwrap();
    let base = || {
        let mut c = Command::new(kit::bin("agent-git"));
        c.arg("--coordinator")
            .arg(&e.coord.url)
            .arg("--ca")
            .arg(e.certs.join("ca.pem"))
            .arg("--cert")
            .arg(e.certs.join("agent-git-1.pem"))
            .arg("--key")
            .arg(e.certs.join("agent-git-1.key"))
            .arg("--identity")
            .arg(e.dir.path().join("id"))
            .arg("--work-dir")
            .arg(e.dir.path().join("w"))
            .arg("--quiet")
            .arg("--config")
            .arg(&cfg)
            .env_remove("COFFER_ASSET");
        c
    };
    let from_file = kit::ok(base().arg("backup"));
    assert!(from_file.contains("of git/from-file"), "{from_file}");
    let from_env = kit::ok(base().env("COFFER_ASSET", "git/from-env").arg("backup"));
    assert!(from_env.contains("of git/from-env"), "{from_env}");
    let from_flag = kit::ok(base().env("COFFER_ASSET", "git/from-env").args(["--asset", "git/from-flag", "backup"]));
    assert!(from_flag.contains("of git/from-flag"), "{from_flag}");
    std::fs::write(&cfg, "asset = \"git/a\"\nretension = \"7d\"\n").unwrap();
    let o = kit::run(base().arg("list"));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("unknown keys [\"retension\"]"), "{}", kit::stderr(&o));
}
