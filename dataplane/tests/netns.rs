//! Real traffic through the kernel's nftables, in network namespaces made by each test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::fixtures::{Ep, Svc, slice};
use common::lab::{
    CLIENT_IP, CLIENT_IP6, Lab, NODE, NODE_IP, NODE_IP6, Outcome, TCP_PORT, exec_in, node_nft, sh, tcp, udp,
};
use hawser_dataplane::affinity::{AffinityEntry, parse_listing};
use hawser_dataplane::nft::{NftCommand, NftError, NftRunner};
use k8s_openapi::api::discovery::v1::EndpointSlice;

const LB: &str = "203.0.113.10";
const NP: u16 = 30080;
const PORTS: &[(&str, &str, u16)] = &[("http", "TCP", 8080), ("dns", "UDP", 5353)];

fn web() -> Svc<'static> {
    let mut s = Svc::new("ns", "web");
    s.ports = vec![("http", "TCP", 80, Some(NP)), ("dns", "UDP", 53, Some(30053))];
    s
}

fn eps(list: &[Ep<'_>]) -> Vec<EndpointSlice> {
    vec![slice("ns", "web", "web-1", PORTS, list)]
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

macro_rules! lab {
    ($pods:expr) => {
        match Lab::new($pods) {
            Some(lab) => lab,
            None => return,
        }
    };
}

#[test]
fn ready_endpoints_only_spread_over_address_and_nodeport_with_masquerade() {
    let mut lab = lab!(3);
    let not_ready = Ep { ready: Some(false), serving: Some(false), ..Ep::ready("10.0.3.2", NODE) };
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", "node-b"), not_ready]))
        .unwrap();
    assert_eq!(lab.servers(LB, 80, 24), set(&["pod1", "pod2"]), "LB address");
    assert_eq!(lab.servers(NODE_IP, NP, 24), set(&["pod1", "pod2"]), "NodePort");
    // Cluster policy: the pod sees the node's address on its link, not the client.
    for _ in 0..6 {
        let out = tcp(&lab.client, LB, 80);
        assert_eq!(out.peer().to_string(), masqueraded(&out));
    }
    // Traffic through the node for no Service keeps its source: `services` takes back the
    // masquerade mark it set before its Cluster-policy lookups.
    let direct = tcp(&lab.client, "10.0.1.2", TCP_PORT);
    assert_eq!((direct.server(), direct.peer().to_string()), ("pod1".to_string(), CLIENT_IP.to_string()));
    // UDP too.
    let u = udp(&lab.client, LB, 53, 0);
    assert!(["pod1", "pod2"].contains(&u.server().as_str()), "{u:?}");
    // Host-originated traffic takes the output path.
    let node = lab.node.clone();
    let from_host: BTreeSet<String> = (0..12).map(|_| tcp(&node, LB, 80).server()).collect();
    assert!(from_host.is_subset(&set(&["pod1", "pod2"])) && !from_host.is_empty());
    // The NodePort is not served on loopback.
    assert_ne!(tcp(&node, "127.0.0.1", NP).server_or_none(), Some("pod1".to_string()));
}

/// The address a pod sees for a masqueraded client: the node's, on that pod's link.
fn masqueraded(out: &Outcome) -> &'static str {
    if out.server() == "pod1" { "10.0.1.1" } else { "10.0.2.1" }
}

trait ServerOrNone {
    fn server_or_none(&self) -> Option<String>;
}
impl ServerOrNone for Outcome {
    fn server_or_none(&self) -> Option<String> {
        match self {
            Outcome::Reply { server, .. } => Some(server.clone()),
            _ => None,
        }
    }
}

#[test]
fn local_policy_preserves_client_ip_uses_local_endpoints_and_drops_without_one() {
    let mut lab = lab!(2);
    let mut svc = web();
    svc.local = true;
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", "node-b")])).unwrap();
    for (dst, port) in [(LB, 80), (NODE_IP, NP)] {
        for _ in 0..8 {
            let out = tcp(&lab.client, dst, port);
            assert_eq!(out.server(), "pod1", "only the local endpoint");
            assert_eq!(out.peer().to_string(), CLIENT_IP, "client address preserved");
        }
    }
    // No local endpoint left (pod1 moved to another node): dropped, not refused.
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", "node-c"), Ep::ready("10.0.2.2", "node-b")])).unwrap();
    assert_eq!(tcp(&lab.client, LB, 80), Outcome::Timeout);
    assert_eq!(tcp(&lab.client, NODE_IP, NP), Outcome::Timeout);
}

/// A Service switching traffic policy moves its frontends between the dispatch maps that
/// `services` looks up with and without the masquerade mark; its chain stays as it is.
#[test]
fn a_traffic_policy_switch_moves_only_dispatch_elements_and_masquerades_accordingly() {
    use hawser_dataplane::nft::Writer;
    let mut lab = lab!(2);
    let mut svc = web();
    let both = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)]);
    lab.sync(&[svc.build()], &both).unwrap();
    for local in [true, false] {
        svc.local = local;
        let report = lab.sync(&[svc.build()], &both).unwrap();
        assert!(!report.full && report.applied, "{report:?}");
        assert_eq!(report.writer, Writer::Netlink, "{report:?}");
        assert_eq!(report.chains_written, 0, "the svc chain is the same: {report:?}");
        // Both ports' address and NodePort out of one pair of maps and into the other (8),
        // and the hairpin pairs of both endpoints, which only Local policy has (2).
        assert_eq!(report.elements_changed, 10, "{report:?}");
        for (dst, port) in [(LB, 80), (NODE_IP, NP)] {
            for _ in 0..4 {
                let out = tcp(&lab.client, dst, port);
                let want = if local { CLIENT_IP } else { masqueraded(&out) };
                assert_eq!(out.peer().to_string(), want, "local={local} {dst}:{port}");
            }
        }
    }
}

#[test]
fn no_endpoints_is_connection_refused() {
    let mut lab = lab!(1);
    lab.sync(&[web().build()], &eps(&[])).unwrap();
    assert_eq!(tcp(&lab.client, LB, 80), Outcome::Refused);
    assert_eq!(tcp(&lab.client, NODE_IP, NP), Outcome::Refused);
    // Endpoints appear: served.
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    assert_eq!(tcp(&lab.client, LB, 80).server(), "pod1");
}

#[test]
fn source_ranges_allow_and_deny_on_address_and_nodeport() {
    let mut lab = lab!(1);
    let mut svc = web();
    svc.source_ranges = vec!["192.168.100.0/24"];
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    assert_eq!(tcp(&lab.client, LB, 80).server(), "pod1");
    assert_eq!(tcp(&lab.client, NODE_IP, NP).server(), "pod1");
    // Second client (192.168.101.2) is outside the range: dropped on both paths, though its
    // NodePort packets reach a node address kube-proxy would have forwarded.
    assert_eq!(tcp(&lab.client2, LB, 80), Outcome::Timeout);
    assert_eq!(tcp(&lab.client2, "192.168.101.1", NP), Outcome::Timeout);
    // Widening the range lets it in.
    svc.source_ranges = vec!["192.168.100.0/24", &"192.168.101.0/24"];
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    let out = tcp(&lab.client2, LB, 80);
    assert_eq!(out.server(), "pod1");
    assert_eq!(out.peer().to_string(), "10.0.1.1");
}

/// The affinity entries of the node's IPv4 map `map`, in every NAT table, as nft lists them.
fn affinity_entries(lab: &Lab, map: &str) -> Vec<AffinityEntry> {
    let nat = hawser_dataplane::render::TableId::of_family(hawser_dataplane::model::Family::V4).skip(1);
    nat.flat_map(|t| parse_listing(&sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "map", "ip", t.name(), map])))
        .collect()
}

/// The name of the NAT tables (of both families) that hold the Service `ns/name`.
fn nat_of(name: &str) -> &'static str {
    hawser_dataplane::render::TableId::nat(hawser_dataplane::model::Family::V4, "ns", name).name()
}

/// A lab with two pods serving `web` with ClientIP affinity of `timeout` seconds, synced.
fn sticky_web(timeout: i32) -> Option<(Lab, Svc<'static>)> {
    let mut lab = Lab::new(2)?;
    let mut svc = web();
    svc.affinity_timeout = Some(timeout);
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)])).unwrap();
    Some((lab, svc))
}

