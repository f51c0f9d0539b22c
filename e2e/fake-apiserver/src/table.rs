//! Server-side printing: `meta.k8s.io` Tables with the columns kube-apiserver's printers give
//! each resource, so that `kubectl get` shows what it shows against a real cluster.
//!
//! As kube-apiserver does, every column is always sent (kubectl hides the priority-1 ones unless
//! `-o wide`), and cells are computed from the stored object: for Events that is the core/v1
//! form, whichever API the client used.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceDef;

/// What the `includeObject` query parameter asks each row to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// A `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter; unset is `Metadata`.
    pub fn parse(value: Option<&str>) -> ApiResult<Self> {
        match value {
            None | Some("") | Some("Metadata") => Ok(Self::Metadata),
            Some("Object") => Ok(Self::Object),
            Some("None") => Ok(Self::None),
            Some(other) => Err(ApiError::bad_request(format!("unrecognized includeObject value: \"{other}\""))),
        }
    }
}

/// A request for Table output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRequest {
    /// `v1` or `v1beta1` of `meta.k8s.io`.
    pub version: &'static str,
    /// What the rows carry.
    pub include: IncludeObject,
}

impl TableRequest {
    fn api_version(&self) -> String {
        format!("meta.k8s.io/{}", self.version)
    }
}

/// Content negotiation on `Accept`: the first acceptable media type wins, as in the apiserver.
/// Returns the Table version when that is a `meta.k8s.io` Table in JSON, `None` for plain JSON.
/// Media types this server cannot produce (protobuf, YAML, other `as=` conversions) are skipped;
/// when nothing matches, plain JSON is served.
pub fn negotiate(accept: Option<&str>) -> Option<&'static str> {
    for clause in accept.unwrap_or("").split(',') {
        let mut parts = clause.split(';').map(str::trim);
        let essence = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: BTreeMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_string()))
            .collect();
        if !matches!(essence.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        match params.get("as").map(String::as_str) {
            None => return None,
            Some("Table") if params.get("g").map(String::as_str) == Some("meta.k8s.io") => {
                match params.get("v").map(String::as_str) {
                    Some("v1") => return Some("v1"),
                    Some("v1beta1") => return Some("v1beta1"),
                    _ => {}
                }
            }
            Some(_) => {}
        }
    }
    None
}

/// One column of a Table.
struct Column {
    name: &'static str,
    kind: &'static str,
    format: &'static str,
    description: &'static str,
    priority: u8,
}

const fn col(name: &'static str, description: &'static str) -> Column {
    Column { name, kind: "string", format: "", description, priority: 0 }
}

const fn wide(name: &'static str, description: &'static str) -> Column {
    Column { name, kind: "string", format: "", description, priority: 1 }
}

const DOC_NAME: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const DOC_CREATED: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

const NAME: Column = Column { name: "Name", kind: "string", format: "name", description: DOC_NAME, priority: 0 };
const AGE: Column = col("Age", DOC_CREATED);

const SERVICE: &[Column] = &[
    NAME,
    col("Type", "type determines how the Service is exposed."),
    col("Cluster-IP", "clusterIP is the IP address of the service and is usually assigned randomly."),
    col(
        "External-IP",
        "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
    ),
    col("Port(s)", "The list of ports that are exposed by this service."),
    AGE,
    wide("Selector", "Route service traffic to pods with label keys and values matching this selector."),
];

const NODE: &[Column] = &[
    NAME,
    col("Status", "The status of the node"),
    col("Roles", "The roles of the node"),
    AGE,
    col("Version", "Kubelet Version reported by the node."),
    wide("Internal-IP", "List of addresses reachable to the node."),
    wide("External-IP", "List of addresses reachable to the node."),
    wide("OS-Image", "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy))."),
    wide("Kernel-Version", "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64)."),
    wide(
        "Container-Runtime",
        "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
    ),
];

const ENDPOINT_SLICE: &[Column] = &[
    NAME,
    col("AddressType", "addressType specifies the type of address carried by this EndpointSlice."),
    col("Ports", "ports specifies the list of network ports exposed by each endpoint in this slice."),
    col("Endpoints", "endpoints is a list of unique endpoints in this slice."),
    AGE,
];

