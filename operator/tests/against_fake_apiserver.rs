//! The real `hawser-operator` binary with the mock cloud, against the fake Kubernetes API server:
//! what a user sees on a cluster, through the real kube-rs client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, wait_for};
use hawser_fake_apiserver::{Config, FakeApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The operator as a child process, killed when dropped.
struct Operator {
    child: Child,
    metrics_port: u16,
    health_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_operator(kubeconfig: &Path, state_file: &Path, extra: &[&str]) -> Operator {
    start_operator_as("hawser-operator-test", kubeconfig, state_file, extra)
}

/// Starts a replica named `pod` (its leader-election identity, from POD_NAME as in a pod).
fn start_operator_as(pod: &str, kubeconfig: &Path, state_file: &Path, extra: &[&str]) -> Operator {
    let metrics_port = free_port();
    let health_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
        .args(["--provider", "mock", "--cluster-name", "demo", "--node-debounce", "200ms"])
        .arg("--metrics-bind-address")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--health-probe-bind-address")
        .arg(format!("127.0.0.1:{health_port}"))
        .arg("--mock-state-file")
        .arg(state_file)
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", pod)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("hawser-operator starts");
    Operator { child, metrics_port, health_port }
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The mock cloud as the operator serves it (waiting for the operator to listen, after a start).
async fn mock_state(op: &Operator) -> Value {
    let body = wait_for("the operator to serve /mock/state", || http_get(op.metrics_port, "/mock/state")).await;
    serde_json::from_str(&body).unwrap()
}

fn lb_service(name: &str, class: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": class,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]
        }
    }))
    .unwrap()
}

async fn cluster() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    (server, client)
}

fn ingress_ip(svc: &Service) -> Option<String> {
    svc.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref()?.first()?.ip.clone()
}

