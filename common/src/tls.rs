//! Identities carried by mTLS certificates, and the client side of the TLS setup.
//!
//! An identity is the URI SAN of the client certificate: `spiffe://coffer/agent/<name>` for
//! agents and `spiffe://coffer/admin/<name>` for operators.

use std::fmt;
use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const SPIFFE_PREFIX: &str = "spiffe://coffer/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl PeerIdentity {
    pub fn parse_uri(uri: &str) -> Option<PeerIdentity> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
        let (role, name) = rest.split_once('/')?;
        let role = match role {
            "agent" => Role::Agent,
            "admin" => Role::Admin,
            _ => return None,
        };
        is_valid_principal_name(name).then(|| PeerIdentity { role, name: name.to_string() })
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Agent => "agent",
            Role::Admin => "admin",
        };
        write!(f, "{SPIFFE_PREFIX}{role}/{}", self.name)
    }
}

/// Names of agents and admins: what may follow `agent/` or `admin/` and appear in file names.
pub fn is_valid_principal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no Coffer identity (URI SAN spiffe://coffer/agent/NAME or spiffe://coffer/admin/NAME)")]
    NoIdentity,
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("coordinator address {0:?} is not a valid https URL")]
    BadUrl(String),
    #[error("cannot connect to the coordinator at {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
}

/// Extracts the Coffer identity from a DER certificate.
pub fn identity_from_cert(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let Some(san) = san else { return Err(TlsError::NoIdentity) };
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => PeerIdentity::parse_uri(u),
            _ => None,
        })
        .ok_or(TlsError::NoIdentity)
}

/// Identity in a PEM certificate file (first certificate).
pub fn identity_from_pem_file(path: &Path) -> Result<PeerIdentity, TlsError> {
    let pem = read(path)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    identity_from_cert(&pem.contents)
}

pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

/// Files a client needs to reach the coordinator over mTLS.
#[derive(Debug, Clone)]
pub struct ClientTls<'a> {
    pub url: &'a str,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Largest message a client accepts or sends; the coordinator sets the same limit.
pub const MAX_MESSAGE_SIZE: usize = 72 << 20;

impl ClientTls<'_> {
    /// A lazily-connecting channel: the first call dials, failures surface per call.
    pub fn channel(&self) -> Result<Channel, TlsError> {
        if let Some(warning) = crate::identity::permission_warning(self.key) {
            tracing::warn!("{warning}");
        }
        let host = host_of(self.url).ok_or_else(|| TlsError::BadUrl(self.url.to_string()))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.ca)?))
            .identity(Identity::from_pem(read(self.cert)?, read(self.key)?))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(self.url.to_string())
            .map_err(|_| TlsError::BadUrl(self.url.to_string()))?
            .tls_config(tls)
            .map_err(|source| TlsError::Connect { url: self.url.to_string(), source })?
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        Ok(endpoint.connect_lazy())
    }
}

/// Host of an `https://host[:port][/...]` URL; IPv6 literals come without brackets.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => rest.split(['/', ':']).next()?,
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(host_of("https://127.0.0.1:7443"), Some("127.0.0.1"));
        assert_eq!(host_of("https://[::1]:7443/x"), Some("::1"));
        assert_eq!(host_of("https://coffer.example"), Some("coffer.example"));
        assert_eq!(host_of("http://x"), None);
        assert_eq!(host_of("https://:1"), None);
    }

    #[test]
    fn parses_spiffe_ids() {
        let a = PeerIdentity::parse_uri("spiffe://coffer/agent/git-1").unwrap();
        assert_eq!(a, PeerIdentity { role: Role::Agent, name: "git-1".into() });
        assert_eq!(a.uri(), "spiffe://coffer/agent/git-1");
        assert_eq!(PeerIdentity::parse_uri("spiffe://coffer/admin/ops").unwrap().role, Role::Admin);
        assert!(PeerIdentity::parse_uri("spiffe://other/agent/x").is_none());
        assert!(PeerIdentity::parse_uri("spiffe://coffer/root/x").is_none());
        assert!(PeerIdentity::parse_uri("spiffe://coffer/agent/../x").is_none());
        assert!(PeerIdentity::parse_uri("spiffe://coffer/agent/").is_none());
    }
}
