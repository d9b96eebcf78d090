//! Patroni (Debian's package) keeps a PostgreSQL primary and replica highly available
//! with meshkv as its DCS, through its etcd3 client, which speaks etcd's JSON gateway:
//! the leader key held by a lease, compare-and-set transactions, watches. Two Patroni
//! nodes form a cluster; when the primary's node dies, its leader key expires with its
//! lease and the replica is promoted. tests/run.sh installs patroni and postgresql.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SCOPE: &str = "demo";

/// The postgres user's uid and gid: Patroni's initdb refuses to run as root.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("run id");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a postgres user (apt-get install postgresql)")
    };
    (id("-u"), id("-g"))
}

/// The newest PostgreSQL server binaries Debian installed.
fn pg_bin_dir() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql installed")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL with initdb").1
}

/// One Patroni node and the PostgreSQL it runs.
struct Node {
    name: String,
    api: String,
    dir: PathBuf,
    patroni: Child,
}

impl Node {
    fn start(root: &Path, name: &str, dcs: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (api_port, pg_port) = (free_port(), free_port());
        let config = format!(
            "scope: {SCOPE}
name: {name}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  host: {dcs}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
  initdb:
    - encoding: UTF8
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  parameters:
    unix_socket_directories: {dir}
  authentication:
    superuser: {{username: postgres, password: pw}}
    replication: {{username: replicator, password: pw}}
",
            data = dir.join("data").display(),
            bin = pg_bin_dir().display(),
            dir = dir.display(),
        );
        let path = dir.join("patroni.yml");
        std::fs::write(&path, config).unwrap();
        let (uid, gid) = postgres_ids();
        chown_all(&dir, uid, gid);
        let log = std::fs::File::create(dir.join("patroni.log")).unwrap();
        let patroni = Command::new("patroni")
            .arg(&path)
            .uid(uid)
            .gid(gid)
            .env("HOME", &dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run patroni (apt-get install patroni)");
        Node { name: name.into(), api: format!("http://127.0.0.1:{api_port}"), dir, patroni }
    }

    /// The role and state its REST API reports, if it answers.
    fn role(&self) -> Option<(String, String)> {
        let out =
            Command::new("curl").args(["-s", "--max-time", "5", &format!("{}/patroni", self.api)]).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((v["role"].as_str()?.to_string(), v["state"].as_str()?.to_string()))
    }

    fn is_primary(&self) -> bool {
        self.role().is_some_and(|(role, state)| matches!(role.as_str(), "master" | "primary") && state == "running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("patroni.log")).unwrap_or_default()
    }

    /// The node's machine dies: Patroni and its PostgreSQL are killed.
    fn kill(&mut self) {
        let _ = self.patroni.kill();
        let _ = self.patroni.wait();
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap_or_default();
        if let Some(pid) = pid.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn chown_all(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_all(&e.unwrap().path(), uid, gid);
        }
    }
}

/// The name in Patroni's leader key, and whether a lease holds the key.
fn leader_key(endpoint: &str) -> Option<(String, bool)> {
    let key = format!("/service/{SCOPE}/leader");
    let value = etcdctl(endpoint, &["get", &key, "--print-value-only"], None).stdout.trim().to_string();
    let out = etcdctl(endpoint, &["get", &key, "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let leased = v["kvs"][0]["lease"].as_i64().is_some_and(|l| l != 0);
    (!value.is_empty()).then_some((value, leased))
}

/// Waits until `f` holds; past the deadline, fails with the nodes' logs.
fn wait_for(what: &str, timeout: Duration, nodes: &[Node], f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| format!("--- {}:\n{}", n.name, n.log())).collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn patroni_fails_a_postgresql_primary_over_with_meshkv_as_its_dcs() {
    let root = tempdir();
    let meshkv = start_meshkv(&root.path().join("meshkv"), &[]);
    let pg_root = root.path().join("pg");
    std::fs::create_dir_all(&pg_root).unwrap();
    // The postgres user must reach its directories.
    std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut nodes = vec![Node::start(&pg_root, "pg1", &meshkv.client_addr)];
    let first = Duration::from_secs(90);
    wait_for("pg1 to bootstrap as the primary", first, &nodes, || nodes[0].is_primary());
    nodes.push(Node::start(&pg_root, "pg2", &meshkv.client_addr));
    let streaming = |n: &Node| n.role().is_some_and(|(role, state)| role == "replica" && state == "running");
    wait_for("pg2 to run as a replica", first, &nodes, || streaming(&nodes[1]));
    let endpoint = meshkv.endpoint();
    assert_eq!(leader_key(&endpoint), Some(("pg1".to_string(), true)), "pg1 holds the leader key with a lease");

    // pg1's machine dies: its lease is not kept alive, the key goes, pg2 takes over.
    nodes[0].kill();
    wait_for("pg2 to be promoted", Duration::from_secs(60), &nodes, || nodes[1].is_primary());
    assert_eq!(leader_key(&endpoint), Some(("pg2".to_string(), true)), "pg2 holds the leader key");
    let log = nodes[1].log();
    assert!(!log.contains("ERROR: Request to server"), "no request to meshkv failed:\n{log}");
}
