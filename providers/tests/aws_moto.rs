//! The AWS provider against a moto server, over the real AWS wire protocols.
//!
//! moto comes from `pip install "moto[server]"` into `<repo>/.venv` (CI does this);
//! `HAWSER_MOTO_SERVER` overrides the binary. Without it the tests skip, except under `CI=true`
//! where they fail. Each test starts its own server, so they are independent.
//!
//! What moto does not verify, and these tests therefore do not claim: that NLB health checks
//! actually probe anything (target health is whatever moto reports), IAM policy evaluation,
//! throttling (covered by unit tests), and the real delays of AWS (deregistration, ENIs holding
//! security groups after a load balancer is deleted).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "aws/moto.rs"]
mod moto;

#[path = "aws/groups.rs"]
mod groups;

use moto::{Moto, moto, provider, seed};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use hawser_providers::aws::{API_ACTIONS, AwsProvider};
use hawser_providers::{
    ErrorClass, HealthCheck, Listener, LoadBalancerSpec, OwnedLoadBalancer, Protocol, Provider, Scheme,
    ServiceIdentity, Target,
};

fn identity(uid: &str) -> ServiceIdentity {
    ServiceIdentity { cluster: "prod".into(), namespace: "shop".into(), name: "web".into(), uid: uid.into() }
}

fn spec(uid: &str, instances: &[&String]) -> LoadBalancerSpec {
    let listener = |name: &str, protocol, port, node_port| Listener {
        name: name.to_owned(),
        protocol,
        port,
        node_port: Some(node_port),
    };
    let listeners = vec![
        listener("dns", Protocol::TcpUdp, 53, 30053),
        listener("http", Protocol::Tcp, 80, 30080),
        listener("https", Protocol::Tcp, 443, 30443),
    ];
    let targets: Vec<Target> = instances
        .iter()
        .enumerate()
        .map(|(n, i)| Target {
            name: format!("node-{n}"),
            provider_id: Some(format!("aws:///us-east-1a/{i}")),
            zone: None,
            addresses: Vec::new(),
        })
        .collect();
    LoadBalancerSpec {
        tags: BTreeMap::from([("team".to_owned(), "shop".to_owned())]),
        ..LoadBalancerSpec::new(identity(uid), listeners, targets, HealthCheck::http(10266, "/healthz"))
    }
}

/// Health check as (protocol, port, path, interval, timeout, healthy, unhealthy).
type SeenHealth = (String, String, String, i32, i32, i32, i32);
/// A target group as (protocol, port, health, targets).
type SeenTargetGroup = (String, i32, SeenHealth, BTreeSet<String>);

/// What AWS holds for one load balancer, read directly (not through the provider).
#[derive(Debug)]
struct Seen {
    lb_arn: String,
    scheme: String,
    subnets: BTreeSet<String>,
    security_groups: Vec<String>,
    tags: BTreeMap<String, String>,
    /// port → (protocol, target group ARN, certificate)
    listeners: BTreeMap<i32, (String, String, Option<String>)>,
    /// ARN → (protocol, port, health (protocol, port, path, interval, timeout, healthy, unhealthy), targets)
    target_groups: BTreeMap<String, SeenTargetGroup>,
}

