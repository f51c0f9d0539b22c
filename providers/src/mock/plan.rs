//! The mock cloud's plan: what [`MockCloud::ensure`] and [`MockCloud::delete`] would change,
//! found with one read.

use std::net::IpAddr;

use super::group::{group_key, group_lb_name, part_of};
use super::state::{CloudState, MockLoadBalancer};
use super::{MockCloud, describe_owner, desired_record};
use crate::changes::{Action, Change, ChangePlan, listed, membership, shown};
use crate::{IpFamily, Listener, LoadBalancerSpec, ProviderError, ServiceIdentity, SessionAffinity};

const KIND: &str = "load balancer";

fn listener(l: &Listener) -> String {
    match l.node_port {
        Some(np) => format!("{}/{} (node port {np})", l.port, l.protocol.as_str()),
        None => format!("{}/{}", l.port, l.protocol.as_str()),
    }
}

fn affinity(a: SessionAffinity) -> String {
    match a {
        SessionAffinity::None => "None".to_owned(),
        SessionAffinity::ClientIp { timeout } => format!("ClientIP ({}s)", timeout.as_secs()),
    }
}

fn show_addresses(list: &[Result<IpAddr, String>]) -> Option<String> {
    listed(list.iter().map(|a| match a {
        Ok(ip) => ip.to_string(),
        Err(pending) => pending.clone(),
    }))
}

/// The change to the group load balancer `identity` is a member of, when it leaves.
fn plan_leaving(state: &CloudState, identity: &ServiceIdentity, why: &str, plan: &mut ChangePlan) {
    let Some(lb) = state.member_of(identity) else { return };
    let service = identity.service_key();
    let group = lb.group.clone().unwrap_or_default();
    if lb.members.keys().all(|uid| *uid == identity.uid) {
        plan.push(
            Change::new(Action::Delete, KIND, &lb.id)
                .field("addresses", listed(&lb.addresses), None)
                .because(format!("{service} is the last member of group {group} and {why}")),
        );
    } else {
        plan.push(
            Change::new(Action::Update, KIND, &lb.id)
                .field("members", shown(lb.members.len()), shown(lb.members.len() - 1))
                .because(format!("{service} leaves group {group}: {why}")),
        );
    }
}

fn differs<T: PartialEq>(change: Change, field: &str, old: &T, new: &T, show: impl Fn(&T) -> Option<String>) -> Change {
    if old == new { change } else { change.field(field, show(old), show(new)) }
}

impl MockCloud {
    pub(super) async fn plan_inner(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        self.call("DescribeLoadBalancers", None, false, |state| {
            if spec.group.is_some() {
                return self.plan_member_in(state, spec);
            }
            let mut plan = self.plan_in(state, spec)?;
            plan_leaving(state, &spec.identity, "it leaves the group for a load balancer of its own", &mut plan);
            Ok(plan)
        })
        .await
    }

    pub(super) async fn plan_delete_inner(&self, identity: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        self.call("DescribeLoadBalancers", None, false, |state| {
            let mut plan = ChangePlan::default();
            if let Some(lb) = state.owned_by(identity) {
                plan.push(
                    Change::new(Action::Delete, KIND, &lb.id)
                        .field("addresses", listed(&lb.addresses), None)
                        .because("its addresses are released"),
                );
            }
            plan_leaving(state, identity, "the Service goes", &mut plan);
            Ok(plan)
        })
        .await
    }

