//! The local socket between `wal-push` and the `run` daemon (`--wal-socket PATH`).
//!
//! PostgreSQL starts `archive_command` once per WAL file. Without the daemon every call is
//! a new process that opens its own mutual-TLS connection, registers and unwraps the
//! asset's keyring before it can upload 16 MiB. With `--wal-socket`, `run` listens on a
//! Unix socket and keeps one connection open; `wal-push` sends it the file's path and
//! waits for the daemon's answer, which comes only after the coordinator committed the file
//! (the same guarantee as pushing directly). When no daemon answers (not running, socket
//! missing, the daemon died mid-request, or it refused this caller), `wal-push` archives
//! the file itself: the socket makes archiving cheaper, never a new way for it to stop.
//!
//! One JSON line each way. Only the daemon's own user (and root) may use the socket: the
//! socket file is mode 0600 and each caller's uid is checked, since a caller can make the
//! daemon archive any file it names into the asset's WAL stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coffer_common::runtime::SourceError;
use coffer_common::runtime::cli::{AgentArgs, AgentContext};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::walpush::{self, PushOutcome};

/// Longest request or reply line accepted.
const MAX_LINE: u64 = 64 << 10;
/// How long the daemon waits for a caller's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `wal-push` waits to reach the daemon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `wal-push` waits for the daemon's answer before archiving the file itself (a
/// 16 MiB segment takes well under a second; a wedged daemon must not stop archiving).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    /// Absolute path of the WAL file.
    path: PathBuf,
    /// Other `.ready` files to archive in the same commit.
    ahead: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    ok: bool,
    #[serde(default)]
    pushed: Vec<String>,
    #[serde(default)]
    already: Vec<String>,
    /// Why the push failed (when not `ok`).
    #[serde(default)]
    error: String,
    /// The daemon did not try (this caller may not use it): archive directly.
    #[serde(default)]
    refused: bool,
}

impl Reply {
    /// The daemon did not try: the caller archives directly.
    fn refused(error: String) -> Reply {
        Reply { refused: true, error, ..Default::default() }
    }
}

/// What became of a hand-off to the daemon.
pub enum HandOff {
    /// Archived by the daemon.
    Done(PushOutcome),
    /// The daemon tried and failed (coordinator down, content conflict): the same as a
    /// failed direct push.
    Failed(String),
    /// No daemon took the request: archive directly.
    Unavailable(String),
}

/// Asks the daemon listening on `socket` to archive `path` (and `ahead` ready files).
pub async fn hand_off(socket: &Path, path: &Path, ahead: usize) -> HandOff {
    let unavailable = |why: String| HandOff::Unavailable(format!("{}: {why}", socket.display()));
    let path = match std::path::absolute(path) {
        Ok(p) => p,
        Err(e) => return unavailable(format!("resolving {}: {e}", path.display())),
    };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return unavailable(e.to_string()),
        Err(_) => return unavailable("timed out connecting".into()),
    };
    let mut line = serde_json::to_string(&Request { path, ahead }).expect("request serializes");
    line.push('\n');
    let exchange = async {
        let (read, mut write) = stream.into_split();
        // A daemon that refuses the caller answers without reading: its answer still counts.
        let sent = match write.write_all(line.as_bytes()).await {
            Ok(()) => write.shutdown().await,
            Err(e) => Err(e),
        };
        (sent, read_line(read).await)
    };
    let reply = match tokio::time::timeout(REPLY_TIMEOUT, exchange).await {
        Ok((_, Ok(Some(l)))) => l,
        Ok((Err(e), _)) | Ok((_, Err(e))) => return unavailable(e.to_string()),
        Ok((Ok(()), Ok(None))) => return unavailable("the daemon closed the connection without an answer".into()),
        Err(_) => return unavailable(format!("no answer within {} s", REPLY_TIMEOUT.as_secs())),
    };
    match serde_json::from_str::<Reply>(&reply) {
        Ok(r) if r.ok => HandOff::Done(PushOutcome { pushed: r.pushed, already: r.already }),
        Ok(r) if r.refused => unavailable(r.error),
        Ok(r) => HandOff::Failed(r.error),
        Err(e) => unavailable(format!("unreadable answer: {e}")),
    }
}