async fn seen(p: &AwsProvider, name: &str) -> Option<Seen> {
    let elb = &p.clients().elb;
    let lbs = elb.describe_load_balancers().names(name).send().await.ok()?;
    let lb = lbs.load_balancers().first()?.clone();
    let arn = lb.load_balancer_arn().unwrap().to_owned();
    let tags = elb.describe_tags().resource_arns(&arn).send().await.unwrap();
    let tags = tags.tag_descriptions()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    let ls = elb.describe_listeners().load_balancer_arn(&arn).send().await.unwrap();
    let listeners = ls
        .listeners()
        .iter()
        .map(|l| {
            (
                l.port().unwrap(),
                (
                    l.protocol().unwrap().as_str().to_owned(),
                    l.default_actions()[0].target_group_arn().unwrap().to_owned(),
                    l.certificates().first().and_then(|c| c.certificate_arn()).map(str::to_owned),
                ),
            )
        })
        .collect();
    let tgs = elb.describe_target_groups().load_balancer_arn(&arn).send().await.unwrap();
    let mut target_groups = BTreeMap::new();
    for tg in tgs.target_groups() {
        let tg_arn = tg.target_group_arn().unwrap().to_owned();
        assert_eq!(tg.target_type().unwrap().as_str(), "instance");
        let health = elb.describe_target_health().target_group_arn(&tg_arn).send().await.unwrap();
        let targets =
            health.target_health_descriptions().iter().map(|d| d.target().unwrap().id().unwrap().to_owned()).collect();
        target_groups.insert(
            tg_arn,
            (
                tg.protocol().unwrap().as_str().to_owned(),
                tg.port().unwrap(),
                (
                    tg.health_check_protocol().unwrap().as_str().to_owned(),
                    tg.health_check_port().unwrap().to_owned(),
                    tg.health_check_path().unwrap_or_default().to_owned(),
                    tg.health_check_interval_seconds().unwrap(),
                    tg.health_check_timeout_seconds().unwrap(),
                    tg.healthy_threshold_count().unwrap(),
                    tg.unhealthy_threshold_count().unwrap(),
                ),
                targets,
            ),
        );
    }
    Some(Seen {
        lb_arn: arn,
        scheme: lb.scheme().unwrap().as_str().to_owned(),
        subnets: lb.availability_zones().iter().map(|z| z.subnet_id().unwrap().to_owned()).collect(),
        security_groups: lb.security_groups().to_vec(),
        tags,
        listeners,
        target_groups,
    })
}

/// Ingress rules of a security group as (protocol, port, source).
async fn rules(p: &AwsProvider, group: &str) -> BTreeSet<(String, i32, String)> {
    let out = p.clients().ec2.describe_security_groups().group_ids(group).send().await.unwrap();
    let mut rules = BTreeSet::new();
    for perm in out.security_groups()[0].ip_permissions() {
        let proto = perm.ip_protocol().unwrap().to_owned();
        let port = perm.from_port().unwrap();
        assert_eq!(perm.from_port(), perm.to_port());
        for r in perm.ip_ranges() {
            rules.insert((proto.clone(), port, r.cidr_ip().unwrap().to_owned()));
        }
        for g in perm.user_id_group_pairs() {
            rules.insert((proto.clone(), port, g.group_id().unwrap().to_owned()));
        }
    }
    rules
}

/// A plan made right after an ensure is empty: plan and ensure agree on what "done" is, in
/// every configuration the tests build.
async fn assert_settled(p: &AwsProvider, s: &LoadBalancerSpec) {
    let plan = p.plan(s).await.unwrap();
    assert!(plan.is_empty(), "a just-ensured spec plans changes:\n{plan}");
}

fn assert_known_and_count_mutating(p: &AwsProvider) -> Vec<String> {
    let calls = p.calls();
    assert!(!calls.is_empty(), "the provider made calls");
    for c in &calls {
        assert!(
            API_ACTIONS.contains(&c.action().as_str()),
            "{} is called but not in API_ACTIONS / the IAM policy",
            c.action()
        );
    }
    calls.iter().filter(|c| c.is_mutating()).map(|c| c.operation.clone()).collect()
}

fn rule(proto: &str, port: i32, source: &str) -> (String, i32, String) {
    (proto.to_owned(), port, source.to_owned())
}

