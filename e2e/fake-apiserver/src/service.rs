//! Service semantics of the apiserver: defaulting, fields that follow the type, keeping allocated
//! values on update, and validation.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Service, ServiceSpec, ServiceStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::FieldError;
use crate::service_alloc::{ServiceAllocator, allocates_node_ports, needs_cluster_ip, needs_health_check_node_port};

const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];

fn type_of(spec: &ServiceSpec) -> &str {
    spec.type_.as_deref().unwrap_or("ClusterIP")
}

fn externally_accessible(spec: &ServiceSpec) -> bool {
    matches!(type_of(spec), "NodePort" | "LoadBalancer")
}

/// Prepares a new Service: defaults, validation, allocation. Status starts empty.
pub fn prepare_create(svc: &mut Service, alloc: &mut ServiceAllocator) -> Result<(), Vec<FieldError>> {
    let spec = svc.spec.get_or_insert_with(Default::default);
    set_defaults(spec, alloc.has_ipv6())?;
    let errors = validate(spec);
    if !errors.is_empty() {
        return Err(errors);
    }
    alloc.allocate(None, spec)?;
    svc.status = Some(ServiceStatus { load_balancer: Some(LoadBalancerStatus::default()), ..Default::default() });
    Ok(())
}

/// Prepares an updated Service from the stored one, as the apiserver's update path does.
pub fn prepare_update(old: &Service, new: &mut Service, alloc: &mut ServiceAllocator) -> Result<(), Vec<FieldError>> {
    let old_spec = old.spec.clone().unwrap_or_default();
    let spec = new.spec.get_or_insert_with(Default::default);
    drop_type_dependent_fields(&old_spec, spec);
    keep_allocated_values(&old_spec, spec);
    set_defaults(spec, alloc.has_ipv6())?;
    let mut errors = validate(spec);
    errors.extend(validate_update(&old_spec, spec));
    if !errors.is_empty() {
        return Err(errors);
    }
    alloc.allocate(Some(&old_spec), spec)
}

/// Returns what a removed Service held.
pub fn release(svc: &Service, alloc: &mut ServiceAllocator) {
    if let Some(spec) = &svc.spec {
        alloc.release(spec);
    }
}

/// Defaults as `SetDefaults_Service` and the service REST storage apply them.
fn set_defaults(spec: &mut ServiceSpec, has_ipv6: bool) -> Result<(), Vec<FieldError>> {
    let ty = type_of(spec).to_string();
    spec.type_ = Some(ty.clone());
    spec.session_affinity.get_or_insert_with(|| "None".into());
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        if p.target_port.is_none() || p.target_port == Some(IntOrString::Int(0)) {
            p.target_port = Some(IntOrString::Int(p.port));
        }
    }
    if externally_accessible(spec) {
        spec.external_traffic_policy.get_or_insert_with(|| "Cluster".into());
    }
    if ty != "ExternalName" {
        spec.internal_traffic_policy.get_or_insert_with(|| "Cluster".into());
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    if ty == "ExternalName" {
        return Ok(());
    }
    // clusterIP and clusterIPs[0] are two views of one value.
    match (spec.cluster_ip.clone().filter(|s| !s.is_empty()), spec.cluster_ips.clone().filter(|v| !v.is_empty())) {
        (Some(ip), None) => spec.cluster_ips = Some(vec![ip]),
        (None, Some(ips)) => spec.cluster_ip = ips.first().cloned(),
        (Some(ip), Some(ips)) if ips.first() != Some(&ip) => {
            return Err(vec![FieldError::invalid(
                "spec.clusterIPs",
                format!("{ips:?}"),
                "element [0] must match clusterIP",
            )]);
        }
        _ => {}
    }
    let policy = spec.ip_family_policy.get_or_insert_with(|| "SingleStack".into()).clone();
    if spec.ip_families.as_ref().is_none_or(Vec::is_empty) {
        let requested: Vec<String> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .map(|ip| if ip.is_ipv6() { "IPv6".to_string() } else { "IPv4".to_string() })
            .collect();
        let mut families = if requested.is_empty() { vec!["IPv4".to_string()] } else { requested };
        if policy != "SingleStack" && has_ipv6 && families.len() == 1 {
            let other = if families[0] == "IPv4" { "IPv6" } else { "IPv4" };
            families.push(other.to_string());
        }
        spec.ip_families = Some(families);
    }
    if policy == "RequireDualStack" && !has_ipv6 {
        return Err(vec![FieldError::invalid(
            "spec.ipFamilyPolicy",
            "RequireDualStack",
            "this cluster is not configured for dual-stack services",
        )]);
    }
    Ok(())
}

