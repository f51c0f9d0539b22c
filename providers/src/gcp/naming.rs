//! Deterministic resource names and the ownership record every resource carries.
//!
//! GCE has no tags on most load-balancing resources, so ownership lives in the `description`
//! (JSON) and, where the resource supports them, in labels. Names are derived from the cluster
//! and the Service UID, so a restarted operator finds everything again by name and then checks
//! the description before touching it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{IpFamily, ServiceIdentity, stable_hash};

/// Every name hawser gives a GCE resource starts with this.
pub const PREFIX: &str = "hawser-";

/// The suffix of a resource that serves one IP family: none for IPv4 (the names IPv4-only load
/// balancers have always had), `-ipv6` for IPv6. GCE addresses, forwarding rules and firewalls
/// hold one family each, so a dual-stack Service has one of each per family.
fn family_suffix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::IPv4 => "",
        IpFamily::IPv6 => "-ipv6",
    }
}

/// The names of one Service's resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNames {
    /// `hawser-<hash>`: address, health check and traffic firewall share it.
    pub base: String,
}

impl ServiceNames {
    /// Names for `id`: `hawser-` plus 20 hex digits of cluster + UID (27 characters).
    pub fn new(id: &ServiceIdentity) -> Self {
        Self { base: format!("{PREFIX}{}", stable_hash(&[&id.cluster, &id.uid], 20)) }
    }

    /// The reserved IPv4 address; also the load balancer's ID.
    pub fn address(&self) -> String {
        self.base.clone()
    }

    /// The reserved address of one family.
    pub fn address_of(&self, family: IpFamily) -> String {
        format!("{}{}", self.base, family_suffix(family))
    }

    /// The regional health check.
    pub fn health_check(&self) -> String {
        self.base.clone()
    }

    /// The backend service of one protocol (`tcp` or `udp`), which both families share, and
    /// the IPv4 forwarding rule of that protocol.
    pub fn per_protocol(&self, protocol: &str) -> String {
        format!("{}-{}", self.base, protocol.to_ascii_lowercase())
    }

    /// The forwarding rule of one protocol and family.
    pub fn forwarding_rule(&self, protocol: &str, family: IpFamily) -> String {
        format!("{}{}", self.per_protocol(protocol), family_suffix(family))
    }

    /// The firewall that lets IPv4 clients reach the nodes.
    pub fn firewall(&self) -> String {
        format!("{}-fw", self.base)
    }

    /// The firewall that lets clients of one family reach the nodes.
    pub fn firewall_of(&self, family: IpFamily) -> String {
        format!("{}{}", self.firewall(), family_suffix(family))
    }

    /// The forwarding rule of one protocol and family on a load-balancer group's address. It
    /// differs from [`Self::forwarding_rule`] so that a Service moving into or out of a group
    /// is served at both addresses until the move is done.
    pub fn member_forwarding_rule(&self, protocol: &str, family: IpFamily) -> String {
        format!("{}-g-{}{}", self.base, protocol.to_ascii_lowercase(), family_suffix(family))
    }

    /// The firewall that lets clients of one family reach the nodes at a group's address.
    pub fn member_firewall_of(&self, family: IpFamily) -> String {
        format!("{}-g-fw{}", self.base, family_suffix(family))
    }
}

/// The names of a load-balancer group's shared resources: its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupNames {
    /// `hawser-g-<hash>`.
    pub base: String,
}

impl GroupNames {
    /// Names for group `group` (`namespace/name`) of cluster `cluster`: `hawser-g-` plus 20 hex
    /// digits (29 characters).
    pub fn new(cluster: &str, group: &str) -> Self {
        Self { base: format!("{PREFIX}g-{}", stable_hash(&[cluster, group], 20)) }
    }

    /// The group's reserved address of one family; also the group's load-balancer ID.
    pub fn address_of(&self, family: IpFamily) -> String {
        format!("{}{}", self.base, family_suffix(family))
    }
}

/// The names of the resources the whole cluster shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    /// `hawser-c-<hash>`.
    pub base: String,
}

impl ClusterNames {
    /// Names for the cluster `cluster`.
    pub fn new(cluster: &str) -> Self {
        Self { base: format!("{PREFIX}c-{}", stable_hash(&[cluster], 16)) }
    }

    /// The unmanaged instance group of the nodes in one zone (same name in every zone): an
    /// instance may be in only one load-balanced group, so all Services share it.
    pub fn instance_group(&self) -> String {
        format!("{}-ig", self.base)
    }

