//! The GCP provider against a stateful fake Compute REST server (no Compute emulator exists),
//! through the real SDK client pointed at it with the endpoint override.
#![cfg(feature = "gcp")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "gcp/fake_compute.rs"]
mod fake_compute;

#[path = "gcp/groups.rs"]
mod groups;

use std::time::Duration;

use fake_compute::{API, FakeCompute};
use hawser_providers::gcp::{GcpConfig, GcpProvider};
use hawser_providers::{
    ErrorClass, HealthCheck, IpFamily, Listener, LoadBalancerSpec, Protocol, Provider, ProviderError, Scheme,
    ServiceIdentity, Target,
};
use serde_json::{Value, json};

const REGION: &str = "projects/proj/regions/europe-west1";

fn target(name: &str, zone: &str) -> Target {
    Target {
        name: name.into(),
        provider_id: Some(format!("gce://proj/{zone}/{name}")),
        zone: Some(zone.into()),
        addresses: vec![],
    }
}

fn spec(name: &str, uid: &str) -> LoadBalancerSpec {
    let l = |protocol, port| Listener { name: String::new(), protocol, port, node_port: None };
    let identity =
        ServiceIdentity { cluster: "prod".into(), namespace: "shop".into(), name: name.into(), uid: uid.into() };
    let listeners = vec![l(Protocol::TcpUdp, 53), l(Protocol::Tcp, 80), l(Protocol::Tcp, 443)];
    let targets = vec![target("node-a", "europe-west1-b"), target("node-b", "europe-west1-c")];
    let health_check = HealthCheck { interval: Duration::from_secs(8), ..HealthCheck::http(10266, "/healthz") };
    LoadBalancerSpec::new(identity, listeners, targets, health_check)
}

async fn setup() -> (FakeCompute, GcpProvider, GcpConfig) {
    let fake = FakeCompute::default();
    let url = fake.start().await;
    let mut config = GcpConfig::new("prod", "proj", "europe-west1", "vpc");
    config.subnetwork = Some("nodes".into());
    config.node_tags = vec!["gke-prod-node".into()];
    config.endpoint_url = Some(url);
    config.anonymous_credentials = true;
    config.poll_interval = Duration::from_millis(2);
    config.read_rate = 1000.0;
    config.write_rate = 1000.0;
    config.poll_max_interval = Duration::from_millis(5);
    let provider = GcpProvider::new(config.clone()).await.unwrap();
    // `nodes` is dual-stack with external IPv6 (where GKE puts dual-stack nodes), `ilb` has
    // internal IPv6, `v4` is IPv4 only.
    let subnets = format!("{REGION}/subnetworks");
    fake.seed(&subnets, "nodes", json!({"stackType": "IPV4_IPV6", "ipv6AccessType": "EXTERNAL"}));
    fake.seed(&subnets, "ilb", json!({"stackType": "IPV4_IPV6", "ipv6AccessType": "INTERNAL"}));
    fake.seed(&subnets, "v4", json!({"stackType": "IPV4_ONLY"}));
    (fake, provider, config)
}

/// A plan made right after an ensure is empty: plan and ensure agree on what "done" is, in
/// every configuration the tests build.
async fn assert_settled(p: &GcpProvider, s: &LoadBalancerSpec) {
    let plan = p.plan(s).await.unwrap();
    assert!(plan.is_empty(), "a just-ensured spec plans changes:\n{plan}");
}

fn dual_stack(mut s: LoadBalancerSpec) -> LoadBalancerSpec {
    s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
    s
}

