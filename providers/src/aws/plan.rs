//! Pure planning: the AWS resources a spec needs, and what to change to get from what exists
//! to them. No I/O here, so every decision is table-tested without AWS.

use std::collections::{BTreeMap, BTreeSet};

use super::annotations::{self as ann, AwsOptions};
use super::naming;
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_GROUP, OWNERSHIP_TAG_RESOURCE};
use crate::{IpFamily, LoadBalancerSpec, Protocol, ProviderError, Scheme, SessionAffinity, ownership_tags};

/// What discovery found in the account for one Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Environment {
    /// The VPC.
    pub vpc_id: String,
    /// Subnet IDs, one per availability zone (or the user's choice, in the user's order).
    pub subnets: Vec<String>,
    /// The nodes' security groups that receive the load balancer's ingress rules.
    pub node_security_groups: BTreeSet<String>,
}

/// One subnet of the load balancer, with its fixed address if the user gave one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubnetMapping {
    /// The subnet.
    pub subnet_id: String,
    /// An Elastic IP allocation (internet-facing).
    pub allocation_id: Option<String>,
    /// A private IPv4 address (internal).
    pub private_ipv4: Option<String>,
}

/// A target group's health check, normalised so that desired and observed compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// `HTTP` or `TCP`.
    pub protocol: String,
    /// The port on the node, as a string as AWS keeps it.
    pub port: String,
    /// The HTTP path.
    pub path: Option<String>,
    /// Seconds between checks.
    pub interval: i32,
    /// Seconds a check may take.
    pub timeout: i32,
    /// Successes before healthy.
    pub healthy: i32,
    /// Failures before unhealthy.
    pub unhealthy: i32,
}

/// A target group the load balancer needs: one per listener port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredTargetGroup {
    /// Its deterministic name.
    pub name: String,
    /// The listener port it serves.
    pub listener_port: u16,
    /// `TCP`, `UDP` or `TCP_UDP`.
    pub protocol: Protocol,
    /// The node port targets are registered on.
    pub port: u16,
    /// The health check.
    pub health: HealthSettings,
    /// Attributes hawser manages.
    pub attributes: BTreeMap<String, String>,
    /// User and ownership tags.
    pub tags: BTreeMap<String, String>,
}

/// A listener the load balancer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredListener {
    /// The port.
    pub port: u16,
    /// `TCP`, `UDP`, `TCP_UDP` or `TLS`.
    pub protocol: String,
    /// The target group it forwards to, by name.
    pub target_group: String,
    /// The certificate, for TLS.
    pub certificate: Option<String>,
    /// The security policy, for TLS.
    pub ssl_policy: Option<String>,
    /// User and ownership tags.
    pub tags: BTreeMap<String, String>,
}

/// Where a security-group rule lets traffic in from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// An IPv4 or IPv6 range.
    Cidr(String),
    /// Another security group.
    Group(String),
}

/// One ingress rule, in the shape EC2 reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// First port.
    pub from: i32,
    /// Last port.
    pub to: i32,
    /// Who may connect.
    pub source: Source,
}

/// The frontend security group hawser manages for the load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredSecurityGroup {
    /// Its name (unique per VPC).
    pub name: String,
    /// Its description (immutable in EC2, so it names the Service only).
    pub description: String,
    /// Client ranges to listener ports.
    pub ingress: BTreeSet<Rule>,
    /// User and ownership tags.
    pub tags: BTreeMap<String, String>,
}

