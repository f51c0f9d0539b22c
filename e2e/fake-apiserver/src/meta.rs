//! Object metadata helpers: reading and writing `metadata` fields of JSON objects, names, uids and
//! timestamps.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::error::FieldError;

/// `metadata` of an object, created if missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let map = obj.as_object_mut();
    // Proven above: `obj` is an object now.
    let map = match map {
        Some(m) => m,
        None => unreachable!("object was just made a map"),
    };
    let meta = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta.as_object_mut() {
        Some(m) => m,
        None => unreachable!("metadata was just made a map"),
    }
}

/// A string field of `metadata`.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `metadata.name`, or empty.
pub fn name(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or("")
}

/// `metadata.namespace`, or empty.
pub fn namespace(obj: &Value) -> &str {
    meta_str(obj, "namespace").unwrap_or("")
}

/// `metadata.resourceVersion`, or empty.
pub fn resource_version(obj: &Value) -> &str {
    meta_str(obj, "resourceVersion").unwrap_or("")
}

/// `metadata.finalizers` as strings.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Whether `metadata.deletionTimestamp` is set.
pub fn is_deleting(obj: &Value) -> bool {
    meta_str(obj, "deletionTimestamp").is_some()
}

/// `metadata.labels` as pairs.
pub fn labels(obj: &Value) -> Map<String, Value> {
    obj.get("metadata").and_then(|m| m.get("labels")).and_then(Value::as_object).cloned().unwrap_or_default()
}

/// A generator seeded from the OS, for uids, names and tokens (not secrets that need a CSPRNG
/// guarantee beyond a test run).
pub fn rng() -> SmallRng {
    SmallRng::from_os_rng()
}

/// The current time as a Kubernetes `Time` (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random RFC 4122 version 4 UUID.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// A `generateName` suffix, from the same alphabet as the apiserver (no vowels, no look-alikes).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Which naming rule a resource's names follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain (most resources).
    Subdomain,
    /// RFC 1123 label (namespaces).
    Label,
    /// RFC 1035 label (services: must start with a letter).
    Rfc1035Label,
}

/// Validates `metadata.name` under a rule.
pub fn validate_name(name: &str, rule: NameRule) -> Option<FieldError> {
    if name.is_empty() {
        return Some(FieldError::required("metadata.name", "name or generateName is required"));
    }
    let ok = match rule {
        NameRule::Subdomain => name.len() <= 253 && name.split('.').all(is_label),
        NameRule::Label => name.len() <= 63 && is_label(name),
        NameRule::Rfc1035Label => {
            name.len() <= 63 && is_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
        }
    };
    if ok {
        return None;
    }
    let detail = match rule {
        NameRule::Subdomain => {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        }
        NameRule::Label => {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
        }
        NameRule::Rfc1035Label => {
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
        }
    };
    Some(FieldError::invalid("metadata.name", format!("\"{name}\""), detail))
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_a_v4_uuid() {
        let uid = new_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
    }

    #[test]
    fn names() {
        assert!(validate_name("web-1", NameRule::Rfc1035Label).is_none());
        assert!(validate_name("1web", NameRule::Rfc1035Label).is_some());
        assert!(validate_name("1web", NameRule::Label).is_none());
        assert!(validate_name("a.b-c", NameRule::Subdomain).is_none());
        assert!(validate_name("A", NameRule::Subdomain).is_some());
        assert!(validate_name("", NameRule::Subdomain).is_some());
    }
}
