//! Black-box test harness: runs the real binaries (coordinator, agents) as processes on
//! 127.0.0.1 with certificates from `coordinator certs init`, in temporary directories.
//! Readiness is polled with deadlines, never slept for; logs are kept in the temp dir and
//! printed when a wait fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of a workspace binary, next to the running test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe.parent().and_then(|d| if d.ends_with("deps") { d.parent() } else { Some(d) }).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// `cmd` with `dir` a tmpfs of `size` of its own, in a private mount namespace: the real
/// ENOSPC path. The last line of its output is `left: ` and what `dir` holds once `cmd` has
/// exited. As root, a mount namespace alone (files of other users, such as a test's
/// `postgres`-owned ones, stay readable); otherwise also a user namespace, so no root is
/// needed.
pub fn on_small_tmpfs(cmd: &Command, dir: &Path, size: &str) -> Command {
    let script = r#"mount -t tmpfs -o "size=$COFFER_TEST_SIZE" tmpfs "$COFFER_TEST_DIR" && "$0" "$@"
rc=$?; echo "left: $(ls -A "$COFFER_TEST_DIR")"; exit $rc"#;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let mut c = Command::new("unshare");
    if !root {
        c.args(["--user", "--map-root-user"]);
    }
    c.args(["--mount", "sh", "-c", script]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(cwd) = cmd.get_current_dir() {
        c.current_dir(cwd);
    }
    c.env("COFFER_TEST_DIR", dir).env("COFFER_TEST_SIZE", size);
    c
}

/// Runs and requires success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Certificates for a coordinator, agents and admins, from the real `certs init`.
pub fn certs(dir: &Path, agents: &[&str], admins: &[&str]) -> PathBuf {
    let mut c = Command::new(bin("coordinator"));
    c.args(["certs", "init", "--out"]).arg(dir);
    for a in agents {
        c.args(["--agent", a]);
    }
    for a in admins {
        c.args(["--admin", a]);
    }
    ok(&mut c);
    dir.to_path_buf()
}

/// A coordinator process.
pub struct Coordinator {
    pub child: Option<Child>,
    pub url: String,
    pub port: u16,
    /// `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Prefix command (e.g. `unshare ...`) used to start it.
    pub wrapper: Vec<String>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
}

impl Coordinator {
    /// Writes a config (TLS from `certs`, data in `data_dir`, plus `extra` TOML) and starts.
    pub fn start(dir: &Path, certs: &Path, extra: &str) -> Coordinator {
        Self::start_wrapped(dir, certs, extra, &[])
    }

    /// [`Coordinator::start`] with extra environment variables for the process.
    pub fn start_with_env(dir: &Path, certs: &Path, extra: &str, env: &[(&str, &str)]) -> Coordinator {
        let mut c = Self::configure(dir, certs, extra, &[]);
        c.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        c.launch();
        c
    }

    pub fn start_wrapped(dir: &Path, certs: &Path, extra: &str, wrapper: &[&str]) -> Coordinator {
        let mut c = Self::configure(dir, certs, extra, wrapper);
        c.launch();
        c
    }

    /// Writes the config like [`Coordinator::start`] but does not start it (`launch` does).
    pub fn prepare(dir: &Path, certs: &Path, extra: &str) -> Coordinator {
        Self::configure(dir, certs, extra, &[])
    }

    fn configure(dir: &Path, certs: &Path, extra: &str, wrapper: &[&str]) -> Coordinator {
        let data_dir = dir.join("coffer-data");
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "data-dir = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics-listen = \"127.0.0.1:0\"\ntls-cert = {:?}\ntls-key = {:?}\ntls-ca = {:?}\nshutdown-grace = \"5s\"\n{extra}\n",
                data_dir,
                certs.join("coordinator.pem"),
                certs.join("coordinator.key"),
                certs.join("ca.pem"),
            ),
        )
        .expect("writing coordinator config");
        Coordinator {
            child: None,
            url: String::new(),
            port: 0,
            metrics_url: String::new(),
            config,
            data_dir,
            log: dir.join("coordinator.log"),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    /// Starts the process (again) and waits until it listens. A restart binds the port it
    /// had before; should another test's process hold that port for a moment (a port-0 probe
    /// such as [`free_port`]), it tries again a few times.
    pub fn launch(&mut self) {
        for attempt in 1.. {
            let log_before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
            match self.try_launch() {
                Ok(()) => return,
                Err(()) => {
                    let log = self.logs();
                    let this_try = log.get(log_before as usize..).unwrap_or_default();
                    if self.port == 0 || attempt == 5 || !this_try.contains("Address already in use") {
                        panic!("coordinator did not start:\n{log}");
                    }
                    std::thread::sleep(Duration::from_millis(200 * attempt));
                }
            }
        }
    }

    fn try_launch(&mut self) -> Result<(), ()> {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("coordinator"));
                c
            }
            None => Command::new(bin("coordinator")),
        };
        cmd.args(["serve", "--config"]).arg(&self.config);
        if self.port != 0 {
            cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting the coordinator");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let log_path = self.log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).expect("log file");
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
                if let Some(url) = line.strip_prefix("metrics on ") {
                    let _ = tx.send(("metrics", url.trim().to_string()));
                }
                if let Some(url) = line.strip_prefix("coordinator listening on ") {
                    let _ = tx.send(("grpc", url.split(' ').next().unwrap_or_default().to_string()));
                }
            }
        });
        let url = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(("grpc", u)) => break u,
                Ok((_, m)) => self.metrics_url = m,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(());
                }
            }
        };
        self.port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the listening line");
        self.url = url;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `grpcurl` against this coordinator as client `who` (`admin-ops`, `agent-git-1`, ...,
    /// the certificate's file name in `certs`): `args` go between the flags and the address
    /// (`-d JSON`), `method` after it (`list`, `coffer.v1.AdminService/ListAssets`).
    pub fn grpcurl(&self, certs: &Path, who: &str, args: &[&str], method: &str) -> Output {
        let mut c = Command::new("grpcurl");
        c.arg("-cacert")
            .arg(certs.join("ca.pem"))
            .arg("-cert")
            .arg(certs.join(format!("{who}.pem")))
            .arg("-key")
            .arg(certs.join(format!("{who}.key")))
            .args(args)
            .arg(self.url.trim_start_matches("https://"))
            .arg(method);
        run(&mut c)
    }

    /// `AdminService/<method>` as `admin-ops` with the JSON request `body`; requires success
    /// and returns the answer as JSON.
    pub fn admin_json(&self, certs: &Path, method: &str, body: &str) -> serde_json::Value {
        let o = self.grpcurl(certs, "admin-ops", &["-d", body], &format!("coffer.v1.AdminService/{method}"));
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{method} answered {}: {e}", stdout(&o)))
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn packs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(dirs) = std::fs::read_dir(self.data_dir.join("repo/packs")) {
            for d in dirs.flatten() {
                if let Ok(files) = std::fs::read_dir(d.path()) {
                    out.extend(files.flatten().map(|f| f.path()));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A plain HTTP/1.1 GET of `url` (`http://HOST:PORT/PATH`): (status code, body).
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample `name{labels}` (labels exactly as rendered) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.split(' ').next()?.parse().ok())
    })
}

/// Sends a signal (`TERM`, `KILL`, `STOP`, ...) with the stock `kill` command.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Command line of an agent binary with the common flags for `agent` and `asset`.
pub fn agent(binary: &str, coord: &Coordinator, certs: &Path, agent: &str, dir: &Path, asset: &str) -> Command {
    let mut c = Command::new(bin(binary));
    c.arg("--coordinator")
        .arg(&coord.url)
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("agent-{agent}.pem")))
        .arg("--key")
        .arg(certs.join(format!("agent-{agent}.key")))
        .arg("--identity")
        .arg(dir.join(format!("{agent}.identity")))
        .arg("--asset")
        .arg(asset)
        .arg("--quiet")
        .env_remove("COFFER_CONFIG")
        .env("RUST_LOG", "warn");
    c
}

