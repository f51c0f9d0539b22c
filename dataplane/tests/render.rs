//! Model, renderer and diff tests: pure, no kernel needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;

use common::fixtures::{Ep, Svc, node, slice};
use hawser_dataplane::diff::{full_plan, partial_plan};
use hawser_dataplane::model::{
    ClusterModel, EndpointChoice, Family, ModelConfig, NodeModel, ServiceKey, TrafficPolicy, build_model,
};
use hawser_dataplane::nft::{Applier, NftError, NftRunner};
use hawser_dataplane::render::{RenderConfig, Ruleset, TableId, render, render_from, to_script};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn cfg() -> ModelConfig {
    ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: "node-a".into() }
}

fn model(svcs: &[Service], slices: &[EndpointSlice]) -> ClusterModel {
    build_model(svcs, slices, &cfg())
}

fn rules(model: &ClusterModel) -> Ruleset {
    render(model, &RenderConfig::default())
}

const HTTP: &[(&str, &str, u16)] = &[("http", "TCP", 8080)];

fn ips(eps: &[&hawser_dataplane::model::Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.ip.to_string()).collect()
}

#[test]
fn only_our_class_of_load_balancer_services_is_modelled() {
    let mut other = Svc::new("ns", "other");
    other.class = "example.com/lb";
    let mut cluster_ip = Svc::new("ns", "cip").build();
    cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let m = model(&[Svc::new("ns", "web").build(), other.build(), cluster_ip], &[]);
    let keys: Vec<_> = m.services.keys().map(ToString::to_string).collect();
    assert_eq!(keys, vec!["ns/web"]);
}

#[test]
fn condition_defaults_and_ready_endpoints() {
    let unset = Ep { ip: "10.0.0.1", node: "node-b", ready: None, serving: None, terminating: None };
    let not_ready = Ep { ready: Some(false), serving: Some(false), ..Ep::ready("10.0.0.2", "node-b") };
    let m = model(&[Svc::new("ns", "web").build()], &[slice("ns", "web", "s1", HTTP, &[unset, not_ready])]);
    let svc = &m.services[&ServiceKey::new("ns", "web")];
    let ep = &svc.ports[0].endpoints[0];
    assert!(ep.ready && ep.serving && !ep.terminating, "nil conditions: {ep:?}");
    assert_eq!(ep.port, 8080, "target port comes from the slice");
    let (used, choice) = svc.usable_endpoints(&svc.ports[0], Family::V4);
    assert_eq!(ips(&used), vec!["10.0.0.1"]);
    assert_eq!(choice, EndpointChoice::Ready);
}

#[test]
fn terminating_endpoints_are_used_only_without_ready_ones() {
    let svc_obj = Svc::new("ns", "web").build();
    let both = model(
        std::slice::from_ref(&svc_obj),
        &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.1", "n"), Ep::terminating("10.0.0.2", "n")])],
    );
    let svc = &both.services[&ServiceKey::new("ns", "web")];
    assert_eq!(ips(&svc.usable_endpoints(&svc.ports[0], Family::V4).0), vec!["10.0.0.1"]);

    let only_term = model(&[svc_obj], &[slice("ns", "web", "s1", HTTP, &[Ep::terminating("10.0.0.2", "n")])]);
    let svc = &only_term.services[&ServiceKey::new("ns", "web")];
    let (used, choice) = svc.usable_endpoints(&svc.ports[0], Family::V4);
    assert_eq!(ips(&used), vec!["10.0.0.2"]);
    assert_eq!(choice, EndpointChoice::TerminatingFallback);
}

#[test]
fn duplicate_endpoints_across_slices_prefer_the_non_terminating_copy() {
    let m = model(
        &[Svc::new("ns", "web").build()],
        &[
            slice("ns", "web", "a", HTTP, &[Ep::terminating("10.0.0.1", "n")]),
            slice("ns", "web", "b", HTTP, &[Ep::ready("10.0.0.1", "n")]),
        ],
    );
    let eps = &m.services[&ServiceKey::new("ns", "web")].ports[0].endpoints;
    assert_eq!(eps.len(), 1);
    assert!(eps[0].ready && !eps[0].terminating);
}

#[test]
fn slice_ports_are_matched_by_name() {
    let mut s = Svc::new("ns", "web");
    s.ports = vec![("http", "TCP", 80, Some(30080)), ("dns", "UDP", 53, Some(30053))];
    let m = model(
        &[s.build()],
        &[slice("ns", "web", "s1", &[("dns", "UDP", 5353), ("http", "TCP", 8080)], &[Ep::ready("10.0.0.1", "n")])],
    );
    let svc = &m.services[&ServiceKey::new("ns", "web")];
    assert_eq!(svc.ports[0].endpoints[0].port, 8080);
    assert_eq!(svc.ports[1].endpoints[0].port, 5353);
}

#[test]
fn local_policy_uses_local_endpoints_only() {
    let mut s = Svc::new("ns", "web");
    s.local = true;
    let m = model(
        &[s.build()],
        &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.1", "node-a"), Ep::ready("10.0.0.2", "node-b")])],
    );
    let svc = &m.services[&ServiceKey::new("ns", "web")];
    assert_eq!(svc.traffic_policy, TrafficPolicy::Local);
    assert_eq!(ips(&svc.usable_endpoints(&svc.ports[0], Family::V4).0), vec!["10.0.0.1"]);
    assert_eq!(svc.local_ready_addresses(), 1);
}

