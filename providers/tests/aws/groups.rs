//! Load-balancer groups on AWS: one NLB shared by the members of a group, each member with its
//! own listeners, target groups and rules on it.

use super::*;
use hawser_providers::aws::naming::{group_load_balancer_name, load_balancer_name};
use hawser_providers::{Action, ChangePlan};

fn web_id() -> ServiceIdentity {
    identity("uid-web")
}

fn api_id() -> ServiceIdentity {
    ServiceIdentity { name: "api".into(), ..identity("uid-api") }
}

fn member(
    uid: &str,
    name: &str,
    group: &str,
    ports: &[(Protocol, u16, u16)],
    health: u16,
    nodes: &[&String],
) -> LoadBalancerSpec {
    let mut s = spec(uid, nodes);
    s.identity.name = name.to_owned();
    s.listeners = ports
        .iter()
        .map(|&(protocol, port, node_port)| Listener {
            name: format!("p{port}"),
            protocol,
            port,
            node_port: Some(node_port),
        })
        .collect();
    s.health_check = HealthCheck::http(health, "/healthz");
    s.group = Some(group.to_owned());
    s
}

/// Whether `plan` has a change of `action` to a `kind` whose name starts with `name`.
fn has(plan: &ChangePlan, action: Action, kind: &str, name: &str) -> bool {
    plan.changes.iter().any(|c| c.action == action && c.kind == kind && c.name.starts_with(name))
}

/// Every target group in the account, by ARN, with its tags.
async fn all_target_groups(p: &AwsProvider) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = p.clients().elb.describe_target_groups().send().await.unwrap();
    let mut all = BTreeMap::new();
    for tg in out.target_groups() {
        let arn = tg.target_group_arn().unwrap().to_owned();
        let tags = p.clients().elb.describe_tags().resource_arns(&arn).send().await.unwrap();
        let tags = tags.tag_descriptions()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect();
        all.insert(arn, tags);
    }
    all
}

