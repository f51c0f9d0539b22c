//! Label and field selectors, parsed as the apiserver parses them.

use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::meta;
use crate::resources::ResourceDef;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses the query-string form, e.g. `app=web,tier in (a,b),!legacy`.
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_label_req(part)?);
        }
        Ok(Self(reqs))
    }

    /// Whether an object's labels satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = meta::labels(obj);
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside a parenthesised set.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn bad_selector(part: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: invalid label selector: \"{part}\""))
}

fn parse_set(rest: &str, part: &str) -> ApiResult<Vec<String>> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| bad_selector(part))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn parse_label_req(part: &str) -> ApiResult<LabelReq> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelReq::NotExists(key.trim().to_string()));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(LabelReq::NotEq(k.trim().to_string(), v.trim().to_string()));
    }
    if let Some((k, v)) = part.split_once("==") {
        return Ok(LabelReq::Eq(k.trim().to_string(), v.trim().to_string()));
    }
    if let Some((k, v)) = part.split_once('=') {
        return Ok(LabelReq::Eq(k.trim().to_string(), v.trim().to_string()));
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0].to_string();
        let rest = words[1].trim_start();
        if let Some(set) = rest.strip_prefix("notin") {
            return Ok(LabelReq::NotIn(key, parse_set(set, part)?));
        }
        if let Some(set) = rest.strip_prefix("in") {
            return Ok(LabelReq::In(key, parse_set(set, part)?));
        }
        return Err(bad_selector(part));
    }
    if part.contains(['(', ')', ' ']) {
        return Err(bad_selector(part));
    }
    Ok(LabelReq::Exists(part.to_string()))
}

/// A parsed `fieldSelector`, with `=`, `==` and `!=`. Every resource can be selected by
/// `metadata.name` and `metadata.namespace`; Events also by the fields kube-apiserver makes
/// selectable (`involvedObject.*`, `reason`, `type`, `source`, `reportingComponent`, and on
/// events.k8s.io their `regarding.*`/`reportingController` spellings). Anything else is
/// rejected with 400 like the apiserver does for unknown field labels. Requirements hold the
/// core/v1 label, since that is the form Events are stored in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Field labels of core/v1 Events, as `pkg/registry/core/event` lists them.
const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// The stored form's label for `field` when selecting `def`, if it is selectable.
fn canonical_field(def: &ResourceDef, field: &str) -> Option<&'static str> {
    if let Some(f) = ["metadata.name", "metadata.namespace"].into_iter().find(|f| *f == field) {
        return Some(f);
    }
    match (def.group, def.plural) {
        ("", "events") => CORE_EVENT_FIELDS.iter().copied().find(|f| *f == field),
        ("events.k8s.io", "events") => events::FIELD_LABELS.iter().find(|(f, _)| *f == field).map(|(_, core)| *core),
        _ => None,
    }
}

/// The value of a (canonical) field label on a stored object.
fn field_value<'a>(obj: &'a Value, field: &str) -> &'a str {
    let at = |pointer: &str| obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
    match field {
        "metadata.name" => meta::name(obj),
        "metadata.namespace" => meta::namespace(obj),
        "source" => match at("/source/component") {
            "" => at("/reportingComponent"),
            component => component,
        },
        other => match other.strip_prefix("involvedObject.") {
            Some(sub) => obj.get("involvedObject").and_then(|o| o.get(sub)).and_then(Value::as_str).unwrap_or(""),
            None => obj.get(other).and_then(Value::as_str).unwrap_or(""),
        },
    }
}

impl FieldSelector {
    /// Parses e.g. `metadata.name=node-1,metadata.namespace!=kube-system` for a resource.
    pub fn parse(s: &str, def: &ResourceDef) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{part}'; can't understand '{part}'")));
            };
            let field = field.trim();
            let canonical = canonical_field(def, field).ok_or_else(|| {
                ApiError::bad_request(format!("field label not supported: {field} (for {})", def.plural))
            })?;
            reqs.push((canonical.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// Whether the (stored) object satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| (field_value(obj, field) == value) == *equal)
    }
}

/// Label and field selector together.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Label part.
    pub labels: LabelSelector,
    /// Field part.
    pub fields: FieldSelector,
}

impl Selector {
    /// Whether the object matches both parts.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"app": "web", "tier": "fe"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("tier in (fe, be)", true),
            ("tier notin (fe)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("!app", false),
            ("!missing,app=web", true),
            ("", true),
        ];
        for (sel, want) in cases {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&o), want, "{sel}");
        }
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_selector() {
        let cm = &crate::resources::RESOURCES[crate::resources::lookup("", "v1", "configmaps").unwrap()];
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=a", cm).unwrap().matches(&o));
        assert!(!FieldSelector::parse("metadata.name!=a", cm).unwrap().matches(&o));
        assert!(FieldSelector::parse("metadata.namespace==ns", cm).unwrap().matches(&o));
        assert_eq!(FieldSelector::parse("spec.nodeName=x", cm).unwrap_err().code, 400);
        assert_eq!(FieldSelector::parse("involvedObject.name=x", cm).unwrap_err().code, 400);
    }

    #[test]
    fn event_field_selectors_in_both_spellings() {
        let core = &crate::resources::RESOURCES[crate::resources::lookup("", "v1", "events").unwrap()];
        let v1 = &crate::resources::RESOURCES[crate::resources::lookup("events.k8s.io", "v1", "events").unwrap()];
        let ev = json!({
            "metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "Service", "name": "demo", "namespace": "ns", "uid": "u1"},
            "reason": "EnsuredLoadBalancer", "type": "Normal", "reportingComponent": "hawser",
        });
        let yes = |s: &str, d| FieldSelector::parse(s, d).unwrap().matches(&ev);
        assert!(yes(
            "involvedObject.name=demo,involvedObject.namespace=ns,involvedObject.kind=Service,involvedObject.uid=u1",
            core
        ));
        assert!(!yes("involvedObject.name=other", core));
        assert!(yes("source=hawser,type=Normal,reason=EnsuredLoadBalancer,reportingComponent=hawser", core));
        assert!(yes("regarding.name=demo,regarding.kind=Service,reportingController=hawser", v1));
        assert!(!yes("regarding.uid=u2", v1));
        // Each API takes only its own spelling, as kube-apiserver does.
        assert!(FieldSelector::parse("involvedObject.name=demo", v1).is_err());
        assert!(FieldSelector::parse("regarding.name=demo", core).is_err());
        assert!(FieldSelector::parse("source=hawser", v1).is_err());
    }
}
