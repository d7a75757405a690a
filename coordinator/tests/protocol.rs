//! The coffer.v1 protocol against an in-process coordinator over real mutual TLS on
//! 127.0.0.1: the commit protocol's refusals, message limits and role checks.

use std::path::PathBuf;

use coffer_common::crypto::{ChunkId, MAX_STORED_CHUNK};
use coffer_common::identity::AgentIdentity;
use coffer_common::manifest::{ChunkRef, FileEntry, MANIFEST_FORMAT, Manifest};
use coffer_common::runtime::backup::{BackupSink, PipelineOptions};
use coffer_common::runtime::{Coordinator, SourceError};
use coffer_common::tls::ClientTls;
use coffer_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::Code;

struct Server {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    url: String,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Server {
    start_with("").await
}

/// A coordinator whose config has `extra` top-level keys.
async fn start_with(extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    coffer_coordinator::certs::init(&certs, &["git-1".into(), "intruder".into()], &["ops".into()]).unwrap();
    let config: coffer_coordinator::config::Config = toml::from_str(&format!(
        "{extra}metrics-listen = \"127.0.0.1:0\"\ntls-cert = {:?}\ntls-key = {:?}\ntls-ca = {:?}\n[agents.git-1]\nassets = [\"git/*\"]\n[agents.intruder]\nassets = [\"git/*\"]\n",
        certs.join("coordinator.pem"),
        certs.join("coordinator.key"),
        certs.join("ca.pem")
    ))
    .unwrap();
    config.validate().unwrap();
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let data = dir.path().join("data");
    let token = stop.clone();
    tokio::spawn(async move {
        coffer_coordinator::server::serve(config, data, "127.0.0.1:0".parse().unwrap(), token, Some(tx)).await.unwrap();
    });
    let addr = rx.await.unwrap();
    Server { _dir: dir, certs, url: format!("https://{addr}"), stop }
}

/// Client credentials of one certificate holder (`agent-NAME` or `admin-NAME`).
struct Creds {
    url: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Creds {
    fn tls(&self) -> ClientTls<'_> {
        ClientTls { url: &self.url, ca: &self.ca, cert: &self.cert, key: &self.key }
    }
}

fn creds(s: &Server, who: &str) -> Creds {
    Creds {
        url: s.url.clone(),
        ca: s.certs.join("ca.pem"),
        cert: s.certs.join(format!("{who}.pem")),
        key: s.certs.join(format!("{who}.key")),
    }
}

fn raw_agent(s: &Server, who: &str) -> pb::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let ch = creds(s, who).tls().channel().unwrap();
    pb::agent_service_client::AgentServiceClient::new(ch).max_encoding_message_size(256 << 20)
}

async fn connect(s: &Server, who: &str, id: &AgentIdentity) -> Coordinator {
    Coordinator::connect(&creds(s, who).tls(), id, &["git"]).await.unwrap()
}

fn signed_manifest(id: &AgentIdentity, snapshot: &str, chunks: Vec<ChunkRef>) -> (Vec<u8>, String) {
    let size = chunks.iter().map(|c| c.1 as u64).sum();
    let m = Manifest {
        format: MANIFEST_FORMAT,
        snapshot: snapshot.into(),
        asset: "git/a".into(),
        kind: "git".into(),
        agent: "git-1".into(),
        agent_version: "test".into(),
        started_at: "2026-11-24T00:00:00Z".into(),
        finished_at: "2026-11-24T00:00:01Z".into(),
        chunker: coffer_common::chunker::ChunkerParams::DEFAULT.into(),
        source: Default::default(),
        files: vec![FileEntry { path: "f".into(), size, sha256: "00".repeat(32), chunks }],
    };
    let bytes = m.encode();
    let sig = id.signer().sign(coffer_common::signing::MANIFEST_NAMESPACE, &bytes);
    (bytes, sig)
}

