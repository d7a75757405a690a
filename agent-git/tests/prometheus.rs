//! The shipped alert rule with a real Prometheus (Debian's `prometheus` 2.42): it scrapes a
//! real coordinator whose scheduler drives an `agent-git run` daemon; when the daemon stops,
//! the generic staleness alert goes pending for that asset.

use std::process::{Command, Stdio};
use std::time::Duration;

use coffer_testkit::{self as kit, Coordinator, KillOnDrop};

const CONFIG: &str = r#"
heartbeat-interval = "1s"
scheduler-tick = "200ms"
[agents.git-1]
assets = ["git/*"]
[policy.assets."git/alpha"]
schedule = "every 2s"
"#;

/// The rules file inside deploy/alerts/prometheusrule.yaml (its `spec:`, one level down).
fn shipped_rules() -> String {
    let crd = std::fs::read_to_string(coffer_testkit::workspace_root().join("deploy/alerts/prometheusrule.yaml"))
        .expect("deploy/alerts/prometheusrule.yaml");
    let spec = crd.split_once("\nspec:\n").expect("a spec section").1;
    spec.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

fn alerts(prom: &str) -> serde_json::Value {
    let (code, body) = kit::http_get(&format!("{prom}/api/v1/alerts"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("alerts JSON")
}

fn stale_alert_state(prom: &str, asset: &str) -> Option<String> {
    alerts(prom)["data"]["alerts"].as_array()?.iter().find_map(|a| {
        (a["labels"]["alertname"] == "CofferRecoveryPointStale" && a["labels"]["asset"] == asset)
            .then(|| a["state"].as_str().unwrap_or_default().to_string())
    })
}

#[test]
fn prometheus_raises_the_staleness_alert_when_an_agent_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["git-1"], &["ops"]);
    let coord = Coordinator::start(dir, &certs, CONFIG);
    let repo = kit::git_repo(&dir.join("alpha"), &[("a.txt", b"alpha")]);
    let mut c = kit::agent("agent-git", &coord, &certs, "git-1", dir, "git/alpha");
    c.arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--repo")
        .arg(&repo)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = KillOnDrop(c.spawn().expect("agent-git run"));
    kit::wait_for("a first scheduled backup", Duration::from_secs(30), || {
        let (_, text) = kit::http_get(&coord.metrics_url);
        kit::metric(&text, "coffer_asset_snapshots{asset=\"git/alpha\",kind=\"git\"}").filter(|n| *n >= 1.0)
    });

    std::fs::write(dir.join("rules.yaml"), shipped_rules()).unwrap();
    let target = coord.metrics_url.trim_start_matches("http://").trim_end_matches("/metrics");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: coffer\n    static_configs:\n      - targets: ['{target}']\n",
            dir.join("rules.yaml").display()
        ),
    )
    .unwrap();
    let port = kit::free_port();
    let prom_url = format!("http://127.0.0.1:{port}");
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus is required (scripts/install-deps.sh installs the Debian package)");
    let _prom = KillOnDrop(prom);
    kit::wait_for("prometheus ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        (kit::http_get(&format!("{prom_url}/-/ready")).0 == 200).then_some(())
    });
    // Scraped and evaluated while the agent runs: no alert.
    kit::wait_for("the coordinator scraped", Duration::from_secs(30), || {
        let (_, body) = kit::http_get(&format!("{prom_url}/api/v1/query?query=coffer_asset_expected_interval_seconds"));
        body.contains("git/alpha").then_some(())
    });
    // The rule's own expression over the scraped data: nothing is stale yet.
    let q = "(time()-coffer_asset_newest_recovery_point_timestamp_seconds)>2*coffer_asset_expected_interval_seconds";
    let (_, body) =
        kit::http_get(&format!("{prom_url}/api/v1/query?query={}", q.replace('*', "%2A").replace('+', "%2B")));
    assert!(body.contains("\"result\":[]"), "{body}");
    assert_eq!(stale_alert_state(&prom_url, "git/alpha"), None, "{}", alerts(&prom_url));

    kit::signal(agent.0.id(), "TERM");
    let _ = agent.0.wait();
    let state =
        kit::wait_for("the staleness alert", Duration::from_secs(60), || stale_alert_state(&prom_url, "git/alpha"));
    assert!(state == "pending" || state == "firing", "{state}");
}
