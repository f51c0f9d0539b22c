//! Health server: answers flip with endpoints, node state and sync age.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::fixtures::{Ep, Svc, node, slice};
use hawser_dataplane::health::{HealthState, listen, router};
use hawser_dataplane::metrics::{Metrics, SyncKind};
use hawser_dataplane::model::{ModelConfig, NodeModel, build_model};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HTTP: &[(&str, &str, u16)] = &[("http", "TCP", 8080)];

fn model(slices: &[EndpointSlice]) -> hawser_dataplane::model::ClusterModel {
    let mut svc = Svc::new("ns", "web");
    svc.local = true;
    build_model(
        &[svc.build()],
        slices,
        &ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: "node-a".into() },
    )
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn the_default_wildcard_answers_probes_over_ipv4_and_ipv6() {
    let listener = listen("[::]:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(axum::serve(listener, router(HealthState::new("node-a", Duration::from_secs(30)))).into_future());
    for host in ["127.0.0.1", "[::1]"] {
        let (code, _) = get(format!("{host}:{port}").parse().unwrap(), "/livez").await;
        assert_eq!(code, 200, "over {host}");
    }
    // A specific address binds only that address.
    let v4 = listen("127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(v4.local_addr().unwrap().is_ipv4());
}

#[tokio::test]
async fn health_endpoints_flip_with_endpoints_node_state_and_sync_age() {
    let state = HealthState::new("node-a", Duration::from_millis(200));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, router(state.clone())).into_future());

    // Before the first sync the node is not eligible; the process is alive.
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503);
    assert_eq!(body["reasons"][0], "rules not synced yet");
    assert_eq!(get(addr, "/livez").await.0, 200);

    // One ready local endpoint, one remote, one local terminating.
    let slices = [slice(
        "ns",
        "web",
        "s",
        HTTP,
        &[Ep::ready("10.0.0.1", "node-a"), Ep::ready("10.0.0.2", "node-b"), Ep::terminating("10.0.0.3", "node-a")],
    )];
    state.record_node(NodeModel::from_node("node-a", Some(&node("node-a", false, false))));
    state.record_sync(&model(&slices), Instant::now());
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!((code, body["healthy"].as_bool()), (200, Some(true)), "{body}");
    let (code, body) = get(addr, "/services/ns/web").await;
    assert_eq!(code, 200);
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["localTerminatingEndpoints"], 1);
    assert_eq!(get(addr, "/services/ns/unknown").await.0, 503);

    // The local endpoint goes away: the per-Service check fails, the node check does not.
    let remote_only = [slice("ns", "web", "s", HTTP, &[Ep::ready("10.0.0.2", "node-b")])];
    state.record_sync(&model(&remote_only), Instant::now());
    let (code, body) = get(addr, "/services/ns/web").await;
    assert_eq!((code, body["localEndpoints"].as_u64()), (503, Some(0)));
    assert_eq!(get(addr, "/healthz").await.0, 200);

    // Autoscaler taint, then deletion: both checks fail and say why.
    state.record_sync(&model(&slices), Instant::now());
    state.record_node(NodeModel::from_node("node-a", Some(&node("node-a", false, true))));
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503);
    assert!(body["reasons"][0].as_str().unwrap().contains("ToBeDeletedByClusterAutoscaler"));
    assert_eq!(get(addr, "/services/ns/web").await.0, 503, "a draining node fails every probe");
    state.record_node(NodeModel::from_node("node-a", Some(&node("node-a", true, false))));
    let (_, body) = get(addr, "/healthz").await;
    assert!(body["reasons"][0].as_str().unwrap().contains("deletionTimestamp"));

    // Back to normal, then the sync gets older than twice the resync period.
    state.record_node(NodeModel::from_node("node-a", Some(&node("node-a", false, false))));
    state.record_sync(&model(&slices), Instant::now() - Duration::from_millis(500));
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503);
    assert!(body["reasons"][0].as_str().unwrap().contains("twice the resync period"), "{body}");
    assert_eq!(get(addr, "/livez").await.0, 200);
}

#[test]
fn metrics_are_exposed_with_the_prefix() {
    let m = Metrics::new();
    m.sync_failures.inc();
    m.sync_duration.get_or_create(&SyncKind::of(false)).observe(0.01);
    m.sync_duration.get_or_create(&SyncKind::of(true)).observe(0.2);
    m.sync_pending_changes.set(3);
    m.last_sync_timestamp.set(1.5e9);
    m.nft_elements.set(42);
    let text = m.encode().unwrap();
    assert!(text.contains("hawser_dataplane_sync_failures_total 1"), "{text}");
    assert!(text.contains("hawser_dataplane_sync_duration_seconds_count{kind=\"partial\"} 1"), "{text}");
    assert!(text.contains("hawser_dataplane_sync_duration_seconds_count{kind=\"full\"} 1"), "{text}");
    assert!(text.contains("hawser_dataplane_sync_pending_changes 3"), "{text}");
    assert!(text.contains("hawser_dataplane_last_sync_timestamp_seconds 1500000000"), "{text}");
    assert!(text.contains("hawser_dataplane_nft_elements 42"));
}

#[test]
fn failed_syncs_back_off_exponentially_up_to_a_bound() {
    use hawser_dataplane::agent::retry_delay;
    use std::time::Duration;
    let s = Duration::from_secs;
    let delays: Vec<Duration> = (1..=9).map(|n| retry_delay(s(1), n, s(60))).collect();
    assert_eq!(delays, vec![s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60), s(60)]);
    assert_eq!(retry_delay(s(1), u32::MAX, s(60)), s(60));
    // Never faster than the minimum sync interval.
    assert_eq!(retry_delay(s(5), 1, s(2)), s(5));
}
