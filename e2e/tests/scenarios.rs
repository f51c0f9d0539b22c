//! Every end-to-end scenario, one test each, on the local backend (CI) or, with
//! `HAWSER_E2E_BACKEND=kind`, on the cluster of `KUBECONFIG` (see `e2e/kind/`). The local
//! backend uses the fake apiserver, or the API server of `HAWSER_E2E_KUBECONFIG`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hawser_e2e::local::{LocalCluster, LocalOptions};
use hawser_e2e::{binaries, netns, scenarios};

/// Bound of one scenario, setup included.
const LIMIT: Duration = Duration::from_secs(120);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn kind() -> bool {
    std::env::var("HAWSER_E2E_BACKEND").is_ok_and(|v| v == "kind")
}

/// A fresh local cluster, or `None` (with the reason printed) when this machine cannot run
/// one; under CI that is a failure instead.
async fn local() -> Option<LocalCluster> {
    if let Err(why) = netns::prerequisites() {
        assert!(!ci(), "CI is set but the local e2e backend cannot run: {why}");
        eprintln!("skipping local e2e scenario: {why}");
        return None;
    }
    binaries::build_once().expect("building hawser-operator and hawser-dataplane");
    let kubeconfig = std::env::var_os("HAWSER_E2E_KUBECONFIG").filter(|v| !v.is_empty()).map(Into::into);
    let opts = LocalOptions { kubeconfig, ..LocalOptions::default() };
    Some(LocalCluster::start(opts).await.expect("starting the local cluster"))
}

async fn finish(name: &str, r: Result<anyhow::Result<()>, tokio::time::error::Elapsed>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("scenario {name}: {e:#}"),
        Err(_) => panic!("scenario {name} took longer than {LIMIT:?}"),
    }
}

macro_rules! scenario {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if kind() {
                let backend = hawser_e2e::kind::KindBackend::from_env().await.expect("kind backend");
                finish(stringify!($name), tokio::time::timeout(LIMIT, scenarios::$name(&backend)).await).await;
                return;
            }
            let Some(cluster) = local().await else { return };
            finish(stringify!($name), tokio::time::timeout(LIMIT, scenarios::$name(&cluster)).await).await;
        }
    )*};
}

scenario!(
    ingress_and_traffic,
    ports_change,
    local_traffic_policy,
    source_ranges,
    session_affinity,
    udp,
    scale_to_zero,
    node_drains,
    service_deletion,
    type_change_to_cluster_ip,
    other_class_untouched,
    invalid_annotation,
    operator_restart_no_duplicate,
    dataplane_restart,
    rolling_replacement,
    load_balancer_group,
);

/// The real agent writes partial syncs as its own netlink batch: after a rolling replacement
/// (endpoints changing one by one), every node's dataplane has counted netlink writes, and no
/// sync failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataplane_writes_partial_syncs_over_netlink() {
    if kind() {
        return;
    }
    let Some(cluster) = local().await else { return };
    finish("rolling_replacement", tokio::time::timeout(LIMIT, scenarios::rolling_replacement(&cluster)).await).await;
    for node in 0..LocalOptions::default().nodes {
        let metrics = cluster.node_metrics(node).expect("dataplane metrics");
        let count = |line: &str| {
            metrics.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        assert!(
            count("hawser_dataplane_kernel_writes_total{writer=\"netlink\"}") >= 1.0,
            "node {node}: no netlink write:\n{metrics}"
        );
        assert_eq!(count("hawser_dataplane_sync_failures_total"), 0.0, "node {node}:\n{metrics}");
    }
}