#[test]
fn affinity_source_ranges_and_families_are_read() {
    let mut s = Svc::new("ns", "web");
    s.affinity_timeout = Some(60);
    s.source_ranges = vec!["192.0.2.0/24", " 10.1.2.3/8", "not-a-cidr"];
    s.lb_ips = vec!["203.0.113.10", "2001:db8::10"];
    let m = model(&[s.build()], &[]);
    let svc = &m.services[&ServiceKey::new("ns", "web")];
    assert_eq!(svc.affinity_timeout, Some(60));
    let ranges: Vec<String> = svc.source_ranges.as_ref().unwrap().iter().map(ToString::to_string).collect();
    assert_eq!(ranges, vec!["192.0.2.0/24", "10.0.0.0/8"]);
    assert_eq!(svc.families, vec![Family::V4, Family::V6]);
    assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
}

#[test]
fn node_state_reads_deletion_and_autoscaler_taint() {
    let n = NodeModel::from_node("node-a", Some(&node("node-a", false, true)));
    assert!(n.seen && n.autoscaler_deleting && !n.deleting);
    let n = NodeModel::from_node("node-a", Some(&node("node-a", true, false)));
    assert!(n.deleting);
    assert!(!NodeModel::from_node("node-a", None).seen);
}

/// The NAT table of Service `ns/b`.
fn nat_b() -> &'static str {
    TableId::nat(Family::V4, "ns", "b").name()
}

fn v4(r: &Ruleset) -> hawser_dataplane::render::Table {
    r.merged(Family::V4)
}

#[test]
fn cluster_service_dispatches_to_random_endpoints_with_masquerade() {
    let m = model(
        &[Svc::new("ns", "web").build()],
        &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.1", "n"), Ep::ready("10.0.0.2", "n")])],
    );
    let r = rules(&m);
    let t = v4(&r);
    assert_eq!(t.collections["service-addresses"].elements["203.0.113.10 . tcp . 80"], "goto svc-ns/web/tcp/80");
    assert_eq!(t.collections["service-nodeports"].elements["tcp . 30080"], "goto svc-ns/web/tcp/80");
    let svc = &t.chains["svc-ns/web/tcp/80"].rules;
    let slot = r.slots[&Family::V4]["ns/web/tcp/80"];
    let map = format!("endpoints-tcp-{:02x}", slot.bucket);
    // One rule: the DNAT. `services` marked the packet for masquerade on its way here.
    assert_eq!(svc[0], format!("meta l4proto tcp dnat to numgen random mod 2 offset {} map @{map}", slot.offset));
    assert_eq!(svc.len(), 1);
    assert!(t.collections["service-addresses-local"].elements.is_empty());
    assert!(t.collections["service-nodeports-local"].elements.is_empty());
    let services = &t.chains["services"].rules;
    let marking = services.iter().position(|r| r.ends_with("vmap @service-addresses")).unwrap();
    assert!(services[marking].starts_with("meta mark set meta mark | 0x00400000 "), "{services:?}");
    let nodeports = services.iter().position(|r| r.ends_with("vmap @service-nodeports")).unwrap();
    assert_eq!(nodeports, marking + 1, "the NodePort lookup runs with the mark set: {services:?}");
    // Nothing matched: the mark is taken off again, and it is the last rule.
    assert_eq!(services.last().unwrap(), "meta mark set meta mark & 0xffbfffff");
    // Local policy's lookups come first, without the mark.
    for map in ["service-addresses-local", "service-nodeports-local"] {
        let at = services.iter().position(|r| r.ends_with(&format!("vmap @{map}"))).unwrap();
        assert!(at < marking && !services[at].contains("mark"), "{services:?}");
    }
    let eps = &t.collections[&map];
    assert!(eps.is_map && eps.decl.contains("typeof numgen random mod 2 : ip daddr . tcp dport"));
    assert_eq!(eps.elements[&slot.offset.to_string()], "10.0.0.1 . 8080");
    assert_eq!(eps.elements[&(slot.offset + 1).to_string()], "10.0.0.2 . 8080");
    assert_eq!(eps.elements.len(), 2);
    assert!(!t.chains.keys().any(|c| c.starts_with("ep-")), "no per-endpoint chains without affinity");
    // Cluster policy masquerades all it DNATs, hairpin included: no hairpin elements. Local
    // policy's are checked where that policy is rendered.
    assert!(t.collections["hairpin"].elements.is_empty());
    assert!(
        t.chains["nat-postrouting"]
            .rules
            .contains(&"ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random".to_string())
    );
    assert!(t.collections["filter-addresses"].elements.is_empty());
    // The nodeport dispatch never matches loopback.
    let nodeports = t.chains["services"].rules.iter().find(|r| r.contains("@service-nodeports")).unwrap();
    assert!(nodeports.contains("fib daddr type local ip daddr != 127.0.0.0/8"), "{nodeports}");
    assert!(v4(&r).chains["nat-prerouting"].base.as_ref().unwrap().contains("priority -110;"));
}

