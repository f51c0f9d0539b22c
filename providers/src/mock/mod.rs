//! The mock cloud: a faithful little cloud that lives in the operator's process.
//!
//! It behaves like a real one where it matters to a controller: addresses come from a pool and
//! are never handed out twice, load balancers are found by ownership tags, calls take time, are
//! rate limited and sometimes fail (seeded), and state survives an operator restart when a state
//! file is given. Its load balancers are passthrough: packets reach the nodes still addressed to
//! the load-balancer IP, and the hawser dataplane forwards them.

mod gate;
mod group;
mod plan;
mod pool;
mod state;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::Serialize;

pub use gate::Admission;
use gate::ApiGate;
pub use pool::AddressPools;
pub use state::{CloudState, MemberPart, MockLoadBalancer};

use crate::limiter::{AdaptiveLimiter, LimiterConfig};
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_SERVICE, OWNERSHIP_TAG_SERVICE_UID};
use crate::{
    Capabilities, ChangePlan, GroupLimits, IngressPoint, IpFamily, IpMode, LoadBalancerSpec, LoadBalancerStatus,
    OwnedLoadBalancer, PortStatus, Protocol, Provider, ProviderError, ServiceIdentity, ownership_tags, stable_hash,
};

/// Listeners one load balancer carries (as an NLB: 50), which bounds a load-balancer group.
pub const MAX_LISTENERS: usize = 50;
/// How many recorded calls are kept; older ones are dropped so a long sandbox run stays small.
const CALL_LOG_LIMIT: usize = 10_000;
/// Attempts of one API call that the cloud throttles, as a cloud SDK's standard retry makes.
const THROTTLE_ATTEMPTS: u32 = 4;
/// The client's pacing: it starts at a generous rate and learns the cloud's limit from throttles;
/// the burst absorbs the calls that concurrent reconciles happen to issue at the same moment.
fn client_limiter() -> LimiterConfig {
    LimiterConfig { burst: 10.0, max_rate: 10_000.0, ..LimiterConfig::starting_at(200.0) }
}

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

/// Calls received, counted by operation and outcome since the cloud started (unbounded, unlike
/// the call log).
pub type CallCounts = BTreeMap<&'static str, BTreeMap<&'static str, u64>>;

/// The mock cloud in figures (served by the operator at `/mock/summary` for benchmarks).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MockSummary {
    /// How many load balancers exist.
    pub load_balancers: usize,
    /// Every call received, by operation, then outcome.
    pub calls: CallCounts,
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
    calls: VecDeque<RecordedCall>,
    counts: CallCounts,
    /// The generation of the state file this process last read or wrote: unchanged, the file
    /// need not be re-read.
    file_generation: Option<u64>,
}

impl Inner {
    fn record(&mut self, operation: &'static str, target: Option<&str>, outcome: &'static str) {
        if self.calls.len() >= CALL_LOG_LIMIT {
            self.calls.pop_front();
        }
        self.calls.push_back(RecordedCall { operation, target: target.map(str::to_owned), outcome });
        *self.counts.entry(operation).or_default().entry(outcome).or_default() += 1;
    }

    /// With a state file, the file is the cloud: re-read it when another process (a restarted
    /// operator, or a standby that became leader) changed it since this one last looked.
    fn refresh(&mut self, path: &Path) -> Result<(), String> {
        let generation = CloudState::generation_of(path);
        if generation.is_some() && generation == self.file_generation {
            return Ok(());
        }
        self.state = CloudState::load(path)?;
        self.file_generation = Some(self.state.generation);
        Ok(())
    }

    fn persist(&mut self, path: &Path) -> Result<(), String> {
        self.state.save(path)?;
        self.file_generation = Some(self.state.generation);
        Ok(())
    }
}

