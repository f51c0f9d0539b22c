//! The real kubectl (CI installs it with scripts/install-test-deps.sh) against the fake
//! apiserver, with the kubeconfig it writes: what a user types, and what they see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::start;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const KUBECTL: &str = "kubectl";

async fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("HOME", cache)
        .output()
        .await
        .expect("kubectl runs (CI installs the Debian package kubernetes-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn kubectl_get_create_patch_delete() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let cache = dir.path();

    let (ok, out, err) = kubectl(&kc, cache, &["get", "namespaces"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("kube-system"), "{out}");

    let manifest = dir.path().join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  loadBalancerClass: hawser.dev/lb\n  ports:\n  - port: 80\n",
    )
    .unwrap();
    // kubectl's client-side validation needs the OpenAPI schema, which this server does not
    // publish (/openapi/v2 and /openapi/v3 are 404), so validation is turned off.
    let (ok, out, err) = kubectl(&kc, cache, &["create", "--validate=false", "-f", manifest.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("service/web created"), "{out}");

    let (ok, out, err) = kubectl(&kc, cache, &["get", "services"]).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("web ")), "{out}");

    let (ok, out, err) = kubectl(
        &kc,
        cache,
        &["patch", "service", "web", "--type", "merge", "-p", r#"{"metadata":{"labels":{"team":"net"}}}"#],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("patched"), "{out}");
    let svc = Api::<Service>::namespaced(client.clone(), "default").get("web").await.unwrap();
    assert_eq!(svc.metadata.labels.unwrap()["team"], "net");

    let (ok, out, err) = kubectl(&kc, cache, &["get", "service", "web", "-o", "yaml"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("team: net"), "{out}");
    assert!(out.contains("clusterIP: 10.96."), "{out}");
    assert!(out.contains("nodePort: 3"), "{out}");

    let (ok, _, err) = kubectl(&kc, cache, &["delete", "service", "web"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&kc, cache, &["get", "service", "web"]).await;
    assert!(!ok);
    assert!(err.contains("NotFound"), "{err}");
    server.stop().await;
}

/// The columns of a line of kubectl's table output (columns are at least two spaces apart;
/// cells such as `3 + 2 more...` or an OS image contain single spaces).
fn columns(line: &str) -> Vec<&str> {
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect()
}

/// Header and the row starting with `name`, as column lists.
fn header_and_row<'a>(out: &'a str, name: &str) -> (Vec<&'a str>, Vec<&'a str>) {
    let mut lines = out.lines();
    let header = columns(lines.next().unwrap_or(""));
    let row =
        lines.map(columns).find(|c| c.first() == Some(&name)).unwrap_or_else(|| panic!("no row {name} in\n{out}"));
    (header, row)
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn micro_time_now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

async fn demo_service(client: &kube::Client) -> Service {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = json!({
        "metadata": {"name": "demo"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": "demo", "tier": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    });
    services.create(&PostParams::default(), &from_json(svc)).await.unwrap()
}

#[tokio::test]
async fn kubectl_get_services_shows_type_addresses_and_ports() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let svc = demo_service(&client).await;
    let spec = svc.spec.unwrap();
    let cluster_ip = spec.cluster_ip.unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();

    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "service", "demo"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "demo");
    assert_eq!(header, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"], "{out}");
    assert_eq!(row[..5], ["demo", "LoadBalancer", cluster_ip.as_str(), "<pending>", &format!("80:{node_port}/TCP")]);
    assert!(row[5].ends_with('s'), "a fresh Service is seconds old: {out}");

    // The operator's write-back shows as EXTERNAL-IP; -o wide adds the selector.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}});
    services.patch_status("demo", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "services", "-o", "wide"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "demo");
    assert_eq!(header, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE", "SELECTOR"], "{out}");
    assert_eq!(row[3], "203.0.113.10");
    assert_eq!(row[6], "app=demo,tier=web");

    // kubectl asks for the object's metadata alongside each row, which --show-labels prints.
    let label = json!({"metadata": {"labels": {"team": "net"}}});
    services.patch("demo", &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "svc", "--show-labels", "-A"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "default");
    assert_eq!(header.first(), Some(&"NAMESPACE"));
    assert_eq!(header.last(), Some(&"LABELS"));
    assert_eq!((row[1], row.last().copied()), ("demo", Some("team=net")), "{out}");
    server.stop().await;
}

#[tokio::test]
async fn kubectl_get_nodes_and_endpointslices() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let nodes: Api<Node> = Api::all(client.clone());
    let node = json!({
        "metadata": {"name": "node-a", "labels": {"node-role.kubernetes.io/worker": ""}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.11"}, {"type": "Hostname", "address": "node-a"}],
            "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Debian GNU/Linux 12 (bookworm)", "kernelVersion": "6.1.0",
                         "containerRuntimeVersion": "containerd://1.7.0", "architecture": "amd64", "bootID": "", "kubeProxyVersion": "",
                         "machineID": "", "operatingSystem": "linux", "systemUUID": ""},
        },
    });
    nodes.create(&PostParams::default(), &from_json(node)).await.unwrap();
    let unready = json!({"metadata": {"name": "node-b"}, "spec": {"unschedulable": true},
                         "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    nodes.create(&PostParams::default(), &from_json(unready)).await.unwrap();

    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "nodes"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "node-a");
    assert_eq!(header, ["NAME", "STATUS", "ROLES", "AGE", "VERSION"], "{out}");
    assert_eq!((row[1], row[2], row[4]), ("Ready", "worker", "v1.33.0"), "{out}");
    let (_, row) = header_and_row(&out, "node-b");
    // No kubelet reported a version: the VERSION cell is empty.
    assert_eq!(row[1..], ["NotReady,SchedulingDisabled", "<none>", row[3]], "{out}");

    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "nodes", "-o", "wide"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "node-a");
    assert_eq!(header[5..], ["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"], "{out}");
    assert_eq!(row[5..], ["10.0.0.11", "<none>", "Debian GNU/Linux 12 (bookworm)", "6.1.0", "containerd://1.7.0"]);

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let endpoints: Vec<Value> = (1..=5).map(|i| json!({"addresses": [format!("10.1.0.{i}")]})).collect();
    let slice = json!({
        "metadata": {"name": "demo-x1", "labels": {"kubernetes.io/service-name": "demo"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints,
    });
    slices.create(&PostParams::default(), &from_json(slice)).await.unwrap();
    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "endpointslices"]).await;
    assert!(ok, "{err}");
    let (header, row) = header_and_row(&out, "demo-x1");
    assert_eq!(header, ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], "{out}");
    assert_eq!(row[1..4], ["IPv4", "8080", "10.1.0.1,10.1.0.2,10.1.0.3 + 2 more..."]);
    server.stop().await;
}

#[tokio::test]
async fn operator_events_show_in_kubectl_get_events_and_describe() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let svc = demo_service(&client).await;
    let events: Api<EventsV1> = Api::namespaced(client.clone(), "default");
    // Published the way hawser's operator publishes them: events.k8s.io/v1 only.
    let publish = |name: &str, reason: &str, note: &str, about: &str, uid: &str| {
        from_json::<EventsV1>(json!({
            "metadata": {"name": name},
            "eventTime": micro_time_now(),
            "action": "Ensure", "reason": reason, "note": note, "type": "Normal",
            "regarding": {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": about, "uid": uid},
            "reportingController": "hawser.dev/operator", "reportingInstance": "hawser-operator-1",
        }))
    };
    let uid = svc.uid().unwrap();
    for (name, reason, note) in [
        ("demo.1", "EnsuringLoadBalancer", "Ensuring load balancer"),
        ("demo.2", "EnsuredLoadBalancer", "Ensured load balancer at 203.0.113.10"),
    ] {
        events.create(&PostParams::default(), &publish(name, reason, note, "demo", &uid)).await.unwrap();
    }
    events
        .create(&PostParams::default(), &publish("other.1", "SyncFailed", "not about demo", "other", "x"))
        .await
        .unwrap();
    // A repeat counts up the series, as the operator's publisher does.
    let series = json!({"series": {"count": 3, "lastObservedTime": micro_time_now()}});
    events.patch("demo.1", &PatchParams::default(), &Patch::Merge(&series)).await.unwrap();

    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "events"]).await;
    assert!(ok, "{err}");
    assert_eq!(columns(out.lines().next().unwrap()), ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], "{out}");
    let row = out.lines().map(columns).find(|c| c.contains(&"EnsuredLoadBalancer")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row[1..], ["Normal", "EnsuredLoadBalancer", "service/demo", "Ensured load balancer at 203.0.113.10"]);
    assert!(out.contains("service/other"), "{out}");

    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "events", "-o", "wide"]).await;
    assert!(ok, "{err}");
    let header = columns(out.lines().next().unwrap());
    assert_eq!(
        header,
        ["LAST SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE", "FIRST SEEN", "COUNT", "NAME"],
        "{out}"
    );
    let row = out.lines().map(columns).find(|c| c.contains(&"demo.1")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&"hawser.dev/operator, hawser-operator-1"), "{out}");
    assert_eq!(row[row.len() - 2], "3", "the series count: {out}");

    let (ok, out, err) = kubectl(&kc, dir.path(), &["describe", "service", "demo"]).await;
    assert!(ok, "{err}");
    let events_section = out.split("Events:").nth(1).unwrap_or_else(|| panic!("no Events in\n{out}"));
    let lines: Vec<Vec<&str>> = events_section.lines().map(columns).collect();
    let ensured = lines.iter().find(|c| c.contains(&"EnsuredLoadBalancer")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(ensured[0], "Normal");
    assert!(ensured.contains(&"hawser.dev/operator"), "{out}");
    assert!(ensured.contains(&"Ensured load balancer at 203.0.113.10"), "{out}");
    assert!(lines.iter().any(|c| c.contains(&"EnsuringLoadBalancer")), "{out}");
    assert!(!events_section.contains("SyncFailed"), "describe selects the Service's own Events: {out}");
    server.stop().await;
}

