//! The mock cloud's resources, indexed so that every call costs the same however big the cloud
//! is, and their optional persistence to a file.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_SERVICE_UID};
use crate::{HealthCheck, IpFamily, Listener, Scheme, ServiceIdentity, SessionAffinity, Targets};

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
    /// Registered nodes; load balancers made from one node set share one list.
    pub targets: Targets,
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
    /// For the load balancer of a load-balancer group: the group, as `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// For the load balancer of a group: each member Service's part, by its UID. The
    /// `listeners` above are then all members' listeners together.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberPart>,
}

/// One Service's part of a group's load balancer: what belongs to it alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberPart {
    /// The Service, as `namespace/name`.
    pub service: String,
    /// Its listeners.
    pub listeners: Vec<Listener>,
    /// How nodes are probed for it.
    pub health_check: HealthCheck,
    /// Clients allowed to its ports (empty: all).
    pub source_ranges: Vec<ipnet::IpNet>,
    /// Client stickiness on its ports.
    pub session_affinity: SessionAffinity,
}

impl MockLoadBalancer {
    /// Its configuration condensed: everything a spec decides except the allocated addresses,
    /// the id and the revision. Stable within one build of hawser, which is all the drift check
    /// (operator and mock in one process) needs.
    pub fn fingerprint(&self) -> String {
        let mut h = std::hash::DefaultHasher::new();
        (&self.tags, &self.listeners, &self.targets, &self.health_check).hash(&mut h);
        (self.scheme, &self.source_ranges, self.session_affinity).hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The fingerprint of the member `uid`'s part, with what its members share; the drift check
    /// compares it with what that member was ensured as.
    pub fn member_fingerprint(&self, uid: &str) -> Option<String> {
        let part = self.members.get(uid)?;
        Some(member_fingerprint(part, &self.targets, self.scheme, self.group.as_deref()))
    }
}

/// See [`MockLoadBalancer::member_fingerprint`].
pub fn member_fingerprint(part: &MemberPart, targets: &Targets, scheme: Scheme, group: Option<&str>) -> String {
    let mut h = std::hash::DefaultHasher::new();
    (part, targets, scheme, group).hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Everything the mock cloud holds. Mutations go through [`CloudState::insert`] and
/// [`CloudState::remove`], which keep the lookup indexes in step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudState {
    /// Bumped on every save, and first in the file, so that a process sharing the file can tell
    /// from its first bytes whether it must re-read the rest.
    pub generation: u64,
    /// Sequence for ids.
    pub next_id: u64,
    /// Load balancers by id.
    load_balancers: BTreeMap<String, MockLoadBalancer>,
    #[serde(skip)]
    index: Index,
}

#[derive(Debug, Clone, Default)]
struct Index {
    /// (cluster, Service UID) → id, from the ownership tags.
    by_owner: HashMap<(String, String), String>,
    /// (cluster, member Service UID) → id of the group load balancer it is part of.
    by_member: HashMap<(String, String), String>,
    /// (cluster, `namespace/group`) → id of the group's load balancer.
    by_group: HashMap<(String, String), String>,
    /// Name → id.
    by_name: HashMap<String, String>,
    /// Address → id.
    by_address: HashMap<IpAddr, String>,
    /// Id → fingerprint, computed once per write rather than once per listing.
    fingerprints: HashMap<String, String>,
    /// The address allocated last, per family: where the next search starts.
    last_allocated: HashMap<IpFamily, IpAddr>,
}

impl CloudState {
    /// Every load balancer, by id.
    pub fn load_balancers(&self) -> &BTreeMap<String, MockLoadBalancer> {
        &self.load_balancers
    }

    /// The load balancer `id`.
    pub fn get(&self, id: &str) -> Option<&MockLoadBalancer> {
        self.load_balancers.get(id)
    }

    /// The load balancer owned by `identity` (by ownership tags).
    pub fn owned_by(&self, identity: &ServiceIdentity) -> Option<&MockLoadBalancer> {
        let id = self.index.by_owner.get(&(identity.cluster.clone(), identity.uid.clone()))?;
        self.load_balancers.get(id)
    }

    /// The load balancer of load-balancer group `group` (`namespace/name`) of `cluster`.
    pub fn of_group(&self, cluster: &str, group: &str) -> Option<&MockLoadBalancer> {
        self.load_balancers.get(self.index.by_group.get(&(cluster.to_owned(), group.to_owned()))?)
    }

    /// The group load balancer `identity` is a member of, if any.
    pub fn member_of(&self, identity: &ServiceIdentity) -> Option<&MockLoadBalancer> {
        self.load_balancers.get(self.index.by_member.get(&(identity.cluster.clone(), identity.uid.clone()))?)
    }