/// The mock cloud provider. Cheap to clone; clones share one cloud.
#[derive(Debug, Clone)]
pub struct MockCloud {
    config: Arc<MockConfig>,
    pools: Arc<AddressPools>,
    inner: Arc<Mutex<Inner>>,
    /// The client side: paces calls to what the cloud lets through.
    limiter: Arc<AdaptiveLimiter>,
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
        let inner = Inner { state, gate, calls: VecDeque::new(), counts: CallCounts::new(), file_generation: None };
        Ok(Self {
            config: Arc::new(config),
            pools: Arc::new(pools),
            inner: Arc::new(Mutex::new(inner)),
            limiter: Arc::new(AdaptiveLimiter::new(client_limiter())),
        })
    }

    /// Every call received so far (bounded to the most recent ones).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().calls.iter().cloned().collect()
    }

    /// Loses the answers of the next `n` writes after the cloud acted on them, as an operator
    /// killed between a cloud write and its answer would.
    pub fn lose_answers(&self, n: u32) {
        self.lock().gate.lose_answers(n);
    }

    /// The load balancers in the cloud.
    pub fn load_balancers(&self) -> Vec<MockLoadBalancer> {
        self.lock().state.load_balancers().values().cloned().collect()
    }

    /// Everything, for the operator's `/mock/state` endpoint.
    pub fn snapshot(&self) -> MockSnapshot {
        let inner = self.lock();
        MockSnapshot {
            address_pools: self.config.address_pools.iter().map(ToString::to_string).collect(),
            load_balancers: inner.state.load_balancers().values().cloned().collect(),
            calls: inner.calls.iter().cloned().collect(),
        }
    }

    /// The cloud in figures, cheap at any size: for the operator's `/mock/summary` endpoint.
    pub fn summary(&self) -> MockSummary {
        let inner = self.lock();
        MockSummary { load_balancers: inner.state.load_balancers().len(), calls: inner.counts.clone() }
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
            targets: crate::Targets::default(),
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
            group: None,
            members: BTreeMap::new(),
        };
        inner.state.insert(lb);
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

    /// One API call: the client's pacing, latency, the cloud's rate limit and faults first, then
    /// `act` on the state. A throttled call is retried after the cloud's retry-after, as cloud
    /// SDKs do, a few times before the throttle reaches the caller.
    async fn call<T>(
        &self,
        operation: &'static str,
        target: Option<&str>,
        mutating: bool,
        act: impl FnOnce(&mut CloudState) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let mut attempt = 1;
        let admission = loop {
            self.limiter.acquire().await;
            if !self.config.latency.is_zero() {
                tokio::time::sleep(self.config.latency).await;
            }
            let admission = {
                let mut inner = self.lock();
                let admission = inner.gate.admit(mutating);
                if let Admission::Throttle(_) = admission {
                    inner.record(operation, target, "throttled");
                }
                admission
            };
            match admission {
                Admission::Throttle(wait) if attempt < THROTTLE_ATTEMPTS => {
                    self.limiter.throttled(Some(wait));
                    attempt += 1;
                }
                Admission::Throttle(wait) => {
                    self.limiter.throttled(Some(wait));
                    return Err(ProviderError::Throttled {
                        retry_after: Some(wait),
                        message: format!("{operation}: rate exceeded"),
                    });
                }
                other => break other,
            }
        };
        let mut inner = self.lock();
        if admission == Admission::FailBefore {
            inner.record(operation, target, "fault-before");
            return Err(ProviderError::Transient(format!("{operation}: injected fault (request lost)")));
        }
        if let Some(path) = &self.config.state_file
            && let Err(e) = inner.refresh(path)
        {
            inner.record(operation, target, "error");
            return Err(ProviderError::Fatal(e));
        }
        let result = act(&mut inner.state);
        if let Some(path) = &self.config.state_file
            && mutating
            && result.is_ok()
            && let Err(e) = inner.persist(path)
        {
            // The file is the cloud: what could not be written did not happen.
            inner.file_generation = None;
            let _ = inner.refresh(path);
            inner.record(operation, target, "error");
            return Err(ProviderError::Fatal(e));
        }
        self.limiter.succeeded();
        match (&result, admission) {
            (Ok(_), Admission::FailAfter) => {
                inner.record(operation, target, "fault-after");
                Err(ProviderError::Transient(format!("{operation}: injected fault (response lost)")))
            }
            (Ok(_), _) => {
                inner.record(operation, target, "ok");
                result
            }
            (Err(_), _) => {
                inner.record(operation, target, "error");
                result
            }
        }
    }

    /// A requested address the pools do not hold.
    fn outside_pools(&self, addr: &IpAddr) -> ProviderError {
        ProviderError::invalid(
            "hawser.dev/address",
            format!(
                "{addr} is not in the mock cloud's address pools ({}); request an address inside them",
                self.pools.describe()
            ),
        )
    }

    /// A family the pools do not serve.
    fn no_pool(&self, family: IpFamily) -> ProviderError {
        ProviderError::invalid(
            "spec.ipFamilies",
            format!(
                "the mock cloud has no {family:?} address pool (pools: {}); use a family it has",
                self.pools.describe()
            ),
        )
    }

    /// The addresses the load balancer should hold: requested ones where given, else the ones
    /// it has, else newly allocated.
    fn choose_addresses(
        &self,
        state: &mut CloudState,
        spec: &LoadBalancerSpec,
        current: Option<&MockLoadBalancer>,
    ) -> Result<Vec<IpAddr>, ProviderError> {
        let mut chosen: Vec<IpAddr> = Vec::new();
        let own = |addr: &IpAddr| current.is_some_and(|lb| lb.addresses.contains(addr));
        for family in &spec.ip_families {
            let requested = spec.requested_addresses.iter().find(|a| IpFamily::of(a) == *family);
            let addr = if let Some(addr) = requested {
                if !self.pools.contains(addr) {
                    return Err(self.outside_pools(addr));
                }
                if let Some(holder) = state.holder_of(addr).filter(|_| !own(addr)) {
                    return Err(ProviderError::Conflict(format!(
                        "requested address {addr} is already in use by {}",
                        describe_owner(holder)
                    )));
                }
                *addr
            } else if let Some(existing) =
                current.and_then(|lb| lb.addresses.iter().find(|a| IpFamily::of(a) == *family))
            {
                *existing
            } else {
                let Some(pool) = self.pools.for_family(*family) else {
                    return Err(self.no_pool(*family));
                };
                let taken = |a: &IpAddr| (state.holder_of(a).is_some() && !own(a)) || chosen.contains(a);
                let addr = self
                    .pools
                    .allocate(*family, state.last_allocated(*family), state.used_count() + chosen.len(), taken)
                    .ok_or_else(|| ProviderError::Conflict(format!("address pool {pool} is exhausted")))?;
                state.allocated(addr);
                addr
            };
            chosen.push(addr);
        }
        Ok(chosen)
    }
}

