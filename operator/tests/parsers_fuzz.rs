//! Bounded random testing of every input parser a user reaches: the common annotations (through
//! the desired-state builder, as a reconcile calls it), the AWS and GCP annotations, and the mock
//! cloud's state file. Whatever the input, no parser panics, and every rejection names the
//! annotation or field at fault with a message saying what is accepted.
//!
//! Seeded: `HAWSER_FUZZ_SEED` replays a run, `HAWSER_FUZZ_CASES` runs longer than CI does.

#![cfg(all(feature = "aws", feature = "gcp", feature = "mock"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use hawser_operator::annotations::COMMON;
use hawser_operator::desired::{DesiredConfig, HealthCheckMode, build};
use hawser_providers::{Capabilities, InvalidField, LoadBalancerSpec, Target, Targets};
use k8s_openapi::api::core::v1::Service;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Pieces values are made of: valid ones, near misses, and hostile ones.
const FRAGMENTS: &[&str] = &[
    "",
    " ",
    ",",
    "=",
    "==",
    ",,",
    "10",
    "10s",
    "1m",
    "0",
    "-1",
    "5",
    "300",
    "301",
    "99999999999999999999999",
    "1e3",
    "internet-facing",
    "internal",
    "Internal",
    "true",
    "false",
    "yes",
    "203.0.113.5",
    "203.0.113.500",
    "2001:db8::1",
    "::",
    "10.0.0.0/8",
    "10.0.0.0/33",
    "0.0.0.0/0",
    "subnet-0abc123",
    "sg-0123",
    "eipalloc-01",
    "arn:aws:acm:us-east-1:111122223333:certificate/abc",
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "PREMIUM",
    "STANDARD",
    "key=value",
    "hawser.dev/x=1",
    "aws:x=1",
    "é",
    "\u{0}",
    "\n",
    "*",
    "443",
    "https",
];

fn value(rng: &mut SmallRng) -> String {
    let n = rng.random_range(0..4);
    let mut v = String::new();
    for _ in 0..n {
        v.push_str(FRAGMENTS.choose(rng).unwrap());
        if rng.random_bool(0.3) {
            v.push(',');
        }
    }
    if rng.random_bool(0.05) {
        v = "x".repeat(rng.random_range(200..5000));
    }
    v
}

fn keys() -> Vec<String> {
    let mut keys: Vec<String> = COMMON.iter().map(|k| (*k).to_owned()).collect();
    keys.extend(hawser_providers::aws::annotations::ALL.iter().map(|k| (*k).to_owned()));
    keys.extend(hawser_providers::gcp::annotations::ALL.iter().map(|k| (*k).to_owned()));
    keys.extend(
        ["hawser.dev/schema", "hawser.dev/", "hawser.dev/aws-", "hawser.dev/mock-x", "other.io/x"].map(String::from),
    );
    keys
}

fn cases() -> usize {
    std::env::var("HAWSER_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000)
}

fn seed() -> u64 {
    let seed = std::env::var("HAWSER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (HAWSER_FUZZ_SEED={seed} replays it)");
    seed
}

/// A rejection must say which annotation or field is wrong, and what is accepted.
fn assert_named(errors: &[InvalidField], annotations: &BTreeMap<String, String>, seed: u64) {
    assert!(!errors.is_empty(), "an empty rejection (seed {seed})");
    for e in errors {
        let named = annotations.contains_key(&e.field)
            || e.field.starts_with("spec.")
            || e.field.starts_with("metadata.")
            || e.field.starts_with("hawser.dev/");
        assert!(named, "rejection names no annotation or field: {e} (seed {seed}, annotations {annotations:?})");
        assert!(e.message.len() > 10, "a message too short to help: {e} (seed {seed})");
    }
}

fn service(annotations: &BTreeMap<String, String>, rng: &mut SmallRng) -> Service {
    let families = [json!(["IPv4"]), json!(["IPv6"]), json!(["IPv4", "IPv6"]), json!(null)];
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1", "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            "ports": [{"name": "http", "port": 80, "protocol": if rng.random_bool(0.8) { "TCP" } else { "UDP" }, "nodePort": 30080}],
            "ipFamilies": families.choose(rng).unwrap(),
            "externalTrafficPolicy": if rng.random_bool(0.5) { "Local" } else { "Cluster" }
        }
    }))
    .unwrap()
}