fn one(fake: &FakeCompute, collection: &str, suffix: &str) -> Value {
    let items = fake.list(collection);
    let found: Vec<_> = items.iter().filter(|(n, _)| n.ends_with(suffix)).collect();
    assert_eq!(found.len(), 1, "{collection} *{suffix}: {:?}", items.keys().collect::<Vec<_>>());
    found[0].1.clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn create_builds_every_resource_as_specified() {
    let (fake, p, _) = setup().await;
    let status = p.ensure(&spec("web", "uid-1")).await.unwrap();
    let ip = status.ingress[0].ip.unwrap().to_string();

    let address = one(&fake, &format!("{REGION}/addresses"), "");
    assert_eq!(address["address"], json!(ip));
    assert_eq!(address["addressType"], "EXTERNAL");
    assert_eq!(address["networkTier"], "PREMIUM");
    assert_eq!(address["labels"]["hawser-cluster"], "prod");
    let owner: Value = serde_json::from_str(address["description"].as_str().unwrap()).unwrap();
    assert_eq!(owner["service"], "shop/web");
    assert_eq!(owner["uid"], "uid-1");

    let hc = one(&fake, &format!("{REGION}/healthChecks"), "");
    assert_eq!(hc["type"], "HTTP");
    assert_eq!(hc["httpHealthCheck"]["port"], 10266);
    assert_eq!(hc["httpHealthCheck"]["requestPath"], "/healthz");
    assert_eq!((hc["checkIntervalSec"].clone(), hc["timeoutSec"].clone()), (json!(8), json!(5)));
    assert_eq!((hc["healthyThreshold"].clone(), hc["unhealthyThreshold"].clone()), (json!(2), json!(3)));

    for (zone, node) in [("europe-west1-b", "node-a"), ("europe-west1-c", "node-b")] {
        let groups = fake.list(&format!("projects/proj/zones/{zone}/instanceGroups"));
        assert_eq!(groups.len(), 1);
        let name = groups.keys().next().unwrap();
        let members = fake.members(&format!("projects/proj/zones/{zone}/instanceGroups"), name);
        assert_eq!(
            members.into_iter().collect::<Vec<_>>(),
            vec![format!("{API}projects/proj/zones/{zone}/instances/{node}")]
        );
    }

    for (proto, ports) in [("tcp", vec!["53", "80", "443"]), ("udp", vec!["53"])] {
        let bs = one(&fake, &format!("{REGION}/backendServices"), &format!("-{proto}"));
        assert_eq!(bs["loadBalancingScheme"], "EXTERNAL");
        assert_eq!(bs["protocol"], proto.to_uppercase());
        assert_eq!(bs["sessionAffinity"], "NONE");
        assert_eq!(bs["connectionDraining"]["drainingTimeoutSec"], 30);
        assert_eq!(bs["backends"].as_array().unwrap().len(), 2);
        assert_eq!(strings(&bs["healthChecks"]), vec![hc["selfLink"].as_str().unwrap().to_owned()]);
        let fr = one(&fake, &format!("{REGION}/forwardingRules"), &format!("-{proto}"));
        assert_eq!(fr["IPAddress"], json!(ip));
        assert_eq!(fr["IPProtocol"], proto.to_uppercase());
        assert_eq!(strings(&fr["ports"]), ports);
        assert_eq!(fr["networkTier"], "PREMIUM");
        assert_eq!(fr["backendService"], bs["selfLink"]);
    }

    let fws = fake.list("projects/proj/global/firewalls");
    let fw = fws.iter().find(|(n, _)| n.ends_with("-fw")).unwrap().1;
    assert_eq!(strings(&fw["destinationRanges"]), vec![format!("{ip}/32")]);
    assert_eq!(strings(&fw["sourceRanges"]), vec!["0.0.0.0/0"]);
    assert_eq!(strings(&fw["targetTags"]), vec!["gke-prod-node"]);
    let hcfw = fws.iter().find(|(n, _)| n.ends_with("-hc")).unwrap().1;
    assert_eq!(
        strings(&hcfw["sourceRanges"]),
        vec!["130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22", "35.191.0.0/16"]
    );
    assert_eq!(hcfw["allowed"][0]["ports"], json!(["10266"]));
}

#[tokio::test]
async fn steady_state_makes_no_mutating_call_even_after_restart() {
    let (fake, p, config) = setup().await;
    let mut s = spec("web", "uid-1");
    s.targets = s.targets.iter().cloned().chain([target("node-c", "europe-west1-b")]).collect();
    let first = p.ensure(&s).await.unwrap();
    fake.clear_mutations();
    p.clear_calls();
    assert_eq!(p.ensure(&s).await.unwrap(), first);
    assert_eq!(fake.mutations(), Vec::<String>::new());
    assert!(p.calls().iter().all(|c| !c.is_mutating()), "{:?}", p.calls());

    // A restarted operator finds everything by name and ownership and adopts it, reading
    // every page of the lists.
    fake.set_page_size(1);
    let restarted = GcpProvider::new(config).await.unwrap();
    assert_eq!(restarted.ensure(&s).await.unwrap(), first);
    assert_eq!(fake.mutations(), Vec::<String>::new());
    let owned = restarted.list_owned().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].identity, s.identity);
}

