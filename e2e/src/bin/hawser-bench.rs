//! hawser-bench: what the real `hawser-operator` costs, in time, cloud API calls, Kubernetes
//! writes and memory, run as a child process with the mock cloud against the in-process fake
//! Kubernetes API server.
//!
//! Each scenario prints one line of `key=value` figures on stdout, each next to the bound it is
//! judged against (progress and logs go to stderr). It asserts nothing: it measures.
//!
//! - `create`: N Services and M Nodes exist, the operator starts; time until all have ingress.
//! - `rate_limited`: the same from scratch with the mock cloud rate limited.
//! - `steady`: one resync period with nothing changing.
//! - `node_churn`: one Node flapping Ready, then one Node joining and one leaving.
//! - `delete`: every Service deleted; time until they and their load balancers are gone.
//! - `memory`: a large cluster provisioned with no cloud latency; the operator's resident memory.
//!
//! Run it with: `cargo build --release -p hawser-operator -p hawser-e2e && target/release/hawser-bench`
//! (`--operator PATH` measures another build, `--help` lists the sizes and timings).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use hawser_fake_apiserver::{Config, FakeApiServer, kubeconfig};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SCENARIOS: [&str; 6] = ["create", "rate_limited", "steady", "node_churn", "delete", "memory"];
/// The operator's token: the audit log names its requests `operator`, apart from ours.
const OPERATOR_TOKEN: &str = "hawser-bench-operator";
/// Requests the bench keeps in flight while populating or deleting.
const IN_FLIGHT: usize = 16;

/// Benchmarks the real hawser-operator against the fake apiserver and the mock cloud.
#[derive(Debug, Parser)]
#[command(name = "hawser-bench")]
struct Args {
    /// The operator binary (default: hawser-operator next to this one).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Services of the timed scenarios.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Nodes of the timed scenarios.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Latency of every mock cloud call.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    latency: Duration,
    /// The operator's --concurrency.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Mock cloud calls per second in `rate_limited`.
    #[arg(long, default_value_t = 20.0)]
    rate_limit: f64,
    /// The operator's --resync-period; the `steady` window. An operator that calls the cloud on
    /// every resync must get through all Services well within one period, or resyncs starve
    /// provisioning and `node_churn` never settles.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resync_period: Duration,
    /// The operator's --node-debounce.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    node_debounce: Duration,
    /// Services of `memory`.
    #[arg(long, default_value_t = 10_000)]
    memory_services: usize,
    /// Nodes of `memory`.
    #[arg(long, default_value_t = 1000)]
    memory_nodes: usize,
    /// Longest wait for provisioning or deletion before a scenario reports what it reached.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    timeout: Duration,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    scenarios: Vec<String>,
}

/// `50ms` or `2s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration; give <n>ms or <n>s");
    match s.strip_suffix("ms") {
        Some(ms) => ms.parse().map(Duration::from_millis).map_err(|_| err()),
        None => s.strip_suffix('s').and_then(|n| n.parse().ok()).map(Duration::from_secs).ok_or_else(err),
    }
}

fn per(count: f64, services: usize) -> f64 {
    count / services.max(1) as f64
}

