//! What a cloud answers once a load balancer matches its spec.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Protocol;

/// How traffic to an ingress IP reaches the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpMode {
    /// Packets arrive at the node still addressed to the load-balancer IP (passthrough).
    #[serde(rename = "VIP")]
    Vip,
    /// The load balancer proxies: packets arrive addressed to the node.
    Proxy,
}

/// A port the load balancer serves, as reported in the Service status.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortStatus {
    /// The port.
    pub port: u16,
    /// Its protocol (`TCP` or `UDP`; `TCP_UDP` is reported as two entries).
    pub protocol: Protocol,
}

/// One address clients use to reach the load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IngressPoint {
    /// The IP, for clouds that give one.
    pub ip: Option<IpAddr>,
    /// The DNS name, for clouds that give one (AWS NLB).
    pub hostname: Option<String>,
    /// How packets for the IP reach the nodes.
    pub ip_mode: Option<IpMode>,
    /// The ports served at this address.
    pub ports: Vec<PortStatus>,
}

/// The load balancer as built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerStatus {
    /// The cloud's identifier for the load balancer (ARN, self-link, mock id).
    pub id: String,
    /// Where clients reach it.
    pub ingress: Vec<IngressPoint>,
}
