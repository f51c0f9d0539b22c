//! The `hawser.dev/aws-*` annotations, parsed strictly and checked against the spec.
//!
//! Pure: no AWS call. Every problem is collected so the user sees all of them at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::{InvalidField, IpFamily, LoadBalancerSpec, Protocol, Scheme};

/// Subnets (IDs `subnet-…` or `Name` tags), comma-separated; discovered by role tags when absent.
pub const SUBNETS: &str = "hawser.dev/aws-subnets";
/// Security groups (`sg-…`) to attach instead of the managed frontend security group.
pub const SECURITY_GROUPS: &str = "hawser.dev/aws-security-groups";
/// The ACM certificate ARN for TLS listeners.
pub const SSL_CERT: &str = "hawser.dev/aws-ssl-cert";
/// Which ports terminate TLS: port numbers or names, comma-separated, or `*` (the default).
pub const SSL_PORTS: &str = "hawser.dev/aws-ssl-ports";
/// The TLS listeners' security policy.
pub const SSL_NEGOTIATION_POLICY: &str = "hawser.dev/aws-ssl-negotiation-policy";
/// Cross-zone load balancing, `true` or `false`.
pub const CROSS_ZONE: &str = "hawser.dev/aws-cross-zone";
/// Proxy protocol v2 towards the nodes, `true`/`*` or `false`.
pub const PROXY_PROTOCOL: &str = "hawser.dev/aws-proxy-protocol";
/// Deletion protection, `true` or `false`.
pub const DELETION_PROTECTION: &str = "hawser.dev/aws-deletion-protection";
/// Client IP preservation on the target groups, `true` (the default) or `false`.
pub const PRESERVE_CLIENT_IP: &str = "hawser.dev/aws-preserve-client-ip";
/// Elastic IP allocation IDs, one per subnet (internet-facing only).
pub const EIP_ALLOCATIONS: &str = "hawser.dev/aws-eip-allocations";
/// Private IPv4 addresses, one per subnet (internal only).
pub const PRIVATE_IPV4_ADDRESSES: &str = "hawser.dev/aws-private-ipv4-addresses";

/// Every annotation the AWS provider understands.
pub const ALL: &[&str] = &[
    SUBNETS,
    SECURITY_GROUPS,
    SSL_CERT,
    SSL_PORTS,
    SSL_NEGOTIATION_POLICY,
    CROSS_ZONE,
    PROXY_PROTOCOL,
    DELETION_PROTECTION,
    PRESERVE_CLIENT_IP,
    EIP_ALLOCATIONS,
    PRIVATE_IPV4_ADDRESSES,
];

/// The annotations that configure the whole load balancer rather than one Service's listeners
/// and target groups: the members of a load-balancer group must agree on them.
pub const WHOLE_LOAD_BALANCER: &[&str] =
    &[SUBNETS, SECURITY_GROUPS, CROSS_ZONE, DELETION_PROTECTION, EIP_ALLOCATIONS, PRIVATE_IPV4_ADDRESSES];

/// The TLS policy used when none is given: TLS 1.2 and 1.3 only.
pub const DEFAULT_SSL_POLICY: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";

/// The AWS-specific settings of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsOptions {
    /// Subnet IDs or names the user chose; empty means discover.
    pub subnets: Vec<String>,
    /// Security groups the user brings; empty means hawser manages one.
    pub security_groups: Vec<String>,
    /// The ACM certificate for TLS listeners.
    pub certificate: Option<String>,
    /// Listener ports that terminate TLS.
    pub tls_ports: BTreeSet<u16>,
    /// The TLS security policy.
    pub ssl_policy: String,
    /// Cross-zone load balancing.
    pub cross_zone: bool,
    /// Proxy protocol v2.
    pub proxy_protocol: bool,
    /// Deletion protection.
    pub deletion_protection: bool,
    /// Client IP preservation.
    pub preserve_client_ip: bool,
    /// Elastic IP allocations, one per subnet.
    pub eip_allocations: Vec<String>,
    /// Private IPv4 addresses, one per subnet.
    pub private_ipv4_addresses: Vec<Ipv4Addr>,
}

