//! Helpers shared by the unit tests.

use hawser_providers::{Capabilities, Target, Targets};
use serde_json::Value;

use crate::desired::{DesiredConfig, HealthCheckMode};

/// The builder's inputs for cluster `demo` on the mock cloud, probing hawser's health port.
pub fn mock_desired_config() -> DesiredConfig {
    DesiredConfig {
        cluster: "demo".into(),
        health_check_mode: HealthCheckMode::Hawser,
        node_health_port: 10266,
        provider_name: "mock",
        provider_annotations: &[],
        capabilities: Capabilities {
            needs_node_ports: false,
            supports_udp: true,
            groups: Some(hawser_providers::GroupLimits { max_listeners: 50, max_rules: None }),
        },
    }
}

/// One eligible node, `node-a` at 10.0.0.2.
pub fn one_target() -> Targets {
    let address = "10.0.0.2".parse().map_or_else(|_| Vec::new(), |a| vec![a]);
    Targets::from(vec![Target { name: "node-a".into(), provider_id: None, zone: None, addresses: address }])
}

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
