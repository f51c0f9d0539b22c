//! The mock cloud's data plane: what turns the mock's records into a load balancer packets
//! can go through.
//!
//! The operator's mock provider only keeps records (`/mock/state`). This agent plays the cloud
//! side: it probes every target's health check exactly as recorded (port, path, protocol) and
//! routes each load-balancer address to the healthy targets, passthrough: the packet keeps its
//! destination and the node's dataplane forwards it. Several healthy targets get an ECMP route
//! (the kernel hashes on source and destination address, so one client sticks to one node, as a
//! cloud's 2-tuple hashing does); none gets a blackhole route, so clients see a drop. Health
//! flips after one probe rather than the recorded thresholds, to keep the suite fast.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::netns::sh;
use crate::traffic::{Client, Outcome};

/// Where the agent reads the cloud and how it programs routes.
#[derive(Debug, Clone)]
pub struct LbAgentConfig {
    /// The operator's metrics address, serving `/mock/state`.
    pub state_addr: SocketAddr,
    /// The `ip` command in the namespace that routes load-balancer addresses, e.g.
    /// `["ip", "-n", "router"]` (local backend) or `["ip"]` (kind runner).
    pub ip_argv: Vec<String>,
    /// Time between rounds.
    pub interval: Duration,
}

/// Routes as programmed: load-balancer address → healthy target addresses.
pub type Routes = BTreeMap<IpAddr, Vec<IpAddr>>;

/// A running agent; stops and removes its routes on drop.
pub struct LbAgent {
    stop: Arc<AtomicBool>,
    routes: Arc<Mutex<Routes>>,
    thread: Option<std::thread::JoinHandle<()>>,
    ip_argv: Vec<String>,
}

/// One load balancer as the agent needs it.
struct Wanted {
    addresses: Vec<IpAddr>,
    targets: Vec<IpAddr>,
    port: u16,
    path: Option<String>,
}

fn parse_state(state: &Value) -> Vec<Wanted> {
    let lbs = state.get("loadBalancers").and_then(Value::as_array).cloned().unwrap_or_default();
    lbs.iter()
        .map(|lb| {
            let ips = |v: Option<&Value>| -> Vec<IpAddr> {
                v.and_then(Value::as_array).into_iter().flatten().filter_map(|a| a.as_str()?.parse().ok()).collect()
            };
            let hc = lb.get("healthCheck");
            let http = hc.and_then(|h| h.get("protocol")).and_then(Value::as_str) == Some("HTTP");
            Wanted {
                addresses: ips(lb.get("addresses")).into_iter().filter(IpAddr::is_ipv4).collect(),
                targets: lb
                    .get("targets")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|t| ips(t.get("addresses")).into_iter().find(IpAddr::is_ipv4))
                    .collect(),
                port: hc
                    .and_then(|h| h.get("port"))
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(0),
                path: if http {
                    hc.and_then(|h| h.get("path")).and_then(Value::as_str).map(str::to_owned)
                } else {
                    None
                },
            }
        })
        .collect()
}

fn probe(prober: &Client, target: IpAddr, port: u16, path: Option<&str>) -> bool {
    let addr = SocketAddr::new(target, port);
    match path {
        Some(p) => matches!(prober.http_now(addr, p), Outcome::Reply(_)),
        None => std::net::TcpStream::connect_timeout(&addr, prober.timeout).is_ok(),
    }
}

fn program(ip_argv: &[String], addr: IpAddr, via: &[IpAddr]) -> anyhow::Result<()> {
    let dst = format!("{addr}/32");
    let mut args: Vec<String> = ip_argv.to_vec();
    args.extend(["route", "replace"].map(String::from));
    match via {
        [] => args.extend(["blackhole".to_owned(), dst]),
        [one] => args.extend([dst, "via".to_owned(), one.to_string()]),
        many => {
            args.push(dst);
            for hop in many {
                args.extend(["nexthop".to_owned(), "via".to_owned(), hop.to_string()]);
            }
        }
    }
    sh(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(())
}

fn unroute(ip_argv: &[String], addr: IpAddr) {
    let mut args: Vec<String> = ip_argv.to_vec();
    args.extend(["route".to_owned(), "del".to_owned(), format!("{addr}/32")]);
    let _ = sh(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn round(config: &LbAgentConfig, routes: &Mutex<Routes>) {
    let client = Client { netns: None, source: None, timeout: Duration::from_millis(500) };
    let Outcome::Reply(body) = client.http_now(config.state_addr, "/mock/state") else {
        // The operator is restarting; keep the routes as they are, as a cloud would.
        return;
    };
    let Ok(state) = serde_json::from_str::<Value>(&body) else { return };
    let mut want = Routes::new();
    for lb in parse_state(&state) {
        let healthy: Vec<IpAddr> =
            lb.targets.iter().copied().filter(|t| probe(&client, *t, lb.port, lb.path.as_deref())).collect();
        for addr in lb.addresses {
            want.insert(addr, healthy.clone());
        }
    }
    let Ok(mut have) = routes.lock() else { return };
    for (addr, via) in &want {
        if have.get(addr) != Some(via) && program(&config.ip_argv, *addr, via).is_ok() {
            have.insert(*addr, via.clone());
        }
    }
    let gone: Vec<IpAddr> = have.keys().filter(|a| !want.contains_key(a)).copied().collect();
    for addr in gone {
        unroute(&config.ip_argv, addr);
        have.remove(&addr);
    }
}

impl LbAgent {
    /// Starts the agent on its own thread.
    pub fn start(config: LbAgentConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(Mutex::new(Routes::new()));
        let (flag, r, c) = (stop.clone(), routes.clone(), config.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                round(&c, &r);
                std::thread::sleep(c.interval);
            }
        });
        Self { stop, routes, thread: Some(thread), ip_argv: config.ip_argv }
    }

    /// The routes as programmed now.
    pub fn routes(&self) -> Routes {
        self.routes.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for LbAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for addr in self.routes().keys() {
            unroute(&self.ip_argv, *addr);
        }
    }
}
