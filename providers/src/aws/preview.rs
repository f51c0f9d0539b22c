//! The AWS plan: what `ensure` and `delete` would change, found with the same reads they make
//! and the same pure diffs (`plan.rs`), and no write.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;

use super::AwsProvider;
use super::annotations as ann;
use super::delete::FoundTargetGroup;
use super::ensure::other_members;
use super::naming;
use super::plan::{
    self, HealthSettings, LoadBalancerAction, ObservedListener, ObservedTargetGroup, Rule, Source, TagDiff,
};
use super::scope::Scope;
use crate::changes::{Action, Change, ChangePlan, listed, membership, shown};
use crate::naming::OWNERSHIP_TAG_GROUP;
use crate::{LoadBalancerSpec, ProviderError, ServiceIdentity};

/// How a security group not created yet is named in the plan.
const NEW_GROUP: &str = "(the new frontend security group)";

fn rule(r: &Rule) -> String {
    let ports = if r.from == r.to { r.from.to_string() } else { format!("{}-{}", r.from, r.to) };
    let source = match &r.source {
        Source::Cidr(c) => c.clone(),
        Source::Group(g) => g.clone(),
    };
    format!("{} {ports} from {source}", r.protocol)
}

fn tags_field(change: Change, diff: &TagDiff, observed: &BTreeMap<String, String>) -> Change {
    if diff.is_empty() {
        return change;
    }
    let mut wanted = observed.clone();
    wanted.extend(diff.add.clone());
    for k in &diff.remove {
        wanted.remove(k);
    }
    let show = |t: &BTreeMap<String, String>| listed(t.iter().map(|(k, v)| format!("{k}={v}")));
    change.field("tags", show(observed), show(&wanted))
}

