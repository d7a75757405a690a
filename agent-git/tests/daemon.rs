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
gc-grace = "0s"
[agents.git-1]
assets = ["git/*"]
[agents.git-2]
assets = ["git/*"]
[policy.assets."git/alpha"]
schedule = "every 3s"
retention = { last = 3 }
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

/// Snapshots of `asset` (0 when the catalog does not know it yet).
fn snapshots(coord: &Coordinator, certs: &Path, asset: &str) -> u64 {
    let v = admin(coord, certs, "ListAssets", "{}");
    v["assets"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["asset"] == asset))
        .and_then(|x| x["snapshots"].as_str())
        .map_or(0, |n| n.parse().unwrap())
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
    let mut a = daemon(&coord, &certs, dir, "git-1", "git/alpha", &alpha);
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
    let names: Vec<&str> = jobs["jobs"].as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["abandoned-backups", "retention", "scheduler"], "{jobs}");
    assert!(jobs["jobs"].as_array().unwrap().iter().all(|j| j["state"] == "running"), "{jobs}");

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

    // The metrics endpoint says the same, in the form the shipped alert rule reads.
    let (code, text) = kit::http_get(&coord.metrics_url);
    assert_eq!(code, 200, "{text}");
    let series = |name: &str| format!("coffer_{name}{{asset=\"git/alpha\",kind=\"git\"}}");
    assert_eq!(kit::metric(&text, &series("asset_expected_interval_seconds")), Some(3.0), "{text}");
    let newest = kit::metric(&text, &series("asset_newest_recovery_point_timestamp_seconds")).expect("newest point");
    let scraped = kit::metric(&text, "coffer_scrape_timestamp_seconds").expect("scrape time");
    assert!(scraped - newest < 2.0 * 3.0 + 2.0, "fresh: {scraped} - {newest}");
    assert!(kit::metric(&text, &series("asset_snapshots")).unwrap() >= 3.0);
    assert_eq!(kit::metric(&text, &series("asset_last_attempt_success")), Some(1.0));
    assert_eq!(kit::metric(&text, "coffer_agents_connected"), Some(2.0));
    assert!(
        text.contains("coffer_grpc_requests_total{method=\"/coffer.v1.AgentService/CommitBackup\",code=\"OK\"}"),
        "{text}"
    );
    assert!(text.contains("coffer_job_up{job=\"scheduler\"} 1"), "{text}");

    // An operator triggers a backup now (retrying while a scheduled one is running: the
    // coordinator refuses a second backup of a busy agent).
    let t = kit::wait_for("a trigger the agent accepts", Duration::from_secs(30), || {
        let o = coord.grpcurl(
            &certs,
            "admin-ops",
            &["-d", "{\"asset\":\"git/alpha\"}"],
            "coffer.v1.AdminService/TriggerBackup",
        );
        if o.status.success() {
            return Some(serde_json::from_str::<Value>(&kit::stdout(&o)).unwrap());
        }
        assert!(kit::stderr(&o).contains("busy"), "{}", kit::stderr(&o));
        None
    });
    let job = t["jobId"].as_str().expect("a job id").to_string();
    assert_eq!(t["agent"], "git-1");
    kit::wait_for("the manual backup", Duration::from_secs(30), || {
        attempts(&coord, &certs, "git/alpha")
            .into_iter()
            .find(|a| a["jobId"] == job.as_str() && a["outcome"] == "ok")
            .map(|a| assert_eq!(a["trigger"], "manual"))
    });
    // An agent may back up on its own; the coordinator accepts it and records the attempt.
    kit::ok(
        kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/alpha")
            .arg("--work-dir")
            .arg(dir.join("work-own"))
            .arg("--repo")
            .arg(&alpha)
            .arg("backup"),
    );
    let own =
        attempts(&coord, &certs, "git/alpha").into_iter().find(|a| a["trigger"] == "agent").expect("an agent attempt");
    assert_eq!(own["outcome"], "ok", "{own}");
    assert_eq!(own["snapshotId"], own["jobId"], "{own}");
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
    // And the metrics show beta's age past twice its interval, alpha's within it.
    let (_, text) = kit::http_get(&coord.metrics_url);
    let age = |asset: &str| {
        let s = |name: &str| format!("coffer_{name}{{asset=\"{asset}\",kind=\"git\"}}");
        kit::metric(&text, "coffer_scrape_timestamp_seconds").unwrap()
            - kit::metric(&text, &s("asset_newest_recovery_point_timestamp_seconds")).unwrap()
    };
    assert!(age("git/beta") > 2.0 * 3.0, "beta age {}", age("git/beta"));
    assert!(age("git/alpha") <= 2.0 * 3.0 + 2.0, "alpha age {}", age("git/alpha"));

    // Retention (last 3 for alpha): with its daemon stopped, apply keeps exactly the planned
    // set, and every kept snapshot restores to the exact refs.
    kit::signal(a.0.id(), "TERM");
    let _ = a.0.wait();
    let kept = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v["assets"][0]["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["keep"] == true)
            .map(|d| d["snapshotId"].as_str().unwrap().to_string())
            .collect();
        k.sort();
        k
    };
    let plan = admin(&coord, &certs, "RetentionPlan", "{\"asset\":\"git/alpha\"}");
    let planned = kept(&plan);
    assert_eq!(planned.len(), 3, "{plan}");
    let before =
        admin(&coord, &certs, "ListSnapshots", "{\"asset\":\"git/alpha\"}")["snapshots"].as_array().unwrap().len();
    assert!(before > 3, "{before} snapshots");
    let applied = admin(&coord, &certs, "ApplyRetention", "{\"asset\":\"git/alpha\"}");
    assert_eq!(kept(&applied), planned, "{applied}");
    let mut remaining: Vec<String> = admin(&coord, &certs, "ListSnapshots", "{\"asset\":\"git/alpha\"}")["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    remaining.sort();
    assert_eq!(remaining, planned);
    for id in &planned {
        let out = dir.join(format!("restore-{id}"));
        kit::ok(
            kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/alpha")
                .args(["restore", "--snapshot", id])
                .arg("--to")
                .arg(&out),
        );
        assert_eq!(kit::refs(&out), kit::refs(&alpha), "snapshot {id}");
    }
}

