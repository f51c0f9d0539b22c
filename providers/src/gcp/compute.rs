//! The Compute Engine clients: construction, a record of every call, operation polling, error
//! reduction, and conversion between GCE models and the plan's structs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use google_cloud_compute_v1::client::{
    Addresses, Firewalls, ForwardingRules, InstanceGroups, RegionBackendServices, RegionHealthChecks, Subnetworks,
};
use google_cloud_compute_v1::model::{
    self, Address, Backend, BackendService, ConnectionDraining, Firewall, ForwardingRule, HTTPHealthCheck, HealthCheck,
    InstanceGroup, InstanceGroupsAddInstancesRequest, InstanceGroupsListInstancesRequest,
    InstanceGroupsRemoveInstancesRequest, InstanceReference, Operation, Subnetwork, TCPHealthCheck,
};
use google_cloud_gax::error::rpc::StatusDetails;

use super::config::{GcpConfig, relative};
use super::errors::ApiFailure;
use super::plan::{AddressSpec, BackendServiceSpec, FirewallSpec, ForwardingRuleSpec, HealthCheckSpec};
use crate::limiter::RateLimiter;
use crate::{HealthCheckProtocol, ProviderError};

/// Every IAM permission the provider's calls need. The custom role shipped in `iam-role.yaml`
/// must grant each (checked by a test).
pub const IAM_PERMISSIONS: &[&str] = &[
    "compute.addresses.create",
    "compute.addresses.delete",
    "compute.addresses.get",
    "compute.addresses.list",
    "compute.addresses.use",
    "compute.addresses.setLabels",
    "compute.forwardingRules.create",
    "compute.forwardingRules.delete",
    "compute.forwardingRules.get",
    "compute.forwardingRules.list",
    "compute.forwardingRules.update",
    "compute.forwardingRules.setLabels",
    "compute.regionBackendServices.create",
    "compute.regionBackendServices.delete",
    "compute.regionBackendServices.get",
    "compute.regionBackendServices.list",
    "compute.regionBackendServices.update",
    "compute.regionBackendServices.use",
    "compute.regionHealthChecks.create",
    "compute.regionHealthChecks.delete",
    "compute.regionHealthChecks.get",
    "compute.regionHealthChecks.update",
    "compute.regionHealthChecks.useReadOnly",
    "compute.firewalls.create",
    "compute.firewalls.delete",
    "compute.firewalls.get",
    "compute.firewalls.update",
    "compute.networks.updatePolicy",
    "compute.networks.use",
    "compute.subnetworks.get",
    "compute.subnetworks.use",
    "compute.instanceGroups.create",
    "compute.instanceGroups.delete",
    "compute.instanceGroups.get",
    "compute.instanceGroups.list",
    "compute.instanceGroups.update",
    "compute.instanceGroups.use",
    "compute.instances.use",
    "compute.regionOperations.get",
    "compute.zoneOperations.get",
    "compute.globalOperations.get",
];

/// How many recorded calls are kept.
const CALL_LOG_LIMIT: usize = 10_000;

/// One Compute API method called (operation polls included).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecordedCall {
    /// The REST method, e.g. `forwardingRules.insert`.
    pub method: String,
}

impl RecordedCall {
    /// Whether the call may change cloud state.
    pub fn is_mutating(&self) -> bool {
        let verb = self.method.rsplit('.').next().unwrap_or_default();
        !matches!(verb, "get" | "list" | "listInstances" | "getOperation")
    }
}

/// The calls made so far.
#[derive(Debug, Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<RecordedCall>>>);

impl CallLog {
    fn lock(&self) -> MutexGuard<'_, Vec<RecordedCall>> {
        // Pushing one entry cannot leave the log half-written, so a poisoned lock is fine.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call so far (bounded to the most recent ones).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().clone()
    }

    /// Forgets the calls made so far.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn push(&self, method: &str) {
        let mut log = self.lock();
        if log.len() >= CALL_LOG_LIMIT {
            log.remove(0);
        }
        log.push(RecordedCall { method: method.to_owned() });
    }
}

