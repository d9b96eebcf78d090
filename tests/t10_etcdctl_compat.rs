//! Real etcdctl against the real `meshkv` binary prints what it prints against real etcd.
//!
//! Each scenario in `tests/compat/` (`*_scenario.txt`) has a reference transcript beside
//! it (`*_expected.txt`), recorded from Debian's etcd-server. To record them again:
//! `MESHKV_RECORD_ETCD=1 cargo test --test t10_etcdctl_compat`.
//!
//! Scenario lines are etcdctl arguments, run in order. Beyond plain steps:
//! - `... <<EOF` feeds the lines up to `EOF` on stdin; `... <@N` feeds N bytes of `x`;
//! - `... => VAR` keeps the second word of the output (a lease id) as `$VAR`, which later
//!   lines may use; the output shows `$VAR` in its place;
//! - `@N ...` runs a command that does not end by itself (watch, lock, elect) until it
//!   has printed N lines, then stops it with SIGTERM;
//! - `&NAME N ...` starts such a command in the background and goes on once it has
//!   printed N lines; `stop NAME N` waits for N lines in all, stops it and shows its output.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

enum Kind {
    Run,
    /// Run until this many lines, then stop.
    Until(usize),
    /// Start in the background as NAME; go on after this many lines.
    Start(String, usize),
    /// Stop background NAME after this many lines in all.
    Stop(String, usize),
}

struct Step {
    kind: Kind,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    capture: Option<String>,
}

fn parse_scenario(text: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, stdin) = if let Some(cmd) = line.strip_suffix("<<EOF") {
            let mut body = String::new();
            for l in lines.by_ref() {
                if l == "EOF" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            (cmd.to_string(), Some(body.into_bytes()))
        } else if let Some((cmd, n)) = line.split_once("<@") {
            (cmd.to_string(), Some(vec![b'x'; n.trim().parse().expect("byte count after <@")]))
        } else {
            (line.to_string(), None)
        };
        let (cmd, capture) = match cmd.split_once("=>") {
            Some((c, var)) => (c.to_string(), Some(var.trim().to_string())),
            None => (cmd, None),
        };
        let mut args = shell_words::split(&cmd).expect("scenario line is shell words");
        let number = |s: &str| s.parse::<usize>().expect("a line count");
        let kind = if let Some(n) = args[0].strip_prefix('@') {
            let n = number(n);
            args.remove(0);
            Kind::Until(n)
        } else if let Some(name) = args[0].strip_prefix('&') {
            let (name, n) = (name.to_string(), number(&args[1]));
            args.drain(..2);
            Kind::Start(name, n)
        } else if args[0] == "stop" {
            let k = Kind::Stop(args[1].clone(), number(&args[2]));
            args.clear();
            k
        } else {
            Kind::Run
        };
        steps.push(Step { kind, args, stdin, capture });
    }
    steps
}