#[test]
fn local_service_keeps_client_ip_and_drops_without_local_endpoints() {
    let mut s = Svc::new("ns", "web");
    s.local = true;
    let with_local = model(&[s.build()], &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.1", "node-a")])]);
    let r = rules(&with_local);
    let svc = &v4(&r).chains["svc-ns/web/tcp/80"].rules;
    assert_eq!(svc, &vec!["meta l4proto tcp dnat to 10.0.0.1:8080".to_string()], "one endpoint: plain dnat");
    // Dispatched through the maps `services` looks up before it sets the masquerade mark.
    let t = v4(&r);
    assert_eq!(t.collections["service-addresses-local"].elements["203.0.113.10 . tcp . 80"], "goto svc-ns/web/tcp/80");
    assert_eq!(t.collections["service-nodeports-local"].elements["tcp . 30080"], "goto svc-ns/web/tcp/80");
    assert!(t.collections["service-addresses"].elements.is_empty());
    assert!(t.collections["service-nodeports"].elements.is_empty());

    let remote_only = model(&[s.build()], &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.2", "node-b")])]);
    let r = rules(&remote_only);
    let t = v4(&r);
    assert!(!t.chains.contains_key("svc-ns/web/tcp/80"));
    assert!(t.collections["service-addresses"].elements.is_empty());
    assert_eq!(t.chains["fw-ns/web/tcp/80"].rules, vec!["ct state new drop"]);
    assert_eq!(t.collections["filter-nodeports"].elements["tcp . 30080"], "goto fw-ns/web/tcp/80");
}

#[test]
fn service_without_endpoints_rejects() {
    let r = rules(&model(&[Svc::new("ns", "web").build()], &[]));
    let t = v4(&r);
    assert_eq!(t.chains["fw-ns/web/tcp/80"].rules, vec!["ct state new goto reject-chain"]);
    assert_eq!(t.collections["filter-addresses"].elements["203.0.113.10 . tcp . 80"], "goto fw-ns/web/tcp/80");
    assert!(t.collections["service-nodeports"].elements.is_empty());
}

#[test]
fn source_ranges_are_enforced_on_address_and_nodeport_and_merged() {
    let mut s = Svc::new("ns", "web");
    s.source_ranges = vec!["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24"];
    let r = rules(&model(&[s.build()], &[slice("ns", "web", "s1", HTTP, &[Ep::ready("10.0.0.1", "n")])]));
    let t = v4(&r);
    assert_eq!(t.chains["fw-ns/web/tcp/80"].rules, vec!["ip saddr != { 10.0.0.0/8, 192.0.2.0/24 } drop"]);
    assert!(t.collections["filter-addresses"].elements.contains_key("203.0.113.10 . tcp . 80"));
    assert!(t.collections["filter-nodeports"].elements.contains_key("tcp . 30080"));
    // Restricted to IPv4 sources only: an IPv6 service port admits nothing.
    let mut s6 = s.clone();
    s6.families = vec!["IPv4", "IPv6"];
    s6.lb_ips = vec!["203.0.113.10", "2001:db8::10"];
    let r = rules(&model(&[s6.build()], &[]));
    assert_eq!(r.merged(Family::V6).chains["fw-ns/web/tcp/80"].rules[0], "drop");
}

/// A full sync into an empty kernel writes every Service's `svc-…` chain (plain or with
/// affinity, either family) and every element over netlink; what nft writes first is the base
/// table, which holds no Service (their source-range and reject chains go through nft later).
#[test]
fn stepwise_full_sync_encodes_every_service_chain_and_element() {
    use hawser_dataplane::model::Family;
    use hawser_dataplane::netlink::Batch;
    use hawser_dataplane::render::base_table;
    let mut sticky = Svc::new("ns", "sticky");
    sticky.affinity_timeout = Some(30);
    sticky.families = vec!["IPv4", "IPv6"];
    sticky.lb_ips = vec!["198.51.100.7", "2001:db8::7"];
    let mut ranged = Svc::new("ns", "ranged");
    ranged.source_ranges = vec!["10.1.0.0/16"];
    ranged.lb_ips = vec!["198.51.100.8"];
    let eps = [Ep::ready("10.0.0.1", "n"), Ep::ready("10.0.0.2", "n"), Ep::ready("10.0.0.3", "n")];
    let eps6 = [Ep::ready("fd00::1", "n"), Ep::ready("fd00::2", "n")];
    let r = rules(&model(
        &[Svc::new("ns", "web").build(), sticky.build(), ranged.build()],
        &[
            slice("ns", "web", "w", HTTP, &eps),
            slice("ns", "sticky", "s4", HTTP, &eps),
            slice("ns", "sticky", "s6", HTTP, &eps6),
            slice("ns", "ranged", "r", HTTP, &eps),
        ],
    ));
    for (family, table) in &r.tables {
        for (name, chain) in table.chains.iter().filter(|(name, _)| name.starts_with("svc-")) {
            assert!(Batch::new().add_chain(*family, name, &chain.rules), "{name} is not encoded: {:?}", chain.rules);
        }
        for (name, c) in table.collections.iter().filter(|(_, c)| !c.elements.is_empty()) {
            let elements = c.elements.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            assert!(Batch::new().elements(*family, name, true, elements), "{name}'s elements are not encoded");
        }
        let base = base_table(*family, &RenderConfig::default());
        assert!(
            base.chains.keys().all(|n| !n.starts_with("svc-") && !n.starts_with("fw-")),
            "{:?}",
            base.chains.keys()
        );
        assert!(base.collections.values().all(|c| c.elements.is_empty()));
    }
    assert!(r.merged(Family::V4).chains.contains_key("fw-ns/ranged/tcp/80"));
    let nat = |family| base_table(TableId { family, index: 1 }, &RenderConfig::default());
    for map in ["affinity-cluster", "affinity-cluster-nodeports", "affinity-addresses", "service-addresses"] {
        assert!(nat(Family::V4).collections.contains_key(map), "{map} is not declared");
    }
    assert!(nat(Family::V6).collections.contains_key("affinity"));
    let frame = base_table(TableId::frame(Family::V4), &RenderConfig::default());
    assert!(frame.collections.contains_key("filter-addresses") && frame.collections.contains_key("hairpin"));
}

#[test]
fn client_ip_affinity_adds_elements_and_no_rule_per_service() {
    let mut sticky = Svc::new("ns", "web");
    sticky.affinity_timeout = Some(30);
    let mut local = Svc::new("ns", "local");
    local.affinity_timeout = Some(30);
    local.local = true;
    local.lb_ips = vec!["198.51.100.9"];
    local.ports = vec![("http", "TCP", 80, Some(30099))];
    let eps = [Ep::ready("10.0.0.1", "n"), Ep::ready("10.0.0.2", "n")];
    let plain = rules(&model(&[Svc::new("ns", "web").build()], &[slice("ns", "web", "s1", HTTP, &eps)]));
    let r = rules(&model(
        &[sticky.build(), local.build()],
        &[slice("ns", "web", "s1", HTTP, &eps), slice("ns", "local", "s1", HTTP, &[Ep::ready("10.0.0.5", "node-a")])],
    ));
    let t = v4(&r);
    // The Service's chain is the one it has without affinity.
    assert_eq!(t.chains["svc-ns/web/tcp/80"], v4(&plain).chains["svc-ns/web/tcp/80"]);
    assert!(!t.chains.keys().any(|c| c.starts_with("ep-")), "no per-endpoint chains");
    assert_eq!(
        t.collections["affinity-cluster"].decl,
        "type ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags dynamic,timeout; size 1048576;"
    );
    let endpoints: Vec<&String> = t.collections["affinity-endpoints"].elements.keys().collect();
    assert_eq!(endpoints, ["10.0.0.1 . tcp . 8080", "10.0.0.2 . tcp . 8080", "10.0.0.5 . tcp . 8080"]);
    let addresses = &t.collections["affinity-addresses"].elements;
    let lb = Svc::new("ns", "web").lb_ips[0];
    assert_eq!(addresses[&format!("{lb} . tcp . 80")], "jump affinity-rec-cluster-30-tcp");
    assert_eq!(addresses["198.51.100.9 . tcp . 80"], "jump affinity-rec-local-30-tcp");
    assert_eq!(t.collections["affinity-nodeports"].elements["tcp . 30099"], "jump affinity-rec-local-30-tcp-nodeports");
    // One recording chain per policy, timeout, protocol and kind of frontend, with the
    // Service's timeout: NodePort clients go to maps of their own.
    assert_eq!(
        t.chains["affinity-rec-local-30-tcp"].rules,
        [
            "meta l4proto tcp update @affinity-local { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst timeout 30s : ip daddr . tcp dport }"
        ]
    );
    assert_eq!(
        t.chains["affinity-rec-local-30-tcp-nodeports"].rules,
        [
            "meta l4proto tcp update @affinity-local-nodeports { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst timeout 30s : ip daddr . tcp dport }"
        ]
    );
    let records: Vec<&String> = t.chains.keys().filter(|c| c.starts_with("affinity-rec-")).collect();
    assert_eq!(
        records,
        [
            "affinity-rec-cluster-30-tcp",
            "affinity-rec-cluster-30-tcp-nodeports",
            "affinity-rec-local-30-tcp",
            "affinity-rec-local-30-tcp-nodeports"
        ]
    );
    // Known clients are looked up first, by the frontend they connect to (a NodePort client
    // only on this node's addresses); only a Cluster-policy entry sets the masquerade mark. No
    // rule of `services` looks up a `jump` map other than the dispatch maps: the kernel walks
    // every such map at each commit that adds a rule.
    let services = &t.chains["services"].rules;
    assert_eq!(services[0], "dnat to ip saddr . ip daddr . meta l4proto . th dport map @affinity-local");
    assert!(
        services[1].starts_with("ip saddr . ip daddr . meta l4proto . th dport @affinity-cluster meta mark set"),
        "{services:?}"
    );
    assert_eq!(
        services[2],
        "fib daddr type local ip daddr != 127.0.0.0/8 dnat to ip saddr . ip daddr . meta l4proto . th dport map @affinity-local-nodeports"
    );
    assert!(services[3].contains("@affinity-cluster-nodeports meta mark set"), "{services:?}");
    assert!(services[4].contains("vmap @service-addresses"), "{services:?}");
    assert!(!services.iter().any(|r| r.contains("@affinity-addresses") || r.contains("@affinity-nodeports")));
    // Without affinity Services nothing is recorded.
    assert!(v4(&plain).collections["affinity-endpoints"].elements.is_empty());
    assert!(v4(&plain).collections["affinity-addresses"].elements.is_empty());
}

#[test]
fn ipv6_client_ip_affinity_keeps_two_rules_per_endpoint_on_one_set() {
    let mut s = Svc::new("ns", "web");
    s.affinity_timeout = Some(30);
    s.families = vec!["IPv6"];
    s.lb_ips = vec!["2001:db8::10"];
    let r = rules(&model(
        &[s.build()],
        &[slice("ns", "web", "s1", HTTP, &[Ep::ready("fd00::1", "n"), Ep::ready("fd00::2", "n")])],
    ));
    let t = &r.merged(Family::V6);
    let sets: Vec<&String> = t.collections.keys().filter(|k| k.starts_with("aff")).collect();
    assert_eq!(sets, ["affinity"], "one shared affinity set, no per-endpoint sets");
    assert_eq!(
        t.collections["affinity"].decl,
        "type ipv6_addr . ipv6_addr . inet_service . mark; flags dynamic,timeout; size 1048576;"
    );
    assert!(!t.chains.keys().any(|c| c.starts_with("affinity-")), "no recording chains");
    let svc = &t.chains["svc-ns/web/tcp/80"].rules;
    // A lookup per endpoint, a pick per endpoint, and a DNAT for a full set.
    assert_eq!(svc.len(), 5, "{svc:?}");
    assert_eq!(svc[4], "meta l4proto tcp dnat to [fd00::2]:8080");
    let (lookup, pick) = (&svc[0], &svc[2]);
    assert!(
        lookup.starts_with("ip6 saddr . ip6 daddr & :: | fd00::1 . th dport & 0 | 8080 . meta mark & 0 | 0x"),
        "{lookup}"
    );
    assert!(lookup.contains(" @affinity update @affinity { ip6 saddr . fd00::1 . 8080 . 0x"), "{lookup}");
    assert!(lookup.ends_with(" timeout 30s } meta l4proto tcp dnat to [fd00::1]:8080"), "{lookup}");
    assert!(pick.starts_with("numgen random mod 2 == 0 update @affinity { ip6 saddr . fd00::1 . 8080 . 0x"), "{pick}");
    assert!(svc[3].ends_with(" timeout 30s } meta l4proto tcp dnat to [fd00::2]:8080"), "{svc:?}");
}

#[test]
fn ipv6_endpoints_render_into_the_ip6_table() {
    let mut s = Svc::new("ns", "web");
    s.families = vec!["IPv6"];
    s.lb_ips = vec!["2001:db8::10"];
    s.local = true;
    let r = rules(&model(&[s.build()], &[slice("ns", "web", "s1", HTTP, &[Ep::ready("fd00::1", "node-a")])]));
    let t = &r.merged(Family::V6);
    assert_eq!(t.chains["svc-ns/web/tcp/80"].rules, ["meta l4proto tcp dnat to [fd00::1]:8080"]);
    assert!(t.collections["hairpin"].elements.contains_key("fd00::1 . fd00::1"));
    assert_eq!(t.collections["hairpin"].decl, "type ipv6_addr . ipv6_addr;");
    assert!(t.collections["service-addresses-local"].elements.contains_key("2001:db8::10 . tcp . 80"));
    assert!(v4(&r).collections["service-nodeports-local"].elements.is_empty());
}

/// Compares a rendered script to `tests/golden/NAME.nft`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, script: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.nft"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, script).unwrap();
        return;
    }
    let want =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(script, want, "golden {name} differs; run with UPDATE_GOLDEN=1 if intended");
}

