//! The `Provider` trait every cloud implements.

use async_trait::async_trait;

use crate::{ChangePlan, InvalidField, LoadBalancerSpec, LoadBalancerStatus, ProviderError, ServiceIdentity};

/// Annotation prefixes that belong to one cloud each. A Service may carry several clouds'
/// annotations (one manifest for EKS and GKE); each provider reads only its own.
pub const PROVIDER_ANNOTATION_PREFIXES: &[&str] = &["hawser.dev/aws-", "hawser.dev/gcp-", "hawser.dev/mock-"];

/// What a cloud's load balancers need from the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Targets are `node:nodePort` (AWS instance targets), so Services need node ports.
    pub needs_node_ports: bool,
    /// UDP listeners are supported.
    pub supports_udp: bool,
    /// Services can share one load balancer (`hawser.dev/load-balancer-group`); `None` where
    /// this provider does not do that yet.
    pub groups: Option<GroupLimits>,
}

/// What one shared load balancer can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Listeners (port and protocol; TCP_UDP counts once) on one load balancer.
    pub max_listeners: usize,
    /// Forwarding rules on one address, where the cloud builds one per member and protocol
    /// (GCP); `None` where nothing else is counted.
    pub max_rules: Option<usize>,
}

/// A load balancer this cluster owns, as found in the cloud.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnedLoadBalancer {
    /// The owner, from the ownership tags.
    pub identity: ServiceIdentity,
    /// The cloud's identifier.
    pub id: String,
    /// What the load balancer is configured as, condensed; compared with [`Provider::fingerprint`]
    /// of the desired spec to find drift without reading each load balancer. `None` when the
    /// inventory cannot tell (then only a missing load balancer counts as drift).
    pub fingerprint: Option<String>,
    /// Not a load balancer but resources of the owner's left without one (a crash between
    /// creating them and the load balancer): the orphan collector deletes them with the rest of
    /// the owner's once the owner is gone; the drift check does not count them as its load
    /// balancer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
    /// For a member's part of a load-balancer group's load balancer (or a leftover of one): the
    /// group, as `namespace/name`. The orphan collector changes that load balancer under the
    /// group's lock, as every change to it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A cloud that builds load balancers.
///
/// Every method is idempotent: the operator may call it again after a crash at any point, and
/// resources are found again by ownership tags, never by memory alone.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name for logs and metrics (`mock`, `aws`, `gcp`).
    fn name(&self) -> &'static str;

    /// What this cloud's load balancers need.
    fn capabilities(&self) -> Capabilities;

    /// The `hawser.dev/<cloud>-*` annotations this provider understands.
    fn annotations(&self) -> &'static [&'static str] {
        &[]
    }

    /// Of those, the ones that configure the whole load balancer rather than one Service's part
    /// of it: every member of a load-balancer group must give them the same values.
    fn group_annotations(&self) -> &'static [&'static str] {
        &[]
    }

    /// Checks the provider-specific parts of `spec` without any cloud call.
    fn validate(&self, spec: &LoadBalancerSpec) -> Result<(), Vec<InvalidField>> {
        let _ = spec;
        Ok(())
    }

    /// The fingerprint [`Provider::list_owned`] reports for a load balancer that matches `spec`;
    /// `None` when this cloud's inventory carries none.
    fn fingerprint(&self, spec: &LoadBalancerSpec) -> Option<String> {
        let _ = spec;
        None
    }

    /// Creates or updates the load balancer so that it matches `spec`.
    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError>;

    /// The changes [`Provider::ensure`] would make for `spec`, found by reading the cloud only.
    /// A resource with hawser's name that hawser does not own is a conflict in the plan, not an
    /// error; a spec the cloud cannot realise is [`ProviderError::InvalidInput`], as for ensure.
    async fn plan(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError>;

    /// The changes [`Provider::delete`] would make for `identity`, found by reading only.
    async fn plan_delete(&self, identity: &ServiceIdentity) -> Result<ChangePlan, ProviderError>;

    /// Deletes every cloud resource owned by `identity`; absent is success.
    async fn delete(&self, identity: &ServiceIdentity) -> Result<(), ProviderError>;

    /// Deletes one resource that [`Provider::list_owned`] reported as `detached` while its
    /// owner lives (an interrupted change left it, and the owner's ensure no longer wants it),
    /// unless it is in use again by now. Absent is success.
    async fn delete_detached(&self, leftover: &OwnedLoadBalancer) -> Result<(), ProviderError> {
        let _ = leftover;
        Ok(())
    }

    /// Takes `identity`'s part out of load-balancer group `group`'s (`namespace/name`) load
    /// balancer, deleting the load balancer with its last member; absent is success. The
    /// operator calls it once the Service left the group and its own load balancer serves it.
    /// Providers whose [`Provider::ensure`] already finds a part left behind need not.
    async fn leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        let _ = (identity, group);
        Ok(())
    }

    /// The changes [`Provider::leave_group`] would make, found by reading only. Providers whose
    /// [`Provider::plan`] of a Service in no group already shows its part of a group going
    /// need not.
    async fn plan_leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<ChangePlan, ProviderError> {
        let _ = (identity, group);
        Ok(ChangePlan::default())
    }

    /// Every load balancer this cluster owns: complete (every page) and batched, so that it costs
    /// a handful of calls however many Services there are. The periodic drift check runs on it.
    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError>;
}
