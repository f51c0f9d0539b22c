//! Deterministic AWS names (at most 32 characters) from the cluster and the Service UID.
//!
//! Names only prevent duplicates after a crash (AWS answers a repeated create of the same name
//! and settings with the existing resource); ownership is always decided by tags.

use crate::{Protocol, ServiceIdentity, stable_hash};

/// Prefix of every AWS name hawser gives; `list_owned` reads tags only of load balancers with it.
pub const NAME_PREFIX: &str = "hawser-";

/// The load balancer's name: `hawser-` and 16 hex digits (23 characters).
pub fn load_balancer_name(id: &ServiceIdentity) -> String {
    format!("{NAME_PREFIX}{}", stable_hash(&[&id.cluster, &id.uid], 16))
}

/// The managed frontend security group's name (unique per VPC).
pub fn security_group_name(id: &ServiceIdentity) -> String {
    format!("{NAME_PREFIX}{}", stable_hash(&[&id.cluster, &id.uid], 16))
}

/// What every target group name of a Service starts with, so that target groups left behind
/// by a crash can be found without reading every target group's tags.
pub fn target_group_prefix(id: &ServiceIdentity) -> String {
    format!("{NAME_PREFIX}{}-", stable_hash(&[&id.cluster, &id.uid], 10))
}

/// A target group's name (26 characters). It changes with everything AWS cannot change in place
/// (protocol, port), so such a change creates a new target group rather than failing.
pub fn target_group_name(id: &ServiceIdentity, listener_port: u16, protocol: Protocol, node_port: u16) -> String {
    let part = stable_hash(&[&listener_port.to_string(), protocol.as_str(), &node_port.to_string()], 8);
    format!("{}{part}", target_group_prefix(id))
}

/// The load balancer of load-balancer group `group` (`namespace/name`): `hawser-g-` and 14 hex
/// digits (23 characters). `g` is no hex digit, so it never meets a Service's name.
pub fn group_load_balancer_name(cluster: &str, group: &str) -> String {
    format!("{NAME_PREFIX}g-{}", stable_hash(&[cluster, group], 14))
}

/// The frontend security group of load-balancer group `group` (unique per VPC).
pub fn group_security_group_name(cluster: &str, group: &str) -> String {
    group_load_balancer_name(cluster, group)
}

/// What every target group of a Service's part of a group's load balancer starts with. It
/// differs from [`target_group_prefix`] (an NLB target group serves one load balancer, and a
/// Service moving into or out of a group is served by both for a while) and does not depend on
/// the group, so the parts are found from the Service alone.
pub fn member_target_group_prefix(id: &ServiceIdentity) -> String {
    format!("{NAME_PREFIX}{}-", stable_hash(&[&id.cluster, &id.uid, "member"], 10))
}

/// A target group of a Service's part of a group's load balancer (26 characters).
pub fn member_target_group_name(
    id: &ServiceIdentity,
    listener_port: u16,
    protocol: Protocol,
    node_port: u16,
) -> String {
    let part = stable_hash(&[&listener_port.to_string(), protocol.as_str(), &node_port.to_string()], 8);
    format!("{}{part}", member_target_group_prefix(id))
}

/// Whether the target group ARN `arn` is named with `prefix`
/// (`arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID`).
pub fn target_group_arn_has_prefix(arn: &str, prefix: &str) -> bool {
    arn.split_once(":targetgroup/").is_some_and(|(_, rest)| rest.starts_with(prefix))
}

/// The EC2 instance ID in a Node's `providerID` (`aws:///us-east-1a/i-0abc…`).
pub fn instance_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    let valid = id.strip_prefix("i-").is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
    valid.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uid: &str) -> ServiceIdentity {
        ServiceIdentity { cluster: "prod".into(), namespace: "ns".into(), name: "web".into(), uid: uid.into() }
    }

    #[test]
    fn names_fit_aws_limits_and_are_stable() {
        let a = id("4f1c2a8e-0000-4000-8000-000000000001");
        for name in
            [load_balancer_name(&a), security_group_name(&a), target_group_name(&a, 65535, Protocol::TcpUdp, 32767)]
        {
            assert!(name.len() <= 32, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{name}");
            assert!(!name.ends_with('-'));
        }
        assert_eq!(load_balancer_name(&a), load_balancer_name(&a));
        assert_ne!(load_balancer_name(&a), load_balancer_name(&id("other")));
        let tg = target_group_name(&a, 80, Protocol::Tcp, 30080);
        assert!(tg.starts_with(&target_group_prefix(&a)));
        assert_ne!(tg, target_group_name(&a, 80, Protocol::Udp, 30080), "a protocol change is a new target group");
        assert_ne!(tg, target_group_name(&a, 80, Protocol::Tcp, 30081), "a node port change is a new target group");
    }

    #[test]
    fn group_names_fit_and_never_meet_a_services_names() {
        let a = id("4f1c2a8e-0000-4000-8000-000000000001");
        let lb = group_load_balancer_name("prod", "ns/shared");
        assert_eq!(lb.len(), 23);
        assert!(lb.starts_with("hawser-g-"));
        assert_ne!(lb, group_load_balancer_name("prod", "other/shared"), "groups never cross namespaces");
        assert_ne!(lb, group_load_balancer_name("staging", "ns/shared"));
        let member = member_target_group_name(&a, 80, Protocol::Tcp, 30080);
        assert_eq!(member.len(), 26);
        assert!(member.starts_with(&member_target_group_prefix(&a)));
        assert!(!member.starts_with(&target_group_prefix(&a)), "a group part never takes the own target group's name");
        let arn = format!("arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{member}/50dc6c495c0c9188");
        assert!(target_group_arn_has_prefix(&arn, &member_target_group_prefix(&a)));
        assert!(!target_group_arn_has_prefix(&arn, &target_group_prefix(&a)));
    }

    #[test]
    fn instance_ids_from_provider_ids() {
        let cases = [
            ("aws:///us-east-1a/i-0abc123", Some("i-0abc123")),
            ("aws:///i-0abc123", Some("i-0abc123")),
            ("aws://us-east-1a/i-0abc", Some("i-0abc")),
            ("gce://p/z/n", None),
            ("aws:///us-east-1a/fargate-ip-10-0-0-1", None),
            ("aws:///us-east-1a/i-", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(instance_id(input), want, "{input}");
        }
    }
}