/// Everything one Service needs in AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The load-balancer group (`namespace/name`) whose load balancer the Service shares; then
    /// the load balancer and its frontend group are the group's, the rest the Service's part.
    pub group: Option<String>,
    /// The load balancer's name.
    pub name: String,
    /// Internet-facing or internal.
    pub scheme: Scheme,
    /// `ipv4` or `dualstack`.
    pub ip_address_type: String,
    /// Subnets, with fixed addresses.
    pub subnets: Vec<SubnetMapping>,
    /// The user's security groups; `None` means the managed frontend group.
    pub own_security_groups: Option<Vec<String>>,
    /// Load balancer attributes hawser manages.
    pub attributes: BTreeMap<String, String>,
    /// User and ownership tags of the load balancer.
    pub tags: BTreeMap<String, String>,
    /// Target groups, in listener order.
    pub target_groups: Vec<DesiredTargetGroup>,
    /// Listeners, by port.
    pub listeners: Vec<DesiredListener>,
    /// Instance IDs every target group holds.
    pub targets: BTreeSet<String>,
    /// The managed frontend security group, unless the user brings their own.
    pub frontend: Option<DesiredSecurityGroup>,
    /// `(protocol, port)` the node security groups open to the frontend group: node ports and
    /// the health port.
    pub node_ports: BTreeSet<(String, i32)>,
}

fn protocols(p: Protocol) -> &'static [&'static str] {
    match p {
        Protocol::Tcp => &["tcp"],
        Protocol::Udp => &["udp"],
        Protocol::TcpUdp => &["tcp", "udp"],
    }
}

fn secs(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// The load-balancer group of `spec` as `namespace/name`.
pub fn group_key(spec: &LoadBalancerSpec) -> Option<String> {
    spec.group.as_ref().map(|g| format!("{}/{g}", spec.identity.namespace))
}

/// Tags of a resource of the Service's own (a group member's part carries its group too).
fn tags(spec: &LoadBalancerSpec, resource: &str) -> BTreeMap<String, String> {
    let mut t = spec.tags.clone();
    t.extend(ownership_tags(&spec.identity, resource));
    if let Some(group) = group_key(spec) {
        t.insert(OWNERSHIP_TAG_GROUP.to_owned(), group);
    }
    t
}

/// Tags of a resource the group's members share: hawser's only. A member's own tags
/// (`hawser.dev/tags`) go on its part, as members need not agree on them.
pub fn group_tags(cluster: &str, group: &str, resource: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (OWNERSHIP_TAG_CLUSTER.to_owned(), cluster.to_owned()),
        (OWNERSHIP_TAG_GROUP.to_owned(), group.to_owned()),
        (OWNERSHIP_TAG_RESOURCE.to_owned(), resource.to_owned()),
    ])
}

/// The instance IDs of the spec's targets; nodes without an AWS provider ID are skipped
/// (Fargate nodes, nodes still starting) and named in the second list.
pub fn instance_ids(spec: &LoadBalancerSpec) -> (BTreeSet<String>, Vec<String>) {
    let mut ids = BTreeSet::new();
    let mut skipped = Vec::new();
    for t in &spec.targets {
        match t.provider_id.as_deref().and_then(naming::instance_id) {
            Some(id) => {
                ids.insert(id.to_owned());
            }
            None => skipped.push(t.name.clone()),
        }
    }
    (ids, skipped)
}

