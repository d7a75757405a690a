//! Packs kept only in copy targets.
//!
//! When an asset's policy does not list `local` among its copies (the built-in Longhorn
//! row: Longhorn's replicas plus S3), the coordinator keeps its manifests, keyring and
//! catalog locally but drops each pack file once every copy target the policy names holds
//! it and the store's checksum of each copy still matches the one recorded at upload. The
//! catalog marks such packs (`packs.remote_ms`); restores read their chunks with ranged GETs
//! from the first target holding a good copy, each chunk checked against its CRC as a local
//! read is; deduplication is unchanged (the catalog still locates every chunk).
//!
//! Order: the pack is marked remote, then its file is deleted, so a crash between the two
//! leaves a file that is simply still read locally (reads try the file first).

use crate::config::Config;
use crate::policy::Policy;
use crate::replicate::ReplicateError;
use crate::service::{Shared, State};
use crate::store::StoreError;
use crate::store::pack::Entry;

/// Copy names kept outside Coffer's targets (Longhorn's replicas, the Git host).
pub const EXTERNAL_COPIES: [&str; 2] = ["replicas", "git-host"];

/// The targets that must all hold an asset's packs before the local files may go; `None`
/// when the policy keeps `local`, or names a copy that is neither a configured target nor
/// kept outside Coffer (a typo must never cost the only copy).
pub fn remote_only_targets(config: &Config, policy: &Policy) -> Option<Vec<String>> {
    if policy.copies.iter().any(|c| c == "local") {
        return None;
    }
    let mut targets = Vec::new();
    for c in &policy.copies {
        if config.targets.contains_key(c) {
            targets.push(c.clone());
        } else if !EXTERNAL_COPIES.contains(&c.as_str()) {
            return None;
        }
    }
    (!targets.is_empty()).then_some(targets)
}

/// A pack's key in the repository layout (local and in every target).
pub fn pack_key(id: &str) -> String {
    format!("packs/{}/{id}.pack", &id[..2.min(id.len())])
}

impl State {
    /// The S3 client of a target, built once.
    pub fn target_client(&self, name: &str) -> Result<aws_sdk_s3::Client, ReplicateError> {
        let mut clients = self.s3_clients.lock().expect("clients lock");
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let target = self
            .config
            .targets
            .get(name)
            .ok_or_else(|| ReplicateError::Config { target: name.into(), detail: "not configured".into() })?;
        let c = target.client(name)?;
        clients.insert(name.to_string(), c.clone());
        Ok(c)
    }
}

/// Reads chunk `e` of a remote-only pack: a ranged GET of exactly the chunk from the first
/// target holding a good copy, checked against the chunk's CRC-32C.
pub async fn read_chunk(state: &State, pack_id: &str, e: &Entry) -> Result<Vec<u8>, StoreError> {
    let key = pack_key(pack_id);
    let holders = state.catalog.copy_holders(&key).await.map_err(|err| remote_error(pack_id, err.to_string()))?;
    let mut tried = Vec::new();
    for name in holders {
        let Some(target) = state.config.targets.get(&name) else { continue };
        let client = match state.target_client(&name) {
            Ok(c) => c,
            Err(err) => {
                tried.push(err.to_string());
                continue;
            }
        };
        let range = format!("bytes={}-{}", e.offset, e.offset + u64::from(e.length).max(1) - 1);
        let got =
            client.get_object().bucket(&target.bucket).key(format!("{}{key}", target.prefix)).range(range).send().await;
        let bytes = match got {
            Ok(g) => match g.body.collect().await {
                Ok(b) => b.into_bytes(),
                Err(err) => {
                    tried.push(format!("{name}: {err}"));
                    continue;
                }
            },
            Err(err) => {
                tried.push(format!("{name}: {}", crate::replicate::brief(&err)));
                continue;
            }
        };
        if bytes.len() != e.length as usize || crc32c::crc32c(&bytes) != e.crc {
            tried.push(format!("{name}: chunk {} fails its checksum", e.id));
            continue;
        }
        return Ok(bytes.to_vec());
    }
    Err(remote_error(pack_id, if tried.is_empty() { "no copy target holds it".into() } else { tried.join("; ") }))
}

fn remote_error(pack_id: &str, detail: String) -> StoreError {
    StoreError::Io {
        context: format!("reading pack {pack_id} (kept only in copy targets)"),
        source: std::io::Error::other(detail),
    }
}