fn attributes_fields(
    mut change: Change,
    wanted: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> Change {
    for (k, v) in wanted {
        change = change.field(format!("attributes.{k}"), observed.get(k).cloned(), Some(v.clone()));
    }
    change
}

fn health_fields(mut change: Change, old: &HealthSettings, new: &HealthSettings) -> Change {
    let pairs: [(&str, String, String); 7] = [
        ("healthCheck.protocol", old.protocol.clone(), new.protocol.clone()),
        ("healthCheck.port", old.port.clone(), new.port.clone()),
        ("healthCheck.path", old.path.clone().unwrap_or_default(), new.path.clone().unwrap_or_default()),
        ("healthCheck.intervalSeconds", old.interval.to_string(), new.interval.to_string()),
        ("healthCheck.timeoutSeconds", old.timeout.to_string(), new.timeout.to_string()),
        ("healthCheck.healthyThreshold", old.healthy.to_string(), new.healthy.to_string()),
        ("healthCheck.unhealthyThreshold", old.unhealthy.to_string(), new.unhealthy.to_string()),
    ];
    for (field, o, n) in pairs {
        if o != n {
            let some = |s: String| if s.is_empty() { None } else { Some(s) };
            change = change.field(field, some(o), some(n));
        }
    }
    change
}

fn listener_name(port: u16, protocol: &str) -> String {
    format!("{port}/{protocol}")
}

impl AwsProvider {
    pub(super) async fn plan_inner(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        let opts = ann::parse(spec).map_err(ProviderError::InvalidInput)?;
        let id = &spec.identity;
        let group = plan::group_key(spec);
        let scope = Scope::of(spec, group.as_deref());
        let mut out = ChangePlan::default();
        let lb = match self.observe_load_balancer(scope).await {
            Ok(lb) => lb,
            Err(ProviderError::Conflict(message)) => {
                out.conflict("load balancer", scope.load_balancer_name(), message);
                None
            }
            Err(e) => return Err(e),
        };
        let env = self.environment(spec, &opts, lb.as_ref()).await?;
        let desired = plan::desired(spec, &opts, &env)?;
        let attached = match &lb {
            Some(l) => self.attached_target_groups(&l.arn).await?,
            None => Vec::new(),
        };
        let others = other_members(scope, &attached);
        super::ensure::check_listener_quota(others.len(), &desired)?;

        // 1. Target groups, created first as in ensure.
        let (observed_tgs, tg_plan, mut tg_arns) = self.target_group_plan(id, &attached, &desired).await?;
        let mut tg_changes: BTreeMap<String, Change> = BTreeMap::new();
        for name in &tg_plan.create {
            let Some(d) = desired.target_groups.iter().find(|t| &t.name == name) else { continue };
            let mut change = Change::new(Action::Create, "target group", name)
                .field("protocol", None, shown(d.protocol.as_str()))
                .field("port", None, shown(d.port))
                .field("healthCheck", None, shown(format!("{} port {}", d.health.protocol, d.health.port)));
            if lb.is_some() {
                change =
                    change.because(format!("listener {} moves to it once its targets are healthy", d.listener_port));
            }
            tg_changes.insert(name.clone(), change);
            tg_arns.insert(name.clone(), format!("new:{name}"));
        }
        for u in &tg_plan.update {
            let Some(o) = observed_tgs.iter().find(|t| t.arn == u.arn) else { continue };
            let mut change = Change::new(Action::Update, "target group", &u.name);
            if let Some(h) = &u.health {
                change = health_fields(change, &o.health, h);
            }
            change = attributes_fields(change, &u.attributes, &o.attributes);
            change = tags_field(change, &u.tags, &o.tags);
            tg_changes.insert(u.name.clone(), change);
        }
        for d in &desired.target_groups {
            let current = observed_tgs.iter().find(|t| t.name == d.name).map(|t| &t.targets);
            let empty = BTreeSet::new();
            let Some((old, new)) = membership(
                "instances",
                current.unwrap_or(&empty).iter().map(String::as_str),
                desired.targets.iter().map(String::as_str),
            ) else {
                continue;
            };
            let change = tg_changes
                .remove(&d.name)
                .unwrap_or_else(|| Change::new(Action::Update, "target group", &d.name))
                .field("targets", if current.is_some() { old } else { None }, new);
            tg_changes.insert(d.name.clone(), change);
        }
        // In the order ensure makes them: created groups, updated groups.
        let (created, updated): (Vec<Change>, Vec<Change>) =
            tg_changes.into_values().partition(|c| c.action == Action::Create);
        out.changes.extend(created);

        // 2. Security groups.
        let security_groups: BTreeSet<String> = match &desired.frontend {
            Some(front) => {
                let group = match self.find_frontend(scope, Some(&env.vpc_id)).await? {
                    Some((group, observed, tags)) => {
                        let (authorize, revoke) = plan::diff_rules(&front.ingress, &observed);
                        let mut change = Change::new(Action::Update, "security group", &group);
                        if !authorize.is_empty() || !revoke.is_empty() {
                            change = change.field(
                                "ingress",
                                listed(observed.iter().map(rule)),
                                listed(front.ingress.iter().map(rule)),
                            );
                        }
                        // Ensure only adds tags to the group; it never removes any.
                        let mut diff = plan::diff_tags(&front.tags, &tags);
                        diff.remove.clear();
                        out.push_if_changed(tags_field(change, &diff, &tags));
                        group
                    }
                    None => {
                        if let Some(foreign) = self.security_group_named(&front.name, &env.vpc_id).await? {
                            out.conflict(
                                "security group",
                                &front.name,
                                format!(
                                    "{foreign} in {} has this name but not hawser's ownership tags for {}; \
                                     hawser leaves it untouched — delete or rename it",
                                    env.vpc_id,
                                    scope.owner()
                                ),
                            );
                        }
                        out.push(Change::new(Action::Create, "security group", &front.name).field(
                            "ingress",
                            None,
                            listed(front.ingress.iter().map(rule)),
                        ));
                        NEW_GROUP.to_owned()
                    }
                };
                let mut wanted = plan::node_rules(&desired, &group);
                wanted.extend(plan::node_rules_of_target_groups(others.iter().map(|(tg, _)| tg), &group));
                self.plan_node_rules(&env.node_security_groups, &wanted, &group, &mut out).await?;
                BTreeSet::from([group])
            }
            None => desired.own_security_groups.iter().flatten().cloned().collect(),
        };

        // 3. The load balancer.
        let name = scope.load_balancer_name();
        let mut listeners_observed: Vec<ObservedListener> = Vec::new();
        let lb_fields = |change: Change| {
            change
                .field("scheme", None, shown(desired.scheme.as_str()))
                .field("subnets", None, listed(desired.subnets.iter().map(|s| s.subnet_id.clone())))
                .field("ipAddressType", None, shown(&desired.ip_address_type))
                .field("securityGroups", None, listed(&security_groups))
        };
        match plan::diff_load_balancer(&desired, &security_groups, lb.as_ref()) {
            LoadBalancerAction::Create => {
                if out.conflicts.iter().all(|c| c.kind != "load balancer") {
                    out.push(lb_fields(Change::new(Action::Create, "load balancer", &name)));
                }
            }
            LoadBalancerAction::Replace(reason) if scope.group().is_some() && !others.is_empty() => {
                out.conflict(
                    "load balancer",
                    &name,
                    format!(
                        "the load balancer of group {} must be replaced ({reason}) but carries other members' \
                         listeners; change every member, or move this Service to another group",
                        group.as_deref().unwrap_or_default()
                    ),
                );
            }
            LoadBalancerAction::Replace(reason) => {
                let old = lb.as_ref();
                let mut reason = format!("{reason}; its DNS name changes");
                if old.and_then(|l| l.attributes.get("deletion_protection.enabled")).is_some_and(|v| v == "true") {
                    reason.push_str(&format!(
                        "; blocked until {} is false, as deletion protection is on",
                        ann::DELETION_PROTECTION
                    ));
                }
                let mut change =
                    Change::new(Action::Replace, "load balancer", old.map_or(&name, |l| &l.arn)).because(reason).field(
                        "scheme",
                        old.and_then(|l| l.scheme).map(|s| s.as_str().to_owned()),
                        shown(desired.scheme.as_str()),
                    );
                if old.is_some_and(|l| l.security_groups.is_empty()) {
                    change = change.field("securityGroups", None, listed(&security_groups));
                }
                out.push(change);
            }
            LoadBalancerAction::Update(u) => {
                if let Some(current) = &lb {
                    let mut change = Change::new(Action::Update, "load balancer", &current.arn);
                    if let Some(subnets) = &u.subnets {
                        change = change.field(
                            "subnets",
                            listed(&current.subnets),
                            listed(subnets.iter().map(|s| s.subnet_id.clone())),
                        );
                    }
                    if let Some(groups) = &u.security_groups {
                        change = change.field("securityGroups", listed(&current.security_groups), listed(groups));
                    }
                    if let Some(t) = &u.ip_address_type {
                        change = change.field("ipAddressType", shown(&current.ip_address_type), shown(t));
                    }
                    change = attributes_fields(change, &u.attributes, &current.attributes);
                    change = tags_field(change, &u.tags, &current.tags);
                    out.push_if_changed(change);
                    listeners_observed = self.observe_listeners(&current.arn).await?;
                    if scope.group().is_some() {
                        let (mine, theirs) = super::ensure::split_listeners(scope, listeners_observed);
                        for held in theirs.iter().filter(|l| desired.listeners.iter().any(|d| d.port == l.port)) {
                            out.conflict(
                                "listener",
                                listener_name(held.port, &held.protocol),
                                "another member of the group still holds this port; it is created once that member \
                                 lets it go",
                            );
                        }
                        listeners_observed = mine;
                    }
                }
            }
        }
        out.changes.extend(updated);

        // 4. Listeners, then target groups no listener uses any more.
        let tg_name = |arn: &str| {
            tg_arns.iter().find(|(_, a)| a.as_str() == arn).map_or_else(|| arn.to_owned(), |(n, _)| n.clone())
        };
        for action in plan::diff_listeners(&desired.listeners, &listeners_observed, &tg_arns) {
            match action {
                plan::ListenerAction::Create(port) => {
                    let Some(d) = desired.listeners.iter().find(|l| l.port == port) else { continue };
                    let mut change = Change::new(Action::Create, "listener", listener_name(port, &d.protocol)).field(
                        "targetGroup",
                        None,
                        shown(&d.target_group),
                    );
                    if let Some(cert) = &d.certificate {
                        change = change.field("certificate", None, shown(cert));
                    }
                    out.push(change);
                }
                plan::ListenerAction::Modify(arn, port) => {
                    let (Some(d), Some(o)) = (
                        desired.listeners.iter().find(|l| l.port == port),
                        listeners_observed.iter().find(|l| l.arn == arn),
                    ) else {
                        continue;
                    };
                    let mut change = Change::new(Action::Update, "listener", listener_name(port, &o.protocol));
                    if o.protocol != d.protocol {
                        change = change.field("protocol", shown(&o.protocol), shown(&d.protocol));
                    }
                    let old_tg = o.target_group_arn.as_deref().map(tg_name);
                    if old_tg.as_deref() != Some(d.target_group.as_str()) {
                        change = change.field("targetGroup", old_tg, shown(&d.target_group));
                    }
                    if o.certificate != d.certificate {
                        change = change.field("certificate", o.certificate.clone(), d.certificate.clone());
                    }
                    if d.ssl_policy.is_some() && o.ssl_policy != d.ssl_policy {
                        change = change.field("sslPolicy", o.ssl_policy.clone(), d.ssl_policy.clone());
                    }
                    out.push(change);
                }
                plan::ListenerAction::Delete(arn) => {
                    let what = listeners_observed
                        .iter()
                        .find(|l| l.arn == arn)
                        .map_or(arn.clone(), |l| listener_name(l.port, &l.protocol));
                    out.push(Change::new(Action::Delete, "listener", what));
                }
            }
        }
        for arn in &tg_plan.delete {
            let name = observed_tgs.iter().find(|t| &t.arn == arn).map_or(arn.as_str(), |t| t.name.as_str());
            out.push(Change::new(Action::Delete, "target group", name));
        }
        // 6. A Service moving into a group: its own load balancer goes once the group's serves it.
        if let Some(group) = &group {
            let mut own = ChangePlan::default();
            self.plan_delete_own(id, &mut own).await?;
            for change in own.changes {
                out.push(change.because(format!("the Service moves into load-balancer group {group}")));
            }
        }
        Ok(out)
    }

    /// The node security groups' rules from the frontend group, as ensure would set them.
    async fn plan_node_rules(
        &self,
        node_groups: &BTreeSet<String>,
        wanted: &BTreeSet<Rule>,
        frontend: &str,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        for (group, ours) in self.node_rules_from(node_groups, frontend).await? {
            if ours != *wanted {
                out.push(Change::new(Action::Update, "security group", group).field(
                    format!("ingress from {frontend}"),
                    listed(ours.iter().map(rule)),
                    listed(wanted.iter().map(rule)),
                ));
            }
        }
        Ok(())
    }

    /// A security group named `name` in `vpc`, whoever owns it.
    async fn security_group_named(&self, name: &str, vpc: &str) -> Result<Option<String>, ProviderError> {
        let found = self
            .clients
            .call(
                "DescribeSecurityGroups",
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(Filter::builder().name("group-name").values(name).build())
                    .filters(Filter::builder().name("vpc-id").values(vpc).build())
                    .send(),
            )
            .await?;
        Ok(found.security_groups().first().and_then(|g| g.group_id()).map(str::to_owned))
    }

    pub(super) async fn plan_delete_inner(&self, id: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        let mut out = ChangePlan::default();
        let found = self.detached_target_groups(id).await?;
        let member_prefix = naming::member_target_group_prefix(id);
        let (parts, own): (Vec<_>, Vec<_>) = found.into_iter().partition(|t| t.name.starts_with(&member_prefix));
        self.plan_delete_own_with(id, own, &mut out).await?;
        let mut groups: BTreeMap<String, Vec<FoundTargetGroup>> = BTreeMap::new();
        for part in parts {
            if let Some(group) = part.tags.get(OWNERSHIP_TAG_GROUP) {
                groups.entry(group.clone()).or_default().push(part);
            }
        }
        for (group, found) in groups {
            self.plan_leave_group_with(id, &group, &found, &mut out).await?;
        }
        Ok(out)
    }

    /// What taking the Service's part out of `group`'s load balancer would change, as
    /// [`Provider::leave_group`](crate::Provider::leave_group) finds it.
    pub(super) async fn plan_leave_group_inner(
        &self,
        id: &ServiceIdentity,
        group: &str,
    ) -> Result<ChangePlan, ProviderError> {
        let found = self.member_parts(id, group).await?;
        let mut out = ChangePlan::default();
        self.plan_leave_group_with(id, group, &found, &mut out).await?;
        Ok(out)
    }

    /// What deleting the Service's own load balancer would change.
    async fn plan_delete_own(&self, id: &ServiceIdentity, out: &mut ChangePlan) -> Result<(), ProviderError> {
        let lb_or_frontend = matches!(self.observe_load_balancer(Scope::Own(id)).await, Ok(Some(_)))
            || self.find_frontend(Scope::Own(id), None).await?.is_some();
        if !lb_or_frontend {
            return Ok(());
        }
        let own_prefix = naming::target_group_prefix(id);
        let found = self.detached_target_groups(id).await?;
        let own = found.into_iter().filter(|t| t.name.starts_with(&own_prefix)).collect();
        self.plan_delete_own_with(id, own, out).await
    }

    async fn plan_delete_own_with(
        &self,
        id: &ServiceIdentity,
        detached: Vec<FoundTargetGroup>,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        let mut target_groups: Vec<ObservedTargetGroup> = Vec::new();
        match self.observe_load_balancer(Scope::Own(id)).await {
            Ok(Some(lb)) => {
                let mut change = Change::new(Action::Delete, "load balancer", &lb.arn)
                    .field("dnsName", shown(&lb.dns_name), None)
                    .because("with its listeners");
                if lb.attributes.get("deletion_protection.enabled").is_some_and(|v| v == "true") {
                    change = change.because(format!(
                        "blocked until {} is false, as deletion protection is on",
                        ann::DELETION_PROTECTION
                    ));
                }
                out.push(change);
                let attached = self.attached_target_groups(&lb.arn).await?;
                target_groups = self.observe_target_groups(id, None, &attached).await?;
            }
            Ok(None) => {}
            // Someone else's load balancer with our name is never deleted.
            Err(ProviderError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        for tg in &target_groups {
            out.push(Change::new(Action::Delete, "target group", &tg.name));
        }
        for t in detached {
            if !target_groups.iter().any(|o| o.arn == t.arn) {
                out.push(
                    Change::new(Action::Delete, "target group", t.name).because("left detached by an earlier run"),
                );
            }
        }
        if let Some((group, _, _)) = self.find_frontend(Scope::Own(id), None).await? {
            out.push(
                Change::new(Action::Delete, "security group", &group).because("and the node rules that refer to it"),
            );
        }
        Ok(())
    }

    /// What taking the Service's part out of `group`'s load balancer would change; with the last
    /// member, the load balancer and its frontend group go too.
    async fn plan_leave_group_with(
        &self,
        id: &ServiceIdentity,
        group: &str,
        found: &[FoundTargetGroup],
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        let scope = Scope::Member { id, group };
        let lb = self.observe_load_balancer(scope).await.ok().flatten();
        let attached = match &lb {
            Some(l) => self.attached_target_groups(&l.arn).await?,
            None => Vec::new(),
        };
        let last = other_members(scope, &attached).is_empty();
        let frontend = self.find_frontend(scope, None).await?;
        match (&lb, last) {
            (Some(lb), true) => out.push(
                Change::new(Action::Delete, "load balancer", &lb.arn)
                    .field("dnsName", shown(&lb.dns_name), None)
                    .because(format!("the last member of load-balancer group {group} goes; with its listeners")),
            ),
            (Some(lb), false) => {
                let (mine, _) = super::ensure::split_listeners(scope, self.observe_listeners(&lb.arn).await?);
                for l in mine {
                    out.push(
                        Change::new(Action::Delete, "listener", listener_name(l.port, &l.protocol)).because(format!(
                            "of the group {group}'s load balancer, which stays for its other members"
                        )),
                    );
                }
            }
            (None, _) => {}
        }
        if let Some((sg, rules, _)) = &frontend {
            if last {
                out.push(
                    Change::new(Action::Delete, "security group", sg).because("and the node rules that refer to it"),
                );
            } else if !rules.is_empty() {
                out.push(Change::new(Action::Update, "security group", sg).field(
                    format!("ingress of {}", id.service_key()),
                    listed(rules.iter().map(rule)),
                    None,
                ));
            }
        }
        for t in found {
            out.push(Change::new(Action::Delete, "target group", &t.name));
        }
        Ok(())
    }
}