    /// A member's part of its group's load balancer, and the end of its own load balancer.
    fn plan_member_in(&self, state: &CloudState, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        let mut plan = ChangePlan::default();
        let (Some(group), cluster) = (group_key(spec), &self.config.cluster) else { return Ok(plan) };
        let service = spec.identity.service_key();
        let wanted = part_of(spec);
        match state.of_group(cluster, &group) {
            None => {
                let name = group_lb_name(cluster, &group);
                if let Some(foreign) = state.named(&name) {
                    plan.conflict(
                        KIND,
                        &name,
                        format!(
                            "{} already exists with this name and is not the load balancer of group {group}; hawser \
                             leaves it untouched — delete or rename it",
                            foreign.id
                        ),
                    );
                }
                let addresses = self.preview_addresses(state, spec, None, &mut plan)?;
                let targets: Vec<&str> = spec.targets.iter().map(|t| t.name.as_str()).collect();
                plan.push(
                    Change::new(Action::Create, KIND, &name)
                        .because(format!("for group {group}, with {service} as its first member"))
                        .field("addresses", None, show_addresses(&addresses))
                        .field(
                            format!("members[{service}].listeners"),
                            None,
                            listed(spec.listeners.iter().map(listener)),
                        )
                        .field("targets", None, membership("nodes", [], targets).and_then(|(_, new)| new)),
                );
            }
            Some(lb) => {
                let mut update = Change::new(Action::Update, KIND, &lb.id);
                let current = lb.members.get(&spec.identity.uid);
                let field = |f: &str| format!("members[{service}].{f}");
                let old_listeners = current.map(|c| c.listeners.clone()).unwrap_or_default();
                update = differs(update, &field("listeners"), &old_listeners, &wanted.listeners, |l| {
                    listed(l.iter().map(listener))
                });
                if let Some(c) = current {
                    update = differs(update, &field("healthCheck"), &c.health_check, &wanted.health_check, |h| {
                        shown(format!("{:?} port {} {}", h.protocol, h.port, h.path.clone().unwrap_or_default()))
                    });
                    update =
                        differs(update, &field("sourceRanges"), &c.source_ranges, &wanted.source_ranges, |r| listed(r));
                    update = differs(
                        update,
                        &field("sessionAffinity"),
                        &c.session_affinity,
                        &wanted.session_affinity,
                        |a| shown(affinity(*a)),
                    );
                }
                if let Some((old, new)) = membership(
                    "nodes",
                    lb.targets.iter().map(|t| t.name.as_str()),
                    spec.targets.iter().map(|t| t.name.as_str()),
                ) {
                    update = update.field("targets", old, new);
                }
                plan.push_if_changed(update);
            }
        }
        if let Some(own) = state.owned_by(&spec.identity) {
            plan.push(
                Change::new(Action::Delete, KIND, &own.id)
                    .field("addresses", listed(&own.addresses), None)
                    .because(format!("the Service moves into group {group} and takes the group's address")),
            );
        }
        Ok(plan)
    }

    /// The addresses ensure would end with, or why it could not, without allocating any:
    /// `None` in the list stands for "the next free address of the pool".
    fn preview_addresses(
        &self,
        state: &CloudState,
        spec: &LoadBalancerSpec,
        current: Option<&MockLoadBalancer>,
        plan: &mut ChangePlan,
    ) -> Result<Vec<Result<IpAddr, String>>, ProviderError> {
        let own = |addr: &IpAddr| current.is_some_and(|lb| lb.addresses.contains(addr));
        let mut out = Vec::new();
        for family in &spec.ip_families {
            if let Some(addr) = spec.requested_addresses.iter().find(|a| IpFamily::of(a) == *family) {
                if !self.pools.contains(addr) {
                    return Err(self.outside_pools(addr));
                }
                if let Some(holder) = state.holder_of(addr).filter(|_| !own(addr)) {
                    plan.conflict("address", addr.to_string(), format!("already in use by {}", describe_owner(holder)));
                }
                out.push(Ok(*addr));
            } else if let Some(existing) =
                current.and_then(|lb| lb.addresses.iter().find(|a| IpFamily::of(a) == *family))
            {
                out.push(Ok(*existing));
            } else {
                let Some(pool) = self.pools.for_family(*family) else {
                    return Err(self.no_pool(*family));
                };
                out.push(Err(format!("a free address from {pool}")));
            }
        }
        Ok(out)
    }

