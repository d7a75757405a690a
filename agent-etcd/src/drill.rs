//! `agent-etcd drill`: restores a snapshot with the stock tool (`etcdctl snapshot restore`,
//! or `etcdutl` when given) into a scratch data directory, starts a throwaway single-member
//! etcd on free loopback ports, checks that its revision and key count equal the manifest's,
//! reads a sample of keys, and reports the time to a serving cluster (RTO) and the
//! snapshot's age (RPO). Everything is removed afterwards.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffer_common::runtime::cli::{AgentContext, DrillReport};
use coffer_common::runtime::command::free_loopback_port;
use coffer_common::runtime::{SnapshotReader, SourceError};
use etcd_client::{Client, GetOptions};
use serde_json::Value;

use crate::source::SNAPSHOT_PATH;

struct Scratch {
    dir: PathBuf,
    etcd: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(c) = &mut self.etcd {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `restore_tool` is `etcdctl` (3.4: `ETCDCTL_API=3 etcdctl snapshot restore`) or `etcdutl`.
pub async fn drill(
    ctx: &AgentContext,
    snapshot: &str,
    restore_tool: &str,
    etcd: &str,
) -> Result<DrillReport, SourceError> {
    let started = Instant::now();
    let reader =
        SnapshotReader::open(&ctx.coord, &ctx.keyring, &ctx.asset, snapshot, ctx.args.restore_options()).await?;
    let dir = std::env::temp_dir().join(format!("coffer-etcd-drill-{}-{}", std::process::id(), free_loopback_port()?));
    std::fs::create_dir_all(&dir).map_err(SourceError::io(format!("creating {}", dir.display())))?;
    let mut scratch = Scratch { dir: dir.clone(), etcd: None };
    let file = dir.join("snapshot.db");
    reader.restore_to_path(SNAPSHOT_PATH, &file).await?;
    reader.finish();
    let m = reader.manifest().clone();

    let (client_port, peer_port) = (free_loopback_port()?, free_loopback_port()?);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let client_url = format!("http://127.0.0.1:{client_port}");
    let data = dir.join("data");
    let out = Command::new(restore_tool)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--name",
            "drill",
            "--initial-cluster",
            &format!("drill={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .output()
        .map_err(SourceError::io(format!("running {restore_tool}")))?;
    if !out.status.success() {
        return Err(SourceError::Failed(format!(
            "{restore_tool} snapshot restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    scratch.etcd = Some(
        Command::new(etcd)
            .args(["--name", "drill", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("drill={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(SourceError::io(format!("starting {etcd}")))?,
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut client = loop {
        if let Ok(mut c) = Client::connect([client_url.as_str()], None).await
            && c.status().await.is_ok()
        {
            break c;
        }
        if Instant::now() > deadline {
            return Err(SourceError::Failed("the drill's etcd did not serve within 5 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rto = started.elapsed();
    let r = client
        .get("", Some(GetOptions::new().with_all_keys().with_count_only()))
        .await
        .map_err(|e| SourceError::Failed(format!("reading the drill's etcd: {e}")))?;
    let (rev, keys) = (r.header().map(|h| h.revision()).unwrap_or(0), r.count());
    let want_rev = m.source.get("revision").and_then(Value::as_i64).unwrap_or(-1);
    let want_keys = m.source.get("key_count").and_then(Value::as_i64).unwrap_or(-1);
    let exact = m.source.get("exact").and_then(Value::as_bool).unwrap_or(false);
    let (mut checks, mut problems) = (Vec::new(), Vec::new());
    if rev == want_rev && keys == want_keys {
        checks.push(format!("revision {rev} and {keys} keys, as the manifest records"));
    } else if exact {
        problems.push(format!(
            "revision {rev} and {keys} keys; the manifest records revision {want_rev} and {want_keys} keys"
        ));
    } else {
        checks.push(format!(
            "revision {rev} and {keys} keys (the manifest's revision {want_rev} / {want_keys} keys are approximate: writes during the snapshot)"
        ));
    }
    let sample = client
        .get("", Some(GetOptions::new().with_all_keys().with_limit(20)))
        .await
        .map_err(|e| SourceError::Failed(format!("reading keys: {e}")))?;
    if keys > 0 && sample.kvs().is_empty() {
        problems.push("no key could be read".into());
    } else {
        checks.push(format!("{} sampled keys read", sample.kvs().len()));
    }
    drop(scratch);
    let taken = coffer_common::time::parse_rfc3339(&m.finished_at).unwrap_or_else(coffer_common::time::now);
    let rpo = coffer_common::time::now().duration_since(taken).unwrap_or_default();
    Ok(DrillReport { snapshot: m.snapshot, rto, rpo, checks, problems })
}
