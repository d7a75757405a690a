//! The database session: connecting, server facts, the non-exclusive backup API, and the
//! heartbeat the drill uses to prove the recovery point it reached.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("connecting to PostgreSQL ({conn}): {source}")]
    Connect { conn: String, source: tokio_postgres::Error },
    #[error("{what}: {source}")]
    Query { what: &'static str, source: tokio_postgres::Error },
    #[error("{0}")]
    Unsupported(String),
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Query { what, source }
}

/// Facts about the server a base backup records.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub version_num: i32,
    pub system_identifier: String,
    pub data_directory: String,
    pub archive_mode: String,
    pub wal_segment_size: u64,
    pub block_size: u32,
    pub in_recovery: bool,
}

/// An open session. The connection task runs until the client is dropped.
pub struct Session {
    pub client: Client,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// Connects with a libpq-style connection string (`host=/run/postgresql user=postgres`) or
/// URL. TLS is not used: the agent runs beside the server (socket or loopback).
pub async fn connect(conn: &str) -> Result<Session, PgError> {
    let config: tokio_postgres::Config =
        conn.parse().map_err(|source| PgError::Connect { conn: redact(conn), source })?;
    let mut config = config;
    if config.get_application_name().is_none() {
        config.application_name("coffer-agent-postgres");
    }
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) =
        config.connect(NoTls).await.map_err(|source| PgError::Connect { conn: redact(conn), source })?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(Session { client, conn_task })
}

/// The connection string without a password, for messages.
pub fn redact(conn: &str) -> String {
    if let Some(i) = conn.find("password=") {
        let end = conn[i..].find(' ').map(|e| i + e).unwrap_or(conn.len());
        return format!("{}password=***{}", &conn[..i], &conn[end..]);
    }
    if conn.contains("://")
        && let (Some(at), Some(scheme)) = (conn.find('@'), conn.find("://"))
        && let Some(colon) = conn[scheme + 3..at].find(':')
    {
        return format!("{}:***{}", &conn[..scheme + 3 + colon], &conn[at..]);
    }
    conn.to_string()
}

fn parse_size_setting(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

impl Session {
    pub async fn info(&self) -> Result<ServerInfo, PgError> {
        let c = &self.client;
        let row = c
            .query_one(
                "SELECT current_setting('server_version'), current_setting('server_version_num')::int,
                        (SELECT system_identifier::text FROM pg_control_system()),
                        current_setting('data_directory'), current_setting('archive_mode'),
                        current_setting('wal_segment_size'), current_setting('block_size')::int,
                        pg_is_in_recovery()",
                &[],
            )
            .await
            .map_err(q("reading server settings (the backup role needs pg_read_all_settings or superuser)"))?;
        let seg: String = row.get(5);
        let version_num: i32 = row.get(1);
        if version_num < 100_000 {
            return Err(PgError::Unsupported(format!(
                "PostgreSQL {} is not supported (10 or newer)",
                row.get::<_, String>(0)
            )));
        }
        Ok(ServerInfo {
            version: row.get(0),
            version_num,
            system_identifier: row.get(2),
            data_directory: row.get(3),
            archive_mode: row.get(4),
            wal_segment_size: parse_size_setting(&seg)
                .ok_or_else(|| PgError::Unsupported(format!("wal_segment_size {seg:?} is not understood")))?,
            block_size: row.get::<_, i32>(6) as u32,
            in_recovery: row.get(7),
        })
    }

    /// `pg_backup_start` (15+) or `pg_start_backup(..., exclusive => false)`: returns the
    /// start LSN and the timeline of the checkpoint it made.
    pub async fn backup_start(&self, info: &ServerInfo, label: &str, fast: bool) -> Result<(String, u32), PgError> {
        let sql = if info.version_num >= 150_000 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let lsn: String = self.client.query_one(sql, &[&label, &fast]).await.map_err(q("starting the backup"))?.get(0);
        let tl: i32 = self
            .client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .map_err(q("reading the checkpoint timeline"))?
            .get(0);
        Ok((lsn, tl as u32))
    }

    /// `pg_backup_stop(false)` (15+) or `pg_stop_backup(false, false)`: ends the backup and
    /// switches WAL segments, without waiting for the archiver (PostgreSQL polls for that
    /// once a second, which cost up to a second per backup; the caller polls the archive
    /// instead). Returns the stop LSN, the backup label and the tablespace map.
    pub async fn backup_stop(&self, info: &ServerInfo) -> Result<(String, String, String), PgError> {
        let sql = if info.version_num >= 150_000 {
            "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_stop_backup(false, false)"
        };
        let row = self.client.query_one(sql, &[]).await.map_err(q("stopping the backup"))?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Tablespaces other than the built-in ones: (oid, location).
    pub async fn tablespaces(&self) -> Result<Vec<(String, String)>, PgError> {
        let rows = self
            .client
            .query("SELECT oid::text, pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')", &[])
            .await
            .map_err(q("listing tablespaces"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Writes the heartbeat row (creating its table on first use): the newest heartbeat a
    /// restored database holds shows the point it was recovered to.
    pub async fn heartbeat(&self) -> Result<(), PgError> {
        self.client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS coffer;
                 CREATE TABLE IF NOT EXISTS coffer.heartbeat (id int PRIMARY KEY, at timestamptz NOT NULL);
                 INSERT INTO coffer.heartbeat VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now();",
            )
            .await
            .map_err(q("writing the heartbeat"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_redaction() {
        assert_eq!(parse_size_setting("16MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_size_setting("8kB"), Some(8192));
        assert_eq!(parse_size_setting("lots"), None);
        assert_eq!(redact("host=/tmp password=hunter2 user=x"), "host=/tmp password=*** user=x");
        assert_eq!(redact("postgres://u:hunter2@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("host=/tmp"), "host=/tmp");
    }
}
