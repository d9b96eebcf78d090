//! The mesh on real sockets on loopback: peers join through one address each, a
//! G-Counter converges and survives a partition, strangers without the secret are
//! refused, garbage on the peer port harms nobody, silent peers are reported down within
//! 3 s and back up when they return, and datagrams are relayed around a cut link.

mod common;

use std::time::{Duration, Instant};

use common::eventually;

use bytes::Bytes;
use meshkv::mesh::{GCounter, GossipData, Mesh, MeshConfig, MeshConn, Priority};
use tokio::io::AsyncWriteExt;

fn config(name: &str, join: Vec<String>) -> MeshConfig {
    let mut c = MeshConfig::new(name);
    c.cluster = "test".into();
    c.secret = Some(b"the cluster secret".to_vec());
    c.join = join;
    c.backoff_max = Duration::from_millis(800);
    c
}

async fn start(name: &str, join: Vec<String>) -> Mesh {
    Mesh::start(config(name, join), vec![("counter".to_string(), Box::new(GCounter::default()) as Box<dyn GossipData>)])
        .await
        .unwrap()
}

fn total(m: &Mesh) -> u64 {
    m.with_channel::<GCounter, _>("counter", |c| c.total()).unwrap()
}

fn increment(m: &Mesh, n: u64) {
    let me = m.name().to_string();
    let delta = m.with_channel::<GCounter, _>("counter", |c| c.increment(&me, n)).unwrap();
    m.broadcast("counter", delta);
}

