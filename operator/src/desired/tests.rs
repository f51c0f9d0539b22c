#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;
use crate::testutil::merge;
use hawser_providers::Target;

fn cfg() -> DesiredConfig {
    crate::testutil::mock_desired_config()
}

fn service(patch: serde_json::Value) -> Service {
    let mut base = json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080, "targetPort": 8080}],
            "externalTrafficPolicy": "Cluster"
        }
    });
    merge(&mut base, patch);
    serde_json::from_value(base).unwrap()
}

fn targets() -> Targets {
    Targets::from(vec![Target {
        name: "n1".into(),
        provider_id: None,
        zone: None,
        addresses: vec!["10.0.0.2".parse().unwrap()],
    }])
}

fn ok(patch: serde_json::Value) -> LoadBalancerSpec {
    build(&service(patch), targets(), &cfg()).unwrap()
}

fn errs(patch: serde_json::Value, cfg: &DesiredConfig) -> Vec<InvalidField> {
    build(&service(patch), targets(), cfg).unwrap_err()
}

#[test]
fn defaults_for_a_plain_service() {
    let s = ok(json!({}));
    assert_eq!(
        s.identity,
        ServiceIdentity { cluster: "demo".into(), namespace: "shop".into(), name: "web".into(), uid: "uid-1".into() }
    );
    assert_eq!(
        s.listeners,
        vec![Listener { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: Some(30080) }]
    );
    assert_eq!(s.targets, targets());
    assert_eq!(s.scheme, Scheme::InternetFacing);
    assert_eq!(s.ip_families, vec![IpFamily::IPv4]);
    assert_eq!(s.session_affinity, SessionAffinity::None);
    assert!(s.source_ranges.is_empty() && s.requested_addresses.is_empty() && s.tags.is_empty());
    assert_eq!(
        s.health_check,
        HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: 10266,
            path: Some("/healthz".into()),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    );
}

#[test]
fn health_check_target_follows_traffic_policy_and_mode() {
    let local = json!({"spec": {"externalTrafficPolicy": "Local", "healthCheckNodePort": 31999}});
    let hc = ok(local.clone()).health_check;
    assert_eq!((hc.port, hc.path.as_deref()), (10266, Some("/services/shop/web")));

    let kp = DesiredConfig { health_check_mode: HealthCheckMode::KubeProxy, ..cfg() };
    let hc = build(&service(json!({})), targets(), &kp).unwrap().health_check;
    assert_eq!((hc.port, hc.path.as_deref()), (10256, Some("/healthz")));
    let hc = build(&service(local), targets(), &kp).unwrap().health_check;
    assert_eq!((hc.port, hc.path.as_deref()), (31999, Some("/healthz")));

    let e = errs(json!({"spec": {"externalTrafficPolicy": "Local"}}), &kp);
    assert_eq!(e[0].field, "spec.healthCheckNodePort");
}

