//! Helpers shared by the unit tests.

use serde_json::Value;

/// Deep-merges `patch` into `base` (objects merge key by key; anything else replaces), so a test
/// can state only how its object differs from a valid base.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, patch) => *base = patch,
    }
}
