//! Creating and updating one Service's load balancer, in dependency order, writing only what
//! differs from what GCE holds.

use std::collections::BTreeSet;

use tracing::info;

use super::GcpProvider;
use super::annotations;
use super::compute::{observed_backend_service, observed_firewall, observed_forwarding_rule, observed_health_check};
use super::errors::{ApiFailure, Failure};
use super::naming::{Ownership, owned_by_cluster, owned_by_service};
use super::plan::{ForwardingRuleAction, Plan, forwarding_rule_action, membership_changes};
use crate::{
    IngressPoint, IpMode, LoadBalancerSpec, LoadBalancerStatus, PortStatus, Protocol, ProviderError, ServiceIdentity,
};

/// The protocols hawser builds a backend service and forwarding rule for.
pub(super) const PROTOCOLS: &[&str] = &["TCP", "UDP"];

/// The error for a same-named resource that is not ours.
pub(super) fn foreign(kind: &str, name: &str) -> ProviderError {
    ProviderError::Conflict(format!(
        "a {kind} named {name} exists but is not owned by this Service (its description has no matching hawser \
         ownership record); hawser leaves it untouched — delete or rename it"
    ))
}

/// Maps an insert's 409 to "go on if it is ours" (a crash between insert and the next read).
fn created(result: Result<(), ApiFailure>) -> Result<bool, ProviderError> {
    match result {
        Ok(()) => Ok(true),
        Err(f) => match f.classify() {
            Failure::AlreadyExists => Ok(false),
            _ => Err(f.into_error()),
        },
    }
}

impl GcpProvider {
    pub(super) async fn ensure_inner(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        let options = annotations::parse(spec).map_err(ProviderError::InvalidInput)?;
        let plan = Plan::new(&self.config, spec, &options);
        let id = &spec.identity;

        let ip = self.ensure_address(&plan, id).await?;
        self.ensure_health_check(&plan, id).await?;
        self.ensure_instance_groups(&plan).await?;
        self.ensure_backend_services(&plan, id).await?;
        self.ensure_forwarding_rules(&plan, id, &ip).await?;
        self.ensure_firewalls(&plan, id, &ip).await?;
        if plan.requested_ip.is_some() {
            // The user's own address replaced one hawser had reserved: release only ours.
            self.release_owned_address(&plan, id).await?;
        }

        let mut ports = Vec::new();
        for l in &spec.listeners {
            match l.protocol {
                Protocol::TcpUdp => {
                    ports.push(PortStatus { port: l.port, protocol: Protocol::Tcp });
                    ports.push(PortStatus { port: l.port, protocol: Protocol::Udp });
                }
                p => ports.push(PortStatus { port: l.port, protocol: p }),
            }
        }
        Ok(LoadBalancerStatus {
            id: format!(
                "projects/{}/regions/{}/addresses/{}",
                self.config.project,
                self.config.region,
                plan.names.address()
            ),
            ingress: vec![IngressPoint { ip: ip.parse().ok(), hostname: None, ip_mode: Some(IpMode::Vip), ports }],
        })
    }