/// Reduces an SDK error to what classification needs.
fn reduce(method: &str, e: &google_cloud_compute_v1::Error) -> ApiFailure {
    let status = e.http_status_code();
    match e.status() {
        Some(s) => ApiFailure {
            method: method.to_owned(),
            status,
            reasons: s
                .details
                .iter()
                .filter_map(|d| match d {
                    StatusDetails::ErrorInfo(info) => Some(info.reason.clone()),
                    _ => None,
                })
                .collect(),
            message: s.message.clone(),
            transport: false,
        },
        None => ApiFailure {
            method: method.to_owned(),
            status,
            reasons: Vec::new(),
            message: e.to_string(),
            transport: status.is_none(),
        },
    }
}

/// The failure a finished operation reports, if any.
fn operation_failure(method: &str, op: &Operation) -> Option<ApiFailure> {
    let error = op.error.as_ref().filter(|e| !e.errors.is_empty())?;
    Some(ApiFailure {
        method: method.to_owned(),
        status: op.http_error_status_code.and_then(|c| u16::try_from(c).ok()),
        reasons: error.errors.iter().filter_map(|e| e.code.clone()).collect(),
        message: error.errors.iter().filter_map(|e| e.message.clone()).collect::<Vec<_>>().join("; "),
        transport: false,
    })
}

/// Whether a Compute method changes anything: reads are `get*`, `list*` and operation polls.
fn is_mutating(method: &str) -> bool {
    let verb = method.rsplit('.').next().unwrap_or(method);
    !(verb.starts_with("get") || verb.starts_with("list"))
}

/// The SDK clients and what every call shares.
#[derive(Clone, Debug)]
pub struct Compute {
    project: String,
    region: String,
    poll_interval: std::time::Duration,
    poll_max_interval: std::time::Duration,
    operation_timeout: std::time::Duration,
    addresses: Addresses,
    forwarding_rules: ForwardingRules,
    backend_services: RegionBackendServices,
    health_checks: RegionHealthChecks,
    firewalls: Firewalls,
    instance_groups: InstanceGroups,
    subnetworks: Subnetworks,
    /// Every call made.
    pub log: CallLog,
    limiter: Arc<RateLimiter>,
}

macro_rules! build_client {
    ($client:ty, $config:expr) => {{
        let mut b = <$client>::builder();
        if let Some(url) = &$config.endpoint_url {
            b = b.with_endpoint(url.clone());
        }
        if $config.anonymous_credentials {
            b = b.with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
        }
        // Retries belong to the operator, which backs off per Service with jitter; retrying
        // here as well would multiply the load on a throttled API.
        b = b.with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        b.build().await.map_err(|e| ProviderError::Fatal(format!("cannot build the Compute client: {e}")))?
    }};
}

/// Every item of a regional collection, all pages read (`addresses`, `forwarding_rules`, …).
macro_rules! list_regional {
    ($self:ident, $client:ident, $method:literal) => {{
        let pages = $self
            .pages(
                $method,
                |token| {
                    $self
                        .$client
                        .list()
                        .set_project(&$self.project)
                        .set_region(&$self.region)
                        .set_or_clear_page_token(token)
                        .send()
                },
                |page| page.next_page_token.clone(),
            )
            .await?;
        Ok(pages.into_iter().flat_map(|p| p.items).collect())
    }};
}

