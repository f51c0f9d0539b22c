//! Sync and datapath figures through the agent's own pipeline (projected inputs → partial
//! or full sync → real nft in a network namespace), one `key=value` line per figure with the
//! target it is judged by: 10k Services × 10 endpoints full sync, one-endpoint change, one
//! Service added, a resync with nothing changed, RSS (a child process holding the agent's
//! state), ClientIP affinity vs none; then new-connection latency and NodePort throughput.
//! Needs root, `ip` and `nft` (runs inside its own network namespaces). Environment:
//! `HAWSER_BENCH_SERVICES`, `HAWSER_BENCH_AFFINITY_SERVICES` (10k), `HAWSER_BENCH_NETLINK=0`
//! (nft only), `HAWSER_BENCH_NEIGHBOUR=FILE` (an nft script run first: another proxy's table
//! beside ours).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fixtures::{Ep, Svc, slice};
use common::lab::{Lab, NODE, NODE_IP, in_netns, node_nft, pod_ip, prerequisites, spawn_sink, tcp};
use hawser_dataplane::diff::{FullSync, StepWriter};
use hawser_dataplane::health::HealthState;
use hawser_dataplane::inputs::ClusterInputs;
use hawser_dataplane::model::{Family, ModelConfig};
use hawser_dataplane::netlink::{Batch, Netlink};
use hawser_dataplane::nft::{NftCommand, NftError, NftRunner, StaleEntry, SyncReport, Writer};
use hawser_dataplane::render::{RenderConfig, TableId};
use hawser_dataplane::sync::Syncer;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const PORTS: &[(&str, &str, u16)] = &[("http", "TCP", 8080)];
const CLASS: &str = "hawser.dev/lb";

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Service `i`; Service 0 points at the lab's real pod 1.
fn service(i: usize, affinity: bool) -> Service {
    let mut s = Svc::new("bench", leak(format!("svc-{i}")));
    s.lb_ips = vec![leak(format!("198.18.{}.{}", i / 250, i % 250 + 1))];
    s.ports = vec![("http", "TCP", 80, Some(20000 + i as u16))];
    s.affinity_timeout = affinity.then_some(600);
    s.build()
}

fn endpoints(i: usize, eps: usize) -> EndpointSlice {
    endpoints_from(i, eps, 1)
}

/// Service `i`'s `eps` endpoints, the last one numbered from `last` (a replaced pod).
fn endpoints_from(i: usize, eps: usize, last: usize) -> EndpointSlice {
    let list: Vec<Ep<'static>> = if i == 0 {
        vec![Ep::ready(leak(pod_ip(1)), NODE)]
    } else {
        (0..eps)
            .map(|j| {
                let host = if j + 1 == eps { last + j } else { j + 1 };
                Ep::ready(leak(format!("10.{}.{}.{}", 100 + i / 250, i % 250, host)), "n")
            })
            .collect()
    };
    slice("bench", leak(format!("svc-{i}")), leak(format!("svc-{i}-1")), PORTS, &list)
}

fn cfg() -> ModelConfig {
    ModelConfig { load_balancer_class: CLASS.into(), node_name: NODE.into() }
}

/// nft in the node netns, counting its runs.
#[derive(Clone)]
struct Counted {
    inner: NftCommand,
    runs: Arc<AtomicUsize>,
}

impl NftRunner for Counted {
    fn run(&self, script: &str) -> Result<(), NftError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run(script)
    }

    fn run_partial(&self, script: &str, batch: Option<&Batch>) -> Result<Writer, NftError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run_partial(script, batch)
    }

    fn run_full(&self, full: &FullSync<'_>) -> Result<Writer, NftError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run_full(full)
    }

    fn stepwise(&self) -> Result<Option<Box<dyn StepWriter>>, NftError> {
        let writer = self.inner.stepwise()?;
        // Written in steps: the frame through nft, the rest over netlink.
        if writer.is_some() {
            self.runs.fetch_add(2, Ordering::SeqCst);
        }
        Ok(writer)
    }

    fn purge_affinity(&self, table: TableId, stale: &StaleEntry<'_>) -> Result<usize, NftError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.purge_affinity(table, stale)
    }

    fn netlink(&self) -> Option<Arc<Netlink>> {
        self.inner.netlink()
    }
}

