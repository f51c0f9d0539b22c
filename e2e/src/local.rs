//! The local backend: a cluster made of real parts on one Linux machine.
//!
//! - the fake apiserver (in process) stands in for Kubernetes;
//! - each node is a network namespace running the real `hawser-dataplane`;
//! - a `router` namespace is the cloud: it reaches every node and routes load-balancer
//!   addresses to the healthy ones ([`crate::lbagent`]);
//! - pods are namespaces behind a bridge on their node, running an echo server;
//! - the harness writes Nodes and EndpointSlices, as kubelet and the endpointslice controller
//!   would;
//! - the real `hawser-operator` runs with the mock cloud.
//!
//! Addresses (slot `s` keeps concurrent clusters apart; `A = 4s`): `10.231.A.0/24` links (host
//! `.1` and router `.2`; node `i` at `.4(i+1)+2`, its router end `+1`), `10.231.A+1.16i/28` pods
//! of node `i` (bridge `.16i+1`), `10.231.A+2.0/24` clients (router `.1`, clients `.2`, `.3`).
//! The host only gets its end of the router link and a route for `10.231.A.0/22`; both vanish
//! with the link.
//!
//! The dataplanes run inside their node namespace (`ip netns exec`), so their health server
//! listens on the node's address exactly where the load balancer probes it, and nft and
//! conntrack act on the node. That namespace cannot reach the host's loopback, so the fake
//! apiserver listens on the host's end of the router link; its certificate covers the address
//! it listens on. With [`LocalOptions::kubeconfig`], an existing API server replaces the fake
//! one ([`crate::external`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hawser_fake_apiserver::{Config, FakeApiServer};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};

use crate::backend::{Backend, BackendPod, NodeInfo};
use crate::binaries;
use crate::external::{self, ExternalApiServer};
use crate::lbagent::{LbAgent, LbAgentConfig};
use crate::netns::{self, Netns, sh, sh_quiet, veth};
use crate::traffic::{Client, EchoServer, HTTP_PORT};

/// The dataplane's health port on every node (its default).
pub const HEALTH_PORT: u16 = 10266;
/// Cluster name the operator tags cloud resources with.
pub const CLUSTER_NAME: &str = "e2e";
/// The mock cloud's address pool.
pub const POOL: &str = "203.0.113.0/24";

/// How to build a local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Number of worker nodes (at most 15).
    pub nodes: usize,
    /// Address slot: `Some(0)` for the sandbox; `None` takes a free one of 1..=60.
    pub slot: Option<u8>,
    /// Prefix of every namespace and host link name (slot-specific when `slot` is `None`).
    pub prefix: Option<String>,
    /// Directory for the kubeconfig, logs and the mock cloud's state (a temporary one if unset).
    pub dir: Option<PathBuf>,
    /// Extra operator flags.
    pub operator_args: Vec<String>,
    /// An existing API server's kubeconfig to use instead of starting the fake one (the
    /// suite's `HAWSER_E2E_KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self { nodes: 2, slot: None, prefix: None, dir: None, operator_args: Vec::new(), kubeconfig: None }
    }
}

/// Lifecycle of a pod, as the EndpointSlice shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodState {
    Ready,
    Terminating,
}

struct Pod {
    ns: String,
    app: String,
    name: String,
    node: usize,
    ip: Ipv4Addr,
    state: PodState,
    // Dropped in field order: the server stops before its namespace goes.
    _echo: EchoServer,
    _netns: Netns,
}

