//! What this node must do, computed purely from Services, EndpointSlices and the own Node.
//!
//! The endpoint rules follow kube-proxy: missing conditions default to ready/serving and not
//! terminating, serving+terminating endpoints are used only when no ready one exists, `Local`
//! traffic policy keeps only endpoints on this node, and an endpoint listed by several slices
//! counts once, preferring the copy that is not terminating.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Default `spec.loadBalancerClass` served by hawser.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "hawser.dev/lb";
/// Taint the cluster autoscaler puts on a node it is about to remove.
pub const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key from namespace and name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; a missing protocol means TCP.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The nftables spelling (`inet_proto` keyword).
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    /// Every protocol a Service port may have.
    pub const ALL: [Self; 3] = [Self::Tcp, Self::Udp, Self::Sctp];

    /// The protocol nftables spells `name`.
    pub fn from_nft_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.nft_name() == name)
    }

    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// The protocol with IP protocol number `number`.
    pub fn from_number(number: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == number)
    }
}

/// IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any endpoint in the cluster; the client address is masqueraded.
    Cluster,
    /// Only endpoints on this node; the client address is preserved.
    Local,
}

/// One endpoint (address + target port) of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address.
    pub ip: IpAddr,
    /// Target port taken from the EndpointSlice.
    pub port: u16,
    /// `nodeName` of the endpoint, if known.
    pub node_name: Option<String>,
    /// Whether the endpoint runs on this node.
    pub is_local: bool,
    /// `conditions.ready` (nil = true).
    pub ready: bool,
    /// `conditions.serving` (nil = true).
    pub serving: bool,
    /// `conditions.terminating` (nil = false).
    pub terminating: bool,
}

