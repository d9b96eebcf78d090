//! TLS on the client URLs, as etcd's clients use it: etcdctl with `--cacert` (and, under
//! `--client-cert-auth`, `--cert` and `--key`) against an `https://` URL, curl for the
//! health and metrics endpoints; a client without a certificate where one is required,
//! or one that does not speak TLS, is refused. Certificates are made with openssl.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    /// A client certificate for the user alice.
    alice: (PathBuf, PathBuf),
    /// A client certificate for root valid for the host name ops.example.
    ops: (PathBuf, PathBuf),
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it.
fn pki(dir: &Path) -> Pki {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend(["-keyout", &ca_key, "-out", &ca_crt, "-days", "2", "-subj", "/CN=meshkv test CA"]);
    openssl(&ca_args);
    let leaf = |name: &str, subject: &str, extensions: &str| {
        std::fs::write(dir.join(format!("{name}.ext")), extensions).unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, crt, ext) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.crt")),
            p(&format!("{name}.ext")),
        );
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(&req);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (PathBuf::from(crt), PathBuf::from(key))
    };
    let server = leaf(
        "server",
        "/CN=localhost",
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let client = leaf("client", "/CN=root", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
    let alice = leaf("alice", "/CN=alice", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
    let ops = leaf(
        "ops",
        "/CN=root",
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:ops.example\nextendedKeyUsage=clientAuth\n",
    );
    Pki { ca: dir.join("ca.crt"), server, client, alice, ops }
}

/// A revocation list, signed by the CA of `pki`, that revokes `cert`.
fn revoke(dir: &Path, pki: &Pki, cert: &Path) -> PathBuf {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("crlnumber"), "1000\n").unwrap();
    let conf = format!(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = {}\ncrlnumber = {}\ndefault_md = sha256\ndefault_crl_days = 2\n",
        p("index.txt"),
        p("crlnumber")
    );
    std::fs::write(dir.join("ca.cnf"), conf).unwrap();
    let (cnf, key, ca, crl) = (p("ca.cnf"), p("ca.key"), s(&pki.ca).to_string(), p("crl.pem"));
    openssl(&["ca", "-config", &cnf, "-keyfile", &key, "-cert", &ca, "-revoke", s(cert)]);
    openssl(&["ca", "-config", &cnf, "-keyfile", &key, "-cert", &ca, "-gencrl", "-out", &crl]);
    PathBuf::from(crl)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// curl's exit status and what it printed (status line, headers, body).
fn curl_status(url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("curl").args(["-s", "-i", "--max-time", "10"]).args(args).arg(url).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A member serving clients on an https URL with the server certificate, and `extra`
/// flags; its URL.
fn start_tls(dir: &Path, pki: &Pki, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--cert-file", s(&pki.server.0), "--key-file", s(&pki.server.1)];
    args.extend_from_slice(extra);
    let mut p = spawn_meshkv_on(&dir.join("data"), "https://127.0.0.1:0", "http://127.0.0.1:0", &args);
    p.wait_ready(Duration::from_secs(60));
    let url = format!("https://{}", p.client_addr);
    (p, url)
}

#[test]
fn clients_with_certificates_are_served_over_tls_and_others_refused() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let (mut p, url) = start_tls(dir.path(), &pki, &["--trusted-ca-file", s(&pki.ca), "--client-cert-auth"]);
    let certified = ["--cacert", s(&pki.ca), "--cert", s(&pki.client.0), "--key", s(&pki.client.1)];
    let ctl = |args: &[&str]| {
        let all: Vec<&str> = certified.iter().chain(args).copied().collect();
        etcdctl(&url, &all, None)
    };
    assert_eq!(ctl(&["put", "k", "over tls"]).stdout, "OK\n");
    assert_eq!(ctl(&["get", "k", "--print-value-only"]).stdout, "over tls\n");
    let status = ctl(&["endpoint", "status"]);
    assert!(status.status == 0 && status.stdout.starts_with(&format!("{url}, ")), "{status:?}");
    let members = ctl(&["member", "list"]);
    assert!(members.stdout.contains(&url), "the member advertises its https URL: {members:?}");

    // No client certificate, or no TLS at all: refused.
    let anonymous = etcdctl(&url, &["--cacert", s(&pki.ca), "--dial-timeout", "3s", "get", "k"], None);
    assert_ne!(anonymous.status, 0, "{anonymous:?}");
    let plain = etcdctl(&p.endpoint(), &["--dial-timeout", "3s", "get", "k"], None);
    assert_ne!(plain.status, 0, "{plain:?}");

    // The health endpoints, over HTTP/1.1 and HTTP/2 (ALPN), with and without a certificate.
    for version in ["--http1.1", "--http2"] {
        let (code, out) = curl_status(&format!("{url}/health"), &[&certified[..], &[version]].concat());
        assert_eq!(code, 0, "{out}");
        assert!(out.ends_with(r#"{"health":"true","reason":""}"#), "{version}: {out}");
    }
    let (code, out) = curl_status(&format!("{url}/health"), &["--cacert", s(&pki.ca)]);
    assert_ne!(code, 0, "no certificate: {out}");
    assert!(p.terminate().is_some_and(|st| st.success()), "{}", p.log());
}

#[test]
fn without_client_auth_any_client_that_trusts_the_ca_is_served() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let (p, url) = start_tls(dir.path(), &pki, &["--listen-metrics-urls", "https://127.0.0.1:0"]);
    let put = etcdctl(&url, &["--cacert", s(&pki.ca), "put", "k", "v"], None);
    assert_eq!(put.stdout, "OK\n", "{put:?}");
    // A client that does not trust the CA refuses the server.
    let untrusting = etcdctl(&url, &["--dial-timeout", "3s", "get", "k"], None);
    assert_ne!(untrusting.status, 0, "{untrusting:?}");
    let log = p.log();
    let marker = "serving metrics and health on https://";
    let metrics = log[log.find(marker).expect("a metrics URL") + marker.len()..].split_whitespace().next().unwrap();
    let (code, out) = curl_status(&format!("https://{metrics}/metrics"), &["--cacert", s(&pki.ca)]);
    assert!(code == 0 && out.contains("etcd_server_has_leader 1"), "{out}");
}

#[test]
fn with_auth_on_a_client_certificate_names_its_user() {
    let dir = tempdir();
    let pki = pki(dir.path());
    // The host whitelist holds for plain HTTP only: these requests name 127.0.0.1.
    let flags = ["--trusted-ca-file", s(&pki.ca), "--client-cert-auth", "--host-whitelist", "localhost"];
    let (mut p, url) = start_tls(dir.path(), &pki, &flags);
    let gateway_range = || {
        let certified = ["--cacert", s(&pki.ca), "--cert", s(&pki.alice.0), "--key", s(&pki.alice.1)];
        let args = [&certified[..], &["-X", "POST", "-d", r#"{"key":"L290aGVy"}"#]].concat();
        let (code, out) = curl_status(&format!("{url}/v3/kv/range"), &args);
        (out.split_whitespace().nth(1).unwrap_or_default().to_string(), format!("curl exit {code}: {out}"))
    };
    let (status, out) = gateway_range();
    assert_eq!(status, "200", "{out}");
    let as_cert = |cert: &(PathBuf, PathBuf), args: &[&str]| {
        let mut all = vec!["--cacert", s(&pki.ca), "--cert", s(&cert.0), "--key", s(&cert.1)];
        all.extend_from_slice(args);
        let out = etcdctl(&url, &all, None);
        let text = format!("{}{}", out.stdout, out.stderr);
        text.lines().filter(|l| !l.starts_with("{\"level\":")).map(|l| format!("{l}\n")).collect::<String>()
    };
    // The client certificate's CN is root: it sets auth up, as root, with no password
    // given anywhere but for root's own account.
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice", "--no-password"],
        &["role", "add", "app"],
        &["role", "grant-permission", "app", "--prefix", "readwrite", "/app/"],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        assert!(!as_cert(&pki.client, args).contains("Error"), "{args:?}");
    }
    assert_eq!(as_cert(&pki.client, &["put", "/other", "by root"]), "OK\n");
    assert_eq!(as_cert(&pki.alice, &["put", "/app/x", "by alice"]), "OK\n");
    assert_eq!(as_cert(&pki.alice, &["get", "/app/x", "--print-value-only"]), "by alice\n");
    assert_eq!(as_cert(&pki.alice, &["get", "/other"]), "Error: etcdserver: permission denied\n");
    assert_eq!(as_cert(&pki.alice, &["user", "list"]), "Error: etcdserver: permission denied\n");
    // A token names its user whatever the certificate says.
    assert_eq!(as_cert(&pki.alice, &["--user", "root:rootpw", "get", "/other", "--print-value-only"]), "by root\n");
    // etcd's gateway takes no user from a certificate, and says so rather than serve
    // the request as nobody's.
    let (status, refused) = gateway_range();
    assert_eq!(status, "400", "{refused}");
    assert!(
        refused.ends_with(
            "CommonName of client sending a request against gateway will be ignored and not used as expected\n"
        ),
        "{refused}"
    );
    assert!(p.terminate().is_some_and(|st| st.success()), "{}", p.log());
}

/// etcd's --client-crl-file and --client-cert-allowed-hostname narrow who is let in:
/// a revoked certificate is refused, and with a host name, a certificate not valid for
/// it; --cipher-suites narrows what TLS 1.2 offers.
#[test]
fn revoked_certificates_others_hosts_and_unoffered_ciphers_are_refused() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let crl = revoke(dir.path(), &pki, &pki.alice.0);
    let trust = ["--trusted-ca-file", s(&pki.ca), "--client-cert-auth"];
    let get = |url: &str, cert: &(PathBuf, PathBuf)| {
        let args = ["--cacert", s(&pki.ca), "--cert", s(&cert.0), "--key", s(&cert.1), "--dial-timeout", "3s"];
        etcdctl(url, &[&args[..], &["get", "k"]].concat(), None)
    };
    let (mut p, url) =
        start_tls(&dir.path().join("crl"), &pki, &[&trust[..], &["--client-crl-file", s(&crl)]].concat());
    assert_eq!(get(&url, &pki.client).status, 0, "a certificate not revoked");
    assert_ne!(get(&url, &pki.alice).status, 0, "alice's certificate is revoked");
    p.kill9();

    let host = ["--client-cert-allowed-hostname", "ops.example"];
    let (mut p, url) = start_tls(&dir.path().join("host"), &pki, &[&trust[..], &host[..]].concat());
    assert_eq!(get(&url, &pki.ops).status, 0, "valid for ops.example");
    assert_ne!(get(&url, &pki.client).status, 0, "valid for no host name");
    p.kill9();

    let suites = ["--cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"];
    let (mut p, url) = start_tls(&dir.path().join("suites"), &pki, &suites);
    let handshake = |args: &[&str]| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &p.client_addr, "-CAfile", s(&pki.ca), "-verify_return_error"]);
        cmd.args(args).stdin(std::process::Stdio::null()).output().unwrap().status.success()
    };
    assert!(handshake(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"]));
    assert!(handshake(&["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"]));
    assert!(!handshake(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]), "not offered");
    assert!(handshake(&["-tls1_3"]), "TLS 1.3's suites are kept");
    assert_eq!(etcdctl(&url, &["--cacert", s(&pki.ca), "put", "k", "v"], None).stdout, "OK\n");
    p.kill9();

    let bad = ["--cipher-suites", "TLS_RSA_WITH_RC4_128_SHA", "--listen-client-urls", "https://127.0.0.1:0"];
    let err = refused_at_start_in(
        dir.path(),
        &[&bad[..], &["--cert-file", s(&pki.server.0), "--key-file", s(&pki.server.1)]].concat(),
    );
    assert!(err.contains("--cipher-suites: unsupported cipher suite \"TLS_RSA_WITH_RC4_128_SHA\""), "{err}");
}

#[test]
fn tls_without_its_files_is_refused_at_start() {
    let dir = tempdir();
    let run = |args: &[&str]| refused_at_start_in(dir.path(), args);
    let err = run(&["--listen-client-urls", "https://127.0.0.1:0"]);
    assert!(err.contains("https://127.0.0.1:0: TLS needs --cert-file and --key-file"), "{err}");
    let err = run(&[
        "--client-cert-auth",
        "--cert-file",
        "c",
        "--key-file",
        "k",
        "--listen-client-urls",
        "https://127.0.0.1:0",
    ]);
    assert!(err.contains("--client-cert-auth needs --trusted-ca-file"), "{err}");
    let err =
        run(&["--listen-client-urls", "https://127.0.0.1:0", "--cert-file", "/nonexistent.crt", "--key-file", "k"]);
    assert!(err.contains("--cert-file /nonexistent.crt"), "{err}");
}

/// Three members serving clients over TLS, with client certificates required: a client
/// of a follower keeps its lease alive, reads its time to live and promotes a learner.
/// Only the leader can answer those calls, and a follower sends them to it over the
/// mesh, not to the leader's client URL (which would want a certificate of the member).
#[test]
fn a_followers_lease_and_promote_calls_reach_the_leader_in_a_tls_cluster() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let names = ["a", "b", "c", "d"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let start = |i: usize, join: usize, extra: &[&str]| {
        let join = format!("127.0.0.1:{}", ports[join]);
        let mut args = vec!["--name", names[i], "--join", join.as_str(), "--cert-file", s(&pki.server.0)];
        args.extend(["--key-file", s(&pki.server.1), "--trusted-ca-file", s(&pki.ca), "--client-cert-auth"]);
        args.extend_from_slice(extra);
        let peer = format!("http://127.0.0.1:{}", ports[i]);
        spawn_meshkv_on(&dir.path().join(names[i]), "https://127.0.0.1:0", &peer, &args)
    };
    let mut members: Vec<Proc> = (0..3).map(|i| start(i, (i + 1) % 3, &["--bootstrap-expect", "3"])).collect();
    for p in &mut members {
        p.wait_ready(Duration::from_secs(60));
    }
    let certified = ["--cacert", s(&pki.ca), "--cert", s(&pki.client.0), "--key", s(&pki.client.1)];
    let ctl = |p: &Proc, args: &[&str]| {
        let all: Vec<&str> = certified.iter().chain(args).copied().collect();
        etcdctl(&format!("https://{}", p.client_addr), &all, None)
    };
    // (leader, this member) by id, as a member reports them.
    let ids = |p: &Proc| {
        let out = ctl(p, &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        let status = &v[0]["Status"];
        (status["leader"].as_u64().unwrap_or(0), status["header"]["member_id"].as_u64().unwrap_or(0))
    };
    let mut follower = None;
    wait_until("a leader and a follower", Duration::from_secs(30), || {
        follower = members.iter().position(|p| {
            let (leader, me) = ids(p);
            leader != 0 && leader != me
        });
        follower.is_some()
    });
    let f = &members[follower.unwrap()];

    let granted = ctl(f, &["lease", "grant", "60"]);
    let id = granted.stdout.split_whitespace().nth(1).unwrap_or_else(|| panic!("{granted:?}")).to_string();
    let kept = ctl(f, &["lease", "keep-alive", "--once", &id]);
    assert_eq!(kept.stdout, format!("lease {id} keepalived with TTL(60)\n"), "{kept:?}");
    let ttl = ctl(f, &["lease", "timetolive", &id]);
    assert!(ttl.stdout.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")), "{ttl:?}");

    // A fourth member stays a learner (three voters are wanted); a follower's client
    // promotes it once it has caught up.
    let mut d = start(3, 0, &[]);
    d.wait_ready(Duration::from_secs(60));
    let d_id = ids(&d).1;
    let mut promoted = None;
    wait_until("d promoted through a follower", Duration::from_secs(30), || {
        let out = ctl(f, &["member", "promote", &format!("{d_id:x}")]);
        let done = out.status == 0;
        promoted = Some(out);
        done
    });
    let promoted = promoted.unwrap();
    assert!(promoted.stdout.contains("promoted in cluster"), "{promoted:?}");
    let list = ctl(f, &["member", "list"]);
    assert!(list.stdout.lines().all(|l| l.contains(", started, ") && l.ends_with(", false")), "{list:?}");
    assert_eq!(list.stdout.lines().count(), 4, "{list:?}");
}

/// etcd's --tls-min-version and --tls-max-version: the versions a client may speak,
/// and etcd's refusals of settings that cannot hold.
#[test]
fn tls_versions_are_narrowed_as_etcd_narrows_them() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let speaks = |p: &Proc, version: &str| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &p.client_addr, "-CAfile", s(&pki.ca), "-verify_return_error", version]);
        cmd.stdin(std::process::Stdio::null()).output().unwrap().status.success()
    };
    let (mut p, _) = start_tls(&dir.path().join("default"), &pki, &[]);
    assert!(speaks(&p, "-tls1_2") && speaks(&p, "-tls1_3"), "both by default");
    p.kill9();
    let (mut p, url) = start_tls(&dir.path().join("min13"), &pki, &["--tls-min-version", "TLS1.3"]);
    assert!(!speaks(&p, "-tls1_2") && speaks(&p, "-tls1_3"));
    assert_eq!(etcdctl(&url, &["--cacert", s(&pki.ca), "put", "k", "v"], None).stdout, "OK\n");
    p.kill9();
    let (mut p, _) = start_tls(&dir.path().join("max12"), &pki, &["--tls-max-version=TLS1.2"]);
    assert!(speaks(&p, "-tls1_2") && !speaks(&p, "-tls1_3"));
    p.kill9();

    for (flags, said) in [
        (
            &["--tls-min-version", "TLS1.3", "--tls-max-version", "TLS1.2"][..],
            "min version (TLS1.3) is greater than max version (TLS1.2)",
        ),
        (
            &["--tls-min-version", "TLS1.3", "--cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"],
            "cipher suites cannot be configured when only TLS1.3 is enabled",
        ),
        (&["--tls-min-version", "TLS1.1"], "unexpected TLS version \"TLS1.1\" (must be one of: TLS1.2, TLS1.3)"),
    ] {
        let err = refused_at_start_in(dir.path(), flags);
        assert!(err.contains(said), "{flags:?}: {err}");
    }
}
