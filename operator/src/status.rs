//! What to write into a Service's status: pure, so that "write only when changed" is testable.

use std::collections::BTreeSet;

use hawser_providers::{LoadBalancerStatus, Protocol};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::names::{CONDITION_TYPE, GROUP_CONDITION_TYPE};

/// The condition hawser wants on the Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCondition {
    /// Whether the load balancer is ready.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    pub message: String,
}

impl DesiredCondition {
    /// Ready.
    pub fn ready(message: impl Into<String>) -> Self {
        Self { ready: true, reason: "LoadBalancerReady".into(), message: message.into() }
    }

    /// Not ready, for `reason`.
    pub fn not_ready(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { ready: false, reason: reason.into(), message: message.into() }
    }
}

/// Kubernetes' form of the provider's ingress points.
pub fn ingress_of(status: &LoadBalancerStatus) -> Vec<LoadBalancerIngress> {
    status
        .ingress
        .iter()
        .map(|i| LoadBalancerIngress {
            ip: i.ip.map(|a| a.to_string()),
            hostname: i.hostname.clone(),
            ip_mode: i.ip_mode.map(|m| match m {
                hawser_providers::IpMode::Vip => "VIP".to_owned(),
                hawser_providers::IpMode::Proxy => "Proxy".to_owned(),
            }),
            ports: (!i.ports.is_empty()).then(|| {
                i.ports
                    .iter()
                    .map(|p| PortStatus {
                        port: i32::from(p.port),
                        protocol: match p.protocol {
                            Protocol::Udp => "UDP".to_owned(),
                            Protocol::Tcp | Protocol::TcpUdp => "TCP".to_owned(),
                        },
                        error: None,
                    })
                    .collect()
            }),
        })
        .collect()
}

/// The load-balancer groups whose load balancers hold, or may hold, parts of a Service, kept in
/// its status so that an operator restarted at any moment knows which groups it must leave.
///
/// A group is added before a Service's first cloud write to it, and dropped only after the
/// Service left it: in between, the record says the Service is changing groups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupRecord {
    /// The groups, as `namespace/name`.
    pub groups: BTreeSet<String>,
    /// Whether the Service serves in exactly these groups (an ensure and every leave succeeded),
    /// rather than being on its way between them.
    pub settled: bool,
}

impl GroupRecord {
    /// After a successful ensure in `group` (or in none) and every leave: only that group.
    pub fn settled(group: Option<&str>) -> Self {
        Self { groups: group.map(str::to_owned).into_iter().collect(), settled: true }
    }

    /// Before a change: every group that may hold parts of the Service once it is under way.
    pub fn changing(groups: BTreeSet<String>) -> Self {
        Self { groups, settled: false }
    }

    /// The record the Service's status carries (empty when it has none).
    pub fn of(status: Option<&ServiceStatus>) -> BTreeSet<String> {
        let condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == GROUP_CONDITION_TYPE && c.status == "True"));
        condition
            .and_then(|c| c.message.rsplit_once(": "))
            .map(|(_, list)| list.split(", ").filter(|g| g.contains('/')).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The condition that carries the record: the groups are listed after the last `": "`.
    fn condition(&self) -> Option<DesiredCondition> {
        if self.groups.is_empty() {
            return None;
        }
        let list = self.groups.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
        let (reason, message) = if self.settled {
            ("Member", format!("Shares the load balancer of load-balancer group: {list}"))
        } else {
            (
                "ChangingGroup",
                format!(
                    "Changing load-balancer group; until the change is done, parts of this Service may be on \
                     the load balancers of groups: {list}"
                ),
            )
        };
        Some(DesiredCondition { ready: true, reason: reason.to_owned(), message })
    }
}

/// What the status should become. `None` fields are left as they are.
#[derive(Debug, Clone, Default)]
pub struct StatusChange {
    /// The ingress list (empty clears it).
    pub ingress: Option<Vec<LoadBalancerIngress>>,
    /// Our condition: `Some(Some(c))` sets it, `Some(None)` removes it.
    pub condition: Option<Option<DesiredCondition>>,
    /// The groups' record: an empty one removes its condition.
    pub groups: Option<GroupRecord>,
}