/// The error of an update whose load balancer was deleted meanwhile.
fn vanished(id: &str) -> ProviderError {
    ProviderError::Transient(format!("load balancer {id} disappeared during the update"))
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
        group: None,
        members: BTreeMap::new(),
    }
}

/// The ports of `listeners` as a status reports them (TCP_UDP as both).
fn ports_of(listeners: &[crate::Listener]) -> Vec<PortStatus> {
    listeners
        .iter()
        .flat_map(|l| {
            let protos: &[Protocol] = match l.protocol {
                Protocol::TcpUdp => &[Protocol::Tcp, Protocol::Udp],
                Protocol::Tcp => &[Protocol::Tcp],
                Protocol::Udp => &[Protocol::Udp],
            };
            protos.iter().map(|p| PortStatus { port: l.port, protocol: *p })
        })
        .collect()
}

fn status_of(lb: &MockLoadBalancer) -> LoadBalancerStatus {
    status_with(lb, ports_of(&lb.listeners))
}

/// The status of `lb`'s addresses, each reporting `ports`.
fn status_with(lb: &MockLoadBalancer, ports: Vec<PortStatus>) -> LoadBalancerStatus {
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
        Capabilities {
            needs_node_ports: false,
            supports_udp: true,
            groups: Some(GroupLimits { max_listeners: MAX_LISTENERS, max_rules: None }),
        }
    }

    fn fingerprint(&self, spec: &LoadBalancerSpec) -> Option<String> {
        if spec.group.is_some() {
            return group::fingerprint_of_member(spec);
        }
        Some(desired_record(String::new(), String::new(), Vec::new(), spec, 0).fingerprint())
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        if spec.group.is_some() {
            return self.ensure_member(spec).await;
        }
        let identity = &spec.identity;
        let (existing, group) = self
            .call("DescribeLoadBalancers", None, false, |state| {
                Ok((state.owned_by(identity).cloned(), state.member_of(identity).cloned()))
            })
            .await?;
        let status = self.ensure_own(spec, existing).await?;
        // A Service leaving a group: its part goes once its own load balancer serves it.
        if let Some(lb) = group {
            self.leave_group_lb(&lb, identity).await?;
        }
        Ok(status)
    }

    async fn plan(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        self.plan_inner(spec).await
    }

    async fn plan_delete(&self, identity: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        self.plan_delete_inner(identity).await
    }

    async fn delete(&self, identity: &ServiceIdentity) -> Result<(), ProviderError> {
        let (own, group) = self
            .call("DescribeLoadBalancers", None, false, |state| {
                Ok((state.owned_by(identity).map(|lb| lb.id.clone()), state.member_of(identity).cloned()))
            })
            .await?;
        if let Some(id) = own {
            self.call("DeleteLoadBalancer", Some(&id), true, |state| {
                state.remove(&id);
                Ok(())
            })
            .await?;
        }
        if let Some(lb) = group {
            self.leave_group_lb(&lb, identity).await?;
        }
        Ok(())
    }

    async fn leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        let cluster = self.config.cluster.clone();
        let lb = self
            .call("DescribeLoadBalancers", None, false, |state| {
                Ok(state.of_group(&cluster, group).filter(|lb| lb.members.contains_key(&identity.uid)).cloned())
            })
            .await?;
        match lb {
            Some(lb) => self.leave_group_lb(&lb, identity).await,
            None => Ok(()),
        }
    }

    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        let cluster = self.config.cluster.clone();
        self.call("DescribeLoadBalancers", None, false, |state| {
            let mut owned = Vec::new();
            let entry = |service: &str, uid: &str, id: &str, fingerprint: Option<String>, group: Option<&String>| {
                let (namespace, name) = service.split_once('/')?;
                Some(OwnedLoadBalancer {
                    identity: ServiceIdentity {
                        cluster: cluster.clone(),
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        uid: uid.to_owned(),
                    },
                    id: id.to_owned(),
                    fingerprint,
                    detached: false,
                    group: group.cloned(),
                })
            };
            for lb in state.load_balancers().values().filter(|lb| lb.tags.get(OWNERSHIP_TAG_CLUSTER) == Some(&cluster))
            {
                // A group's load balancer: one entry per member, each owning its part.
                for (uid, part) in &lb.members {
                    owned.extend(entry(&part.service, uid, &lb.id, lb.member_fingerprint(uid), lb.group.as_ref()));
                }
                if let (Some(service), Some(uid)) =
                    (lb.tags.get(OWNERSHIP_TAG_SERVICE), lb.tags.get(OWNERSHIP_TAG_SERVICE_UID))
                {
                    owned.extend(entry(service, uid, &lb.id, state.fingerprint_of(&lb.id).map(str::to_owned), None));
                }
            }
            Ok(owned)
        })
        .await
    }
}

