//! A throwaway network of namespaces: one node running the applier, pods with echo servers,
//! and a client. Everything lives inside namespaces this module creates; the guard deletes
//! them even when a test panics.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hawser_dataplane::conntrack::ConntrackCommand;
use hawser_dataplane::health::HealthState;
use hawser_dataplane::inputs::ClusterInputs;
use hawser_dataplane::model::{Family, ModelConfig};
use hawser_dataplane::netlink::Netlink;
use hawser_dataplane::nft::{NftCommand, NftError, NftRunner, SyncReport};
use hawser_dataplane::render::{RenderConfig, TableId};
use hawser_dataplane::sync::Syncer;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nix::sched::{CloneFlags, setns};

/// Name of the node in the model; endpoints with this nodeName are local.
pub const NODE: &str = "node-a";
/// The node's address on the client link (NodePort target).
pub const NODE_IP: &str = "192.168.100.1";
/// The client's main address.
pub const CLIENT_IP: &str = "192.168.100.2";
/// The second client's address (another subnet), for source-range tests.
pub const CLIENT2_IP: &str = "192.168.101.2";
/// Node and client IPv6 addresses.
pub const NODE_IP6: &str = "fd00:100::1";
/// Client IPv6 address.
pub const CLIENT_IP6: &str = "fd00:100::2";
/// TCP port of the pods' echo servers.
pub const TCP_PORT: u16 = 8080;
/// UDP port of the pods' echo servers.
pub const UDP_PORT: u16 = 5353;
/// Short timeout: a dropped packet is recognised quickly.
pub const TIMEOUT: Duration = Duration::from_millis(400);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What the client observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A pod answered and reported the peer address it saw.
    Reply {
        /// Pod name (`pod1`, …).
        server: String,
        /// Peer address the pod saw.
        peer: IpAddr,
    },
    /// Connection refused (TCP reset or ICMP unreachable).
    Refused,
    /// Nothing came back.
    Timeout,
    /// Another error.
    Other(String),
}

impl Outcome {
    /// The answering pod, or panics with the outcome.
    pub fn server(&self) -> String {
        match self {
            Outcome::Reply { server, .. } => server.clone(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }
    /// The peer the pod saw, or panics.
    pub fn peer(&self) -> IpAddr {
        match self {
            Outcome::Reply { peer, .. } => *peer,
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// Checks root, `ip` and `nft`. Outside CI a missing prerequisite skips the test with a
/// printed reason; with CI set it fails.
pub fn prerequisites() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let tool = |t: &str, arg: &str| Command::new(t).arg(arg).output().is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = [
        (!root).then_some("root"),
        (!tool("nft", "--version")).then_some("nft"),
        (!tool("ip", "-V")).then_some("ip"),
        (!tool("conntrack", "--version")).then_some("conntrack"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but netns test prerequisites are missing: {missing:?}");
    }
    eprintln!("skipping netns test: missing {missing:?}");
    false
}

/// Runs a command, panicking with its stderr on failure.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// Runs `f` on a thread that has entered netns `ns`; sockets made there stay in `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .unwrap()
}

/// Starts TCP and UDP echo servers in `ns` that answer `"{name} {peer}"`.
pub fn spawn_echo(ns: &str, name: &str) {
    let (tcp, udp) = in_netns(ns, || {
        // [::] is dual-stack; fall back to IPv4 where IPv6 is off.
        let tcp = TcpListener::bind(("::", TCP_PORT)).or_else(|_| TcpListener::bind(("0.0.0.0", TCP_PORT))).unwrap();
        let udp = UdpSocket::bind(("::", UDP_PORT)).or_else(|_| UdpSocket::bind(("0.0.0.0", UDP_PORT))).unwrap();
        (tcp, udp)
    });
    let n = name.to_string();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut conn) = conn else { return };
            if let Ok(peer) = conn.peer_addr() {
                let _ = writeln!(conn, "{n} {}", peer.ip().to_canonical());
            }
        }
    });
    let n = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{n} {}", peer.ip().to_canonical()).as_bytes(), peer);
        }
    });
}

fn parse_reply(text: &str) -> Outcome {
    let mut it = text.split_whitespace();
    match (it.next(), it.next().and_then(|p| p.parse().ok())) {
        (Some(server), Some(peer)) => Outcome::Reply { server: server.to_string(), peer },
        _ => Outcome::Other(format!("bad reply {text:?}")),
    }
}

