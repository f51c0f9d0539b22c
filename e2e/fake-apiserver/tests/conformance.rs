//! Conformance-style suite: every semantic the fake apiserver promises, driven through kube-rs
//! exactly as hawser's binaries use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{code, start, start_with, status};
use futures::{StreamExt, TryStreamExt};
use hawser_fake_apiserver::{Config, FakeApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})).unwrap()
}

fn svc(name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn lb_spec() -> serde_json::Value {
    json!({"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]})
}

/// Guards against a hang if the server misbehaves; no test asserts on durations.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("did not finish within 60s")
}

#[tokio::test]
async fn serves_version_over_https_and_rejects_a_wrong_token() {
    let (server, client) = start().await;
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad");
    let doc = hawser_fake_apiserver::kubeconfig::document(server.url(), server.ca_pem(), "wrong");
    hawser_fake_apiserver::kubeconfig::write(&path, &doc).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let bad = kube::Client::try_from(cfg).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(bad, "default");
    assert_eq!(code(cms.list(&ListParams::default()).await), 401);
    server.stop().await;
}

#[tokio::test]
async fn configmap_crud() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    assert!(created.uid().is_some());
    assert!(created.creation_timestamp().is_some());
    assert_eq!(code(cms.create(&PostParams::default(), &cm("a", json!({}))).await), 409);
    let mut got = cms.get("a").await.unwrap();
    assert_eq!(got.data.as_ref().unwrap()["k"], "v");
    got.data = Some([("k".to_string(), "w".to_string())].into());
    let replaced = cms.replace("a", &PostParams::default(), &got).await.unwrap();
    assert_ne!(replaced.resource_version(), created.resource_version());
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["k"], "w");
    assert_eq!(cms.list(&ListParams::default()).await.unwrap().items.len(), 1);
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(cms.get("a").await), 404);
    let missing: Api<ConfigMap> = Api::namespaced(client, "nope");
    assert_eq!(code(missing.create(&PostParams::default(), &cm("a", json!({}))).await), 404);
    server.stop().await;
}

#[tokio::test]
async fn stale_resource_version_conflicts() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let first = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let mut second = first.clone();
    second.data = Some([("k".to_string(), "2".to_string())].into());
    cms.replace("a", &PostParams::default(), &second).await.unwrap();
    let mut stale = first.clone();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    let s = status(cms.replace("a", &PostParams::default(), &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    // A patch carrying a stale resourceVersion is refused the same way.
    let patch = json!({"metadata": {"resourceVersion": first.resource_version().unwrap()}, "data": {"k": "4"}});
    assert_eq!(code(cms.patch("a", &PatchParams::default(), &Patch::Merge(&patch)).await), 409);
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["k"], "2");
    server.stop().await;
}

#[tokio::test]
async fn status_subresource_is_isolated_and_generation_follows_spec() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let created = svcs.create(&PostParams::default(), &svc("web", lb_spec())).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    // The main resource ignores status.
    let p = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}, "metadata": {"labels": {"x": "y"}}});
    let after = svcs.patch("web", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(after.labels()["x"], "y");
    assert!(after.status.unwrap().load_balancer.unwrap().ingress.is_none());
    assert_eq!(after.metadata.generation, Some(1), "a label change is not a spec change");
    // /status ignores everything else.
    let p = json!({"spec": {"selector": {"app": "other"}}, "metadata": {"labels": {"x": "z"}},
                   "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}});
    let after = svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(after.spec.as_ref().unwrap().selector.as_ref().unwrap()["app"], "web");
    assert_eq!(after.labels()["x"], "y");
    assert_eq!(
        after.status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress.as_ref().unwrap()[0].ip.as_deref(),
        Some("192.0.2.1")
    );
    // replace_status likewise keeps the spec.
    let mut s = after.clone();
    s.spec.as_mut().unwrap().selector = Some([("app".to_string(), "third".to_string())].into());
    let after = svcs.replace_status("web", &PostParams::default(), &s).await.unwrap();
    assert_eq!(after.spec.as_ref().unwrap().selector.as_ref().unwrap()["app"], "web");
    // A spec change bumps the generation.
    let p = json!({"spec": {"selector": {"app": "new"}}});
    let after = svcs.patch("web", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    server.stop().await;
}

#[tokio::test]
async fn finalizers_delay_deletion_until_removed_by_json_patch() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    svcs.create(&PostParams::default(), &svc("web", lb_spec())).await.unwrap();
    // The operator's finalizer dance: test the current list, then add.
    let add = json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                     {"op": "add", "path": "/metadata/finalizers", "value": ["hawser.dev/cleanup"]}]);
    let p: json_patch_ops::Patch = serde_json::from_value(add).unwrap();
    let with = svcs.patch("web", &PatchParams::default(), &Patch::<()>::Json(p)).await.unwrap();
    assert_eq!(with.finalizers(), ["hawser.dev/cleanup"]);
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    let pending = svcs.get("web").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some(), "deletion is pending while a finalizer remains");
    // No new finalizers while deleting.
    let p = json!({"metadata": {"finalizers": ["hawser.dev/cleanup", "other"]}});
    assert_eq!(code(svcs.patch("web", &PatchParams::default(), &Patch::Merge(&p)).await), 422);
    let remove = json!([{"op": "test", "path": "/metadata/finalizers", "value": ["hawser.dev/cleanup"]},
                        {"op": "remove", "path": "/metadata/finalizers/0"}]);
    let p: json_patch_ops::Patch = serde_json::from_value(remove).unwrap();
    svcs.patch("web", &PatchParams::default(), &Patch::<()>::Json(p)).await.unwrap();
    assert_eq!(code(svcs.get("web").await), 404);
    server.stop().await;
}

