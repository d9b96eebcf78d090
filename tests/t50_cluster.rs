//! A self-assembling cluster of real `meshkv` processes on loopback: three members form
//! it with --bootstrap-expect, two more join by naming one peer each; writes through any
//! member are read linearizably on every member; a leader killed under load is replaced
//! with no acknowledged write lost; the cluster works with a link cut (the mesh
//! relays); and every member killed and restarted keeps everything acknowledged.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Client, GetOptions};

struct Member {
    name: String,
    peer: String,
    proc: Proc,
    dir: std::path::PathBuf,
    args: Vec<String>,
}

fn peer_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn spawn(root: &std::path::Path, name: &str, port: u16, extra: &[&str]) -> Member {
    let dir = root.join(name);
    let mut args = vec!["--name", name, "--heartbeat-interval", "100"];
    if !extra.contains(&"--election-timeout") {
        args.extend(["--election-timeout", "1000"]);
    }
    args.extend_from_slice(extra);
    let proc = spawn_meshkv(&dir, &peer_url(port), &args);
    let args = args.iter().map(|a| a.to_string()).collect();
    Member { name: name.to_string(), peer: format!("127.0.0.1:{port}"), proc, dir, args }
}

/// Starts a stopped member again with the flags it first had.
fn restart(m: &mut Member) {
    let port: u16 = m.peer.rsplit(':').next().unwrap().parse().unwrap();
    let args: Vec<&str> = m.args.iter().map(String::as_str).collect();
    m.proc = spawn_meshkv(&m.dir, &peer_url(port), &args);
}

async fn client(m: &Member) -> Client {
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3));
    Client::connect([m.proc.endpoint()], Some(opts)).await.unwrap()
}

/// (voters, learners) by name, as MemberList on `m` reports them.
async fn roles(m: &Member) -> Option<(Vec<String>, Vec<String>)> {
    let mut c = client(m).await;
    let list = c.member_list().await.ok()?;
    let mut voters = Vec::new();
    let mut learners = Vec::new();
    for mem in list.members() {
        if mem.is_learner() {
            learners.push(mem.name().to_string());
        } else {
            voters.push(mem.name().to_string());
        }
    }
    voters.sort();
    learners.sort();
    Some((voters, learners))
}

async fn leader_of(ms: &[&Member]) -> Option<u64> {
    for m in ms {
        if let Ok(mut c) = Client::connect([m.proc.endpoint()], None).await {
            if let Ok(s) = c.status().await {
                if s.leader() != 0 {
                    return Some(s.leader());
                }
            }
        }
    }
    None
}

/// Waits until `laggard` holds `key` (written at `rev`), then checks that every member's
/// HashKV at `rev` is the same.
async fn catches_up_and_agrees(members: &[Member], laggard: &Member, key: &str, rev: i64) {
    eventually(&format!("{} to catch up", laggard.name), Duration::from_secs(30), || async {
        let mut c = client(laggard).await;
        c.get(key, Some(GetOptions::new().with_serializable())).await.is_ok_and(|g| g.kvs().len() == 1)
    })
    .await;
    let mut hashes = Vec::new();
    for m in members {
        hashes.push(client(m).await.hash_kv(rev).await.unwrap().hash());
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "HashKV at {rev} agrees: {hashes:?}");
}

async fn member_id_of(m: &Member) -> u64 {
    client(m).await.status().await.unwrap().header().unwrap().member_id()
}

