//! The `etcd` source: one snapshot per recovery point through the maintenance API, from a
//! healthy member (a follower by default, so the leader is not loaded), checked against the
//! SHA-256 trailer etcd appends, and stored byte-identical to what `etcdctl snapshot save`
//! writes, so `etcdctl snapshot restore` / `etcdutl snapshot restore` / `talosctl etcd
//! restore` accept a restored file as is.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use coffer_common::manifest::Manifest;
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde_json::{Value, json};

use crate::trailer::{self, Checked};

/// Path of the snapshot inside every Coffer snapshot.
pub const SNAPSHOT_PATH: &str = "snapshot.db";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefer {
    Follower,
    Leader,
    Any,
}

#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub struct EtcdSource {
    pub endpoints: Vec<String>,
    pub tls: EtcdTls,
    pub prefer: Prefer,
}

fn failed(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Failed(format!("{what}: {e}"))
}

/// What the chosen member said about itself.
struct Member {
    endpoint: String,
    client: Client,
    member_id: u64,
    cluster_id: u64,
    leader: bool,
    version: String,
    db_size: i64,
    raft_term: u64,
}

impl EtcdSource {
    async fn connect(&self, endpoint: &str) -> Result<Client, SourceError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(10))
            .with_timeout(std::time::Duration::from_secs(600));
        if endpoint.starts_with("https://") {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.tls.ca {
                let pem = std::fs::read(ca).map_err(SourceError::io(format!("reading {}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&self.tls.cert, &self.tls.key) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c).map_err(SourceError::io(format!("reading {}", c.display())))?;
                    let key = std::fs::read(k).map_err(SourceError::io(format!("reading {}", k.display())))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => return Err(SourceError::Failed("--etcd-cert and --etcd-key go together".into())),
            }
            opts = opts.with_tls(tls);
        }
        Client::connect([endpoint], Some(opts))
            .await
            .map_err(|e| failed(&format!("connecting to etcd at {endpoint}"), e))
    }

    /// Asks every endpoint for its status and picks one by preference among those that answer.
    async fn choose(&self) -> Result<Member, SourceError> {
        if self.endpoints.is_empty() {
            return Err(SourceError::Failed("--etcd-endpoints is required".into()));
        }
        let mut healthy = Vec::new();
        let mut errors = Vec::new();
        for ep in &self.endpoints {
            let mut client = match self.connect(ep).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            match client.status().await {
                Ok(s) => {
                    let h = s.header().ok_or_else(|| SourceError::Failed(format!("{ep}: status without a header")))?;
                    healthy.push(Member {
                        endpoint: ep.clone(),
                        member_id: h.member_id(),
                        cluster_id: h.cluster_id(),
                        leader: s.leader() == h.member_id(),
                        version: s.version().to_string(),
                        db_size: s.db_size(),
                        raft_term: s.raft_term(),
                        client,
                    });
                }
                Err(e) => errors.push(format!("{ep}: {e}")),
            }
        }
        if healthy.is_empty() {
            return Err(SourceError::Failed(format!("no etcd member answered: {}", errors.join("; "))));
        }
        let pos = match self.prefer {
            Prefer::Follower => healthy.iter().position(|m| !m.leader).unwrap_or(0),
            Prefer::Leader => healthy.iter().position(|m| m.leader).unwrap_or(0),
            Prefer::Any => 0,
        };
        Ok(healthy.swap_remove(pos))
    }
}

/// Revision and key count of the keyspace, as one read.
async fn keyspace(client: &mut Client) -> Result<(i64, i64), SourceError> {
    let r = client
        .get("", Some(GetOptions::new().with_all_keys().with_count_only()))
        .await
        .map_err(|e| failed("counting etcd keys", e))?;
    Ok((r.header().map(|h| h.revision()).unwrap_or(0), r.count()))
}

/// The snapshot stream as a blocking reader (for the pipeline's reader thread).
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Source for EtcdSource {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let m = self.choose().await?;
        Ok(Probe {
            description: format!(
                "etcd {} member {:x} at {}{}",
                m.version,
                m.member_id,
                m.endpoint,
                if m.leader { " (leader)" } else { "" }
            ),
            details: BTreeMap::new(),
        })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        let mut m = self.choose().await?;
        tracing::info!(endpoint = %m.endpoint, member = %format!("{:x}", m.member_id), leader = m.leader, "taking an etcd snapshot");
        let (rev_before, keys_before) = keyspace(&mut m.client).await?;
        let mut stream = m.client.snapshot().await.map_err(|e| failed("starting the etcd snapshot", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let pump = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        if tx.send(Ok(r.blob().to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(format!("etcd snapshot stream: {e}")))).await;
                        return;
                    }
                }
            }
        });
        let digest = coffer_common::runtime::DigestSlot::default();
        let reader = Checked::with_digest(StreamReader { rx, buf: Vec::new(), pos: 0 }, digest.clone());
        let added = sink.add_file_hashed(SNAPSHOT_PATH, reader, digest).await.map(|e| e.size);
        pump.abort();
        let size = added?;
        let (rev_after, keys_after) = keyspace(&mut m.client).await?;
        let mut meta = BTreeMap::new();
        meta.insert("cluster_id".into(), json!(format!("{:x}", m.cluster_id)));
        meta.insert("member_id".into(), json!(format!("{:x}", m.member_id)));
        meta.insert("leader".into(), json!(m.leader));
        meta.insert("revision".into(), json!(rev_after));
        meta.insert("key_count".into(), json!(keys_after));
        // Equal before and after: the snapshot holds exactly this revision and key count.
        meta.insert("exact".into(), json!(rev_before == rev_after && keys_before == keys_after));
        meta.insert("raft_term".into(), json!(m.raft_term));
        meta.insert("db_size".into(), json!(m.db_size));
        meta.insert("snapshot_bytes".into(), json!(size));
        meta.insert("etcd_version".into(), json!(m.version));
        meta.insert("endpoint".into(), json!(m.endpoint));
        Ok(meta)
    }

    /// Writes the snapshot file to `target` (must not exist), plus the signed manifest that
    /// vouches for it: `TARGET.manifest`, `TARGET.manifest.sig` and `TARGET.allowed_signers`,
    /// so an operator can check it with `ssh-keygen` and `sha256sum` alone.
    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        if target.exists() {
            return Err(SourceError::Failed(format!("{} exists; restore into a new file", target.display())));
        }
        reader.restore_to_path(SNAPSHOT_PATH, target).await?;
        let s = reader.signed();
        let with = |ext: &str| PathBuf::from(format!("{}.{ext}", target.display()));
        let write =
            |p: PathBuf, b: &[u8]| std::fs::write(&p, b).map_err(SourceError::io(format!("writing {}", p.display())));
        write(with("manifest"), &s.bytes)?;
        write(with("manifest.sig"), s.signature.as_bytes())?;
        write(with("allowed_signers"), format!("{} {}\n", s.manifest.agent, s.signing_key).as_bytes())?;
        Ok(())
    }

    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let bytes = std::fs::read(target).map_err(SourceError::io(format!("reading {}", target.display())))?;
        let mut report = VerifyReport::default();
        match trailer::check(&bytes) {
            Ok(()) => report.checks.push(format!("{} bytes, SHA-256 integrity trailer valid", bytes.len())),
            Err(e) => report.problems.push(e.to_string()),
        }
        let rev = manifest.source.get("revision").and_then(Value::as_i64).unwrap_or(0);
        let keys = manifest.source.get("key_count").and_then(Value::as_i64).unwrap_or(0);
        report.checks.push(format!("snapshot of revision {rev} with {keys} keys"));
        report.ok = report.problems.is_empty();
        Ok(report)
    }
}
