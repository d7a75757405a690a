//! The git source: a mirror kept in the work directory, fetched each run, backed up as an
//! incremental chain of bundles.
//!
//! Each snapshot's manifest lists the whole chain (the earlier bundles are reused by
//! reference, so they cost nothing), which keeps every snapshot restorable on its own and
//! lets retention delete any snapshot without breaking another. A full bundle starts a new
//! chain every `full_every` snapshots, or whenever the previous snapshot's tips are no
//! longer in the mirror (history rewritten).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coffer_common::manifest::{FileEntry, Manifest};
use coffer_common::runtime::command::{ChildReader, CommandError};
use coffer_common::runtime::{BackupSink, Probe, SnapshotReader, Source, SourceError, VerifyReport};
use serde_json::{Value, json};

use crate::git::{self, git, run};
use crate::scan;

pub struct GitSource {
    pub repo: String,
    pub work_dir: PathBuf,
    pub full_every: u32,
}

fn cmd_err(e: CommandError) -> SourceError {
    SourceError::Failed(e.to_string())
}

impl GitSource {
    fn mirror(&self) -> PathBuf {
        std::path::absolute(&self.work_dir).unwrap_or_else(|_| self.work_dir.clone()).join("mirror.git")
    }

    /// Clones the mirror on first use, then fetches; HEAD follows the remote's default branch.
    fn sync_mirror(&self) -> Result<(), SourceError> {
        std::fs::create_dir_all(&self.work_dir)
            .map_err(SourceError::io(format!("creating {}", self.work_dir.display())))?;
        let mirror = self.mirror();
        if mirror.join("HEAD").exists() {
            run(git(&mirror).args(["remote", "set-url", "origin", &self.repo])).map_err(cmd_err)?;
            run(git(&mirror).args(["fetch", "--prune", "--quiet", "origin"])).map_err(cmd_err)?;
        } else {
            let tmp = mirror.with_extension("partial");
            let _ = std::fs::remove_dir_all(&tmp);
            run(git(&self.work_dir).args(["clone", "--mirror", "--quiet", &self.repo]).arg(&tmp)).map_err(cmd_err)?;
            std::fs::rename(&tmp, &mirror).map_err(SourceError::io("moving the new mirror into place"))?;
        }
        if let Ok(out) = run(git(&mirror).args(["ls-remote", "--symref", "origin", "HEAD"]))
            && let Some(target) = out.lines().find_map(|l| l.strip_prefix("ref: ")).and_then(|l| l.split('\t').next())
        {
            run(git(&mirror).args(["symbolic-ref", "HEAD", target])).map_err(cmd_err)?;
        }
        Ok(())
    }
}

/// Source metadata of a git snapshot, as stored in the manifest.
#[derive(Debug, Default)]
struct GitMeta {
    refs: BTreeMap<String, String>,
    head: String,
    chain: u32,
}

fn read_meta(m: &Manifest) -> GitMeta {
    let refs = m
        .source
        .get("refs")
        .and_then(Value::as_object)
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    GitMeta {
        refs,
        head: m.source.get("head").and_then(Value::as_str).unwrap_or_default().to_string(),
        chain: m.source.get("chain_length").and_then(Value::as_u64).unwrap_or(0) as u32,
    }
}

