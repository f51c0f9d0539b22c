//! Which Nodes may receive load-balancer traffic.
//!
//! Readiness is deliberately not a criterion (KEP-3458, Kubernetes 1.30's
//! `StableLoadBalancerNodeSet`): a node whose kubelet stops reporting is not a node whose
//! forwarding stopped, and the load balancer's own health check already takes a node that cannot
//! serve out of rotation within seconds. Reprogramming every load balancer of the cluster on each
//! readiness flap costs cloud calls per Service per flap (the storms of kubernetes #111539) and
//! drops connections that the node could still have served.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hawser_providers::{Target, Targets};
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

/// The eligible Nodes, kept up to date one Node event at a time. Only a Node's target (name,
/// provider ID, zone, internal addresses) is kept, never the Node: that is all a load balancer
/// needs, and a fraction of the memory. The shared [`Targets`] list is rebuilt only when the
/// set really changed, and every Service's spec then points at that one list.
#[derive(Debug, Default)]
pub struct TargetSet {
    policy: NodePolicy,
    eligible: BTreeMap<String, Target>,
    shared: Targets,
}

impl TargetSet {
    /// An empty set choosing Nodes by `policy`.
    pub fn new(policy: NodePolicy) -> Self {
        Self { policy, ..Self::default() }
    }

    /// A Node was added or changed. True when the eligible set changed.
    pub fn apply(&mut self, node: &Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        match eligibility(node, self.policy) {
            Ok(target) if self.eligible.get(&name) == Some(&target) => false,
            Ok(target) => {
                self.eligible.insert(name, target);
                self.publish();
                true
            }
            Err(_) => self.delete(&name),
        }
    }

    /// A Node is gone. True when it was eligible.
    pub fn delete(&mut self, name: &str) -> bool {
        let removed = self.eligible.remove(name).is_some();
        if removed {
            self.publish();
        }
        removed
    }

    /// Replaces everything with the eligible Nodes of a fresh listing (a watch restart), as
    /// [`eligibility`] made them. True when the set changed.
    pub fn replace(&mut self, targets: impl IntoIterator<Item = Target>) -> bool {
        let fresh: BTreeMap<String, Target> = targets.into_iter().map(|t| (t.name.clone(), t)).collect();
        if fresh == self.eligible {
            return false;
        }
        self.eligible = fresh;
        self.publish();
        true
    }

    /// The eligible Nodes as targets, sorted by name; cheap to clone.
    pub fn targets(&self) -> Targets {
        self.shared.clone()
    }

    fn publish(&mut self) {
        self.shared = self.eligible.values().cloned().collect();
    }
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
    fn readiness_does_not_decide_eligibility() {
        for ready in ["False", "Unknown"] {
            let n = node(json!({"status": {"conditions": [{"type": "Ready", "status": ready}]}}));
            assert!(eligibility(&n, NodePolicy::default()).is_ok(), "Ready={ready} stays a target");
        }
        let unknown = node(json!({"status": {"conditions": []}}));
        assert!(eligibility(&unknown, NodePolicy::default()).is_ok(), "no conditions yet stays a target");
    }

    #[test]
    fn target_set_changes_only_when_membership_or_a_target_changes() {
        let mut set = TargetSet::new(NodePolicy::default());
        assert!(set.apply(&node(json!({"metadata": {"name": "a"}}))), "a new node joins");
        assert!(set.apply(&node(json!({"metadata": {"name": "b"}}))));
        let before = set.targets();
        let flap =
            node(json!({"metadata": {"name": "a"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}));
        assert!(!set.apply(&flap), "a Ready flap changes nothing");
        let heartbeat = node(json!({"metadata": {"name": "a", "resourceVersion": "99"}}));
        assert!(!set.apply(&heartbeat), "a heartbeat changes nothing");
        assert!(set.targets().ptr_eq(&before), "and the shared list is the very same one");

        let excluded = node(json!({"metadata": {"name": "a", "labels": {EXCLUDE_LABEL: ""}}}));
        assert!(set.apply(&excluded), "the exclusion label takes it out");
        assert_eq!(set.targets().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
        assert!(!set.delete("a"), "already out");
        let moved = node(
            json!({"metadata": {"name": "b"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.9"}]}}),
        );
        assert!(set.apply(&moved), "a new address is a new target");
        assert!(set.delete("b"));
        assert!(set.targets().is_empty());

        let target =
            |name: &str| eligibility(&node(json!({"metadata": {"name": name}})), NodePolicy::default()).unwrap();
        assert!(set.replace([target("c"), target("a")]), "a relist replaces everything");
        assert!(!set.replace([target("a"), target("c")]), "the same relist changes nothing");
        assert_eq!(set.targets().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["a", "c"]);
    }

    #[test]
    fn eligible_targets_are_sorted_and_filtered() {
        let mut set = TargetSet::new(NodePolicy::default());
        set.apply(&node(json!({"metadata": {"name": "b"}})));
        set.apply(&node(json!({"metadata": {"name": "c", "labels": {EXCLUDE_LABEL: ""}}})));
        set.apply(&node(json!({"metadata": {"name": "a"}})));
        let names: Vec<_> = set.targets().iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, vec!["a", "b"]);
    }
}