    /// The load balancer's IP: the user's static address, or one hawser reserves.
    async fn ensure_address(&self, plan: &Plan, id: &ServiceIdentity) -> Result<String, ProviderError> {
        let c = &self.compute;
        if let Some(ip) = plan.requested_ip {
            let wanted = ip.to_string();
            let all = c.list_addresses().await.map_err(ApiFailure::into_error)?;
            let Some(found) = all.iter().find(|a| a.address.as_deref() == Some(wanted.as_str())) else {
                return Err(ProviderError::invalid(
                    "hawser.dev/address",
                    format!(
                        "{wanted} is not a static address reserved in project {} region {}; reserve it first \
                         (gcloud compute addresses create NAME --region {} --addresses {wanted}) or remove the request",
                        self.config.project, self.config.region, self.config.region
                    ),
                ));
            };
            let kind = found.address_type.as_ref().and_then(|t| t.name()).unwrap_or("EXTERNAL");
            let want_kind = if plan.internal() { "INTERNAL" } else { "EXTERNAL" };
            if kind != want_kind {
                return Err(ProviderError::invalid(
                    "hawser.dev/address",
                    format!("{wanted} is an {kind} address but the load balancer is {want_kind}"),
                ));
            }
            return Ok(wanted);
        }
        let Some(desired) = &plan.address else {
            return Err(ProviderError::Fatal("no address to reserve and none requested".into()));
        };
        let mut existing = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
        if let Some(a) = &existing {
            if !owned_by_service(a.description.as_deref(), id) {
                return Err(foreign("address", &desired.name));
            }
            let tier = a.network_tier.as_ref().and_then(|t| t.name());
            let kind = a.address_type.as_ref().and_then(|t| t.name());
            let tier_differs = desired.network_tier.is_some() && tier.is_some() && tier != desired.network_tier;
            if tier_differs || kind != Some(desired.address_type) {
                // A tier or scheme change needs a new address: GCE cannot change it in place,
                // and it cannot release it while forwarding rules still use it.
                info!(service = %id.service_key(), address = %desired.name, "re-reserving the address for a new tier or scheme");
                self.delete_forwarding_rules(id, &plan.names, PROTOCOLS).await?;
                self.delete_ignoring_absent(c.delete_address(&desired.name).await)?;
                existing = None;
            }
        }
        if existing.is_none() {
            if !created(c.insert_address(desired).await)? {
                let a = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
                if !a.is_some_and(|a| owned_by_service(a.description.as_deref(), id)) {
                    return Err(foreign("address", &desired.name));
                }
            }
            existing = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
        }
        existing
            .and_then(|a| a.address)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| ProviderError::Transient(format!("address {} has no IP yet", desired.name)))
    }

    async fn ensure_health_check(&self, plan: &Plan, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let c = &self.compute;
        let desired = &plan.health_check;
        match c.get_health_check(&desired.name).await.map_err(ApiFailure::into_error)? {
            None => {
                if !created(c.insert_health_check(desired).await)? {
                    let found = c.get_health_check(&desired.name).await.map_err(ApiFailure::into_error)?;
                    if !found.is_some_and(|h| owned_by_service(h.description.as_deref(), id)) {
                        return Err(foreign("health check", &desired.name));
                    }
                }
            }
            Some(h) if !owned_by_service(h.description.as_deref(), id) => {
                return Err(foreign("health check", &desired.name));
            }
            Some(h) => {
                if observed_health_check(&h) != *desired {
                    c.update_health_check(desired).await.map_err(ApiFailure::into_error)?;
                }
            }
        }
        Ok(())
    }

    async fn ensure_instance_groups(&self, plan: &Plan) -> Result<(), ProviderError> {
        let c = &self.compute;
        let name = plan.cluster_names.instance_group();
        let description = Ownership::cluster(&self.config.cluster, "instance-group").to_description();
        for (zone, members) in &plan.instance_groups {
            match c.get_instance_group(zone, &name).await.map_err(ApiFailure::into_error)? {
                Some(g) if !owned_by_cluster(g.description.as_deref(), &self.config.cluster) => {
                    return Err(foreign("instance group", &format!("{zone}/{name}")));
                }
                Some(_) => {}
                None => {
                    if !created(c.insert_instance_group(zone, &name, &description, &self.config.network_url()).await)? {
                        let g = c.get_instance_group(zone, &name).await.map_err(ApiFailure::into_error)?;
                        if !g.is_some_and(|g| owned_by_cluster(g.description.as_deref(), &self.config.cluster)) {
                            return Err(foreign("instance group", &format!("{zone}/{name}")));
                        }
                    }
                }
            }
            let observed = c.list_instances(zone, &name).await.map_err(ApiFailure::into_error)?;
            self.apply_membership(zone, &name, &observed, members).await?;
        }
        Ok(())
    }

    async fn apply_membership(
        &self,
        zone: &str,
        name: &str,
        observed: &BTreeSet<String>,
        desired: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let c = &self.compute;
        let (add, remove) = membership_changes(observed, desired);
        if !add.is_empty() {
            c.add_instances(zone, name, &add).await.map_err(ApiFailure::into_error)?;
        }
        if !remove.is_empty() {
            c.remove_instances(zone, name, &remove).await.map_err(ApiFailure::into_error)?;
        }
        Ok(())
    }

    async fn ensure_backend_services(&self, plan: &Plan, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let c = &self.compute;
        for desired in &plan.backend_services {
            match c.get_backend_service(&desired.name).await.map_err(ApiFailure::into_error)? {
                None => {
                    if !created(c.insert_backend_service(desired).await)? {
                        let found = c.get_backend_service(&desired.name).await.map_err(ApiFailure::into_error)?;
                        if !found.is_some_and(|b| owned_by_service(b.description.as_deref(), id)) {
                            return Err(foreign("backend service", &desired.name));
                        }
                    }
                }
                Some(b) if !owned_by_service(b.description.as_deref(), id) => {
                    return Err(foreign("backend service", &desired.name));
                }
                Some(b) => {
                    let observed = observed_backend_service(&b);
                    if observed != *desired {
                        c.patch_backend_service(desired).await.map_err(ApiFailure::into_error)?;
                    }
                    // Zones that lost all their nodes: empty the cluster's group there.
                    let desired_groups: BTreeSet<&String> = desired.groups.iter().collect();
                    for gone in observed.groups.iter().filter(|g| !desired_groups.contains(g)) {
                        if let Some(zone) = gone.split('/').nth(3) {
                            let name = plan.cluster_names.instance_group();
                            let members = c.list_instances(zone, &name).await.map_err(ApiFailure::into_error)?;
                            self.apply_membership(zone, &name, &members, &BTreeSet::new()).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn ensure_forwarding_rules(&self, plan: &Plan, id: &ServiceIdentity, ip: &str) -> Result<(), ProviderError> {
        let c = &self.compute;
        let desired_rules = plan.forwarding_rules(&self.config, ip);
        for desired in &desired_rules {
            match c.get_forwarding_rule(&desired.name).await.map_err(ApiFailure::into_error)? {
                None => {
                    if !created(c.insert_forwarding_rule(desired).await)? {
                        let found = c.get_forwarding_rule(&desired.name).await.map_err(ApiFailure::into_error)?;
                        if !found.is_some_and(|f| owned_by_service(f.description.as_deref(), id)) {
                            return Err(foreign("forwarding rule", &desired.name));
                        }
                    }
                }
                Some(f) if !owned_by_service(f.description.as_deref(), id) => {
                    return Err(foreign("forwarding rule", &desired.name));
                }
                Some(f) => match forwarding_rule_action(&observed_forwarding_rule(&f), desired) {
                    ForwardingRuleAction::Keep => {}
                    ForwardingRuleAction::PatchGlobalAccess => {
                        c.patch_forwarding_rule_global_access(&desired.name, desired.global_access)
                            .await
                            .map_err(ApiFailure::into_error)?;
                    }
                    ForwardingRuleAction::Recreate => {
                        info!(service = %id.service_key(), rule = %desired.name, "recreating the forwarding rule, keeping the address");
                        self.delete_ignoring_absent(c.delete_forwarding_rule(&desired.name).await)?;
                        c.insert_forwarding_rule(desired).await.map_err(ApiFailure::into_error)?;
                    }
                },
            }
        }
        // A protocol the Service no longer has: its rule first, then its backend service.
        let wanted: BTreeSet<&str> = desired_rules.iter().map(|r| r.protocol).collect();
        let stale: Vec<&str> = PROTOCOLS.iter().copied().filter(|p| !wanted.contains(p)).collect();
        self.delete_forwarding_rules(id, &plan.names, &stale).await?;
        for proto in stale {
            let name = plan.names.per_protocol(proto);
            if let Some(b) = c.get_backend_service(&name).await.map_err(ApiFailure::into_error)?
                && owned_by_service(b.description.as_deref(), id)
            {
                self.delete_ignoring_absent(c.delete_backend_service(&name).await)?;
            }
        }
        Ok(())
    }

    async fn ensure_firewalls(&self, plan: &Plan, id: &ServiceIdentity, ip: &str) -> Result<(), ProviderError> {
        let c = &self.compute;
        let desired = plan.firewall(ip);
        match c.get_firewall(&desired.name).await.map_err(ApiFailure::into_error)? {
            None => {
                if !created(c.insert_firewall(&desired).await)? {
                    let found = c.get_firewall(&desired.name).await.map_err(ApiFailure::into_error)?;
                    if !found.is_some_and(|f| owned_by_service(f.description.as_deref(), id)) {
                        return Err(foreign("firewall", &desired.name));
                    }
                }
            }
            Some(f) if !owned_by_service(f.description.as_deref(), id) => {
                return Err(foreign("firewall", &desired.name));
            }
            Some(f) => {
                if observed_firewall(&f) != desired {
                    c.patch_firewall(&desired).await.map_err(ApiFailure::into_error)?;
                }
            }
        }
        let name = plan.cluster_names.health_check_firewall();
        let cluster = &self.config.cluster;
        match c.get_firewall(&name).await.map_err(ApiFailure::into_error)? {
            None => {
                let desired = plan.health_check_firewall(cluster, None);
                if !created(c.insert_firewall(&desired).await)? {
                    let found = c.get_firewall(&name).await.map_err(ApiFailure::into_error)?;
                    if !found.is_some_and(|f| owned_by_cluster(f.description.as_deref(), cluster)) {
                        return Err(foreign("firewall", &name));
                    }
                }
            }
            Some(f) if !owned_by_cluster(f.description.as_deref(), cluster) => return Err(foreign("firewall", &name)),
            Some(f) => {
                let observed = observed_firewall(&f);
                let desired = plan.health_check_firewall(cluster, Some(&observed));
                if observed != desired {
                    c.patch_firewall(&desired).await.map_err(ApiFailure::into_error)?;
                }
            }
        }
        Ok(())
    }

    async fn release_owned_address(&self, plan: &Plan, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let c = &self.compute;
        let name = plan.names.address();
        if let Some(a) = c.get_address(&name).await.map_err(ApiFailure::into_error)?
            && owned_by_service(a.description.as_deref(), id)
        {
            self.delete_ignoring_absent(c.delete_address(&name).await)?;
        }
        Ok(())
    }
}
