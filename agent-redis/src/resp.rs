//! A minimal RESP2 client over one blocking TCP connection: enough for AUTH, INFO, PING and
//! the replication handshake. Replies are read with a buffered reader that the RDB payload
//! reader then continues from.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RespError {
    #[error("connecting to redis at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("redis connection: {0}")]
    Io(#[from] io::Error),
    #[error("redis replied with an error: {0}")]
    Server(String),
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
    #[error("{0}")]
    Url(String),
    #[error("redis TLS: {0}")]
    Tls(String),
}

/// TLS settings for `rediss://`: the CA that signed the server's certificate, and the
/// client certificate Redis asks for by default (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    fn config(&self) -> Result<Arc<rustls::ClientConfig>, RespError> {
        let ca = self.ca.as_ref().ok_or_else(|| {
            RespError::Tls(
                "rediss:// needs --redis-ca (the CA certificate that signed the server's certificate)".into(),
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| RespError::Tls(format!("{}: {e}", ca.display())))? {
            let c = c.map_err(|e| RespError::Tls(format!("{}: {e}", ca.display())))?;
            roots.add(c).map_err(|e| RespError::Tls(format!("{}: {e}", ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RespError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| RespError::Tls(format!("{}: {e}", cert.display())))?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| RespError::Tls(format!("{}: {e}", key.display())))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| RespError::Tls(e.to_string()))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(RespError::Tls("--redis-cert and --redis-key go together".into())),
        };
        Ok(Arc::new(config))
    }
}

/// A plain or TLS connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A parsed `redis://[user[:password]@]host[:port]` (or `rediss://` for TLS) URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `rediss://`: TLS with these files.
    pub tls: Option<TlsFiles>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(
            f,
            "{}://{}{}:{}",
            if self.tls.is_some() { "rediss" } else { "redis" },
            self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default(),
            self.host,
            self.port
        )
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, RespError> {
        let (rest, tls) = match (url.strip_prefix("redis://"), url.strip_prefix("rediss://")) {
            (Some(r), _) => (r, None),
            (_, Some(r)) => (r, Some(TlsFiles::default())),
            _ => return Err(RespError::Url(format!("{url:?} is not a redis:// or rediss:// URL"))),
        };
        let rest = rest.split('/').next().unwrap_or_default();
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
            None => (None, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| RespError::Url(format!("bad port in {url:?}")))?),
            None => (hostport.to_string(), 6379),
        };
        if host.is_empty() {
            return Err(RespError::Url(format!("no host in {url:?}")));
        }
        Ok(RedisUrl { host, port, user, password, tls })
    }

    /// The same server with another host and port (a throwaway server: plain TCP).
    pub fn plain(host: &str, port: u16) -> RedisUrl {
        RedisUrl { host: host.to_string(), port, user: None, password: None, tls: None }
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Reply::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }
}

pub struct Conn {
    /// Replies are read through this buffer; commands are written to the stream under it.
    pub reader: BufReader<Stream>,
}

impl Conn {
    /// Connects and authenticates (AUTH with user for ACL users, password only otherwise).
    pub fn open(url: &RedisUrl, timeout: Duration) -> Result<Conn, RespError> {
        let addr = url.addr();
        let tcp = TcpStream::connect(&addr).map_err(|source| RespError::Connect { addr: addr.clone(), source })?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let stream = match &url.tls {
            None => Stream::Plain(tcp),
            Some(files) => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| RespError::Tls(format!("server name {:?}: {e}", url.host)))?;
                let conn =
                    rustls::ClientConnection::new(files.config()?, name).map_err(|e| RespError::Tls(e.to_string()))?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                // Handshake now, so a certificate problem is reported as such.
                while s.conn.is_handshaking() {
                    s.conn
                        .complete_io(&mut s.sock)
                        .map_err(|e| RespError::Tls(format!("handshake with {addr}: {e}")))?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        let mut c = Conn { reader: BufReader::with_capacity(1 << 20, stream) };
        if let Some(p) = &url.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(u) = &url.user {
                args.push(u.as_bytes());
            }
            args.push(p.as_bytes());
            c.call(&args)?;
        }
        Ok(c)
    }

    pub fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&buf)?;
        self.reader.get_mut().flush()?;
        Ok(())
    }

    pub fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RespError> {
        self.send(args)?;
        self.read_reply()
    }

    pub fn line(&mut self) -> Result<String, RespError> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(RespError::Protocol("connection closed".into()));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn read_reply(&mut self) -> Result<Reply, RespError> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Err(RespError::Server(rest.to_string())),
            ":" => rest.parse().map(Reply::Int).map_err(|_| RespError::Protocol(line.clone())),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| RespError::Protocol(line.clone()))?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut b = vec![0u8; n as usize + 2];
                self.reader.read_exact(&mut b)?;
                b.truncate(n as usize);
                Ok(Reply::Bulk(Some(b)))
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| RespError::Protocol(line.clone()))?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                (0..n).map(|_| self.read_reply()).collect::<Result<Vec<_>, _>>().map(|v| Reply::Array(Some(v)))
            }
            _ => Err(RespError::Protocol(format!("{line:?}"))),
        }
    }

    /// `INFO` as key/value pairs.
    pub fn info(&mut self) -> Result<Vec<(String, String)>, RespError> {
        let text = self.call(&[b"INFO", b"everything"])?.text().unwrap_or_default();
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }
}

/// Per-db key counts from INFO's keyspace section (`db0:keys=3,expires=0,avg_ttl=0`).
pub fn keyspace(info: &[(String, String)]) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = info
        .iter()
        .filter_map(|(k, v)| {
            let db = k.strip_prefix("db")?.parse().ok()?;
            let keys = v.split(',').find_map(|kv| kv.strip_prefix("keys="))?.parse().ok()?;
            Some((db, keys))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://backup:s3cret@127.0.0.1:6380").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user.as_deref(), u.password.as_deref()),
            ("127.0.0.1", 6380, Some("backup"), Some("s3cret"))
        );
        assert!(!format!("{u:?}").contains("s3cret"));
        let u = RedisUrl::parse("redis://:pw@cache").unwrap();
        assert_eq!((u.port, u.user, u.password.as_deref()), (6379, None, Some("pw")));
        assert!(RedisUrl::parse("http://x").is_err());
        let t = RedisUrl::parse("rediss://:pw@cache.svc:6380").unwrap();
        assert!(t.tls.is_some() && t.port == 6380);
        assert_eq!(format!("{t:?}"), "rediss://cache.svc:6380", "no password in debug output");
    }

    #[test]
    fn keyspace_counts() {
        let info = vec![
            ("db0".to_string(), "keys=10,expires=1,avg_ttl=0".to_string()),
            ("db3".to_string(), "keys=2,expires=0,avg_ttl=0".to_string()),
            ("used_memory".to_string(), "1000".to_string()),
        ];
        assert_eq!(keyspace(&info), vec![(0, 10), (3, 2)]);
    }
}