/// The one-minute load average: on a small shared machine, other work skews the timings.
fn load1() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    loadavg.split_whitespace().next().unwrap_or("?").to_owned()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The fake apiserver with its audit log, and a kubeconfig naming the operator apart.
struct Cluster {
    server: FakeApiServer,
    client: Client,
    operator_kubeconfig: PathBuf,
    audit_log: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let audit_log = dir.path().join("audit.jsonl");
        let server = FakeApiServer::start(Config {
            audit_log: Some(audit_log.clone()),
            users: vec![(OPERATOR_TOKEN.to_owned(), "operator".to_owned())],
            ..Config::default()
        })
        .await?;
        let client = server.client().await?;
        let operator_kubeconfig = dir.path().join("operator.kubeconfig");
        kubeconfig::write(&operator_kubeconfig, &kubeconfig::document(server.url(), server.ca_pem(), OPERATOR_TOKEN))?;
        Ok(Self { server, client, operator_kubeconfig, audit_log, dir })
    }

    async fn populate(&self, services: usize, nodes: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let node_api: Api<Node> = Api::all(self.client.clone());
        stream::iter((0..nodes).map(|i| node(&format!("node-{i:04}"), i)))
            .map(|n| {
                let api = node_api.clone();
                async move { api.create(&PostParams::default(), &n?).await.context("creating a Node") }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_for_each(|_| std::future::ready(Ok(())))
            .await?;
        let svc_api: Api<Service> = Api::namespaced(self.client.clone(), "default");
        stream::iter((0..services).map(|i| service(&format!("svc-{i:05}"))))
            .map(|s| {
                let api = svc_api.clone();
                async move { api.create(&PostParams::default(), &s?).await.context("creating a Service") }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_for_each(|_| std::future::ready(Ok(())))
            .await?;
        eprintln!("created {nodes} Nodes and {services} Services in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Writes by the operator in the audit log past `offset`, by resource.
    fn operator_writes(&self, offset: u64) -> anyhow::Result<BTreeMap<String, u64>> {
        let text = std::fs::read(&self.audit_log).context("reading the audit log")?;
        let start = usize::try_from(offset)?.min(text.len());
        let mut writes = BTreeMap::new();
        for line in String::from_utf8_lossy(&text[start..]).lines() {
            // The apiserver may be halfway through writing the last line.
            let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
            let verb = entry["verb"].as_str().unwrap_or_default();
            if entry["user"] == "operator" && matches!(verb, "create" | "update" | "patch" | "delete") {
                let sub = entry["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
                let resource = format!("{verb} {}{sub}", entry["resource"].as_str().unwrap_or_default());
                *writes.entry(resource).or_default() += 1;
            }
        }
        Ok(writes)
    }

    fn audit_offset(&self) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(&self.audit_log).map(|m| m.len()).unwrap_or(0))
    }
}

fn node(name: &str, i: usize) -> anyhow::Result<Node> {
    let address = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": address}],
        },
    }))?)
}

fn service(name: &str) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            // The fake apiserver's node-port range could not hold 10k Services.
            "allocateLoadBalancerNodePorts": false,
            "selector": {"app": name},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    }))?)
}

/// Services seen by a watch, and how many of them have an ingress.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    services: usize,
    with_ingress: usize,
}

/// Follows the Services with one watch rather than repeated LISTs, which at 10k Services would
/// load the apiserver sharing this process.
fn track_services(client: Client) -> (watch::Receiver<Progress>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Progress::default());
    let task = tokio::spawn(async move {
        let has_ingress = |s: &Service| {
            s.status.as_ref().and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref()).is_some_and(|i| !i.is_empty())
        };
        let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
        let (mut seen, mut relisted) = (HashMap::new(), HashMap::new());
        let mut with_ingress = 0;
        let events = watcher::watcher(Api::<Service>::all(client), watcher::Config::default()).default_backoff();
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => relisted.clear(),
                Ok(Event::InitApply(s)) => {
                    relisted.insert(name(&s), has_ingress(&s));
                    continue;
                }
                Ok(Event::InitDone) => {
                    seen = std::mem::take(&mut relisted);
                    with_ingress = seen.values().filter(|i| **i).count();
                }
                Ok(Event::Apply(s)) => {
                    let now = has_ingress(&s);
                    let before = seen.insert(name(&s), now).unwrap_or(false);
                    with_ingress = with_ingress + usize::from(now) - usize::from(before);
                }
                Ok(Event::Delete(s)) => with_ingress -= usize::from(seen.remove(&name(&s)).unwrap_or(false)),
                Err(e) => eprintln!("service watch: {e}"),
            }
            tx.send_replace(Progress { services: seen.len(), with_ingress });
        }
    });
    (rx, task)
}

/// Mock cloud calls by (operation, outcome), and the load balancers it holds.
#[derive(Debug, Clone, Default)]
struct CloudCounts {
    calls: BTreeMap<(String, String), u64>,
    load_balancers: usize,
}