/// Requests a certificate from moto's ACM over its JSON protocol (moto does not check signatures).
fn moto_certificate(moto: &Moto) -> String {
    let addr = moto.url.trim_start_matches("http://");
    let body = r#"{"DomainName":"shop.example.com"}"#;
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-amz-json-1.1\r\nX-Amz-Target: CertificateManager.RequestCertificate\r\nAuthorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/acm/aws4_request, SignedHeaders=host, Signature=x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let json = response.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {response}"));
    v["CertificateArn"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn create_steady_update_tls_delete() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let (a, b, c) = (&w.instances[0], &w.instances[1], &w.instances[2]);
    let name = hawser_providers::aws::naming::load_balancer_name(&identity("uid-1"));

    // Create.
    let mut s = spec("uid-1", &[a, b]);
    let status = p.ensure(&s).await.unwrap();
    assert_known_and_count_mutating(&p);
    let seen1 = seen(&p, &name).await.expect("the NLB exists");
    assert_eq!(status.id, seen1.lb_arn);
    let host = status.ingress[0].hostname.clone().unwrap();
    assert!(!host.is_empty() && status.ingress[0].ip.is_none());
    assert_eq!(status.ingress[0].ports.len(), 4, "53 is reported as TCP and UDP: {:?}", status.ingress[0].ports);
    assert_eq!(seen1.scheme, "internet-facing");
    // One subnet per zone, the lowest ID in us-east-1a, and never the untagged one.
    let lowest_a = w.subnets[0].clone().min(w.subnets[2].clone());
    assert_eq!(seen1.subnets, BTreeSet::from([lowest_a, w.subnets[1].clone()]));
    assert_eq!(seen1.tags["hawser.dev/cluster"], "prod");
    assert_eq!(seen1.tags["hawser.dev/service"], "shop/web");
    assert_eq!(seen1.tags["hawser.dev/service-uid"], "uid-1");
    assert_eq!(seen1.tags["team"], "shop");
    let by_port = |seen: &Seen, port: i32| {
        let (proto, tg, cert) = seen.listeners[&port].clone();
        (proto, seen.target_groups[&tg].clone(), tg, cert)
    };
    let ports: BTreeSet<i32> = seen1.listeners.keys().copied().collect();
    assert_eq!(ports, BTreeSet::from([53, 80, 443]));
    let both: BTreeSet<String> = [a.clone(), b.clone()].into();
    let health = ("HTTP".to_owned(), "10266".to_owned(), "/healthz".to_owned(), 10, 5, 2, 3);
    for (port, proto, node_port) in [(53, "TCP_UDP", 30053), (80, "TCP", 30080), (443, "TCP", 30443)] {
        let (lproto, (tproto, tport, h, targets), _, _) = by_port(&seen1, port);
        assert_eq!((lproto.as_str(), tproto.as_str(), tport), (proto, proto, node_port), "port {port}");
        assert_eq!(h, health, "port {port}");
        assert_eq!(targets, both, "port {port}");
    }
    assert_eq!(seen1.security_groups.len(), 1, "the managed frontend group");
    let front = seen1.security_groups[0].clone();
    assert_eq!(
        rules(&p, &front).await,
        BTreeSet::from([
            rule("tcp", 53, "0.0.0.0/0"),
            rule("udp", 53, "0.0.0.0/0"),
            rule("tcp", 80, "0.0.0.0/0"),
            rule("tcp", 443, "0.0.0.0/0")
        ])
    );
    assert_eq!(
        rules(&p, &w.node_sg).await,
        BTreeSet::from([
            rule("tcp", 30053, &front),
            rule("udp", 30053, &front),
            rule("tcp", 30080, &front),
            rule("tcp", 30443, &front),
            rule("tcp", 10266, &front),
        ])
    );

    // Steady state: nothing changed, nothing written.
    p.clear_calls();
    assert_eq!(p.ensure(&s).await.unwrap(), status);
    let mutating = assert_known_and_count_mutating(&p);
    assert!(mutating.is_empty(), "steady state made mutating calls: {mutating:?}");

    // Update: drop 443, add 8080/UDP, node b leaves and c joins, slower health checks,
    // restricted source ranges.
    s.listeners.retain(|l| l.port != 443);
    s.listeners.push(Listener { name: "game".into(), protocol: Protocol::Udp, port: 8080, node_port: Some(30090) });
    s.targets = spec("uid-1", &[a, c]).targets;
    s.health_check.interval = Duration::from_secs(30);
    s.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    p.clear_calls();
    p.ensure(&s).await.unwrap();
    let mutating = assert_known_and_count_mutating(&p);
    assert!(!mutating.iter().any(|m| m == "CreateLoadBalancer" || m == "DeleteLoadBalancer"), "{mutating:?}");
    let seen2 = seen(&p, &name).await.unwrap();
    assert_eq!(seen2.lb_arn, seen1.lb_arn, "updated in place");
    assert_eq!(seen2.listeners.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([53, 80, 8080]));
    for port in [53, 80] {
        assert_eq!(by_port(&seen2, port).2, by_port(&seen1, port).2, "target group of {port} kept");
        assert_eq!(by_port(&seen2, port).1.2.3, 30, "interval changed in place");
    }
    let tg443 = by_port(&seen1, 443).2;
    let gone = p.clients().elb.describe_target_groups().target_group_arns(&tg443).send().await;
    assert!(gone.is_err(), "the 443 target group is deleted");
    let (proto, (tproto, tport, _, targets), _, _) = by_port(&seen2, 8080);
    assert_eq!((proto.as_str(), tproto.as_str(), tport), ("UDP", "UDP", 30090));
    let ac: BTreeSet<String> = [a.clone(), c.clone()].into();
    assert_eq!(targets, ac);
    assert_eq!(by_port(&seen2, 80).1.3, ac, "b deregistered, c registered");
    assert_eq!(
        rules(&p, &front).await,
        BTreeSet::from([
            rule("tcp", 53, "10.0.0.0/8"),
            rule("udp", 53, "10.0.0.0/8"),
            rule("tcp", 80, "10.0.0.0/8"),
            rule("udp", 8080, "10.0.0.0/8")
        ])
    );
    assert_eq!(
        rules(&p, &w.node_sg).await,
        BTreeSet::from([
            rule("tcp", 30053, &front),
            rule("udp", 30053, &front),
            rule("tcp", 30080, &front),
            rule("udp", 30090, &front),
            rule("tcp", 10266, &front),
        ])
    );
    p.clear_calls();
    p.ensure(&s).await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "steady after the update");
    assert_settled(&p, &s).await;

    // TLS with an ACM certificate on a new port 8443: created in place, nothing else rebuilt.
    // (Switching an existing TCP listener to TLS is a ModifyListener, which moto rejects with
    // "Protocol TLS is not supported"; that path is covered by the listener diff unit tests.)
    let cert = moto_certificate(&moto);
    s.listeners.push(Listener { name: "tls".into(), protocol: Protocol::Tcp, port: 8443, node_port: Some(30443) });
    s.provider_annotations.insert("hawser.dev/aws-ssl-cert".into(), cert.clone());
    s.provider_annotations.insert("hawser.dev/aws-ssl-ports".into(), "tls".into());
    p.clear_calls();
    p.ensure(&s).await.unwrap();
    let mutating = assert_known_and_count_mutating(&p);
    assert!(mutating.contains(&"CreateListener".to_owned()), "{mutating:?}");
    assert!(!mutating.iter().any(|m| m == "ModifyListener" || m.contains("LoadBalancer")), "{mutating:?}");
    let seen3 = seen(&p, &name).await.unwrap();
    assert_eq!(seen3.lb_arn, seen1.lb_arn);
    let (proto, (tproto, tport, _, targets), _, got_cert) = by_port(&seen3, 8443);
    assert_eq!(
        (proto.as_str(), tproto.as_str(), tport, got_cert.as_deref()),
        ("TLS", "TCP", 30443, Some(cert.as_str()))
    );
    assert_eq!(targets, ac);
    assert_eq!(by_port(&seen3, 80).0, "TCP", "only the ports named in aws-ssl-ports terminate TLS");
    p.clear_calls();
    p.ensure(&s).await.unwrap();
    let mutating = assert_known_and_count_mutating(&p);
    assert!(mutating.is_empty(), "steady with TLS: {mutating:?}");
    assert_settled(&p, &s).await;

    // Delete: nothing owned is left, the node group keeps only what it had.
    p.clear_calls();
    p.delete(&identity("uid-1")).await.unwrap();
    eprintln!("delete calls: {:?}", p.calls().iter().map(|c| c.operation.clone()).collect::<Vec<_>>());
    assert_known_and_count_mutating(&p);
    assert!(seen(&p, &name).await.is_none(), "the NLB is gone");
    let tgs = p.clients().elb.describe_target_groups().send().await.unwrap();
    assert!(tgs.target_groups().is_empty(), "no target group left: {:?}", tgs.target_groups());
    let groups = p
        .clients()
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("tag:hawser.dev/cluster").values("prod").build())
        .send()
        .await
        .unwrap();
    assert!(groups.security_groups().is_empty(), "the frontend group is gone");
    assert!(rules(&p, &w.node_sg).await.is_empty(), "node rules revoked");
    assert!(p.list_owned().await.unwrap().is_empty());
    p.delete(&identity("uid-1")).await.unwrap();
    let _ = w.vpc;
}