/// `Patch::Json` carries the json-patch crate's type, the version kube uses.
mod json_patch_ops {
    pub use json_patch::Patch;
}

#[tokio::test]
async fn failed_json_patch_test_is_422_and_changes_nothing() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let p: json_patch_ops::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/k", "value": "not-v"},
        {"op": "replace", "path": "/data/k", "value": "x"}
    ]))
    .unwrap();
    let s = status(cms.patch("a", &PatchParams::default(), &Patch::<()>::Json(p)).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cms.get("a").await.unwrap().resource_version(), created.resource_version());
    server.stop().await;
}

#[tokio::test]
async fn strategic_merge_on_service_status_conditions_and_ports() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    svcs.create(&PostParams::default(), &svc("web", lb_spec())).await.unwrap();
    let cond = |t: &str, s: &str| json!({"type": t, "status": s, "reason": "R", "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"});
    let p = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}, "conditions": [cond("Ready", "True"), cond("Degraded", "False")]}});
    svcs.patch_status("web", &PatchParams::default(), &Patch::Strategic(&p)).await.unwrap();
    let p = json!({"status": {"conditions": [cond("Ready", "False"), {"type": "Degraded", "$patch": "delete"}]}});
    let after = svcs.patch_status("web", &PatchParams::default(), &Patch::Strategic(&p)).await.unwrap();
    let st = after.status.unwrap();
    let conds = st.conditions.unwrap();
    assert_eq!(conds.len(), 1);
    assert_eq!((conds[0].type_.as_str(), conds[0].status.as_str()), ("Ready", "False"));
    assert_eq!(st.load_balancer.unwrap().ingress.unwrap()[0].ip.as_deref(), Some("192.0.2.7"));
    // Ports merge by port (and protocol): adding one keeps the other and its node port.
    let before = svcs.get("web").await.unwrap().spec.unwrap().ports.unwrap()[0].node_port;
    let p = json!({"spec": {"ports": [{"name": "https", "port": 443}]}});
    let after = svcs.patch("web", &PatchParams::default(), &Patch::Strategic(&p)).await.unwrap();
    let ports = after.spec.unwrap().ports.unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0].node_port, before);
    assert!(ports[1].node_port.is_some());
    server.stop().await;
}

#[tokio::test]
async fn server_side_apply_is_refused_with_415() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let p = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "z"}});
    let s = status(cms.patch("a", &PatchParams::apply("test"), &Patch::Apply(&p)).await);
    assert_eq!(s.code, 415);
    assert!(s.message.contains("server-side apply"), "{}", s.message);
    server.stop().await;
}

