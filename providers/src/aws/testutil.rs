//! A spec shared by the AWS unit tests.

use std::collections::BTreeMap;

use crate::{HealthCheck, Listener, LoadBalancerSpec, Protocol, ServiceIdentity, Target};

/// Ports 53/TCP_UDP "dns", 80/TCP "http", 443/TCP "https"; two nodes with instance IDs and one without.
pub fn spec() -> LoadBalancerSpec {
    let listener = |name: &str, protocol, port, node_port| Listener {
        name: name.to_owned(),
        protocol,
        port,
        node_port: Some(node_port),
    };
    let target = |name: &str, pid: Option<&str>| Target {
        name: name.to_owned(),
        provider_id: pid.map(str::to_owned),
        zone: None,
        addresses: Vec::new(),
    };
    let identity =
        ServiceIdentity { cluster: "prod".into(), namespace: "shop".into(), name: "web".into(), uid: "uid-1".into() };
    let listeners = vec![
        listener("dns", Protocol::TcpUdp, 53, 30053),
        listener("http", Protocol::Tcp, 80, 30080),
        listener("https", Protocol::Tcp, 443, 30443),
    ];
    let targets = vec![
        target("a", Some("aws:///us-east-1a/i-0a")),
        target("b", Some("aws:///us-east-1b/i-0b")),
        target("fargate", Some("aws:///us-east-1a/fargate-10.0.0.1")),
    ];
    LoadBalancerSpec {
        tags: BTreeMap::from([("team".to_owned(), "shop".to_owned())]),
        ..LoadBalancerSpec::new(identity, listeners, targets, HealthCheck::http(10266, "/healthz"))
    }
}