#[tokio::test]
async fn restart_adopts_and_foreign_is_untouched() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().collect();
    let s = spec("uid-1", &nodes);
    let first = p.ensure(&s).await.unwrap();

    // A fresh provider (an operator restart) finds everything by tags and writes nothing.
    let q = provider(&moto).await;
    let again = q.ensure(&s).await.unwrap();
    assert_eq!(again, first);
    let mutating = assert_known_and_count_mutating(&q);
    assert!(mutating.is_empty(), "a restart re-created or changed things: {mutating:?}");
    let owned = q.list_owned().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].identity, identity("uid-1"));
    assert_eq!(owned[0].id, first.id);

    // A same-named NLB someone else made: a conflict, never changed or deleted.
    let foreign_name = hawser_providers::aws::naming::load_balancer_name(&identity("uid-foreign"));
    let foreign = p
        .clients()
        .elb
        .create_load_balancer()
        .name(&foreign_name)
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .subnets(&w.subnets[0])
        .tags(aws_sdk_elasticloadbalancingv2::types::Tag::builder().key("owner").value("someone").build())
        .send()
        .await
        .unwrap();
    let foreign_arn = foreign.load_balancers()[0].load_balancer_arn().unwrap().to_owned();
    q.clear_calls();
    let err = q.ensure(&spec("uid-foreign", &nodes)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict, "{err}");
    assert!(err.to_string().contains(&foreign_name) && err.to_string().contains("left untouched"), "{err}");
    q.delete(&identity("uid-foreign")).await.unwrap();
    let mutating = assert_known_and_count_mutating(&q);
    assert!(
        !mutating.iter().any(|m| m.contains("LoadBalancer") || m.contains("Tags") || m.contains("Listener")),
        "the foreign NLB was touched: {mutating:?}"
    );
    let still = p.clients().elb.describe_load_balancers().load_balancer_arns(&foreign_arn).send().await.unwrap();
    assert_eq!(still.load_balancers().len(), 1);
    let tags = p.clients().elb.describe_tags().resource_arns(&foreign_arn).send().await.unwrap();
    let keys: Vec<_> = tags.tag_descriptions()[0].tags().iter().map(|t| t.key().unwrap().to_owned()).collect();
    assert_eq!(keys, ["owner"]);
    assert_eq!(q.list_owned().await.unwrap().len(), 1, "the foreign NLB is not listed as ours");
}

