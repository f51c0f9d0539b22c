//! Cluster IP and node port allocation for Services, with the apiserver's rules: unique, in range,
//! a requested value is honoured or refused with 422, released when no longer needed.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::ServiceSpec;

use crate::error::FieldError;

/// Allocator state shared by all Services.
#[derive(Debug, Clone)]
pub struct ServiceAllocator {
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
    node_ports: RangeInclusive<u16>,
    used_ips: BTreeSet<IpAddr>,
    used_ports: BTreeSet<u16>,
}

/// The addresses and ports one Service holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Holdings {
    ips: Vec<IpAddr>,
    ports: Vec<u16>,
}

fn holdings(spec: &ServiceSpec) -> Holdings {
    let ips = spec.cluster_ips.iter().flatten().filter_map(|s| s.parse::<IpAddr>().ok()).collect();
    let mut ports: Vec<u16> =
        spec.ports.iter().flatten().filter_map(|p| p.node_port).filter_map(|p| u16::try_from(p).ok()).collect();
    if let Some(hc) = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) {
        ports.push(hc);
    }
    Holdings { ips, ports }
}

/// Whether the Service type gets a cluster IP.
pub fn needs_cluster_ip(spec: &ServiceSpec) -> bool {
    spec.type_.as_deref() != Some("ExternalName") && spec.cluster_ip.as_deref() != Some("None")
}

