//! The GCE resources a Service needs, and what to change to get there. Pure: no Compute call.
//!
//! Resources are described with small structs holding only the fields hawser manages, with URLs
//! in relative form (`projects/…`), so "observed" (converted from what GCE answers) and
//! "desired" compare with `==` and a reconcile that finds nothing to change makes no write.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::annotations::{GcpOptions, NetworkTier};
use super::config::GcpConfig;
use super::naming::{ClusterNames, GroupNames, Ownership, ServiceNames, owned_by_group, owned_by_service};
use crate::{
    HealthCheckProtocol, InvalidField, IpFamily, LoadBalancerSpec, Protocol, Scheme, ServiceIdentity, SessionAffinity,
    Target,
};

/// Google's IPv4 health-check source ranges for passthrough load balancers (external and internal).
pub const HEALTH_CHECK_RANGES: &[&str] = &["35.191.0.0/16", "130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22"];

/// Google's IPv6 health-check source ranges: `2600:1901:8001::/48` probes external passthrough
/// load balancers, `2600:2d00:1:b029::/64` internal ones. A firewall holds one family only, so
/// these live in a rule of their own.
pub const HEALTH_CHECK_RANGES_V6: &[&str] = &["2600:1901:8001::/48", "2600:2d00:1:b029::/64"];

/// The health-check source ranges of one family.
pub fn health_check_ranges(family: IpFamily) -> &'static [&'static str] {
    match family {
        IpFamily::IPv4 => HEALTH_CHECK_RANGES,
        IpFamily::IPv6 => HEALTH_CHECK_RANGES_V6,
    }
}

/// Every client of one family, the source range when a Service restricts none.
fn any_source(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => "0.0.0.0/0",
        IpFamily::IPv6 => "::/0",
    }
}

/// One address as a firewall destination range.
fn host_range(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// A forwarding rule lists at most this many ports; more need a port range.
pub const MAX_FORWARDING_RULE_PORTS: usize = 5;

/// Forwarding rules that may share one address (GCE's limit for internal addresses shared with
/// `SHARED_LOADBALANCER_VIP`; hawser keeps external groups to it too).
pub const MAX_RULES_PER_ADDRESS: usize = 10;

/// The protocols a Service has a forwarding rule and backend service for.
pub const PROTOCOL_NAMES: &[&str] = &["TCP", "UDP"];

/// A reserved regional address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSpec {
    /// Resource name.
    pub name: String,
    /// Ownership record.
    pub description: String,
    /// `EXTERNAL` or `INTERNAL`.
    pub address_type: &'static str,
    /// Network tier (external only).
    pub network_tier: Option<&'static str>,
    /// Subnetwork (internal only).
    pub subnetwork: Option<String>,
    /// `SHARED_LOADBALANCER_VIP` for internal addresses that several forwarding rules share.
    pub purpose: Option<&'static str>,
    /// `IPV6` for an IPv6 address; unset (IPv4) otherwise.
    pub ip_version: Option<&'static str>,
    /// `NETLB` for an external IPv6 address (a passthrough load balancer's, not a VM's).
    pub ipv6_endpoint_type: Option<&'static str>,
    /// Ownership labels.
    pub labels: BTreeMap<String, String>,
}

/// The front of the load balancer for one IP family: its address and forwarding rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// The family.
    pub family: IpFamily,
    /// The address to reserve; `None` when the user asked for one of theirs.
    pub address: Option<AddressSpec>,
    /// The user's address, which must be a static address of the project.
    pub requested_ip: Option<IpAddr>,
}

/// A regional health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// Resource name.
    pub name: String,
    /// Ownership record.
    pub description: String,
    /// HTTP or TCP.
    pub protocol: HealthCheckProtocol,
    /// Port on the node.
    pub port: i32,
    /// HTTP request path.
    pub path: Option<String>,
    /// Seconds between probes.
    pub interval_sec: i32,
    /// Seconds one probe may take.
    pub timeout_sec: i32,
    /// Successes to become healthy.
    pub healthy_threshold: i32,
    /// Failures to become unhealthy.
    pub unhealthy_threshold: i32,
}