#[tokio::test]
async fn node_ports_are_allocated_honoured_and_released() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let a = svcs
        .create(&PostParams::default(), &svc("a", json!({"type": "NodePort", "ports": [{"port": 80}]})))
        .await
        .unwrap();
    let np = a.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&np));
    let s = status(
        svcs.create(
            &PostParams::default(),
            &svc("b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": np}]})),
        )
        .await,
    );
    assert_eq!(s.code, 422);
    assert!(s.message.contains("already allocated"), "{}", s.message);
    let s = status(
        svcs.create(
            &PostParams::default(),
            &svc("b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]})),
        )
        .await,
    );
    assert!(s.message.contains("valid range"), "{}", s.message);
    // Type change to ClusterIP drops and releases the node port.
    let p = json!({"spec": {"type": "ClusterIP"}});
    let a = svcs.patch("a", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let spec = a.spec.unwrap();
    assert_eq!(spec.ports.unwrap()[0].node_port, None);
    assert_eq!(spec.external_traffic_policy, None);
    let b = svcs
        .create(&PostParams::default(), &svc("b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": np}]})))
        .await
        .unwrap();
    assert_eq!(b.spec.unwrap().ports.unwrap()[0].node_port, Some(np));
    // Deleting releases too.
    svcs.delete("b", &DeleteParams::default()).await.unwrap();
    svcs.create(
        &PostParams::default(),
        &svc("c", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": np}]})),
    )
    .await
    .unwrap();
    // No node ports for a LoadBalancer that opts out.
    let mut spec = lb_spec();
    spec["allocateLoadBalancerNodePorts"] = json!(false);
    let d = svcs.create(&PostParams::default(), &svc("d", spec)).await.unwrap();
    assert_eq!(d.spec.unwrap().ports.unwrap()[0].node_port, None);
    server.stop().await;
}

#[tokio::test]
async fn cluster_ips_are_allocated_and_immutable() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let a = svcs.create(&PostParams::default(), &svc("a", json!({"ports": [{"port": 80}]}))).await.unwrap();
    let b = svcs.create(&PostParams::default(), &svc("b", json!({"ports": [{"port": 80}]}))).await.unwrap();
    let (ipa, ipb) = (a.spec.as_ref().unwrap().cluster_ip.clone().unwrap(), b.spec.unwrap().cluster_ip.unwrap());
    assert_ne!(ipa, ipb);
    let net: ipnet::Ipv4Net = "10.96.0.0/16".parse().unwrap();
    assert!(net.contains(&ipa.parse::<std::net::Ipv4Addr>().unwrap()));
    let spec = a.spec.clone().unwrap();
    assert_eq!(spec.cluster_ips, Some(vec![ipa.clone()]));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    let c = svcs
        .create(&PostParams::default(), &svc("c", json!({"clusterIP": "10.96.1.1", "ports": [{"port": 80}]})))
        .await
        .unwrap();
    assert_eq!(c.spec.unwrap().cluster_ip.as_deref(), Some("10.96.1.1"));
    assert_eq!(
        code(
            svcs.create(&PostParams::default(), &svc("d", json!({"clusterIP": "10.96.1.1", "ports": [{"port": 80}]})))
                .await
        ),
        422
    );
    let p = json!({"spec": {"clusterIP": "10.96.1.2", "clusterIPs": ["10.96.1.2"]}});
    assert_eq!(code(svcs.patch("a", &PatchParams::default(), &Patch::Merge(&p)).await), 422);
    // A PUT that leaves clusterIP empty keeps the allocated one.
    let mut put = svcs.get("a").await.unwrap();
    let s = put.spec.as_mut().unwrap();
    s.cluster_ip = None;
    s.cluster_ips = None;
    let again = svcs.replace("a", &PostParams::default(), &put).await.unwrap();
    assert_eq!(again.spec.unwrap().cluster_ip, Some(ipa));
    server.stop().await;
}

#[tokio::test]
async fn dual_stack_services_get_both_families() {
    let config = Config { service_cidr_v6: Some("fd00:10:96::/112".parse().unwrap()), ..Config::default() };
    let (server, client) = start_with(config).await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let a = svcs
        .create(
            &PostParams::default(),
            &svc("a", json!({"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]})),
        )
        .await
        .unwrap();
    let spec = a.spec.unwrap();
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string(), "IPv6".to_string()]));
    let ips = spec.cluster_ips.unwrap();
    assert!(ips[1].contains(':'), "{ips:?}");
    server.stop().await;
}

