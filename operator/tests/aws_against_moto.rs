//! The real `hawser-operator` binary with `--provider aws`, against the fake Kubernetes API server
//! and a moto server: a Service whose finalizer was stripped before it was deleted loses its NLB
//! to the orphan collector, with nothing left behind.

#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../../providers/tests/aws/moto.rs"]
mod moto;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::campaign::{GROUP_ANNOTATION, change, condition, is_ours, ports};
use common::{Operator, free_port, wait_for};
use hawser_fake_apiserver::{Config, FakeApiServer};
use hawser_providers::Provider;
use hawser_providers::aws::AwsProvider;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Everything one test runs against: moto seeded with a VPC and nodes, the fake API server with
/// those nodes, and the operator between them.
struct World {
    aws: AwsProvider,
    world: moto::World,
    server: FakeApiServer,
    client: kube::Client,
    op: Option<Operator>,
    cloud: moto::Moto,
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
    let op = operator(&cloud.url, &world.vpc, server.kubeconfig_path());
    Some(World { aws, world, server, client, op: Some(op), cloud })
}

/// The operator against moto at `url`, with a fast orphan collector.
fn operator(url: &str, vpc: &str, kubeconfig: &std::path::Path) -> Operator {
    Operator(
        Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
            .args(["--provider", "aws", "--cluster-name", "prod", "--node-debounce", "200ms"])
            .args(["--aws-region", "us-east-1", "--aws-endpoint-url", url, "--aws-vpc-id", vpc])
            .args(["--gc-interval", "500ms", "--gc-grace-period", "1s"])
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--health-probe-bind-address=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("hawser-operator starts"),
    )
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
    // The NLB may go between the two calls (the last member's deletion is awaited this way).
    let listeners = match aws.clients().elb.describe_listeners().load_balancer_arn(&arn).send().await {
        Ok(listeners) => listeners,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_load_balancer_not_found_exception()) => return None,
        Err(e) => panic!("describing the listeners of {arn}: {e:?}"),
    };
    let mut ports: Vec<i32> = listeners.listeners().iter().filter_map(|l| l.port()).collect();
    ports.sort_unstable();
    Some(ports)
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

/// The load-balancer groups a Service's status records, by the condition's reason.
fn group_record(svc: &Service) -> Option<(String, String)> {
    let conditions = svc.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "hawser.dev/LoadBalancerGroup")?;
    Some((c.reason.clone(), c.message.clone()))
}