fn condition(svc: &Service) -> Option<(String, String, String)> {
    let c = svc.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "hawser.dev/LoadBalancerReady")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn events_for(client: &Client, name: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

fn lbs_of(state: &Value, service: &str) -> Vec<Value> {
    state["loadBalancers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|lb| lb["tags"]["hawser.dev/service"] == service)
        .cloned()
        .collect()
}

fn state_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("cloud.json")
}

#[tokio::test]
async fn service_lifecycle_with_the_mock_cloud() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &[]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");

    // Ours: gets an address from the pool, the finalizer, a True condition and Normal Events.
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    // Another class: must never be touched.
    services.create(&PostParams::default(), &lb_service("other", "example.com/lb", json!({}))).await.unwrap();
    // Invalid annotation: a Warning Event naming it, and no load balancer.
    let bad = lb_service("bad", "hawser.dev/lb", json!({"hawser.dev/scheme": "public"}));
    services.create(&PostParams::default(), &bad).await.unwrap();

    let web =
        wait_for("web's ingress", || async { services.get("web").await.ok().filter(|s| ingress_ip(s).is_some()) })
            .await;
    assert_eq!(ingress_ip(&web).as_deref(), Some("203.0.113.1"));
    assert!(web.metadata.finalizers.as_ref().unwrap().contains(&"hawser.dev/cleanup".to_owned()));
    assert_eq!(condition(&web).unwrap().0, "True");
    let reasons: Vec<String> = events_for(&client, "web").await.into_iter().map(|e| e.1).collect();
    assert!(
        reasons.contains(&"EnsuringLoadBalancer".to_owned()) && reasons.contains(&"EnsuredLoadBalancer".to_owned()),
        "{reasons:?}"
    );

    let bad =
        wait_for("bad's condition", || async { services.get("bad").await.ok().filter(|s| condition(s).is_some()) })
            .await;
    let (status, reason, message) = condition(&bad).unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidConfiguration"));
    assert!(message.contains("hawser.dev/scheme"), "{message}");
    let warnings = events_for(&client, "bad").await;
    assert!(
        warnings
            .iter()
            .any(|(t, r, n)| t == "Warning" && r == "InvalidConfiguration" && n.contains("hawser.dev/scheme")),
        "{warnings:?}"
    );
    assert!(ingress_ip(&bad).is_none());

    assert_eq!(http_get(op.health_port, "/readyz").await.as_deref(), Some("ok"), "ready once caches synced");
    let metrics = http_get(op.metrics_port, "/metrics").await.unwrap();
    for expected in [
        "hawser_reconciles_total{outcome=\"success\"}",
        "hawser_reconciles_total{outcome=\"invalid_input\"}",
        "hawser_provider_calls_total{provider=\"mock\",operation=\"ensure\",outcome=\"success\"}",
        "hawser_provider_call_duration_seconds_bucket",
        "hawser_managed_load_balancers 1",
    ] {
        assert!(metrics.contains(expected), "{expected} missing from /metrics:\n{metrics}");
    }
    let state = mock_state(&op).await;
    assert_eq!(lbs_of(&state, "default/web").len(), 1);
    assert!(lbs_of(&state, "default/bad").is_empty(), "no load balancer for invalid input");
    let other = services.get("other").await.unwrap();
    assert!(
        other.metadata.finalizers.is_none() && ingress_ip(&other).is_none() && condition(&other).is_none(),
        "another class untouched"
    );
    assert!(events_for(&client, "other").await.is_empty());

    // Switching to ClusterIP: the load balancer goes, then the status and the finalizer.
    let to_cluster_ip = json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&to_cluster_ip)).await.unwrap();
    wait_for("web released", || async {
        let s = services.get("web").await.ok()?;
        (s.metadata.finalizers.as_ref().is_none_or(Vec::is_empty)
            && ingress_ip(&s).is_none()
            && condition(&s).is_none())
        .then_some(())
    })
    .await;
    assert!(lbs_of(&mock_state(&op).await, "default/web").is_empty(), "mock load balancer removed");

    // Deleting a Service removes its load balancer and lets the Service go.
    services.create(&PostParams::default(), &lb_service("api", "hawser.dev/lb", json!({}))).await.unwrap();
    wait_for("api's ingress", || async { services.get("api").await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    services.delete("api", &DeleteParams::default()).await.unwrap();
    wait_for("api gone", || async { services.get_opt("api").await.ok().filter(Option::is_none).map(|_| ()) }).await;
    assert!(lbs_of(&mock_state(&op).await, "default/api").is_empty());
    drop(op);
    server.stop().await;
}

#[tokio::test]
async fn restart_with_state_file_creates_no_duplicate() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &[]);
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    let first = wait_for("ingress", || async { services.get("web").await.ok().and_then(|s| ingress_ip(&s)) }).await;
    drop(op); // killed, as by a crash or an eviction

    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &[]);
    // The restarted operator reconciles every Service on start; wait for its reconcile to show in metrics.
    wait_for("a reconcile after restart", || async {
        http_get(op.metrics_port, "/metrics")
            .await
            .filter(|m| m.contains("hawser_reconciles_total{outcome=\"success\"}"))
    })
    .await;
    let state = mock_state(&op).await;
    assert_eq!(lbs_of(&state, "default/web").len(), 1, "exactly one load balancer");
    let creates = state["calls"].as_array().unwrap().iter().filter(|c| c["operation"] == "CreateLoadBalancer").count();
    assert_eq!(creates, 0, "the restarted operator adopted the load balancer: {}", state["calls"]);
    assert_eq!(
        services.get("web").await.unwrap().status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).unwrap()[0]
            .ip
            .as_deref(),
        Some(first.as_str())
    );
    drop(op);
    server.stop().await;
}

#[tokio::test]
async fn node_leaving_is_removed_from_the_load_balancer_targets() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &[]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());
    let second: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-b"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": "10.0.0.3"}]}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &second).await.unwrap();
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    let targets = |state: Value| -> Vec<String> {
        lbs_of(&state, "default/web")
            .first()
            .map(|lb| {
                lb["targets"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
            })
            .unwrap_or_default()
    };
    wait_for("two targets", || async { (targets(mock_state(&op).await) == ["node-a", "node-b"]).then_some(()) }).await;

    let taint = json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}});
    nodes.patch("node-b", &PatchParams::default(), &Patch::Merge(&taint)).await.unwrap();
    wait_for("node-b drained out", || async { (targets(mock_state(&op).await) == ["node-a"]).then_some(()) }).await;
    drop(op);
    server.stop().await;
}

fn lease_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

