//! `ensure`: read what exists (batched, cached), plan, and apply only the difference, in the
//! order that never leaves traffic pointing at something missing: target groups → security
//! groups → load balancer → listeners → targets. A load-balancer group member's part is
//! ensured the same way on the group's load balancer (see `scope.rs`).

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, Ipv6Range, ResourceType, TagSpecification, UserIdGroupPair};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate, IpAddressType, LoadBalancerAttribute, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, Matcher, ProtocolEnum, Tag, TargetDescription, TargetGroup, TargetGroupAttribute,
    TargetHealthStateEnum, TargetTypeEnum,
};

use super::annotations::{self as ann, AwsOptions};
use super::plan::{
    self, Desired, DesiredListener, DesiredSecurityGroup, DesiredTargetGroup, Environment, HealthSettings,
    ListenerAction, LoadBalancerAction, LoadBalancerUpdate, ObservedListener, ObservedLoadBalancer,
    ObservedTargetGroup, Rule, Source, TagDiff,
};
use super::scope::Scope;
use super::{AwsProvider, discovery, naming, set};
use crate::naming::OWNERSHIP_TAG_GROUP;
use crate::{
    IngressPoint, LoadBalancerSpec, LoadBalancerStatus, PortStatus, Protocol, ProviderError, Scheme, ServiceIdentity,
};

/// Targets per Register/DeregisterTargets call.
const TARGET_CHUNK: usize = 100;

fn elb_tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

fn ec2_tags(tags: &BTreeMap<String, String>) -> Vec<aws_sdk_ec2::types::Tag> {
    tags.iter().map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build()).collect()
}

fn scheme_of(s: Option<&LoadBalancerSchemeEnum>) -> Option<Scheme> {
    match s? {
        LoadBalancerSchemeEnum::InternetFacing => Some(Scheme::InternetFacing),
        LoadBalancerSchemeEnum::Internal => Some(Scheme::Internal),
        _ => None,
    }
}

fn forward(tg_arn: &str) -> Action {
    Action::builder().r#type(ActionTypeEnum::Forward).target_group_arn(tg_arn).build()
}

/// Turns rules into the `IpPermission`s EC2 takes.
pub(super) fn permissions(rules: &[Rule], description: &str) -> Vec<IpPermission> {
    rules
        .iter()
        .map(|r| {
            let b = IpPermission::builder().ip_protocol(&r.protocol).from_port(r.from).to_port(r.to);
            match &r.source {
                Source::Cidr(c) if c.contains(':') => {
                    b.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(c).description(description).build()).build()
                }
                Source::Cidr(c) => b.ip_ranges(IpRange::builder().cidr_ip(c).description(description).build()).build(),
                Source::Group(g) => b
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id(g).description(description).build())
                    .build(),
            }
        })
        .collect()
}

/// The description of the rules on node groups.
pub(super) fn node_rule_description(id: &ServiceIdentity) -> String {
    format!("hawser {} load balancer to nodes", id.service_key())
}

/// Flattens EC2's permissions into rules, one per source.
pub(super) fn rules_of(perms: &[IpPermission]) -> BTreeSet<Rule> {
    described_rules(perms).into_iter().map(|(rule, _)| rule).collect()
}

/// The rules among `perms` that carry `description`: one Service's in a group's frontend group.
pub(super) fn rules_described(perms: &[IpPermission], description: &str) -> BTreeSet<Rule> {
    described_rules(perms).into_iter().filter(|(_, d)| d.as_deref() == Some(description)).map(|(r, _)| r).collect()
}

/// Each rule with its description.
fn described_rules(perms: &[IpPermission]) -> Vec<(Rule, Option<String>)> {
    let mut rules = Vec::new();
    for p in perms {
        let protocol = p.ip_protocol().unwrap_or_default().to_owned();
        let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
        let mut add = |source, description: Option<&str>| {
            rules.push((Rule { protocol: protocol.clone(), from, to, source }, description.map(str::to_owned)));
        };
        for r in p.ip_ranges() {
            if let Some(c) = r.cidr_ip() {
                add(Source::Cidr(c.to_owned()), r.description());
            }
        }
        for r in p.ipv6_ranges() {
            if let Some(c) = r.cidr_ipv6() {
                add(Source::Cidr(c.to_owned()), r.description());
            }
        }
        for g in p.user_id_group_pairs() {
            if let Some(id) = g.group_id() {
                add(Source::Group(id.to_owned()), g.description());
            }
        }
    }
    rules
}

/// The listeners of a group's load balancer that forward to the Service's target groups, and
/// the other members'.
pub(super) fn split_listeners(
    scope: Scope<'_>,
    listeners: Vec<ObservedListener>,
) -> (Vec<ObservedListener>, Vec<ObservedListener>) {
    let prefix = scope.target_group_prefix();
    listeners
        .into_iter()
        .partition(|l| l.target_group_arn.as_deref().is_some_and(|a| naming::target_group_arn_has_prefix(a, &prefix)))
}

/// Listeners one NLB takes (the default quota; hawser keeps to it, as the operator does when it
/// admits members).
pub(super) const MAX_LISTENERS: usize = 50;

