//! Creating and updating one Service's load balancer, in dependency order, writing only what
//! differs from what GCE holds.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tracing::info;

use super::GcpProvider;
use super::annotations;
use super::compute::{
    address_ip, observed_backend_service, observed_firewall, observed_forwarding_rule, observed_health_check,
};
use super::errors::{ApiFailure, Failure};
use super::naming::{GroupNames, Ownership, ServiceNames, owned_by_cluster, owned_by_group, owned_by_service};
use super::plan::{ForwardingRuleAction, Frontend, Plan, forwarding_rule_action, membership_changes};
use crate::{
    IngressPoint, IpFamily, IpMode, LoadBalancerSpec, LoadBalancerStatus, PortStatus, Protocol, ProviderError,
    ServiceIdentity,
};

/// Both families, for finding what a Service no longer needs.
pub(super) const FAMILIES: &[IpFamily] = &[IpFamily::IPv4, IpFamily::IPv6];

/// The protocols hawser builds a backend service and forwarding rule for.
pub(super) use super::plan::PROTOCOL_NAMES as PROTOCOLS;

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
        let plan = Plan::new(&self.config, spec, &options).map_err(|f| ProviderError::InvalidInput(vec![f]))?;
        let id = &spec.identity;
        // Checked before anything is created, so a wrong subnetwork leaves nothing behind.
        if plan.ipv6() {
            self.check_ipv6_subnetwork(&plan).await?;
        }

        let mut ips = Vec::new();
        for frontend in &plan.frontends {
            ips.push(self.ensure_address(&plan, frontend, id).await?);
        }
        self.ensure_health_check(&plan, id).await?;
        self.ensure_instance_groups(&plan).await?;
        self.ensure_backend_services(&plan, id).await?;
        for frontend in plan.frontends.iter().filter(|f| f.requested_ip.is_some()) {
            // On the user's one address the rules of the other place (own or group) hold the
            // same ports: they must go before these can be made.
            self.remove_elsewhere(&plan, id, frontend.family).await?;
        }
        for ip in &ips {
            self.ensure_forwarding_rules(&plan, id, *ip).await?;
        }
        if plan.group.is_some() {
            self.check_group_addresses(&plan, &ips).await?;
        }
        self.remove_stale(&plan, id).await?;
        for ip in &ips {
            self.ensure_firewall(&plan, id, *ip).await?;
        }
        self.ensure_health_check_firewalls(&plan).await?;
        for frontend in plan.frontends.iter().filter(|f| f.requested_ip.is_some()) {
            // The user's own address replaced one hawser had reserved: release only ours.
            self.release_address(&plan, frontend.family).await?;
        }
        if plan.group.is_some() {
            // A Service that moved into its group: its own load balancer goes now that the
            // group's address serves it, never before.
            for &family in FAMILIES {
                self.remove_elsewhere(&plan, id, family).await?;
                self.release_own_address(id, family).await?;
            }
        } else {
            // And one out of any group keeps no part on a group's address, now that its own
            // serves it: the operator leaves the group the Service's status names, but a join
            // cut short before the status named it leaves rules only the cloud remembers.
            self.leave_remembered_groups(&plan, id).await?;
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
                plan.address_name(IpFamily::IPv4)
            ),
            ingress: ips
                .into_iter()
                .map(|ip| IngressPoint {
                    ip: Some(ip),
                    hostname: None,
                    ip_mode: Some(IpMode::Vip),
                    ports: ports.clone(),
                })
                .collect(),
        })
    }

    /// An IPv6 load balancer takes its address from the subnetwork's IPv6 range, external or
    /// internal as the load balancer is: say so plainly instead of letting an insert fail.
    pub(super) async fn check_ipv6_subnetwork(&self, plan: &Plan) -> Result<(), ProviderError> {
        let Some(url) = plan.subnetwork() else {
            return Err(ProviderError::Fatal("an IPv6 plan without a subnetwork".into()));
        };
        let access = if plan.internal() { "INTERNAL" } else { "EXTERNAL" };
        let hint = "name a dual-stack one with hawser.dev/gcp-subnet or the operator's --gcp-subnetwork, or remove \
                    IPv6 from spec.ipFamilies";
        let Some(subnet) = self.compute.get_subnetwork(url).await.map_err(ApiFailure::into_error)? else {
            return Err(ProviderError::invalid(
                annotations::SUBNET,
                format!("subnetwork {url} does not exist; {hint}"),
            ));
        };
        let stack = subnet.stack_type.as_ref().and_then(|t| t.name()).unwrap_or("IPV4_ONLY");
        let has = subnet.ipv_6_access_type.as_ref().and_then(|t| t.name());
        if !matches!(stack, "IPV4_IPV6" | "IPV6_ONLY") || has != Some(access) {
            return Err(ProviderError::invalid(
                "spec.ipFamilies",
                format!(
                    "an IPv6 {} load balancer needs a subnetwork with {access} IPv6 access, but {url} has stack type \
                     {stack} and IPv6 access {}; {hint}",
                    access.to_ascii_lowercase(),
                    has.unwrap_or("none")
                ),
            ));
        }
        Ok(())
    }

    /// The IP of one frontend: the user's static address, or one hawser reserves.
    async fn ensure_address(
        &self,
        plan: &Plan,
        frontend: &Frontend,
        id: &ServiceIdentity,
    ) -> Result<IpAddr, ProviderError> {
        let c = &self.compute;
        if let Some(wanted) = frontend.requested_ip {
            return self.check_requested_address(plan, wanted).await;
        }
        let Some(desired) = &frontend.address else {
            return Err(ProviderError::Fatal("no address to reserve and none requested".into()));
        };
        let mut existing = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
        if let Some(a) = &existing {
            if !plan.owns_address(a.description.as_deref()) {
                return Err(foreign("address", &desired.name));
            }
            let tier = a.network_tier.as_ref().and_then(|t| t.name());
            let kind = a.address_type.as_ref().and_then(|t| t.name());
            let tier_differs = desired.network_tier.is_some() && tier.is_some() && tier != desired.network_tier;
            if tier_differs || kind != Some(desired.address_type) {
                // A tier or scheme change needs a new address: GCE cannot change it in place,
                // and it cannot release it while forwarding rules still use it.
                info!(service = %id.service_key(), address = %desired.name, "re-reserving the address for a new tier or scheme");
                let rules: Vec<String> =
                    PROTOCOLS.iter().map(|p| plan.forwarding_rule_name(p, frontend.family)).collect();
                self.delete_forwarding_rules(id, rules).await?;
                self.delete_ignoring_absent(c.delete_address(&desired.name).await)?;
                existing = None;
            }
        }
        if existing.is_none() {
            if !created(c.insert_address(desired).await)? {
                let a = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
                if !a.is_some_and(|a| plan.owns_address(a.description.as_deref())) {
                    return Err(foreign("address", &desired.name));
                }
            }
            existing = c.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
        }
        existing
            .and_then(|a| address_ip(a.address.as_deref()))
            .ok_or_else(|| ProviderError::Transient(format!("address {} has no IP yet", desired.name)))
    }

    /// A requested address must be a static address of the project, of the load balancer's kind.
    pub(super) async fn check_requested_address(&self, plan: &Plan, wanted: IpAddr) -> Result<IpAddr, ProviderError> {
        let all = self.compute.list_addresses().await.map_err(ApiFailure::into_error)?;
        let Some(found) = all.iter().find(|a| address_ip(a.address.as_deref()) == Some(wanted)) else {
            let region = &self.config.region;
            let flags = match wanted {
                IpAddr::V4(_) => format!("--addresses {wanted}"),
                IpAddr::V6(_) => "--ip-version IPV6 --subnet SUBNET".to_owned(),
            };
            return Err(ProviderError::invalid(
                "hawser.dev/address",
                format!(
                    "{wanted} is not a static address reserved in project {} region {region}; reserve it first \
                     (gcloud compute addresses create NAME --region {region} {flags}) or remove the request",
                    self.config.project
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
        if wanted.is_ipv6()
            && !plan.internal()
            && found.ipv_6_endpoint_type.as_ref().and_then(|t| t.name()).is_some_and(|t| t != "NETLB")
        {
            return Err(ProviderError::invalid(
                "hawser.dev/address",
                format!("{wanted} is reserved for a VM; a load balancer needs one reserved with --endpoint-type NETLB"),
            ));
        }
        Ok(wanted)
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

    async fn ensure_forwarding_rules(
        &self,
        plan: &Plan,
        id: &ServiceIdentity,
        ip: IpAddr,
    ) -> Result<(), ProviderError> {
        let c = &self.compute;
        for desired in &plan.forwarding_rules(&self.config, ip) {
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
        Ok(())
    }

    /// Removes what the Service no longer has: the rules of a protocol or family it dropped,
    /// then the backend services of dropped protocols, and the firewall and address of a
    /// dropped family (a Service back to single-stack).
    async fn remove_stale(&self, plan: &Plan, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let c = &self.compute;
        let protocols: BTreeSet<&'static str> = plan.protocols().collect();
        let families: BTreeSet<IpFamily> = plan.families().collect();
        for &family in FAMILIES {
            let stale: Vec<String> = PROTOCOLS
                .iter()
                .filter(|p| !families.contains(&family) || !protocols.contains(*p))
                .map(|p| plan.forwarding_rule_name(p, family))
                .collect();
            self.delete_forwarding_rules(id, stale).await?;
        }
        let dropped: Vec<&str> = PROTOCOLS.iter().copied().filter(|p| !protocols.contains(p)).collect();
        for proto in dropped {
            let name = plan.names.per_protocol(proto);
            if let Some(b) = c.get_backend_service(&name).await.map_err(ApiFailure::into_error)?
                && owned_by_service(b.description.as_deref(), id)
            {
                self.delete_ignoring_absent(c.delete_backend_service(&name).await)?;
            }
        }
        for &family in FAMILIES.iter().filter(|f| !families.contains(f)) {
            self.delete_owned_firewall(id, &plan.firewall_name(family)).await?;
            self.release_address(plan, family).await?;
        }
        Ok(())
    }

    /// After a member's rules are made: the group's addresses must still be the ones they use.
    /// Another member's deletion may have released one between our read and our rules (GCE
    /// then hands the IP out as an ephemeral one); the next ensure reserves it again and moves
    /// the rules there.
    async fn check_group_addresses(&self, plan: &Plan, ips: &[IpAddr]) -> Result<(), ProviderError> {
        for (frontend, ip) in plan.frontends.iter().zip(ips) {
            let Some(desired) = &frontend.address else { continue };
            let now = self.compute.get_address(&desired.name).await.map_err(ApiFailure::into_error)?;
            if now.and_then(|a| address_ip(a.address.as_deref())) != Some(*ip) {
                return Err(ProviderError::Transient(format!(
                    "address {} of the load-balancer group was released while this member joined; reserving it again",
                    desired.name
                )));
            }
        }
        Ok(())
    }

    /// Deletes the member rules and firewalls a Service that is in no group still has on a
    /// group's address, then releases that address if no other member uses it.
    async fn leave_remembered_groups(&self, plan: &Plan, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let mut groups = BTreeSet::new();
        for &family in FAMILIES {
            groups.extend(self.remove_elsewhere(plan, id, family).await?);
        }
        for group in &groups {
            info!(%group, "took the Service's rules off the load-balancer group's address");
            for &family in FAMILIES {
                self.release_group_address(group, family).await?;
            }
        }
        Ok(())
    }

    /// Removes the Service's forwarding rules and firewall of `family` in the other place (its
    /// own address when it is a group member, its group's when it is not); returns the groups
    /// the removed rules named.
    async fn remove_elsewhere(
        &self,
        plan: &Plan,
        id: &ServiceIdentity,
        family: IpFamily,
    ) -> Result<BTreeSet<String>, ProviderError> {
        let (rules, firewall) = plan.elsewhere(family);
        let groups = self.delete_forwarding_rules(id, rules).await?;
        self.delete_owned_firewall(id, &firewall).await?;
        Ok(groups)
    }

    async fn ensure_firewall(&self, plan: &Plan, id: &ServiceIdentity, ip: IpAddr) -> Result<(), ProviderError> {
        let c = &self.compute;
        let Some(desired) = plan.firewall(ip) else {
            // The Service's source ranges admit no client of this family.
            return self.delete_owned_firewall(id, &plan.firewall_name(IpFamily::of(&ip))).await;
        };
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
        Ok(())
    }

    /// The cluster's health-check firewall of each family the Service has.
    async fn ensure_health_check_firewalls(&self, plan: &Plan) -> Result<(), ProviderError> {
        let c = &self.compute;
        let cluster = &self.config.cluster;
        for family in plan.families() {
            let name = plan.cluster_names.health_check_firewall_of(family);
            match c.get_firewall(&name).await.map_err(ApiFailure::into_error)? {
                None => {
                    let desired = plan.health_check_firewall(family, cluster, None);
                    if !created(c.insert_firewall(&desired).await)? {
                        let found = c.get_firewall(&name).await.map_err(ApiFailure::into_error)?;
                        if !found.is_some_and(|f| owned_by_cluster(f.description.as_deref(), cluster)) {
                            return Err(foreign("firewall", &name));
                        }
                    }
                }
                Some(f) if !owned_by_cluster(f.description.as_deref(), cluster) => {
                    return Err(foreign("firewall", &name));
                }
                Some(f) => {
                    let observed = observed_firewall(&f);
                    let desired = plan.health_check_firewall(family, cluster, Some(&observed));
                    if observed != desired {
                        c.patch_firewall(&desired).await.map_err(ApiFailure::into_error)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the firewall `name` if this Service owns it.
    pub(super) async fn delete_owned_firewall(&self, id: &ServiceIdentity, name: &str) -> Result<(), ProviderError> {
        let c = &self.compute;
        if let Some(f) = c.get_firewall(name).await.map_err(ApiFailure::into_error)?
            && owned_by_service(f.description.as_deref(), id)
        {
            self.delete_ignoring_absent(c.delete_firewall(name).await)?;
        }
        Ok(())
    }

    /// Releases the address of `family` hawser reserved for the plan (the group's, once no
    /// member's rule uses it).
    async fn release_address(&self, plan: &Plan, family: IpFamily) -> Result<(), ProviderError> {
        match plan.group_key() {
            Some(group) => self.release_group_address(group, family).await,
            None => self.release_own_address(&plan.identity, family).await,
        }
    }

    /// Releases the address of `family` hawser reserved for the Service itself.
    pub(super) async fn release_own_address(
        &self,
        id: &ServiceIdentity,
        family: IpFamily,
    ) -> Result<(), ProviderError> {
        let c = &self.compute;
        let name = ServiceNames::new(id).address_of(family);
        if let Some(a) = c.get_address(&name).await.map_err(ApiFailure::into_error)?
            && owned_by_service(a.description.as_deref(), id)
        {
            self.delete_ignoring_absent(c.delete_address(&name).await)?;
        }
        Ok(())
    }

    /// Releases group `group`'s address of `family` unless another member's rule still uses it
    /// (GCE refuses to release an address in use, which is what decides: no listing needed).
    pub(super) async fn release_group_address(&self, group: &str, family: IpFamily) -> Result<(), ProviderError> {
        let c = &self.compute;
        let name = GroupNames::new(&self.config.cluster, group).address_of(family);
        let Some(a) = c.get_address(&name).await.map_err(ApiFailure::into_error)? else { return Ok(()) };
        if !owned_by_group(a.description.as_deref(), &self.config.cluster, group) {
            return Ok(());
        }
        match c.delete_address(&name).await {
            Ok(()) => {
                info!(%group, address = %name, "released the address of the load-balancer group with its last member");
                Ok(())
            }
            Err(f) => match f.classify() {
                Failure::NotFound | Failure::InUse(_) => Ok(()),
                _ => Err(f.into_error()),
            },
        }
    }
}
