//! `meshkv bench mesh`: MeshConn datagrams between peers on loopback, in one process,
//! over real sockets: directly between two peers, and through a relay (a third peer
//! in between, with the direct link cut).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::mesh::{GossipData, Mesh, MeshConfig, MeshConn, Priority, SendError};

/// One measurement.
#[derive(Debug, Clone)]
pub struct MeshBench {
    pub path: &'static str,
    pub size: usize,
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
    pub seconds: f64,
}

impl MeshBench {
    pub fn per_sec(&self) -> f64 {
        self.received as f64 / self.seconds
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.received as f64 * self.size as f64 / self.seconds / 1e6
    }
    pub fn table_header() -> &'static str {
        "| path | datagram | received/s | MB/s | sent | received | dropped at send |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    }
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} B | {:.0} | {:.1} | {} | {} | {} |",
            self.path,
            self.size,
            self.per_sec(),
            self.mb_per_sec(),
            self.sent,
            self.received,
            self.dropped
        )
    }
}

async fn peer(name: &str, join: Option<&Mesh>) -> Mesh {
    let mut c = MeshConfig::new(name);
    c.cluster = "bench".into();
    c.join = join.map(|j| vec![j.addr().to_string()]).unwrap_or_default();
    Mesh::start(c, Vec::<(String, Box<dyn GossipData>)>::new()).await.expect("start a mesh peer on loopback")
}

async fn wait_route(from: &Mesh, to: &str, via: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if from.status().peers.iter().any(|p| p.name == to && p.next_hop.as_deref() == Some(via)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no route from {} to {to} via {via}", from.name());
}

/// Sends as fast as the queues take for `duration`, and counts what arrives.
async fn blast(
    from: &MeshConn,
    to: &MeshConn,
    dst: &str,
    size: usize,
    duration: Duration,
    path: &'static str,
) -> MeshBench {
    let prio = if size <= 1024 { Priority::Control } else { Priority::Bulk };
    let rx = to.clone();
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv_from()).await {
            n += 1;
        }
        n
    });
    let payload = Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    let (mut sent, mut dropped) = (0u64, 0u64);
    while start.elapsed() < duration {
        match from.send_to(dst, payload.clone(), prio) {
            Ok(()) => sent += 1,
            Err(SendError::QueueFull) => {
                dropped += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("send failed: {e}"),
        }
        if sent % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let received = counter.await.unwrap_or(0);
    // The receiver stops 300 ms after the last arrival; that wait is not throughput.
    let seconds = start.elapsed().as_secs_f64().min(duration.as_secs_f64() + 0.3);
    MeshBench { path, size, sent, received, dropped, seconds }
}

/// Runs the four measurements: direct and relayed, 100 B and 64 KiB.
pub async fn run(duration: Duration) -> Vec<MeshBench> {
    let a = peer("bench-a", None).await;
    let b = peer("bench-b", Some(&a)).await;
    let c = peer("bench-c", Some(&b)).await;
    a.block("bench-c");
    c.block("bench-a");
    wait_route(&b, "bench-a", "bench-a").await;
    wait_route(&a, "bench-c", "bench-b").await;
    let (ca, cb, cc) = (MeshConn::new(a.clone()), MeshConn::new(b.clone()), MeshConn::new(c.clone()));
    let mut out = Vec::new();
    for size in [100, 64 * 1024] {
        out.push(blast(&ca, &cb, "bench-b", size, duration, "direct").await);
        out.push(blast(&ca, &cc, "bench-c", size, duration, "relayed").await);
    }
    for m in [a, b, c] {
        m.shutdown();
    }
    out
}
