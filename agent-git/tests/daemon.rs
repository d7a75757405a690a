//! The control plane end to end with real processes: two `agent-git run` daemons hold
//! sessions with a real coordinator, whose scheduler triggers their backups on short test
//! schedules; operators see attempts, agents and freshness over grpcurl; a stopped agent's
//! asset goes late, then stale.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};
use serde_json::Value;

const CONFIG: &str = r#"
heartbeat-interval = "1s"
scheduler-tick = "200ms"
[agents.git-1]
assets = ["git/*"]
[agents.git-2]
assets = ["git/*"]
[policy.assets."git/alpha"]
schedule = "every 3s"
[policy.assets."git/beta"]
schedule = "every 3s"
"#;

fn daemon(coord: &Coordinator, certs: &Path, dir: &Path, agent: &str, asset: &str, repo: &Path) -> KillOnDrop {
    let mut c: Command = kit::agent("agent-git", coord, certs, agent, dir, asset);
    c.arg("--work-dir")
        .arg(dir.join(format!("work-{agent}")))
        .arg("--repo")
        .arg(repo)
        .arg("run")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{agent}.log"))).unwrap());
    KillOnDrop(c.spawn().expect("starting agent-git run"))
}

fn admin(coord: &Coordinator, certs: &Path, method: &str, body: &str) -> Value {
    let o = coord.grpcurl(certs, "admin-ops", &["-d", body], &format!("coffer.v1.AdminService/{method}"));
    assert!(o.status.success(), "grpcurl {method} (scripts/install-deps.sh installs it): {}", kit::stderr(&o));
    serde_json::from_str(&kit::stdout(&o)).unwrap_or_else(|e| panic!("{method}: {e}: {}", kit::stdout(&o)))
}

fn attempts(coord: &Coordinator, certs: &Path, asset: &str) -> Vec<Value> {
    let v = admin(coord, certs, "ListAttempts", &format!("{{\"asset\":\"{asset}\"}}"));
    v["attempts"].as_array().cloned().unwrap_or_default()
}

fn status(coord: &Coordinator, certs: &Path, asset: &str) -> Value {
    admin(coord, certs, "AssetStatus", &format!("{{\"asset\":\"{asset}\"}}"))["status"].clone()
}

#[test]
fn the_scheduler_drives_two_daemons_and_freshness_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["git-1", "git-2"], &["ops"]);
    let coord = Coordinator::start(dir, &certs, CONFIG);
    let alpha: PathBuf = kit::git_repo(&dir.join("alpha"), &[("a.txt", b"alpha")]);
    let beta: PathBuf = kit::git_repo(&dir.join("beta"), &[("b.txt", b"beta")]);
    let _a = daemon(&coord, &certs, dir, "git-1", "git/alpha", &alpha);
    let mut b = daemon(&coord, &certs, dir, "git-2", "git/beta", &beta);

    // Both daemons connect; each asset gets its first backup at once and then one about
    // every 3 s, each a scheduled attempt that ends ok with a snapshot.
    kit::wait_for("three scheduled backups of each asset", Duration::from_secs(60), || {
        let done = |asset| {
            attempts(&coord, &certs, asset)
                .iter()
                .filter(|a| a["outcome"] == "ok" && a["trigger"] == "schedule" && a["snapshotId"].is_string())
                .count()
        };
        (done("git/alpha") >= 3 && done("git/beta") >= 3).then_some(())
    });
    let agents = admin(&coord, &certs, "ListAgents", "{}");
    let names: Vec<&str> = agents["agents"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["git-1", "git-2"]);
    assert!(agents["agents"].as_array().unwrap().iter().all(|a| a["connected"] == true), "{agents}");
    let jobs = admin(&coord, &certs, "ListJobs", "{}");
    assert_eq!(jobs["jobs"][0]["name"], "scheduler", "{jobs}");
    assert_eq!(jobs["jobs"][0]["state"], "running", "{jobs}");

    // Never two backups of one asset at once: attempts of an asset do not overlap.
    for asset in ["git/alpha", "git/beta"] {
        let mut spans: Vec<(String, String)> = attempts(&coord, &certs, asset)
            .iter()
            .filter(|a| a["outcome"] != "running")
            .map(|a| (a["startedAt"].as_str().unwrap().to_string(), a["endedAt"].as_str().unwrap().to_string()))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{asset}: attempts overlap: {w:?}");
        }
    }
    let s = status(&coord, &certs, "git/alpha");
    assert_eq!(s["state"], "ok", "{s}");
    assert_eq!(s["expectedIntervalSeconds"], "3", "{s}");
    assert_eq!(s["schedule"], "every 3s", "{s}");

    // An operator triggers a backup now.
    let t = admin(&coord, &certs, "TriggerBackup", "{\"asset\":\"git/alpha\"}");
    let job = t["jobId"].as_str().expect("a job id").to_string();
    assert_eq!(t["agent"], "git-1");
    kit::wait_for("the manual backup", Duration::from_secs(30), || {
        attempts(&coord, &certs, "git/alpha")
            .into_iter()
            .find(|a| a["jobId"] == job.as_str() && a["outcome"] == "ok")
            .map(|a| assert_eq!(a["trigger"], "manual"))
    });
    // An asset nobody serves cannot be triggered.
    let o = coord.grpcurl(
        &certs,
        "admin-ops",
        &["-d", "{\"asset\":\"git/nobody\"}"],
        "coffer.v1.AdminService/TriggerBackup",
    );
    assert!(
        !o.status.success() && kit::stderr(&o).contains("no connected agent serves git/nobody"),
        "{}",
        kit::stderr(&o)
    );

    // Stop the beta daemon: its asset goes late after one interval, stale after two.
    kit::signal(b.0.id(), "TERM");
    let _ = b.0.wait();
    kit::wait_for("git-2 disconnected", Duration::from_secs(20), || {
        let agents = admin(&coord, &certs, "ListAgents", "{}");
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "git-2" && a["connected"] != true)
            .then_some(())
    });
    kit::wait_for("git/beta late", Duration::from_secs(20), || {
        let s = status(&coord, &certs, "git/beta");
        (s["state"] == "late").then_some(())
    });
    kit::wait_for("git/beta stale", Duration::from_secs(20), || {
        let s = status(&coord, &certs, "git/beta");
        (s["state"] == "stale" && s["stale"] == true).then_some(())
    });
    // Meanwhile alpha keeps being backed up.
    assert_eq!(status(&coord, &certs, "git/alpha")["state"], "ok");
}