impl Compute {
    /// Builds the clients with Application Default Credentials (or anonymous ones for tests).
    pub async fn new(config: &GcpConfig) -> Result<Self, ProviderError> {
        // The SDK uses rustls; when the process has not chosen a backend yet (tests, other
        // embedders) choose ring, which the rest of hawser uses, so that rustls does not have
        // to guess between the backends its dependents enable.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            project: config.project.clone(),
            region: config.region.clone(),
            poll_interval: config.poll_interval,
            poll_max_interval: config.poll_max_interval,
            operation_timeout: config.operation_timeout,
            addresses: build_client!(Addresses, config),
            forwarding_rules: build_client!(ForwardingRules, config),
            backend_services: build_client!(RegionBackendServices, config),
            health_checks: build_client!(RegionHealthChecks, config),
            firewalls: build_client!(Firewalls, config),
            instance_groups: build_client!(InstanceGroups, config),
            subnetworks: build_client!(Subnetworks, config),
            log: CallLog::default(),
            limiter: Arc::new(RateLimiter::new(config.read_rate, config.write_rate)),
        })
    }

    /// Runs one call, recording it.
    async fn call<T, F>(&self, method: &str, fut: F) -> Result<T, ApiFailure>
    where
        F: Future<Output = google_cloud_compute_v1::Result<T>>,
    {
        let mutating = is_mutating(method);
        self.limiter.acquire(mutating).await;
        self.log.push(method);
        match fut.await {
            Ok(v) => {
                self.limiter.succeeded(mutating);
                Ok(v)
            }
            Err(e) => {
                let failure = reduce(method, &e);
                if failure.is_throttling() {
                    let pause = self.limiter.throttled(mutating);
                    tracing::warn!(method, ?pause, "Compute throttled a call; slowing down");
                }
                Err(failure)
            }
        }
    }

    /// Every page of a list call: `fetch` asks for the page after a token (none for the first),
    /// `next` reads the token of the page after, empty or absent at the end.
    async fn pages<P, F, Fut>(
        &self,
        method: &str,
        fetch: F,
        next: impl Fn(&P) -> Option<String>,
    ) -> Result<Vec<P>, ApiFailure>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = google_cloud_compute_v1::Result<P>>,
    {
        let mut pages = Vec::new();
        let mut token = None;
        loop {
            let page = self.call(method, fetch(token)).await?;
            token = next(&page).filter(|t| !t.is_empty());
            pages.push(page);
            if token.is_none() {
                return Ok(pages);
            }
        }
    }

    /// A read that answers `None` for 404.
    async fn get_opt<T, F>(&self, method: &str, fut: F) -> Result<Option<T>, ApiFailure>
    where
        F: Future<Output = google_cloud_compute_v1::Result<T>>,
    {
        match self.call(method, fut).await {
            Ok(v) => Ok(Some(v)),
            Err(f) if f.status == Some(404) => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// Waits for `op` with bounded, growing poll intervals; `poll` fetches it again by name.
    async fn wait<F, Fut>(&self, method: &str, mut op: Operation, poll: F) -> Result<(), ApiFailure>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = google_cloud_compute_v1::Result<Operation>>,
    {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        let mut interval = self.poll_interval;
        loop {
            if op.status == Some(model::operation::Status::Done) {
                return match operation_failure(method, &op) {
                    Some(f) => Err(f),
                    None => Ok(()),
                };
            }
            if tokio::time::Instant::now() + interval > deadline {
                return Err(ApiFailure {
                    method: method.to_owned(),
                    message: format!(
                        "operation {} still running after {:?}; the next reconcile picks it up",
                        op.name.unwrap_or_default(),
                        self.operation_timeout
                    ),
                    transport: true,
                    ..ApiFailure::default()
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(self.poll_max_interval);
            let name = op.name.clone().unwrap_or_default();
            op = self.call(&format!("{method}.getOperation"), poll(name)).await?;
        }
    }

    /// Waits for a regional operation. Every regional client polls the same
    /// `regions/*/operations` collection, so one client serves all.
    async fn wait_regional(&self, method: &str, op: Operation) -> Result<(), ApiFailure> {
        self.wait(method, op, |n| {
            self.addresses.get_operation().set_project(&self.project).set_region(&self.region).set_operation(n).send()
        })
        .await
    }

    // ---- addresses ----

    /// The regional address `name`.
    pub async fn get_address(&self, name: &str) -> Result<Option<Address>, ApiFailure> {
        let req = self.addresses.get().set_project(&self.project).set_region(&self.region).set_address(name);
        self.get_opt("addresses.get", req.send()).await
    }

    /// Every regional address of the project (to check a requested address).
    pub async fn list_addresses(&self) -> Result<Vec<Address>, ApiFailure> {
        list_regional!(self, addresses, "addresses.list")
    }

    /// Reserves an address.
    pub async fn insert_address(&self, spec: &AddressSpec) -> Result<(), ApiFailure> {
        let mut body = Address::new()
            .set_name(&spec.name)
            .set_description(&spec.description)
            .set_address_type(model::address::AddressType::from(spec.address_type))
            .set_labels(spec.labels.clone());
        if let Some(t) = spec.network_tier {
            body = body.set_network_tier(model::address::NetworkTier::from(t));
        }
        if let Some(s) = &spec.subnetwork {
            body = body.set_subnetwork(s);
        }
        if let Some(p) = spec.purpose {
            body = body.set_purpose(model::address::Purpose::from(p));
        }
        if let Some(v) = spec.ip_version {
            body = body.set_ip_version(model::address::IpVersion::from(v));
        }
        if let Some(t) = spec.ipv6_endpoint_type {
            body = body.set_ipv_6_endpoint_type(model::address::Ipv6EndpointType::from(t));
        }
        let req = self.addresses.insert().set_project(&self.project).set_region(&self.region).set_body(body);
        let op = self.call("addresses.insert", req.send()).await?;
        self.wait_regional("addresses.insert", op).await
    }

    /// Releases an address.
    pub async fn delete_address(&self, name: &str) -> Result<(), ApiFailure> {
        let req = self.addresses.delete().set_project(&self.project).set_region(&self.region).set_address(name);
        let op = self.call("addresses.delete", req.send()).await?;
        self.wait_regional("addresses.delete", op).await
    }

    // ---- subnetworks ----

    /// The regional subnetwork at the relative URL `url` (`projects/p/regions/r/subnetworks/n`).
    pub async fn get_subnetwork(&self, url: &str) -> Result<Option<Subnetwork>, ApiFailure> {
        let mut parts = url.split('/');
        let (project, region, name) = (parts.nth(1), parts.nth(1), parts.nth(1));
        let (Some(project), Some(region), Some(name)) = (project, region, name) else {
            return Err(ApiFailure {
                method: "subnetworks.get".into(),
                message: format!("{url} is not a subnetwork URL (projects/P/regions/R/subnetworks/NAME)"),
                status: Some(400),
                ..ApiFailure::default()
            });
        };
        let req = self.subnetworks.get().set_project(project).set_region(region).set_subnetwork(name);
        self.get_opt("subnetworks.get", req.send()).await
    }

    // ---- forwarding rules ----

    /// The regional forwarding rule `name`.
    pub async fn get_forwarding_rule(&self, name: &str) -> Result<Option<ForwardingRule>, ApiFailure> {
        let req =
            self.forwarding_rules.get().set_project(&self.project).set_region(&self.region).set_forwarding_rule(name);
        self.get_opt("forwardingRules.get", req.send()).await
    }

    /// Every regional forwarding rule (to find this cluster's load balancers).
    pub async fn list_forwarding_rules(&self) -> Result<Vec<ForwardingRule>, ApiFailure> {
        list_regional!(self, forwarding_rules, "forwardingRules.list")
    }

    /// Creates a forwarding rule.
    pub async fn insert_forwarding_rule(&self, spec: &ForwardingRuleSpec) -> Result<(), ApiFailure> {
        // GCE takes (and answers) an external IPv6 rule's address as the /96 range it serves.
        let ip = match (spec.ip, spec.scheme) {
            (IpAddr::V6(v6), "EXTERNAL") => format!("{v6}/96"),
            (ip, _) => ip.to_string(),
        };
        let mut body = ForwardingRule::new()
            .set_name(&spec.name)
            .set_description(&spec.description)
            .set_ip_address(ip)
            .set_ip_protocol(model::forwarding_rule::IPProtocol::from(spec.protocol))
            .set_load_balancing_scheme(model::forwarding_rule::LoadBalancingScheme::from(spec.scheme))
            .set_backend_service(&spec.backend_service)
            .set_labels(spec.labels.clone());
        if spec.port_range.is_none() {
            body = body.set_ports(spec.ports.clone());
        }
        if let Some(r) = &spec.port_range {
            body = body.set_port_range(r);
        }
        if let Some(t) = spec.network_tier {
            body = body.set_network_tier(model::forwarding_rule::NetworkTier::from(t));
        }
        if let Some(n) = &spec.network {
            body = body.set_network(n);
        }
        if let Some(s) = &spec.subnetwork {
            body = body.set_subnetwork(s);
        }
        if spec.global_access {
            body = body.set_allow_global_access(true);
        }
        if let Some(v) = spec.ip_version {
            body = body.set_ip_version(model::forwarding_rule::IpVersion::from(v));
        }
        let req = self.forwarding_rules.insert().set_project(&self.project).set_region(&self.region).set_body(body);
        let op = self.call("forwardingRules.insert", req.send()).await?;
        self.wait_regional("forwardingRules.insert", op).await
    }

    /// Turns global access on or off, the one field GCE patches in place that hawser manages.
    pub async fn patch_forwarding_rule_global_access(&self, name: &str, on: bool) -> Result<(), ApiFailure> {
        let body = ForwardingRule::new().set_allow_global_access(on);
        let req = self
            .forwarding_rules
            .patch()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_forwarding_rule(name)
            .set_body(body);
        let op = self.call("forwardingRules.patch", req.send()).await?;
        self.wait_regional("forwardingRules.patch", op).await
    }

    /// Deletes a forwarding rule.
    pub async fn delete_forwarding_rule(&self, name: &str) -> Result<(), ApiFailure> {
        let req = self
            .forwarding_rules
            .delete()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_forwarding_rule(name);
        let op = self.call("forwardingRules.delete", req.send()).await?;
        self.wait_regional("forwardingRules.delete", op).await
    }

    // ---- backend services ----

    /// The regional backend service `name`.
    pub async fn get_backend_service(&self, name: &str) -> Result<Option<BackendService>, ApiFailure> {
        let req =
            self.backend_services.get().set_project(&self.project).set_region(&self.region).set_backend_service(name);
        self.get_opt("regionBackendServices.get", req.send()).await
    }

    /// Every regional backend service.
    pub async fn list_backend_services(&self) -> Result<Vec<BackendService>, ApiFailure> {
        list_regional!(self, backend_services, "regionBackendServices.list")
    }

    fn backend_service_body(spec: &BackendServiceSpec) -> BackendService {
        let mut body = BackendService::new()
            .set_name(&spec.name)
            .set_description(&spec.description)
            .set_load_balancing_scheme(model::backend_service::LoadBalancingScheme::from(spec.scheme))
            .set_protocol(model::backend_service::Protocol::from(spec.protocol))
            .set_session_affinity(model::backend_service::SessionAffinity::from(spec.session_affinity))
            .set_connection_draining(ConnectionDraining::new().set_draining_timeout_sec(spec.draining_sec))
            .set_health_checks([spec.health_check.clone()])
            .set_backends(spec.groups.iter().map(|g| {
                Backend::new().set_group(g).set_balancing_mode(model::backend::BalancingMode::from("CONNECTION"))
            }));
        if let Some(n) = &spec.network {
            body = body.set_network(n);
        }
        body
    }

    /// Creates a backend service.
    pub async fn insert_backend_service(&self, spec: &BackendServiceSpec) -> Result<(), ApiFailure> {
        let req = self
            .backend_services
            .insert()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_body(Self::backend_service_body(spec));
        let op = self.call("regionBackendServices.insert", req.send()).await?;
        self.wait_regional("regionBackendServices.insert", op).await
    }

    /// Changes a backend service in place.
    pub async fn patch_backend_service(&self, spec: &BackendServiceSpec) -> Result<(), ApiFailure> {
        let req = self
            .backend_services
            .patch()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_backend_service(&spec.name)
            .set_body(Self::backend_service_body(spec));
        let op = self.call("regionBackendServices.patch", req.send()).await?;
        self.wait_regional("regionBackendServices.patch", op).await
    }

    /// Deletes a backend service.
    pub async fn delete_backend_service(&self, name: &str) -> Result<(), ApiFailure> {
        let req = self
            .backend_services
            .delete()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_backend_service(name);
        let op = self.call("regionBackendServices.delete", req.send()).await?;
        self.wait_regional("regionBackendServices.delete", op).await
    }

    // ---- health checks ----

    /// The regional health check `name`.
    pub async fn get_health_check(&self, name: &str) -> Result<Option<HealthCheck>, ApiFailure> {
        let req = self.health_checks.get().set_project(&self.project).set_region(&self.region).set_health_check(name);
        self.get_opt("regionHealthChecks.get", req.send()).await
    }

    fn health_check_body(spec: &HealthCheckSpec) -> HealthCheck {
        let body = HealthCheck::new()
            .set_name(&spec.name)
            .set_description(&spec.description)
            .set_check_interval_sec(spec.interval_sec)
            .set_timeout_sec(spec.timeout_sec)
            .set_healthy_threshold(spec.healthy_threshold)
            .set_unhealthy_threshold(spec.unhealthy_threshold);
        match spec.protocol {
            HealthCheckProtocol::Http => body.set_type(model::health_check::Type::from("HTTP")).set_http_health_check(
                HTTPHealthCheck::new()
                    .set_port(spec.port)
                    .set_request_path(spec.path.clone().unwrap_or_else(|| "/".to_owned())),
            ),
            HealthCheckProtocol::Tcp => body
                .set_type(model::health_check::Type::from("TCP"))
                .set_tcp_health_check(TCPHealthCheck::new().set_port(spec.port)),
        }
    }

    /// Creates a health check.
    pub async fn insert_health_check(&self, spec: &HealthCheckSpec) -> Result<(), ApiFailure> {
        let req = self
            .health_checks
            .insert()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_body(Self::health_check_body(spec));
        let op = self.call("regionHealthChecks.insert", req.send()).await?;
        self.wait_regional("regionHealthChecks.insert", op).await
    }

    /// Replaces a health check's settings (PUT: a protocol change leaves no stale half behind).
    pub async fn update_health_check(&self, spec: &HealthCheckSpec) -> Result<(), ApiFailure> {
        let req = self
            .health_checks
            .update()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_health_check(&spec.name)
            .set_body(Self::health_check_body(spec));
        let op = self.call("regionHealthChecks.update", req.send()).await?;
        self.wait_regional("regionHealthChecks.update", op).await
    }

    /// Deletes a health check.
    pub async fn delete_health_check(&self, name: &str) -> Result<(), ApiFailure> {
        let req =
            self.health_checks.delete().set_project(&self.project).set_region(&self.region).set_health_check(name);
        let op = self.call("regionHealthChecks.delete", req.send()).await?;
        self.wait_regional("regionHealthChecks.delete", op).await
    }

    // ---- firewalls ----

    /// The firewall rule `name`.
    pub async fn get_firewall(&self, name: &str) -> Result<Option<Firewall>, ApiFailure> {
        let req = self.firewalls.get().set_project(&self.project).set_firewall(name);
        self.get_opt("firewalls.get", req.send()).await
    }

    fn firewall_body(spec: &FirewallSpec) -> Firewall {
        Firewall::new()
            .set_name(&spec.name)
            .set_description(&spec.description)
            .set_network(&spec.network)
            .set_direction(model::firewall::Direction::from("INGRESS"))
            .set_priority(1000)
            .set_source_ranges(spec.source_ranges.clone())
            .set_destination_ranges(spec.destination_ranges.clone())
            .set_allowed(
                spec.allowed.iter().map(|(proto, ports)| {
                    model::firewall::Allowed::new().set_ip_protocol(proto).set_ports(ports.clone())
                }),
            )
            .set_target_tags(spec.target_tags.clone())
            .set_target_service_accounts(spec.target_service_accounts.clone())
    }

    /// Creates a firewall rule.
    pub async fn insert_firewall(&self, spec: &FirewallSpec) -> Result<(), ApiFailure> {
        let req = self.firewalls.insert().set_project(&self.project).set_body(Self::firewall_body(spec));
        let op = self.call("firewalls.insert", req.send()).await?;
        self.wait_fw("firewalls.insert", op).await
    }

    /// Changes a firewall rule in place.
    pub async fn patch_firewall(&self, spec: &FirewallSpec) -> Result<(), ApiFailure> {
        let req = self
            .firewalls
            .patch()
            .set_project(&self.project)
            .set_firewall(&spec.name)
            .set_body(Self::firewall_body(spec));
        let op = self.call("firewalls.patch", req.send()).await?;
        self.wait_fw("firewalls.patch", op).await
    }

    /// Deletes a firewall rule.
    pub async fn delete_firewall(&self, name: &str) -> Result<(), ApiFailure> {
        let req = self.firewalls.delete().set_project(&self.project).set_firewall(name);
        let op = self.call("firewalls.delete", req.send()).await?;
        self.wait_fw("firewalls.delete", op).await
    }

    async fn wait_fw(&self, method: &str, op: Operation) -> Result<(), ApiFailure> {
        self.wait(method, op, |n| self.firewalls.get_operation().set_project(&self.project).set_operation(n).send())
            .await
    }

    // ---- instance groups ----

    /// The unmanaged instance group `name` in `zone`.
    pub async fn get_instance_group(&self, zone: &str, name: &str) -> Result<Option<InstanceGroup>, ApiFailure> {
        let req = self.instance_groups.get().set_project(&self.project).set_zone(zone).set_instance_group(name);
        self.get_opt("instanceGroups.get", req.send()).await
    }

    /// Creates an unmanaged instance group.
    pub async fn insert_instance_group(
        &self,
        zone: &str,
        name: &str,
        description: &str,
        network: &str,
    ) -> Result<(), ApiFailure> {
        let body = InstanceGroup::new().set_name(name).set_description(description).set_network(network);
        let req = self.instance_groups.insert().set_project(&self.project).set_zone(zone).set_body(body);
        let op = self.call("instanceGroups.insert", req.send()).await?;
        self.wait_ig("instanceGroups.insert", zone, op).await
    }

    /// The relative instance URLs in a group.
    pub async fn list_instances(&self, zone: &str, name: &str) -> Result<BTreeSet<String>, ApiFailure> {
        let all = model::instance_groups_list_instances_request::InstanceState::from("ALL");
        let pages = self
            .pages(
                "instanceGroups.listInstances",
                |token| {
                    self.instance_groups
                        .list_instances()
                        .set_project(&self.project)
                        .set_zone(zone)
                        .set_instance_group(name)
                        .set_body(InstanceGroupsListInstancesRequest::new().set_instance_state(all.clone()))
                        .set_or_clear_page_token(token)
                        .send()
                },
                |page| page.next_page_token.clone(),
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| &p.items)
            .filter_map(|i| i.instance.as_deref())
            .map(|u| relative(u).to_owned())
            .collect())
    }

    /// Adds instances to a group.
    pub async fn add_instances(&self, zone: &str, name: &str, urls: &[String]) -> Result<(), ApiFailure> {
        let body = InstanceGroupsAddInstancesRequest::new()
            .set_instances(urls.iter().map(|u| InstanceReference::new().set_instance(u)));
        let req = self
            .instance_groups
            .add_instances()
            .set_project(&self.project)
            .set_zone(zone)
            .set_instance_group(name)
            .set_body(body);
        let op = self.call("instanceGroups.addInstances", req.send()).await?;
        self.wait_ig("instanceGroups.addInstances", zone, op).await
    }

    /// Removes instances from a group.
    pub async fn remove_instances(&self, zone: &str, name: &str, urls: &[String]) -> Result<(), ApiFailure> {
        let body = InstanceGroupsRemoveInstancesRequest::new()
            .set_instances(urls.iter().map(|u| InstanceReference::new().set_instance(u)));
        let req = self
            .instance_groups
            .remove_instances()
            .set_project(&self.project)
            .set_zone(zone)
            .set_instance_group(name)
            .set_body(body);
        let op = self.call("instanceGroups.removeInstances", req.send()).await?;
        self.wait_ig("instanceGroups.removeInstances", zone, op).await
    }

    /// Deletes an instance group.
    pub async fn delete_instance_group(&self, zone: &str, name: &str) -> Result<(), ApiFailure> {
        let req = self.instance_groups.delete().set_project(&self.project).set_zone(zone).set_instance_group(name);
        let op = self.call("instanceGroups.delete", req.send()).await?;
        self.wait_ig("instanceGroups.delete", zone, op).await
    }

    async fn wait_ig(&self, method: &str, zone: &str, op: Operation) -> Result<(), ApiFailure> {
        self.wait(method, op, |n| {
            self.instance_groups.get_operation().set_project(&self.project).set_zone(zone).set_operation(n).send()
        })
        .await
    }
}

// ---- conversion of what GCE answers into the plan's structs ----

fn known(value: Option<&str>, accepted: &[&'static str]) -> &'static str {
    value.and_then(|v| accepted.iter().find(|a| **a == v).copied()).unwrap_or("UNKNOWN")
}

fn rel(url: Option<&String>) -> Option<String> {
    url.map(|u| relative(u).to_owned())
}

/// An address as GCE writes it (with the `/96` it puts after external IPv6 rules' addresses),
/// parsed; GCE stores the shortest form, so parsed addresses are what compares.
pub fn address_ip(text: Option<&str>) -> Option<IpAddr> {
    text?.split('/').next()?.parse().ok()
}

/// A forwarding rule as the plan describes it.
pub fn observed_forwarding_rule(fr: &ForwardingRule) -> ForwardingRuleSpec {
    let scheme = known(fr.load_balancing_scheme.as_ref().and_then(|s| s.name()), &["EXTERNAL", "INTERNAL"]);
    ForwardingRuleSpec {
        name: fr.name.clone().unwrap_or_default(),
        description: fr.description.clone().unwrap_or_default(),
        // An unreadable address never equals a planned one, so the rule would be recreated.
        ip: address_ip(fr.ip_address.as_deref()).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        ip_version: (fr.ip_version.as_ref().and_then(|v| v.name()) == Some("IPV6")).then_some("IPV6"),
        protocol: known(fr.ip_protocol.as_ref().and_then(|p| p.name()), &["TCP", "UDP"]),
        ports: fr.ports.clone(),
        port_range: fr.port_range.clone().filter(|r| !r.is_empty()),
        scheme,
        // GCE reports PREMIUM on internal rules too, where the tier is not a choice.
        network_tier: (scheme == "EXTERNAL")
            .then(|| known(fr.network_tier.as_ref().and_then(|t| t.name()), &["PREMIUM", "STANDARD"])),
        backend_service: rel(fr.backend_service.as_ref()).unwrap_or_default(),
        network: if scheme == "INTERNAL" { rel(fr.network.as_ref()) } else { None },
        subnetwork: rel(fr.subnetwork.as_ref()),
        global_access: fr.allow_global_access.unwrap_or(false),
        labels: fr.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// A backend service as the plan describes it.
pub fn observed_backend_service(bs: &BackendService) -> BackendServiceSpec {
    let scheme = known(bs.load_balancing_scheme.as_ref().and_then(|s| s.name()), &["EXTERNAL", "INTERNAL"]);
    BackendServiceSpec {
        name: bs.name.clone().unwrap_or_default(),
        description: bs.description.clone().unwrap_or_default(),
        scheme,
        protocol: known(bs.protocol.as_ref().and_then(|p| p.name()), &["TCP", "UDP"]),
        session_affinity: known(
            bs.session_affinity.as_ref().and_then(|s| s.name()).or(Some("NONE")),
            &["NONE", "CLIENT_IP"],
        ),
        draining_sec: bs.connection_draining.as_ref().and_then(|c| c.draining_timeout_sec).unwrap_or(0),
        health_check: rel(bs.health_checks.first()).unwrap_or_default(),
        groups: bs.backends.iter().filter_map(|b| rel(b.group.as_ref())).collect(),
        network: if scheme == "INTERNAL" { rel(bs.network.as_ref()) } else { None },
    }
}

/// A health check as the plan describes it.
pub fn observed_health_check(hc: &HealthCheck) -> HealthCheckSpec {
    let (protocol, port, path) =
        match (&hc.http_health_check, &hc.tcp_health_check, hc.r#type.as_ref().and_then(|t| t.name())) {
            (_, Some(tcp), Some("TCP")) => (HealthCheckProtocol::Tcp, tcp.port.unwrap_or_default(), None),
            (Some(http), _, _) => (HealthCheckProtocol::Http, http.port.unwrap_or_default(), http.request_path.clone()),
            (_, Some(tcp), _) => (HealthCheckProtocol::Tcp, tcp.port.unwrap_or_default(), None),
            _ => (HealthCheckProtocol::Tcp, 0, None),
        };
    HealthCheckSpec {
        name: hc.name.clone().unwrap_or_default(),
        description: hc.description.clone().unwrap_or_default(),
        protocol,
        port,
        path,
        interval_sec: hc.check_interval_sec.unwrap_or_default(),
        timeout_sec: hc.timeout_sec.unwrap_or_default(),
        healthy_threshold: hc.healthy_threshold.unwrap_or_default(),
        unhealthy_threshold: hc.unhealthy_threshold.unwrap_or_default(),
    }
}

/// A firewall rule as the plan describes it.
pub fn observed_firewall(fw: &Firewall) -> FirewallSpec {
    let mut allowed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in &fw.allowed {
        allowed
            .entry(a.ip_protocol.clone().unwrap_or_default().to_ascii_lowercase())
            .or_default()
            .extend(a.ports.iter().cloned());
    }
    FirewallSpec {
        name: fw.name.clone().unwrap_or_default(),
        description: fw.description.clone().unwrap_or_default(),
        network: rel(fw.network.as_ref()).unwrap_or_default(),
        source_ranges: fw.source_ranges.iter().cloned().collect(),
        destination_ranges: fw.destination_ranges.iter().cloned().collect(),
        allowed,
        target_tags: fw.target_tags.iter().cloned().collect(),
        target_service_accounts: fw.target_service_accounts.iter().cloned().collect(),
    }
}