#[test]
fn golden_rulesets() {
    let mut mixed = Svc::new("shop", "front");
    mixed.ports = vec![("http", "TCP", 80, Some(30080)), ("dns", "UDP", 53, Some(30053))];
    mixed.affinity_timeout = Some(600);
    mixed.source_ranges = vec!["192.0.2.0/24"];
    let mut local = Svc::new("shop", "local");
    local.local = true;
    local.lb_ips = vec!["203.0.113.11", "2001:db8::11"];
    local.families = vec!["IPv4", "IPv6"];
    local.ports = vec![("http", "TCP", 443, Some(30443))];
    let mut spread = Svc::new("shop", "spread");
    spread.lb_ips = vec!["203.0.113.13"];
    spread.ports = vec![("http", "TCP", 80, Some(30081))];
    let empty = Svc::new("shop", "empty");
    let m = model(
        &[mixed.build(), local.build(), spread.build(), {
            let mut e = empty.clone();
            e.lb_ips = vec!["203.0.113.12"];
            e.ports = vec![("", "TCP", 8443, Some(31443))];
            e.build()
        }],
        &[
            slice(
                "shop",
                "front",
                "front-1",
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
                &[Ep::ready("10.0.0.1", "node-a"), Ep::ready("10.0.0.2", "node-b")],
            ),
            slice(
                "shop",
                "local",
                "local-1",
                &[("http", "TCP", 8443)],
                &[Ep::ready("10.0.0.3", "node-a"), Ep::ready("10.0.0.4", "node-b")],
            ),
            slice("shop", "local", "local-2", &[("http", "TCP", 8443)], &[Ep::terminating("fd00::3", "node-a")]),
            slice(
                "shop",
                "spread",
                "spread-1",
                &[("http", "TCP", 8080)],
                &[Ep::ready("10.0.0.5", "node-b"), Ep::ready("10.0.0.6", "node-c"), Ep::ready("10.0.0.7", "node-a")],
            ),
        ],
    );
    golden("mixed", &to_script(&rules(&m)));
    golden("empty", &to_script(&rules(&ClusterModel::default())));
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>, Mutex<bool>);

