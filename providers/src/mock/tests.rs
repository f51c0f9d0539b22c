#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::{HealthCheck, Listener, Target};

fn spec(name: &str, uid: &str) -> LoadBalancerSpec {
    let identity =
        ServiceIdentity { cluster: "demo".into(), namespace: "default".into(), name: name.into(), uid: uid.into() };
    let listener = Listener { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: Some(30080) };
    let target =
        Target { name: "node-a".into(), provider_id: None, zone: None, addresses: vec!["10.0.0.2".parse().unwrap()] };
    LoadBalancerSpec::new(identity, vec![listener], vec![target], HealthCheck::http(10266, "/healthz"))
}

fn cloud() -> MockCloud {
    MockCloud::new(MockConfig::new("demo")).unwrap()
}

fn mutating(cloud: &MockCloud) -> Vec<&'static str> {
    cloud.calls().into_iter().filter(RecordedCall::is_mutating).map(|c| c.operation).collect()
}

fn ip(status: &LoadBalancerStatus) -> IpAddr {
    status.ingress[0].ip.unwrap()
}

#[tokio::test]
async fn allocates_distinct_addresses_from_the_pool_and_reports_vip_ingress() {
    let cloud = cloud();
    let a = cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    let b = cloud.ensure(&spec("b", "uid-b")).await.unwrap();
    assert_eq!(ip(&a).to_string(), "203.0.113.1");
    assert_eq!(ip(&b).to_string(), "203.0.113.2");
    assert_eq!(a.ingress[0].ip_mode, Some(IpMode::Vip));
    assert_eq!(a.ingress[0].ports, vec![PortStatus { port: 80, protocol: Protocol::Tcp }]);
    let lb = cloud.load_balancers().into_iter().find(|lb| lb.id == a.id).unwrap();
    assert_eq!(lb.tags["hawser.dev/service"], "default/a");
    assert_eq!(lb.tags["hawser.dev/service-uid"], "uid-a");
    assert_eq!(lb.tags["hawser.dev/cluster"], "demo");
}

#[tokio::test]
async fn ensure_twice_makes_no_second_write() {
    let cloud = cloud();
    let first = cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    let second = cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(mutating(&cloud), vec!["CreateLoadBalancer"]);
    assert_eq!(cloud.load_balancers().len(), 1);
}

#[tokio::test]
async fn changes_are_applied_in_place_keeping_the_address() {
    let cloud = cloud();
    let first = cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    let mut changed = spec("a", "uid-a");
    changed.listeners.push(Listener {
        name: "dns".into(),
        protocol: Protocol::TcpUdp,
        port: 53,
        node_port: Some(30053),
    });
    changed.targets = crate::Targets::default();
    let second = cloud.ensure(&changed).await.unwrap();
    assert_eq!(first.id, second.id);
    assert_eq!(ip(&first), ip(&second));
    assert_eq!(second.ingress[0].ports.len(), 3, "TCP_UDP is reported as TCP and UDP");
    assert_eq!(mutating(&cloud), vec!["CreateLoadBalancer", "ModifyLoadBalancer"]);
    let lb = &cloud.load_balancers()[0];
    assert!(lb.targets.is_empty());
    assert_eq!(lb.revision, 2);
}

#[tokio::test]
async fn requested_address_is_honoured_when_free() {
    let cloud = cloud();
    let mut s = spec("a", "uid-a");
    s.requested_addresses = vec!["203.0.113.77".parse().unwrap()];
    assert_eq!(ip(&cloud.ensure(&s).await.unwrap()).to_string(), "203.0.113.77");
}

#[tokio::test]
async fn requested_address_in_use_is_a_conflict_naming_the_holder() {
    let cloud = cloud();
    let taken = ip(&cloud.ensure(&spec("a", "uid-a")).await.unwrap());
    let mut s = spec("b", "uid-b");
    s.requested_addresses = vec![taken];
    let err = cloud.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), crate::ErrorClass::Conflict);
    assert!(err.to_string().contains("default/a"), "{err}");
    assert_eq!(cloud.load_balancers().len(), 1, "nothing half-created");
}

#[tokio::test]
async fn requested_address_outside_the_pool_is_invalid_input_naming_the_pool() {
    let cloud = cloud();
    let mut s = spec("a", "uid-a");
    s.requested_addresses = vec!["198.51.100.1".parse().unwrap()];
    let err = cloud.ensure(&s).await.unwrap_err();
    let ProviderError::InvalidInput(fields) = &err else { panic!("{err:?}") };
    assert_eq!(fields[0].field, "hawser.dev/address");
    assert!(fields[0].message.contains("203.0.113.0/24"), "{err}");
    assert!(cloud.load_balancers().is_empty());
}