async fn begin(c: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>) -> String {
    c.begin_backup(pb::BeginBackupRequest { asset: "git/a".into(), kind: "git".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .snapshot_id
}

#[tokio::test]
async fn commit_requires_a_valid_signature_and_durable_chunks() {
    let s = start().await;
    let me = AgentIdentity::generate("me");
    let coord = connect(&s, "agent-git-1", &me).await;
    let keyring = coord.keyring("git/a", &me, &[]).await.unwrap();

    // Signed by a key other than the registered one: rejected, nothing visible.
    let mut sink =
        BackupSink::begin(&coord, &keyring, "git/a", "git", PipelineOptions { quiet: true, ..Default::default() })
            .await
            .unwrap();
    sink.add_bytes("f", b"hello world".repeat(1000)).await.unwrap();
    let refused_snapshot = sink.snapshot_id().to_string();
    let impostor = AgentIdentity::generate("impostor");
    let err = sink.commit(&impostor, Default::default()).await.unwrap_err();
    let SourceError::Client(e) = &err else { panic!("{err}") };
    assert!(e.to_string().contains("signature rejected"), "{e}");
    assert!(coord.list_snapshots("git/a", 0).await.unwrap().is_empty());

    // The refused backup was aborted: it cannot be committed later either.
    let mut raw = raw_agent(&s, "agent-git-1");
    let (manifest, signature) = signed_manifest(&me, &refused_snapshot, vec![]);
    let st = raw
        .commit_backup(pb::CommitBackupRequest { snapshot_id: refused_snapshot, manifest, signature })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("aborted"), "{}", st.message());

    // A manifest naming a chunk the coordinator does not hold.
    let snap = begin(&mut raw).await;
    let (manifest, signature) = signed_manifest(&me, &snap, vec![ChunkRef(ChunkId([9; 32]), 10)]);
    let st = raw
        .commit_backup(pb::CommitBackupRequest { snapshot_id: snap.clone(), manifest, signature })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains(&ChunkId([9; 32]).to_hex()), "{}", st.message());
    assert!(coord.list_snapshots("git/a", 0).await.unwrap().is_empty());

    // A commit retried after it succeeded (its answer lost) yields the same one snapshot.
    let mut sink =
        BackupSink::begin(&coord, &keyring, "git/a", "git", PipelineOptions { quiet: true, ..Default::default() })
            .await
            .unwrap();
    sink.add_bytes("f", b"hello world".repeat(1000)).await.unwrap();
    let info = sink.commit(&me, Default::default()).await.unwrap();
    let stored = coord.manifest("git/a", "latest").await.unwrap().unwrap();
    assert_eq!(stored.info.id, info.id);
    let again = raw
        .commit_backup(pb::CommitBackupRequest {
            snapshot_id: info.id.clone(),
            manifest: stored.bytes.clone(),
            signature: stored.signature.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.snapshot.unwrap().id, info.id);
    assert_eq!(coord.list_snapshots("git/a", 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn many_files_restore_in_order_across_batches() {
    let s = start().await;
    let me = AgentIdentity::generate("me");
    let coord = connect(&s, "agent-git-1", &me).await;
    let keyring = coord.keyring("git/a", &me, &[]).await.unwrap();
    let opts = PipelineOptions { quiet: true, ..Default::default() };
    let mut sink = BackupSink::begin(&coord, &keyring, "git/a", "git", opts).await.unwrap();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("big".into(), (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect()),
        ("dir/small".into(), b"small".to_vec()),
        ("dir/also-empty".into(), vec![]),
        ("last".into(), (0..700_000u32).map(|i| (i % 13) as u8).collect()),
        // The same chunks as "big": downloaded once, copied from the repeat cache.
        ("copy-of-big".into(), (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect()),
    ];
    // Streamed two at a time; the manifest keeps the given order.
    sink.add_files(files.iter().map(|(p, d)| (p.clone(), std::io::Cursor::new(d.clone()))).collect()).await.unwrap();
    let order: Vec<&str> = sink.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(order, files.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>());
    assert!(
        sink.add_files(vec![("big".to_string(), std::io::Cursor::new(vec![1u8]))]).await.is_err(),
        "duplicate path"
    );
    sink.commit(&me, Default::default()).await.unwrap();

    // Small batches force many batches per file and files sharing the download window.
    let opts = coffer_common::runtime::restore::RestoreOptions {
        parallel: 3,
        batch_bytes: 200_000,
        lanes: 2,
        memory_budget: 1 << 20,
        repeat_cache: 8 << 20,
        quiet: true,
    };
    let reader = coffer_common::runtime::SnapshotReader::open(&coord, &keyring, "git/a", "latest", opts).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let targets: Vec<(String, PathBuf)> = files.iter().map(|(p, _)| (p.clone(), out.path().join(p))).collect();
    reader.restore_files(&targets).await.unwrap();
    for (p, d) in &files {
        assert_eq!(&std::fs::read(out.path().join(p)).unwrap(), d, "{p}");
    }
    // One lane, one batch at a time: every chunk of the copy was kept when "big" was
    // restored (two lanes may both fetch a chunk before either has kept it).
    let opts = coffer_common::runtime::restore::RestoreOptions {
        parallel: 1,
        lanes: 1,
        repeat_cache: 8 << 20,
        quiet: true,
        ..Default::default()
    };
    let serial = coffer_common::runtime::SnapshotReader::open(&coord, &keyring, "git/a", "latest", opts).await.unwrap();
    let out3 = tempfile::tempdir().unwrap();
    let both = ["big", "copy-of-big"].map(|p| (p.to_string(), out3.path().join(p)));
    serial.restore_files(&both).await.unwrap();
    assert!(serial.reused_bytes() >= 3_000_000, "reused {} bytes", serial.reused_bytes());
    assert_eq!(std::fs::read(out3.path().join("copy-of-big")).unwrap(), files[5].1);
    // A signed manifest whose file hash does not match the chunks: restore refuses it.
    let good = coord.manifest("git/a", "latest").await.unwrap().unwrap();
    let mut raw = raw_agent(&s, "agent-git-1");
    let mut bad = good.manifest.clone();
    bad.snapshot = begin(&mut raw).await;
    bad.files[1].sha256 = "00".repeat(32);
    let bytes = bad.encode();
    let signature = me.signer().sign(coffer_common::signing::MANIFEST_NAMESPACE, &bytes);
    raw.commit_backup(pb::CommitBackupRequest { snapshot_id: bad.snapshot.clone(), manifest: bytes, signature })
        .await
        .unwrap();
    let opts = coffer_common::runtime::restore::RestoreOptions {
        parallel: 2,
        batch_bytes: 200_000,
        lanes: 1,
        memory_budget: 8 << 20,
        repeat_cache: 0,
        quiet: true,
    };
    let lying =
        coffer_common::runtime::SnapshotReader::open(&coord, &keyring, "git/a", &bad.snapshot, opts).await.unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let targets: Vec<(String, PathBuf)> = files.iter().map(|(p, _)| (p.clone(), out2.path().join(p))).collect();
    let err = lying.restore_files(&targets).await.unwrap_err().to_string();
    assert!(err.contains(&bad.snapshot) && err.contains("\"big\"") && err.contains("SHA-256"), "{err}");

    let one = reader.restore_file("big", Vec::new()).await.unwrap();
    assert_eq!(one, files[1].1);
    assert!(reader.restore_file("nope", Vec::new()).await.is_err());
}

/// A lane's writer lives as long as the lane; it must not hold one of the blocking-pool
/// threads its own batches are decrypted on. Agents cap that pool (4 per core + 4), so a
/// restore with more lanes than pool threads would wait forever if writers took them.
#[test]
fn restore_lanes_leave_the_blocking_pool_to_decryption() {
    let server_rt = tokio::runtime::Runtime::new().unwrap();
    let s = server_rt.block_on(start());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(3)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let me = AgentIdentity::generate("me");
        let coord = connect(&s, "agent-git-1", &me).await;
        let keyring = coord.keyring("git/lanes", &me, &[]).await.unwrap();
        let opts = PipelineOptions { quiet: true, ..Default::default() };
        let mut sink = BackupSink::begin(&coord, &keyring, "git/lanes", "git", opts).await.unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..8u32)
            .map(|f| (format!("f{f}"), (0..400_000u32).map(|i| (i * (f + 3) % 251) as u8).collect()))
            .collect();
        sink.add_files(files.iter().map(|(p, d)| (p.clone(), std::io::Cursor::new(d.clone()))).collect())
            .await
            .unwrap();
        sink.commit(&me, Default::default()).await.unwrap();
        let opts = coffer_common::runtime::restore::RestoreOptions {
            lanes: 6,
            batch_bytes: 100_000,
            quiet: true,
            ..Default::default()
        };
        let reader =
            coffer_common::runtime::SnapshotReader::open(&coord, &keyring, "git/lanes", "latest", opts).await.unwrap();
        let out = tempfile::tempdir().unwrap();
        let targets: Vec<(String, PathBuf)> = files.iter().map(|(p, _)| (p.clone(), out.path().join(p))).collect();
        tokio::time::timeout(std::time::Duration::from_secs(60), reader.restore_files(&targets))
            .await
            .expect("restore with more lanes than blocking threads finishes")
            .unwrap();
        for (p, d) in &files {
            assert_eq!(&std::fs::read(out.path().join(p)).unwrap(), d, "{p}");
        }
    });
}

#[tokio::test]
async fn message_and_frame_limits() {
    let s = start().await;
    let me = AgentIdentity::generate("me");
    connect(&s, "agent-git-1", &me).await;
    let mut raw = raw_agent(&s, "agent-git-1");

    // More ids than one call may carry.
    let st = raw
        .find_missing_chunks(pb::FindMissingChunksRequest { asset: "git/a".into(), ids: vec![vec![0; 32]; 4097] })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let ok = raw
        .find_missing_chunks(pb::FindMissingChunksRequest { asset: "git/a".into(), ids: vec![vec![0; 32]; 4096] })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().missing.len(), 4096);

    let upload = |data_len: usize| {
        let mut raw = raw.clone();
        async move {
            let snap = begin(&mut raw).await;
            let frames = vec![
                pb::UploadChunksRequest { snapshot_id: snap, id: vec![], data: Default::default() },
                pb::UploadChunksRequest { snapshot_id: String::new(), id: vec![1; 32], data: vec![7; data_len].into() },
            ];
            let mut acks = raw.upload_chunks(futures::stream::iter(frames)).await?.into_inner();
            let mut got = Vec::new();
            while let Some(a) = acks.message().await? {
                got.push(a);
            }
            Ok::<_, tonic::Status>(got)
        }
    };
    // Exactly at the chunk limit: acknowledged and sealed.
    let acks = upload(MAX_STORED_CHUNK).await.unwrap();
    assert_eq!(acks.len(), 2);
    assert!(acks[1].sealed);
    // One byte over: refused with a clear message.
    let st = upload(MAX_STORED_CHUNK + 1).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("over the"), "{}", st.message());
    // Over the transport's message limit: refused before it is buffered whole.
    let st = upload(coffer_common::tls::MAX_MESSAGE_SIZE + 1).await.unwrap_err();
    assert!(matches!(st.code(), Code::ResourceExhausted | Code::OutOfRange | Code::Internal), "{st:?}");
}