/// Three bootstrap members (a, b, c) with peer ports chosen up front, started together.
fn bootstrap_three(root: &std::path::Path, extra: &[&[&str]; 3]) -> Vec<Member> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let names = ["a", "b", "c"];
    let mut members: Vec<Member> = (0..3)
        .map(|i| {
            let join = format!("127.0.0.1:{}", ports[(i + 1) % 3]);
            let mut args = vec!["--bootstrap-expect", "3", "--join", join.as_str()];
            args.extend_from_slice(extra[i]);
            spawn(root, names[i], ports[i], &args)
        })
        .collect();
    for m in &mut members {
        m.proc.wait_ready(Duration::from_secs(60));
    }
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_assemble_and_serve_linearizable_reads_everywhere() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let d_port = free_port();
    let e_port = free_port();
    let join_a = members[0].peer.clone();
    let join_b = members[1].peer.clone();
    let mut d = spawn(root.path(), "d", d_port, &["--join", &join_a]);
    let mut e = spawn(root.path(), "e", e_port, &["--join", &join_b]);
    d.proc.wait_ready(Duration::from_secs(60));
    e.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    members.push(e);

    let all: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|s| s.to_string()).collect();
    let took = eventually("five members, three of them voters, on every member", Duration::from_secs(30), || async {
        for m in &members {
            match roles(m).await {
                Some((v, l))
                    if v.len() == 3 && l.len() == 2 && {
                        let mut x = v.clone();
                        x.extend(l.clone());
                        x.sort();
                        x == all
                    } => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    println!("cluster of five assembled in {took:?}");

    // etcdctl sees the same.
    let out = etcdctl(&members[3].proc.client_addr, &["member", "list"], None);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert_eq!(lines.iter().filter(|l| l.ends_with("false")).count(), 3, "{}", out.stdout);
    assert_eq!(lines.iter().filter(|l| l.ends_with("true")).count(), 2, "{}", out.stdout);

    // meshkv's own view: members with roles, and mesh peers with their routes.
    let out = std::process::Command::new(meshkv_bin())
        .args(["status", "--endpoint", &members[4].proc.client_addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" leader ").count(), 1, "{text}");
    assert_eq!(text.matches(" voter ").count(), 2, "{text}");
    assert_eq!(text.matches(" learner ").count(), 2, "{text}");
    for peer in ["a", "b", "c", "d"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{peer} "))), "mesh peer {peer} listed: {text}");
    }

    // A write through any member is visible to a linearizable read on every member.
    for (i, w) in members.iter().enumerate() {
        let key = format!("written-through-{}", w.name);
        let rev = client(w).await.put(key.clone(), format!("v{i}"), None).await.unwrap().header().unwrap().revision();
        for r in &members {
            let g = client(r).await.get(key.clone(), None).await.unwrap();
            assert_eq!(g.kvs().len(), 1, "{} reads {key}", r.name);
            assert_eq!(g.kvs()[0].mod_revision(), rev);
            assert!(g.header().unwrap().revision() >= rev);
        }
    }
    // Learners serve serializable reads too.
    let g = client(&members[4]).await.get("written-through-a", Some(GetOptions::new().with_serializable())).await;
    assert!(g.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let refs: Vec<&Member> = members.iter().collect();
    let leader = eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    let _ = leader;
    let leader_id = leader_of(&refs).await.unwrap();
    let mut ids = Vec::new();
    for m in &members {
        ids.push(member_id_of(m).await);
    }
    let li = ids.iter().position(|&id| id == leader_id).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();

    // Steady writes through the two other members, each client with a short timeout.
    let acked: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let last_ok: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut writers = Vec::new();
    for (w, &si) in survivors.iter().enumerate() {
        let ep = members[si].proc.endpoint();
        let (acked, stop, last_ok) = (acked.clone(), stop.clone(), last_ok.clone());
        writers.push(tokio::spawn(async move {
            let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(1500));
            let mut c = Client::connect([ep], Some(opts)).await.unwrap();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load/{w}/{i:05}");
                i += 1;
                if let Ok(r) = c.put(key.clone(), "x", None).await {
                    acked.lock().unwrap().insert(key, r.header().unwrap().revision());
                    last_ok.lock().unwrap().push(Instant::now());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    members[li].proc.kill9();
    // Failover: the first write acknowledged after the kill.
    eventually("writes acknowledged again after the leader died", Duration::from_secs(15), || async {
        last_ok.lock().unwrap().iter().filter(|t| **t > killed_at + Duration::from_millis(200)).count() > 10
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Failover time: the longest stretch without an acknowledged write around the kill.
    let mut times = last_ok.lock().unwrap().clone();
    times.sort();
    let gap = times.windows(2).filter(|w| w[1] > killed_at).map(|w| w[1] - w[0]).max().unwrap();
    println!("failover: writes stalled for {gap:?} around the kill -9 of the leader");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "the load ran: {} writes", acked.len());

    // Bring the old leader back and check every member has every acknowledged write.
    restart(&mut members[li]);
    members[li].proc.wait_ready(Duration::from_secs(60));
    for m in &members {
        let mut c = client(m).await;
        let rev = *acked.values().max().unwrap();
        eventually(&format!("{} to catch up", m.name), Duration::from_secs(20), || {
            let mut c = c.clone();
            async move {
                c.get("load/", Some(GetOptions::new().with_prefix().with_serializable()))
                    .await
                    .is_ok_and(|g| g.header().unwrap().revision() >= rev)
            }
        })
        .await;
        let g = c.get("load/", Some(GetOptions::new().with_prefix())).await.unwrap();
        let got: BTreeMap<String, i64> =
            g.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision())).collect();
        for (k, rev) in &acked {
            assert_eq!(got.get(k), Some(rev), "{} lost acknowledged {k}", m.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_bridged_by_the_mesh() {
    // a and c cannot talk directly; b links both. etcd's full-mesh peers cannot do this.
    let root = tempdir();
    let members = bootstrap_three(root.path(), &[&["--mesh-block-peers", "c"], &[], &["--mesh-block-peers", "a"]]);
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    for round in 0..5 {
        let (w, r) = if round % 2 == 0 { (&members[0], &members[2]) } else { (&members[2], &members[0]) };
        let key = format!("bridged/{round}");
        let rev = client(w).await.put(key.clone(), "v", None).await.unwrap().header().unwrap().revision();
        let g = client(r).await.get(key.clone(), None).await.unwrap();
        assert_eq!(g.kvs()[0].mod_revision(), rev, "{} reads what {} wrote", r.name, w.name);
    }
    let out = etcdctl(&members[0].proc.client_addr, &["member", "list"], None);
    assert_eq!(out.stdout.lines().count(), 3, "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_killed_and_restarted_keeps_every_acknowledged_write() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let mut acked = BTreeMap::new();
    for i in 0..300 {
        let m = &members[i % 3];
        let r = client(m).await.put(format!("k{i:04}"), format!("v{i}"), None).await.unwrap();
        acked.insert(format!("k{i:04}"), r.header().unwrap().revision());
    }
    for m in &mut members {
        m.proc.kill9();
    }
    for m in &mut members {
        restart(m);
    }
    for m in &mut members {
        m.proc.wait_ready(Duration::from_secs(60));
    }
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader after the restart", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() })
        .await;
    for m in &members {
        let g = client(m).await.get("k", Some(GetOptions::new().with_prefix())).await.unwrap();
        let got: BTreeMap<String, i64> =
            g.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision())).collect();
        assert_eq!(got, acked, "{} has every acknowledged write", m.name);
    }
    let next = client(&members[0]).await.put("after", "x", None).await.unwrap();
    assert_eq!(next.header().unwrap().revision(), acked.values().max().unwrap() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_by_a_learner() {
    let root = tempdir();
    let t = ["--dead-member-timeout", "3"];
    let mut members = bootstrap_three(root.path(), &[&t, &t, &t]);
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &join, "--dead-member-timeout", "3"]);
    d.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    eventually("d to join as a learner", Duration::from_secs(20), || async {
        roles(&members[0]).await == Some((names(&["a", "b", "c"]), names(&["d"])))
    })
    .await;
    // Writes keep flowing while the controller works.
    client(&members[0]).await.put("before", "x", None).await.unwrap();
    let killed_at = Instant::now();
    members[2].proc.kill9();
    // Not before the timeout: a short absence is tolerated.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        roles(&members[0]).await,
        Some((names(&["a", "b", "c"]), names(&["d"]))),
        "c is not removed before the timeout"
    );
    let took = eventually("d to replace c", Duration::from_secs(20), || async {
        roles(&members[0]).await == Some((names(&["a", "b", "d"]), vec![]))
    })
    .await;
    println!("dead voter replaced {:?} after the kill", killed_at.elapsed().min(took + Duration::from_secs(2)));
    // The three voters serve, and d has everything.
    client(&members[1]).await.put("after", "y", None).await.unwrap();
    let g = client(&members[3]).await.get("before", None).await.unwrap();
    assert_eq!(g.kvs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_refuses_and_catches_up_after_the_heal() {
    let root = tempdir();
    let block = |n: &str| root.path().join(format!("block-{n}"));
    let (fa, fb, fc) =
        (block("a").display().to_string(), block("b").display().to_string(), block("c").display().to_string());
    let members = bootstrap_three(
        root.path(),
        &[&["--mesh-block-file", &fa], &["--mesh-block-file", &fb], &["--mesh-block-file", &fc]],
    );
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    client(&members[0]).await.put("before", "1", None).await.unwrap();

    // Cut c off from a and b.
    std::fs::write(block("c"), "a\nb\n").unwrap();
    std::fs::write(block("a"), "c\n").unwrap();
    std::fs::write(block("b"), "c\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The minority answers with an error, and promptly.
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(15));
    let mut cc = Client::connect([members[2].proc.endpoint()], Some(opts)).await.unwrap();
    let t = Instant::now();
    let w = cc.put("minority", "x", None).await;
    assert!(w.is_err(), "a write on the minority fails");
    let r = cc.get("before", None).await;
    let msg = format!("{:?}", r.as_ref().err());
    assert!(r.is_err(), "a linearizable read on the minority fails");
    assert!(t.elapsed() < Duration::from_secs(14), "errors, not hangs: {:?}", t.elapsed());
    println!("minority: write and read refused in {:?}: {msg}", t.elapsed());
    // It still serves serializable reads of what it has.
    assert!(cc.get("before", Some(GetOptions::new().with_serializable())).await.is_ok());

    // The majority goes on.
    for i in 0..50 {
        client(&members[i % 2]).await.put(format!("majority/{i}"), "y", None).await.unwrap();
    }

    // Heal: c catches up and every member hashes the same.
    for n in ["a", "b", "c"] {
        std::fs::write(block(n), "").unwrap();
    }
    let rev = client(&members[0]).await.put("after", "z", None).await.unwrap().header().unwrap().revision();
    catches_up_and_agrees(&members, &members[2], "after", rev).await;
    let g = client(&members[2]).await.get("majority/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(g.count(), 50);
    assert!(
        client(&members[2]).await.get("minority", None).await.unwrap().kvs().is_empty(),
        "the refused write left nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_the_log_catch_up_from_snapshots() {
    let root = tempdir();
    let t = ["--snapshot-count", "20"];
    let mut members = bootstrap_three(root.path(), &[&t, &t, &t]);
    let mut c = client(&members[0]).await;
    for i in 0..300 {
        c.put(format!("snap/{i:04}"), vec![b'v'; 512], None).await.unwrap();
    }
    // A new member: the log no longer starts at 1, so it must be sent a snapshot.
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &join, "--snapshot-count", "20"]);
    d.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    let took = eventually("d to hold every key", Duration::from_secs(30), || async {
        let mut c = client(&members[3]).await;
        c.get("snap/", Some(GetOptions::new().with_prefix().with_serializable().with_count_only()))
            .await
            .is_ok_and(|g| g.count() == 300)
    })
    .await;
    println!("a new member caught up from a snapshot in {took:?}");
    assert!(members[3].proc.log().contains("snapshot installed"), "{}", members[3].proc.log());

    // A follower down while the log moved on catches up the same way.
    members[2].proc.kill9();
    // c may have been the leader: writes wait out the election.
    let put = |k: String| {
        let mut c = c.clone();
        async move {
            for _ in 0..20 {
                if let Ok(r) = c.put(k.clone(), vec![b'w'; 512], None).await {
                    return r.header().unwrap().revision();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("no write succeeded for {k}");
        }
    };
    for i in 300..600 {
        put(format!("snap/{i:04}")).await;
    }
    let rev = put("snap-last".to_string()).await;
    restart(&mut members[2]);
    members[2].proc.wait_ready(Duration::from_secs(60));
    catches_up_and_agrees(&members, &members[2], "snap-last", rev).await;
    // Writes still flow through the caught-up members.
    client(&members[2]).await.put("through-c", "y", None).await.unwrap();
    client(&members[3]).await.put("through-d", "y", None).await.unwrap();
}

/// Regression: a new member whose snapshot took longer to fetch and install than the
/// leader's log took to move past what it keeps was sent snapshot after snapshot and never
/// caught up. A snapshot being served now holds the log from its index on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_catches_up_when_writes_outrun_its_snapshot() {
    let root = tempdir();
    let t = ["--snapshot-count", "20"];
    let mut members = bootstrap_three(root.path(), &[&t, &t, &t]);
    let c = client(&members[0]).await;
    // About 12 MB of state: its transfer takes far longer than 20 entries' worth of writes.
    let mut loads = Vec::new();
    for w in 0..4 {
        let mut c = c.clone();
        loads.push(tokio::spawn(async move {
            for i in 0..300 {
                c.put(format!("big/{w}/{i:04}"), vec![b'b'; 10 << 10], None).await.unwrap();
            }
        }));
    }
    for l in loads {
        l.await.unwrap();
    }
    // Writers that keep the log moving for the rest of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (mut c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = c.put(format!("moving/{w}"), i.to_string(), None).await;
                i += 1;
            }
            i
        }));
    }
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &join, "--snapshot-count", "20"]);
    d.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    // Caught up: d's applied index reaches what the leader had committed a moment before.
    let took = eventually("d to catch up while writes go on", Duration::from_secs(60), || async {
        let Ok(s) = client(&members[0]).await.status().await else { return false };
        let target = s.raft_index();
        client(&members[3]).await.status().await.is_ok_and(|d| d.raft_index() >= target)
            && members[3].proc.log().contains("snapshot installed")
    })
    .await;
    let installs = members[3].proc.log().matches("snapshot installed").count();
    // And it stays caught up from the log: a few thousand more writes need no snapshot.
    let mut c = c.clone();
    for i in 0..1000 {
        c.put(format!("after/{i:04}"), "x", None).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    eventually("d to hold the last write", Duration::from_secs(30), || async {
        let mut c = client(&members[3]).await;
        c.get("after/0999", Some(GetOptions::new().with_serializable())).await.is_ok_and(|g| g.kvs().len() == 1)
    })
    .await;
    let log = members[3].proc.log();
    println!("d caught up in {took:?} after {installs} snapshot(s); {written} writes by the movers");
    assert!(installs <= 3, "d installed {installs} snapshots before it caught up:\n{log}");
    assert_eq!(log.matches("snapshot installed").count(), installs, "d needed another snapshot once caught up:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_is_refused() {
    let root = tempdir();
    let members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    // x forms a cluster of its own first, then tries to join this one.
    let port = free_port();
    let mut x = spawn(root.path(), "x", port, &[]);
    x.proc.wait_ready(Duration::from_secs(60));
    client(&x).await.put("mine", "x", None).await.unwrap();
    x.proc.terminate();
    x.args.extend(["--join".to_string(), members[0].peer.clone()]);
    restart(&mut x);
    x.proc.wait_ready(Duration::from_secs(60));
    let refused = |log: String| log.contains("refusing mesh peer") && log.contains("cannot move between clusters");
    eventually("a clear refusal", Duration::from_secs(10), || async {
        refused(x.proc.log()) || members.iter().any(|m| refused(m.proc.log()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (v, l) = roles(&members[0]).await.unwrap();
    assert_eq!((v.len(), l.len()), (3, 0), "x was not added: {v:?} {l:?}");
    assert_eq!(client(&x).await.get("mine", None).await.unwrap().kvs().len(), 1, "x keeps its own data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_member_remove_stops_the_member_and_it_stays_out() {
    let root = tempdir();
    let members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &join]);
    d.proc.wait_ready(Duration::from_secs(60));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    eventually("d to join", Duration::from_secs(20), || async {
        roles(&members[0]).await == Some((names(&["a", "b", "c"]), names(&["d"])))
    })
    .await;
    let d_id = member_id_of(&d).await;
    let out = etcdctl(&members[1].proc.client_addr, &["member", "remove", &format!("{d_id:x}")], None);
    assert_eq!(out.status, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("removed from cluster"), "{}", out.stdout);
    let mut exited = false;
    for _ in 0..100 {
        if let Ok(Some(_)) = d.proc.child.try_wait() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "the removed member stops: {}", d.proc.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(roles(&members[0]).await, Some((names(&["a", "b", "c"]), vec![])));
    // A member that is not there.
    let out = etcdctl(&members[1].proc.client_addr, &["member", "remove", &format!("{d_id:x}")], None);
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("etcdserver: member not found"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_members_find_each_other_without_join() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let rev = client(&members[0]).await.put("kept", "v", None).await.unwrap().header().unwrap().revision();
    // Let each member note its peers' addresses.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for m in &mut members {
        m.proc.kill9();
        m.args.retain(|a| a != "--bootstrap-expect" && a != "3" && a != "--join" && !a.starts_with("127.0.0.1:"));
    }
    for m in &mut members {
        restart(m);
    }
    for m in &mut members {
        m.proc.wait_ready(Duration::from_secs(60));
    }
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader, found without --join", Duration::from_secs(20), || async {
        leader_of(&refs).await.is_some()
    })
    .await;
    let g = client(&members[2]).await.get("kept", None).await.unwrap();
    assert_eq!(g.kvs()[0].mod_revision(), rev);
}

/// Three members; the leader (or a follower) has its disk replaced: it starts again
/// with the flags it had and an empty data dir. The cluster removes it at once (no
/// dead-member timeout to wait for), adds it back as a learner and promotes it again
/// once it has caught up.
async fn a_voter_loses_its_data(leader: bool) {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    for i in 0..20 {
        client(&members[0]).await.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let refs: Vec<&Member> = members.iter().collect();
    let lead = leader_of(&refs).await.unwrap();
    let mut ids = Vec::new();
    for m in &members {
        ids.push(member_id_of(m).await);
    }
    let lost = ids.iter().position(|id| (*id == lead) == leader).unwrap();
    members[lost].proc.kill9();
    std::fs::remove_dir_all(&members[lost].dir).unwrap();
    restart(&mut members[lost]);
    members[lost].proc.wait_ready(Duration::from_secs(60));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let reset = format!("RemoveNode member=\"{:x}\" name={} rejoin=true", ids[lost], members[lost].name);
    wait_until("the cluster to remove it, to take it back", Duration::from_secs(30), || {
        members.iter().any(|m| m.proc.log().contains(&reset))
    });
    let other = &members[(lost + 1) % 3];
    eventually("the emptied member to be a voter again", Duration::from_secs(30), || async {
        roles(other).await == Some((names(&["a", "b", "c"]), vec![]))
    })
    .await;
    let rev = client(&members[lost]).await.put("after", "v", None).await.unwrap().header().unwrap().revision();
    catches_up_and_agrees(&members, &members[lost], "k19", rev).await;
    let all = client(&members[lost]).await.get("k", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(all.kvs().len(), 20, "it holds what was written before it lost its data");
    let logs: String = members.iter().map(|m| m.proc.log()).collect();
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_lost_its_data_is_taken_back_and_catches_up() {
    a_voter_loses_its_data(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_data_is_taken_back_and_catches_up() {
    a_voter_loses_its_data(true).await;
}

/// `/health` on `m`: its status and what its JSON says.
fn health(m: &Member, query: &str) -> (u16, String, String) {
    let r = curl(&format!("{}/health{query}", m.proc.endpoint()), &[]);
    let v: serde_json::Value = serde_json::from_str(r.body.trim()).unwrap_or_default();
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    (r.status, field("health"), field("reason"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_majority_fails_its_health_checks_until_the_heal() {
    let root = tempdir();
    let block = |n: &str| root.path().join(format!("block-{n}"));
    let files: Vec<String> = ["a", "b", "c"].iter().map(|n| block(n).display().to_string()).collect();
    let members = bootstrap_three(
        root.path(),
        &[&["--mesh-block-file", &files[0]], &["--mesh-block-file", &files[1]], &["--mesh-block-file", &files[2]]],
    );
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    for m in &members {
        eventually(&format!("{} healthy", m.name), Duration::from_secs(20), || async { health(m, "").0 == 200 }).await;
    }

    // Cut c off from a and b.
    std::fs::write(block("c"), "a\nb\n").unwrap();
    std::fs::write(block("a"), "c\n").unwrap();
    std::fs::write(block("b"), "c\n").unwrap();
    let c = &members[2];
    eventually("c to report itself unhealthy", Duration::from_secs(30), || async { health(c, "").0 == 503 }).await;
    let (_, healthy, reason) = health(c, "");
    assert_eq!(healthy, "false");
    assert!(reason == "RAFT NO LEADER" || reason.starts_with("RANGE ERROR:"), "why: {reason}");
    // It is alive and reads locally: a liveness probe must not restart it.
    assert_eq!(health(c, "?serializable=true").0, 200);
    assert_eq!(curl(&format!("{}/livez", c.proc.endpoint()), &[]).status, 200);
    let ready = curl(&format!("{}/readyz", c.proc.endpoint()), &[]);
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.body.starts_with("[+]data_corruption ok\n[+]serializable_read ok\n[-]linearizable_read failed: "),
        "{:?}",
        ready.body
    );
    let scraped = curl(&format!("{}/metrics", c.proc.endpoint()), &[]).body;
    assert_eq!(metric(&scraped, "etcd_server_has_leader"), Some(0.0));
    // The majority is ready: at once, or once it has elected a leader of its own (c
    // may have led it).
    eventually("a and b ready without c", Duration::from_secs(20), || async {
        let majority = curl(&format!("{}/readyz", members[0].proc.endpoint()), &[]);
        (majority.status, majority.body.as_str()) == (200, "ok\n")
    })
    .await;

    // Heal: c is healthy and ready again.
    for n in ["a", "b", "c"] {
        std::fs::write(block(n), "").unwrap();
    }
    eventually("c healthy after the heal", Duration::from_secs(30), || async { health(c, "").0 == 200 }).await;
    assert_eq!(curl(&format!("{}/readyz", c.proc.endpoint()), &[]).status, 200);
    let scraped = curl(&format!("{}/metrics", c.proc.endpoint()), &[]).body;
    assert_eq!(metric(&scraped, "etcd_server_has_leader"), Some(1.0));
    assert!(metric(&scraped, "etcd_server_leader_changes_seen_total").is_some_and(|n| n >= 1.0));
}

/// An alarm is the cluster's: NOSPACE, raised by the one member past its quota, stops
/// writes that take space on every member whatever their own quota, is listed on every
/// member, and reaches a member that joins later in its snapshot; disarmed through any
/// member, writes flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_raised_by_one_member_holds_on_every_member_until_disarmed() {
    let root = tempdir();
    let small = ["--quota-backend-bytes", "4194304", "--snapshot-count", "20"];
    let t = ["--snapshot-count", "20"];
    let mut members = bootstrap_three(root.path(), &[&small, &t, &t]);
    let a_id = member_id_of(&members[0]).await;
    let mut a = client(&members[0]).await;
    let no_space = "etcdserver: mvcc: database space exceeded";
    let mut filled = None;
    for i in 0..2000 {
        if let Err(e) = a.put(format!("fill/{i:05}"), noise(i, 8192), None).await {
            assert!(e.to_string().contains(no_space), "{e}");
            filled = Some(i);
            break;
        }
    }
    let filled = filled.expect("2000 puts of 8 KiB all fit in 4 MiB");
    assert!(filled > 50, "only {filled} puts fit");
    let listed = format!("memberID:{a_id} alarm:NOSPACE \n");
    for m in &members {
        assert_eq!(etcdctl(&m.proc.client_addr, &["alarm", "list"], None).stdout, listed, "on {}", m.name);
        let e = client(m).await.put("small", "x", None).await.unwrap_err();
        assert!(e.to_string().contains(no_space), "a put through {}: {e}", m.name);
    }
    // What takes no space goes on: each key deleted on its own, so that the log moves on
    // past what it keeps.
    let mut c = client(&members[2]).await;
    for i in 0..filled {
        assert_eq!(c.delete(format!("fill/{i:05}"), None).await.unwrap().deleted(), 1);
    }

    // A member that joins now learns of the alarm from its snapshot.
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &join, "--snapshot-count", "20"]);
    d.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    eventually("d to hold the alarm", Duration::from_secs(30), || async {
        etcdctl(&members[3].proc.client_addr, &["alarm", "list"], None).stdout == listed
    })
    .await;
    assert!(members[3].proc.log().contains("snapshot installed"), "{}", members[3].proc.log());

    let disarm = etcdctl(&members[2].proc.client_addr, &["alarm", "disarm"], None);
    assert_eq!(disarm.stdout, listed, "{disarm:?}");
    for m in &members {
        assert_eq!(etcdctl(&m.proc.client_addr, &["alarm", "list"], None).stdout, "", "on {}", m.name);
    }
    // b's own quota has room: its writes are taken again, by every member.
    let rev = client(&members[1]).await.put("after", "y", None).await.unwrap().header().unwrap().revision();
    catches_up_and_agrees(&members, &members[3], "after", rev).await;
}

fn gateway_call(m: &Member, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    gateway_post(&m.proc.endpoint(), path, body, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_tokens_and_permissions_hold_on_every_member() {
    let root = tempdir();
    let t = ["--snapshot-count", "20", "--bcrypt-cost", "4"];
    let mut members = bootstrap_three(root.path(), &[&t, &t, &t]);
    enable_auth(&members[0].proc.client_addr, "alice:apw", "/app/");
    // A token handed out by one member names its user to the others.
    let (status, v) = gateway_call(&members[0], "/v3/auth/authenticate", r#"{"name":"alice","password":"apw"}"#, None);
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let put = r#"{"key":"L2FwcC94","value":"MQ=="}"#; // /app/x = 1
    for m in &members {
        let (status, v) = gateway_call(m, "/v3/kv/put", put, Some(&token));
        assert_eq!(status, 200, "through {}: {v}", m.name);
        let (status, v) = gateway_call(m, "/v3/kv/put", r#"{"key":"L28=","value":"MQ=="}"#, Some(&token));
        assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{}", m.name);
    }
    // A permission revoked through one member refuses the next write through any other.
    let b = members[1].proc.client_addr.clone();
    let revoke = etcdctl(&b, &["--user=root:rootpw", "role", "revoke-permission", "alice", "/app/", "--prefix"], None);
    assert_eq!(revoke.status, 0, "{revoke:?}");
    for m in &members {
        let (status, v) = gateway_call(m, "/v3/kv/put", put, Some(&token));
        assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{}", m.name);
    }
    let grant = ["--user=root:rootpw", "role", "grant-permission", "alice", "--prefix", "readwrite", "/app/"];
    assert_eq!(etcdctl(&b, &grant, None).status, 0);
    // Writes past the log's reach, so that a member joining now starts from a snapshot,
    // which carries users, roles and the switch.
    let mut c = Client::connect(
        [members[2].proc.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("alice", "apw")),
    )
    .await
    .unwrap();
    for i in 0..300 {
        c.put(format!("/app/{i}"), "v", None).await.unwrap();
    }
    let join = members[0].peer.clone();
    let mut d =
        spawn(root.path(), "d", free_port(), &["--join", &join, "--snapshot-count", "20", "--bcrypt-cost", "4"]);
    d.proc.wait_ready(Duration::from_secs(60));
    members.push(d);
    let d = &members[3];
    let ep = d.proc.client_addr.clone();
    eventually("d to serve alice", Duration::from_secs(30), || async {
        etcdctl(&ep, &["--user=alice:apw", "get", "/app/299", "--print-value-only"], None).stdout == "v\n"
    })
    .await;
    assert!(d.proc.log().contains("snapshot installed"), "{}", d.proc.log());
    let anonymous = etcdctl(&ep, &["get", "/app/299"], None);
    assert!(anonymous.stderr.contains("etcdserver: user name is empty"), "{anonymous:?}");
    let other = etcdctl(&ep, &["--user=alice:apw", "put", "/o", "1"], None);
    assert!(other.stderr.contains("etcdserver: permission denied"), "{other:?}");
}

/// Writes an RSA key pair for `--auth-token jwt,…` with openssl; returns the flag.
fn jwt_flag(dir: &std::path::Path, name: &str) -> String {
    let key = dir.join(format!("{name}.rsa"));
    let public = dir.join(format!("{name}.rsa.pub"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["genrsa", "-out", &key.display().to_string(), "2048"]);
    run(&["rsa", "-in", &key.display().to_string(), "-pubout", "-out", &public.display().to_string()]);
    format!("jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m", public.display(), key.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_hold_on_every_member_across_restarts_until_auth_changes() {
    let root = tempdir();
    let flag = jwt_flag(root.path(), "cluster");
    let t = ["--auth-token", flag.as_str(), "--bcrypt-cost", "4"];
    let mut members = bootstrap_three(root.path(), &[&t, &t, &t]);
    enable_auth(&members[0].proc.client_addr, "alice:apw", "/app/");
    let (status, v) = gateway_call(&members[0], "/v3/auth/authenticate", r#"{"name":"alice","password":"apw"}"#, None);
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    // /app/x = 1
    let put = r#"{"key":"L2FwcC94","value":"MQ=="}"#;
    // Every member checks the signature itself; a member that restarts forgets nothing.
    // (A follower restarts: a leader's restart would drop the writes in flight.)
    let refs: Vec<&Member> = members.iter().collect();
    let leader = leader_of(&refs).await.expect("a leader");
    let mut follower = 0;
    for (i, m) in members.iter().enumerate() {
        if member_id_of(m).await != leader {
            follower = i;
        }
    }
    members[follower].proc.kill9();
    restart(&mut members[follower]);
    members[follower].proc.wait_ready(Duration::from_secs(60));
    for m in &members {
        let (status, v) = gateway_call(m, "/v3/kv/put", put, Some(&token));
        assert_eq!(status, 200, "through {}: {v}", m.name);
        let (status, v) = gateway_call(m, "/v3/kv/put", r#"{"key":"L28=","value":"MQ=="}"#, Some(&token));
        assert_eq!((status, v["message"].as_str()), (403, Some("etcdserver: permission denied")), "{}", m.name);
    }
    // A token signed with another key names nobody.
    let other = jwt_flag(root.path(), "other");
    let mut stranger = start_meshkv(&root.path().join("stranger"), &["--auth-token", &other, "--bcrypt-cost", "4"]);
    stranger.wait_ready(Duration::from_secs(60));
    enable_auth(&stranger.client_addr, "alice:apw", "/app/");
    let (status, v) =
        gateway_post(&stranger.endpoint(), "/v3/auth/authenticate", r#"{"name":"alice","password":"apw"}"#, None);
    assert_eq!(status, 200, "{v}");
    let forged = v["token"].as_str().unwrap();
    let (status, v) = gateway_call(&members[2], "/v3/kv/put", put, Some(forged));
    assert_eq!((status, v["message"].as_str()), (401, Some("etcdserver: invalid auth token")), "{v}");
    // A change to users, roles or permissions through any member retires every token
    // issued before it, in etcd's words; clients sign in again.
    let grant = ["--user=root:rootpw", "role", "grant-permission", "alice", "--prefix", "read", "/o/"];
    assert_eq!(etcdctl(&members[2].proc.client_addr, &grant, None).status, 0);
    for m in &members {
        let ep = m.proc.endpoint();
        let tok = token.clone();
        eventually("the old token to be refused", Duration::from_secs(10), || {
            let (ep, tok) = (ep.clone(), tok.clone());
            async move {
                let (status, v) = gateway_post(&ep, "/v3/kv/put", put, Some(&tok));
                (status, v["message"].as_str()) == (400, Some("etcdserver: revision of auth store is old"))
            }
        })
        .await;
    }
    let out = etcdctl(&members[1].proc.client_addr, &["--user=alice:apw", "put", "/app/y", "2"], None);
    assert_eq!(out.status, 0, "{out:?}");
    // A client that signs in now gets a token of the new revision.
    let mut c = Client::connect(
        [members[0].proc.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("alice", "apw")),
    )
    .await
    .unwrap();
    c.put("/app/z", "3", None).await.unwrap();
    assert_eq!(c.get("/app/y", None).await.unwrap().kvs()[0].value(), b"2");
}

/// A write that a follower forwards to a leader which then freezes (its socket holds the
/// write, unread) is proposed again to the leader elected next: the client gets its
/// answer after the election rather than "request timed out". It is applied once, though
/// the old leader, running again, reads the first copy as the leader it still believes
/// it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_to_a_leader_that_freezes_goes_to_the_next_leader_once() {
    let root = tempdir();
    let members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    let leader = leader_of(&refs).await.unwrap();
    let mut li = 0;
    for (i, m) in members.iter().enumerate() {
        if member_id_of(m).await == leader {
            li = i;
        }
    }
    let follower = &members[(li + 1) % 3];
    // Longer than the member's own request timeout (7 s), so the member's answer is heard.
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(20));
    let mut c = Client::connect([follower.proc.endpoint()], Some(opts)).await.unwrap();
    c.put("before", "1", None).await.unwrap();

    members[li].proc.pause();
    let started = Instant::now();
    let put = c.put("forwarded", "once", None).await;
    let took = started.elapsed();
    members[li].proc.resume();
    let put = put.unwrap_or_else(|e| panic!("the write through {} failed after {took:?}: {e}", follower.name));
    println!("the write forwarded to a frozen leader was answered after {took:?}");
    let rev = put.header().unwrap().revision();

    let after = c.put("after", "1", None).await.unwrap().header().unwrap().revision();
    catches_up_and_agrees(&members, &members[li], "after", after).await;
    for m in &members {
        let g = client(m).await.get("forwarded", Some(GetOptions::new().with_serializable())).await.unwrap();
        let kv = &g.kvs()[0];
        assert_eq!(
            (kv.value(), kv.version(), kv.create_revision(), kv.mod_revision()),
            (&b"once"[..], 1, rev, rev),
            "{} applied the forwarded write once, at the revision its client was told",
            m.name
        );
    }
}

/// Three bootstrap members, each following its block file in `root` (`block-a`, …); b
/// with `b_extra` besides.
fn three_with_drills(root: &std::path::Path, b_extra: &[&str]) -> Vec<Member> {
    let flag = |n: &str| root.join(format!("block-{n}")).display().to_string();
    let (fa, fb, fc) = (flag("a"), flag("b"), flag("c"));
    let mut b: Vec<&str> = vec!["--mesh-block-file", &fb];
    b.extend_from_slice(b_extra);
    bootstrap_three(root, &[&["--mesh-block-file", &fa], &b, &["--mesh-block-file", &fc]])
}

/// Cuts b off from a and c, and waits until every member has the drill in force.
fn cut_off_b(root: &std::path::Path, members: &[Member]) {
    for (n, peers) in [("a", "b\n"), ("b", "a\nc\n"), ("c", "b\n")] {
        std::fs::write(root.join(format!("block-{n}")), peers).unwrap();
    }
    let cut = "failure drill: mesh traffic with this peer is now dropped peer=";
    wait_until("b cut off from a and c", Duration::from_secs(10), || {
        let (a, b, c) = (members[0].proc.log(), members[1].proc.log(), members[2].proc.log());
        a.contains(&format!("{cut}b"))
            && b.contains(&format!("{cut}a"))
            && b.contains(&format!("{cut}c"))
            && c.contains(&format!("{cut}b"))
    });
}

/// Puts `key` through `m` until a put is taken, within `within`; its revision.
async fn put_until_taken(m: &Member, key: &str, within: Duration) -> i64 {
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3));
    let mut c = Client::connect([m.proc.endpoint()], Some(opts)).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = c.put(key, "1", None).await {
            return r.header().unwrap().revision();
        }
        assert!(Instant::now() < deadline, "a write of {key} through {} is taken within {within:?}", m.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// a and c go down, c loses its data, the cut heals, and c starts again, empty.
fn c_loses_its_disk_while_a_is_down(root: &std::path::Path, members: &mut [Member]) {
    members[0].proc.kill9();
    members[2].proc.kill9();
    std::fs::remove_dir_all(&members[2].dir).unwrap();
    for n in ["a", "b", "c"] {
        std::fs::write(root.join(format!("block-{n}")), "").unwrap();
    }
    restart(&mut members[2]);
    // c runs, asking to be taken back; it is not ready before it is, which needs a.
    let c = &members[2].proc;
    wait_until("c's store to open", Duration::from_secs(60), || c.log().contains("store opened"));
}

/// a starts again: writes are taken, c catches up, and every member holds `key` as
/// written at `rev`.
async fn a_returns_and_everyone_holds(members: &mut [Member], key: &str, rev: i64) {
    restart(&mut members[0]);
    members[0].proc.wait_ready(Duration::from_secs(60));
    let after = put_until_taken(&members[0], "after", Duration::from_secs(40)).await;
    members[2].proc.wait_ready(Duration::from_secs(60));
    catches_up_and_agrees(members, &members[2], "after", after).await;
    for m in members.iter() {
        let g = client(m).await.get(key, None).await.unwrap();
        assert_eq!(g.kvs().first().map(|kv| kv.mod_revision()), Some(rev), "{} holds {key} at {rev}", m.name);
    }
}

/// A member that lost its disk does not vote until the cluster has taken it back: a and c
/// commit a write while b is cut off; a goes down and c comes back empty. b, which lacks
/// the write, cannot win with c's vote, so the cluster waits for a rather than losing
/// the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_disk_cannot_elect_one_that_lacks_a_committed_write() {
    let root = tempdir();
    let mut members = three_with_drills(root.path(), &[]);
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;

    cut_off_b(root.path(), &members);
    let rev = put_until_taken(&members[0], "without-b", Duration::from_secs(30)).await;
    let on_b = client(&members[1]).await.get("without-b", Some(GetOptions::new().with_serializable())).await;
    assert!(on_b.unwrap().kvs().is_empty(), "b, cut off, does not have the write");

    c_loses_its_disk_while_a_is_down(root.path(), &mut members);
    // Time for b to campaign several times over (elections time out after 1 to 2 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let status = client(&members[1]).await.status().await.unwrap();
    assert_ne!(status.leader(), status.header().unwrap().member_id(), "b is not leader while a is down");
    let c = members[2].proc.log();
    assert!(!c.contains("ready to serve client requests"), "c is not taken back while a is down: {c}");
    a_returns_and_everyone_holds(&mut members, "without-b", rev).await;
}

/// A leader cut off from the others believes it leads until its election timeout (here
/// 20 s) tells it otherwise. A member that lost its data and started again meanwhile no
/// longer knows the later term it had moved on to, and answers that leader: its
/// acknowledgements must not count, or the stale leader would commit a write the
/// others have already overwritten, and acknowledge it only for it to be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_disk_cannot_help_a_stale_leader_commit() {
    let root = tempdir();
    let mut members = three_with_drills(root.path(), &["--election-timeout", "20000"]);
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    let b_id = member_id_of(&members[1]).await;
    eventually("b to lead", Duration::from_secs(20), || async {
        let Some(leader) = leader_of(&refs).await else { return false };
        if leader != b_id {
            for m in &members {
                if member_id_of(m).await == leader {
                    let _ = client(m).await.move_leader(b_id).await;
                }
            }
        }
        client(&members[1]).await.status().await.is_ok_and(|s| s.leader() == b_id)
    })
    .await;
    client(&members[1]).await.put("before", "1", None).await.unwrap();

    cut_off_b(root.path(), &members);
    // A write to b, which still believes it leads: it waits in b's log for a quorum.
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(20));
    let mut cb = Client::connect([members[1].proc.endpoint()], Some(opts)).await.unwrap();
    let via_b = tokio::spawn(async move { cb.put("via-b", "1", None).await.map(|r| r.header().unwrap().revision()) });
    let rev = put_until_taken(&members[0], "without-b", Duration::from_secs(30)).await;

    c_loses_its_disk_while_a_is_down(root.path(), &mut members);
    let via_b = via_b.await.unwrap();
    println!("the write to the stale leader: {via_b:?}");
    a_returns_and_everyone_holds(&mut members, "without-b", rev).await;
    if let Ok(at) = via_b {
        for m in &members {
            let g = client(m).await.get("via-b", None).await.unwrap();
            assert_eq!(g.kvs().first().map(|kv| kv.mod_revision()), Some(at), "{} lost a write b acknowledged", m.name);
        }
    }
}

/// Changes the value `key` was written with at revision `rev` in the store of a stopped
/// member, behind Raft's back: what a bad disk or a bug below the store would do.
fn alter_stored_value(dir: &std::path::Path, key: &str, rev: i64, value: &str) {
    use meshkv::store::engine::{Engine, CF_KV};
    use prost::Message as _;
    let engine = Engine::open(dir).unwrap();
    let db = engine.db();
    let mut found = None;
    for item in db.iterator_cf(engine.cf(CF_KV), rocksdb::IteratorMode::Start) {
        let (k, v) = item.unwrap();
        let kv = meshkv::pb::mvccpb::KeyValue::decode(v.as_ref()).unwrap();
        if kv.key == key.as_bytes() && kv.mod_revision == rev {
            found = Some((k, kv));
        }
    }
    let (k, mut kv) = found.unwrap_or_else(|| panic!("{key} at {rev} is not in {}", dir.display()));
    kv.value = value.as_bytes().to_vec().into();
    db.put_cf(engine.cf(CF_KV), k, kv.encode_to_vec()).unwrap();
}

/// etcd's corruption checks. While the stores agree, the leader's periodic check finds
/// nothing, under writes. A member whose store was altered while it was down refuses to
/// start with the initial check; started without it, it is found by the leader, which
/// raises the CORRUPT alarm for it: every member then refuses writes, in etcd's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_store_was_altered_is_refused_at_start_and_alarmed_by_the_leader() {
    let root = tempdir();
    let check: [&str; 1] = ["--experimental-corrupt-check-time=1s"];
    let mut members = bootstrap_three(root.path(), &[&check, &check, &check]);
    let refs: Vec<&Member> = members.iter().collect();
    eventually("a leader", Duration::from_secs(20), || async { leader_of(&refs).await.is_some() }).await;
    let leader = leader_of(&refs).await.unwrap();
    let mut ids = Vec::new();
    for m in &members {
        ids.push(member_id_of(m).await);
    }
    let l = ids.iter().position(|id| *id == leader).unwrap();
    let v = (l + 1) % 3;
    let mut c = client(&members[l]).await;
    let altered_at = c.put("k", "original", None).await.unwrap().header().unwrap().revision();
    let rounds = |log: &str| log.matches("finished peer corruption check peers_checked=2").count();
    let before = rounds(&members[l].proc.log());
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        c.put(format!("load/{i}"), "x", None).await.unwrap();
        if rounds(&members[l].proc.log()) >= before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no two checks by the leader in 30 s: {}", members[l].proc.log());
    }
    assert_eq!(etcdctl(&members[l].proc.client_addr, &["alarm", "list"], None).stdout, "", "no alarm while they agree");
    let rev = c.put("last", "x", None).await.unwrap().header().unwrap().revision();
    catches_up_and_agrees(&members, &members[v], "last", rev).await;

    // Unaltered, it passes the check at start.
    let port: u16 = members[v].peer.rsplit(':').next().unwrap().parse().unwrap();
    let mut args: Vec<String> = members[v].args.clone();
    args.push("--experimental-initial-corrupt-check=true".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    members[v].proc.terminate();
    let mut checked = spawn_meshkv(&members[v].dir, &peer_url(port), &args);
    checked.wait_ready(Duration::from_secs(60));
    let log = checked.log();
    let passed = log.lines().find(|l| l.contains("initial corruption checking passed; no corruption"));
    assert!(passed.is_some_and(|l| l.ends_with("peers_checked=2")), "{log}");
    checked.terminate();

    alter_stored_value(&members[v].dir, "k", altered_at, "altered");
    let mut refused = spawn_meshkv(&members[v].dir, &peer_url(port), &args);
    wait_until("the altered member to stop", Duration::from_secs(30), || refused.child.try_wait().unwrap().is_some());
    let status = refused.child.wait().unwrap();
    let log = refused.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("{:x} found data inconsistency with peers", ids[v])), "{log}");
    assert!(!log.contains("ready to serve client requests"), "{log}");

    restart(&mut members[v]);
    members[v].proc.wait_ready(Duration::from_secs(60));
    let got = client(&members[v]).await.get("k", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"altered", "the alteration survived the restart");
    let listed = format!("memberID:{} alarm:CORRUPT \n", ids[v]);
    eventually("the leader to raise CORRUPT for the altered member", Duration::from_secs(30), || async {
        etcdctl(&members[l].proc.client_addr, &["alarm", "list"], None).stdout == listed
    })
    .await;
    for m in &members {
        assert_eq!(etcdctl(&m.proc.client_addr, &["alarm", "list"], None).stdout, listed, "on {}", m.name);
        let e = client(m).await.put("after", "y", None).await.unwrap_err();
        assert!(e.to_string().contains("etcdserver: corrupt cluster"), "a put through {}: {e}", m.name);
    }
}

/// Whether `m`'s mesh has a route to the member named `to`.
async fn reaches(m: &Member, to: &str) -> bool {
    use meshkv::pb::meshkvpb::{admin_client::AdminClient, MeshStatusRequest};
    let Ok(ch) = tonic::transport::Endpoint::from_shared(m.proc.endpoint()).unwrap().connect().await else {
        return false;
    };
    let Ok(s) = AdminClient::new(ch).mesh_status(MeshStatusRequest {}).await else { return false };
    s.into_inner().peers.iter().any(|p| p.name == to && !p.next_hop.is_empty())
}

/// Writes each member's block file in `root`: `cuts` names, for each member, the peers
/// whose traffic it drops.
fn drill(root: &std::path::Path, cuts: &[(&str, &str)]) {
    for (n, peers) in cuts {
        std::fs::write(root.join(format!("block-{n}")), peers).unwrap();
    }
}

/// etcd's strict reconfiguration check, on by default: with c cut off, removing b would
/// leave a alone of the two voters left, and is refused in etcd's words with b kept.
/// Removing c, which the active quorum does not count on, goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_voter_the_quorum_needs_is_refused() {
    let root = tempdir();
    let members = three_with_drills(root.path(), &[]);
    drill(root.path(), &[("a", "c\n"), ("b", "c\n"), ("c", "a\nb\n")]);
    eventually("a and b to lose their routes to c", Duration::from_secs(20), || async {
        !reaches(&members[0], "c").await && !reaches(&members[1], "c").await
    })
    .await;
    let (a, b, c) = (&members[0], &members[1], &members[2]);
    let b_id = member_id_of(b).await;
    let out = etcdctl(&a.proc.client_addr, &["member", "remove", &format!("{b_id:x}")], None);
    assert_ne!(out.status, 0, "{out:?}");
    assert!(out.stderr.contains("etcdserver: unhealthy cluster"), "{}", out.stderr);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(roles(a).await, Some((names(&["a", "b", "c"]), vec![])));
    let c_id = member_id_of(c).await;
    let out = etcdctl(&a.proc.client_addr, &["member", "remove", &format!("{c_id:x}")], None);
    assert_eq!(out.status, 0, "{out:?}");
    eventually("c to be gone", Duration::from_secs(10), || async {
        roles(a).await == Some((names(&["a", "b"]), vec![]))
    })
    .await;
    // Both voters left are up: the cluster still takes writes.
    put_until_taken(b, "after", Duration::from_secs(10)).await;
}

/// A learner is promoted only once it holds nine tenths of the leader's log, as etcd
/// has it; the leader judges, whichever member the client asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_behind_the_leader_is_not_promoted_until_it_catches_up() {
    let root = tempdir();
    // No member is taken for dead while it is cut off.
    let flags: Vec<Vec<String>> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let block = root.path().join(format!("block-{n}")).display().to_string();
            ["--mesh-block-file", &block, "--dead-member-timeout", "600"].map(String::from).to_vec()
        })
        .collect();
    let f: Vec<Vec<&str>> = flags.iter().map(|v| v.iter().map(String::as_str).collect()).collect();
    let members = bootstrap_three(root.path(), &[&f[0], &f[1], &f[2]]);
    let join = members[0].peer.clone();
    let mut d = spawn(root.path(), "d", free_port(), &[&["--join", join.as_str()][..], &f[3]].concat());
    d.proc.wait_ready(Duration::from_secs(60));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    eventually("d to join as a learner", Duration::from_secs(20), || async {
        roles(&members[0]).await == Some((names(&["a", "b", "c"]), names(&["d"])))
    })
    .await;
    drill(root.path(), &[("a", "d\n"), ("b", "d\n"), ("c", "d\n"), ("d", "a\nb\nc\n")]);
    eventually("the others to lose their routes to d", Duration::from_secs(20), || async {
        !reaches(&members[0], "d").await && !reaches(&members[1], "d").await && !reaches(&members[2], "d").await
    })
    .await;
    let mut c = client(&members[0]).await;
    for i in 0..300 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let d_id = member_id_of(&d).await;
    let refs: Vec<&Member> = members.iter().collect();
    let leader = leader_of(&refs).await.unwrap();
    let mut follower = None;
    for m in &members {
        if member_id_of(m).await != leader {
            follower = Some(m);
        }
    }
    let follower = follower.unwrap();
    let promote = || etcdctl(&follower.proc.client_addr, &["member", "promote", &format!("{d_id:x}")], None);
    let out = promote();
    assert_ne!(out.status, 0, "{out:?}");
    assert!(out.stderr.contains("can only promote a learner member which is in sync with leader"), "{}", out.stderr);
    assert_eq!(roles(&members[0]).await, Some((names(&["a", "b", "c"]), names(&["d"]))));

    drill(root.path(), &[("a", ""), ("b", ""), ("c", ""), ("d", "")]);
    eventually("d to catch up and be promoted", Duration::from_secs(30), || async { promote().status == 0 }).await;
    eventually("d to be a voter", Duration::from_secs(10), || async {
        roles(&members[0]).await == Some((names(&["a", "b", "c", "d"]), vec![]))
    })
    .await;
    d.proc.kill9();
}

/// etcd's --force-new-cluster: two of three members are gone for good, so the third
/// cannot write. Started again with the flag, it is the only member of a new cluster,
/// with its data. A member of the old cluster that comes back with its old data is
/// refused (it may hold writes the survivor never had); with an empty data dir it
/// joins and is promoted, and holds what the survivor had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_of_a_lost_quorum_forms_a_new_cluster_with_its_data() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let before = client(&members[0]).await.put("before", "v", None).await.unwrap();
    let old_cluster = before.header().unwrap().cluster_id();
    eventually("a to hold the write", Duration::from_secs(20), || async {
        let g = client(&members[0]).await.get("before", Some(GetOptions::new().with_serializable())).await;
        g.is_ok_and(|g| g.kvs().len() == 1)
    })
    .await;
    members[1].proc.kill9();
    members[2].proc.kill9();
    let stuck = client(&members[0]).await.put("lost quorum", "v", None).await;
    assert!(stuck.is_err(), "no quorum: {stuck:?}");

    let a = &mut members[0];
    a.proc.terminate();
    a.args.push("--force-new-cluster".into());
    restart(a);
    a.proc.wait_ready(Duration::from_secs(60));
    eventually("a to lead alone", Duration::from_secs(20), || async {
        roles(&members[0]).await == Some((names(&["a"]), vec![]))
    })
    .await;
    let mut c = client(&members[0]).await;
    let after = c.put("after", "v", None).await.unwrap();
    assert_ne!(after.header().unwrap().cluster_id(), old_cluster, "a new cluster");
    let got = c.get("before", None).await.unwrap();
    assert_eq!(got.kvs()[0].mod_revision(), before.header().unwrap().revision(), "its data kept");
    assert!(members[0].proc.log().contains("--force-new-cluster: this member is made the only voter"));

    // b with its old data: another cluster's member now.
    let b_join = ["--join".to_string(), members[0].peer.clone()];
    let b = &mut members[1];
    b.args.retain(|a| a != "--bootstrap-expect" && a != "3" && a != "--join" && !a.starts_with("127.0.0.1:"));
    b.args.extend(b_join);
    restart(b);
    let refused = |log: String| log.contains("refusing mesh peer") && log.contains("cannot move between clusters");
    eventually("b to be refused", Duration::from_secs(20), || async {
        refused(members[0].proc.log()) || refused(members[1].proc.log())
    })
    .await;
    assert_eq!(roles(&members[0]).await, Some((names(&["a"]), vec![])), "b is not taken back with its old data");

    // b with an empty data dir joins the new cluster and catches up.
    members[1].proc.kill9();
    std::fs::remove_dir_all(&members[1].dir).unwrap();
    restart(&mut members[1]);
    members[1].proc.wait_ready(Duration::from_secs(60));
    eventually("b to join and be promoted", Duration::from_secs(30), || async {
        roles(&members[0]).await == Some((names(&["a", "b"]), vec![]))
    })
    .await;
    let on_b = client(&members[1]).await.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let keys: Vec<&[u8]> = on_b.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [&b"after"[..], b"before"]);

    // a started again without the flag keeps the new cluster as it is.
    let a = &mut members[0];
    a.proc.terminate();
    a.args.retain(|f| f != "--force-new-cluster");
    restart(a);
    a.proc.wait_ready(Duration::from_secs(60));
    eventually("a and b to serve writes", Duration::from_secs(30), || async {
        client(&members[1]).await.put("again", "v", None).await.is_ok()
    })
    .await;
    assert_eq!(roles(&members[0]).await, Some((names(&["a", "b"]), vec![])));
    let logs: String = members.iter().map(|m| m.proc.log()).collect();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Hands the lead to `members[to]`, and waits until it has it.
async fn lead_to(members: &[Member], to: usize) {
    let target = member_id_of(&members[to]).await;
    let refs: Vec<&Member> = members.iter().collect();
    eventually("the lead to move", Duration::from_secs(20), || async {
        let Some(leader) = leader_of(&refs).await else { return false };
        if leader == target {
            return true;
        }
        for m in members {
            if member_id_of(m).await == leader {
                let _ = client(m).await.move_leader(target).await;
            }
        }
        false
    })
    .await;
}

/// What `meshkv status` prints through `m`.
fn status_of(m: &Member) -> String {
    let out =
        std::process::Command::new(meshkv_bin()).args(["status", "--endpoint", &m.proc.client_addr]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cluster version on `m`, from its metrics.
fn cluster_version(m: &Member) -> Option<f64> {
    metric(&curl(&format!("http://{}/metrics", m.proc.client_addr), &[]).body, "meshkv_cluster_version")
}

/// A cluster upgraded one member at a time. A newer build (an upgrade drill plays one: it
/// announces protocol 4 beside the build's 3) meshes with the older members in the
/// protocol they share, and the cluster serves throughout; the cluster version rises to
/// 4 only once every member speaks it. A member started again on the older build is then
/// refused, and is back with everything once it runs the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_upgraded_one_member_at_a_time_raises_its_version_and_refuses_a_downgrade() {
    let root = tempdir();
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    eventually("cluster version 3 on every member", Duration::from_secs(20), || async {
        members.iter().all(|m| cluster_version(m) == Some(3.0))
    })
    .await;
    for i in 0..3 {
        members[i].proc.terminate();
        members[i].args.extend(["--drill-mesh-protocol".to_string(), "4".to_string()]);
        restart(&mut members[i]);
        members[i].proc.wait_ready(Duration::from_secs(60));
        let key = format!("upgraded/{i}");
        let put = client(&members[i]).await.put(key.as_str(), "x", None).await.unwrap();
        for m in &members {
            catches_up_and_agrees(&members, m, &key, put.header().unwrap().revision()).await;
        }
        if i < 2 {
            let status = status_of(&members[i]);
            assert!(status.contains("cluster version 3 ") && status.contains(" (protocol 3)"), "{status}");
            // Even with the lead, an upgraded member keeps the version while one is older:
            // through 2 s of writes (the leader weighs it twice a second).
            lead_to(&members, i).await;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                for m in &members {
                    let put = client(m).await.put("during", m.name.as_str(), None).await;
                    put.unwrap_or_else(|e| panic!("a write through {} failed: {e}\n{}", m.name, m.proc.log()));
                    assert_eq!(cluster_version(m), Some(3.0), "{} while a member speaks only 3", m.name);
                }
            }
        }
    }
    eventually("cluster version 4 on every member", Duration::from_secs(20), || async {
        members.iter().all(|m| cluster_version(m) == Some(4.0))
    })
    .await;
    let status = status_of(&members[1]);
    assert!(status.contains("cluster version 4 ") && !status.contains(" (protocol 3)"), "{status}");

    // Back on the build's own protocol, a member is refused at start.
    members[0].proc.terminate();
    let port: u16 = members[0].peer.rsplit(':').next().unwrap().parse().unwrap();
    let older: Vec<&str> =
        members[0].args.iter().map(String::as_str).take_while(|a| *a != "--drill-mesh-protocol").collect();
    let mut refused = spawn_meshkv(&members[0].dir, &peer_url(port), &older);
    wait_until("the older build to stop", Duration::from_secs(30), || refused.child.try_wait().unwrap().is_some());
    let status = refused.child.wait().unwrap();
    let log = refused.log();
    assert!(!status.success(), "{log}");
    let says = "the cluster runs mesh protocol 4 and this member's build speaks up to 3";
    assert!(log.contains(says) && !log.contains("ready to serve client requests"), "{log}");

    restart(&mut members[0]);
    members[0].proc.wait_ready(Duration::from_secs(60));
    let got = client(&members[0]).await.get("upgraded/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(got.kvs().len(), 3, "every write of the upgrade is there");
}

/// A member that meets a cluster version newer than its build speaks in the log (it was
/// cut off when the others raised it, then started again on an older build) stops, and
/// its process ends saying which protocol to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_meets_a_newer_cluster_version_in_the_log_stops_and_says_why() {
    let root = tempdir();
    let drill = |v: &str| ["--drill-mesh-protocol".to_string(), v.to_string()];
    let four: [&str; 2] = ["--drill-mesh-protocol", "4"];
    let mut members = bootstrap_three(root.path(), &[&four, &four, &four]);
    eventually("cluster version 4", Duration::from_secs(20), || async {
        members.iter().all(|m| cluster_version(m) == Some(4.0))
    })
    .await;
    // a and b move on to 5; c too, but hearing nothing from them, it applies nothing.
    let block = root.path().join("block-c");
    std::fs::write(&block, "<a\n<b\n").unwrap();
    for (i, m) in members.iter_mut().enumerate() {
        m.proc.terminate();
        m.args.truncate(m.args.len() - 2);
        m.args.extend(drill("5"));
        if i == 2 {
            m.args.extend(["--mesh-block-file".to_string(), block.display().to_string()]);
        }
        restart(m);
        m.proc.wait_ready(Duration::from_secs(60));
    }
    eventually("cluster version 5 on a and b", Duration::from_secs(20), || async {
        members[..2].iter().all(|m| cluster_version(m) == Some(5.0))
    })
    .await;
    assert_eq!(cluster_version(&members[2]), Some(4.0), "c applied nothing: {}", members[2].proc.log());

    // c, on a build of protocol 4, starts (its data says 4) and meets 5 in the log.
    members[2].proc.kill9();
    std::fs::write(&block, "").unwrap();
    let port: u16 = members[2].peer.rsplit(':').next().unwrap().parse().unwrap();
    let mut args: Vec<String> = members[2].args.clone();
    args.truncate(args.len() - 4);
    args.extend(drill("4"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut older = spawn_meshkv(&members[2].dir, &peer_url(port), &args);
    wait_until("c to stop", Duration::from_secs(30), || older.child.try_wait().unwrap().is_some());
    let status = older.child.wait().unwrap();
    let log = older.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("stopped: the cluster runs mesh protocol 5 and this member's build speaks up to 4"), "{log}");
}

/// A member whose build is older than the cluster version is not added when it joins: the
/// leader tells it the version, and its process ends saying which protocol to run, as
/// etcd refuses a member incompatible with the running cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_older_than_the_cluster_version_is_not_added_and_says_why() {
    let root = tempdir();
    let four: [&str; 2] = ["--drill-mesh-protocol", "4"];
    let members = bootstrap_three(root.path(), &[&four, &four, &four]);
    eventually("cluster version 4", Duration::from_secs(20), || async {
        members.iter().all(|m| cluster_version(m) == Some(4.0))
    })
    .await;
    let mut d = spawn(root.path(), "d", free_port(), &["--join", &members[0].peer]);
    wait_until("d to stop", Duration::from_secs(30), || d.proc.child.try_wait().unwrap().is_some());
    let status = d.proc.child.wait().unwrap();
    let log = d.proc.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("stopped: the cluster runs mesh protocol 4 and this member's build speaks up to 3"), "{log}");
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(roles(&members[1]).await, Some((names(&["a", "b", "c"]), vec![])), "d was never added");

    // The same member on a build that speaks 4 joins.
    d.args.extend(four.iter().map(|a| a.to_string()));
    restart(&mut d);
    d.proc.wait_ready(Duration::from_secs(60));
    eventually("d to join", Duration::from_secs(20), || async {
        roles(&members[1]).await == Some((names(&["a", "b", "c"]), names(&["d"])))
    })
    .await;
}

/// A member whose disk fills stops, saying why, and the other two go on taking writes;
/// once its disk has room again it starts, catches up and holds what they hold. It leads
/// when its disk fills: the writes in flight go to the next leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_stops_while_the_others_go_on_then_catches_up() {
    const VALUE: usize = 256 << 10;
    let root = tempdir();
    // c's data dir on a disk with room for a fresh member and a few flushes.
    let disk = match SmallDisk::mount(&root.path().join("c"), 96) {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let mut members = bootstrap_three(root.path(), &[&[], &[], &[]]);
    lead_to(&members, 2).await;
    let mut c = client(&members[0]).await;
    let mut i = 0u64;
    while members[2].proc.child.try_wait().unwrap().is_none() {
        assert!(i < 1000, "c's disk never filled: {}", members[2].proc.log());
        let put = c.put(format!("full/{i:04}"), noise(i, VALUE), None).await;
        put.unwrap_or_else(|e| panic!("a write while c's disk fills failed: {e}\n{}", members[2].proc.log()));
        i += 1;
    }
    let log = members[2].proc.log();
    assert!(log.contains("stopped: ") && log.contains("No space left on device"), "{log}");
    // The other two take writes without c.
    let mut rev = 0;
    for _ in 0..20 {
        let put = c.put(format!("full/{i:04}"), noise(i, VALUE), None).await.unwrap();
        rev = put.header().unwrap().revision();
        i += 1;
    }

    disk.resize(512);
    restart(&mut members[2]);
    members[2].proc.wait_ready(Duration::from_secs(60));
    catches_up_and_agrees(&members, &members[2], &format!("full/{:04}", i - 1), rev).await;
}
