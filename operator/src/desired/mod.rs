//! The desired load balancer of a Service: pure, from the Service, the eligible Nodes and config.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hawser_providers::{
    Capabilities, HealthCheck, HealthCheckProtocol, InvalidField, IpFamily, Listener, LoadBalancerSpec, Protocol,
    Scheme, ServiceIdentity, SessionAffinity, Targets,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use crate::annotations::{self, CommonAnnotations};

/// kube-proxy's health port, probed in `--health-check-mode kube-proxy`.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// kube-proxy's default ClientIP affinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
const DEFAULT_INTERVAL: Duration = HealthCheck::DEFAULT_INTERVAL;
const DEFAULT_TIMEOUT: Duration = HealthCheck::DEFAULT_TIMEOUT;
const DEFAULT_HEALTHY_THRESHOLD: u32 = HealthCheck::DEFAULT_HEALTHY_THRESHOLD;
const DEFAULT_UNHEALTHY_THRESHOLD: u32 = HealthCheck::DEFAULT_UNHEALTHY_THRESHOLD;

/// Where load balancers probe nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HealthCheckMode {
    /// The hawser dataplane's health port: `/healthz` or `/services/{namespace}/{name}`.
    Hawser,
    /// kube-proxy: 10256 `/healthz`, or the Service's `healthCheckNodePort` for Local.
    KubeProxy,
}

/// What the builder needs besides the Service and Nodes.
#[derive(Debug, Clone)]
pub struct DesiredConfig {
    /// Goes into the identity and ownership tags.
    pub cluster: String,
    /// Where nodes are probed.
    pub health_check_mode: HealthCheckMode,
    /// The dataplane's health port.
    pub node_health_port: u16,
    /// The running provider's name (for its annotation prefix).
    pub provider_name: &'static str,
    /// The running provider's annotations.
    pub provider_annotations: &'static [&'static str],
    /// What the provider needs.
    pub capabilities: Capabilities,
}

/// Builds the spec, or returns every problem found.
pub fn build(svc: &Service, targets: Targets, cfg: &DesiredConfig) -> Result<LoadBalancerSpec, Vec<InvalidField>> {
    let meta = &svc.metadata;
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let mut errors = Vec::new();
    let parsed =
        annotations::parse(annotations, cfg.provider_name, cfg.provider_annotations).unwrap_or_else(|mut e| {
            errors.append(&mut e);
            CommonAnnotations::default()
        });
    let spec = svc.spec.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();

    let listeners = listeners(&spec, cfg.capabilities, &mut errors);

    let ip_families = match spec.ip_families.as_deref() {
        None | Some([]) => vec![IpFamily::IPv4],
        Some(families) => families
            .iter()
            .filter_map(|f| match f.as_str() {
                "IPv4" => Some(IpFamily::IPv4),
                "IPv6" => Some(IpFamily::IPv6),
                other => {
                    errors.push(InvalidField::new(
                        "spec.ipFamilies",
                        format!("{other:?} is not an IP family; IPv4 and IPv6 are accepted"),
                    ));
                    None
                }
            })
            .collect(),
    };

    let source_ranges = source_ranges(&spec.load_balancer_source_ranges, &parsed.source_ranges, &mut errors);
    let requested_addresses =
        requested_addresses(spec.load_balancer_ip.as_deref(), &parsed.addresses, &ip_families, &mut errors);

    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let (port, path) = match (cfg.health_check_mode, local) {
        (HealthCheckMode::Hawser, false) => (cfg.node_health_port, "/healthz".to_owned()),
        (HealthCheckMode::Hawser, true) => (cfg.node_health_port, format!("/services/{namespace}/{name}")),
        (HealthCheckMode::KubeProxy, false) => (KUBE_PROXY_HEALTH_PORT, "/healthz".to_owned()),
        (HealthCheckMode::KubeProxy, true) => match spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) {
            Some(p) => (p, "/healthz".to_owned()),
            None => {
                errors.push(InvalidField::new(
                    "spec.healthCheckNodePort",
                    "externalTrafficPolicy Local in kube-proxy health-check mode needs a healthCheckNodePort, and the Service has none yet",
                ));
                (0, String::new())
            }
        },
    };
    let health_check = HealthCheck {
        protocol: HealthCheckProtocol::Http,
        port,
        path: Some(path),
        interval: parsed.health_check_interval.unwrap_or(DEFAULT_INTERVAL),
        timeout: parsed
            .health_check_timeout
            .unwrap_or(DEFAULT_TIMEOUT)
            .min(parsed.health_check_interval.unwrap_or(Duration::MAX)),
        healthy_threshold: parsed.healthy_threshold.unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
        unhealthy_threshold: parsed.unhealthy_threshold.unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD),
    };

    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp {
            timeout: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs),
        },
        _ => SessionAffinity::None,
    };

    if parsed.group.is_some() && cfg.capabilities.groups.is_none() {
        errors.push(InvalidField::new(
            annotations::LOAD_BALANCER_GROUP,
            format!(
                "the {} provider does not share load balancers between Services yet; remove the annotation",
                cfg.provider_name
            ),
        ));
    }
    if meta.uid.is_none() {
        errors.push(InvalidField::new("metadata.uid", "the Service has no UID yet"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(LoadBalancerSpec {
        identity: ServiceIdentity {
            cluster: cfg.cluster.clone(),
            namespace,
            name,
            uid: meta.uid.clone().unwrap_or_default(),
        },
        listeners,
        targets,
        health_check,
        scheme: parsed.scheme.unwrap_or(Scheme::InternetFacing),
        ip_families,
        source_ranges,
        session_affinity,
        requested_addresses,
        tags: parsed.tags,
        provider_annotations: parsed.provider,
        group: parsed.group,
    })
}

fn listeners(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    caps: Capabilities,
    errors: &mut Vec<InvalidField>,
) -> Vec<Listener> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        errors.push(InvalidField::new("spec.ports", "a LoadBalancer Service needs at least one port"));
    }
    let mut out: Vec<Listener> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" if caps.supports_udp => Protocol::Udp,
            "UDP" => {
                errors.push(InvalidField::new(
                    format!("{field}.protocol"),
                    "this cloud's load balancers do not support UDP; use TCP",
                ));
                continue;
            }
            other => {
                errors.push(InvalidField::new(
                    format!("{field}.protocol"),
                    format!("{other} is not supported; use TCP or UDP"),
                ));
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            errors
                .push(InvalidField::new(format!("{field}.port"), format!("{} is not a port number (1-65535)", p.port)));
            continue;
        };
        let node_port = p.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0);
        if caps.needs_node_ports && node_port.is_none() {
            let message = if spec.allocate_load_balancer_node_ports == Some(false) {
                "this cloud's load balancers send traffic to node ports, but spec.allocateLoadBalancerNodePorts is false; set it to true (or remove it)"
            } else {
                "this cloud's load balancers send traffic to node ports, and this port has no nodePort yet"
            };
            let field = if spec.allocate_load_balancer_node_ports == Some(false) {
                "spec.allocateLoadBalancerNodePorts".to_owned()
            } else {
                format!("{field}.nodePort")
            };
            errors.push(InvalidField::new(field, message));
            continue;
        }
        // The same port on TCP and UDP with one node port is one TCP_UDP listener, as clouds model it.
        if let Some(other) = out.iter_mut().find(|l| {
            l.port == port && l.node_port == node_port && l.protocol != protocol && l.protocol != Protocol::TcpUdp
        }) {
            other.protocol = Protocol::TcpUdp;
            if other.name.is_empty() {
                other.name = p.name.clone().unwrap_or_default();
            }
            continue;
        }
        out.push(Listener { name: p.name.clone().unwrap_or_default(), protocol, port, node_port });
    }
    out.sort_by_key(|l| (l.port, l.protocol));
    out
}

