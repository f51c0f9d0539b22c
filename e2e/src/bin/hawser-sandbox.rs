//! `hawser-sandbox`: the local sandbox as one command. Starts the fake apiserver, network-
//! namespace nodes running the real `hawser-dataplane`, the real `hawser-operator` with the
//! mock cloud, a demo backend and a LoadBalancer Service; prints the load-balancer address and a
//! `curl` that works from this machine; on Ctrl-C or SIGTERM (also while starting) removes every
//! namespace, process, nft table, route and file it made. It holds address slot 0 throughout: a
//! second sandbox refuses and touches nothing, and what a crashed run left is removed only once
//! the lock proves that run gone. Its children die with it even when it is SIGKILLed
//! ([`hawser_e2e::reaper`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hawser_e2e::backend::Backend as _;
use hawser_e2e::local::{self, LocalCluster, LocalOptions, SlotBusy, SlotLock};
use hawser_e2e::netns;
use hawser_e2e::traffic::{Client, Outcome};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;

const USAGE: &str = "usage: hawser-sandbox [--nodes N] [--replicas N] [--state-dir DIR]
  Runs as root on Linux; the hawser-operator and hawser-dataplane binaries are taken from the
  directory of this executable (or HAWSER_E2E_BIN_DIR).";

struct Args {
    nodes: usize,
    replicas: usize,
    state_dir: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { nodes: 2, replicas: 2, state_dir: PathBuf::from("/run/hawser-sandbox") };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--nodes" => a.nodes = value()?.parse().context("--nodes is a number")?,
            "--replicas" => a.replicas = value()?.parse().context("--replicas is a number")?,
            "--state-dir" => a.state_dir = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// Kills processes recorded by a run that crashed, if they are still ours (a hawser binary);
/// a recycled pid of something else is left alone.
fn kill_recorded(pids_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pids_file) else { return };
    for pid in text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("hawser-") {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Removes the files a run makes in the state directory (and only those): a stale mock cloud
/// from a crashed run must not leak into the next one.
fn remove_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = ["pids", "kubeconfig", "cloud.json", "cloud.tmp", "operator.log", "lbagent.log"]
            .contains(&name.as_str())
            || (name.starts_with("node-") && name.ends_with(".log"));
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

async fn demo(cluster: &LocalCluster, replicas: usize) -> anyhow::Result<IpAddr> {
    cluster.deploy("default", "demo", replicas).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            "selector": {"app": "demo"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    }))?;
    let api: Api<Service> = Api::namespaced(cluster.kube(), "default");
    api.create(&PostParams::default(), &svc).await?;
    hawser_e2e::scenarios::until("the demo Service's address", Duration::from_secs(30), || async {
        let s = api.get("demo").await?;
        s.status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .and_then(|ip| ip.parse().ok())
            .context("no address yet")
    })
    .await
}

/// The sandbox's prefix of namespace and host link names.
const PREFIX: &str = "hws";

/// Takes slot 0, or says clearly which sandbox has it.
fn lock() -> anyhow::Result<SlotLock> {
    local::lock_slot(Some(0)).map_err(|e| match e.downcast::<SlotBusy>() {
        Ok(SlotBusy { holder: Some(pid), .. }) => anyhow::anyhow!(
            "another sandbox is running (pid {pid}); it was left alone. Stop it first: Ctrl-C where it runs, or kill -INT {pid}"
        ),
        Ok(busy) => anyhow::anyhow!("another sandbox is running ({busy}); it was left alone. Stop it first"),
        Err(e) => e,
    })
}

/// Removes whatever an earlier run that crashed left; only called with the slot's lock held,
/// which proves that run is gone.
fn clean_leftovers(state_dir: &Path) {
    kill_recorded(&state_dir.join("pids"));
    local::clean_stale(PREFIX);
    remove_files(state_dir);
}

async fn start(a: &Args, lock: &SlotLock) -> anyhow::Result<(LocalCluster, IpAddr)> {
    std::fs::create_dir_all(&a.state_dir)?;
    let cluster = LocalCluster::start_locked(
        LocalOptions {
            nodes: a.nodes,
            slot: Some(0),
            prefix: Some(PREFIX.into()),
            dir: Some(a.state_dir.clone()),
            operator_args: Vec::new(),
            kubeconfig: None,
        },
        lock,
    )
    .await?;
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    std::fs::write(a.state_dir.join("pids"), pids.join("\n"))?;
    cluster.route_pool_from_host()?;
    let addr = demo(&cluster, a.replicas).await?;
    // Only print what works: the same request the user is told to make, from this machine.
    let host = Client::new(None, None);
    hawser_e2e::scenarios::until("the demo answering from this machine", Duration::from_secs(30), || async {
        match host.http(addr, 80, "/hostname").await {
            Outcome::Reply(s) => Ok(s),
            other => bail!("{other:?}"),
        }
    })
    .await?;
    Ok((cluster, addr))
}

async fn run(a: Args) -> anyhow::Result<()> {
    netns::prerequisites().map_err(|why| anyhow::anyhow!("the sandbox needs root on Linux: {why}"))?;
    // Nothing is touched before the lock is ours: a running sandbox is left alone.
    let lock = lock()?;
    // From here on Ctrl-C and SIGTERM stop the sandbox in order, also while it starts.
    let mut stop = std::pin::pin!(stop_signal()?);
    clean_leftovers(&a.state_dir);
    let started = tokio::select! {
        started = start(&a, &lock) => Some(started),
        () = &mut stop => None,
    };
    let result = match started {
        None => {
            println!("stopping; cleaning up");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        Some(Ok((cluster, addr))) => {
            let kubeconfig = cluster.kubeconfig().display().to_string();
            println!(
                "hawser sandbox: {} nodes, {} demo backends, Service default/demo (class hawser.dev/lb)",
                a.nodes, a.replicas
            );
            println!();
            println!("  load-balancer address: {addr}");
            println!("  try:        curl http://{addr}/hostname     (answers demo-1, demo-2, ...)");
            println!("  Service:    KUBECONFIG={kubeconfig} kubectl get service demo -o yaml");
            println!("  mock cloud: curl -s http://{}/mock/state", cluster.metrics_addr());
            println!("  logs:       {}/*.log", cluster.dir().display());
            println!();
            println!("Ctrl-C stops it and removes everything it made.");
            stop.await;
            println!("stopping; cleaning up");
            drop(cluster);
            Ok(())
        }
    };
    // Whatever a failed or interrupted start left, still under the lock (the children it
    // started are gone with their namespaces or with the cluster).
    local::clean_stale(PREFIX);
    remove_files(&a.state_dir);
    let _ = std::fs::remove_dir(&a.state_dir);
    drop(lock);
    result
}

/// Resolves on the first SIGINT or SIGTERM; both are caught from the moment this returns.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hawser_fake_apiserver::server::install_crypto_provider();
    let result = match args() {
        Ok(a) => run(a).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hawser-sandbox: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
