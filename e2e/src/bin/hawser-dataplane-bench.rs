//! hawser-dataplane-bench: the real `hawser-dataplane`, in a network namespace of its own,
//! watching the in-process fake Kubernetes API server, timed from the API side.
//!
//! - `full_sync_from_start_ms`: N Services × M endpoints exist; the agent starts; time until its
//!   first sync is in the kernel (initial lists over HTTP, model, rules), read from the agent's
//!   `last_sync_timestamp_seconds`.
//! - `api_to_kernel_ms_*`: with the agent idle for longer than its min-sync-interval, one
//!   EndpointSlice loses (or regains) an endpoint; time from the API write to the kernel's
//!   acknowledgement of the transaction that carries it (the next `kernel_writes_total`
//!   increment and its `last_sync_timestamp_seconds`). Percentiles over `--changes` writes.
//! - `agent_full_sync_ms`: the agent's own measure of that first sync (its
//!   `sync_duration_seconds{kind="full"}`: from the lists in hand to the kernel's acknowledgement).
//! - `fresh_node_rss_mib`, `restart_rss_mib`, `rss_mib`: the agent's resident memory a second
//!   after each full sync and after the changes, run as the chart runs it
//!   (`MIMALLOC_PURGE_DELAY=0 MIMALLOC_ALLOW_THP=0`); `…_peak_rss_mib`: the most it had
//!   until then.
//!
//! One `key=value` line per figure, with its target; it asserts nothing. Needs root, `ip`, `nft`
//! and `conntrack`. Run it with:
//! `cargo build --release -p hawser-dataplane -p hawser-e2e && target/release/hawser-dataplane-bench`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use hawser_e2e::{binaries, netns};
use hawser_fake_apiserver::{Config, FakeApiServer};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Requests the bench keeps in flight while populating.
const IN_FLIGHT: usize = 16;
/// Network namespace and host link of the node (removed first if a run left them).
const NODE_NS: &str = "hwdpb-node";
const HOST_IF: &str = "hwdpb-h";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 253, 1);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 253, 2);
const METRICS_PORT: u16 = 10267;
const NAMESPACE: &str = "bench";

/// Times the real hawser-dataplane against the fake apiserver.
#[derive(Debug, Parser)]
#[command(name = "hawser-dataplane-bench")]
struct Args {
    /// The dataplane binary (default: hawser-dataplane next to this one).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// LoadBalancer Services present when the agent starts.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service (on another node).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// One-endpoint changes timed from the API write.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// The agent's --min-sync-interval-ms (its default).
    #[arg(long, default_value_t = 1000)]
    min_sync_interval_ms: u64,
    /// Keep the agent's log (both runs) in this file; set RUST_LOG for more of it.
    #[arg(long)]
    agent_log: Option<PathBuf>,
}

fn service(i: usize) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            // The node-port range could not hold 10k Services.
            "allocateLoadBalancerNodePorts": false,
            "selector": {"app": format!("svc-{i}")},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    }))?)
}

/// The load-balancer address the operator would have written.
fn ingress(i: usize) -> Value {
    json!({"status": {"loadBalancer": {"ingress": [{"ip": format!("198.18.{}.{}", i / 250, i % 250 + 1)}]}}})
}

/// Service `i`'s slice with its first `n` endpoints, all on another node.
fn slice(i: usize, n: usize) -> anyhow::Result<EndpointSlice> {
    let endpoints: Vec<Value> = (1..=n)
        .map(|j| {
            json!({
                "addresses": [format!("10.{}.{}.{j}", 100 + i / 250, i % 250)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-2",
            })
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("svc-{i}-1"),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    }))?)
}

/// The node's namespace and the host's end of its link; removed on drop.
struct Topology {
    node: netns::Netns,
}

impl Topology {
    fn node(&self) -> &netns::Netns {
        &self.node
    }
}

impl Topology {
    fn create() -> anyhow::Result<Self> {
        netns::delete(NODE_NS);
        netns::sh_quiet(&["ip", "link", "del", HOST_IF]);
        let node = netns::Netns::create(NODE_NS, false)?;
        netns::veth(None, HOST_IF, NODE_NS, "eth0")?;
        netns::sh(&["ip", "addr", "add", &format!("{HOST_IP}/30"), "dev", HOST_IF])?;
        netns::sh(&["ip", "link", "set", HOST_IF, "up"])?;
        node.exec(&["ip", "addr", "add", &format!("{NODE_IP}/30"), "dev", "eth0"])?;
        node.exec(&["ip", "link", "set", "eth0", "up"])?;
        Ok(Self { node })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        netns::sh_quiet(&["ip", "link", "del", HOST_IF]);
    }
}

/// The agent's figures this bench reads from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Scrape {
    services: f64,
    pending: f64,
    last_sync: f64,
    writes: f64,
    full_syncs: f64,
    full_sync_seconds: f64,
}

async fn scrape() -> anyhow::Result<Scrape> {
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::new(IpAddr::V4(NODE_IP), METRICS_PORT)).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let mut s = Scrape::default();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        match name {
            "hawser_dataplane_services" => s.services = value,
            "hawser_dataplane_sync_pending_changes" => s.pending = value,
            "hawser_dataplane_last_sync_timestamp_seconds" => s.last_sync = value,
            "hawser_dataplane_full_syncs_total" => s.full_syncs = value,
            "hawser_dataplane_sync_duration_seconds_sum{kind=\"full\"}" => s.full_sync_seconds = value,
            _ if name.starts_with("hawser_dataplane_kernel_writes_total{") => s.writes += value,
            _ => {}
        }
    }
    Ok(s)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The most the agent's resident memory has been since it started.
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

