//! What differs between clusters: the small adapter the scenarios are written against.

use std::net::IpAddr;

use serde_json::Value;

use crate::traffic::Client;

/// A worker node the load balancer may send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name.
    pub name: String,
    /// Its InternalIP, which the client can reach (NodePorts).
    pub address: IpAddr,
}

/// One running echo backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPod {
    /// The pod's name, which is what `/hostname` answers.
    pub name: String,
    /// The node it runs on.
    pub node: String,
}

/// A cluster the scenarios run against. Everything else goes through the Kubernetes API.
// Only used as a generic bound (never `dyn`), so the `Send`-ness of the futures is checked at
// each use; `async fn` keeps the backends readable.
#[allow(async_fn_in_trait)]
pub trait Backend: Sync {
    /// Client of the cluster's Kubernetes API.
    fn kube(&self) -> kube::Client;
    /// Where requests to load-balancer addresses and NodePorts come from.
    fn client(&self) -> Client;
    /// A client with another source address outside the first one's /32, if the backend has one.
    fn other_client(&self) -> Option<Client>;
    /// Whether a Node object may be deleted (the local backend's nodes are only objects).
    fn can_delete_nodes(&self) -> bool;
    /// The worker nodes.
    async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>>;
    /// Runs `replicas` echo backends labelled `app: APP` in `ns`, waiting until they serve.
    async fn deploy(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()>;
    /// Changes the number of backends, waiting until that many are ready.
    async fn scale(&self, ns: &str, app: &str, replicas: usize) -> anyhow::Result<()>;
    /// Replaces every backend one at a time, the way a Deployment's rolling update does
    /// (new one ready, old one terminating, then gone); returns when done.
    async fn roll(&self, ns: &str, app: &str) -> anyhow::Result<()>;
    /// The ready backends.
    async fn backends(&self, ns: &str, app: &str) -> anyhow::Result<Vec<BackendPod>>;
    /// The mock cloud's state (`/mock/state`).
    async fn mock_state(&self) -> anyhow::Result<Value>;
    /// Waits until the load balancer sends `addr`'s traffic only to the targets the mock cloud
    /// has now (see [`crate::lbagent::LbAgent::settled`]).
    async fn lb_settled(&self, addr: std::net::IpAddr) -> anyhow::Result<()>;
    /// Kills the operator without warning and starts it again with `extra_args` added;
    /// `Ok(false)` when the backend cannot.
    async fn restart_operator(&self, extra_args: &[&str]) -> anyhow::Result<bool>;
    /// Stops the dataplane of worker `node` (index in [`Backend::nodes`]) as Kubernetes stops
    /// a pod (SIGTERM) and waits until it has exited; `Ok(false)` when the backend cannot.
    async fn stop_dataplane(&self, node: usize) -> anyhow::Result<bool>;
    /// Starts that dataplane again and waits until it is healthy.
    async fn start_dataplane(&self, node: usize) -> anyhow::Result<()>;
    /// The Prometheus metrics of that dataplane, when the backend can read them.
    fn dataplane_metrics(&self, node: usize) -> Option<String>;
}