/// The AWS resources `spec` needs in `env`.
pub fn desired(spec: &LoadBalancerSpec, opts: &AwsOptions, env: &Environment) -> Result<Desired, ProviderError> {
    let id = &spec.identity;
    for (key, n) in [
        (ann::EIP_ALLOCATIONS, opts.eip_allocations.len()),
        (ann::PRIVATE_IPV4_ADDRESSES, opts.private_ipv4_addresses.len()),
    ] {
        if n > 0 && n != env.subnets.len() {
            return Err(ProviderError::invalid(
                key,
                format!(
                    "gives {n} values but the load balancer has {} subnets ({}); give one per subnet or choose subnets with {}",
                    env.subnets.len(),
                    env.subnets.join(", "),
                    ann::SUBNETS
                ),
            ));
        }
    }
    let subnets = env
        .subnets
        .iter()
        .enumerate()
        .map(|(i, s)| SubnetMapping {
            subnet_id: s.clone(),
            allocation_id: opts.eip_allocations.get(i).cloned(),
            private_ipv4: opts.private_ipv4_addresses.get(i).map(ToString::to_string),
        })
        .collect();
    let dualstack = spec.ip_families.contains(&IpFamily::IPv6);
    let hc = &spec.health_check;
    let health = HealthSettings {
        protocol: match hc.protocol {
            crate::HealthCheckProtocol::Http => "HTTP".to_owned(),
            crate::HealthCheckProtocol::Tcp => "TCP".to_owned(),
        },
        port: hc.port.to_string(),
        path: match hc.protocol {
            crate::HealthCheckProtocol::Http => Some(hc.path.clone().unwrap_or_else(|| "/".to_owned())),
            crate::HealthCheckProtocol::Tcp => None,
        },
        interval: secs(hc.interval),
        timeout: secs(hc.timeout),
        healthy: i32::try_from(hc.healthy_threshold).unwrap_or(i32::MAX),
        unhealthy: i32::try_from(hc.unhealthy_threshold).unwrap_or(i32::MAX),
    };
    let mut tg_attributes = BTreeMap::from([
        ("proxy_protocol_v2.enabled".to_owned(), opts.proxy_protocol.to_string()),
        ("preserve_client_ip.enabled".to_owned(), opts.preserve_client_ip.to_string()),
    ]);
    match spec.session_affinity {
        SessionAffinity::None => {
            tg_attributes.insert("stickiness.enabled".into(), "false".into());
        }
        SessionAffinity::ClientIp { .. } => {
            // NLB stickiness has no timeout: it lasts as long as the flow table keeps the client.
            tg_attributes.insert("stickiness.enabled".into(), "true".into());
            tg_attributes.insert("stickiness.type".into(), "source_ip".into());
        }
    }
    let mut target_groups = Vec::new();
    let mut listeners = Vec::new();
    let mut node_ports = BTreeSet::from([("tcp".to_owned(), i32::from(hc.port))]);
    let mut frontend_rules = BTreeSet::new();
    let open_to: Vec<String> = if spec.source_ranges.is_empty() {
        let mut all = vec!["0.0.0.0/0".to_owned()];
        if dualstack {
            all.push("::/0".to_owned());
        }
        all
    } else {
        spec.source_ranges.iter().map(ToString::to_string).collect()
    };
    for l in &spec.listeners {
        let Some(node_port) = l.node_port else {
            return Err(ProviderError::invalid(
                "spec.ports",
                format!("port {} has no node port; AWS NLB instance targets need one", l.port),
            ));
        };
        let name = if spec.group.is_some() {
            naming::member_target_group_name(id, l.port, l.protocol, node_port)
        } else {
            naming::target_group_name(id, l.port, l.protocol, node_port)
        };
        let tls = opts.tls_ports.contains(&l.port);
        target_groups.push(DesiredTargetGroup {
            name: name.clone(),
            listener_port: l.port,
            protocol: l.protocol,
            port: node_port,
            health: health.clone(),
            attributes: tg_attributes.clone(),
            tags: tags(spec, "target-group"),
        });
        listeners.push(DesiredListener {
            port: l.port,
            protocol: if tls { "TLS".to_owned() } else { l.protocol.as_str().to_owned() },
            target_group: name,
            certificate: if tls { opts.certificate.clone() } else { None },
            ssl_policy: if tls { Some(opts.ssl_policy.clone()) } else { None },
            tags: tags(spec, "listener"),
        });
        for p in protocols(l.protocol) {
            node_ports.insert(((*p).to_owned(), i32::from(node_port)));
            for cidr in &open_to {
                frontend_rules.insert(Rule {
                    protocol: (*p).to_owned(),
                    from: i32::from(l.port),
                    to: i32::from(l.port),
                    source: Source::Cidr(cidr.clone()),
                });
            }
        }
    }
    let own = (!opts.security_groups.is_empty()).then(|| opts.security_groups.clone());
    let group = group_key(spec);
    let frontend = own.is_none().then(|| match &group {
        Some(g) => DesiredSecurityGroup {
            name: naming::group_security_group_name(&id.cluster, g),
            description: format!("hawser load balancer of group {g} in cluster {}", id.cluster),
            ingress: frontend_rules,
            tags: group_tags(&id.cluster, g, "security-group"),
        },
        None => DesiredSecurityGroup {
            name: naming::security_group_name(id),
            description: format!("hawser load balancer of {} in cluster {}", id.service_key(), id.cluster),
            ingress: frontend_rules,
            tags: tags(spec, "security-group"),
        },
    });
    let attributes = BTreeMap::from([
        ("load_balancing.cross_zone.enabled".to_owned(), opts.cross_zone.to_string()),
        ("deletion_protection.enabled".to_owned(), opts.deletion_protection.to_string()),
    ]);
    let (targets, _) = instance_ids(spec);
    let (name, lb_tags) = match &group {
        Some(g) => (naming::group_load_balancer_name(&id.cluster, g), group_tags(&id.cluster, g, "load-balancer")),
        None => (naming::load_balancer_name(id), tags(spec, "load-balancer")),
    };
    Ok(Desired {
        group,
        name,
        scheme: spec.scheme,
        ip_address_type: if dualstack { "dualstack" } else { "ipv4" }.to_owned(),
        subnets,
        own_security_groups: own,
        attributes,
        tags: lb_tags,
        target_groups,
        listeners,
        targets,
        frontend,
        node_ports: if opts.security_groups.is_empty() { node_ports } else { BTreeSet::new() },
    })
}