/// One line (without its newline) of at most [`MAX_LINE`] bytes; None at a clean end.
async fn read_line(r: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Option<String>> {
    let mut buf = String::new();
    let n = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE)).read_line(&mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with('\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long or cut short"));
    }
    buf.pop();
    Ok(Some(buf))
}

/// Binds `socket` for the daemon: a stale socket file left by a daemon that died is
/// replaced; a live one (another daemon) or any other file there is an error.
/// Returns the listener and the daemon's uid (the socket's owner).
pub async fn bind(socket: &Path) -> Result<(UnixListener, u32), SourceError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            return Err(SourceError::Failed(format!("--wal-socket {}: exists and is not a socket", socket.display())));
        }
        if UnixStream::connect(socket).await.is_ok() {
            return Err(SourceError::Failed(format!(
                "--wal-socket {}: another agent daemon is listening there",
                socket.display()
            )));
        }
        std::fs::remove_file(socket).map_err(SourceError::io(format!("removing stale {}", socket.display())))?;
    }
    let listener = UnixListener::bind(socket).map_err(SourceError::io(format!("binding {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(SourceError::io(format!("restricting {}", socket.display())))?;
    let uid =
        std::fs::symlink_metadata(socket).map_err(SourceError::io(format!("inspecting {}", socket.display())))?.uid();
    Ok((listener, uid))
}

/// Serves wal-push requests on `listener` until the task is dropped, over one coordinator
/// connection made on the first request (and again after a failed push).
pub async fn serve(listener: UnixListener, own_uid: u32, args: AgentArgs) {
    let ctx: Arc<tokio::sync::Mutex<Option<AgentContext>>> = Arc::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("WAL socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (ctx, args) = (ctx.clone(), args.clone());
        tokio::spawn(async move {
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let (read, mut write) = stream.into_split();
            let reply = if uid != Some(own_uid) && uid != Some(0) {
                tracing::warn!(?uid, own_uid, "WAL socket: refused a caller running as another user");
                Reply::refused(format!("the daemon serves only its own user (uid {own_uid}); the caller is {uid:?}"))
            } else {
                match tokio::time::timeout(REQUEST_TIMEOUT, read_line(read)).await {
                    Ok(Ok(Some(line))) => match serde_json::from_str::<Request>(&line) {
                        Ok(req) => push(&ctx, &args, req).await,
                        Err(e) => Reply::refused(format!("bad request: {e}")),
                    },
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => Reply::refused(format!("bad request: {e}")),
                    Err(_) => Reply::refused("no request within 10 s".into()),
                }
            };
            let mut line = serde_json::to_string(&reply).expect("reply serializes");
            line.push('\n');
            let _ = write.write_all(line.as_bytes()).await;
        });
    }
}

/// One request: pushes are serialized (PostgreSQL archives one file at a time anyway, and
/// two pushes at once would race to push the same ready files ahead).
async fn push(ctx: &tokio::sync::Mutex<Option<AgentContext>>, args: &AgentArgs, req: Request) -> Reply {
    let mut held = ctx.lock().await;
    if held.is_none() {
        match args.connect("postgres").await {
            Ok(c) => *held = Some(c),
            Err(e) => return Reply { error: format!("connecting to the coordinator: {e}"), ..Default::default() },
        }
    }
    let c = held.as_ref().expect("connected above");
    match walpush::push(c, &req.path, req.ahead).await {
        Ok(out) => {
            tracing::info!(pushed = ?out.pushed, already = ?out.already, "WAL archived for wal-push");
            Reply { ok: true, pushed: out.pushed, already: out.already, ..Default::default() }
        }
        Err(e) => {
            tracing::warn!(path = %req.path.display(), "WAL push failed: {e}");
            // Connect afresh next time: the failure may have been the connection.
            *held = None;
            Reply { error: e.to_string(), ..Default::default() }
        }
    }
}
