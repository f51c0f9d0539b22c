//! The AWS provider: one Network Load Balancer with instance targets per Service.
//!
//! Resources are found by ownership tags (with deterministic names as an index, so no reconcile
//! lists every load balancer of the region), changed in place where AWS allows, and the call log
//! proves that a reconcile with nothing to do makes no mutating call. See `README.md` here.

pub mod annotations;
mod clients;
mod config;
mod delete;
mod discovery;
mod ensure;
pub mod errors;
pub mod naming;
pub mod plan;
mod preview;
mod scope;
#[cfg(test)]
mod testutil;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::time::Instant;

pub use clients::{API_ACTIONS, CallLog, Clients, RateLimiter, RecordedCall};
pub use config::AwsConfig;
use plan::Environment;

use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_SERVICE_UID};
use crate::{
    Capabilities, ChangePlan, GroupLimits, InvalidField, LoadBalancerSpec, LoadBalancerStatus, OwnedLoadBalancer,
    Provider, ProviderError, ServiceIdentity,
};

/// The SDK crates the provider is built on, for code that talks to AWS directly (tests, tools).
pub mod sdk {
    pub use aws_credential_types as credentials;
    pub use aws_sdk_ec2 as ec2;
    pub use aws_sdk_elasticloadbalancingv2 as elb;
}

/// The least-privilege IAM policy the provider needs (`providers/src/aws/iam-policy.json`).
pub const IAM_POLICY: &str = include_str!("iam-policy.json");

#[derive(Debug, Default)]
struct Caches {
    /// Tags by ELB resource ARN, with when they were read.
    tags: HashMap<String, (Instant, BTreeMap<String, String>)>,
    /// Discovered environments by what they depend on.
    environments: HashMap<String, (Instant, Environment)>,
}

/// The AWS provider. Cheap to clone; clones share clients, limits and caches.
#[derive(Debug, Clone)]
pub struct AwsProvider {
    config: Arc<AwsConfig>,
    clients: Clients,
    caches: Arc<Mutex<Caches>>,
}

impl AwsProvider {
    /// Builds the provider with credentials from the default chain (or the static ones given).
    pub async fn new(config: AwsConfig) -> Result<Self, ProviderError> {
        config.validate().map_err(ProviderError::Fatal)?;
        let clients = Clients::new(&config).await?;
        Ok(Self { config: Arc::new(config), clients, caches: Arc::default() })
    }

    /// Every AWS call made so far, each retry attempt included.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.clients.log.calls()
    }

    /// Forgets the recorded calls (tests measure one reconcile at a time).
    pub fn clear_calls(&self) {
        self.clients.log.clear();
    }

    /// The SDK clients, for tests that inspect AWS directly.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    fn lock(&self) -> MutexGuard<'_, Caches> {
        // Caches hold copies of AWS state; a poisoned one is at worst stale, which a TTL fixes.
        self.caches.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `tags` say the resource belongs to `id`.
    fn owned_by(tags: &BTreeMap<String, String>, id: &ServiceIdentity) -> bool {
        tags.get(OWNERSHIP_TAG_CLUSTER) == Some(&id.cluster) && tags.get(OWNERSHIP_TAG_SERVICE_UID) == Some(&id.uid)
    }

    /// Tags of ELB resources, from the cache where fresh, the rest with batched `DescribeTags`.
    async fn elb_tags(&self, arns: &[String]) -> Result<HashMap<String, BTreeMap<String, String>>, ProviderError> {
        let ttl = self.config.tag_cache_ttl;
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let caches = self.lock();
            for arn in arns {
                match caches.tags.get(arn) {
                    Some((at, tags)) if at.elapsed() < ttl => {
                        found.insert(arn.clone(), tags.clone());
                    }
                    _ => missing.push(arn.clone()),
                }
            }
        }
        // DescribeTags takes at most 20 ARNs.
        for chunk in missing.chunks(20) {
            let out = self
                .clients
                .call("DescribeTags", self.clients.elb.describe_tags().set_resource_arns(Some(chunk.to_vec())).send())
                .await?;
            let mut caches = self.lock();
            for d in out.tag_descriptions() {
                let Some(arn) = d.resource_arn() else { continue };
                let tags: BTreeMap<String, String> = d
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned())))
                    .collect();
                caches.tags.insert(arn.to_owned(), (Instant::now(), tags.clone()));
                found.insert(arn.to_owned(), tags);
            }
        }
        Ok(found)
    }

    fn remember_tags(&self, arn: &str, tags: BTreeMap<String, String>) {
        self.lock().tags.insert(arn.to_owned(), (Instant::now(), tags));
    }

    fn forget_tags(&self, arn: &str) {
        self.lock().tags.remove(arn);
    }
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            needs_node_ports: true,
            supports_udp: true,
            groups: Some(GroupLimits { max_listeners: ensure::MAX_LISTENERS, max_rules: None }),
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

    async fn delete_detached(&self, leftover: &OwnedLoadBalancer) -> Result<(), ProviderError> {
        self.delete_detached_inner(leftover).await
    }

    async fn leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        let parts: Vec<String> = self.member_parts(identity, group).await?.into_iter().map(|t| t.arn).collect();
        self.leave_group_inner(identity, group, &parts).await
    }

    async fn plan_leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<ChangePlan, ProviderError> {
        self.plan_leave_group_inner(identity, group).await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        self.list_owned_inner().await
    }
}

/// Helper for sets of strings from SDK slices.
fn set<'a>(items: impl IntoIterator<Item = Option<&'a str>>) -> BTreeSet<String> {
    items.into_iter().flatten().map(str::to_owned).collect()
}
