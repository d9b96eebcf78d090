//! Authentication and permissions, told by what clients see, against meshkv and Debian's
//! etcd side by side: users, roles and key-range permissions made with etcdctl, then
//! authentication switched on, and what each user may and may not do, in etcd's words.
//! On meshkv alone: auth outlives a restart (its tokens do not), the JSON gateway takes
//! the token in its `Authorization` header, and a revoked permission stops a user at once.

mod common;

use common::*;

/// Runs etcdctl; what it printed, less the client library's own log lines (which carry
/// times and random names), with the endpoint replaced by EP.
fn ctl(endpoint: &str, args: &[&str]) -> String {
    ctl_in(endpoint, args, None)
}

fn ctl_in(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl(endpoint, args, stdin.map(str::as_bytes));
    let text = format!("{}{}[{}]", out.stdout, out.stderr, out.status).replace(endpoint, "EP");
    text.lines().filter(|l| !l.starts_with("{\"level\":")).collect::<Vec<_>>().join("\n")
}

/// The same steps on any endpoint; what each printed.
fn session(ep: &str) -> Vec<(String, String)> {
    let mut t = Vec::new();
    let mut step = |what: &str, args: &[&str]| t.push((what.to_string(), ctl(ep, args)));
    let (root, alice) = ("--user=root:rootpw", "--user=alice:apw");

    step("add root", &["user", "add", "root:rootpw"]);
    step("add root again", &["user", "add", "root:x"]);
    step("add alice", &["user", "add", "alice:apw"]);
    step("add bob without password", &["user", "add", "bob", "--no-password"]);
    step("user list", &["user", "list"]);
    step("user get unknown", &["user", "get", "nobody"]);
    step("role add", &["role", "add", "reader"]);
    step("role add again", &["role", "add", "reader"]);
    step("grant range", &["role", "grant-permission", "reader", "read", "/a", "/b"]);
    step("grant prefix", &["role", "grant-permission", "reader", "--prefix", "readwrite", "/p/"]);
    step("grant key", &["role", "grant-permission", "reader", "write", "k1"]);
    step("grant from key", &["role", "grant-permission", "reader", "read", "--from-key", "z"]);
    step("grant to unknown role", &["role", "grant-permission", "nobody", "read", "k"]);
    step("revoke ungranted", &["role", "revoke-permission", "reader", "k9"]);
    step("revoke key", &["role", "revoke-permission", "reader", "k1"]);
    step("role get", &["role", "get", "reader"]);
    step("role list", &["role", "list"]);
    step("grant role", &["user", "grant-role", "alice", "reader"]);
    step("grant role again", &["user", "grant-role", "alice", "reader"]);
    step("grant unknown role", &["user", "grant-role", "alice", "nope"]);
    step("grant to unknown user", &["user", "grant-role", "nobody", "reader"]);
    step("user get detail", &["user", "get", "alice", "--detail"]);
    step("revoke ungranted role", &["user", "revoke-role", "alice", "nope"]);
    // etcdctl adds the root role and grants it to root when root lacks it.
    step("auth enable", &["auth", "enable"]);
    step("root's roles", &[root, "user", "get", "root"]);

    step("put without user", &["put", "a", "v"]);
    step("wrong password", &["--user=alice:wrong", "get", "a"]);
    step("unknown user", &["--user=nobody:x", "get", "a"]);
    step("password for a user without", &["--user=bob:x", "get", "a"]);
    step("get in range", &[alice, "get", "/a"]);
    step("get past range", &[alice, "get", "/a", "/c"]);
    step("put in prefix", &[alice, "put", "/p/x", "1"]);
    step("put read-only key", &[alice, "put", "/a", "1"]);
    step("root puts", &[root, "put", "/a", "1"]);
    step("root puts elsewhere", &[root, "put", "/q", "1"]);
    step("get in range", &[alice, "get", "/a"]);
    step("get prefix", &[alice, "get", "/p/", "--prefix"]);
    step("get from key", &[alice, "get", "z", "--from-key"]);
    step("get everything", &[alice, "get", "", "--from-key"]);
    step("delete with prev", &[alice, "del", "/p/x", "--prev-kv"]);
    step("watch unreadable", &[alice, "watch", "/q"]);
    step("root grants write /w", &[root, "role", "grant-permission", "reader", "write", "/w"]);
    step("put write-only with prev", &[alice, "put", "/w", "1", "--prev-kv"]);
    step("put write-only", &[alice, "put", "/w", "1"]);
    step("delete write-only with prev", &[alice, "del", "/w", "--prev-kv"]);
    step("delete write-only", &[alice, "del", "/w"]);
    step("lock in prefix", &[alice, "lock", "/p/lk", "echo", "held"]);
    step("lock elsewhere", &[alice, "lock", "/q/lk", "echo", "held"]);

    step("user list by alice", &[alice, "user", "list"]);
    step("user get self", &[alice, "user", "get", "alice"]);
    step("user get other", &[alice, "user", "get", "bob"]);
    step("role get own", &[alice, "role", "get", "reader"]);
    step("role get other", &[alice, "role", "get", "root"]);
    step("user add by alice", &[alice, "user", "add", "carol:x"]);
    step("auth disable by alice", &[alice, "auth", "disable"]);
    step("hashkv by alice", &[alice, "endpoint", "hashkv"]);
    step("defrag by alice", &[alice, "defrag"]);
    step("user list by root", &[root, "user", "list"]);
    step("delete root", &[root, "user", "delete", "root"]);
    step("delete root role", &[root, "role", "delete", "root"]);
    step("revoke root from root", &[root, "user", "revoke-role", "root", "root"]);
    step("revoke reader", &[root, "user", "revoke-role", "alice", "reader"]);
    step("get after revoke", &[alice, "get", "/a"]);
    step("delete alice", &[root, "user", "delete", "alice"]);
    step("alice after delete", &[alice, "get", "/a"]);
    step("auth disable", &[root, "auth", "disable"]);
    step("put without user again", &["put", "nouser", "1"]);
    step("users kept", &["user", "list"]);

    // Txns are checked on every compare and on both branches, whichever runs.
    ctl(ep, &["user", "add", "dave:dpw"]);
    ctl(ep, &["user", "grant-role", "dave", "reader"]);
    ctl(ep, &[root, "auth", "enable"]);
    let dave = "--user=dave:dpw";
    for (what, txn) in [
        ("txn allowed", "mod(\"/a\") > \"0\"\n\nput /p/y 2\n\nput /p/y 3\n\n"),
        ("txn compares unreadable", "mod(\"/q\") > \"0\"\n\nput /p/y 2\n\nput /p/y 3\n\n"),
        ("txn success denied", "mod(\"/a\") > \"0\"\n\nput /q 2\n\nput /p/y 3\n\n"),
        ("txn failure denied", "mod(\"/a\") > \"0\"\n\nput /p/y 2\n\nget /q\n\n"),
    ] {
        t.push((what.to_string(), ctl_in(ep, &[dave, "txn"], Some(txn))));
    }
    // Revoking a lease deletes its keys: each must be writable.
    let granted = etcdctl(ep, &[dave, "lease", "grant", "100"], None).stdout;
    let lease = granted.split_whitespace().nth(1).unwrap_or_else(|| panic!("{granted}")).to_string();
    t.push(("root puts with dave's lease".into(), ctl(ep, &[root, "put", "/q", "1", &format!("--lease={lease}")])));
    t.push(("revoke lease with root's key".into(), ctl(ep, &[dave, "lease", "revoke", &lease])));
    t.push(("root revokes it".into(), ctl(ep, &[root, "lease", "revoke", &lease]).replace(&lease, "ID")));
    t
}

