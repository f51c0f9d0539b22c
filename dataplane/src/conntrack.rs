//! UDP conntrack cleanup after a sync, through the `conntrack` CLI (Debian package
//! `conntrack`).
//!
//! UDP has no connection end: a client that keeps sending from the same port keeps hitting
//! the conntrack entry that DNATs to an endpoint that is gone. After a sync we delete UDP
//! entries whose original destination is one of our Service ports and whose reply source is
//! an endpoint that no longer serves that port.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use crate::model::{ClusterModel, Family, Protocol, ServiceModel};

/// One class of flows to delete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlow {
    /// Original destination address (load-balancer address); `None` for a NodePort, which
    /// matches on any destination.
    pub orig_dst: Option<IpAddr>,
    /// Original destination port (Service port or NodePort).
    pub orig_port: u16,
    /// The endpoint that no longer serves.
    pub reply_src: IpAddr,
}

/// Failure to run conntrack.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// conntrack could not be started.
    #[error("running {program:?}: {source}")]
    Spawn {
        /// Command line.
        program: String,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// conntrack failed.
    #[error("conntrack failed ({status}): {stderr}")]
    Failed {
        /// Exit status.
        status: String,
        /// Its error output.
        stderr: String,
    },
}

/// The (destination, endpoint) pairs of UDP ports used by `services`.
fn udp_flows<'a>(services: impl IntoIterator<Item = &'a ServiceModel>) -> BTreeSet<StaleFlow> {
    let mut flows = BTreeSet::new();
    for svc in services {
        for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            for family in [Family::V4, Family::V6] {
                let (endpoints, _) = svc.usable_endpoints(port, family);
                for ep in endpoints {
                    for addr in svc.lb_addresses.iter().filter(|a| Family::of(a) == family) {
                        flows.insert(StaleFlow { orig_dst: Some(*addr), orig_port: port.port, reply_src: ep.ip });
                    }
                    if let Some(node_port) = port.node_port {
                        flows.insert(StaleFlow { orig_dst: None, orig_port: node_port, reply_src: ep.ip });
                    }
                }
            }
        }
    }
    flows
}

/// Flows served before and not any more (pure).
pub fn stale_udp_flows(before: &ClusterModel, after: &ClusterModel) -> Vec<StaleFlow> {
    let now = udp_flows(after.services.values());
    udp_flows(before.services.values()).into_iter().filter(|f| !now.contains(f)).collect()
}

/// Flows one Service served before and not any more (pure): a sync compares only the
/// Services it changes.
pub fn stale_service_flows(before: Option<&ServiceModel>, after: Option<&ServiceModel>) -> Vec<StaleFlow> {
    let Some(before) = before else { return Vec::new() };
    let now = udp_flows(after);
    udp_flows([before]).into_iter().filter(|f| !now.contains(f)).collect()
}

/// Runs the `conntrack` binary, optionally behind a prefix such as `ip netns exec NODE`.
#[derive(Debug, Clone)]
pub struct ConntrackCommand {
    argv: Vec<String>,
}

impl ConntrackCommand {
    /// `conntrack` from PATH.
    pub fn new() -> Self {
        Self { argv: vec!["conntrack".into()] }
    }

    /// A custom command line ending in the conntrack binary.
    pub fn with_argv(argv: Vec<String>) -> Self {
        Self { argv }
    }

    /// Deletes the entries of `flow`. Finding none is not an error.
    pub fn delete(&self, flow: &StaleFlow) -> Result<(), ConntrackError> {
        let (program, rest) = match self.argv.split_first() {
            Some((p, rest)) => (p.as_str(), rest),
            None => ("conntrack", &[][..]),
        };
        let mut cmd = Command::new(program);
        cmd.args(rest);
        let family = if flow.reply_src.is_ipv4() { "ipv4" } else { "ipv6" };
        cmd.args(["-D", "-f", family, "-p", "udp"]);
        if let Some(dst) = flow.orig_dst {
            cmd.args(["--orig-dst", &dst.to_string()]);
        }
        cmd.args(["--orig-port-dst", &flow.orig_port.to_string()]);
        cmd.args(["--reply-src", &flow.reply_src.to_string()]);
        let out = cmd.output().map_err(|source| ConntrackError::Spawn { program: self.argv.join(" "), source })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // conntrack exits 1 when no entry matched; that is the common, fine case.
        if out.status.success() || stderr.contains("0 flow entries") {
            Ok(())
        } else {
            Err(ConntrackError::Failed { status: out.status.to_string(), stderr: stderr.trim().to_string() })
        }
    }
}

impl Default for ConntrackCommand {
    fn default() -> Self {
        Self::new()
    }
}
