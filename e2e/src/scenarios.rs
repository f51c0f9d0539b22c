//! The scenarios, written once against [`Backend`]: what a user of a `type: LoadBalancer`
//! Service of class `hawser.dev/lb` relies on, checked the way they would notice it (which
//! backend answered, the client address it saw, refused or dropped, the Service's status and
//! Events, the cloud's records).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::traffic::{Client, Outcome, UDP_PORT};

/// The class hawser serves.
pub const CLASS: &str = "hawser.dev/lb";
/// The finalizer hawser puts on Services it owns a load balancer for.
pub const FINALIZER: &str = "hawser.dev/cleanup";
/// The taint of a node the cluster autoscaler is removing.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
const APP: &str = "echo";
const SVC: &str = "web";
/// Long enough for a reconcile, a dataplane sync and a health probe round; short enough that
/// a broken scenario fails in well under a minute.
const CONVERGE: Duration = Duration::from_secs(20);

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Polls `f` every 100 ms until it yields a value, failing with `what` and the last error after
/// `limit`.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not within {limit:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A fresh namespace for one scenario (unique on a shared kind cluster too).
async fn namespace(kube: &kube::Client, scenario: &str) -> anyhow::Result<String> {
    let name = format!("e2e-{scenario}-{}-{}", std::process::id(), NS_COUNTER.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {crate::external::LABEL: "true"}}}))?;
    Api::<Namespace>::all(kube.clone()).create(&PostParams::default(), &ns).await?;
    Ok(name)
}

/// Best-effort removal of a scenario's namespace (matters on kind; the local cluster's fake
/// apiserver goes whole, and on an existing one it removes what is left, see
/// [`crate::external`]).
async fn cleanup(kube: &kube::Client, ns: &str) {
    let _ = Api::<Namespace>::all(kube.clone()).delete(ns, &DeleteParams::default()).await;
}

fn services(kube: &kube::Client, ns: &str) -> Api<Service> {
    Api::namespaced(kube.clone(), ns)
}

/// Creates Service `name` selecting the echo backends, from a `spec` fragment merged over a
/// LoadBalancer of our class with one TCP port 80 → 8080.
async fn create_service(
    kube: &kube::Client,
    ns: &str,
    name: &str,
    spec: Value,
    annotations: Value,
) -> anyhow::Result<()> {
    let mut full = json!({
        "type": "LoadBalancer",
        "loadBalancerClass": CLASS,
        "selector": {"app": APP},
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
    });
    if let (Some(base), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let svc: Service =
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}, "spec": full}))?;
    services(kube, ns).create(&PostParams::default(), &svc).await?;
    Ok(())
}

async fn patch_spec(kube: &kube::Client, ns: &str, name: &str, spec: Value) -> anyhow::Result<()> {
    services(kube, ns).patch(name, &PatchParams::default(), &Patch::Merge(&json!({"spec": spec}))).await?;
    Ok(())
}

async fn get_service(kube: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Service> {
    Ok(services(kube, ns).get(name).await?)
}

fn ingress_of(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_ref()?.parse().ok())
        .collect()
}

/// Waits for the Service's load-balancer address.
async fn wait_ingress(kube: &kube::Client, ns: &str, name: &str) -> anyhow::Result<IpAddr> {
    until("ingress assigned", CONVERGE, || async {
        let svc = get_service(kube, ns, name).await?;
        ingress_of(&svc).first().copied().context("no ingress yet")
    })
    .await
}

fn node_port(svc: &Service, port: i32, protocol: &str) -> Option<u16> {
    svc.spec.as_ref()?.ports.as_ref()?.iter().find_map(|p| {
        (p.port == port && p.protocol.as_deref().unwrap_or("TCP") == protocol)
            .then_some(p.node_port)
            .flatten()
            .and_then(|n| u16::try_from(n).ok())
    })
}

