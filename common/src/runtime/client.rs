//! The agent's connection to the coordinator: mTLS channel, registration, keyring and
//! manifest retrieval, with retries for transient failures.

use coffer_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::retry::RetryPolicy;
use crate::identity::AgentIdentity;
use crate::keyring::{Keyring, KeyringError};
use crate::manifest::{Manifest, ManifestError};
use crate::signing::{self, SignatureError};
use crate::tls::{ClientTls, MAX_MESSAGE_SIZE, TlsError};

pub type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, Interceptor>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{call} failed: {}: {}", .status.code(), .status.message())]
    Rpc { call: &'static str, status: tonic::Status },
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("snapshot {snapshot}: {source}")]
    Manifest { snapshot: String, source: ManifestError },
    #[error("snapshot {snapshot}: manifest signature: {source}")]
    Signature { snapshot: String, source: SignatureError },
    #[error("snapshot {snapshot}: {detail}")]
    Corrupt { snapshot: String, detail: String },
    #[error("no snapshot {snapshot:?} of asset {asset}")]
    NoSnapshot { asset: String, snapshot: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl ClientError {
    pub fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
        move |status| ClientError::Rpc { call, status }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Rpc { status, .. } if super::retry::is_retryable(status))
    }
}

/// A manifest as stored: the canonical bytes, their signature and the key that signed them.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub signature: String,
    pub signing_key: String,
    pub info: pb::SnapshotInfo,
}

#[derive(Clone)]
pub struct Coordinator {
    client: AgentClient,
    pub retry: RetryPolicy,
    pub hello: pb::HelloResponse,
    own_key: String,
}

