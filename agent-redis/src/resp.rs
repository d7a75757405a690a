//! A minimal RESP2 client over one blocking TCP connection: enough for AUTH, INFO, PING and
//! the replication handshake. Replies are read with a buffered reader that the RDB payload
//! reader then continues from.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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
}

/// A parsed `redis://[user[:password]@]host[:port]` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(
            f,
            "redis://{}{}:{}",
            self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default(),
            self.host,
            self.port
        )
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, RespError> {
        if url.starts_with("rediss://") {
            return Err(RespError::Url(
                "rediss:// (TLS) is not supported yet; use redis:// on a trusted network".into(),
            ));
        }
        let rest =
            url.strip_prefix("redis://").ok_or_else(|| RespError::Url(format!("{url:?} is not a redis:// URL")))?;
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
        Ok(RedisUrl { host, port, user, password })
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
    pub reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects and authenticates (AUTH with user for ACL users, password only otherwise).
    pub fn open(url: &RedisUrl, timeout: Duration) -> Result<Conn, RespError> {
        let addr = url.addr();
        let stream = TcpStream::connect(&addr).map_err(|source| RespError::Connect { addr: addr.clone(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut c = Conn { reader: BufReader::with_capacity(1 << 20, stream), writer };
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
        self.writer.write_all(&buf)?;
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
        assert!(RedisUrl::parse("rediss://x").unwrap_err().to_string().contains("TLS"));
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