/// One TCP exchange from netns `ns`.
pub fn tcp(ns: &str, dst: &str, port: u16) -> Outcome {
    let dst: IpAddr = dst.parse().unwrap();
    in_netns(ns, move || {
        let addr = SocketAddr::new(dst, port);
        let mut stream = match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => s,
            Err(e) => return classify(e),
        };
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut text = String::new();
        match stream.read_to_string(&mut text) {
            Ok(_) => parse_reply(&text),
            Err(e) => classify(e),
        }
    })
}

fn classify(e: std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => Outcome::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Other(e.to_string()),
    }
}

/// One UDP exchange from netns `ns`, from `src_port` (0: any).
pub fn udp(ns: &str, dst: &str, port: u16, src_port: u16) -> Outcome {
    let dst: IpAddr = dst.parse().unwrap();
    let name = ns.to_owned();
    in_netns(ns, move || {
        let bind: SocketAddr = if dst.is_ipv4() {
            SocketAddr::new("0.0.0.0".parse().unwrap(), src_port)
        } else {
            SocketAddr::new("::".parse().unwrap(), src_port)
        };
        // A fixed source port was once refused as in use during a parallel run of the suite,
        // after an earlier exchange of the same test from it had ended (cause unknown): try
        // again for a while.
        let mut attempts = 0;
        let sock = loop {
            match UdpSocket::bind(bind) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 40 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                bound => break bound.unwrap_or_else(|e| panic!("binding UDP {bind} in {name}: {e}")),
            }
        };
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"ping", SocketAddr::new(dst, port)).unwrap();
        let mut buf = [0u8; 256];
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => parse_reply(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => classify(e),
        }
    })
}

