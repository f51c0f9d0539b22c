#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;
use crate::desired::{self, DesiredConfig};

const GROUP: &str = "shop/edge";

fn cfg() -> DesiredConfig {
    crate::testutil::mock_desired_config()
}

fn limits() -> GroupLimits {
    GroupLimits { max_listeners: 4, max_rules: None }
}

fn svc(name: &str, created: &str, extra: serde_json::Value) -> Service {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"), "creationTimestamp": created,
                     "annotations": {"hawser.dev/load-balancer-group": "edge"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "ports": [{"port": 80}]}
    });
    crate::testutil::merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn verdicts(services: &[Service]) -> Vec<(String, Result<(), String>)> {
    let specs: Vec<LoadBalancerSpec> =
        services.iter().map(|s| desired::build(s, crate::testutil::one_target(), &cfg()).unwrap()).collect();
    let members: Vec<Member<'_>> =
        services.iter().zip(&specs).map(|(service, spec)| Member { service, spec }).collect();
    services
        .iter()
        .map(|s| {
            let uid = s.uid().unwrap();
            let verdict = admit(&uid, GROUP, &members, limits(), &[]).map_err(|c| format!("{} | {}", c.with, c));
            (s.name_any(), verdict)
        })
        .collect()
}

#[test]
fn members_with_their_own_ports_share_and_a_clashing_port_is_refused_naming_the_other() {
    let web = svc("web", "2026-01-01T00:00:00Z", json!({}));
    let api = svc("api", "2026-01-02T00:00:00Z", json!({"spec": {"ports": [{"port": 443}]}}));
    let late = svc("late", "2026-01-03T00:00:00Z", json!({}));
    let v = verdicts(&[web, api, late]);
    assert_eq!(v[0], ("web".into(), Ok(())));
    assert_eq!(v[1], ("api".into(), Ok(())));
    let (name, verdict) = &v[2];
    assert_eq!(name, "late");
    let message = verdict.clone().unwrap_err();
    assert!(message.starts_with("shop/web | spec.ports: port 80/TCP is already served by shop/web"), "{message}");
}

#[test]
fn the_oldest_sets_the_settings_and_a_tie_goes_by_name() {
    let internal = json!({"metadata": {"annotations": {"hawser.dev/scheme": "internal"}}});
    let a = svc("a", "2026-01-01T00:00:00Z", json!({"spec": {"ports": [{"port": 1}]}}));
    let b = svc("b", "2026-01-01T00:00:00Z", internal.clone());
    let v = verdicts(&[b.clone(), a]);
    assert_eq!(v[1].1, Ok(()), "a and b are as old; a comes first by name");
    let message = v[0].1.clone().unwrap_err();
    assert!(message.contains("hawser.dev/scheme: is internal here but internet-facing on shop/a"), "{message}");

    // b is older: b sets the group up, and a is the one refused.
    let a = svc("a", "2026-02-01T00:00:00Z", json!({"spec": {"ports": [{"port": 1}]}}));
    let v = verdicts(&[b, a]);
    assert_eq!(v[0].1, Ok(()));
    assert!(v[1].1.clone().unwrap_err().contains("internet-facing here but internal on shop/b"), "{:?}", v[1]);
}

#[test]
fn a_member_serving_in_the_group_keeps_its_place_against_an_older_newcomer() {
    let serving = json!({"status": {"conditions": [{"type": "hawser.dev/LoadBalancerReady", "status": "True",
        "reason": "LoadBalancerReady", "lastTransitionTime": "2026-01-05T00:00:00Z",
        "message": "Load balancer mock-lb-1 of group shop/edge serves 203.0.113.1"}]}});
    let young = svc("young", "2026-01-05T00:00:00Z", serving);
    let old =
        svc("old", "2026-01-01T00:00:00Z", json!({"metadata": {"annotations": {"hawser.dev/scheme": "internal"}}}));
    assert_eq!(serving_group(&young).as_deref(), Some("shop/edge"), "the condition names the group it serves in");
    assert_eq!(serving_group(&old), None);
    let v = verdicts(&[young, old]);
    assert_eq!(v[0].1, Ok(()), "the serving member is not pushed out");
    assert!(v[1].1.clone().unwrap_err().starts_with("shop/young |"), "{:?}", v[1]);
}