#[tokio::test]
async fn a_core_event_is_an_events_k8s_io_event() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let svc = demo_service(&client).await;
    let v1: Api<EventsV1> = Api::namespaced(client.clone(), "default");
    let mut watch = v1.watch(&kube::api::WatchParams::default(), "0").await.unwrap().boxed();

    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let event = json!({
        "metadata": {"name": "demo.legacy"},
        "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "demo", "uid": svc.uid()},
        "reason": "Scaled", "message": "made by a core/v1 client", "type": "Warning", "count": 4,
        "source": {"component": "legacy-controller", "host": "node-a"},
        "firstTimestamp": "2025-01-10T11:00:00Z", "lastTimestamp": "2025-01-10T11:05:00Z",
    });
    core.create(&PostParams::default(), &from_json(event)).await.unwrap();

    let seen = v1.get("demo.legacy").await.unwrap();
    assert_eq!(seen.note.as_deref(), Some("made by a core/v1 client"));
    assert_eq!(seen.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("demo"));
    assert_eq!(seen.deprecated_count, Some(4));
    assert_eq!(seen.deprecated_source.as_ref().and_then(|s| s.component.as_deref()), Some("legacy-controller"));
    assert_eq!(seen.deprecated_last_timestamp.map(|t| t.0.to_string()), Some("2025-01-10T11:05:00Z".into()));
    let selected = v1.list(&ListParams::default().fields("regarding.name=demo,type=Warning")).await.unwrap();
    assert_eq!(selected.items.iter().map(|e| e.name_any()).collect::<Vec<_>>(), ["demo.legacy"]);
    assert!(v1.list(&ListParams::default().fields("regarding.name=other")).await.unwrap().items.is_empty());
    let added =
        tokio::time::timeout(Duration::from_secs(30), futures::TryStreamExt::try_next(&mut watch)).await.unwrap();
    match added.unwrap() {
        Some(kube::api::WatchEvent::Added(e)) => assert_eq!(e.note.as_deref(), Some("made by a core/v1 client")),
        other => panic!("expected the core Event ADDED through events.k8s.io, got {other:?}"),
    }

    // And back: a note changed through events.k8s.io is the core message, as kubectl prints it.
    let note = json!({"note": "edited through events.k8s.io"});
    v1.patch("demo.legacy", &PatchParams::default(), &Patch::Merge(&note)).await.unwrap();
    assert_eq!(core.get("demo.legacy").await.unwrap().message.as_deref(), Some("edited through events.k8s.io"));
    let (ok, out, err) = kubectl(&kc, dir.path(), &["get", "events", "-o", "wide"]).await;
    assert!(ok, "{err}");
    let row = out.lines().map(columns).find(|c| c.contains(&"demo.legacy")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&"legacy-controller, node-a") && row.contains(&"edited through events.k8s.io"), "{out}");
    assert_eq!(row[row.len() - 2], "4", "{out}");
    server.stop().await;
}