/// One port of a Service with all its known endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortModel {
    /// Port name (may be empty for single-port Services).
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Service port, used on load-balancer addresses.
    pub port: u16,
    /// NodePort, if allocated.
    pub node_port: Option<u16>,
    /// Every endpoint known for this port, deduplicated, sorted by address.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the dataplane needs to know about one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceModel {
    /// `namespace/name`.
    pub key: ServiceKey,
    /// Ports of the Service.
    pub ports: Vec<PortModel>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_addresses: Vec<IpAddr>,
    /// `spec.externalTrafficPolicy`.
    pub traffic_policy: TrafficPolicy,
    /// ClientIP affinity timeout in seconds, when session affinity is ClientIP.
    pub affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges`; `None` means unrestricted.
    pub source_ranges: Option<Vec<IpNet>>,
    /// `spec.ipFamilies` (or the families of the load-balancer addresses when unset).
    pub families: Vec<Family>,
}

/// Which endpoints a port uses and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointChoice {
    /// Ready endpoints exist and are used.
    Ready,
    /// No ready endpoint: serving+terminating ones are used (kube-proxy's fallback).
    TerminatingFallback,
    /// Nothing usable.
    None,
}

impl ServiceModel {
    /// The endpoints that receive new external connections for `port` in `family`, with how
    /// they were chosen. Honours the traffic policy and the terminating fallback.
    pub fn usable_endpoints<'a>(&self, port: &'a PortModel, family: Family) -> (Vec<&'a Endpoint>, EndpointChoice) {
        let candidates = port
            .endpoints
            .iter()
            .filter(|e| Family::of(&e.ip) == family && (self.traffic_policy == TrafficPolicy::Cluster || e.is_local));
        let ready: Vec<_> = candidates.clone().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return (ready, EndpointChoice::Ready);
        }
        let fallback: Vec<_> = candidates.filter(|e| e.serving && e.terminating).collect();
        if fallback.is_empty() {
            (fallback, EndpointChoice::None)
        } else {
            (fallback, EndpointChoice::TerminatingFallback)
        }
    }

    /// Whether the Service has any endpoint at all (any node) for `port` in `family` that
    /// could serve: distinguishes "reject: no endpoints" from "drop: none on this node".
    pub fn has_cluster_endpoints(&self, port: &PortModel, family: Family) -> bool {
        port.endpoints.iter().any(|e| Family::of(&e.ip) == family && (e.ready || (e.serving && e.terminating)))
    }

    /// Distinct ready endpoint addresses on this node, over all ports.
    pub fn local_ready_addresses(&self) -> usize {
        let mut ips: Vec<IpAddr> = self
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.is_local && e.ready)
            .map(|e| e.ip)
            .collect();
        ips.sort();
        ips.dedup();
        ips.len()
    }

    /// Distinct serving+terminating (not ready) endpoint addresses on this node.
    pub fn local_terminating_addresses(&self) -> usize {
        let mut ips: Vec<IpAddr> = self
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.is_local && !e.ready && e.serving && e.terminating)
            .map(|e| e.ip)
            .collect();
        ips.sort();
        ips.dedup();
        ips.len()
    }
}

/// What the dataplane knows about its own Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeModel {
    /// Node name (`--node-name`).
    pub name: String,
    /// Whether the Node object has been seen.
    pub seen: bool,
    /// The Node has a deletionTimestamp.
    pub deleting: bool,
    /// The Node carries the cluster autoscaler's deletion taint.
    pub autoscaler_deleting: bool,
}

impl NodeModel {
    /// Builds the node state from the Node object (None: not seen yet).
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let Some(node) = node else {
            return Self { name: name.to_owned(), ..Self::default() };
        };
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT));
        Self {
            name: name.to_owned(),
            seen: true,
            deleting: node.metadata.deletion_timestamp.is_some(),
            autoscaler_deleting: tainted,
        }
    }
}

/// Input settings of the model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Only Services with this `spec.loadBalancerClass` are served.
    pub load_balancer_class: String,
    /// This node's name.
    pub node_name: String,
}

/// Something in the input that was ignored, for logs and Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelWarning {
    /// Service concerned.
    pub service: ServiceKey,
    /// What was wrong.
    pub message: String,
}

/// The whole desired state of this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterModel {
    /// Services of our class, by key.
    pub services: BTreeMap<ServiceKey, ServiceModel>,
    /// Input that could not be used.
    pub warnings: Vec<ModelWarning>,
}

/// Whether a Service is ours: type LoadBalancer with our class.
pub fn is_our_service(svc: &Service, class: &str) -> bool {
    svc.spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.as_deref() == Some(class))
}

/// What the model reads from one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInput {
    /// `name`.
    pub name: Option<String>,
    /// `protocol`.
    pub protocol: Option<String>,
    /// `port`.
    pub port: i32,
    /// `nodePort`.
    pub node_port: Option<i32>,
}

/// What the model reads from a Service of our class: a watch event is projected to this and
/// the object itself is dropped, so the agent never keeps whole Services.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceInput {
    /// `spec.ports`.
    pub ports: Vec<ServicePortInput>,
    /// `status.loadBalancer.ingress[].ip`, unparsed (invalid ones are warned about when modelled).
    pub ingress_ips: Vec<String>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: Option<String>,
    /// `spec.sessionAffinity`.
    pub session_affinity: Option<String>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
    /// `spec.loadBalancerSourceRanges`.
    pub source_ranges: Option<Vec<String>>,
    /// `spec.ipFamilies`.
    pub ip_families: Vec<String>,
}

impl ServiceInput {
    /// The key and projection of `svc` when it is ours, `None` otherwise.
    pub fn project(svc: &Service, class: &str) -> Option<(ServiceKey, Self)> {
        if !is_our_service(svc, class) {
            return None;
        }
        let key = ServiceKey::new(svc.metadata.namespace.as_deref()?, svc.metadata.name.as_deref()?);
        let spec = svc.spec.as_ref()?;
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePortInput {
                name: p.name.clone(),
                protocol: p.protocol.clone(),
                port: p.port,
                node_port: p.node_port,
            })
            .collect();
        let ingress_ips = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.clone())
            .collect();
        Some((
            key,
            Self {
                ports,
                ingress_ips,
                external_traffic_policy: spec.external_traffic_policy.clone(),
                session_affinity: spec.session_affinity.clone(),
                affinity_timeout: spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds),
                source_ranges: spec.load_balancer_source_ranges.clone(),
                ip_families: spec.ip_families.clone().unwrap_or_default(),
            },
        ))
    }
}

/// What the model reads from one endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInput {
    /// The first address (kube-proxy uses only that one).
    pub ip: IpAddr,
    /// `nodeName`.
    pub node_name: Option<String>,
    /// `conditions.ready`.
    pub ready: Option<bool>,
    /// `conditions.serving`.
    pub serving: Option<bool>,
    /// `conditions.terminating`.
    pub terminating: Option<bool>,
}

/// What the model reads from an EndpointSlice (see [`ServiceInput`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceInput {
    /// `ports[]`: name, protocol, port.
    pub ports: Vec<(Option<String>, Option<String>, Option<i32>)>,
    /// Endpoints with a parsable first address (none for FQDN slices).
    pub endpoints: Vec<EndpointInput>,
}

impl SliceInput {
    /// The Service (from the `kubernetes.io/service-name` label), the slice's name and its
    /// projection; `None` for a slice of no Service.
    pub fn project(slice: &EndpointSlice) -> Option<(ServiceKey, String, Self)> {
        let ns = slice.metadata.namespace.as_deref()?;
        let svc = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL))?;
        let name = slice.metadata.name.clone().unwrap_or_default();
        let mut input = Self::default();
        if matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            input.ports = slice.ports.iter().flatten().map(|p| (p.name.clone(), p.protocol.clone(), p.port)).collect();
            input.endpoints = slice
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let ip = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok())?;
                    let conditions = ep.conditions.as_ref();
                    Some(EndpointInput {
                        ip,
                        node_name: ep.node_name.clone(),
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                    })
                })
                .collect();
        }
        Some((ServiceKey::new(ns, svc.as_str()), name, input))
    }
}

/// Builds the model from the cluster objects.
pub fn build_model<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    config: &ModelConfig,
) -> ClusterModel {
    let mut slices_by_service: BTreeMap<ServiceKey, Vec<SliceInput>> = BTreeMap::new();
    for slice in slices {
        if let Some((key, _, input)) = SliceInput::project(slice) {
            slices_by_service.entry(key).or_default().push(input);
        }
    }
    let mut model = ClusterModel::default();
    for svc in services {
        let Some((key, input)) = ServiceInput::project(svc, &config.load_balancer_class) else {
            continue;
        };
        let slices: Vec<&SliceInput> = slices_by_service.get(&key).into_iter().flatten().collect();
        let built = build_service(key.clone(), &input, &slices, config, &mut model.warnings);
        model.services.insert(key, built);
    }
    model
}

/// Builds one Service's model from its projections.
pub fn build_service(
    key: ServiceKey,
    svc: &ServiceInput,
    slices: &[&SliceInput],
    config: &ModelConfig,
    warnings: &mut Vec<ModelWarning>,
) -> ServiceModel {
    let mut warn = |message: String| warnings.push(ModelWarning { service: key.clone(), message });

    let lb_addresses: Vec<IpAddr> = svc
        .ingress_ips
        .iter()
        .filter_map(|ip| match ip.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                warn(format!("ignoring invalid load-balancer ingress ip {ip:?}"));
                None
            }
        })
        .collect();

    let traffic_policy = match svc.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };

    let affinity_timeout = (svc.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        svc.affinity_timeout
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
    });

    let source_ranges = svc.source_ranges.as_ref().filter(|r| !r.is_empty()).map(|ranges| {
        ranges
            .iter()
            .filter_map(|r| match r.trim().parse::<IpNet>() {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    // An unparsable range is dropped; if none is left, the list stays
                    // empty and therefore denies everything: failing closed is the only
                    // safe reading of a restriction we cannot understand.
                    warn(format!("ignoring invalid loadBalancerSourceRange {r:?}"));
                    None
                }
            })
            .collect::<Vec<_>>()
    });

    let mut families: Vec<Family> = svc
        .ip_families
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if families.is_empty() {
        families = lb_addresses.iter().map(Family::of).collect();
        if families.is_empty() {
            families.push(Family::V4);
        }
        families.sort();
        families.dedup();
    }

    let mut ports = Vec::new();
    for sp in &svc.ports {
        let Some(protocol) = Protocol::parse(sp.protocol.as_deref()) else {
            warn(format!("ignoring port {} with unknown protocol", sp.port));
            continue;
        };
        let Ok(port) = u16::try_from(sp.port) else {
            warn(format!("ignoring out-of-range port {}", sp.port));
            continue;
        };
        let name = sp.name.clone().unwrap_or_default();
        let node_port = sp.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
        let endpoints = endpoints_for_port(&name, protocol, slices, &config.node_name);
        ports.push(PortModel { name, protocol, port, node_port, endpoints });
    }

    ServiceModel { key, ports, lb_addresses, traffic_policy, affinity_timeout, source_ranges, families }
}

/// Collects the endpoints of one Service port: slice ports are matched by name and protocol,
/// and the target port comes from the slice.
fn endpoints_for_port(port_name: &str, protocol: Protocol, slices: &[&SliceInput], node_name: &str) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().find_map(|(name, proto, port)| {
            let same_name = name.as_deref().unwrap_or("") == port_name;
            let same_proto = Protocol::parse(proto.as_deref()) == Some(protocol);
            (same_name && same_proto).then_some(*port).flatten().and_then(|p| u16::try_from(p).ok())
        }) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(true);
            let terminating = ep.terminating.unwrap_or(false);
            let is_local = ep.node_name.as_deref() == Some(node_name);
            let ip = ep.ip;
            let candidate =
                Endpoint { ip, port: target, node_name: ep.node_name.clone(), is_local, ready, serving, terminating };
            match by_addr.get(&(ip, target)) {
                Some(existing) if !existing.terminating || candidate.terminating => {}
                _ => {
                    by_addr.insert((ip, target), candidate);
                }
            }
        }
    }
    by_addr.into_values().collect()
}