impl CloudCounts {
    fn sum(&self, keep: impl Fn(&str, &str) -> bool) -> f64 {
        self.calls.iter().filter(|((op, outcome), _)| keep(op, outcome)).fold(0.0, |sum, (_, n)| sum + *n as f64)
    }
    fn op(&self, operation: &str) -> f64 {
        self.sum(|op, _| op == operation)
    }
    fn reads(&self) -> f64 {
        self.sum(|op, _| op.starts_with("Describe"))
    }
    fn writes(&self) -> f64 {
        self.sum(|op, _| !op.starts_with("Describe"))
    }
    fn total(&self) -> f64 {
        self.sum(|_, _| true)
    }
    /// Calls since `earlier`.
    fn since(&self, earlier: &Self) -> Self {
        let calls =
            self.calls.iter().map(|(k, n)| (k.clone(), n.saturating_sub(earlier.calls.get(k).copied().unwrap_or(0))));
        Self { calls: calls.collect(), load_balancers: self.load_balancers }
    }
}

/// Counting state for an operator without `/mock/summary`, whose `/mock/state` keeps only the
/// last 10000 calls: it is sampled every second and each sample is lined up with the previous.
#[derive(Default)]
struct Tally {
    has_summary: Option<bool>,
    ring: Vec<Value>,
    counts: CloudCounts,
}

/// How many entries at the end of `new` were not in `old`: the smallest shift for which what
/// `old` kept is where `new` starts. A run of identical calls longer than the gap between two
/// samples could hide calls, but the ring of 10000 turns over in no less than a minute here.
fn appended(old: &[Value], new: &[Value]) -> usize {
    (0..=old.len()).find_map(|s| new.starts_with(&old[s..]).then(|| new.len() - (old.len() - s))).unwrap_or(new.len())
}

/// The operator as a child process, killed when dropped.
struct Operator {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
    tally: Arc<Mutex<Tally>>,
    sampler: Option<JoinHandle<()>>,
}

/// What the operator's /metrics says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct OperatorMetrics {
    ensures: f64,
    provider_calls: f64,
    reconciles: f64,
}

impl Operator {
    /// Starts the operator; `count_calls` samples the mock cloud while the operator runs.
    fn start(
        args: &Args,
        cluster: &Cluster,
        latency: Duration,
        extra: &[String],
        count_calls: bool,
    ) -> anyhow::Result<Self> {
        let binary = match &args.operator {
            Some(path) => path.clone(),
            None => hawser_e2e::binaries::binary("hawser-operator")?,
        };
        let metrics_port = free_port()?;
        let log = cluster.dir.path().join(format!("operator-{metrics_port}.log"));
        let out = std::fs::File::create(&log)?;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let child = Command::new(&binary)
            .args(["--provider", "mock", "--cluster-name", "bench", "--mock-address-pool", "198.18.0.0/15"])
            .args(["--mock-latency", &ms(latency)])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--resync-period", &ms(args.resync_period), "--node-debounce", &ms(args.node_debounce)])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--health-probe-bind-address", &format!("127.0.0.1:{}", free_port()?)])
            .args(extra)
            .env("KUBECONFIG", &cluster.operator_kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut op = Self { child, metrics_port, log, tally, sampler: None };
        if count_calls {
            let tally = op.tally.clone();
            op.sampler = Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // Errors before the operator listens are expected; the next sample retries.
                    if cloud_counts(metrics_port, &tally).await.is_ok() && tally.lock().await.has_summary == Some(true)
                    {
                        return;
                    }
                }
            }));
        }
        Ok(op)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!("the operator exited ({status}); the end of its log {}:\n{tail}", self.log.display());
        }
        Ok(())
    }

    async fn metrics(&self) -> anyhow::Result<OperatorMetrics> {
        let (_, text) = http_get(self.metrics_port, "/metrics").await?;
        let sum = |name: &str, filter: &str| -> f64 {
            let prefix = format!("{name}{{");
            text.lines()
                .filter(|l| l.starts_with(&prefix) && l.contains(filter))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .fold(0.0, |sum, v| sum + v)
        };
        Ok(OperatorMetrics {
            ensures: sum("hawser_provider_calls_total", "operation=\"ensure\""),
            provider_calls: sum("hawser_provider_calls_total", ""),
            reconciles: sum("hawser_reconciles_total", ""),
        })
    }

    async fn cloud(&self) -> anyhow::Result<CloudCounts> {
        cloud_counts(self.metrics_port, &self.tally).await
    }

    /// Resident and peak resident memory, in MiB.
    fn memory_mib(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = |key: &str| -> anyhow::Result<f64> {
            let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key}"))?;
            Ok(line[key.len()..].trim().trim_end_matches("kB").trim().parse::<f64>()?)
        };
        Ok((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }

    /// Waits until `done` holds for the watched Services; false after `timeout`.
    async fn wait_services(
        &mut self,
        what: &str,
        progress: &mut watch::Receiver<Progress>,
        timeout: Duration,
        done: impl Fn(Progress) -> bool,
    ) -> anyhow::Result<bool> {
        let (deadline, mut next_report) = (Instant::now() + timeout, Instant::now());
        loop {
            let now = *progress.borrow_and_update();
            if done(now) {
                return Ok(true);
            }
            self.check_alive()?;
            if Instant::now() >= next_report {
                eprintln!("{what}: {} Services, {} with ingress", now.services, now.with_ingress);
                next_report += Duration::from_secs(10);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), progress.changed()).await;
        }
    }

    /// Waits until the operator has made no provider call and no reconcile for `quiet`, at most
    /// until `max` after `since`; returns the time from `since` to its last activity, and
    /// whether it went quiet (an operator that re-ensures on resync may never).
    async fn settle(&mut self, since: Instant, quiet: Duration, max: Duration) -> anyhow::Result<(Duration, bool)> {
        let (mut last, mut last_change) = (self.metrics().await?, Instant::now());
        while last_change.elapsed() < quiet && since.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.check_alive()?;
            let now = self.metrics().await?;
            if now != last {
                (last, last_change) = (now, Instant::now());
            }
        }
        Ok((last_change.saturating_duration_since(since), last_change.elapsed() >= quiet))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(60), exchange).await.context("timed out")??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header")?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    Ok((code, body.to_owned()))
}