#[test]
fn etcdctl_sees_users_roles_and_permissions_as_with_etcd() {
    let etcd_dir = tempdir();
    let etcd = start_etcd(etcd_dir.path());
    let want = session(&etcd.client_addr);
    drop(etcd);

    let dir = tempdir();
    let mut p = start_meshkv(dir.path(), &["--bcrypt-cost", "4"]);
    let got = session(&p.client_addr);
    if std::env::var_os("SHOW").is_some() {
        eprintln!("{got:#?}");
    }
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "meshkv (left) against etcd (right)");
    }
    assert_eq!(got.len(), want.len());
    assert!(p.terminate().is_some_and(|s| s.success()), "{}", p.log());
}

#[test]
fn auth_outlives_a_restart_and_tokens_do_not() {
    let dir = tempdir();
    let mut p = start_meshkv(dir.path(), &["--bcrypt-cost", "4"]);
    let ep = p.client_addr.clone();
    enable_auth(&ep, "alice:apw", "/app/");

    // The gateway: a token from /v3/auth/authenticate, in the Authorization header.
    let base = p.endpoint();
    let (status, v) = gateway_post(&base, "/v3/auth/authenticate", r#"{"name":"alice","password":"apw"}"#, None);
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let put = r#"{"key":"L2FwcC94","value":"MQ=="}"#; // /app/x = 1
    assert_eq!(gateway_post(&base, "/v3/kv/put", put, Some(&token)).0, 200);
    let (status, v) = gateway_post(&base, "/v3/kv/put", put, None);
    assert_eq!((status, v["message"].as_str()), (400, Some("etcdserver: user name is empty")), "{v}");
    let (status, v) = gateway_post(&base, "/v3/kv/put", r#"{"key":"L290aGVy","value":"MQ=="}"#, Some(&token));
    assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{v}");
    let (status, v) = gateway_post(&base, "/v3/kv/range", r#"{"key":"L2FwcC94"}"#, Some("not.a-token"));
    assert_eq!((status, v["message"].as_str()), (401, Some("etcdserver: invalid auth token")), "{v}");
    let (status, v) = gateway_post(&base, "/v3/auth/user/list", "{}", Some(&token));
    assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{v}");

    // A restart keeps users, roles and the switch; the member forgets its tokens.
    assert!(p.terminate().is_some_and(|s| s.success()), "{}", p.log());
    let mut p = start_meshkv(dir.path(), &["--bcrypt-cost", "4"]);
    let ep = p.client_addr.clone();
    let base = p.endpoint();
    let (status, v) = gateway_post(&base, "/v3/kv/range", r#"{"key":"L2FwcC94"}"#, Some(&token));
    assert_eq!((status, v["message"].as_str()), (401, Some("etcdserver: invalid auth token")), "{v}");
    assert_eq!(ctl(&ep, &["--user=alice:apw", "get", "/app/x", "--print-value-only"]), "1\n[0]");
    assert_eq!(ctl(&ep, &["get", "/app/x"]), "Error: etcdserver: user name is empty\n[1]");
    let (status, v) = gateway_post(&base, "/v3/auth/status", "{}", None);
    assert_eq!((status, v["enabled"].as_bool()), (200, Some(true)), "{v}");

    // A permission taken away stops the next request, with the same token.
    let (_, v) = gateway_post(&base, "/v3/auth/authenticate", r#"{"name":"alice","password":"apw"}"#, None);
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(gateway_post(&base, "/v3/kv/put", put, Some(&token)).0, 200);
    let revoked = ctl(&ep, &["--user=root:rootpw", "role", "revoke-permission", "alice", "/app/", "--prefix"]);
    assert!(revoked.ends_with("[0]"), "{revoked}");
    let (status, v) = gateway_post(&base, "/v3/kv/put", put, Some(&token));
    assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{v}");
    // A changed password ends the user's tokens; the new one signs in.
    let changed = ctl_in(&ep, &["--user=root:rootpw", "user", "passwd", "alice", "--interactive=false"], Some("new\n"));
    assert_eq!(changed, "Password updated\n[0]");
    let (status, v) = gateway_post(&base, "/v3/kv/range", r#"{"key":"L2FwcC94"}"#, Some(&token));
    assert_eq!((status, v["message"].as_str()), (401, Some("etcdserver: invalid auth token")), "{v}");
    assert_eq!(
        ctl(&ep, &["--user=alice:apw", "get", "/a"]).lines().next(),
        Some("Error: etcdserver: authentication failed, invalid user ID or password")
    );
    let (status, _) = gateway_post(&base, "/v3/auth/authenticate", r#"{"name":"alice","password":"new"}"#, None);
    assert_eq!(status, 200);
    assert!(p.terminate().is_some_and(|s| s.success()), "{}", p.log());
}