/// The operator is killed after a join's cloud writes but before its status write, and the
/// group is then taken off the Service: the next operator must still take its part off the
/// group's NLB. AWS's ensure of a Service in no group does not look for such a part (that would
/// list every target group in the account), so the group recorded before the join is all that
/// tells it.
#[tokio::test]
async fn a_join_cut_short_then_taken_back_leaves_the_group() {
    let Some(mut w) = start().await else { return };
    let services: Api<Service> = Api::namespaced(w.client.clone(), "default");
    services.create(&PostParams::default(), &member("web", 80)).await.unwrap();
    let mut solo = member("solo", 8080);
    solo.metadata.annotations = None;
    services.create(&PostParams::default(), &solo).await.unwrap();
    let shared =
        wait_for("web on the group's NLB", || async { services.get("web").await.ok().as_ref().and_then(hostname) })
            .await;
    wait_for("solo on an NLB of its own", || async { services.get("solo").await.ok().as_ref().and_then(hostname) })
        .await;

    // solo joins, under an operator that cannot reach the cloud: what it writes before the
    // join's first cloud write is what a kill at any later moment leaves in the status.
    drop(w.op.take());
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let blind = operator(&unreachable, &w.world.vpc, w.server.kubeconfig_path());
    let join = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": "edge"}}});
    services.patch("solo", &PatchParams::default(), &Patch::Merge(&join)).await.unwrap();
    let before_join = wait_for("the group recorded before any cloud write", || async {
        let svc = services.get("solo").await.ok()?;
        let (reason, message) = group_record(&svc)?;
        (reason == "ChangingGroup" && message.ends_with(": default/edge")).then(|| svc.status.clone().unwrap())
    })
    .await;
    drop(blind);

    // The join's cloud writes happen...
    let op = operator(&w.cloud.url, &w.world.vpc, w.server.kubeconfig_path());
    wait_for("solo on the group's NLB", || async {
        services.get("solo").await.ok().as_ref().and_then(hostname).filter(|h| *h == shared)
    })
    .await;
    assert_eq!(group_ports(&w.aws).await, Some(vec![80, 8080]));
    drop(op);
    // ...but the operator is killed before the status says so, and the group is taken back.
    let status = json!({"status": before_join});
    services.patch_status("solo", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let leave = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": null}}});
    services.patch("solo", &PatchParams::default(), &Patch::Merge(&leave)).await.unwrap();

    // `plan` foretells it: solo's part of the group's NLB goes, not web's, and not the NLB.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
        .args(["--provider", "aws", "--cluster-name", "prod"])
        .args(["--aws-region", "us-east-1", "--aws-endpoint-url", &w.cloud.url, "--aws-vpc-id", &w.world.vpc])
        .args(["plan", "default/solo"])
        .env("KUBECONFIG", w.server.kubeconfig_path())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let planned = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{planned}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        planned.contains("note: the Service leaves load-balancer group default/edge: its part there goes"),
        "{planned}"
    );
    assert!(planned.contains("- delete   listener 8080/TCP"), "{planned}");
    assert!(!planned.contains("listener 80/TCP") && !planned.contains("because the last member"), "{planned}");
    assert_eq!(group_ports(&w.aws).await, Some(vec![80, 8080]), "plan changed nothing");

    let _op = operator(&w.cloud.url, &w.world.vpc, w.server.kubeconfig_path());
    wait_for("solo's part gone from the group's NLB", || async {
        (group_ports(&w.aws).await == Some(vec![80])).then_some(())
    })
    .await;
    let own = wait_for("solo on an NLB of its own again, its record gone", || async {
        let svc = services.get("solo").await.ok()?;
        hostname(&svc).filter(|h| *h != shared && group_record(&svc).is_none())
    })
    .await;
    assert_ne!(own, shared);
    assert_eq!(aws_problems(&w.aws, &w.world.node_sg, &services).await, None);
    assert_eq!(hostname(&services.get("web").await.unwrap()), Some(shared), "web keeps the group's address");
    w.server.stop().await;
}

/// Where one Service is served on AWS: an NLB (its own, or its group's), its hostname, and the
/// listener ports of the Service's part of it.
#[derive(Debug)]
struct Place {
    lb: String,
    group: Option<String>,
    hostname: String,
    ports: BTreeSet<i64>,
}

/// Tags of ELB resources, by ARN.
async fn elb_tags(aws: &AwsProvider, arns: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut all = BTreeMap::new();
    for chunk in arns.chunks(20) {
        let out = aws.clients().elb.describe_tags().set_resource_arns(Some(chunk.to_vec())).send().await.unwrap();
        for d in out.tag_descriptions() {
            let tags = d.tags().iter().map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned())).collect();
            all.insert(d.resource_arn().unwrap().to_owned(), tags);
        }
    }
    all
}