/// Masks what differs between any two servers: ids, terms and timestamps; lease ids
/// kept in variables show as the variable, other lease ids (sessions') as `<lease>`.
fn normalize(out: &Output, vars: &BTreeMap<String, String>) -> String {
    let ids = regex::Regex::new(r#""(cluster_id|member_id|raft_term)":\d+"#).unwrap();
    let warn = regex::Regex::new(r#"^\{"level":"warn".*"error":"(.*)"\}$"#).unwrap();
    let lease = regex::Regex::new(r"\b[0-9a-f]{16}\b").unwrap();
    // A lease's remaining TTL depends on how long the steps before took: within five
    // seconds of its TTL it shows as "~TTL".
    let remaining = regex::Regex::new(r"TTL\((\d+)s\), remaining\((\d+)s\)").unwrap();
    let mut s = String::new();
    for line in out.stdout.lines() {
        let mut line = ids.replace_all(line, "\"$1\":N").into_owned();
        for (k, v) in vars {
            line = line.replace(v.as_str(), &format!("${k}"));
        }
        line = remaining
            .replace_all(&line, |c: &regex::Captures| {
                let (ttl, left): (i64, i64) = (c[1].parse().unwrap_or(0), c[2].parse().unwrap_or(0));
                if (0..=5).contains(&(ttl - left)) {
                    format!("TTL({ttl}s), remaining(~TTL)")
                } else {
                    c[0].to_string()
                }
            })
            .into_owned();
        s.push_str(&lease.replace_all(&line, "<lease>"));
        s.push('\n');
    }
    for line in out.stderr.lines() {
        match warn.captures(line) {
            Some(c) => s.push_str(&format!("[client] {}\n", &c[1])),
            None => s.push_str(&format!("[stderr] {line}\n")),
        }
    }
    s.push_str(&format!("[exit {}]\n", out.status));
    s
}

/// A command that runs until stopped, its output gathered as it comes.
struct Background {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    args: Vec<String>,
}

impl Background {
    fn start(endpoint: &str, args: &[String]) -> Self {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        let gather = |mut r: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let stdout = gather(Box::new(child.stdout.take().unwrap()));
        let stderr = gather(Box::new(child.stderr.take().unwrap()));
        Self { child, stdout, stderr, args: args.to_vec() }
    }

    fn wait_lines(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.stdout.lock().unwrap().lines().count() < n {
            assert!(
                Instant::now() < deadline,
                "etcdctl {:?} printed fewer than {n} lines: {:?}",
                self.args,
                self.stdout
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then what it printed.
    fn stop(mut self) -> Output {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the readers drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Output { status: status.code().unwrap_or(-1), stdout, stderr }
    }
}

fn transcript(endpoint: &str, scenario: &str) -> String {
    let scenario = std::fs::read_to_string(repo_path(&format!("tests/compat/{scenario}_scenario.txt"))).unwrap();
    let mut t = String::new();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut running: BTreeMap<String, Background> = BTreeMap::new();
    for step in parse_scenario(&scenario) {
        let args: Vec<String> =
            step.args.iter().map(|a| vars.iter().fold(a.clone(), |a, (k, v)| a.replace(&format!("${k}"), v))).collect();
        let shown = shell_words::join(&step.args);
        let out = match step.kind {
            Kind::Run => {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                t.push_str(&format!("$ etcdctl {shown}\n"));
                etcdctl(endpoint, &a, step.stdin.as_deref())
            }
            Kind::Until(n) => {
                let bg = Background::start(endpoint, &args);
                bg.wait_lines(n);
                t.push_str(&format!("$ etcdctl {shown} (stopped after {n} lines)\n"));
                bg.stop()
            }
            Kind::Start(name, n) => {
                let bg = Background::start(endpoint, &args);
                bg.wait_lines(n);
                running.insert(name, bg);
                continue;
            }
            Kind::Stop(name, n) => {
                let bg = running.remove(&name).expect("stop names a started command");
                bg.wait_lines(n);
                t.push_str(&format!(
                    "$ etcdctl {} (in the background; stopped after {n} lines)\n",
                    shell_words::join(&bg.args)
                ));
                bg.stop()
            }
        };
        if let Some(var) = &step.capture {
            let word = out.stdout.split_whitespace().nth(1).unwrap_or_default().to_string();
            vars.insert(var.clone(), word);
        }
        t.push_str(&normalize(&out, &vars));
    }
    assert!(running.is_empty(), "every background command is stopped");
    t
}

fn compare_with_etcd(scenario: &str) {
    let expected_path = repo_path(&format!("tests/compat/{scenario}_expected.txt"));
    if std::env::var_os("MESHKV_RECORD_ETCD").is_some() {
        let dir = tempdir();
        let etcd = start_etcd(&dir.path().join("etcd"));
        let t = transcript(&etcd.client_addr, scenario);
        std::fs::write(&expected_path, t).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).expect("recorded etcd transcript");
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let got = transcript(&server.client_addr, scenario);
    if got != expected {
        let mut report = String::new();
        for (i, (g, e)) in got.lines().zip(expected.lines()).enumerate() {
            if g != e {
                report.push_str(&format!("line {}:\n  meshkv: {g}\n  etcd:   {e}\n", i + 1));
            }
        }
        panic!(
            "etcdctl output differs from real etcd ({} vs {} lines):\n{report}\nfull meshkv transcript:\n{got}",
            got.lines().count(),
            expected.lines().count()
        );
    }
}

#[test]
fn etcdctl_kv_output_matches_real_etcd() {
    compare_with_etcd("etcdctl");
}

#[test]
fn etcdctl_watch_lease_lock_and_elect_output_matches_real_etcd() {
    compare_with_etcd("coord");
}

/// etcdctl's calls to one endpoint (endpoint status, health, hashkv, defrag) work with the
/// endpoint given as a URL, as they do against etcd, though etcdctl 3.4 then sends the
/// URL itself as each request's `:authority`, which HTTP/2 does not allow.
#[test]
fn endpoints_given_as_urls_serve_the_per_endpoint_commands() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let url = server.endpoint();
    let run = |args: &[&str]| {
        let out = etcdctl(&url, args, None);
        assert_eq!(out.status, 0, "etcdctl --endpoints={url} {args:?}: {out:?}");
        out.stdout
    };
    assert_eq!(run(&["put", "k", "v"]), "OK\n");
    assert!(run(&["endpoint", "status"]).starts_with(&format!("{url}, ")));
    assert!(run(&["endpoint", "hashkv"]).starts_with(&format!("{url}, ")));
    assert_eq!(run(&["defrag"]), format!("Finished defragmenting etcd member[{url}]\n"));
    let health = etcdctl(&url, &["endpoint", "health"], None);
    assert!(health.status == 0 && health.stderr.contains(&format!("{url} is healthy")), "{health:?}");
}

/// A member configured as Debian's etcd package configures etcd, by ETCD_* variables
/// (/etc/default/etcd): each sets its flag; one that names no flag is a warning; one
/// whose flag the command line also gives stops the member at start, in etcd's words.
#[test]
fn a_member_takes_its_flags_from_etcds_environment_variables() {
    let dir = tempdir();
    let data = dir.path().join("from-env");
    let env = [
        ("ETCD_NAME", "envmember".to_string()),
        ("ETCD_DATA_DIR", data.display().to_string()),
        ("ETCD_LISTEN_CLIENT_URLS", "http://127.0.0.1:0".to_string()),
        ("ETCD_LISTEN_PEER_URLS", "http://127.0.0.1:0".to_string()),
        ("ETCD_INITIAL_CLUSTER_TOKEN", "tok".to_string()),
    ];
    let mut p = starts_as(&[], &env, "envmember", &data);
    let log = p.log();
    assert!(log.contains("recognized and used environment variable ETCD_DATA_DIR="), "{log}");
    assert!(log.contains("unrecognized environment variable ETCD_INITIAL_CLUSTER_TOKEN=tok"), "{log}");
    p.kill9();

    let err = refused_at_start(&["--initial-cluster".into(), "a=http://127.0.0.1:1".into()], &[]);
    assert!(err.contains("--initial-cluster is etcd's: meshkv members find each other through the mesh"), "{err}");
    let err = refused_at_start(&["--name".into(), "flag".into()], &env);
    assert!(
        err.contains("conflicting environment variable \"ETCD_NAME\" is shadowed by corresponding command-line flag"),
        "{err}"
    );
}

/// etcd's experimental flags as kubeadm and operators write them, booleans with `=true`,
/// are taken by meshkv as by etcd: both start with them and take a write (a lone member
/// that checks its store before campaigning still becomes leader once it has).
#[test]
fn etcds_experimental_flags_with_their_values_start_both_alike() {
    let dir = tempdir();
    let flags = [
        "--experimental-initial-corrupt-check=true",
        "--experimental-corrupt-check-time=1h",
        "--experimental-enable-lease-checkpoint=true",
        "--experimental-watch-progress-notify-interval=5s",
    ];
    // etcd 3.4 warns of lease checkpoints through a logger its default (capnslog) leaves
    // unset, and panics at start without --logger=zap.
    let etcd = start_etcd_with(&dir.path().join("etcd"), &[&flags[..], &["--logger=zap"]].concat());
    let mut meshkv = start_meshkv(&dir.path().join("meshkv"), &flags);
    for (who, addr) in [("etcd", &etcd.client_addr), ("meshkv", &meshkv.client_addr)] {
        let out = etcdctl(addr, &["put", "k", "v"], None);
        assert_eq!((out.status, out.stdout.as_str()), (0, "OK\n"), "{who}: {out:?}");
    }
    let log = meshkv.log();
    assert!(log.contains("initial corruption checking passed; no corruption"), "{log}");
    meshkv.kill9();
    let err = refused_at_start_in(dir.path(), &["--client-cert-auth=maybe"]);
    assert!(err.contains("invalid value 'maybe' for '--client-cert-auth"), "{err}");
}

/// etcd's other server flags, as an etcd command line gives them, start meshkv as they
/// start etcd: the log goes where --log-outputs says, and the flags that ask for what
/// meshkv has no part for are named in a warning. Those whose absence would let in
/// clients they keep out, or that ask for a mode meshkv has not, stop it at start.
/// (`--cors` and `--host-whitelist` are compared with etcd's in `t22_http_endpoints`.)
#[test]
fn etcds_other_server_flags_start_both_alike() {
    let dir = tempdir();
    let log_file = dir.path().join("meshkv.log");
    let flags = [
        "--logger=zap",
        "--pre-vote=true",
        "--strict-reconfig-check",
        "--grpc-keepalive-min-time=5s",
        "--grpc-keepalive-interval=2h",
        "--grpc-keepalive-timeout=20s",
        "--max-concurrent-streams=1000",
        "--metrics=extensive",
        "--max-snapshots=5",
        "--max-wals=5",
        "--enable-v2=false",
        "--proxy=off",
        "--experimental-compaction-batch-limit=1000",
        "--experimental-backend-bbolt-freelist-type=map",
        "--initial-election-tick-advance=false",
        "--experimental-warning-apply-duration=200ms",
        "--enable-pprof",
    ];
    let etcd = start_etcd_with(&dir.path().join("etcd"), &flags);
    let outputs = format!("--log-outputs=stderr,{}", log_file.display());
    let mut meshkv = start_meshkv(&dir.path().join("meshkv"), &[&flags[..], &[outputs.as_str()]].concat());
    for (who, addr) in [("etcd", &etcd.client_addr), ("meshkv", &meshkv.client_addr)] {
        let out = etcdctl(addr, &["put", "k", "v"], None);
        assert_eq!((out.status, out.stdout.as_str()), (0, "OK\n"), "{who}: {out:?}");
    }
    let log = meshkv.log();
    for warned in ["--max-wals has no effect", "--enable-pprof has no effect: meshkv has no Go profiler"] {
        assert!(log.contains(warned), "{warned}: {log}");
    }
    assert!(!log.contains("--enable-v2 has no effect"), "false asks for nothing: {log}");
    let copy = std::fs::read_to_string(&log_file).unwrap();
    assert!(copy.contains("ready to serve client requests on "), "{copy}");
    meshkv.kill9();

    for (flag, said) in [
        ("--proxy=on", "meshkv does not run as etcd's v2 proxy"),
        ("--auto-tls", "meshkv does not make its own certificates"),
        ("--logger=glog", "invalid value 'glog' for '--logger"),
    ] {
        let err = refused_at_start_in(dir.path(), &[flag]);
        assert!(err.contains(said), "{flag}: {err}");
    }
}

/// A member started from etcd's YAML config file (`--config-file`), TLS section and all:
/// the file's flags hold, the keys meshkv has no flag for are named in a warning.
#[test]
fn a_member_reads_etcds_config_file() {
    let dir = tempdir();
    let data = dir.path().join("from-file");
    let file = dir.path().join("etcd.conf.yml");
    let yaml = format!(
        "name: 'filemember'\ndata-dir: {}\nlisten-client-urls: http://127.0.0.1:0\n\
         listen-peer-urls: http://127.0.0.1:0\nauto-compaction-retention: 1\ninitial-cluster-token: 'tok'\n\
         client-transport-security:\n  cert-file:\n  key-file:\n  client-cert-auth: false\n",
        data.display()
    );
    std::fs::write(&file, yaml).unwrap();
    let config = ["--config-file".to_string(), file.display().to_string()];
    let mut p = starts_as(&config, &[], "filemember", &data);
    let log = p.log();
    assert!(log.contains("unknown key initial-cluster-token ignored"), "{log}");
    assert!(log.contains("automatic compaction on"), "{log}");
    p.kill9();

    let err = refused_at_start(&[&config[..], &["--name".into(), "flag".into()]].concat(), &[]);
    assert!(err.contains("--name is given both on the command line and in "), "{err}");
}

/// Starts a member from `args` and `env` alone, and checks that it serves under `name`
/// with its data in `data`.
fn starts_as(args: &[String], env: &[(&str, String)], name: &str, data: &std::path::Path) -> Proc {
    let mut p = spawn_meshkv_env(args, env);
    p.wait_ready(Duration::from_secs(60));
    let out = etcdctl(&p.client_addr, &["member", "list", "-w", "json"], None);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(list["members"][0]["name"], name, "{out:?}");
    assert!(std::fs::read_dir(data).is_ok_and(|mut d| d.next().is_some()), "the data is in {}", data.display());
    p
}
