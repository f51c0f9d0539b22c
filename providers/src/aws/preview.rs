//! The AWS plan: what `ensure` and `delete` would change, found with the same reads they make
//! and the same pure diffs (`plan.rs`), and no write.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;

use super::AwsProvider;
use super::annotations as ann;
use super::naming;
use super::plan::{
    self, HealthSettings, LoadBalancerAction, ObservedListener, ObservedTargetGroup, Rule, Source, TagDiff,
};
use crate::changes::{Action, Change, ChangePlan, listed, membership, shown};
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
        let mut out = ChangePlan::default();
        let lb = match self.observe_load_balancer(id).await {
            Ok(lb) => lb,
            Err(ProviderError::Conflict(message)) => {
                out.conflict("load balancer", naming::load_balancer_name(id), message);
                None
            }
            Err(e) => return Err(e),
        };
        let env = self.environment(spec, &opts, lb.as_ref()).await?;
        let desired = plan::desired(spec, &opts, &env)?;

        // 1. Security groups.
        let security_groups: BTreeSet<String> = match &desired.frontend {
            Some(front) => {
                let group = match self.find_frontend(id, Some(&env.vpc_id)).await? {
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
                                    "{foreign} in {} has this name but not hawser's ownership tags for Service {}; \
                                     hawser leaves it untouched — delete or rename it",
                                    env.vpc_id,
                                    id.service_key()
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
                self.plan_node_rules(&env.node_security_groups, &desired, &group, &mut out).await?;
                BTreeSet::from([group])
            }
            None => desired.own_security_groups.iter().flatten().cloned().collect(),
        };

        // 2. Target groups.
        let (observed_tgs, tg_plan, mut tg_arns) = self.target_group_plan(id, lb.as_ref(), &desired).await?;
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

        // 3. The load balancer.
        let name = naming::load_balancer_name(id);
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
        Ok(out)
    }

    /// The node security groups' rules from the frontend group, as ensure would set them.
    async fn plan_node_rules(
        &self,
        node_groups: &BTreeSet<String>,
        desired: &plan::Desired,
        frontend: &str,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        let wanted = plan::node_rules(desired, frontend);
        for (group, ours) in self.node_rules_from(node_groups, frontend).await? {
            if ours != wanted {
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
        let mut target_groups: Vec<ObservedTargetGroup> = Vec::new();
        match self.observe_load_balancer(id).await {
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
                target_groups = self.observe_target_groups(id, &lb.arn).await?;
            }
            Ok(None) => {}
            // Someone else's load balancer with our name is never deleted.
            Err(ProviderError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        for tg in &target_groups {
            out.push(Change::new(Action::Delete, "target group", &tg.name));
        }
        for (arn, name) in self.detached_target_groups(id).await? {
            if !target_groups.iter().any(|t| t.arn == arn) {
                out.push(Change::new(Action::Delete, "target group", name).because("left detached by an earlier run"));
            }
        }
        if let Some((group, _, _)) = self.find_frontend(id, None).await? {
            out.push(
                Change::new(Action::Delete, "security group", &group).because("and the node rules that refer to it"),
            );
        }
        Ok(out)
    }
}
