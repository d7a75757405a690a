//! Development certificates: a CA, the coordinator's server certificate (localhost,
//! 127.0.0.1, ::1) and client certificates whose URI SAN carries the Coffer identity.
//! Production deployments bring their own CA (cert-manager, see `deploy/`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0:?} is not a valid name (lowercase letters, digits, - and _)")]
    BadName(String),
    #[error("{0} already exists; refusing to overwrite certificates")]
    Exists(String),
}

pub struct Issued {
    pub files: Vec<PathBuf>,
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.display().to_string(), source };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.display().to_string())
        } else {
            io(e)
        }
    })?;
    std::io::Write::write_all(&mut f, contents.as_bytes()).and_then(|_| f.sync_all()).map_err(io)
}

fn leaf(cn: &str) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Coffer");
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let now = time_now();
    p.not_before = now - rcgen_duration(3600);
    p.not_after = now + rcgen_duration(825 * 86_400);
    Ok(p)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_duration(secs: i64) -> time::Duration {
    time::Duration::seconds(secs)
}

/// Writes `ca.pem`, `coordinator.{pem,key}`, `agent-NAME.{pem,key}`, `admin-NAME.{pem,key}`
/// into `out` (the CA key as `ca.key`, for issuing more later).
pub fn init(out: &Path, agents: &[String], admins: &[String]) -> Result<Issued, CertError> {
    for n in agents.iter().chain(admins) {
        if !coffer_common::tls::is_valid_principal_name(n) {
            return Err(CertError::BadName(n.clone()));
        }
    }
    std::fs::create_dir_all(out).map_err(|source| CertError::Io { path: out.display().to_string(), source })?;
    let mut files = Vec::new();
    let mut put = |name: &str, contents: &str, private: bool| -> Result<(), CertError> {
        let p = out.join(name);
        write(&p, contents, private)?;
        files.push(p);
        Ok(())
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Coffer development CA");
    dn.push(DnType::OrganizationName, "Coffer");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = time_now() - rcgen_duration(3600);
    ca.not_after = time_now() + rcgen_duration(3650 * 86_400);
    let ca_cert = ca.self_signed(&ca_key)?;
    put("ca.pem", &ca_cert.pem(), false)?;
    put("ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = leaf("coffer-coordinator")?;
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        SanType::URI("spiffe://coffer/coordinator".try_into()?),
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    put("coordinator.pem", &server.signed_by(&key, &issuer)?.pem(), false)?;
    put("coordinator.key", &key.serialize_pem(), true)?;

    for (role, names) in [("agent", agents), ("admin", admins)] {
        for name in names {
            let mut p = leaf(&format!("{role}-{name}"))?;
            p.subject_alt_names = vec![SanType::URI(format!("spiffe://coffer/{role}/{name}").try_into()?)];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            put(&format!("{role}-{name}.pem"), &p.signed_by(&key, &issuer)?.pem(), false)?;
            put(&format!("{role}-{name}.key"), &key.serialize_pem(), true)?;
        }
    }
    Ok(Issued { files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_identities_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let issued = init(dir.path(), &["git-1".into()], &["ops".into()]).unwrap();
        assert_eq!(issued.files.len(), 8);
        let id = coffer_common::tls::identity_from_pem_file(&dir.path().join("agent-git-1.pem")).unwrap();
        assert_eq!(id.uri(), "spiffe://coffer/agent/git-1");
        let id = coffer_common::tls::identity_from_pem_file(&dir.path().join("admin-ops.pem")).unwrap();
        assert_eq!(id.uri(), "spiffe://coffer/admin/ops");
        assert!(matches!(init(dir.path(), &[], &[]), Err(CertError::Exists(_))));
        assert!(matches!(init(dir.path(), &["Bad Name".into()], &[]), Err(CertError::BadName(_))));
    }
}