/// Security groups hawser made for the cluster.
async fn frontends(p: &AwsProvider) -> Vec<String> {
    let out = p
        .clients()
        .ec2
        .describe_security_groups()
        .filters(Filter::builder().name("tag:hawser.dev/cluster").values("prod").build())
        .send()
        .await
        .unwrap();
    out.security_groups().iter().map(|g| g.group_id().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn members_share_one_nlb_and_each_changes_only_its_part() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().take(2).collect();
    let group_lb = group_load_balancer_name("prod", "shop/edge");
    let mut web =
        member("uid-web", "web", "edge", &[(Protocol::Tcp, 80, 30080), (Protocol::TcpUdp, 53, 30053)], 10266, &nodes);
    let api =
        member("uid-api", "api", "edge", &[(Protocol::Tcp, 443, 30443), (Protocol::Udp, 8080, 30090)], 31001, &nodes);

    // Two members: one NLB, a listener and a target group per member port.
    let s_web = p.ensure(&web).await.unwrap();
    let s_api = p.ensure(&api).await.unwrap();
    assert_known_and_count_mutating(&p);
    let shared = seen(&p, &group_lb).await.expect("the group's NLB exists");
    assert_eq!(s_web.id, shared.lb_arn);
    assert_eq!(s_api.id, shared.lb_arn);
    assert_eq!(s_web.ingress[0].hostname, s_api.ingress[0].hostname, "one hostname for the group");
    let ports = |s: &hawser_providers::LoadBalancerStatus| {
        s.ingress[0].ports.iter().map(|p| (p.port, p.protocol)).collect::<BTreeSet<_>>()
    };
    assert_eq!(ports(&s_web), BTreeSet::from([(80, Protocol::Tcp), (53, Protocol::Tcp), (53, Protocol::Udp)]));
    assert_eq!(ports(&s_api), BTreeSet::from([(443, Protocol::Tcp), (8080, Protocol::Udp)]), "only its own ports");
    assert!(seen(&p, &load_balancer_name(&web_id())).await.is_none(), "no NLB of a member's own");
    assert_eq!(shared.listeners.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([53, 80, 443, 8080]));
    assert_eq!(shared.target_groups.len(), 4);
    assert_eq!(shared.tags["hawser.dev/load-balancer-group"], "shop/edge");
    assert!(!shared.tags.contains_key("hawser.dev/service-uid"), "the NLB is the group's: {:?}", shared.tags);
    let tgs = all_target_groups(&p).await;
    let owner_of_port = |port: i32| tgs[&shared.listeners[&port].1]["hawser.dev/service-uid"].clone();
    assert_eq!((owner_of_port(80), owner_of_port(53)), ("uid-web".to_owned(), "uid-web".to_owned()));
    assert_eq!((owner_of_port(443), owner_of_port(8080)), ("uid-api".to_owned(), "uid-api".to_owned()));
    assert!(tgs.values().all(|t| t["hawser.dev/load-balancer-group"] == "shop/edge" && t["team"] == "shop"));
    assert_eq!(shared.security_groups.len(), 1, "one frontend group for the group");
    let front = shared.security_groups[0].clone();
    let everyone = "0.0.0.0/0";
    assert_eq!(
        rules(&p, &front).await,
        BTreeSet::from([
            rule("tcp", 53, everyone),
            rule("udp", 53, everyone),
            rule("tcp", 80, everyone),
            rule("tcp", 443, everyone),
            rule("udp", 8080, everyone),
        ])
    );
    let node_rules_both = BTreeSet::from([
        rule("tcp", 30053, &front),
        rule("udp", 30053, &front),
        rule("tcp", 30080, &front),
        rule("tcp", 10266, &front),
        rule("tcp", 30443, &front),
        rule("udp", 30090, &front),
        rule("tcp", 31001, &front),
    ]);
    assert_eq!(rules(&p, &w.node_sg).await, node_rules_both);

    // Steady: nothing written for either member, and their plans are empty.
    p.clear_calls();
    assert_eq!(p.ensure(&web).await.unwrap(), s_web);
    assert_eq!(p.ensure(&api).await.unwrap(), s_api);
    let mutating = assert_known_and_count_mutating(&p);
    assert!(mutating.is_empty(), "steady members made mutating calls: {mutating:?}");
    assert_settled(&p, &web).await;
    assert_settled(&p, &api).await;

    // A restarted operator adopts the group's NLB and every part: nothing created twice.
    let q = provider(&moto).await;
    assert_eq!(q.ensure(&web).await.unwrap(), s_web);
    assert_eq!(q.ensure(&api).await.unwrap(), s_api);
    let mutating = assert_known_and_count_mutating(&q);
    assert!(mutating.is_empty(), "a restart re-created or changed things: {mutating:?}");
    let owned = q.list_owned().await.unwrap();
    let owners: BTreeSet<(String, String)> =
        owned.iter().map(|o| (o.identity.uid.clone(), o.identity.service_key())).collect();
    assert_eq!(
        owners,
        BTreeSet::from([("uid-api".into(), "shop/api".into()), ("uid-web".into(), "shop/web".into())]),
        "one entry per member"
    );
    assert!(owned.iter().all(|o| o.id == shared.lb_arn));
    assert!(owned.iter().all(|o| o.group.as_deref() == Some("shop/edge")), "each entry names its group: {owned:?}");

    // Updating one member touches only its part: web drops 53 and narrows its source range.
    web.listeners.retain(|l| l.port != 53);
    web.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let plan = p.plan(&web).await.unwrap();
    assert!(has(&plan, Action::Delete, "listener", "53"), "{plan}");
    let kinds: Vec<(Action, &str)> = plan.changes.iter().map(|c| (c.action, c.kind.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (Action::Update, "security group"),
            (Action::Update, "security group"),
            (Action::Delete, "listener"),
            (Action::Delete, "target group")
        ],
        "web's rules, its listener and target group on 53, nothing of api's: {plan}"
    );
    p.clear_calls();
    p.ensure(&web).await.unwrap();
    let mutating = assert_known_and_count_mutating(&p);
    assert!(!mutating.iter().any(|m| m.contains("LoadBalancer") || m == "ModifyListener"), "{mutating:?}");
    let after = seen(&p, &group_lb).await.unwrap();
    assert_eq!(after.lb_arn, shared.lb_arn);
    assert_eq!(after.listeners.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([80, 443, 8080]));
    for port in [443, 8080] {
        assert_eq!(after.listeners[&port], shared.listeners[&port], "api's listener on {port} untouched");
        let tg = &shared.listeners[&port].1;
        assert_eq!(after.target_groups[tg], shared.target_groups[tg], "api's target group on {port} untouched");
    }
    assert_eq!(
        rules(&p, &front).await,
        BTreeSet::from([rule("tcp", 80, "10.0.0.0/8"), rule("tcp", 443, everyone), rule("udp", 8080, everyone),]),
        "web's rules changed, api's kept"
    );
    let mut without_53 = node_rules_both.clone();
    without_53.retain(|r| r.1 != 30053);
    assert_eq!(rules(&p, &w.node_sg).await, without_53);
    assert_settled(&p, &web).await;
    assert_settled(&p, &api).await;

    // Deleting one member removes its part only; the address stays for the other.
    let plan = p.plan_delete(&web_id()).await.unwrap();
    assert!(!has(&plan, Action::Delete, "load balancer", "") && has(&plan, Action::Delete, "listener", "80"), "{plan}");
    assert!(!has(&plan, Action::Delete, "security group", ""), "{plan}");
    p.delete(&web_id()).await.unwrap();
    let left = seen(&p, &group_lb).await.expect("the NLB stays while a member is left");
    assert_eq!(left.lb_arn, shared.lb_arn);
    assert_eq!(left.listeners.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([443, 8080]));
    assert!(all_target_groups(&p).await.values().all(|t| t["hawser.dev/service-uid"] == "uid-api"));
    assert_eq!(rules(&p, &front).await, BTreeSet::from([rule("tcp", 443, everyone), rule("udp", 8080, everyone)]));
    assert_eq!(
        rules(&p, &w.node_sg).await,
        BTreeSet::from([rule("tcp", 30443, &front), rule("udp", 30090, &front), rule("tcp", 31001, &front)])
    );
    p.clear_calls();
    assert_eq!(p.ensure(&api).await.unwrap(), s_api, "the other member's address is the same");
    assert!(assert_known_and_count_mutating(&p).is_empty(), "the other member needs nothing");
    let owned = p.list_owned().await.unwrap();
    assert_eq!(owned.iter().map(|o| o.identity.uid.as_str()).collect::<Vec<_>>(), ["uid-api"]);

    // The last member takes the NLB and its frontend group with it.
    let plan = p.plan_delete(&api_id()).await.unwrap();
    assert!(
        has(&plan, Action::Delete, "load balancer", "") && has(&plan, Action::Delete, "security group", ""),
        "{plan}"
    );
    p.delete(&api_id()).await.unwrap();
    assert!(seen(&p, &group_lb).await.is_none(), "the group's NLB is gone with its last member");
    assert!(all_target_groups(&p).await.is_empty());
    assert!(frontends(&p).await.is_empty(), "the group's frontend group is gone");
    assert!(rules(&p, &w.node_sg).await.is_empty(), "node rules revoked");
    assert!(p.list_owned().await.unwrap().is_empty());
    p.delete(&api_id()).await.unwrap();
}

#[tokio::test]
async fn moving_into_and_out_of_a_group_keeps_an_address_throughout() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().take(2).collect();
    let own_name = load_balancer_name(&web_id());
    let group_lb = group_load_balancer_name("prod", "shop/edge");
    let api = member("uid-api", "api", "edge", &[(Protocol::Tcp, 443, 30443)], 10266, &nodes);
    p.ensure(&api).await.unwrap();
    let mut web = member("uid-web", "web", "edge", &[(Protocol::Tcp, 80, 30080)], 10266, &nodes);
    web.group = None;
    let own = p.ensure(&web).await.unwrap();
    assert_eq!(seen(&p, &own_name).await.unwrap().lb_arn, own.id);

    // In: the part on the group's NLB first, then the own NLB goes.
    web.group = Some("edge".into());
    let plan = p.plan(&web).await.unwrap();
    assert!(has(&plan, Action::Create, "listener", "80"), "{plan}");
    let own_goes = plan.changes.iter().any(|c| {
        c.action == Action::Delete
            && c.kind == "load balancer"
            && c.name == own.id
            && c.reason.as_deref().is_some_and(|r| r.contains("moves into load-balancer group shop/edge"))
    });
    assert!(own_goes, "the own NLB's deletion is planned: {plan}");
    p.clear_calls();
    let joined = p.ensure(&web).await.unwrap();
    let ops: Vec<String> = p.calls().iter().map(|c| c.operation.clone()).collect();
    let created = ops.iter().position(|o| o == "CreateListener").expect("a listener on the group's NLB");
    let deleted = ops.iter().position(|o| o == "DeleteLoadBalancer").expect("the own NLB deleted");
    assert!(created < deleted, "the group serves the Service before its own NLB goes: {ops:?}");
    let shared = seen(&p, &group_lb).await.unwrap();
    assert_eq!(joined.id, shared.lb_arn);
    assert!(seen(&p, &own_name).await.is_none());
    assert_eq!(frontends(&p).await.len(), 1, "only the group's frontend group is left");
    assert!(all_target_groups(&p).await.values().all(|t| t.contains_key("hawser.dev/load-balancer-group")));
    assert_settled(&p, &web).await;

    // Out: the own NLB first (a new hostname); the part leaves when the operator says so.
    web.group = None;
    let out = p.ensure(&web).await.unwrap();
    assert_ne!(out.ingress[0].hostname, joined.ingress[0].hostname, "out of the group: its own hostname");
    assert!(seen(&p, &group_lb).await.unwrap().listeners.contains_key(&80), "kept until it leaves");
    // What leaving would change, read only: web's listener and target group, not api's.
    p.clear_calls();
    let leaving = p.plan_leave_group(&web_id(), "shop/edge").await.unwrap();
    assert!(assert_known_and_count_mutating(&p).is_empty(), "a plan changes nothing");
    assert!(has(&leaving, Action::Delete, "listener", "80"), "{leaving}");
    assert!(!has(&leaving, Action::Delete, "listener", "443"), "{leaving}");
    assert!(!has(&leaving, Action::Delete, "load balancer", ""), "api still uses it: {leaving}");
    assert_eq!(leaving.changes.iter().filter(|c| c.kind == "target group").count(), 1, "{leaving}");
    assert!(p.plan_leave_group(&web_id(), "shop/other").await.unwrap().is_empty(), "a group it is not in");
    p.leave_group(&web_id(), "shop/edge").await.unwrap();
    assert!(p.plan_leave_group(&web_id(), "shop/edge").await.unwrap().is_empty(), "nothing left to leave");
    let shared = seen(&p, &group_lb).await.unwrap();
    assert_eq!(shared.listeners.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([443]));
    assert_settled(&p, &web).await;
    assert_settled(&p, &api).await;
    p.leave_group(&web_id(), "shop/edge").await.unwrap();

    // The last member leaving for a load balancer of its own takes the group's NLB with it.
    let mut api_alone = api.clone();
    api_alone.group = None;
    p.ensure(&api_alone).await.unwrap();
    let leaving = p.plan_leave_group(&api_id(), "shop/edge").await.unwrap();
    assert!(
        has(&leaving, Action::Delete, "load balancer", &shared.lb_arn)
            && has(&leaving, Action::Delete, "security group", ""),
        "the last member takes the NLB and its frontend group: {leaving}"
    );
    p.leave_group(&api_id(), "shop/edge").await.unwrap();
    assert!(seen(&p, &group_lb).await.is_none());
    assert_eq!(frontends(&p).await.len(), 2, "the two own frontend groups");
    for id in [web_id(), api_id()] {
        p.delete(&id).await.unwrap();
    }
    assert!(frontends(&p).await.is_empty() && all_target_groups(&p).await.is_empty());
}