#[test]
fn client_ip_affinity_sticks_to_one_endpoint() {
    let Some((lab, _)) = sticky_web(60) else { return };
    let first = tcp(&lab.client, LB, 80).server();
    for _ in 0..16 {
        assert_eq!(tcp(&lab.client, LB, 80).server(), first);
    }
    // The client is recorded for the frontend it used, with the endpoint it was sent to.
    let entries = affinity_entries(&lab, "affinity-cluster");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(
        (e.client.to_string(), e.frontend.to_string(), e.protocol, e.port),
        (CLIENT_IP.into(), LB.into(), "tcp", 80)
    );
    // Pod N serves at 10.0.N.2.
    let pod = e.endpoint.to_string().split('.').nth(2).map(|n| format!("pod{n}"));
    assert_eq!(pod.as_deref(), Some(first.as_str()), "{e:?}");
    // The NodePort is a frontend of its own: its clients stick too.
    let via_node_port = tcp(&lab.client, NODE_IP, NP).server();
    for _ in 0..8 {
        assert_eq!(tcp(&lab.client, NODE_IP, NP).server(), via_node_port);
    }
    // NodePort clients are recorded in maps of their own.
    assert_eq!(affinity_entries(&lab, "affinity-cluster").len(), 1);
    let np = affinity_entries(&lab, "affinity-cluster-nodeports");
    assert_eq!(np.len(), 1, "{np:?}");
    assert_eq!((np[0].frontend.to_string(), np[0].port), (NODE_IP.to_string(), NP));
    assert!(affinity_entries(&lab, "affinity-local").is_empty());
}

/// A NodePort client's entry is used only for this node's own addresses: an entry recorded
/// for another address (a connection another proxy DNATed, to a port equal to one of our
/// NodePorts, is recorded too) sends nothing anywhere.
#[test]
fn client_ip_affinity_node_port_entries_act_only_on_this_nodes_addresses() {
    let Some((lab, _)) = sticky_web(600) else { return };
    // Entries naming an address that serves nothing: for the load-balancer address in the
    // NodePort map, and for this node's address in it.
    let script = format!(
        "add element ip {} affinity-cluster-nodeports {{ {CLIENT_IP} . {LB} . tcp . 80 : 10.0.9.9 . 8080, \
         {CLIENT_IP} . {NODE_IP} . tcp . {NP} : 10.0.9.9 . 8080 }}\n",
        nat_of("web")
    );
    node_nft(&lab.node, false).run(&script).unwrap();
    // The load-balancer address ignores the NodePort map: served, and then sticky as usual.
    let first = tcp(&lab.client, LB, 80).server();
    for _ in 0..4 {
        assert_eq!(tcp(&lab.client, LB, 80).server(), first);
    }
    // The node's own address follows its entry (to nowhere, here).
    assert_eq!(tcp(&lab.client, NODE_IP, NP), Outcome::Timeout);
}

#[test]
fn client_ip_affinity_survives_other_endpoints_leaving_and_ends_with_its_own() {
    let mut lab = lab!(3);
    let mut svc = web();
    svc.affinity_timeout = Some(60);
    let ips = ["10.0.1.2", "10.0.2.2", "10.0.3.2"];
    let endpoints = |not_ready: &[usize]| {
        let list: Vec<Ep<'static>> = (0..3)
            .map(|i| if not_ready.contains(&i) { Ep::terminating(ips[i], NODE) } else { Ep::ready(ips[i], NODE) })
            .collect();
        eps(&list)
    };
    lab.sync(&[svc.build()], &endpoints(&[])).unwrap();
    let first = tcp(&lab.client, LB, 80).server();
    let index = |pod: &str| pod.trim_start_matches("pod").parse::<usize>().unwrap() - 1;
    // Another endpoint stops being ready (a partial sync): the client keeps its endpoint.
    let other = (index(&first) + 1) % 3;
    let report = lab.sync(&[svc.build()], &endpoints(&[other])).unwrap();
    assert!(!report.full);
    assert_eq!(report.affinity_purged, 0, "only entries of the endpoint that left go");
    for _ in 0..8 {
        assert_eq!(tcp(&lab.client, LB, 80).server(), first);
    }
    // Its own endpoint stops being ready (its pod still runs): the sync deletes the client's
    // entry, and the client moves to one ready endpoint and stays.
    let report = lab.sync(&[svc.build()], &endpoints(&[index(&first)])).unwrap();
    assert_eq!(report.affinity_purged, 1);
    let second = tcp(&lab.client, LB, 80).server();
    assert_ne!(second, first);
    for _ in 0..8 {
        assert_eq!(tcp(&lab.client, LB, 80).server(), second);
    }
    let entries = affinity_entries(&lab, "affinity-cluster");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].endpoint.to_string(), ips[index(&second)]);
}

#[test]
fn client_ip_affinity_follows_the_traffic_policy_and_ends_with_affinity() {
    affinity_follows_the_traffic_policy(lab!(2));
}

/// A purge over a listing that comes in many parts deletes exactly the entries of the endpoint
/// that left, and keeps the others.
#[test]
fn client_ip_affinity_purge_is_exact_over_many_entries() {
    let Some((mut lab, svc)) = sticky_web(600) else { return };
    // 1000 recorded clients, as the kernel records them: 300 on the first endpoint.
    let entries: Vec<String> = (0..1000)
        .map(|i| {
            let endpoint = if i < 300 { "10.0.1.2" } else { "10.0.2.2" };
            format!("100.64.{}.{} . {LB} . tcp . 80 : {endpoint} . 8080", i / 250, i % 250 + 1)
        })
        .collect();
    let script = format!("add element ip {} affinity-cluster {{ {} }}\n", nat_of("web"), entries.join(", "));
    node_nft(&lab.node, false).run(&script).unwrap();
    assert_eq!(affinity_entries(&lab, "affinity-cluster").len(), 1000);
    let report = lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.2.2", NODE)])).unwrap();
    assert_eq!(report.affinity_purged, 300);
    let left = affinity_entries(&lab, "affinity-cluster");
    assert_eq!(left.len(), 700);
    assert!(left.iter().all(|e| e.endpoint.to_string() == "10.0.2.2"), "{:?}", left.first());
}

/// The same with every write, and the purge's listing, through nft.
#[test]
fn client_ip_affinity_entries_are_purged_through_nft_too() {
    let Some(lab) = Lab::with_runner(2, |node| Box::new(node_nft(node, false))) else { return };
    affinity_follows_the_traffic_policy(lab);
}

fn affinity_follows_the_traffic_policy(mut lab: Lab) {
    let mut svc = web();
    svc.affinity_timeout = Some(60);
    let both = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)]);
    lab.sync(&[svc.build()], &both).unwrap();
    let first = tcp(&lab.client, LB, 80);
    assert_ne!(first.peer().to_string(), CLIENT_IP, "Cluster policy masquerades");
    tcp(&lab.client, NODE_IP, NP).server();
    assert_eq!(affinity_entries(&lab, "affinity-cluster-nodeports").len(), 1);
    // Local policy: the Cluster-policy entries go (they would masquerade), of the address and
    // of the NodePort; a new one is recorded in the Local map and the endpoint sees the
    // client's address.
    svc.local = true;
    let report = lab.sync(&[svc.build()], &both).unwrap();
    assert!(!report.full);
    assert_eq!(report.affinity_purged, 2);
    assert!(affinity_entries(&lab, "affinity-cluster").is_empty());
    assert!(affinity_entries(&lab, "affinity-cluster-nodeports").is_empty());
    let local = tcp(&lab.client, LB, 80);
    assert_eq!(local.peer().to_string(), CLIENT_IP);
    for _ in 0..8 {
        let again = tcp(&lab.client, LB, 80);
        assert_eq!((again.server(), again.peer().to_string()), (local.server(), CLIENT_IP.to_string()));
    }
    assert_eq!(affinity_entries(&lab, "affinity-local").len(), 1);
    // Affinity off: the entry goes and connections spread again.
    svc.affinity_timeout = None;
    let report = lab.sync(&[svc.build()], &both).unwrap();
    assert_eq!(report.affinity_purged, 1);
    assert!(affinity_entries(&lab, "affinity-local").is_empty());
    assert_eq!(lab.servers(LB, 80, 24), set(&["pod1", "pod2"]));
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let mut lab = lab!(2);
    lab.sync(&[web().build()], &eps(&[Ep::terminating("10.0.1.2", NODE)])).unwrap();
    assert_eq!(lab.servers(LB, 80, 6), set(&["pod1"]));
    lab.sync(&[web().build()], &eps(&[Ep::terminating("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)])).unwrap();
    assert_eq!(lab.servers(LB, 80, 12), set(&["pod2"]));
}

#[test]
fn endpoint_removal_takes_effect_for_tcp_and_udp() {
    let mut lab = lab!(2);
    let both = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)]);
    lab.sync(&[web().build()], &both).unwrap();
    // A UDP "flow" from a fixed source port sticks to one endpoint through conntrack.
    let first = udp(&lab.client, LB, 53, 40_000).server();
    assert_eq!(udp(&lab.client, LB, 53, 40_000).server(), first);
    let (gone_ip, other) = if first == "pod1" { ("10.0.2.2", "pod2") } else { ("10.0.1.2", "pod1") };
    // Remove the endpoint that flow uses; its pod keeps running, so only conntrack cleanup
    // can move the flow.
    lab.sync(&[web().build()], &eps(&[Ep::ready(gone_ip, NODE)])).unwrap();
    assert_eq!(udp(&lab.client, LB, 53, 40_000).server(), other);
    assert_eq!(lab.servers(LB, 80, 12), set(&[other]));
    assert_eq!(lab.servers(NODE_IP, NP, 6), set(&[other]));
}

