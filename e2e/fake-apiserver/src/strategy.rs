//! Per-resource behaviour on create, update and removal: typed decoding with k8s-openapi,
//! defaults, validation, and the Service allocations.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult, FieldError};
use crate::meta::{self, NameRule};
use crate::resources::ResourceDef;
use crate::service;
use crate::service_alloc::ServiceAllocator;

/// Which naming rule objects of a resource follow.
pub fn name_rule(def: &ResourceDef) -> NameRule {
    match def.plural {
        "namespaces" => NameRule::Label,
        "services" => NameRule::Rfc1035Label,
        _ => NameRule::Subdomain,
    }
}

/// Whether `metadata.generation` is maintained for the resource (it is for those whose spec a
/// controller acts on and reports back about).
pub fn tracks_generation(def: &ResourceDef) -> bool {
    def.plural == "services"
}

fn roundtrip<K: DeserializeOwned + Serialize>(def: &ResourceDef, obj: Value) -> ApiResult<Value> {
    let typed: K = serde_json::from_value(obj).map_err(|e| {
        ApiError::bad_request(format!("the body of the request does not decode as a {}: {e}", def.kind))
    })?;
    serde_json::to_value(typed).map_err(|e| ApiError::internal(format!("encoding {}: {e}", def.kind)))
}

/// Decodes the object with its k8s-openapi type and encodes it again: malformed objects are
/// rejected with 400 and unknown fields are dropped, as the apiserver prunes them.
pub fn normalize(def: &ResourceDef, mut obj: Value) -> ApiResult<Value> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    };
    let api_version = def.api_version();
    match map.get("kind").and_then(Value::as_str) {
        Some(k) if k != def.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind \"{k}\" does not match the resource {} (kind {})",
                def.plural, def.kind
            )));
        }
        _ => {}
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!("the apiVersion \"{v}\" does not match {api_version}")));
        }
        _ => {}
    }
    map.insert("kind".into(), json!(def.kind));
    map.insert("apiVersion".into(), json!(api_version));
    let obj = match (def.group, def.plural) {
        ("", "namespaces") => roundtrip::<Namespace>(def, obj),
        ("", "services") => roundtrip::<Service>(def, obj),
        ("", "nodes") => roundtrip::<Node>(def, obj),
        ("", "configmaps") => roundtrip::<ConfigMap>(def, obj),
        ("", "events") => roundtrip::<CoreEvent>(def, obj),
        ("discovery.k8s.io", _) => roundtrip::<EndpointSlice>(def, obj),
        ("events.k8s.io", _) => roundtrip::<EventsEvent>(def, obj),
        ("coordination.k8s.io", _) => roundtrip::<Lease>(def, obj),
        _ => Ok(obj),
    }?;
    Ok(omit_empty_metadata(obj))
}

/// The apiserver encodes ObjectMeta with Go's `omitempty`: a list or map left empty (the last
/// finalizer removed by a JSON patch, say) is not stored as `[]` or `{}` but disappears, so a
/// later JSON-patch `test` of that path against `null` passes, as clients rely on.
fn omit_empty_metadata(mut obj: Value) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|_, v| match v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
    }
    obj
}

fn invalid(def: &ResourceDef, obj: &Value, errors: Vec<FieldError>) -> ApiError {
    ApiError::invalid(def.group, def.kind, meta::name(obj), errors)
}

fn typed<K: DeserializeOwned>(obj: &Value) -> ApiResult<K> {
    serde_json::from_value(obj.clone()).map_err(|e| ApiError::internal(format!("decoding stored object: {e}")))
}

fn untyped<K: Serialize>(obj: &K, into: &mut Value) -> ApiResult<()> {
    *into = serde_json::to_value(obj).map_err(|e| ApiError::internal(format!("encoding object: {e}")))?;
    Ok(())
}

/// Checks that apply to both create and update.
fn validate_common(def: &ResourceDef, obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match (def.group, def.plural) {
        ("discovery.k8s.io", "endpointslices") => {
            let at = obj.get("addressType").and_then(Value::as_str).unwrap_or("");
            if !["IPv4", "IPv6", "FQDN"].contains(&at) {
                errors.push(FieldError::not_supported("addressType", at, &["FQDN", "IPv4", "IPv6"]));
            }
            for (i, ep) in obj.get("endpoints").and_then(Value::as_array).into_iter().flatten().enumerate() {
                let n = ep.get("addresses").and_then(Value::as_array).map_or(0, Vec::len);
                if n == 0 {
                    errors.push(FieldError::required(
                        format!("endpoints[{i}].addresses"),
                        "must contain at least 1 address",
                    ));
                }
                if let Some(node) = ep.get("nodeName").and_then(Value::as_str)
                    && let Some(mut e) = crate::meta::validate_name(node, crate::meta::NameRule::Subdomain)
                {
                    let field = format!("endpoints[{i}].nodeName");
                    e.message = e.message.replacen("metadata.name", &field, 1);
                    e.field = field;
                    errors.push(e);
                }
            }
        }
        ("", "services") => {
            let ingress = obj.pointer("/status/loadBalancer/ingress").and_then(Value::as_array);
            for (i, ing) in ingress.into_iter().flatten().enumerate() {
                if let Some(ip) = ing.get("ip").and_then(Value::as_str)
                    && ip.parse::<std::net::IpAddr>().is_err()
                {
                    errors.push(FieldError::invalid(
                        format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("\"{ip}\""),
                        "must be a valid IP address",
                    ));
                }
            }
        }
        ("events.k8s.io", "events") if obj.get("eventTime").is_none_or(Value::is_null) => {
            errors.push(FieldError::required("eventTime", ""));
        }
        _ => {}
    }
    errors
}

/// The checks an object must pass in its own API version before it is stored.
pub fn validate(def: &ResourceDef, obj: &Value) -> ApiResult<()> {
    let errors = validate_common(def, obj);
    if errors.is_empty() { Ok(()) } else { Err(invalid(def, obj, errors)) }
}

/// Defaults, validation and allocation for a new object.
pub fn prepare_create(def: &ResourceDef, obj: &mut Value, alloc: &mut ServiceAllocator) -> ApiResult<()> {
    let errors = validate_common(def, obj);
    if !errors.is_empty() {
        return Err(invalid(def, obj, errors));
    }
    match def.plural {
        "services" => {
            let mut svc: Service = typed(obj)?;
            service::prepare_create(&mut svc, alloc).map_err(|e| invalid(def, obj, e))?;
            untyped(&svc, obj)?;
        }
        "namespaces" => {
            if let Some(map) = obj.as_object_mut() {
                map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                map.insert("status".into(), json!({"phase": "Active"}));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Defaults, validation and allocation for an update of `old` to `new`.
pub fn prepare_update(def: &ResourceDef, old: &Value, new: &mut Value, alloc: &mut ServiceAllocator) -> ApiResult<()> {
    let errors = validate_common(def, new);
    if !errors.is_empty() {
        return Err(invalid(def, new, errors));
    }
    if def.plural == "services" {
        let old_svc: Service = typed(old)?;
        let mut svc: Service = typed(new)?;
        service::prepare_update(&old_svc, &mut svc, alloc).map_err(|e| invalid(def, new, e))?;
        untyped(&svc, new)?;
    }
    Ok(())
}

/// Releases what a removed object held.
pub fn on_removed(def: &ResourceDef, obj: &Value, alloc: &mut ServiceAllocator) {
    if def.plural == "services"
        && let Ok(svc) = serde_json::from_value::<Service>(obj.clone())
    {
        service::release(&svc, alloc);
    }
}