#[tokio::test]
async fn health_check_node_port_for_local_load_balancers() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let mut spec = lb_spec();
    spec["externalTrafficPolicy"] = json!("Local");
    let local = svcs.create(&PostParams::default(), &svc("local", spec)).await.unwrap();
    let s = local.spec.unwrap();
    let hc = s.health_check_node_port.unwrap();
    assert!((30000..=32767).contains(&hc));
    assert_ne!(Some(hc), s.ports.unwrap()[0].node_port);
    let cluster = svcs.create(&PostParams::default(), &svc("cluster", lb_spec())).await.unwrap();
    let s = cluster.spec.unwrap();
    assert_eq!(s.health_check_node_port, None);
    assert_eq!(s.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(s.allocate_load_balancer_node_ports, Some(true));
    // Switching to Cluster drops it.
    let p = json!({"spec": {"externalTrafficPolicy": "Cluster"}});
    let after = svcs.patch("local", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(after.spec.unwrap().health_check_node_port, None);
    server.stop().await;
}

#[tokio::test]
async fn invalid_services_get_422_with_causes() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let dup = json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]});
    let s = status(svcs.create(&PostParams::default(), &svc("dup", dup)).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(s.message.contains("spec.ports[1]: Duplicate value"), "{}", s.message);
    // Same port, different protocol is fine.
    svcs.create(
        &PostParams::default(),
        &svc("dns", json!({"ports": [{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}]})),
    )
    .await
    .unwrap();
    let s = status(
        svcs.create(
            &PostParams::default(),
            &svc("cls", json!({"loadBalancerClass": "hawser.dev/lb", "ports": [{"port": 80}]})),
        )
        .await,
    );
    assert!(s.message.contains("spec.loadBalancerClass"), "{}", s.message);
    let d = s.details.unwrap();
    assert_eq!(d.causes[0].field, "spec.loadBalancerClass");
    svcs.create(&PostParams::default(), &svc("lb", lb_spec())).await.unwrap();
    let p = json!({"spec": {"loadBalancerClass": "other.dev/lb"}});
    let s = status(svcs.patch("lb", &PatchParams::default(), &Patch::Merge(&p)).await);
    assert!(s.message.contains("may not change once set"), "{}", s.message);
    assert_eq!(
        code(svcs.create(&PostParams::default(), &svc("Bad_Name", json!({"ports": [{"port": 80}]}))).await),
        422
    );
    assert_eq!(code(svcs.create(&PostParams::default(), &svc("noports", json!({}))).await), 422);
    server.stop().await;
}

#[tokio::test]
async fn invalid_ingress_addresses_and_slice_node_names_get_422() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.create(&PostParams::default(), &svc("lb", lb_spec())).await.unwrap();
    let bad = json!({"status": {"loadBalancer": {"ingress": [{"ip": "nope"}]}}});
    let s = status(svcs.patch_status("lb", &PatchParams::default(), &Patch::Merge(&bad)).await);
    assert_eq!(s.code, 422);
    assert!(s.message.contains("status.loadBalancer.ingress[0].ip: Invalid value: \"nope\""), "{}", s.message);
    let good = json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}});
    svcs.patch_status("lb", &PatchParams::default(), &Patch::Merge(&good)).await.unwrap();

    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let slice = |node: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "s"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.1.1"], "nodeName": node}],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    };
    let s = status(slices.create(&PostParams::default(), &slice("Bad_Name")).await);
    assert_eq!(s.code, 422);
    assert!(s.message.contains("endpoints[0].nodeName: Invalid value"), "{}", s.message);
    slices.create(&PostParams::default(), &slice("node-1")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({}))).await.unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|c| c.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = ListParams::default().limit(2).continue_token(&c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    server.stop().await;
}

