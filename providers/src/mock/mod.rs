//! The mock cloud: a faithful little cloud that lives in the operator's process.
//!
//! It behaves like a real one where it matters to a controller: addresses come from a pool and
//! are never handed out twice, load balancers are found by ownership tags, calls take time, are
//! rate limited and sometimes fail (seeded), and state survives an operator restart when a state
//! file is given. Its load balancers are passthrough: packets reach the nodes still addressed to
//! the load-balancer IP, and the hawser dataplane forwards them.

mod gate;
mod pool;
mod state;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::Serialize;

pub use gate::Admission;
use gate::ApiGate;
pub use pool::AddressPools;
pub use state::{CloudState, MockLoadBalancer};

use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_SERVICE, OWNERSHIP_TAG_SERVICE_UID};
use crate::{
    Capabilities, IngressPoint, IpFamily, IpMode, LoadBalancerSpec, LoadBalancerStatus, OwnedLoadBalancer, PortStatus,
    Protocol, Provider, ProviderError, ServiceIdentity, ownership_tags, stable_hash,
};

/// How many recorded calls are kept; older ones are dropped so a long sandbox run stays small.
const CALL_LOG_LIMIT: usize = 10_000;

/// Settings of the mock cloud (the operator's `--mock-*` flags).
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// The cluster whose ownership tags `list_owned` looks for.
    pub cluster: String,
    /// Address pools, at most one per family.
    pub address_pools: Vec<IpNet>,
    /// Added to every API call.
    pub latency: Duration,
    /// Calls per second before the cloud answers "throttled"; `None` is unlimited.
    pub rate_limit: Option<f64>,
    /// Fraction of calls that fail with an injected transient fault.
    pub error_rate: f64,
    /// Seed for fault injection.
    pub seed: u64,
    /// Where state is persisted, if anywhere.
    pub state_file: Option<PathBuf>,
}

impl MockConfig {
    /// A fast, faultless mock cloud with the default pool `203.0.113.0/24`.
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            address_pools: vec![IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(203, 0, 113, 0), 24).unwrap_or_default(),
            )],
            latency: Duration::ZERO,
            rate_limit: None,
            error_rate: 0.0,
            seed: 0,
            state_file: None,
        }
    }
}

/// One API call the mock cloud received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedCall {
    /// The API operation, named like a cloud's (`DescribeLoadBalancers`, `CreateLoadBalancer`, ...).
    pub operation: &'static str,
    /// The load balancer it concerned, if one.
    pub target: Option<String>,
    /// `ok`, `throttled`, `fault-before`, `fault-after` or `error`.
    pub outcome: &'static str,
}

impl RecordedCall {
    /// Whether the call changes cloud state.
    pub fn is_mutating(&self) -> bool {
        !self.operation.starts_with("Describe")
    }
}

/// The mock cloud's full state as JSON-able data (served by the operator for tests).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MockSnapshot {
    /// Address pools.
    pub address_pools: Vec<String>,
    /// Load balancers.
    pub load_balancers: Vec<MockLoadBalancer>,
    /// Calls received, oldest first (bounded).
    pub calls: Vec<RecordedCall>,
}

#[derive(Debug)]
struct Inner {
    state: CloudState,
    gate: ApiGate,
    calls: Vec<RecordedCall>,
}

/// The mock cloud provider. Cheap to clone; clones share one cloud.
#[derive(Debug, Clone)]
pub struct MockCloud {
    config: Arc<MockConfig>,
    pools: Arc<AddressPools>,
    inner: Arc<Mutex<Inner>>,
}

