//! Members on hosts of their own: one network namespace each, joined by a bridge in the
//! harness's namespace, so that partitions cut real links (routes and interfaces) under
//! the mesh rather than the mesh's own view of them. Needs root and iproute2.

use std::io;
use std::process::Command;

/// The namespaces, veth pairs and bridge of one run; removed again on drop.
pub struct Netns {
    prefix: String,
    net: [u8; 2],
    bridge: String,
    hosts: Vec<usize>,
    /// Blackhole routes in place: (host, destination host).
    cuts: Vec<(usize, usize)>,
    /// Hosts whose link is down.
    down: Vec<usize>,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

impl Netns {
    /// Why namespaces cannot be made here, if they cannot.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("network namespaces need root".into());
        }
        let probe = format!("mkprobe{}", std::process::id());
        match ip(&["netns", "add", &probe]) {
            Ok(()) => {
                let _ = ip(&["netns", "del", &probe]);
                None
            }
            Err(e) => Some(format!("cannot make a network namespace: {e}")),
        }
    }

    /// A bridge with an address of its own, for the harness's clients to reach members.
    pub fn new() -> io::Result<Self> {
        let pid = std::process::id();
        let prefix = format!("mk{}", pid % 1_000_000);
        let me = Self {
            bridge: format!("{prefix}br"),
            net: [(100 + pid % 100) as u8, ((pid / 100) % 250) as u8],
            prefix,
            hosts: Vec::new(),
            cuts: Vec::new(),
            down: Vec::new(),
        };
        ip(&["link", "add", &me.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.{}.{}.254/24", me.net[0], me.net[1]), "dev", &me.bridge])?;
        ip(&["link", "set", &me.bridge, "up"])?;
        Ok(me)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.{}.{}", self.net[0], self.net[1], i + 1)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    fn veth(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Makes host `i`: a namespace whose eth0 is plugged into the bridge.
    pub fn add_host(&mut self, i: usize) -> io::Result<()> {
        let (ns, veth) = (self.ns(i), self.veth(i));
        ip(&["netns", "add", &ns])?;
        self.hosts.push(i);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.addr(i)), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])
    }

    /// A command that runs `program` on host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Cuts host `i` off from each of `others`, both ways, with blackhole routes: the
    /// harness's clients still reach it.
    pub fn cut(&mut self, i: usize, others: &[usize]) -> io::Result<()> {
        for &o in others {
            for (a, b) in [(i, o), (o, i)] {
                ip(&["-n", &self.ns(a), "route", "add", "blackhole", &format!("{}/32", self.addr(b))])?;
                self.cuts.push((a, b));
            }
        }
        Ok(())
    }

    /// Pulls host `i`'s cable: nobody reaches it, clients included.
    pub fn isolate(&mut self, i: usize) -> io::Result<()> {
        ip(&["link", "set", &self.veth(i), "down"])?;
        self.down.push(i);
        Ok(())
    }

    /// Undoes every cut and isolation.
    pub fn heal(&mut self) -> io::Result<()> {
        for (a, b) in std::mem::take(&mut self.cuts) {
            ip(&["-n", &self.ns(a), "route", "del", "blackhole", &format!("{}/32", self.addr(b))])?;
        }
        for i in std::mem::take(&mut self.down) {
            ip(&["link", "set", &self.veth(i), "up"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A namespace's end of a veth pair takes the other end with it.
        for &i in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
