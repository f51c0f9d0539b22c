//! Finding the account's parts a load balancer needs: the VPC, subnets and node security groups.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;

use super::annotations as ann;
use super::clients::Clients;
use crate::{ProviderError, Scheme};

/// EC2 accepts at most 200 values in one filter.
const FILTER_CHUNK: usize = 200;

/// What the nodes' instances tell about the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    /// The VPCs the instances are in (one, normally).
    pub vpcs: BTreeSet<String>,
    /// Each instance's primary-interface security groups.
    pub groups: BTreeMap<String, Vec<String>>,
}

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    Filter::builder().name(name).set_values(Some(values.into_iter().map(Into::into).collect())).build()
}

fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter().filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned()))).collect()
}

/// Reads the instances; unknown IDs (terminated nodes) are simply absent, as a filter is used
/// instead of `InstanceIds`, which fails the whole call for one missing instance.
pub async fn instances(clients: &Clients, ids: &BTreeSet<String>) -> Result<InstanceFacts, ProviderError> {
    let mut facts = InstanceFacts::default();
    let ids: Vec<&String> = ids.iter().collect();
    for chunk in ids.chunks(FILTER_CHUNK) {
        let mut token = None;
        loop {
            let out = clients
                .call(
                    "DescribeInstances",
                    clients
                        .ec2
                        .describe_instances()
                        .filters(filter("instance-id", chunk.iter().map(|s| s.as_str())))
                        .set_next_token(token.take())
                        .send(),
                )
                .await?;
            for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else { continue };
                if let Some(vpc) = instance.vpc_id() {
                    facts.vpcs.insert(vpc.to_owned());
                }
                let primary = instance
                    .network_interfaces()
                    .iter()
                    .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0));
                let groups: Vec<String> = match primary {
                    Some(eni) => eni.groups().iter().filter_map(|g| g.group_id().map(str::to_owned)).collect(),
                    None => instance.security_groups().iter().filter_map(|g| g.group_id().map(str::to_owned)).collect(),
                };
                facts.groups.insert(id.to_owned(), groups);
            }
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(facts)
}

/// The security groups of the nodes that must let the load balancer in: per instance, the ones
/// tagged `kubernetes.io/cluster/<cluster>`, or its only one.
pub async fn node_security_groups(
    clients: &Clients,
    cluster: &str,
    facts: &InstanceFacts,
) -> Result<BTreeSet<String>, ProviderError> {
    let all: BTreeSet<&String> = facts.groups.values().flatten().collect();
    if all.is_empty() {
        return Ok(BTreeSet::new());
    }
    let out = clients
        .call(
            "DescribeSecurityGroups",
            clients.ec2.describe_security_groups().set_group_ids(Some(all.into_iter().cloned().collect())).send(),
        )
        .await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let tagged: BTreeSet<String> = out
        .security_groups()
        .iter()
        .filter(|g| tag_map(g.tags()).contains_key(&cluster_tag))
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    let mut chosen = BTreeSet::new();
    for (instance, groups) in &facts.groups {
        let mine: Vec<&String> = groups.iter().filter(|g| tagged.contains(*g)).collect();
        match (mine.as_slice(), groups.as_slice()) {
            ([], [only]) => {
                chosen.insert(only.clone());
            }
            ([], _) => {
                return Err(ProviderError::Fatal(format!(
                    "instance {instance} has security groups {} and none is tagged {cluster_tag}; tag the one that should let the load balancer in",
                    groups.join(", ")
                )));
            }
            (tagged, _) => chosen.extend(tagged.iter().map(|g| (*g).clone())),
        }
    }
    Ok(chosen)
}

/// The load balancer's subnets: the user's (IDs or `Name` tags), or one per availability zone
/// among those tagged for this scheme's load balancers and for this cluster.
pub async fn subnets(
    clients: &Clients,
    cluster: &str,
    vpc: &str,
    scheme: Scheme,
    requested: &[String],
) -> Result<Vec<String>, ProviderError> {
    if !requested.is_empty() {
        let (ids, names): (Vec<&String>, Vec<&String>) = requested.iter().partition(|s| s.starts_with("subnet-"));
        let mut found: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
        for (key, values) in [("subnet-id", &ids), ("tag:Name", &names)] {
            if values.is_empty() {
                continue;
            }
            let out = clients
                .call(
                    "DescribeSubnets",
                    clients
                        .ec2
                        .describe_subnets()
                        .filters(filter("vpc-id", [vpc]))
                        .filters(filter(key, values.iter().map(|s| s.as_str())))
                        .send(),
                )
                .await?;
            for s in out.subnets() {
                if let Some(id) = s.subnet_id() {
                    found.insert(
                        id.to_owned(),
                        (s.availability_zone().unwrap_or_default().to_owned(), tag_map(s.tags())),
                    );
                }
            }
        }
        let mut result = Vec::new();
        let mut missing = Vec::new();
        for r in requested {
            let hit = found.iter().find(|(id, (_, tags))| *id == r || tags.get("Name") == Some(r));
            match hit {
                Some((id, _)) if !result.contains(id) => result.push(id.clone()),
                Some(_) => {}
                None => missing.push(r.as_str()),
            }
        }
        if !missing.is_empty() {
            return Err(ProviderError::invalid(
                ann::SUBNETS,
                format!("no subnet with ID or Name {} in VPC {vpc}", missing.join(", ")),
            ));
        }
        let mut zones = BTreeSet::new();
        for id in &result {
            if let Some((zone, _)) = found.get(id)
                && !zones.insert(zone.clone())
            {
                return Err(ProviderError::invalid(
                    ann::SUBNETS,
                    format!("two subnets in availability zone {zone}; a load balancer takes at most one per zone"),
                ));
            }
        }
        return Ok(result);
    }
    let role = match scheme {
        Scheme::InternetFacing => "kubernetes.io/role/elb",
        Scheme::Internal => "kubernetes.io/role/internal-elb",
    };
    let out = clients
        .call(
            "DescribeSubnets",
            clients.ec2.describe_subnets().filters(filter("vpc-id", [vpc])).filters(filter("tag-key", [role])).send(),
        )
        .await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let mut per_zone: BTreeMap<String, String> = BTreeMap::new();
    for s in out.subnets() {
        let tags = tag_map(s.tags());
        let role_on = tags.get(role).is_some_and(|v| v.is_empty() || v == "1" || v == "true");
        let ours = tags.get(&cluster_tag).is_some_and(|v| v == "owned" || v == "shared");
        let (Some(id), Some(zone)) = (s.subnet_id(), s.availability_zone()) else { continue };
        if !(role_on && ours) {
            continue;
        }
        // Deterministic choice: the lowest subnet ID per zone, so reconciles never flip-flop.
        let slot = per_zone.entry(zone.to_owned()).or_insert_with(|| id.to_owned());
        if id < slot.as_str() {
            *slot = id.to_owned();
        }
    }
    if per_zone.is_empty() {
        return Err(ProviderError::invalid(
            ann::SUBNETS,
            format!(
                "no subnet found for a {} load balancer in VPC {vpc}: tag subnets with {role}=1 and {cluster_tag}=owned (or shared), or list subnets in this annotation",
                scheme.as_str()
            ),
        ));
    }
    Ok(per_zone.into_values().collect())
}