#[tokio::test]
async fn a_member_past_the_nlb_listener_quota_is_refused_before_any_write() {
    let Some(moto) = moto() else { return };
    let p = provider(&moto).await;
    let w = seed(&p).await;
    let nodes: Vec<&String> = w.instances.iter().take(1).collect();
    let many: Vec<(Protocol, u16, u16)> = (0..48).map(|i| (Protocol::Tcp, 1000 + i, 30000 + i)).collect();
    p.ensure(&member("uid-web", "web", "edge", &many, 10266, &nodes)).await.unwrap();

    // 48 + 3 > 50: refused with the quota named, and nothing written.
    let three = [(Protocol::Tcp, 2000, 31000), (Protocol::Tcp, 2001, 31001), (Protocol::Udp, 2002, 31002)];
    let api = member("uid-api", "api", "edge", &three, 10266, &nodes);
    p.clear_calls();
    let err = p.ensure(&api).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidInput, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("spec.ports") && message.contains("48 listeners") && message.contains("at most 50"),
        "{message}"
    );
    assert!(assert_known_and_count_mutating(&p).is_empty(), "a refused member writes nothing");
    assert_eq!(p.plan(&api).await.unwrap_err().class(), ErrorClass::InvalidInput, "the plan refuses it too");

    // 48 + 2 = 50 fits.
    let api = member("uid-api", "api", "edge", &three[..2], 10266, &nodes);
    p.ensure(&api).await.unwrap();
    let shared = seen(&p, &group_load_balancer_name("prod", "shop/edge")).await.unwrap();
    assert_eq!(shared.listeners.len(), 50);
}
