//! Deleting one Service's load balancer in reverse dependency order, and listing the cluster's.

use std::collections::{BTreeMap, BTreeSet};

use tracing::info;

use super::GcpProvider;
use super::ensure::{FAMILIES, PROTOCOLS};
use super::errors::{ApiFailure, Failure};
use super::naming::{ClusterNames, GroupNames, Ownership, PREFIX, ServiceNames, owned_by_cluster, owned_by_service};
use crate::{IpFamily, OwnedLoadBalancer, ProviderError, ServiceIdentity};

impl GcpProvider {
    /// Treats "already gone" as success; "still in use" as retry-later.
    pub(super) fn delete_ignoring_absent(&self, result: Result<(), ApiFailure>) -> Result<(), ProviderError> {
        match result {
            Ok(()) => Ok(()),
            Err(f) => match f.classify() {
                Failure::NotFound => Ok(()),
                _ => Err(f.into_error()),
            },
        }
    }

    /// Deletes the forwarding rules named `rules` that this Service owns.
    pub(super) async fn delete_forwarding_rules(
        &self,
        id: &ServiceIdentity,
        rules: impl IntoIterator<Item = String>,
    ) -> Result<BTreeSet<String>, ProviderError> {
        let c = &self.compute;
        let mut groups = BTreeSet::new();
        for name in rules {
            if let Some(f) = c.get_forwarding_rule(&name).await.map_err(ApiFailure::into_error)?
                && owned_by_service(f.description.as_deref(), id)
            {
                groups.extend(Ownership::from_description(f.description.as_deref()).and_then(|o| o.group));
                self.delete_ignoring_absent(c.delete_forwarding_rule(&name).await)?;
            }
        }
        Ok(groups)
    }

    pub(super) async fn delete_inner(&self, id: &ServiceIdentity) -> Result<(), ProviderError> {
        let c = &self.compute;
        let names = ServiceNames::new(id);
        let cluster_names = ClusterNames::new(&self.config.cluster);
        let cluster = &self.config.cluster;

        // Forwarding rules, its own and those on a load-balancer group's address; the groups
        // they (and the backend services, which outlive them) name.
        let mut groups = BTreeSet::new();
        for family in FAMILIES {
            for proto in PROTOCOLS {
                for name in [names.forwarding_rule(proto, *family), names.member_forwarding_rule(proto, *family)] {
                    if let Some(f) = c.get_forwarding_rule(&name).await.map_err(ApiFailure::into_error)?
                        && owned_by_service(f.description.as_deref(), id)
                    {
                        groups.extend(Ownership::from_description(f.description.as_deref()).and_then(|o| o.group));
                        self.delete_ignoring_absent(c.delete_forwarding_rule(&name).await)?;
                    }
                }
            }
        }
        let mut services = Vec::new();
        for proto in PROTOCOLS {
            let name = names.per_protocol(proto);
            if let Some(b) = c.get_backend_service(&name).await.map_err(ApiFailure::into_error)?
                && owned_by_service(b.description.as_deref(), id)
            {
                groups.extend(Ownership::from_description(b.description.as_deref()).and_then(|o| o.group));
                services.push((name, b));
            }
        }
        // A group's address goes with its last member's rules, before the records naming the
        // group do: a deletion interrupted here still finds the group when it runs again.
        for group in &groups {
            for family in FAMILIES {
                self.release_group_address(group, *family).await?;
            }
        }

        // Backend services; remember their groups' zones to clean the groups up after.
        let mut zones = BTreeSet::new();
        for (name, b) in services {
            zones.extend(
                b.backends
                    .iter()
                    .filter_map(|g| g.group.as_deref()?.split("/zones/").nth(1)?.split('/').next().map(str::to_owned)),
            );
            self.delete_ignoring_absent(c.delete_backend_service(&name).await)?;
        }

        if let Some(h) = c.get_health_check(&names.health_check()).await.map_err(ApiFailure::into_error)?
            && owned_by_service(h.description.as_deref(), id)
        {
            self.delete_ignoring_absent(c.delete_health_check(&names.health_check()).await)?;
        }

        // Shared resources go only when no backend service of the cluster is left.
        let others = c
            .list_backend_services()
            .await
            .map_err(ApiFailure::into_error)?
            .into_iter()
            .filter(|b| Ownership::from_description(b.description.as_deref()).is_some_and(|o| o.cluster == *cluster))
            .count();
        if others == 0 {
            let ig = cluster_names.instance_group();
            for zone in &zones {
                if let Some(g) = c.get_instance_group(zone, &ig).await.map_err(ApiFailure::into_error)?
                    && owned_by_cluster(g.description.as_deref(), cluster)
                {
                    let members = c.list_instances(zone, &ig).await.map_err(ApiFailure::into_error)?;
                    if !members.is_empty() {
                        let members: Vec<String> = members.into_iter().collect();
                        c.remove_instances(zone, &ig, &members).await.map_err(ApiFailure::into_error)?;
                    }
                    info!(zone, group = %ig, "deleting the cluster's instance group: no load balancer uses it");
                    match c.delete_instance_group(zone, &ig).await {
                        Ok(()) => {}
                        Err(f) => match f.classify() {
                            // Another controller's backend service still uses it: leave it.
                            Failure::NotFound | Failure::InUse(_) => {}
                            _ => return Err(f.into_error()),
                        },
                    }
                }
            }
        }

        for family in FAMILIES {
            self.delete_owned_firewall(id, &names.firewall_of(*family)).await?;
            self.delete_owned_firewall(id, &names.member_firewall_of(*family)).await?;
        }
        if others == 0 {
            for family in FAMILIES {
                let hc = cluster_names.health_check_firewall_of(*family);
                if let Some(f) = c.get_firewall(&hc).await.map_err(ApiFailure::into_error)?
                    && owned_by_cluster(f.description.as_deref(), cluster)
                {
                    self.delete_ignoring_absent(c.delete_firewall(&hc).await)?;
                }
            }
        }

        for family in FAMILIES {
            let name = names.address_of(*family);
            if let Some(a) = c.get_address(&name).await.map_err(ApiFailure::into_error)?
                && owned_by_service(a.description.as_deref(), id)
            {
                self.delete_ignoring_absent(c.delete_address(&name).await)?;
            }
        }
        Ok(())
    }