/// What AWS holds, read directly: owner UID → its places; and every resource left without a
/// purpose (a detached target group, a security group no NLB uses, a node rule from a group that
/// is gone, a group NLB without listeners).
async fn aws_state(aws: &AwsProvider, node_sg: &str) -> (BTreeMap<String, Vec<Place>>, Vec<String>) {
    let elb = &aws.clients().elb;
    let mut by_owner: BTreeMap<String, Vec<Place>> = BTreeMap::new();
    let mut wrong = Vec::new();
    let lbs = elb.describe_load_balancers().send().await.unwrap();
    let lb_arns: Vec<String> = lbs.load_balancers().iter().map(|l| l.load_balancer_arn().unwrap().to_owned()).collect();
    let tgs = elb.describe_target_groups().send().await.unwrap();
    let tg_arns: Vec<String> = tgs.target_groups().iter().map(|t| t.target_group_arn().unwrap().to_owned()).collect();
    let tags = elb_tags(aws, &[lb_arns, tg_arns].concat()).await;
    let mut in_use = BTreeSet::new();
    for lb in lbs.load_balancers() {
        let arn = lb.load_balancer_arn().unwrap().to_owned();
        in_use.extend(lb.security_groups().iter().cloned());
        let hostname = lb.dns_name().unwrap().to_owned();
        let listeners = elb.describe_listeners().load_balancer_arn(&arn).send().await.unwrap();
        let ports = |owner: Option<&str>| -> BTreeSet<i64> {
            listeners
                .listeners()
                .iter()
                .filter(|l| {
                    let tg = l.default_actions()[0].target_group_arn().unwrap();
                    owner.is_none_or(|o| tags[tg].get("hawser.dev/service-uid").map(String::as_str) == Some(o))
                })
                .map(|l| i64::from(l.port().unwrap()))
                .collect()
        };
        let lb_tags = &tags[&arn];
        if let Some(group) = lb_tags.get("hawser.dev/load-balancer-group") {
            let owners: BTreeSet<&str> = listeners
                .listeners()
                .iter()
                .filter_map(|l| tags[l.default_actions()[0].target_group_arn().unwrap()].get("hawser.dev/service-uid"))
                .map(String::as_str)
                .collect();
            if owners.is_empty() {
                wrong.push(format!("group NLB {arn} has no member"));
            }
            for owner in owners {
                let place = Place {
                    lb: arn.clone(),
                    group: Some(group.clone()),
                    hostname: hostname.clone(),
                    ports: ports(Some(owner)),
                };
                by_owner.entry(owner.to_owned()).or_default().push(place);
            }
        } else {
            let owner = lb_tags.get("hawser.dev/service-uid").cloned().unwrap_or_else(|| "untagged".into());
            by_owner.entry(owner).or_default().push(Place { lb: arn, group: None, hostname, ports: ports(None) });
        }
    }
    // moto keeps a deleted NLB's ARN on its target groups; AWS empties the list.
    let existing: BTreeSet<&str> = lbs.load_balancers().iter().filter_map(|l| l.load_balancer_arn()).collect();
    for tg in tgs.target_groups() {
        if !tg.load_balancer_arns().iter().any(|a| existing.contains(a.as_str())) {
            wrong.push(format!("target group {} is attached to no NLB", tg.target_group_name().unwrap()));
        }
    }
    let groups = aws.clients().ec2.describe_security_groups().send().await.unwrap();
    let ours: BTreeSet<String> = groups
        .security_groups()
        .iter()
        .filter(|g| g.group_name().unwrap_or_default().starts_with("hawser-"))
        .map(|g| g.group_id().unwrap().to_owned())
        .collect();
    for g in ours.difference(&in_use) {
        wrong.push(format!("security group {g} is used by no NLB"));
    }
    let node = groups.security_groups().iter().find(|g| g.group_id() == Some(node_sg)).unwrap();
    for perm in node.ip_permissions() {
        for pair in perm.user_id_group_pairs() {
            if !ours.contains(pair.group_id().unwrap()) {
                wrong.push(format!("node rule {:?} from a group that is gone", perm.from_port()));
            }
        }
    }
    (by_owner, wrong)
}

