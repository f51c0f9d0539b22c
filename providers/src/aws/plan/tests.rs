#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::aws::annotations::parse;
use crate::aws::testutil::spec;

fn env() -> Environment {
    Environment {
        vpc_id: "vpc-1".into(),
        subnets: vec!["subnet-a".into(), "subnet-b".into()],
        node_security_groups: BTreeSet::from(["sg-nodes".to_owned()]),
    }
}

fn desired_of(s: &LoadBalancerSpec) -> Desired {
    desired(s, &parse(s).unwrap(), &env()).unwrap()
}

fn observed_tg(d: &DesiredTargetGroup, arn: &str) -> ObservedTargetGroup {
    ObservedTargetGroup {
        arn: arn.into(),
        name: d.name.clone(),
        health: d.health.clone(),
        attributes: d.attributes.clone(),
        tags: d.tags.clone(),
        targets: BTreeSet::new(),
    }
}

#[test]
fn desired_follows_the_spec() {
    let d = desired_of(&spec());
    assert_eq!(d.target_groups.len(), 3);
    let dns = &d.target_groups[0];
    assert_eq!((dns.listener_port, dns.protocol, dns.port), (53, Protocol::TcpUdp, 30053));
    assert_eq!(dns.health.protocol, "HTTP");
    assert_eq!(dns.health.port, "10266");
    assert_eq!(dns.health.path.as_deref(), Some("/healthz"));
    assert_eq!((dns.health.interval, dns.health.timeout, dns.health.healthy, dns.health.unhealthy), (10, 5, 2, 3));
    assert_eq!(dns.tags["hawser.dev/resource"], "target-group");
    assert_eq!(dns.tags["team"], "shop");
    assert_eq!(d.targets, BTreeSet::from(["i-0a".to_owned(), "i-0b".to_owned()]), "the Fargate node is skipped");
    assert_eq!(d.listeners.iter().map(|l| l.protocol.as_str()).collect::<Vec<_>>(), ["TCP_UDP", "TCP", "TCP"]);
    assert_eq!(d.ip_address_type, "ipv4");
    assert_eq!(d.subnets.len(), 2);
    let front = d.frontend.as_ref().unwrap();
    assert_eq!(front.ingress.len(), 4, "53 tcp+udp, 80, 443 from anywhere");
    assert!(front.ingress.iter().all(|r| r.source == Source::Cidr("0.0.0.0/0".into())));
    assert_eq!(
        d.node_ports,
        BTreeSet::from([
            ("tcp".to_owned(), 10266),
            ("tcp".to_owned(), 30053),
            ("udp".to_owned(), 30053),
            ("tcp".to_owned(), 30080),
            ("tcp".to_owned(), 30443)
        ])
    );
}

#[test]
fn options_shape_the_resources() {
    let cert = "arn:aws:acm:us-east-1:1:certificate/x";
    let mut s = spec();
    s.provider_annotations.insert(ann::SSL_CERT.into(), cert.into());
    s.provider_annotations.insert(ann::SSL_PORTS.into(), "443".into());
    s.provider_annotations.insert(ann::PROXY_PROTOCOL.into(), "*".into());
    s.provider_annotations.insert(ann::CROSS_ZONE.into(), "true".into());
    s.provider_annotations.insert(ann::EIP_ALLOCATIONS.into(), "eipalloc-1,eipalloc-2".into());
    s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    s.session_affinity = SessionAffinity::ClientIp { timeout: std::time::Duration::from_secs(60) };
    s.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let d = desired_of(&s);
    let tls = d.listeners.iter().find(|l| l.port == 443).unwrap();
    assert_eq!((tls.protocol.as_str(), tls.certificate.as_deref()), ("TLS", Some(cert)));
    assert_eq!(tls.ssl_policy.as_deref(), Some(ann::DEFAULT_SSL_POLICY));
    assert_eq!(d.listeners.iter().find(|l| l.port == 80).unwrap().protocol, "TCP");
    assert_eq!(d.target_groups[2].protocol, Protocol::Tcp, "TLS terminates at the NLB; targets get TCP");
    assert_eq!(d.target_groups[0].attributes["proxy_protocol_v2.enabled"], "true");
    assert_eq!(d.target_groups[0].attributes["stickiness.type"], "source_ip");
    assert_eq!(d.attributes["load_balancing.cross_zone.enabled"], "true");
    assert_eq!(d.ip_address_type, "dualstack");
    assert_eq!(d.subnets[1].allocation_id.as_deref(), Some("eipalloc-2"));
    assert!(d.frontend.unwrap().ingress.iter().all(|r| r.source == Source::Cidr("10.0.0.0/8".into())));

    // Own security groups: no managed group and no node rules.
    let mut s = spec();
    s.provider_annotations.insert(ann::SECURITY_GROUPS.into(), "sg-1".into());
    let d = desired_of(&s);
    assert!(d.frontend.is_none() && d.node_ports.is_empty());
    assert_eq!(d.own_security_groups, Some(vec!["sg-1".to_owned()]));

    // Fixed addresses must match the subnets found.
    let mut s = spec();
    s.provider_annotations.insert(ann::EIP_ALLOCATIONS.into(), "eipalloc-1".into());
    let err = desired(&s, &parse(&s).unwrap(), &env()).unwrap_err();
    assert!(
        err.to_string().contains("hawser.dev/aws-eip-allocations: gives 1 values but the load balancer has 2 subnets"),
        "{err}"
    );
}