#[tokio::test]
async fn ipv6_without_a_pool_is_invalid_and_dual_stack_with_pools_works() {
    let cloud = cloud();
    let mut s = spec("a", "uid-a");
    s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    assert_eq!(cloud.ensure(&s).await.unwrap_err().class(), crate::ErrorClass::InvalidInput);

    let mut config = MockConfig::new("demo");
    config.address_pools.push("2001:db8::/120".parse().unwrap());
    let cloud = MockCloud::new(config).unwrap();
    let status = cloud.ensure(&s).await.unwrap();
    let ips: Vec<String> = status.ingress.iter().map(|i| i.ip.unwrap().to_string()).collect();
    assert_eq!(ips, vec!["203.0.113.1", "2001:db8::1"]);
}

#[tokio::test]
async fn exhausted_pool_is_reported() {
    let mut config = MockConfig::new("demo");
    config.address_pools = vec!["203.0.113.0/30".parse().unwrap()];
    let cloud = MockCloud::new(config).unwrap();
    cloud.ensure(&spec("a", "1")).await.unwrap();
    cloud.ensure(&spec("b", "2")).await.unwrap();
    let err = cloud.ensure(&spec("c", "3")).await.unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
}

#[tokio::test]
async fn delete_releases_the_address_and_is_idempotent() {
    let cloud = cloud();
    let s = spec("a", "uid-a");
    let first = ip(&cloud.ensure(&s).await.unwrap());
    cloud.delete(&s.identity).await.unwrap();
    cloud.delete(&s.identity).await.unwrap();
    assert!(cloud.load_balancers().is_empty());
    assert_eq!(mutating(&cloud), vec!["CreateLoadBalancer", "DeleteLoadBalancer"]);
    let mut again = spec("b", "uid-b");
    again.requested_addresses = vec![first];
    assert_eq!(ip(&cloud.ensure(&again).await.unwrap()), first, "address back in the pool");
}

#[tokio::test]
async fn a_recreated_service_with_a_new_uid_gets_its_own_load_balancer() {
    let cloud = cloud();
    cloud.ensure(&spec("a", "uid-1")).await.unwrap();
    cloud.ensure(&spec("a", "uid-2")).await.unwrap();
    assert_eq!(cloud.load_balancers().len(), 2);
}

#[tokio::test]
async fn foreign_same_named_load_balancer_is_a_conflict_and_untouched() {
    let cloud = cloud();
    let s = spec("a", "uid-a");
    let name = MockCloud::name_for(&s.identity);
    cloud.insert_foreign(&name, "203.0.113.200".parse().unwrap(), BTreeMap::from([("team".into(), "other".into())]));
    let before = cloud.load_balancers();
    let err = cloud.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), crate::ErrorClass::Conflict);
    assert!(err.to_string().contains("not owned"), "{err}");
    cloud.delete(&s.identity).await.unwrap();
    assert_eq!(cloud.load_balancers(), before, "foreign load balancer neither modified nor deleted");
}

#[tokio::test]
async fn list_owned_returns_only_this_clusters_load_balancers() {
    let cloud = cloud();
    cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    let mut other = spec("b", "uid-b");
    other.identity.cluster = "other".into();
    cloud.ensure(&other).await.unwrap();
    cloud.insert_foreign("x", "203.0.113.99".parse().unwrap(), BTreeMap::new());
    let owned = cloud.list_owned().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].identity, spec("a", "uid-a").identity);
}

#[tokio::test]
async fn state_file_survives_a_restart_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MockConfig::new("demo");
    config.state_file = Some(dir.path().join("cloud.json"));
    let s = spec("a", "uid-a");
    let first = MockCloud::new(config.clone()).unwrap().ensure(&s).await.unwrap();

    let restarted = MockCloud::new(config.clone()).unwrap();
    let again = restarted.ensure(&s).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(restarted.load_balancers().len(), 1);
    assert!(mutating(&restarted).is_empty(), "restart adopts, creates nothing");
    assert_eq!(ip(&restarted.ensure(&spec("b", "uid-b")).await.unwrap()).to_string(), "203.0.113.2");

    restarted.delete(&s.identity).await.unwrap();
    assert_eq!(MockCloud::new(config).unwrap().load_balancers().len(), 1, "deletion persisted too");
}

