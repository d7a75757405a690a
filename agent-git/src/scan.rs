//! Refuses repositories whose history holds private key material that must live elsewhere
//! (the "SOPS keys are kept elsewhere" rule): age secret keys, PGP private key blocks, and
//! files that a `.sops.yaml` creation rule says must be encrypted but are committed in clear.
//!
//! Only objects new since the previous snapshot are scanned, so the cost follows the change,
//! not the history. SOPS `path_regex` values are matched (unanchored) against the
//! repository-relative path, as sops matches them against the path it is given.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Stdio;

use coffer_common::runtime::command::CommandError;
use memchr::memmem;
use regex::Regex;

use crate::git::{git, run};

/// Blobs larger than this are not read into memory for scanning (and are reported).
const MAX_SCAN_BLOB: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub blob: String,
    pub commit: String,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {} (commit {}, blob {})", self.what, self.path, self.commit, self.blob)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("reading objects from git: {0}")]
    Io(#[from] std::io::Error),
    #[error("git cat-file output is malformed: {0}")]
    Protocol(String),
}

const AGE_KEY: &[u8] = b"AGE-SECRET-KEY-1";
const PGP_KEY: &[u8] = b"-----BEGIN PGP PRIVATE KEY BLOCK-----";
/// Any of these means the file carries SOPS metadata, i.e. it is encrypted.
const SOPS_MARKERS: [&[u8]; 5] = [b"ENC[AES256_GCM,", b"\"sops\":", b"\nsops:", b"sops_version", b"sops_mac"];

/// Scans every blob reachable from any ref and not from `exclude` (object ids that the
/// previous snapshot already covered).
pub fn scan(dir: &Path, exclude: &[String]) -> Result<Vec<Finding>, ScanError> {
    let stdin: String = exclude.iter().map(|s| format!("^{s}\n")).collect();
    let listing = coffer_common::runtime::command::output_with_input(
        git(dir).args(["rev-list", "--objects", "--filter=object:type=blob", "--all", "--stdin"]),
        stdin.as_bytes(),
    )?;
    let mut paths: HashMap<String, String> = HashMap::new();
    let mut order = Vec::new();
    for line in String::from_utf8_lossy(&listing).lines() {
        if let Some((sha, path)) = line.split_once(' ')
            && !paths.contains_key(sha)
        {
            paths.insert(sha.to_string(), path.to_string());
            order.push(sha.to_string());
        }
    }
    if order.is_empty() {
        return Ok(Vec::new());
    }

    let mut rules = Vec::new();
    if let Ok(text) = run(git(dir).args(["show", "HEAD:.sops.yaml"])) {
        rules.extend(sops_rules(&text));
    }
    let sops_configs: Vec<&String> =
        order.iter().filter(|s| paths[*s].rsplit('/').next() == Some(".sops.yaml")).collect();
    for sha in sops_configs {
        if let Ok(text) = run(git(dir).args(["cat-file", "blob", sha])) {
            rules.extend(sops_rules(&text));
        }
    }

    let mut findings = Vec::new();
    for_each_blob(dir, &order, |sha, content| {
        let path = &paths[sha];
        let mut what = Vec::new();
        match content {
            None => tracing::warn!(path, blob = sha, "blob over {MAX_SCAN_BLOB} bytes not scanned for key material"),
            Some(c) => {
                if memmem::find(c, AGE_KEY).is_some() {
                    what.push("age secret key".to_string());
                }
                if memmem::find(c, PGP_KEY).is_some() {
                    what.push("PGP private key block".to_string());
                }
                if let Some(rule) = rules.iter().find(|r| r.is_match(path))
                    && !c.is_empty()
                    && !c.starts_with(b"sops:")
                    && !SOPS_MARKERS.iter().any(|m| memmem::find(c, m).is_some())
                {
                    what.push(format!(
                        "unencrypted file that .sops.yaml (path_regex {}) requires to be encrypted",
                        rule.as_str()
                    ));
                }
            }
        }
        for w in what {
            findings.push(Finding { path: path.clone(), blob: sha.to_string(), commit: String::new(), what: w });
        }
    })?;
    for f in &mut findings {
        let log = run(git(dir).args(["log", "--all", "--format=%H", &format!("--find-object={}", f.blob)]))?;
        f.commit = log.lines().last().unwrap_or("unknown").to_string();
    }
    Ok(findings)
}

/// `path_regex` values of a `.sops.yaml`'s creation rules (a line-level reading of the
/// documented format, which is all the rule needs).
pub fn sops_rules(text: &str) -> Vec<Regex> {
    text.lines()
        .filter_map(|l| l.trim_start().trim_start_matches("- ").trim_start().strip_prefix("path_regex:"))
        .map(|v| {
            let v = v.trim();
            match (
                v.strip_prefix('"').and_then(|v| v.strip_suffix('"')),
                v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')),
            ) {
                (Some(dq), _) => dq.replace("\\\\", "\\"),
                (None, Some(sq)) => sq.to_string(),
                (None, None) => v.to_string(),
            }
        })
        .filter_map(|v| match Regex::new(&v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(path_regex = v, "ignoring a .sops.yaml rule that does not compile: {e}");
                None
            }
        })
        .collect()
}

/// Streams blob contents through one `git cat-file --batch` process.
fn for_each_blob(dir: &Path, shas: &[String], mut f: impl FnMut(&str, Option<&[u8]>)) -> Result<(), ScanError> {
    let mut child = git(dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| CommandError::Spawn { program: "git".into(), source })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input: Vec<u8> = shas.iter().flat_map(|s| format!("{s}\n").into_bytes()).collect();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped stdout"));
    let mut header = String::new();
    let mut buf = Vec::new();
    for _ in shas {
        header.clear();
        out.read_line(&mut header)?;
        let mut parts = header.split_whitespace();
        let (Some(sha), Some(kind), Some(size)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ScanError::Protocol(header.trim().to_string()));
        };
        let size: u64 = size.parse().map_err(|_| ScanError::Protocol(header.trim().to_string()))?;
        if kind != "blob" || size > MAX_SCAN_BLOB {
            std::io::copy(&mut (&mut out).take(size + 1), &mut std::io::sink())?;
            if kind == "blob" {
                f(sha, None);
            }
            continue;
        }
        buf.clear();
        (&mut out).take(size + 1).read_to_end(&mut buf)?;
        buf.pop();
        f(sha, Some(&buf));
    }
    let _ = writer.join();
    let status = child.wait()?;
    if !status.success() {
        return Err(ScanError::Protocol(format!("git cat-file exited with {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_path_regexes_in_their_quoted_forms() {
        let rules = sops_rules(
            "creation_rules:\n  - path_regex: secrets/.*\\.yaml$\n    age: age1xyz\n  - path_regex: '.*\\.env'\n  - encrypted_regex: '^data$'\n    path_regex: \"prod/.*\"\n",
        );
        let r: Vec<&str> = rules.iter().map(|r| r.as_str()).collect();
        assert_eq!(r, vec!["secrets/.*\\.yaml$", ".*\\.env", "prod/.*"]);
        assert!(rules[0].is_match("clusters/a/secrets/db.yaml"));
    }
}