#[tokio::test]
async fn missing_subnets_and_bad_user_ids_name_the_annotation() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().collect();
    let mut s = spec("uid-2", &nodes);
    s.scheme = Scheme::Internal;
    let err = p.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidInput, "{err}");
    assert!(
        err.to_string().contains("hawser.dev/aws-subnets")
            && err.to_string().contains("kubernetes.io/role/internal-elb"),
        "{err}"
    );
    let mut s = spec("uid-3", &nodes);
    s.provider_annotations.insert("hawser.dev/aws-subnets".into(), "subnet-0000dead,nope".into());
    let err = p.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidInput, "{err}");
    assert!(err.to_string().contains("subnet-0000dead, nope"), "{err}");
    let mutating = assert_known_and_count_mutating(&p);
    assert!(!mutating.iter().any(|m| m.contains("LoadBalancer")), "{mutating:?}");
}

/// The drift check's inventory: every NLB of the cluster in a handful of batched reads
/// (DescribeLoadBalancers in pages of 400, DescribeTags for 20 at a time), however many there
/// are, and no write.
#[tokio::test]
async fn inventory_of_many_load_balancers_costs_a_fifth_of_a_read_each_or_less() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let count = 45;
    for i in 0..count {
        let id = ServiceIdentity { name: format!("svc-{i}"), ..identity(&format!("uid-{i}")) };
        let tags = hawser_providers::ownership_tags(&id, "load-balancer")
            .into_iter()
            .map(|(k, v)| aws_sdk_elasticloadbalancingv2::types::Tag::builder().key(k).value(v).build())
            .collect();
        p.clients()
            .elb
            .create_load_balancer()
            .name(hawser_providers::aws::naming::load_balancer_name(&id))
            .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
            .subnets(&w.subnets[0])
            .set_tags(Some(tags))
            .send()
            .await
            .unwrap();
    }
    // A restarted operator: nothing cached.
    let q = provider(&moto).await;
    let owned = q.list_owned().await.unwrap();
    assert_eq!(owned.len(), count);
    let mut names: Vec<String> = owned.iter().map(|o| o.identity.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "every NLB listed once, with its owner");
    let calls = q.calls();
    assert!(calls.iter().all(|c| !c.is_mutating()), "the inventory writes nothing: {calls:?}");
    let per_service = calls.len() as f64 / count as f64;
    assert!(per_service <= 0.2, "{} reads for {count} load balancers: {calls:?}", calls.len());

    // The next period reads the tags from the cache: one paginated listing.
    q.clear_calls();
    assert_eq!(q.list_owned().await.unwrap().len(), count);
    let ops: Vec<String> = q.calls().into_iter().map(|c| c.operation).collect();
    assert_eq!(ops, ["DescribeLoadBalancers", "DescribeTargetGroups", "DescribeSecurityGroups"]);
}