#[test]
fn an_agent_lost_mid_backup_fails_its_attempt_and_the_next_slot_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["git-1"], &["ops"]);
    let config = "heartbeat-interval = \"1s\"\nscheduler-tick = \"200ms\"\n[agents.git-1]\nassets = [\"git/*\"]\n\
                  [policy.assets.\"git/big\"]\nschedule = \"every 4s\"\n";
    let coord = Coordinator::start(dir, &certs, config);
    // Big enough that a backup is still running when the test freezes the agent.
    let repo = kit::git_repo(&dir.join("big"), &[("blob.bin", &kit::random_bytes(96 << 20, 7))]);
    let mut agent = daemon(&coord, &certs, dir, "git-1", "git/big", &repo);
    let job = kit::wait_for("the first scheduled attempt running", Duration::from_secs(30), || {
        attempts(&coord, &certs, "git/big").into_iter().find(|a| a["outcome"] == "running").map(|a| a["jobId"].clone())
    });
    // Freeze the agent at once (so the backup cannot finish), then kill it as a crash would.
    kit::signal(agent.0.id(), "STOP");
    let still = attempts(&coord, &certs, "git/big").into_iter().find(|a| a["jobId"] == job).unwrap();
    assert_eq!(still["outcome"], "running", "the backup finished before the agent could be frozen: {still}");
    kit::signal(agent.0.id(), "KILL");
    let _ = agent.0.wait();
    let failed = kit::wait_for("the attempt recorded as failed", Duration::from_secs(20), || {
        attempts(&coord, &certs, "git/big").into_iter().find(|a| a["jobId"] == job && a["outcome"] == "failed")
    });
    // Whichever the coordinator notices first: the session or the upload stream ending.
    let why = failed["error"].as_str().unwrap();
    assert!(why.contains("agent disconnected") || why.contains("upload stream broke"), "{failed}");
    assert_eq!(snapshots(&coord, &certs, "git/big"), 0, "no snapshot is visible");

    // A new daemon: the next slot retries and succeeds.
    let _agent = daemon(&coord, &certs, dir, "git-1", "git/big", &repo);
    kit::wait_for("a retry that succeeds", Duration::from_secs(60), || {
        attempts(&coord, &certs, "git/big").into_iter().find(|a| a["outcome"] == "ok" && a["trigger"] == "schedule")
    });
    assert!(snapshots(&coord, &certs, "git/big") >= 1);
}