/// Calls since the operator started: from `/mock/summary` where the operator has it, else by
/// lining up `/mock/state` with the previous sample.
async fn cloud_counts(port: u16, tally: &Mutex<Tally>) -> anyhow::Result<CloudCounts> {
    let mut tally = tally.lock().await;
    if tally.has_summary != Some(false) {
        let (code, body) = http_get(port, "/mock/summary").await?;
        tally.has_summary = Some(code == 200);
        if code == 200 {
            let summary: Value = serde_json::from_str(&body).context("/mock/summary")?;
            let mut counts = CloudCounts::default();
            for (op, outcomes) in summary["calls"].as_object().into_iter().flatten() {
                for (outcome, n) in outcomes.as_object().into_iter().flatten() {
                    counts.calls.insert((op.clone(), outcome.clone()), n.as_u64().unwrap_or(0));
                }
            }
            counts.load_balancers = summary["loadBalancers"].as_u64().unwrap_or(0).try_into()?;
            return Ok(counts);
        }
    }
    let (code, body) = http_get(port, "/mock/state").await?;
    ensure!(code == 200, "/mock/state answered {code}");
    let mut state: Value = serde_json::from_str(&body).context("/mock/state")?;
    let ring = match state["calls"].take() {
        Value::Array(calls) => calls,
        _ => bail!("/mock/state without calls"),
    };
    let fresh = appended(&tally.ring, &ring);
    for call in &ring[ring.len() - fresh..] {
        let key = |k: &str| call[k].as_str().unwrap_or_default().to_owned();
        *tally.counts.calls.entry((key("operation"), key("outcome"))).or_default() += 1;
    }
    tally.ring = ring;
    tally.counts.load_balancers = state["loadBalancers"].as_array().map_or(0, Vec::len);
    Ok(tally.counts.clone())
}

async fn set_ready(nodes: &Api<Node>, name: &str, ready: bool) -> anyhow::Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    Ok(())
}