/// Refuses, before any write, a member whose listeners would take its group's NLB past its
/// quota: `others` is how many listeners the other members hold (one per target group).
pub(super) fn check_listener_quota(others: usize, desired: &Desired) -> Result<(), ProviderError> {
    let (Some(group), mine) = (&desired.group, desired.listeners.len()) else { return Ok(()) };
    if others + mine > MAX_LISTENERS {
        return Err(ProviderError::invalid(
            "spec.ports",
            format!(
                "the load balancer of group {group} carries {others} listeners of other members and an NLB takes at \
                 most {MAX_LISTENERS}; this Service's {mine} would exceed it: use another group"
            ),
        ));
    }
    Ok(())
}

/// EC2 tags as a map.
pub(super) fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter().filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned()))).collect()
}

/// The target groups of the other members of a group, among those attached to its load
/// balancer (none for a Service's own).
pub(super) fn other_members<'t>(
    scope: Scope<'_>,
    attached: &'t [(TargetGroup, BTreeMap<String, String>)],
) -> Vec<&'t (TargetGroup, BTreeMap<String, String>)> {
    let Some(group) = scope.group() else { return Vec::new() };
    let id = scope.id();
    attached
        .iter()
        .filter(|(_, tags)| {
            tags.get(OWNERSHIP_TAG_GROUP).map(String::as_str) == Some(group)
                && tags.get(crate::OWNERSHIP_TAG_SERVICE_UID) != Some(&id.uid)
        })
        .collect()
}

fn status(lb: &ObservedLoadBalancer, desired: &Desired) -> LoadBalancerStatus {
    let ports = desired
        .target_groups
        .iter()
        .flat_map(|tg| {
            let protos: &[Protocol] = match tg.protocol {
                Protocol::TcpUdp => &[Protocol::Tcp, Protocol::Udp],
                Protocol::Tcp => &[Protocol::Tcp],
                Protocol::Udp => &[Protocol::Udp],
            };
            protos.iter().map(|p| PortStatus { port: tg.listener_port, protocol: *p })
        })
        .collect();
    LoadBalancerStatus {
        id: lb.arn.clone(),
        // An NLB is reached by name; its addresses may change, so no IP is reported.
        ingress: vec![IngressPoint { ip: None, hostname: Some(lb.dns_name.clone()), ip_mode: None, ports }],
    }
}

impl AwsProvider {
    pub(super) async fn ensure_inner(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        let opts = ann::parse(spec).map_err(ProviderError::InvalidInput)?;
        let id = &spec.identity;
        let group = plan::group_key(spec);
        let scope = Scope::of(spec, group.as_deref());
        let mut lb = self.observe_load_balancer(scope).await?;
        let env = self.environment(spec, &opts, lb.as_ref()).await?;
        let desired = plan::desired(spec, &opts, &env)?;
        let attached = match &lb {
            Some(l) => self.attached_target_groups(&l.arn).await?,
            None => Vec::new(),
        };
        let others = other_members(scope, &attached);
        check_listener_quota(others.len(), &desired)?;

        // 1. Target groups: a member's come first, so that a group's shared resources never
        //    exist without a part that names the group (what deletion finds it by).
        let (observed_tgs, tg_plan, mut tg_arns) = self.target_group_plan(id, &attached, &desired).await?;
        let mut registered: BTreeMap<String, BTreeSet<String>> =
            observed_tgs.iter().map(|t| (t.arn.clone(), t.targets.clone())).collect();
        for name in &tg_plan.create {
            let Some(d) = desired.target_groups.iter().find(|t| &t.name == name) else { continue };
            let (arn, targets) = self.create_target_group(id, &env, d).await?;
            tg_arns.insert(name.clone(), arn.clone());
            registered.insert(arn, targets);
        }
        for u in &tg_plan.update {
            self.update_target_group(u).await?;
        }

        // 2. Security groups: the frontend group (the load balancer is created with it), then
        //    the node groups' rules that let it reach the node ports (a group's: every member's).
        let security_groups: BTreeSet<String> = match &desired.frontend {
            Some(front) => {
                let frontend = self.ensure_frontend(scope, &env, front).await?;
                let mut wanted = plan::node_rules(&desired, &frontend);
                wanted.extend(plan::node_rules_of_target_groups(others.iter().map(|(tg, _)| tg), &frontend));
                self.ensure_node_rules(&env, &wanted, &frontend, &scope.node_rule_description()).await?;
                BTreeSet::from([frontend])
            }
            None => desired.own_security_groups.iter().flatten().cloned().collect(),
        };

        // 3. The load balancer.
        let mut listeners_observed = Vec::new();
        match plan::diff_load_balancer(&desired, &security_groups, lb.as_ref()) {
            LoadBalancerAction::Create => {
                lb = Some(self.create_load_balancer(&desired, &security_groups).await?);
            }
            LoadBalancerAction::Replace(reason) => {
                if let (Some(group), false) = (scope.group(), others.is_empty()) {
                    return Err(ProviderError::Conflict(format!(
                        "the load balancer of group {group} must be replaced ({reason}) but carries other members' \
                         listeners; change every member, or move this Service to another group"
                    )));
                }
                if let Some(old) = &lb {
                    tracing::info!(service = %id.service_key(), %reason, "replacing the load balancer");
                    if old.attributes.get("deletion_protection.enabled").is_some_and(|v| v == "true") {
                        return Err(ProviderError::Conflict(format!(
                            "the load balancer must be replaced ({reason}) but has deletion protection; set {} to false first",
                            ann::DELETION_PROTECTION
                        )));
                    }
                    self.delete_load_balancer(&old.arn).await?;
                }
                lb = Some(self.create_load_balancer(&desired, &security_groups).await?);
            }
            LoadBalancerAction::Update(u) => {
                if let Some(current) = &mut lb {
                    self.update_load_balancer(current, &u).await?;
                    listeners_observed = self.observe_listeners(&current.arn).await?;
                    // A member changes only the listeners of its own target groups; a port another
                    // member still holds is theirs until that member lets it go.
                    if scope.group().is_some() {
                        let (mine, theirs) = split_listeners(scope, listeners_observed);
                        if let Some(held) = theirs.iter().find(|l| desired.listeners.iter().any(|d| d.port == l.port)) {
                            return Err(ProviderError::Transient(format!(
                                "port {} of the group's load balancer is still held by another member's listener; \
                                 retrying once that member lets it go",
                                held.port
                            )));
                        }
                        listeners_observed = mine;
                    }
                }
            }
        }
        let Some(lb) = lb else {
            return Err(ProviderError::Transient("the load balancer vanished while being reconciled".into()));
        };

        // 4. Listeners, then target groups no listener uses any more.
        for action in plan::diff_listeners(&desired.listeners, &listeners_observed, &tg_arns) {
            self.apply_listener(&lb.arn, &desired, &tg_arns, action).await?;
        }
        for arn in &tg_plan.delete {
            self.delete_target_group(arn).await?;
            registered.remove(arn);
        }

        // 5. Targets: every deregistration before any registration, so nodes that left stop
        //    receiving new connections as early as possible.
        let mut registrations = Vec::new();
        for d in &desired.target_groups {
            let Some(arn) = tg_arns.get(&d.name) else { continue };
            let current = registered.get(arn).cloned().unwrap_or_default();
            let diff = plan::diff_targets(&desired.targets, &current);
            for chunk in diff.deregister.chunks(TARGET_CHUNK) {
                let targets = chunk.iter().map(|i| TargetDescription::builder().id(i).build()).collect();
                self.clients
                    .call(
                        "DeregisterTargets",
                        self.clients.elb.deregister_targets().target_group_arn(arn).set_targets(Some(targets)).send(),
                    )
                    .await?;
            }
            registrations.push((arn.clone(), diff.register));
        }
        for (arn, register) in registrations {
            for chunk in register.chunks(TARGET_CHUNK) {
                let targets = chunk.iter().map(|i| TargetDescription::builder().id(i).build()).collect();
                self.clients
                    .call(
                        "RegisterTargets",
                        self.clients.elb.register_targets().target_group_arn(&arn).set_targets(Some(targets)).send(),
                    )
                    .await?;
            }
        }
        // 6. A Service that moved into a group: its own load balancer goes once the group's
        //    serves it, never before.
        if scope.group().is_some() {
            self.delete_own(id, true).await?;
        }
        Ok(status(&lb, &desired))
    }

