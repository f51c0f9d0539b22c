//! The health port the load balancer probes: `/healthz` (should this node get traffic at
//! all), `/livez` (is the process alive) and `/services/{namespace}/{name}` (does this node
//! have ready endpoints of that Service, for `externalTrafficPolicy: Local`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::model::{ClusterModel, NodeModel, ServiceKey, ServiceModel};

/// Default health port. Chosen clear of kubelet (10248/10250/10255), kube-proxy
/// (10249/10256), kube-controller-manager (10257), cloud-controller-manager (10258),
/// kube-scheduler (10259) and ingress-nginx (10254).
pub const DEFAULT_HEALTH_PORT: u16 = 10266;

/// Per-Service local endpoint counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealth {
    /// Ready endpoints on this node.
    pub local_endpoints: usize,
    /// Serving but terminating (not ready) endpoints on this node.
    pub local_terminating_endpoints: usize,
}

impl ServiceHealth {
    fn of(s: &ServiceModel) -> Self {
        Self {
            local_endpoints: s.local_ready_addresses(),
            local_terminating_endpoints: s.local_terminating_addresses(),
        }
    }
}

/// What the health server answers from; updated by the agent after each sync.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    /// Last successful sync.
    pub last_sync: Option<Instant>,
    /// Resync period; `/healthz` fails when the last sync is older than twice this.
    pub resync_period: Duration,
    /// Own Node state.
    pub node: NodeModel,
    /// Services of our class.
    pub services: BTreeMap<ServiceKey, ServiceHealth>,
}

/// Shared, cheaply clonable health state.
#[derive(Debug, Clone)]
pub struct HealthState(Arc<RwLock<HealthSnapshot>>);

/// Body of `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealth {
    /// Whether the node should receive traffic.
    pub healthy: bool,
    /// Why not (empty when healthy).
    pub reasons: Vec<String>,
    /// Seconds since the last successful sync.
    pub last_sync_seconds_ago: Option<u64>,
}

impl HealthState {
    /// Empty state: not synced yet, so `/healthz` fails until the first sync.
    pub fn new(node_name: &str, resync_period: Duration) -> Self {
        Self(Arc::new(RwLock::new(HealthSnapshot {
            last_sync: None,
            resync_period,
            node: NodeModel { name: node_name.to_owned(), ..NodeModel::default() },
            services: BTreeMap::new(),
        })))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HealthSnapshot> {
        // A panic while holding the lock cannot leave the snapshot half-updated in a harmful
        // way (each field is replaced whole), so a poisoned lock is still usable.
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current snapshot.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a successful sync of `model` at `at`.
    pub fn record_sync(&self, model: &ClusterModel, at: Instant) {
        self.record_services(model.services.values(), at);
    }

    /// Records a successful full sync of `services` at `at`.
    pub fn record_services<'a>(&self, services: impl Iterator<Item = &'a ServiceModel>, at: Instant) {
        let services = services.map(|s| (s.key.clone(), ServiceHealth::of(s))).collect();
        let mut snap = self.write();
        snap.last_sync = Some(at);
        snap.services = services;
    }

    /// Records a successful partial sync at `at` that changed these Services (`None`: gone).
    pub fn update_services<'a>(
        &self,
        changed: impl Iterator<Item = (&'a ServiceKey, Option<&'a ServiceModel>)>,
        at: Instant,
    ) {
        let mut snap = self.write();
        snap.last_sync = Some(at);
        for (key, model) in changed {
            match model {
                Some(s) => snap.services.insert(key.clone(), ServiceHealth::of(s)),
                None => snap.services.remove(key),
            };
        }
    }

    /// Records a sync that found nothing to change: the rules are still in sync.
    pub fn record_idle_sync(&self, at: Instant) {
        self.write().last_sync = Some(at);
    }

    /// Records the own Node's state.
    pub fn record_node(&self, node: NodeModel) {
        self.write().node = node;
    }

    /// Evaluates `/healthz` at `now`.
    pub fn node_health(&self, now: Instant) -> NodeHealth {
        evaluate(&self.snapshot(), now)
    }
}

/// `/healthz` decision (pure).
pub fn evaluate(snap: &HealthSnapshot, now: Instant) -> NodeHealth {
    let mut reasons = Vec::new();
    if snap.node.deleting {
        reasons.push("node has a deletionTimestamp".to_string());
    }
    if snap.node.autoscaler_deleting {
        reasons.push("node is tainted ToBeDeletedByClusterAutoscaler".to_string());
    }
    let age = snap.last_sync.map(|t| now.saturating_duration_since(t));
    match age {
        None => reasons.push("rules not synced yet".to_string()),
        Some(age) if age > snap.resync_period * 2 => reasons.push(format!(
            "last successful sync {}s ago, more than twice the resync period ({}s)",
            age.as_secs(),
            snap.resync_period.as_secs()
        )),
        Some(_) => {}
    }
    NodeHealth { healthy: reasons.is_empty(), reasons, last_sync_seconds_ago: age.map(|a| a.as_secs()) }
}

/// A listener on `addr` for the health server. The IPv6 wildcard (`::`, the default) accepts
/// both families on one socket, so probes reach the node over IPv4 and IPv6 alike on dual-stack
/// nodes; where the kernel has IPv6 disabled it falls back to the IPv4 wildcard.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let open = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        tokio::net::TcpListener::from_std(socket.into())
    };
    match open(addr) {
        // No IPv6 on this node (disabled, or no such address family): serve IPv4.
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && !matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied) =>
        {
            tracing::warn!(error = %e, "no IPv6 on this node; the health server listens on IPv4 only");
            open(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))
        }
        other => other,
    }
}

/// The router serving the health endpoints.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/services/{namespace}/{name}", get(service))
        .with_state(state)
}

async fn healthz(State(state): State<HealthState>) -> Response {
    let health = state.node_health(Instant::now());
    let code = if health.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(health)).into_response()
}

async fn livez() -> Response {
    (StatusCode::OK, axum::Json(serde_json::json!({"alive": true}))).into_response()
}

async fn service(State(state): State<HealthState>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let key = ServiceKey::new(namespace, name);
    let snap = state.snapshot();
    let health = snap.services.get(&key).copied();
    let local = health.map(|h| h.local_endpoints).unwrap_or(0);
    // A node on its way out fails every probe so the load balancer drains it.
    let draining = snap.node.deleting || snap.node.autoscaler_deleting;
    let code = if local > 0 && !draining { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "service": {"namespace": key.namespace, "name": key.name},
        "localEndpoints": local,
        "localTerminatingEndpoints": health.map(|h| h.local_terminating_endpoints).unwrap_or(0),
        "known": health.is_some(),
        "nodeDraining": draining,
        "node": snap.node.name,
    });
    (code, axum::Json(body)).into_response()
}