impl MockCloud {
    /// A mock cloud; loads the state file when one is configured.
    pub fn new(config: MockConfig) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&config.error_rate) {
            return Err(format!("mock error rate must be between 0 and 1, got {}", config.error_rate));
        }
        if config.rate_limit.is_some_and(|r| r.is_nan() || r <= 0.0) {
            return Err("mock rate limit must be a positive number of calls per second".to_owned());
        }
        let pools = AddressPools::new(config.address_pools.clone())?;
        let state = match &config.state_file {
            Some(path) => CloudState::load(path)?,
            None => CloudState::default(),
        };
        let gate = ApiGate::new(config.rate_limit, config.error_rate, config.seed);
        Ok(Self {
            config: Arc::new(config),
            pools: Arc::new(pools),
            inner: Arc::new(Mutex::new(Inner { state, gate, calls: Vec::new() })),
        })
    }

    /// Every call received so far (bounded to the most recent ones).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().calls.clone()
    }

    /// The load balancers in the cloud.
    pub fn load_balancers(&self) -> Vec<MockLoadBalancer> {
        self.lock().state.load_balancers.values().cloned().collect()
    }

    /// Everything, for the operator's `/mock/state` endpoint.
    pub fn snapshot(&self) -> MockSnapshot {
        let inner = self.lock();
        MockSnapshot {
            address_pools: self.config.address_pools.iter().map(ToString::to_string).collect(),
            load_balancers: inner.state.load_balancers.values().cloned().collect(),
            calls: inner.calls.clone(),
        }
    }

    /// Puts a load balancer that hawser does not own into the cloud (what another tool made).
    pub fn insert_foreign(&self, name: &str, address: IpAddr, tags: BTreeMap<String, String>) -> String {
        let mut inner = self.lock();
        let id = next_id(&mut inner.state);
        let lb = MockLoadBalancer {
            id: id.clone(),
            name: name.to_owned(),
            tags,
            addresses: vec![address],
            listeners: Vec::new(),
            targets: Vec::new(),
            health_check: crate::HealthCheck {
                protocol: crate::HealthCheckProtocol::Tcp,
                port: 80,
                path: None,
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(5),
                healthy_threshold: 3,
                unhealthy_threshold: 3,
            },
            scheme: crate::Scheme::InternetFacing,
            source_ranges: Vec::new(),
            session_affinity: crate::SessionAffinity::None,
            revision: 1,
        };
        inner.state.load_balancers.insert(id.clone(), lb);
        id
    }

    /// The deterministic name of a Service's load balancer.
    pub fn name_for(identity: &ServiceIdentity) -> String {
        format!("hawser-{}", stable_hash(&[&identity.cluster, &identity.uid], 16))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-written (every mutation is
        // a single map operation), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One API call: latency, rate limit and faults first, then `act` on the state.
    async fn call<T>(
        &self,
        operation: &'static str,
        target: Option<&str>,
        mutating: bool,
        act: impl FnOnce(&mut CloudState) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let mut inner = self.lock();
        let admission = inner.gate.admit(mutating);
        let record = |inner: &mut Inner, outcome| {
            if inner.calls.len() >= CALL_LOG_LIMIT {
                inner.calls.remove(0);
            }
            inner.calls.push(RecordedCall { operation, target: target.map(str::to_owned), outcome });
        };
        match admission {
            Admission::Throttle(wait) => {
                record(&mut inner, "throttled");
                return Err(ProviderError::Throttled {
                    retry_after: Some(wait),
                    message: format!("{operation}: rate exceeded"),
                });
            }
            Admission::FailBefore => {
                record(&mut inner, "fault-before");
                return Err(ProviderError::Transient(format!("{operation}: injected fault (request lost)")));
            }
            Admission::Admit | Admission::FailAfter => {}
        }
        // With a state file, the file is the cloud: re-read it so that every operator process
        // sharing it (a restarted one, or a standby that became leader) sees the same cloud.
        if let Some(path) = &self.config.state_file {
            match CloudState::load(path) {
                Ok(state) => inner.state = state,
                Err(e) => {
                    record(&mut inner, "error");
                    return Err(ProviderError::Fatal(e));
                }
            }
        }
        let before = mutating.then(|| inner.state.clone());
        let result = act(&mut inner.state);
        if let (Some(path), Some(before)) = (&self.config.state_file, before)
            && result.is_ok()
            && before != inner.state
            && let Err(e) = inner.state.save(path)
        {
            inner.state = before;
            record(&mut inner, "error");
            return Err(ProviderError::Fatal(e));
        }
        match (&result, admission) {
            (Ok(_), Admission::FailAfter) => {
                record(&mut inner, "fault-after");
                Err(ProviderError::Transient(format!("{operation}: injected fault (response lost)")))
            }
            (Ok(_), _) => {
                record(&mut inner, "ok");
                result
            }
            (Err(_), _) => {
                record(&mut inner, "error");
                result
            }
        }
    }

    fn find_owned(&self, state: &CloudState, identity: &ServiceIdentity) -> Option<String> {
        state
            .load_balancers
            .values()
            .find(|lb| {
                lb.tags.get(OWNERSHIP_TAG_CLUSTER) == Some(&identity.cluster)
                    && lb.tags.get(OWNERSHIP_TAG_SERVICE_UID) == Some(&identity.uid)
            })
            .map(|lb| lb.id.clone())
    }

    /// The addresses the load balancer should hold: requested ones where given, else the ones
    /// it has, else newly allocated.
    fn choose_addresses(
        &self,
        state: &CloudState,
        spec: &LoadBalancerSpec,
        current: Option<&MockLoadBalancer>,
    ) -> Result<Vec<IpAddr>, ProviderError> {
        let mut chosen = Vec::new();
        let mut used = state.used_addresses();
        if let Some(lb) = current {
            for a in &lb.addresses {
                used.remove(a);
            }
        }
        for family in &spec.ip_families {
            let requested = spec.requested_addresses.iter().find(|a| IpFamily::of(a) == *family);
            let addr = if let Some(addr) = requested {
                if !self.pools.contains(addr) {
                    return Err(ProviderError::invalid(
                        "hawser.dev/address",
                        format!(
                            "{addr} is not in the mock cloud's address pools ({}); request an address inside them",
                            self.pools.describe()
                        ),
                    ));
                }
                if used.contains(addr) {
                    let holder = state.holder_of(addr).map(describe_owner).unwrap_or_default();
                    return Err(ProviderError::Conflict(format!(
                        "requested address {addr} is already in use by {holder}"
                    )));
                }
                *addr
            } else if let Some(existing) =
                current.and_then(|lb| lb.addresses.iter().find(|a| IpFamily::of(a) == *family))
            {
                *existing
            } else {
                let Some(pool) = self.pools.for_family(*family) else {
                    return Err(ProviderError::invalid(
                        "spec.ipFamilies",
                        format!(
                            "the mock cloud has no {family:?} address pool (pools: {}); use a family it has",
                            self.pools.describe()
                        ),
                    ));
                };
                self.pools
                    .allocate(*family, &used)
                    .ok_or_else(|| ProviderError::Conflict(format!("address pool {pool} is exhausted")))?
            };
            used.insert(addr);
            chosen.push(addr);
        }
        Ok(chosen)
    }
}

fn describe_owner(lb: &MockLoadBalancer) -> String {
    match lb.tags.get(OWNERSHIP_TAG_SERVICE) {
        Some(service) => format!("the load balancer of Service {service} ({})", lb.id),
        None => format!("load balancer {} ({}), which hawser does not own", lb.name, lb.id),
    }
}

fn next_id(state: &mut CloudState) -> String {
    state.next_id += 1;
    format!("mock-lb-{:08x}", state.next_id)
}

fn desired_record(
    id: String,
    name: String,
    addresses: Vec<IpAddr>,
    spec: &LoadBalancerSpec,
    revision: u64,
) -> MockLoadBalancer {
    let mut tags = spec.tags.clone();
    tags.extend(ownership_tags(&spec.identity, "load-balancer"));
    MockLoadBalancer {
        id,
        name,
        tags,
        addresses,
        listeners: spec.listeners.clone(),
        targets: spec.targets.clone(),
        health_check: spec.health_check.clone(),
        scheme: spec.scheme,
        source_ranges: spec.source_ranges.clone(),
        session_affinity: spec.session_affinity,
        revision,
    }
}

fn status_of(lb: &MockLoadBalancer) -> LoadBalancerStatus {
    let ports: Vec<PortStatus> = lb
        .listeners
        .iter()
        .flat_map(|l| {
            let protos: &[Protocol] = match l.protocol {
                Protocol::TcpUdp => &[Protocol::Tcp, Protocol::Udp],
                Protocol::Tcp => &[Protocol::Tcp],
                Protocol::Udp => &[Protocol::Udp],
            };
            protos.iter().map(|p| PortStatus { port: l.port, protocol: *p })
        })
        .collect();
    LoadBalancerStatus {
        id: lb.id.clone(),
        ingress: lb
            .addresses
            .iter()
            .map(|a| IngressPoint { ip: Some(*a), hostname: None, ip_mode: Some(IpMode::Vip), ports: ports.clone() })
            .collect(),
    }
}

#[async_trait]
impl Provider for MockCloud {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { needs_node_ports: false, supports_udp: true }
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        let identity = &spec.identity;
        let existing = self
            .call("DescribeLoadBalancers", None, false, |state| {
                Ok(self.find_owned(state, identity).and_then(|id| state.load_balancers.get(&id).cloned()))
            })
            .await?;
        let name = Self::name_for(identity);
        match existing {
            None => {
                self.call("CreateLoadBalancer", Some(&name), true, |state| {
                    // Re-checked inside the call: another ensure may have created it meanwhile.
                    if let Some(id) = self.find_owned(state, identity) {
                        return Ok(status_of(&state.load_balancers[&id]));
                    }
                    if let Some(foreign) = state.load_balancers.values().find(|lb| lb.name == name) {
                        return Err(ProviderError::Conflict(format!(
                            "a load balancer named {name} already exists ({}) and is not owned by Service {} of cluster {}; it is left untouched",
                            foreign.id,
                            identity.service_key(),
                            identity.cluster
                        )));
                    }
                    let addresses = self.choose_addresses(state, spec, None)?;
                    let id = next_id(state);
                    let lb = desired_record(id.clone(), name.clone(), addresses, spec, 1);
                    let status = status_of(&lb);
                    state.load_balancers.insert(id, lb);
                    Ok(status)
                })
                .await
            }
            Some(current) => {
                let state_now = self.lock().state.clone();
                let addresses = self.choose_addresses(&state_now, spec, Some(&current))?;
                let wanted =
                    desired_record(current.id.clone(), current.name.clone(), addresses, spec, current.revision);
                if wanted == current {
                    return Ok(status_of(&current));
                }
                let id = current.id.clone();
                self.call("ModifyLoadBalancer", Some(&id), true, |state| {
                    let addresses = self.choose_addresses(state, spec, state.load_balancers.get(&id))?;
                    let Some(lb) = state.load_balancers.get_mut(&id) else {
                        return Err(ProviderError::Transient(format!(
                            "load balancer {id} disappeared during the update"
                        )));
                    };
                    *lb = desired_record(id.clone(), lb.name.clone(), addresses, spec, lb.revision + 1);
                    Ok(status_of(lb))
                })
                .await
            }
        }
    }

    async fn delete(&self, identity: &ServiceIdentity) -> Result<(), ProviderError> {
        let found =
            self.call("DescribeLoadBalancers", None, false, |state| Ok(self.find_owned(state, identity))).await?;
        let Some(id) = found else { return Ok(()) };
        self.call("DeleteLoadBalancer", Some(&id), true, |state| {
            state.load_balancers.remove(&id);
            Ok(())
        })
        .await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        let cluster = self.config.cluster.clone();
        self.call("DescribeLoadBalancers", None, false, |state| {
            Ok(state
                .load_balancers
                .values()
                .filter(|lb| lb.tags.get(OWNERSHIP_TAG_CLUSTER) == Some(&cluster))
                .filter_map(|lb| {
                    let (namespace, name) = lb.tags.get(OWNERSHIP_TAG_SERVICE)?.split_once('/')?;
                    Some(OwnedLoadBalancer {
                        identity: ServiceIdentity {
                            cluster: cluster.clone(),
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                            uid: lb.tags.get(OWNERSHIP_TAG_SERVICE_UID)?.clone(),
                        },
                        id: lb.id.clone(),
                    })
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests;