#[test]
fn partial_sync_leaves_other_services_chains_untouched() {
    let mut lab = lab!(3);
    let mut other = Svc::new("ns", "other");
    other.lb_ips = vec!["203.0.113.20"];
    other.ports = vec![("http", "TCP", 80, Some(30081))];
    let other_eps = slice("ns", "other", "other-1", PORTS, &[Ep::ready("10.0.2.2", NODE)]);
    let with = |web_eps: Vec<EndpointSlice>| {
        let mut all = web_eps;
        all.push(other_eps.clone());
        all
    };
    lab.sync(&[web().build(), other.build()], &with(eps(&[Ep::ready("10.0.1.2", NODE)]))).unwrap();
    let other_chain = "svc-ns/other/tcp/80";
    let other_before = lab.list_chain("ip", other_chain);
    let web_before = lab.list_chain("ip", "svc-ns/web/tcp/80");
    let report = lab
        .sync(&[web().build(), other.build()], &with(eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)])))
        .unwrap();
    assert!(!report.full);
    // Rule handles are unchanged: the other Service's chain was not rewritten.
    assert_eq!(lab.list_chain("ip", other_chain), other_before);
    assert_ne!(lab.list_chain("ip", "svc-ns/web/tcp/80"), web_before);
    assert_eq!(lab.servers("203.0.113.20", 80, 4), set(&["pod2"]));
    assert_eq!(lab.servers(LB, 80, 16), set(&["pod1", "pod2"]));
    // A third endpoint: the rewritten rule refers to the endpoint map already in the kernel.
    let three = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE), Ep::ready("10.0.3.2", NODE)]);
    lab.sync(&[web().build(), other.build()], &with(three)).unwrap();
    assert_eq!(lab.servers(LB, 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers(NODE_IP, NP, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.list_chain("ip", other_chain), other_before);
    // Back to one endpoint: web's endpoint map is emptied now and deleted a sync later.
    lab.sync(&[web().build(), other.build()], &with(eps(&[Ep::ready("10.0.1.2", NODE)]))).unwrap();
    let maps = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "maps", "ip"]);
    assert!(maps.contains("map endpoints-"), "kept until the next sync: {maps}");
    assert_eq!(lab.servers(LB, 80, 6), set(&["pod1"]));
    lab.sync(&[web().build(), other.build()], &with(eps(&[Ep::ready("10.0.1.2", NODE)]))).unwrap();
    let maps = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "maps", "ip"]);
    assert!(!maps.contains("map endpoints-"), "{maps}");
    assert_eq!(lab.servers(LB, 80, 6), set(&["pod1"]));
    assert_eq!(lab.list_chain("ip", other_chain), other_before);
}

/// Runs nft in the node netns; when armed, appends a command the kernel rejects.
struct Sabotage {
    inner: NftCommand,
    armed: Arc<AtomicBool>,
}

impl NftRunner for Sabotage {
    fn run(&self, script: &str) -> Result<(), NftError> {
        if self.armed.load(Ordering::SeqCst) {
            let bad = format!("{script}add rule ip hawser no-such-chain accept\n");
            return self.inner.run(&bad);
        }
        self.inner.run(script)
    }
}

#[test]
fn failing_transaction_leaves_previous_rules_working() {
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let mut lab = match Lab::with_runner(2, move |node| {
        Box::new(Sabotage { inner: NftCommand::with_argv(exec_in(node, "nft")), armed: a })
    }) {
        Some(l) => l,
        None => return,
    };
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    armed.store(true, Ordering::SeqCst);
    let err = lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.2.2", NODE)])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no-such-chain"), "nft's error text is kept: {msg}");
    // Nothing of the failed transaction happened: still pod1 only.
    assert_eq!(lab.servers(LB, 80, 6), set(&["pod1"]));
    armed.store(false, Ordering::SeqCst);
    let report = lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.2.2", NODE)])).unwrap();
    assert!(report.full, "a failure is followed by a full resync");
    assert_eq!(lab.servers(LB, 80, 6), set(&["pod2"]));
}

#[test]
fn hairpin_traffic_is_masqueraded() {
    let mut lab = lab!(2);
    let mut svc = web();
    // Local policy does not masquerade by itself, so only the hairpin rule can make this work.
    svc.local = true;
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    let out = tcp(&lab.pods[0], LB, 80);
    assert_eq!(out.server(), "pod1");
    assert_eq!(out.peer().to_string(), "10.0.1.1", "masqueraded to the node's address");
    // An external client is still seen as itself.
    assert_eq!(tcp(&lab.client, LB, 80).peer().to_string(), CLIENT_IP);
    // Two endpoints (random choice through the endpoint map): only the connections that land
    // on the sending pod itself are masqueraded; pod1 reaching pod2 keeps its address.
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)])).unwrap();
    // Which address each pod sees pod1 as, when pod1 reaches the Service's address.
    let pod1_seen_as = |lab: &Lab, by_pod1: &str, by_pod2: &str| {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let out = tcp(&lab.pods[0], LB, 80);
            let want = if out.server() == "pod1" { by_pod1 } else { by_pod2 };
            assert_eq!(out.peer().to_string(), want, "{out:?}");
            seen.insert(out.server());
        }
        assert_eq!(seen, set(&["pod1", "pod2"]));
    };
    pod1_seen_as(&lab, "10.0.1.1", "10.0.1.2");
    // UDP hairpin too.
    for _ in 0..8 {
        let out = udp(&lab.pods[0], LB, 53, 0);
        let want = if out.server() == "pod1" { "10.0.1.1" } else { "10.0.1.2" };
        assert_eq!(out.peer().to_string(), want, "{out:?}");
    }
    // Cluster policy masquerades everything it DNATs (no hairpin elements needed): a pod
    // reaching itself, or another pod, is seen as the node's address on that pod's link.
    svc.local = false;
    lab.sync(&[svc.build()], &eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)])).unwrap();
    let hairpin = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "set", "ip", "hawser", "hairpin"]);
    assert!(!hairpin.contains("elements"), "no hairpin elements for Cluster policy:\n{hairpin}");
    pod1_seen_as(&lab, "10.0.1.1", "10.0.2.1");
}

#[test]
fn ipv6_address_and_nodeport() {
    let mut lab = lab!(2);
    if !lab.ipv6 {
        eprintln!("skipping: IPv6 disabled in this kernel");
        return;
    }
    let mut svc = web();
    svc.families = vec!["IPv6"];
    svc.lb_ips = vec!["2001:db8::10"];
    svc.local = true;
    let slices =
        vec![slice("ns", "web", "web-v6", PORTS, &[Ep::ready("fd00:1::2", NODE), Ep::ready("fd00:2::2", "node-b")])];
    lab.sync(&[svc.build()], &slices).unwrap();
    // The client's default IPv6 route goes through the node, like the LB address would.
    let out = tcp(&lab.client, "2001:db8::10", 80);
    assert_eq!(out.server(), "pod1");
    assert_eq!(out.peer().to_string(), CLIENT_IP6);
    assert_eq!(tcp(&lab.client, NODE_IP6, NP).server(), "pod1");
    assert_eq!(udp(&lab.client, "2001:db8::10", 53, 0).server(), "pod1");
}

#[test]
fn cleanup_deletes_both_tables_and_golden_ruleset_loads() {
    let mut lab = lab!(1);
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(tables.contains("table ip hawser") && tables.contains("table ip6 hawser"));
    lab.syncer.cleanup().unwrap();
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(!tables.contains("hawser"), "{tables}");
    // Traffic no longer has a path: the LB address is not routed anywhere from the node.
    assert_ne!(tcp(&lab.client, LB, 80).server_or_none(), Some("pod1".into()));
    // The golden rulesets are valid for this kernel's nft.
    for golden in ["mixed", "empty"] {
        let path = format!("{}/tests/golden/{golden}.nft", env!("CARGO_MANIFEST_DIR"));
        sh(&["ip", "netns", "exec", &lab.node, "nft", "-f", &path]);
        lab.syncer.cleanup().unwrap();
    }
}