/// A strategic-merge patch for `services/{name}/status`, or `None` when nothing would change.
///
/// Strategic merge keys conditions by `type`, so conditions other controllers own are never
/// touched, and the ingress list (atomic in the API) is replaced whole.
pub fn status_patch(
    current: Option<&ServiceStatus>,
    generation: Option<i64>,
    change: &StatusChange,
    now: Timestamp,
) -> Option<Value> {
    let mut status = serde_json::Map::new();
    let current_ingress =
        current.and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.clone()).unwrap_or_default();
    if let Some(ingress) = &change.ingress
        && *ingress != current_ingress
    {
        let value = if ingress.is_empty() { Value::Null } else { json!(ingress) };
        status.insert("loadBalancer".into(), json!({ "ingress": value }));
    }
    let mut conditions = Vec::new();
    if let Some(want) = &change.condition {
        conditions.extend(condition_patch(current, CONDITION_TYPE, want.as_ref(), generation, now));
    }
    if let Some(record) = &change.groups {
        conditions.extend(condition_patch(current, GROUP_CONDITION_TYPE, record.condition().as_ref(), generation, now));
    }
    if !conditions.is_empty() {
        status.insert("conditions".into(), Value::Array(conditions));
    }
    (!status.is_empty()).then(|| json!({ "status": status }))
}

/// The entry of a strategic-merge patch's conditions list that makes condition `type_` what is
/// wanted (`None` removes it), or `None` when it already is.
fn condition_patch(
    current: Option<&ServiceStatus>,
    type_: &str,
    want: Option<&DesiredCondition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Value> {
    let current = current.and_then(|s| s.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == type_));
    let Some(want) = want else {
        return current.map(|_| json!({ "$patch": "delete", "type": type_ }));
    };
    let status = if want.ready { "True" } else { "False" };
    let unchanged = current.is_some_and(|c| {
        c.status == status
            && c.reason == want.reason
            && c.message == want.message
            && c.observed_generation == generation
    });
    if unchanged {
        return None;
    }
    // The transition time moves only when the status flips, as the API conventions ask.
    let transitioned =
        current.filter(|c| c.status == status).map_or_else(|| Time(now), |c| c.last_transition_time.clone());
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: want.reason.clone(),
        message: truncate(&want.message, 32_768),
        observed_generation: generation,
        last_transition_time: transitioned,
    };
    Some(json!(condition))
}