fn reachable(m: &Mesh) -> Vec<String> {
    m.status().reachable()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_join_by_one_address_and_a_counter_survives_a_partition() {
    let mut peers: Vec<Mesh> = Vec::new();
    for i in 0..5 {
        let join = peers.last().map(|p: &Mesh| vec![p.addr().to_string()]).unwrap_or_default();
        peers.push(start(&format!("peer{i}"), join).await);
    }
    eventually("every peer to reach the four others", Duration::from_secs(10), || async {
        peers.iter().all(|p| reachable(p).len() == 4)
    })
    .await;
    for (i, p) in peers.iter().enumerate() {
        increment(p, i as u64 + 1);
    }
    eventually("the counter to converge to 15", Duration::from_secs(10), || async {
        peers.iter().all(|p| total(p) == 15)
    })
    .await;

    // Partition {0,1} | {2,3,4} through the transport's fault hook.
    let (left, right) = peers.split_at(2);
    for a in left {
        for b in right {
            a.block(b.name());
            b.block(a.name());
        }
    }
    eventually("each side to see only itself", Duration::from_secs(10), || async {
        left.iter().all(|p| reachable(p).len() == 1) && right.iter().all(|p| reachable(p).len() == 2)
    })
    .await;
    increment(&peers[0], 10);
    increment(&peers[3], 100);
    eventually("each side to count its own increments", Duration::from_secs(10), || async {
        left.iter().all(|p| total(p) == 25) && right.iter().all(|p| total(p) == 115)
    })
    .await;
    for a in left {
        for b in right {
            a.unblock(b.name());
            b.unblock(a.name());
        }
    }
    eventually("the healed mesh to merge both sides' counts", Duration::from_secs(15), || async {
        peers.iter().all(|p| total(p) == 125 && reachable(p).len() == 4)
    })
    .await;
    for p in &peers {
        p.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_without_the_secret_are_refused_and_learn_nothing() {
    let a = start("a", vec![]).await;
    let b = start("b", vec![a.addr().to_string()]).await;
    eventually("a and b to link", Duration::from_secs(10), || async { reachable(&a) == ["b"] }).await;

    let mut wrong = config("intruder", vec![a.addr().to_string(), b.addr().to_string()]);
    wrong.secret = Some(b"a guess".to_vec());
    let intruder = Mesh::start(wrong, vec![]).await.unwrap();
    let mut none = config("nosecret", vec![a.addr().to_string()]);
    none.secret = None;
    let nosecret = Mesh::start(none, vec![]).await.unwrap();
    let mut other = config("othercluster", vec![a.addr().to_string()]);
    other.cluster = "another".into();
    let othercluster = Mesh::start(other, vec![]).await.unwrap();

    // Give them time to try (and retry) while we watch.
    eventually("the strangers to be refused", Duration::from_secs(10), || async {
        a.status().drops.iter().any(|(k, v)| *k == "refused_connections" && *v >= 3)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in [&intruder, &nosecret, &othercluster] {
        let st = s.status();
        assert!(st.peers.is_empty(), "{} learned of {:?}", st.name, st.peers);
        assert!(st.connections.is_empty());
    }
    assert_eq!(reachable(&a), ["b"]);
    assert_eq!(reachable(&b), ["a"]);
    assert!(a.status().peers.iter().all(|p| p.name == "b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_peer_port_harms_nobody() {
    let a = start("a", vec![]).await;
    let b = start("b", vec![a.addr().to_string()]).await;
    eventually("a and b to link", Duration::from_secs(10), || async { reachable(&a) == ["b"] }).await;
    let mut junk = Vec::new();
    for i in 0..20u32 {
        let mut s = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
        let bytes: Vec<u8> = (0..(i * 37 % 300)).map(|j| (j * 31 + i) as u8).collect();
        let _ = s.write_all(&bytes).await;
        // Half of them hang open, mid-handshake, to try to stall the peer.
        if i % 2 == 0 {
            junk.push(s);
        }
    }
    // A length prefix that promises more than will ever come.
    let mut s = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
    s.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    junk.push(s);

    let ca = MeshConn::new(a.clone());
    let cb = MeshConn::new(b.clone());
    ca.send_to("b", Bytes::from_static(b"still here"), Priority::Control).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), cb.recv_from()).await.unwrap().unwrap();
    assert_eq!((got.0.as_ref(), got.1.as_ref()), ("a", &b"still here"[..]));
    // A new peer can still join while the junk connections hang.
    let c = start("c", vec![a.addr().to_string()]).await;
    eventually("c to join despite the junk", Duration::from_secs(10), || async { reachable(&c).len() == 2 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_reported_down_within_3s_and_up_when_back() {
    let a = start("a", vec![]).await;
    let b = start("b", vec![a.addr().to_string()]).await;
    let c = start("c", vec![a.addr().to_string()]).await;
    eventually("a full mesh of three", Duration::from_secs(10), || async {
        [&a, &b, &c].iter().all(|p| p.status().connections.len() == 2)
    })
    .await;
    // c goes silent: it drops everything to and from a and b without closing sockets.
    c.block("a");
    c.block("b");
    let took = eventually("a and b to report c down", Duration::from_secs(3), || async {
        !reachable(&a).contains(&"c".to_string()) && !reachable(&b).contains(&"c".to_string())
    })
    .await;
    println!("silent peer reported down after {took:?}");
    c.unblock("a");
    c.unblock("b");
    eventually("c to be reported up again", Duration::from_secs(10), || async {
        reachable(&a).contains(&"c".to_string()) && reachable(&b).contains(&"c".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_link_is_not_flapped() {
    let a = start("a", vec![]).await;
    let b = start("b", vec![a.addr().to_string()]).await;
    eventually("a and b to link", Duration::from_secs(10), || async { reachable(&a) == ["b"] }).await;
    let ca = MeshConn::new(a.clone());
    let cb = MeshConn::new(b.clone());
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), cb.recv_from()).await {
            n += 1;
        }
        n
    });
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let start_t = Instant::now();
    let mut sent = 0u64;
    while start_t.elapsed() < Duration::from_secs(3) {
        if ca.send_to("b", chunk.clone(), Priority::Bulk).is_ok() {
            sent += 1;
        }
        if sent % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let received = reader.await.unwrap();
    let conn = a.status().connections;
    assert_eq!(conn.len(), 1);
    assert!(conn[0].up_for >= Duration::from_secs(3), "the link stayed up through the flood: {:?}", conn[0].up_for);
    assert!(received > 0 && received <= sent, "sent {sent}, received {received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_are_relayed_around_a_cut_link() {
    let a = start("a", vec![]).await;
    let b = start("b", vec![a.addr().to_string()]).await;
    let c = start("c", vec![b.addr().to_string()]).await;
    // Cut a–c at both ends before (or after) they meet.
    a.block("c");
    c.block("a");
    eventually("a to route to c through b", Duration::from_secs(10), || async {
        a.status().peers.iter().any(|p| p.name == "c" && p.next_hop.as_deref() == Some("b"))
            && c.status().peers.iter().any(|p| p.name == "a" && p.next_hop.as_deref() == Some("b"))
    })
    .await;
    let ca = MeshConn::new(a.clone());
    let cc = MeshConn::new(c.clone());
    for i in 0..100u32 {
        ca.send_to("c", Bytes::from(i.to_be_bytes().to_vec()), Priority::Control).unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 100 {
        let (src, d) = tokio::time::timeout(Duration::from_secs(5), cc.recv_from()).await.unwrap().unwrap();
        assert_eq!(src.as_ref(), "a");
        got.push(u32::from_be_bytes(d.as_ref().try_into().unwrap()));
    }
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(b.status().relayed >= 100);
    assert_eq!(
        ca.send_to("nobody", Bytes::new(), Priority::Control),
        Err(meshkv::mesh::SendError::NoRoute("nobody".into()))
    );
    assert!(matches!(
        ca.send_to("c", Bytes::from(vec![0u8; ca.max_datagram() + 1]), Priority::Bulk),
        Err(meshkv::mesh::SendError::TooLarge(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_slow_to_see_the_others_is_told_it_founded_and_a_restart_is_not() {
    let mut cfg = config("a", vec![]);
    let id_a = cfg.cluster_id.clone();
    let a = Mesh::start(cfg, vec![]).await.unwrap();
    cfg = config("b", vec![a.addr().to_string()]);
    let id_b = cfg.cluster_id.clone();
    let b = Mesh::start(cfg, vec![]).await.unwrap();
    let c = Mesh::start(config("c", vec![a.addr().to_string()]), vec![]).await.unwrap();
    eventually("a and b to see three peers", Duration::from_secs(10), || async {
        a.reachable_peers().len() == 2 && b.reachable_peers().len() == 2
    })
    .await;
    // a and b form the cluster with c before c hears of it: their handshakes so far
    // named no cluster.
    let founders: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    for (m, id) in [(&a, &id_a), (&b, &id_b)] {
        m.set_founders(&founders);
        id.store(42, std::sync::atomic::Ordering::Release);
    }
    assert_eq!(c.cluster_seen(), 0);
    // c's connections drop and come back: the new handshakes name the cluster and its
    // founders, c among them under this very process's uid.
    c.block("a");
    c.block("b");
    eventually("c to lose a and b", Duration::from_secs(10), || async { c.reachable_peers().is_empty() }).await;
    c.unblock("a");
    c.unblock("b");
    eventually("c to see the cluster", Duration::from_secs(10), || async { c.cluster_seen() == 42 }).await;
    assert_eq!(c.founded_with_me(), Some(founders.clone()), "c is one of the founders");

    // c starts again, fresh, under the same name (its data lost): it is not a founder.
    let old_uid = c.uid();
    c.shutdown();
    let c2 = Mesh::start(config("c", vec![b.addr().to_string()]), vec![]).await.unwrap();
    assert_ne!(c2.uid(), old_uid);
    eventually("the new c to see the cluster", Duration::from_secs(10), || async { c2.cluster_seen() == 42 }).await;
    assert_eq!(c2.founded_with_me(), None, "a new process under a founder's name must join");
}
