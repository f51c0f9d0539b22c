//! Load-balancer groups (`hawser.dev/load-balancer-group`): which members of a group may share
//! its load balancer, decided before any cloud call.
//!
//! Members must agree on everything that belongs to the whole load balancer (scheme, IP
//! families, requested addresses, the provider's whole-LB annotations), and no two may serve the
//! same port and protocol. Members are taken in order of precedence: those already serving in
//! the group first (a member never loses its place to a newcomer), then the oldest, then by name;
//! the first sets the group's settings, and a member that disagrees with one taken before it is
//! refused. The refused member gets a Warning naming the Service and setting it clashes with;
//! the others are not touched.

use std::collections::BTreeSet;
use std::fmt;

use hawser_providers::{GroupLimits, LoadBalancerSpec, Protocol};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::annotations;
use crate::names::CONDITION_TYPE;
use crate::status::GroupRecord;

/// A member of a group, with the spec built from it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The Service.
    pub service: &'a Service,
    /// Its spec (valid: members whose spec is invalid take no part).
    pub spec: &'a LoadBalancerSpec,
}

/// Why a member cannot join its group's load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConflict {
    /// The member it clashes with, `namespace/name`.
    pub with: String,
    /// The setting at fault, as the user writes it (`spec.ports`, `hawser.dev/scheme`, ...).
    pub setting: String,
    /// What clashes and what to do.
    pub message: String,
}

impl fmt::Display for GroupConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// The text a group member's Ready condition carries, which marks it as serving in the group
/// across operator restarts.
pub fn serving_marker(group: &str) -> String {
    format!(" of group {group} ")
}

/// Whether `svc` is serving in `group` (`namespace/name`) now, by its Ready condition.
pub fn is_serving_in(svc: &Service, group: &str) -> bool {
    let marker = serving_marker(group);
    svc.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
        cs.iter().any(|c| c.type_ == CONDITION_TYPE && c.status == "True" && c.message.contains(&marker))
    })
}

/// The group `svc` serves in now, by its Ready condition.
pub fn serving_group(svc: &Service) -> Option<String> {
    let conditions = svc.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == CONDITION_TYPE && c.status == "True")?;
    let (_, rest) = ready.message.split_once(" of group ")?;
    let (group, _) = rest.split_once(' ')?;
    Some(group.to_owned())
}

/// Every group whose load balancer the Service's status says may hold a part of it: the ones
/// its record names, and the one its Ready condition says it serves in (a status written before
/// the record existed).
pub fn named_in_status(svc: &Service) -> BTreeSet<String> {
    let mut groups = GroupRecord::of(svc.status.as_ref());
    groups.extend(serving_group(svc));
    groups
}

/// The settings of the whole load balancer that `spec` asks for, as `(setting, value)`.
fn whole_lb_settings(spec: &LoadBalancerSpec, group_annotations: &[&str]) -> Vec<(String, String)> {
    let families: Vec<String> = spec.ip_families.iter().map(|f| format!("{f:?}")).collect();
    let addresses: Vec<String> = spec.requested_addresses.iter().map(ToString::to_string).collect();
    let mut settings = vec![
        (annotations::SCHEME.to_owned(), spec.scheme.as_str().to_owned()),
        ("spec.ipFamilies".to_owned(), families.join(",")),
        (annotations::ADDRESS.to_owned(), if addresses.is_empty() { "(none)".into() } else { addresses.join(",") }),
    ];
    for key in group_annotations {
        let value = spec.provider_annotations.get(*key).cloned().unwrap_or_else(|| "(unset)".into());
        settings.push(((*key).to_owned(), value));
    }
    settings
}

