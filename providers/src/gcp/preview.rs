//! The GCP plan: what `ensure` and `delete` would change, found with the reads they make and
//! the same desired state (`plan.rs`), and no write.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::GcpProvider;
use super::annotations;
use super::compute::{
    address_ip, observed_backend_service, observed_firewall, observed_forwarding_rule, observed_health_check,
};
use super::ensure::{FAMILIES, PROTOCOLS};
use super::errors::ApiFailure;
use super::naming::{
    ClusterNames, GroupNames, Ownership, ServiceNames, owned_by_cluster, owned_by_group, owned_by_service,
};
use super::plan::{
    BackendServiceSpec, FirewallSpec, ForwardingRuleAction, ForwardingRuleSpec, HealthCheckSpec, Plan,
    forwarding_rule_action,
};
use crate::changes::{Action, Change, ChangePlan, listed, membership, shown};
use crate::{IpFamily, LoadBalancerSpec, ProviderError, ServiceIdentity};

type Fields = Vec<(&'static str, Option<String>)>;

fn opt(s: Option<&str>) -> Option<String> {
    s.map(str::to_owned)
}

fn health_check_fields(h: &HealthCheckSpec) -> Fields {
    vec![
        ("type", shown(format!("{:?}", h.protocol).to_ascii_uppercase())),
        ("port", shown(h.port)),
        ("requestPath", h.path.clone()),
        ("checkIntervalSec", shown(h.interval_sec)),
        ("timeoutSec", shown(h.timeout_sec)),
        ("healthyThreshold", shown(h.healthy_threshold)),
        ("unhealthyThreshold", shown(h.unhealthy_threshold)),
    ]
}

fn backend_service_fields(b: &BackendServiceSpec) -> Fields {
    vec![
        ("loadBalancingScheme", shown(b.scheme)),
        ("protocol", shown(b.protocol)),
        ("sessionAffinity", shown(b.session_affinity)),
        ("connectionDraining.drainingTimeoutSec", shown(b.draining_sec)),
        ("healthChecks", shown(&b.health_check)),
        ("backends", listed(&b.groups)),
        ("network", b.network.clone()),
    ]
}

fn forwarding_rule_fields(f: &ForwardingRuleSpec) -> Fields {
    vec![
        ("IPAddress", shown(f.ip)),
        ("IPProtocol", shown(f.protocol)),
        ("ports", listed(&f.ports)),
        ("portRange", f.port_range.clone()),
        ("loadBalancingScheme", shown(f.scheme)),
        ("networkTier", opt(f.network_tier)),
        ("backendService", shown(&f.backend_service)),
        ("network", f.network.clone()),
        ("subnetwork", f.subnetwork.clone()),
        ("allowGlobalAccess", shown(f.global_access)),
        ("labels", listed(f.labels.iter().map(|(k, v)| format!("{k}={v}")))),
    ]
}

fn firewall_fields(f: &FirewallSpec) -> Fields {
    vec![
        ("network", shown(&f.network)),
        ("sourceRanges", listed(&f.source_ranges)),
        ("destinationRanges", listed(&f.destination_ranges)),
        (
            "allowed",
            listed(
                f.allowed
                    .iter()
                    .map(|(p, ports)| format!("{p}:{}", ports.iter().cloned().collect::<Vec<_>>().join(","))),
            ),
        ),
        ("targetTags", listed(&f.target_tags)),
        ("targetServiceAccounts", listed(&f.target_service_accounts)),
    ]
}

/// Every field that differs, old → new.
fn differences(mut change: Change, old: Fields, new: Fields) -> Change {
    for ((field, o), (_, n)) in old.into_iter().zip(new) {
        if o != n {
            change = change.field(field, o, n);
        }
    }
    change
}

/// Every field of a resource to be created.
fn created(mut change: Change, fields: Fields) -> Change {
    for (field, value) in fields {
        if value.is_some() {
            change = change.field(field, None, value);
        }
    }
    change
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpFamily::IPv6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// What becomes of one frontend's address.
enum AddressFate {
    /// It exists (or the user's own) and stays: this IP.
    Kept(IpAddr),
    /// It is reserved anew (first time, or re-reserved for a new tier or scheme).
    New,
}

impl GcpProvider {
    pub(super) async fn plan_inner(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        let options = annotations::parse(spec).map_err(ProviderError::InvalidInput)?;
        let plan = Plan::new(&self.config, spec, &options).map_err(|f| ProviderError::InvalidInput(vec![f]))?;
        let id = &spec.identity;
        let c = &self.compute;
        let get = ApiFailure::into_error;
        if plan.ipv6() {
            self.check_ipv6_subnetwork(&plan).await?;
        }
        let mut out = ChangePlan::default();

        // Addresses.
        let mut frontends = Vec::new();
        for frontend in &plan.frontends {
            if let Some(wanted) = frontend.requested_ip {
                frontends
                    .push((frontend.family, AddressFate::Kept(self.check_requested_address(&plan, wanted).await?)));
                continue;
            }
            let Some(desired) = &frontend.address else { continue };
            let fate = match c.get_address(&desired.name).await.map_err(get)? {
                Some(a) if !plan.owns_address(a.description.as_deref()) => {
                    out.conflict(
                        "address",
                        &desired.name,
                        super::ensure::foreign("address", &desired.name).to_string(),
                    );
                    AddressFate::New
                }
                Some(a) => {
                    let tier = a.network_tier.as_ref().and_then(|t| t.name());
                    let kind = a.address_type.as_ref().and_then(|t| t.name());
                    let tier_differs = desired.network_tier.is_some() && tier.is_some() && tier != desired.network_tier;
                    match address_ip(a.address.as_deref()) {
                        Some(ip) if !tier_differs && kind == Some(desired.address_type) => AddressFate::Kept(ip),
                        ip => {
                            out.push(
                                Change::new(Action::Replace, "address", &desired.name)
                                    .field("addressType", opt(kind), shown(desired.address_type))
                                    .field("networkTier", opt(tier), opt(desired.network_tier))
                                    .field("address", ip.map(|i| i.to_string()), shown("(a new one)"))
                                    .because("GCE cannot change an address's tier or type: the Service's IP changes"),
                            );
                            AddressFate::New
                        }
                    }
                }
                None => {
                    out.push(
                        Change::new(Action::Create, "address", &desired.name)
                            .field("addressType", None, shown(desired.address_type))
                            .field("networkTier", None, opt(desired.network_tier))
                            .field("ipVersion", None, opt(desired.ip_version)),
                    );
                    AddressFate::New
                }
            };
            frontends.push((frontend.family, fate));
        }

        // Health check.
        let hc = &plan.health_check;
        match c.get_health_check(&hc.name).await.map_err(get)? {
            None => out.push(created(Change::new(Action::Create, "health check", &hc.name), health_check_fields(hc))),
            Some(h) if !owned_by_service(h.description.as_deref(), id) => {
                out.conflict("health check", &hc.name, super::ensure::foreign("health check", &hc.name).to_string());
            }
            Some(h) => out.push_if_changed(differences(
                Change::new(Action::Update, "health check", &hc.name),
                health_check_fields(&observed_health_check(&h)),
                health_check_fields(hc),
            )),
        }

        // The cluster's instance groups.
        let group = plan.cluster_names.instance_group();
        for (zone, members) in &plan.instance_groups {
            let name = format!("{zone}/{group}");
            let observed = match c.get_instance_group(zone, &group).await.map_err(get)? {
                Some(g) if !owned_by_cluster(g.description.as_deref(), &self.config.cluster) => {
                    out.conflict("instance group", &name, super::ensure::foreign("instance group", &name).to_string());
                    continue;
                }
                Some(_) => Some(c.list_instances(zone, &group).await.map_err(get)?),
                None => None,
            };
            let short = |url: &str| url.rsplit('/').next().unwrap_or(url).to_owned();
            let old: Vec<String> = observed.iter().flatten().map(|u| short(u)).collect();
            let new: Vec<String> = members.iter().map(|u| short(u)).collect();
            let moved = membership("instances", old.iter().map(String::as_str), new.iter().map(String::as_str));
            match (&observed, moved) {
                (None, moved) => out.push(Change::new(Action::Create, "instance group", &name).field(
                    "instances",
                    None,
                    moved.and_then(|(_, n)| n),
                )),
                (Some(_), Some((o, n))) => {
                    out.push(Change::new(Action::Update, "instance group", &name).field("instances", o, n));
                }
                (Some(_), None) => {}
            }
        }

        // Backend services.
        let mut emptied = BTreeSet::new();
        for desired in &plan.backend_services {
            match c.get_backend_service(&desired.name).await.map_err(get)? {
                None => out.push(created(
                    Change::new(Action::Create, "backend service", &desired.name),
                    backend_service_fields(desired),
                )),
                Some(b) if !owned_by_service(b.description.as_deref(), id) => {
                    out.conflict(
                        "backend service",
                        &desired.name,
                        super::ensure::foreign("backend service", &desired.name).to_string(),
                    );
                }
                Some(b) => {
                    let observed = observed_backend_service(&b);
                    out.push_if_changed(differences(
                        Change::new(Action::Update, "backend service", &desired.name),
                        backend_service_fields(&observed),
                        backend_service_fields(desired),
                    ));
                    let wanted: BTreeSet<&String> = desired.groups.iter().collect();
                    for gone in observed.groups.iter().filter(|g| !wanted.contains(g)) {
                        if let Some(zone) = gone.split('/').nth(3)
                            && emptied.insert(zone.to_owned())
                        {
                            let members = c.list_instances(zone, &group).await.map_err(get)?;
                            if !members.is_empty() {
                                out.push(
                                    Change::new(Action::Update, "instance group", format!("{zone}/{group}"))
                                        .field(
                                            "instances",
                                            shown(format!("{} instances", members.len())),
                                            shown("0 instances"),
                                        )
                                        .because("no node of the cluster is left in its zone"),
                                );
                            }
                        }
                    }
                }
            }
        }

        // Forwarding rules, per frontend.
        for (family, fate) in &frontends {
            let (ip, new_address) = match fate {
                AddressFate::Kept(ip) => (*ip, false),
                AddressFate::New => (unspecified(*family), true),
            };
            for desired in plan.forwarding_rules(&self.config, ip) {
                let mut want = forwarding_rule_fields(&desired);
                if new_address {
                    want[0].1 = shown("(the new address)");
                }
                match c.get_forwarding_rule(&desired.name).await.map_err(get)? {
                    None => out.push(created(Change::new(Action::Create, "forwarding rule", &desired.name), want)),
                    Some(f) if !owned_by_service(f.description.as_deref(), id) => {
                        out.conflict(
                            "forwarding rule",
                            &desired.name,
                            super::ensure::foreign("forwarding rule", &desired.name).to_string(),
                        );
                    }
                    Some(f) => {
                        let observed = observed_forwarding_rule(&f);
                        let action = if new_address {
                            ForwardingRuleAction::Recreate
                        } else {
                            forwarding_rule_action(&observed, &desired)
                        };
                        let change = match action {
                            ForwardingRuleAction::Keep => continue,
                            ForwardingRuleAction::PatchGlobalAccess => Change::new(Action::Update, "forwarding rule", &desired.name),
                            ForwardingRuleAction::Recreate => Change::new(Action::Replace, "forwarding rule", &desired.name)
                                .because("GCE cannot change these fields in place; traffic stops until it is recreated, the address is kept"),
                        };
                        out.push(differences(change, forwarding_rule_fields(&observed), want));
                    }
                }
            }
        }

        // What the Service no longer has.
        let protocols: BTreeSet<&'static str> = plan.protocols().collect();
        let families: BTreeSet<IpFamily> = plan.families().collect();
        for &family in FAMILIES {
            for proto in PROTOCOLS.iter().filter(|p| !families.contains(&family) || !protocols.contains(*p)) {
                let name = plan.forwarding_rule_name(proto, family);
                if let Some(f) = c.get_forwarding_rule(&name).await.map_err(get)?
                    && owned_by_service(f.description.as_deref(), id)
                {
                    out.push(Change::new(Action::Delete, "forwarding rule", name));
                }
            }
        }
        for proto in PROTOCOLS.iter().filter(|p| !protocols.contains(*p)) {
            let name = plan.names.per_protocol(proto);
            if let Some(b) = c.get_backend_service(&name).await.map_err(get)?
                && owned_by_service(b.description.as_deref(), id)
            {
                out.push(Change::new(Action::Delete, "backend service", name));
            }
        }
        for &family in FAMILIES.iter().filter(|f| !families.contains(f)) {
            self.plan_owned_deletion(id, "firewall", &plan.firewall_name(family), &mut out).await?;
            self.plan_address_release(&plan, family, &mut out).await?;
        }

        // Firewalls, per frontend.
        for (family, fate) in &frontends {
            let ip = match fate {
                AddressFate::Kept(ip) => *ip,
                AddressFate::New => unspecified(*family),
            };
            let Some(desired) = plan.firewall(ip) else {
                self.plan_owned_deletion(id, "firewall", &plan.firewall_name(*family), &mut out).await?;
                continue;
            };
            let mut want = firewall_fields(&desired);
            if matches!(fate, AddressFate::New) {
                want[2].1 = shown("(the new address)");
            }
            match c.get_firewall(&desired.name).await.map_err(get)? {
                None => out.push(created(Change::new(Action::Create, "firewall", &desired.name), want)),
                Some(f) if !owned_by_service(f.description.as_deref(), id) => {
                    out.conflict(
                        "firewall",
                        &desired.name,
                        super::ensure::foreign("firewall", &desired.name).to_string(),
                    );
                }
                Some(f) => out.push_if_changed(differences(
                    Change::new(Action::Update, "firewall", &desired.name),
                    firewall_fields(&observed_firewall(&f)),
                    want,
                )),
            }
        }

        // The cluster's health-check firewalls.
        let cluster = &self.config.cluster;
        for family in plan.families() {
            let name = plan.cluster_names.health_check_firewall_of(family);
            match c.get_firewall(&name).await.map_err(get)? {
                None => out.push(created(
                    Change::new(Action::Create, "firewall", &name),
                    firewall_fields(&plan.health_check_firewall(family, cluster, None)),
                )),
                Some(f) if !owned_by_cluster(f.description.as_deref(), cluster) => {
                    out.conflict("firewall", &name, super::ensure::foreign("firewall", &name).to_string());
                }
                Some(f) => {
                    let observed = observed_firewall(&f);
                    let desired = plan.health_check_firewall(family, cluster, Some(&observed));
                    out.push_if_changed(differences(
                        Change::new(Action::Update, "firewall", &name),
                        firewall_fields(&observed),
                        firewall_fields(&desired),
                    ));
                }
            }
        }

        // An address hawser reserved that the user's own replaced.
        for frontend in plan.frontends.iter().filter(|f| f.requested_ip.is_some()) {
            self.plan_address_release(&plan, frontend.family, &mut out).await?;
        }
        // What the Service has in the other place goes once this plan serves it: moving into
        // its group, its own rules, firewalls and address; in no group, its parts on a group's
        // address (that address too, when no other member uses it).
        let mut elsewhere = ChangePlan::default();
        let mut groups = BTreeSet::new();
        for &family in FAMILIES {
            let (rules, firewall) = plan.elsewhere(family);
            for name in rules {
                if let Some(f) = c.get_forwarding_rule(&name).await.map_err(get)?
                    && owned_by_service(f.description.as_deref(), id)
                {
                    groups.extend(Ownership::from_description(f.description.as_deref()).and_then(|o| o.group));
                    elsewhere.push(Change::new(Action::Delete, "forwarding rule", name));
                }
            }
            self.plan_owned_deletion(id, "firewall", &firewall, &mut elsewhere).await?;
            if plan.group.is_some() {
                self.plan_owned_deletion(id, "address", &plan.names.address_of(family), &mut elsewhere).await?;
            }
        }
        let reason = match plan.group_key() {
            Some(group) => format!("the Service moves into load-balancer group {group}"),
            None => "the Service is in no load-balancer group".to_owned(),
        };
        for change in elsewhere.changes {
            out.push(change.because(reason.clone()));
        }
        if plan.group.is_none() {
            for group in &groups {
                for &family in FAMILIES {
                    self.plan_group_address_release(id, group, family, &mut out).await?;
                }
            }
        }
        Ok(out)
    }

    /// The release of the plan's address of `family` hawser reserved: the Service's own, or its
    /// group's when no other member's rule uses it.
    async fn plan_address_release(
        &self,
        plan: &Plan,
        family: IpFamily,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        match plan.group_key() {
            None => self.plan_owned_deletion(&plan.identity, "address", &plan.names.address_of(family), out).await,
            Some(group) => self.plan_group_address_release(&plan.identity, group, family, out).await,
        }
    }

    /// The release of group `group`'s address of `family`, when only `id`'s rules use it.
    async fn plan_group_address_release(
        &self,
        id: &ServiceIdentity,
        group: &str,
        family: IpFamily,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        let c = &self.compute;
        let name = GroupNames::new(&self.config.cluster, group).address_of(family);
        let Some(a) = c.get_address(&name).await.map_err(ApiFailure::into_error)? else { return Ok(()) };
        if !owned_by_group(a.description.as_deref(), &self.config.cluster, group) {
            return Ok(());
        }
        let ip = address_ip(a.address.as_deref());
        let rules = c.list_forwarding_rules().await.map_err(ApiFailure::into_error)?;
        let others = rules
            .iter()
            .any(|f| address_ip(f.ip_address.as_deref()) == ip && !owned_by_service(f.description.as_deref(), id));
        if !others {
            out.push(
                Change::new(Action::Delete, "address", name)
                    .because(format!("the last member of load-balancer group {group} goes")),
            );
        }
        Ok(())
    }

    /// A delete of the firewall or address `name`, if this Service owns it.
    async fn plan_owned_deletion(
        &self,
        id: &ServiceIdentity,
        kind: &str,
        name: &str,
        out: &mut ChangePlan,
    ) -> Result<(), ProviderError> {
        let c = &self.compute;
        let description = match kind {
            "address" => c.get_address(name).await.map_err(ApiFailure::into_error)?.map(|a| a.description),
            _ => c.get_firewall(name).await.map_err(ApiFailure::into_error)?.map(|f| f.description),
        };
        if let Some(description) = description
            && owned_by_service(description.as_deref(), id)
        {
            out.push(Change::new(Action::Delete, kind, name));
        }
        Ok(())
    }

    pub(super) async fn plan_delete_inner(&self, id: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        let c = &self.compute;
        let get = ApiFailure::into_error;
        let names = ServiceNames::new(id);
        let cluster_names = ClusterNames::new(&self.config.cluster);
        let cluster = &self.config.cluster;
        let mut out = ChangePlan::default();
        let mut groups = BTreeSet::new();
        for family in FAMILIES {
            for proto in PROTOCOLS {
                for name in [names.forwarding_rule(proto, *family), names.member_forwarding_rule(proto, *family)] {
                    if let Some(f) = c.get_forwarding_rule(&name).await.map_err(get)?
                        && owned_by_service(f.description.as_deref(), id)
                    {
                        groups.extend(Ownership::from_description(f.description.as_deref()).and_then(|o| o.group));
                        out.push(Change::new(Action::Delete, "forwarding rule", name));
                    }
                }
            }
        }
        let mut zones = BTreeSet::new();
        let mut ours = 0;
        for proto in PROTOCOLS {
            let name = names.per_protocol(proto);
            if let Some(b) = c.get_backend_service(&name).await.map_err(get)?
                && owned_by_service(b.description.as_deref(), id)
            {
                zones.extend(
                    b.backends.iter().filter_map(|g| {
                        g.group.as_deref()?.split("/zones/").nth(1)?.split('/').next().map(str::to_owned)
                    }),
                );
                ours += 1;
                out.push(Change::new(Action::Delete, "backend service", name));
            }
        }
        let hc = names.health_check();
        if let Some(h) = c.get_health_check(&hc).await.map_err(get)?
            && owned_by_service(h.description.as_deref(), id)
        {
            out.push(Change::new(Action::Delete, "health check", hc));
        }
        // Shared resources go with the cluster's last load balancer.
        let others = c
            .list_backend_services()
            .await
            .map_err(get)?
            .into_iter()
            .filter(|b| Ownership::from_description(b.description.as_deref()).is_some_and(|o| o.cluster == *cluster))
            .count()
            .saturating_sub(ours);
        let last = others == 0;
        if last {
            let ig = cluster_names.instance_group();
            for zone in &zones {
                if let Some(g) = c.get_instance_group(zone, &ig).await.map_err(get)?
                    && owned_by_cluster(g.description.as_deref(), cluster)
                {
                    out.push(
                        Change::new(Action::Delete, "instance group", format!("{zone}/{ig}"))
                            .because("no other load balancer of the cluster uses it"),
                    );
                }
            }
        }
        for family in FAMILIES {
            self.plan_owned_deletion(id, "firewall", &names.firewall_of(*family), &mut out).await?;
            self.plan_owned_deletion(id, "firewall", &names.member_firewall_of(*family), &mut out).await?;
        }
        if last {
            for family in FAMILIES {
                let name = cluster_names.health_check_firewall_of(*family);
                if let Some(f) = c.get_firewall(&name).await.map_err(get)?
                    && owned_by_cluster(f.description.as_deref(), cluster)
                {
                    out.push(
                        Change::new(Action::Delete, "firewall", name)
                            .because("no other load balancer of the cluster needs it"),
                    );
                }
            }
        }
        for family in FAMILIES {
            self.plan_owned_deletion(id, "address", &names.address_of(*family), &mut out).await?;
            for group in &groups {
                self.plan_group_address_release(id, group, *family, &mut out).await?;
            }
        }
        Ok(out)
    }
}
