//! `delete` and `list_owned`: the reverse order of `ensure`, retrying while AWS still holds a
//! dependency, and never touching anything without this Service's ownership tags.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;
use aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum;
use tokio::time::Instant;

use super::errors::{ApiError, backoff_delay};
use super::plan::{ObservedLoadBalancer, Rule, Source};
use super::scope::{Scope, shared_by};
use super::{AwsProvider, naming};
use crate::naming::{OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_GROUP, OWNERSHIP_TAG_SERVICE, OWNERSHIP_TAG_SERVICE_UID};
use crate::{OwnedLoadBalancer, ProviderError, ServiceIdentity};

/// A target group found by name and confirmed as the Service's by its tags.
#[derive(Debug, Clone)]
pub(super) struct FoundTargetGroup {
    pub arn: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
}

/// Deletion protection blocks deleting a load balancer until the user turns it off.
fn refuse_protected(lb: &ObservedLoadBalancer) -> Result<(), ProviderError> {
    if lb.attributes.get("deletion_protection.enabled").is_some_and(|v| v == "true") {
        return Err(ProviderError::Conflict(format!(
            "load balancer {} has deletion protection; set {} to \"false\" before deleting the Service",
            lb.arn,
            super::annotations::DELETION_PROTECTION
        )));
    }
    Ok(())
}

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

    /// Deletes every resource of `id`: its own load balancer, and its part of a group's.
    pub(super) async fn delete_inner(&self, id: &ServiceIdentity) -> Result<(), ProviderError> {
        // One read of the target groups finds both what a crash left detached from the own load
        // balancer and the parts of a group's, which name the group.
        let found = self.detached_target_groups(id).await?;
        let member_prefix = naming::member_target_group_prefix(id);
        let (parts, own): (Vec<_>, Vec<_>) = found.into_iter().partition(|t| t.name.starts_with(&member_prefix));
        self.delete_own_with(id, own.into_iter().map(|t| t.arn).collect()).await?;
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for part in parts {
            if let Some(group) = part.tags.get(OWNERSHIP_TAG_GROUP) {
                groups.entry(group.clone()).or_default().push(part.arn);
            }
        }
        for (group, arns) in groups {
            self.leave_group_inner(id, &group, &arns).await?;
        }
        Ok(())
    }

    /// Deletes the Service's own load balancer and what belongs to it. `cheap`: when neither the
    /// load balancer nor its frontend group exists, there is nothing to do (a group member's
    /// ensure asks this; it skips the search for detached target groups).
    pub(super) async fn delete_own(&self, id: &ServiceIdentity, cheap: bool) -> Result<(), ProviderError> {
        if cheap {
            let lb = match self.observe_load_balancer(Scope::Own(id)).await {
                Ok(lb) => lb,
                Err(ProviderError::Conflict(_)) => None,
                Err(e) => return Err(e),
            };
            if lb.is_none() && self.find_frontend(Scope::Own(id), None).await?.is_none() {
                return Ok(());
            }
        }
        let detached = self.detached_target_groups(id).await?;
        let own_prefix = naming::target_group_prefix(id);
        let own = detached.into_iter().filter(|t| t.name.starts_with(&own_prefix)).map(|t| t.arn).collect();
        self.delete_own_with(id, own).await
    }

    /// [`Self::delete_own`] with the detached target groups already found.
    async fn delete_own_with(&self, id: &ServiceIdentity, detached: Vec<String>) -> Result<(), ProviderError> {
        // 1. The load balancer (its listeners go with it).
        let mut target_groups: BTreeSet<String> = detached.into_iter().collect();
        match self.observe_load_balancer(Scope::Own(id)).await {
            Ok(Some(lb)) => {
                refuse_protected(&lb)?;
                let attached = self.attached_target_groups(&lb.arn).await?;
                target_groups.extend(
                    attached
                        .iter()
                        .filter(|(_, tags)| Self::owned_by(tags, id))
                        .filter_map(|(t, _)| t.target_group_arn().map(str::to_owned)),
                );
                self.delete_load_balancer(&lb.arn).await?;
            }
            Ok(None) => {}
            // A same-named load balancer of someone else: not ours to delete, but our other
            // resources still are.
            Err(ProviderError::Conflict(msg)) => tracing::warn!(service = %id.service_key(), %msg),
            Err(e) => return Err(e),
        }

        // 2. Target groups.
        for arn in &target_groups {
            self.delete_target_group(arn).await?;
        }

        // 3. The frontend security group, after the node rules that refer to it.
        if let Some((group, _, _)) = self.find_frontend(Scope::Own(id), None).await? {
            self.delete_frontend(&group, &Scope::Own(id).node_rule_description()).await?;
        }
        Ok(())
    }

    /// Deletes a target group or frontend security group `list_owned` found on no load balancer,
    /// unless a load balancer uses it again by now.
    pub(super) async fn delete_detached_inner(&self, leftover: &OwnedLoadBalancer) -> Result<(), ProviderError> {
        let id = &leftover.identity;
        if leftover.id.starts_with("sg-") {
            let lbs = self.clients.elb.describe_load_balancers().page_size(400).into_paginator().send();
            let mut pages = lbs;
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| ApiError::from_sdk("DescribeLoadBalancers", e))?;
                if page.load_balancers().iter().any(|l| l.security_groups().contains(&leftover.id)) {
                    return Ok(());
                }
            }
            return self.delete_frontend(&leftover.id, &Scope::Own(id).node_rule_description()).await;
        }
        let out = match self
            .clients
            .call(
                "DescribeTargetGroups",
                self.clients.elb.describe_target_groups().target_group_arns(&leftover.id).send(),
            )
            .await
        {
            Ok(out) => out,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Some(tg) = out.target_groups().first() else { return Ok(()) };
        let tags = self.elb_tags(std::slice::from_ref(&leftover.id)).await?.remove(&leftover.id).unwrap_or_default();
        if !Self::owned_by(&tags, id) {
            return Ok(());
        }
        if !tg.load_balancer_arns().is_empty() {
            let lbs = self
                .clients
                .elb
                .describe_load_balancers()
                .set_load_balancer_arns(Some(tg.load_balancer_arns().to_vec()));
            match self.clients.call("DescribeLoadBalancers", lbs.send()).await {
                Ok(out) if !out.load_balancers().is_empty() => return Ok(()),
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.delete_target_group(&leftover.id).await
    }

    /// Takes `id`'s part out of `group`'s load balancer: its rules, listeners and target groups
    /// (`detached`: those a crash left unattached). With the last member, the load balancer and
    /// the frontend group go first. The Service's target groups go last in every case: as long
    /// as one is left, a retried deletion finds the group from it.
    pub(super) async fn leave_group_inner(
        &self,
        id: &ServiceIdentity,
        group: &str,
        detached: &[String],
    ) -> Result<(), ProviderError> {
        let scope = Scope::Member { id, group };
        let lb = match self.observe_load_balancer(scope).await {
            Ok(lb) => lb,
            Err(ProviderError::Conflict(msg)) => {
                tracing::warn!(service = %id.service_key(), %msg);
                None
            }
            Err(e) => return Err(e),
        };
        let attached = match &lb {
            Some(l) => self.attached_target_groups(&l.arn).await?,
            None => Vec::new(),
        };
        let others = super::ensure::other_members(scope, &attached);
        let mut mine: BTreeSet<String> = detached.iter().cloned().collect();
        mine.extend(
            attached
                .iter()
                .filter(|(_, tags)| Self::owned_by(tags, id))
                .filter_map(|(t, _)| t.target_group_arn().map(str::to_owned)),
        );
        let frontend = self.find_frontend(scope, None).await?;
        if others.is_empty() {
            if let Some(lb) = &lb {
                refuse_protected(lb)?;
                self.delete_load_balancer(&lb.arn).await?;
            }
            if let Some((sg, _, _)) = &frontend {
                self.delete_frontend(sg, &scope.node_rule_description()).await?;
            }
        } else {
            if let Some((sg, rules, _)) = &frontend {
                let rules: Vec<_> = rules.iter().cloned().collect();
                self.change_rules(sg, &[], &rules, &scope.frontend_rule_description()).await?;
                let wanted = super::plan::node_rules_of_target_groups(others.iter().map(|(tg, _)| tg), sg);
                for (node_group, ours) in self.rules_from_frontend(sg).await? {
                    let revoke: Vec<_> = ours.difference(&wanted).cloned().collect();
                    self.change_rules(&node_group, &[], &revoke, &scope.node_rule_description()).await?;
                }
            }
            if let Some(lb) = &lb {
                let (mine, _) = super::ensure::split_listeners(scope, self.observe_listeners(&lb.arn).await?);
                for l in mine {
                    self.delete_listener(&l.arn).await?;
                }
            }
        }
        for arn in &mine {
            self.delete_target_group(arn).await?;
        }
        Ok(())
    }

    /// Deletes a frontend security group, after revoking the node groups' rules that refer to it.
    async fn delete_frontend(&self, group: &str, description: &str) -> Result<(), ProviderError> {
        for (node_group, ours) in self.rules_from_frontend(group).await? {
            let ours: Vec<_> = ours.into_iter().collect();
            // The same description as when authorized: AWS ignores it on revoke, moto does not.
            let perms = super::ensure::permissions(&ours, description);
            match self
                .clients
                .call(
                    "RevokeSecurityGroupIngress",
                    self.clients
                        .ec2
                        .revoke_security_group_ingress()
                        .group_id(&node_group)
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
                .call("DeleteSecurityGroup", self.clients.ec2.delete_security_group().group_id(group).send())
                .await
                .map(|_| ())
        })
        .await
    }

    /// Each other security group with rules whose source is `frontend`, with those rules.
    async fn rules_from_frontend(&self, frontend: &str) -> Result<Vec<(String, BTreeSet<Rule>)>, ProviderError> {
        let out = self
            .clients
            .call(
                "DescribeSecurityGroups",
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(Filter::builder().name("ip-permission.group-id").values(frontend).build())
                    .send(),
            )
            .await?;
        Ok(out
            .security_groups()
            .iter()
            .filter_map(|g| {
                let node_group = g.group_id()?;
                let ours: BTreeSet<Rule> = super::ensure::rules_of(g.ip_permissions())
                    .into_iter()
                    .filter(|r| r.source == Source::Group(frontend.to_owned()))
                    .collect();
                (node_group != frontend && !ours.is_empty()).then(|| (node_group.to_owned(), ours))
            })
            .collect())
    }

    async fn delete_listener(&self, arn: &str) -> Result<(), ProviderError> {
        match self.clients.call("DeleteListener", self.clients.elb.delete_listener().listener_arn(arn).send()).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The Service's target groups of its part of `group`'s load balancer, found by name and
    /// tags (attached or left detached): what leaving the group deletes.
    pub(super) async fn member_parts(
        &self,
        id: &ServiceIdentity,
        group: &str,
    ) -> Result<Vec<FoundTargetGroup>, ProviderError> {
        let prefix = naming::member_target_group_prefix(id);
        Ok(self
            .detached_target_groups(id)
            .await?
            .into_iter()
            .filter(|t| {
                t.name.starts_with(&prefix) && t.tags.get(OWNERSHIP_TAG_GROUP).map(String::as_str) == Some(group)
            })
            .collect())
    }

    /// The target groups of `id` found by name prefix (its own load balancer's and its parts of
    /// a group's) and confirmed by tags: how the ones a crash left detached from any load
    /// balancer are found.
    pub(super) async fn detached_target_groups(
        &self,
        id: &ServiceIdentity,
    ) -> Result<Vec<FoundTargetGroup>, ProviderError> {
        let prefixes = [naming::target_group_prefix(id), naming::member_target_group_prefix(id)];
        let mut pages = self.clients.elb.describe_target_groups().page_size(400).into_paginator().send();
        let mut candidates = Vec::new();
        loop {
            let Some(page) = pages.next().await else { break };
            let page = page.map_err(|e| ApiError::from_sdk("DescribeTargetGroups", e))?;
            candidates.extend(
                page.target_groups()
                    .iter()
                    .filter(|t| t.target_group_name().is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p))))
                    .filter_map(|t| Some((t.target_group_arn()?.to_owned(), t.target_group_name()?.to_owned()))),
            );
        }
        let arns: Vec<String> = candidates.iter().map(|(arn, _)| arn.clone()).collect();
        let mut tags = self.elb_tags(&arns).await?;
        Ok(candidates
            .into_iter()
            .filter_map(|(arn, name)| {
                let tags = tags.remove(&arn).filter(|t| Self::owned_by(t, id))?;
                Some(FoundTargetGroup { arn, name, tags })
            })
            .collect())
    }

    /// Every NLB of this cluster: one paginated read, and tags read (and cached) only for
    /// load balancers whose name hawser could have given, instead of for every one in the region.
    pub(super) async fn list_owned_inner(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        let mut pages = self.clients.elb.describe_load_balancers().page_size(400).into_paginator().send();
        let mut candidates = Vec::new();
        let mut in_use: BTreeSet<String> = BTreeSet::new();
        let mut existing: BTreeSet<String> = BTreeSet::new();
        loop {
            let Some(page) = pages.next().await else { break };
            let page = page.map_err(|e| ApiError::from_sdk("DescribeLoadBalancers", e))?;
            for l in page.load_balancers() {
                in_use.extend(l.security_groups().iter().cloned());
                existing.extend(l.load_balancer_arn().map(str::to_owned));
                let ours = l.r#type() == Some(&LoadBalancerTypeEnum::Network)
                    && l.load_balancer_name().is_some_and(|n| n.starts_with(naming::NAME_PREFIX));
                if let (true, Some(arn)) = (ours, l.load_balancer_arn()) {
                    candidates.push(arn.to_owned());
                }
            }
        }
        let tags = self.elb_tags(&candidates).await?;
        let cluster = &self.config.cluster;
        let entry = |t: &BTreeMap<String, String>, id: &str, detached: bool| {
            if t.get(OWNERSHIP_TAG_CLUSTER) != Some(cluster) {
                return None;
            }
            let (namespace, name) = t.get(OWNERSHIP_TAG_SERVICE)?.split_once('/')?;
            Some(OwnedLoadBalancer {
                identity: ServiceIdentity {
                    cluster: cluster.clone(),
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    uid: t.get(OWNERSHIP_TAG_SERVICE_UID)?.clone(),
                },
                id: id.to_owned(),
                fingerprint: None,
                detached,
                group: t.get(OWNERSHIP_TAG_GROUP).cloned(),
            })
        };
        let mut owned = Vec::new();
        let mut groups = BTreeMap::new();
        for arn in candidates {
            let Some(t) = tags.get(&arn) else { continue };
            match t.get(OWNERSHIP_TAG_GROUP) {
                Some(group) if shared_by(t, cluster, group) => {
                    groups.insert(arn, group.clone());
                }
                _ => owned.extend(entry(t, &arn, false)),
            }
        }

        // Target groups: a group's load balancer holds one part per member (their tags say
        // whose), and hawser's target groups on no load balancer were left by a crash.
        let mut pages = self.clients.elb.describe_target_groups().page_size(400).into_paginator().send();
        let mut parts: Vec<(String, Option<String>)> = Vec::new();
        loop {
            let Some(page) = pages.next().await else { break };
            let page = page.map_err(|e| ApiError::from_sdk("DescribeTargetGroups", e))?;
            for tg in page.target_groups() {
                let (Some(arn), Some(name)) = (tg.target_group_arn(), tg.target_group_name()) else { continue };
                let lbs = tg.load_balancer_arns();
                if let Some(lb) = lbs.iter().find(|lb| groups.contains_key(*lb)) {
                    parts.push((arn.to_owned(), Some(lb.clone())));
                } else if !lbs.iter().any(|lb| existing.contains(lb)) && name.starts_with(naming::NAME_PREFIX) {
                    parts.push((arn.to_owned(), None));
                }
            }
        }
        let arns: Vec<String> = parts.iter().map(|(arn, _)| arn.clone()).collect();
        let part_tags = self.elb_tags(&arns).await?;
        let mut members = BTreeMap::new();
        for (arn, lb) in parts {
            let Some(t) = part_tags.get(&arn) else { continue };
            match lb {
                Some(lb) if t.get(OWNERSHIP_TAG_GROUP) == groups.get(&lb) => {
                    if let Some(member) = entry(t, &lb, false) {
                        members.insert((lb, member.identity.uid.clone()), member);
                    }
                }
                Some(_) => {}
                None => owned.extend(entry(t, &arn, true)),
            }
        }
        owned.extend(members.into_values());

        // Frontend security groups no load balancer uses, left by a crash the same way.
        let out = self
            .clients
            .call(
                "DescribeSecurityGroups",
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(Filter::builder().name(format!("tag:{OWNERSHIP_TAG_CLUSTER}")).values(cluster).build())
                    .send(),
            )
            .await?;
        for g in out.security_groups() {
            let Some(id) = g.group_id().filter(|id| !in_use.contains(*id)) else { continue };
            owned.extend(entry(&super::ensure::tag_map(g.tags()), id, true));
        }
        Ok(owned)
    }
}