#[tokio::test]
async fn updates_ports_nodes_health_check_ranges_and_tier_in_place_where_possible() {
    let (fake, p, _) = setup().await;
    let mut s = spec("web", "uid-1");
    let ip = p.ensure(&s).await.unwrap().ingress[0].ip;

    // Nodes: b leaves, c joins in zone b.
    s.targets = vec![target("node-a", "europe-west1-b"), target("node-c", "europe-west1-b")].into();
    s.health_check.path = Some("/services/shop/web".into());
    s.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    s.listeners.push(Listener { name: String::new(), protocol: Protocol::Tcp, port: 8080, node_port: None });
    fake.clear_mutations();
    assert_eq!(p.ensure(&s).await.unwrap().ingress[0].ip, ip, "the address is kept");
    let groups = fake.list("projects/proj/zones/europe-west1-b/instanceGroups");
    let ig = groups.keys().next().unwrap();
    assert_eq!(fake.members("projects/proj/zones/europe-west1-b/instanceGroups", ig).len(), 2);
    assert!(fake.members("projects/proj/zones/europe-west1-c/instanceGroups", ig).is_empty());
    let hc = one(&fake, &format!("{REGION}/healthChecks"), "");
    assert_eq!(hc["httpHealthCheck"]["requestPath"], "/services/shop/web");
    let fr = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp");
    assert_eq!(strings(&fr["ports"]), vec!["53", "80", "443", "8080"]);
    let fw = fake.list("projects/proj/global/firewalls").into_iter().find(|(n, _)| n.ends_with("-fw")).unwrap().1;
    assert_eq!(strings(&fw["sourceRanges"]), vec!["198.51.100.0/24"]);
    let m = fake.mutations();
    assert!(m.iter().any(|x| x.starts_with("PATCH") && x.contains("/firewalls/")), "{m:?}");
    assert!(m.iter().any(|x| x.starts_with("PUT") && x.contains("/healthChecks/")), "{m:?}");
    assert!(
        !m.iter().any(|x| x.starts_with("DELETE") && x.contains("/forwardingRules/") && x.ends_with("-udp")),
        "UDP rule untouched: {m:?}"
    );
    assert!(!m.iter().any(|x| x.contains("/addresses")), "address untouched: {m:?}");

    // Tier change: GCE cannot change an address's tier, so a Standard one replaces it.
    s.provider_annotations.insert("hawser.dev/gcp-network-tier".into(), "Standard".into());
    let new_ip = p.ensure(&s).await.unwrap().ingress[0].ip;
    let address = one(&fake, &format!("{REGION}/addresses"), "");
    assert_eq!(address["networkTier"], "STANDARD");
    assert_eq!(Some(address["address"].as_str().unwrap().parse().unwrap()), new_ip);
    let fr = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp");
    assert_eq!(fr["networkTier"], "STANDARD");
    fake.clear_mutations();
    p.ensure(&s).await.unwrap();
    assert_eq!(fake.mutations(), Vec::<String>::new());
}