impl NftRunner for Recorder {
    fn run(&self, script: &str) -> Result<(), NftError> {
        self.0.lock().unwrap().push(script.to_string());
        if *self.1.lock().unwrap() {
            return Err(NftError::Rejected { status: "exit status: 1".into(), stderr: "Error: injected".into() });
        }
        Ok(())
    }
}

fn two_services(eps_b: &[Ep<'_>]) -> ClusterModel {
    let mut b = Svc::new("ns", "b");
    b.lb_ips = vec!["203.0.113.20"];
    b.ports = vec![("http", "TCP", 80, Some(30081))];
    // Local policy: its endpoints are this node's, in the hairpin set.
    b.local = true;
    model(
        &[Svc::new("ns", "a").build(), b.build()],
        &[slice("ns", "a", "a1", HTTP, &[Ep::ready("10.0.0.1", "n")]), slice("ns", "b", "b1", HTTP, eps_b)],
    )
}

#[test]
fn partial_sync_touches_only_the_changed_service() {
    let before = rules(&two_services(&[Ep::ready("10.0.1.1", "node-a"), Ep::ready("10.0.1.2", "node-a")]));
    let after = render_from(&two_services(&[Ep::ready("10.0.1.1", "node-a")]), &RenderConfig::default(), Some(&before));
    let map = format!("endpoints-tcp-{:02x}", before.slots[&Family::V4]["ns/b/tcp/80"].bucket);
    let plan = partial_plan(&before, &BTreeSet::new(), &after);
    assert!(!plan.script.contains("ns/a/"), "service a untouched:\n{}", plan.script);
    assert!(plan.script.contains(&format!("flush chain ip {} svc-ns/b/tcp/80", nat_b())));
    assert!(
        plan.script
            .contains(&format!("add rule ip {} svc-ns/b/tcp/80 meta l4proto tcp dnat to 10.0.1.1:8080", nat_b()))
    );
    assert!(plan.script.contains("delete element ip hawser hairpin { 10.0.1.2 . 10.0.1.2 }"));
    // b's endpoint map has no other user: emptied now, deleted by the next sync.
    assert!(plan.script.contains(&format!("flush map ip {} {map}", nat_b())), "{}", plan.script);
    assert!(!plan.script.contains("delete map"), "deleted later:\n{}", plan.script);
    assert_eq!(plan.stale_after.len(), 1);
    let next = partial_plan(&after, &plan.stale_after, &after);
    assert_eq!(next.script.trim(), format!("delete map ip {} {map}", nat_b()));
    // No change, no transaction.
    assert!(partial_plan(&after, &BTreeSet::new(), &after).is_empty());
}

fn many_services(n: usize, eps_of: impl Fn(usize) -> usize) -> ClusterModel {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name: &'static str = Box::leak(format!("svc-{i}").into_boxed_str());
        let mut s = Svc::new("ns", name);
        s.lb_ips = vec![Box::leak(format!("198.51.{}.{}", i / 200, i % 200 + 1).into_boxed_str())];
        s.ports = vec![("http", "TCP", 80, None)];
        svcs.push(s.build());
        let eps: Vec<Ep<'static>> = (0..eps_of(i))
            .map(|j| Ep::ready(Box::leak(format!("10.{}.{}.{}", i / 200, i % 200, j + 1).into_boxed_str()), "n"))
            .collect();
        slices.push(slice("ns", name, "s1", HTTP, &eps));
    }
    model(&svcs, &slices)
}

