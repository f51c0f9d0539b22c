#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::gcp::testutil::{annotated, spec};

fn internal(pairs: &[(&str, &str)]) -> LoadBalancerSpec {
    let mut s = annotated(pairs);
    s.scheme = Scheme::Internal;
    s
}

fn fields(r: Result<GcpOptions, Vec<InvalidField>>) -> Vec<String> {
    r.err().unwrap_or_default().into_iter().map(|f| f.field).collect()
}

#[test]
fn defaults_without_annotations() {
    let o = parse(&spec()).unwrap();
    assert_eq!(
        o,
        GcpOptions { network_tier: NetworkTier::Premium, subnet: None, global_access: false, draining_secs: 30 }
    );
}

#[test]
fn network_tier() {
    let cases: &[(&str, Option<NetworkTier>)] = &[
        ("Premium", Some(NetworkTier::Premium)),
        ("premium", Some(NetworkTier::Premium)),
        ("Standard", Some(NetworkTier::Standard)),
        ("STANDARD", Some(NetworkTier::Standard)),
        ("gold", None),
        ("", None),
    ];
    for (value, want) in cases {
        let got = parse(&annotated(&[(NETWORK_TIER, value)]));
        match want {
            Some(t) => assert_eq!(got.unwrap().network_tier, *t, "{value}"),
            None => {
                let errs = got.unwrap_err();
                assert_eq!(errs[0].field, NETWORK_TIER);
                assert!(errs[0].message.contains("Premium or Standard"), "{}", errs[0].message);
            }
        }
    }
    assert_eq!(fields(parse(&internal(&[(NETWORK_TIER, "Standard")]))), vec![NETWORK_TIER]);
    assert_eq!(parse(&internal(&[(NETWORK_TIER, "Premium")])).unwrap().network_tier, NetworkTier::Premium);
}

#[test]
fn subnet() {
    assert_eq!(parse(&internal(&[(SUBNET, "lb-subnet")])).unwrap().subnet.as_deref(), Some("lb-subnet"));
    let url = "projects/p/regions/europe-west1/subnetworks/lb-subnet";
    assert_eq!(parse(&internal(&[(SUBNET, url)])).unwrap().subnet.as_deref(), Some(url));
    assert_eq!(fields(parse(&internal(&[(SUBNET, "Bad_Name")]))), vec![SUBNET]);
    assert_eq!(fields(parse(&internal(&[(SUBNET, "")]))), vec![SUBNET]);
    let external = parse(&annotated(&[(SUBNET, "lb-subnet")])).unwrap_err();
    assert_eq!(external[0].field, SUBNET);
    assert!(external[0].message.contains("internal"));
    // External IPv6 load balancers take their address from a subnetwork too.
    let mut v6 = annotated(&[(SUBNET, "dual")]);
    v6.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    assert_eq!(parse(&v6).unwrap().subnet.as_deref(), Some("dual"));
}

#[test]
fn global_access() {
    assert!(parse(&internal(&[(GLOBAL_ACCESS, "true")])).unwrap().global_access);
    assert!(!parse(&internal(&[(GLOBAL_ACCESS, "false")])).unwrap().global_access);
    assert_eq!(fields(parse(&internal(&[(GLOBAL_ACCESS, "yes")]))), vec![GLOBAL_ACCESS]);
    assert_eq!(fields(parse(&annotated(&[(GLOBAL_ACCESS, "true")]))), vec![GLOBAL_ACCESS]);
}

#[test]
fn connection_draining_timeout() {
    let cases: &[(&str, Option<i32>)] = &[
        ("0", Some(0)),
        ("45", Some(45)),
        ("45s", Some(45)),
        ("3600", Some(3600)),
        ("3601", None),
        ("-1", None),
        ("soon", None),
    ];
    for (value, want) in cases {
        let got = parse(&annotated(&[(CONNECTION_DRAINING_TIMEOUT, value)]));
        match want {
            Some(n) => assert_eq!(got.unwrap().draining_secs, *n, "{value}"),
            None => assert_eq!(fields(got), vec![CONNECTION_DRAINING_TIMEOUT], "{value}"),
        }
    }
}

#[test]
fn unknown_annotation_is_named_with_the_known_ones() {
    let errs = parse(&annotated(&[("hawser.dev/gcp-backend-type", "x")])).unwrap_err();
    assert_eq!(errs[0].field, "hawser.dev/gcp-backend-type");
    assert!(errs[0].message.contains(NETWORK_TIER));
}

#[test]
fn other_clouds_annotations_are_ignored() {
    assert!(parse(&annotated(&[("hawser.dev/aws-cross-zone", "maybe")])).is_ok());
}

#[test]
fn every_problem_is_reported_at_once() {
    let errs =
        fields(parse(&annotated(&[(NETWORK_TIER, "gold"), (GLOBAL_ACCESS, "1"), (CONNECTION_DRAINING_TIMEOUT, "x")])));
    assert_eq!(errs, vec![NETWORK_TIER, GLOBAL_ACCESS, CONNECTION_DRAINING_TIMEOUT]);
}

#[test]
fn requested_addresses_one_per_family_of_the_service() {
    let dual = |addrs: &[&str]| {
        let mut s = spec();
        s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
        s.requested_addresses = addrs.iter().map(|a| a.parse().unwrap()).collect();
        s
    };
    assert!(parse(&dual(&[])).is_ok());
    assert!(parse(&dual(&["203.0.113.1", "2600:1900::1"])).is_ok());
    let two_v4 = parse(&dual(&["203.0.113.1", "203.0.113.2"])).unwrap_err();
    assert_eq!(two_v4[0].field, "hawser.dev/address");
    assert!(two_v4[0].message.contains("at most one IPv4"), "{}", two_v4[0].message);
    let mut v4_only = spec();
    v4_only.requested_addresses = vec!["2600:1900::1".parse().unwrap()];
    let errs = parse(&v4_only).unwrap_err();
    assert_eq!(errs[0].field, "hawser.dev/address");
    assert!(errs[0].message.contains("spec.ipFamilies has no IPv6"), "{}", errs[0].message);
}

#[test]
fn ipv6_external_is_premium_only() {
    let mut s = annotated(&[(NETWORK_TIER, "Standard")]);
    s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    let errs = parse(&s).unwrap_err();
    assert_eq!(errs[0].field, NETWORK_TIER);
    assert!(errs[0].message.contains("Premium tier only"), "{}", errs[0].message);
}