/// create, then steady, node_churn and delete on the same cluster and operator.
async fn lifecycle(args: &Args, wanted: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let (n, m) = (args.services, args.nodes);
    let cluster = Cluster::start().await?;
    cluster.populate(n, m).await?;
    let (mut progress, watch_task) = track_services(cluster.client.clone());
    let started = Instant::now();
    let mut op = Operator::start(args, &cluster, args.latency, &[], true)?;
    let all = op.wait_services("create", &mut progress, args.timeout, |p| p.with_ingress >= n).await?;
    let seconds = started.elapsed().as_secs_f64();
    // Lets the last status writes and their metrics land before counting.
    op.settle(Instant::now(), Duration::from_secs(1), Duration::from_secs(2)).await?;
    let (cloud, metrics) = (op.cloud().await?, op.metrics().await?);
    if wanted("create") {
        let writes = cluster.operator_writes(0)?;
        eprintln!("create: operator writes to Kubernetes: {writes:?}");
        let bound = n as f64 * 2.0 * args.latency.as_secs_f64() / f64::from(args.concurrency);
        println!(
            "scenario=create services={n} nodes={m} latency_ms={} concurrency={} provisioned={} seconds={seconds:.2} \
             bound_seconds={bound:.2} ratio={:.2} calls_per_create=2 ensures_per_service={:.2} \
             describe_per_service={:.2} create_per_service={:.2} modify_per_service={:.2} \
             reconciles_per_service={:.2} k8s_writes_per_service={:.2} load1={}",
            args.latency.as_millis(),
            args.concurrency,
            progress.borrow().with_ingress,
            seconds / bound,
            per(metrics.ensures, n),
            per(cloud.op("DescribeLoadBalancers"), n),
            per(cloud.op("CreateLoadBalancer"), n),
            per(cloud.op("ModifyLoadBalancer"), n),
            per(metrics.reconciles, n),
            per(writes.values().sum::<u64>() as f64, n),
            load1(),
        );
    }

    ensure!(all, "not every Service got an ingress within {:?}; the other scenarios need them", args.timeout);
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    if wanted("steady") {
        let (cloud0, metrics0, audit0) = (op.cloud().await?, op.metrics().await?, cluster.audit_offset()?);
        let window = args.resync_period + Duration::from_secs(2);
        eprintln!("steady: watching for {window:?}");
        tokio::time::sleep(window).await;
        op.check_alive()?;
        let cloud = op.cloud().await?.since(&cloud0);
        let ensures = op.metrics().await?.ensures - metrics0.ensures;
        let writes = cluster.operator_writes(audit0)?;
        eprintln!("steady: operator writes to Kubernetes: {writes:?}");
        let k8s_writes: u64 = writes.values().sum();
        println!(
            "scenario=steady services={n} window_seconds={:.0} cloud_reads_per_service={:.4} \
             bound_reads_per_service=0.2 cloud_writes_per_service={:.4} k8s_writes_per_service={:.4} \
             bound_writes_per_service=0 ensures_per_service={:.4} load1={}",
            window.as_secs_f64(),
            per(cloud.reads(), n),
            per(cloud.writes(), n),
            per(k8s_writes as f64, n),
            per(ensures, n),
            load1(),
        );
    }

    if wanted("node_churn") {
        let flapping = "node-0000";
        let cloud0 = op.cloud().await?;
        let started = Instant::now();
        for _ in 0..10 {
            for ready in [false, true] {
                set_ready(&nodes, flapping, ready).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        // Unlike a fixed wait, settling also counts the passes still running after the flaps.
        tokio::time::sleep(args.node_debounce).await;
        let (flap_seconds, flap_settled) = op.settle(started, Duration::from_secs(3), Duration::from_secs(120)).await?;
        let cloud1 = op.cloud().await?;
        let flap_calls = cloud1.since(&cloud0).total();

        let started = Instant::now();
        nodes.create(&PostParams::default(), &node("node-joined", m + 1)?).await?;
        nodes.delete(&format!("node-{:04}", m.saturating_sub(1)), &DeleteParams::default()).await?;
        tokio::time::sleep(args.node_debounce).await;
        let (join_seconds, join_settled) = op.settle(started, Duration::from_secs(3), Duration::from_secs(120)).await?;
        let join_calls = op.cloud().await?.since(&cloud1);
        println!(
            "scenario=node_churn services={n} nodes={m} ready_flaps=10 ready_flap_calls_per_service={:.4} \
             ready_flap_seconds={:.2} ready_flap_settled={flap_settled} join_leave_calls_per_service={:.2} \
             join_leave_writes_per_service={:.2} join_leave_seconds={:.2} join_leave_settled={join_settled} \
             load1={}",
            per(flap_calls, n),
            flap_seconds.as_secs_f64(),
            per(join_calls.total(), n),
            per(join_calls.writes(), n),
            join_seconds.as_secs_f64(),
            load1(),
        );
    }

    if wanted("delete") {
        let api: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let started = Instant::now();
        stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move { api.delete(&format!("svc-{i:05}"), &DeleteParams::default()).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_for_each(|_| std::future::ready(Ok(())))
            .await?;
        let gone = op.wait_services("delete", &mut progress, args.timeout, |p| p.services == 0).await?;
        let mut left = op.cloud().await?.load_balancers;
        while gone && left > 0 && started.elapsed() < args.timeout {
            tokio::time::sleep(Duration::from_millis(200)).await;
            left = op.cloud().await?.load_balancers;
        }
        let seconds = started.elapsed().as_secs_f64();
        let bound = n as f64 * 2.0 * args.latency.as_secs_f64() / f64::from(args.concurrency);
        println!(
            "scenario=delete services={n} seconds={seconds:.2} bound_seconds={bound:.2} ratio={:.2} \
             services_left={} left_in_cloud={left} load1={}",
            seconds / bound,
            progress.borrow().services,
            load1(),
        );
    }
    watch_task.abort();
    drop(op);
    cluster.server.stop().await;
    Ok(())
}

async fn rate_limited(args: &Args) -> anyhow::Result<()> {
    let n = args.services;
    let cluster = Cluster::start().await?;
    cluster.populate(n, args.nodes).await?;
    let (mut progress, watch_task) = track_services(cluster.client.clone());
    let started = Instant::now();
    let extra = ["--mock-rate-limit".to_owned(), args.rate_limit.to_string()];
    let mut op = Operator::start(args, &cluster, args.latency, &extra, true)?;
    let all = op.wait_services("rate_limited", &mut progress, args.timeout, |p| p.with_ingress >= n).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (cloud, metrics) = (op.cloud().await?, op.metrics().await?);
    let bound = n as f64 * 2.0 / args.rate_limit;
    println!(
        "scenario=rate_limited services={n} rate_limit={} provisioned={} seconds={seconds:.2} bound_seconds={bound:.2} \
         ratio={:.2} throttled_share={:.3} cloud_calls={} ensures_per_service={:.2} load1={}",
        args.rate_limit,
        if all { n } else { progress.borrow().with_ingress },
        seconds / bound,
        cloud.sum(|_, outcome| outcome == "throttled") / cloud.total().max(1.0),
        cloud.total(),
        per(metrics.ensures, n),
        load1(),
    );
    watch_task.abort();
    drop(op);
    cluster.server.stop().await;
    Ok(())
}

async fn memory(args: &Args) -> anyhow::Result<()> {
    let (n, m) = (args.memory_services, args.memory_nodes);
    let cluster = Cluster::start().await?;
    cluster.populate(n, m).await?;
    let (mut progress, watch_task) = track_services(cluster.client.clone());
    let started = Instant::now();
    // No call counting: a /mock/state of 10k load balancers would itself inflate the memory.
    let mut op = Operator::start(args, &cluster, Duration::ZERO, &[], false)?;
    let all = op.wait_services("memory", &mut progress, args.timeout, |p| p.with_ingress >= n).await?;
    let provision_seconds = started.elapsed().as_secs_f64();
    let provisioned = progress.borrow().with_ingress;
    if all {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    op.check_alive()?;
    let (rss, hwm) = op.memory_mib()?;
    println!(
        "scenario=memory services={n} nodes={m} provisioned={provisioned} provision_seconds={provision_seconds:.2} \
         rss_mib={rss:.1} hwm_mib={hwm:.1} bound_mib=100 load1={}",
        load1()
    );
    watch_task.abort();
    drop(op);
    cluster.server.stop().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for s in &args.scenarios {
        ensure!(SCENARIOS.contains(&s.as_str()), "unknown scenario {s:?}; known: {}", SCENARIOS.join(","));
    }
    let wanted = |name: &str| args.scenarios.iter().any(|s| s == name);
    if ["create", "steady", "node_churn", "delete"].iter().any(|s| wanted(s)) {
        lifecycle(&args, wanted).await?;
    }
    if wanted("rate_limited") {
        rate_limited(&args).await?;
    }
    if wanted("memory") {
        memory(&args).await?;
    }
    Ok(())
}