/// A regional backend service of one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendServiceSpec {
    /// Resource name.
    pub name: String,
    /// Ownership record.
    pub description: String,
    /// `EXTERNAL` or `INTERNAL`.
    pub scheme: &'static str,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// `NONE` or `CLIENT_IP`.
    pub session_affinity: &'static str,
    /// Connection draining seconds.
    pub draining_sec: i32,
    /// Relative URL of the health check.
    pub health_check: String,
    /// Relative URLs of the instance groups.
    pub groups: BTreeSet<String>,
    /// Relative URL of the network (internal only).
    pub network: Option<String>,
}

/// A regional forwarding rule of one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardingRuleSpec {
    /// Resource name.
    pub name: String,
    /// Ownership record.
    pub description: String,
    /// The load balancer's IP, without the `/96` GCE puts after IPv6 addresses.
    pub ip: IpAddr,
    /// `IPV6` for an IPv6 rule; unset (IPv4) otherwise.
    pub ip_version: Option<&'static str>,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// Up to five ports, or empty with a range.
    pub ports: Vec<String>,
    /// `first-last` when more than five ports.
    pub port_range: Option<String>,
    /// `EXTERNAL` or `INTERNAL`.
    pub scheme: &'static str,
    /// Network tier (external only).
    pub network_tier: Option<&'static str>,
    /// Relative URL of the backend service.
    pub backend_service: String,
    /// Network (internal only).
    pub network: Option<String>,
    /// Subnetwork (internal, and external IPv6).
    pub subnetwork: Option<String>,
    /// Global access (internal only).
    pub global_access: bool,
    /// Ownership labels.
    pub labels: BTreeMap<String, String>,
}

/// A firewall rule allowing ingress to the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    /// Resource name.
    pub name: String,
    /// Ownership record.
    pub description: String,
    /// Relative URL of the network.
    pub network: String,
    /// Client ranges.
    pub source_ranges: BTreeSet<String>,
    /// Destination ranges (the load balancer's IP); empty means any.
    pub destination_ranges: BTreeSet<String>,
    /// Allowed ports by lowercase protocol.
    pub allowed: BTreeMap<String, BTreeSet<String>>,
    /// Node network tags.
    pub target_tags: BTreeSet<String>,
    /// Node service accounts.
    pub target_service_accounts: BTreeSet<String>,
}

/// What to do with an existing forwarding rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardingRuleAction {
    /// It matches.
    Keep,
    /// Only global access differs, which GCE patches in place.
    PatchGlobalAccess,
    /// Something immutable differs: delete and create again (the address is kept).
    Recreate,
}

/// Everything one Service needs, except what depends on the address GCE hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per-Service names.
    pub names: ServiceNames,
    /// The load-balancer group (`namespace/name`) whose address the Service shares, and that
    /// group's names; `None` for a load balancer of its own.
    pub group: Option<(String, GroupNames)>,
    /// Cluster-wide names.
    pub cluster_names: ClusterNames,
    /// One frontend per IP family of the Service, IPv4 first.
    pub frontends: Vec<Frontend>,
    /// The health check.
    pub health_check: HealthCheckSpec,
    /// One backend service per protocol.
    pub backend_services: Vec<BackendServiceSpec>,
    /// Instance URLs per zone: the members of the cluster's instance group there.
    pub instance_groups: BTreeMap<String, BTreeSet<String>>,
    /// The port of the shared health-check firewall this Service needs.
    pub health_port: u16,
    spec_scheme: Scheme,
    options: GcpOptions,
    ports: BTreeMap<&'static str, BTreeSet<u16>>,
    /// The Service's source ranges; empty means every client.
    source_ranges: Vec<ipnet::IpNet>,
    network: String,
    subnetwork: Option<String>,
    target_tags: BTreeSet<String>,
    target_service_accounts: BTreeSet<String>,
    pub(super) identity: ServiceIdentity,
}