/// The cloud's load balancers owned by Service `ns/name`.
fn owned<'a>(state: &'a Value, ns: &str, name: &str) -> Vec<&'a Value> {
    let key = format!("{ns}/{name}");
    state["loadBalancers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|lb| lb["tags"]["hawser.dev/service"].as_str() == Some(key.as_str()))
        .collect()
}

fn target_names(lb: &Value) -> BTreeSet<String> {
    lb["targets"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str().map(str::to_owned)).collect()
}

/// Waits until `ns/name` has exactly one load balancer in the cloud that satisfies `check`.
async fn wait_lb(
    b: &impl Backend,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    until(what, CONVERGE, || async {
        let state = b.mock_state().await?;
        let lbs = owned(&state, ns, name);
        ensure!(lbs.len() == 1, "{} load balancers for {ns}/{name}", lbs.len());
        ensure!(check(lbs[0]), "load balancer not as wanted: {}", lbs[0]);
        Ok(lbs[0].clone())
    })
    .await
}

/// Waits until a GET of `path` answers, and returns the answer.
async fn wait_reply(client: &Client, addr: IpAddr, port: u16, path: &str) -> anyhow::Result<String> {
    until(&format!("an answer from {addr}:{port}{path}"), CONVERGE, || async {
        match client.http(addr, port, path).await {
            Outcome::Reply(s) => Ok(s),
            other => bail!("{other:?}"),
        }
    })
    .await
}

/// Waits until requests stop being answered, and returns how they fail.
async fn wait_no_reply(client: &Client, addr: IpAddr, port: u16) -> anyhow::Result<Outcome> {
    until(&format!("{addr}:{port} to stop answering"), CONVERGE, || async {
        match client.http(addr, port, "/hostname").await {
            Outcome::Reply(s) => bail!("still answered by {s}"),
            other => Ok(other),
        }
    })
    .await
}

/// The backends answering `n` requests.
async fn answering(client: &Client, addr: IpAddr, port: u16, n: usize) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for _ in 0..n {
        match client.http(addr, port, "/hostname").await {
            Outcome::Reply(s) => names.push(s),
            other => bail!("request {} to {addr}:{port}: {other:?}", names.len() + 1),
        }
    }
    Ok(names)
}

fn distinct(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

fn client_ip(reply: &str) -> Option<IpAddr> {
    reply.rsplit_once(':')?.0.parse().ok()
}

async fn backend_names(b: &impl Backend, ns: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(b.backends(ns, APP).await?.into_iter().map(|p| p.name).collect())
}

/// Ingress is assigned from the pool, traffic flows via the address (to every backend) and
/// via every node's NodePort, and the cloud holds one load balancer targeting every node.
pub async fn ingress_and_traffic(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "ingress").await?;
    b.deploy(&ns, APP, 2).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let svc = get_service(&kube, &ns, SVC).await?;
    ensure!(
        svc.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER),
        "no {FINALIZER} finalizer: {:?}",
        svc.metadata.finalizers
    );
    let nodes = b.nodes().await?;
    let names: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let lb = wait_lb(b, &ns, SVC, "load balancer targets every node", |lb| target_names(lb) == names).await?;
    ensure!(lb["addresses"][0].as_str() == Some(addr.to_string().as_str()), "ingress {addr} is not the cloud's {lb}");

    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    let seen = distinct(&answering(&client, addr, 80, 24).await?);
    ensure!(seen == backend_names(b, &ns).await?, "via {addr}: answered by {seen:?}, not every backend");
    let np = node_port(&svc, 80, "TCP").context("no nodePort")?;
    for n in &nodes {
        let who = wait_reply(&client, n.address, np, "/hostname").await?;
        ensure!(backend_names(b, &ns).await?.contains(&who), "NodePort {np} on {} answered by {who}", n.name);
    }
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Adding, changing and removing a Service port reaches the cloud's listeners and the traffic.
pub async fn ports_change(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "ports").await?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;

    let listeners = |ports: &'static [u64]| {
        move |lb: &Value| {
            let have: BTreeSet<u64> =
                lb["listeners"].as_array().into_iter().flatten().filter_map(|l| l["port"].as_u64()).collect();
            have == ports.iter().copied().collect()
        }
    };
    let two = json!([
        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
        {"name": "alt", "protocol": "TCP", "port": 8000, "targetPort": 8080},
    ]);
    patch_spec(&kube, &ns, SVC, json!({"ports": two})).await?;
    wait_lb(b, &ns, SVC, "listener 8000 added", listeners(&[80, 8000])).await?;
    wait_reply(&client, addr, 8000, "/hostname").await?;

    let changed = json!([
        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
        {"name": "alt", "protocol": "TCP", "port": 9000, "targetPort": 8080},
    ]);
    patch_spec(&kube, &ns, SVC, json!({"ports": changed})).await?;
    wait_lb(b, &ns, SVC, "listener 8000 changed to 9000", listeners(&[80, 9000])).await?;
    wait_reply(&client, addr, 9000, "/hostname").await?;
    wait_no_reply(&client, addr, 8000).await?;

    let one = json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]);
    patch_spec(&kube, &ns, SVC, json!({"ports": one})).await?;
    wait_lb(b, &ns, SVC, "listener 9000 removed", listeners(&[80])).await?;
    wait_no_reply(&client, addr, 9000).await?;
    wait_reply(&client, addr, 80, "/hostname").await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

