//! Whose load balancer an AWS call works on: a Service's own, or the one its load-balancer group
//! shares. A group's load balancer and frontend security group belong to the group (tagged with
//! it, named from it); listeners, target groups and rules are each member's part.

use std::collections::BTreeMap;

use super::naming;
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_GROUP, OWNERSHIP_TAG_SERVICE_UID};
use crate::{LoadBalancerSpec, ServiceIdentity};

/// A Service's own load balancer, or its part of its group's.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scope<'a> {
    /// The Service's own load balancer.
    Own(&'a ServiceIdentity),
    /// The Service's part of group `group`'s (`namespace/name`) load balancer.
    Member { id: &'a ServiceIdentity, group: &'a str },
}

impl<'a> Scope<'a> {
    /// The scope `spec` asks for; `group` holds its group key (see [`super::plan::group_key`]).
    pub(super) fn of(spec: &'a LoadBalancerSpec, group: Option<&'a str>) -> Self {
        match group {
            Some(group) => Scope::Member { id: &spec.identity, group },
            None => Scope::Own(&spec.identity),
        }
    }

    /// The Service.
    pub(super) fn id(&self) -> &'a ServiceIdentity {
        match self {
            Scope::Own(id) | Scope::Member { id, .. } => id,
        }
    }

    /// The group, for a member.
    pub(super) fn group(&self) -> Option<&'a str> {
        match self {
            Scope::Own(_) => None,
            Scope::Member { group, .. } => Some(group),
        }
    }

    /// The load balancer's (and the managed frontend group's) deterministic name.
    pub(super) fn load_balancer_name(&self) -> String {
        match self {
            Scope::Own(id) => naming::load_balancer_name(id),
            Scope::Member { id, group } => naming::group_load_balancer_name(&id.cluster, group),
        }
    }

    /// Whether `tags` make the load balancer or frontend group the one of this scope.
    pub(super) fn owns(&self, tags: &BTreeMap<String, String>) -> bool {
        match self {
            Scope::Own(id) => {
                tags.get(OWNERSHIP_TAG_CLUSTER) == Some(&id.cluster)
                    && tags.get(OWNERSHIP_TAG_SERVICE_UID) == Some(&id.uid)
            }
            Scope::Member { id, group } => shared_by(tags, &id.cluster, group),
        }
    }

    /// Who owns the load balancer, for messages.
    pub(super) fn owner(&self) -> String {
        match self {
            Scope::Own(id) => format!("Service {} of cluster {}", id.service_key(), id.cluster),
            Scope::Member { id, group } => format!("load-balancer group {group} of cluster {}", id.cluster),
        }
    }

    /// The tag filters that find the managed frontend group.
    pub(super) fn frontend_filters(&self) -> [(&'static str, &'a str); 2] {
        match self {
            Scope::Own(id) => [(OWNERSHIP_TAG_CLUSTER, &id.cluster), (OWNERSHIP_TAG_SERVICE_UID, &id.uid)],
            Scope::Member { id, group } => [(OWNERSHIP_TAG_CLUSTER, &id.cluster), (OWNERSHIP_TAG_GROUP, group)],
        }
    }

    /// The description of the Service's ingress rules on the frontend group. A member's rules
    /// are told from the other members' by it, so it carries the UID: a Service deleted and
    /// created again under its name is another member.
    pub(super) fn frontend_rule_description(&self) -> String {
        match self {
            Scope::Own(id) => format!("hawser {}", id.service_key()),
            Scope::Member { id, .. } => format!("hawser {} {}", id.service_key(), id.uid),
        }
    }

    /// The description of the rules on the node groups. A group's node rules serve every
    /// member's node ports (members may share a health port), so they are the group's.
    pub(super) fn node_rule_description(&self) -> String {
        match self {
            Scope::Own(id) => super::ensure::node_rule_description(id),
            Scope::Member { group, .. } => format!("hawser group {group} load balancer to nodes"),
        }
    }

    /// What the names of the Service's target groups in this scope start with.
    pub(super) fn target_group_prefix(&self) -> String {
        match self {
            Scope::Own(id) => naming::target_group_prefix(id),
            Scope::Member { id, .. } => naming::member_target_group_prefix(id),
        }
    }
}

/// Whether `tags` make a resource the shared one of `group` in `cluster`.
pub(super) fn shared_by(tags: &BTreeMap<String, String>, cluster: &str, group: &str) -> bool {
    tags.get(OWNERSHIP_TAG_CLUSTER).map(String::as_str) == Some(cluster)
        && tags.get(OWNERSHIP_TAG_GROUP).map(String::as_str) == Some(group)
        && !tags.contains_key(OWNERSHIP_TAG_SERVICE_UID)
}
