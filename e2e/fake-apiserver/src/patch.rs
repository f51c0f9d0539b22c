//! PATCH bodies: JSON merge patch, JSON patch and strategic merge patch.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, FieldError};

/// The patch types this server understands, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
}

impl PatchKind {
    /// Maps a `Content-Type` to a patch kind; server-side apply and anything else is 415.
    pub fn from_content_type(content_type: &str) -> ApiResult<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Err(ApiError::unsupported_media_type(
                "server-side apply (application/apply-patch+yaml) is not supported by this fake apiserver; \
                 use a merge, JSON or strategic merge patch",
            )),
            other => Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json (got \"{other}\")"
            ))),
        }
    }
}

/// Applies a patch body to `original` (a full object) and returns the patched object.
pub fn apply(kind: PatchKind, object_kind: &str, name: &str, original: &Value, body: &[u8]) -> ApiResult<Value> {
    match kind {
        PatchKind::Merge => {
            let patch: Value = parse_body(body)?;
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchKind::Json => {
            let patch: json_patch::Patch =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = original.clone();
            for (i, op) in patch.0.iter().enumerate() {
                // As in the apiserver's JSON patch library, `test` for null passes on a missing
                // path; kube-runtime's finalizer helper relies on it to add the first finalizer.
                if let json_patch::PatchOperation::Test(t) = op
                    && t.value.is_null()
                    && doc.pointer(t.path.as_str()).is_none_or(Value::is_null)
                {
                    continue;
                }
                // The apiserver answers 422 Invalid for a patch that does not apply, including a
                // failed `test` operation.
                json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
                    let detail = format!("operation {i}: {e}");
                    ApiError::invalid(
                        "",
                        object_kind,
                        name,
                        vec![FieldError::invalid("patch", "(json patch)", &detail)],
                    )
                })?;
            }
            Ok(doc)
        }
        PatchKind::Strategic => {
            let patch: Value = parse_body(body)?;
            strategic_merge(object_kind, original, &patch)
        }
    }
}

fn parse_body(body: &[u8]) -> ApiResult<Value> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("patch body must be a JSON object"));
    }
    Ok(v)
}

/// How a list field merges under a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// The patch's list replaces the original (atomic lists and lists without a strategy).
    Replace,
    /// Objects are matched by these keys and merged; `$patch: delete` removes one.
    MergeKey(&'static [&'static str]),
    /// A list of scalars merged as a set (e.g. finalizers).
    MergeScalars,
}