    /// The firewall that lets Google's IPv4 health checkers reach the dataplane health port.
    pub fn health_check_firewall(&self) -> String {
        format!("{}-hc", self.base)
    }

    /// The health-check firewall of one family.
    pub fn health_check_firewall_of(&self, family: IpFamily) -> String {
        format!("{}{}", self.health_check_firewall(), family_suffix(family))
    }
}

/// The ownership record, stored as JSON in each resource's `description`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The owning cluster.
    pub cluster: String,
    /// `namespace/name` of the owning Service; absent on cluster-wide resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The owning Service's UID; absent on cluster-wide resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// What the resource is to hawser.
    pub resource: String,
    /// The load-balancer group (`namespace/name`): the group's own resources (its address)
    /// carry it without a Service, a member's parts with theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Ownership {
    /// The record of a resource owned by one Service.
    pub fn service(id: &ServiceIdentity, resource: &str) -> Self {
        Self {
            cluster: id.cluster.clone(),
            service: Some(id.service_key()),
            uid: Some(id.uid.clone()),
            resource: resource.to_owned(),
            group: None,
        }
    }

    /// The record of a resource of `id`'s, which is a member of `group` when that is set.
    pub fn part(id: &ServiceIdentity, group: Option<&str>, resource: &str) -> Self {
        Self { group: group.map(str::to_owned), ..Self::service(id, resource) }
    }

    /// The record of a resource the cluster shares.
    pub fn cluster(cluster: &str, resource: &str) -> Self {
        Self { cluster: cluster.to_owned(), service: None, uid: None, resource: resource.to_owned(), group: None }
    }

    /// The record of a resource load-balancer group `group` shares.
    pub fn group(cluster: &str, group: &str, resource: &str) -> Self {
        Self { group: Some(group.to_owned()), ..Self::cluster(cluster, resource) }
    }

    /// The JSON put in `description`.
    pub fn to_description(&self) -> String {
        // Serialising a struct of strings cannot fail; an empty description would only make the
        // resource look foreign, never make hawser touch something it does not own.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a `description`; `None` when it is not a hawser record.
    pub fn from_description(description: Option<&str>) -> Option<Self> {
        serde_json::from_str(description?).ok()
    }

    /// The identity of the owning Service, for per-Service records.
    pub fn identity(&self) -> Option<ServiceIdentity> {
        let (namespace, name) = self.service.as_deref()?.split_once('/')?;
        Some(ServiceIdentity {
            cluster: self.cluster.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: self.uid.clone()?,
        })
    }

    /// Labels for resources that support them (addresses, forwarding rules). GCE label keys and
    /// values allow only `[a-z0-9_-]` up to 63 characters, so the `hawser.dev/…` tag names are
    /// spelled with dashes and values are sanitised.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("hawser-cluster".to_owned(), label_value(&self.cluster)),
            ("hawser-resource".to_owned(), label_value(&self.resource)),
        ]);
        if let Some(uid) = &self.uid {
            labels.insert("hawser-service-uid".to_owned(), label_value(uid));
        }
        if let Some(group) = &self.group {
            labels.insert("hawser-group".to_owned(), label_value(group));
        }
        labels
    }
}

/// A string turned into a valid GCE label value.
pub fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(63)
        .collect()
}

/// Whether `description` says the resource belongs to the Service `id`.
pub fn owned_by_service(description: Option<&str>, id: &ServiceIdentity) -> bool {
    Ownership::from_description(description)
        .is_some_and(|o| o.cluster == id.cluster && o.uid.as_deref() == Some(id.uid.as_str()))
}

/// Whether `description` says the resource is shared by the cluster `cluster`.
pub fn owned_by_cluster(description: Option<&str>, cluster: &str) -> bool {
    Ownership::from_description(description)
        .is_some_and(|o| o.cluster == cluster && o.uid.is_none() && o.group.is_none())
}