#[test]
fn load_balancer_diff() {
    let d = desired_of(&spec());
    let groups = BTreeSet::from(["sg-front".to_owned()]);
    let same = ObservedLoadBalancer {
        arn: "arn".into(),
        dns_name: "x".into(),
        scheme: Some(Scheme::InternetFacing),
        vpc_id: "vpc-1".into(),
        ip_address_type: "ipv4".into(),
        subnets: BTreeSet::from(["subnet-a".to_owned(), "subnet-b".to_owned()]),
        security_groups: groups.clone(),
        attributes: d.attributes.clone(),
        tags: d.tags.clone(),
    };
    type Case = (&'static str, fn(&mut ObservedLoadBalancer), fn(&LoadBalancerAction) -> bool);
    let cases: &[Case] = &[
        ("unchanged", |_| {}, |a| matches!(a, LoadBalancerAction::Update(u) if u.is_empty())),
        (
            "scheme",
            |o| o.scheme = Some(Scheme::Internal),
            |a| matches!(a, LoadBalancerAction::Replace(r) if r.contains("scheme")),
        ),
        ("no groups", |o| o.security_groups.clear(), |a| matches!(a, LoadBalancerAction::Replace(_))),
        (
            "subnet",
            |o| {
                o.subnets.remove("subnet-b");
            },
            |a| matches!(a, LoadBalancerAction::Update(u) if u.subnets.is_some() && u.attributes.is_empty()),
        ),
        (
            "groups",
            |o| o.security_groups = BTreeSet::from(["sg-old".to_owned()]),
            |a| matches!(a, LoadBalancerAction::Update(u) if u.security_groups.is_some()),
        ),
        (
            "attribute",
            |o| {
                o.attributes.insert("load_balancing.cross_zone.enabled".into(), "true".into());
            },
            |a| matches!(a, LoadBalancerAction::Update(u) if u.attributes.len() == 1),
        ),
        (
            "tags",
            |o| {
                o.tags.insert("old".into(), "x".into());
                o.tags.insert("aws:cloudformation:stack".into(), "x".into());
                o.tags.insert("team".into(), "other".into());
            },
            |a| matches!(a, LoadBalancerAction::Update(u) if u.tags.remove == ["old"] && u.tags.add.len() == 1),
        ),
        (
            "dualstack",
            |o| o.ip_address_type = "dualstack".into(),
            |a| matches!(a, LoadBalancerAction::Update(u) if u.ip_address_type.as_deref() == Some("ipv4")),
        ),
    ];
    for (name, change, check) in cases {
        let mut o = same.clone();
        change(&mut o);
        let action = diff_load_balancer(&d, &groups, Some(&o));
        assert!(check(&action), "{name}: {action:?}");
    }
    assert_eq!(diff_load_balancer(&d, &groups, None), LoadBalancerAction::Create);
}

#[test]
fn target_group_diff_matches_by_name() {
    let d = desired_of(&spec());
    let observed: Vec<_> =
        d.target_groups.iter().enumerate().map(|(i, t)| observed_tg(t, &format!("arn-{i}"))).collect();
    assert_eq!(diff_target_groups(&d.target_groups, &observed), TargetGroupPlan::default());

    let mut changed = observed.clone();
    changed[0].health.interval = 30;
    changed[1].attributes.insert("proxy_protocol_v2.enabled".into(), "true".into());
    let plan = diff_target_groups(&d.target_groups, &changed);
    assert_eq!(plan.update.len(), 2);
    assert_eq!(plan.update[0].health.as_ref().unwrap().interval, 10);
    assert_eq!(plan.update[1].attributes["proxy_protocol_v2.enabled"], "false");
    assert!(plan.create.is_empty() && plan.delete.is_empty());

    // A node port change is a new target group; the old one goes.
    let mut s = spec();
    s.listeners[1].node_port = Some(31000);
    let d2 = desired_of(&s);
    let plan = diff_target_groups(&d2.target_groups, &observed);
    assert_eq!(plan.create, [d2.target_groups[1].name.clone()]);
    assert_eq!(plan.delete, ["arn-1"]);
}

#[test]
fn listener_diff() {
    let d = desired_of(&spec());
    let arns: BTreeMap<String, String> =
        d.target_groups.iter().enumerate().map(|(i, t)| (t.name.clone(), format!("tg-{i}"))).collect();
    let observed: Vec<ObservedListener> = d
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| ObservedListener {
            arn: format!("l-{i}"),
            port: l.port,
            protocol: l.protocol.clone(),
            target_group_arn: Some(format!("tg-{i}")),
            certificate: None,
            ssl_policy: None,
        })
        .collect();
    assert!(diff_listeners(&d.listeners, &observed, &arns).is_empty());

    let mut extra = observed.clone();
    extra.push(ObservedListener {
        arn: "l-old".into(),
        port: 9000,
        protocol: "TCP".into(),
        target_group_arn: None,
        certificate: None,
        ssl_policy: None,
    });
    assert_eq!(diff_listeners(&d.listeners, &extra, &arns), [ListenerAction::Delete("l-old".into())]);
    assert_eq!(diff_listeners(&d.listeners, &observed[..2], &arns), [ListenerAction::Create(443)]);

    let mut s = spec();
    s.provider_annotations.insert(ann::SSL_CERT.into(), "arn:aws:acm:us-east-1:1:certificate/x".into());
    s.provider_annotations.insert(ann::SSL_PORTS.into(), "443".into());
    let tls = desired_of(&s);
    assert_eq!(diff_listeners(&tls.listeners, &observed, &arns), [ListenerAction::Modify("l-2".into(), 443)]);
    let mut moved = arns.clone();
    moved.insert(d.target_groups[0].name.clone(), "tg-new".into());
    assert_eq!(diff_listeners(&d.listeners, &observed, &moved), [ListenerAction::Modify("l-0".into(), 53)]);
}

