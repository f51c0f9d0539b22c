//! The real `hawser-operator` binary with `--provider gcp`, against the fake Kubernetes API server
//! and the fake Compute server: a dual-stack Service gets a GCP load balancer and its two
//! addresses in its status, and deleting the Service leaves nothing in the cloud.

#![cfg(feature = "gcp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[allow(dead_code)]
#[path = "../../providers/tests/gcp/fake_compute.rs"]
mod fake_compute;

use std::process::{Command, Stdio};

use common::{Operator, free_port, ingress_ips, wait_for};
use fake_compute::FakeCompute;
use hawser_fake_apiserver::{Config, FakeApiServer};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const REGION: &str = "projects/proj/regions/europe-west1";

async fn node(client: &Client, name: &str, zone: &str) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {"providerID": format!("gce://proj/{zone}/{name}")},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}
    }))
    .unwrap();
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await.unwrap();
}

/// The real operator with the GCP provider against the fake Compute server at `url`.
fn start_operator(server: &FakeApiServer, url: &str, extra: &[&str]) -> Operator {
    Operator(
        Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
            .args(["--provider", "gcp", "--cluster-name", "demo", "--node-debounce", "200ms"])
            .args(["--gcp-project", "proj", "--gcp-region", "europe-west1", "--gcp-network", "vpc"])
            .args(["--gcp-subnetwork", "nodes", "--gcp-node-tags", "gke-demo-node"])
            .args(["--gcp-endpoint-url", url, "--gcp-anonymous-credentials"])
            .args(["--gcp-operation-poll-interval", "5ms"])
            .args(extra)
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--health-probe-bind-address=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("hawser-operator starts"),
    )
}

#[tokio::test]
async fn dual_stack_service_gets_a_gcp_load_balancer_and_leaves_nothing_behind() {
    let config = Config { service_cidr_v6: Some("fd00:96::/108".parse().unwrap()), ..Config::default() };
    let server = FakeApiServer::start(config).await.unwrap();
    let client = server.client().await.unwrap();
    node(&client, "node-a", "europe-west1-b").await;
    node(&client, "node-b", "europe-west1-c").await;
    let compute = FakeCompute::default();
    let url = compute.start().await;
    compute.seed(
        &format!("{REGION}/subnetworks"),
        "nodes",
        json!({"stackType": "IPV4_IPV6", "ipv6AccessType": "EXTERNAL"}),
    );

    let _op = start_operator(&server, &url, &[]);

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]
        }
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();

    let web = wait_for("web's two ingress addresses", || async {
        services.get("web").await.ok().filter(|s| ingress_ips(s).len() == 2)
    })
    .await;
    let ips = ingress_ips(&web);
    let address = |suffix: &str| {
        compute
            .list(&format!("{REGION}/addresses"))
            .into_iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, a)| a["address"].as_str().unwrap().to_owned())
    };
    assert_eq!(ips[0], address("").unwrap_or_default(), "IPv4 first, the reserved address");
    assert_eq!(ips[1], address("-ipv6").unwrap_or_default(), "then the IPv6 address");
    let rules = compute.list(&format!("{REGION}/forwardingRules"));
    assert_eq!(rules.len(), 4, "TCP and UDP for each family: {:?}", rules.keys());
    let groups = compute.list("projects/proj/zones/europe-west1-b/instanceGroups");
    let (group, _) = groups.iter().next().expect("an instance group in zone b");
    assert_eq!(
        compute.members("projects/proj/zones/europe-west1-b/instanceGroups", group).into_iter().collect::<Vec<_>>(),
        vec![format!("{}projects/proj/zones/europe-west1-b/instances/node-a", fake_compute::API)]
    );

    services.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("web gone", || async { services.get_opt("web").await.ok().filter(Option::is_none).map(|_| ()) }).await;
    assert_eq!(compute.names_with_prefix("hawser-"), Vec::<String>::new(), "nothing left in the cloud");
    server.stop().await;
}

