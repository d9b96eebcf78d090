//! Helpers for tests that run real `meshkv` (and real etcd) processes on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the `meshkv` binary cargo built for these tests.
pub fn meshkv_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshkv")
}

/// A running server process whose stderr is collected.
pub struct Proc {
    pub child: Child,
    pub client_addr: String,
    pub log: Arc<Mutex<String>>,
    ready: Option<std::sync::mpsc::Receiver<String>>,
}

impl Proc {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    /// Sends SIGKILL and waits for the process to go.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (up to a deadline) for an orderly exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Freezes the process (SIGSTOP): it holds its sockets but reads nothing.
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `meshkv` on a free client port (port 0, read back from its log) with its data
/// in `data_dir`, and waits until it serves.
pub fn start_meshkv(data_dir: &Path, extra: &[&str]) -> Proc {
    let mut p = spawn_meshkv(data_dir, "http://127.0.0.1:0", extra);
    p.wait_ready(Duration::from_secs(60));
    p
}

/// Starts `meshkv` without waiting for it to serve (members that wait for each other
/// must start together); `peer_url` is its --listen-peer-urls.
pub fn spawn_meshkv(data_dir: &Path, peer_url: &str, extra: &[&str]) -> Proc {
    spawn_meshkv_on(data_dir, "http://127.0.0.1:0", peer_url, extra)
}

/// As [`spawn_meshkv`], serving clients on `client_url` (its port 0 or a free one).
pub fn spawn_meshkv_on(data_dir: &Path, client_url: &str, peer_url: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec!["--data-dir".into(), data_dir.display().to_string()];
    args.extend(["--listen-client-urls", client_url, "--listen-peer-urls", peer_url].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    spawn_meshkv_args(&args)
}

/// Starts `meshkv` with exactly `args`, without waiting for it to serve.
pub fn spawn_meshkv_args(args: &[String]) -> Proc {
    spawn_meshkv_env(args, &[])
}

/// Runs `meshkv` with `args` and `env`, which it must refuse at start; what it said.
pub fn refused_at_start(args: &[String], env: &[(&str, String)]) -> String {
    let out = Command::new(meshkv_bin()).args(args).envs(env.iter().map(|(k, v)| (k, v))).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {said}");
    said
}

/// [`refused_at_start`] with `args` and a data dir of `dir`/data.
pub fn refused_at_start_in(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["--data-dir".to_string(), dir.join("data").display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    refused_at_start(&all, &[])
}

/// As [`spawn_meshkv_args`], with these environment variables too.
pub fn spawn_meshkv_env(args: &[String], env: &[(&str, String)]) -> Proc {
    let mut child = Command::new(meshkv_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshkv");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let ready = "ready to serve client requests on ";
            if let Some(i) = line.find(ready) {
                let url = line[i + ready.len()..].trim();
                let addr = url.trim_start_matches("http://").trim_start_matches("https://").to_string();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    Proc { child, client_addr: String::new(), log, ready: Some(rx) }
}

impl Proc {
    /// Waits until the server says it serves clients.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let Some(rx) = self.ready.take() else { return };
        match rx.recv_timeout(timeout) {
            Ok(a) => self.client_addr = a,
            Err(_) => {
                let _ = self.child.kill();
                panic!("meshkv did not become ready; log:\n{}", self.log.lock().unwrap());
            }
        }
    }
}

pub use meshkv::torture::ports::free_port;

/// Waits until `f` holds or the deadline passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Starts real etcd (Debian's etcd-server) on free ports, for recording reference output.
pub fn start_etcd(data_dir: &Path) -> Proc {
    start_etcd_with(data_dir, &[])
}

/// As [`start_etcd`], with more flags.
pub fn start_etcd_with(data_dir: &Path, extra: &[&str]) -> Proc {
    let client = free_port();
    let peer = free_port();
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (apt-get install etcd-server)");
    let p = Proc {
        child,
        client_addr: format!("127.0.0.1:{client}"),
        log: Arc::new(Mutex::new(String::new())),
        ready: None,
    };
    wait_until("etcd to serve", Duration::from_secs(30), || has_leader(&p));
    p
}

/// Whether etcd member `p` knows a leader: asked through Status, which needs no user
/// when authentication is on (the health check's proposal does).
fn has_leader(p: &Proc) -> bool {
    let out = etcdctl(&p.client_addr, &["endpoint", "status", "-w", "json"], None);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    out.status == 0 && status[0]["Status"]["leader"].as_u64().unwrap_or(0) != 0
}

/// What one etcdctl run printed.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Debian's etcd, `n` members on loopback started together, each serving once the
/// cluster has a leader.
pub fn start_etcd_cluster(root: &Path, n: usize) -> Vec<Proc> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let initial: Vec<String> = ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}={}", url(*peer))).collect();
    let members: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(root.join(format!("e{i}")))
                .args(["--listen-client-urls", &url(*client), "--advertise-client-urls", &url(*client)])
                .args(["--listen-peer-urls", &url(*peer), "--initial-advertise-peer-urls", &url(*peer)])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd (apt-get install etcd-server)");
            Proc { child, client_addr: format!("127.0.0.1:{client}"), log: Arc::default(), ready: None }
        })
        .collect();
    for p in &members {
        wait_until("etcd's cluster to serve", Duration::from_secs(60), || has_leader(p));
    }
    members
}