/// A git command in `dir` with a fixed identity and no user config.
pub fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    c
}

/// A new repository with `files` committed on branch `main`.
pub fn git_repo(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("repo dir");
    ok(git(dir).args(["init", "-q", "-b", "main"]));
    commit(dir, files, "initial");
    dir.to_path_buf()
}

pub fn commit(dir: &Path, files: &[(&str, &[u8])], message: &str) {
    for (path, data) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
        std::fs::write(&p, data).expect("write file");
    }
    ok(git(dir).args(["add", "-A"]));
    ok(git(dir).args(["commit", "-q", "--allow-empty", "-m", message]));
}

/// `refname -> sha` of a repository.
pub fn refs(dir: &Path) -> Vec<(String, String)> {
    ok(git(dir).args(["for-each-ref", "--format=%(refname) %(objectname)"]))
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect()
}

/// Deterministic pseudo-random bytes (incompressible).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A free TCP port on 127.0.0.1 (for servers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A child process killed when dropped (helper servers such as `git daemon`).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses an agent's backup line, `snapshot ID of ASSET: SIZE in N file(s), NEW new`, into
/// (snapshot id, size in bytes, new bytes), the sizes as printed (`1.5 MiB`).
pub fn backup_line(out: &str) -> (String, u64, u64) {
    let size_of = |s: &str| {
        let (n, unit) = s.trim().split_once(' ').unwrap_or_else(|| panic!("size {s:?}"));
        let n: f64 = n.parse().unwrap_or_else(|_| panic!("size {s:?}"));
        let m = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            "GiB" => 1073741824.0,
            "TiB" => 1099511627776.0,
            u => panic!("unit {u}"),
        };
        (n * m) as u64
    };
    let line =
        out.lines().find(|l| l.starts_with("snapshot ")).unwrap_or_else(|| panic!("no snapshot line in {out:?}"));
    let id = line.split_whitespace().nth(1).expect("snapshot id").to_string();
    let after = line.split_once(": ").expect("': ' in the backup line").1;
    let (size, rest) = after.split_once(" in ").expect("' in ' in the backup line");
    let new = rest.rsplit(", ").next().expect("new bytes").trim_end_matches(" new");
    (id, size_of(size), size_of(new))
}