#[tokio::test]
async fn label_and_field_selectors() {
    let (server, client) = start().await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    for (name, svc_name) in [("web-a", "web"), ("web-b", "web"), ("db-a", "db")] {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]
        }))
        .unwrap();
        slices.create(&PostParams::default(), &s).await.unwrap();
    }
    let web = slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await.unwrap();
    assert_eq!(web.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["web-a", "web-b"]);
    let notweb = slices.list(&ListParams::default().labels("kubernetes.io/service-name notin (web)")).await.unwrap();
    assert_eq!(notweb.items.len(), 1);
    let by_name = slices.list(&ListParams::default().fields("metadata.name=db-a")).await.unwrap();
    assert_eq!(by_name.items.len(), 1);
    assert_eq!(code(slices.list(&ListParams::default().fields("spec.foo=bar")).await), 400);
    let bad: EndpointSlice =
        serde_json::from_value(json!({"metadata": {"name": "bad"}, "addressType": "IPv5", "endpoints": []})).unwrap();
    assert_eq!(code(slices.create(&PostParams::default(), &bad).await), 422);
    // The dataplane's own-node watch.
    let nodes: Api<Node> = Api::all(client);
    for n in ["node-1", "node-2"] {
        nodes
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap())
            .await
            .unwrap();
    }
    let mine = nodes.list(&ListParams::default().fields("metadata.name=node-2")).await.unwrap();
    assert_eq!(mine.items.iter().map(|n| n.name_any()).collect::<Vec<_>>(), ["node-2"]);
    let mut w =
        nodes.watch(&WatchParams::default().fields("metadata.name=node-2").timeout(5), "0").await.unwrap().boxed();
    match bounded(w.try_next()).await.unwrap() {
        Some(WatchEvent::Added(n)) => assert_eq!(n.name_any(), "node-2"),
        other => panic!("unexpected {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let a = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let from = a.resource_version().unwrap();
    // Changes made while no watch is connected are delivered on reconnect, in order.
    cms.create(&PostParams::default(), &cm("b", json!({}))).await.unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await.unwrap();
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    let mut w = cms.watch(&WatchParams::default().timeout(10), &from).await.unwrap().boxed();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match bounded(w.try_next()).await.unwrap().unwrap() {
            WatchEvent::Added(c) => seen.push(format!("ADDED {}", c.name_any())),
            WatchEvent::Modified(c) => seen.push(format!("MODIFIED {}", c.name_any())),
            WatchEvent::Deleted(c) => seen.push(format!("DELETED {}", c.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["ADDED b", "MODIFIED a", "DELETED b"]);
    // Selector transitions: a label change that leaves the selection is a deletion for the watcher.
    let rv = cms.get("a").await.unwrap().resource_version().unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"tier": "x"}}})))
        .await
        .unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"tier": null}}})))
        .await
        .unwrap();
    let mut w = cms.watch(&WatchParams::default().labels("tier=x").timeout(10), &rv).await.unwrap().boxed();
    assert!(matches!(bounded(w.try_next()).await.unwrap(), Some(WatchEvent::Added(_))));
    assert!(matches!(bounded(w.try_next()).await.unwrap(), Some(WatchEvent::Deleted(_))));
    server.stop().await;
}

#[tokio::test]
async fn compacted_resource_version_is_410_gone() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let a = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    cms.create(&PostParams::default(), &cm("b", json!({}))).await.unwrap();
    server.compact();
    let mut w = cms.watch(&WatchParams::default().timeout(10), &a.resource_version().unwrap()).await.unwrap().boxed();
    match bounded(w.try_next()).await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::all(client.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    Api::<Service>::namespaced(svcs.clone().into_client(), "default")
        .create(&PostParams::default(), &svc("web", lb_spec()))
        .await
        .unwrap();
    // After the initial list, the watch starts from the list's resourceVersion; that is
    // compacted away before the watcher is polled again, so it must relist.
    let mut stream = watcher(svcs, watcher::Config::default()).boxed();
    let mut init_done = 0;
    let mut applied = Vec::new();
    let mut gone = 0;
    while init_done < 2 {
        let event = match bounded(stream.next()).await.unwrap() {
            Ok(e) => e,
            // The watcher reports the 410 and relists on the next poll, as with a real apiserver.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                gone += 1;
                continue;
            }
            Err(e) => panic!("{e:?}"),
        };
        match event {
            watcher::Event::InitDone => {
                init_done += 1;
                if init_done == 1 {
                    // Changes the Service watch does not see move the history past it.
                    cms.create(&PostParams::default(), &cm("bump", json!({}))).await.unwrap();
                    server.compact();
                }
            }
            watcher::Event::InitApply(s) => applied.push(s.name_any()),
            _ => {}
        }
    }
    assert_eq!(gone, 1);
    assert_eq!(applied, ["web", "web"], "the relist delivered the Service again");
    server.stop().await;
}

