//! Ownership tags and deterministic names shared by every cloud.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::ServiceIdentity;

/// Tag naming the cluster that owns a cloud resource.
pub const OWNERSHIP_TAG_CLUSTER: &str = "hawser.dev/cluster";
/// Tag naming the owning Service as `namespace/name`.
pub const OWNERSHIP_TAG_SERVICE: &str = "hawser.dev/service";
/// Tag holding the owning Service's UID; the key used to find a load balancer again.
pub const OWNERSHIP_TAG_SERVICE_UID: &str = "hawser.dev/service-uid";
/// Tag naming what the resource is to hawser (e.g. `load-balancer`, `target-group`).
pub const OWNERSHIP_TAG_RESOURCE: &str = "hawser.dev/resource";
/// Tag naming the load-balancer group (`namespace/name`) a shared resource belongs to.
pub const OWNERSHIP_TAG_GROUP: &str = "hawser.dev/load-balancer-group";

/// The ownership tags every cloud resource of `identity` carries.
pub fn ownership_tags(identity: &ServiceIdentity, resource: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (OWNERSHIP_TAG_CLUSTER.to_owned(), identity.cluster.clone()),
        (OWNERSHIP_TAG_SERVICE.to_owned(), identity.service_key()),
        (OWNERSHIP_TAG_SERVICE_UID.to_owned(), identity.uid.clone()),
        (OWNERSHIP_TAG_RESOURCE.to_owned(), resource.to_owned()),
    ])
}

/// A stable lowercase hex digest of `parts`, `len` characters long (at most 64).
///
/// Clouds limit name lengths (32 on AWS, 63 on GCP), so names are built from a short prefix and
/// this digest of the cluster and Service UID: the same Service always maps to the same name,
/// which is what makes a crash between "create" and "remember" harmless.
pub fn stable_hash(parts: &[&str], len: usize) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        // A separator that cannot occur in names keeps ("ab","c") and ("a","bc") apart.
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(hex.len())].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_deterministic_and_separates_parts() {
        assert_eq!(stable_hash(&["a", "b"], 12), stable_hash(&["a", "b"], 12));
        assert_ne!(stable_hash(&["ab", "c"], 12), stable_hash(&["a", "bc"], 12));
        assert_eq!(stable_hash(&["x"], 12).len(), 12);
        assert!(stable_hash(&["x"], 80).len() == 64);
    }

    #[test]
    fn ownership_tags_name_cluster_service_and_uid() {
        let id = ServiceIdentity {
            cluster: "prod".into(),
            namespace: "shop".into(),
            name: "web".into(),
            uid: "1234".into(),
        };
        let tags = ownership_tags(&id, "load-balancer");
        assert_eq!(tags[OWNERSHIP_TAG_CLUSTER], "prod");
        assert_eq!(tags[OWNERSHIP_TAG_SERVICE], "shop/web");
        assert_eq!(tags[OWNERSHIP_TAG_SERVICE_UID], "1234");
        assert_eq!(tags[OWNERSHIP_TAG_RESOURCE], "load-balancer");
    }
}