#[test]
fn targets_and_rules_diff_only_the_difference() {
    let set = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    let diff = diff_targets(&set(&["i-1", "i-2", "i-3"]), &set(&["i-2", "i-3", "i-4"]));
    assert_eq!(diff.register, ["i-1"]);
    assert_eq!(diff.deregister, ["i-4"]);
    assert_eq!(diff_targets(&set(&["i-1"]), &set(&["i-1"])), TargetDiff::default());

    let r = |p: i32| Rule { protocol: "tcp".into(), from: p, to: p, source: Source::Group("sg-f".into()) };
    let (add, remove) = diff_rules(&BTreeSet::from([r(1), r(2)]), &BTreeSet::from([r(2), r(3)]));
    assert_eq!((add, remove), (vec![r(1)], vec![r(3)]));
    let d = desired_of(&spec());
    assert!(node_rules(&d, "sg-f").iter().all(|x| x.source == Source::Group("sg-f".into())));
}

#[test]
fn tag_diff_keeps_aws_reserved_keys() {
    let m =
        |xs: &[(&str, &str)]| xs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>();
    let diff = diff_tags(&m(&[("a", "1"), ("b", "2")]), &m(&[("a", "1"), ("b", "x"), ("c", "3"), ("aws:x", "y")]));
    assert_eq!(diff.add, m(&[("b", "2")]));
    assert_eq!(diff.remove, ["c"]);
    assert!(diff_tags(&m(&[("a", "1")]), &m(&[("a", "1")])).is_empty());
}