    fn plan_in(&self, state: &CloudState, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        let mut plan = ChangePlan::default();
        let name = Self::name_for(&spec.identity);
        let current = state.owned_by(&spec.identity);
        if current.is_none()
            && let Some(foreign) = state.named(&name)
        {
            plan.conflict(
                KIND,
                &name,
                format!(
                    "{} already exists with this name and is not owned by Service {} of cluster {}; hawser leaves it \
                     untouched — delete or rename it",
                    foreign.id,
                    spec.identity.service_key(),
                    spec.identity.cluster
                ),
            );
        }
        let addresses = self.preview_addresses(state, spec, current, &mut plan)?;
        let shown_addresses = show_addresses;
        let wanted = desired_record(
            String::new(),
            name.clone(),
            addresses.iter().filter_map(|a| a.as_ref().ok().copied()).collect(),
            spec,
            0,
        );
        let Some(current) = current else {
            let targets: Vec<&str> = spec.targets.iter().map(|t| t.name.as_str()).collect();
            let mut create = Change::new(Action::Create, KIND, &name)
                .field("addresses", None, shown_addresses(&addresses))
                .field("listeners", None, listed(spec.listeners.iter().map(listener)))
                .field("scheme", None, shown(spec.scheme.as_str()));
            if let Some((_, new)) = membership("nodes", [], targets) {
                create = create.field("targets", None, new);
            }
            plan.push(create);
            return Ok(plan);
        };
        let current_addresses: Vec<Result<IpAddr, String>> = current.addresses.iter().copied().map(Ok).collect();
        let mut update = Change::new(Action::Update, KIND, &current.id);
        update = differs(update, "addresses", &current_addresses, &addresses, |a| shown_addresses(a));
        update =
            differs(update, "listeners", &current.listeners, &wanted.listeners, |l| listed(l.iter().map(listener)));
        if let Some((old, new)) = membership(
            "nodes",
            current.targets.iter().map(|t| t.name.as_str()),
            wanted.targets.iter().map(|t| t.name.as_str()),
        ) {
            update = update.field("targets", old, new);
        } else if current.targets != wanted.targets {
            update = update.field("targets", shown("provider IDs"), shown("changed provider IDs"));
        }
        let (old_hc, new_hc) = (&current.health_check, &wanted.health_check);
        update =
            differs(update, "healthCheck.protocol", &old_hc.protocol, &new_hc.protocol, |p| shown(format!("{p:?}")));
        update = differs(update, "healthCheck.port", &old_hc.port, &new_hc.port, |p| shown(p));
        update = differs(update, "healthCheck.path", &old_hc.path, &new_hc.path, Clone::clone);
        update = differs(update, "healthCheck.interval", &old_hc.interval, &new_hc.interval, |d| {
            shown(format!("{}s", d.as_secs()))
        });
        update = differs(update, "healthCheck.timeout", &old_hc.timeout, &new_hc.timeout, |d| {
            shown(format!("{}s", d.as_secs()))
        });
        update = differs(
            update,
            "healthCheck.healthyThreshold",
            &old_hc.healthy_threshold,
            &new_hc.healthy_threshold,
            |n| shown(n),
        );
        update = differs(
            update,
            "healthCheck.unhealthyThreshold",
            &old_hc.unhealthy_threshold,
            &new_hc.unhealthy_threshold,
            |n| shown(n),
        );
        update = differs(update, "scheme", &current.scheme, &wanted.scheme, |s| shown(s.as_str()));
        update = differs(update, "sourceRanges", &current.source_ranges, &wanted.source_ranges, |r| listed(r));
        update = differs(update, "sessionAffinity", &current.session_affinity, &wanted.session_affinity, |a| {
            shown(affinity(*a))
        });
        update =
            differs(update, "tags", &current.tags, &wanted.tags, |t| listed(t.iter().map(|(k, v)| format!("{k}={v}"))));
        plan.push_if_changed(update);
        Ok(plan)
    }
}
