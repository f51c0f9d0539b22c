//! The kind backend: the scenarios against a real cluster (`KUBECONFIG`) where hawser was
//! installed from `charts/hawser` with the mock provider (`e2e/kind/run.sh`).
//!
//! Backends are Deployments of agnhost `netexec` and Kubernetes writes their EndpointSlices.
//! The mock cloud only keeps records, so this runner plays the cloud's data plane on the
//! machine running the tests: the same [`LbAgent`] as the local backend reads `/mock/state`
//! (the script port-forwards the operator's metrics port) and routes each load-balancer address
//! on this machine via the healthy kind nodes, whose addresses on the Docker network are
//! directly reachable (needs root for `ip route`). Packets keep their destination; the node's
//! dataplane forwards them.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::backend::{Backend, BackendPod, NodeInfo};
use crate::lbagent::{LbAgent, LbAgentConfig};
use crate::netns::sh;
use crate::traffic::{Client, HTTP_PORT, Outcome, UDP_PORT};

/// The echo server image (agnhost `netexec`).
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";

/// The cluster of `KUBECONFIG`.
pub struct KindBackend {
    client: kube::Client,
    state_addr: SocketAddr,
    source: IpAddr,
}

/// One agent per test process: the routes are the machine's, shared by every scenario. It is
/// never dropped; `e2e/kind/run.sh` removes its routes at teardown.
static AGENT: OnceLock<LbAgent> = OnceLock::new();

impl KindBackend {
    /// From `KUBECONFIG` and `HAWSER_E2E_MOCK_STATE` (the port-forwarded operator metrics
    /// address, default `127.0.0.1:18080`).
    pub async fn from_env() -> anyhow::Result<Self> {
        hawser_fake_apiserver::server::install_crypto_provider();
        let client = kube::Client::try_default().await.context("KUBECONFIG")?;
        let state_addr: SocketAddr = std::env::var("HAWSER_E2E_MOCK_STATE")
            .unwrap_or_else(|_| "127.0.0.1:18080".into())
            .parse()
            .context("HAWSER_E2E_MOCK_STATE is host:port")?;
        let me = Self { client, state_addr, source: IpAddr::from([0, 0, 0, 0]) };
        let node = me.nodes().await?.first().context("no worker node")?.address;
        // The address this machine uses towards the nodes is what backends see as the client.
        let route = sh(&["ip", "route", "get", &node.to_string()])?;
        let source = route
            .split_whitespace()
            .skip_while(|w| *w != "src")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no source address towards the nodes")?;
        AGENT.get_or_init(|| {
            LbAgent::start(LbAgentConfig {
                state_addr,
                ip_argv: vec!["ip".into()],
                interval: Duration::from_millis(300),
                log: None,
            })
        });
        Ok(Self { source, ..me })
    }

