//! A spec and config shared by the GCP unit tests.

use std::time::Duration;

use super::GcpConfig;
use crate::{HealthCheck, Listener, LoadBalancerSpec, Protocol, ServiceIdentity, Target};

/// Ports 53/TCP_UDP "dns", 80/TCP "http", 443/TCP "https"; nodes in two zones and one without a
/// GCE provider ID.
pub fn spec() -> LoadBalancerSpec {
    let listener = |name: &str, protocol, port| Listener { name: name.to_owned(), protocol, port, node_port: None };
    let target = |name: &str, pid: Option<&str>| Target {
        name: name.to_owned(),
        provider_id: pid.map(str::to_owned),
        zone: None,
        addresses: Vec::new(),
    };
    let identity =
        ServiceIdentity { cluster: "prod".into(), namespace: "shop".into(), name: "web".into(), uid: "uid-1".into() };
    let listeners = vec![
        listener("dns", Protocol::TcpUdp, 53),
        listener("http", Protocol::Tcp, 80),
        listener("https", Protocol::Tcp, 443),
    ];
    let targets = vec![
        target("a", Some("gce://proj/europe-west1-b/node-a")),
        target("b", Some("gce://proj/europe-west1-c/node-b")),
        target("kind", Some("kind://docker/kind/kind-worker")),
    ];
    let health_check = HealthCheck { interval: Duration::from_secs(8), ..HealthCheck::http(10266, "/healthz") };
    LoadBalancerSpec::new(identity, listeners, targets, health_check)
}

/// Project `proj`, region `europe-west1`, network `vpc`, subnetwork `nodes`, node tag `gke-prod-node`.
pub fn config() -> GcpConfig {
    let mut c = GcpConfig::new("prod", "proj", "europe-west1", "vpc");
    c.subnetwork = Some("nodes".into());
    c.node_tags = vec!["gke-prod-node".into()];
    c
}

/// `spec()` with annotations.
pub fn annotated(pairs: &[(&str, &str)]) -> LoadBalancerSpec {
    let mut s = spec();
    s.provider_annotations = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    s
}