#[test]
fn cli_cleanup_removes_the_tables_and_reads_flags_from_env() {
    let mut lab = lab!(1);
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hawser-dataplane"))
        .arg("--cleanup")
        .env("HAWSER_NFT_COMMAND", format!("ip netns exec {} nft", lab.node))
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(!tables.contains("hawser"), "{tables}");
}

/// Our tables of `family` as nft lists them, order-insensitive (element order in a listing
/// follows the kernel), each line prefixed by its table's name.
fn table_tokens(lab: &Lab, family: &str) -> Vec<String> {
    use hawser_dataplane::model::Family;
    let of = if family == "ip" { Family::V4 } else { Family::V6 };
    let mut tokens = Vec::new();
    for table in hawser_dataplane::render::TableId::of_family(of) {
        let text = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "table", family, table.name()]);
        let listed = text.split(['\n', ',', '{', '}']).map(str::trim).filter(|t| !t.is_empty());
        tokens.extend(listed.map(|t| format!("{} {t}", table.name())));
    }
    tokens.sort();
    tokens
}

/// Our tables' tokens, `ip`'s then `ip6`'s.
fn both_tables(lab: &Lab) -> Vec<Vec<String>> {
    ["ip", "ip6"].iter().map(|f| table_tokens(lab, f)).collect()
}

/// A Service with TCP 80 (NodePort `np`) and UDP 53 on `lb`, and on `lb6` too when `dual`.
fn dual_stack_svc(dual: bool, name: &'static str, lb: &'static str, lb6: &'static str, np: u16) -> Svc<'static> {
    let mut s = Svc::new("ns", name);
    s.lb_ips = if dual { vec![lb, lb6] } else { vec![lb] };
    if dual {
        s.families = vec!["IPv4", "IPv6"];
    }
    s.ports = vec![("http", "TCP", 80, Some(np)), ("dns", "UDP", 53, None)];
    s
}

/// A Service of each kind (dual-stack when `dual`), `svc-…` chains and frame alike: `plain`,
/// `single`, `sticky` (ClientIP affinity of `timeout` seconds), `ranged` (source ranges) and
/// `empty`, on 203.0.113.1–5 and NodePorts 30001–30005.
fn every_kind(dual: bool, timeout: i32) -> Vec<k8s_openapi::api::core::v1::Service> {
    let svc = |name, lb, lb6, np| dual_stack_svc(dual, name, lb, lb6, np);
    let mut sticky = svc("sticky", "203.0.113.3", "2001:db8::3", 30003);
    sticky.affinity_timeout = Some(timeout);
    let mut ranged = svc("ranged", "203.0.113.4", "2001:db8::4", 30004);
    ranged.source_ranges = vec!["192.168.100.0/24"];
    vec![
        svc("plain", "203.0.113.1", "2001:db8::1", 30001).build(),
        svc("single", "203.0.113.2", "2001:db8::2", 30002).build(),
        sticky.build(),
        ranged.build(),
        svc("empty", "203.0.113.5", "2001:db8::5", 30005).build(),
    ]
}

/// The first `n` of the three pods as ready endpoints on this node (IPv6 too when `dual`).
fn node_pods(dual: bool, n: usize) -> Vec<Ep<'static>> {
    let mut v: Vec<Ep<'static>> =
        ["10.0.1.2", "10.0.2.2", "10.0.3.2"][..n].iter().map(|ip| Ep::ready(ip, NODE)).collect();
    if dual {
        v.extend(["fd00:1::2", "fd00:2::2", "fd00:3::2"][..n].iter().map(|ip| Ep::ready(ip, NODE)));
    }
    v
}

#[test]
fn partial_syncs_leave_the_tables_a_full_resync_would_write() {
    let mut lab = lab!(3);
    let svc = |name: &'static str, lb: &'static str, np: u16, affinity: bool| {
        let mut s = Svc::new("ns", name);
        s.lb_ips = vec![lb];
        s.ports = vec![("http", "TCP", 80, Some(np)), ("dns", "UDP", 53, None)];
        s.affinity_timeout = affinity.then_some(60);
        s.build()
    };
    let services = |with_b: bool| {
        let mut v = vec![svc("a", "203.0.113.1", 30001, false), svc("c", "203.0.113.3", 30003, true)];
        if with_b {
            // b claims a's NodePort too: the greater key wins, and a gets it back when b goes.
            v.push(svc("b", "203.0.113.2", 30001, false));
        }
        v
    };
    let eps = |name: &'static str, list: &[Ep<'static>]| slice("ns", name, name, PORTS, list);
    let pods = |n: usize| -> Vec<Ep<'static>> {
        ["10.0.1.2", "10.0.2.2", "10.0.3.2"][..n].iter().map(|ip| Ep::ready(ip, NODE)).collect()
    };
    let steps: Vec<(Vec<_>, Vec<EndpointSlice>)> = vec![
        (services(true), vec![eps("a", &pods(2)), eps("b", &pods(1)), eps("c", &pods(2))]),
        (services(true), vec![eps("a", &pods(3)), eps("b", &pods(2)), eps("c", &pods(3))]),
        (services(false), vec![eps("a", &pods(1)), eps("c", &pods(1))]),
        (services(false), vec![eps("a", &pods(3)), eps("c", &[])]),
    ];
    for (i, (services, slices)) in steps.iter().enumerate() {
        let report = lab.sync(services, slices).unwrap();
        assert_eq!(report.full, i == 0);
        // Deletes what this sync emptied.
        lab.sync(services, slices).unwrap();
        let partial = both_tables(&lab);
        lab.syncer.force_full_resync();
        assert!(lab.sync(services, slices).unwrap().full);
        let full = both_tables(&lab);
        assert_eq!(partial, full, "step {i}");
    }
    assert_eq!(lab.servers("203.0.113.1", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers(NODE_IP, 30001, 30), set(&["pod1", "pod2", "pod3"]));
}

