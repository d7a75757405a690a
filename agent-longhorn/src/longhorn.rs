//! The Longhorn manager REST API (v1), the part backups use: the volume (state,
//! robustness, replicas) and its snapshots (`?action=snapshotCreate|snapshotDelete`). Sizes come as decimal strings. Field facts: docs/longhorn-api-notes.md.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LonghornError {
    #[error("Longhorn API {url}: {detail}")]
    Http { url: String, detail: String },
    #[error("Longhorn API {url}: unexpected response: {detail}")]
    Decode { url: String, detail: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub name: String,
    #[serde(default)]
    pub host_id: String,
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub failed_at: String,
}

impl Replica {
    /// Serving reads and writes: what counts as a copy.
    pub fn healthy(&self) -> bool {
        self.running && self.mode == "RW" && self.failed_at.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub size: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub robustness: String,
    #[serde(default)]
    pub number_of_replicas: u32,
    #[serde(default)]
    pub replicas: Vec<Replica>,
}

impl Volume {
    pub fn healthy_replicas(&self) -> usize {
        self.replicas.iter().filter(|r| r.healthy()).count()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    #[serde(default)]
    pub created: String,
    /// Decimal bytes.
    #[serde(default)]
    pub size: String,
}

#[derive(Deserialize)]
struct Collection<T> {
    data: Vec<T>,
}

/// The name Longhorn gives the live layer written since the newest snapshot.
pub const VOLUME_HEAD: &str = "volume-head";

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// `url` is the manager's base, e.g. `http://longhorn-backend.longhorn-system:9500`.
    pub fn new(url: &str) -> Client {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
        Client { base: url.trim_end_matches('/').trim_end_matches("/v1").to_string(), agent }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        url: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, LonghornError> {
        let resp = r.map_err(|e| {
            let detail = match e {
                ureq::Error::Status(code, resp) => {
                    let body = resp.into_string().unwrap_or_default();
                    // go-rancher errors carry a message; a missing volume is a bare 404.
                    let msg = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_string))
                        .unwrap_or(body);
                    format!("HTTP {code}: {}", msg.trim())
                }
                other => other.to_string(),
            };
            LonghornError::Http { url: url.to_string(), detail }
        })?;
        resp.into_json().map_err(|e| LonghornError::Decode { url: url.to_string(), detail: e.to_string() })
    }

    fn volume_url(&self, volume: &str) -> String {
        format!("{}/v1/volumes/{volume}", self.base)
    }

    pub fn volume(&self, volume: &str) -> Result<Volume, LonghornError> {
        let url = self.volume_url(volume);
        Self::decode(&url, self.agent.get(&url).call())
    }

    fn action<T: serde::de::DeserializeOwned>(
        &self,
        volume: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<T, LonghornError> {
        let url = format!("{}?action={action}", self.volume_url(volume));
        Self::decode(&url, self.agent.post(&url).send_json(body))
    }

    pub fn snapshot_create(&self, volume: &str, name: &str) -> Result<Snapshot, LonghornError> {
        self.action(volume, "snapshotCreate", serde_json::json!({ "name": name, "labels": { "coffer": "backup" } }))
    }

    /// Bytes written since the newest snapshot: the size of the volume head.
    pub fn head_size(&self, volume: &str) -> Result<u64, LonghornError> {
        let list: Collection<Snapshot> = self.action(volume, "snapshotList", serde_json::json!({}))?;
        Ok(list.data.iter().find(|s| s.name == VOLUME_HEAD).and_then(|s| s.size.parse().ok()).unwrap_or(0))
    }

    pub fn snapshot_delete(&self, volume: &str, name: &str) -> Result<(), LonghornError> {
        // The answer is the volume.
        let _: serde_json::Value = self.action(volume, "snapshotDelete", serde_json::json!({ "name": name }))?;
        Ok(())
    }
}