#[tokio::test]
async fn processes_sharing_a_state_file_share_one_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MockConfig::new("demo");
    config.state_file = Some(dir.path().join("cloud.json"));
    let leader = MockCloud::new(config.clone()).unwrap();
    let standby = MockCloud::new(config).unwrap();
    let s = spec("a", "uid-a");
    let created = leader.ensure(&s).await.unwrap();
    assert_eq!(standby.ensure(&s).await.unwrap(), created, "the standby sees what the leader made");
    assert!(mutating(&standby).is_empty(), "and creates nothing");
    standby.delete(&s.identity).await.unwrap();
    assert!(leader.list_owned().await.unwrap().is_empty());
}

#[tokio::test]
async fn state_is_camel_case_and_snake_case_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    let mut config = MockConfig::new("demo");
    config.state_file = Some(path.clone());
    let cloud = MockCloud::new(config.clone()).unwrap();
    let mut s = spec("a", "uid-a");
    s.targets = crate::Targets::from(vec![Target {
        name: "node-a".into(),
        provider_id: Some("mock:///node-a".into()),
        zone: None,
        addresses: vec!["10.0.0.2".parse().unwrap()],
    }]);
    cloud.ensure(&s).await.unwrap();
    let snapshot = serde_json::to_value(cloud.snapshot()).unwrap();
    let lb = &snapshot["loadBalancers"][0];
    assert_eq!(lb["listeners"][0]["nodePort"], 30080);
    assert_eq!(lb["targets"][0]["providerId"], "mock:///node-a");
    assert_eq!(
        (lb["healthCheck"]["healthyThreshold"].as_u64(), lb["healthCheck"]["unhealthyThreshold"].as_u64()),
        (Some(u64::from(s.health_check.healthy_threshold)), Some(u64::from(s.health_check.unhealthy_threshold)))
    );
    let file = std::fs::read_to_string(&path).unwrap();
    for old in ["node_port", "provider_id", "healthy_threshold", "unhealthy_threshold"] {
        assert!(!file.contains(old), "{old} in {file}");
    }
    // A file written before the keys were camelCase reads the same.
    let snake = file
        .replace("nodePort", "node_port")
        .replace("providerId", "provider_id")
        .replace("unhealthyThreshold", "unhealthy_threshold")
        .replace("healthyThreshold", "healthy_threshold");
    std::fs::write(&path, snake).unwrap();
    let reread = MockCloud::new(config).unwrap();
    assert_eq!(serde_json::to_value(reread.snapshot()).unwrap()["loadBalancers"], snapshot["loadBalancers"]);
}