#[tokio::test]
async fn bookmarks_and_initial_events() {
    let config = Config { bookmark_interval: Duration::from_millis(50), ..Config::default() };
    let (server, client) = start_with(config).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let head = server.resource_version().to_string();
    let mut w = cms.watch(&WatchParams::default().timeout(30), &head).await.unwrap().boxed();
    match bounded(w.try_next()).await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, head),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Streaming lists: initial ADDED events, then a bookmark marking their end.
    let mut w = cms.watch(&WatchParams::streaming_lists().timeout(30), "").await.unwrap().boxed();
    assert!(matches!(bounded(w.try_next()).await.unwrap(), Some(WatchEvent::Added(c)) if c.name_any() == "a"));
    match bounded(w.try_next()).await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => {
            assert_eq!(b.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str), Some("true"))
        }
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn recorder_events_and_leases() {
    let (server, client) = start().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let s = svcs.create(&PostParams::default(), &svc("web", lb_spec())).await.unwrap();
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "hawser".into(), instance: Some("test".into()) });
    let ev = Event {
        type_: EventType::Normal,
        reason: "Ensured".into(),
        note: Some("ok".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = s.object_ref(&());
    recorder.publish(&ev, &reference).await.unwrap();
    // The same event again is a PATCH of its series.
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<EventsV1> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].reason.as_deref(), Some("Ensured"));
    assert!(list.items[0].series.is_some(), "the repeat was recorded as a series");

    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    let l: Lease = serde_json::from_value(
        json!({"metadata": {"name": "hawser"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}),
    )
    .unwrap();
    let created = leases.create(&PostParams::default(), &l).await.unwrap();
    let mut mine = leases.get("hawser").await.unwrap();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases.replace("hawser", &PostParams::default(), &mine).await.unwrap();
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    assert_eq!(code(leases.replace("hawser", &PostParams::default(), &stale).await), 409);
    assert_eq!(leases.get("hawser").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("b"));
    server.stop().await;
}

#[tokio::test]
async fn namespaces_cascade_and_delete_collection() {
    let (server, client) = start().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap();
    let created = nss.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    for i in 0..3 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({"n": i.to_string()}))).await.unwrap();
    }
    cms.delete_collection(&DeleteParams::default(), &ListParams::default().labels("n in (0,1)")).await.unwrap();
    assert_eq!(cms.list(&ListParams::default()).await.unwrap().items.len(), 1);
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(nss.get("team").await), 404);
    let all: Api<ConfigMap> = Api::all(client);
    assert!(all.list(&ListParams::default()).await.unwrap().items.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_verbs_get_status_errors() {
    let (server, client) = start().await;
    let get = |p: &str| http::Request::get(p).body(Vec::new()).unwrap();
    assert_eq!(code(client.request_text(get("/apis/apps/v1/deployments")).await), 404);
    assert_eq!(code(client.request_text(get("/openapi/v2")).await), 404);
    assert_eq!(code(client.request_text(get("/api/v1/namespaces/default/services/x/scale")).await), 404);
    let post = http::Request::post("/api/v1/namespaces/default/services/web").body(b"{}".to_vec()).unwrap();
    let s = status(client.request_text(post).await);
    assert_eq!((s.code, s.reason.as_str()), (405, "MethodNotAllowed"));
    let yaml = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/yaml")
        .body(b"metadata: {name: a}".to_vec())
        .unwrap();
    assert_eq!(code(client.request_text(yaml).await), 415);
    let doc: serde_json::Value =
        serde_json::from_str(&client.request_text(get("/apis/discovery.k8s.io/v1")).await.unwrap()).unwrap();
    assert_eq!(doc["resources"][0]["kind"], "EndpointSlice");
    assert_eq!(doc["resources"][0]["namespaced"], true);
    server.stop().await;
}

#[tokio::test]
async fn binary_like_start_writes_a_kubeconfig_at_the_requested_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kc");
    let server =
        FakeApiServer::start(Config { kubeconfig_path: Some(path.clone()), ..Config::default() }).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(server.url()));
    assert!(text.contains(server.token()));
    assert!(text.contains("certificate-authority-data"));
    server.stop().await;
}