impl MockCloud {
    /// Ensures the Service's own load balancer, `existing` as just described.
    async fn ensure_own(
        &self,
        spec: &LoadBalancerSpec,
        existing: Option<MockLoadBalancer>,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let identity = &spec.identity;
        let name = Self::name_for(identity);
        match existing {
            None => {
                self.call("CreateLoadBalancer", Some(&name), true, |state| {
                    // Re-checked inside the call: another ensure may have created it meanwhile.
                    if let Some(lb) = state.owned_by(identity) {
                        return Ok(status_of(lb));
                    }
                    if let Some(foreign) = state.named(&name) {
                        return Err(ProviderError::Conflict(format!(
                            "a load balancer named {name} already exists ({}) and is not owned by Service {} of cluster {}; it is left untouched",
                            foreign.id,
                            identity.service_key(),
                            identity.cluster
                        )));
                    }
                    let addresses = self.choose_addresses(state, spec, None)?;
                    let id = next_id(state);
                    let lb = desired_record(id, name.clone(), addresses, spec, 1);
                    let status = status_of(&lb);
                    state.insert(lb);
                    Ok(status)
                })
                .await
            }
            Some(current) => {
                let wanted = {
                    let mut inner = self.lock();
                    let addresses = self.choose_addresses(&mut inner.state, spec, Some(&current))?;
                    desired_record(current.id.clone(), current.name.clone(), addresses, spec, current.revision)
                };
                if wanted == current {
                    return Ok(status_of(&current));
                }
                let id = current.id.clone();
                self.call("ModifyLoadBalancer", Some(&id), true, |state| {
                    let Some(lb) = state.get(&id).cloned() else { return Err(vanished(&id)) };
                    let addresses = self.choose_addresses(state, spec, Some(&lb))?;
                    let updated = desired_record(id.clone(), lb.name, addresses, spec, lb.revision + 1);
                    let status = status_of(&updated);
                    state.insert(updated);
                    Ok(status)
                })
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests;