#[tokio::test]
async fn a_backup_whose_agent_vanished_is_aborted_and_one_still_uploading_is_not() {
    let s = start_with("open-backup-timeout = \"1s\"\n").await;
    connect(&s, "agent-git-1", &AgentIdentity::generate("me")).await;
    let mut raw = raw_agent(&s, "agent-git-1");
    // Begun, then nothing: its agent is gone.
    let gone = begin(&mut raw).await;
    // Begun with an upload stream that stays open past the timeout (a long upload).
    let live = begin(&mut raw).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::UploadChunksRequest { snapshot_id: live.clone(), id: vec![], data: Default::default() }).await.unwrap();
    let mut acks =
        raw.clone().upload_chunks(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let commit = |snapshot: String| {
        let mut raw = raw.clone();
        async move { raw.commit_backup(pb::CommitBackupRequest { snapshot_id: snapshot, ..Default::default() }).await }
    };
    let st = commit(gone.clone()).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("aborted"), "the idle backup was aborted: {}", st.message());
    // The uploading one is still open: its stream takes a chunk, and only a commit's own
    // checks stand in its way (an empty manifest is no manifest).
    tx.send(pb::UploadChunksRequest { snapshot_id: String::new(), id: vec![5; 32], data: vec![1; 100].into() })
        .await
        .unwrap();
    let ack = acks.message().await.unwrap().expect("an acknowledgement");
    assert_eq!(ack.id, vec![5; 32]);
    let st = commit(live.clone()).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "the live backup is still open: {st:?}");
}