struct LocalNode {
    name: String,
    address: Ipv4Addr,
    pod_base: Ipv4Addr,
    netns: Netns,
    /// `None` while stopped ([`Backend::stop_dataplane`]).
    dataplane: Mutex<Option<Child>>,
    /// The dataplane's command line and environment, to start it again.
    dataplane_argv: Vec<String>,
    dataplane_env: Vec<(&'static str, PathBuf)>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

/// The Kubernetes API the cluster uses.
enum ApiServer {
    /// Held for its lifetime: its tasks serve the cluster.
    Fake {
        _server: FakeApiServer,
    },
    External(ExternalApiServer),
}

/// A running local cluster; everything it made goes on drop, also when a test panics.
pub struct LocalCluster {
    prefix: String,
    slot: u8,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    client: kube::Client,
    kubeconfig: PathBuf,
    metrics_addr: SocketAddr,
    operator_args: Vec<String>,
    operator: Mutex<Option<Child>>,
    pods: Arc<Mutex<Vec<Pod>>>,
    pod_counter: Mutex<u32>,
    slices: Option<tokio::task::JoinHandle<()>>,
    lb: Option<LbAgent>,
    nodes: Vec<LocalNode>,
    client_ns: Netns,
    router: Netns,
    apiserver: Option<ApiServer>,
    // Last: released once everything else is gone.
    _lock: Option<SlotLock>,
}

fn ip(s: u8, third: u8, fourth: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, s * 4 + third, fourth)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

const LOCK_DIR: &str = "/run/hawser-e2e";

/// An address slot taken, so that concurrent clusters (tests, the sandbox) never share
/// addresses or names. The lock goes with the process, so a crashed holder frees it; a released
/// one also removes its file.
#[derive(Debug)]
pub struct SlotLock {
    slot: u8,
    path: PathBuf,
    _lock: Flock<File>,
}

impl SlotLock {
    /// The slot held.
    pub fn slot(&self) -> u8 {
        self.slot
    }
}

impl Drop for SlotLock {
    fn drop(&mut self) {
        // Still locked here: whoever opened this file meanwhile finds it unlinked and retries.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A slot another process holds.
#[derive(Debug)]
pub struct SlotBusy {
    /// The slot.
    pub slot: u8,
    /// The holder's pid, as it wrote it into the lock file.
    pub holder: Option<u32>,
}

impl std::fmt::Display for SlotBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "address slot {} is in use", self.slot)?;
        if let Some(pid) = self.holder {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            write!(f, " by pid {pid}")?;
            if !comm.trim().is_empty() {
                write!(f, " ({})", comm.trim())?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for SlotBusy {}

/// Takes slot `slot`, or the first free one of 1..=60 for `None`; a taken `Some` slot fails with
/// [`SlotBusy`].
pub fn lock_slot(slot: Option<u8>) -> anyhow::Result<SlotLock> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::unix::fs::MetadataExt as _;
    let candidates: Vec<u8> = match slot {
        Some(s) => vec![s],
        None => (1..=60).collect(),
    };
    for s in candidates {
        let path = Path::new(LOCK_DIR).join(format!("slot-{s}.lock"));
        // A released holder unlinks the file under the lock: retry until the file locked is the
        // one at the path.
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        for _ in 0..100 {
            let file = match File::options().read(true).write(true).create(true).truncate(false).open(&path) {
                Ok(f) => f,
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            };
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    if slot.is_none() {
                        break;
                    }
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(SlotBusy { slot: s, holder: text.trim().parse().ok() }.into());
                }
                Err((_, e)) => bail!("locking {}: {e}", path.display()),
            };
            let same = match (lock.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            lock.set_len(0)?;
            lock.rewind()?;
            write!(lock, "{}", std::process::id())?;
            return Ok(SlotLock { slot: s, path, _lock: lock });
        }
    }
    bail!("every address slot of 1..=60 is in use")
}

/// Removes what a crashed earlier holder of this prefix left: namespaces (with their processes
/// and nft tables) and the host link (with its routes).
pub fn clean_stale(prefix: &str) {
    for ns in netns::list(&format!("{prefix}-")) {
        netns::delete(&ns);
    }
    sh_quiet(&["ip", "link", "del", &format!("{prefix}-h")]);
}

/// Starts node `name`'s dataplane, logging to its file in `dir`.
fn spawn_dataplane(argv: &[String], env: &[(&'static str, PathBuf)], dir: &Path, name: &str) -> anyhow::Result<Child> {
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    spawn_logged(argv, &env, &dir.join(format!("{name}.log")))
}

fn spawn_logged(argv: &[String], envs: &[(&str, &Path)], log: &Path) -> anyhow::Result<Child> {
    let out = File::options().create(true).append(true).open(log)?;
    let (cmd, rest) = argv.split_first().context("empty command")?;
    let mut c = Command::new(cmd);
    c.args(rest).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).env("RUST_LOG", "info");
    for (k, v) in envs {
        c.env(k, v);
    }
    crate::reaper::adopt(&mut c)?;
    c.spawn().with_context(|| format!("starting {argv:?}"))
}

impl LocalCluster {
    /// Builds the topology, starts the apiserver, the dataplanes, the operator and the load
    /// balancer agent, and registers the Nodes.
    pub async fn start(opts: LocalOptions) -> anyhow::Result<Self> {
        let lock = lock_slot(opts.slot)?;
        let mut cluster = Self::start_locked(opts, &lock).await?;
        cluster._lock = Some(lock);
        Ok(cluster)
    }

    /// [`Self::start`] in a slot the caller has taken (and keeps until the cluster is gone);
    /// `opts.slot` is ignored.
    pub async fn start_locked(opts: LocalOptions, lock: &SlotLock) -> anyhow::Result<Self> {
        if opts.nodes == 0 || opts.nodes > 15 {
            bail!("1 to 15 nodes, not {}", opts.nodes);
        }
        for b in binaries::BINARIES {
            binaries::binary(b)?;
        }
        let slot = lock.slot();
        let prefix = opts.prefix.clone().unwrap_or_else(|| format!("hwe{slot}"));
        clean_stale(&prefix);
        let (tempdir, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("hawser-e2e-").tempdir()?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };

        // The cloud, and the host's way in (apiserver, health probes, the sandbox's curl).
        let router = Netns::create(&format!("{prefix}-rt"), true)?;
        let host_if = format!("{prefix}-h");
        veth(None, &host_if, &router.name, "up0")?;
        let (host_ip, router_ip) = (ip(slot, 0, 1), ip(slot, 0, 2));
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        router.exec(&["ip", "addr", "add", &format!("{router_ip}/30"), "dev", "up0"])?;
        router.exec(&["ip", "link", "set", "up0", "up"])?;
        sh(&["ip", "route", "replace", &format!("{}/22", ip(slot, 0, 0)), "via", &router_ip.to_string()])?;

        let client_ns = Netns::create(&format!("{prefix}-cl"), false)?;
        veth(Some(&router.name), "cl0", &client_ns.name, "eth0")?;
        router.exec(&["ip", "addr", "add", &format!("{}/24", ip(slot, 2, 1)), "dev", "cl0"])?;
        router.exec(&["ip", "link", "set", "cl0", "up"])?;
        for a in [ip(slot, 2, 2), ip(slot, 2, 3)] {
            client_ns.exec(&["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        client_ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        client_ns.exec(&["ip", "route", "add", "default", "via", &ip(slot, 2, 1).to_string()])?;

        let (apiserver, client, kubeconfig) = match &opts.kubeconfig {
            Some(path) => {
                let (server, client) = ExternalApiServer::acquire(path).await?;
                (ApiServer::External(server), client, path.clone())
            }
            None => {
                let kubeconfig = dir.join("kubeconfig");
                let fake = FakeApiServer::start(Config {
                    listen: SocketAddr::new(IpAddr::V4(host_ip), 0),
                    kubeconfig_path: Some(kubeconfig.clone()),
                    ..Config::default()
                })
                .await
                .context("starting the fake apiserver")?;
                let client = fake.client().await.context("client of the fake apiserver")?;
                (ApiServer::Fake { _server: fake }, client, kubeconfig)
            }
        };

        let dataplane = binaries::binary("hawser-dataplane")?;
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            let n = u8::try_from(i)?;
            let name = format!("node-{}", i + 1);
            let ns = Netns::create(&format!("{prefix}-n{}", i + 1), true)?;
            let (rt_end, address) = (ip(slot, 0, 4 * (n + 1) + 1), ip(slot, 0, 4 * (n + 1) + 2));
            let rt_if = format!("n{}", i + 1);
            veth(Some(&router.name), &rt_if, &ns.name, "eth0")?;
            router.exec(&["ip", "addr", "add", &format!("{rt_end}/30"), "dev", &rt_if])?;
            router.exec(&["ip", "link", "set", &rt_if, "up"])?;
            ns.exec(&["ip", "addr", "add", &format!("{address}/30"), "dev", "eth0"])?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])?;
            ns.exec(&["ip", "route", "add", "default", "via", &rt_end.to_string()])?;
            let pod_base = ip(slot, 1, 16 * n);
            let gw = ip(slot, 1, 16 * n + 1);
            ns.exec(&["ip", "link", "add", "cbr0", "type", "bridge"])?;
            // A bridge without an address of its own takes its lowest port's, so adding or
            // removing a pod's veth could change the pods' gateway MAC under them: their
            // answers then go to a MAC no port has until their ARP entry is revalidated
            // (seconds), which lost requests during rolling replacements. CNI bridges fix it
            // the same way.
            ns.exec(&["ip", "link", "set", "cbr0", "address", &format!("02:68:77:73:00:{:02x}", n + 1)])?;
            ns.exec(&["ip", "addr", "add", &format!("{gw}/28"), "dev", "cbr0"])?;
            ns.exec(&["ip", "link", "set", "cbr0", "up"])?;
            router.exec(&["ip", "route", "add", &format!("{pod_base}/28"), "via", &address.to_string()])?;
            let forwarders = match &apiserver {
                ApiServer::External(server) => server.forward_into(&ns)?,
                ApiServer::Fake { .. } => Vec::new(),
            };

            register_node(&client, &name, address).await?;
            let argv: Vec<String> = [
                "ip",
                "netns",
                "exec",
                &ns.name,
                &dataplane.to_string_lossy(),
                "--node-name",
                &name,
                "--health-port",
                &HEALTH_PORT.to_string(),
                "--metrics-bind-address",
                "127.0.0.1:10267",
                "--min-sync-interval-ms",
                "100",
            ]
            .map(String::from)
            .to_vec();
            // Each sync's report, for the logs printed when a scenario fails.
            let env = vec![
                ("KUBECONFIG", kubeconfig.clone()),
                ("RUST_LOG", PathBuf::from("info,hawser_dataplane::agent=debug")),
            ];
            let child = spawn_dataplane(&argv, &env, &dir, &name)?;
            nodes.push(LocalNode {
                name,
                address,
                pod_base,
                netns: ns,
                dataplane: Mutex::new(Some(child)),
                dataplane_argv: argv,
                dataplane_env: env,
                forwarders,
            });
        }

        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cluster = Self {
            prefix,
            slot,
            dir,
            _tempdir: tempdir,
            client,
            kubeconfig,
            metrics_addr,
            operator_args: opts.operator_args.clone(),
            operator: Mutex::new(None),
            pods: Arc::new(Mutex::new(Vec::new())),
            pod_counter: Mutex::new(0),
            slices: None,
            lb: None,
            nodes,
            client_ns,
            router,
            apiserver: Some(apiserver),
            _lock: None,
        };
        cluster.start_operator(&[])?;
        cluster.lb = Some(LbAgent::start(LbAgentConfig {
            state_addr: metrics_addr,
            ip_argv: vec!["ip".into(), "-n".into(), cluster.router.name.clone()],
            interval: Duration::from_millis(150),
            log: Some(cluster.dir.join("lbagent.log")),
        }));
        cluster.slices = Some(tokio::spawn(slice_controller(cluster.client.clone(), cluster.pods.clone())));
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn start_operator(&self, extra: &[&str]) -> anyhow::Result<()> {
        let operator = binaries::binary("hawser-operator")?;
        let mut argv: Vec<String> = vec![
            operator.to_string_lossy().into_owned(),
            "--provider=mock".into(),
            format!("--cluster-name={CLUSTER_NAME}"),
            format!("--mock-address-pool={POOL}"),
            format!("--node-health-port={HEALTH_PORT}"),
            format!("--metrics-bind-address={}", self.metrics_addr),
            format!("--health-probe-bind-address=127.0.0.1:{}", free_port()?),
            format!("--mock-state-file={}", self.dir.join("cloud.json").display()),
            // Node changes reach load balancers quickly; the default 2s would slow every
            // drain scenario down.
            "--node-debounce=200ms".into(),
        ];
        argv.extend(self.operator_args.iter().cloned());
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut slot = self.operator.lock().map_err(|_| anyhow::anyhow!("operator lock poisoned"))?;
        // The old process goes first: it holds the metrics address the new one binds.
        if let Some(mut old) = slot.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        *slot = Some(spawn_logged(&argv, &[("KUBECONFIG", &self.kubeconfig)], &self.dir.join("operator.log"))?);
        Ok(())
    }

    /// Waits until the operator serves `/mock/state` and every node's dataplane is healthy.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let host = Client::new(None, None);
        for _ in 0..200 {
            let mut ok =
                host.http(self.metrics_addr.ip(), self.metrics_addr.port(), "/mock/state").await.reply().is_some();
            for n in &self.nodes {
                ok = ok && host.http(IpAddr::V4(n.address), HEALTH_PORT, "/healthz").await.reply().is_some();
            }
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("operator or dataplanes not ready after 20s; logs in {}", self.dir.display())
    }

    /// The netns names and host link this cluster owns share this prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The directory with the kubeconfig, logs and cloud state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kubeconfig of the API server (the fake one's, or the one given).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The operator's metrics address (`/metrics`, `/mock/state`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The host's end of the router link.
    pub fn host_address(&self) -> Ipv4Addr {
        ip(self.slot, 0, 1)
    }

    /// Routes the mock pool from the host into the cloud, so that `curl` on the host works
    /// (sandbox only: concurrent clusters would fight over it). Goes with the host link.
    pub fn route_pool_from_host(&self) -> anyhow::Result<()> {
        sh(&["ip", "route", "replace", POOL, "via", &ip(self.slot, 0, 2).to_string()])?;
        Ok(())
    }

    /// PIDs of the child processes (for the sandbox's crash record).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> =
            self.nodes.iter().filter_map(|n| n.dataplane.lock().ok()?.as_ref().map(Child::id)).collect();
        if let Ok(op) = self.operator.lock()
            && let Some(c) = op.as_ref()
        {
            pids.push(c.id());
        }
        pids
    }

    /// The Prometheus metrics of node `i`'s dataplane (0-based), read inside its namespace.
    pub fn node_metrics(&self, i: usize) -> anyhow::Result<String> {
        let node = self.nodes.get(i).with_context(|| format!("no node {i}"))?;
        node.netns.exec(&["curl", "-sf", "http://127.0.0.1:10267/metrics"])
    }

    /// The IPv4 nft ruleset of node `i` (0-based), for waiting on the dataplane: in its own
    /// namespace, only hawser's tables.
    pub fn node_rules(&self, i: usize) -> String {
        self.nodes.get(i).and_then(|n| n.netns.exec(&["nft", "list", "ruleset", "ip"]).ok()).unwrap_or_default()
    }

    async fn wait_rules(&self, ip: Ipv4Addr, present: bool) -> anyhow::Result<()> {
        // An endpoint appears as a dnat target: in an endpoint map (`N : IP . PORT`) or a rule.
        let needles = [format!(": {ip} . "), format!("dnat to {ip}:")];
        let has = |rules: String| needles.iter().any(|n| rules.contains(n.as_str()));
        for _ in 0..100 {
            if (0..self.nodes.len()).all(|i| has(self.node_rules(i)) == present) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dnats: Vec<String> = (0..self.nodes.len())
            .flat_map(|i| {
                self.node_rules(i)
                    .lines()
                    .filter(|l| l.contains("dnat") || l.contains(" : "))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        bail!(
            "endpoint {ip} still {} in some node's rules after 10s: {dnats:?}",
            if present { "missing" } else { "present" }
        )
    }

    /// Waits until no node tracks a TCP connection to `ip` that is still open (anything but
    /// `TIME_WAIT` and `CLOSE`): what a pod's graceful shutdown waits for on a busy machine.
    async fn wait_connections_closed(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let ip = ip.to_string();
        let open = |i: usize| -> Vec<String> {
            let listing =
                self.nodes[i].netns.exec(&["conntrack", "-L", "-p", "tcp", "--reply-src", &ip]).unwrap_or_default();
            listing
                .lines()
                .filter(|l| l.starts_with("tcp") && !l.contains(" TIME_WAIT ") && !l.contains(" CLOSE "))
                .map(str::to_owned)
                .collect()
        };
        for _ in 0..100 {
            if (0..self.nodes.len()).all(|i| open(i).is_empty()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left: Vec<String> = (0..self.nodes.len()).flat_map(open).collect();
        bail!("connections to the terminating pod {ip} still open after 10s: {left:?}")
    }

    fn lock_pods(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Vec<Pod>>> {
        self.pods.lock().map_err(|_| anyhow::anyhow!("pods lock poisoned"))
    }

    /// Starts one pod of `app` on the node with the fewest pods.
    fn add_pod(&self, ns: &str, app: &str) -> anyhow::Result<Ipv4Addr> {
        let mut pods = self.lock_pods()?;
        let node = (0..self.nodes.len()).min_by_key(|i| pods.iter().filter(|p| p.node == *i).count()).unwrap_or(0);
        let used: Vec<Ipv4Addr> = pods.iter().filter(|p| p.node == node).map(|p| p.ip).collect();
        let n = &self.nodes[node];
        let base = u32::from(n.pod_base);
        let counter = {
            let mut c = self.pod_counter.lock().map_err(|_| anyhow::anyhow!("counter lock poisoned"))?;
            *c += 1;
            *c
        };
        // Like host-local IPAM, go round the range instead of handing a just-freed address to
        // the next pod: peers may still hold the old pod's MAC for it.
        let ip = (0..13)
            .map(|k| Ipv4Addr::from(base + 2 + (counter + k) % 13))
            .find(|a| !used.contains(a))
            .context("node full of pods")?;
        let name = format!("{app}-{counter}");
        let pod_ns = Netns::create(&format!("{}-p{counter}", self.prefix), false)?;
        let node_if = format!("v{counter}");
        veth(Some(&n.netns.name), &node_if, &pod_ns.name, "eth0")?;
        n.netns.exec(&["ip", "link", "set", &node_if, "master", "cbr0", "up"])?;
        pod_ns.exec(&["ip", "addr", "add", &format!("{ip}/28"), "dev", "eth0"])?;
        pod_ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        pod_ns.exec(&["ip", "route", "add", "default", "via", &Ipv4Addr::from(base + 1).to_string()])?;
        // What a CNI's gratuitous ARP does: the node forgets any earlier owner of the address.
        n.netns.exec(&["ip", "neigh", "flush", "to", &ip.to_string()])?;
        let echo = EchoServer::start(&pod_ns.name, &name)?;
        pods.push(Pod {
            ns: ns.into(),
            app: app.into(),
            name,
            node,
            ip,
            state: PodState::Ready,
            _echo: echo,
            _netns: pod_ns,
        });
        Ok(ip)
    }

    fn set_state(&self, ip: Ipv4Addr, state: PodState) -> anyhow::Result<()> {
        for p in self.lock_pods()?.iter_mut().filter(|p| p.ip == ip) {
            p.state = state;
        }
        Ok(())
    }

    fn remove_pod(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let gone: Vec<Pod> = {
            let mut pods = self.lock_pods()?;
            let (gone, keep) = pods.drain(..).partition(|p| p.ip == ip);
            *pods = keep;
            gone
        };
        drop(gone);
        Ok(())
    }

    fn pod_ips(&self, ns: &str, app: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        Ok(self.lock_pods()?.iter().filter(|p| p.ns == ns && p.app == app).map(|p| p.ip).collect())
    }

    fn print_logs(&self) {
        let mut logs = vec!["operator.log".to_owned(), "lbagent.log".to_owned()];
        logs.extend(self.nodes.iter().map(|n| format!("{}.log", n.name)));
        for l in logs {
            let text = std::fs::read_to_string(self.dir.join(&l)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- last lines of {l} -----");
            for line in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if let Some(s) = self.slices.take() {
            s.abort();
        }
        self.lb.take();
        if let Ok(mut op) = self.operator.lock()
            && let Some(mut c) = op.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &mut self.nodes {
            if let Ok(mut slot) = n.dataplane.lock()
                && let Some(mut c) = slot.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
            n.forwarders.drain(..).for_each(|f| f.abort());
        }
        if let Ok(mut pods) = self.pods.lock() {
            pods.clear();
        }
        // Namespaces (nodes with their nft tables, router, client) go with their guards; the
        // host link takes its address and routes with it.
        self.nodes.clear();
        sh_quiet(&["ip", "link", "del", &format!("{}-h", self.prefix)]);
        // The fake apiserver's tasks end with the runtime; nothing outside this process to
        // undo. An existing one keeps what it was given unless it is removed.
        if let Some(ApiServer::External(server)) = self.apiserver.take() {
            server.sweep_blocking();
        }
    }
}

async fn register_node(client: &kube::Client, name: &str, address: Ipv4Addr) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", external::LABEL: "true"},
        },
        "status": {
            "addresses": [{"type": "InternalIP", "address": address.to_string()}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }))?;
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await?;
    Ok(())
}

/// What the endpointslice controller does, for the pods this harness runs: one slice per
/// selecting Service, ports resolved from the Service's targetPorts, endpoint conditions from
/// the pod's state. Polls; writes only changes.
async fn slice_controller(client: kube::Client, pods: Arc<Mutex<Vec<Pod>>>) {
    let services: Api<Service> = Api::all(client.clone());
    let mut written: BTreeMap<(String, String), Value> = BTreeMap::new();
    loop {
        if let Ok(list) = services.list(&ListParams::default()).await {
            for svc in list {
                let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone()) else {
                    continue;
                };
                let Some(app) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).and_then(|s| s.get("app")).cloned()
                else {
                    continue;
                };
                // Only the harness's own namespaces: an existing cluster has others.
                let ours =
                    written.keys().any(|(n, _)| *n == ns) || pods.lock().is_ok_and(|p| p.iter().any(|p| p.ns == ns));
                if !ours {
                    continue;
                }
                let Some(desired) = desired_slice(&svc, &ns, &name, &app, &pods) else { continue };
                let key = (ns.clone(), name.clone());
                if written.get(&key) == Some(&desired) {
                    continue;
                }
                if write_slice(&client, &ns, &name, &desired).await.is_ok() {
                    written.insert(key, desired);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn desired_slice(svc: &Service, ns: &str, name: &str, app: &str, pods: &Mutex<Vec<Pod>>) -> Option<Value> {
    let ports: Vec<Value> = svc
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
                _ => p.port,
            };
            json!({"name": p.name.clone().unwrap_or_default(), "port": target, "protocol": p.protocol.clone().unwrap_or("TCP".into())})
        })
        .collect();
    let pods = pods.lock().ok()?;
    let mut mine: Vec<&Pod> = pods.iter().filter(|p| p.ns == ns && p.app == app).collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    let endpoints: Vec<Value> = mine
        .iter()
        .map(|p| {
            let ready = p.state == PodState::Ready;
            json!({
                "addresses": [p.ip.to_string()],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                "nodeName": format!("node-{}", p.node + 1),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p.name},
            })
        })
        .collect();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-e2e"),
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "hawser-e2e"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

async fn write_slice(client: &kube::Client, ns: &str, svc: &str, desired: &Value) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let name = format!("{svc}-e2e");
    // A merge patch replaces the lists in place, so the dataplane never sees an empty slice
    // between two versions.
    let body = json!({"endpoints": desired["endpoints"], "ports": desired["ports"]});
    match api.patch(&name, &PatchParams::default(), &Patch::Merge(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let slice: EndpointSlice = serde_json::from_value(desired.clone())?;
            api.create(&PostParams::default(), &slice).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

impl Backend for LocalCluster {
    fn kube(&self) -> kube::Client {
        self.client.clone()
    }

    fn client(&self) -> Client {
        Client::new(Some(&self.client_ns.name), Some(IpAddr::V4(ip(self.slot, 2, 2))))
    }

    fn other_client(&self) -> Option<Client> {
        Some(Client::new(Some(&self.client_ns.name), Some(IpAddr::V4(ip(self.slot, 2, 3)))))
    }

    fn can_delete_nodes(&self) -> bool {
        true
    }

    async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        Ok(self.nodes.iter().map(|n| NodeInfo { name: n.name.clone(), address: IpAddr::V4(n.address) }).collect())
    }

    async fn deploy(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()> {
        for _ in 0..replicas {
            self.add_pod(ns, app)?;
        }
        Ok(())
    }

    async fn scale(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()> {
        let ips = self.pod_ips(ns, app)?;
        for ip in ips.iter().skip(replicas) {
            self.remove_pod(*ip)?;
        }
        for _ in ips.len()..replicas {
            self.add_pod(ns, app)?;
        }
        Ok(())
    }

    async fn roll(&self, ns: &str, app: &str) -> anyhow::Result<()> {
        for old in self.pod_ips(ns, app)? {
            let new = self.add_pod(ns, app)?;
            self.wait_rules(new, true).await?;
            self.set_state(old, PodState::Terminating)?;
            // kubelet's graceful termination: the pod keeps serving until no node sends new
            // connections to it any more.
            self.wait_rules(old, false).await?;
            // A connection whose SYN was translated just before the rule went still belongs
            // to the old pod; a real pod finishes such requests before it exits.
            self.wait_connections_closed(old).await?;
            tokio::time::sleep(TERMINATION_DRAIN).await;
            self.remove_pod(old)?;
        }
        Ok(())
    }

    async fn backends(&self, ns: &str, app: &str) -> anyhow::Result<Vec<BackendPod>> {
        Ok(self
            .lock_pods()?
            .iter()
            .filter(|p| p.ns == ns && p.app == app && p.state == PodState::Ready)
            .map(|p| BackendPod { name: p.name.clone(), node: format!("node-{}", p.node + 1) })
            .collect())
    }

    async fn mock_state(&self) -> anyhow::Result<Value> {
        match Client::new(None, None).http(self.metrics_addr.ip(), self.metrics_addr.port(), "/mock/state").await {
            crate::traffic::Outcome::Reply(body) => Ok(serde_json::from_str(&body)?),
            other => bail!("/mock/state: {other:?}"),
        }
    }

    async fn lb_settled(&self, addr: IpAddr) -> anyhow::Result<()> {
        match &self.lb {
            Some(lb) => lb.wait_settled(addr, || self.mock_state()).await,
            None => Ok(()),
        }
    }

    async fn restart_operator(&self, extra_args: &[&str]) -> anyhow::Result<bool> {
        self.start_operator(extra_args)?;
        Ok(true)
    }

    async fn stop_dataplane(&self, node: usize) -> anyhow::Result<bool> {
        let n = self.nodes.get(node).with_context(|| format!("no node {node}"))?;
        let child = n.dataplane.lock().map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?.take();
        let Some(mut child) = child else { bail!("node {node}'s dataplane is not running") };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "node {node}'s dataplane exited with {status} on SIGTERM");
        Ok(true)
    }

    async fn start_dataplane(&self, node: usize) -> anyhow::Result<()> {
        let n = self.nodes.get(node).with_context(|| format!("no node {node}"))?;
        {
            let mut slot = n.dataplane.lock().map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?;
            anyhow::ensure!(slot.is_none(), "node {node}'s dataplane is running");
            *slot = Some(spawn_dataplane(&n.dataplane_argv, &n.dataplane_env, &self.dir, &n.name)?);
        }
        self.wait_ready().await
    }

    fn dataplane_metrics(&self, node: usize) -> Option<String> {
        self.node_metrics(node).ok()
    }
}

/// How long a terminating pod keeps serving after no node sends it new connections, as a
/// server with a graceful shutdown does between SIGTERM and exit.
const TERMINATION_DRAIN: Duration = Duration::from_secs(1);

/// The echo server's port, which Services target.
pub const TARGET_PORT: u16 = HTTP_PORT;
