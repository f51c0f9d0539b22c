//! Builders for Services and EndpointSlices used by the tests.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

/// A Service port: (name, protocol, port, nodePort).
pub type Port<'a> = (&'a str, &'a str, u16, Option<u16>);

/// Options of a test Service.
#[derive(Clone)]
pub struct Svc<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub class: &'a str,
    pub ports: Vec<Port<'a>>,
    pub lb_ips: Vec<&'a str>,
    pub local: bool,
    pub affinity_timeout: Option<i32>,
    pub source_ranges: Vec<&'a str>,
    pub families: Vec<&'a str>,
}

impl<'a> Svc<'a> {
    pub fn new(ns: &'a str, name: &'a str) -> Self {
        Self {
            ns,
            name,
            class: "hawser.dev/lb",
            ports: vec![("http", "TCP", 80, Some(30080))],
            lb_ips: vec!["203.0.113.10"],
            local: false,
            affinity_timeout: None,
            source_ranges: vec![],
            families: vec![],
        }
    }

    pub fn build(&self) -> Service {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(n, p, port, np)| {
                let mut v = json!({"name": n, "protocol": p, "port": port});
                if let Some(np) = np {
                    v["nodePort"] = json!(np);
                }
                v
            })
            .collect();
        let mut spec = json!({
            "type": "LoadBalancer",
            "loadBalancerClass": self.class,
            "ports": ports,
            "externalTrafficPolicy": if self.local { "Local" } else { "Cluster" },
        });
        if let Some(t) = self.affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if !self.families.is_empty() {
            spec["ipFamilies"] = json!(self.families);
        }
        let ingress: Vec<Value> = self.lb_ips.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": self.ns, "name": self.name},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress}},
        }))
        .unwrap()
    }
}

/// One endpoint of a slice: address, node, ready, serving, terminating (None = unset).
#[derive(Clone)]
pub struct Ep<'a> {
    pub ip: &'a str,
    pub node: &'a str,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl<'a> Ep<'a> {
    pub fn ready(ip: &'a str, node: &'a str) -> Self {
        Self { ip, node, ready: Some(true), serving: Some(true), terminating: Some(false) }
    }

    pub fn terminating(ip: &'a str, node: &'a str) -> Self {
        Self { ip, node, ready: Some(false), serving: Some(true), terminating: Some(true) }
    }
}

/// An EndpointSlice for `svc` with `ports` (name, protocol, target port).
pub fn slice(ns: &str, svc: &str, slice_name: &str, ports: &[(&str, &str, u16)], eps: &[Ep<'_>]) -> EndpointSlice {
    let v6 = eps.iter().any(|e| e.ip.contains(':'));
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| {
            let mut cond = serde_json::Map::new();
            if let Some(r) = e.ready {
                cond.insert("ready".into(), json!(r));
            }
            if let Some(s) = e.serving {
                cond.insert("serving".into(), json!(s));
            }
            if let Some(t) = e.terminating {
                cond.insert("terminating".into(), json!(t));
            }
            json!({"addresses": [e.ip], "nodeName": e.node, "conditions": cond})
        })
        .collect();
    let ports: Vec<Value> = ports.iter().map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port})).collect();
    serde_json::from_value(json!({
        "metadata": {
            "namespace": ns,
            "name": slice_name,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": endpoints,
        "ports": ports,
    }))
    .unwrap()
}

/// A Node, optionally being deleted or tainted by the autoscaler.
pub fn node(name: &str, deleting: bool, autoscaler: bool) -> Node {
    let mut v = json!({"metadata": {"name": name}, "spec": {}});
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
    }
    if autoscaler {
        v["spec"]["taints"] = json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]);
    }
    serde_json::from_value(v).unwrap()
}
