//! The real `hawser-operator` binary with `--provider aws`, against the fake Kubernetes API server
//! and a moto server: a Service whose finalizer was stripped before it was deleted loses its NLB
//! to the orphan collector, with nothing left behind.

#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../../providers/tests/aws/moto.rs"]
mod moto;

use std::process::{Command, Stdio};

use common::{Operator, free_port, wait_for};
use hawser_fake_apiserver::{Config, FakeApiServer};
use hawser_providers::Provider;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Everything one test runs against: moto seeded with a VPC and nodes, the fake API server with
/// those nodes, and the operator between them.
struct World {
    aws: hawser_providers::aws::AwsProvider,
    world: moto::World,
    server: FakeApiServer,
    client: kube::Client,
    _op: Operator,
    _cloud: moto::Moto,
}

async fn start() -> Option<World> {
    let cloud = moto::moto()?;
    let aws = moto::provider(&cloud).await;
    let world = moto::seed(&aws).await;
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    for (i, instance) in world.instances.iter().enumerate() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": format!("node-{i}"), "labels": {"topology.kubernetes.io/zone": "us-east-1a"}},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": format!("10.0.1.{}", 10 + i)}]}
        }))
        .unwrap();
        Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await.unwrap();
    }
    let op = Operator(
        Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
            .args(["--provider", "aws", "--cluster-name", "prod", "--node-debounce", "200ms"])
            .args(["--aws-region", "us-east-1", "--aws-endpoint-url", &cloud.url, "--aws-vpc-id", &world.vpc])
            .args(["--gc-interval", "500ms", "--gc-grace-period", "1s"])
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--health-probe-bind-address=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("hawser-operator starts"),
    );
    Some(World { aws, world, server, client, _op: op, _cloud: cloud })
}

fn hostname(s: &Service) -> Option<String> {
    s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref()?.first()?.hostname.clone()
}

#[tokio::test]
async fn a_force_deleted_services_nlb_is_collected() {
    let Some(w) = start().await else { return };
    let (aws, client) = (&w.aws, w.client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &common::lb_service("web")).await.unwrap();
    wait_for("web's NLB hostname", || async { services.get("web").await.ok().as_ref().and_then(hostname) }).await;
    assert_eq!(aws.list_owned().await.unwrap().len(), 1);

    // The finalizer stripped by hand, then the Service deleted: only the collector cleans up.
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    // The NLB goes first and its frontend security group last, so wait for both.
    wait_for("the orphaned NLB and its security group collected", || async {
        let groups = aws.clients().ec2.describe_security_groups().send().await.unwrap();
        let group_left =
            groups.security_groups().iter().any(|g| g.group_name().unwrap_or_default().starts_with("hawser-"));
        (aws.list_owned().await.unwrap().is_empty() && !group_left).then_some(())
    })
    .await;
    w.server.stop().await;
}

/// A Service of the load-balancer group `edge` serving `port`.
fn member(name: &str, port: u16) -> Service {
    let mut svc = common::lb_service(name);
    svc.metadata.annotations = Some([("hawser.dev/load-balancer-group".to_owned(), "edge".to_owned())].into());
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = i32::from(port);
    svc
}

/// The listener ports of the group's NLB, or `None` when it is gone.
async fn group_ports(aws: &hawser_providers::aws::AwsProvider) -> Option<Vec<i32>> {
    let name = hawser_providers::aws::naming::group_load_balancer_name("prod", "default/edge");
    let lbs = aws.clients().elb.describe_load_balancers().names(&name).send().await.ok()?;
    let arn = lbs.load_balancers().first()?.load_balancer_arn()?.to_owned();
    let listeners = aws.clients().elb.describe_listeners().load_balancer_arn(&arn).send().await.unwrap();
    let mut ports: Vec<i32> = listeners.listeners().iter().filter_map(|l| l.port()).collect();
    ports.sort_unstable();
    Some(ports)
}