const EVENT: &[Column] = &[
    col("Last Seen", "The time at which the most recent occurrence of this event was recorded."),
    col("Type", "Type of this event (Normal, Warning), new types could be added in the future"),
    col(
        "Reason",
        "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
    ),
    col("Object", "The object that this event is about."),
    wide(
        "Subobject",
        "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2].",
    ),
    wide("Source", "The component reporting this event. Should be a short machine understandable string."),
    col("Message", "A human-readable description of the status of this operation."),
    wide("First Seen", "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)"),
    wide("Count", "The number of times this event has occurred."),
    Column { name: "Name", kind: "string", format: "name", description: DOC_NAME, priority: 1 },
];

const NAMESPACE: &[Column] = &[NAME, col("Status", "The status of the namespace"), AGE];

const CONFIG_MAP: &[Column] = &[
    NAME,
    col(
        "Data",
        "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'.",
    ),
    AGE,
];

const LEASE: &[Column] =
    &[NAME, col("Holder", "holderIdentity contains the identity of the holder of a current lease."), AGE];

/// What kube-apiserver's default table convertor shows for resources without a printer.
const DEFAULT: &[Column] =
    &[NAME, Column { name: "Created At", kind: "date", format: "", description: DOC_CREATED, priority: 0 }];

type Printer = fn(&Value, Timestamp) -> Vec<Value>;

/// The columns and the row printer of a resource, by its storage form.
fn printer(def: &ResourceDef) -> (&'static [Column], Printer) {
    match (def.group, def.plural) {
        ("", "services") => (SERVICE, service_cells),
        ("", "nodes") => (NODE, node_cells),
        ("", "events") => (EVENT, event_cells),
        ("", "namespaces") => (NAMESPACE, namespace_cells),
        ("", "configmaps") => (CONFIG_MAP, config_map_cells),
        ("discovery.k8s.io", "endpointslices") => (ENDPOINT_SLICE, endpoint_slice_cells),
        ("coordination.k8s.io", "leases") => (LEASE, lease_cells),
        _ => (DEFAULT, default_cells),
    }
}

fn column_definitions(columns: &[Column]) -> Vec<Value> {
    columns
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.kind,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect()
}

/// The cells of one object's row (for tests and for [`table`]).
pub fn cells(def: &ResourceDef, stored: &Value, now: Timestamp) -> Vec<Value> {
    (printer(def).1)(stored, now)
}

/// A Table of `rows`, each a stored object and the object as the client's API version shows
/// it. `metadata` is the list metadata (resourceVersion, continue, remainingItemCount);
/// `headers` false leaves out the column definitions, as watch events after the first do.
pub fn table(
    req: TableRequest,
    def: &ResourceDef,
    rows: &[(&Value, Value)],
    metadata: Value,
    headers: bool,
    now: Timestamp,
) -> Value {
    let (columns, print) = printer(def);
    let rows: Vec<Value> = rows
        .iter()
        .map(|(stored, shown)| {
            let object = match req.include {
                IncludeObject::None => Value::Null,
                IncludeObject::Object => shown.clone(),
                IncludeObject::Metadata => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": req.api_version(),
                    "metadata": shown.get("metadata").cloned().unwrap_or_else(|| json!({})),
                }),
            };
            json!({"cells": print(stored, now), "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": req.api_version(),
        "metadata": metadata,
        "columnDefinitions": if headers { column_definitions(columns) } else { Vec::new() },
        "rows": rows,
    })
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn strings<'a>(obj: &'a Value, pointer: &str) -> Vec<&'a str> {
    obj.pointer(pointer).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

fn or<'a>(s: &'a str, fallback: &'a str) -> &'a str {
    if s.is_empty() { fallback } else { s }
}

