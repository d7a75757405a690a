//! Ed25519 signatures in the OpenSSH `SSHSIG` format, so operators verify with the stock
//! tool and no Coffer code:
//!
//! ```text
//! echo "agent-git-1 $(cat signing-key.pub)" > allowed_signers
//! ssh-keygen -Y verify -f allowed_signers -I agent-git-1 -n coffer-manifest \
//!     -s SNAPSHOT.manifest.sig < SNAPSHOT.manifest
//! ```

use std::fmt;

use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};
use zeroize::Zeroizing;

/// Namespace of manifest signatures (`ssh-keygen -n`).
pub const MANIFEST_NAMESPACE: &str = "coffer-manifest";
/// Namespace of exported artifacts' detached signatures.
pub const ARTIFACT_NAMESPACE: &str = "coffer-artifact";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("signing key {0:?} is not an OpenSSH Ed25519 public key")]
    BadKey(String),
    #[error("signature is not an armored SSH signature: {0}")]
    Malformed(String),
    #[error("signature does not verify against key {fingerprint} (namespace {namespace})")]
    Invalid { fingerprint: String, namespace: String },
}

pub struct Signer {
    key: PrivateKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.fingerprint())
    }
}

impl Signer {
    pub fn from_seed(seed: &Zeroizing<[u8; 32]>, comment: &str) -> Signer {
        let pair = ssh_key::private::Ed25519Keypair::from_seed(seed);
        let key = PrivateKey::new(ssh_key::private::KeypairData::Ed25519(pair), comment)
            .expect("an Ed25519 key pair is always a valid private key");
        Signer { key }
    }

    /// `ssh-ed25519 AAAA... comment`, the line an `allowed_signers` file takes.
    pub fn public_openssh(&self) -> String {
        self.key.public_key().to_openssh().expect("an Ed25519 public key always encodes")
    }

    pub fn fingerprint(&self) -> String {
        self.key.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    /// Armored detached signature (`-----BEGIN SSH SIGNATURE-----`).
    pub fn sign(&self, namespace: &str, msg: &[u8]) -> String {
        self.key
            .sign(namespace, HashAlg::Sha512, msg)
            .and_then(|s| s.to_pem(LineEnding::LF))
            .expect("Ed25519 signing of an in-memory message cannot fail")
    }
}

/// Parses an OpenSSH public key line and checks it is Ed25519.
pub fn parse_public_key(line: &str) -> Result<PublicKey, SignatureError> {
    let key = PublicKey::from_openssh(line.trim()).map_err(|_| SignatureError::BadKey(line.to_string()))?;
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        return Err(SignatureError::BadKey(line.to_string()));
    }
    Ok(key)
}

/// Two key lines name the same key (comments ignored).
pub fn same_key(a: &str, b: &str) -> bool {
    match (parse_public_key(a), parse_public_key(b)) {
        (Ok(a), Ok(b)) => a.key_data() == b.key_data(),
        _ => false,
    }
}

pub fn verify(public_key: &str, namespace: &str, msg: &[u8], armored: &str) -> Result<(), SignatureError> {
    let key = parse_public_key(public_key)?;
    let sig = SshSig::from_pem(armored.as_bytes()).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    key.verify(namespace, msg, &sig).map_err(|_| SignatureError::Invalid {
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        namespace: namespace.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(b: u8) -> Signer {
        Signer::from_seed(&Zeroizing::new([b; 32]), "test")
    }

    #[test]
    fn sign_and_verify() {
        let s = signer(1);
        let sig = s.sign(MANIFEST_NAMESPACE, b"manifest");
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----"));
        verify(&s.public_openssh(), MANIFEST_NAMESPACE, b"manifest", &sig).unwrap();
        assert!(verify(&s.public_openssh(), MANIFEST_NAMESPACE, b"manifesT", &sig).is_err());
        assert!(verify(&s.public_openssh(), ARTIFACT_NAMESPACE, b"manifest", &sig).is_err());
        let other = signer(2);
        let err = verify(&other.public_openssh(), MANIFEST_NAMESPACE, b"manifest", &sig).unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
        assert!(verify(&s.public_openssh(), MANIFEST_NAMESPACE, b"manifest", "garbage").is_err());
    }

    #[test]
    fn same_key_ignores_comment() {
        let a = signer(1).public_openssh();
        let b = a.replace(" test", " renamed");
        assert!(same_key(&a, &b));
        assert!(!same_key(&a, &signer(2).public_openssh()));
    }

    /// The format is the one OpenSSH's own tool verifies.
    #[test]
    fn stock_ssh_keygen_verifies() {
        if std::process::Command::new("ssh-keygen").arg("-?").output().is_err() {
            panic!("ssh-keygen is required for this test (Debian package openssh-client)");
        }
        let dir = tempfile::tempdir().unwrap();
        let s = signer(3);
        let msg = b"{\"format\":1}";
        std::fs::write(dir.path().join("m"), msg).unwrap();
        std::fs::write(dir.path().join("m.sig"), s.sign(MANIFEST_NAMESPACE, msg)).unwrap();
        std::fs::write(dir.path().join("allowed"), format!("agent-x {}\n", s.public_openssh())).unwrap();
        let run = |file: &str| {
            std::process::Command::new("ssh-keygen")
                .args(["-Y", "verify", "-f", "allowed", "-I", "agent-x", "-n", MANIFEST_NAMESPACE, "-s", "m.sig"])
                .current_dir(dir.path())
                .stdin(std::fs::File::open(dir.path().join(file)).unwrap())
                .output()
                .unwrap()
        };
        let ok = run("m");
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        std::fs::write(dir.path().join("m2"), b"{\"format\":2}").unwrap();
        assert!(!run("m2").status.success(), "a changed message must not verify");
    }
}