/// Drops the local files of packs that every target their asset's policy requires holds,
/// each copy confirmed first by the store's checksum (HeadObject). Returns how many went.
pub async fn drop_local_packs(state: &Shared, now_ms: i64) -> Result<usize, ReplicateError> {
    let mut dropped = 0;
    for asset in state.catalog.assets().await? {
        let policy = state.config.policy_for(&asset.name);
        let Some(targets) = remote_only_targets(&state.config, &policy) else { continue };
        'pack: for id in state.catalog.packs_held_by_all(&asset.name, &targets).await? {
            let key = pack_key(&id);
            for name in &targets {
                let target = &state.config.targets[name];
                let client = state.target_client(name)?;
                let expected = state.catalog.copy_checksum(name, &key).await?;
                let full = format!("{}{key}", target.prefix);
                if let Some(problem) = crate::copyverify::confirm(&client, target, &full, expected.as_deref()).await {
                    // Not confirmed: the local file stays, and the copy goes back in the queue.
                    tracing::warn!(asset = %asset.name, pack = %id, target = %name, %problem,
                        "keeping the local pack: its copy is not confirmed");
                    state.catalog.record_verify(name, &key, now_ms, Some(&problem)).await?;
                    continue 'pack;
                }
                state.catalog.record_verify(name, &key, now_ms, None).await?;
            }
            state.catalog.mark_pack_remote(&id, now_ms).await?;
            state.repo.delete_pack(&id)?;
            dropped += 1;
            tracing::info!(asset = %asset.name, pack = %id, targets = %targets.join(", "),
                "local pack dropped: the policy keeps it only in copy targets, which hold it");
        }
    }
    Ok(dropped)
}

/// A verified copy of a remote-only pack from another target than `except`, written under
/// the repository's `tmp/` for re-upload; the caller removes it.
pub async fn fetch_for_reupload(state: &State, pack_id: &str, except: &str) -> Result<std::path::PathBuf, String> {
    let key = pack_key(pack_id);
    let tmp = state.repo.tmp_dir();
    let mut tried = Vec::new();
    for name in state.catalog.copy_holders(&key).await.map_err(|e| e.to_string())? {
        if name == except {
            continue;
        }
        let Some(target) = state.config.targets.get(&name) else { continue };
        let expected = state.catalog.copy_sha256(&name, &key).await.map_err(|e| e.to_string())?;
        match crate::copyverify::fetch_good_copy(&name, target, &key, pack_id, expected.as_deref(), &tmp).await {
            Ok(bytes) => {
                let path = tmp.join(format!("reupload-{pack_id}-{}.pack", crate::store::random_hex(4)));
                std::fs::write(&path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
                return Ok(path);
            }
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(if tried.is_empty() {
        "the local copy was dropped (the policy keeps it only in copy targets) and no other target holds it".into()
    } else {
        format!("the local copy was dropped and no other copy verifies ({})", tried.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_may_go_only_when_every_named_copy_is_a_target_or_kept_outside() {
        let c: Config = toml::from_str(
            r#"
            [targets.s3]
            endpoint = "http://127.0.0.1:9000"
            bucket = "b"
            [targets.offsite]
            endpoint = "http://127.0.0.1:9001"
            bucket = "o"
            [policy.assets."git/typo"]
            copies = ["s3", "ofsite"]
            [policy.assets."git/two"]
            copies = ["s3", "offsite"]
            [policy.assets."git/kept"]
            copies = ["local", "s3"]
            [policy.assets."git/outside-only"]
            copies = ["git-host"]
            "#,
        )
        .unwrap();
        let t = |a: &str| remote_only_targets(&c, &c.policy_for(a));
        // The built-in Longhorn row: Longhorn's replicas plus s3.
        assert_eq!(t("longhorn/pvc"), Some(vec!["s3".to_string()]));
        assert_eq!(t("git/two"), Some(vec!["s3".to_string(), "offsite".to_string()]));
        assert_eq!(t("git/kept"), None, "local is required");
        assert_eq!(t("git/typo"), None, "an unknown copy name keeps the local files");
        assert_eq!(t("git/outside-only"), None, "no target of ours holds the packs");
        assert_eq!(pack_key("abcdef"), "packs/ab/abcdef.pack");
    }
}