/// kube's `duration.HumanDuration`: two significant units at most, coarser as time goes on.
pub fn human_duration(d: SignedDuration) -> String {
    let seconds = d.as_secs();
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        return match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{}d", hours / 24),
            h => format!("{}d{h}h", hours / 24),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        return match (hours / 24) % 365 {
            0 => format!("{}y", hours / 24 / 365),
            dy => format!("{}y{dy}d", hours / 24 / 365),
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Time since a `Time`/`MicroTime` field, or `None` when it is unset or unreadable.
fn since(obj: &Value, pointer: &str, now: Timestamp) -> Option<String> {
    let t: Timestamp = text(obj, pointer).parse().ok()?;
    Some(human_duration(now.duration_since(t)))
}

fn age(obj: &Value, now: Timestamp) -> Value {
    json!(since(obj, "/metadata/creationTimestamp", now).unwrap_or_else(|| "<unknown>".into()))
}

fn name(obj: &Value) -> Value {
    json!(text(obj, "/metadata/name"))
}

/// `labels.FormatLabels`: sorted `k=v` pairs, `<none>` when empty.
fn format_labels(map: Option<&Value>) -> String {
    let pairs: BTreeMap<&str, &str> = map
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
        .collect();
    if pairs.is_empty() {
        return "<none>".into();
    }
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Up to three items, then `+ N more...`; `<unset>` when there are none.
fn list_with_more(items: &[String]) -> String {
    const MAX: usize = 3;
    if items.is_empty() {
        return "<unset>".into();
    }
    let shown = items.iter().take(MAX).cloned().collect::<Vec<_>>().join(",");
    if items.len() > MAX { format!("{shown} + {} more...", items.len() - MAX) } else { shown }
}

fn service_external_ip(svc: &Value) -> String {
    let external = strings(svc, "/spec/externalIPs");
    match text(svc, "/spec/type") {
        "ClusterIP" | "NodePort" => {
            if external.is_empty() {
                "<none>".into()
            } else {
                external.join(",")
            }
        }
        "LoadBalancer" => {
            // The server prints wide, so the 16-character cut kubectl used to make is not made.
            let ingress: BTreeSet<&str> = svc
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| {
                    let ip = text(i, "/ip");
                    let host = text(i, "/hostname");
                    (!ip.is_empty()).then_some(ip).or((!host.is_empty()).then_some(host))
                })
                .collect();
            let mut all: Vec<&str> = ingress.into_iter().collect();
            all.extend(external);
            if all.is_empty() { "<pending>".into() } else { all.join(",") }
        }
        "ExternalName" => text(svc, "/spec/externalName").into(),
        _ => "<unknown>".into(),
    }
}

fn service_ports(svc: &Value) -> String {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let protocol = text(p, "/protocol");
            match p.get("nodePort").and_then(Value::as_i64).filter(|n| *n > 0) {
                Some(node_port) => format!("{port}:{node_port}/{protocol}"),
                None => format!("{port}/{protocol}"),
            }
        })
        .collect();
    if ports.is_empty() { "<none>".into() } else { ports.join(",") }
}

fn service_cells(svc: &Value, now: Timestamp) -> Vec<Value> {
    let cluster_ip = strings(svc, "/spec/clusterIPs").first().copied().unwrap_or("<none>");
    vec![
        name(svc),
        json!(text(svc, "/spec/type")),
        json!(cluster_ip),
        json!(service_external_ip(svc)),
        json!(service_ports(svc)),
        age(svc, now),
        json!(format_labels(svc.pointer("/spec/selector"))),
    ]
}

fn node_address(node: &Value, kind: &str) -> String {
    node.pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| text(a, "/type") == kind)
        .map_or_else(|| "<none>".into(), |a| text(a, "/address").to_string())
}

fn node_cells(node: &Value, now: Timestamp) -> Vec<Value> {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| text(c, "/type") == "Ready");
    let mut status = vec![match ready {
        Some(c) if text(c, "/status") == "True" => "Ready",
        Some(_) => "NotReady",
        None => "Unknown",
    }];
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push("SchedulingDisabled");
    }
    let roles: BTreeSet<&str> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match k.strip_prefix("node-role.kubernetes.io/") {
            Some(role) if !role.is_empty() => Some(role),
            Some(_) => None,
            None if k == "kubernetes.io/role" => v.as_str().filter(|r| !r.is_empty()),
            None => None,
        })
        .collect();
    let roles = if roles.is_empty() { "<none>".into() } else { roles.into_iter().collect::<Vec<_>>().join(",") };
    vec![
        name(node),
        json!(status.join(",")),
        json!(roles),
        age(node, now),
        json!(text(node, "/status/nodeInfo/kubeletVersion")),
        json!(node_address(node, "InternalIP")),
        json!(node_address(node, "ExternalIP")),
        json!(or(text(node, "/status/nodeInfo/osImage"), "<unknown>")),
        json!(or(text(node, "/status/nodeInfo/kernelVersion"), "<unknown>")),
        json!(or(text(node, "/status/nodeInfo/containerRuntimeVersion"), "<unknown>")),
    ]
}

