//! `delete` and `list_owned`: the reverse order of `ensure`, retrying while AWS still holds a
//! dependency, and never touching anything without this Service's ownership tags.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::Filter;
use aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum;
use tokio::time::Instant;

use super::errors::{ApiError, backoff_delay};
use super::{AwsProvider, naming};
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_SERVICE, OWNERSHIP_TAG_SERVICE_UID};
use crate::{OwnedLoadBalancer, ProviderError, ServiceIdentity};

impl AwsProvider {
    /// Retries `op` while AWS answers one of `busy` (a dependency not yet released), within the
    /// configured budget. Absent counts as done.
    async fn retry_busy<F, Fut>(&self, busy: &[&str], mut op: F) -> Result<(), ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), ApiError>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) if busy.iter().any(|c| e.is(c)) && started.elapsed() < self.config.delete_retry_budget => {
                    tokio::time::sleep(backoff_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) async fn delete_load_balancer(&self, arn: &str) -> Result<(), ProviderError> {
        self.retry_busy(&["ResourceInUse"], || async {
            self.clients
                .call("DeleteLoadBalancer", self.clients.elb.delete_load_balancer().load_balancer_arn(arn).send())
                .await
                .map(|_| ())
        })
        .await?;
        self.forget_tags(arn);
        Ok(())
    }

    pub(super) async fn delete_target_group(&self, arn: &str) -> Result<(), ProviderError> {
        self.retry_busy(&["ResourceInUse"], || async {
            self.clients
                .call("DeleteTargetGroup", self.clients.elb.delete_target_group().target_group_arn(arn).send())
                .await
                .map(|_| ())
        })
        .await?;
        self.forget_tags(arn);
        Ok(())
    }

    pub(super) async fn delete_inner(&self, id: &ServiceIdentity) -> Result<(), ProviderError> {
        // 1. The load balancer (its listeners go with it).
        let mut target_groups = BTreeSet::new();
        match self.observe_load_balancer(id).await {
            Ok(Some(lb)) => {
                if lb.attributes.get("deletion_protection.enabled").is_some_and(|v| v == "true") {
                    return Err(ProviderError::Conflict(format!(
                        "load balancer {} has deletion protection; set {} to \"false\" before deleting the Service",
                        lb.arn,
                        super::annotations::DELETION_PROTECTION
                    )));
                }
                let out = self
                    .clients
                    .call(
                        "DescribeTargetGroups",
                        self.clients.elb.describe_target_groups().load_balancer_arn(&lb.arn).send(),
                    )
                    .await?;
                target_groups
                    .extend(out.target_groups().iter().filter_map(|t| t.target_group_arn().map(str::to_owned)));
                self.delete_load_balancer(&lb.arn).await?;
            }
            Ok(None) => {}
            // A same-named load balancer of someone else: not ours to delete, but our other
            // resources still are.
            Err(ProviderError::Conflict(msg)) => tracing::warn!(service = %id.service_key(), %msg),
            Err(e) => return Err(e),
        }

        // 2. Target groups: the attached ones plus any a crash left detached.
        target_groups.extend(self.detached_target_groups(id).await?.into_iter().map(|(arn, _)| arn));
        let owned_attached: Vec<String> = target_groups.into_iter().collect();
        let attached_tags = self.elb_tags(&owned_attached).await?;
        for arn in &owned_attached {
            if attached_tags.get(arn).is_some_and(|t| Self::owned_by(t, id)) {
                self.delete_target_group(arn).await?;
            }
        }

        // 3. The frontend security group, after the node rules that refer to it.
        if let Some((group, _, _)) = self.find_frontend(id, None).await? {
            let out = self
                .clients
                .call(
                    "DescribeSecurityGroups",
                    self.clients
                        .ec2
                        .describe_security_groups()
                        .filters(Filter::builder().name("ip-permission.group-id").values(&group).build())
                        .send(),
                )
                .await?;
            for g in out.security_groups() {
                let Some(node_group) = g.group_id() else { continue };
                let ours: Vec<super::plan::Rule> = super::ensure::rules_of(g.ip_permissions())
                    .into_iter()
                    .filter(|r| r.source == super::plan::Source::Group(group.clone()))
                    .collect();
                // The same description as when authorized: AWS ignores it on revoke, moto does not.
                let perms = super::ensure::permissions(&ours, &super::ensure::node_rule_description(id));
                if perms.is_empty() || node_group == group {
                    continue;
                }
                match self
                    .clients
                    .call(
                        "RevokeSecurityGroupIngress",
                        self.clients
                            .ec2
                            .revoke_security_group_ingress()
                            .group_id(node_group)
                            .set_ip_permissions(Some(perms))
                            .send(),
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() || e.is("InvalidPermission.NotFound") => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // The NLB's network interfaces hold the group for a while after it is deleted.
            self.retry_busy(&["DependencyViolation", "InvalidGroup.InUse"], || async {
                self.clients
                    .call("DeleteSecurityGroup", self.clients.ec2.delete_security_group().group_id(&group).send())
                    .await
                    .map(|_| ())
            })
            .await?;
        }
        Ok(())
    }

    /// The target groups of `id` found by name prefix and confirmed by tags, as `(arn, name)`:
    /// how the ones a crash left detached from any load balancer are found.
    pub(super) async fn detached_target_groups(
        &self,
        id: &ServiceIdentity,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let prefix = naming::target_group_prefix(id);
        let mut pages = self.clients.elb.describe_target_groups().page_size(400).into_paginator().send();
        let mut candidates = Vec::new();
        loop {
            let Some(page) = pages.next().await else { break };
            let page = page.map_err(|e| ApiError::from_sdk("DescribeTargetGroups", e))?;
            candidates.extend(
                page.target_groups()
                    .iter()
                    .filter(|t| t.target_group_name().is_some_and(|n| n.starts_with(&prefix)))
                    .filter_map(|t| Some((t.target_group_arn()?.to_owned(), t.target_group_name()?.to_owned()))),
            );
        }
        let arns: Vec<String> = candidates.iter().map(|(arn, _)| arn.clone()).collect();
        let tags = self.elb_tags(&arns).await?;
        Ok(candidates.into_iter().filter(|(arn, _)| tags.get(arn).is_some_and(|t| Self::owned_by(t, id))).collect())
    }

    /// Every NLB of this cluster: one paginated read, and tags read (and cached) only for
    /// load balancers whose name hawser could have given, instead of for every one in the region.
    pub(super) async fn list_owned_inner(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        let mut pages = self.clients.elb.describe_load_balancers().page_size(400).into_paginator().send();
        let mut candidates = Vec::new();
        loop {
            let Some(page) = pages.next().await else { break };
            let page = page.map_err(|e| ApiError::from_sdk("DescribeLoadBalancers", e))?;
            candidates.extend(
                page.load_balancers()
                    .iter()
                    .filter(|l| l.r#type() == Some(&LoadBalancerTypeEnum::Network))
                    .filter(|l| l.load_balancer_name().is_some_and(|n| n.starts_with(naming::NAME_PREFIX)))
                    .filter_map(|l| l.load_balancer_arn().map(str::to_owned)),
            );
        }
        let tags = self.elb_tags(&candidates).await?;
        let mut owned = Vec::new();
        for arn in candidates {
            let Some(t) = tags.get(&arn) else { continue };
            if t.get(OWNERSHIP_TAG_CLUSTER) != Some(&self.config.cluster) {
                continue;
            }
            let (Some((namespace, name)), Some(uid)) =
                (t.get(OWNERSHIP_TAG_SERVICE).and_then(|s| s.split_once('/')), t.get(OWNERSHIP_TAG_SERVICE_UID))
            else {
                continue;
            };
            owned.push(OwnedLoadBalancer {
                identity: ServiceIdentity {
                    cluster: self.config.cluster.clone(),
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    uid: uid.clone(),
                },
                id: arn,
                fingerprint: None,
            });
        }
        Ok(owned)
    }
}