/// The patch strategies of the fields of the resources served here, as their Go types declare
/// them (`patchStrategy`/`patchMergeKey`). Service ports are matched on port and protocol, which
/// is what the apiserver effectively needs to keep TCP and UDP on one port apart.
fn list_strategy(kind: &str, path: &[String]) -> ListStrategy {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match (kind, p.as_slice()) {
        (_, ["metadata", "finalizers"]) => ListStrategy::MergeScalars,
        (_, ["metadata", "ownerReferences"]) => ListStrategy::MergeKey(&["uid"]),
        ("Service", ["spec", "ports"]) => ListStrategy::MergeKey(&["port", "protocol"]),
        ("Service" | "Node" | "Namespace", ["status", "conditions"]) => ListStrategy::MergeKey(&["type"]),
        ("Node", ["status", "addresses"]) => ListStrategy::MergeKey(&["type"]),
        ("Node", ["spec", "podCIDRs"]) => ListStrategy::MergeScalars,
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge patch for an object of `kind`.
pub fn strategic_merge(kind: &str, original: &Value, patch: &Value) -> ApiResult<Value> {
    let mut path = Vec::new();
    let orig = original.as_object().cloned().unwrap_or_default();
    let patch = patch.as_object().cloned().unwrap_or_default();
    match merge_map(kind, orig, &patch, &mut path)? {
        Some(m) => Ok(Value::Object(m)),
        None => Err(ApiError::bad_request("a strategic merge patch may not delete the whole object")),
    }
}

/// Merges `patch` into `orig`; `None` means the map was deleted by `$patch: delete`.
fn merge_map(
    kind: &str,
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> ApiResult<Option<Map<String, Value>>> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            return Ok(Some(strip_directives(replaced)));
        }
        Some("merge") | None => {}
        Some(other) => return Err(ApiError::bad_request(format!("unknown patch directive \"$patch: {other}\""))),
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<Value> = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                list.retain(|v| !remove.contains(v));
            }
        }
    }
    let retain_keys: Option<Vec<String>> = patch
        .get("$retainKeys")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        match value {
            Value::Null => {
                orig.remove(key);
            }
            Value::Object(pm) => {
                let existing = match orig.remove(key) {
                    Some(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                if let Some(merged) = merge_map(kind, existing, pm, path)? {
                    orig.insert(key.clone(), Value::Object(merged));
                }
            }
            Value::Array(pl) => {
                let existing = match orig.remove(key) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                let merged = merge_list(kind, existing, pl, path)?;
                orig.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                orig.insert(key.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    if let Some(keep) = retain_keys {
        orig.retain(|k, _| keep.contains(k));
    }
    Ok(Some(orig))
}

fn merge_list(kind: &str, orig: Vec<Value>, patch: &[Value], path: &mut Vec<String>) -> ApiResult<Vec<Value>> {
    // `{"$patch": "replace"}` as an element replaces the whole list with the other elements.
    let replace = patch.iter().any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace {
        return Ok(patch.iter().filter(|v| v.get("$patch").is_none()).cloned().map(strip_value).collect());
    }
    match list_strategy(kind, path) {
        ListStrategy::Replace => Ok(patch.iter().cloned().map(strip_value).collect()),
        ListStrategy::MergeScalars => {
            let mut out = orig;
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeKey(keys) => {
            let mut out = orig;
            for item in patch {
                let Some(pm) = item.as_object() else {
                    return Err(ApiError::bad_request(format!(
                        "strategic merge patch: list {} expects objects with merge key {keys:?}",
                        path.join(".")
                    )));
                };
                if !pm.contains_key(keys[0]) {
                    return Err(ApiError::bad_request(format!(
                        "map: {item} does not contain declared merge key: {}",
                        keys[0]
                    )));
                }
                let pos = out.iter().position(|o| same_merge_key(kind, keys, o, item));
                let delete = pm.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        let existing = out[i].as_object().cloned().unwrap_or_default();
                        match merge_map(kind, existing, pm, path)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    (None, false) => out.push(strip_value(item.clone())),
                }
            }
            Ok(out)
        }
    }
}

/// Whether two list elements have the same merge key. A missing `protocol` means TCP, the
/// default the apiserver fills in for Service ports.
fn same_merge_key(kind: &str, keys: &[&str], a: &Value, b: &Value) -> bool {
    keys.iter().all(|k| {
        let (x, y) = (a.get(*k), b.get(*k));
        if kind == "Service" && *k == "protocol" {
            let tcp = Value::String("TCP".into());
            x.unwrap_or(&tcp) == y.unwrap_or(&tcp)
        } else {
            x == y
        }
    })
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

fn strip_directives(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k, strip_value(v))).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_merge_by_type_and_delete_directive() {
        let orig = json!({"status": {"conditions": [
            {"type": "A", "status": "True"}, {"type": "B", "status": "False"}
        ]}});
        let patch = json!({"status": {"conditions": [
            {"type": "B", "status": "True"}, {"type": "A", "$patch": "delete"}, {"type": "C", "status": "Unknown"}
        ]}});
        let out = strategic_merge("Service", &orig, &patch).unwrap();
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "B", "status": "True"}, {"type": "C", "status": "Unknown"}])
        );
    }

    #[test]
    fn service_ports_match_on_port_and_protocol() {
        let orig = json!({"spec": {"ports": [
            {"port": 53, "protocol": "TCP", "name": "dns-tcp"}, {"port": 53, "protocol": "UDP", "name": "dns"}
        ]}});
        let patch = json!({"spec": {"ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}});
        let out = strategic_merge("Service", &orig, &patch).unwrap();
        assert_eq!(out["spec"]["ports"][0], json!({"port": 53, "protocol": "TCP", "name": "dns-tcp"}));
        assert_eq!(out["spec"]["ports"][1]["nodePort"], json!(30053));
        // A port without protocol means TCP.
        let patch = json!({"spec": {"ports": [{"port": 53, "$patch": "delete"}]}});
        let out = strategic_merge("Service", &orig, &patch).unwrap();
        assert_eq!(out["spec"]["ports"], json!([{"port": 53, "protocol": "UDP", "name": "dns"}]));
    }

    #[test]
    fn finalizers_are_a_set_and_other_lists_replace() {
        let orig =
            json!({"metadata": {"finalizers": ["a"]}, "status": {"loadBalancer": {"ingress": [{"ip": "1.1.1.1"}]}}});
        let patch = json!({"metadata": {"finalizers": ["a", "b"]}, "status": {"loadBalancer": {"ingress": [{"ip": "2.2.2.2"}]}}});
        let out = strategic_merge("Service", &orig, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["status"]["loadBalancer"]["ingress"], json!([{"ip": "2.2.2.2"}]));
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}});
        let out = strategic_merge("Service", &out, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn null_deletes_and_replace_directive() {
        let orig = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        let out = strategic_merge("ConfigMap", &orig, &json!({"metadata": {"labels": {"a": null}}})).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        let out =
            strategic_merge("ConfigMap", &orig, &json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}))
                .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"c": "3"}));
    }

    #[test]
    fn failed_json_patch_test_is_invalid() {
        let orig = json!({"metadata": {"finalizers": ["x"]}});
        let body = br#"[{"op":"test","path":"/metadata/finalizers","value":["y"]}]"#;
        let err = apply(PatchKind::Json, "Service", "s", &orig, body).unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn apply_patch_is_unsupported() {
        assert_eq!(PatchKind::from_content_type("application/apply-patch+yaml").unwrap_err().code, 415);
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
    }
}