#[test]
fn endpoint_map_slots_are_disjoint_spread_and_stable() {
    let m = many_services(2000, |_| 3);
    let first = rules(&m);
    let slots = &first.slots[&Family::V4];
    assert_eq!(slots.len(), 2000);
    // Disjoint key ranges within each map.
    let mut by_map: std::collections::BTreeMap<u32, Vec<(u32, u32)>> = Default::default();
    for s in slots.values() {
        assert!(s.capacity >= 16 && s.capacity.is_power_of_two());
        by_map.entry(s.bucket).or_default().push((s.offset, s.offset + s.capacity));
    }
    for ranges in by_map.values_mut() {
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
    }
    // Spread: no map is referenced by many rules (the kernel checks each element per rule).
    assert!(by_map.len() > 200, "{} maps", by_map.len());
    assert!(by_map.values().all(|r| r.len() < 40), "{:?}", by_map.values().map(Vec::len).max());

    // One Service gains an endpoint, one loses one, one grows past its slot, one is new:
    // only those chains are rewritten; every other slot stays where it was.
    let m2 = many_services(2001, |i| match i {
        10 => 4,
        11 => 2,
        12 => 40,
        _ => 3,
    });
    let second = render_from(&m2, &RenderConfig::default(), Some(&first));
    let plan = partial_plan(&first, &BTreeSet::new(), &second);
    assert_eq!(plan.chains_written, 4, "{}", plan.script);
    let s2 = &second.slots[&Family::V4];
    for (pid, slot) in slots {
        if pid != "ns/svc-12/tcp/80" {
            assert_eq!(s2[pid], *slot, "{pid} moved");
        }
    }
    assert_eq!(s2["ns/svc-12/tcp/80"].capacity, 64);
    assert_ne!(s2["ns/svc-12/tcp/80"].offset, slots["ns/svc-12/tcp/80"].offset);
    // A fresh render (after a failure) is deterministic.
    assert_eq!(rules(&m2), rules(&m2));
}

