#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::*;
use crate::gcp::annotations::parse;
use crate::gcp::testutil::{annotated, config, spec};
use crate::{IpFamily, Listener, Protocol, Scheme};

fn plan_of(s: &LoadBalancerSpec) -> Plan {
    Plan::new(&config(), s, &parse(s).unwrap()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn dual_stack(mut s: LoadBalancerSpec) -> LoadBalancerSpec {
    s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    s
}

#[test]
fn external_plan_builds_every_resource_as_specified() {
    let p = plan_of(&spec());
    assert_eq!(p.frontends.len(), 1);
    let a = p.frontends[0].address.as_ref().unwrap();
    assert_eq!((a.address_type, a.network_tier, a.purpose), ("EXTERNAL", Some("PREMIUM"), None));
    assert_eq!((a.ip_version, a.ipv6_endpoint_type, a.subnetwork.as_deref()), (None, None, None));
    assert_eq!(p.health_check.port, 10266);
    assert_eq!(p.health_check.path.as_deref(), Some("/healthz"));
    assert_eq!((p.health_check.interval_sec, p.health_check.timeout_sec), (8, 5));
    // One backend service per protocol, both on the nodes' groups in two zones.
    let protos: Vec<_> = p.backend_services.iter().map(|b| b.protocol).collect();
    assert_eq!(protos, vec!["TCP", "UDP"]);
    let groups: Vec<_> = p.backend_services[0].groups.iter().cloned().collect();
    assert_eq!(groups.len(), 2);
    assert!(groups[0].starts_with("projects/proj/zones/europe-west1-b/instanceGroups/hawser-c-"));
    // The node without a GCE provider ID is left out.
    assert_eq!(p.instance_groups.values().map(BTreeSet::len).sum::<usize>(), 2);
    assert_eq!(
        p.instance_groups["europe-west1-b"],
        BTreeSet::from(["projects/proj/zones/europe-west1-b/instances/node-a".to_owned()])
    );
    let rules = p.forwarding_rules(&config(), ip("203.0.113.7"));
    assert_eq!(rules[0].ports, vec!["53", "80", "443"]);
    assert_eq!(rules[1].ports, vec!["53"]);
    assert!(rules.iter().all(|r| r.ip == ip("203.0.113.7")
        && r.scheme == "EXTERNAL"
        && r.network_tier == Some("PREMIUM")
        && r.ip_version.is_none()
        && r.subnetwork.is_none()));
    let fw = p.firewall(ip("203.0.113.7")).unwrap();
    assert_eq!(fw.destination_ranges, BTreeSet::from(["203.0.113.7/32".to_owned()]));
    assert_eq!(fw.source_ranges, BTreeSet::from(["0.0.0.0/0".to_owned()]));
    assert_eq!(fw.allowed["tcp"], BTreeSet::from(["53".into(), "80".into(), "443".into()]));
    assert_eq!(fw.target_tags, BTreeSet::from(["gke-prod-node".to_owned()]));
}

#[test]
fn internal_plan_uses_the_subnetwork_and_global_access() {
    let mut s = annotated(&[("hawser.dev/gcp-subnet", "lb"), ("hawser.dev/gcp-global-access", "true")]);
    s.scheme = Scheme::Internal;
    let p = plan_of(&s);
    let a = p.frontends[0].address.as_ref().unwrap();
    assert_eq!(a.address_type, "INTERNAL");
    assert_eq!(a.purpose, Some("SHARED_LOADBALANCER_VIP"));
    assert_eq!(a.subnetwork.as_deref(), Some("projects/proj/regions/europe-west1/subnetworks/lb"));
    let r = &p.forwarding_rules(&config(), ip("10.0.0.9"))[0];
    assert_eq!((r.scheme, r.network_tier, r.global_access), ("INTERNAL", None, true));
    assert_eq!(p.backend_services[0].network.as_deref(), Some("projects/proj/global/networks/vpc"));
}

#[test]
fn more_than_five_ports_become_a_range() {
    let cases: &[(&[u16], Vec<&str>, Option<&str>)] = &[
        (&[80], vec!["80"], None),
        (&[1, 2, 3, 4, 5], vec!["1", "2", "3", "4", "5"], None),
        (&[1, 2, 3, 4, 5, 900], vec![], Some("1-900")),
    ];
    for (ports, list, range) in cases {
        let set: BTreeSet<u16> = ports.iter().copied().collect();
        let (l, r) = port_spec(&set);
        assert_eq!(l, list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(r.as_deref(), *range);
    }
}

#[test]
fn standard_tier_and_source_ranges() {
    let mut s = annotated(&[("hawser.dev/gcp-network-tier", "Standard")]);
    s.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    s.listeners = vec![Listener { name: String::new(), protocol: Protocol::Tcp, port: 80, node_port: None }];
    let p = plan_of(&s);
    assert_eq!(p.frontends[0].address.as_ref().unwrap().network_tier, Some("STANDARD"));
    assert_eq!(p.backend_services.len(), 1);
    assert_eq!(p.firewall(ip("1.2.3.4")).unwrap().source_ranges, BTreeSet::from(["198.51.100.0/24".to_owned()]));
}

#[test]
fn forwarding_rule_actions() {
    let p = plan_of(&spec());
    let base = p.forwarding_rules(&config(), ip("203.0.113.7"))[0].clone();
    let with = |f: &dyn Fn(&mut ForwardingRuleSpec)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(ForwardingRuleSpec, ForwardingRuleAction)> = vec![
        (base.clone(), ForwardingRuleAction::Keep),
        (with(&|r| r.labels = BTreeMap::new()), ForwardingRuleAction::Keep),
        (with(&|r| r.global_access = true), ForwardingRuleAction::PatchGlobalAccess),
        (with(&|r| r.ports = vec!["80".into()]), ForwardingRuleAction::Recreate),
        (with(&|r| r.ip = ip("203.0.113.8")), ForwardingRuleAction::Recreate),
        (with(&|r| r.ip_version = Some("IPV6")), ForwardingRuleAction::Recreate),
        (with(&|r| r.network_tier = Some("STANDARD")), ForwardingRuleAction::Recreate),
    ];
    for (observed, want) in cases {
        assert_eq!(forwarding_rule_action(&observed, &base), want, "{observed:?}");
    }
}

#[test]
fn membership_changes_add_and_remove() {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(membership_changes(&s(&["a", "b"]), &s(&["b", "c"])), (vec!["c".into()], vec!["a".into()]));
    assert_eq!(membership_changes(&s(&["a"]), &s(&["a"])), (vec![], vec![]));
}

#[test]
fn health_check_firewall_only_adds_ports() {
    let p = plan_of(&spec());
    let first = p.health_check_firewall(IpFamily::IPv4, "prod", None);
    assert_eq!(first.allowed["tcp"], BTreeSet::from(["10266".to_owned()]));
    assert_eq!(first.source_ranges.len(), HEALTH_CHECK_RANGES.len());
    let mut other = first.clone();
    other.allowed.insert("tcp".into(), BTreeSet::from(["10256".to_owned()]));
    let merged = p.health_check_firewall(IpFamily::IPv4, "prod", Some(&other));
    assert_eq!(merged.allowed["tcp"], BTreeSet::from(["10266".to_owned(), "10256".to_owned()]));
}

#[test]
fn instance_of_parses_gce_provider_ids_only() {
    let t =
        |pid: &str| crate::Target { name: "n".into(), provider_id: Some(pid.into()), zone: None, addresses: vec![] };
    assert_eq!(
        instance_of(&t("gce://p/us-central1-a/vm")),
        Some(("us-central1-a".into(), "projects/p/zones/us-central1-a/instances/vm".into()))
    );
    assert_eq!(instance_of(&t("aws:///us-east-1a/i-1")), None);
    assert_eq!(instance_of(&t("gce://p//vm")), None);
}

#[test]
fn dual_stack_external_plan_has_an_ipv6_frontend_in_the_subnetwork() {
    let p = plan_of(&dual_stack(spec()));
    let families: Vec<_> = p.families().collect();
    assert_eq!(families, vec![IpFamily::IPv4, IpFamily::IPv6]);
    let v4 = p.frontends[0].address.as_ref().unwrap();
    let v6 = p.frontends[1].address.as_ref().unwrap();
    assert_eq!(v4.name, p.names.address());
    assert_eq!(v6.name, format!("{}-ipv6", p.names.address()));
    assert_eq!((v6.ip_version, v6.ipv6_endpoint_type), (Some("IPV6"), Some("NETLB")));
    assert_eq!(v6.subnetwork.as_deref(), Some("projects/proj/regions/europe-west1/subnetworks/nodes"));
    assert_eq!((v6.address_type, v6.network_tier, v6.purpose), ("EXTERNAL", Some("PREMIUM"), None));
    // The IPv4 side is exactly what a single-stack Service gets.
    assert_eq!(p.frontends[0], plan_of(&spec()).frontends[0]);

    let rules = p.forwarding_rules(&config(), ip("2600:1900:4000:1::"));
    assert_eq!(rules.len(), 2);
    for r in &rules {
        assert_eq!(r.ip_version, Some("IPV6"));
        assert!(r.name.ends_with("-ipv6"), "{}", r.name);
        assert_eq!(r.subnetwork.as_deref(), Some("projects/proj/regions/europe-west1/subnetworks/nodes"));
        assert_eq!(r.network, None);
        // Both families share the protocol's backend service.
        assert!(r.backend_service.ends_with(&p.names.per_protocol(r.protocol)), "{}", r.backend_service);
    }

    let fw = p.firewall(ip("2600:1900:4000:1::")).unwrap();
    assert_eq!(fw.name, format!("{}-ipv6", p.names.firewall()));
    assert_eq!(fw.source_ranges, BTreeSet::from(["::/0".to_owned()]));
    assert_eq!(fw.destination_ranges, BTreeSet::from(["2600:1900:4000:1::/128".to_owned()]));
    let hc = p.health_check_firewall(IpFamily::IPv6, "prod", None);
    assert_eq!(hc.name, format!("{}-ipv6", p.cluster_names.health_check_firewall()));
    assert_eq!(hc.source_ranges, HEALTH_CHECK_RANGES_V6.iter().map(|r| (*r).to_owned()).collect());
}

#[test]
fn source_ranges_split_by_family() {
    let mut s = dual_stack(spec());
    s.source_ranges = vec!["198.51.100.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
    let p = plan_of(&s);
    assert_eq!(p.firewall(ip("203.0.113.7")).unwrap().source_ranges, BTreeSet::from(["198.51.100.0/24".to_owned()]));
    assert_eq!(p.firewall(ip("2600:1900::1")).unwrap().source_ranges, BTreeSet::from(["2001:db8::/32".to_owned()]));
    // Ranges of one family only: the other family admits nobody, so it gets no firewall.
    s.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    assert_eq!(plan_of(&s).firewall(ip("2600:1900::1")), None);
}

#[test]
fn internal_ipv6_address_is_shared_only_by_services_with_both_protocols() {
    let mut s = dual_stack(spec());
    s.scheme = Scheme::Internal;
    let p = plan_of(&s);
    let v6 = p.frontends[1].address.as_ref().unwrap();
    assert_eq!((v6.address_type, v6.ip_version, v6.ipv6_endpoint_type), ("INTERNAL", Some("IPV6"), None));
    assert_eq!(v6.purpose, Some("SHARED_LOADBALANCER_VIP"));
    s.listeners = vec![Listener { name: String::new(), protocol: Protocol::Tcp, port: 80, node_port: None }];
    let p = plan_of(&s);
    assert_eq!(p.frontends[1].address.as_ref().unwrap().purpose, None);
    assert_eq!(p.frontends[0].address.as_ref().unwrap().purpose, Some("SHARED_LOADBALANCER_VIP"));
}

#[test]
fn ipv6_only_and_requested_addresses() {
    let mut s = spec();
    s.ip_families = vec![IpFamily::IPv6];
    s.requested_addresses = vec![ip("2600:1900:4000:1::")];
    let p = plan_of(&s);
    assert_eq!(p.families().collect::<Vec<_>>(), vec![IpFamily::IPv6]);
    assert_eq!(p.frontends[0].address, None);
    assert_eq!(p.frontends[0].requested_ip, Some(ip("2600:1900:4000:1::")));
}

#[test]
fn a_subnetwork_is_required_where_one_is_used() {
    let mut c = config();
    c.subnetwork = None;
    let s = dual_stack(spec());
    let err = Plan::new(&c, &s, &parse(&s).unwrap()).unwrap_err();
    assert_eq!(err.field, "hawser.dev/gcp-subnet");
    assert!(err.message.contains("IPv6") && err.message.contains("--gcp-subnetwork"), "{}", err.message);
    let mut internal = spec();
    internal.scheme = Scheme::Internal;
    let err = Plan::new(&c, &internal, &parse(&internal).unwrap()).unwrap_err();
    assert!(err.message.contains("an internal load balancer needs a subnetwork"), "{}", err.message);
    // An IPv4 external load balancer needs none.
    assert!(Plan::new(&c, &spec(), &parse(&spec()).unwrap()).is_ok());
}