/// Plain Services (no affinity, no source ranges) change over netlink once their endpoint maps
/// exist: endpoints coming and going, a chain rewritten, a Service removed and its chains
/// deleted a sync later. What netlink wrote lists exactly as what nft writes in a full resync,
/// and traffic follows.
#[test]
fn plain_partial_syncs_go_over_netlink_and_list_as_nft_writes_them() {
    use hawser_dataplane::nft::Writer;
    let mut lab = lab!(3);
    let dual = lab.ipv6;
    let svc = |name, lb, lb6, np| dual_stack_svc(dual, name, lb, lb6, np).build();
    let a = || svc("a", "203.0.113.1", "2001:db8::1", 30001);
    let b = || svc("b", "203.0.113.2", "2001:db8::2", 30002);
    let v4 = ["10.0.1.2", "10.0.2.2", "10.0.3.2"];
    let v6 = ["fd00:1::2", "fd00:2::2", "fd00:3::2"];
    let eps = |name: &'static str, n: usize| {
        let mut out = vec![slice(
            "ns",
            name,
            &format!("{name}-4"),
            PORTS,
            &v4[..n].iter().map(|ip| Ep::ready(ip, NODE)).collect::<Vec<_>>(),
        )];
        if dual {
            out.push(slice(
                "ns",
                name,
                &format!("{name}-6"),
                PORTS,
                &v6[..n].iter().map(|ip| Ep::ready(ip, NODE)).collect::<Vec<_>>(),
            ));
        }
        out
    };
    let both = |na: usize, nb: usize| {
        let mut all = eps("a", na);
        all.extend(eps("b", nb));
        all
    };
    // Creates both Services and their endpoint maps.
    lab.sync(&[a(), b()], &both(2, 2)).unwrap();
    let check =
        |lab: &mut Lab, services: &[k8s_openapi::api::core::v1::Service], slices: &[EndpointSlice], step: &str| {
            let partial = both_tables(lab);
            lab.syncer.force_full_resync();
            assert!(lab.sync(services, slices).unwrap().full);
            let full = both_tables(lab);
            assert_eq!(partial, full, "{step}: netlink-written tables differ from a full resync");
        };
    // "No endpoints" (a filter chain that rejects) is left to nft. A map is declared over
    // netlink, a copy of one the kernel lists.
    let steps: Vec<(&str, Vec<_>, Vec<EndpointSlice>, Writer)> = vec![
        ("a gains an endpoint (its rule is rewritten)", vec![a(), b()], both(3, 2), Writer::Netlink),
        ("a loses two (a single endpoint is a plain dnat)", vec![a(), b()], both(1, 2), Writer::Netlink),
        ("a back to three (its emptied map is declared again)", vec![a(), b()], both(3, 2), Writer::Netlink),
        ("b loses one", vec![a(), b()], both(3, 1), Writer::Netlink),
        ("b loses its last", vec![a(), b()], both(3, 0), Writer::Nft),
        ("b is deleted", vec![a()], both(3, 0), Writer::Netlink),
    ];
    for (step, services, slices, expect) in &steps {
        let report = lab.sync(services, slices).unwrap();
        assert!(!report.full, "{step}");
        assert_eq!(report.writer, *expect, "{step}");
        if lab.syncer.has_work() {
            // Deletes, over netlink, what the step emptied.
            assert_eq!(lab.sync(services, slices).unwrap().writer, Writer::Netlink, "{step}: deletion");
        }
        check(&mut lab, services, slices, step);
    }
    assert_eq!(lab.servers("203.0.113.1", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers(NODE_IP, 30001, 30), set(&["pod1", "pod2", "pod3"]));
    if dual {
        let served: BTreeSet<String> = (0..30).map(|_| tcp(&lab.client, "2001:db8::1", 80).server()).collect();
        assert_eq!(served, set(&["pod1", "pod2", "pod3"]));
    }
    assert_eq!(tcp(&lab.client, "203.0.113.2", 80), Outcome::Timeout, "b is gone: nothing answers");

    // Restarted over these tables, an agent copies the declaration from a map it lists.
    restart(&mut lab, hawser_dataplane::render::RenderConfig::default());
    assert!(lab.sync(&[a(), b()], &both(1, 2)).unwrap().full);
    let report = lab.sync(&[a(), b()], &both(3, 2)).unwrap();
    assert_eq!(report.writer, Writer::Netlink, "a's map declared again, copied from b's");
    check(&mut lab, &[a(), b()], &both(3, 2), "a's map declared again, after a restart");
    assert_eq!(lab.servers("203.0.113.1", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers("203.0.113.2", 80, 30), set(&["pod1", "pod2"]));
}

/// A full sync into a node without our tables writes the skeleton (with the filter chains:
/// source ranges, rejects) through nft and the rest (plain and affinity `svc-…` chains, every
/// element) in netlink batches. The tables list exactly as an atomic nft replacement writes
/// them, and serve. Tables that exist are adopted.
#[test]
fn full_sync_into_an_empty_kernel_writes_the_bulk_over_netlink() {
    use hawser_dataplane::nft::Writer;
    let mut lab = lab!(3);
    let dual = lab.ipv6;
    let services = every_kind(dual, 60);
    let slices: Vec<EndpointSlice> = [("plain", 3), ("single", 1), ("sticky", 3), ("ranged", 2), ("empty", 0)]
        .into_iter()
        .map(|(name, n)| slice("ns", name, name, PORTS, &node_pods(dual, n)))
        .collect();

    let report = lab.sync(&services, &slices).unwrap();
    assert!(report.full);
    assert_eq!(report.writer, Writer::NftThenNetlink);
    let split = both_tables(&lab);
    assert!(split[0].iter().any(|t| t.contains("203.0.113.1 . tcp . 80")), "elements missing: {split:?}");
    // A full resync over the tables it wrote adopts them: nothing differs.
    lab.syncer.force_full_resync();
    let report = lab.sync(&services, &slices).unwrap();
    assert_eq!((report.writer, report.chains_written, report.elements_changed), (Writer::Netlink, 0, 0));
    // What nft alone writes (no netlink: neither steps nor adoption), replacing the tables.
    let stepwise = std::mem::replace(
        &mut lab.syncer,
        hawser_dataplane::sync::Syncer::new(
            Box::new(node_nft(&lab.node, false)),
            hawser_dataplane::render::RenderConfig::default(),
        ),
    );
    lab.inputs = hawser_dataplane::inputs::ClusterInputs::default();
    let report = lab.sync(&services, &slices).unwrap();
    assert_eq!(report.writer, Writer::Nft, "without netlink, tables that exist are replaced atomically");
    let whole = both_tables(&lab);
    assert_eq!(split, whole, "written in steps, the tables differ from nft's");
    lab.syncer = stepwise;

    // After a cleanup the kernel has no tables again: the split path, now of the kept state
    // (nothing changed since), and traffic.
    lab.syncer.cleanup().unwrap();
    assert_eq!(lab.sync(&services, &slices).unwrap().writer, Writer::NftThenNetlink);
    assert_eq!(both_tables(&lab), whole, "the kept state written in steps differs from nft's");
    assert_eq!(lab.servers("203.0.113.1", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers(NODE_IP, 30002, 10), set(&["pod1"]));
    assert_eq!(lab.servers("203.0.113.3", 80, 10).len(), 1, "affinity keeps a client on one pod");
    assert_eq!(tcp(&lab.client2, "203.0.113.4", 80), Outcome::Timeout, "outside the source ranges");
    assert_eq!(tcp(&lab.client, "203.0.113.5", 80), Outcome::Refused, "no endpoints");
    if dual {
        let served: BTreeSet<String> = (0..30).map(|_| tcp(&lab.client, "2001:db8::1", 80).server()).collect();
        assert_eq!(served, set(&["pod1", "pod2", "pod3"]));
    }

    // A starting agent writes the frame while its lists load: tables with no Service in them,
    // which the first sync fills.
    lab.syncer.cleanup().unwrap();
    lab.syncer = hawser_dataplane::sync::Syncer::new(
        Box::new(node_nft(&lab.node, true)),
        hawser_dataplane::render::RenderConfig::default(),
    );
    lab.inputs = hawser_dataplane::inputs::ClusterInputs::default();
    assert!(lab.syncer.prepare().unwrap(), "no tables: the frame is written");
    assert!(!lab.syncer.prepare().unwrap(), "written once");
    let frame = both_tables(&lab);
    assert!(frame[0].iter().any(|t| t.ends_with(" chain services")), "{frame:?}");
    assert!(frame.iter().flatten().all(|t| !t.contains("svc-") && !t.contains("203.0.113.")), "{frame:?}");
    assert_eq!(tcp(&lab.client, NODE_IP, 30002), Outcome::Refused, "the frame serves nothing");
    let report = lab.sync(&services, &slices).unwrap();
    assert_eq!(report.writer, Writer::NftThenNetlink);
    assert_eq!(both_tables(&lab), whole, "written over the prepared frame, the tables differ from nft's");
    assert_eq!(lab.servers("203.0.113.1", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert_eq!(lab.servers(NODE_IP, 30002, 10), set(&["pod1"]));
    // Over tables that exist there is no frame to write.
    lab.syncer.force_full_resync();
    assert!(!lab.syncer.prepare().unwrap());
}

/// Runs nft and netlink batches in the node netns; when armed, the full sync written in steps
/// has its frame refused.
struct SabotageFrame {
    inner: NftCommand,
    armed: Arc<AtomicBool>,
}

impl NftRunner for SabotageFrame {
    fn run(&self, script: &str) -> Result<(), NftError> {
        self.inner.run(script)
    }

    fn stepwise(&self) -> Result<Option<Box<dyn hawser_dataplane::diff::StepWriter>>, NftError> {
        let armed = self.armed.clone();
        Ok(self.inner.stepwise()?.map(|inner| {
            Box::new(CountedSteps { inner, batches: 0.into(), refuse: 0, refuse_scripts: armed })
                as Box<dyn hawser_dataplane::diff::StepWriter>
        }))
    }

    fn netlink(&self) -> Option<Arc<hawser_dataplane::netlink::Netlink>> {
        self.inner.netlink()
    }
}

/// A full sync that fails before it has taken in its Services (here, its frame refused) still
/// records them: the full resync that follows programs them, though the inputs have nothing
/// new for it.
#[test]
fn a_sync_that_fails_before_taking_its_changes_in_loses_none() {
    let armed = Arc::new(AtomicBool::new(true));
    let flag = armed.clone();
    let Some(mut lab) =
        Lab::with_runner(2, move |node| Box::new(SabotageFrame { inner: node_nft(node, true), armed: flag }))
    else {
        return;
    };
    let two = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)]);
    let err = lab.sync(&[web().build()], &two).unwrap_err();
    assert!(err.to_string().contains("refused by the test"), "{err}");
    assert_eq!(tcp(&lab.client, LB, 80), Outcome::Timeout, "nothing is programmed yet");
    armed.store(false, Ordering::SeqCst);
    let report = lab.sync(&[web().build()], &two).unwrap();
    assert!(report.full);
    assert_eq!(lab.servers(LB, 80, 16), set(&["pod1", "pod2"]));
}

/// Writes `ruleset` in steps over the frame `skeleton` (what the syncer does while it
/// renders, here in one pass over a whole ruleset), in netlink batches of about `batch_bytes`.
fn write_in_steps(
    writer: &dyn hawser_dataplane::diff::StepWriter,
    skeleton: &hawser_dataplane::render::Ruleset,
    ruleset: &hawser_dataplane::render::Ruleset,
    batch_bytes: usize,
) -> Result<Option<hawser_dataplane::diff::Written>, NftError> {
    let frame = hawser_dataplane::diff::Frame::write(writer, skeleton)?;
    std::thread::scope(|scope| {
        let mut steps = hawser_dataplane::diff::Stepwise::start(scope, writer, frame, batch_bytes);
        for (family, table) in &ruleset.tables {
            steps.add(*family, table);
        }
        let activating = ruleset.tables.iter().flat_map(|(family, table)| {
            table.collections.iter().filter(|(n, _)| !n.starts_with("endpoints-")).flat_map(move |(n, c)| {
                c.elements.iter().map(move |(k, v)| (*family, n.as_str(), k.as_str(), v.as_str()))
            })
        });
        steps.finish(activating)
    })
}

/// The base tables of both families, with `ruleset`'s endpoint maps declared (what the syncer
/// writes first).
fn skeleton_of(ruleset: &hawser_dataplane::render::Ruleset) -> hawser_dataplane::render::Ruleset {
    use hawser_dataplane::render::{RenderConfig, Ruleset, base_table};
    let mut skeleton = Ruleset::default();
    for (id, table) in &ruleset.tables {
        let mut base = base_table(*id, &RenderConfig::default());
        for (name, c) in table.collections.iter().filter(|(n, _)| n.starts_with("endpoints-")) {
            base.collections.insert(name.clone(), c.clone_empty());
        }
        skeleton.tables.insert(*id, base);
    }
    skeleton
}

/// The steps of a full sync written in steps: the netlink ones counted, the `refuse`th of
/// them refused, and every nft one while `refuse_scripts` holds.
struct CountedSteps {
    inner: Box<dyn hawser_dataplane::diff::StepWriter>,
    batches: std::sync::atomic::AtomicUsize,
    refuse: usize,
    refuse_scripts: Arc<AtomicBool>,
}

impl hawser_dataplane::diff::StepWriter for CountedSteps {
    fn script(&self, script: &str) -> Result<(), NftError> {
        if self.refuse_scripts.load(Ordering::SeqCst) {
            return Err(NftError::Rejected { status: "test".into(), stderr: "refused by the test".into() });
        }
        self.inner.script(script)
    }

    fn batch(&self, batch: &hawser_dataplane::netlink::Batch) -> Result<(), NftError> {
        if self.batches.fetch_add(1, Ordering::SeqCst) + 1 == self.refuse {
            return Err(NftError::Rejected { status: "test".into(), stderr: "refused by the test".into() });
        }
        self.inner.batch(batch)
    }

    fn declaration(
        &self,
        table: hawser_dataplane::render::TableId,
        name: &str,
    ) -> Result<Option<hawser_dataplane::netlink::Attrs>, NftError> {
        self.inner.declaration(table, name)
    }
}

/// A full sync written in steps, batch by batch: a `svc-…` chain the encoder does not know goes
/// through nft before traffic is let in; a batch refused part-way leaves tables that serve
/// nothing (as no tables would), and the atomic replacement that follows serves everything.
#[test]
fn stepwise_full_sync_survives_unknown_chains_and_a_refused_batch() {
    use hawser_dataplane::diff::FullSync;
    use hawser_dataplane::model::{Family, ModelConfig, build_model};
    use hawser_dataplane::netlink::Netlink;
    use hawser_dataplane::nft::Steps;
    use hawser_dataplane::render::{Chain, RenderConfig, TableId, render};
    let lab = lab!(2);
    let services: Vec<_> = (0..300)
        .map(|i| {
            let mut s = Svc::new("ns", leak(format!("s{i}")));
            s.lb_ips = vec![leak(format!("203.0.113.{}", i % 250 + 1))];
            s.ports = vec![("http", "TCP", 80 + i as u16 / 250, Some(30000 + i as u16))];
            s.build()
        })
        .collect();
    let pods = [Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)];
    let slices: Vec<EndpointSlice> =
        (0..300).map(|i| slice("ns", leak(format!("s{i}")), leak(format!("s{i}")), PORTS, &pods)).collect();
    let config = ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: NODE.into() };
    let mut ruleset = render(&build_model(&services, &slices, &config), &RenderConfig::default());
    // A Service chain whose rule the encoder does not know, reached by one address.
    let table = ruleset.tables.get_mut(&TableId::nat(Family::V4, "ns", "odd")).unwrap();
    let odd = "svc-ns/odd/tcp/80";
    table
        .chains
        .insert(odd.into(), Chain { base: None, rules: vec!["counter meta l4proto tcp dnat to 10.0.2.2:8080".into()] });
    let dispatch = table.collections.get_mut("service-addresses").unwrap();
    dispatch.elements.insert("203.0.113.251 . tcp . 80".into(), format!("goto {odd}"));
    let skeleton = skeleton_of(&ruleset);

    let nft = NftCommand::with_argv(exec_in(&lab.node, "nft"));
    let netlink = Arc::new(common::lab::in_netns(&lab.node, Netlink::open).unwrap());
    let counted = |refuse| CountedSteps {
        inner: Box::new(Steps::new(nft.clone(), netlink.clone())),
        batches: std::sync::atomic::AtomicUsize::new(0),
        refuse,
        refuse_scripts: Arc::new(AtomicBool::new(false)),
    };
    // Small batches, so that there are several, and the third is refused.
    let refusing = counted(3);
    assert!(write_in_steps(&refusing, &skeleton, &ruleset, 16 << 10).is_err());
    assert!(refusing.batches.load(Ordering::SeqCst) >= 3, "the batches were too few to refuse the third");
    assert_eq!(tcp(&lab.client, "203.0.113.1", 80), Outcome::Timeout, "nothing serves after a refused batch");
    // What the agent does next: tables exist, so the atomic replacement.
    nft.run(&FullSync::new(&ruleset).script()).unwrap();
    let whole = both_tables(&lab);
    assert_eq!(lab.servers("203.0.113.1", 80, 16), set(&["pod1", "pod2"]));

    // From no tables, the write in steps completes and lists as the atomic replacement wrote.
    nft.run(&hawser_dataplane::diff::cleanup_script()).unwrap();
    let all = counted(0);
    assert!(write_in_steps(&all, &skeleton, &ruleset, 16 << 10).unwrap().is_some());
    assert!(all.batches.load(Ordering::SeqCst) > 3, "written in several batches");
    assert_eq!(both_tables(&lab), whole, "written in steps, the tables differ from nft's");
    assert!(lab.list_chain("ip", odd).contains("counter"), "the unknown chain went through nft");
    assert_eq!(lab.servers("203.0.113.251", 80, 4), set(&["pod2"]));
    assert_eq!(lab.servers("203.0.113.50", 80, 16), set(&["pod1", "pod2"]));
}