#[tokio::test]
async fn leftovers_without_an_nlb_are_inventoried_and_deleted_with_their_owner() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().collect();
    let s = spec("uid-1", &nodes);
    let status = p.ensure(&s).await.unwrap();
    // What a crash between the target groups and the NLB leaves: the NLB goes by hand.
    p.clients().elb.delete_load_balancer().load_balancer_arn(&status.id).send().await.unwrap();

    let q = provider(&moto).await;
    let owned = q.list_owned().await.unwrap();
    assert!(!owned.is_empty() && owned.iter().all(|o| o.detached && o.identity == identity("uid-1")), "{owned:#?}");
    let kinds: BTreeSet<bool> = owned.iter().map(|o| o.id.starts_with("sg-")).collect();
    assert_eq!(kinds, BTreeSet::from([false, true]), "the target groups and the frontend group: {owned:#?}");
    assert!(!owned.iter().any(|o| o.id == status.id), "no NLB is reported");

    // The owner alive (as the operator's collector finds it): a leftover goes alone, and only
    // while it is on no NLB.
    let leftover = owned.iter().find(|o| !o.id.starts_with("sg-")).unwrap();
    q.delete_detached(leftover).await.unwrap();
    let tgs = q.clients().elb.describe_target_groups().send().await.unwrap();
    assert!(!tgs.target_groups().iter().any(|t| t.target_group_arn() == Some(leftover.id.as_str())));
    assert_eq!(q.list_owned().await.unwrap().len(), owned.len() - 1, "the rest is untouched");

    // The owner gone, deleting it removes them all.
    q.delete(&identity("uid-1")).await.unwrap();
    assert!(q.list_owned().await.unwrap().is_empty());

    // An NLB without listeners or target groups (a crash right after creating it) is completed
    // by the next ensure, and deleted whole.
    let status = q.ensure(&s).await.unwrap();
    let elb = &q.clients().elb;
    for l in elb.describe_listeners().load_balancer_arn(&status.id).send().await.unwrap().listeners() {
        elb.delete_listener().listener_arn(l.listener_arn().unwrap()).send().await.unwrap();
    }
    for tg in elb.describe_target_groups().send().await.unwrap().target_groups() {
        elb.delete_target_group().target_group_arn(tg.target_group_arn().unwrap()).send().await.unwrap();
    }
    let r = provider(&moto).await;
    assert_eq!(r.ensure(&s).await.unwrap(), status, "the same NLB, completed");
    r.clear_calls();
    for tg in r.clients().elb.describe_target_groups().send().await.unwrap().target_groups() {
        let used = OwnedLoadBalancer {
            identity: identity("uid-1"),
            id: tg.target_group_arn().unwrap().to_owned(),
            fingerprint: None,
            detached: true,
            group: None,
        };
        r.delete_detached(&used).await.unwrap();
    }
    let front = seen(&r, &hawser_providers::aws::naming::load_balancer_name(&identity("uid-1"))).await.unwrap();
    let used = OwnedLoadBalancer {
        id: front.security_groups[0].clone(),
        ..OwnedLoadBalancer {
            identity: identity("uid-1"),
            id: String::new(),
            fingerprint: None,
            detached: true,
            group: None,
        }
    };
    r.delete_detached(&used).await.unwrap();
    assert_eq!(r.ensure(&s).await.unwrap(), status);
    assert!(
        assert_known_and_count_mutating(&r).iter().all(|m| m != "CreateTargetGroup" && m != "CreateSecurityGroup"),
        "what an NLB uses is never deleted as a leftover"
    );
    assert_eq!(
        seen(&r, &hawser_providers::aws::naming::load_balancer_name(&identity("uid-1"))).await.unwrap().listeners.len(),
        3
    );
    r.delete(&identity("uid-1")).await.unwrap();
    assert!(q.list_owned().await.unwrap().is_empty());
    assert!(q.clients().elb.describe_target_groups().send().await.unwrap().target_groups().is_empty());
    assert!(rules(&q, &w.node_sg).await.is_empty(), "node rules revoked");
}