fn source_ranges(
    field: &Option<Vec<String>>,
    annotation: &Option<Vec<IpNet>>,
    errors: &mut Vec<InvalidField>,
) -> Vec<IpNet> {
    let from_spec = match field.as_deref() {
        None | Some([]) => None,
        Some(items) => match annotations::parse_cidrs(&items.join(",")) {
            Ok(r) => Some(r),
            Err(message) => {
                errors.push(InvalidField::new("spec.loadBalancerSourceRanges", message));
                None
            }
        },
    };
    match (from_spec, annotation) {
        (Some(a), Some(b)) if a != *b => {
            errors.push(InvalidField::new(
                annotations::SOURCE_RANGES,
                "differs from spec.loadBalancerSourceRanges; set only one of them (they are aliases)",
            ));
            a
        }
        (Some(a), _) => a,
        (None, Some(b)) => b.clone(),
        (None, None) => Vec::new(),
    }
}

fn requested_addresses(
    legacy: Option<&str>,
    annotation: &[IpAddr],
    families: &[IpFamily],
    errors: &mut Vec<InvalidField>,
) -> Vec<IpAddr> {
    let legacy = match legacy.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(InvalidField::new("spec.loadBalancerIP", format!("{s:?} is not an IP address")));
                None
            }
        },
    };
    let addresses = match (legacy, annotation) {
        (Some(l), a) if !a.is_empty() && !a.contains(&l) => {
            errors.push(InvalidField::new(
                annotations::ADDRESS,
                format!("differs from the deprecated spec.loadBalancerIP {l}; set only {}", annotations::ADDRESS),
            ));
            a.to_vec()
        }
        (_, a) if !a.is_empty() => a.to_vec(),
        (Some(l), _) => vec![l],
        (None, _) => Vec::new(),
    };
    for a in &addresses {
        if !families.contains(&IpFamily::of(a)) {
            errors.push(InvalidField::new(
                annotations::ADDRESS,
                format!(
                    "{a} is {:?} but the Service's ipFamilies are {families:?}; request an address of those families",
                    IpFamily::of(a)
                ),
            ));
        }
    }
    addresses
}

#[cfg(test)]
mod tests;