/// Written in steps, an endpoint map the frame did not declare is declared over netlink as
/// the frame's map of its protocol lists, or, with no such map to copy, goes through nft with
/// its Service; a map the frame declared that no Service port used is deleted. Either way the
/// tables end as the atomic replacement writes them, and serve.
#[test]
fn stepwise_write_declares_what_the_frame_lacks_and_drops_what_no_port_used() {
    use hawser_dataplane::diff::FullSync;
    use hawser_dataplane::model::{Family, ModelConfig, build_model};
    use hawser_dataplane::netlink::Netlink;
    use hawser_dataplane::nft::Steps;
    use hawser_dataplane::render::{RenderConfig, TableId, render};
    let lab = lab!(2);
    // Three Services of one NAT table.
    let first = TableId::nat(Family::V4, "ns", "s0");
    let names: Vec<&'static str> = (0..100)
        .map(|i| leak(format!("s{i}")))
        .filter(|n| TableId::nat(Family::V4, "ns", n) == first)
        .take(3)
        .collect();
    let services: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut s = Svc::new("ns", name);
            s.lb_ips = vec![leak(format!("203.0.113.{}", i + 1))];
            s.ports = vec![("http", "TCP", 80, Some(30000 + i as u16))];
            s.build()
        })
        .collect();
    let pods = [Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)];
    let slices: Vec<EndpointSlice> = names.iter().map(|name| slice("ns", name, name, PORTS, &pods)).collect();
    let config = ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: NODE.into() };
    let ruleset = render(&build_model(&services, &slices, &config), &RenderConfig::default());
    let nat = first;
    let used: Vec<String> =
        ruleset.tables[&nat].collections.keys().filter(|n| n.starts_with("endpoints-")).cloned().collect();
    assert!(!used.is_empty());
    let unused = (0..=255).map(|b| format!("endpoints-tcp-{b:02x}")).find(|n| !used.contains(n)).unwrap();
    // A frame that declares only a map nobody uses: the used ones are copied from it.
    let mut copied = skeleton_of(&ruleset);
    let decl = copied.tables[&nat].collections.get(&used[0]).unwrap().clone_empty();
    for t in copied.tables.values_mut() {
        t.collections.retain(|name, _| !name.starts_with("endpoints-"));
    }
    copied.tables.get_mut(&nat).unwrap().collections.insert(unused.clone(), decl);
    // A frame that declares no endpoint map: there is none to copy.
    let mut bare = skeleton_of(&ruleset);
    for t in bare.tables.values_mut() {
        t.collections.retain(|name, _| !name.starts_with("endpoints-"));
    }

    let nft = NftCommand::with_argv(exec_in(&lab.node, "nft"));
    nft.run(&FullSync::new(&ruleset).script()).unwrap();
    let whole = both_tables(&lab);
    let steps = Steps::new(nft.clone(), Arc::new(common::lab::in_netns(&lab.node, Netlink::open).unwrap()));
    for (frame, through_nft) in [(&copied, false), (&bare, true)] {
        nft.run(&hawser_dataplane::diff::cleanup_script()).unwrap();
        let written = write_in_steps(&steps, frame, &ruleset, 1 << 20);
        let written = written.unwrap().expect("every element is one the encoder knows");
        assert_eq!(written.rules, ruleset.rule_count());
        assert_eq!(written.elements, ruleset.element_count());
        let maps = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "maps", "ip"]);
        assert!(!maps.contains(&unused), "the map no port used is still there:\n{maps}");
        for map in &used {
            assert!(maps.contains(map), "{map}, which the frame lacked, is missing:\n{maps}");
        }
        assert_eq!(both_tables(&lab), whole, "written in steps (through nft: {through_nft}), the tables differ");
        for (i, _) in names.iter().enumerate() {
            assert_eq!(lab.servers(&format!("203.0.113.{}", i + 1), 80, 16), set(&["pod1", "pod2"]));
        }
    }
}