    /// The load balancer of `scope`, by its deterministic name, confirmed by its tags.
    pub(super) async fn observe_load_balancer(
        &self,
        scope: Scope<'_>,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let name = scope.load_balancer_name();
        let out = match self
            .clients
            .call("DescribeLoadBalancers", self.clients.elb.describe_load_balancers().names(&name).send())
            .await
        {
            Ok(out) => out,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(found) = out.load_balancers().first() else { return Ok(None) };
        let arn = found.load_balancer_arn().unwrap_or_default().to_owned();
        let tags = self.elb_tags(std::slice::from_ref(&arn)).await?.remove(&arn).unwrap_or_default();
        if !scope.owns(&tags) {
            return Err(ProviderError::Conflict(format!(
                "a load balancer named {name} ({arn}) exists and is not the one of {}; it is left untouched",
                scope.owner()
            )));
        }
        let attrs = self
            .clients
            .call(
                "DescribeLoadBalancerAttributes",
                self.clients.elb.describe_load_balancer_attributes().load_balancer_arn(&arn).send(),
            )
            .await?;
        Ok(Some(ObservedLoadBalancer {
            arn,
            dns_name: found.dns_name().unwrap_or_default().to_owned(),
            scheme: scheme_of(found.scheme()),
            vpc_id: found.vpc_id().unwrap_or_default().to_owned(),
            ip_address_type: found.ip_address_type().map(|t| t.as_str().to_owned()).unwrap_or_else(|| "ipv4".into()),
            subnets: set(found.availability_zones().iter().map(|z| z.subnet_id())),
            security_groups: found.security_groups().iter().cloned().collect(),
            attributes: attrs
                .attributes()
                .iter()
                .filter_map(|a| Some((a.key()?.to_owned(), a.value().unwrap_or_default().to_owned())))
                .collect(),
            tags,
        }))
    }

    /// VPC, subnets and node security groups: cached, as they change rarely and reading them
    /// on every reconcile is what makes controllers slow at scale.
    pub(super) async fn environment(
        &self,
        spec: &LoadBalancerSpec,
        opts: &AwsOptions,
        lb: Option<&ObservedLoadBalancer>,
    ) -> Result<Environment, ProviderError> {
        let (instances, skipped) = plan::instance_ids(spec);
        if !skipped.is_empty() {
            tracing::debug!(service = %spec.identity.service_key(), nodes = ?skipped, "nodes without an EC2 instance providerID are not targets");
        }
        let key = format!(
            "{}|{:?}|{}|{}",
            instances.iter().cloned().collect::<Vec<_>>().join(","),
            spec.scheme,
            opts.subnets.join(","),
            lb.map(|l| l.vpc_id.as_str()).unwrap_or_default()
        );
        if let Some((at, env)) = self.lock().environments.get(&key)
            && at.elapsed() < self.config.discovery_ttl
        {
            return Ok(env.clone());
        }
        let facts = if instances.is_empty() {
            discovery::InstanceFacts::default()
        } else {
            discovery::instances(&self.clients, &instances).await?
        };
        let vpc_id = match (&self.config.vpc_id, lb) {
            (Some(v), _) => v.clone(),
            (None, Some(l)) if !l.vpc_id.is_empty() => l.vpc_id.clone(),
            _ => match facts.vpcs.iter().collect::<Vec<_>>().as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(ProviderError::Transient(
                        "cannot tell the VPC: no node has an EC2 instance providerID yet; set --aws-vpc-id or wait for nodes".into(),
                    ));
                }
                many => {
                    return Err(ProviderError::Fatal(format!(
                        "the nodes are in several VPCs ({}); set --aws-vpc-id",
                        many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            },
        };
        let node_security_groups = if opts.security_groups.is_empty() {
            discovery::node_security_groups(&self.clients, &self.config.cluster, &facts).await?
        } else {
            BTreeSet::new()
        };
        let subnets =
            discovery::subnets(&self.clients, &self.config.cluster, &vpc_id, spec.scheme, &opts.subnets).await?;
        let env = Environment { vpc_id, subnets, node_security_groups };
        let mut caches = self.lock();
        let now = tokio::time::Instant::now();
        let ttl = self.config.discovery_ttl;
        caches.environments.retain(|_, (at, _)| now.duration_since(*at) < ttl);
        caches.environments.insert(key, (now, env.clone()));
        Ok(env)
    }

    /// Finds (by tags) or creates the frontend security group and syncs the Service's rules in
    /// it; returns its ID.
    async fn ensure_frontend(
        &self,
        scope: Scope<'_>,
        env: &Environment,
        desired: &DesiredSecurityGroup,
    ) -> Result<String, ProviderError> {
        let found = self.find_frontend(scope, Some(&env.vpc_id)).await?;
        let (group, observed, tags) = match found {
            Some(g) => g,
            None => {
                let out = self
                    .clients
                    .call(
                        "CreateSecurityGroup",
                        self.clients
                            .ec2
                            .create_security_group()
                            .group_name(&desired.name)
                            .description(&desired.description)
                            .vpc_id(&env.vpc_id)
                            .tag_specifications(
                                TagSpecification::builder()
                                    .resource_type(ResourceType::SecurityGroup)
                                    .set_tags(Some(ec2_tags(&desired.tags)))
                                    .build(),
                            )
                            .send(),
                    )
                    .await
                    .map_err(|e| {
                        if e.is("InvalidGroup.Duplicate") {
                            ProviderError::Conflict(format!(
                                "a security group named {} exists in {} without hawser's ownership tags for {}; it is left untouched",
                                desired.name,
                                env.vpc_id,
                                scope.owner()
                            ))
                        } else {
                            e.into()
                        }
                    })?;
                let group = out.group_id().unwrap_or_default().to_owned();
                (group, BTreeSet::new(), desired.tags.clone())
            }
        };
        let (authorize, revoke) = plan::diff_rules(&desired.ingress, &observed);
        self.change_rules(&group, &authorize, &revoke, &scope.frontend_rule_description()).await?;
        let diff = plan::diff_tags(&desired.tags, &tags);
        if !diff.add.is_empty() {
            self.clients
                .call(
                    "CreateTags",
                    self.clients.ec2.create_tags().resources(&group).set_tags(Some(ec2_tags(&diff.add))).send(),
                )
                .await?;
        }
        Ok(group)
    }

    /// The frontend group of `scope`, found by its ownership tags, with the Service's ingress
    /// rules in it (a group's frontend holds every member's; each member's carry its name) and
    /// its tags.
    pub(super) async fn find_frontend(
        &self,
        scope: Scope<'_>,
        vpc: Option<&str>,
    ) -> Result<Option<(String, BTreeSet<Rule>, BTreeMap<String, String>)>, ProviderError> {
        let mut req = self.clients.ec2.describe_security_groups();
        for (key, value) in scope.frontend_filters() {
            req = req.filters(Filter::builder().name(format!("tag:{key}")).values(value).build());
        }
        if let Some(vpc) = vpc {
            req = req.filters(Filter::builder().name("vpc-id").values(vpc).build());
        }
        let out = self.clients.call("DescribeSecurityGroups", req.send()).await?;
        let description = scope.frontend_rule_description();
        Ok(out.security_groups().iter().find(|g| scope.owns(&tag_map(g.tags()))).map(|g| {
            let rules = match scope.group() {
                None => rules_of(g.ip_permissions()),
                Some(_) => rules_described(g.ip_permissions(), &description),
            };
            (g.group_id().unwrap_or_default().to_owned(), rules, tag_map(g.tags()))
        }))
    }

    /// Rules on the node groups from the frontend group: node ports and health ports.
    async fn ensure_node_rules(
        &self,
        env: &Environment,
        wanted: &BTreeSet<Rule>,
        frontend: &str,
        description: &str,
    ) -> Result<(), ProviderError> {
        for (group, ours) in self.node_rules_from(&env.node_security_groups, frontend).await? {
            let (authorize, revoke) = plan::diff_rules(wanted, &ours);
            self.change_rules(&group, &authorize, &revoke, description).await?;
        }
        Ok(())
    }

    /// Authorizes and revokes ingress rules of security group `group`.
    pub(super) async fn change_rules(
        &self,
        group: &str,
        authorize: &[Rule],
        revoke: &[Rule],
        description: &str,
    ) -> Result<(), ProviderError> {
        if !revoke.is_empty() {
            self.clients
                .call(
                    "RevokeSecurityGroupIngress",
                    self.clients
                        .ec2
                        .revoke_security_group_ingress()
                        .group_id(group)
                        .set_ip_permissions(Some(permissions(revoke, description)))
                        .send(),
                )
                .await?;
        }
        if !authorize.is_empty() {
            self.clients
                .call(
                    "AuthorizeSecurityGroupIngress",
                    self.clients
                        .ec2
                        .authorize_security_group_ingress()
                        .group_id(group)
                        .set_ip_permissions(Some(permissions(authorize, description)))
                        .send(),
                )
                .await?;
        }
        Ok(())
    }

    /// Each node security group with its rules whose source is the frontend group: the only
    /// rules on those groups that are ours to change.
    pub(super) async fn node_rules_from(
        &self,
        node_groups: &BTreeSet<String>,
        frontend: &str,
    ) -> Result<Vec<(String, BTreeSet<Rule>)>, ProviderError> {
        if node_groups.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .clients
            .call(
                "DescribeSecurityGroups",
                self.clients
                    .ec2
                    .describe_security_groups()
                    .set_group_ids(Some(node_groups.iter().cloned().collect()))
                    .send(),
            )
            .await?;
        Ok(out
            .security_groups()
            .iter()
            .filter_map(|g| {
                let ours = rules_of(g.ip_permissions())
                    .into_iter()
                    .filter(|r| r.source == Source::Group(frontend.to_owned()))
                    .collect();
                Some((g.group_id()?.to_owned(), ours))
            })
            .collect())
    }

    /// The Service's target groups among those attached to the load balancer, and what to
    /// change in them; with each group's ARN by name.
    pub(super) async fn target_group_plan(
        &self,
        id: &ServiceIdentity,
        attached: &[(TargetGroup, BTreeMap<String, String>)],
        desired: &Desired,
    ) -> Result<(Vec<ObservedTargetGroup>, plan::TargetGroupPlan, BTreeMap<String, String>), ProviderError> {
        let observed = self.observe_target_groups(id, desired.group.as_deref(), attached).await?;
        let tg_plan = plan::diff_target_groups(&desired.target_groups, &observed);
        let arns = observed.iter().map(|t| (t.name.clone(), t.arn.clone())).collect();
        Ok((observed, tg_plan, arns))
    }

    /// The target groups attached to load balancer `lb_arn`, with their tags.
    pub(super) async fn attached_target_groups(
        &self,
        lb_arn: &str,
    ) -> Result<Vec<(TargetGroup, BTreeMap<String, String>)>, ProviderError> {
        let out = match self
            .clients
            .call("DescribeTargetGroups", self.clients.elb.describe_target_groups().load_balancer_arn(lb_arn).send())
            .await
        {
            Ok(out) => out,
            // Some endpoints (moto) answer so for a load balancer without target groups, which a
            // crash between creating it and its listeners leaves.
            Err(e) if e.is("TargetGroupNotFound") => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let arns: Vec<String> =
            out.target_groups().iter().filter_map(|t| t.target_group_arn().map(str::to_owned)).collect();
        let mut tags = self.elb_tags(&arns).await?;
        Ok(out
            .target_groups()
            .iter()
            .map(|tg| (tg.clone(), tg.target_group_arn().and_then(|a| tags.remove(a)).unwrap_or_default()))
            .collect())
    }

    /// The Service's target groups among `attached`, with attributes and targets. In a group,
    /// the other members' are theirs; anything else attached is not hawser's and is left alone.
    pub(super) async fn observe_target_groups(
        &self,
        id: &ServiceIdentity,
        group: Option<&str>,
        attached: &[(TargetGroup, BTreeMap<String, String>)],
    ) -> Result<Vec<ObservedTargetGroup>, ProviderError> {
        let mut result = Vec::new();
        for (tg, tags) in attached {
            let Some(arn) = tg.target_group_arn() else { continue };
            if !Self::owned_by(tags, id) {
                if group.is_none() || tags.get(OWNERSHIP_TAG_GROUP).map(String::as_str) != group {
                    tracing::warn!(
                        target_group = arn,
                        "a target group hawser does not own is attached; left untouched"
                    );
                }
                continue;
            }
            result.push(
                self.describe_target_group(arn, tg.target_group_name().unwrap_or_default(), tags.clone(), Some(tg))
                    .await?,
            );
        }
        Ok(result)
    }

    /// Creates a target group, or adopts the one a crash left behind under the same name.
    /// Returns its ARN and the targets it already holds.
    async fn create_target_group(
        &self,
        id: &ServiceIdentity,
        env: &Environment,
        d: &DesiredTargetGroup,
    ) -> Result<(String, BTreeSet<String>), ProviderError> {
        let h = &d.health;
        let mut req = self
            .clients
            .elb
            .create_target_group()
            .name(&d.name)
            .protocol(ProtocolEnum::from(d.protocol.as_str()))
            .port(i32::from(d.port))
            .vpc_id(&env.vpc_id)
            .target_type(TargetTypeEnum::Instance)
            .health_check_enabled(true)
            .health_check_protocol(ProtocolEnum::from(h.protocol.as_str()))
            .health_check_port(&h.port)
            .health_check_interval_seconds(h.interval)
            .health_check_timeout_seconds(h.timeout)
            .healthy_threshold_count(h.healthy)
            .unhealthy_threshold_count(h.unhealthy)
            .set_tags(Some(elb_tags(&d.tags)));
        if let Some(path) = &h.path {
            req = req.health_check_path(path).matcher(Matcher::builder().http_code("200").build());
        }
        let arn = match self.clients.call("CreateTargetGroup", req.send()).await {
            Ok(out) => out.target_groups().first().and_then(|t| t.target_group_arn()).unwrap_or_default().to_owned(),
            Err(e) if e.is("DuplicateTargetGroupName") => {
                let out = self
                    .clients
                    .call("DescribeTargetGroups", self.clients.elb.describe_target_groups().names(&d.name).send())
                    .await?;
                let arn = out.target_groups().first().and_then(|t| t.target_group_arn()).unwrap_or_default().to_owned();
                let tags = self.elb_tags(std::slice::from_ref(&arn)).await?.remove(&arn).unwrap_or_default();
                if !Self::owned_by(&tags, id) {
                    return Err(ProviderError::Conflict(format!(
                        "a target group named {} ({arn}) exists and is not owned by Service {}; it is left untouched",
                        d.name,
                        id.service_key()
                    )));
                }
                // Ours, left behind by an interrupted reconcile: bring it to the desired state.
                let observed = self.describe_target_group(&arn, &d.name, tags, None).await?;
                let targets = observed.targets.clone();
                let plan = plan::diff_target_groups(std::slice::from_ref(d), std::slice::from_ref(&observed));
                for u in &plan.update {
                    self.update_target_group(u).await?;
                }
                return Ok((arn, targets));
            }
            Err(e) => return Err(e.with_field(ann::PROXY_PROTOCOL).into()),
        };
        self.remember_tags(&arn, d.tags.clone());
        self.clients
            .call(
                "ModifyTargetGroupAttributes",
                self.clients
                    .elb
                    .modify_target_group_attributes()
                    .target_group_arn(&arn)
                    .set_attributes(Some(
                        d.attributes
                            .iter()
                            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
                            .collect(),
                    ))
                    .send(),
            )
            .await
            .map_err(|e| e.with_field(ann::PROXY_PROTOCOL))?;
        Ok((arn, BTreeSet::new()))
    }

    /// One target group's state, for adopting it.
    async fn describe_target_group(
        &self,
        arn: &str,
        name: &str,
        tags: BTreeMap<String, String>,
        read: Option<&TargetGroup>,
    ) -> Result<ObservedTargetGroup, ProviderError> {
        let tg = match read {
            Some(tg) => tg.clone(),
            None => {
                let out = self
                    .clients
                    .call(
                        "DescribeTargetGroups",
                        self.clients.elb.describe_target_groups().target_group_arns(arn).send(),
                    )
                    .await?;
                out.target_groups()
                    .first()
                    .cloned()
                    .unwrap_or_else(|| TargetGroup::builder().target_group_arn(arn).build())
            }
        };
        let attrs = self
            .clients
            .call(
                "DescribeTargetGroupAttributes",
                self.clients.elb.describe_target_group_attributes().target_group_arn(arn).send(),
            )
            .await?;
        let health = self
            .clients
            .call("DescribeTargetHealth", self.clients.elb.describe_target_health().target_group_arn(arn).send())
            .await?;
        let protocol = tg.health_check_protocol().map(|p| p.as_str().to_owned()).unwrap_or_default();
        Ok(ObservedTargetGroup {
            arn: arn.to_owned(),
            name: name.to_owned(),
            health: HealthSettings {
                path: if protocol == "TCP" { None } else { tg.health_check_path().map(str::to_owned) },
                protocol,
                port: tg.health_check_port().unwrap_or_default().to_owned(),
                interval: tg.health_check_interval_seconds().unwrap_or_default(),
                timeout: tg.health_check_timeout_seconds().unwrap_or_default(),
                healthy: tg.healthy_threshold_count().unwrap_or_default(),
                unhealthy: tg.unhealthy_threshold_count().unwrap_or_default(),
            },
            attributes: attrs
                .attributes()
                .iter()
                .filter_map(|a| Some((a.key()?.to_owned(), a.value().unwrap_or_default().to_owned())))
                .collect(),
            tags,
            targets: health
                .target_health_descriptions()
                .iter()
                .filter(|d| d.target_health().and_then(|h| h.state()) != Some(&TargetHealthStateEnum::Draining))
                .filter_map(|d| d.target().and_then(|t| t.id()).map(str::to_owned))
                .collect(),
        })
    }

    async fn update_target_group(&self, u: &plan::TargetGroupUpdate) -> Result<(), ProviderError> {
        if let Some(h) = &u.health {
            let mut req = self
                .clients
                .elb
                .modify_target_group()
                .target_group_arn(&u.arn)
                .health_check_protocol(ProtocolEnum::from(h.protocol.as_str()))
                .health_check_port(&h.port)
                .health_check_interval_seconds(h.interval)
                .health_check_timeout_seconds(h.timeout)
                .healthy_threshold_count(h.healthy)
                .unhealthy_threshold_count(h.unhealthy);
            if let Some(path) = &h.path {
                req = req.health_check_path(path).matcher(Matcher::builder().http_code("200").build());
            }
            self.clients
                .call("ModifyTargetGroup", req.send())
                .await
                .map_err(|e| e.with_field("hawser.dev/health-check-interval"))?;
        }
        if !u.attributes.is_empty() {
            self.clients
                .call(
                    "ModifyTargetGroupAttributes",
                    self.clients
                        .elb
                        .modify_target_group_attributes()
                        .target_group_arn(&u.arn)
                        .set_attributes(Some(
                            u.attributes
                                .iter()
                                .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
                                .collect(),
                        ))
                        .send(),
                )
                .await
                .map_err(|e| e.with_field(ann::PROXY_PROTOCOL))?;
        }
        self.sync_elb_tags(&u.arn, &u.tags).await
    }

    async fn sync_elb_tags(&self, arn: &str, diff: &TagDiff) -> Result<(), ProviderError> {
        if diff.is_empty() {
            return Ok(());
        }
        if !diff.add.is_empty() {
            self.clients
                .call(
                    "AddTags",
                    self.clients.elb.add_tags().resource_arns(arn).set_tags(Some(elb_tags(&diff.add))).send(),
                )
                .await?;
        }
        if !diff.remove.is_empty() {
            self.clients
                .call(
                    "RemoveTags",
                    self.clients.elb.remove_tags().resource_arns(arn).set_tag_keys(Some(diff.remove.clone())).send(),
                )
                .await?;
        }
        // Read again next time rather than guess the merged result.
        self.forget_tags(arn);
        Ok(())
    }

    async fn create_load_balancer(
        &self,
        desired: &Desired,
        security_groups: &BTreeSet<String>,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        let mappings = desired
            .subnets
            .iter()
            .map(|s| {
                aws_sdk_elasticloadbalancingv2::types::SubnetMapping::builder()
                    .subnet_id(&s.subnet_id)
                    .set_allocation_id(s.allocation_id.clone())
                    .set_private_ipv4_address(s.private_ipv4.clone())
                    .build()
            })
            .collect();
        let mut req = self
            .clients
            .elb
            .create_load_balancer()
            .name(&desired.name)
            .r#type(LoadBalancerTypeEnum::Network)
            .scheme(LoadBalancerSchemeEnum::from(desired.scheme.as_str()))
            .ip_address_type(IpAddressType::from(desired.ip_address_type.as_str()))
            .set_subnet_mappings(Some(mappings))
            .set_tags(Some(elb_tags(&desired.tags)));
        if !security_groups.is_empty() {
            req = req.set_security_groups(Some(security_groups.iter().cloned().collect()));
        }
        let out = self.clients.call("CreateLoadBalancer", req.send()).await.map_err(|e| {
            if e.is("DuplicateLoadBalancerName") {
                // Seen only when the name was taken between our read and this create, or while
                // AWS still finishes deleting a replaced one.
                ProviderError::Transient(format!("load balancer name {} is still taken; retrying", desired.name))
            } else {
                e.with_field(ann::SUBNETS).into()
            }
        })?;
        let Some(created) = out.load_balancers().first() else {
            return Err(ProviderError::Transient("CreateLoadBalancer returned no load balancer".into()));
        };
        let arn = created.load_balancer_arn().unwrap_or_default().to_owned();
        self.remember_tags(&arn, desired.tags.clone());
        // A new NLB has cross-zone and deletion protection off: only a user's "true" needs a call.
        let defaults = BTreeMap::from([
            ("load_balancing.cross_zone.enabled".to_owned(), "false".to_owned()),
            ("deletion_protection.enabled".to_owned(), "false".to_owned()),
        ]);
        let attributes = plan::diff_attributes(&desired.attributes, &defaults);
        if !attributes.is_empty() {
            self.modify_lb_attributes(&arn, &attributes).await?;
        }
        Ok(ObservedLoadBalancer {
            arn,
            dns_name: created.dns_name().unwrap_or_default().to_owned(),
            scheme: scheme_of(created.scheme()),
            vpc_id: created.vpc_id().unwrap_or_default().to_owned(),
            ip_address_type: desired.ip_address_type.clone(),
            subnets: desired.subnets.iter().map(|s| s.subnet_id.clone()).collect(),
            security_groups: security_groups.clone(),
            attributes: desired.attributes.clone(),
            tags: desired.tags.clone(),
        })
    }

    async fn modify_lb_attributes(
        &self,
        arn: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let field = if attributes.contains_key("deletion_protection.enabled") {
            ann::DELETION_PROTECTION
        } else {
            ann::CROSS_ZONE
        };
        self.clients
            .call(
                "ModifyLoadBalancerAttributes",
                self.clients
                    .elb
                    .modify_load_balancer_attributes()
                    .load_balancer_arn(arn)
                    .set_attributes(Some(
                        attributes
                            .iter()
                            .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
                            .collect(),
                    ))
                    .send(),
            )
            .await
            .map_err(|e| e.with_field(field))?;
        Ok(())
    }

    async fn update_load_balancer(
        &self,
        lb: &mut ObservedLoadBalancer,
        u: &LoadBalancerUpdate,
    ) -> Result<(), ProviderError> {
        if u.is_empty() {
            return Ok(());
        }
        if let Some(groups) = &u.security_groups {
            self.clients
                .call(
                    "SetSecurityGroups",
                    self.clients
                        .elb
                        .set_security_groups()
                        .load_balancer_arn(&lb.arn)
                        .set_security_groups(Some(groups.iter().cloned().collect()))
                        .send(),
                )
                .await
                .map_err(|e| e.with_field(ann::SECURITY_GROUPS))?;
        }
        if let Some(subnets) = &u.subnets {
            let mappings = subnets
                .iter()
                .map(|s| {
                    aws_sdk_elasticloadbalancingv2::types::SubnetMapping::builder()
                        .subnet_id(&s.subnet_id)
                        .set_allocation_id(s.allocation_id.clone())
                        .set_private_ipv4_address(s.private_ipv4.clone())
                        .build()
                })
                .collect();
            self.clients
                .call(
                    "SetSubnets",
                    self.clients
                        .elb
                        .set_subnets()
                        .load_balancer_arn(&lb.arn)
                        .set_subnet_mappings(Some(mappings))
                        .send(),
                )
                .await
                .map_err(|e| e.with_field(ann::SUBNETS))?;
        }
        if let Some(t) = &u.ip_address_type {
            self.clients
                .call(
                    "SetIpAddressType",
                    self.clients
                        .elb
                        .set_ip_address_type()
                        .load_balancer_arn(&lb.arn)
                        .ip_address_type(IpAddressType::from(t.as_str()))
                        .send(),
                )
                .await
                .map_err(|e| e.with_field("spec.ipFamilies"))?;
        }
        if !u.attributes.is_empty() {
            self.modify_lb_attributes(&lb.arn, &u.attributes).await?;
        }
        self.sync_elb_tags(&lb.arn, &u.tags).await
    }

    pub(super) async fn observe_listeners(&self, lb_arn: &str) -> Result<Vec<ObservedListener>, ProviderError> {
        let out = self
            .clients
            .call("DescribeListeners", self.clients.elb.describe_listeners().load_balancer_arn(lb_arn).send())
            .await?;
        Ok(out
            .listeners()
            .iter()
            .filter_map(|l| {
                let action = l.default_actions().first();
                Some(ObservedListener {
                    arn: l.listener_arn()?.to_owned(),
                    port: u16::try_from(l.port()?).ok()?,
                    protocol: l.protocol().map(|p| p.as_str().to_owned()).unwrap_or_default(),
                    target_group_arn: action.and_then(|a| {
                        a.target_group_arn().map(str::to_owned).or_else(|| {
                            a.forward_config()
                                .and_then(|f| f.target_groups().first())
                                .and_then(|t| t.target_group_arn())
                                .map(str::to_owned)
                        })
                    }),
                    certificate: l.certificates().first().and_then(|c| c.certificate_arn()).map(str::to_owned),
                    ssl_policy: l.ssl_policy().map(str::to_owned),
                })
            })
            .collect())
    }

    async fn apply_listener(
        &self,
        lb_arn: &str,
        desired: &Desired,
        tg_arns: &BTreeMap<String, String>,
        action: ListenerAction,
    ) -> Result<(), ProviderError> {
        let find = |port: u16| -> Result<(&DesiredListener, &String), ProviderError> {
            let d = desired
                .listeners
                .iter()
                .find(|l| l.port == port)
                .ok_or_else(|| ProviderError::Transient(format!("no desired listener on port {port}")))?;
            let tg = tg_arns
                .get(&d.target_group)
                .ok_or_else(|| ProviderError::Transient(format!("target group {} is missing", d.target_group)))?;
            Ok((d, tg))
        };
        let field = |e: super::errors::ApiError, d: &DesiredListener| -> ProviderError {
            if d.certificate.is_some() { e.with_field(ann::SSL_CERT).into() } else { e.with_field("spec.ports").into() }
        };
        match action {
            ListenerAction::Create(port) => {
                let (d, tg) = find(port)?;
                let mut req = self
                    .clients
                    .elb
                    .create_listener()
                    .load_balancer_arn(lb_arn)
                    .protocol(ProtocolEnum::from(d.protocol.as_str()))
                    .port(i32::from(d.port))
                    .default_actions(forward(tg))
                    .set_tags(Some(elb_tags(&d.tags)));
                if let Some(cert) = &d.certificate {
                    req = req.certificates(Certificate::builder().certificate_arn(cert).build());
                }
                if let Some(policy) = &d.ssl_policy {
                    req = req.ssl_policy(policy);
                }
                self.clients.call("CreateListener", req.send()).await.map_err(|e| field(e, d))?;
            }
            ListenerAction::Modify(arn, port) => {
                let (d, tg) = find(port)?;
                let mut req = self
                    .clients
                    .elb
                    .modify_listener()
                    .listener_arn(&arn)
                    .protocol(ProtocolEnum::from(d.protocol.as_str()))
                    .port(i32::from(d.port))
                    .default_actions(forward(tg));
                if let Some(cert) = &d.certificate {
                    req = req.certificates(Certificate::builder().certificate_arn(cert).build());
                }
                if let Some(policy) = &d.ssl_policy {
                    req = req.ssl_policy(policy);
                }
                self.clients.call("ModifyListener", req.send()).await.map_err(|e| field(e, d))?;
            }
            ListenerAction::Delete(arn) => {
                match self
                    .clients
                    .call("DeleteListener", self.clients.elb.delete_listener().listener_arn(&arn).send())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}