#[tokio::test]
async fn delete_leaves_nothing_and_keeps_shared_resources_while_needed() {
    let (fake, p, _) = setup().await;
    // Every list takes several pages: what is on a later page still counts.
    fake.set_page_size(1);
    let web = spec("web", "uid-1");
    let mut api = spec("api", "uid-2");
    api.health_check.port = 10256;
    p.ensure(&web).await.unwrap();
    p.ensure(&api).await.unwrap();
    let hcfw = fake.list("projects/proj/global/firewalls").into_iter().find(|(n, _)| n.ends_with("-hc")).unwrap();
    assert_eq!(hcfw.1["allowed"][0]["ports"], json!(["10256", "10266"]));

    p.delete(&web.identity).await.unwrap();
    let left = fake.names_with_prefix("hawser-");
    assert!(left.iter().any(|n| n.ends_with("-hc")), "health-check firewall kept for api: {left:?}");
    assert!(left.iter().any(|n| n.ends_with("-ig")), "instance groups kept for api: {left:?}");
    assert_eq!(p.list_owned().await.unwrap().into_iter().map(|o| o.identity.name).collect::<Vec<_>>(), vec!["api"]);
    // api still works untouched.
    fake.clear_mutations();
    p.ensure(&api).await.unwrap();
    assert_eq!(fake.mutations(), Vec::<String>::new());

    p.delete(&api.identity).await.unwrap();
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());
    // Deleting again is a no-op.
    p.delete(&api.identity).await.unwrap();
}

#[tokio::test]
async fn foreign_resource_is_a_conflict_and_never_touched() {
    let (fake, p, _) = setup().await;
    let s = spec("web", "uid-1");
    // Learn the name hawser would use, then put someone else's rule there.
    p.ensure(&s).await.unwrap();
    p.delete(&s.identity).await.unwrap();
    let s2 = spec("web", "uid-1");
    let hand_made = json!({"description": "made by hand", "IPAddress": "192.0.2.1", "IPProtocol": "TCP"});
    let name = {
        p.ensure(&s2).await.unwrap();
        let fr = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp");
        let n = fr["name"].as_str().unwrap().to_owned();
        p.delete(&s2.identity).await.unwrap();
        n
    };
    fake.seed(&format!("{REGION}/forwardingRules"), &name, hand_made.clone());
    let err = p.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict, "{err}");
    assert!(err.to_string().contains(&name));
    p.delete(&s.identity).await.unwrap();
    let still = fake.get(&format!("{REGION}/forwardingRules"), &name).unwrap();
    assert_eq!(still["description"], "made by hand");
}

#[tokio::test]
async fn quota_error_is_reported_naming_the_quota() {
    let (fake, p, _) = setup().await;
    fake.set_quota("forwardingRules", 0);
    let err = p.ensure(&spec("web", "uid-1")).await.unwrap_err();
    let ProviderError::InvalidInput(fields) = &err else { panic!("{err}") };
    assert_eq!(fields[0].field, "GCP quota FORWARDING_RULES");
    assert!(fields[0].message.contains("Quota 'FORWARDING_RULES' exceeded"), "{}", fields[0].message);
}

#[tokio::test]
async fn requested_address_must_be_a_static_address_and_is_never_released() {
    let (fake, p, _) = setup().await;
    let mut s = spec("web", "uid-1");
    s.requested_addresses = vec!["203.0.113.200".parse().unwrap()];
    let err = p.ensure(&s).await.unwrap_err();
    let ProviderError::InvalidInput(fields) = &err else { panic!("{err}") };
    assert_eq!(fields[0].field, "hawser.dev/address");
    assert!(fields[0].message.contains("not a static address"), "{}", fields[0].message);

    fake.seed(
        &format!("{REGION}/addresses"),
        "mine",
        json!({"address": "203.0.113.200", "addressType": "EXTERNAL", "status": "RESERVED"}),
    );
    let status = p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;
    assert_eq!(status.ingress[0].ip.unwrap().to_string(), "203.0.113.200");
    assert_eq!(fake.list(&format!("{REGION}/addresses")).len(), 1, "no address reserved by hawser");
    p.delete(&s.identity).await.unwrap();
    assert!(fake.get(&format!("{REGION}/addresses"), "mine").is_some());
}