/// Every `(port, protocol)` a spec listens on, TCP_UDP as both.
fn ports(spec: &LoadBalancerSpec) -> Vec<(u16, Protocol)> {
    spec.listeners
        .iter()
        .flat_map(|l| match l.protocol {
            Protocol::TcpUdp => vec![(l.port, Protocol::Tcp), (l.port, Protocol::Udp)],
            p => vec![(l.port, p)],
        })
        .collect()
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Precedence: serving in the group first, then the oldest (a Service not created yet, as
/// `plan -f` sees one, is the youngest), then by name.
fn precedence(m: &Member<'_>, group: &str) -> (bool, bool, Option<Time>, String) {
    let created = m.service.metadata.creation_timestamp.clone();
    (!is_serving_in(m.service, group), created.is_none(), created, m.service.name_any())
}

/// Whether `candidate` (a UID) may join: every member of the group, the candidate among them,
/// is taken in order of precedence, and the candidate is checked against those taken before it.
pub fn admit(
    candidate: &str,
    group: &str,
    members: &[Member<'_>],
    limits: GroupLimits,
    group_annotations: &[&str],
) -> Result<(), GroupConflict> {
    let mut ordered: Vec<&Member<'_>> = members.iter().collect();
    ordered.sort_by_key(|m| precedence(m, group));
    let mut taken: Vec<&Member<'_>> = Vec::new();
    let mut used = Used::default();
    for m in ordered {
        let verdict = check(m, &taken, used, limits, group_annotations);
        if m.service.uid().as_deref() == Some(candidate) {
            return verdict;
        }
        if verdict.is_ok() {
            used.listeners += m.spec.listeners.len();
            used.rules += rules(m.spec);
            taken.push(m);
        }
    }
    Ok(())
}

/// What the members taken so far use of the group's load balancer.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    listeners: usize,
    rules: usize,
}

/// Forwarding rules a member needs where the cloud builds one per protocol (GCP).
fn rules(spec: &LoadBalancerSpec) -> usize {
    let protocols: std::collections::BTreeSet<Protocol> = ports(spec).into_iter().map(|(_, p)| p).collect();
    protocols.len()
}

fn check(
    m: &Member<'_>,
    taken: &[&Member<'_>],
    used: Used,
    limits: GroupLimits,
    group_annotations: &[&str],
) -> Result<(), GroupConflict> {
    let listeners = used.listeners;
    let Some(first) = taken.first() else { return Ok(()) };
    let first_key = key(first.service);
    let theirs = whole_lb_settings(first.spec, group_annotations);
    for ((setting, mine), (_, set)) in whole_lb_settings(m.spec, group_annotations).into_iter().zip(theirs) {
        if mine != set {
            return Err(GroupConflict {
                with: first_key.clone(),
                message: format!(
                    "is {mine} here but {set} on {first_key}, which set the group's load balancer up; members of a \
                     group share one load balancer and must agree on {setting}"
                ),
                setting,
            });
        }
    }
    for (port, protocol) in ports(m.spec) {
        if let Some(other) = taken.iter().find(|t| ports(t.spec).contains(&(port, protocol))) {
            let other = key(other.service);
            return Err(GroupConflict {
                with: other.clone(),
                setting: "spec.ports".to_owned(),
                message: format!(
                    "port {port}/{} is already served by {other} on the group's load balancer; choose another port \
                     or another group",
                    protocol.as_str()
                ),
            });
        }
    }
    if listeners + m.spec.listeners.len() > limits.max_listeners {
        return Err(GroupConflict {
            with: first_key,
            setting: "spec.ports".to_owned(),
            message: format!(
                "the group's load balancer carries {listeners} listeners and takes at most {}; this Service's {} \
                 would exceed it: use another group",
                limits.max_listeners,
                m.spec.listeners.len()
            ),
        });
    }
    if let Some(max) = limits.max_rules
        && used.rules + rules(m.spec) > max
    {
        return Err(GroupConflict {
            with: first_key,
            setting: "spec.ports".to_owned(),
            message: format!(
                "the group's address carries {} forwarding rules (one per member and protocol) and takes at most \
                 {max}; this Service's {} would exceed it: use another group",
                used.rules,
                rules(m.spec)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
