//! Load-balancer groups on the mock cloud: one load balancer and one address shared by the
//! Services of a group, each Service's listeners, health check, source ranges and affinity kept
//! as its own part, so that changing or removing one member touches no other.

use std::collections::BTreeMap;

use super::state::{CloudState, MemberPart, MockLoadBalancer, member_fingerprint};
use super::{MockCloud, next_id, ports_of, status_with, vanished};
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_GROUP, OWNERSHIP_TAG_RESOURCE};
use crate::{LoadBalancerSpec, LoadBalancerStatus, ProviderError, ServiceIdentity, stable_hash};

/// The group of a spec as `namespace/name`, the key the cloud knows it by.
pub(super) fn group_key(spec: &LoadBalancerSpec) -> Option<String> {
    spec.group.as_ref().map(|g| format!("{}/{g}", spec.identity.namespace))
}

/// The deterministic name of a group's load balancer.
pub(super) fn group_lb_name(cluster: &str, group: &str) -> String {
    format!("hawser-g-{}", stable_hash(&[cluster, group], 14))
}

/// The part of a group's load balancer that belongs to `spec`'s Service.
pub(super) fn part_of(spec: &LoadBalancerSpec) -> MemberPart {
    MemberPart {
        service: spec.identity.service_key(),
        listeners: spec.listeners.clone(),
        health_check: spec.health_check.clone(),
        source_ranges: spec.source_ranges.clone(),
        session_affinity: spec.session_affinity,
    }
}

/// The fingerprint `list_owned` reports for `spec`'s part once it is ensured.
pub(super) fn fingerprint_of_member(spec: &LoadBalancerSpec) -> Option<String> {
    let group = group_key(spec)?;
    Some(member_fingerprint(&part_of(spec), &spec.targets, spec.scheme, Some(&group)))
}

/// The group's load balancer with `members` as its parts: the listeners of all of them, the
/// shared settings from the member being ensured (the operator has checked that members agree).
fn group_record(
    current: Option<&MockLoadBalancer>,
    (id, name): (String, String),
    (cluster, group): (&str, &str),
    spec: &LoadBalancerSpec,
    addresses: Vec<std::net::IpAddr>,
    members: BTreeMap<String, MemberPart>,
) -> MockLoadBalancer {
    let mut listeners: Vec<_> = members.values().flat_map(|m| m.listeners.iter().cloned()).collect();
    listeners.sort_by(|a, b| (a.port, a.protocol.as_str()).cmp(&(b.port, b.protocol.as_str())));
    let tags = BTreeMap::from([
        (OWNERSHIP_TAG_CLUSTER.to_owned(), cluster.to_owned()),
        (OWNERSHIP_TAG_GROUP.to_owned(), group.to_owned()),
        (OWNERSHIP_TAG_RESOURCE.to_owned(), "load-balancer".to_owned()),
    ]);
    MockLoadBalancer {
        id,
        name,
        tags,
        addresses,
        listeners,
        targets: spec.targets.clone(),
        health_check: spec.health_check.clone(),
        scheme: spec.scheme,
        source_ranges: Vec::new(),
        session_affinity: crate::SessionAffinity::None,
        revision: current.map_or(1, |c| c.revision + 1),
        group: Some(group.to_owned()),
        members,
    }
}

/// What one member sees: the group's addresses, and only its own ports.
pub(super) fn member_status(lb: &MockLoadBalancer, uid: &str) -> LoadBalancerStatus {
    status_with(lb, lb.members.get(uid).map(|m| ports_of(&m.listeners)).unwrap_or_default())
}

/// Whether the group's load balancer already holds `spec`'s part as ensure would leave it.
fn is_current(lb: &MockLoadBalancer, spec: &LoadBalancerSpec) -> bool {
    lb.members.get(&spec.identity.uid) == Some(&part_of(spec)) && lb.targets == spec.targets
}

