//! Loopback ports for programs that must be told their port before they start (etcd;
//! members that name each other, or that restart on the ports they had).

use std::collections::BTreeSet;
use std::sync::Mutex;

/// A free loopback port, checked by binding it and released.
///
/// Drawn below the kernel's ephemeral range: a port bound as port 0 comes from that
/// range, where any outgoing connection of the many processes under test can take it
/// between this check and the program's own bind ("Address already in use"), or while
/// a member that had it is down. Never handed out twice by one process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    for _ in 0..10_000 {
        let port = if ephemeral_low > 11_000 {
            10_000 + (rand::random::<u32>() % u32::from(ephemeral_low - 10_000)) as u16
        } else {
            // No room below the range: as good as the kernel's choice gets.
            match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(a) => a.port(),
                Err(_) => continue,
            }
        };
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port found");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports handed out are bindable and distinct.
    #[test]
    fn ports_are_free_and_never_given_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        for p in ports {
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
