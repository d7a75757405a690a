//! The coordinator binary's policy handling: a bad policy is refused at start with every
//! problem listed, and `policy show` prints the effective table.

use std::process::Command;

use coffer_testkit as kit;

const BAD: &str = r#"
[policy.kinds.etcd]
schedule = "hourly"
retention = { hourly = "30m", daily = -3 }
[policy.kinds.redis]
schedul = "daily"
"#;

const BAD_VALUES: &str = r#"
[policy.kinds.etcd]
schedule = "hourly"
retention = { hourly = "30m", daily = -3 }
copies = []
"#;

#[test]
fn a_bad_policy_is_refused_at_start_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown key is a parse error naming it.
    let cfg = dir.path().join("unknown.toml");
    std::fs::write(&cfg, format!("data-dir = {:?}\n{BAD}", dir.path().join("data"))).unwrap();
    let o = kit::run(Command::new(kit::bin("coordinator")).args(["serve", "--config"]).arg(&cfg));
    assert!(!o.status.success());
    assert!(kit::stderr(&o).contains("schedul"), "{}", kit::stderr(&o));
    // Bad values: every one listed, for serve and for policy show.
    let cfg = dir.path().join("values.toml");
    std::fs::write(&cfg, format!("data-dir = {:?}\n{BAD_VALUES}", dir.path().join("data"))).unwrap();
    for cmd in [&["serve", "--config"][..], &["policy", "show", "--config"][..]] {
        let o = kit::run(Command::new(kit::bin("coordinator")).args(cmd).arg(&cfg));
        assert!(!o.status.success(), "{cmd:?} accepted a bad policy");
        let err = kit::stderr(&o);
        for want in [
            "policy.kinds.etcd.retention.hourly: 30m is shorter than the interval between recovery points (1h)",
            "policy.kinds.etcd.retention.daily: -3 is not a count",
            "policy.kinds.etcd.copies: at least one copy is required",
        ] {
            assert!(err.contains(want), "{cmd:?}: missing {want:?} in {err}");
        }
    }
    assert!(!dir.path().join("data").join("repo").exists(), "nothing was created");
}

#[test]
fn policy_show_prints_the_effective_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "data-dir = {:?}\n[policy.assets.\"postgres/main\"]\nschedule = \"0 2 * * *\"\nlock-days = 14\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let out = kit::ok(Command::new(kit::bin("coordinator")).args(["policy", "show", "--config"]).arg(&cfg));
    let row = |name: &str| out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or("").to_string();
    assert!(out.starts_with("ASSET"), "{out}");
    assert!(row("etcd/*").contains("hourly 1d, daily 1w") && row("etcd/*").contains("30d"), "{out}");
    let pg = row("postgres/main");
    assert!(
        pg.contains("cron 0 2 * * *")
            && pg.contains("14d")
            && pg.contains("all 2w, monthly 12")
            && pg.contains("asset"),
        "{out}"
    );
}

/// A coordinator restarted on its old port while something holds that port: it exits with
/// an error naming the address; once the port is free again it comes up on it (the test
/// harness tries a restart again for a while, since parallel tests probe for free ports).
#[test]
fn a_taken_port_is_named_and_a_restart_comes_back_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = kit::certs(&d.join("certs"), &[], &["ops"]);
    let mut coord = kit::Coordinator::start(d, &certs, "");
    let port = coord.port;
    coord.stop();
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the stopped coordinator's port is free");
    // Held until the coordinator has said why it cannot start, then let go.
    let refused = format!("cannot listen on 127.0.0.1:{port}: Address already in use");
    let (log, said) = (coord.log.clone(), refused.clone());
    let release = std::thread::spawn(move || {
        let seen = kit::wait_for("the refusal in the log", std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(&log).ok().filter(|l| l.contains(&said))
        });
        drop(holder);
        seen
    });
    coord.launch();
    assert!(release.join().unwrap().contains(&refused));
    assert_eq!(coord.port, port, "came back on its old port");
    let status = coord.admin_json(&certs, "ListAssets", "{}");
    assert!(status.is_object(), "answers after the restart: {status}");
}