#[tokio::test]
async fn a_force_deleted_services_load_balancer_is_collected() {
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    node(&client, "node-a", "europe-west1-b").await;
    let compute = FakeCompute::default();
    let url = compute.start().await;
    compute.seed(&format!("{REGION}/subnetworks"), "nodes", json!({"stackType": "IPV4_ONLY"}));
    let _op = start_operator(&server, &url, &["--gc-interval", "500ms", "--gc-grace-period", "1s"]);

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &common::lb_service("web")).await.unwrap();
    wait_for("web's address", || async { services.get("web").await.ok().filter(|s| ingress_ips(s).len() == 1) }).await;
    assert!(!compute.names_with_prefix("hawser-").is_empty());

    // The finalizer stripped by hand, then the Service deleted: nothing cleans up but the collector.
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("the orphaned load balancer collected", || async {
        compute.names_with_prefix("hawser-").is_empty().then_some(())
    })
    .await;
    server.stop().await;
}

/// A Service of the load-balancer group `edge` serving `port`.
fn member(name: &str, port: u16) -> Service {
    let mut svc = common::lb_service(name);
    svc.metadata.annotations = Some([("hawser.dev/load-balancer-group".to_owned(), "edge".to_owned())].into());
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = i32::from(port);
    svc
}

#[tokio::test]
async fn group_members_share_one_address_and_the_last_takes_it_away() {
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    node(&client, "node-a", "europe-west1-b").await;
    let compute = FakeCompute::default();
    let url = compute.start().await;
    compute.seed(&format!("{REGION}/subnetworks"), "nodes", json!({"stackType": "IPV4_ONLY"}));
    let _op = start_operator(&server, &url, &["--gc-interval", "500ms", "--gc-grace-period", "1s"]);

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for (name, port) in [("web", 80), ("api", 443)] {
        services.create(&PostParams::default(), &member(name, port)).await.unwrap();
    }
    let ip = wait_for("both members on one address", || async {
        let web = ingress_ips(&services.get("web").await.ok()?);
        let api = ingress_ips(&services.get("api").await.ok()?);
        (web.len() == 1 && web == api).then(|| web[0].clone())
    })
    .await;
    let addresses = compute.list(&format!("{REGION}/addresses"));
    assert_eq!(addresses.len(), 1, "one address for the group: {:?}", addresses.keys());

    // api leaves: an address of its own, then its rule leaves the group's.
    let leave = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": null}}});
    services.patch("api", &PatchParams::default(), &Patch::Merge(&leave)).await.unwrap();
    wait_for("api on an address of its own, its rule gone from the group's", || async {
        let own = ingress_ips(&services.get("api").await.ok()?);
        let on_group = compute
            .list(&format!("{REGION}/forwardingRules"))
            .values()
            .filter(|r| r["IPAddress"].as_str() == Some(ip.as_str()))
            .count();
        (own.len() == 1 && own[0] != ip && on_group == 1).then_some(())
    })
    .await;
    assert_eq!(ingress_ips(&services.get("web").await.unwrap()), [ip], "web keeps the address");

    // Both deleted: nothing is left, the group's address included.
    for name in ["web", "api"] {
        services.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("everything gone", || async { compute.names_with_prefix("hawser-").is_empty().then_some(()) }).await;
    server.stop().await;
}

/// What is still wrong after the GCP campaign, or `None` once converged: every Service of ours
/// has one address in its status, served by its own rules; every rule is on an address its
/// Service shows; no resource of a Service that is gone (or no longer ours) is left; no group
/// address is left without a rule on it.
async fn gcp_problems(compute: &FakeCompute, services: &Api<Service>) -> Option<Vec<String>> {
    use common::campaign::{GROUP_ANNOTATION, condition, is_ours};
    use kube::ResourceExt;
    let all = services.list(&Default::default()).await.ok()?.items;
    let mut wrong = Vec::new();
    let live: std::collections::BTreeMap<String, &Service> =
        all.iter().filter(|s| is_ours(s)).map(|s| (s.uid().unwrap(), s)).collect();
    let rules = compute.list(&format!("{REGION}/forwardingRules"));
    for svc in all.iter().filter(|s| s.metadata.deletion_timestamp.is_some()) {
        wrong.push(format!("{} stuck deleting", svc.name_any()));
    }
    for (uid, svc) in &live {
        let ips = ingress_ips(svc);
        let mine: Vec<&serde_json::Value> =
            rules.values().filter(|r| r["description"].as_str().is_some_and(|d| d.contains(uid.as_str()))).collect();
        let refused = condition(svc).is_some_and(|c| c.1 == "GroupConflict");
        if refused && ips.is_empty() && mine.is_empty() {
            continue;
        }
        if ips.len() != 1 || mine.is_empty() || mine.iter().any(|r| r["IPAddress"].as_str() != Some(ips[0].as_str())) {
            let on: Vec<&str> = mine.iter().filter_map(|r| r["IPAddress"].as_str()).collect();
            wrong.push(format!("{} shows {ips:?}, its rules are on {on:?} ({:?})", svc.name_any(), condition(svc)));
        }
        let grouped = rules
            .iter()
            .any(|(n, r)| n.contains("-g-") && r["description"].as_str().is_some_and(|d| d.contains(uid.as_str())));
        if grouped != svc.annotations().contains_key(GROUP_ANNOTATION) && !refused {
            wrong.push(format!("{} is in a group: {grouped}, asks for one: {}", svc.name_any(), !grouped));
        }
    }
    for name in compute.names_with_prefix("hawser-") {
        if name.starts_with("hawser-c-") {
            continue;
        }
        let owner = ["addresses", "forwardingRules", "backendServices", "healthChecks"]
            .iter()
            .find_map(|c| compute.get(&format!("{REGION}/{c}"), &name))
            .or_else(|| compute.get("projects/proj/global/firewalls", &name))
            .and_then(|r| r["description"].as_str().map(str::to_owned))
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
        let Some(owner) = owner else { continue };
        match owner["uid"].as_str() {
            Some(uid) if !live.contains_key(uid) => wrong.push(format!("{name} of {uid} has no live owner")),
            Some(_) => {}
            None => {
                let ip = compute
                    .get(&format!("{REGION}/addresses"), &name)
                    .and_then(|a| a["address"].as_str().map(str::to_owned));
                if ip.is_some_and(|ip| !rules.values().any(|r| r["IPAddress"].as_str() == Some(ip.as_str()))) {
                    wrong.push(format!("group address {name} has no rule on it"));
                }
            }
        }
    }
    (!wrong.is_empty()).then_some(wrong)
}

/// The kill campaign on GCP: rounds of random changes (create, delete, ClusterIP and back,
/// ports, join or leave the group `edge`, strip the finalizer and delete) while the operator is
/// SIGKILLed at a random moment each round; then a clean operator must converge with nothing
/// left over in the fake Compute.
#[tokio::test]
async fn kill_campaign_with_groups_converges_without_leaks() {
    use rand::{Rng, SeedableRng};
    let seed =
        std::env::var("HAWSER_KILL_CAMPAIGN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!(
        "GCP kill campaign seed {seed} (HAWSER_KILL_CAMPAIGN_SEED={seed} repeats its changes; where the kills land depends on timing)"
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    node(&client, "node-a", "europe-west1-b").await;
    let compute = FakeCompute::default();
    let url = compute.start().await;
    compute.seed(&format!("{REGION}/subnetworks"), "nodes", json!({"stackType": "IPV4_ONLY"}));
    let gc = ["--gc-interval", "500ms", "--gc-grace-period", "1s"];
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for round in 0..30 {
        let op = start_operator(&server, &url, &gc);
        for _ in 0..rng.random_range(1..=3) {
            let name = format!("svc-{}", rng.random_range(0..6));
            common::campaign::change(&services, &name, &mut rng).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(100..600 + 20 * round))).await;
        drop(op); // SIGKILL, wherever it is
    }
    // Two members that must end up sharing the group's address, whatever the rounds left.
    for (name, port) in [("final-a", 7001), ("final-b", 7002)] {
        services.create(&PostParams::default(), &member(name, port)).await.unwrap();
    }
    let _op = start_operator(&server, &url, &gc);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let Some(left) = gcp_problems(&compute, &services).await else { break };
        assert!(tokio::time::Instant::now() < deadline, "no convergence after the campaign (seed {seed}): {left:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(gcp_problems(&compute, &services).await, None, "seed {seed}");
    let (a, b) =
        (ingress_ips(&services.get("final-a").await.unwrap()), ingress_ips(&services.get("final-b").await.unwrap()));
    assert!(a.len() == 1 && a == b, "one address for the group: {a:?} {b:?} (seed {seed})");
    server.stop().await;
}