#[tokio::test]
async fn internal_load_balancer_in_the_subnetwork_with_global_access() {
    let (fake, p, _) = setup().await;
    let mut s = spec("web", "uid-1");
    s.scheme = Scheme::Internal;
    s.provider_annotations.insert("hawser.dev/gcp-subnet".into(), "lb".into());
    s.provider_annotations.insert("hawser.dev/gcp-global-access".into(), "true".into());
    let ip = p.ensure(&s).await.unwrap().ingress[0].ip.unwrap().to_string();
    assert_settled(&p, &s).await;
    assert!(ip.starts_with("10."), "{ip}");
    let address = one(&fake, &format!("{REGION}/addresses"), "");
    assert_eq!(address["purpose"], "SHARED_LOADBALANCER_VIP");
    let fr = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp");
    assert_eq!(fr["loadBalancingScheme"], "INTERNAL");
    assert_eq!(fr["subnetwork"], format!("{API}{REGION}/subnetworks/lb"));
    assert_eq!(fr["allowGlobalAccess"], true);
    // Turning global access off patches the rule in place.
    s.provider_annotations.insert("hawser.dev/gcp-global-access".into(), "false".into());
    fake.clear_mutations();
    p.ensure(&s).await.unwrap();
    let m = fake.mutations();
    assert!(m.iter().all(|x| x.starts_with("PATCH")), "{m:?}");
    assert_settled(&p, &s).await;
    assert_eq!(one(&fake, &format!("{REGION}/forwardingRules"), "-tcp")["allowGlobalAccess"], false);
}

#[tokio::test]
async fn dual_stack_builds_an_ipv6_frontend_and_removes_it_going_back_to_ipv4() {
    let (fake, p, _) = setup().await;
    let s = dual_stack(spec("web", "uid-1"));
    let status = p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;
    let ips: Vec<_> = status.ingress.iter().map(|i| i.ip.unwrap()).collect();
    assert_eq!(ips.len(), 2, "{status:?}");
    assert!(ips[0].is_ipv4() && ips[1].is_ipv6(), "IPv4 first: {ips:?}");
    assert!(status.ingress.iter().all(|i| i.ports.len() == 4));
    let (v4, v6) = (ips[0].to_string(), ips[1].to_string());

    let address = one(&fake, &format!("{REGION}/addresses"), "-ipv6");
    assert_eq!(address["address"], json!(v6));
    assert_eq!(address["ipVersion"], "IPV6");
    assert_eq!(address["ipv6EndpointType"], "NETLB");
    assert_eq!(address["addressType"], "EXTERNAL");
    assert_eq!(address["subnetwork"], format!("{API}{REGION}/subnetworks/nodes"));

    let rules = fake.list(&format!("{REGION}/forwardingRules"));
    assert_eq!(rules.len(), 4, "{:?}", rules.keys());
    for proto in ["tcp", "udp"] {
        let r4 = one(&fake, &format!("{REGION}/forwardingRules"), &format!("-{proto}"));
        let r6 = one(&fake, &format!("{REGION}/forwardingRules"), &format!("-{proto}-ipv6"));
        assert_eq!(r4["IPAddress"], json!(v4));
        assert_eq!(r6["IPAddress"], json!(format!("{v6}/96")));
        assert_eq!(r6["ipVersion"], "IPV6");
        assert_eq!(r6["networkTier"], "PREMIUM");
        assert_eq!(r6["subnetwork"], format!("{API}{REGION}/subnetworks/nodes"));
        assert_eq!(r6["ports"], r4["ports"]);
        // One backend service per protocol serves both families.
        assert_eq!(r6["backendService"], r4["backendService"]);
    }
    assert_eq!(fake.list(&format!("{REGION}/backendServices")).len(), 2);

    let firewalls = "projects/proj/global/firewalls";
    let fw6 = one(&fake, firewalls, "-fw-ipv6");
    assert_eq!(strings(&fw6["sourceRanges"]), vec!["::/0"]);
    assert_eq!(strings(&fw6["destinationRanges"]), vec![format!("{v6}/128")]);
    let fw4 = one(&fake, firewalls, "-fw");
    assert_eq!(strings(&fw4["destinationRanges"]), vec![format!("{v4}/32")]);
    let hc6 = one(&fake, firewalls, "-hc-ipv6");
    assert_eq!(strings(&hc6["sourceRanges"]), vec!["2600:1901:8001::/48", "2600:2d00:1:b029::/64"]);
    assert_eq!(hc6["allowed"][0]["ports"], json!(["10266"]));

    // Steady state: nothing written.
    fake.clear_mutations();
    assert_eq!(p.ensure(&s).await.unwrap(), status);
    assert_eq!(fake.mutations(), Vec::<String>::new());

    // Back to IPv4 only: the IPv6 frontend goes, the IPv4 one stays as it was.
    let single = spec("web", "uid-1");
    let after = p.ensure(&single).await.unwrap();
    assert_settled(&p, &single).await;
    assert_eq!(after.ingress.len(), 1);
    assert_eq!(after.ingress[0].ip, Some(ips[0]));
    let left = fake.names_with_prefix("hawser-");
    assert!(
        !left.iter().any(|n| n.ends_with("-ipv6") && !n.contains("-hc-")),
        "IPv6 rules, firewall and address removed: {left:?}"
    );
    assert_eq!(fake.list(&format!("{REGION}/forwardingRules")).len(), 2);
    assert_eq!(one(&fake, &format!("{REGION}/forwardingRules"), "-tcp")["IPAddress"], json!(v4));

    p.delete(&single.identity).await.unwrap();
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new(), "the IPv6 health-check firewall too");
}