/// The namespaces of one test and the applier programming its node.
pub struct Lab {
    /// Node netns (runs the rules).
    pub node: String,
    /// Client netns (192.168.100.2).
    pub client: String,
    /// Second client netns (192.168.101.2).
    pub client2: String,
    /// Pod netns, `pods[i]` has address `10.0.{i+1}.2` and serves as `pod{i+1}`.
    pub pods: Vec<String>,
    /// Whether IPv6 was set up.
    pub ipv6: bool,
    /// The agent's syncer, running nft inside the node netns.
    pub syncer: Syncer<Box<dyn NftRunner>>,
    /// What the agent keeps of the cluster.
    pub inputs: ClusterInputs,
    /// The health state the syncer records into.
    pub health: HealthState,
    conntrack: ConntrackCommand,
    all: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("HAWSER_KEEP_LAB").is_some() {
            eprintln!("keeping namespaces {:?}", self.all);
            return;
        }
        for ns in &self.all {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Address of pod `i` (1-based).
pub fn pod_ip(i: usize) -> String {
    format!("10.0.{i}.2")
}

/// IPv6 address of pod `i` (1-based).
pub fn pod_ip6(i: usize) -> String {
    format!("fd00:{i}::2")
}

/// nft in the node namespace `node`; with `netlink`, partial syncs go over a netlink socket
/// opened in that namespace, as the agent's do.
pub fn node_nft(node: &str, netlink: bool) -> NftCommand {
    let nft = NftCommand::with_argv(exec_in(node, "nft"));
    if !netlink {
        return nft;
    }
    let socket = in_netns(node, Netlink::open).unwrap_or_else(|e| panic!("netlink socket in {node}: {e}"));
    nft.with_netlink(socket)
}

/// `ip netns exec NS` prefix for commands.
pub fn exec_in(ns: &str, cmd: &str) -> Vec<String> {
    vec!["ip".into(), "netns".into(), "exec".into(), ns.into(), cmd.into()]
}

impl Lab {
    /// Builds the namespaces with `pods` pods, or None when prerequisites are missing
    /// outside CI.
    /// Partial syncs go over netlink, as in the agent.
    pub fn new(pods: usize) -> Option<Lab> {
        Self::with_runner(pods, |node| Box::new(node_nft(node, true)))
    }

    /// Same, with a custom nft runner built for the node netns name.
    pub fn with_runner(pods: usize, runner: impl FnOnce(&str) -> Box<dyn NftRunner>) -> Option<Lab> {
        if !prerequisites() {
            return None;
        }
        let id = format!("hwt{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let node = format!("{id}-node");
        let client = format!("{id}-cli");
        let client2 = format!("{id}-cli2");
        let pod_names: Vec<String> = (1..=pods).map(|i| format!("{id}-pod{i}")).collect();
        let mut all = vec![node.clone(), client.clone(), client2.clone()];
        all.extend(pod_names.iter().cloned());
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let mut lab = Lab {
            syncer: Syncer::new(Box::new(NftCommand::with_argv(exec_in(&node, "nft"))), RenderConfig::default()),
            inputs: ClusterInputs::default(),
            health: HealthState::new(NODE, Duration::from_secs(30)),
            conntrack: ConntrackCommand::with_argv(exec_in(&node, "conntrack")),
            node: node.clone(),
            client: client.clone(),
            client2: client2.clone(),
            pods: pod_names.clone(),
            ipv6,
            all: Vec::new(),
        };
        for ns in &all {
            sh(&["ip", "netns", "add", ns]);
            lab.all.push(ns.clone());
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            if ipv6 {
                // Link-local addresses would stay tentative for a second and stall neighbour
                // discovery; there is nothing to collide with inside these namespaces.
                sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
            }
        }
        lab.syncer = Syncer::new(runner(&node), RenderConfig::default());
        let n = node.as_str();
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if ipv6 {
            sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        // Links: node side named after the peer, peer side eth0.
        let link = |peer: &str, dev: &str, node_ip: &str, peer_ip: &str, v6: Option<(&str, &str)>| {
            sh(&["ip", "-n", n, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", peer]);
            sh(&["ip", "-n", n, "addr", "add", &format!("{node_ip}/24"), "dev", dev]);
            sh(&["ip", "-n", peer, "addr", "add", &format!("{peer_ip}/24"), "dev", "eth0"]);
            if let (true, Some((n6, p6))) = (ipv6, v6) {
                sh(&["ip", "-n", n, "addr", "add", &format!("{n6}/64"), "dev", dev, "nodad"]);
                sh(&["ip", "-n", peer, "addr", "add", &format!("{p6}/64"), "dev", "eth0", "nodad"]);
            }
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
            sh(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", peer, "route", "add", "default", "via", node_ip]);
            if let (true, Some((n6, _))) = (ipv6, v6) {
                sh(&["ip", "-n", peer, "-6", "route", "add", "default", "via", n6]);
            }
        };
        link(&client, "cli", NODE_IP, CLIENT_IP, Some((NODE_IP6, CLIENT_IP6)));
        link(&client2, "cli2", "192.168.101.1", CLIENT2_IP, None);
        // The node's uplink: host-originated traffic to load-balancer addresses needs a route
        // before the output hook can DNAT it.
        sh(&["ip", "-n", n, "route", "add", "default", "via", CLIENT_IP]);
        for (i, pod) in pod_names.iter().enumerate() {
            let i = i + 1;
            let n6 = format!("fd00:{i}::1");
            let p6 = pod_ip6(i);
            link(pod, &format!("pod{i}"), &format!("10.0.{i}.1"), &pod_ip(i), Some((&n6, &p6)));
            spawn_echo(pod, &format!("pod{i}"));
        }
        Some(lab)
    }

    /// Feeds the lists to the agent's inputs as a relist would, syncs what changed, then cleans
    /// UDP conntrack entries of removed endpoints.
    pub fn sync(&mut self, services: &[Service], slices: &[EndpointSlice]) -> Result<SyncReport, NftError> {
        let config = ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: NODE.into() };
        self.inputs.replace(services, slices, &config.load_balancer_class);
        // As the agent does: a full resync's listing of the tables overlaps the models' build.
        self.syncer.prefetch();
        let changes = self.inputs.take_changes(&config, &mut Vec::new());
        let report = self.syncer.sync(changes, &self.health)?;
        for flow in self.syncer.take_stale_flows() {
            self.conntrack.delete(&flow).unwrap();
        }
        Ok(report)
    }

    /// Lists a chain with rule handles, from the node netns, from the first of our tables of
    /// `family` (`ip`, `ip6`) that has it.
    pub fn list_chain(&self, family: &str, chain: &str) -> String {
        let family_of = if family == "ip" { Family::V4 } else { Family::V6 };
        for table in TableId::of_family(family_of) {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &self.node, "nft", "-a", "list", "chain", family, table.name(), chain])
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
        }
        panic!("no table of {family} has chain {chain}")
    }

    /// The set of servers answering `n` TCP connections from the client.
    pub fn servers(&self, dst: &str, port: u16, n: usize) -> std::collections::BTreeSet<String> {
        (0..n).map(|_| tcp(&self.client, dst, port).server()).collect()
    }
}

/// Starts a TCP sink on `port` in `ns` that reads and discards everything (throughput).
pub fn spawn_sink(ns: &str, port: u16) {
    let listener = in_netns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}
