//! The GCP provider: a backend-service based passthrough Network Load Balancer per Service,
//! external or internal.
//!
//! Packets reach the nodes still addressed to the load-balancer IP and the Service port (no node
//! ports), where the hawser dataplane forwards them. Resources have deterministic names and carry
//! an ownership record in their description; anything of the same name that is not ours is a
//! conflict and is never changed or deleted. A reconcile with nothing to do makes only reads.
//! See `README.md` here.

pub mod annotations;
pub mod compute;
pub mod config;
mod delete;
mod ensure;
pub mod errors;
pub mod naming;
pub mod plan;
mod preview;
#[cfg(test)]
mod testutil;

use std::sync::Arc;

use async_trait::async_trait;

pub use compute::{CallLog, Compute, IAM_PERMISSIONS, RecordedCall};
pub use config::GcpConfig;

use crate::{
    Capabilities, ChangePlan, GroupLimits, InvalidField, LoadBalancerSpec, LoadBalancerStatus, OwnedLoadBalancer,
    Provider, ProviderError, ServiceIdentity,
};

/// The custom IAM role the provider needs (`gcloud iam roles create --file`).
pub const IAM_ROLE: &str = include_str!("iam-role.yaml");

/// The GCP provider. Cheap to clone; clones share the clients.
#[derive(Debug, Clone)]
pub struct GcpProvider {
    config: Arc<GcpConfig>,
    compute: Compute,
}

impl GcpProvider {
    /// Builds the provider with Application Default Credentials (GKE Workload Identity works
    /// unchanged), or anonymous ones when the config asks for them (tests).
    pub async fn new(config: GcpConfig) -> Result<Self, ProviderError> {
        config.validate().map_err(ProviderError::Fatal)?;
        let compute = Compute::new(&config).await?;
        Ok(Self { config: Arc::new(config), compute })
    }

    /// Every Compute call made so far, operation polls included.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.compute.log.calls()
    }

    /// Forgets the recorded calls (tests measure one reconcile at a time).
    pub fn clear_calls(&self) {
        self.compute.log.clear();
    }
}

#[async_trait]
impl Provider for GcpProvider {
    fn name(&self) -> &'static str {
        "gcp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            needs_node_ports: false,
            supports_udp: true,
            // Ports are counted as GCE counts them on one shared address: 50 per protocol, in
            // at most ten forwarding rules (one per member and protocol).
            groups: Some(GroupLimits { max_listeners: 50, max_rules: Some(plan::MAX_RULES_PER_ADDRESS) }),
        }
    }

    fn annotations(&self) -> &'static [&'static str] {
        annotations::ALL
    }

    fn group_annotations(&self) -> &'static [&'static str] {
        annotations::WHOLE_LOAD_BALANCER
    }

    fn validate(&self, spec: &LoadBalancerSpec) -> Result<(), Vec<InvalidField>> {
        annotations::parse(spec).map(|_| ())
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        self.ensure_inner(spec).await
    }

    async fn plan(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        self.plan_inner(spec).await
    }

    async fn plan_delete(&self, identity: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        self.plan_delete_inner(identity).await
    }

    async fn delete(&self, identity: &ServiceIdentity) -> Result<(), ProviderError> {
        self.delete_inner(identity).await
    }

    async fn leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        self.leave_group_inner(identity, group).await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        self.list_owned_inner().await
    }
}