#[test]
fn changed_map_values_are_replaced_element_wise() {
    let before = rules(&two_services(&[Ep::ready("10.0.1.1", "node-a")]));
    let after = rules(&two_services(&[]));
    let plan = partial_plan(&before, &BTreeSet::new(), &after);
    assert!(
        plan.script
            .contains(&format!("delete element ip {} service-addresses-local {{ 203.0.113.20 . tcp . 80 }}", nat_b()))
    );
    assert!(
        plan.script
            .contains("add element ip hawser filter-addresses { 203.0.113.20 . tcp . 80 : goto fw-ns/b/tcp/80 }")
    );
    assert!(!plan.script.contains("203.0.113.10"));
}

#[test]
fn full_sync_replaces_tables_and_failure_forces_full_resync() {
    let a = rules(&two_services(&[Ep::ready("10.0.1.1", "node-a")]));
    let b = rules(&two_services(&[]));
    let full = full_plan(&a);
    assert!(full.script.starts_with("add table ip hawser\ndelete table ip hawser\n"));

    let mut applier = Applier::new(Recorder::default());
    assert!(applier.sync(a.clone()).unwrap().full);
    assert!(!applier.sync(a.clone()).unwrap().applied, "nothing changed");
    *applier.runner().1.lock().unwrap() = true;
    let err = applier.sync(b.clone()).unwrap_err();
    assert!(err.to_string().contains("Error: injected"), "{err}");
    *applier.runner().1.lock().unwrap() = false;
    let report = applier.sync(b).unwrap();
    assert!(report.full, "after a failure the next sync is a full resync");
    assert_eq!(applier.runner().0.lock().unwrap().len(), 3);
}

#[test]
fn big_model_renders_and_diffs_deterministically() {
    let svcs: Vec<Service> = (0..200)
        .map(|i| {
            let mut s = Svc::new("ns", "x");
            let name = format!("svc-{i}");
            let ip = format!("198.51.{}.{}", i / 200, i % 200 + 1);
            s.name = Box::leak(name.into_boxed_str());
            s.lb_ips = vec![Box::leak(ip.into_boxed_str())];
            s.ports = vec![("http", "TCP", 80, Some(30000 + i as u16))];
            s.build()
        })
        .collect();
    let m = model(&svcs, &[]);
    let a = to_script(&rules(&m));
    let b = to_script(&rules(&m));
    assert_eq!(a, b);
    let addr: IpAddr = "198.51.0.1".parse().unwrap();
    assert!(a.contains(&format!("{addr} . tcp . 80 : goto fw-ns/svc-0/tcp/80")));
}