/// What is still wrong after the AWS campaign, or `None` once converged.
async fn aws_problems(aws: &AwsProvider, node_sg: &str, services: &Api<Service>) -> Option<Vec<String>> {
    let all = services.list(&ListParams::default()).await.ok()?.items;
    let (cloud, mut wrong) = aws_state(aws, node_sg).await;
    let mut owners = BTreeSet::new();
    for svc in &all {
        let uid = svc.uid().unwrap();
        if svc.metadata.deletion_timestamp.is_some() {
            wrong.push(format!("{} stuck deleting", svc.name_any()));
            continue;
        }
        if !is_ours(svc) {
            continue;
        }
        owners.insert(uid.clone());
        let group = svc.annotations().get(GROUP_ANNOTATION).map(|g| format!("default/{g}"));
        match cloud.get(&uid).map(Vec::as_slice) {
            Some([place]) => {
                if hostname(svc).as_deref() != Some(place.hostname.as_str()) {
                    wrong.push(format!("{} shows {:?}, its NLB is {}", svc.name_any(), hostname(svc), place.hostname));
                }
                if place.group != group {
                    wrong.push(format!("{} is served in {:?} but asks for {group:?}", svc.name_any(), place.group));
                }
                if place.ports != ports(svc) {
                    wrong.push(format!("{} serves {:?} but asks for {:?}", svc.name_any(), place.ports, ports(svc)));
                }
            }
            Some(places) if !places.is_empty() => {
                let lbs: Vec<&str> = places.iter().map(|p| p.lb.as_str()).collect();
                wrong.push(format!("{} has {} places: {lbs:?}", svc.name_any(), places.len()));
            }
            _ => {
                let refused = condition(svc).is_some_and(|c| c.1 == "GroupConflict");
                let clash = group.is_some()
                    && cloud.iter().any(|(other, places)| {
                        *other != uid && places.iter().any(|p| p.group == group && !p.ports.is_disjoint(&ports(svc)))
                    });
                if !(refused && clash) {
                    wrong.push(format!("{} has no NLB (condition {:?})", svc.name_any(), condition(svc)));
                }
            }
        }
    }
    for (owner, places) in &cloud {
        if !owners.contains(owner) {
            let lbs: Vec<&str> = places.iter().map(|p| p.lb.as_str()).collect();
            wrong.push(format!("NLBs {lbs:?} of {owner} have no live owner"));
        }
    }
    (!wrong.is_empty()).then_some(wrong)
}

/// The kill campaign on AWS: rounds of random changes (create, delete, ClusterIP and back,
/// ports, join or leave the group `edge`, strip the finalizer and delete) while the operator is
/// SIGKILLed at a random moment each round. Then a clean operator must converge on moto: every
/// Service of ours in exactly one place with its hostname, no target group, security group or
/// node rule left over, no part without a live owner.
#[tokio::test]
async fn kill_campaign_with_groups_converges_without_leaks() {
    let Some(mut w) = start().await else { return };
    drop(w.op.take());
    let seed =
        std::env::var("HAWSER_KILL_CAMPAIGN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!(
        "AWS kill campaign seed {seed} (HAWSER_KILL_CAMPAIGN_SEED={seed} repeats its changes; where the kills land depends on timing)"
    );
    let mut rng = SmallRng::seed_from_u64(seed);
    let services: Api<Service> = Api::namespaced(w.client.clone(), "default");
    for round in 0..30 {
        let op = operator(&w.cloud.url, &w.world.vpc, w.server.kubeconfig_path());
        for _ in 0..rng.random_range(1..=3) {
            let name = format!("svc-{}", rng.random_range(0..6));
            change(&services, &name, &mut rng).await;
        }
        // Later rounds give the operator longer, so that kills land in provisioning and deletion.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600 + 20 * round))).await;
        drop(op); // SIGKILL, wherever it is
    }

    // Two members that must end up sharing the group's NLB, whatever the rounds left.
    for (name, port) in [("final-a", 7001), ("final-b", 7002)] {
        services.create(&PostParams::default(), &member(name, port)).await.unwrap();
    }
    let _op = operator(&w.cloud.url, &w.world.vpc, w.server.kubeconfig_path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let Some(left) = aws_problems(&w.aws, &w.world.node_sg, &services).await else { break };
        assert!(tokio::time::Instant::now() < deadline, "no convergence after the campaign (seed {seed}): {left:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(aws_problems(&w.aws, &w.world.node_sg, &services).await, None, "seed {seed}");
    let a = hostname(&services.get("final-a").await.unwrap());
    assert!(a.is_some() && a == hostname(&services.get("final-b").await.unwrap()), "one NLB for the group");
    w.server.stop().await;
}
