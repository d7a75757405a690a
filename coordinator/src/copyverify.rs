//! Verification of copies in S3 targets.
//!
//! Every upload sends a SHA-256 of the object (`x-amz-checksum-sha256`); the store checks
//! the body against it and keeps it. **Fast** verification lists the target and asks each
//! object's stored checksum with `HeadObject` (`ChecksumMode=ENABLED`), comparing it with
//! the SHA-256 recorded at upload: nothing is downloaded. **Deep** verification downloads
//! each object, hashes it, and for packs also checks the pack index and every chunk's CRC.
//! Each object's last verification is kept in the catalog, so a routine run re-checks only
//! what is new or older than the recheck interval. A failed object goes back into the
//! replication queue: the next pass uploads it again from the local copy (repair).

use std::path::Path;

use aws_sdk_s3::types::ChecksumMode;
use base64::Engine as _;

use crate::catalog::Catalog;
use crate::replicate::{ReplicateError, TargetConfig, brief};

pub fn b64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    pub target: String,
    pub deep: bool,
    pub checked: u64,
    pub bytes: u64,
    /// (key, problem)
    pub problems: Vec<(String, String)>,
}

/// Verifies the objects of `name` that are due (all when `recheck_before_ms` is `i64::MAX`).
pub async fn verify_target(
    catalog: &Catalog,
    scratch: &Path,
    name: &str,
    target: &TargetConfig,
    deep: bool,
    recheck_before_ms: i64,
    now_ms: i64,
) -> Result<CopyReport, ReplicateError> {
    let client = target.client(name)?;
    let mut report = CopyReport { target: name.to_string(), deep, ..Default::default() };
    for c in catalog.copies_to_verify(name, recheck_before_ms).await? {
        let key = c.key;
        let full_key = format!("{}{}", target.prefix, key);
        let problem = if deep {
            deep_check(&client, target, &full_key, &key, c.sha256.as_deref(), scratch, &mut report).await
        } else {
            let expected = expected_checksum(c.checksum, c.sha256.as_deref());
            fast_check(&client, target, &full_key, expected.as_deref(), &mut report).await
        };
        report.checked += 1;
        if let Some(p) = &problem {
            tracing::warn!(target = name, %key, problem = %p, "copy verification failed; queued for repair");
            report.problems.push((key.clone(), p.clone()));
        }
        catalog.record_verify(name, &key, now_ms, problem.as_deref()).await?;
    }
    tracing::info!(target = name, deep, checked = report.checked, problems = report.problems.len(), "copies verified");
    Ok(report)
}

fn is_missing<E: aws_sdk_s3::error::ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
        || e.as_service_error().and_then(|s| s.code()).is_some_and(|c| c == "NoSuchKey" || c == "NotFound")
}

async fn fast_check(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    expected: Option<&str>,
    report: &mut CopyReport,
) -> Option<String> {
    let head = client.head_object().bucket(&target.bucket).key(key).checksum_mode(ChecksumMode::Enabled).send().await;
    let head = match head {
        Ok(h) => h,
        Err(e) if is_missing(&e) => return Some("missing from the target".into()),
        Err(e) => return Some(format!("HeadObject failed: {}", brief(&e))),
    };
    report.bytes += head.content_length().unwrap_or(0).max(0) as u64;
    let Some(expected) = expected else {
        return Some("no checksum was recorded at upload; run a deep verify".into());
    };
    match head.checksum_sha256() {
        Some(stored) if same_checksum(stored, expected) => None,
        Some(stored) => Some(format!("stored checksum {stored} differs from the uploaded {expected}")),
        None => Some("the store keeps no SHA-256 for this object; run a deep verify".into()),
    }
}

/// The checksum a store should report for an object: the one recorded at upload, or for
/// objects uploaded before that was recorded, the base64 of their SHA-256 (a single PUT).
pub fn expected_checksum(checksum: Option<String>, sha256_hex: Option<&str>) -> Option<String> {
    checksum.or_else(|| sha256_hex.and_then(|s| hex::decode(s).ok()).map(|d| b64(&d)))
}

/// Whether the store's checksum of `key` is `expected` (HeadObject, nothing downloaded):
/// `None` when it is, else the problem.
pub async fn confirm(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    expected: Option<&str>,
) -> Option<String> {
    fast_check(client, target, key, expected, &mut CopyReport::default()).await
}

/// Whether the checksum a store reports is the one recorded at upload. A multipart
/// object's composite checksum ends in `-<parts>`; some stores leave that suffix out, so
/// the digests are compared (and the part counts when both give one).
pub fn same_checksum(stored: &str, expected: &str) -> bool {
    let (s, sp) = stored.split_once('-').map_or((stored, None), |(d, n)| (d, Some(n)));
    let (e, ep) = expected.split_once('-').map_or((expected, None), |(d, n)| (d, Some(n)));
    s == e && (sp.is_none() || ep.is_none() || sp == ep)
}

async fn deep_check(
    client: &aws_sdk_s3::Client,
    target: &TargetConfig,
    key: &str,
    rel: &str,
    sha: Option<&str>,
    scratch: &Path,
    report: &mut CopyReport,
) -> Option<String> {
    let got = match client.get_object().bucket(&target.bucket).key(key).send().await {
        Ok(g) => g,
        Err(e) if is_missing(&e) => return Some("missing from the target".into()),
        Err(e) => return Some(format!("GetObject failed: {}", brief(&e))),
    };
    let bytes = match got.body.collect().await {
        Ok(b) => b.into_bytes(),
        Err(e) => return Some(format!("reading the object: {e}")),
    };
    report.bytes += bytes.len() as u64;
    let digest = coffer_common::crypto::sha256(&bytes);
    if let Some(expected) = sha
        && hex::encode(digest) != expected
    {
        return Some(format!("content hashes to {} but {expected} was uploaded", hex::encode(digest)));
    }
    // A pack: its own index and every chunk's CRC-32C, as the local verify does.
    if let Some(pack_id) =
        rel.strip_prefix("packs/").and_then(|p| p.rsplit('/').next()).and_then(|f| f.strip_suffix(".pack"))
    {
        let tmp = scratch.join(format!("verify-{pack_id}.pack"));
        if let Err(e) = std::fs::write(&tmp, &bytes) {
            return Some(format!("writing a scratch copy: {e}"));
        }
        let result = check_pack(&tmp, pack_id);
        let _ = std::fs::remove_file(&tmp);
        if let Err(p) = result {
            return Some(p);
        }
    }
    None
}