/// The first sync's many changed Services are built on two threads: every one comes back, in
/// key order, with the model a single Service's change builds, and the warnings of both halves.
#[test]
fn many_changed_services_are_built_whole_and_in_order() {
    use hawser_dataplane::inputs::ClusterInputs;
    let n = 3000;
    let services: Vec<Service> = (0..n)
        .map(|i| {
            let mut s = Svc::new("ns", Box::leak(format!("s{i:04}").into_boxed_str()));
            s.lb_ips = vec![Box::leak(format!("198.18.{}.{}", i / 250, i % 250 + 1).into_boxed_str())];
            if i % 1000 == 999 {
                s.source_ranges = vec!["not-a-range"];
            }
            s.build()
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..n)
        .map(|i| {
            let name: &'static str = Box::leak(format!("s{i:04}").into_boxed_str());
            let ip: &'static str = Box::leak(format!("10.1.{}.{}", i / 250, i % 250 + 1).into_boxed_str());
            slice("ns", name, name, HTTP, &[Ep::ready(ip, "n")])
        })
        .collect();
    let mut inputs = ClusterInputs::default();
    inputs.replace(&services, &slices, "hawser.dev/lb");
    let mut warnings = Vec::new();
    let changes = inputs.take_changes(&cfg(), &mut warnings);
    assert_eq!(changes.len(), n);
    let keys: Vec<String> = changes.iter().map(|(k, _)| k.to_string()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "changes come in key order");
    let whole = model(&services, &slices);
    for (key, built) in &changes {
        assert_eq!(built.as_ref(), whole.services.get(key), "{key}");
    }
    let warned: BTreeSet<String> = warnings.iter().map(|w| w.service.to_string()).collect();
    assert_eq!(warned, BTreeSet::from(["ns/s0999".to_string(), "ns/s1999".to_string(), "ns/s2999".to_string()]));
}

/// A full sync into a node with no Services goes in order of `first_endpoint_bucket`, and
/// writes a map's elements once it has moved past the map's bucket: that bucket is the
/// lowest of the endpoint maps the Service's rules refer to, and each map's name gives back
/// its protocol and bucket.
#[test]
fn a_services_first_endpoint_bucket_is_the_lowest_map_its_rules_use() {
    use hawser_dataplane::render::{endpoint_map_bucket, endpoint_map_protocol, first_endpoint_bucket};
    let eps = [Ep::ready("10.0.0.1", "n"), Ep::ready("10.0.0.2", "n")];
    for i in 0..64 {
        let name: &'static str = Box::leak(format!("svc-{i}").into_boxed_str());
        let mut s = Svc::new("ns", name);
        s.ports = vec![("http", "TCP", 80, Some(30080)), ("dns", "UDP", 53, Some(30053))];
        let m = model(&[s.build()], &[slice("ns", name, "s1", &[("http", "TCP", 8080), ("dns", "UDP", 5353)], &eps)]);
        let r = rules(&m);
        let maps: Vec<(String, u32)> = r
            .merged(Family::V4)
            .collections
            .keys()
            .filter_map(|n| Some((endpoint_map_protocol(n)?.to_string(), endpoint_map_bucket(n)?)))
            .collect();
        assert_eq!(maps.iter().map(|(p, _)| p.as_str()).collect::<BTreeSet<_>>(), BTreeSet::from(["tcp", "udp"]));
        let merged = r.merged(Family::V4);
        let used = merged.chains.values().flat_map(|c| &c.rules).filter(|r| r.contains("map @endpoints-"));
        assert_eq!(used.count(), 2, "{r:?}");
        let svc = &m.services[&ServiceKey::new("ns", name)];
        assert_eq!(first_endpoint_bucket(svc), maps.iter().map(|(_, b)| *b).min().unwrap(), "{maps:?}");
    }
}

/// The Services are spread over the eight NAT tables of each family by their namespace and
/// name: each Service's DNAT (its `svc-…` chain, dispatch and endpoint-map elements) is in its
/// own NAT table only, its filtering in the family's frame; a change to one Service writes only
/// to its NAT table (and the frame, for its hairpin and filter elements), so the kernel
/// re-validates only that table.
#[test]
fn services_are_spread_over_the_nat_tables_and_a_change_touches_only_its_own() {
    use hawser_dataplane::render::NAT_SHARDS;
    let before = rules(&many_services(200, |i| if i == 7 { 3 } else { 2 }));
    let nat_tables: BTreeSet<TableId> = before.tables.keys().filter(|id| !id.is_frame()).copied().collect();
    assert_eq!(nat_tables.len(), 2 * usize::from(NAT_SHARDS), "every NAT table exists in both families");
    let frame = &before.tables[&TableId::frame(Family::V4)];
    assert!(frame.chains.keys().all(|n| !n.starts_with("svc-") && n != "services"), "no DNAT in the frame");
    let mut used = BTreeSet::new();
    for i in 0..200 {
        let id = TableId::nat(Family::V4, "ns", &format!("svc-{i}"));
        used.insert(id);
        let chain = format!("svc-ns/svc-{i}/tcp/80");
        let holders: Vec<&TableId> =
            before.tables.iter().filter(|(_, t)| t.chains.contains_key(&chain)).map(|(id, _)| id).collect();
        assert_eq!(holders, [&id], "{chain} is in its own NAT table only");
        let key = format!("198.51.{}.{} . tcp . 80", i / 200, i % 200 + 1);
        assert_eq!(before.tables[&id].collections["service-addresses"].elements[&key], format!("goto {chain}"));
    }
    assert_eq!(used.len(), usize::from(NAT_SHARDS), "200 Services use every NAT table");
    // Every NAT table has the same base chains and dispatch.
    let base: Vec<(&String, &hawser_dataplane::render::Chain)> = {
        let t = &before.tables[&TableId { family: Family::V4, index: 1 }];
        t.chains.iter().filter(|(n, _)| !n.starts_with("svc-")).collect()
    };
    for id in nat_tables.iter().filter(|id| id.family == Family::V4) {
        let t = &before.tables[id];
        let theirs: Vec<(&String, &hawser_dataplane::render::Chain)> =
            t.chains.iter().filter(|(n, _)| !n.starts_with("svc-")).collect();
        assert_eq!(theirs, base, "{id}");
    }

    // svc-7 loses an endpoint: its rule is rewritten in its NAT table, no other table is named.
    let after = render_from(&many_services(200, |_| 2), &RenderConfig::default(), Some(&before));
    let plan = partial_plan(&before, &BTreeSet::new(), &after);
    let own = TableId::nat(Family::V4, "ns", "svc-7");
    assert!(plan.script.contains(&format!("flush chain {own} svc-ns/svc-7/tcp/80")), "{}", plan.script);
    for line in plan.script.lines() {
        assert!(line.contains(&format!(" {own} ")), "a line outside {own}: {line}");
    }
}