/// Where a node's VM is: `(zone, relative instance URL)` from `gce://project/zone/name`.
pub fn instance_of(target: &Target) -> Option<(String, String)> {
    let rest = target.provider_id.as_deref()?.strip_prefix("gce://")?;
    let mut parts = rest.split('/');
    let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
    if project.is_empty() || zone.is_empty() || name.is_empty() || parts.next().is_some() {
        return None;
    }
    Some((zone.to_owned(), format!("projects/{project}/zones/{zone}/instances/{name}")))
}

fn secs(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The families of a spec, IPv4 first; none given means IPv4, as Kubernetes defaults it.
pub fn families(spec: &LoadBalancerSpec) -> Vec<IpFamily> {
    let families: BTreeSet<IpFamily> = spec.ip_families.iter().copied().collect();
    if families.is_empty() { vec![IpFamily::IPv4] } else { families.into_iter().collect() }
}

impl Plan {
    /// The plan for `spec` with its parsed GCP options; fails only when the load balancer
    /// needs a subnetwork and neither the Service nor the operator names one.
    pub fn new(config: &GcpConfig, spec: &LoadBalancerSpec, options: &GcpOptions) -> Result<Self, InvalidField> {
        let id = &spec.identity;
        let names = ServiceNames::new(id);
        let cluster_names = ClusterNames::new(&config.cluster);
        let group = spec.group.as_ref().map(|g| {
            let key = format!("{}/{g}", id.namespace);
            let names = GroupNames::new(&config.cluster, &key);
            (key, names)
        });
        let group_key = group.as_ref().map(|(k, _)| k.as_str());
        let internal = spec.scheme == Scheme::Internal;
        let scheme = if internal { "INTERNAL" } else { "EXTERNAL" };
        let families = families(spec);
        let ipv6 = families.contains(&IpFamily::IPv6);
        // Internal load balancers take their addresses from a subnetwork; so do external IPv6
        // ones (from the subnetwork's external IPv6 range).
        let subnetwork = if internal || ipv6 {
            let Some(s) = options.subnet.clone().or_else(|| config.subnetwork.clone()) else {
                return Err(InvalidField::new(
                    super::annotations::SUBNET,
                    format!(
                        "{} load balancer needs a subnetwork{}: annotate the Service with hawser.dev/gcp-subnet or \
                         start the operator with --gcp-subnetwork",
                        if internal { "an internal" } else { "an external IPv6" },
                        if ipv6 { " with an IPv6 range" } else { "" }
                    ),
                ));
            };
            Some(config.subnetwork_url(&s))
        } else {
            None
        };
        let protocols = spec.listeners.iter().map(|l| l.protocol).collect::<BTreeSet<_>>();
        let both_protocols = protocols.contains(&Protocol::TcpUdp)
            || (protocols.contains(&Protocol::Tcp) && protocols.contains(&Protocol::Udp));
        let frontends = families
            .iter()
            .map(|&family| {
                let requested_ip = spec.requested_addresses.iter().copied().find(|a| IpFamily::of(a) == family);
                let address = requested_ip.is_none().then(|| {
                    let (owner, name) = match &group {
                        Some((key, g)) => (Ownership::group(&config.cluster, key, "address"), g.address_of(family)),
                        None => (Ownership::service(id, "address"), names.address_of(family)),
                    };
                    let v6 = family == IpFamily::IPv6;
                    AddressSpec {
                        name,
                        description: owner.to_description(),
                        address_type: scheme,
                        // IPv6 external load balancers are Premium only (checked with the annotations).
                        network_tier: (!internal).then(|| options.network_tier.as_str()),
                        subnetwork: (internal || v6).then(|| subnetwork.clone()).flatten(),
                        // An internal address is shared by the TCP and UDP rules only when it
                        // must be: GCE reserves IPv4 ones that way always, as hawser did from
                        // the start; IPv6 ones only for a Service with both protocols.
                        // A group's address is shared by every member's rules.
                        purpose: (internal && (!v6 || both_protocols || group.is_some()))
                            .then_some("SHARED_LOADBALANCER_VIP"),
                        ip_version: v6.then_some("IPV6"),
                        ipv6_endpoint_type: (v6 && !internal).then_some("NETLB"),
                        labels: owner.labels(),
                    }
                });
                Frontend { family, address, requested_ip }
            })
            .collect();
        let hc = &spec.health_check;
        let health_check = HealthCheckSpec {
            name: names.health_check(),
            description: Ownership::part(id, group_key, "health-check").to_description(),
            protocol: hc.protocol,
            port: i32::from(hc.port),
            path: match hc.protocol {
                HealthCheckProtocol::Http => Some(hc.path.clone().unwrap_or_else(|| "/".to_owned())),
                HealthCheckProtocol::Tcp => None,
            },
            interval_sec: secs(hc.interval),
            // GCE refuses a timeout longer than the interval.
            timeout_sec: secs(hc.timeout).min(secs(hc.interval)),
            healthy_threshold: i32::try_from(hc.healthy_threshold.max(1)).unwrap_or(i32::MAX),
            unhealthy_threshold: i32::try_from(hc.unhealthy_threshold.max(1)).unwrap_or(i32::MAX),
        };
        let mut instance_groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for target in &spec.targets {
            if let Some((zone, url)) = instance_of(target) {
                instance_groups.entry(zone).or_default().insert(url);
            }
        }
        let mut ports: BTreeMap<&'static str, BTreeSet<u16>> = BTreeMap::new();
        for l in &spec.listeners {
            if matches!(l.protocol, Protocol::Tcp | Protocol::TcpUdp) {
                ports.entry("TCP").or_default().insert(l.port);
            }
            if matches!(l.protocol, Protocol::Udp | Protocol::TcpUdp) {
                ports.entry("UDP").or_default().insert(l.port);
            }
        }
        let mut plan = Self {
            names,
            group: group.clone(),
            cluster_names,
            frontends,
            health_check,
            backend_services: Vec::new(),
            instance_groups,
            health_port: hc.port,
            spec_scheme: spec.scheme,
            options: options.clone(),
            ports,
            source_ranges: spec.source_ranges.clone(),
            network: config.network_url(),
            subnetwork,
            target_tags: config.node_tags.iter().cloned().collect(),
            target_service_accounts: if config.node_tags.is_empty() {
                config.node_service_account.iter().cloned().collect()
            } else {
                BTreeSet::new()
            },
            identity: id.clone(),
        };
        let groups = plan.instance_groups.keys().map(|z| plan.instance_group_url(config, z)).collect::<BTreeSet<_>>();
        let hc_url =
            format!("projects/{}/regions/{}/healthChecks/{}", config.project, config.region, plan.health_check.name);
        plan.backend_services = plan
            .ports
            .keys()
            .map(|proto| BackendServiceSpec {
                name: plan.names.per_protocol(proto),
                description: Ownership::part(id, group_key, "backend-service").to_description(),
                scheme,
                protocol: proto,
                session_affinity: match spec.session_affinity {
                    SessionAffinity::None => "NONE",
                    SessionAffinity::ClientIp { .. } => "CLIENT_IP",
                },
                draining_sec: options.draining_secs,
                health_check: hc_url.clone(),
                groups: groups.clone(),
                network: internal.then(|| plan.network.clone()),
            })
            .collect();
        Ok(plan)
    }

    /// The group's key, for a member.
    pub fn group_key(&self) -> Option<&str> {
        self.group.as_ref().map(|(k, _)| k.as_str())
    }

    /// The address of `family` hawser reserves for this plan: the group's, for a member.
    pub fn address_name(&self, family: IpFamily) -> String {
        match &self.group {
            Some((_, g)) => g.address_of(family),
            None => self.names.address_of(family),
        }
    }

    /// Whether `description` makes an address the one [`Self::address_name`] means.
    pub fn owns_address(&self, description: Option<&str>) -> bool {
        match &self.group {
            Some((key, _)) => owned_by_group(description, &self.identity.cluster, key),
            None => owned_by_service(description, &self.identity),
        }
    }

    /// The forwarding rule of `protocol` and `family`: on the group's address for a member.
    pub fn forwarding_rule_name(&self, protocol: &str, family: IpFamily) -> String {
        match self.group {
            Some(_) => self.names.member_forwarding_rule(protocol, family),
            None => self.names.forwarding_rule(protocol, family),
        }
    }

    /// The traffic firewall of `family`: at the group's address for a member.
    pub fn firewall_name(&self, family: IpFamily) -> String {
        match self.group {
            Some(_) => self.names.member_firewall_of(family),
            None => self.names.firewall_of(family),
        }
    }

    /// The forwarding rules and firewall of `family` the Service has in the other place (its
    /// own address when it is a member, its group's when it is not), which go once this plan
    /// serves it.
    pub fn elsewhere(&self, family: IpFamily) -> (Vec<String>, String) {
        match self.group {
            Some(_) => (
                PROTOCOL_NAMES.iter().map(|p| self.names.forwarding_rule(p, family)).collect(),
                self.names.firewall_of(family),
            ),
            None => (
                PROTOCOL_NAMES.iter().map(|p| self.names.member_forwarding_rule(p, family)).collect(),
                self.names.member_firewall_of(family),
            ),
        }
    }

    /// The families the load balancer serves, IPv4 first.
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.frontends.iter().map(|f| f.family)
    }

    /// The protocols the load balancer forwards (`TCP`, `UDP`).
    pub fn protocols(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ports.keys().copied()
    }

    /// Whether the load balancer serves IPv6.
    pub fn ipv6(&self) -> bool {
        self.families().any(|f| f == IpFamily::IPv6)
    }

    /// Relative URL of the cluster's instance group in `zone`.
    pub fn instance_group_url(&self, config: &GcpConfig, zone: &str) -> String {
        format!("projects/{}/zones/{zone}/instanceGroups/{}", config.project, self.cluster_names.instance_group())
    }

    /// Whether the load balancer is internal.
    pub fn internal(&self) -> bool {
        self.spec_scheme == Scheme::Internal
    }

    /// The network tier of the address and forwarding rules (external only).
    pub fn network_tier(&self) -> Option<NetworkTier> {
        (!self.internal()).then_some(self.options.network_tier)
    }

    /// The relative URL of the subnetwork (internal, or IPv6).
    pub fn subnetwork(&self) -> Option<&str> {
        self.subnetwork.as_deref()
    }

    /// The forwarding rules, one per protocol, on `ip` (whose family they serve).
    pub fn forwarding_rules(&self, config: &GcpConfig, ip: IpAddr) -> Vec<ForwardingRuleSpec> {
        let owner = Ownership::part(&self.identity, self.group_key(), "forwarding-rule");
        let family = IpFamily::of(&ip);
        let v6 = family == IpFamily::IPv6;
        self.ports
            .iter()
            .map(|(proto, ports)| {
                let (list, range) = port_spec(ports);
                ForwardingRuleSpec {
                    name: self.forwarding_rule_name(proto, family),
                    description: owner.to_description(),
                    ip,
                    ip_version: v6.then_some("IPV6"),
                    protocol: proto,
                    ports: list,
                    port_range: range,
                    scheme: if self.internal() { "INTERNAL" } else { "EXTERNAL" },
                    network_tier: self.network_tier().map(NetworkTier::as_str),
                    backend_service: format!(
                        "projects/{}/regions/{}/backendServices/{}",
                        config.project,
                        config.region,
                        self.names.per_protocol(proto)
                    ),
                    network: self.internal().then(|| self.network.clone()),
                    subnetwork: (self.internal() || v6).then(|| self.subnetwork.clone()).flatten(),
                    global_access: self.internal() && self.options.global_access,
                    labels: owner.labels(),
                }
            })
            .collect()
    }

    /// The firewall letting clients of `ip`'s family reach the nodes on the Service ports at
    /// `ip`; `None` when the Service's source ranges admit no client of that family.
    pub fn firewall(&self, ip: IpAddr) -> Option<FirewallSpec> {
        let family = IpFamily::of(&ip);
        let source_ranges: BTreeSet<String> = if self.source_ranges.is_empty() {
            BTreeSet::from([any_source(family).to_owned()])
        } else {
            self.source_ranges.iter().filter(|r| IpFamily::of(&r.addr()) == family).map(ToString::to_string).collect()
        };
        if source_ranges.is_empty() {
            return None;
        }
        Some(FirewallSpec {
            name: self.firewall_name(family),
            description: Ownership::part(&self.identity, self.group_key(), "firewall").to_description(),
            network: self.network.clone(),
            source_ranges,
            destination_ranges: BTreeSet::from([host_range(ip)]),
            allowed: self
                .ports
                .iter()
                .map(|(proto, ports)| (proto.to_ascii_lowercase(), ports.iter().map(u16::to_string).collect()))
                .collect(),
            target_tags: self.target_tags.clone(),
            target_service_accounts: self.target_service_accounts.clone(),
        })
    }

    /// The cluster's health-check firewall of `family` as this Service needs it: `existing` (if
    /// any) with this Service's health port added. Ports are never removed here, because other
    /// Services may rely on them; the rule goes away with the cluster's last load balancer.
    pub fn health_check_firewall(
        &self,
        family: IpFamily,
        cluster: &str,
        existing: Option<&FirewallSpec>,
    ) -> FirewallSpec {
        let mut ports: BTreeSet<String> = existing.and_then(|f| f.allowed.get("tcp")).cloned().unwrap_or_default();
        ports.insert(self.health_port.to_string());
        FirewallSpec {
            name: self.cluster_names.health_check_firewall_of(family),
            description: Ownership::cluster(cluster, "health-check-firewall").to_description(),
            network: self.network.clone(),
            source_ranges: health_check_ranges(family).iter().map(|s| (*s).to_owned()).collect(),
            destination_ranges: BTreeSet::new(),
            allowed: BTreeMap::from([("tcp".to_owned(), ports)]),
            target_tags: self.target_tags.clone(),
            target_service_accounts: self.target_service_accounts.clone(),
        }
    }
}