fn endpoint_slice_cells(slice: &Value, now: Timestamp) -> Vec<Value> {
    let ports: Vec<String> = slice
        .pointer("/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| match (p.get("port").and_then(Value::as_i64), p.get("name").and_then(Value::as_str)) {
            (Some(port), _) => port.to_string(),
            (None, Some(name)) => name.to_string(),
            (None, None) => "*".into(),
        })
        .collect();
    let addresses: Vec<String> = slice
        .pointer("/endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|e| strings(e, "/addresses"))
        .map(str::to_string)
        .collect();
    vec![
        name(slice),
        json!(text(slice, "/addressType")),
        json!(list_with_more(&ports)),
        json!(list_with_more(&addresses)),
        age(slice, now),
    ]
}

/// Rows of the core/v1 form, as kube-apiserver prints an Event whichever API it came through.
fn event_cells(ev: &Value, now: Timestamp) -> Vec<Value> {
    let first = since(ev, "/firstTimestamp", now)
        .or_else(|| since(ev, "/eventTime", now))
        .unwrap_or_else(|| "<unknown>".into());
    let mut last = since(ev, "/lastTimestamp", now).unwrap_or_else(|| first.clone());
    let mut count = ev.get("count").and_then(Value::as_i64).unwrap_or(0);
    if let Some(series) = ev.get("series").filter(|s| s.is_object()) {
        last = since(series, "/lastObservedTime", now).unwrap_or_else(|| "<unknown>".into());
        count = series.get("count").and_then(Value::as_i64).unwrap_or(0);
    } else if count == 0 {
        // Singleton events made through events.k8s.io have no count.
        count = 1;
    }
    let kind = text(ev, "/involvedObject/kind").to_lowercase();
    let object = match text(ev, "/involvedObject/name") {
        "" => kind,
        n => format!("{kind}/{n}"),
    };
    let component = or(text(ev, "/source/component"), text(ev, "/reportingComponent"));
    let instance = or(text(ev, "/source/host"), text(ev, "/reportingInstance"));
    let source = if instance.is_empty() { component.to_string() } else { format!("{component}, {instance}") };
    vec![
        json!(last),
        json!(text(ev, "/type")),
        json!(text(ev, "/reason")),
        json!(object),
        json!(text(ev, "/involvedObject/fieldPath")),
        json!(source),
        json!(text(ev, "/message").trim()),
        json!(first),
        json!(count),
        name(ev),
    ]
}

fn namespace_cells(ns: &Value, now: Timestamp) -> Vec<Value> {
    vec![name(ns), json!(text(ns, "/status/phase")), age(ns, now)]
}

fn config_map_cells(cm: &Value, now: Timestamp) -> Vec<Value> {
    let len = |k: &str| cm.get(k).and_then(Value::as_object).map_or(0, serde_json::Map::len);
    vec![name(cm), json!(len("data") + len("binaryData")), age(cm, now)]
}

fn lease_cells(lease: &Value, now: Timestamp) -> Vec<Value> {
    vec![name(lease), json!(text(lease, "/spec/holderIdentity")), age(lease, now)]
}