#[tokio::test]
async fn ipv6_without_a_dual_stack_subnetwork_is_refused_before_anything_is_made() {
    let (fake, p, _) = setup().await;
    let mut s = dual_stack(spec("web", "uid-1"));
    s.provider_annotations.insert("hawser.dev/gcp-subnet".into(), "v4".into());
    let err = p.ensure(&s).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidInput, "{err}");
    let text = err.to_string();
    assert!(text.contains("EXTERNAL IPv6 access") && text.contains("IPV4_ONLY"), "{text}");
    assert!(text.contains("hawser.dev/gcp-subnet"), "{text}");
    // An internal load balancer needs internal IPv6: the external-access subnetwork will not do.
    s.scheme = Scheme::Internal;
    s.provider_annotations.insert("hawser.dev/gcp-subnet".into(), "nodes".into());
    let text = p.ensure(&s).await.unwrap_err().to_string();
    assert!(text.contains("INTERNAL IPv6 access"), "{text}");
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());
    assert_eq!(fake.mutations(), Vec::<String>::new());
}

#[tokio::test]
async fn internal_dual_stack_and_a_requested_ipv6_address() {
    let (fake, p, _) = setup().await;
    let mut s = dual_stack(spec("web", "uid-1"));
    s.scheme = Scheme::Internal;
    s.provider_annotations.insert("hawser.dev/gcp-subnet".into(), "ilb".into());
    let status = p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;
    let v6 = status.ingress[1].ip.unwrap();
    assert!(v6.to_string().starts_with("fd20:"), "{v6}");
    let address = one(&fake, &format!("{REGION}/addresses"), "-ipv6");
    assert_eq!((&address["addressType"], &address["ipVersion"]), (&json!("INTERNAL"), &json!("IPV6")));
    assert_eq!(address.get("ipv6EndpointType"), None);
    let r6 = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp-ipv6");
    assert_eq!(r6["loadBalancingScheme"], "INTERNAL");
    assert_eq!(r6["subnetwork"], format!("{API}{REGION}/subnetworks/ilb"));
    p.delete(&s.identity).await.unwrap();
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());

    // A requested IPv6 address must be one the project reserved for load balancers.
    let mut s = dual_stack(spec("api", "uid-2"));
    s.requested_addresses = vec!["2600:1900:4000:1:99::".parse().unwrap()];
    let text = p.ensure(&s).await.unwrap_err().to_string();
    assert!(text.contains("not a static address reserved") && text.contains("--ip-version IPV6"), "{text}");
    fake.seed(
        &format!("{REGION}/addresses"),
        "mine",
        json!({"address": "2600:1900:4000:1:99::", "addressType": "EXTERNAL", "ipVersion": "IPV6",
               "ipv6EndpointType": "VM"}),
    );
    let text = p.ensure(&s).await.unwrap_err().to_string();
    assert!(text.contains("reserved for a VM"), "{text}");
    let mut seeded = fake.get(&format!("{REGION}/addresses"), "mine").unwrap();
    seeded["ipv6EndpointType"] = json!("NETLB");
    fake.seed(&format!("{REGION}/addresses"), "mine", seeded);
    let status = p.ensure(&s).await.unwrap();
    assert_settled(&p, &s).await;
    assert_eq!(status.ingress[1].ip, Some("2600:1900:4000:1:99::".parse().unwrap()));
    assert_eq!(one(&fake, &format!("{REGION}/forwardingRules"), "-tcp-ipv6")["IPAddress"], "2600:1900:4000:1:99::/96");
    p.delete(&s.identity).await.unwrap();
    assert!(fake.get(&format!("{REGION}/addresses"), "mine").is_some(), "the user's address is never released");
}