impl MockCloud {
    /// Ensures `spec`'s part of its group's load balancer (creating the load balancer with the
    /// first member), then removes the Service's own load balancer if it had one: a Service
    /// moving into a group keeps its old address until the group's address serves it.
    pub(super) async fn ensure_member(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        let (Some(group), cluster) = (group_key(spec), self.config.cluster.clone()) else {
            return Err(ProviderError::Fatal("ensure_member without a group".into()));
        };
        let identity = &spec.identity;
        let uid = identity.uid.clone();
        let name = group_lb_name(&cluster, &group);
        let (existing, own) = self
            .call("DescribeLoadBalancers", None, false, |state| {
                Ok((state.of_group(&cluster, &group).cloned(), state.owned_by(identity).map(|lb| lb.id.clone())))
            })
            .await?;
        let status = match existing {
            Some(lb) if is_current(&lb, spec) => member_status(&lb, &uid),
            Some(lb) => {
                let id = lb.id.clone();
                self.call("ModifyLoadBalancer", Some(&id), true, |state| {
                    let Some(current) = state.get(&id).cloned() else { return Err(vanished(&id)) };
                    let addresses = self.choose_addresses(state, spec, Some(&current))?;
                    let mut members = current.members.clone();
                    members.insert(uid.clone(), part_of(spec));
                    let updated = group_record(
                        Some(&current),
                        (id.clone(), current.name.clone()),
                        (&cluster, &group),
                        spec,
                        addresses,
                        members,
                    );
                    let status = member_status(&updated, &uid);
                    state.insert(updated);
                    Ok(status)
                })
                .await?
            }
            None => {
                self.call("CreateLoadBalancer", Some(&name), true, |state| {
                    // Re-checked inside the call: another member may have created it meanwhile.
                    if let Some(lb) = state.of_group(&cluster, &group) {
                        if is_current(lb, spec) {
                            return Ok(member_status(lb, &uid));
                        }
                        return Err(ProviderError::Transient(format!(
                            "the load balancer of group {group} was created meanwhile; trying again"
                        )));
                    }
                    if let Some(foreign) = state.named(&name) {
                        return Err(ProviderError::Conflict(format!(
                            "a load balancer named {name} already exists ({}) and is not the load balancer of group \
                             {group} of cluster {cluster}; it is left untouched",
                            foreign.id
                        )));
                    }
                    let addresses = self.choose_addresses(state, spec, None)?;
                    let id = next_id(state);
                    let members = BTreeMap::from([(uid.clone(), part_of(spec))]);
                    let lb = group_record(None, (id, name.clone()), (&cluster, &group), spec, addresses, members);
                    let status = member_status(&lb, &uid);
                    state.insert(lb);
                    Ok(status)
                })
                .await?
            }
        };
        if let Some(id) = own {
            self.call("DeleteLoadBalancer", Some(&id), true, |state| {
                state.remove(&id);
                Ok(())
            })
            .await?;
        }
        Ok(status)
    }

    /// Removes `identity`'s part from the group load balancer `lb` (as just described); with
    /// the last member the load balancer goes too.
    pub(super) async fn leave_group_lb(
        &self,
        lb: &MockLoadBalancer,
        identity: &ServiceIdentity,
    ) -> Result<(), ProviderError> {
        let last = lb.members.keys().all(|uid| *uid == identity.uid);
        let operation = if last { "DeleteLoadBalancer" } else { "ModifyLoadBalancer" };
        self.call(operation, Some(&lb.id), true, |state| {
            leave(state, &lb.id, &identity.uid);
            Ok(())
        })
        .await
    }
}

/// Takes member `uid` out of load balancer `id`, deleting it when no member is left.
fn leave(state: &mut CloudState, id: &str, uid: &str) {
    let Some(mut lb) = state.get(id).cloned() else { return };
    lb.members.remove(uid);
    if lb.members.is_empty() {
        state.remove(id);
        return;
    }
    let mut listeners: Vec<_> = lb.members.values().flat_map(|m| m.listeners.iter().cloned()).collect();
    listeners.sort_by(|a, b| (a.port, a.protocol.as_str()).cmp(&(b.port, b.protocol.as_str())));
    lb.listeners = listeners;
    lb.revision += 1;
    state.insert(lb);
}