/// When the type (or traffic policy) changes, fields that only the old setting uses are cleared if
/// the client left them as they were (the apiserver's `dropTypeDependentFields`), so a merge patch of `type` alone works.
fn drop_type_dependent_fields(old: &ServiceSpec, new: &mut ServiceSpec) {
    if type_of(old) != type_of(new) && !allocates_node_ports(new) && type_of(new) != "LoadBalancer" {
        let old_ports: HashMap<(i32, String), Option<i32>> = old
            .ports
            .iter()
            .flatten()
            .map(|p| ((p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into())), p.node_port))
            .collect();
        for p in new.ports.iter_mut().flatten() {
            let key = (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into()));
            if old_ports.get(&key).is_some_and(|np| *np == p.node_port) {
                p.node_port = None;
            }
        }
    }
    if !needs_health_check_node_port(new) && new.health_check_node_port == old.health_check_node_port {
        new.health_check_node_port = None;
    }
    if type_of(new) != "LoadBalancer" {
        if new.load_balancer_class == old.load_balancer_class {
            new.load_balancer_class = None;
        }
        if new.allocate_load_balancer_node_ports == old.allocate_load_balancer_node_ports {
            new.allocate_load_balancer_node_ports = None;
        }
    }
    if !externally_accessible(new) && new.external_traffic_policy == old.external_traffic_policy {
        new.external_traffic_policy = None;
    }
    if type_of(new) == "ExternalName" {
        if new.cluster_ip == old.cluster_ip {
            new.cluster_ip = None;
        }
        if new.cluster_ips == old.cluster_ips {
            new.cluster_ips = None;
        }
        if new.ip_families == old.ip_families {
            new.ip_families = None;
        }
        if new.ip_family_policy == old.ip_family_policy {
            new.ip_family_policy = None;
        }
        if new.internal_traffic_policy == old.internal_traffic_policy {
            new.internal_traffic_policy = None;
        }
    }
}

/// A PUT that omits allocated values keeps them (the apiserver's `patchAllocatedValues`).
fn keep_allocated_values(old: &ServiceSpec, new: &mut ServiceSpec) {
    if needs_cluster_ip(old) && needs_cluster_ip(new) {
        if new.cluster_ip.as_deref().is_none_or(str::is_empty) {
            new.cluster_ip = old.cluster_ip.clone();
        }
        if new.cluster_ips.as_ref().is_none_or(Vec::is_empty) {
            new.cluster_ips = old.cluster_ips.clone();
        }
        if new.ip_families.as_ref().is_none_or(Vec::is_empty) {
            new.ip_families = old.ip_families.clone();
        }
    }
    let old_uses_ports = allocates_node_ports(old) || type_of(old) == "LoadBalancer";
    let new_uses_ports = allocates_node_ports(new) || type_of(new) == "LoadBalancer";
    if old_uses_ports && new_uses_ports {
        let by_port: HashMap<i32, i32> =
            old.ports.iter().flatten().filter_map(|p| p.node_port.map(|np| (p.port, np))).collect();
        for p in new.ports.iter_mut().flatten() {
            if p.node_port.is_none_or(|n| n == 0) {
                p.node_port = by_port.get(&p.port).copied();
            }
        }
    }
    if needs_health_check_node_port(old)
        && needs_health_check_node_port(new)
        && new.health_check_node_port.is_none_or(|n| n == 0)
    {
        new.health_check_node_port = old.health_check_node_port;
    }
}