#[tokio::test]
async fn kubectl_get_watch_prints_table_rows() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    demo_service(&client).await;
    let mut child = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(server.kubeconfig_path())
        .arg("--cache-dir")
        .arg(dir.path())
        .args(["get", "services", "--watch"])
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut next_row = async || {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let c: Vec<String> = columns(&line).into_iter().map(str::to_string).collect();
                seen.push(line);
                if c.first().map(String::as_str) == Some("demo") {
                    return c;
                }
            }
            panic!("kubectl ended: {seen:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no row within 30s"))
    };
    // The first row comes from the list; once it is printed the watch follows, and the
    // address written afterwards can only reach kubectl as a Table-encoded watch event.
    assert_eq!(next_row().await[3], "<pending>");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}}});
    services.patch_status("demo", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let row = next_row().await;
    assert_eq!((row[1].as_str(), row[3].as_str()), ("LoadBalancer", "203.0.113.20"));
    child.kill().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn table_requests_honour_include_object() {
    let (server, client) = start().await;
    demo_service(&client).await;
    let get = |query: &str, accept: &str| {
        http::Request::get(format!("/api/v1/namespaces/default/services{query}"))
            .header("Accept", accept)
            .body(Vec::new())
            .unwrap()
    };
    let table = "application/json;as=Table;v=v1;g=meta.k8s.io";
    let t: Value = client.request(get("", table)).await.unwrap();
    assert_eq!((t["kind"].as_str(), t["apiVersion"].as_str()), (Some("Table"), Some("meta.k8s.io/v1")));
    assert_eq!(
        t["columnDefinitions"][0],
        json!({"name": "Name", "type": "string", "format": "name",
        "description": t["columnDefinitions"][0]["description"], "priority": 0})
    );
    assert_eq!(t["columnDefinitions"][6]["priority"], 1);
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "demo");
    let t: Value = client.request(get("?includeObject=Object", table)).await.unwrap();
    assert_eq!(t["rows"][0]["object"]["spec"]["type"], "LoadBalancer");
    let t: Value = client.request(get("?includeObject=None", table)).await.unwrap();
    assert!(t["rows"][0]["object"].is_null());
    let t: Value =
        client.request(get("", "application/json;as=Table;v=v1beta1;g=meta.k8s.io, application/json")).await.unwrap();
    assert_eq!(t["apiVersion"], "meta.k8s.io/v1beta1");
    let plain: Value = client.request(get("", "application/json")).await.unwrap();
    assert_eq!(plain["kind"], "ServiceList");
    let bad = client.request::<Value>(get("?includeObject=All", table)).await;
    assert!(matches!(bad, Err(kube::Error::Api(s)) if s.code == 400));
    server.stop().await;
}