#[test]
fn a_refused_member_does_not_block_the_ones_after_it() {
    // mid clashes with first on 80; last (443) is checked against first only, and fits.
    let first = svc("first", "2026-01-01T00:00:00Z", json!({}));
    let mid = svc("mid", "2026-01-02T00:00:00Z", json!({"spec": {"ports": [{"port": 80}, {"port": 443}]}}));
    let last = svc("last", "2026-01-03T00:00:00Z", json!({"spec": {"ports": [{"port": 443}]}}));
    let v = verdicts(&[first, mid, last]);
    assert!(v[1].1.is_err());
    assert_eq!(v[2].1, Ok(()));
}

#[test]
fn the_listener_quota_refuses_the_member_that_would_exceed_it() {
    let ports = |from: u16, n: u16| json!({"spec": {"ports": (from..from + n).map(|p| json!({"port": p, "name": format!("p{p}")})).collect::<Vec<_>>()}});
    let a = svc("a", "2026-01-01T00:00:00Z", ports(100, 3));
    let b = svc("b", "2026-01-02T00:00:00Z", ports(200, 2));
    let c = svc("c", "2026-01-03T00:00:00Z", ports(300, 1));
    let v = verdicts(&[a, b, c]);
    assert_eq!(v[0].1, Ok(()));
    let message = v[1].1.clone().unwrap_err();
    assert!(message.contains("carries 3 listeners and takes at most 4"), "{message}");
    assert_eq!(v[2].1, Ok(()), "c still fits");
}

#[test]
fn whole_load_balancer_provider_annotations_must_agree() {
    let a = svc("a", "2026-01-01T00:00:00Z", json!({}));
    let mut b = svc("b", "2026-01-02T00:00:00Z", json!({"spec": {"ports": [{"port": 81}]}}));
    let sa = desired::build(&a, crate::testutil::one_target(), &cfg()).unwrap();
    let mut sb = desired::build(&b, crate::testutil::one_target(), &cfg()).unwrap();
    sb.provider_annotations.insert("hawser.dev/mock-tier".into(), "gold".into());
    b.metadata.uid = Some("u-b".into());
    let members = [Member { service: &a, spec: &sa }, Member { service: &b, spec: &sb }];
    let err = admit("u-b", GROUP, &members, limits(), &["hawser.dev/mock-tier"]).unwrap_err();
    assert_eq!(err.setting, "hawser.dev/mock-tier");
    assert!(err.message.contains("is gold here but (unset) on shop/a"), "{err}");
    assert_eq!(admit("u-b", GROUP, &members, limits(), &[]), Ok(()), "a per-member annotation may differ");
}

#[test]
fn the_rule_quota_counts_one_rule_per_member_and_protocol() {
    let proto = |port: u16, p: &str| json!({"spec": {"ports": [{"port": port, "protocol": p, "name": "p"}]}});
    let services = [
        svc("a", "2026-01-01T00:00:00Z", proto(80, "TCP")),
        svc(
            "b",
            "2026-01-02T00:00:00Z",
            json!({"spec": {"ports": [{"port": 53, "protocol": "TCP", "name": "t"}, {"port": 53, "protocol": "UDP", "name": "u"}]}}),
        ),
        svc("c", "2026-01-03T00:00:00Z", proto(81, "TCP")),
        svc("d", "2026-01-04T00:00:00Z", proto(82, "UDP")),
    ];
    let specs: Vec<LoadBalancerSpec> =
        services.iter().map(|s| desired::build(s, crate::testutil::one_target(), &cfg()).unwrap()).collect();
    let members: Vec<Member<'_>> =
        services.iter().zip(&specs).map(|(service, spec)| Member { service, spec }).collect();
    let limits = GroupLimits { max_listeners: 50, max_rules: Some(3) };
    assert_eq!(admit("u-a", GROUP, &members, limits, &[]), Ok(()));
    assert_eq!(admit("u-b", GROUP, &members, limits, &[]), Ok(()), "a's one rule and b's two");
    let err = admit("u-c", GROUP, &members, limits, &[]).unwrap_err();
    assert!(err.message.contains("carries 3 forwarding rules") && err.message.contains("at most 3"), "{err}");
    assert_eq!(err.setting, "spec.ports");
    assert!(admit("u-d", GROUP, &members, limits, &[]).is_err(), "d needs a rule too");
    let no_rules = GroupLimits { max_rules: None, ..limits };
    assert_eq!(admit("u-c", GROUP, &members, no_rules, &[]), Ok(()), "clouds that do not count rules");
}
