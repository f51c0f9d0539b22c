//! Sync and datapath figures: full sync at 1k/10k Services, a one-endpoint change at 10k,
//! NodePort vs direct throughput, and new-connection latency with 10k vs 1 Service.
//! Needs root, `ip` and `nft` (runs inside its own network namespaces); prints figures.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::fixtures::{Ep, Svc, slice};
use common::lab::{Lab, NODE, NODE_IP, in_netns, pod_ip, prerequisites, spawn_sink, tcp};
use hawser_dataplane::diff::{full_plan, partial_plan};
use hawser_dataplane::model::{ModelConfig, build_model};
use hawser_dataplane::nft::{Applier, NftCommand};
use hawser_dataplane::render::{RenderConfig, render, render_from};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const PORTS: &[(&str, &str, u16)] = &[("http", "TCP", 8080)];

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `n` Services × `eps` endpoints; Service 0 points at the lab's real pod 1.
fn cluster(n: usize, eps: usize, first_changed: bool) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = Svc::new("bench", leak(format!("svc-{i}")));
        s.lb_ips = vec![leak(format!("198.18.{}.{}", i / 250, i % 250 + 1))];
        s.ports = vec![("http", "TCP", 80, Some(20000 + i as u16))];
        svcs.push(s.build());
        let list: Vec<Ep<'static>> = if i == 0 {
            vec![Ep::ready(leak(pod_ip(1)), NODE)]
        } else {
            let count = if i == 1 && first_changed { eps - 1 } else { eps };
            (0..count).map(|j| Ep::ready(leak(format!("10.{}.{}.{}", 100 + i / 250, i % 250, j + 1)), "n")).collect()
        };
        slices.push(slice("bench", leak(format!("svc-{i}")), "s", PORTS, &list));
    }
    (svcs, slices)
}

fn cfg() -> ModelConfig {
    ModelConfig { load_balancer_class: "hawser.dev/lb".into(), node_name: NODE.into() }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn full_sync(lab: &Lab, n: usize) -> Applier<NftCommand> {
    let (svcs, slices) = cluster(n, 10, false);
    let t = Instant::now();
    let model = build_model(&svcs, &slices, &cfg());
    let t_model = t.elapsed();
    let t = Instant::now();
    let ruleset = render(&model, &RenderConfig::default());
    let t_render = t.elapsed();
    let t = Instant::now();
    let plan = full_plan(&ruleset);
    let t_diff = t.elapsed();
    let mut applier = Applier::new(NftCommand::with_argv(common::lab::exec_in(&lab.node, "nft")));
    let t = Instant::now();
    applier.sync(ruleset.clone()).unwrap();
    let t_apply = t.elapsed();
    println!(
        "full sync {n:>5} Services x 10 endpoints: model {} + render {} + diff {} + apply {} = {} \
         ({} rules, {} elements, script {} KiB)",
        ms(t_model),
        ms(t_render),
        ms(t_diff),
        ms(t_apply),
        ms(t_render + t_diff + t_apply),
        ruleset.rule_count(),
        ruleset.element_count(),
        plan.script.len() / 1024
    );
    applier
}

fn one_endpoint_change(applier: &mut Applier<NftCommand>, n: usize) {
    let (svcs, slices) = cluster(n, 10, true);
    let model = build_model(&svcs, &slices, &cfg());
    let t = Instant::now();
    let ruleset = render_from(&model, &RenderConfig::default(), applier.applied());
    let t_render = t.elapsed();
    let t = Instant::now();
    let plan = partial_plan(applier.applied().unwrap(), &BTreeSet::new(), &ruleset);
    let t_diff = t.elapsed();
    let t = Instant::now();
    let report = applier.sync(ruleset).unwrap();
    let t_apply = t.elapsed();
    println!(
        "one-endpoint change at {n} Services: render {} + diff {} + apply {} = {} (script {} lines, {} chains rewritten)",
        ms(t_render),
        ms(t_diff),
        ms(t_apply),
        ms(t_render + t_diff + t_apply),
        plan.script.lines().count(),
        report.chains_written
    );
}

fn throughput(lab: &Lab, dst: &str, port: u16, bytes: usize) -> f64 {
    let dst = dst.to_string();
    in_netns(&lab.client, move || {
        let mut s = TcpStream::connect((dst.as_str(), port)).unwrap();
        let chunk = vec![0u8; 1 << 16];
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        sent as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
    })
}

fn connect_latency(lab: &Lab, dst: &str, port: u16, n: usize) -> Duration {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            tcp(&lab.client, dst, port).server();
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples[n / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !prerequisites() {
        return;
    }
    let lab = Lab::new(1).unwrap();
    spawn_sink(&lab.pods[0], 9000);

    full_sync(&lab, 1_000);
    let mut applier = full_sync(&lab, 10_000);
    one_endpoint_change(&mut applier, 10_000);

    // Latency: Service 0 (the real pod) among 10k Services, then alone.
    let lat_10k = connect_latency(&lab, "198.18.0.1", 80, 300);
    let (svcs, slices) = cluster(1, 10, false);
    let ruleset = render_from(&build_model(&svcs, &slices, &cfg()), &RenderConfig::default(), applier.applied());
    applier.sync(ruleset).unwrap();
    let lat_1 = connect_latency(&lab, "198.18.0.1", 80, 300);
    println!(
        "new-connection latency (connect + echo, median of 300): 10k Services {} vs 1 Service {} -> ratio {:.2}",
        format_us(lat_10k),
        format_us(lat_1),
        lat_10k.as_secs_f64() / lat_1.as_secs_f64()
    );

    // Throughput: NodePort (DNAT + masquerade) vs straight to the pod through the same node.
    let mut sink = Svc::new("bench", "sink");
    sink.lb_ips = vec!["198.18.200.1"];
    sink.ports = vec![("http", "TCP", 80, Some(30090))];
    let sink_slice = slice("bench", "sink", "s", &[("http", "TCP", 9000)], &[Ep::ready(leak(pod_ip(1)), NODE)]);
    let model = build_model(&[sink.build()], &[sink_slice], &cfg());
    applier.sync(render_from(&model, &RenderConfig::default(), applier.applied())).unwrap();
    let bytes = 1usize << 30;
    let direct = throughput(&lab, &pod_ip(1), 9000, bytes);
    let nodeport = throughput(&lab, NODE_IP, 30090, bytes);
    println!(
        "throughput (1 GiB, one TCP stream): direct {direct:.2} Gbit/s, NodePort {nodeport:.2} Gbit/s -> ratio {:.2}",
        nodeport / direct
    );
    applier.cleanup().unwrap();
}

fn format_us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}
