#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::gcp::annotations::parse;
use crate::gcp::testutil::{annotated, config, spec};
use crate::{Listener, Protocol, Scheme};

fn plan_of(s: &LoadBalancerSpec) -> Plan {
    Plan::new(&config(), s, &parse(s).unwrap())
}

#[test]
fn external_plan_builds_every_resource_as_specified() {
    let p = plan_of(&spec());
    let a = p.address.as_ref().unwrap();
    assert_eq!((a.address_type, a.network_tier, a.purpose), ("EXTERNAL", Some("PREMIUM"), None));
    assert_eq!(p.health_check.port, 10254);
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
    let rules = p.forwarding_rules(&config(), "203.0.113.7");
    assert_eq!(rules[0].ports, vec!["53", "80", "443"]);
    assert_eq!(rules[1].ports, vec!["53"]);
    assert!(rules.iter().all(|r| r.ip == "203.0.113.7" && r.scheme == "EXTERNAL" && r.network_tier == Some("PREMIUM")));
    let fw = p.firewall("203.0.113.7");
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
    let a = p.address.as_ref().unwrap();
    assert_eq!(a.address_type, "INTERNAL");
    assert_eq!(a.purpose, Some("SHARED_LOADBALANCER_VIP"));
    assert_eq!(a.subnetwork.as_deref(), Some("projects/proj/regions/europe-west1/subnetworks/lb"));
    let r = &p.forwarding_rules(&config(), "10.0.0.9")[0];
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
    assert_eq!(p.address.as_ref().unwrap().network_tier, Some("STANDARD"));
    assert_eq!(p.backend_services.len(), 1);
    assert_eq!(p.firewall("1.2.3.4").source_ranges, BTreeSet::from(["198.51.100.0/24".to_owned()]));
}

#[test]
fn forwarding_rule_actions() {
    let p = plan_of(&spec());
    let base = p.forwarding_rules(&config(), "203.0.113.7")[0].clone();
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
        (with(&|r| r.ip = "203.0.113.8".into()), ForwardingRuleAction::Recreate),
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
    let first = p.health_check_firewall("prod", None);
    assert_eq!(first.allowed["tcp"], BTreeSet::from(["10254".to_owned()]));
    assert_eq!(first.source_ranges.len(), HEALTH_CHECK_RANGES.len());
    let mut other = first.clone();
    other.allowed.insert("tcp".into(), BTreeSet::from(["10256".to_owned()]));
    let merged = p.health_check_firewall("prod", Some(&other));
    assert_eq!(merged.allowed["tcp"], BTreeSet::from(["10254".to_owned(), "10256".to_owned()]));
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
