//! What the operator asks a cloud to build. No Kubernetes types here: this is the contract.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Which Service a load balancer belongs to, and in which cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceIdentity {
    /// The `--cluster-name` of the operator; scopes ownership in a shared cloud account.
    pub cluster: String,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service's UID: a recreated Service of the same name gets a new load balancer.
    pub uid: String,
}

impl ServiceIdentity {
    /// `namespace/name`.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The transport protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// The same port served on TCP and UDP with the same node port.
    #[serde(rename = "TCP_UDP")]
    TcpUdp,
}

impl Protocol {
    /// The protocol as clouds spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::TcpUdp => "TCP_UDP",
        }
    }
}

/// One port the load balancer listens on. Serialized in camelCase like Kubernetes objects (the
/// mock cloud's state file and `/mock/state`); the snake_case keys of older state files still read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// The Service port's name (may be empty for a single-port Service).
    pub name: String,
    /// TCP, UDP or both.
    pub protocol: Protocol,
    /// The port clients connect to.
    pub port: u16,
    /// The node port behind it, when the Service has one.
    #[serde(alias = "node_port")]
    pub node_port: Option<u16>,
}

/// A node that may receive traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The Node's name.
    pub name: String,
    /// The Node's `spec.providerID` (e.g. `aws:///us-east-1a/i-0abc`, `gce://p/zone/name`).
    #[serde(alias = "provider_id")]
    pub provider_id: Option<String>,
    /// The Node's zone (`topology.kubernetes.io/zone`).
    pub zone: Option<String>,
    /// The Node's internal addresses.
    pub addresses: Vec<IpAddr>,
}

/// The eligible nodes, shared: every Service's spec points at the one list built when the node
/// set last changed, so memory grows with Services + Nodes, not Services × Nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Targets(Arc<[Target]>);

impl Targets {
    /// Whether `self` and `other` are the very same shared list (a cheap equality witness).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Targets {
    type Target = [Target];

    fn deref(&self) -> &[Target] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Targets {
    type Item = &'a Target;
    type IntoIter = std::slice::Iter<'a, Target>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<Target>> for Targets {
    fn from(targets: Vec<Target>) -> Self {
        Self(targets.into())
    }
}

impl FromIterator<Target> for Targets {
    fn from_iter<I: IntoIterator<Item = Target>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl Serialize for Targets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_ref().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Target>::deserialize(d).map(Self::from)
    }
}

/// How the load balancer probes a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthCheckProtocol {
    /// An HTTP GET that must answer 200.
    Http,
    /// A TCP connect.
    Tcp,
}

/// The health check every target is probed with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// HTTP or TCP.
    pub protocol: HealthCheckProtocol,
    /// The port on the node.
    pub port: u16,
    /// The HTTP path, for HTTP checks.
    pub path: Option<String>,
    /// Time between probes.
    #[serde(with = "secs")]
    pub interval: Duration,
    /// How long one probe may take.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Consecutive successes before a target is healthy.
    #[serde(alias = "healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures before a target is unhealthy.
    #[serde(alias = "unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    /// Seconds between probes when the Service says nothing.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// How long one probe may take when the Service says nothing.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Successes to become healthy when the Service says nothing.
    pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
    /// Failures to become unhealthy when the Service says nothing.
    pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

    /// An HTTP check of `path` on `port` with the default timing and thresholds.
    pub fn http(port: u16, path: &str) -> Self {
        Self {
            protocol: HealthCheckProtocol::Http,
            port,
            path: Some(path.to_owned()),
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            healthy_threshold: Self::DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: Self::DEFAULT_UNHEALTHY_THRESHOLD,
        }
    }
}

/// Whether the load balancer faces the internet or only the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Reachable from the internet.
    #[default]
    InternetFacing,
    /// Reachable only inside the network.
    Internal,
}

impl Scheme {
    /// The scheme as the annotation spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InternetFacing => "internet-facing",
            Self::Internal => "internal",
        }
    }
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    /// IPv4.
    IPv4,
    /// IPv6.
    IPv6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::IPv4,
            IpAddr::V6(_) => Self::IPv6,
        }
    }
}

/// Whether a client sticks to one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum SessionAffinity {
    /// Every connection is balanced on its own.
    #[default]
    None,
    /// A client IP keeps its backend for `timeout` after its last packet.
    #[serde(rename = "ClientIP")]
    ClientIp {
        /// How long stickiness lasts.
        #[serde(with = "secs")]
        timeout: Duration,
    },
}

/// Everything a cloud needs to build the load balancer of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoadBalancerSpec {
    /// Which Service, in which cluster.
    pub identity: ServiceIdentity,
    /// The ports, sorted by port then protocol.
    pub listeners: Vec<Listener>,
    /// The eligible nodes, sorted by name.
    pub targets: Targets,
    /// How nodes are probed.
    pub health_check: HealthCheck,
    /// Internet-facing or internal.
    pub scheme: Scheme,
    /// The IP families the load balancer serves, primary first.
    pub ip_families: Vec<IpFamily>,
    /// Client ranges allowed in; empty means everyone.
    pub source_ranges: Vec<IpNet>,
    /// Client stickiness.
    pub session_affinity: SessionAffinity,
    /// Addresses the user asked for, at most one per family.
    pub requested_addresses: Vec<IpAddr>,
    /// User tags to put on every cloud resource (ownership tags are added by the provider).
    pub tags: BTreeMap<String, String>,
    /// `hawser.dev/<cloud>-*` annotations, for the provider to parse and validate itself.
    pub provider_annotations: BTreeMap<String, String>,
    /// The load-balancer group (`hawser.dev/load-balancer-group`) whose load balancer this
    /// Service shares with the group's other members, in its namespace; `None`: its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl LoadBalancerSpec {
    /// The spec of a Service that sets nothing beyond its ports: internet-facing, IPv4, open to
    /// every client, no affinity, no requested address, no tags, no provider annotations.
    pub fn new(
        identity: ServiceIdentity,
        listeners: Vec<Listener>,
        targets: impl Into<Targets>,
        health_check: HealthCheck,
    ) -> Self {
        Self {
            identity,
            listeners,
            targets: targets.into(),
            health_check,
            scheme: Scheme::InternetFacing,
            ip_families: vec![IpFamily::IPv4],
            source_ranges: Vec::new(),
            session_affinity: SessionAffinity::None,
            requested_addresses: Vec::new(),
            tags: BTreeMap::new(),
            provider_annotations: BTreeMap::new(),
            group: None,
        }
    }
}

/// Durations as whole seconds on the wire, as users and clouds write them.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}
