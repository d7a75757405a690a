//! An asset's keyring: the chunk-id key and the data key, created by the asset's first agent
//! and stored in the repository only as an age envelope wrapped to the agent's recipient and
//! every offline recovery recipient. In an emergency the stock tool opens it:
//!
//! ```text
//! age -d -i recovery-identity.txt keyrings/git/gitops.age
//! ```
//!
//! which prints the keyring as JSON (`format`, `asset`, `id_key`, `data_key`, hex).

use std::io::{Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{ChunkCipher, SecretKey};

pub const KEYRING_FORMAT: u32 = 1;
/// Upper bound on an envelope: a keyring is tiny; this bounds what a peer can make us parse.
pub const MAX_ENVELOPE_SIZE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    #[error("recipient {0:?} is not an age X25519 recipient (age1...)")]
    BadRecipient(String),
    #[error("no recipients to wrap the keyring to")]
    NoRecipients,
    #[error("keyring envelope cannot be opened with this identity: {0}")]
    Unwrap(String),
    #[error("keyring envelope is malformed: {0}")]
    Malformed(String),
    #[error("keyring belongs to asset {found:?}, expected {expected:?}")]
    WrongAsset { expected: String, found: String },
}

#[derive(Debug)]
pub struct Keyring {
    pub asset: String,
    pub id_key: SecretKey,
    pub data_key: SecretKey,
}

/// The plaintext form; its hex key strings are wiped when it is dropped.
#[derive(Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct Stored {
    format: u32,
    asset: String,
    id_key: String,
    data_key: String,
}

impl Keyring {
    pub fn generate(asset: &str) -> Keyring {
        Keyring { asset: asset.to_string(), id_key: SecretKey::generate(), data_key: SecretKey::generate() }
    }

    pub fn cipher(&self) -> ChunkCipher {
        ChunkCipher::new(&self.id_key, &self.data_key)
    }

    /// Seed of the chunker's gear table, derived from the id key (secret, stable per asset).
    pub fn chunker_seed(&self) -> u64 {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.id_key.expose());
        let tag = ring::hmac::sign(&k, b"coffer-chunker-seed-v1");
        u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"))
    }

    pub fn wrap(&self, recipients: &[String]) -> Result<Vec<u8>, KeyringError> {
        let parsed = recipients
            .iter()
            .map(|r| age::x25519::Recipient::from_str(r.trim()).map_err(|_| KeyringError::BadRecipient(r.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err(KeyringError::NoRecipients);
        }
        let plain = Zeroizing::new(
            serde_json::to_vec(&Stored {
                format: KEYRING_FORMAT,
                asset: self.asset.clone(),
                id_key: hex::encode(self.id_key.expose()),
                data_key: hex::encode(self.data_key.expose()),
            })
            .expect("keyring serializes"),
        );
        let enc = age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| KeyringError::Malformed(e.to_string()))?;
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).map_err(|e| KeyringError::Malformed(e.to_string()))?;
        w.write_all(&plain).and_then(|_| w.finish().map(|_| ())).map_err(|e| KeyringError::Malformed(e.to_string()))?;
        Ok(out)
    }

    pub fn unwrap(envelope: &[u8], identity: &age::x25519::Identity, asset: &str) -> Result<Keyring, KeyringError> {
        if envelope.len() > MAX_ENVELOPE_SIZE {
            return Err(KeyringError::Malformed(format!("{} bytes is over the limit", envelope.len())));
        }
        let dec = age::Decryptor::new_buffered(envelope).map_err(|e| KeyringError::Malformed(e.to_string()))?;
        let mut r = dec
            .decrypt(std::iter::once(identity as &dyn age::Identity))
            .map_err(|e| KeyringError::Unwrap(e.to_string()))?;
        let mut plain = Zeroizing::new(Vec::new());
        r.read_to_end(&mut plain).map_err(|e| KeyringError::Malformed(e.to_string()))?;
        let stored: Stored = serde_json::from_slice(&plain).map_err(|e| KeyringError::Malformed(e.to_string()))?;
        if stored.format != KEYRING_FORMAT {
            return Err(KeyringError::Malformed(format!("unsupported keyring format {}", stored.format)));
        }
        if stored.asset != asset {
            return Err(KeyringError::WrongAsset { expected: asset.to_string(), found: stored.asset.clone() });
        }
        let key = |h: &str| -> Result<SecretKey, KeyringError> {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h, &mut b).map_err(|_| KeyringError::Malformed("key is not 64 hex digits".into()))?;
            Ok(SecretKey::from_bytes(b))
        };
        let (id_key, data_key) = (key(&stored.id_key)?, key(&stored.data_key)?);
        Ok(Keyring { asset: stored.asset.clone(), id_key, data_key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_to_every_recipient_and_checks_asset() {
        let agent = age::x25519::Identity::generate();
        let recovery = age::x25519::Identity::generate();
        let stranger = age::x25519::Identity::generate();
        let k = Keyring::generate("git/a");
        let env = k.wrap(&[agent.to_public().to_string(), recovery.to_public().to_string()]).unwrap();
        for id in [&agent, &recovery] {
            let back = Keyring::unwrap(&env, id, "git/a").unwrap();
            assert_eq!(back.id_key, k.id_key);
            assert_eq!(back.data_key, k.data_key);
            assert_eq!(back.chunker_seed(), k.chunker_seed());
        }
        assert!(matches!(Keyring::unwrap(&env, &stranger, "git/a"), Err(KeyringError::Unwrap(_))));
        assert!(matches!(Keyring::unwrap(&env, &agent, "git/b"), Err(KeyringError::WrongAsset { .. })));
        assert!(matches!(k.wrap(&["nope".into()]), Err(KeyringError::BadRecipient(_))));
        assert!(matches!(k.wrap(&[]), Err(KeyringError::NoRecipients)));
    }

    /// The envelope is a plain age file: the stock `age` tool opens it with a recovery identity.
    #[test]
    fn stock_age_tool_unwraps() {
        let Ok(out) = std::process::Command::new("age").arg("--version").output() else {
            panic!("the age tool is required for this test (Debian package age)");
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let recovery = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        std::fs::write(dir.path().join("id.txt"), format!("{}\n", recovery.to_string().expose_secret())).unwrap();
        let k = Keyring::generate("git/a");
        std::fs::write(dir.path().join("k.age"), k.wrap(&[recovery.to_public().to_string()]).unwrap()).unwrap();
        let out = std::process::Command::new("age")
            .args(["-d", "-i", "id.txt", "k.age"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["asset"], "git/a");
        assert_eq!(v["data_key"], hex::encode(k.data_key.expose()));
    }
}