#[test]
fn iam_role_grants_every_permission_the_code_needs() {
    for p in hawser_providers::gcp::IAM_PERMISSIONS {
        assert!(hawser_providers::gcp::IAM_ROLE.contains(&format!("- {p}\n")), "{p} missing from iam-role.yaml");
    }
}

/// The drift check's inventory: every load balancer of the cluster from one list per resource
/// kind (all pages), however many there are, and no write.
#[tokio::test]
async fn inventory_of_many_load_balancers_costs_a_fifth_of_a_read_each_or_less() {
    let (fake, p, config) = setup().await;
    let count = 30;
    for i in 0..count {
        let mut s = spec(&format!("svc-{i}"), &format!("uid-{i}"));
        s.listeners.truncate(1);
        p.ensure(&s).await.unwrap();
    }
    fake.clear_mutations();
    let restarted = GcpProvider::new(config).await.unwrap();
    let owned = restarted.list_owned().await.unwrap();
    let mut names: Vec<String> = owned.iter().map(|o| o.identity.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "every load balancer once, with its owner");
    let calls = restarted.calls();
    assert!(calls.iter().all(|c| !c.is_mutating()), "{calls:?}");
    assert_eq!(fake.mutations(), Vec::<String>::new());
    assert!(calls.len() as f64 / count as f64 <= 0.2, "{} reads for {count} load balancers: {calls:?}", calls.len());
}

/// Every change of a plan as `action kind`, for comparing with what ensure then does.
fn plan_lines(plan: &hawser_providers::ChangePlan) -> Vec<String> {
    plan.changes.iter().map(|c| format!("{} {}", c.action.as_str(), c.kind)).collect()
}