/// The workspace's root directory. Taken from the running test's `CARGO_MANIFEST_DIR` (cargo
/// and nextest set it for every test process; each crate sits one level below the root)
/// rather than the path compiled in, because a build cache shared between two clones can hand
/// this clone a test binary compiled in the other one.
pub fn workspace_root() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    crate_dir
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .filter(|root| root.join("Cargo.toml").is_file())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// The S3-compatible test server (moto from PyPI, through `testkit/s3_server.py`, which
/// fixes two response roots the Rust SDK rejects) on a free loopback port, its log in `dir`.
pub fn s3_server(dir: &Path) -> (KillOnDrop, u16) {
    s3_server_with_env(dir, &[])
}

/// [`s3_server`] with extra environment (moto's `INITIAL_NO_AUTH_ACTION_COUNT=N` makes it
/// check credentials against its IAM after the first N requests).
pub fn s3_server_with_env(dir: &Path, env: &[(&str, &str)]) -> (KillOnDrop, u16) {
    let port = free_port();
    let proc = Command::new("python3")
        .envs(env.iter().copied())
        .arg(workspace_root().join("testkit/s3_server.py"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("s3-{port}.log"))).expect("s3 server log"))
        .spawn()
        .expect("python3 with moto[server] is required (scripts/install-deps.sh installs it from PyPI)");
    wait_for("the S3 server serving", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (KillOnDrop(proc), port)
}

/// A TCP relay in front of a real server whose path can fail on purpose: it answers the next
/// new connections' first request with HTTP `503 Slow Down` (how S3 throttles), or goes
/// away (connections cut, then refused) and comes back on the same port. The server behind
/// it is real and keeps its state; only the way to it fails.
pub struct FaultProxy {
    pub port: u16,
    shared: std::sync::Arc<ProxyShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct ProxyShared {
    upstream: u16,
    throttle: std::sync::atomic::AtomicUsize,
    throttled: std::sync::atomic::AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl FaultProxy {
    /// A relay on a free port to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let shared = std::sync::Arc::new(ProxyShared {
            upstream,
            throttle: 0.into(),
            throttled: 0.into(),
            down: false.into(),
            stop: false.into(),
            open: Default::default(),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut listener = Some(listener);
            while !s.stop.load(SeqCst) {
                if s.down.load(SeqCst) {
                    if listener.take().is_some() {
                        for c in s.open.lock().expect("relay lock").drain(..) {
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let l = match &listener {
                    Some(l) => l,
                    None => match std::net::TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => listener.insert(l),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    },
                };
                l.set_nonblocking(true).expect("nonblocking relay");
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).expect("blocking connection");
                        let s = s.clone();
                        std::thread::spawn(move || relay(&s, client));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy { port, shared, thread: Some(thread) }
    }

    /// The next `n` new connections get `503 Slow Down` for their first request.
    pub fn throttle(&self, n: usize) {
        self.shared.throttle.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many requests were answered with 503 so far.
    pub fn throttled(&self) -> usize {
        self.shared.throttled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Down: open connections are cut and new ones refused; up: serving again, same port.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(s: &ProxyShared, mut client: std::net::TcpStream) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::SeqCst;
    if s.throttle.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
        // Read the request (head, then as much body as it announces) and refuse it.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let _ = std::io::copy(&mut (&mut client).take(len), &mut std::io::sink());
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        let _ = write!(
            client,
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.throttled.fetch_add(1, SeqCst);
        return;
    }
    let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", s.upstream)) else { return };
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { return };
    {
        let mut open = s.open.lock().expect("relay lock");
        open.extend(client.try_clone().ok());
        open.extend(upstream.try_clone().ok());
    }
    let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
    };
    let a = pipe(client, upstream);
    let b = pipe(u2, c2);
    let _ = (a.join(), b.join());
}