/// A load balancer as found in AWS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedLoadBalancer {
    /// Its ARN.
    pub arn: String,
    /// Its DNS name.
    pub dns_name: String,
    /// Its scheme.
    pub scheme: Option<Scheme>,
    /// Its VPC.
    pub vpc_id: String,
    /// `ipv4` or `dualstack`.
    pub ip_address_type: String,
    /// Its subnets.
    pub subnets: BTreeSet<String>,
    /// Its security groups; empty when it was created without (they cannot be added later).
    pub security_groups: BTreeSet<String>,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// A target group as found in AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedTargetGroup {
    /// Its ARN.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// Its health check.
    pub health: HealthSettings,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Instances registered and not draining.
    pub targets: BTreeSet<String>,
}

/// A listener as found in AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedListener {
    /// Its ARN.
    pub arn: String,
    /// Its port.
    pub port: u16,
    /// Its protocol.
    pub protocol: String,
    /// The target group its default action forwards to.
    pub target_group_arn: Option<String>,
    /// Its default certificate.
    pub certificate: Option<String>,
    /// Its security policy.
    pub ssl_policy: Option<String>,
}

/// Tags to add (or overwrite) and keys to remove.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TagDiff {
    /// Keys missing or with another value.
    pub add: BTreeMap<String, String>,
    /// Keys no longer wanted.
    pub remove: Vec<String>,
}

