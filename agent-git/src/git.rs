//! Thin wrappers over the `git` command: every call checks the exit status and reports stderr.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use coffer_common::runtime::command::{self, CommandError};

pub fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(dir).env("GIT_TERMINAL_PROMPT", "0").env("LC_ALL", "C");
    c
}

pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    Ok(String::from_utf8_lossy(&command::output(cmd)?).into_owned())
}

/// `refname -> object id` of every ref.
pub fn refs(dir: &Path) -> Result<BTreeMap<String, String>, CommandError> {
    let out = run(git(dir).args(["for-each-ref", "--format=%(objectname) %(refname)"]))?;
    Ok(out.lines().filter_map(|l| l.split_once(' ')).map(|(sha, name)| (name.to_string(), sha.to_string())).collect())
}

/// Target of HEAD: a ref name when symbolic, else an object id (or empty when unborn).
pub fn head(dir: &Path) -> Result<String, CommandError> {
    match run(git(dir).args(["symbolic-ref", "-q", "HEAD"])) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(_) => Ok(run(git(dir).args(["rev-parse", "-q", "--verify", "HEAD"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()),
    }
}

pub fn object_exists(dir: &Path, sha: &str) -> bool {
    git(dir).args(["cat-file", "-e", sha]).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

pub fn object_format(dir: &Path) -> String {
    run(git(dir).args(["rev-parse", "--show-object-format"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "sha1".into())
}

pub fn version() -> String {
    run(Command::new("git").arg("--version")).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Removes credentials from a URL before it is logged or recorded.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) if !userinfo.contains('/') => format!("{scheme}://{host}"),
            _ => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact_url("https://user:token@example.com/r.git"), "https://example.com/r.git");
        assert_eq!(redact_url("https://example.com/r.git"), "https://example.com/r.git");
        assert_eq!(redact_url("/srv/repo"), "/srv/repo");
        assert_eq!(redact_url("git://host/a@b"), "git://host/a@b");
    }
}