async fn populate(client: &Client, args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    stream::iter(0..args.services)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                services.create(&PostParams::default(), &service(i)?).await?;
                services.patch_status(&format!("svc-{i}"), &PatchParams::default(), &Patch::Merge(ingress(i))).await?;
                slices.create(&PostParams::default(), &slice(i, args.endpoints)?).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!("populated {} Services in {:.1}s", args.services, started.elapsed().as_secs_f64());
    Ok(())
}

fn start_agent(args: &Args, kubeconfig: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Child> {
    let dataplane = match &args.dataplane {
        Some(p) => p.clone(),
        None => binaries::binary("hawser-dataplane")?,
    };
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new("ip")
        .args(["netns", "exec", NODE_NS])
        .arg(&dataplane)
        .args(["--node-name", "node-1", "--metrics-bind-address", &format!("{NODE_IP}:{METRICS_PORT}")])
        .args(["--min-sync-interval-ms", &args.min_sync_interval_ms.to_string()])
        .env("KUBECONFIG", kubeconfig)
        // As the chart's DaemonSet runs it.
        .env("MIMALLOC_PURGE_DELAY", "0")
        .env("MIMALLOC_ALLOW_THP", "0")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", dataplane.display()))
}

/// Polls `/metrics` until `done` holds, for at most `limit`.
async fn until(limit: Duration, every: Duration, done: impl Fn(&Scrape) -> bool) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = scrape().await
            && done(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the agent did not get there within {limit:?} (last scrape: {:?})", scrape().await.ok());
        }
        tokio::time::sleep(every).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(why) = netns::prerequisites() {
        bail!("hawser-dataplane-bench needs {why}");
    }
    let topology = Topology::create()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    let server = FakeApiServer::start(Config {
        listen: SocketAddr::new(IpAddr::V4(HOST_IP), 0),
        kubeconfig_path: Some(kubeconfig.clone()),
        ..Config::default()
    })
    .await?;
    let client = server.client().await?;
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }))?;
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await?;
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    populate(&client, &args).await?;

    // What the agent's initial lists cost this apiserver: the same pages (kube-runtime's
    // watcher lists 500 at a time), read by this process before the agent starts.
    let listed = Instant::now();
    let page = |api: kube::api::ListParams| api.limit(500);
    for kind in ["services", "endpointslices"] {
        let mut params = page(kube::api::ListParams::default());
        loop {
            let continue_token = if kind == "services" {
                Api::<Service>::all(client.clone()).list(&params).await?.metadata.continue_
            } else {
                Api::<EndpointSlice>::all(client.clone()).list(&params).await?.metadata.continue_
            };
            match continue_token.filter(|c| !c.is_empty()) {
                Some(c) => params = page(kube::api::ListParams::default()).continue_token(&c),
                None => break,
            }
        }
    }
    let lists_ms = listed.elapsed().as_secs_f64() * 1000.0;

    let log = args.agent_log.clone().unwrap_or_else(|| dir.path().join("dataplane.log"));
    // Both runs append to it.
    let _ = std::fs::remove_file(&log);
    // First into a node without our tables, then restarted over the tables it left.
    let mut agent: Option<Child> = None;
    for label in ["fresh_node", "restart"] {
        if let Some(mut previous) = agent.take() {
            let _ = previous.kill();
            let _ = previous.wait();
        }
        let started = unix_now();
        let mut child = start_agent(&args, &kubeconfig, &log)?;
        let n = args.services as f64;
        // Both figures come from the agent's own metrics, so the polling only has to be often
        // enough to be quick; more often would take CPU from the sync being measured.
        let first = until(Duration::from_secs(300), Duration::from_millis(50), |s| {
            s.full_syncs >= 1.0 && s.services >= n && s.pending == 0.0
        })
        .await;
        let first = match first {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("{e:#}\n--- agent log ---\n{text}");
            }
        };
        println!(
            "{label}_full_sync_from_start_ms={:.0} {label}_agent_full_sync_ms={:.0} target_ms=500 services={} endpoints_per_service={} apiserver_lists_ms={lists_ms:.0} load1={}",
            (first.last_sync - started) * 1000.0,
            first.full_sync_seconds * 1000.0,
            args.services,
            args.endpoints,
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?"),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "{label}_rss_mib={:.1} {label}_peak_rss_mib={:.1} target_mib=100",
            rss_mib(child.id()),
            peak_rss_mib(child.id())
        );
        agent = Some(child);
    }
    let mut agent = agent.context("no agent")?;

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let idle = Duration::from_millis(args.min_sync_interval_ms + 300);
    let mut latencies = Vec::new();
    for k in 0..args.changes {
        tokio::time::sleep(idle).await;
        let before = scrape().await?;
        // A different Service each time; every other write gives the endpoint back.
        let i = 1 + (k / 2 * 997) % (args.services - 1).max(1);
        let count = if k % 2 == 0 { args.endpoints - 1 } else { args.endpoints };
        let written = unix_now();
        slices.replace(&format!("svc-{i}-1"), &PostParams::default(), &slice(i, count)?).await?;
        let after = until(Duration::from_secs(30), Duration::from_millis(1), |s| s.writes > before.writes).await?;
        latencies.push((after.last_sync - written) * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "api_to_kernel_ms_p50={:.1} api_to_kernel_ms_p90={:.1} api_to_kernel_ms_max={:.1} target_ms=50 changes={}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    println!("rss_mib={:.1} target_mib=100", rss_mib(agent.id()));
    let rules = topology.node().exec(&["nft", "list", "ruleset", "ip"]).unwrap_or_default();
    eprintln!("the node's IPv4 tables: {} lines", rules.lines().count());
    let _ = agent.kill();
    let _ = agent.wait();
    server.stop().await;
    Ok(())
}