/// Every change of a plan as `action kind name`, for comparing with what ensure then does.
fn plan_lines(plan: &hawser_providers::ChangePlan) -> Vec<String> {
    plan.changes.iter().map(|c| format!("{} {} {}", c.action.as_str(), c.kind, c.name)).collect()
}

#[tokio::test]
async fn plan_foretells_ensure_and_delete_and_writes_nothing() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let (a, b, c) = (&w.instances[0], &w.instances[1], &w.instances[2]);

    // Before anything exists: everything is to create, and planning writes nothing.
    let mut s = spec("uid-p", &[a, b]);
    p.clear_calls();
    let plan = p.plan(&s).await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "planning wrote");
    let lines = plan_lines(&plan);
    assert_eq!(lines.iter().filter(|l| l.starts_with("create target group")).count(), 3, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("create listener")).count(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("create load balancer")), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("create security group")), "{lines:?}");
    assert!(!plan.replaces());
    assert!(p.list_owned().await.unwrap().is_empty());

    // After ensure, the plan is empty: plan and ensure agree on what "done" is.
    p.ensure(&s).await.unwrap();
    let plan = p.plan(&s).await.unwrap();
    assert!(plan.is_empty(), "a just-ensured spec plans changes:\n{plan}");

    // A change: 443 dropped, 8080/UDP added, b leaves and c joins, a slower health check.
    s.listeners.retain(|l| l.port != 443);
    s.listeners.push(Listener { name: "game".into(), protocol: Protocol::Udp, port: 8080, node_port: Some(30090) });
    s.targets = spec("uid-p", &[a, c]).targets;
    s.health_check.interval = Duration::from_secs(30);
    p.clear_calls();
    let plan = p.plan(&s).await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "planning wrote");
    let text = plan.to_string();
    let lines = plan_lines(&plan);
    assert!(lines.iter().any(|l| l.starts_with("create listener 8080/UDP")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("delete listener 443/TCP")), "{text}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("delete target group")).count(), 1, "{text}");
    assert!(text.contains("healthCheck.intervalSeconds: 10 → 30"), "{text}");
    assert!(text.contains(&format!("+{c}")) && text.contains(&format!("-{b}")), "{text}");
    assert!(!plan.replaces(), "{text}");
    p.clear_calls();
    p.ensure(&s).await.unwrap();
    let done = assert_known_and_count_mutating(&p);
    assert!(done.contains(&"CreateListener".to_owned()) && done.contains(&"DeleteListener".to_owned()), "{done:?}");
    assert!(p.plan(&s).await.unwrap().is_empty(), "plan after the update is empty");

    // A scheme change replaces the load balancer: said, with why.
    let mut internal = s.clone();
    internal.scheme = Scheme::Internal;
    internal.provider_annotations.insert("hawser.dev/aws-subnets".into(), format!("{},{}", w.subnets[0], w.subnets[1]));
    let plan = p.plan(&internal).await.unwrap();
    assert!(plan.replaces(), "{plan}");
    let replace = plan.changes.iter().find(|c| c.action == hawser_providers::Action::Replace).unwrap();
    assert_eq!(replace.kind, "load balancer");
    assert!(replace.reason.as_deref().unwrap_or_default().contains("scheme"), "{plan}");
    assert!(plan.to_string().contains("scheme: internet-facing → internal"), "{plan}");

    // Deleting: the load balancer, its target groups and its security group.
    p.clear_calls();
    let plan = p.plan_delete(&identity("uid-p")).await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "planning wrote");
    let lines = plan_lines(&plan);
    assert!(lines[0].starts_with("delete load balancer"), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("delete target group")).count(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("delete security group")), "{lines:?}");
    p.delete(&identity("uid-p")).await.unwrap();
    assert!(p.plan_delete(&identity("uid-p")).await.unwrap().is_empty(), "nothing left to delete");

    // A same-named NLB without our tags: a conflict in the plan, not an error.
    let foreign_name = hawser_providers::aws::naming::load_balancer_name(&identity("uid-foreign"));
    p.clients()
        .elb
        .create_load_balancer()
        .name(&foreign_name)
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .subnets(&w.subnets[0])
        .send()
        .await
        .unwrap();
    let plan = p.plan(&spec("uid-foreign", &[a])).await.unwrap();
    assert_eq!(plan.conflicts.len(), 1, "{plan}");
    assert_eq!(
        (plan.conflicts[0].kind.as_str(), plan.conflicts[0].name.as_str()),
        ("load balancer", foreign_name.as_str())
    );
    assert!(!plan_lines(&plan).iter().any(|l| l.contains("load balancer")), "no change planned to it: {plan}");
}