impl Source for GitSource {
    fn kind(&self) -> &'static str {
        "git"
    }

    async fn probe(&self) -> Result<Probe, SourceError> {
        let out = run(std::process::Command::new("git")
            .args(["ls-remote", "--symref", &self.repo, "HEAD"])
            .env("GIT_TERMINAL_PROMPT", "0"))
        .map_err(cmd_err)?;
        Ok(Probe {
            description: format!(
                "git repository {}: {}",
                git::redact_url(&self.repo),
                out.lines().next().unwrap_or("empty")
            ),
            ..Default::default()
        })
    }

    async fn backup(&self, sink: &mut BackupSink) -> Result<BTreeMap<String, Value>, SourceError> {
        self.sync_mirror()?;
        let mirror = self.mirror();
        let refs = git::refs(&mirror).map_err(cmd_err)?;
        let head = git::head(&mirror).map_err(cmd_err)?;

        let previous = sink.previous().map(|p| (read_meta(&p.manifest), p.manifest.files.clone()));
        let prev_tips: Vec<String> = previous
            .as_ref()
            .map(|(m, _)| {
                let mut t: Vec<String> = m.refs.values().cloned().collect();
                t.sort();
                t.dedup();
                t
            })
            .unwrap_or_default();
        let tips_present = prev_tips.iter().all(|t| git::object_exists(&mirror, t));
        let chain_ok = previous.as_ref().is_some_and(|(m, _)| m.chain > 0 && m.chain < self.full_every) && tips_present;
        let exclude: Vec<String> = if tips_present {
            prev_tips.clone()
        } else {
            prev_tips.iter().filter(|t| git::object_exists(&mirror, t)).cloned().collect()
        };

        // Nothing that must live elsewhere may enter the backup.
        let dir = mirror.clone();
        let excl = exclude.clone();
        let findings = tokio::task::spawn_blocking(move || scan::scan(&dir, &excl))
            .await
            .map_err(|e| SourceError::Failed(format!("scan thread: {e}")))?
            .map_err(|e| SourceError::Failed(format!("scanning for key material: {e}")))?;
        if !findings.is_empty() {
            let list: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
            return Err(SourceError::Refused(format!(
                "repository {} holds private key material that must be kept outside the repository (SOPS keys belong \
                 in the key store, not in git or its backups): {}",
                git::redact_url(&self.repo),
                list.join("; ")
            )));
        }

        let (mut chain, base_exclude) = if chain_ok {
            let (_, files) = previous.as_ref().expect("chain_ok implies previous");
            for f in files.iter().filter(|f| f.path.starts_with("bundles/")) {
                sink.reuse_file(f.clone())?;
            }
            (previous.as_ref().map(|(m, _)| m.chain).unwrap_or(0), prev_tips.clone())
        } else {
            (0, Vec::new())
        };

        let has_new_objects = !refs.is_empty() && {
            let mut c = git(&mirror);
            c.args(["rev-list", "--objects", "--all", "--max-count=1", "--stdin"]);
            let stdin: String = base_exclude.iter().map(|s| format!("^{s}\n")).collect();
            let out = coffer_common::runtime::command::output_with_input(&mut c, stdin.as_bytes()).map_err(cmd_err)?;
            !out.is_empty()
        };
        let mut bundle_bytes = 0;
        if has_new_objects {
            let path = format!("bundles/{chain:04}.bundle");
            // `git bundle create -` streams to stdout; its exit status is checked at EOF.
            let revs: String =
                std::iter::once("--all\n".to_string()).chain(base_exclude.iter().map(|s| format!("^{s}\n"))).collect();
            let revs_file = self.work_dir.join("bundle-revs");
            std::fs::write(&revs_file, revs).map_err(SourceError::io("writing the bundle revision list"))?;
            let stdin = std::fs::File::open(&revs_file).map_err(SourceError::io("opening the bundle revision list"))?;
            let mut cmd = git(&mirror);
            cmd.args(["bundle", "create", "--quiet", "-", "--stdin"]);
            let reader = ChildReader::spawn_with_stdin(&mut cmd, stdin).map_err(cmd_err)?;
            let entry = sink.add_file(&path, reader).await?;
            bundle_bytes = entry.size;
            chain += 1;
            let _ = std::fs::remove_file(&revs_file);
        }
        let mut meta = BTreeMap::new();
        meta.insert("repository".into(), json!(git::redact_url(&self.repo)));
        meta.insert("refs".into(), json!(refs));
        meta.insert("head".into(), json!(head));
        meta.insert("chain_length".into(), json!(chain));
        meta.insert("full".into(), json!(!chain_ok));
        meta.insert("new_bundle_bytes".into(), json!(bundle_bytes));
        meta.insert("object_format".into(), json!(git::object_format(&mirror)));
        meta.insert("git_version".into(), json!(git::version()));
        tracing::info!(refs = refs.len(), chain, full = !chain_ok, bundle_bytes, "git snapshot prepared");
        Ok(meta)
    }

    async fn restore(&self, reader: &SnapshotReader, target: &Path) -> Result<(), SourceError> {
        if target.exists() && std::fs::read_dir(target).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(SourceError::Failed(format!(
                "{} exists and is not empty; restore into a new directory",
                target.display()
            )));
        }
        let m = reader.manifest().clone();
        let meta = read_meta(&m);
        std::fs::create_dir_all(target).map_err(SourceError::io(format!("creating {}", target.display())))?;
        let fmt = m.source.get("object_format").and_then(Value::as_str).unwrap_or("sha1");
        run(std::process::Command::new("git")
            .args(["init", "--bare", "--quiet", &format!("--object-format={fmt}")])
            .arg(target))
        .map_err(cmd_err)?;
        let scratch = target.join("coffer-restore.bundle");
        let mut bundles: Vec<&FileEntry> = m.files.iter().filter(|f| f.path.starts_with("bundles/")).collect();
        bundles.sort_by(|a, b| a.path.cmp(&b.path));
        for b in bundles {
            reader.restore_to_path(&b.path, &scratch).await?;
            run(git(target).args(["bundle", "unbundle"]).arg(&scratch)).map_err(cmd_err)?;
        }
        let _ = std::fs::remove_file(&scratch);
        let updates: String = meta.refs.iter().map(|(name, sha)| format!("create {name} {sha}\n")).collect();
        coffer_common::runtime::command::output_with_input(
            git(target).args(["update-ref", "--stdin"]),
            updates.as_bytes(),
        )
        .map_err(cmd_err)?;
        if meta.head.starts_with("refs/") {
            run(git(target).args(["symbolic-ref", "HEAD", &meta.head])).map_err(cmd_err)?;
        }
        Ok(())
    }

    async fn verify(&self, manifest: &Manifest, target: &Path) -> Result<VerifyReport, SourceError> {
        let meta = read_meta(manifest);
        let mut report = VerifyReport { ok: true, ..Default::default() };
        match run(git(target).args(["fsck", "--full", "--no-dangling", "--no-progress"])) {
            Ok(_) => report.checks.push("git fsck --full: no problems".into()),
            Err(e) => {
                report.ok = false;
                report.problems.push(format!("git fsck: {e}"));
            }
        }
        let refs = git::refs(target).map_err(cmd_err)?;
        if refs == meta.refs {
            report.checks.push(format!("{} refs identical to the snapshot", refs.len()));
        } else {
            report.ok = false;
            let diff: Vec<String> = meta
                .refs
                .iter()
                .filter(|(k, v)| refs.get(*k) != Some(v))
                .map(|(k, v)| {
                    format!("{k} should be {v} but is {}", refs.get(k).map(String::as_str).unwrap_or("missing"))
                })
                .chain(refs.keys().filter(|k| !meta.refs.contains_key(*k)).map(|k| format!("{k} should not exist")))
                .collect();
            report.problems.push(format!("refs differ: {}", diff.join(", ")));
        }
        let head = git::head(target).map_err(cmd_err)?;
        if meta.head.starts_with("refs/") && head != meta.head {
            report.ok = false;
            report.problems.push(format!("HEAD is {head}, the snapshot says {}", meta.head));
        } else {
            report.checks.push(format!("HEAD -> {}", meta.head));
        }
        Ok(report)
    }
}
