//! The plain HTTP endpoints of a real member, as probes and scrapers reach them with
//! curl: `/health`, `/livez`, `/readyz`, `/version` and `/metrics` on the client URL
//! (HTTP/1.1 and HTTP/2 beside gRPC) and on `--listen-metrics-urls`, with etcd's bodies,
//! status codes and metric names.

mod common;

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
    assert_eq!(get("/readyz?verbose").body, "[+]serializable_read ok\n[+]linearizable_read ok\nok\n");
    assert_eq!(get("/readyz?verbose&exclude=linearizable_read").body, "[+]serializable_read ok\nok\n");
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
