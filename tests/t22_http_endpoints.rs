//! The plain HTTP endpoints of a real member, as probes and scrapers reach them with
//! curl: `/health`, `/livez`, `/readyz`, `/version` and `/metrics` on the client URL
//! (HTTP/1.1 and HTTP/2 beside gRPC) and on `--listen-metrics-urls`, with etcd's bodies,
//! status codes and metric names; and gRPC's health service, as etcd's answers it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

fn metrics_addr(p: &Proc) -> String {
    let log = p.log();
    let marker = "serving metrics and health on http://";
    let i = log.find(marker).unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"));
    log[i + marker.len()..].split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn health_probes_version_and_metrics_answer_as_etcd_does() {
    let dir = tempdir();
    let p = start_meshkv(dir.path(), &["--listen-metrics-urls", "http://127.0.0.1:0"]);
    let client = format!("http://{}", p.client_addr);
    let get = |path: &str| curl(&format!("{client}{path}"), &[]);

    let h = get("/health");
    assert_eq!((h.status, h.body.as_str()), (200, r#"{"health":"true","reason":""}"#), "{h:?}");
    let h2 = curl(&format!("{client}/health?serializable=true"), &["--http2-prior-knowledge"]);
    assert_eq!((h2.status, h2.body.as_str()), (200, r#"{"health":"true","reason":""}"#), "over HTTP/2: {h2:?}");

    assert_eq!(get("/livez").body, "ok\n");
    assert_eq!(get("/livez?verbose").body, "[+]serializable_read ok\nok\n");
    assert_eq!(get("/readyz").body, "ok\n");
    assert_eq!(
        get("/readyz?verbose").body,
        "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\n[+]non_learner ok\nok\n"
    );
    assert_eq!(
        get("/readyz?verbose&exclude=linearizable_read&exclude=non_learner").body,
        "[+]data_corruption ok\n[+]serializable_read ok\nok\n"
    );
    let one = get("/readyz/linearizable_read?verbose");
    assert_eq!((one.status, one.body.as_str()), (200, "[+]linearizable_read ok\nok\n"));

    let post = curl(&format!("{client}/health"), &["-X", "POST"]);
    assert_eq!((post.status, post.body.as_str()), (405, "Method Not Allowed\n"));
    assert_eq!(post.header("allow"), Some("GET"));
    let missing = get("/no/such/path");
    assert_eq!((missing.status, missing.body.as_str()), (404, "404 page not found\n"));
    assert_eq!(get("/livez/no_such_check").status, 404);

    let v: serde_json::Value = serde_json::from_str(&get("/version").body).unwrap();
    assert_eq!(v["etcdserver"], meshkv::ETCD_COMPAT_VERSION);
    let cluster = v["etcdcluster"].as_str().unwrap();
    assert!(meshkv::ETCD_COMPAT_VERSION.starts_with(cluster.trim_end_matches(".0")), "{v}");

    // Twenty writes through gRPC on the same port, then what /metrics says of them.
    let mut c = etcd_client::Client::connect([p.endpoint()], None).await.unwrap();
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let m = get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"), "{:?}", m.headers);
    let value = |name: &str| metric(&m.body, name).unwrap_or_else(|| panic!("no {name} in:\n{}", m.body));
    assert_eq!(value("etcd_server_has_leader"), 1.0);
    assert_eq!(value("etcd_server_is_leader"), 1.0);
    assert_eq!(value("etcd_server_leader_changes_seen_total"), 1.0);
    assert_eq!(value("etcd_debugging_mvcc_current_revision"), 21.0);
    assert_eq!(value("etcd_debugging_mvcc_keys_total"), 20.0);
    assert!(value("etcd_server_proposals_applied_total") >= 20.0);
    assert!(value("etcd_server_proposals_committed_total") >= value("etcd_server_proposals_applied_total"));
    assert!(value("etcd_disk_wal_fsync_duration_seconds_count") >= 20.0, "a sync per lone write");
    assert!(value("etcd_disk_backend_commit_duration_seconds_count") >= 20.0);
    assert!(value("etcd_mvcc_db_total_size_in_bytes") > 0.0);
    assert!(value("etcd_server_health_success") >= 2.0, "the /health calls above counted");
    assert!(value("process_resident_memory_bytes") > 0.0);
    let id = format!("etcd_server_id{{server_id=\"{:x}\"}} 1", c.status().await.unwrap().header().unwrap().member_id());
    assert!(m.body.lines().any(|l| l == id), "{id} in:\n{}", m.body);

    // Every gRPC call, by method and outcome, as etcd's grpc-prometheus counts them.
    let grpc = |name: &str, labels: &str| metric(&m.body, &format!("{name}{{{labels}}}"));
    let put = "grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"";
    assert_eq!(grpc("grpc_server_started_total", put), Some(20.0), "{}", m.body);
    assert_eq!(grpc("grpc_server_handled_total", &format!("grpc_code=\"OK\",{put}")), Some(20.0));
    // Every method is there from the start, at zero, as etcd lists them.
    let snapshot = "grpc_method=\"Snapshot\",grpc_service=\"etcdserverpb.Maintenance\",grpc_type=\"server_stream\"";
    assert_eq!(grpc("grpc_server_started_total", snapshot), Some(0.0));
    let future = c.get("k0", Some(etcd_client::GetOptions::new().with_revision(1000))).await;
    assert!(future.is_err(), "a revision to come is refused");
    let m = get("/metrics");
    let range = "grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"";
    assert_eq!(
        metric(&m.body, &format!("grpc_server_handled_total{{grpc_code=\"OutOfRange\",{range}}}")),
        Some(1.0),
        "{}",
        m.body
    );

    // The metrics URL serves the same endpoints, and no gRPC.
    let other = format!("http://{}", metrics_addr(&p));
    assert_eq!(curl(&format!("{other}/readyz"), &[]).body, "ok\n");
    let scraped = curl(&format!("{other}/metrics"), &[]).body;
    assert_eq!(metric(&scraped, "etcd_debugging_mvcc_keys_total"), Some(20.0));
    let grpc = etcdctl(&other, &["get", "k0"], None);
    assert_ne!(grpc.status, 0, "no KV service on the metrics URL: {grpc:?}");
}

/// A call whose client stops waiting is counted as handled, Canceled: a lock one client
/// holds, asked for by another that gives up. grpc-go counts a call when its handler
/// returns, and etcd's handlers return Canceled when their client goes; meshkv's handler
/// is dropped instead, and counted so. (etcd 3.4's Lock handler did not return when
/// its client went, in a run of this scenario against it: etcd showed that call as
/// started only for the ten seconds it was watched.)
#[tokio::test]
async fn an_abandoned_call_is_counted_canceled() {
    let dir = tempdir();
    let p = start_meshkv(dir.path(), &[]);
    let mut holder = etcd_client::Client::connect([p.endpoint()], None).await.unwrap();
    holder.lock("l", None).await.unwrap();
    let mut waiter = etcd_client::Client::connect([p.endpoint()], None).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), waiter.lock("l", None)).await;
    assert!(waited.is_err(), "the lock is held elsewhere: {waited:?}");
    let lock = "grpc_method=\"Lock\",grpc_service=\"v3lockpb.Lock\",grpc_type=\"unary\"";
    let calls = |code: &str| {
        let m = curl(&format!("{}/metrics", p.endpoint()), &[]).body;
        let handled = metric(&m, &format!("grpc_server_handled_total{{grpc_code=\"{code}\",{lock}}}"));
        (metric(&m, &format!("grpc_server_started_total{{{lock}}}")), handled)
    };
    eventually("the abandoned Lock call counted", Duration::from_secs(10), || async {
        calls("Canceled") == (Some(2.0), Some(1.0))
    })
    .await;
    assert_eq!(calls("OK"), (Some(2.0), Some(1.0)));
}

/// A response's JSON with what differs between any two clusters (ids, terms) blanked.
fn comparable(body: &str) -> serde_json::Value {
    fn blank(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    if matches!(k.as_str(), "cluster_id" | "member_id" | "raft_term") {
                        *v = serde_json::Value::from("_");
                    } else {
                        blank(v);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(blank),
            _ => {}
        }
    }
    // The first JSON value: etcd's failed calls end with an HTTP trailer, which curl shows.
    let mut v: serde_json::Value = serde_json::Deserializer::from_str(body)
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("not JSON: {body:?}"));
    blank(&mut v);
    v
}

#[test]
fn the_json_gateway_answers_as_etcds_does() {
    let (m_dir, e_dir) = (tempdir(), tempdir());
    let meshkv = start_meshkv(m_dir.path(), &[]);
    let etcd = start_etcd(e_dir.path());
    // Base64: foo = Zm9v, bar = YmFy, baz = YmF6.
    let calls: &[(&str, &str)] = &[
        ("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v","bogus":1}"#),
        ("/v3/kv/put", r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#),
        ("/v3/kv/range", r#"{"key":"Zg==","range_end":"Zw==","keys_only":true,"sort_order":"DESCEND"}"#),
        (
            "/v3/kv/txn",
            r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#,
        ),
        (
            "/v3/kv/txn",
            r#"{"compare":[{"target":"VALUE","key":"Zm9v","value":"eA=="}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#,
        ),
        ("/v3/lease/grant", r#"{"TTL":60,"ID":"12345"}"#),
        ("/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"eA==","lease":"12345"}"#),
        ("/v3/lease/timetolive", r#"{"ID":"12345","keys":true}"#),
        ("/v3/kv/lease/revoke", r#"{"ID":"12345"}"#),
        ("/v3/kv/deleterange", r#"{"key":"Zm9v","prev_kv":true}"#),
        ("/v3/kv/range", r#"{}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v","revision":1000}"#),
        ("/v3/kv/put", r#"{"key":"Zm9v","lease":"999"}"#),
        ("/v3/kv/compaction", r#"{"revision":"3"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#),
    ];
    let counted_before = [&meshkv, &etcd].map(grpc_calls);
    for (path, body) in calls {
        let ask = |p: &Proc| curl(&format!("http://{}{path}", p.client_addr), &["-X", "POST", "-d", body]);
        let (m, e) = (ask(&meshkv), ask(&etcd));
        assert_eq!(m.status, e.status, "{path} {body}: meshkv {m:?}\netcd {e:?}");
        assert_eq!(m.header("content-type"), Some("application/json"), "{path}");
        let (mut mv, mut ev) = (comparable(&m.body), comparable(&e.body));
        if *path == "/v3/lease/timetolive" {
            // The seconds left depend on when each was asked: a second apart at most.
            let left = |v: &mut serde_json::Value| v["TTL"].take().as_str().and_then(|t| t.parse::<i64>().ok());
            let (ml, el) = (left(&mut mv), left(&mut ev));
            assert!(ml.zip(el).is_some_and(|(m, e)| (m - e).abs() <= 1 && (58..=60).contains(&m)), "{ml:?} {el:?}");
        }
        assert_eq!(mv, ev, "{path} {body}:\nmeshkv {}\netcd   {}", m.body, e.body);
    }

    // Not JSON: refused with the gateway's error, in the decoder's own words.
    let bad = curl(&format!("{}/v3/kv/range", meshkv.endpoint()), &["-X", "POST", "-d", "garbage"]);
    assert_eq!(bad.status, 400);
    assert_eq!(comparable(&bad.body)["code"], 3);
    // Only POST.
    let get = curl(&format!("{}/v3/kv/range", meshkv.endpoint()), &[]);
    assert_eq!((get.status, get.body.as_str()), (405, "Method Not Allowed\n"));

    // Each call counted in the gRPC metrics as etcd counts its gateway's (a gRPC client
    // of its own member): by method and code; a body that is not JSON makes no call.
    let counted = |p: &Proc, before: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        let since = grpc_calls(p).into_iter().map(|(series, n)| {
            let was = before.get(&series).copied().unwrap_or(0.0);
            (series, n - was)
        });
        since.filter(|(_, n)| *n != 0.0).collect()
    };
    let (m, e) = (counted(&meshkv, &counted_before[0]), counted(&etcd, &counted_before[1]));
    assert!(m.keys().any(|k| k.contains("grpc_code=\"OutOfRange\",grpc_method=\"Range\"")), "{m:#?}");
    assert_eq!(m, e, "the gateway's calls in the gRPC metrics: meshkv, then etcd");
}

/// The CORS headers and the check of the Host, as etcd's `--cors` and
/// `--host-whitelist` set them, by default and with lists; gRPC passes by both.
#[test]
fn cors_and_the_host_whitelist_answer_as_etcds_do() {
    // What a browser and a DNS-rebinding page would see: status, CORS headers, body.
    let seen = |p: &Proc, method: &str, path: &str, host: Option<&str>, origin: Option<&str>| {
        let (host, origin) = (host.map(|h| format!("Host: {h}")), origin.map(|o| format!("Origin: {o}")));
        let mut args = vec!["-X", method];
        for h in [&host, &origin].into_iter().flatten() {
            args.extend(["-H", h.as_str()]);
        }
        if method == "POST" {
            args.extend(["-d", r#"{"key":"Zm9v","value":"YmFy"}"#]);
        }
        let r = curl(&format!("http://{}{path}", p.client_addr), &args);
        let cors = ["access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers"]
            .map(|h| r.header(h).map(String::from));
        let body = r.body.replace("etcd", "meshkv");
        // Answers that carry the member's identity are compared by their status.
        let body = if r.status == 421 || r.body.is_empty() { body } else { String::new() };
        (r.status, cors, body)
    };
    let lists = ["--cors", "http://a.example:8080,http://b.example:80", "--host-whitelist", "localhost,example.com"];
    for flags in [&[][..], &lists[..]] {
        let (m_dir, e_dir) = (tempdir(), tempdir());
        let meshkv = start_meshkv(m_dir.path(), flags);
        let etcd = start_etcd_with(e_dir.path(), flags);
        let asks: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            ("OPTIONS", "/v3/kv/range", Some("localhost"), Some("http://a.example:8080")),
            ("OPTIONS", "/v3/kv/range", Some("localhost"), Some("http://c.example")),
            ("OPTIONS", "/no/such/path", Some("localhost:1234"), Some("http://b.example:80")),
            ("OPTIONS", "/health", None, None),
            ("POST", "/v3/kv/put", Some("example.com"), Some("http://c.example")),
            ("POST", "/v3beta/kv/put", Some("example.com:2379"), Some("http://a.example:8080")),
            ("POST", "/v3alpha/kv/put", Some("example.com:2379"), None),
            ("POST", "/v3/kv/put", None, Some("http://a.example:8080")),
            ("GET", "/health", Some("localhost"), Some("http://b.example:80")),
            ("GET", "/health", None, None),
            ("GET", "/version", Some("evil.example"), Some("http://a.example:8080")),
            ("GET", "/metrics", Some("[::1]:2379"), None),
            ("GET", "/no/such/path", Some("example.com"), Some("http://a.example:8080")),
        ];
        for &(method, path, host, origin) in asks {
            let (m, e) = (seen(&meshkv, method, path, host, origin), seen(&etcd, method, path, host, origin));
            assert_eq!(m, e, "{flags:?}: {method} {path} Host {host:?} Origin {origin:?}: meshkv, then etcd");
        }
        let refused = seen(&meshkv, "GET", "/health", None, None);
        assert_eq!(refused.0, if flags.is_empty() { 200 } else { 421 }, "{refused:?}");
        // A page cannot pass for gRPC by its content type: gRPC is HTTP/2.
        let posing = ["-X", "POST", "-H", "Content-Type: application/grpc", "-d", r#"{"key":"eA==","value":"eA=="}"#];
        let posed = curl(&format!("http://{}/v3/kv/put", meshkv.client_addr), &posing);
        assert_eq!(posed.status, if flags.is_empty() { 200 } else { 421 }, "{posed:?}");
        // gRPC names 127.0.0.1 too, and passes.
        for p in [&meshkv, &etcd] {
            let out = etcdctl(&p.client_addr, &["get", "foo", "--print-value-only"], None);
            assert_eq!((out.status, out.stdout.as_str()), (0, "bar\n"), "{out:?}");
        }
    }
}

/// etcd's --listen-client-http-urls: the HTTP endpoints and the JSON gateway move to
/// those URLs, and the client URLs serve gRPC alone; --enable-grpc-gateway=false serves
/// no gateway.
#[test]
fn http_can_have_urls_of_its_own_and_the_gateway_can_be_off() {
    let dir = tempdir();
    let p = start_meshkv(&dir.path().join("split"), &["--listen-client-http-urls", "http://127.0.0.1:0"]);
    let log = p.log();
    let marker = "serving client HTTP (health, metrics, the JSON gateway) on http://";
    let at = log.find(marker).unwrap_or_else(|| panic!("no client HTTP URL in the log:\n{log}")) + marker.len();
    let http = format!("http://{}", log[at..].split_whitespace().next().unwrap());
    let grpc = format!("http://{}", p.client_addr);
    let put = ["-X", "POST", "-d", r#"{"key":"Zm9v","value":"YmFy"}"#];
    assert_eq!(curl(&format!("{http}/v3/kv/put"), &put).status, 200);
    assert_eq!(curl(&format!("{http}/health"), &[]).body, r#"{"health":"true","reason":""}"#);
    assert_eq!(curl(&format!("{grpc}/health"), &[]).status, 404, "the client URL serves gRPC alone");
    assert_eq!(curl(&format!("{grpc}/v3/kv/put"), &put).status, 404);
    let got = etcdctl(&p.client_addr, &["get", "foo", "--print-value-only"], None);
    assert_eq!(got.stdout, "bar\n", "{got:?}");
    let on_http = etcdctl(&http, &["--dial-timeout", "2s", "--command-timeout", "3s", "get", "foo"], None);
    assert_ne!(on_http.status, 0, "no gRPC on the HTTP URL: {on_http:?}");

    let p = start_meshkv(&dir.path().join("off"), &["--enable-grpc-gateway=false"]);
    let base = format!("http://{}", p.client_addr);
    assert_eq!(curl(&format!("{base}/v3/kv/put"), &put).status, 404);
    assert_eq!(curl(&format!("{base}/health"), &[]).status, 200);
}

/// Plain requests over cleartext HTTP/2 that carry a body the endpoint does not read
/// (a probe, a scrape, a 404) get the answer HTTP/1.1 gets, whole: the body is read
/// before the answer, as HTTP/2 needs, or the stream is reset under the answer. gRPC
/// calls read their own bodies and pass by.
#[test]
fn plain_http2_requests_with_bodies_get_their_whole_answer() {
    let dir = tempdir();
    let p = start_meshkv(&dir.path().join("d"), &["--listen-metrics-urls", "http://127.0.0.1:0"]);
    let small = dir.path().join("small");
    std::fs::write(&small, "x").unwrap();
    let large = dir.path().join("large");
    std::fs::write(&large, noise(7, 300_000)).unwrap();
    let client = format!("http://{}", p.client_addr);
    let metrics = format!("http://{}", metrics_addr(&p));
    for base in [&client, &metrics] {
        for path in ["/health", "/version", "/metrics", "/readyz", "/no-such-path"] {
            let url = format!("{base}{path}");
            for body in [&small, &large] {
                let data = format!("@{}", body.display());
                let h1 = curl(&url, &["-X", "POST", "--data-binary", &data]);
                let h2 = curl(&url, &["--http2-prior-knowledge", "-X", "POST", "--data-binary", &data]);
                assert_eq!(h2.status, h1.status, "{url} over HTTP/2, body {data}: {h2:?}");
                if path != "/metrics" {
                    assert_eq!(h2.body, h1.body, "{url} over HTTP/2, body {data}");
                }
            }
        }
    }
    let put = ["--http2-prior-knowledge", "-X", "POST", "-d", r#"{"key":"Zm9v","value":"YmFy"}"#];
    assert_eq!(curl(&format!("{client}/v3/kv/put"), &put).status, 200, "the gateway over HTTP/2");
    let got = etcdctl(&p.client_addr, &["get", "foo", "--print-value-only"], None);
    assert_eq!(got.stdout, "bar\n", "{got:?}");
}

/// A plain HTTP/2 body larger than the member reads (4 MiB) is answered 413 while the
/// client still sends. (curl 7.88 drops an answer whose stream is then reset, though
/// HTTP/2 allows it, so this client is h2's.)
#[tokio::test]
async fn an_oversized_plain_http2_body_is_answered_413() {
    let dir = tempdir();
    let p = start_meshkv(&dir.path().join("d"), &[]);
    let tcp = tokio::net::TcpStream::connect(&p.client_addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/health", p.client_addr)).body(()).unwrap();
    let (answer, mut body) = h2.send_request(req, false).unwrap();
    tokio::spawn(async move {
        let chunk = bytes::Bytes::from(noise(9, 64 << 10));
        for _ in 0..(6 << 20) / chunk.len() {
            body.reserve_capacity(chunk.len());
            let mut room = 0;
            while room < chunk.len() {
                match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(n)) => room = n,
                    _ => return,
                }
            }
            if body.send_data(chunk.clone(), false).is_err() {
                return;
            }
        }
        let _ = body.send_data(bytes::Bytes::new(), true);
    });
    let answer = tokio::time::timeout(Duration::from_secs(30), answer).await.unwrap().unwrap();
    assert_eq!(answer.status(), 413);
    let mut text = Vec::new();
    let mut rest = answer.into_body();
    while let Some(Ok(data)) = rest.data().await {
        text.extend_from_slice(&data);
    }
    assert_eq!(String::from_utf8_lossy(&text), "Failed to buffer the request body: length limit exceeded\n");
}

/// etcd's --experimental-warning-unary-request-duration: a unary call slower than it is
/// logged with its method; streams are not.
#[test]
fn a_unary_call_slower_than_the_warning_duration_is_logged() {
    let dir = tempdir();
    let p = start_meshkv(dir.path(), &["--experimental-warning-unary-request-duration=1ns"]);
    let out = etcdctl(&p.client_addr, &["put", "k", "v"], None);
    assert_eq!(out.stdout, "OK\n", "{out:?}");
    wait_until("the put's warning", Duration::from_secs(10), || {
        p.log().lines().any(|l| l.contains("a unary request took too long") && l.contains("/etcdserverpb.KV/Put"))
    });
    let file = dir.path().join("backup.db");
    let saved = etcdctl(&p.client_addr, &["snapshot", "save", file.to_str().unwrap()], None);
    assert_eq!(saved.status, 0, "{saved:?}");
    assert!(!p.log().contains("/etcdserverpb.Maintenance/Snapshot"), "a stream is not a unary call");
    let quiet = start_meshkv(&dir.path().join("default"), &[]);
    assert_eq!(etcdctl(&quiet.client_addr, &["put", "k", "v"], None).stdout, "OK\n");
    assert!(!quiet.log().contains("a unary request took too long"), "300 ms by default: {}", quiet.log());
}

/// Every gRPC call counted on `p`'s client URL: each series of grpc_server_started_total
/// and grpc_server_handled_total, and its count.
fn grpc_calls(p: &Proc) -> BTreeMap<String, f64> {
    let m = curl(&format!("http://{}/metrics", p.client_addr), &[]);
    assert_eq!(m.status, 200, "{m:?}");
    m.body
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{") || l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(series, n)| (series.to_string(), n.parse().unwrap_or(f64::NAN)))
        .collect()
}

/// The first `n` lines curl prints of a streaming gateway call (`-N`), within a deadline.
fn stream_lines(url: &str, body: &str, n: usize, before: impl FnOnce()) -> Vec<String> {
    let mut child = std::process::Command::new("curl")
        .args(["-s", "-N", "--max-time", "30", "-X", "POST", "-d", body, url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line says the stream is up; then whatever should cause the next ones.
    let mut lines = vec![rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a first line")];
    before();
    while lines.len() < n {
        lines.push(
            rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_else(|_| panic!("{n} lines: {lines:?}")),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// POSTs `body` to a streaming route whose answer must end once the requests are
/// answered (clients such as Patroni read the whole answer of a keep-alive); its lines.
fn whole_answer(url: &str, body: &str) -> Vec<String> {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "-X", "POST", "-d", body, url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{url}: the answer ends ({:?}, so far {text:?})", out.status);
    text.lines().map(str::to_string).collect()
}

#[test]
fn the_json_gateway_streams_watches_and_keep_alives_as_etcds_does() {
    let (m_dir, e_dir) = (tempdir(), tempdir());
    let meshkv = start_meshkv(m_dir.path(), &[]);
    let etcd = start_etcd(e_dir.path());
    for p in [&meshkv, &etcd] {
        let url = |path: &str| format!("http://{}{path}", p.client_addr);
        let streams = || metric(&curl(&url("/metrics"), &[]).body, "etcd_debugging_mvcc_watch_stream_total");
        let put = || {
            if p.client_addr == meshkv.client_addr {
                assert_eq!(streams(), Some(1.0), "the gateway's watch is a stream while its client stays");
            }
            let r = curl(&url("/v3/kv/put"), &["-X", "POST", "-d", r#"{"key":"Zm9v","value":"YmFy"}"#]);
            assert_eq!(r.status, 200, "{r:?}");
        };
        let watch = stream_lines(&url("/v3/watch"), r#"{"create_request":{"key":"Zm9v"}}"#, 2, put);
        if p.client_addr == meshkv.client_addr {
            wait_until("the watch to end with its client", std::time::Duration::from_secs(10), || {
                streams() == Some(0.0)
            });
        }
        let granted = curl(&url("/v3/lease/grant"), &["-X", "POST", "-d", r#"{"TTL":60,"ID":"777"}"#]);
        assert_eq!(granted.status, 200);
        let kept = whole_answer(&url("/v3/lease/keepalive"), r#"{"ID":"777"}"#);
        // A stream of answers only: the whole snapshot, counting down the database's
        // bytes (not the SHA-256 after them), then the end.
        let snapshot = curl(&url("/v3/maintenance/snapshot"), &["-X", "POST", "-d", "{}"]);
        assert_eq!(snapshot.status, 200, "{snapshot:?}");
        let (mut got, mut told) = (0usize, Vec::new());
        for line in snapshot.body.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let blob = v["result"]["blob"].as_str().unwrap_or_default();
            got += blob.len() / 4 * 3 - blob.matches('=').count();
            told.push((got, v["result"]["remaining_bytes"].as_str().map_or(0, |r| r.parse::<usize>().unwrap())));
        }
        let counted = told.iter().all(|&(sent, left)| left == (got - 32).saturating_sub(sent));
        assert!(got % 512 == 32 && counted, "{got} bytes: {told:?}");
        let missing = whole_answer(&url("/v3/lease/keepalive"), r#"{"ID":"778"}"#);
        if p.client_addr == meshkv.client_addr {
            // Counted as gRPC calls, as etcd's gateway, a client of its own member, is.
            let m = curl(&url("/metrics"), &[]).body;
            let calls = |method: &str, service: &str, kind: &str| {
                let labels = format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"");
                metric(&m, &format!("grpc_server_started_total{{{labels}}}"))
            };
            assert_eq!(calls("Watch", "etcdserverpb.Watch", "bidi_stream"), Some(1.0), "{m}");
            assert_eq!(calls("LeaseKeepAlive", "etcdserverpb.Lease", "bidi_stream"), Some(2.0), "{m}");
        }
        let seen: Vec<serde_json::Value> = watch.iter().chain(&kept).chain(&missing).map(|l| comparable(l)).collect();
        println!("{}: {seen:?}", p.client_addr);
        let expected = [
            r#"{"result":{"header":{"cluster_id":"_","member_id":"_","revision":"1","raft_term":"_"},"created":true}}"#,
            r#"{"result":{"header":{"cluster_id":"_","member_id":"_","revision":"2","raft_term":"_"},"events":[{"kv":{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}}]}}"#,
            r#"{"result":{"header":{"cluster_id":"_","member_id":"_","revision":"2","raft_term":"_"},"ID":"777","TTL":"60"}}"#,
            r#"{"result":{"header":{"cluster_id":"_","member_id":"_","revision":"2","raft_term":"_"},"ID":"778"}}"#,
        ];
        let expected: Vec<serde_json::Value> = expected.iter().map(|l| comparable(l)).collect();
        assert_eq!(seen, expected, "{}", p.client_addr);
        // Another stream of answers only: an election's leader, observed.
        let campaign = r#"{"name":"ZWw=","lease":"777","value":"Y2FuZDE="}"#;
        let r = curl(&url("/v3/election/campaign"), &["-X", "POST", "-d", campaign]);
        assert_eq!(r.status, 200, "{r:?}");
        let observed = stream_lines(&url("/v3/election/observe"), r#"{"name":"ZWw="}"#, 1, || {});
        let leader: serde_json::Value = serde_json::from_str(&observed[0]).unwrap();
        assert_eq!(leader["result"]["kv"]["value"], "Y2FuZDE=", "{observed:?}");
    }
}

/// gRPC's health service as probes ask it (grpc_health_probe, Kubernetes' gRPC probes),
/// against meshkv and etcd side by side: the server as a whole serves, another service
/// name is unknown, and a watch tells the status and then stays open.
#[tokio::test]
async fn the_grpc_health_service_answers_as_etcds_does() {
    use meshkv::pb::grpc_health::health_client::HealthClient;
    use meshkv::pb::grpc_health::HealthCheckRequest;

    let dir = tempdir();
    let m = start_meshkv(&dir.path().join("meshkv"), &[]);
    let e = start_etcd(&dir.path().join("etcd"));
    let mut seen = Vec::new();
    for p in [&m, &e] {
        let channel = tonic::transport::Endpoint::from_shared(p.endpoint()).unwrap().connect().await.unwrap();
        let mut c = HealthClient::new(channel);
        let ask = |service: &str| HealthCheckRequest { service: service.to_string() };
        let whole = c.check(ask("")).await.map(|r| r.into_inner().status());
        let other = c.check(ask("etcdserverpb.KV")).await.map_err(|s| (s.code(), s.message().to_string()));
        let mut watches = Vec::new();
        for service in ["", "etcdserverpb.KV"] {
            let mut w = c.watch(ask(service)).await.unwrap().into_inner();
            let first = w.message().await.unwrap().map(|r| r.status());
            let stays_open = tokio::time::timeout(Duration::from_millis(300), w.message()).await.is_err();
            watches.push(format!("{first:?} then open: {stays_open}"));
        }
        seen.push(format!("check: {whole:?}; other: {other:?}; watch: {watches:?}"));
    }
    assert_eq!(
        seen[0],
        "check: Ok(Serving); other: Err((NotFound, \"unknown service\")); \
         watch: [\"Some(Serving) then open: true\", \"Some(ServiceUnknown) then open: true\"]"
    );
    assert_eq!(seen[0], seen[1], "meshkv, then etcd");
}
