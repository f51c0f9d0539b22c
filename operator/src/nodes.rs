//! Which Nodes may receive load-balancer traffic.

use std::net::IpAddr;

use hawser_providers::Target;
use k8s_openapi::api::core::v1::Node;

/// Label that opts a Node out of every external load balancer (upstream Kubernetes).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// Taint the cluster autoscaler puts on a Node it is about to delete.
pub const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// Taint Karpenter puts on a Node it is disrupting.
pub const KARPENTER_DISRUPTED_TAINT: &str = "karpenter.sh/disrupted";
const CONTROL_PLANE_LABELS: &[&str] = &["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"];
const ZONE_LABELS: &[&str] = &["topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"];

/// How Nodes are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// Whether control-plane Nodes may be targets.
    pub include_control_plane: bool,
}

/// Why a Node is not a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// Its Ready condition is not True.
    NotReady,
    /// It carries the exclusion label.
    Excluded,
    /// It is being deleted.
    Deleting,
    /// An autoscaler is removing it.
    BeingRemoved,
    /// It is a control-plane Node.
    ControlPlane,
}

/// The Node as a target, or why it is not one.
pub fn eligibility(node: &Node, policy: NodePolicy) -> Result<Target, Ineligible> {
    let meta = &node.metadata;
    if meta.deletion_timestamp.is_some() {
        return Err(Ineligible::Deleting);
    }
    let labels = meta.labels.as_ref();
    let has_label = |l: &str| labels.is_some_and(|m| m.contains_key(l));
    if has_label(EXCLUDE_LABEL) {
        return Err(Ineligible::Excluded);
    }
    if !policy.include_control_plane && CONTROL_PLANE_LABELS.iter().any(|l| has_label(l)) {
        return Err(Ineligible::ControlPlane);
    }
    let spec = node.spec.as_ref();
    let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|taints| {
        taints.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT || t.key == KARPENTER_DISRUPTED_TAINT)
    });
    if tainted {
        return Err(Ineligible::BeingRemoved);
    }
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err(Ineligible::NotReady);
    }
    let mut addresses: Vec<IpAddr> = status
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| addrs.iter().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect())
        .unwrap_or_default();
    addresses.sort();
    Ok(Target {
        name: meta.name.clone().unwrap_or_default(),
        provider_id: spec.and_then(|s| s.provider_id.clone()),
        zone: ZONE_LABELS.iter().find_map(|l| labels.and_then(|m| m.get(*l)).cloned()),
        addresses,
    })
}

/// The eligible Nodes as targets, sorted by name.
pub fn eligible_targets<'a>(nodes: impl IntoIterator<Item = &'a Node>, policy: NodePolicy) -> Vec<Target> {
    let mut targets: Vec<Target> = nodes.into_iter().filter_map(|n| eligibility(n, policy).ok()).collect();
    targets.sort();
    targets
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    use crate::testutil::merge;

    fn node(extra: serde_json::Value) -> Node {
        let mut base = json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"providerID": "aws:///zone-a/i-1"},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}, {"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "198.51.100.2"}]
            }
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn ready_node_is_a_target_with_internal_addresses_zone_and_provider_id() {
        let t = eligibility(&node(json!({})), NodePolicy::default()).unwrap();
        assert_eq!(t.name, "n1");
        assert_eq!(t.zone.as_deref(), Some("zone-a"));
        assert_eq!(t.provider_id.as_deref(), Some("aws:///zone-a/i-1"));
        assert_eq!(t.addresses, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn ineligible_nodes_are_excluded_for_the_right_reason() {
        let cp = json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}});
        let cases = [
            (json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}), Ineligible::NotReady),
            (json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}), Ineligible::NotReady),
            (json!({"status": {"conditions": []}}), Ineligible::NotReady),
            (json!({"metadata": {"labels": {EXCLUDE_LABEL: "true"}}}), Ineligible::Excluded),
            (json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}), Ineligible::Deleting),
            (
                json!({"spec": {"taints": [{"key": AUTOSCALER_DELETION_TAINT, "effect": "NoSchedule"}]}}),
                Ineligible::BeingRemoved,
            ),
            (
                json!({"spec": {"taints": [{"key": KARPENTER_DISRUPTED_TAINT, "effect": "NoSchedule"}]}}),
                Ineligible::BeingRemoved,
            ),
            (cp.clone(), Ineligible::ControlPlane),
            (json!({"metadata": {"labels": {"node-role.kubernetes.io/master": ""}}}), Ineligible::ControlPlane),
        ];
        for (patch, reason) in cases {
            assert_eq!(eligibility(&node(patch.clone()), NodePolicy::default()), Err(reason), "{patch}");
        }
        assert!(eligibility(&node(cp), NodePolicy { include_control_plane: true }).is_ok());
        let other_taint = json!({"spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule"}]}});
        assert!(eligibility(&node(other_taint), NodePolicy::default()).is_ok(), "ordinary taints do not matter");
    }

    #[test]
    fn eligible_targets_are_sorted_and_filtered() {
        let b = node(json!({"metadata": {"name": "b"}}));
        let a = node(json!({"metadata": {"name": "a"}}));
        let bad = node(json!({"metadata": {"name": "c", "labels": {EXCLUDE_LABEL: ""}}}));
        let names: Vec<_> =
            eligible_targets([&b, &bad, &a], NodePolicy::default()).into_iter().map(|t| t.name).collect();
        assert_eq!(names, vec!["a", "b"]);
    }
}