/// The agent's state: what the watches feed and what the sync loop programs.
struct Agent {
    inputs: ClusterInputs,
    syncer: Syncer<Counted>,
    health: HealthState,
    runs: Arc<AtomicUsize>,
}

impl Agent {
    fn new(node: &str) -> Self {
        let runs = Arc::new(AtomicUsize::new(0));
        let netlink = !std::env::var("HAWSER_BENCH_NETLINK").is_ok_and(|v| v == "0");
        let runner = Counted { inner: node_nft(node, netlink), runs: runs.clone() };
        Self {
            inputs: ClusterInputs::default(),
            syncer: Syncer::new(runner, RenderConfig::default()),
            health: HealthState::new(NODE, Duration::from_secs(30)),
            runs,
        }
    }

    /// One sync of the agent loop: take the changed Services, program them.
    fn sync(&mut self) -> SyncReport {
        self.syncer.prefetch();
        let changes = self.inputs.take_changes(&cfg(), &mut Vec::new());
        self.syncer.sync(changes, &self.health).unwrap()
    }
}

/// Feeds `change` as watch events, syncs, and prints the figure `{name}_sync_ms` (the whole
/// sync) with the kernel write's share and who wrote it.
fn timed_sync(agent: &mut Agent, name: &str, change: impl FnOnce(&mut ClusterInputs)) -> SyncReport {
    let runs = agent.runs.load(Ordering::SeqCst);
    let t = Instant::now();
    change(&mut agent.inputs);
    let report = agent.sync();
    println!(
        "{name}_sync_ms={} target_ms=20 kernel_write_ms={} writes={} writer={}",
        ms(t.elapsed()),
        ms(report.apply_time),
        agent.runs.load(Ordering::SeqCst) - runs,
        report.writer.as_str()
    );
    report
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The initial lists: `n` Services × `eps` endpoints, as the watches receive them.
fn lists(n: usize, eps: usize, affinity: bool) -> Vec<(Service, EndpointSlice)> {
    (0..n).map(|i| (service(i, affinity), endpoints(i, eps))).collect()
}

/// Feeds the initial lists as watch events (each object dropped after its event, as the
/// watcher does) and runs the full sync: from the lists received to rules in the kernel. As
/// the agent does, into a node without our tables the frame is written while the lists come in.
fn full_sync(agent: &mut Agent, lists: impl IntoIterator<Item = (Service, EndpointSlice)>) -> (Duration, SyncReport) {
    let t = Instant::now();
    let (inputs, syncer) = (&mut agent.inputs, &mut agent.syncer);
    std::thread::scope(|scope| {
        let preparing = scope.spawn(|| syncer.prepare().unwrap());
        inputs.begin_service_relist();
        inputs.begin_slice_relist();
        for (service, slice) in lists {
            inputs.apply_service(&service, CLASS);
            inputs.apply_slice(&slice);
        }
        inputs.end_service_relist();
        inputs.end_slice_relist();
        preparing.join().unwrap()
    });
    let report = agent.sync();
    assert!(report.full);
    (t.elapsed(), report)
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap()
}

/// In the child: the agent's state for `n` Services after a full sync, and its RSS.
fn rss_child(node: &str, n: usize) {
    let mut agent = Agent::new(node);
    // Built as they arrive, page by page, rather than all held at once.
    full_sync(&mut agent, (0..n).map(|i| (service(i, false), endpoints(i, 10))));
    println!("{} {}", rss_kib("VmRSS:"), rss_kib("VmHWM:"));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(node) = std::env::var("HAWSER_BENCH_RSS_NODE") {
        rss_child(&node, std::env::var("HAWSER_BENCH_SERVICES").unwrap().parse().unwrap());
        return;
    }
    if !prerequisites() {
        return;
    }
    let n: usize = std::env::var("HAWSER_BENCH_SERVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let affinity_n: usize =
        std::env::var("HAWSER_BENCH_AFFINITY_SERVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(n);
    let lab = Lab::new(1).unwrap();
    spawn_sink(&lab.pods[0], 9000);
    // Another proxy's table beside ours (an nft script, e.g. of kube-proxy's size), when given.
    if let Ok(script) = std::env::var("HAWSER_BENCH_NEIGHBOUR") {
        let t = Instant::now();
        node_nft(&lab.node, false).run(&std::fs::read_to_string(&script).unwrap()).unwrap();
        eprintln!("neighbour table from {script} written in {:.1}s", t.elapsed().as_secs_f64());
    }

    let mut agent = Agent::new(&lab.node);
    let (full, report) = full_sync(&mut agent, lists(n, 10, false));
    let (rules, elements, _) = agent.syncer.counts();
    println!("services={n} endpoints_per_service=10 rules={rules} elements={elements}");
    println!(
        "full_sync_ms={} target_ms=500 kernel_write_ms={} writer={}",
        ms(full),
        ms(report.apply_time),
        report.writer.as_str()
    );

    // One endpoint less for Service 1 (its rule is rewritten): the watch event, then the sync.
    timed_sync(&mut agent, "one_endpoint", |inputs| inputs.apply_slice(&endpoints(1, 9)));
    // A pod replaced (one endpoint out, another in, as in a rolling update): elements only.
    timed_sync(&mut agent, "endpoint_replaced", |inputs| inputs.apply_slice(&endpoints_from(1, 9, 100)));
    timed_sync(&mut agent, "service_added", |inputs| {
        inputs.apply_service(&service(n, false), CLASS);
        inputs.apply_slice(&endpoints(n, 10));
    });

    // A resync with no watch event since: the agent loop's check, then nothing. (The sync
    // after a removal deletes what it emptied first.)
    if agent.syncer.has_work() {
        agent.sync();
    }
    let runs = agent.runs.load(Ordering::SeqCst);
    let t = Instant::now();
    if agent.inputs.pending() > 0 || agent.syncer.has_work() {
        agent.sync();
    }
    println!(
        "idle_resync_ms={:.3} target_ms=1 writes={}",
        t.elapsed().as_secs_f64() * 1000.0,
        agent.runs.load(Ordering::SeqCst) - runs
    );

    // The agent restarted over the tables it left, nothing changed meanwhile: it adopts them.
    let mut restarted = Agent::new(&lab.node);
    let (restart, report) = full_sync(&mut restarted, lists(n, 10, false));
    println!(
        "restart_full_sync_ms={} target_ms=500 kernel_write_ms={} writer={} chains_written={} elements_changed={} replaced={}",
        ms(restart),
        ms(report.apply_time),
        report.writer.as_str(),
        report.chains_written,
        report.elements_changed,
        report.replaced.is_some()
    );
    // The periodic full resync (drift repair) over the tables it adopted, nothing changed.
    restarted.syncer.force_full_resync();
    let t = Instant::now();
    let report = restarted.sync();
    println!(
        "periodic_full_resync_ms={} writer={} chains_written={} elements_changed={}",
        ms(t.elapsed()),
        report.writer.as_str(),
        report.chains_written,
        report.elements_changed
    );
    drop(restarted);

    // RSS of a child process holding the agent's state for n Services, with mimalloc set as the
    // chart sets it (freed memory returned at once), and with mimalloc's default purge delay.
    let rss_child = |purge_delay: Option<&str>| {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.env("HAWSER_BENCH_RSS_NODE", &lab.node).env("HAWSER_BENCH_SERVICES", n.to_string());
        match purge_delay {
            Some(ms) => child.env("MIMALLOC_PURGE_DELAY", ms),
            None => child.env_remove("MIMALLOC_PURGE_DELAY"),
        };
        let out = child.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut it = text.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        (it.next().unwrap_or(0) as f64 / 1024.0, it.next().unwrap_or(0) as f64 / 1024.0)
    };
    let (rss, hwm) = rss_child(Some("0"));
    let (rss_default, _) = rss_child(None);
    println!("rss_mib={rss:.1} peak_rss_mib={hwm:.1} target_mib=100 rss_mib_default_purge_delay={rss_default:.1}");

    // ClientIP affinity vs none, at the same size, each from empty tables.
    let mut plain = Agent::new(&lab.node);
    plain.syncer.cleanup().unwrap();
    let (t_plain, _) = full_sync(&mut plain, lists(affinity_n, 10, false));
    let mut sticky = Agent::new(&lab.node);
    sticky.syncer.cleanup().unwrap();
    let (t_sticky, _) = full_sync(&mut sticky, lists(affinity_n, 10, true));
    println!(
        "affinity_services={affinity_n} affinity_full_sync_ms={} plain_full_sync_ms={} affinity_ratio={:.2} target_ratio=2",
        ms(t_sticky),
        ms(t_plain),
        t_sticky.as_secs_f64() / t_plain.as_secs_f64()
    );
    // One recorded client per affinity Service (as the kernel records them), then Service 1
    // loses the endpoint its client was sent to: the sync lists every entry and deletes that one.
    // Service 0 has no such client (it is the lab's real pod), so this needs two Services.
    if affinity_n >= 2 {
        affinity_endpoint_removed(&lab.node, &mut sticky, affinity_n);
    }
    sticky.syncer.cleanup().unwrap();
    let mut agent = Agent::new(&lab.node);
    full_sync(&mut agent, lists(n, 10, false));

    fn throughput(lab: &Lab, dst: &str, port: u16, bytes: usize) -> f64 {
        let dst = dst.to_string();
        in_netns(&lab.client, move || {
            let mut s = TcpStream::connect((dst.as_str(), port)).unwrap();
            let chunk = vec![0u8; 1 << 16];
            let t = Instant::now();
            let mut sent = 0;
            while sent < bytes {
                s.write_all(&chunk).unwrap();
                sent += chunk.len();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            sent as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
        })
    }

    fn connect_latency(lab: &Lab, dst: &str, port: u16, n: usize) -> Duration {
        let mut samples: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                tcp(&lab.client, dst, port).server();
                t.elapsed()
            })
            .collect();
        samples.sort();
        samples[n / 2]
    }

    // Latency: Service 0 (the real pod) among 10k Services, then alone.
    let lat_10k = connect_latency(&lab, "198.18.0.1", 80, 300);
    agent.inputs.replace(&[service(0, false)], &[endpoints(0, 10)], CLASS);
    agent.sync();
    let lat_1 = connect_latency(&lab, "198.18.0.1", 80, 300);
    println!(
        "connect_latency_us_{n}={:.0} connect_latency_us_1={:.0} latency_ratio={:.2} target_ratio=1.1",
        lat_10k.as_secs_f64() * 1e6,
        lat_1.as_secs_f64() * 1e6,
        lat_10k.as_secs_f64() / lat_1.as_secs_f64()
    );

    // Throughput: NodePort (DNAT + masquerade) vs straight to the pod through the same node.
    let mut sink = Svc::new("bench", "sink");
    sink.lb_ips = vec!["198.18.200.1"];
    sink.ports = vec![("http", "TCP", 80, Some(30090))];
    let sink_slice = slice("bench", "sink", "s", &[("http", "TCP", 9000)], &[Ep::ready(leak(pod_ip(1)), NODE)]);
    agent.inputs.replace(&[sink.build()], &[sink_slice], CLASS);
    agent.sync();
    let bytes = 1usize << 30;
    let direct = throughput(&lab, &pod_ip(1), 9000, bytes);
    let nodeport = throughput(&lab, NODE_IP, 30090, bytes);
    println!(
        "throughput_gbps_direct={direct:.2} throughput_gbps_nodeport={nodeport:.2} throughput_ratio={:.2}",
        nodeport / direct
    );
    agent.syncer.cleanup().unwrap();
}

/// Records one client per affinity Service but Service 0, then removes the endpoint Service 1's
/// client was sent to, and prints that sync's figures.
fn affinity_endpoint_removed(node: &str, sticky: &mut Agent, affinity_n: usize) {
    // Each in the NAT table of its Service.
    let mut entries: std::collections::BTreeMap<TableId, Vec<String>> = std::collections::BTreeMap::new();
    for i in 1..affinity_n {
        let (a, b) = (i / 250, i % 250 + 1);
        entries.entry(TableId::nat(Family::V4, "bench", &format!("svc-{i}"))).or_default().push(format!(
            "100.64.{a}.{b} . 198.18.{a}.{b} . tcp . 80 : 10.{}.{}.10 . 8080",
            100 + i / 250,
            i % 250
        ));
    }
    let script: String = entries
        .iter()
        .map(|(table, entries)| format!("add element {table} affinity-cluster {{ {} }}\n", entries.join(", ")))
        .collect();
    node_nft(node, false).run(&script).unwrap();
    let entries: Vec<String> = entries.into_values().flatten().collect();
    let report = timed_sync(sticky, "affinity_endpoint_removed", |inputs| inputs.apply_slice(&endpoints(1, 9)));
    println!("affinity_entries={} affinity_purged={}", entries.len(), report.affinity_purged);
}
