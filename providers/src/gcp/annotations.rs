//! The `hawser.dev/gcp-*` annotations, parsed strictly and checked against the spec.
//!
//! Pure: no Compute call. Every problem is collected so the user sees all of them at once.

use std::collections::{BTreeMap, BTreeSet};

use crate::{InvalidField, IpFamily, LoadBalancerSpec, Protocol, Scheme};

/// `Premium` (the default) or `Standard`: the network tier of an external load balancer.
pub const NETWORK_TIER: &str = "hawser.dev/gcp-network-tier";
/// The subnetwork (name or URL) an internal or IPv6 load balancer takes its address from,
/// instead of the operator's `--gcp-subnetwork`.
pub const SUBNET: &str = "hawser.dev/gcp-subnet";
/// `true` lets clients in every region reach an internal load balancer.
pub const GLOBAL_ACCESS: &str = "hawser.dev/gcp-global-access";
/// Seconds (0–3600) a removed node keeps its established connections.
pub const CONNECTION_DRAINING_TIMEOUT: &str = "hawser.dev/gcp-connection-draining-timeout";

/// Every annotation the GCP provider understands.
pub const ALL: &[&str] = &[NETWORK_TIER, SUBNET, GLOBAL_ACCESS, CONNECTION_DRAINING_TIMEOUT];

/// The annotations that configure the group's address rather than one Service's rules: the
/// members of a load-balancer group must agree on them.
pub const WHOLE_LOAD_BALANCER: &[&str] = &[NETWORK_TIER, SUBNET, GLOBAL_ACCESS];

/// Connection draining when the annotation is absent (the value GKE's own L4 controller uses).
pub const DEFAULT_DRAINING_SECS: i32 = 30;

/// The network tier of an external load balancer's address and forwarding rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkTier {
    /// Google's backbone (the default).
    #[default]
    Premium,
    /// The public internet.
    Standard,
}

impl NetworkTier {
    /// As GCE spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Premium => "PREMIUM",
            Self::Standard => "STANDARD",
        }
    }
}

/// The GCP-specific settings of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcpOptions {
    /// Network tier (external load balancers).
    pub network_tier: NetworkTier,
    /// Subnetwork override (internal load balancers).
    pub subnet: Option<String>,
    /// Global access (internal load balancers).
    pub global_access: bool,
    /// Connection draining in seconds.
    pub draining_secs: i32,
}

