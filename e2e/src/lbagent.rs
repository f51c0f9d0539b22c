//! The mock cloud's data plane: what turns the mock's records into a load balancer packets
//! can go through.
//!
//! The operator's mock provider only keeps records (`/mock/state`). This agent plays the cloud
//! side: it probes every target's health check exactly as recorded (port, path, protocol) and
//! routes each load-balancer address to the healthy targets, passthrough: the packet keeps its
//! destination and the node's dataplane forwards it. Several healthy targets get an ECMP route
//! (the kernel hashes on source and destination address, so one client sticks to one node, as a
//! cloud's 2-tuple hashing does); none gets a blackhole route, so clients see a drop. Like a
//! cloud, it honours the recorded thresholds: a target turns unhealthy after that many failed
//! probes in a row and healthy after that many successes, so one slow probe on a busy machine
//! does not pull a node out of the route (and rehash its flows) mid-connection.

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
    /// Where each route change is logged with its time, if anywhere.
    pub log: Option<std::path::PathBuf>,
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
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

/// The health of one target's check, as the agent has judged it over the rounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    healthy: bool,
    /// Probes in a row that disagreed with `healthy`.
    streak: u32,
}

impl Verdict {
    /// Records one probe and returns the verdict: it flips only after `healthy_threshold`
    /// successes (to healthy) or `unhealthy_threshold` failures (to unhealthy) in a row. A new
    /// target starts unhealthy, as at a cloud.
    fn record(&mut self, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> bool {
        if ok == self.healthy {
            self.streak = 0;
        } else {
            self.streak += 1;
            let needed = if ok { healthy_threshold } else { unhealthy_threshold };
            if self.streak >= needed.max(1) {
                *self = Self { healthy: ok, streak: 0 };
            }
        }
        self.healthy
    }
}

/// Verdicts by (target, health port, HTTP path).
type Verdicts = BTreeMap<(IpAddr, u16, Option<String>), Verdict>;

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
                healthy_threshold: threshold(hc, "healthyThreshold"),
                unhealthy_threshold: threshold(hc, "unhealthyThreshold"),
            }
        })
        .collect()
}

fn threshold(hc: Option<&Value>, key: &str) -> u32 {
    hc.and_then(|h| h.get(key)).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).unwrap_or(1)
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

fn round(config: &LbAgentConfig, routes: &Mutex<Routes>, verdicts: &mut Verdicts) {
    let client = Client { netns: None, source: None, timeout: Duration::from_millis(500) };
    let Outcome::Reply(body) = client.http_now(config.state_addr, "/mock/state") else {
        // The operator is restarting; keep the routes as they are, as a cloud would.
        return;
    };
    let Ok(state) = serde_json::from_str::<Value>(&body) else { return };
    let mut want = Routes::new();
    let mut seen = Verdicts::new();
    for lb in parse_state(&state) {
        let mut healthy = Vec::new();
        for &target in &lb.targets {
            let key = (target, lb.port, lb.path.clone());
            // Load balancers sharing a check probe it once a round.
            let up = match seen.get(&key) {
                Some(verdict) => verdict.healthy,
                None => {
                    let mut verdict = verdicts.get(&key).copied().unwrap_or_default();
                    let ok = probe(&client, target, lb.port, lb.path.as_deref());
                    let up = verdict.record(ok, lb.healthy_threshold, lb.unhealthy_threshold);
                    seen.insert(key, verdict);
                    up
                }
            };
            if up {
                healthy.push(target);
            }
        }
        for addr in lb.addresses {
            want.insert(addr, healthy.clone());
        }
    }
    // Targets no load balancer has any more are forgotten.
    *verdicts = seen;
    let Ok(mut have) = routes.lock() else { return };
    for (addr, via) in &want {
        if have.get(addr) != Some(via) && program(&config.ip_argv, *addr, via).is_ok() {
            log_change(config, &format!("{addr} via {via:?} (was {:?})", have.get(addr)));
            have.insert(*addr, via.clone());
        }
    }
    let gone: Vec<IpAddr> = have.keys().filter(|a| !want.contains_key(a)).copied().collect();
    for addr in gone {
        log_change(config, &format!("{addr} unrouted"));
        unroute(&config.ip_argv, addr);
        have.remove(&addr);
    }
}

/// Appends `what` to the agent's log, after the time (UTC, as the binaries' logs write it).
fn log_change(config: &LbAgentConfig, what: &str) {
    use std::io::Write as _;
    let Some(path) = &config.log else { return };
    if let Ok(mut f) = std::fs::File::options().create(true).append(true).open(path) {
        let _ = writeln!(f, "{} route {what}", crate::traffic::utc_now());
    }
}

impl LbAgent {
    /// Starts the agent on its own thread.
    pub fn start(config: LbAgentConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(Mutex::new(Routes::new()));
        let (flag, r, c) = (stop.clone(), routes.clone(), config.clone());
        let thread = std::thread::spawn(move || {
            let mut verdicts = Verdicts::new();
            while !flag.load(Ordering::Relaxed) {
                round(&c, &r, &mut verdicts);
                std::thread::sleep(c.interval);
            }
        });
        Self { stop, routes, thread: Some(thread), ip_argv: config.ip_argv }
    }

    /// The routes as programmed now.
    pub fn routes(&self) -> Routes {
        self.routes.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Whether `addr` is routed, and only to targets the cloud's `state` still has: a
    /// deregistration is in effect. A cloud applies it as it records it; this agent on its
    /// next round, and moving a client's next connection to another node meanwhile would be
    /// the agent's doing, not the dataplane's.
    pub fn settled(&self, state: &Value, addr: IpAddr) -> bool {
        let targets: Vec<IpAddr> = parse_state(state)
            .into_iter()
            .filter(|lb| lb.addresses.contains(&addr))
            .flat_map(|lb| lb.targets)
            .collect();
        self.routes().get(&addr).is_some_and(|via| !via.is_empty() && via.iter().all(|hop| targets.contains(hop)))
    }

    /// Waits (at most 30 s) until [`Self::settled`] holds for `addr`, reading the cloud's state
    /// with `state`.
    pub async fn wait_settled<F, Fut>(&self, addr: IpAddr, state: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Value>>,
    {
        crate::scenarios::until(
            "the load balancer routes only to the cloud's targets",
            Duration::from_secs(30),
            || async {
                let state = state().await?;
                anyhow::ensure!(self.settled(&state, addr), "routes {:?}", self.routes().get(&addr));
                Ok(())
            },
        )
        .await
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

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn health_flips_only_after_the_thresholds_in_a_row() {
        let mut v = Verdict::default();
        // New: unhealthy until two successes in a row.
        assert!(!v.record(true, 2, 3));
        assert!(v.record(true, 2, 3));
        // One or two failures (a slow probe) change nothing; a success resets the count.
        assert!(v.record(false, 2, 3));
        assert!(v.record(false, 2, 3));
        assert!(v.record(true, 2, 3));
        assert!(v.record(false, 2, 3));
        assert!(v.record(false, 2, 3));
        // The third failure in a row takes it out.
        assert!(!v.record(false, 2, 3));
        assert!(!v.record(true, 2, 3));
        assert!(v.record(true, 2, 3));
    }
}