async fn metric(op: &Operator, line_start: &str) -> Option<String> {
    let text = http_get(op.metrics_port, "/metrics").await?;
    text.lines().find(|l| l.starts_with(line_start)).map(str::to_owned)
}

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig_path();
    let election = [
        "--leader-elect",
        "--leader-election-namespace",
        "default",
        "--leader-election-id",
        "hawser-test",
        "--leader-election-lease-duration",
        "3s",
    ];
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let holder = |want: &'static str| {
        let leases = leases.clone();
        async move {
            leases.get_opt("hawser-test").await.ok().flatten().filter(|l| lease_holder(l).as_deref() == Some(want))
        }
    };

    let mut a = start_operator_as("op-a", kubeconfig, &state_file(&dir), &election);
    wait_for("op-a to lead", || holder("op-a")).await;
    let b = start_operator_as("op-b", kubeconfig, &state_file(&dir), &election);
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    wait_for("web's ingress", || async { services.get("web").await.ok().and_then(|s| ingress_ip(&s)) }).await;
    assert_eq!(metric(&a, "hawser_leader ").await.as_deref(), Some("hawser_leader 1"));
    let standby = wait_for("op-b's metrics", || metric(&b, "hawser_leader ")).await;
    assert_eq!(standby, "hawser_leader 0", "the standby does not lead");
    assert_eq!(metric(&b, "hawser_reconciles_total").await, None, "the standby never reconciled");

    // SIGTERM: the leader stops cleanly and releases the Lease, so the standby need not wait it out.
    let status = Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exited = wait_for("op-a to exit", || std::future::ready(a.child.try_wait().unwrap())).await;
    assert!(exited.success(), "graceful shutdown exits 0: {exited:?}");
    let released_at = tokio::time::Instant::now();
    wait_for("op-b to take over", || holder("op-b")).await;
    assert!(released_at.elapsed() < Duration::from_secs(2), "released Lease taken at once, not after expiry");
    let lease = leases.get("hawser-test").await.unwrap();
    assert!(lease.spec.unwrap().lease_transitions.unwrap() >= 1);
    services.create(&PostParams::default(), &lb_service("api", "hawser.dev/lb", json!({}))).await.unwrap();
    wait_for("api's ingress from the new leader", || async {
        services.get("api").await.ok().and_then(|s| ingress_ip(&s))
    })
    .await;

    // A leader that dies without a word is replaced once its Lease runs out.
    let c = start_operator_as("op-c", kubeconfig, &state_file(&dir), &election);
    drop(b); // SIGKILL
    let killed_at = tokio::time::Instant::now();
    wait_for("op-c to take over", || holder("op-c")).await;
    assert!(killed_at.elapsed() >= Duration::from_secs(2), "not before the Lease could have expired");
    services.create(&PostParams::default(), &lb_service("db", "hawser.dev/lb", json!({}))).await.unwrap();
    wait_for("db's ingress from op-c", || async { services.get("db").await.ok().and_then(|s| ingress_ip(&s)) }).await;

    let state = mock_state(&c).await;
    assert_eq!(state["loadBalancers"].as_array().unwrap().len(), 3, "one load balancer per Service, no duplicate");
    drop(c);
    server.stop().await;
}

/// Cloud calls the mock received, by operation (from `/mock/summary`).
async fn cloud_calls(op: &Operator) -> std::collections::BTreeMap<String, u64> {
    let body = wait_for("/mock/summary", || http_get(op.metrics_port, "/mock/summary")).await;
    let summary: Value = serde_json::from_str(&body).unwrap();
    summary["calls"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(op, outcomes)| (op.clone(), outcomes.as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum()))
        .collect()
}

