//! Real etcdctl against the real `meshkv` binary prints what it prints against real etcd.
//!
//! The scenario is `tests/compat/etcdctl_scenario.txt`; the reference transcript,
//! recorded from Debian's etcd-server, is `tests/compat/etcdctl_expected.txt`. To record
//! it again: `MESHKV_RECORD_ETCD=1 cargo test --test t10_etcdctl_compat`.

mod common;

use common::*;

struct Step {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
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
        let args = shell_words::split(&cmd).expect("scenario line is shell words");
        steps.push(Step { args, stdin });
    }
    steps
}

/// Masks what differs between any two servers: ids, terms and timestamps.
fn normalize(out: &Output) -> String {
    let ids = regex::Regex::new(r#""(cluster_id|member_id|raft_term)":\d+"#).unwrap();
    let warn = regex::Regex::new(r#"^\{"level":"warn".*"error":"(.*)"\}$"#).unwrap();
    let mut s = String::new();
    for line in out.stdout.lines() {
        s.push_str(&ids.replace_all(line, "\"$1\":N"));
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

fn transcript(endpoint: &str) -> String {
    let scenario = std::fs::read_to_string(repo_path("tests/compat/etcdctl_scenario.txt")).unwrap();
    let mut t = String::new();
    for step in parse_scenario(&scenario) {
        let args: Vec<&str> = step.args.iter().map(String::as_str).collect();
        let out = etcdctl(endpoint, &args, step.stdin.as_deref());
        t.push_str(&format!("$ etcdctl {}\n", shell_words::join(&step.args)));
        t.push_str(&normalize(&out));
    }
    t
}

#[test]
fn etcdctl_output_matches_real_etcd() {
    let expected_path = repo_path("tests/compat/etcdctl_expected.txt");
    if std::env::var_os("MESHKV_RECORD_ETCD").is_some() {
        let dir = tempdir();
        let etcd = start_etcd(&dir.path().join("etcd"));
        let t = transcript(&etcd.client_addr);
        std::fs::write(&expected_path, t).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).expect("recorded etcd transcript");
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let got = transcript(&server.client_addr);
    if got != expected {
        let mut report = String::new();
        for (i, (g, e)) in got.lines().zip(expected.lines()).enumerate() {
            if g != e {
                report.push_str(&format!("line {}:\n  meshkv: {g}\n  etcd:   {e}\n", i + 1));
            }
        }
        std::fs::write(dir.path().join("meshkv_transcript.txt"), &got).unwrap();
        panic!(
            "etcdctl output differs from real etcd ({} vs {} lines):\n{report}\nfull meshkv transcript:\n{got}",
            got.lines().count(),
            expected.lines().count()
        );
    }
}