/// A batch larger than the socket's initial send buffer (2 MiB; a full sync's, or a partial one
/// of a mass change) is still written whole, in one transaction: the buffer grows to it.
#[test]
fn a_batch_larger_than_the_send_buffer_is_written_whole() {
    use hawser_dataplane::model::Family;
    use hawser_dataplane::netlink::{Batch, Netlink};
    let mut lab = lab!(1);
    lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.1.2", NODE)])).unwrap();
    let pairs: Vec<String> =
        (0..150_000u32).map(|i| std::net::Ipv4Addr::from(0x0a80_0000 + i)).map(|a| format!("{a} . {a}")).collect();
    let mut batch = Batch::new();
    let frame = hawser_dataplane::render::TableId::frame(Family::V4);
    assert!(batch.elements(frame, "hairpin", true, pairs.iter().map(|k| (k.as_str(), ""))));
    assert!(batch.len() > 2 << 20, "the batch is only {} bytes", batch.len());
    let netlink = common::lab::in_netns(&lab.node, Netlink::open).unwrap();
    netlink.commit(&batch).unwrap();
    // One transaction: its first and last elements are there.
    for pair in [&pairs[0], &pairs[pairs.len() - 1]] {
        let got = sh(&[
            "ip",
            "netns",
            "exec",
            &lab.node,
            "nft",
            "get",
            "element",
            "ip",
            "hawser",
            "hairpin",
            &format!("{{ {pair} }}"),
        ]);
        assert!(got.contains(pair.as_str()), "{pair} missing: {got}");
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Runs nft in the node netns and netlink batches there; when armed, adds a step the kernel
/// refuses to the batch.
struct SabotageNetlink {
    inner: NftCommand,
    armed: Arc<AtomicBool>,
}

impl NftRunner for SabotageNetlink {
    fn run(&self, script: &str) -> Result<(), NftError> {
        self.inner.run(script)
    }

    fn run_partial(
        &self,
        script: &str,
        batch: Option<&hawser_dataplane::netlink::Batch>,
    ) -> Result<hawser_dataplane::nft::Writer, NftError> {
        match batch {
            Some(b) if self.armed.load(Ordering::SeqCst) => {
                let mut bad = b.clone();
                bad.flush_chain(
                    hawser_dataplane::render::TableId::frame(hawser_dataplane::model::Family::V4),
                    "no-such-chain",
                );
                self.inner.run_partial(script, Some(&bad))
            }
            _ => self.inner.run_partial(script, batch),
        }
    }
}

#[test]
fn refused_netlink_batch_changes_nothing_and_the_next_sync_repairs() {
    let armed = Arc::new(AtomicBool::new(false));
    let flag = armed.clone();
    let Some(mut lab) = Lab::with_runner(2, move |node| {
        Box::new(SabotageNetlink { inner: common::lab::node_nft(node, true), armed: flag })
    }) else {
        return;
    };
    let two = eps(&[Ep::ready("10.0.1.2", NODE), Ep::ready("10.0.2.2", NODE)]);
    lab.sync(&[web().build()], &two).unwrap();
    let before = table_tokens(&lab, "ip");
    armed.store(true, Ordering::SeqCst);
    let err = lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.2.2", NODE)])).unwrap_err();
    assert!(err.to_string().contains("No such file or directory"), "{err}");
    assert_eq!(table_tokens(&lab, "ip"), before, "a refused batch changed the kernel");
    assert_eq!(lab.servers(LB, 80, 16), set(&["pod1", "pod2"]));
    armed.store(false, Ordering::SeqCst);
    assert!(lab.syncer.full_next());
    assert!(lab.sync(&[web().build()], &eps(&[Ep::ready("10.0.2.2", NODE)])).unwrap().full);
    assert_eq!(lab.servers(LB, 80, 8), set(&["pod2"]));
}

/// Both tables' tokens without the clients ClientIP affinity recorded (their timers run).
fn static_tables(lab: &Lab) -> Vec<Vec<String>> {
    both_tables(lab).into_iter().map(|t| t.into_iter().filter(|t| !t.contains(" expires ")).collect()).collect()
}

/// The agent restarting: a new syncer with empty inputs, over the kernel as it is.
fn restart(lab: &mut Lab, config: hawser_dataplane::render::RenderConfig) {
    lab.syncer = hawser_dataplane::sync::Syncer::new(Box::new(node_nft(&lab.node, true)), config);
    lab.inputs = hawser_dataplane::inputs::ClusterInputs::default();
}

/// A restarted agent adopts the tables it finds: when they already say what it wants it
/// writes nothing (only its check table comes and goes) and the clients ClientIP affinity
/// recorded stay; what changed while it was away, or was changed by hand, is written in one
/// netlink transaction, ending as a full write would; a frame that differs (here another
/// masquerade bit) makes it replace the tables atomically, as before.
#[test]
fn a_restarted_agent_adopts_the_tables_it_finds_and_writes_only_what_differs() {
    use hawser_dataplane::nft::Writer;
    use hawser_dataplane::render::RenderConfig;
    let mut lab = lab!(3);
    let dual = lab.ipv6;
    let mut all = every_kind(dual, 600);
    all.push(dual_stack_svc(dual, "grown", "203.0.113.6", "2001:db8::6", 30006).build());
    let pods = |n: usize| node_pods(dual, n);
    let slices = |counts: &[(&'static str, usize)]| -> Vec<EndpointSlice> {
        counts.iter().map(|(name, n)| slice("ns", name, name, PORTS, &pods(*n))).collect()
    };
    let before = slices(&[("plain", 3), ("single", 1), ("sticky", 3), ("ranged", 2), ("empty", 0), ("grown", 1)]);
    assert_eq!(lab.sync(&all, &before).unwrap().writer, Writer::NftThenNetlink);
    let sticky_pod = tcp(&lab.client, "203.0.113.3", 80).server();
    assert_eq!(affinity_entries(&lab, "affinity-cluster").len(), 1);
    let written = static_tables(&lab);

    // Another proxy's table beside ours, with chains of the same names, is none of ours.
    let other = "add table ip other\nadd chain ip other services\nadd chain ip other svc-ns/plain/tcp/80\n\
                 add rule ip other svc-ns/plain/tcp/80 counter\n";
    node_nft(&lab.node, false).run(other).unwrap();
    // Nothing changed: nothing but the check table is written, and the client stays recorded.
    restart(&mut lab, RenderConfig::default());
    let report = lab.sync(&all, &before).unwrap();
    assert!(report.full);
    assert_eq!((report.writer, report.replaced.as_deref()), (Writer::Netlink, None));
    assert_eq!((report.chains_written, report.elements_changed), (0, 0), "{report:?}");
    assert_eq!(static_tables(&lab), written);
    assert_eq!(affinity_entries(&lab, "affinity-cluster").len(), 1, "the recorded client stays");
    for _ in 0..8 {
        assert_eq!(tcp(&lab.client, "203.0.113.3", 80).server(), sticky_pod);
    }
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(!tables.contains("hawser-check"), "{tables}");
    let kept = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "chain", "ip", "other", "svc-ns/plain/tcp/80"]);
    assert!(kept.contains("counter"), "{kept}");

    // The periodic full resync with nothing changed writes nothing at all: the frame is the
    // one this agent checked last. A check table a crash left behind is deleted.
    lab.syncer.force_full_resync();
    let report = lab.sync(&all, &before).unwrap();
    assert!(report.full);
    assert_eq!((report.writer, report.applied, report.replaced.as_deref()), (Writer::None, false, None), "{report:?}");
    node_nft(&lab.node, false).run("add table ip hawser-check\nadd chain ip hawser-check stray\n").unwrap();
    lab.syncer.force_full_resync();
    let report = lab.sync(&all, &before).unwrap();
    assert_eq!((report.writer, report.chains_written, report.elements_changed), (Writer::None, 0, 0), "{report:?}");
    assert_eq!(static_tables(&lab), written);
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(!tables.contains("hawser-check"), "{tables}");

    // Changed while the agent was away: plain lost an endpoint, sticky lost the one its client
    // was sent to, empty was deleted, grown went from one endpoint to three (its endpoint maps
    // are new); and by hand, a rule and an element of single's went.
    let maps = |tables: &[Vec<String>]| tables.iter().flatten().filter(|t| t.contains(" map endpoints-")).count();
    let maps_before = maps(&static_tables(&lab));
    let nft = node_nft(&lab.node, false);
    let single = nat_of("single");
    nft.run(&format!(
        "flush chain ip {single} svc-ns/single/tcp/80\ndelete element ip {single} service-nodeports {{ tcp . 30002 }}\n"
    ))
    .unwrap();
    let n = |pod: &str| pod.trim_start_matches("pod").parse::<usize>().unwrap();
    let gone = [format!("10.0.{}.2", n(&sticky_pod)), format!("fd00:{}::2", n(&sticky_pod))];
    let mut after = slices(&[("plain", 2), ("single", 1), ("ranged", 2), ("grown", 3)]);
    let sticky_eps: Vec<Ep<'static>> = pods(3).into_iter().filter(|e| !gone.iter().any(|g| g == e.ip)).collect();
    after.push(slice("ns", "sticky", "sticky", PORTS, &sticky_eps));
    let remaining: Vec<_> = all.iter().filter(|s| s.metadata.name.as_deref() != Some("empty")).cloned().collect();
    restart(&mut lab, RenderConfig::default());
    let report = lab.sync(&remaining, &after).unwrap();
    assert_eq!((report.writer, report.replaced.as_deref()), (Writer::Netlink, None), "{report:?}");
    assert!(report.chains_written >= 3 && report.elements_changed >= 4, "{report:?}");
    assert_eq!(report.affinity_purged, 1, "the client recorded for a gone endpoint");
    let adopted = static_tables(&lab);
    assert_eq!(lab.servers("203.0.113.1", 80, 24), set(&["pod1", "pod2"]));
    assert_eq!(lab.servers(NODE_IP, 30002, 4), set(&["pod1"]), "single's NodePort is back");
    assert_eq!(lab.servers("203.0.113.6", 80, 30), set(&["pod1", "pod2", "pod3"]));
    assert!(maps(&adopted) > maps_before, "grown's endpoint maps were not declared");
    assert_ne!(tcp(&lab.client, "203.0.113.3", 80).server(), sticky_pod);
    assert_eq!(tcp(&lab.client, "203.0.113.5", 80), Outcome::Timeout, "empty is gone: nothing answers");
    // Exactly what a write from nothing gives, with the same slots.
    lab.syncer.cleanup().unwrap();
    assert_eq!(lab.sync(&remaining, &after).unwrap().writer, Writer::NftThenNetlink);
    assert_eq!(static_tables(&lab), adopted, "adopted tables differ from a full write");

    // Another masquerade bit: the frame differs, and the tables are replaced atomically.
    restart(&mut lab, RenderConfig { masquerade_mark: 0x0080_0000 });
    let report = lab.sync(&remaining, &after).unwrap();
    assert_eq!(report.writer, Writer::Nft, "{report:?}");
    assert!(report.replaced.as_deref().is_some_and(|r| r.contains("nat-postrouting")), "{report:?}");
    assert!(lab.list_chain("ip", "nat-postrouting").contains("0x00800000"));
    let tables = sh(&["ip", "netns", "exec", &lab.node, "nft", "list", "tables"]);
    assert!(!tables.contains("hawser-check"), "{tables}");
    assert_eq!(lab.servers("203.0.113.1", 80, 24), set(&["pod1", "pod2"]));
    let replaced = static_tables(&lab);
    lab.syncer.cleanup().unwrap();
    lab.sync(&remaining, &after).unwrap();
    assert_eq!(static_tables(&lab), replaced, "the replacement differs from a full write");

    // A hand edit of the frame (the dispatch chain emptied): the periodic full resync replaces
    // the tables, and traffic flows again.
    node_nft(&lab.node, false).run(&format!("flush chain ip {} services\n", nat_of("plain"))).unwrap();
    assert_eq!(tcp(&lab.client, "203.0.113.1", 80), Outcome::Timeout, "nothing is DNATed without the chain");
    lab.syncer.force_full_resync();
    let report = lab.sync(&remaining, &after).unwrap();
    assert_eq!(report.writer, Writer::Nft, "{report:?}");
    assert!(report.replaced.as_deref().is_some_and(|r| r.contains("chain services is missing, or has no rules")));
    assert_eq!(static_tables(&lab), replaced);
    assert_eq!(lab.servers("203.0.113.1", 80, 24), set(&["pod1", "pod2"]));
    // A rule added by hand to a base chain: replaced too.
    node_nft(&lab.node, false).run(&format!("insert rule ip {} nat-prerouting counter\n", nat_of("plain"))).unwrap();
    lab.syncer.force_full_resync();
    let report = lab.sync(&remaining, &after).unwrap();
    assert!(report.replaced.as_deref().is_some_and(|r| r.contains("chain nat-prerouting has other rules")));
    assert_eq!(static_tables(&lab), replaced);

    // One family's table deleted by hand: nothing to adopt it from, the tables are replaced.
    node_nft(&lab.node, false).run("delete table ip6 hawser\n").unwrap();
    restart(&mut lab, RenderConfig { masquerade_mark: 0x0080_0000 });
    let report = lab.sync(&remaining, &after).unwrap();
    assert_eq!((report.writer, report.replaced.as_deref()), (Writer::Nft, Some("one of our tables is missing")));
    assert_eq!(static_tables(&lab), replaced);
}

/// A listing of our table while another table's chains and rules come and go (another proxy
/// at work) is exact: the kernel counts rules and sets within the table when it resumes a
/// listing in parts, and chains are not listed all together (every table's) but known by
/// their rules, base chains asked for by name.
#[test]
fn a_table_listed_while_another_changes_is_exact() {
    use hawser_dataplane::model::Family;
    use hawser_dataplane::netlink::Netlink;
    let lab = lab!(1);
    let nft = node_nft(&lab.node, false);
    // The other table first: its objects come before ours in the kernel's lists.
    let mut script = String::from("add table ip other\nadd table ip hawser\n");
    script.push_str("add chain ip hawser nat-prerouting { type nat hook prerouting priority -110; policy accept; }\n");
    for i in 0..2000 {
        script.push_str(&format!("add chain ip hawser svc-ns/s{i}/tcp/80\n"));
        script.push_str(&format!("add rule ip hawser svc-ns/s{i}/tcp/80 meta l4proto tcp dnat to 10.0.0.1:80\n"));
    }
    for i in 0..2000 {
        script.push_str(&format!("add chain ip other o{i}\nadd rule ip other o{i} counter\n"));
    }
    nft.run(&script).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, nft) = (stop.clone(), nft.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let script = format!(
                    "add chain ip other c{i}\nadd rule ip other c{i} counter\nadd chain ip other d{i}\n\
                     add rule ip other d{i} counter\ndelete chain ip other o{}\n",
                    i % 2000
                );
                // A chain it deleted in an earlier round is not there to delete again.
                let _ = nft.run(&script);
                i += 1;
            }
            i
        })
    };
    let netlink = common::lab::in_netns(&lab.node, Netlink::open).unwrap();
    for _ in 0..40 {
        let listed = netlink.list_table(Family::V4, "hawser", &["nat-prerouting"]).unwrap().unwrap();
        assert_eq!(listed.rules.len(), 2000, "a listing skipped or repeated rules");
        assert_eq!(listed.chains.len(), 1, "only the base chain asked for");
    }
    stop.store(true, Ordering::SeqCst);
    assert!(churn.join().unwrap() > 0, "the other table did not change");
}