#[tokio::test]
async fn plans_settle_with_own_security_groups_internal_subnets_and_attributes() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let mine = p
        .clients()
        .ec2
        .create_security_group()
        .group_name("mine")
        .description("the user's own")
        .vpc_id(&w.vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    let mut s = spec("uid-own", &[&w.instances[0]]);
    s.scheme = Scheme::Internal;
    s.provider_annotations.insert("hawser.dev/aws-security-groups".into(), mine.clone());
    s.provider_annotations.insert("hawser.dev/aws-subnets".into(), format!("{},{}", w.subnets[0], w.subnets[1]));
    let plan = p.plan(&s).await.unwrap();
    assert!(!plan.to_string().contains("security group hawser"), "no managed group with the user's own: {plan}");
    p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;

    // Attributes change in place, and the plan names them.
    s.provider_annotations.insert("hawser.dev/aws-cross-zone".into(), "true".into());
    s.provider_annotations.insert("hawser.dev/aws-proxy-protocol".into(), "*".into());
    p.clear_calls();
    let plan = p.plan(&s).await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "planning wrote");
    let text = plan.to_string();
    assert!(text.contains("attributes.load_balancing.cross_zone.enabled: false → true"), "{text}");
    assert!(text.contains("attributes.proxy_protocol_v2.enabled: false → true"), "{text}");
    assert!(!plan.replaces(), "{text}");
    p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;
}
