//! One Event resource, two APIs: like kube-apiserver, Events are stored once in their core/v1
//! form and served both as core `v1` and as `events.k8s.io/v1`, converted as Kubernetes'
//! `pkg/apis/events/v1` conversion does.

use serde_json::{Map, Value, json};

use crate::error::ApiResult;
use crate::resources::{RESOURCES, ResourceDef, lookup};
use crate::strategy;

/// Core/v1 field ↔ events.k8s.io/v1 field, for the fields that are renamed. The rest
/// (`metadata`, `eventTime`, `series`, `reportingInstance`, `action`, `reason`, `related`,
/// `type`) keep their names.
const RENAMED: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

/// events.k8s.io/v1 field selector labels and the core/v1 labels they stand for.
pub const FIELD_LABELS: &[(&str, &str)] = &[
    ("regarding.kind", "involvedObject.kind"),
    ("regarding.namespace", "involvedObject.namespace"),
    ("regarding.name", "involvedObject.name"),
    ("regarding.uid", "involvedObject.uid"),
    ("regarding.apiVersion", "involvedObject.apiVersion"),
    ("regarding.resourceVersion", "involvedObject.resourceVersion"),
    ("regarding.fieldPath", "involvedObject.fieldPath"),
    ("reportingController", "reportingComponent"),
    ("reason", "reason"),
    ("type", "type"),
];

fn is_events_v1(def: &ResourceDef) -> bool {
    def.group == "events.k8s.io" && def.plural == "events"
}

/// The resource whose store holds the objects of `resource`: itself, except events.k8s.io
/// Events, which live with the core ones.
pub fn storage_of(resource: usize) -> usize {
    if is_events_v1(&RESOURCES[resource]) { lookup("", "v1", "events").unwrap_or(resource) } else { resource }
}

fn rename(obj: &Value, pairs: impl Iterator<Item = (&'static str, &'static str)>, api_version: &str) -> Value {
    let mut out: Map<String, Value> = obj.as_object().cloned().unwrap_or_default();
    for (from, to) in pairs {
        if let Some(v) = out.remove(from) {
            out.insert(to.to_string(), v);
        }
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

/// A stored core/v1 Event as events.k8s.io/v1 shows it.
pub fn core_to_events_v1(core: &Value) -> Value {
    rename(core, RENAMED.iter().copied(), "events.k8s.io/v1")
}

/// An events.k8s.io/v1 Event in its core/v1 form.
pub fn events_v1_to_core(event: &Value) -> Value {
    rename(event, RENAMED.iter().map(|(core, ev)| (*ev, *core)), "v1")
}

/// A stored object as the API of `resource` shows it.
pub fn present(resource: usize, stored: &Value) -> Value {
    if is_events_v1(&RESOURCES[resource]) { core_to_events_v1(stored) } else { stored.clone() }
}

/// An object written through the API of `resource`, decoded in that API's version and turned
/// into its stored form; a new one (`creating`) is also validated as that version requires
/// (events.k8s.io wants an `eventTime`, which Events made through core/v1 may lack and keep).
/// Objects of other resources are returned as given (the store checks them).
pub fn to_storage(resource: usize, given: Value, creating: bool) -> ApiResult<Value> {
    let def = &RESOURCES[resource];
    if !is_events_v1(def) || given.is_null() {
        return Ok(given);
    }
    let normalized = strategy::normalize(def, given)?;
    if creating {
        strategy::validate(def, &normalized)?;
    }
    Ok(events_v1_to_core(&normalized))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn conversion_round_trips_every_field() {
        let ev = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "a.1", "namespace": "default"},
            "eventTime": "2025-01-10T11:50:00.000001Z",
            "series": {"count": 2, "lastObservedTime": "2025-01-10T11:51:00.000001Z"},
            "reportingController": "hawser.dev/operator", "reportingInstance": "pod-1",
            "action": "Ensure", "reason": "EnsuredLoadBalancer", "type": "Normal", "note": "done",
            "regarding": {"kind": "Service", "name": "demo", "namespace": "default", "uid": "u1"},
            "related": {"kind": "Node", "name": "n1"},
            "deprecatedSource": {"component": "c", "host": "h"},
            "deprecatedFirstTimestamp": "2025-01-10T11:50:00Z",
            "deprecatedLastTimestamp": "2025-01-10T11:51:00Z",
            "deprecatedCount": 2,
        });
        let core = events_v1_to_core(&ev);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "demo");
        assert_eq!(core["message"], "done");
        assert_eq!(core["reportingComponent"], "hawser.dev/operator");
        assert_eq!(core["reportingInstance"], "pod-1");
        assert_eq!(core["source"]["host"], "h");
        assert_eq!(core["count"], 2);
        assert_eq!(core["firstTimestamp"], "2025-01-10T11:50:00Z");
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
        assert_eq!(core_to_events_v1(&core), ev);
    }
}