/// `ports` as a forwarding rule takes them: a list of up to five, else one covering range.
pub fn port_spec(ports: &BTreeSet<u16>) -> (Vec<String>, Option<String>) {
    if ports.len() <= MAX_FORWARDING_RULE_PORTS {
        (ports.iter().map(u16::to_string).collect(), None)
    } else {
        let first = ports.first().copied().unwrap_or_default();
        let last = ports.last().copied().unwrap_or_default();
        (Vec::new(), Some(format!("{first}-{last}")))
    }
}

/// What to do with the forwarding rule `observed` so that it becomes `desired`.
pub fn forwarding_rule_action(observed: &ForwardingRuleSpec, desired: &ForwardingRuleSpec) -> ForwardingRuleAction {
    fn immutable(f: &ForwardingRuleSpec) -> impl PartialEq + '_ {
        (
            f.ip,
            f.ip_version,
            f.protocol,
            &f.ports,
            &f.port_range,
            f.scheme,
            f.network_tier,
            &f.backend_service,
            &f.subnetwork,
        )
    }
    if immutable(observed) != immutable(desired) {
        ForwardingRuleAction::Recreate
    } else if observed.global_access != desired.global_access {
        ForwardingRuleAction::PatchGlobalAccess
    } else {
        ForwardingRuleAction::Keep
    }
}

/// Instances to add to and remove from a group holding `observed` so that it holds `desired`.
pub fn membership_changes(observed: &BTreeSet<String>, desired: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (desired.difference(observed).cloned().collect(), observed.difference(desired).cloned().collect())
}

#[cfg(test)]
mod tests;