/// `current` with a patch of [`status_patch`] applied, as the API server's strategic merge does:
/// the ingress list replaced whole, conditions merged by `type`.
pub fn patched(current: Option<&ServiceStatus>, patch: &Value) -> ServiceStatus {
    let mut status = current.cloned().unwrap_or_default();
    let patch = &patch["status"];
    if let Some(lb) = patch.get("loadBalancer") {
        let ingress = serde_json::from_value(lb["ingress"].clone()).ok().flatten();
        status.load_balancer.get_or_insert_default().ingress = ingress;
    }
    for entry in patch.get("conditions").and_then(Value::as_array).into_iter().flatten() {
        let conditions = status.conditions.get_or_insert_default();
        let type_ = entry["type"].as_str().unwrap_or_default();
        conditions.retain(|c| c.type_ != type_);
        if entry.get("$patch").is_none()
            && let Ok(condition) = serde_json::from_value::<Condition>(entry.clone())
        {
            conditions.push(condition);
        }
    }
    status
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hawser_providers::{IngressPoint, IpMode, PortStatus as Port};

    fn lb_status() -> LoadBalancerStatus {
        LoadBalancerStatus {
            id: "lb-1".into(),
            ingress: vec![IngressPoint {
                ip: Some("203.0.113.1".parse().unwrap()),
                hostname: None,
                ip_mode: Some(IpMode::Vip),
                ports: vec![Port { port: 80, protocol: Protocol::Tcp }],
            }],
        }
    }

    fn now() -> Timestamp {
        "2026-11-26T10:00:00Z".parse().unwrap()
    }

    fn applied(current: Option<ServiceStatus>, patch: &Value) -> ServiceStatus {
        patched(current.as_ref(), patch)
    }

    #[test]
    fn ingress_is_converted_with_ip_mode_and_ports() {
        let ingress = ingress_of(&lb_status());
        assert_eq!(ingress[0].ip.as_deref(), Some("203.0.113.1"));
        assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
        assert_eq!(ingress[0].ports.as_ref().unwrap()[0].port, 80);
    }

    #[test]
    fn first_write_sets_ingress_and_condition_then_nothing_changes() {
        let change = StatusChange {
            ingress: Some(ingress_of(&lb_status())),
            condition: Some(Some(DesiredCondition::ready("ok"))),
            groups: None,
        };
        let patch = status_patch(None, Some(1), &change, now()).unwrap();
        assert_eq!(patch["status"]["loadBalancer"]["ingress"][0]["ip"], "203.0.113.1");
        assert_eq!(patch["status"]["conditions"][0]["type"], CONDITION_TYPE);
        assert_eq!(patch["status"]["conditions"][0]["status"], "True");
        assert_eq!(patch["status"]["conditions"][0]["observedGeneration"], 1);
        let after = applied(None, &patch);
        assert_eq!(status_patch(Some(&after), Some(1), &change, now()), None, "second reconcile writes nothing");
        assert!(status_patch(Some(&after), Some(2), &change, now()).is_some(), "new generation is recorded");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let ready = StatusChange { condition: Some(Some(DesiredCondition::ready("ok"))), ..StatusChange::default() };
        let s1 = applied(None, &status_patch(None, Some(1), &ready, now()).unwrap());
        let later: Timestamp = "2026-11-26T11:00:00Z".parse().unwrap();
        let reworded =
            StatusChange { condition: Some(Some(DesiredCondition::ready("still ok"))), ..StatusChange::default() };
        let p = status_patch(Some(&s1), Some(1), &reworded, later).unwrap();
        assert_eq!(p["status"]["conditions"][0]["lastTransitionTime"], "2026-11-26T10:00:00Z");
        let failed = StatusChange {
            condition: Some(Some(DesiredCondition::not_ready("SyncFailed", "boom"))),
            ..StatusChange::default()
        };
        let p = status_patch(Some(&s1), Some(1), &failed, later).unwrap();
        assert_eq!(p["status"]["conditions"][0]["lastTransitionTime"], "2026-11-26T11:00:00Z");
        assert_eq!(p["status"]["conditions"][0]["reason"], "SyncFailed");
        assert!(p["status"].get("loadBalancer").is_none(), "ingress untouched when not asked");
    }

    #[test]
    fn clearing_removes_ingress_and_only_our_condition() {
        let mut current = applied(
            None,
            &status_patch(
                None,
                Some(1),
                &StatusChange {
                    ingress: Some(ingress_of(&lb_status())),
                    condition: Some(Some(DesiredCondition::ready("ok"))),
                    groups: None,
                },
                now(),
            )
            .unwrap(),
        );
        current.conditions.as_mut().unwrap().push(Condition {
            type_: "example.com/Other".into(),
            status: "True".into(),
            reason: "Fine".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(now()),
        });
        let clear = StatusChange { ingress: Some(vec![]), condition: Some(None), groups: None };
        let p = status_patch(Some(&current), Some(1), &clear, now()).unwrap();
        assert_eq!(
            p,
            json!({"status": {"loadBalancer": {"ingress": null}, "conditions": [{"$patch": "delete", "type": CONDITION_TYPE}]}})
        );
        assert_eq!(status_patch(None, Some(1), &clear, now()), None, "nothing to clear, nothing written");
    }

    #[test]
    fn the_group_record_is_written_once_read_back_and_removed_with_our_other_condition() {
        let joining: BTreeSet<String> = ["shop/edge".to_owned(), "shop/old".to_owned()].into();
        let change = StatusChange { groups: Some(GroupRecord::changing(joining.clone())), ..StatusChange::default() };
        let patch = status_patch(None, Some(3), &change, now()).unwrap();
        assert_eq!(patch["status"]["conditions"][0]["type"], GROUP_CONDITION_TYPE);
        assert_eq!(patch["status"]["conditions"][0]["reason"], "ChangingGroup");
        assert!(patch["status"].get("loadBalancer").is_none(), "ingress untouched");
        let s1 = applied(None, &patch);
        assert_eq!(GroupRecord::of(Some(&s1)), joining, "read back as written");
        assert_eq!(status_patch(Some(&s1), Some(3), &change, now()), None, "written once");

        // Ready in one group: both conditions in one patch, the record down to that group.
        let settled = StatusChange {
            ingress: Some(ingress_of(&lb_status())),
            condition: Some(Some(DesiredCondition::ready("ok"))),
            groups: Some(GroupRecord::settled(Some("shop/edge"))),
        };
        let patch = status_patch(Some(&s1), Some(3), &settled, now()).unwrap();
        let types: Vec<&Value> = patch["status"]["conditions"].as_array().unwrap().iter().map(|c| &c["type"]).collect();
        assert_eq!(types, [CONDITION_TYPE, GROUP_CONDITION_TYPE]);
        let s2 = applied(Some(s1), &patch);
        assert_eq!(GroupRecord::of(Some(&s2)), BTreeSet::from(["shop/edge".to_owned()]));
        assert_eq!(s2.conditions.as_ref().unwrap().len(), 2);

        // In no group: the record goes, the Ready condition stays.
        let alone = StatusChange { groups: Some(GroupRecord::settled(None)), ..settled };
        let patch = status_patch(Some(&s2), Some(3), &alone, now()).unwrap();
        assert_eq!(patch["status"]["conditions"], json!([{"$patch": "delete", "type": GROUP_CONDITION_TYPE}]));
        let s3 = applied(Some(s2), &patch);
        assert_eq!(GroupRecord::of(Some(&s3)), BTreeSet::new());
        assert_eq!(s3.conditions.as_ref().unwrap().len(), 1);
        assert_eq!(status_patch(Some(&s3), Some(3), &alone, now()), None, "nothing left to remove");
    }
}