/// Whether `description` says the resource is shared by load-balancer group `group`.
pub fn owned_by_group(description: Option<&str>, cluster: &str, group: &str) -> bool {
    Ownership::from_description(description)
        .is_some_and(|o| o.cluster == cluster && o.uid.is_none() && o.group.as_deref() == Some(group))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn id(uid: &str) -> ServiceIdentity {
        ServiceIdentity { cluster: "Prod.EU".into(), namespace: "shop".into(), name: "web".into(), uid: uid.into() }
    }

    fn valid_name(n: &str) -> bool {
        // GCE: [a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters.
        n.len() <= 63
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !n.ends_with('-')
    }

    #[test]
    fn names_are_deterministic_valid_and_distinct_per_uid() {
        let a = ServiceNames::new(&id("u1"));
        assert_eq!(a, ServiceNames::new(&id("u1")));
        assert_ne!(a, ServiceNames::new(&id("u2")));
        let c = ClusterNames::new("Prod.EU");
        for n in [
            a.address(),
            a.address_of(IpFamily::IPv6),
            a.health_check(),
            a.per_protocol("TCP"),
            a.forwarding_rule("udp", IpFamily::IPv6),
            a.firewall(),
            a.firewall_of(IpFamily::IPv6),
        ] {
            assert!(valid_name(&n), "{n}");
        }
        for n in [c.instance_group(), c.health_check_firewall(), c.health_check_firewall_of(IpFamily::IPv6)] {
            assert!(valid_name(&n), "{n}");
        }
        assert_eq!(a.per_protocol("TCP"), format!("{}-tcp", a.base));
        // IPv4 keeps the names single-stack load balancers were created with.
        assert_eq!(a.forwarding_rule("TCP", IpFamily::IPv4), a.per_protocol("TCP"));
        assert_eq!(a.address_of(IpFamily::IPv4), a.address());
        assert_eq!(a.firewall_of(IpFamily::IPv4), a.firewall());
        assert_eq!(c.health_check_firewall_of(IpFamily::IPv4), c.health_check_firewall());
        assert_eq!(a.forwarding_rule("TCP", IpFamily::IPv6), format!("{}-tcp-ipv6", a.base));
    }

    #[test]
    fn ownership_round_trips_and_is_checked() {
        let o = Ownership::service(&id("u1"), "forwarding-rule");
        let d = o.to_description();
        assert_eq!(Ownership::from_description(Some(&d)), Some(o.clone()));
        assert!(owned_by_service(Some(&d), &id("u1")));
        assert!(!owned_by_service(Some(&d), &id("u2")));
        assert!(!owned_by_cluster(Some(&d), "Prod.EU"));
        assert!(!owned_by_service(Some("created by hand"), &id("u1")));
        assert!(!owned_by_service(None, &id("u1")));
        assert_eq!(o.identity(), Some(id("u1")));
        let shared = Ownership::cluster("Prod.EU", "instance-group").to_description();
        assert!(owned_by_cluster(Some(&shared), "Prod.EU"));
        assert!(!owned_by_cluster(Some(&shared), "other"));
    }

    #[test]
    fn group_names_and_records_never_meet_a_services() {
        let g = GroupNames::new("Prod.EU", "shop/edge");
        assert!(valid_name(&g.address_of(IpFamily::IPv4)) && valid_name(&g.address_of(IpFamily::IPv6)));
        assert_ne!(g, GroupNames::new("Prod.EU", "other/edge"), "groups never cross namespaces");
        let a = ServiceNames::new(&id("u1"));
        for n in [a.member_forwarding_rule("TCP", IpFamily::IPv6), a.member_firewall_of(IpFamily::IPv6)] {
            assert!(valid_name(&n), "{n}");
        }
        assert_ne!(a.member_forwarding_rule("TCP", IpFamily::IPv4), a.forwarding_rule("TCP", IpFamily::IPv4));
        assert_ne!(a.member_firewall_of(IpFamily::IPv4), a.firewall_of(IpFamily::IPv4));
        let shared = Ownership::group("Prod.EU", "shop/edge", "address").to_description();
        assert!(owned_by_group(Some(&shared), "Prod.EU", "shop/edge"));
        assert!(!owned_by_group(Some(&shared), "Prod.EU", "shop/other"));
        assert!(!owned_by_cluster(Some(&shared), "Prod.EU"), "a group's address is not the cluster's");
        let part = Ownership::part(&id("u1"), Some("shop/edge"), "forwarding-rule");
        assert!(owned_by_service(Some(&part.to_description()), &id("u1")));
        assert!(!owned_by_group(Some(&part.to_description()), "Prod.EU", "shop/edge"));
        assert_eq!(part.labels()["hawser-group"], "shop-edge");
    }

    #[test]
    fn labels_are_valid_gce_labels() {
        let labels = Ownership::service(&id("ABC/1"), "address").labels();
        assert_eq!(labels["hawser-cluster"], "prod-eu");
        assert_eq!(labels["hawser-service-uid"], "abc-1");
        assert_eq!(labels["hawser-resource"], "address");
    }
}