#[tokio::test]
async fn racing_first_registrations_bind_exactly_one_key() {
    let s = start().await;
    // Two agents presenting the same certificate with different signing keys, both first:
    // one key is bound, the other refused, whichever way the calls interleave.
    for name in ["agent-git-1", "agent-intruder"] {
        let creds = creds(&s, name);
        let tls = creds.tls();
        let (a, b) = (AgentIdentity::generate("a"), AgentIdentity::generate("b"));
        let (ra, rb) = tokio::join!(Coordinator::connect(&tls, &a, &["git"]), Coordinator::connect(&tls, &b, &["git"]));
        let errors: Vec<String> = [&ra, &rb].iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
        assert_eq!(errors.len(), 1, "{name}: exactly one of two racing keys is bound: {errors:?}");
        assert!(errors[0].contains("signing key"), "{}", errors[0]);
        // The bound key keeps working; the other stays refused.
        let (winner, loser) = if ra.is_ok() { (&a, &b) } else { (&b, &a) };
        Coordinator::connect(&tls, winner, &["git"]).await.unwrap();
        assert!(Coordinator::connect(&tls, loser, &["git"]).await.is_err(), "{name}: the losing key stays refused");
    }
}

#[tokio::test]
async fn roles_are_enforced() {
    let s = start().await;
    let me = AgentIdentity::generate("me");
    // Admins cannot act as agents.
    let st = raw_agent(&s, "admin-ops")
        .hello(pb::HelloRequest {
            agent_version: "x".into(),
            signing_key: me.signer().public_openssh(),
            age_recipient: me.recipient(),
            kinds: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    // Agents cannot use the admin service.
    let ch = creds(&s, "agent-git-1").tls().channel().unwrap();
    let st =
        pb::admin_service_client::AdminServiceClient::new(ch).list_assets(pb::ListAssetsRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    // An agent's key is bound on first use; another key for the same identity is refused.
    connect(&s, "agent-git-1", &me).await;
    let other = AgentIdentity::generate("other");
    let Err(err) = Coordinator::connect(&creds(&s, "agent-git-1").tls(), &other, &["git"]).await else {
        panic!("a second signing key for one identity must be refused")
    };
    assert!(err.to_string().contains("signing key"), "{err}");
    // Backups belong to the agent that began them.
    let mut mine = raw_agent(&s, "agent-git-1");
    let snap = begin(&mut mine).await;
    connect(&s, "agent-intruder", &AgentIdentity::generate("intruder")).await;
    let st = raw_agent(&s, "agent-intruder")
        .abort_backup(pb::AbortBackupRequest { snapshot_id: snap, reason: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
}
