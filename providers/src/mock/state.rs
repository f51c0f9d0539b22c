//! The mock cloud's resources, and their optional persistence to a file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{HealthCheck, Listener, Scheme, SessionAffinity, Target};

/// One load balancer in the mock cloud, shaped like a cloud's record of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MockLoadBalancer {
    /// The cloud-assigned id.
    pub id: String,
    /// The deterministic name.
    pub name: String,
    /// Ownership and user tags.
    pub tags: BTreeMap<String, String>,
    /// Allocated addresses, one per family.
    pub addresses: Vec<IpAddr>,
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// Registered nodes.
    pub targets: Vec<Target>,
    /// How nodes are probed.
    pub health_check: HealthCheck,
    /// Internet-facing or internal.
    pub scheme: Scheme,
    /// Allowed client ranges (empty: all).
    pub source_ranges: Vec<ipnet::IpNet>,
    /// Client stickiness.
    pub session_affinity: SessionAffinity,
    /// Bumped on every modification.
    pub revision: u64,
}

/// Everything the mock cloud holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudState {
    /// Sequence for ids.
    pub next_id: u64,
    /// Load balancers by id.
    pub load_balancers: BTreeMap<String, MockLoadBalancer>,
}

impl CloudState {
    /// Addresses held by any load balancer.
    pub fn used_addresses(&self) -> BTreeSet<IpAddr> {
        self.load_balancers.values().flat_map(|lb| lb.addresses.iter().copied()).collect()
    }

    /// The load balancer holding `addr`, if any.
    pub fn holder_of(&self, addr: &IpAddr) -> Option<&MockLoadBalancer> {
        self.load_balancers.values().find(|lb| lb.addresses.contains(addr))
    }

    /// Reads a state file; a missing file is an empty cloud.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("mock state file {} is not valid mock cloud state: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read mock state file {}: {e}", path.display())),
        }
    }

    /// Writes a state file atomically (write beside it, then rename), so a crash mid-write
    /// leaves the previous state rather than a torn file.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| format!("cannot encode mock state: {e}"))?;
        std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
    }
}