/// Runs etcdctl (v3 API) against `endpoint` with `args`, feeding `stdin`.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl (apt-get install etcd-client)");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.map(|s| s.to_vec());
    let writer = std::thread::spawn(move || {
        if let Some(d) = data {
            let _ = input.write_all(&d);
        }
    });
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap().code().unwrap_or(-1);
    let _ = writer.join();
    Output { status, stdout, stderr }
}

/// Bytes that do not compress (xorshift from `seed`), so that a store's size on disk
/// follows what was written to it.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("meshkv-test").tempdir().unwrap()
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Waits (asynchronously) until `f` holds; returns how long that took.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `meshkv bench ARGS --endpoints ENDPOINTS`, which must succeed, and returns its
/// one record.
pub fn bench_record(endpoints: &str, args: &[&str]) -> meshkv::bench::Record {
    let out = Command::new(meshkv_bin()).arg("bench").args(args).args(["--endpoints", endpoints]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench {args:?}:\n{text}");
    let mut rs = meshkv::bench::record::parse_lines(&text);
    assert_eq!(rs.len(), 1, "one JSON line: {text}");
    rs.remove(0)
}

/// One HTTP exchange as curl saw it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header lines, lower-cased names: `name: value`.
    pub headers: Vec<String>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers.iter().find_map(|h| h.strip_prefix(&prefix).map(str::trim))
    }
}

/// Runs curl (HTTP/1.1 unless `args` say otherwise) with `args` against `url`.
pub fn curl(url: &str, args: &[&str]) -> HttpReply {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "30"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("curl {url}: no reply: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .map(|l| match l.split_once(':') {
            Some((n, v)) => format!("{}:{v}", n.to_ascii_lowercase()),
            None => l.to_string(),
        })
        .collect();
    HttpReply { status, headers, body: body.to_string() }
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A JSON gateway call: POST `body` to `base` + `path`, with `token` in the
/// Authorization header when given; the HTTP status and the JSON answer.
pub fn gateway_post(base: &str, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Authorization: {t}"));
    let mut args = vec!["-X", "POST", "-d", body];
    if let Some(h) = &auth {
        args.extend(["-H", h.as_str()]);
    }
    let r = curl(&format!("{base}{path}"), &args);
    (r.status, serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {r:?}")))
}

/// Through etcdctl on `endpoint`: the user root (password rootpw) with the root role,
/// `user` (`name:password`) with a role of its name that may read and write every key
/// under `prefix`, then authentication switched on.
pub fn enable_auth(endpoint: &str, user: &str, prefix: &str) {
    let name = user.split(':').next().unwrap_or(user);
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", user],
        &["role", "add", name],
        &["role", "grant-permission", name, "--prefix", "readwrite", prefix],
        &["user", "grant-role", name, name],
        &["auth", "enable"],
    ] {
        let out = etcdctl(endpoint, args, None);
        assert_eq!(out.status, 0, "{args:?}: {out:?}");
    }
}

/// A file system of its own and of a set size (a tmpfs, mounted as root), for a data dir
/// whose disk must fill. Unmounted when dropped; processes still using it keep it until
/// they end.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts `mib` MiB at `path` (made if missing); why not, where this cannot mount.
    pub fn mount(path: &Path, mib: u64) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let size = format!("size={mib}m");
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(path).output();
        match out {
            Ok(o) if o.status.success() => Ok(Self { path: path.to_path_buf() }),
            Ok(o) => Err(format!("mount -t tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Err(format!("mount: {e}")),
        }
    }

    /// Grows (or shrinks) the file system to `mib` MiB, keeping its files.
    pub fn resize(&self, mib: u64) {
        let opts = format!("remount,size={mib}m");
        let st = Command::new("mount").args(["-o", &opts]).arg(&self.path).status().unwrap();
        assert!(st.success(), "mount -o {opts} {}", self.path.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
