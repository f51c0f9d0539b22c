//! What to write into a Service's status: pure, so that "write only when changed" is testable.

use hawser_providers::{LoadBalancerStatus, Protocol};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::names::CONDITION_TYPE;

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

/// What the status should become. `None` fields are left as they are.
#[derive(Debug, Clone, Default)]
pub struct StatusChange {
    /// The ingress list (empty clears it).
    pub ingress: Option<Vec<LoadBalancerIngress>>,
    /// Our condition: `Some(Some(c))` sets it, `Some(None)` removes it.
    pub condition: Option<Option<DesiredCondition>>,
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
    let current_condition =
        current.and_then(|s| s.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_TYPE));
    match &change.condition {
        Some(Some(want)) => {
            let status_str = if want.ready { "True" } else { "False" };
            let unchanged = current_condition.is_some_and(|c| {
                c.status == status_str
                    && c.reason == want.reason
                    && c.message == want.message
                    && c.observed_generation == generation
            });
            if !unchanged {
                // The transition time moves only when the status flips, as the API conventions ask.
                let transitioned = current_condition
                    .filter(|c| c.status == status_str)
                    .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
                let condition = Condition {
                    type_: CONDITION_TYPE.to_owned(),
                    status: status_str.to_owned(),
                    reason: want.reason.clone(),
                    message: truncate(&want.message, 32_768),
                    observed_generation: generation,
                    last_transition_time: transitioned,
                };
                status.insert("conditions".into(), json!([condition]));
            }
        }
        Some(None) if current_condition.is_some() => {
            status.insert("conditions".into(), json!([{ "$patch": "delete", "type": CONDITION_TYPE }]));
        }
        Some(None) | None => {}
    }
    (!status.is_empty()).then(|| json!({ "status": status }))
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
        // Enough of strategic merge for these tests: ingress replaced, our condition replaced.
        let mut s = current.unwrap_or_default();
        let p = &patch["status"];
        if let Some(lb) = p.get("loadBalancer") {
            s.load_balancer = Some(serde_json::from_value(lb.clone()).unwrap());
        }
        if let Some(cs) = p.get("conditions") {
            let c: Condition = serde_json::from_value(cs[0].clone()).unwrap();
            let mut list = s.conditions.unwrap_or_default();
            list.retain(|x| x.type_ != c.type_);
            list.push(c);
            s.conditions = Some(list);
        }
        s
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
        let ready = StatusChange { ingress: None, condition: Some(Some(DesiredCondition::ready("ok"))) };
        let s1 = applied(None, &status_patch(None, Some(1), &ready, now()).unwrap());
        let later: Timestamp = "2026-11-26T11:00:00Z".parse().unwrap();
        let reworded = StatusChange { ingress: None, condition: Some(Some(DesiredCondition::ready("still ok"))) };
        let p = status_patch(Some(&s1), Some(1), &reworded, later).unwrap();
        assert_eq!(p["status"]["conditions"][0]["lastTransitionTime"], "2026-11-26T10:00:00Z");
        let failed =
            StatusChange { ingress: None, condition: Some(Some(DesiredCondition::not_ready("SyncFailed", "boom"))) };
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
        let clear = StatusChange { ingress: Some(vec![]), condition: Some(None) };
        let p = status_patch(Some(&current), Some(1), &clear, now()).unwrap();
        assert_eq!(
            p,
            json!({"status": {"loadBalancer": {"ingress": null}, "conditions": [{"$patch": "delete", "type": CONDITION_TYPE}]}})
        );
        assert_eq!(status_patch(None, Some(1), &clear, now()), None, "nothing to clear, nothing written");
    }
}