    fn deployments(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn wait_rollout(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()> {
        crate::scenarios::until("rollout", Duration::from_secs(90), || async {
            let d = self.deployments(ns).get(app).await?;
            let (spec, status) = (d.spec.unwrap_or_default(), d.status.unwrap_or_default());
            let want = i32::try_from(replicas)?;
            let done = spec.replicas == Some(want)
                && status.observed_generation == d.metadata.generation
                && status.updated_replicas.unwrap_or(0) == want
                && status.ready_replicas.unwrap_or(0) == want
                && status.replicas.unwrap_or(0) == want;
            if !done {
                bail!("rolling out: {status:?}");
            }
            let pods = self.backends(ns, app).await?;
            if pods.len() != replicas {
                bail!("{} ready pods, want {replicas}", pods.len());
            }
            Ok(())
        })
        .await
    }
}

impl Backend for KindBackend {
    fn kube(&self) -> kube::Client {
        self.client.clone()
    }

    fn client(&self) -> Client {
        Client::new(None, Some(self.source))
    }

    fn other_client(&self) -> Option<Client> {
        None
    }

    fn can_delete_nodes(&self) -> bool {
        false
    }

    async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        let nodes = Api::<Node>::all(self.client.clone()).list(&ListParams::default()).await?;
        Ok(nodes
            .into_iter()
            .filter(|n| {
                !n.metadata.labels.as_ref().is_some_and(|l| l.contains_key("node-role.kubernetes.io/control-plane"))
            })
            .filter_map(|n| {
                let address = n
                    .status?
                    .addresses?
                    .into_iter()
                    .find(|a| a.type_ == "InternalIP")
                    .and_then(|a| a.address.parse().ok())?;
                Some(NodeInfo { name: n.metadata.name?, address })
            })
            .collect())
    }

    async fn deploy(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()> {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": app, "labels": {"app": app}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": app}},
                // A new backend is ready before an old one goes: what "loses no request" needs.
                "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": app}},
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "topologySpreadConstraints": [{
                            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": app}},
                        }],
                        "containers": [{
                            "name": "netexec",
                            "image": AGNHOST,
                            // Keeps serving while it leaves the EndpointSlices.
                            "args": ["netexec", format!("--http-port={HTTP_PORT}"), format!("--udp-port={UDP_PORT}"), "--delay-shutdown=10"],
                            "readinessProbe": {"httpGet": {"path": "/hostname", "port": HTTP_PORT}, "periodSeconds": 1},
                        }],
                    },
                },
            },
        }))?;
        self.deployments(ns).create(&PostParams::default(), &d).await?;
        self.wait_rollout(ns, app, replicas).await
    }

    async fn scale(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()> {
        let patch = json!({"spec": {"replicas": replicas}});
        self.deployments(ns).patch(app, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        self.wait_rollout(ns, app, replicas).await
    }

    async fn roll(&self, ns: &str, app: &str) -> anyhow::Result<()> {
        let replicas = self.backends(ns, app).await?.len();
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"hawser.dev/e2e-restarted-at": stamp.to_string()}}}}});
        self.deployments(ns).patch(app, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        self.wait_rollout(ns, app, replicas).await?;
        // Old pods are terminating (serving) until their delayed shutdown ends.
        crate::scenarios::until("old pods gone", Duration::from_secs(60), || async {
            let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await?;
            if pods.items.len() != replicas {
                bail!("{} pods", pods.items.len());
            }
            Ok(())
        })
        .await
    }

    async fn backends(&self, ns: &str, app: &str) -> anyhow::Result<Vec<BackendPod>> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await?;
        Ok(pods
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|p| Some(BackendPod { name: p.metadata.name?, node: p.spec?.node_name? }))
            .collect())
    }

    async fn mock_state(&self) -> anyhow::Result<Value> {
        match Client::new(None, None).http(self.state_addr.ip(), self.state_addr.port(), "/mock/state").await {
            Outcome::Reply(body) => Ok(serde_json::from_str(&body)?),
            other => bail!("/mock/state at {}: {other:?}", self.state_addr),
        }
    }

    async fn lb_settled(&self, addr: IpAddr) -> anyhow::Result<()> {
        match AGENT.get() {
            Some(lb) => lb.wait_settled(addr, || self.mock_state()).await,
            None => Ok(()),
        }
    }

    async fn restart_operator(&self, _extra_args: &[&str]) -> anyhow::Result<bool> {
        // The chart's operator keeps its mock cloud in memory; a restarted pod would start
        // from an empty cloud, which is not the crash this scenario is about.
        Ok(false)
    }

    async fn stop_dataplane(&self, _node: usize) -> anyhow::Result<bool> {
        // A DaemonSet pod deleted is replaced at once; stopping one and checking the node
        // meanwhile needs the local backend.
        Ok(false)
    }

    async fn start_dataplane(&self, _node: usize) -> anyhow::Result<()> {
        anyhow::bail!("the kind backend does not stop dataplanes")
    }

    fn dataplane_metrics(&self, _node: usize) -> Option<String> {
        None
    }
}