/// Whether the Service type gets node ports allocated automatically.
pub fn allocates_node_ports(spec: &ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

/// Whether the Service needs a health check node port.
pub fn needs_health_check_node_port(spec: &ServiceSpec) -> bool {
    spec.type_.as_deref() == Some("LoadBalancer") && spec.external_traffic_policy.as_deref() == Some("Local")
}

impl ServiceAllocator {
    /// An allocator over an IPv4 service CIDR, an optional IPv6 one, and a node port range.
    pub fn new(v4: Ipv4Net, v6: Option<Ipv6Net>, node_ports: RangeInclusive<u16>) -> Self {
        Self { v4, v6, node_ports, used_ips: BTreeSet::new(), used_ports: BTreeSet::new() }
    }

    /// Whether an IPv6 service CIDR is configured (dual-stack).
    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// Fills in the cluster IPs and node ports `new` needs, checks the requested ones, and takes
    /// them; what `old` (the same Service before the update) held is released if unused now.
    /// On error nothing changes.
    pub fn allocate(&mut self, old: Option<&ServiceSpec>, new: &mut ServiceSpec) -> Result<(), Vec<FieldError>> {
        let mine = old.map(holdings).unwrap_or_default();
        let mut errors = Vec::new();
        let mut new_ips: Vec<IpAddr> = Vec::new();

        if needs_cluster_ip(new) {
            let families: Vec<String> = new.ip_families.clone().unwrap_or_else(|| vec!["IPv4".into()]);
            let requested: Vec<String> = new.cluster_ips.clone().unwrap_or_default();
            let mut ips: Vec<String> = Vec::new();
            for (i, family) in families.iter().enumerate() {
                let field = format!("spec.clusterIPs[{i}]");
                match requested.get(i).filter(|s| !s.is_empty()) {
                    Some(ip_str) => match ip_str.parse::<IpAddr>() {
                        Ok(ip) => {
                            if !self.in_range(ip) {
                                errors.push(FieldError::invalid(&field, ip_str, &format!(
                                    "failed to allocate IP {ip_str}: the provided IP ({ip_str}) is not in the valid range. The range of valid IPs is {}",
                                    self.range_text(ip)
                                )));
                            } else if self.used_ips.contains(&ip) && !mine.ips.contains(&ip) {
                                errors.push(FieldError::invalid(
                                    &field,
                                    ip_str,
                                    &format!("failed to allocate IP {ip_str}: provided IP is already allocated"),
                                ));
                            } else {
                                new_ips.push(ip);
                                ips.push(ip_str.clone());
                            }
                        }
                        Err(_) => errors.push(FieldError::invalid(&field, ip_str, "must be a valid IP address")),
                    },
                    None => match self.next_free_ip(family, &mine.ips, &new_ips) {
                        Some(ip) => {
                            new_ips.push(ip);
                            ips.push(ip.to_string());
                        }
                        None => errors.push(FieldError::invalid(
                            &field,
                            family,
                            "failed to allocate a cluster IP: range is full or the family is not configured",
                        )),
                    },
                }
            }
            if errors.is_empty() {
                new.cluster_ip = ips.first().cloned();
                new.cluster_ips = Some(ips);
            }
        }

        let mut new_ports: Vec<u16> = Vec::new();
        let range_text = format!("{}-{}", self.node_ports.start(), self.node_ports.end());
        let check_port = |field: String, port: i32, new_ports: &mut Vec<u16>, errors: &mut Vec<FieldError>| {
            match u16::try_from(port).ok().filter(|p| self.node_ports.contains(p)) {
                None => errors.push(FieldError::invalid(
                    field,
                    port,
                    &format!("provided port is not in the valid range. The range of valid ports is {range_text}"),
                )),
                Some(p) if self.used_ports.contains(&p) && !mine.ports.contains(&p) => {
                    errors.push(FieldError::invalid(field, port, "provided port is already allocated"));
                }
                Some(p) => new_ports.push(p),
            }
        };
        let ports = new.ports.as_deref().unwrap_or_default();
        for (i, p) in ports.iter().enumerate() {
            if let Some(np) = p.node_port.filter(|n| *n != 0) {
                check_port(format!("spec.ports[{i}].nodePort"), np, &mut new_ports, &mut errors);
            }
        }
        if let Some(hc) = new.health_check_node_port.filter(|n| *n != 0) {
            check_port("spec.healthCheckNodePort".into(), hc, &mut new_ports, &mut errors);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        if allocates_node_ports(new) {
            for i in 0..new.ports.as_ref().map_or(0, Vec::len) {
                let has = new.ports.as_ref().and_then(|p| p[i].node_port).is_some_and(|n| n != 0);
                if has {
                    continue;
                }
                let port = self.next_free_port(&mine.ports, &new_ports).ok_or_else(|| {
                    vec![FieldError::invalid(format!("spec.ports[{i}].nodePort"), 0, "range is full")]
                })?;
                new_ports.push(port);
                if let Some(p) = new.ports.as_mut().and_then(|p| p.get_mut(i)) {
                    p.node_port = Some(i32::from(port));
                }
            }
        }
        if needs_health_check_node_port(new) && new.health_check_node_port.is_none_or(|n| n == 0) {
            let port = self
                .next_free_port(&mine.ports, &new_ports)
                .ok_or_else(|| vec![FieldError::invalid("spec.healthCheckNodePort", 0, "range is full")])?;
            new_ports.push(port);
            new.health_check_node_port = Some(i32::from(port));
        }

        for ip in &mine.ips {
            self.used_ips.remove(ip);
        }
        for p in &mine.ports {
            self.used_ports.remove(p);
        }
        self.used_ips.extend(new_ips);
        self.used_ports.extend(new_ports);
        Ok(())
    }

    /// Returns everything a removed Service held to the pools.
    pub fn release(&mut self, spec: &ServiceSpec) {
        let h = holdings(spec);
        for ip in &h.ips {
            self.used_ips.remove(ip);
        }
        for p in &h.ports {
            self.used_ports.remove(p);
        }
    }

    fn in_range(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(&a) && a != self.v4.network() && a != self.v4.broadcast(),
            IpAddr::V6(a) => self.v6.is_some_and(|n| n.contains(&a) && a != n.network()),
        }
    }

    fn range_text(&self, ip: IpAddr) -> String {
        match (ip, self.v6) {
            (IpAddr::V6(_), Some(n)) => n.to_string(),
            (IpAddr::V6(_), None) => "(no IPv6 service CIDR configured)".into(),
            _ => self.v4.to_string(),
        }
    }

    /// Sequential scan from the 10th address: deterministic, and low addresses stay free for
    /// Services that ask for a well-known one (as `kubernetes` and DNS do in real clusters).
    fn next_free_ip(&self, family: &str, mine: &[IpAddr], taken_now: &[IpAddr]) -> Option<IpAddr> {
        let free = |ip: &IpAddr| (!self.used_ips.contains(ip) || mine.contains(ip)) && !taken_now.contains(ip);
        if family == "IPv6" {
            let net = self.v6?;
            let base = u128::from(net.network());
            let size: u128 = 1u128 << (128 - u32::from(net.prefix_len())).min(20);
            (10..size).map(|o| IpAddr::V6(Ipv6Addr::from(base + o))).find(|ip| free(ip))
        } else {
            let base = u32::from(self.v4.network());
            let size: u32 = 1u32 << (32 - u32::from(self.v4.prefix_len())).min(31);
            (10..size.saturating_sub(1)).map(|o| IpAddr::V4(Ipv4Addr::from(base + o))).find(|ip| free(ip))
        }
    }

    fn next_free_port(&self, mine: &[u16], taken_now: &[u16]) -> Option<u16> {
        self.node_ports.clone().find(|p| (!self.used_ports.contains(p) || mine.contains(p)) && !taken_now.contains(p))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServicePort;

    fn alloc() -> ServiceAllocator {
        ServiceAllocator::new("10.96.0.0/16".parse().unwrap(), Some("fd00:10:96::/112".parse().unwrap()), 30000..=30002)
    }

    fn np_spec(node_port: Option<i32>) -> ServiceSpec {
        ServiceSpec {
            type_: Some("NodePort".into()),
            ports: Some(vec![ServicePort { port: 80, node_port, ..Default::default() }]),
            ..Default::default()
        }
    }

    #[test]
    fn unique_ips_and_ports_and_release() {
        let mut a = alloc();
        let mut s1 = np_spec(None);
        a.allocate(None, &mut s1).unwrap();
        let mut s2 = np_spec(None);
        a.allocate(None, &mut s2).unwrap();
        assert_ne!(s1.cluster_ip, s2.cluster_ip);
        assert_ne!(s1.ports.as_ref().unwrap()[0].node_port, s2.ports.as_ref().unwrap()[0].node_port);
        let mut taken = np_spec(s1.ports.as_ref().unwrap()[0].node_port);
        let err = a.allocate(None, &mut taken).unwrap_err();
        assert!(err[0].message.contains("already allocated"), "{err:?}");
        a.release(&s1);
        a.allocate(None, &mut taken).unwrap();
    }

    #[test]
    fn requested_values_out_of_range_are_refused() {
        let mut a = alloc();
        let mut s = np_spec(Some(8080));
        assert!(a.allocate(None, &mut s).unwrap_err()[0].message.contains("valid range"));
        let mut s = np_spec(None);
        s.cluster_ips = Some(vec!["192.168.0.1".into()]);
        assert!(a.allocate(None, &mut s).unwrap_err()[0].message.contains("10.96.0.0/16"));
    }

    #[test]
    fn dual_stack_allocates_both_families() {
        let mut a = alloc();
        let mut s = np_spec(None);
        s.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        a.allocate(None, &mut s).unwrap();
        let ips = s.cluster_ips.unwrap();
        assert!(ips[0].parse::<Ipv4Addr>().is_ok() && ips[1].parse::<Ipv6Addr>().is_ok(), "{ips:?}");
    }
}