async fn health_of(client: &Client, node: IpAddr, path: &str) -> bool {
    matches!(client.http(node, crate::local::HEALTH_PORT, path).await, Outcome::Reply(_))
}

/// `externalTrafficPolicy: Local`: only nodes with a ready endpoint pass the per-Service health
/// check, the client address reaches the backend unchanged; switching to Cluster points the
/// health check at /healthz and every node serves (masqueraded).
pub async fn local_traffic_policy(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "local").await?;
    b.deploy(&ns, APP, 1).await?;
    let pod = b.backends(&ns, APP).await?.pop().context("no backend")?;
    create_service(&kube, &ns, SVC, json!({"externalTrafficPolicy": "Local"}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let path = format!("/services/{ns}/{SVC}");
    wait_lb(b, &ns, SVC, "per-Service health check", |lb| lb["healthCheck"]["path"].as_str() == Some(path.as_str()))
        .await?;

    let client = b.client();
    for n in b.nodes().await? {
        let want = n.name == pod.node;
        let got = until(&format!("{} health {path} = {want}", n.name), CONVERGE, || async {
            let h = health_of(&client, n.address, &path).await;
            ensure!(h == want, "health {h}");
            Ok(h)
        })
        .await?;
        ensure!(got == want);
    }
    let mut sources = vec![client.clone()];
    sources.extend(b.other_client());
    for c in &sources {
        let seen = wait_reply(c, addr, 80, "/clientip").await?;
        let src = c.source.context("client without a known source address")?;
        ensure!(client_ip(&seen) == Some(src), "backend saw {seen}, client is {src}: client address not preserved");
    }

    patch_spec(&kube, &ns, SVC, json!({"externalTrafficPolicy": "Cluster"})).await?;
    wait_lb(b, &ns, SVC, "/healthz health check", |lb| lb["healthCheck"]["path"].as_str() == Some("/healthz")).await?;
    let src = client.source.context("client without a known source address")?;
    let nodes: Vec<IpAddr> = b.nodes().await?.into_iter().map(|n| n.address).collect();
    for n in &nodes {
        ensure!(health_of(&client, *n, "/healthz").await, "{n} /healthz failing");
    }
    // Cluster policy masquerades (the endpoint may be on another node): the backend sees an
    // address of the node that forwarded, never the client.
    until("Cluster policy masquerades", CONVERGE, || async {
        let seen = client.http(addr, 80, "/clientip").await.reply().map(str::to_owned).context("no reply")?;
        let ip = client_ip(&seen).context("bad clientip")?;
        ensure!(ip != src, "backend saw the client {seen}");
        Ok(())
    })
    .await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

/// `loadBalancerSourceRanges` admits only the listed clients, on the address and the NodePort,
/// and follows changes.
pub async fn source_ranges(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "ranges").await?;
    let (allowed, denied) = (b.client(), b.other_client());
    let a_src = allowed.source.context("client without a known source address")?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({"loadBalancerSourceRanges": [format!("{a_src}/32")]}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    wait_reply(&allowed, addr, 80, "/hostname").await?;
    let svc = get_service(&kube, &ns, SVC).await?;
    let np = node_port(&svc, 80, "TCP").context("no nodePort")?;
    let node = b.nodes().await?.first().context("no node")?.address;
    wait_reply(&allowed, node, np, "/hostname").await?;
    if let Some(denied) = &denied {
        ensure!(denied.http(addr, 80, "/hostname").await == Outcome::Timeout, "a client outside the ranges got in");
        ensure!(denied.http(node, np, "/hostname").await == Outcome::Timeout, "NodePort open outside the ranges");
    }
    // A range the client is not in: it is dropped, not refused.
    patch_spec(&kube, &ns, SVC, json!({"loadBalancerSourceRanges": ["192.0.2.0/24"]})).await?;
    let how = wait_no_reply(&allowed, addr, 80).await?;
    ensure!(how == Outcome::Timeout, "outside the ranges should be a drop, was {how:?}");
    patch_spec(&kube, &ns, SVC, json!({"loadBalancerSourceRanges": null})).await?;
    wait_reply(&allowed, addr, 80, "/hostname").await?;
    if let Some(denied) = &denied {
        wait_reply(denied, addr, 80, "/hostname").await?;
    }
    cleanup(&kube, &ns).await;
    Ok(())
}

/// `sessionAffinity: ClientIP` keeps a client on one backend; without it requests spread.
pub async fn session_affinity(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "affinity").await?;
    b.deploy(&ns, APP, 3).await?;
    create_service(&kube, &ns, SVC, json!({"sessionAffinity": "ClientIP"}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    let seen = distinct(&answering(&client, addr, 80, 15).await?);
    ensure!(seen.len() == 1, "ClientIP affinity, yet answered by {seen:?}");

    patch_spec(&kube, &ns, SVC, json!({"sessionAffinity": "None", "sessionAffinityConfig": null})).await?;
    until("requests spread once affinity is off", CONVERGE, || async {
        let seen = distinct(&answering(&client, addr, 80, 15).await?);
        ensure!(seen.len() > 1, "still only {seen:?}");
        Ok(())
    })
    .await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

/// A UDP port works via the address and the NodePort, beside a TCP one.
pub async fn udp(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "udp").await?;
    b.deploy(&ns, APP, 2).await?;
    let ports = json!([
        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
        {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": i32::from(UDP_PORT)},
    ]);
    create_service(&kube, &ns, SVC, json!({"ports": ports}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    let names = backend_names(b, &ns).await?;
    let svc = get_service(&kube, &ns, SVC).await?;
    let np = node_port(&svc, 53, "UDP").context("no UDP nodePort")?;
    let node = b.nodes().await?.first().context("no node")?.address;
    for (dst, port) in [(addr, 53), (node, np)] {
        let who = until(&format!("UDP answer from {dst}:{port}"), CONVERGE, || async {
            client.udp(dst, port, "hostname").await.reply().map(str::to_owned).context("no UDP answer")
        })
        .await?;
        ensure!(names.contains(&who), "UDP {dst}:{port} answered by {who}");
    }
    let seen = client.udp(addr, 53, "clientip").await;
    ensure!(seen.reply().is_some_and(|s| client_ip(s).is_some()), "UDP clientip: {seen:?}");
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Scaled to zero, the Service refuses connections (at once, not a timeout); scaled back, it
/// answers again.
pub async fn scale_to_zero(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "zero").await?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    b.scale(&ns, APP, 0).await?;
    let how = wait_no_reply(&client, addr, 80).await?;
    ensure!(how == Outcome::Refused, "no endpoints should be refused, was {how:?}");
    b.scale(&ns, APP, 1).await?;
    let who = wait_reply(&client, addr, 80, "/hostname").await?;
    ensure!(backend_names(b, &ns).await?.contains(&who), "answered by {who}");
    cleanup(&kube, &ns).await;
    Ok(())
}

/// A node tainted for removal by the cluster autoscaler leaves the load balancer (cloud targets
/// and its own health check); a deleted Node too; traffic keeps flowing through the others.
pub async fn node_drains(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "drain").await?;
    let nodes = b.nodes().await?;
    ensure!(nodes.len() >= 2, "needs two nodes");
    b.deploy(&ns, APP, 2).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let all: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    wait_lb(b, &ns, SVC, "every node a target", |lb| target_names(lb) == all).await?;

    let (gone, stays) = (&nodes[0], &nodes[1]);
    let node_api: Api<Node> = Api::all(kube.clone());
    let taint = json!({"spec": {"taints": [{"key": AUTOSCALER_TAINT, "value": "1", "effect": "NoSchedule"}]}});
    node_api.patch(&gone.name, &PatchParams::default(), &Patch::Merge(&taint)).await?;
    let rest: BTreeSet<String> = all.iter().filter(|n| **n != gone.name).cloned().collect();
    let untaint = async {
        node_api.patch(&gone.name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": null}}))).await
    };
    let drained = async {
        wait_lb(b, &ns, SVC, "tainted node drained", |lb| target_names(lb) == rest).await?;
        let client = b.client();
        until("tainted node fails /healthz", CONVERGE, || async {
            ensure!(!health_of(&client, gone.address, "/healthz").await, "still healthy");
            Ok(())
        })
        .await?;
        let mut sources = vec![client];
        sources.extend(b.other_client());
        for c in &sources {
            wait_reply(c, addr, 80, "/hostname").await?;
        }
        anyhow::Ok(())
    }
    .await;
    untaint.await?;
    drained?;
    wait_lb(b, &ns, SVC, "untainted node back", |lb| target_names(lb) == all).await?;

    if b.can_delete_nodes() {
        node_api.delete(&stays.name, &DeleteParams::default()).await?;
        let left: BTreeSet<String> = all.iter().filter(|n| **n != stays.name).cloned().collect();
        wait_lb(b, &ns, SVC, "deleted node drained", |lb| target_names(lb) == left).await?;
        b.lb_settled(addr).await?;
        let client = b.client();
        wait_reply(&client, addr, 80, "/hostname").await?;
        let seen = distinct(&answering(&client, addr, 80, 10).await?);
        ensure!(!seen.is_empty(), "no answer after the node left");
    }
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Deleting the Service deletes its load balancer, then the finalizer goes and with it the
/// Service; the address stops answering.
pub async fn service_deletion(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "delete").await?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    services(&kube, &ns).delete(SVC, &DeleteParams::default()).await?;
    until("Service gone (finalizer removed)", CONVERGE, || async {
        match services(&kube, &ns).get_opt(SVC).await? {
            None => Ok(()),
            Some(s) => bail!("still there, finalizers {:?}", s.metadata.finalizers),
        }
    })
    .await?;
    let state = b.mock_state().await?;
    ensure!(owned(&state, &ns, SVC).is_empty(), "load balancer left in the cloud: {state}");
    wait_no_reply(&client, addr, 80).await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Changing the type to ClusterIP deletes the load balancer, the ingress and the finalizer.
pub async fn type_change_to_cluster_ip(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "clusterip").await?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    patch_spec(&kube, &ns, SVC, json!({"type": "ClusterIP", "loadBalancerClass": null, "externalTrafficPolicy": null}))
        .await?;
    until("load balancer, ingress and finalizer gone", CONVERGE, || async {
        let state = b.mock_state().await?;
        ensure!(owned(&state, &ns, SVC).is_empty(), "load balancer still in the cloud");
        let svc = get_service(&kube, &ns, SVC).await?;
        ensure!(ingress_of(&svc).is_empty(), "ingress still set");
        ensure!(!svc.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER), "finalizer still set");
        Ok(())
    })
    .await?;
    wait_no_reply(&client, addr, 80).await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Services of another class, or of none, get nothing from hawser.
pub async fn other_class_untouched(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "class").await?;
    create_service(&kube, &ns, "other", json!({"loadBalancerClass": "example.com/other"}), json!({})).await?;
    create_service(&kube, &ns, "plain", json!({"type": "NodePort", "loadBalancerClass": null}), json!({})).await?;
    // Ours, made last: once it has its address, the operator has seen the others too.
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    wait_ingress(&kube, &ns, SVC).await?;
    let state = b.mock_state().await?;
    for name in ["other", "plain"] {
        let svc = get_service(&kube, &ns, name).await?;
        ensure!(ingress_of(&svc).is_empty(), "{name} got an ingress");
        ensure!(svc.metadata.finalizers.is_none_or(|f| f.is_empty()), "{name} got a finalizer");
        ensure!(owned(&state, &ns, name).is_empty(), "{name} got a load balancer");
    }
    cleanup(&kube, &ns).await;
    Ok(())
}

/// An invalid annotation gives a Warning Event naming it and what is accepted, and no load
/// balancer.
pub async fn invalid_annotation(b: &impl Backend) -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event;
    let kube = b.kube();
    let ns = namespace(&kube, "invalid").await?;
    create_service(&kube, &ns, SVC, json!({}), json!({"hawser.dev/scheme": "sideways"})).await?;
    let events: Api<Event> = Api::namespaced(kube.clone(), &ns);
    let note = until("a Warning Event", CONVERGE, || async {
        let list = events.list(&Default::default()).await?;
        list.items
            .into_iter()
            .find(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(SVC)
            })
            .and_then(|e| e.note)
            .context("no Warning Event yet")
    })
    .await?;
    ensure!(
        note.contains("hawser.dev/scheme") && note.contains("sideways"),
        "Event does not name the annotation: {note}"
    );
    ensure!(note.contains("internal"), "Event does not say what is accepted: {note}");
    let svc = get_service(&kube, &ns, SVC).await?;
    ensure!(ingress_of(&svc).is_empty(), "ingress despite the invalid annotation");
    let state = b.mock_state().await?;
    ensure!(owned(&state, &ns, SVC).is_empty(), "load balancer made despite the invalid annotation");
    cleanup(&kube, &ns).await;
    Ok(())
}

/// The operator killed while provisioning and started again adopts the load balancer it made
/// (found by its ownership tags in the persisted cloud) instead of making a second one.
pub async fn operator_restart_no_duplicate(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "restart").await?;
    // Slow cloud calls make the create land while the Service has no address yet.
    if !b.restart_operator(&["--mock-latency=1500ms"]).await? {
        eprintln!("skipping: this backend cannot restart the operator");
        return Ok(());
    }
    b.deploy(&ns, APP, 1).await?;
    until("operator back", CONVERGE, || b.mock_state()).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let made = until("the load balancer exists in the cloud", CONVERGE, || async {
        let state = b.mock_state().await?;
        owned(&state, &ns, SVC).first().map(|lb| (*lb).clone()).context("not yet")
    })
    .await?;
    b.restart_operator(&[]).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let state = until("operator back", CONVERGE, || b.mock_state()).await?;
    let lbs = owned(&state, &ns, SVC);
    ensure!(lbs.len() == 1, "{} load balancers after the restart: {state}", lbs.len());
    ensure!(lbs[0]["id"] == made["id"], "a new load balancer replaced {}: {}", made["id"], lbs[0]);
    ensure!(lbs[0]["addresses"][0].as_str() == Some(addr.to_string().as_str()), "ingress {addr} is not {}", lbs[0]);
    let creates: Vec<&Value> = state["calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c.to_string().contains("CreateLoadBalancer"))
        .collect();
    ensure!(creates.is_empty(), "the restarted operator created again: {creates:?}");
    wait_reply(&b.client(), addr, 80, "/hostname").await?;
    cleanup(&kube, &ns).await;
    Ok(())
}

/// A node's dataplane restarted (a DaemonSet rolling update): it leaves its rules on SIGTERM,
/// so the node keeps serving while no agent runs; the agent that starts adopts the tables:
/// one full sync, which replaces nothing, and no failure. A change made while it was down (a
/// second backend: the Service's first endpoint map) reaches the node.
pub async fn dataplane_restart(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "dp-restart").await?;
    b.deploy(&ns, APP, 1).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let svc = get_service(&kube, &ns, SVC).await?;
    let np = node_port(&svc, 80, "TCP").context("no nodePort")?;
    let node = b.nodes().await?.into_iter().next().context("no node")?;
    let client = b.client();
    let first = wait_reply(&client, node.address, np, "/hostname").await?;
    if !b.stop_dataplane(0).await? {
        eprintln!("skipping: this backend cannot stop a dataplane");
        cleanup(&kube, &ns).await;
        return Ok(());
    }
    // No agent on the node: its rules still serve, through its NodePort and the load balancer.
    let seen = answering(&client, node.address, np, 8).await?;
    ensure!(distinct(&seen) == BTreeSet::from([first.clone()]), "while the agent was down: {seen:?}");
    wait_reply(&client, addr, 80, "/hostname").await?;
    b.scale(&ns, APP, 2).await?;
    b.start_dataplane(0).await?;
    let both = backend_names(b, &ns).await?;
    until("the restarted agent sends to both backends", CONVERGE, || async {
        let seen = distinct(&answering(&client, node.address, np, 16).await?);
        if seen == both { Ok(()) } else { Err(anyhow::anyhow!("answered by {seen:?}, not {both:?}")) }
    })
    .await?;
    if let Some(metrics) = b.dataplane_metrics(0) {
        let count = |name: &str| {
            metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        ensure!(count("hawser_dataplane_full_syncs_total") == 1.0, "one full sync, not:\n{metrics}");
        ensure!(count("hawser_dataplane_tables_replaced_total") == 0.0, "the tables were replaced:\n{metrics}");
        ensure!(count("hawser_dataplane_sync_failures_total") == 0.0, "a sync failed:\n{metrics}");
    }
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Replacing every backend one by one under steady load loses no request: each is answered
/// within the time a client's TCP takes to resend its SYN twice (see `Client::steady_load`).
pub async fn rolling_replacement(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "rolling").await?;
    b.deploy(&ns, APP, 2).await?;
    create_service(&kube, &ns, SVC, json!({}), json!({})).await?;
    let addr = wait_ingress(&kube, &ns, SVC).await?;
    let client = b.client();
    wait_reply(&client, addr, 80, "/hostname").await?;
    let before = backend_names(b, &ns).await?;
    let load = client.steady_load(addr, 80);
    let rolled = b.roll(&ns, APP).await;
    let report = load.finish().await;
    if !report.slow.is_empty() {
        // Not a loss: the client's TCP resent a SYN. Shown so that a pattern can be seen.
        eprintln!("rolling_replacement: {} requests needed a resent SYN: {:?}", report.slow.len(), report.slow);
    }
    rolled?;
    let after = backend_names(b, &ns).await?;
    ensure!(before.is_disjoint(&after), "not every backend was replaced: {before:?} → {after:?}");
    ensure!(
        report.failures.is_empty(),
        "{} of {} requests lost: {:?}",
        report.failures.len(),
        report.ok + report.failures.len(),
        report.failures
    );
    ensure!(report.ok >= 20, "only {} requests made", report.ok);
    ensure!(after.iter().any(|n| report.backends.contains(n)), "new backends never answered: {:?}", report.backends);
    cleanup(&kube, &ns).await;
    Ok(())
}

/// Two Services in one load-balancer group share one address, each port reaching its own
/// backends; a third asking for a port the group already serves is refused while the others
/// keep serving; members leave one by one, the address stays until the last goes, and then the
/// group's load balancer is gone.
pub async fn load_balancer_group(b: &impl Backend) -> anyhow::Result<()> {
    let kube = b.kube();
    let ns = namespace(&kube, "group").await?;
    b.deploy(&ns, "alpha", 1).await?;
    b.deploy(&ns, "beta", 1).await?;
    let group = json!({"hawser.dev/load-balancer-group": "shared"});
    let member = |app: &str, port: u16| json!({"selector": {"app": app}, "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}]});
    create_service(&kube, &ns, "alpha", member("alpha", 80), group.clone()).await?;
    create_service(&kube, &ns, "beta", member("beta", 8000), group.clone()).await?;
    let addr = wait_ingress(&kube, &ns, "alpha").await?;
    ensure!(wait_ingress(&kube, &ns, "beta").await? == addr, "the members do not share one address");
    let pods = |app: &'static str| {
        let ns = ns.clone();
        async move { anyhow::Ok(b.backends(&ns, app).await?.into_iter().map(|p| p.name).collect::<BTreeSet<_>>()) }
    };
    let client = b.client();
    let on_80 = wait_reply(&client, addr, 80, "/hostname").await?;
    let on_8000 = wait_reply(&client, addr, 8000, "/hostname").await?;
    ensure!(pods("alpha").await?.contains(&on_80), "port 80 answered by {on_80}, not alpha's backend");
    ensure!(pods("beta").await?.contains(&on_8000), "port 8000 answered by {on_8000}, not beta's backend");
    let state = b.mock_state().await?;
    let shared: Vec<&Value> = state["loadBalancers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|lb| lb["group"] == format!("{ns}/shared"))
        .collect();
    ensure!(shared.len() == 1, "{} load balancers for the group", shared.len());

    // A third wants port 80 too: refused, and the others keep serving.
    create_service(&kube, &ns, "clash", member("beta", 80), group.clone()).await?;
    until("clash refused with GroupConflict", CONVERGE, || async {
        let svc = get_service(&kube, &ns, "clash").await?;
        let reason = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "hawser.dev/LoadBalancerReady"))
            .map(|c| (c.reason.clone(), c.message.clone()));
        match reason {
            Some((r, m)) if r == "GroupConflict" && m.contains("alpha") => Ok(()),
            other => bail!("condition {other:?}"),
        }
    })
    .await?;
    ensure!(ingress_of(&get_service(&kube, &ns, "clash").await?).is_empty(), "a refused member has an address");
    ensure!(pods("alpha").await?.contains(&wait_reply(&client, addr, 80, "/hostname").await?), "alpha disturbed");

    // alpha leaves: the address stays; clash takes port 80 over, answered by beta's backend.
    services(&kube, &ns).delete("alpha", &DeleteParams::default()).await?;
    until("clash admitted on the group's address", CONVERGE, || async {
        let svc = get_service(&kube, &ns, "clash").await?;
        ensure!(ingress_of(&svc) == vec![addr], "clash has {:?}", ingress_of(&svc));
        Ok(())
    })
    .await?;
    let beta = pods("beta").await?;
    until("port 80 served by clash (beta's backend)", CONVERGE, || async {
        let who = wait_reply(&client, addr, 80, "/hostname").await?;
        ensure!(beta.contains(&who), "port 80 answered by {who}");
        Ok(())
    })
    .await?;
    ensure!(beta.contains(&wait_reply(&client, addr, 8000, "/hostname").await?), "beta lost its port");

    // The last members go: then the group's load balancer and its address are gone.
    for name in ["beta", "clash"] {
        services(&kube, &ns).delete(name, &DeleteParams::default()).await?;
    }
    until("the group's load balancer gone", CONVERGE, || async {
        let state = b.mock_state().await?;
        let left = state["loadBalancers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|lb| lb["group"] == format!("{ns}/shared"))
            .count();
        ensure!(left == 0, "{left} still there");
        Ok(())
    })
    .await?;
    wait_no_reply(&client, addr, 80).await?;
    cleanup(&kube, &ns).await;
    Ok(())
}
