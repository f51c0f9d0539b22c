//! The periodic drift check: one batched inventory of the cloud, compared in memory with what
//! every Service was last ensured as, so that a resync costs a few list calls for the whole
//! cluster instead of one read per Service, and only the Services whose load balancer changed
//! or vanished behind hawser's back are ensured again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hawser_providers::OwnedLoadBalancer;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::events::{EventType, Note};
use crate::metrics::OutcomeLabels;
use crate::reconcile::{Context, Ensured};

/// Why a load balancer needs ensuring again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drift {
    /// The cloud has no load balancer for the Service any more.
    Missing,
    /// The cloud's load balancer differs from what was ensured.
    Changed,
}

/// The Service UIDs whose load balancer drifted, comparing what was ensured with the inventory.
pub fn find_drift(ensured: &HashMap<String, Ensured>, inventory: &[OwnedLoadBalancer]) -> Vec<(String, Drift)> {
    let found: HashMap<&str, Option<&str>> = inventory
        .iter()
        .filter(|lb| !lb.detached)
        .map(|lb| (lb.identity.uid.as_str(), lb.fingerprint.as_deref()))
        .collect();
    let mut drifted: Vec<(String, Drift)> = ensured
        .iter()
        .filter_map(|(uid, done)| match found.get(uid.as_str()) {
            None => Some((uid.clone(), Drift::Missing)),
            Some(Some(cloud)) if done.fingerprint.as_deref().is_some_and(|want| want != *cloud) => {
                Some((uid.clone(), Drift::Changed))
            }
            Some(_) => None,
        })
        .collect();
    drifted.sort();
    drifted
}

/// Runs the drift check every `period` until the receiver of `wake` is gone.
pub async fn run(ctx: Arc<Context>, period: Duration, wake: mpsc::Sender<ObjectRef<Service>>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !check_once(&ctx, &wake).await {
            return;
        }
    }
}

/// One check: forgets what drifted and wakes those Services. False when nobody listens for
/// wake-ups any more.
pub async fn check_once(ctx: &Context, wake: &mpsc::Sender<ObjectRef<Service>>) -> bool {
    // Taken before the listing: a record made after it started may not be in the listing yet.
    let before = ctx.ensured_snapshot();
    let inventory = match ctx.provider.list_owned().await {
        Ok(inventory) => inventory,
        Err(e) => {
            // A failed or partial inventory proves nothing: act on none of it.
            ctx.metrics.drift_checks.get_or_create(&OutcomeLabels { outcome: e.class().as_str().to_owned() }).inc();
            warn!(error = %e, "drift check: cloud inventory failed; trying again next period");
            return true;
        }
    };
    ctx.metrics.drift_checks.get_or_create(&OutcomeLabels { outcome: "success".to_owned() }).inc();
    let drifted = find_drift(&before, &inventory);
    for (uid, drift) in drifted {
        let Some(seen) = before.get(&uid) else { continue };
        if !ctx.forget_drifted(&uid, seen) {
            continue;
        }
        ctx.metrics.drifted.inc();
        info!(service = %format!("{}/{}", seen.namespace, seen.name), ?drift, "load balancer drifted in the cloud; ensuring it again");
        tell_the_user(ctx, &uid, seen, drift).await;
        if wake.send(ObjectRef::new(&seen.name).within(&seen.namespace)).await.is_err() {
            return false;
        }
    }
    true
}

/// A Warning Event on the Service: someone changed or deleted its load balancer outside hawser.
async fn tell_the_user(ctx: &Context, uid: &str, seen: &Ensured, drift: Drift) {
    let what = match drift {
        Drift::Missing => "is gone from the cloud; creating it again",
        Drift::Changed => "was changed outside hawser; restoring it",
    };
    let note = format!("Load balancer {} {what}", seen.status.id);
    let event = Note { type_: EventType::Warning, reason: "LoadBalancerDrifted", action: "DriftCheck", note: &note };
    let service = ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Service".to_owned()),
        namespace: Some(seen.namespace.clone()),
        name: Some(seen.name.clone()),
        uid: Some(uid.to_owned()),
        ..ObjectReference::default()
    };
    if let Err(e) = ctx.events.publish(&event, &service).await {
        warn!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use hawser_providers::{LoadBalancerStatus, ServiceIdentity};

    use super::*;

    fn ensured(uid: &str, fingerprint: Option<&str>) -> (String, Ensured) {
        let record = Ensured {
            namespace: "default".into(),
            name: format!("svc-{uid}"),
            spec_digest: 1,
            fingerprint: fingerprint.map(str::to_owned),
            status: LoadBalancerStatus { id: format!("lb-{uid}"), ingress: Vec::new() },
            group: None,
        };
        (uid.to_owned(), record)
    }

    fn owned(uid: &str, fingerprint: Option<&str>) -> OwnedLoadBalancer {
        OwnedLoadBalancer {
            identity: ServiceIdentity {
                cluster: "demo".into(),
                namespace: "default".into(),
                name: format!("svc-{uid}"),
                uid: uid.into(),
            },
            id: format!("lb-{uid}"),
            fingerprint: fingerprint.map(str::to_owned),
            detached: false,
            group: None,
        }
    }

    #[test]
    fn only_missing_and_changed_load_balancers_drift() {
        let ensured: HashMap<_, _> = [
            ensured("same", Some("f1")),
            ensured("changed", Some("f2")),
            ensured("gone", Some("f3")),
            ensured("blind", None),
            ensured("cloud-blind", Some("f5")),
        ]
        .into_iter()
        .collect();
        let inventory = [
            owned("same", Some("f1")),
            owned("changed", Some("other")),
            owned("blind", Some("anything")),
            owned("cloud-blind", None),
            owned("not-ours-any-more", Some("f9")),
        ];
        assert_eq!(
            find_drift(&ensured, &inventory),
            vec![("changed".to_owned(), Drift::Changed), ("gone".to_owned(), Drift::Missing)]
        );
    }

    #[test]
    fn an_empty_cluster_has_no_drift() {
        assert!(find_drift(&HashMap::new(), &[owned("orphan", None)]).is_empty(), "orphans are not drift");
    }
}