impl TagDiff {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// The tag changes from `observed` to `desired`. Keys AWS reserves (`aws:`) are never removed.
pub fn diff_tags(desired: &BTreeMap<String, String>, observed: &BTreeMap<String, String>) -> TagDiff {
    TagDiff {
        add: desired
            .iter()
            .filter(|(k, v)| observed.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        remove: observed.keys().filter(|k| !desired.contains_key(*k) && !k.starts_with("aws:")).cloned().collect(),
    }
}

/// Attributes whose value differs (missing ones included).
pub fn diff_attributes(
    desired: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired.iter().filter(|(k, v)| observed.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// What happens to the load balancer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBalancerAction {
    /// It does not exist yet.
    Create,
    /// It must be rebuilt: AWS cannot change this in place.
    Replace(String),
    /// Changed in place (possibly nothing).
    Update(LoadBalancerUpdate),
}

/// In-place changes of a load balancer; `None`/empty fields mean unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadBalancerUpdate {
    /// New subnets.
    pub subnets: Option<Vec<SubnetMapping>>,
    /// New security groups (IDs; the frontend group is resolved by the caller).
    pub security_groups: Option<BTreeSet<String>>,
    /// New IP address type.
    pub ip_address_type: Option<String>,
    /// Changed attributes.
    pub attributes: BTreeMap<String, String>,
    /// Tag changes.
    pub tags: TagDiff,
}

impl LoadBalancerUpdate {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.subnets.is_none()
            && self.security_groups.is_none()
            && self.ip_address_type.is_none()
            && self.attributes.is_empty()
            && self.tags.is_empty()
    }
}

/// Plans the load balancer; `security_groups` are the IDs it should carry (managed or own).
pub fn diff_load_balancer(
    desired: &Desired,
    security_groups: &BTreeSet<String>,
    observed: Option<&ObservedLoadBalancer>,
) -> LoadBalancerAction {
    let Some(o) = observed else { return LoadBalancerAction::Create };
    if o.scheme != Some(desired.scheme) {
        return LoadBalancerAction::Replace(format!(
            "the scheme changes to {} and AWS cannot change a load balancer's scheme",
            desired.scheme.as_str()
        ));
    }
    if o.security_groups.is_empty() && !security_groups.is_empty() {
        return LoadBalancerAction::Replace(
            "it was created without security groups and AWS cannot add them later".to_owned(),
        );
    }
    let wanted_subnets: BTreeSet<String> = desired.subnets.iter().map(|s| s.subnet_id.clone()).collect();
    LoadBalancerAction::Update(LoadBalancerUpdate {
        subnets: (wanted_subnets != o.subnets).then(|| desired.subnets.clone()),
        security_groups: (*security_groups != o.security_groups && !security_groups.is_empty())
            .then(|| security_groups.clone()),
        ip_address_type: (desired.ip_address_type != o.ip_address_type).then(|| desired.ip_address_type.clone()),
        attributes: diff_attributes(&desired.attributes, &o.attributes),
        tags: diff_tags(&desired.tags, &o.tags),
    })
}

/// In-place changes of one target group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroupUpdate {
    /// Which one.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// A new health check.
    pub health: Option<HealthSettings>,
    /// Changed attributes.
    pub attributes: BTreeMap<String, String>,
    /// Tag changes.
    pub tags: TagDiff,
}

/// What happens to the target groups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetGroupPlan {
    /// Names of target groups to create.
    pub create: Vec<String>,
    /// Changes of existing ones (only those with something to change).
    pub update: Vec<TargetGroupUpdate>,
    /// ARNs of owned target groups no longer wanted (deleted once no listener uses them).
    pub delete: Vec<String>,
}

/// Plans the target groups: matched by name, which covers everything AWS cannot change.
pub fn diff_target_groups(desired: &[DesiredTargetGroup], observed: &[ObservedTargetGroup]) -> TargetGroupPlan {
    let mut plan = TargetGroupPlan::default();
    for d in desired {
        match observed.iter().find(|o| o.name == d.name) {
            None => plan.create.push(d.name.clone()),
            Some(o) => {
                let u = TargetGroupUpdate {
                    arn: o.arn.clone(),
                    name: o.name.clone(),
                    health: (d.health != o.health).then(|| d.health.clone()),
                    attributes: diff_attributes(&d.attributes, &o.attributes),
                    tags: diff_tags(&d.tags, &o.tags),
                };
                if u.health.is_some() || !u.attributes.is_empty() || !u.tags.is_empty() {
                    plan.update.push(u);
                }
            }
        }
    }
    plan.delete =
        observed.iter().filter(|o| !desired.iter().any(|d| d.name == o.name)).map(|o| o.arn.clone()).collect();
    plan
}