#[test]
fn annotations_shape_the_spec() {
    let s = ok(json!({"metadata": {"annotations": {
        "hawser.dev/scheme": "internal",
        "hawser.dev/address": "203.0.113.9",
        "hawser.dev/source-ranges": "10.0.0.0/8",
        "hawser.dev/health-check-interval": "30s",
        "hawser.dev/health-check-timeout": "10",
        "hawser.dev/health-check-healthy-threshold": "3",
        "hawser.dev/health-check-unhealthy-threshold": "4",
        "hawser.dev/tags": "team=web"
    }}}));
    assert_eq!(s.scheme, Scheme::Internal);
    assert_eq!(s.requested_addresses, vec!["203.0.113.9".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.source_ranges, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    assert_eq!(s.health_check.interval, Duration::from_secs(30));
    assert_eq!(s.health_check.timeout, Duration::from_secs(10));
    assert_eq!((s.health_check.healthy_threshold, s.health_check.unhealthy_threshold), (3, 4));
    assert_eq!(s.tags["team"], "web");
}

#[test]
fn short_interval_without_timeout_caps_the_default_timeout() {
    let s = ok(json!({"metadata": {"annotations": {"hawser.dev/health-check-interval": "5"}}}));
    assert!(s.health_check.timeout <= s.health_check.interval);
}

#[test]
fn spec_fields_are_honoured() {
    let s = ok(json!({"spec": {
        "loadBalancerSourceRanges": ["192.0.2.0/24", "10.0.0.0/8"],
        "loadBalancerIP": "203.0.113.4",
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "ipFamilies": ["IPv4", "IPv6"]
    }}));
    assert_eq!(s.source_ranges.len(), 2);
    assert_eq!(s.requested_addresses, vec!["203.0.113.4".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.session_affinity, SessionAffinity::ClientIp { timeout: Duration::from_secs(60) });
    assert_eq!(s.ip_families, vec![IpFamily::IPv4, IpFamily::IPv6]);
    let s = ok(json!({"spec": {"sessionAffinity": "ClientIP"}}));
    assert_eq!(s.session_affinity, SessionAffinity::ClientIp { timeout: Duration::from_secs(10_800) });
}

#[test]
fn same_port_on_tcp_and_udp_becomes_one_tcp_udp_listener() {
    let s = ok(json!({"spec": {"ports": [
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
        {"name": "dns-udp", "port": 53, "protocol": "UDP", "nodePort": 30053},
        {"name": "syslog", "port": 514, "protocol": "UDP", "nodePort": 30514},
        {"name": "https", "port": 443, "nodePort": 30443}
    ]}}));
    let got: Vec<_> = s.listeners.iter().map(|l| (l.port, l.protocol)).collect();
    assert_eq!(got, vec![(53, Protocol::TcpUdp), (443, Protocol::Tcp), (514, Protocol::Udp)]);
    let s = ok(json!({"spec": {"ports": [
        {"name": "a", "port": 53, "protocol": "TCP", "nodePort": 30053},
        {"name": "b", "port": 53, "protocol": "UDP", "nodePort": 30054}
    ]}}));
    assert_eq!(s.listeners.len(), 2, "different node ports stay separate");
}

#[test]
fn invalid_services_report_every_problem_with_its_field() {
    let plain = cfg();
    let aws_like = DesiredConfig {
        capabilities: Capabilities { needs_node_ports: true, supports_udp: false, groups: None },
        ..cfg()
    };
    let cases: Vec<(serde_json::Value, &DesiredConfig, &str, &str)> = vec![
        (json!({"spec": {"ports": []}}), &aws_like, "spec.ports", "at least one port"),
        (
            json!({"spec": {"ports": [{"port": 80, "protocol": "SCTP", "nodePort": 30000}]}}),
            &aws_like,
            "spec.ports[0].protocol",
            "use TCP or UDP",
        ),
        (
            json!({"spec": {"ports": [{"port": 53, "protocol": "UDP", "nodePort": 30000}]}}),
            &aws_like,
            "spec.ports[0].protocol",
            "do not support UDP",
        ),
        (
            json!({"spec": {"allocateLoadBalancerNodePorts": false, "ports": [{"port": 80}]}}),
            &aws_like,
            "spec.allocateLoadBalancerNodePorts",
            "set it to true",
        ),
        (json!({"spec": {"ports": [{"port": 80}]}}), &aws_like, "spec.ports[0].nodePort", "no nodePort yet"),
        (
            json!({"spec": {"loadBalancerSourceRanges": ["nope"]}}),
            &plain,
            "spec.loadBalancerSourceRanges",
            "not a CIDR",
        ),
        (
            json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}, "metadata": {"annotations": {"hawser.dev/source-ranges": "10.0.0.0/16"}}}),
            &plain,
            "hawser.dev/source-ranges",
            "set only one",
        ),
        (
            json!({"spec": {"loadBalancerIP": "203.0.113.1"}, "metadata": {"annotations": {"hawser.dev/address": "203.0.113.2"}}}),
            &plain,
            "hawser.dev/address",
            "deprecated spec.loadBalancerIP",
        ),
        (json!({"spec": {"loadBalancerIP": "x"}}), &plain, "spec.loadBalancerIP", "not an IP"),
        (
            json!({"metadata": {"annotations": {"hawser.dev/address": "2001:db8::1"}}}),
            &plain,
            "hawser.dev/address",
            "ipFamilies",
        ),
        (
            json!({"metadata": {"annotations": {"hawser.dev/scheme": "public"}}}),
            &plain,
            "hawser.dev/scheme",
            "\"internal\"",
        ),
        (
            json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": "Edge_1"}}}),
            &plain,
            "hawser.dev/load-balancer-group",
            "a DNS label",
        ),
        (
            json!({"spec": {"ports": [{"port": 80, "nodePort": 30000}]}, "metadata": {"annotations": {"hawser.dev/load-balancer-group": "edge"}}}),
            &aws_like,
            "hawser.dev/load-balancer-group",
            "does not share load balancers between Services yet",
        ),
        (
            json!({"metadata": {"annotations": {"hawser.dev/mock-thing": "x"}}}),
            &plain,
            "hawser.dev/mock-thing",
            "unknown hawser annotation",
        ),
        (json!({"metadata": {"uid": null}}), &plain, "metadata.uid", "no UID"),
    ];
    for (patch, cfg, field, message) in cases {
        let e = errs(patch.clone(), cfg);
        assert!(
            e.iter().any(|e| e.field == field && e.message.contains(message)),
            "{patch}: wanted {field} / {message}, got {e:?}"
        );
    }
    let e = errs(
        json!({"metadata": {"annotations": {"hawser.dev/scheme": "x", "hawser.dev/tags": "y"}}, "spec": {"ports": []}}),
        &cfg(),
    );
    assert_eq!(e.len(), 3, "all problems at once: {e:?}");
}

#[test]
fn equal_source_ranges_in_both_places_are_fine() {
    let s = ok(
        json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}, "metadata": {"annotations": {"hawser.dev/source-ranges": "10.0.0.0/8"}}}),
    );
    assert_eq!(s.source_ranges.len(), 1);
}