fn config(provider: &'static str, known: &'static [&'static str], node_ports: bool) -> DesiredConfig {
    DesiredConfig {
        cluster: "fuzz".into(),
        health_check_mode: HealthCheckMode::Hawser,
        node_health_port: 10266,
        provider_name: provider,
        provider_annotations: known,
        capabilities: Capabilities { needs_node_ports: node_ports, supports_udp: true, groups: None },
    }
}

#[test]
fn annotations_of_every_cloud_never_panic_and_every_rejection_names_its_field() {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let keys = keys();
    let targets = Targets::from(vec![Target {
        name: "n1".into(),
        provider_id: Some("aws:///us-east-1a/i-0abc".into()),
        zone: Some("us-east-1a".into()),
        addresses: vec!["10.0.0.2".parse().unwrap()],
    }]);
    let clouds = [
        config("mock", &[], false),
        config("aws", hawser_providers::aws::annotations::ALL, true),
        config("gcp", hawser_providers::gcp::annotations::ALL, false),
    ];
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..cases() {
        let annotations: BTreeMap<String, String> =
            (0..rng.random_range(0..6)).map(|_| (keys.choose(&mut rng).unwrap().clone(), value(&mut rng))).collect();
        let svc = service(&annotations, &mut rng);
        let cfg = clouds.choose(&mut rng).unwrap();
        let spec: LoadBalancerSpec = match build(&svc, targets.clone(), cfg) {
            Ok(spec) => spec,
            Err(errors) => {
                assert_named(&errors, &annotations, seed);
                rejected += 1;
                continue;
            }
        };
        let provider = match cfg.provider_name {
            "aws" => hawser_providers::aws::annotations::parse(&spec).map(|_| ()),
            "gcp" => hawser_providers::gcp::annotations::parse(&spec).map(|_| ()),
            _ => Ok(()),
        };
        match provider {
            Ok(()) => accepted += 1,
            Err(errors) => {
                assert_named(&errors, &annotations, seed);
                rejected += 1;
            }
        }
    }
    assert!(accepted > 0 && rejected > 0, "the generator reaches both sides: {accepted} accepted, {rejected} rejected");
}

#[test]
fn a_damaged_mock_state_file_is_refused_naming_the_file_never_a_panic() {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    let valid = serde_json::to_vec_pretty(&json!({
        "generation": 3, "nextId": 1,
        "loadBalancers": {"mock-lb-1": {"id": "mock-lb-1", "name": "hawser-1", "tags": {"hawser.dev/cluster": "c"},
            "addresses": ["203.0.113.1"], "listeners": [{"name": "", "protocol": "TCP", "port": 80, "nodePort": null}],
            "targets": [], "healthCheck": {"protocol": "HTTP", "port": 10266, "path": "/healthz", "interval": 10,
            "timeout": 5, "healthyThreshold": 2, "unhealthyThreshold": 3},
            "scheme": "internet-facing", "sourceRanges": [], "sessionAffinity": {"type": "None"}, "revision": 1}}
    }))
    .unwrap();
    std::fs::write(&path, &valid).unwrap();
    assert!(hawser_providers::mock::CloudState::load(&path).is_ok(), "the unmodified file loads");
    for _ in 0..cases() / 3 {
        let mut bytes = valid.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[at] = rng.random(),
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
            if bytes.is_empty() {
                break;
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = hawser_providers::mock::CloudState::load(&path) {
            assert!(e.contains(&path.display().to_string()), "the error names the file: {e} (seed {seed})");
        }
    }
}