#[test]
fn corrupt_state_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    std::fs::write(&path, "{not json").unwrap();
    let mut config = MockConfig::new("demo");
    config.state_file = Some(path.clone());
    let err = MockCloud::new(config).unwrap_err();
    assert!(err.contains(&path.display().to_string()) && err.contains("not valid"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_throttled_call_is_retried_after_the_clouds_retry_after() {
    let mut config = MockConfig::new("demo");
    config.rate_limit = Some(1.0);
    let cloud = MockCloud::new(config).unwrap();
    let started = tokio::time::Instant::now();
    // The describe takes the only token: the create is throttled, waits, and goes through.
    cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    let outcomes: Vec<_> = cloud.calls().iter().map(|c| (c.operation, c.outcome)).collect();
    assert_eq!(
        outcomes,
        vec![("DescribeLoadBalancers", "ok"), ("CreateLoadBalancer", "throttled"), ("CreateLoadBalancer", "ok")]
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "waited for a token: {:?}", started.elapsed());
    assert_eq!(cloud.load_balancers().len(), 1);
    let summary = cloud.summary();
    assert_eq!(summary.calls["CreateLoadBalancer"]["throttled"], 1);
    assert_eq!(summary.load_balancers, 1);
}

#[tokio::test]
async fn addresses_stay_distinct_and_freed_ones_are_handed_out_again() {
    let mut config = MockConfig::new("demo");
    config.address_pools = vec!["198.18.0.0/29".parse().unwrap()];
    let cloud = MockCloud::new(config).unwrap();
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(ip(&cloud.ensure(&spec(&format!("s{i}"), &format!("u{i}"))).await.unwrap()));
    }
    let distinct: std::collections::BTreeSet<_> = held.iter().collect();
    assert_eq!(distinct.len(), 6, "a /29 has six hosts, each handed out once: {held:?}");
    let full = cloud.ensure(&spec("s6", "u6")).await.unwrap_err();
    assert!(matches!(full, ProviderError::Conflict(ref m) if m.contains("exhausted")), "{full:?}");
    cloud.delete(&spec("s2", "u2").identity).await.unwrap();
    assert_eq!(ip(&cloud.ensure(&spec("s6", "u6")).await.unwrap()), held[2], "the freed address is reused");
}

#[tokio::test]
async fn latency_is_added_to_every_call() {
    let mut config = MockConfig::new("demo");
    config.latency = Duration::from_millis(30);
    let cloud = MockCloud::new(config).unwrap();
    let started = std::time::Instant::now();
    cloud.ensure(&spec("a", "uid-a")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(60), "two calls, 30 ms each");
}

#[tokio::test]
async fn under_injected_faults_retrying_converges_without_duplicates_or_leaks() {
    let mut config = MockConfig::new("demo");
    config.error_rate = 0.4;
    config.seed = 42;
    let cloud = MockCloud::new(config).unwrap();
    let specs: Vec<_> = (0..20).map(|i| spec(&format!("svc-{i}"), &format!("uid-{i}"))).collect();
    for s in &specs {
        let mut tries = 0;
        while cloud.ensure(s).await.is_err() {
            tries += 1;
            assert!(tries < 50, "ensure never converged");
        }
    }
    let calls = cloud.calls();
    assert!(calls.iter().any(|c| c.outcome == "fault-after"), "faults after a write were exercised");
    assert_eq!(cloud.load_balancers().len(), 20, "no duplicates despite lost responses");
    for s in &specs {
        while cloud.delete(&s.identity).await.is_err() {}
    }
    assert!(cloud.load_balancers().is_empty(), "nothing leaked");
}

#[test]
fn bad_config_is_refused_clearly() {
    let mut config = MockConfig::new("demo");
    config.error_rate = 1.5;
    assert!(MockCloud::new(config).unwrap_err().contains("between 0 and 1"));
    let mut config = MockConfig::new("demo");
    config.rate_limit = Some(0.0);
    assert!(MockCloud::new(config).unwrap_err().contains("positive"));
}

fn member(name: &str, uid: &str, port: u16) -> LoadBalancerSpec {
    let mut s = spec(name, uid);
    s.listeners[0].port = port;
    s.group = Some("edge".into());
    s
}

#[tokio::test]
async fn members_of_a_group_share_one_load_balancer_and_address_each_with_its_own_ports() {
    let cloud = cloud();
    let web = cloud.ensure(&member("web", "uid-web", 80)).await.unwrap();
    let api = cloud.ensure(&member("api", "uid-api", 443)).await.unwrap();
    assert_eq!(cloud.load_balancers().len(), 1, "one load balancer for the group");
    assert_eq!((web.id.clone(), ip(&web)), (api.id.clone(), ip(&api)), "one address");
    assert_eq!(web.ingress[0].ports, vec![PortStatus { port: 80, protocol: Protocol::Tcp }], "only its own ports");
    assert_eq!(api.ingress[0].ports, vec![PortStatus { port: 443, protocol: Protocol::Tcp }]);
    let lb = &cloud.load_balancers()[0];
    assert_eq!(lb.group.as_deref(), Some("default/edge"));
    assert_eq!(lb.tags["hawser.dev/load-balancer-group"], "default/edge");
    assert!(!lb.tags.contains_key("hawser.dev/service-uid"), "shared: no single owner");
    assert_eq!(lb.listeners.iter().map(|l| l.port).collect::<Vec<_>>(), vec![80, 443]);
    assert_eq!(mutating(&cloud), vec!["CreateLoadBalancer", "ModifyLoadBalancer"]);

    // Steady: nothing written; the plan agrees.
    cloud.ensure(&member("web", "uid-web", 80)).await.unwrap();
    assert_eq!(mutating(&cloud).len(), 2);
    assert!(cloud.plan(&member("web", "uid-web", 80)).await.unwrap().is_empty());

    // An update of one member changes only its part.
    let mut web2 = member("web", "uid-web", 8080);
    web2.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let plan = cloud.plan(&web2).await.unwrap();
    assert!(plan.to_string().contains("members[default/web].listeners: 80/TCP (node port 30080) → 8080/TCP"), "{plan}");
    cloud.ensure(&web2).await.unwrap();
    let lb = &cloud.load_balancers()[0];
    assert_eq!(lb.members["uid-api"], group::part_of(&member("api", "uid-api", 443)), "api untouched");
    assert_eq!(lb.members["uid-web"].source_ranges, web2.source_ranges);

    // The inventory has one entry per member, with the fingerprint the drift check expects.
    let owned = cloud.list_owned().await.unwrap();
    assert_eq!(owned.len(), 2);
    for o in &owned {
        let expected = if o.identity.uid == "uid-web" { web2.clone() } else { member("api", "uid-api", 443) };
        assert_eq!(o.fingerprint, cloud.fingerprint(&expected), "{}", o.identity.uid);
        assert_eq!(o.identity.service_key(), expected.identity.service_key());
        assert_eq!(o.group.as_deref(), Some("default/edge"), "the collector takes the group's lock for it");
    }

    // Members leave one by one; the address stays until the last goes.
    cloud.delete(&web2.identity).await.unwrap();
    let left = cloud.load_balancers();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].addresses, vec![ip(&api)]);
    assert_eq!(left[0].listeners.iter().map(|l| l.port).collect::<Vec<_>>(), vec![443]);
    let plan = cloud.plan_delete(&member("api", "uid-api", 443).identity).await.unwrap();
    assert!(plan.to_string().contains("last member of group default/edge"), "{plan}");
    cloud.delete(&member("api", "uid-api", 443).identity).await.unwrap();
    assert!(cloud.load_balancers().is_empty(), "the last member takes the load balancer with it");
}