async fn ensures(op: &Operator) -> u64 {
    let text = http_get(op.metrics_port, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("hawser_provider_calls_total{") && l.contains("operation=\"ensure\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn one_ensure_per_service_then_resyncs_and_ready_flaps_cost_one_listing_and_nothing() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for name in ["a", "b", "c"] {
        services.create(&PostParams::default(), &lb_service(name, "hawser.dev/lb", json!({}))).await.unwrap();
    }
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &["--resync-period", "1s"]);
    for name in ["a", "b", "c"] {
        wait_for("ingress", || async { services.get(name).await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    }
    // The finalizer patch and the status patch each woke every Service again: no cloud call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ensures(&op).await, 3, "exactly one ensure per Service");
    let after_create = cloud_calls(&op).await;
    assert_eq!(after_create.get("CreateLoadBalancer"), Some(&3));

    // Readiness flaps and three resync periods.
    let nodes: Api<Node> = Api::all(client.clone());
    for status in ["False", "True", "Unknown", "True"] {
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status}]}});
        nodes.patch_status("node-a", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = cloud_calls(&op).await;
    assert_eq!(ensures(&op).await, 3, "no ensure from resyncs or Ready flaps");
    let mut new_calls: Vec<(String, u64)> = later
        .iter()
        .map(|(op, n)| (op.clone(), n - after_create.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    new_calls.sort();
    assert_eq!(new_calls.len(), 1, "only listings: {new_calls:?}");
    let (operation, listings) = &new_calls[0];
    assert_eq!(operation, "DescribeLoadBalancers");
    assert!((2..=5).contains(listings), "about one listing a second for the whole cluster: {listings}");
    drop(op);
    server.stop().await;
}

#[tokio::test]
async fn a_load_balancer_deleted_behind_our_back_is_recreated_within_one_resync() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &["--resync-period", "1s"]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    services.create(&PostParams::default(), &lb_service("api", "hawser.dev/lb", json!({}))).await.unwrap();
    for name in ["web", "api"] {
        wait_for("ingress", || async { services.get(name).await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    }
    // Someone deletes web's load balancer in the cloud: edit the cloud's state file.
    let path = state_file(&dir);
    let mut cloud: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let doomed = lbs_of(&cloud_state_as_listed(&cloud), "default/web")[0]["id"].as_str().unwrap().to_owned();
    cloud["loadBalancers"].as_object_mut().unwrap().remove(&doomed);
    cloud["generation"] = json!(cloud["generation"].as_u64().unwrap() + 1);
    std::fs::write(&path, serde_json::to_vec_pretty(&cloud).unwrap()).unwrap();

    wait_for("web's load balancer recreated", || async {
        let state = mock_state(&op).await;
        let web = lbs_of(&state, "default/web");
        (web.len() == 1 && web[0]["id"] != doomed.as_str()).then_some(())
    })
    .await;
    let state = mock_state(&op).await;
    let creates: Vec<String> = state["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["operation"] == "CreateLoadBalancer")
        .map(|c| c["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(creates.len(), 3, "web, api, and web again; api untouched: {creates:?}");
    drop(op);
    server.stop().await;
}

/// The state file keeps load balancers by id; `lbs_of` reads them as `/mock/state` lists them.
fn cloud_state_as_listed(file: &Value) -> Value {
    json!({"loadBalancers": file["loadBalancers"].as_object().unwrap().values().cloned().collect::<Vec<_>>()})
}

#[tokio::test]
async fn a_force_deleted_services_load_balancer_is_collected_and_foreign_ones_never_are() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let path = state_file(&dir);
    // Already in the cloud: another cluster's load balancer, and one without ownership tags
    // that happens to carry a hawser-like name.
    let foreign = json!({
        "generation": 1,
        "nextId": 2,
        "loadBalancers": {
            "mock-lb-other": {"id": "mock-lb-other", "name": "hawser-0123456789abcdef", "tags": {
                "hawser.dev/cluster": "another-cluster", "hawser.dev/service": "default/web",
                "hawser.dev/service-uid": "gone", "hawser.dev/resource": "load-balancer"},
                "addresses": ["203.0.113.200"], "listeners": [], "targets": [],
                "healthCheck": {"protocol": "TCP", "port": 80, "path": null, "interval": 10, "timeout": 5, "healthyThreshold": 3, "unhealthyThreshold": 3},
                "scheme": "internet-facing", "sourceRanges": [], "sessionAffinity": {"type": "None"}, "revision": 1},
            "mock-lb-untagged": {"id": "mock-lb-untagged", "name": "hawser-fedcba9876543210", "tags": {},
                "addresses": ["203.0.113.201"], "listeners": [], "targets": [],
                "healthCheck": {"protocol": "TCP", "port": 80, "path": null, "interval": 10, "timeout": 5, "healthyThreshold": 3, "unhealthyThreshold": 3},
                "scheme": "internet-facing", "sourceRanges": [], "sessionAffinity": {"type": "None"}, "revision": 1}
        }
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&foreign).unwrap()).unwrap();
    let gc = ["--gc-interval", "500ms", "--gc-grace-period", "1s"];
    let op = start_operator(server.kubeconfig_path(), &path, &gc);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for name in ["web", "keep"] {
        services.create(&PostParams::default(), &lb_service(name, "hawser.dev/lb", json!({}))).await.unwrap();
        wait_for("ingress", || async { services.get(name).await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    }

    // A deletion "looks stuck", so someone strips the finalizer and deletes the Service.
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("web's orphaned load balancer collected", || async {
        lbs_of(&mock_state(&op).await, "default/web").iter().all(|lb| lb["id"] == "mock-lb-other").then_some(())
    })
    .await;
    let state = mock_state(&op).await;
    let ids: Vec<&str> =
        state["loadBalancers"].as_array().unwrap().iter().map(|lb| lb["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"mock-lb-other") && ids.contains(&"mock-lb-untagged"), "foreign ones untouched: {ids:?}");
    assert_eq!(lbs_of(&state, "default/keep").len(), 1, "the live Service keeps its load balancer");
    assert_eq!(ids.len(), 3);
    let deletions = metric(&op, "hawser_gc_deletions_total").await.unwrap();
    assert!(deletions.ends_with(" 1"), "{deletions}");
    drop(op);
    server.stop().await;
}

/// `hawser-operator audit` against the same cluster and cloud: exit status and printed rows.
/// (Awaited, not blocked on: the fake apiserver serves from this test's runtime.)
async fn audit(kubeconfig: &Path, state: &Path, output: &str) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
        .args(["--provider", "mock", "--cluster-name", "demo", "--mock-state-file"])
        .arg(state)
        .args(["audit", "--output", output])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("hawser-operator audit runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() != Some(2), "audit failed: {stderr}");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn audit_lists_every_service_and_load_balancer_and_fails_when_something_is_wrong() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_file(&dir);
    let op = start_operator(server.kubeconfig_path(), &state, &["--gc", "off"]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for name in ["web", "api"] {
        services.create(&PostParams::default(), &lb_service(name, "hawser.dev/lb", json!({}))).await.unwrap();
        wait_for("ingress", || async { services.get(name).await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    }
    services.create(&PostParams::default(), &lb_service("other", "example.com/lb", json!({}))).await.unwrap();
    let (code, json_out) = audit(server.kubeconfig_path(), &state, "json").await;
    assert_eq!(code, 0, "all is well: {json_out}");
    let rows: Vec<Value> = serde_json::from_str(&json_out).unwrap();
    let verdicts: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["service"].as_str().unwrap(), r["verdict"].as_str().unwrap())).collect();
    assert_eq!(verdicts, [("default/api", "ok"), ("default/web", "ok")], "another class is not audited");

    // The operator is down; meanwhile api is force-deleted and a new Service appears.
    drop(op);
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("api", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("api", &DeleteParams::default()).await.unwrap();
    services.create(&PostParams::default(), &lb_service("new", "hawser.dev/lb", json!({}))).await.unwrap();
    let (code, table) = audit(server.kubeconfig_path(), &state, "table").await;
    assert_eq!(code, 1, "something needs attention:\n{table}");
    let verdict = |service: &str| {
        let line = table.lines().find(|l| l.starts_with(service)).unwrap_or_default();
        line.split_whitespace().nth(3).unwrap_or_default().to_owned()
    };
    assert!(table.starts_with("SERVICE"), "{table}");
    assert_eq!(
        [verdict("default/api"), verdict("default/new"), verdict("default/web")],
        ["orphan", "missing", "ok"],
        "{table}"
    );
    server.stop().await;
}

/// `hawser-operator plan ARGS` against the same cluster and cloud: exit status, stdout, stderr.
async fn plan(kubeconfig: &Path, state: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
        .args(["--provider", "mock", "--cluster-name", "demo", "--mock-state-file"])
        .arg(state)
        .arg("plan")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("hawser-operator plan runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn plan_prints_what_a_manifest_would_change_and_changes_nothing() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_file(&dir);
    let op = start_operator(server.kubeconfig_path(), &state, &["--gc", "off"]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    wait_for("ingress", || async { services.get("web").await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    // An invalid Service: the controller's Warning Event is what plan must say too.
    let bad = json!({"hawser.dev/scheme": "public"});
    services.create(&PostParams::default(), &lb_service("bad", "hawser.dev/lb", bad)).await.unwrap();
    let warning = wait_for("the Warning Event", || async {
        events_for(&client, "bad").await.into_iter().find(|e| e.1 == "InvalidConfiguration").map(|e| e.2)
    })
    .await;
    drop(op);
    let cloud_before = std::fs::read(&state).unwrap();

    // The same Services as a manifest someone is about to apply: web moves to 8443, and a new one.
    let manifest = dir.path().join("services.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  \
         loadBalancerClass: hawser.dev/lb\n  selector: {app: web}\n  ports: [{name: http, port: 8443, targetPort: 8080}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: shop, namespace: default}\nspec:\n  type: LoadBalancer\n  \
         loadBalancerClass: hawser.dev/lb\n  ports: [{port: 443}]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    let (code, out, err) = plan(server.kubeconfig_path(), &state, &["-f", manifest.to_str().unwrap()]).await;
    assert_eq!(code, 0, "planned: {out}{err}");
    assert!(err.contains("skipped ConfigMap x"), "{err}");
    let web = out.split("Service default/shop").next().unwrap();
    assert!(web.contains("Service default/web: 0 to create, 1 to update"), "{out}");
    assert!(web.contains("~ update   load balancer mock-lb-"), "{out}");
    // 8443 is a new entry of spec.ports: its node port is allocated when applied.
    assert!(web.contains("listeners: 80/TCP (node port 30000) → 8443/TCP"), "{out}");
    assert!(web.contains("note: the API server allocates the node port of 1 port(s)"), "{out}");
    let shop = out.split("Service default/shop").nth(1).unwrap();
    assert!(shop.contains("1 to create") && shop.contains("+ create   load balancer hawser-"), "{out}");
    assert!(shop.contains("listeners: (none) → 443/TCP"), "{out}");
    assert_eq!(std::fs::read(&state).unwrap(), cloud_before, "plan changed the cloud");

    // An existing Service as it is: nothing to do; its deletion; JSON.
    let (code, out, _) = plan(server.kubeconfig_path(), &state, &["default/web"]).await;
    assert_eq!((code, out.trim()), (0, "Service default/web: no changes"));
    let (code, out, _) = plan(server.kubeconfig_path(), &state, &["web", "--delete", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}");
    let plans: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(plans[0]["intent"], "delete");
    assert_eq!(plans[0]["changes"][0]["action"], "delete");
    assert_eq!(plans[0]["changes"][0]["kind"], "load balancer");

    // Invalid: exit 1, and every message of the Warning Event.
    let (code, out, _) = plan(server.kubeconfig_path(), &state, &["default/bad"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("invalid: {warning}")), "the Event's {warning:?} missing from\n{out}");
    let (code, _, err) = plan(server.kubeconfig_path(), &state, &["default/nope"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("default/nope does not exist"), "{err}");
    assert_eq!(std::fs::read(&state).unwrap(), cloud_before, "plan changed the cloud");
    server.stop().await;
}

#[tokio::test]
async fn dry_run_plans_logs_and_serves_every_service_and_writes_nothing() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let state = state_file(&dir);
    let op = start_operator(server.kubeconfig_path(), &state, &["--dry-run"]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &lb_service("web", "hawser.dev/lb", json!({}))).await.unwrap();
    let plans: Value = wait_for("the plan at /plans", || async {
        let body = http_get(op.metrics_port, "/plans").await?;
        let plans: Value = serde_json::from_str(&body).ok()?;
        (plans.as_array()?.len() == 1).then_some(plans)
    })
    .await;
    assert_eq!(plans[0]["service"], "default/web");
    assert_eq!(plans[0]["intent"], "ensure");
    assert_eq!(plans[0]["changes"][0]["action"], "create");
    let event = wait_for("the DryRunPlanned Event", || async {
        events_for(&client, "web").await.into_iter().find(|e| e.1 == "DryRunPlanned")
    })
    .await;
    assert!(event.2.starts_with("Dry run, nothing changed: Service default/web: 1 to create"), "{}", event.2);
    let gauge = metric(&op, "hawser_dry_run_services_with_changes").await.unwrap();
    assert!(gauge.ends_with(" 1"), "{gauge}");

    let cloud = mock_state(&op).await;
    assert!(cloud["loadBalancers"].as_array().unwrap().is_empty(), "a dry run created a load balancer");
    let writes: Vec<&Value> =
        cloud["calls"].as_array().unwrap().iter().filter(|c| c["operation"] != "DescribeLoadBalancers").collect();
    assert!(writes.is_empty(), "a dry run made cloud writes: {writes:?}");
    let web = services.get("web").await.unwrap();
    assert!(web.metadata.finalizers.is_none(), "a dry run added a finalizer");
    assert!(ingress_ip(&web).is_none() && condition(&web).is_none(), "a dry run wrote the status");
    drop(op);
    server.stop().await;
}

#[tokio::test]
async fn a_failed_start_says_each_cause_once_on_one_line() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
        .args(["--provider", "mock", "--cluster-name", "demo"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fatal: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(fatal.len(), 1, "{stderr}");
    assert!(fatal[0].contains("hawser-operator failed"), "{stderr}");
    assert_eq!(fatal[0].matches("/nonexistent/kubeconfig").count(), 1, "the cause repeated: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in a pipe: {stderr}");
}

fn grouped(name: &str, group: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"hawser.dev/load-balancer-group": group}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": name},
                 "ports": [{"name": "p", "port": port, "targetPort": 8080}]}
    }))
    .unwrap()
}

#[tokio::test]
async fn a_group_shares_one_address_refuses_a_clash_untouched_and_goes_with_its_last_member() {
    let (server, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let op = start_operator(server.kubeconfig_path(), &state_file(&dir), &["--gc", "off"]);
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for (name, port) in [("web", 80), ("api", 443)] {
        services.create(&PostParams::default(), &grouped(name, "edge", port)).await.unwrap();
        wait_for("ingress", || async { services.get(name).await.ok().filter(|s| ingress_ip(s).is_some()) }).await;
    }
    let web = services.get("web").await.unwrap();
    let api = services.get("api").await.unwrap();
    assert_eq!(ingress_ip(&web), ingress_ip(&api), "one address for the group");
    let ports = |s: &Service| -> Vec<i32> {
        s.status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress.as_ref().unwrap()[0]
            .ports
            .as_ref()
            .map(|p| p.iter().map(|p| p.port).collect())
            .unwrap_or_default()
    };
    assert_eq!((ports(&web), ports(&api)), (vec![80], vec![443]), "each lists only its own ports");
    assert_eq!(lbs_of(&mock_state(&op).await, "default/web").len(), 0, "no load balancer of its own");
    let state = mock_state(&op).await;
    assert_eq!(state["loadBalancers"].as_array().unwrap().len(), 1);
    let joined = events_for(&client, "web").await;
    assert!(joined.iter().any(|e| e.1 == "JoinedLoadBalancerGroup"), "{joined:?}");
    let gauge = metric(&op, "hawser_load_balancers ").await.unwrap();
    assert!(gauge.ends_with(" 1"), "two Services, one cloud load balancer: {gauge}");

    // A third wants port 80 too: refused, told why, and the others keep working untouched.
    let writes_before =
        state["calls"].as_array().unwrap().iter().filter(|c| c["operation"] != "DescribeLoadBalancers").count();
    services.create(&PostParams::default(), &grouped("clash", "edge", 80)).await.unwrap();
    let warning = wait_for("the GroupConflict Warning", || async {
        events_for(&client, "clash").await.into_iter().find(|e| e.1 == "GroupConflict").map(|e| e.2)
    })
    .await;
    assert!(warning.contains("port 80/TCP is already served by default/web"), "{warning}");
    let clash = wait_for("the GroupConflict condition", || async {
        services.get("clash").await.ok().filter(|s| condition(s).is_some_and(|c| c.1 == "GroupConflict"))
    })
    .await;
    assert!(ingress_ip(&clash).is_none(), "no address for a refused member");
    let state = mock_state(&op).await;
    let writes =
        state["calls"].as_array().unwrap().iter().filter(|c| c["operation"] != "DescribeLoadBalancers").count();
    assert_eq!(writes, writes_before, "refusing made no cloud call");

    // web leaves: the address stays for api, and clash, waiting for port 80, now gets it.
    services.delete("web", &DeleteParams::default()).await.unwrap();
    let clash = wait_for("clash admitted once port 80 is free", || async {
        services.get("clash").await.ok().filter(|s| ingress_ip(s).is_some())
    })
    .await;
    assert_eq!(ingress_ip(&clash), ingress_ip(&api), "the group's address");
    assert_eq!(ingress_ip(&services.get("api").await.unwrap()), ingress_ip(&api), "api kept its address");

    for name in ["api", "clash"] {
        services.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("the group's load balancer gone with its last member", || async {
        mock_state(&op).await["loadBalancers"].as_array().unwrap().is_empty().then_some(())
    })
    .await;
    drop(op);
    server.stop().await;
}