#[tokio::test]
async fn plan_foretells_ensure_and_delete_and_writes_nothing() {
    let (fake, p, _) = setup().await;
    let mut s = spec("web", "uid-1");

    let plan = p.plan(&s).await.unwrap();
    assert_eq!(fake.mutations(), Vec::<String>::new(), "planning wrote");
    let lines = plan_lines(&plan);
    for kind in ["address", "health check", "backend service", "forwarding rule", "firewall", "instance group"] {
        assert!(lines.contains(&format!("create {kind}")), "{kind} missing:\n{plan}");
    }
    assert!(plan.to_string().contains("IPAddress: (none) → (the new address)"), "{plan}");

    p.ensure(&s).await.unwrap();
    let plan = p.plan(&s).await.unwrap();
    assert!(plan.is_empty(), "a just-ensured spec plans changes:\n{plan}");

    // In place: nodes, the health-check path, source ranges and a new port.
    s.targets = vec![target("node-a", "europe-west1-b"), target("node-c", "europe-west1-b")].into();
    s.health_check.path = Some("/services/shop/web".into());
    s.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    s.listeners.push(Listener { name: String::new(), protocol: Protocol::Tcp, port: 8080, node_port: None });
    fake.clear_mutations();
    let plan = p.plan(&s).await.unwrap();
    assert_eq!(fake.mutations(), Vec::<String>::new(), "planning wrote");
    let text = plan.to_string();
    assert!(text.contains("requestPath: /healthz → /services/shop/web"), "{text}");
    assert!(text.contains("sourceRanges: 0.0.0.0/0 → 198.51.100.0/24"), "{text}");
    assert!(text.contains("+node-c"), "{text}");
    assert!(text.contains("ports: 53, 80, 443 → 53, 80, 443, 8080"), "{text}");
    let rule = plan.changes.iter().find(|c| c.kind == "forwarding rule").unwrap();
    assert_eq!(rule.action, hawser_providers::Action::Replace, "GCE recreates a rule for new ports: {text}");
    assert!(!plan.changes.iter().any(|c| c.kind == "address"), "the address is kept: {text}");
    let emptied = plan.changes.iter().filter(|c| c.kind == "instance group" && c.name.starts_with("europe-west1-c/"));
    assert_eq!(emptied.count(), 1, "the emptied zone's group once: {text}");
    p.ensure(&s).await.unwrap();
    assert!(p.plan(&s).await.unwrap().is_empty(), "plan after the update is empty");

    // A tier change re-reserves the address: a replacement, and the IP changes.
    s.provider_annotations.insert("hawser.dev/gcp-network-tier".into(), "Standard".into());
    let plan = p.plan(&s).await.unwrap();
    assert!(plan.replaces(), "{plan}");
    let address = plan.changes.iter().find(|c| c.kind == "address").unwrap();
    assert_eq!(address.action, hawser_providers::Action::Replace, "{plan}");
    assert!(plan.to_string().contains("networkTier: PREMIUM → STANDARD"), "{plan}");

    // Deleting: every resource of the Service, and the shared ones with the last Service.
    fake.clear_mutations();
    let plan = p.plan_delete(&s.identity).await.unwrap();
    assert_eq!(fake.mutations(), Vec::<String>::new(), "planning wrote");
    let lines = plan_lines(&plan);
    for kind in ["forwarding rule", "backend service", "health check", "instance group", "firewall", "address"] {
        assert!(lines.contains(&format!("delete {kind}")), "{kind} missing:\n{plan}");
    }
    p.delete(&s.identity).await.unwrap();
    assert!(p.plan_delete(&s.identity).await.unwrap().is_empty());

    // A same-named rule someone else made is a conflict in the plan.
    let name = {
        p.ensure(&s).await.unwrap();
        let fr = one(&fake, &format!("{REGION}/forwardingRules"), "-tcp");
        let n = fr["name"].as_str().unwrap().to_owned();
        p.delete(&s.identity).await.unwrap();
        n
    };
    let hand_made = json!({"description": "made by hand", "IPAddress": "192.0.2.1", "IPProtocol": "TCP"});
    fake.seed(&format!("{REGION}/forwardingRules"), &name, hand_made);
    let plan = p.plan(&s).await.unwrap();
    assert_eq!(plan.conflicts.len(), 1, "{plan}");
    assert_eq!((plan.conflicts[0].kind.as_str(), plan.conflicts[0].name.as_str()), ("forwarding rule", name.as_str()));
}

#[tokio::test]
async fn an_address_reserved_before_a_crash_is_inventoried_and_deleted_with_its_owner() {
    let (fake, p, _) = setup().await;
    let s = spec("web", "uid-1");
    p.ensure(&s).await.unwrap();
    p.delete(&s.identity).await.unwrap();
    // What a crash right after reserving the address leaves: the address alone.
    let mut plain = s.clone();
    plain.listeners.truncate(1);
    p.ensure(&plain).await.unwrap();
    let address = fake.list(&format!("{REGION}/addresses")).into_iter().next().unwrap();
    p.delete(&s.identity).await.unwrap();
    fake.seed(&format!("{REGION}/addresses"), &address.0, address.1.clone());

    let owned = p.list_owned().await.unwrap();
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert!(owned[0].detached && owned[0].identity == s.identity && owned[0].id.ends_with(&address.0));
    p.delete(&s.identity).await.unwrap();
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());
    assert!(p.list_owned().await.unwrap().is_empty());
}