/// One change to the listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerAction {
    /// Create the listener on this port.
    Create(u16),
    /// Change the listener (ARN) to match the desired one on this port.
    Modify(String, u16),
    /// Delete the listener.
    Delete(String),
}

/// Plans the listeners; `tg_arns` maps target group names to ARNs (created ones included).
pub fn diff_listeners(
    desired: &[DesiredListener],
    observed: &[ObservedListener],
    tg_arns: &BTreeMap<String, String>,
) -> Vec<ListenerAction> {
    let mut actions = Vec::new();
    // Deletions first: a port that changes protocol family keeps its listener (modified), but a
    // removed port must free its target group before that group is deleted.
    for o in observed {
        if !desired.iter().any(|d| d.port == o.port) {
            actions.push(ListenerAction::Delete(o.arn.clone()));
        }
    }
    for d in desired {
        match observed.iter().find(|o| o.port == d.port) {
            None => actions.push(ListenerAction::Create(d.port)),
            Some(o) => {
                let same = o.protocol == d.protocol
                    && o.target_group_arn.as_ref() == tg_arns.get(&d.target_group)
                    && o.certificate == d.certificate
                    && (d.ssl_policy.is_none() || o.ssl_policy == d.ssl_policy);
                if !same {
                    actions.push(ListenerAction::Modify(o.arn.clone(), d.port));
                }
            }
        }
    }
    actions
}

/// Instances to register and to deregister.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetDiff {
    /// Newly eligible.
    pub register: Vec<String>,
    /// No longer eligible.
    pub deregister: Vec<String>,
}

/// Only the difference: AWS registration is slow, so unchanged targets are never touched.
pub fn diff_targets(desired: &BTreeSet<String>, observed: &BTreeSet<String>) -> TargetDiff {
    TargetDiff {
        register: desired.difference(observed).cloned().collect(),
        deregister: observed.difference(desired).cloned().collect(),
    }
}

/// Rules to authorize and to revoke.
pub fn diff_rules(desired: &BTreeSet<Rule>, observed: &BTreeSet<Rule>) -> (Vec<Rule>, Vec<Rule>) {
    (desired.difference(observed).cloned().collect(), observed.difference(desired).cloned().collect())
}

/// The node-group rules that the target groups `tgs` need from the frontend group `frontend`:
/// their node ports and health ports (another member's, in a group).
pub fn node_rules_of_target_groups<'t>(
    tgs: impl IntoIterator<Item = &'t aws_sdk_elasticloadbalancingv2::types::TargetGroup>,
    frontend: &str,
) -> BTreeSet<Rule> {
    let rule = |protocol: &str, port: i32| Rule {
        protocol: protocol.to_owned(),
        from: port,
        to: port,
        source: Source::Group(frontend.to_owned()),
    };
    let mut rules = BTreeSet::new();
    for tg in tgs {
        let Some(port) = tg.port() else { continue };
        let protocol = tg.protocol().map(|p| p.as_str()).unwrap_or("TCP");
        let family: &[&str] = match protocol {
            "UDP" => &["udp"],
            "TCP_UDP" => &["tcp", "udp"],
            _ => &["tcp"],
        };
        rules.extend(family.iter().map(|p| rule(p, port)));
        match tg.health_check_port() {
            Some("traffic-port") | None => {}
            Some(health) => rules.extend(health.parse().ok().map(|p| rule("tcp", p))),
        }
    }
    rules
}

/// The node-group rules that let the frontend group `group` reach the node ports.
pub fn node_rules(desired: &Desired, group: &str) -> BTreeSet<Rule> {
    desired
        .node_ports
        .iter()
        .map(|(p, port)| Rule { protocol: p.clone(), from: *port, to: *port, source: Source::Group(group.to_owned()) })
        .collect()
}

#[cfg(test)]
mod tests;