fn list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn boolean(key: &str, value: &str, errors: &mut Vec<InvalidField>) -> Option<bool> {
    match value.trim() {
        "true" => Some(true),
        "false" => Some(false),
        other => {
            errors.push(InvalidField::new(key, format!("{other:?} is not a boolean; use \"true\" or \"false\"")));
            None
        }
    }
}

fn ids(key: &str, value: &str, prefix: &str, what: &str, errors: &mut Vec<InvalidField>) -> Vec<String> {
    let items = list(value);
    if items.is_empty() {
        errors.push(InvalidField::new(
            key,
            format!("is empty; give one or more {what} IDs ({prefix}…), comma-separated"),
        ));
    }
    for item in &items {
        let ok = item
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
        if !ok {
            errors
                .push(InvalidField::new(key, format!("{item:?} is not a {what} ID ({prefix} followed by hex digits)")));
        }
    }
    items
}

/// Parses this provider's annotations of `spec` and checks them against the rest of the spec.
pub fn parse(spec: &LoadBalancerSpec) -> Result<AwsOptions, Vec<InvalidField>> {
    let a: &BTreeMap<String, String> = &spec.provider_annotations;
    let mut errors = Vec::new();
    for key in a.keys() {
        if key.starts_with("hawser.dev/aws-") && !ALL.contains(&key.as_str()) {
            errors.push(InvalidField::new(key, format!("unknown AWS annotation; known ones are {}", ALL.join(", "))));
        }
    }
    let get = |k: &str| a.get(k).map(String::as_str);

    let subnets = get(SUBNETS).map(list).unwrap_or_default();
    if get(SUBNETS).is_some() && subnets.is_empty() {
        errors.push(InvalidField::new(SUBNETS, "is empty; give subnet IDs (subnet-…) or Name tags, comma-separated"));
    }
    let security_groups =
        get(SECURITY_GROUPS).map(|v| ids(SECURITY_GROUPS, v, "sg-", "security group", &mut errors)).unwrap_or_default();
    if !security_groups.is_empty() && !spec.source_ranges.is_empty() {
        errors.push(InvalidField::new(
            SECURITY_GROUPS,
            "source ranges are enforced by the security group hawser manages; with your own security groups, allow the ranges in them and remove loadBalancerSourceRanges / hawser.dev/source-ranges",
        ));
    }

    let certificate = get(SSL_CERT).map(str::trim).map(str::to_owned);
    if let Some(cert) = &certificate {
        let parts: Vec<&str> = cert.split(':').collect();
        let ok =
            parts.len() == 6 && parts[0] == "arn" && (parts[2] == "acm" || parts[2] == "iam") && !parts[5].is_empty();
        if !ok {
            errors.push(InvalidField::new(
                SSL_CERT,
                format!("{cert:?} is not a certificate ARN; give one ACM certificate ARN (arn:aws:acm:<region>:<account>:certificate/<id>)"),
            ));
        }
    }
    let mut tls_ports = BTreeSet::new();
    match (get(SSL_PORTS), &certificate) {
        (Some(_), None) => {
            errors.push(InvalidField::new(SSL_PORTS, format!("needs a certificate; set {SSL_CERT} too")))
        }
        (Some(v), Some(_)) => {
            for item in list(v) {
                if item == "*" {
                    tls_ports.extend(spec.listeners.iter().filter(|l| l.protocol == Protocol::Tcp).map(|l| l.port));
                    continue;
                }
                let found: Vec<_> = spec
                    .listeners
                    .iter()
                    .filter(|l| item.parse::<u16>().ok() == Some(l.port) || (!l.name.is_empty() && l.name == item))
                    .collect();
                if found.is_empty() {
                    errors.push(InvalidField::new(
                        SSL_PORTS,
                        format!("{item:?} is not a port number or port name of this Service"),
                    ));
                }
                for l in found {
                    if l.protocol == Protocol::Tcp {
                        tls_ports.insert(l.port);
                    } else {
                        errors.push(InvalidField::new(
                            SSL_PORTS,
                            format!(
                                "port {} is {}; TLS is only possible on TCP-only ports",
                                l.port,
                                l.protocol.as_str()
                            ),
                        ));
                    }
                }
            }
            if list(v).is_empty() {
                errors.push(InvalidField::new(SSL_PORTS, "is empty; give port numbers or names, or *"));
            }
        }
        (None, Some(_)) => {
            // As the LBC does: a certificate alone means every TCP port terminates TLS.
            tls_ports.extend(spec.listeners.iter().filter(|l| l.protocol == Protocol::Tcp).map(|l| l.port));
        }
        (None, None) => {}
    }
    let ssl_policy = match get(SSL_NEGOTIATION_POLICY).map(str::trim) {
        Some(p) if certificate.is_none() => {
            errors.push(InvalidField::new(SSL_NEGOTIATION_POLICY, format!("{p:?} has no effect without {SSL_CERT}")));
            p.to_owned()
        }
        Some(p) if p.is_empty() || p.contains(char::is_whitespace) => {
            errors.push(InvalidField::new(
                SSL_NEGOTIATION_POLICY,
                "give an ELB security policy name, e.g. ELBSecurityPolicy-TLS13-1-2-2021-06",
            ));
            p.to_owned()
        }
        Some(p) => p.to_owned(),
        None => DEFAULT_SSL_POLICY.to_owned(),
    };

    let mut flag = |key: &str, default: bool| get(key).and_then(|v| boolean(key, v, &mut errors)).unwrap_or(default);
    let cross_zone = flag(CROSS_ZONE, false);
    let deletion_protection = flag(DELETION_PROTECTION, false);
    let preserve_client_ip = flag(PRESERVE_CLIENT_IP, true);
    let proxy_protocol = match get(PROXY_PROTOCOL).map(str::trim) {
        None | Some("false") => false,
        Some("true" | "*") => true,
        Some(other) => {
            errors.push(InvalidField::new(
                PROXY_PROTOCOL,
                format!("{other:?} is not accepted; use \"*\" or \"true\" (all ports) or \"false\""),
            ));
            false
        }
    };

    let eip_allocations = get(EIP_ALLOCATIONS)
        .map(|v| ids(EIP_ALLOCATIONS, v, "eipalloc-", "Elastic IP allocation", &mut errors))
        .unwrap_or_default();
    if !eip_allocations.is_empty() && spec.scheme != Scheme::InternetFacing {
        errors.push(InvalidField::new(
            EIP_ALLOCATIONS,
            "Elastic IPs need an internet-facing load balancer; remove hawser.dev/scheme: internal or this annotation",
        ));
    }
    let mut private_ipv4_addresses = Vec::new();
    if let Some(v) = get(PRIVATE_IPV4_ADDRESSES) {
        for item in list(v) {
            match item.parse::<Ipv4Addr>() {
                Ok(ip) => private_ipv4_addresses.push(ip),
                Err(_) => {
                    errors.push(InvalidField::new(PRIVATE_IPV4_ADDRESSES, format!("{item:?} is not an IPv4 address")))
                }
            }
        }
        if list(v).is_empty() {
            errors.push(InvalidField::new(PRIVATE_IPV4_ADDRESSES, "is empty; give one IPv4 address per subnet"));
        }
        if spec.scheme != Scheme::Internal {
            errors.push(InvalidField::new(
                PRIVATE_IPV4_ADDRESSES,
                "private addresses need an internal load balancer; set hawser.dev/scheme: internal",
            ));
        }
    }
    for (key, n) in [(EIP_ALLOCATIONS, eip_allocations.len()), (PRIVATE_IPV4_ADDRESSES, private_ipv4_addresses.len())] {
        if n > 0 && !subnets.is_empty() && n != subnets.len() {
            errors.push(InvalidField::new(
                key,
                format!("gives {n} values for {} subnets in {SUBNETS}; give one per subnet", subnets.len()),
            ));
        }
    }

    // Parts of the common spec that an NLB with instance targets cannot honour.
    if !spec.requested_addresses.is_empty() {
        errors.push(InvalidField::new(
            "hawser.dev/address",
            format!("an AWS NLB cannot take an arbitrary address; use {EIP_ALLOCATIONS} (internet-facing) or {PRIVATE_IPV4_ADDRESSES} (internal)"),
        ));
    }
    if !spec.ip_families.contains(&IpFamily::IPv4) {
        errors.push(InvalidField::new(
            "spec.ipFamilies",
            "an AWS NLB with instance targets needs IPv4 (IPv4 alone or dual-stack)",
        ));
    }
    for (i, l) in spec.listeners.iter().enumerate() {
        if l.node_port.is_none() {
            errors.push(InvalidField::new(
                format!("spec.ports[{i}].nodePort"),
                "AWS NLB instance targets need a node port; do not set allocateLoadBalancerNodePorts: false",
            ));
        }
    }
    if errors.is_empty() {
        Ok(AwsOptions {
            subnets,
            security_groups,
            certificate,
            tls_ports,
            ssl_policy,
            cross_zone,
            proxy_protocol,
            deletion_protection,
            preserve_client_ip,
            eip_allocations,
            private_ipv4_addresses,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::aws::testutil::spec;

    fn with(pairs: &[(&str, &str)]) -> LoadBalancerSpec {
        let mut s = spec();
        for (k, v) in pairs {
            s.provider_annotations.insert((*k).to_owned(), (*v).to_owned());
        }
        s
    }

    fn ok(pairs: &[(&str, &str)]) -> AwsOptions {
        parse(&with(pairs)).unwrap()
    }

    fn err(s: &LoadBalancerSpec) -> String {
        parse(s).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }

    const CERT: &str = "arn:aws:acm:us-east-1:123456789012:certificate/abc";

    #[test]
    fn defaults() {
        let o = ok(&[]);
        assert!(o.subnets.is_empty() && o.security_groups.is_empty() && o.tls_ports.is_empty());
        assert!(!o.cross_zone && !o.proxy_protocol && !o.deletion_protection && o.preserve_client_ip);
        assert_eq!(o.ssl_policy, DEFAULT_SSL_POLICY);
    }

    #[test]
    fn every_annotation_parses() {
        // The test spec has ports 80/TCP "http", 443/TCP "https", 53/TCP_UDP "dns".
        type Check = dyn Fn(&AwsOptions) -> bool;
        let cases: &[(&str, &str, &Check)] = &[
            (SUBNETS, "subnet-0a, public-b", &|o| o.subnets == ["subnet-0a", "public-b"]),
            (SECURITY_GROUPS, "sg-01,sg-02", &|o| o.security_groups == ["sg-01", "sg-02"]),
            (SSL_CERT, CERT, &|o| o.certificate.as_deref() == Some(CERT) && o.tls_ports == BTreeSet::from([80, 443])),
            (CROSS_ZONE, "true", &|o| o.cross_zone),
            (PROXY_PROTOCOL, "*", &|o| o.proxy_protocol),
            (PROXY_PROTOCOL, "false", &|o| !o.proxy_protocol),
            (DELETION_PROTECTION, "true", &|o| o.deletion_protection),
            (PRESERVE_CLIENT_IP, "false", &|o| !o.preserve_client_ip),
            (EIP_ALLOCATIONS, "eipalloc-1,eipalloc-2", &|o| o.eip_allocations.len() == 2),
        ];
        for (k, v, check) in cases {
            assert!(check(&ok(&[(k, v)])), "{k}={v}");
        }
        let o = ok(&[(SSL_CERT, CERT), (SSL_PORTS, "https"), (SSL_NEGOTIATION_POLICY, "ELBSecurityPolicy-2016-08")]);
        assert_eq!(o.tls_ports, BTreeSet::from([443]));
        assert_eq!(o.ssl_policy, "ELBSecurityPolicy-2016-08");
        assert_eq!(ok(&[(SSL_CERT, CERT), (SSL_PORTS, "80")]).tls_ports, BTreeSet::from([80]));
        let mut s = with(&[(PRIVATE_IPV4_ADDRESSES, "10.0.1.10, 10.0.2.10")]);
        s.scheme = Scheme::Internal;
        assert_eq!(parse(&s).unwrap().private_ipv4_addresses.len(), 2);
    }

    #[test]
    fn bad_values_name_the_annotation_and_what_is_accepted() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(CROSS_ZONE, "yes")], "hawser.dev/aws-cross-zone: \"yes\" is not a boolean"),
            (&[(DELETION_PROTECTION, "1")], "hawser.dev/aws-deletion-protection: \"1\" is not a boolean"),
            (&[(PRESERVE_CLIENT_IP, "")], "hawser.dev/aws-preserve-client-ip: \"\" is not a boolean"),
            (&[(PROXY_PROTOCOL, "v1")], "hawser.dev/aws-proxy-protocol: \"v1\" is not accepted; use \"*\""),
            (&[(SUBNETS, " , ")], "hawser.dev/aws-subnets: is empty"),
            (&[(SECURITY_GROUPS, "default")], "hawser.dev/aws-security-groups: \"default\" is not a security group ID"),
            (&[(SSL_CERT, "mycert")], "hawser.dev/aws-ssl-cert: \"mycert\" is not a certificate ARN"),
            (&[(SSL_PORTS, "443")], "hawser.dev/aws-ssl-ports: needs a certificate"),
            (&[(SSL_CERT, CERT), (SSL_PORTS, "8443")], "\"8443\" is not a port number or port name"),
            (&[(SSL_CERT, CERT), (SSL_PORTS, "dns")], "port 53 is TCP_UDP; TLS is only possible on TCP-only ports"),
            (&[(SSL_NEGOTIATION_POLICY, "x")], "has no effect without hawser.dev/aws-ssl-cert"),
            (&[(EIP_ALLOCATIONS, "1.2.3.4")], "\"1.2.3.4\" is not a Elastic IP allocation ID"),
            (&[(PRIVATE_IPV4_ADDRESSES, "10.0.0.1")], "private addresses need an internal load balancer"),
            (&[(SUBNETS, "subnet-1"), (EIP_ALLOCATIONS, "eipalloc-1,eipalloc-2")], "gives 2 values for 1 subnets"),
            (&[("hawser.dev/aws-subnet", "x")], "hawser.dev/aws-subnet: unknown AWS annotation"),
        ];
        for (pairs, want) in cases {
            let got = err(&with(pairs));
            assert!(got.contains(want), "{pairs:?}: {got}");
        }
        let mut s = with(&[(EIP_ALLOCATIONS, "eipalloc-1")]);
        s.scheme = Scheme::Internal;
        assert!(err(&s).contains("Elastic IPs need an internet-facing"));
        let mut s = with(&[(PRIVATE_IPV4_ADDRESSES, "10.0.0.x")]);
        s.scheme = Scheme::Internal;
        assert!(err(&s).contains("\"10.0.0.x\" is not an IPv4 address"));
        let mut s = with(&[(SECURITY_GROUPS, "sg-1")]);
        s.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(err(&s).contains("source ranges are enforced by the security group hawser manages"));
    }

    #[test]
    fn spec_parts_an_nlb_cannot_honour() {
        let mut s = spec();
        s.requested_addresses = vec!["1.2.3.4".parse().unwrap()];
        assert!(err(&s).contains("hawser.dev/address: an AWS NLB cannot take an arbitrary address"));
        let mut s = spec();
        s.ip_families = vec![IpFamily::IPv6];
        assert!(err(&s).contains("spec.ipFamilies"));
        let mut s = spec();
        s.listeners[1].node_port = None;
        assert!(err(&s).contains("spec.ports[1].nodePort"));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let errs = parse(&with(&[(CROSS_ZONE, "x"), (DELETION_PROTECTION, "y")])).unwrap_err();
        assert_eq!(errs.len(), 2);
    }
}