#[tokio::test]
async fn moving_into_a_group_and_out_never_leaves_the_service_without_an_address() {
    let cloud = cloud();
    let own = cloud.ensure(&spec("web", "uid-web")).await.unwrap();
    cloud.ensure(&member("api", "uid-api", 443)).await.unwrap();

    // Into the group: the plan says the own load balancer goes after; ensure does that.
    let joining = member("web", "uid-web", 80);
    let plan = cloud.plan(&joining).await.unwrap();
    let text = plan.to_string();
    assert!(text.contains(&format!("- delete   load balancer {}", own.id)), "{text}");
    assert!(text.contains("moves into group default/edge"), "{text}");
    let calls_before = cloud.calls().len();
    let joined = cloud.ensure(&joining).await.unwrap();
    let ops: Vec<&str> =
        cloud.calls()[calls_before..].iter().filter(|c| c.is_mutating()).map(|c| c.operation).collect();
    assert_eq!(ops, vec!["ModifyLoadBalancer", "DeleteLoadBalancer"], "joined first, old one deleted after");
    assert_ne!(joined.id, own.id);
    assert_eq!(cloud.load_balancers().len(), 1);

    // Out again: its own load balancer first, then its part goes.
    let leaving = spec("web", "uid-web");
    let plan = cloud.plan(&leaving).await.unwrap();
    assert!(plan.to_string().contains("leaves group default/edge"), "{plan}");
    let calls_before = cloud.calls().len();
    let alone = cloud.ensure(&leaving).await.unwrap();
    let ops: Vec<&str> =
        cloud.calls()[calls_before..].iter().filter(|c| c.is_mutating()).map(|c| c.operation).collect();
    assert_eq!(ops, vec!["CreateLoadBalancer", "ModifyLoadBalancer"]);
    assert_ne!(ip(&alone), ip(&joined), "its own load balancer has its own address");
    let lbs = cloud.load_balancers();
    assert_eq!(lbs.len(), 2);
    let group_lb = lbs.iter().find(|lb| lb.group.is_some()).unwrap();
    assert_eq!(group_lb.members.keys().collect::<Vec<_>>(), vec!["uid-api"]);
    assert!(cloud.plan(&leaving).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_group_survives_a_restart_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = MockConfig { state_file: Some(dir.path().join("cloud.json")), ..MockConfig::new("demo") };
    let first = MockCloud::new(config.clone()).unwrap();
    let web = first.ensure(&member("web", "uid-web", 80)).await.unwrap();
    first.ensure(&member("api", "uid-api", 443)).await.unwrap();
    let again = MockCloud::new(config).unwrap();
    assert_eq!(again.ensure(&member("web", "uid-web", 80)).await.unwrap(), web, "adopted, nothing duplicated");
    assert!(mutating(&again).is_empty());
    assert_eq!(again.load_balancers().len(), 1);
}