fn validate(spec: &ServiceSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let ty = type_of(spec);
    if !TYPES.contains(&ty) {
        errors.push(FieldError::not_supported("spec.type", ty, TYPES));
        return errors;
    }
    if ty == "ExternalName" && spec.external_name.as_deref().is_none_or(str::is_empty) {
        errors.push(FieldError::required("spec.externalName", ""));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if ports.is_empty() && ty != "ExternalName" && !headless {
        errors.push(FieldError::required("spec.ports", ""));
    }
    let mut names = HashSet::new();
    let mut seen = HashSet::new();
    let mut node_ports = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        if ports.len() > 1 && p.name.as_deref().is_none_or(str::is_empty) {
            errors.push(FieldError::required(format!("{field}.name"), ""));
        }
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty())
            && !names.insert(name.to_string())
        {
            errors.push(FieldError::duplicate(format!("{field}.name"), format!("\"{name}\"")));
        }
        if !(1..=65535).contains(&p.port) {
            errors.push(FieldError::invalid(format!("{field}.port"), p.port, "must be between 1 and 65535, inclusive"));
        }
        if !["TCP", "UDP", "SCTP"].contains(&protocol) {
            errors.push(FieldError::not_supported(format!("{field}.protocol"), protocol, &["SCTP", "TCP", "UDP"]));
        }
        if !seen.insert((p.port, protocol.to_string())) {
            errors.push(FieldError::duplicate(
                field.clone(),
                format!(
                    "core.ServicePort{{Name:\"{}\", Protocol:\"{protocol}\", Port:{}}}",
                    p.name.as_deref().unwrap_or(""),
                    p.port
                ),
            ));
        }
        if let Some(np) = p.node_port.filter(|n| *n != 0) {
            if ty == "ClusterIP" || ty == "ExternalName" {
                errors.push(FieldError::forbidden(
                    format!("{field}.nodePort"),
                    &format!("may not be used when `type` is '{ty}'"),
                ));
            } else if !node_ports.insert((np, protocol.to_string())) {
                errors.push(FieldError::duplicate(format!("{field}.nodePort"), np));
            }
        }
    }
    if let Some(sa) = spec.session_affinity.as_deref()
        && !["None", "ClientIP"].contains(&sa)
    {
        errors.push(FieldError::not_supported("spec.sessionAffinity", sa, &["ClientIP", "None"]));
    }
    match spec.external_traffic_policy.as_deref() {
        None => {}
        Some(_) if !externally_accessible(spec) => errors.push(FieldError::invalid(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref().unwrap_or(""),
            "may only be set for externally-accessible services",
        )),
        Some(p) if !["Cluster", "Local"].contains(&p) => {
            errors.push(FieldError::not_supported("spec.externalTrafficPolicy", p, &["Cluster", "Local"]));
        }
        Some(_) => {}
    }
    if let Some(p) = spec.internal_traffic_policy.as_deref()
        && !["Cluster", "Local"].contains(&p)
    {
        errors.push(FieldError::not_supported("spec.internalTrafficPolicy", p, &["Cluster", "Local"]));
    }
    if spec.health_check_node_port.is_some_and(|n| n != 0) && !needs_health_check_node_port(spec) {
        errors.push(FieldError::invalid(
            "spec.healthCheckNodePort",
            spec.health_check_node_port.unwrap_or_default(),
            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
        ));
    }
    if let Some(class) = spec.load_balancer_class.as_deref() {
        if ty != "LoadBalancer" {
            errors.push(FieldError::invalid(
                "spec.loadBalancerClass",
                class,
                "may only be used when `type` is 'LoadBalancer'",
            ));
        } else if !is_qualified_name(class) {
            errors.push(FieldError::invalid(
                "spec.loadBalancerClass",
                class,
                "must be a qualified name: an optional DNS subdomain prefix and '/', then a name of alphanumerics, '-', '_' or '.'",
            ));
        }
    }
    if spec.allocate_load_balancer_node_ports.is_some() && ty != "LoadBalancer" {
        errors.push(FieldError::forbidden(
            "spec.allocateLoadBalancerNodePorts",
            "may only be used when `type` is 'LoadBalancer'",
        ));
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            errors.push(FieldError::invalid(
                format!("spec.clusterIPs[{i}]"),
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (i, f) in families.iter().enumerate() {
        if !["IPv4", "IPv6"].contains(&f.as_str()) {
            errors.push(FieldError::not_supported(format!("spec.ipFamilies[{i}]"), f, &["IPv4", "IPv6"]));
        } else if families[..i].contains(f) {
            errors.push(FieldError::duplicate(format!("spec.ipFamilies[{i}]"), f));
        }
    }
    if let Some(policy) = spec.ip_family_policy.as_deref()
        && !["SingleStack", "PreferDualStack", "RequireDualStack"].contains(&policy)
    {
        errors.push(FieldError::not_supported(
            "spec.ipFamilyPolicy",
            policy,
            &["PreferDualStack", "RequireDualStack", "SingleStack"],
        ));
    }
    errors
}

fn validate_update(old: &ServiceSpec, new: &ServiceSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let either_external_name = type_of(old) == "ExternalName" || type_of(new) == "ExternalName";
    let old_ip = old.cluster_ip.as_deref().unwrap_or("");
    if !either_external_name && !old_ip.is_empty() && new.cluster_ip.as_deref().unwrap_or("") != old_ip {
        errors.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            format!("{:?}", new.cluster_ips.clone().unwrap_or_default()),
            "may not change once set",
        ));
    }
    if type_of(old) == "LoadBalancer"
        && type_of(new) == "LoadBalancer"
        && old.load_balancer_class != new.load_balancer_class
    {
        errors.push(FieldError::invalid(
            "spec.loadBalancerClass",
            new.load_balancer_class.as_deref().unwrap_or("null"),
            "may not change once set",
        ));
    }
    errors
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    });
    name_ok && prefix_ok
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServicePort;

    fn alloc() -> ServiceAllocator {
        ServiceAllocator::new("10.96.0.0/16".parse().unwrap(), None, 30000..=32767)
    }

    fn lb(class: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: class.map(Into::into),
                ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let mut a = alloc();
        let mut s = lb(None);
        prepare_create(&mut s, &mut a).unwrap();
        let spec = s.spec.unwrap();
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
        assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        assert_eq!(port.target_port, Some(IntOrString::Int(80)));
        assert!(port.node_port.is_some());
    }

    #[test]
    fn class_rules() {
        let mut a = alloc();
        let mut s = lb(Some("hawser.dev/lb"));
        prepare_create(&mut s, &mut a).unwrap();
        let mut changed = s.clone();
        changed.spec.as_mut().unwrap().load_balancer_class = Some("other.dev/lb".into());
        assert!(prepare_update(&s, &mut changed, &mut a).is_err());
        let mut to_cluster_ip = s.clone();
        to_cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        prepare_update(&s, &mut to_cluster_ip, &mut a).unwrap();
        let spec = to_cluster_ip.spec.unwrap();
        assert_eq!(spec.load_balancer_class, None);
        assert_eq!(spec.ports.unwrap()[0].node_port, None);
        let mut bad = lb(Some("x/y"));
        bad.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        assert!(prepare_create(&mut bad, &mut a).is_err());
    }

    #[test]
    fn qualified_names() {
        assert!(is_qualified_name("hawser.dev/lb"));
        assert!(is_qualified_name("lb"));
        assert!(!is_qualified_name("bad class"));
        assert!(!is_qualified_name("/lb"));
    }
}