fn check_pack(path: &Path, pack_id: &str) -> Result<(), String> {
    let (_, entries, _) = crate::store::pack::read_index(path).map_err(|e| e.to_string())?;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    for e in &entries {
        crate::store::pack::read_chunk(&f, pack_id, e).map_err(|err| format!("chunk {}: {err}", e.id))?;
    }
    Ok(())
}

/// The report as text, one problem per line.
pub fn render(r: &CopyReport) -> String {
    let mut out = format!(
        "target {}: {} verified {} object(s), {} byte(s): {} problem(s)\n",
        r.target,
        if r.deep { "deep" } else { "fast" },
        r.checked,
        r.bytes,
        r.problems.len()
    );
    for (k, p) in &r.problems {
        out.push_str(&format!("  {k}: {p} (queued for re-upload)\n"));
    }
    out
}

/// What `repair` did for one local pack.
#[derive(Debug, Clone)]
pub struct Repaired {
    pub pack: String,
    /// The target it came from, or None when no copy verified.
    pub from: Option<String>,
    pub detail: String,
}

/// Finds local packs that are corrupt (by the keyless verify) or missing (known to the
/// catalog, absent on disk) and replaces each with a copy from the first target whose
/// object matches the SHA-256 recorded at upload and whose chunks all check out.
pub async fn repair_local(
    repo: &crate::store::Repo,
    catalog: &Catalog,
    targets: &std::collections::BTreeMap<String, TargetConfig>,
) -> Result<Vec<Repaired>, ReplicateError> {
    let r = repo.clone();
    let report = tokio::task::spawn_blocking(move || crate::verify::verify_repo(&r))
        .await
        .map_err(|e| ReplicateError::Read { target: "local".into(), key: String::new(), detail: e.to_string() })??;
    let mut bad: std::collections::BTreeMap<String, String> =
        report.problems.into_iter().map(|p| (p.pack.clone(), p.detail)).collect();
    let on_disk: std::collections::HashSet<String> = repo.list_packs()?.into_iter().collect();
    // Packs kept only in copy targets are not expected on disk (crate::remote).
    let remote_only = catalog.remote_pack_ids().await?;
    for id in catalog.pack_ids().await? {
        if !on_disk.contains(&id) && !remote_only.contains(&id) {
            bad.insert(id, "missing from the local repository".into());
        }
    }
    let tmp = repo.root().join("tmp");
    let mut out = Vec::new();
    for (pack, why) in bad {
        let rel = repo
            .pack_path(&pack)
            .strip_prefix(repo.root())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tried = Vec::new();
        let mut from = None;
        for (name, target) in targets {
            let expected = catalog.copy_sha256(name, &rel).await?;
            match fetch_good_copy(name, target, &rel, &pack, expected.as_deref(), &tmp).await {
                Ok(bytes) => {
                    crate::store::write_atomic(&tmp, &repo.pack_path(&pack), &bytes)?;
                    from = Some(name.clone());
                    break;
                }
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        let detail = match &from {
            Some(t) => format!("{why}; replaced with the copy from {t}"),
            None if tried.is_empty() => format!("{why}; no copy target is configured"),
            None => format!("{why}; no good copy ({})", tried.join("; ")),
        };
        tracing::warn!(%pack, %detail, "local pack repair");
        out.push(Repaired { pack, from, detail });
    }
    Ok(out)
}

pub(crate) async fn fetch_good_copy(
    name: &str,
    target: &TargetConfig,
    rel: &str,
    pack: &str,
    expected: Option<&str>,
    scratch: &Path,
) -> Result<bytes::Bytes, String> {
    let client = target.client(name).map_err(|e| e.to_string())?;
    let key = format!("{}{}", target.prefix, rel);
    let got = client.get_object().bucket(&target.bucket).key(&key).send().await.map_err(|e| brief(&e))?;
    let bytes = got.body.collect().await.map_err(|e| e.to_string())?.into_bytes();
    let digest = hex::encode(coffer_common::crypto::sha256(&bytes));
    if let Some(want) = expected
        && digest != want
    {
        return Err(format!("its content hashes to {digest}, not the uploaded {want}"));
    }
    std::fs::create_dir_all(scratch).map_err(|e| e.to_string())?;
    let tmp = scratch.join(format!("repair-{pack}.pack"));
    std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
    let checked = check_pack(&tmp, pack);
    let _ = std::fs::remove_file(&tmp);
    checked.map(|()| bytes)
}

#[cfg(test)]
mod tests {
    use super::same_checksum;

    #[test]
    fn composite_checksums_compare_with_or_without_the_part_count() {
        assert!(same_checksum("abc=", "abc="));
        assert!(same_checksum("abc=-3", "abc=-3"));
        // Stores that leave the part count out of HeadObject.
        assert!(same_checksum("abc=", "abc=-3"));
        assert!(!same_checksum("abc=-2", "abc=-3"), "another part count is another object");
        assert!(!same_checksum("abd=-3", "abc=-3"));
        assert!(!same_checksum("abd=", "abc="));
    }
}
