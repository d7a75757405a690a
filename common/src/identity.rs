//! The agent's identity file: a standard age identity (`AGE-SECRET-KEY-1...`), so the stock
//! `age -d -i FILE` opens keyrings wrapped to this agent. The agent's Ed25519 manifest-signing
//! key is derived from the same secret, so one file (one Kubernetes Secret) carries both.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use zeroize::Zeroizing;

use crate::signing::Signer;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("identity file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("identity file {path} holds no age X25519 identity (AGE-SECRET-KEY-1...)")]
    Invalid { path: String },
}

pub struct AgentIdentity {
    age: age::x25519::Identity,
    signer: Signer,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentIdentity({})", self.recipient())
    }
}

impl AgentIdentity {
    pub fn from_age(age: age::x25519::Identity, comment: &str) -> AgentIdentity {
        let secret = age.to_string();
        let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, secret.expose_secret().as_bytes());
        let mut seed = Zeroizing::new([0u8; 32]);
        prk.expand(&[b"coffer-signing-v1"], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(seed.as_mut()))
            .expect("32 bytes is a valid HKDF length");
        let signer = Signer::from_seed(&seed, comment);
        AgentIdentity { age, signer }
    }

    pub fn generate(comment: &str) -> AgentIdentity {
        AgentIdentity::from_age(age::x25519::Identity::generate(), comment)
    }

    /// Loads the identity, or creates it (mode 0600) if the file does not exist.
    /// Returns whether it was created.
    pub fn load_or_create(path: &Path, comment: &str) -> Result<(AgentIdentity, bool), IdentityError> {
        let io = |source| IdentityError::Io { path: path.display().to_string(), source };
        match fs::read_to_string(path) {
            Ok(text) => Ok((
                Self::parse(&text, comment)
                    .ok_or_else(|| IdentityError::Invalid { path: path.display().to_string() })?,
                false,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = AgentIdentity::generate(comment);
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir).map_err(io)?;
                }
                let mut f = open_private(path).map_err(io)?;
                let text = format!(
                    "# Coffer agent identity ({comment}); keep secret, keep a copy offline.\n# created: {}\n# public key: {}\n{}\n",
                    crate::time::rfc3339(crate::time::now()),
                    id.recipient(),
                    id.age.to_string().expose_secret()
                );
                f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
                Ok((id, true))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn parse(text: &str, comment: &str) -> Option<AgentIdentity> {
        let line = text.lines().map(str::trim).find(|l| l.starts_with("AGE-SECRET-KEY-1"))?;
        let age = age::x25519::Identity::from_str(line).ok()?;
        Some(AgentIdentity::from_age(age, comment))
    }

    pub fn recipient(&self) -> String {
        self.age.to_public().to_string()
    }

    pub fn age(&self) -> &age::x25519::Identity {
        &self.age
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }
}

fn open_private(path: &Path) -> std::io::Result<fs::File> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// Warns (returns a message) when a secret file is readable by group or others.
pub fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return Some(format!("{} is readable by others (mode {:o}); chmod 600 it", path.display(), mode & 0o777));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_mode_and_stable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.txt");
        let (a, created) = AgentIdentity::load_or_create(&path, "t").unwrap();
        assert!(created);
        let (b, created) = AgentIdentity::load_or_create(&path, "t").unwrap();
        assert!(!created);
        assert_eq!(a.recipient(), b.recipient());
        assert_eq!(a.signer().public_openssh(), b.signer().public_openssh());
        assert!(permission_warning(&path).is_none());
        assert!(std::fs::read_to_string(&path).unwrap().contains(&a.recipient()));
    }

    #[test]
    fn garbage_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        std::fs::write(&path, "hello").unwrap();
        assert!(matches!(AgentIdentity::load_or_create(&path, "t"), Err(IdentityError::Invalid { .. })));
    }
}