/// Parses this provider's annotations of `spec` and checks them against the rest of the spec.
pub fn parse(spec: &LoadBalancerSpec) -> Result<GcpOptions, Vec<InvalidField>> {
    let a: &BTreeMap<String, String> = &spec.provider_annotations;
    let mut errors = Vec::new();
    for key in a.keys() {
        if key.starts_with("hawser.dev/gcp-") && !ALL.contains(&key.as_str()) {
            errors.push(InvalidField::new(key, format!("unknown GCP annotation; known ones are {}", ALL.join(", "))));
        }
    }
    let get = |k: &str| a.get(k).map(|v| v.trim());
    let internal = spec.scheme == Scheme::Internal;
    let ipv6 = spec.ip_families.contains(&IpFamily::IPv6);

    let network_tier = match get(NETWORK_TIER) {
        None => NetworkTier::Premium,
        Some(v) if v.eq_ignore_ascii_case("premium") => NetworkTier::Premium,
        Some(v) if v.eq_ignore_ascii_case("standard") => {
            if internal {
                errors.push(InvalidField::new(
                    NETWORK_TIER,
                    "internal load balancers are always Premium tier; remove this annotation or hawser.dev/scheme: internal",
                ));
            } else if ipv6 {
                errors.push(InvalidField::new(
                    NETWORK_TIER,
                    "IPv6 external load balancers are Premium tier only; remove this annotation or IPv6 from \
                     spec.ipFamilies",
                ));
            }
            NetworkTier::Standard
        }
        Some(v) => {
            errors
                .push(InvalidField::new(NETWORK_TIER, format!("{v:?} is not a network tier; use Premium or Standard")));
            NetworkTier::Premium
        }
    };

    let subnet = match get(SUBNET) {
        None => None,
        Some(v) => {
            let name = v.rsplit('/').next().unwrap_or(v);
            let valid = !name.is_empty()
                && name.len() <= 63
                && name.starts_with(|c: char| c.is_ascii_lowercase())
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                errors.push(InvalidField::new(
                    SUBNET,
                    format!("{v:?} is not a subnetwork name (lowercase letters, digits, dashes) or URL"),
                ));
            }
            if !internal && !ipv6 {
                errors.push(InvalidField::new(
                    SUBNET,
                    "a subnetwork applies only to internal load balancers and to IPv6 ones; add hawser.dev/scheme: \
                     internal or IPv6 to spec.ipFamilies",
                ));
            }
            Some(v.to_owned())
        }
    };

    let global_access = match get(GLOBAL_ACCESS) {
        None => false,
        Some(v @ ("true" | "false")) => {
            if !internal {
                errors.push(InvalidField::new(
                    GLOBAL_ACCESS,
                    "global access applies only to internal load balancers; add hawser.dev/scheme: internal",
                ));
            }
            v == "true"
        }
        Some(v) => {
            errors.push(InvalidField::new(GLOBAL_ACCESS, format!("{v:?} is not a boolean; use \"true\" or \"false\"")));
            false
        }
    };

    let draining_secs = match get(CONNECTION_DRAINING_TIMEOUT) {
        None => DEFAULT_DRAINING_SECS,
        Some(v) => match v.trim_end_matches('s').parse::<i32>() {
            Ok(n) if (0..=3600).contains(&n) => n,
            _ => {
                errors.push(InvalidField::new(
                    CONNECTION_DRAINING_TIMEOUT,
                    format!("{v:?} is not a number of seconds from 0 to 3600"),
                ));
                DEFAULT_DRAINING_SECS
            }
        },
    };

    // One requested address per family the Service has.
    let families = super::plan::families(spec);
    for family in [IpFamily::IPv4, IpFamily::IPv6] {
        let requested: Vec<_> = spec.requested_addresses.iter().filter(|a| IpFamily::of(a) == family).collect();
        if requested.len() > 1 {
            errors.push(InvalidField::new(
                "hawser.dev/address",
                format!("give at most one {family:?} address on GCP, one per IP family of the Service"),
            ));
        }
        if !requested.is_empty() && !families.contains(&family) {
            errors.push(InvalidField::new(
                "hawser.dev/address",
                format!(
                    "{} is an {family:?} address but the Service's spec.ipFamilies has no {family:?}",
                    requested[0]
                ),
            ));
        }
    }
    if spec.listeners.is_empty() {
        errors.push(InvalidField::new("spec.ports", "a load balancer needs at least one port"));
    }
    // On a group's shared address a member's rule must list its ports: a port range could cover
    // another member's.
    if spec.group.is_some() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let ports: BTreeSet<u16> = spec
                .listeners
                .iter()
                .filter(|l| l.protocol == protocol || l.protocol == Protocol::TcpUdp)
                .map(|l| l.port)
                .collect();
            if ports.len() > super::plan::MAX_FORWARDING_RULE_PORTS {
                errors.push(InvalidField::new(
                    "spec.ports",
                    format!(
                        "a member of a load-balancer group serves at most {} {} ports on GCP (a forwarding rule on \
                         the group's address lists its ports; this Service has {}); split it or leave the group",
                        super::plan::MAX_FORWARDING_RULE_PORTS,
                        protocol.as_str(),
                        ports.len()
                    ),
                ));
            }
        }
    }

    if errors.is_empty() { Ok(GcpOptions { network_tier, subnet, global_access, draining_secs }) } else { Err(errors) }
}

#[cfg(test)]
mod tests;
