//! Running the stock tools a source wraps (`git`, `pg_basebackup`, ...): captured errors
//! with the command line and stderr, and a reader over a child's stdout whose end-of-file
//! is only reported after the child exited successfully, so a failed command can never
//! look like a short, complete artifact.

use std::io::Read;
use std::process::{Child, ChildStdout, Command, Stdio};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Failed { cmdline: String, status: String, stderr: String },
}

fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error that
/// carries stderr.
pub fn output(cmd: &mut Command) -> Result<Vec<u8>, CommandError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source })?;
    checked(cmd, out)
}

fn checked(cmd: &Command, out: std::process::Output) -> Result<Vec<u8>, CommandError> {
    if !out.status.success() {
        return Err(CommandError::Failed {
            cmdline: cmdline(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(4000).collect(),
        });
    }
    Ok(out.stdout)
}

/// Like [`output`], feeding `input` on stdin.
pub fn output_with_input(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>, CommandError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn = |source| CommandError::Spawn { program: program.clone(), source };
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output().map_err(spawn)?;
    let _ = writer.join();
    checked(cmd, out)
}

/// Streams a child's stdout; EOF is returned only once the child has exited with status 0,
/// otherwise the read fails with the command's stderr.
pub struct ChildReader {
    child: Child,
    stdout: ChildStdout,
    stderr: std::thread::JoinHandle<String>,
    cmdline: String,
    done: bool,
}

impl ChildReader {
    pub fn spawn(cmd: &mut Command) -> Result<ChildReader, CommandError> {
        Self::spawn_with_stdin(cmd, Stdio::null())
    }

    /// Like [`ChildReader::spawn`], with the child's stdin connected to `stdin` (a file, say).
    pub fn spawn_with_stdin(cmd: &mut Command, stdin: impl Into<Stdio>) -> Result<ChildReader, CommandError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CommandError::Spawn { program, source })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok(ChildReader { child, stdout, stderr, cmdline: cmdline(cmd), done: false })
    }
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        let status = self.child.wait()?;
        self.done = true;
        if status.success() {
            Ok(0)
        } else {
            let stderr =
                std::mem::replace(&mut self.stderr, std::thread::spawn(String::new)).join().unwrap_or_default();
            Err(std::io::Error::other(format!("`{}` failed ({status}): {}", self.cmdline, stderr.trim())))
        }
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for the throwaway servers drills
/// start (the port is released before the server binds it; a lost race fails the drill).
pub fn free_loopback_port() -> Result<u16, super::SourceError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(super::SourceError::io("finding a free port"))?;
    l.local_addr().map(|a| a.port()).map_err(super::SourceError::io("finding a free port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_child_is_an_error_not_eof() {
        let mut r = ChildReader::spawn(Command::new("sh").args(["-c", "printf abc; echo oops >&2; exit 3"])).unwrap();
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, b"abc");
        assert!(err.to_string().contains("oops"), "{err}");
        let mut ok = ChildReader::spawn(Command::new("sh").args(["-c", "printf xyz"])).unwrap();
        let mut out = Vec::new();
        ok.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"xyz");
    }

    #[test]
    fn output_reports_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo bad >&2; exit 1"])).unwrap_err();
        assert!(err.to_string().contains("bad"));
        assert_eq!(output_with_input(&mut Command::new("cat"), b"in").unwrap(), b"in");
    }
}
