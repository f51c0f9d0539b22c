//! Load-balancer groups on GCP: one reserved address shared by the members of a group, each
//! member with its own forwarding rules, backend services, health check and firewall on it.

use super::*;
use hawser_providers::{Action, ChangePlan, LoadBalancerStatus};

const ADDRESSES: &str = "projects/proj/regions/europe-west1/addresses";
const RULES: &str = "projects/proj/regions/europe-west1/forwardingRules";

fn member(name: &str, uid: &str, ports: &[(Protocol, u16)]) -> LoadBalancerSpec {
    let mut s = spec(name, uid);
    s.listeners = ports
        .iter()
        .map(|&(protocol, port)| Listener { name: String::new(), protocol, port, node_port: None })
        .collect();
    s.group = Some("edge".into());
    s
}

fn ports(s: &LoadBalancerStatus) -> Vec<(u16, Protocol)> {
    let mut p: Vec<_> = s.ingress[0].ports.iter().map(|p| (p.port, p.protocol)).collect();
    p.sort();
    p
}

fn has(plan: &ChangePlan, action: Action, kind: &str, name: &str) -> bool {
    plan.changes.iter().any(|c| c.action == action && c.kind == kind && c.name.contains(name))
}

/// The forwarding rules on `ip`, by name, with their owner's UID.
fn rules_on(fake: &FakeCompute, ip: &str) -> Vec<(String, String)> {
    fake.list(RULES)
        .into_iter()
        .filter(|(_, r)| r["IPAddress"].as_str().is_some_and(|a| a.starts_with(ip)))
        .map(|(n, r)| {
            let owner: Value = serde_json::from_str(r["description"].as_str().unwrap()).unwrap();
            (n, owner["uid"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn members_share_one_address_and_each_changes_only_its_part() {
    let (fake, p, config) = setup().await;
    let mut web = member("web", "uid-web", &[(Protocol::Tcp, 80), (Protocol::TcpUdp, 53)]);
    let mut api = member("api", "uid-api", &[(Protocol::Tcp, 443), (Protocol::Udp, 8080)]);
    api.health_check.port = 10256;

    let s_web = p.ensure(&web).await.unwrap();
    let s_api = p.ensure(&api).await.unwrap();
    let ip = s_web.ingress[0].ip.unwrap();
    assert_eq!(s_api.ingress[0].ip, Some(ip), "one address for the group");
    assert_eq!(s_web.id, s_api.id);
    assert_eq!(ports(&s_web), [(53, Protocol::Tcp), (53, Protocol::Udp), (80, Protocol::Tcp)]);
    assert_eq!(ports(&s_api), [(443, Protocol::Tcp), (8080, Protocol::Udp)], "only its own ports");
    let addresses = fake.list(ADDRESSES);
    assert_eq!(addresses.len(), 1, "{:?}", addresses.keys());
    let (name, address) = addresses.into_iter().next().unwrap();
    assert!(name.starts_with("hawser-g-") && s_web.id.ends_with(&name), "{name} / {}", s_web.id);
    let owner: Value = serde_json::from_str(address["description"].as_str().unwrap()).unwrap();
    assert_eq!((owner["group"].as_str(), owner.get("uid")), (Some("shop/edge"), None), "the group's: {owner}");
    assert_eq!(address["labels"]["hawser-group"], "shop-edge");
    let on_ip = rules_on(&fake, &ip.to_string());
    let owners: Vec<&str> = on_ip.iter().map(|(_, o)| o.as_str()).collect();
    assert_eq!(owners, ["uid-api", "uid-api", "uid-web", "uid-web"], "a TCP and a UDP rule per member: {on_ip:?}");
    assert_eq!(fake.list(&format!("{REGION}/healthChecks")).len(), 2, "a health check per member");
    assert_eq!(fake.list(&format!("{REGION}/backendServices")).len(), 4, "a backend service per member and protocol");
    let firewalls = fake.names_with_prefix("hawser-").into_iter().filter(|n| n.contains("-g-fw")).count();
    assert_eq!(firewalls, 2, "a firewall per member");

    // Steady, and after a restart: nothing written; plans are empty; one inventory entry each.
    fake.clear_mutations();
    let restarted = GcpProvider::new(config).await.unwrap();
    assert_eq!(restarted.ensure(&web).await.unwrap(), s_web);
    assert_eq!(restarted.ensure(&api).await.unwrap(), s_api);
    assert_eq!(fake.mutations(), Vec::<String>::new());
    assert_settled(&restarted, &web).await;
    assert_settled(&restarted, &api).await;
    let owned = restarted.list_owned().await.unwrap();
    let mut uids: Vec<&str> = owned.iter().map(|o| o.identity.uid.as_str()).collect();
    uids.sort_unstable();
    assert_eq!(uids, ["uid-api", "uid-web"]);
    assert!(owned.iter().all(|o| o.id == s_web.id), "each member's entry is its part of the group's");
    assert!(owned.iter().all(|o| o.group.as_deref() == Some("shop/edge")), "each entry names its group: {owned:?}");

    // web drops 53: only web's UDP rule and backend service go.
    web.listeners.retain(|l| l.port != 53);
    let plan = p.plan(&web).await.unwrap();
    assert!(
        has(&plan, Action::Delete, "forwarding rule", "-g-udp") && !has(&plan, Action::Delete, "address", ""),
        "{plan}"
    );
    fake.clear_mutations();
    p.ensure(&web).await.unwrap();
    let touched = fake.mutations();
    let api_rules: Vec<String> =
        rules_on(&fake, &ip.to_string()).into_iter().filter(|(_, o)| o == "uid-api").map(|(n, _)| n).collect();
    assert_eq!(api_rules.len(), 2, "api's rules kept");
    let api_prefix = api_rules[0].split("-g-").next().unwrap().to_owned();
    assert!(!touched.iter().any(|m| m.contains(&api_prefix)), "nothing of api's touched: {touched:?}");
    assert!(touched.iter().any(|m| m.starts_with("DELETE") && m.contains("-g-udp")), "{touched:?}");

    // web deleted: its part goes, the address stays for api, which needs nothing.
    let plan = p.plan_delete(&web.identity).await.unwrap();
    assert!(!has(&plan, Action::Delete, "address", ""), "{plan}");
    p.delete(&web.identity).await.unwrap();
    assert_eq!(fake.list(ADDRESSES).len(), 1, "the address stays while a member is left");
    assert!(rules_on(&fake, &ip.to_string()).iter().all(|(_, o)| o == "uid-api"));
    fake.clear_mutations();
    assert_eq!(p.ensure(&api).await.unwrap(), s_api, "api keeps its address");
    assert_eq!(fake.mutations(), Vec::<String>::new());

    // The last member takes the address with it, and everything else.
    let plan = p.plan_delete(&api.identity).await.unwrap();
    assert!(has(&plan, Action::Delete, "address", "hawser-g-"), "{plan}");
    p.delete(&api.identity).await.unwrap();
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());
    assert!(p.list_owned().await.unwrap().is_empty());
}

#[tokio::test]
async fn moving_into_and_out_of_a_group_keeps_an_address_throughout() {
    let (fake, p, _) = setup().await;
    let api = member("api", "uid-api", &[(Protocol::Tcp, 443)]);
    let group_ip = p.ensure(&api).await.unwrap().ingress[0].ip.unwrap();
    let mut web = member("web", "uid-web", &[(Protocol::Tcp, 80)]);
    web.group = None;
    let own_ip = p.ensure(&web).await.unwrap().ingress[0].ip.unwrap();
    assert_ne!(own_ip, group_ip);

    // In: web's rule on the group's address first, then its own address and rule go.
    web.group = Some("edge".into());
    let plan = p.plan(&web).await.unwrap();
    assert!(has(&plan, Action::Create, "forwarding rule", "-g-tcp"), "{plan}");
    let own_goes = plan.changes.iter().any(|c| {
        c.action == Action::Delete
            && c.kind == "address"
            && c.reason.as_deref().is_some_and(|r| r.contains("moves into"))
    });
    assert!(own_goes, "{plan}");
    fake.clear_mutations();
    let joined = p.ensure(&web).await.unwrap();
    assert_eq!(joined.ingress[0].ip, Some(group_ip));
    let m = fake.mutations();
    let created = m.iter().position(|x| x.starts_with("POST") && x.ends_with("forwardingRules")).expect("a rule made");
    let released =
        m.iter().position(|x| x.starts_with("DELETE") && x.contains("/addresses/")).expect("own address released");
    assert!(created < released, "the group's address serves before the own one goes: {m:?}");
    assert_eq!(fake.list(ADDRESSES).len(), 1, "only the group's address is left");
    assert!(rules_on(&fake, &own_ip.to_string()).is_empty());
    assert_settled(&p, &web).await;

    // Out: an address of its own first (a new IP), then its rule leaves the group's, in the
    // same ensure: the cloud remembers the group even where the operator cannot (a join cut
    // short before the Service's status named the group).
    web.group = None;
    let plan = p.plan(&web).await.unwrap();
    assert!(has(&plan, Action::Delete, "forwarding rule", "-g-tcp"), "{plan}");
    fake.clear_mutations();
    let out = p.ensure(&web).await.unwrap().ingress[0].ip.unwrap();
    assert_ne!(out, group_ip);
    let m = fake.mutations();
    let created = m.iter().position(|x| x.starts_with("POST") && x.ends_with("forwardingRules")).expect("a rule made");
    let left = m.iter().position(|x| x.starts_with("DELETE") && x.contains("-g-tcp")).expect("the group's rule gone");
    assert!(created < left, "its own address serves before it leaves the group's: {m:?}");
    assert_eq!(rules_on(&fake, &group_ip.to_string()).len(), 1, "only api's");
    fake.clear_mutations();
    p.leave_group(&web.identity, "shop/edge").await.unwrap();
    let m = fake.mutations();
    assert!(m.iter().all(|x| x.contains("/addresses/hawser-g-")), "the operator's leave finds no part left: {m:?}");
    assert_eq!(rules_on(&fake, &group_ip.to_string()).len(), 1, "api's rule keeps the group's address");
    assert_settled(&p, &web).await;
    assert_settled(&p, &api).await;

    // The last member leaving releases the group's address, and the plan says so.
    let mut alone = api.clone();
    alone.group = None;
    let plan = p.plan(&alone).await.unwrap();
    assert!(has(&plan, Action::Delete, "address", "hawser-g-"), "{plan}");
    p.ensure(&alone).await.unwrap();
    let left: Vec<String> = fake.list(ADDRESSES).into_keys().collect();
    assert!(left.iter().all(|n| !n.starts_with("hawser-g-")), "{left:?}");
    assert_settled(&p, &alone).await;
    for id in [&web.identity, &api.identity] {
        p.delete(id).await.unwrap();
    }
    assert_eq!(fake.names_with_prefix("hawser-"), Vec::<String>::new());
}

#[tokio::test]
async fn a_member_must_list_its_ports_and_the_group_shares_an_internal_address() {
    let (fake, p, _) = setup().await;
    let six: Vec<(Protocol, u16)> = (0..6).map(|i| (Protocol::Tcp, 8000 + i)).collect();
    let many = member("web", "uid-web", &six);
    let fields = p.validate(&many).unwrap_err();
    assert!(fields[0].field == "spec.ports" && fields[0].message.contains("at most 5 TCP ports"), "{fields:?}");
    assert!(p.validate(&LoadBalancerSpec { group: None, ..many }).is_ok(), "a Service of its own takes a port range");
    let caps = p.capabilities().groups.unwrap();
    assert_eq!((caps.max_listeners, caps.max_rules), (50, Some(10)));

    // Internal members share an address reserved for sharing.
    let mut a = member("a", "uid-a", &[(Protocol::Tcp, 80)]);
    let mut b = member("b", "uid-b", &[(Protocol::Tcp, 81)]);
    for s in [&mut a, &mut b] {
        s.scheme = Scheme::Internal;
    }
    let ip = p.ensure(&a).await.unwrap().ingress[0].ip;
    assert_eq!(p.ensure(&b).await.unwrap().ingress[0].ip, ip);
    let (_, address) = fake.list(ADDRESSES).into_iter().next().unwrap();
    assert_eq!(address["purpose"], "SHARED_LOADBALANCER_VIP");

    // A port another member's rule holds is refused by GCE itself, naming the conflict.
    let c = member("c", "uid-c", &[(Protocol::Tcp, 80)]);
    let err = p.ensure(&LoadBalancerSpec { scheme: Scheme::Internal, ..c }).await.unwrap_err();
    assert!(err.to_string().contains("in-use"), "{err}");
}