fn condition(s: &Service) -> Option<(String, String, String)> {
    let c = s.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "hawser.dev/LoadBalancerReady")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn group_members_share_one_nlb_a_clash_is_refused_and_the_last_takes_it_away() {
    let Some(w) = start().await else { return };
    let (aws, client) = (&w.aws, w.client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &member("web", 80)).await.unwrap();
    services.create(&PostParams::default(), &member("api", 443)).await.unwrap();
    let shared = wait_for("both members on one hostname", || async {
        let web = services.get("web").await.ok().as_ref().and_then(hostname)?;
        let api = services.get("api").await.ok().as_ref().and_then(hostname)?;
        (web == api).then_some(web)
    })
    .await;
    assert_eq!(group_ports(aws).await, Some(vec![80, 443]));

    // A third member on web's port: refused, the others untouched.
    services.create(&PostParams::default(), &member("clash", 80)).await.unwrap();
    let (_, reason, message) = wait_for("the clashing member refused", || async {
        services.get("clash").await.ok().as_ref().and_then(condition).filter(|c| c.1 == "GroupConflict")
    })
    .await;
    assert_eq!(reason, "GroupConflict");
    assert!(message.contains("default/web") && message.contains("80"), "{message}");
    assert_eq!(hostname(&services.get("clash").await.unwrap()), None, "no address for the refused member");
    assert_eq!(group_ports(aws).await, Some(vec![80, 443]), "the group's NLB is as it was");

    // api leaves the group: its own NLB (a new hostname) first, then its part goes.
    let leave = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": null}}});
    services.patch("api", &PatchParams::default(), &Patch::Merge(&leave)).await.unwrap();
    let own = wait_for("api on an NLB of its own", || async {
        services.get("api").await.ok().as_ref().and_then(hostname).filter(|h| *h != shared)
    })
    .await;
    wait_for("api's part gone from the group's NLB", || async {
        (group_ports(aws).await == Some(vec![80])).then_some(())
    })
    .await;
    assert_eq!(hostname(&services.get("web").await.unwrap()), Some(shared.clone()), "web keeps the address");
    assert_ne!(own, shared);

    // A member deleted without its finalizer: the collector removes its part, and only that.
    services.create(&PostParams::default(), &member("tmp", 8081)).await.unwrap();
    wait_for("tmp on the group's NLB", || async { (group_ports(aws).await == Some(vec![80, 8081])).then_some(()) })
        .await;
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("tmp", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("tmp", &DeleteParams::default()).await.unwrap();
    wait_for("tmp's orphaned part collected", || async { (group_ports(aws).await == Some(vec![80])).then_some(()) })
        .await;
    assert_eq!(hostname(&services.get("web").await.unwrap()), Some(shared.clone()));

    // web deleted: the clashing member takes its place on the same NLB.
    services.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("clash admitted once web is gone", || async {
        services.get("clash").await.ok().as_ref().and_then(hostname).filter(|h| *h == shared)
    })
    .await;
    assert_eq!(group_ports(aws).await, Some(vec![80]));

    // The last member deleted: the group's NLB, target groups and frontend group are gone.
    services.delete("clash", &DeleteParams::default()).await.unwrap();
    services.delete("api", &DeleteParams::default()).await.unwrap();
    wait_for("every NLB, target group and security group of the cluster gone", || async {
        let tgs = aws.clients().elb.describe_target_groups().send().await.unwrap();
        let groups = aws.clients().ec2.describe_security_groups().send().await.unwrap();
        let group_left =
            groups.security_groups().iter().any(|g| g.group_name().unwrap_or_default().starts_with("hawser-"));
        (group_ports(aws).await.is_none()
            && aws.list_owned().await.unwrap().is_empty()
            && tgs.target_groups().is_empty()
            && !group_left)
            .then_some(())
    })
    .await;
    let nodes = aws.clients().ec2.describe_security_groups().group_ids(&w.world.node_sg).send().await.unwrap();
    assert!(nodes.security_groups()[0].ip_permissions().is_empty(), "no node rule left");
    w.server.stop().await;
}