    /// The load balancer named `name`.
    pub fn named(&self, name: &str) -> Option<&MockLoadBalancer> {
        self.load_balancers.get(self.index.by_name.get(name)?)
    }

    /// The load balancer holding `addr`, if any.
    pub fn holder_of(&self, addr: &IpAddr) -> Option<&MockLoadBalancer> {
        self.load_balancers.get(self.index.by_address.get(addr)?)
    }

    /// The fingerprint of load balancer `id`.
    pub fn fingerprint_of(&self, id: &str) -> Option<&str> {
        self.index.fingerprints.get(id).map(String::as_str)
    }

    /// How many addresses are held.
    pub fn used_count(&self) -> usize {
        self.index.by_address.len()
    }

    /// The address of `family` allocated last.
    pub fn last_allocated(&self, family: IpFamily) -> Option<IpAddr> {
        self.index.last_allocated.get(&family).copied()
    }

    /// Remembers where the last allocation of `family` landed.
    pub fn allocated(&mut self, addr: IpAddr) {
        self.index.last_allocated.insert(IpFamily::of(&addr), addr);
    }

    /// Adds or replaces a load balancer.
    pub fn insert(&mut self, lb: MockLoadBalancer) {
        self.remove(&lb.id.clone());
        self.index_one(&lb);
        self.load_balancers.insert(lb.id.clone(), lb);
    }

    /// Removes a load balancer; absent is fine.
    pub fn remove(&mut self, id: &str) -> Option<MockLoadBalancer> {
        let lb = self.load_balancers.remove(id)?;
        if let Some(owner) = owner_key(&lb) {
            self.index.by_owner.remove(&owner);
        }
        if let (Some(cluster), Some(group)) = (lb.tags.get(OWNERSHIP_TAG_CLUSTER), &lb.group) {
            self.index.by_group.remove(&(cluster.clone(), group.clone()));
            for uid in lb.members.keys() {
                self.index.by_member.remove(&(cluster.clone(), uid.clone()));
            }
        }
        self.index.by_name.remove(&lb.name);
        self.index.fingerprints.remove(&lb.id);
        for a in &lb.addresses {
            self.index.by_address.remove(a);
        }
        Some(lb)
    }

    fn index_one(&mut self, lb: &MockLoadBalancer) {
        if let Some(owner) = owner_key(lb) {
            self.index.by_owner.insert(owner, lb.id.clone());
        }
        if let (Some(cluster), Some(group)) = (lb.tags.get(OWNERSHIP_TAG_CLUSTER), &lb.group) {
            self.index.by_group.insert((cluster.clone(), group.clone()), lb.id.clone());
            for uid in lb.members.keys() {
                self.index.by_member.insert((cluster.clone(), uid.clone()), lb.id.clone());
            }
        }
        self.index.by_name.insert(lb.name.clone(), lb.id.clone());
        self.index.fingerprints.insert(lb.id.clone(), lb.fingerprint());
        for a in &lb.addresses {
            self.index.by_address.insert(*a, lb.id.clone());
        }
    }

    fn reindex(&mut self) {
        self.index = Index::default();
        let all: Vec<MockLoadBalancer> = self.load_balancers.values().cloned().collect();
        for lb in &all {
            self.index_one(lb);
        }
    }

    /// Reads a state file; a missing file is an empty cloud.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let mut state: Self = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("mock state file {} is not valid mock cloud state: {e}", path.display()))?;
                state.reindex();
                Ok(state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read mock state file {}: {e}", path.display())),
        }
    }

    /// The generation of the state file at `path`, read from its first bytes; `None` when the
    /// file is missing or does not start as [`CloudState::save`] writes it.
    pub fn generation_of(path: &Path) -> Option<u64> {
        use std::io::Read;
        let mut head = [0u8; 64];
        let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
        let text = std::str::from_utf8(&head[..n]).ok()?;
        let rest = text.split_once("\"generation\":")?.1.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Writes a state file atomically (write beside it, then rename), so a crash mid-write
    /// leaves the previous state rather than a torn file. Bumps the generation.
    pub fn save(&mut self, path: &Path) -> Result<(), String> {
        self.generation += 1;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| format!("cannot encode mock state: {e}"))?;
        std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
    }
}

fn owner_key(lb: &MockLoadBalancer) -> Option<(String, String)> {
    Some((lb.tags.get(OWNERSHIP_TAG_CLUSTER)?.clone(), lb.tags.get(OWNERSHIP_TAG_SERVICE_UID)?.clone()))
}