fn default_cells(obj: &Value, _now: Timestamp) -> Vec<Value> {
    let created = text(obj, "/metadata/creationTimestamp")
        .parse::<Timestamp>()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "0001-01-01T00:00:00Z".into());
    vec![name(obj), json!(created)]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::resources::{RESOURCES, lookup};

    fn def(group: &str, plural: &str) -> &'static ResourceDef {
        &RESOURCES[lookup(group, "v1", plural).unwrap()]
    }

    fn now() -> Timestamp {
        "2025-01-10T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn human_durations_as_kubectl_prints_them() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (5 * 60 + 3, "5m3s"),
            (10 * 60 + 3, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 20 * 60, "3h20m"),
            (30 * 3600, "30h"),
            (2 * 86400, "2d"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (100 * 86400, "100d"),
            (3 * 365 * 86400 + 10 * 86400, "3y10d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(SignedDuration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn accept_negotiation() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl)), Some("v1"));
        assert_eq!(negotiate(Some("application/json;as=Table;v=v1beta1;g=meta.k8s.io")), Some("v1beta1"));
        assert_eq!(negotiate(Some("application/json;as=Table;v=v2;g=meta.k8s.io, application/json")), None);
        assert_eq!(negotiate(Some("application/json")), None);
        assert_eq!(negotiate(None), None);
        assert_eq!(negotiate(Some("application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io")), None);
        assert_eq!(negotiate(Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")), None);
        assert!(IncludeObject::parse(Some("Everything")).is_err());
    }

    #[test]
    fn service_rows() {
        let lb = json!({
            "metadata": {"name": "demo", "creationTimestamp": "2025-01-10T11:54:57Z"},
            "spec": {"type": "LoadBalancer", "clusterIPs": ["10.96.0.10"], "selector": {"b": "2", "a": "1"},
                     "ports": [{"port": 80, "nodePort": 31234, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]},
        });
        let cells = cells(def("", "services"), &lb, now());
        assert_eq!(
            cells,
            vec![
                json!("demo"),
                json!("LoadBalancer"),
                json!("10.96.0.10"),
                json!("<pending>"),
                json!("80:31234/TCP,53/UDP"),
                json!("5m3s"),
                json!("a=1,b=2")
            ]
        );
        let mut ready = lb.clone();
        ready["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "a.example"}]}});
        ready["spec"]["externalIPs"] = json!(["192.0.2.1"]);
        assert_eq!(cells_of(&ready)[3], json!("203.0.113.9,a.example,192.0.2.1"));
        let headless = json!({"metadata": {"name": "h"}, "spec": {"type": "ClusterIP", "clusterIPs": ["None"]}});
        let c = cells_of(&headless);
        assert_eq!(
            (c[2].as_str(), c[3].as_str(), c[4].as_str(), c[5].as_str()),
            (Some("None"), Some("<none>"), Some("<none>"), Some("<unknown>"))
        );
    }

    fn cells_of(svc: &Value) -> Vec<Value> {
        cells(def("", "services"), svc, now())
    }

    #[test]
    fn node_rows() {
        let node = json!({
            "metadata": {"name": "n1", "creationTimestamp": "2025-01-08T12:00:00Z",
                         "labels": {"node-role.kubernetes.io/control-plane": "", "kubernetes.io/role": "edge"}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "False"}],
                       "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.1"}],
                       "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Debian"}},
        });
        let c = cells(def("", "nodes"), &node, now());
        let c: Vec<&str> = c.iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(
            c,
            [
                "n1",
                "NotReady,SchedulingDisabled",
                "control-plane,edge",
                "2d",
                "v1.33.0",
                "10.0.0.1",
                "<none>",
                "Debian",
                "<unknown>",
                "<unknown>"
            ]
        );
    }

    #[test]
    fn endpoint_slice_rows_cut_after_three() {
        let slice = json!({
            "metadata": {"name": "demo-abc"},
            "addressType": "IPv4",
            "ports": [{"port": 8080}, {"name": "dns"}, {}, {"port": 9}],
            "endpoints": [{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2", "10.1.0.3"]}, {"addresses": ["10.1.0.4"]}, {"addresses": ["10.1.0.5"]}],
        });
        let c = cells(def("discovery.k8s.io", "endpointslices"), &slice, now());
        assert_eq!(c[2], json!("8080,dns,* + 1 more..."));
        assert_eq!(c[3], json!("10.1.0.1,10.1.0.2,10.1.0.3 + 2 more..."));
        let empty = json!({"metadata": {"name": "e"}, "addressType": "IPv4"});
        let c = cells(def("discovery.k8s.io", "endpointslices"), &empty, now());
        assert_eq!((c[2].clone(), c[3].clone()), (json!("<unset>"), json!("<unset>")));
    }

    #[test]
    fn event_rows() {
        let ev = json!({
            "metadata": {"name": "demo.1"},
            "involvedObject": {"kind": "Service", "name": "demo"},
            "reason": "EnsuredLoadBalancer", "type": "Normal", "message": " done \n",
            "eventTime": "2025-01-10T11:50:00.000000Z",
            "reportingComponent": "hawser.dev/operator", "reportingInstance": "pod-1",
        });
        let c = cells(def("", "events"), &ev, now());
        assert_eq!(
            c,
            vec![
                json!("10m"),
                json!("Normal"),
                json!("EnsuredLoadBalancer"),
                json!("service/demo"),
                json!(""),
                json!("hawser.dev/operator, pod-1"),
                json!("done"),
                json!("10m"),
                json!(1),
                json!("demo.1")
            ]
        );
        let mut series = ev.clone();
        series["series"] = json!({"count": 4, "lastObservedTime": "2025-01-10T11:59:30.000000Z"});
        let c = cells(def("", "events"), &series, now());
        assert_eq!((c[0].clone(), c[8].clone()), (json!("30s"), json!(4)));
    }
}