    /// Takes `id`'s rules and firewalls off load-balancer group `group`'s address, releasing
    /// the address when no member's rule uses it any more.
    pub(super) async fn leave_group_inner(&self, id: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        let names = ServiceNames::new(id);
        for family in FAMILIES {
            let rules: Vec<String> = PROTOCOLS.iter().map(|p| names.member_forwarding_rule(p, *family)).collect();
            self.delete_forwarding_rules(id, rules).await?;
            self.delete_owned_firewall(id, &names.member_firewall_of(*family)).await?;
        }
        for family in FAMILIES {
            self.release_group_address(group, *family).await?;
        }
        Ok(())
    }

    pub(super) async fn list_owned_inner(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        let c = &self.compute;
        let mut found: BTreeMap<String, OwnedLoadBalancer> = BTreeMap::new();
        // Backend services outlive forwarding rules in a half-deleted load balancer, so they are
        // the better witness of "this cluster still has something here".
        let services = c.list_backend_services().await.map_err(ApiFailure::into_error)?;
        let rules = c.list_forwarding_rules().await.map_err(ApiFailure::into_error)?;
        let descriptions = services
            .iter()
            .filter(|b| b.name.as_deref().is_some_and(|n| n.starts_with(PREFIX)))
            .map(|b| b.description.as_deref())
            .chain(
                rules
                    .iter()
                    .filter(|f| f.name.as_deref().is_some_and(|n| n.starts_with(PREFIX)))
                    .map(|f| f.description.as_deref()),
            );
        for description in descriptions {
            let Some(owner) = Ownership::from_description(description) else { continue };
            let Some(identity) = owner.identity() else { continue };
            if identity.cluster != self.config.cluster {
                continue;
            }
            // A group member's entry is its part of the group's load balancer.
            let address = match &owner.group {
                Some(group) => GroupNames::new(&identity.cluster, group).address_of(IpFamily::IPv4),
                None => ServiceNames::new(&identity).address(),
            };
            found.entry(identity.uid.clone()).or_insert_with(|| OwnedLoadBalancer {
                id: format!("projects/{}/regions/{}/addresses/{address}", self.config.project, self.config.region),
                identity,
                fingerprint: None,
                detached: false,
                group: owner.group.clone(),
            });
        }
        // An address reserved for a Service whose backend services were never made (a crash
        // right after reserving it): the owner's deletion removes it with whatever else it
        // left; the drift check does not count it as a load balancer.
        for a in c.list_addresses().await.map_err(ApiFailure::into_error)? {
            let Some(name) = a.name.as_deref().filter(|n| n.starts_with(PREFIX)) else { continue };
            let Some(identity) = Ownership::from_description(a.description.as_deref()).and_then(|o| o.identity())
            else {
                continue;
            };
            if identity.cluster != self.config.cluster {
                continue;
            }
            found.entry(identity.uid.clone()).or_insert_with(|| OwnedLoadBalancer {
                id: format!("projects/{}/regions/{}/addresses/{name}", self.config.project, self.config.region),
                identity,
                fingerprint: None,
                detached: true,
                group: None,
            });
        }
        Ok(found.into_values().collect())
    }
}