impl Coordinator {
    /// Connects and registers this agent's keys with the coordinator.
    pub async fn connect(
        tls: &ClientTls<'_>,
        identity: &AgentIdentity,
        kinds: &[&str],
    ) -> Result<Coordinator, ClientError> {
        let channel = tls.channel()?;
        let client =
            AgentServiceClient::with_interceptor(channel, crate::telemetry::inject_trace_context as Interceptor)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let retry = RetryPolicy::default();
        let own_key = identity.signer().public_openssh();
        let req = pb::HelloRequest {
            agent_version: crate::VERSION.to_string(),
            signing_key: own_key.clone(),
            age_recipient: identity.recipient(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
        };
        let hello = retry
            .run("Hello", || {
                let mut c = client.clone();
                let req = req.clone();
                async move { c.hello(req).await }
            })
            .await
            .map_err(ClientError::rpc("Hello"))?
            .into_inner();
        Ok(Coordinator { client, retry, hello, own_key })
    }

    pub fn raw(&self) -> AgentClient {
        self.client.clone()
    }

    /// Agent name as the coordinator sees it (from the certificate).
    pub fn agent_name(&self) -> &str {
        self.hello.identity.rsplit('/').next().unwrap_or(&self.hello.identity)
    }

    /// The asset's keyring: fetched and unwrapped if it exists, otherwise created, wrapped to
    /// this agent and every recovery recipient, and stored (first writer wins).
    pub async fn keyring(
        &self,
        asset: &str,
        identity: &AgentIdentity,
        extra_recipients: &[String],
    ) -> Result<Keyring, ClientError> {
        let got = self
            .retry
            .run("GetKeyring", || {
                let mut c = self.raw();
                let asset = asset.to_string();
                async move { c.get_keyring(pb::GetKeyringRequest { asset }).await }
            })
            .await;
        match got {
            Ok(r) => return Ok(Keyring::unwrap(&r.into_inner().envelope, identity.age(), asset)?),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(ClientError::Rpc { call: "GetKeyring", status }),
        }
        let keyring = Keyring::generate(asset);
        let mut recipients = vec![identity.recipient()];
        recipients.extend(self.hello.recovery_recipients.iter().cloned());
        recipients.extend(extra_recipients.iter().cloned());
        recipients.sort();
        recipients.dedup();
        let envelope = keyring.wrap(&recipients)?;
        let resp = self
            .retry
            .run("PutKeyring", || {
                let mut c = self.raw();
                let req = pb::PutKeyringRequest { asset: asset.to_string(), envelope: envelope.clone() };
                async move { c.put_keyring(req).await }
            })
            .await
            .map_err(ClientError::rpc("PutKeyring"))?
            .into_inner();
        if resp.created {
            tracing::info!(asset, recipients = recipients.len(), "created the asset keyring");
            Ok(keyring)
        } else {
            // Another agent won the race: use the stored keyring.
            Ok(Keyring::unwrap(&resp.envelope, identity.age(), asset)?)
        }
    }

    /// Fetches and checks a manifest: canonical encoding, signature, and (for manifests this
    /// agent wrote) that the signing key is this agent's own.
    pub async fn manifest(&self, asset: &str, snapshot: &str) -> Result<Option<SignedManifest>, ClientError> {
        let got = self
            .retry
            .run("GetManifest", || {
                let mut c = self.raw();
                let req = pb::GetManifestRequest { asset: asset.to_string(), snapshot: snapshot.to_string() };
                async move { c.get_manifest(req).await }
            })
            .await;
        let r = match got {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(ClientError::Rpc { call: "GetManifest", status }),
        };
        let info = r.snapshot.ok_or_else(|| ClientError::Protocol("GetManifest returned no snapshot info".into()))?;
        let snap = info.id.clone();
        let manifest =
            Manifest::decode(&r.manifest).map_err(|source| ClientError::Manifest { snapshot: snap.clone(), source })?;
        signing::verify(&r.signing_key, signing::MANIFEST_NAMESPACE, &r.manifest, &r.signature)
            .map_err(|source| ClientError::Signature { snapshot: snap.clone(), source })?;
        if manifest.agent == self.agent_name() && !signing::same_key(&r.signing_key, &self.own_key) {
            return Err(ClientError::Corrupt {
                snapshot: snap,
                detail: "manifest claims this agent but is signed by another key".into(),
            });
        }
        if manifest.snapshot != info.id || manifest.asset != asset {
            return Err(ClientError::Corrupt {
                snapshot: snap,
                detail: "manifest does not match its catalog entry".into(),
            });
        }
        Ok(Some(SignedManifest {
            manifest,
            bytes: r.manifest,
            signature: r.signature,
            signing_key: r.signing_key,
            info,
        }))
    }

    pub async fn list_snapshots(&self, asset: &str, limit: u32) -> Result<Vec<pb::SnapshotInfo>, ClientError> {
        self.list_stream(asset, "", limit).await
    }

    /// The entries of one of the asset's streams (empty: its snapshots), newest first.
    pub async fn list_stream(
        &self,
        asset: &str,
        stream: &str,
        limit: u32,
    ) -> Result<Vec<pb::SnapshotInfo>, ClientError> {
        Ok(self
            .retry
            .run("ListSnapshots", || {
                let mut c = self.raw();
                let req = pb::ListSnapshotsRequest { asset: asset.to_string(), limit, stream: stream.to_string() };
                async move { c.list_snapshots(req).await }
            })
            .await
            .map_err(ClientError::rpc("ListSnapshots"))?
            .into_inner()
            .snapshots)
    }

    /// Files of the asset's stream: the named ones it holds, or (no names) every file in
    /// path order, paged through.
    pub async fn stream_files(
        &self,
        asset: &str,
        stream: &str,
        paths: &[String],
    ) -> Result<Vec<pb::StreamFile>, ClientError> {
        let call = |paths: Vec<String>, after: String| {
            self.retry.run("ListStreamFiles", move || {
                let mut c = self.raw();
                let req = pb::ListStreamFilesRequest {
                    asset: asset.to_string(),
                    stream: stream.to_string(),
                    paths: paths.clone(),
                    after: after.clone(),
                    limit: 0,
                };
                async move { c.list_stream_files(req).await }
            })
        };
        let mut out = Vec::new();
        if !paths.is_empty() {
            for batch in paths.chunks(4096) {
                let got = call(batch.to_vec(), String::new()).await.map_err(ClientError::rpc("ListStreamFiles"))?;
                out.extend(got.into_inner().files);
            }
            return Ok(out);
        }
        loop {
            let after = out.last().map(|f: &pb::StreamFile| f.path.clone()).unwrap_or_default();
            let page = call(Vec::new(), after).await.map_err(ClientError::rpc("ListStreamFiles"))?.into_inner().files;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page);
        }
    }
}
