//! The orphan collector: load balancers this cluster owns in the cloud whose Service is gone,
//! or no longer hawser's, are deleted after a grace period.
//!
//! The finalizer covers the normal path. This covers the others: a finalizer stripped by hand
//! (`kubectl patch … finalizers: null`) to unstick a deletion, a Service recreated under the same
//! name (a new UID does not protect the old load balancer), or a type or class changed while the
//! operator was not running. Only resources carrying this cluster's ownership tags are ever
//! candidates (`list_owned` finds nothing else), nothing happens before the Service cache has
//! synced, and a failed inventory deletes nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use hawser_providers::{OwnedLoadBalancer, Provider};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, OutcomeLabels};
use crate::reconcile::{has_finalizer, is_ours};

/// Locks by key, kept only while held or awaited.
///
/// Two registries exist. One per Service UID: a reconcile holds its Service's while it runs, and
/// the collector holds it while deleting a leftover of that Service, so a leftover judged unused
/// is never deleted while an ensure is attaching it again. (AWS refuses to delete a target group
/// a listener uses; moto does not, and with a one-second grace period the race showed there.)
/// One per load-balancer group (`namespace/name`): every change to a group's load balancer, by a
/// member's reconcile or by the collector removing a vanished member's part, holds it, so that
/// no member joins a load balancer another is deleting as its last member.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held [`KeyedLocks`] lock; released on drop, and forgotten when nobody else wants it.
#[derive(Debug)]
pub struct KeyedGuard {
    locks: Arc<KeyedLocks>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(key.to_owned()).or_default().clone()
    }

    /// Waits for `key`'s lock.
    pub async fn lock(self: &Arc<Self>, key: &str) -> KeyedGuard {
        let guard = self.get(key).lock_owned().await;
        KeyedGuard { locks: self.clone(), key: key.to_owned(), guard: Some(guard) }
    }

    /// The locks of every key of `keys`, taken in order so that two holders of several never
    /// wait on each other.
    pub async fn lock_all<'a>(self: &Arc<Self>, keys: impl IntoIterator<Item = &'a str>) -> Vec<KeyedGuard> {
        let keys: BTreeSet<&str> = keys.into_iter().collect();
        let mut held = Vec::with_capacity(keys.len());
        for key in keys {
            held.push(self.lock(key).await);
        }
        held
    }

    /// `key`'s lock if nobody holds it.
    pub fn try_lock(self: &Arc<Self>, key: &str) -> Option<KeyedGuard> {
        let guard = self.get(key).try_lock_owned().ok();
        let held = KeyedGuard { locks: self.clone(), key: key.to_owned(), guard };
        held.guard.is_some().then_some(held)
    }

    /// Whether no lock is held or awaited (none is kept for nothing).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.locks.lock().is_ok_and(|l| l.is_empty())
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.locks.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if locks.get(&self.key).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(&self.key);
        }
    }
}

/// What the collector does with orphans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GcMode {
    /// Delete them after the grace period.
    On,
    /// Log and count them, delete nothing.
    Report,
    /// Do not look for them.
    Off,
}

/// Why a load balancer has no owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphaned {
    /// No Service with the owner's UID exists.
    ServiceGone,
    /// The Service exists but is no longer a LoadBalancer of our class, and carries no finalizer
    /// of ours that would clean up.
    NotOurs,
    /// The Service lives, but this resource of its is on no load balancer (an interrupted change
    /// left it, and its name is wanted no more): only it goes.
    Leftover,
}

impl Orphaned {
    fn as_str(self) -> &'static str {
        match self {
            Self::ServiceGone => "service gone",
            Self::NotOurs => "service no longer of this class",
            Self::Leftover => "left unused by an interrupted change",
        }
    }
}

/// What a Service in the cache says about the load balancers it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Ours, or on its way out through our finalizer: the reconciler looks after it.
    Alive,
    /// Neither ours nor holding our finalizer.
    Released,
}

/// Each cached Service's UID and what it says, for [`find_orphans`].
pub fn owners<'a>(services: impl IntoIterator<Item = &'a Service>, class: &str) -> HashMap<String, Owner> {
    services
        .into_iter()
        .filter_map(|svc| {
            let owner = if is_ours(svc, class) || has_finalizer(svc) { Owner::Alive } else { Owner::Released };
            Some((svc.uid()?, owner))
        })
        .collect()
}

/// The load balancers of the inventory whose owner is gone or released.
pub fn find_orphans<'a>(
    inventory: &'a [OwnedLoadBalancer],
    owners: &HashMap<String, Owner>,
) -> Vec<(&'a OwnedLoadBalancer, Orphaned)> {
    inventory
        .iter()
        .filter_map(|lb| match owners.get(&lb.identity.uid) {
            None => Some((lb, Orphaned::ServiceGone)),
            Some(Owner::Released) => Some((lb, Orphaned::NotOurs)),
            Some(Owner::Alive) if lb.detached => Some((lb, Orphaned::Leftover)),
            Some(Owner::Alive) => None,
        })
        .collect()
}

/// Remembers since when each orphan has been seen, and says which are due for deletion.
#[derive(Debug)]
pub struct Collector {
    grace: Duration,
    first_seen: HashMap<String, Instant>,
}

impl Collector {
    /// A collector that waits `grace` before deleting.
    pub fn new(grace: Duration) -> Self {
        Self { grace, first_seen: HashMap::new() }
    }

    /// Of the orphans seen `now`, those seen orphaned for at least the grace period. An orphan
    /// missing from this pass (deleted, or adopted again) is forgotten: its clock starts over.
    pub fn due<'a>(
        &mut self,
        orphans: &[(&'a OwnedLoadBalancer, Orphaned)],
        now: Instant,
    ) -> Vec<(&'a OwnedLoadBalancer, Orphaned)> {
        // Keyed by resource and owner: the members of a group share one load balancer.
        let key = |lb: &OwnedLoadBalancer| format!("{} {}", lb.id, lb.identity.uid);
        self.first_seen.retain(|k, _| orphans.iter().any(|(lb, _)| key(lb) == *k));
        orphans
            .iter()
            .filter(|(lb, _)| {
                let since = *self.first_seen.entry(key(lb)).or_insert(now);
                now.duration_since(since) >= self.grace
            })
            .copied()
            .collect()
    }
}

/// What the collector needs.
pub struct GcSettings {
    /// On, report or off.
    pub mode: GcMode,
    /// Time between passes.
    pub interval: Duration,
    /// How long an orphan waits before it is deleted.
    pub grace: Duration,
    /// The loadBalancerClass served.
    pub class: String,
}

/// Runs the collector: a first pass once the Service cache has synced, then every interval.
pub async fn run(
    provider: Arc<dyn Provider>,
    services: Store<Service>,
    settings: GcSettings,
    metrics: Arc<Metrics>,
    owners: Arc<KeyedLocks>,
    groups: Arc<KeyedLocks>,
) {
    if settings.mode == GcMode::Off {
        return;
    }
    // Before the cache is complete a live Service may look absent: never act on that.
    while !matches!(services.wait_until_ready().now_or_never(), Some(Ok(()))) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut collector = Collector::new(settings.grace);
    loop {
        pass(provider.as_ref(), &services, &settings, &metrics, &mut collector, &owners, &groups).await;
        tokio::time::sleep(settings.interval).await;
    }
}

async fn pass(
    provider: &dyn Provider,
    services: &Store<Service>,
    settings: &GcSettings,
    metrics: &Metrics,
    collector: &mut Collector,
    locks: &Arc<KeyedLocks>,
    groups: &Arc<KeyedLocks>,
) {
    let inventory = match provider.list_owned().await {
        Ok(inventory) => inventory,
        Err(e) => {
            metrics.gc_passes.get_or_create(&OutcomeLabels { outcome: e.class().as_str().to_owned() }).inc();
            warn!(error = %e, "orphan collection: cloud inventory failed; deleting nothing");
            return;
        }
    };
    // Read after the listing: a Service created meanwhile is in the cache, and protects its
    // load balancer even if that was made after the listing.
    let owners = owners(services.state().iter().map(AsRef::as_ref), &settings.class);
    let orphans = find_orphans(&inventory, &owners);
    metrics.orphans.set(i64::try_from(orphans.len()).unwrap_or(i64::MAX));
    metrics.gc_passes.get_or_create(&OutcomeLabels { outcome: "success".to_owned() }).inc();
    // The groups each owner has a part in: deleting an owner deletes all its parts.
    let mut parts_in: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for lb in &inventory {
        if let Some(group) = &lb.group {
            parts_in.entry(lb.identity.uid.as_str()).or_default().insert(group.as_str());
        }
    }
    // Owners whose every part this pass deleted: their other entries have nothing left to delete.
    let mut gone: HashSet<&str> = HashSet::new();
    for (lb, why) in collector.due(&orphans, Instant::now()) {
        let service = lb.identity.service_key();
        if gone.contains(lb.identity.uid.as_str()) {
            debug!(load_balancer = %lb.id, %service, "deleted with its Service's other parts");
            continue;
        }
        if settings.mode == GcMode::Report {
            warn!(load_balancer = %lb.id, %service, uid = %lb.identity.uid, reason = why.as_str(), "orphaned load balancer (--gc=report: not deleting)");
            continue;
        }
        let deleted = match why {
            // A live Service keeps everything else; its ensure re-creates the resource if it
            // turns out to be wanted after all. Not while its reconcile runs: that may be
            // attaching it right now.
            Orphaned::Leftover => {
                let Some(_owner) = locks.try_lock(&lb.identity.uid) else {
                    debug!(load_balancer = %lb.id, %service, "leftover of a Service being reconciled: next pass");
                    continue;
                };
                let _group = groups.lock_all(lb.group.as_deref()).await;
                provider.delete_detached(lb).await
            }
            // Every part of a vanished Service goes, whichever entry is due: with a group's last
            // member's part, the group's load balancer goes, which must not happen while another
            // member joins it.
            Orphaned::ServiceGone | Orphaned::NotOurs => {
                // A reconcile of the Service still under way (it was deleted while its ensure
                // ran) finishes first, or it would build on what is being deleted: a later pass.
                let Some(_owner) = locks.try_lock(&lb.identity.uid) else {
                    debug!(load_balancer = %lb.id, %service, "a Service being reconciled: next pass");
                    continue;
                };
                let in_groups = parts_in.get(lb.identity.uid.as_str()).into_iter().flatten().copied();
                let _groups = groups.lock_all(in_groups).await;
                let deleted = provider.delete(&lb.identity).await;
                if deleted.is_ok() {
                    gone.insert(lb.identity.uid.as_str());
                }
                deleted
            }
        };
        match deleted {
            Ok(()) => {
                metrics.gc_deletions.inc();
                info!(load_balancer = %lb.id, %service, uid = %lb.identity.uid, reason = why.as_str(), "deleted orphaned load balancer");
            }
            Err(e) => {
                warn!(load_balancer = %lb.id, %service, error = %e, "could not delete orphaned load balancer; trying again next pass")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use hawser_providers::ServiceIdentity;
    use serde_json::json;

    use super::*;

    fn lb(uid: &str) -> OwnedLoadBalancer {
        OwnedLoadBalancer {
            identity: ServiceIdentity {
                cluster: "demo".into(),
                namespace: "default".into(),
                name: "web".into(),
                uid: uid.into(),
            },
            id: format!("lb-{uid}"),
            fingerprint: None,
            detached: false,
            group: None,
        }
    }

    /// A cloud holding `owned`, which records what it was asked to delete.
    struct Inventory {
        owned: Vec<OwnedLoadBalancer>,
        deleted: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Provider for Inventory {
        fn name(&self) -> &'static str {
            "inventory"
        }

        fn capabilities(&self) -> hawser_providers::Capabilities {
            crate::testutil::mock_desired_config().capabilities
        }

        async fn ensure(
            &self,
            _: &hawser_providers::LoadBalancerSpec,
        ) -> Result<hawser_providers::LoadBalancerStatus, hawser_providers::ProviderError> {
            Err(hawser_providers::ProviderError::Fatal("the collector never ensures".into()))
        }

        async fn plan(
            &self,
            _: &hawser_providers::LoadBalancerSpec,
        ) -> Result<hawser_providers::ChangePlan, hawser_providers::ProviderError> {
            Err(hawser_providers::ProviderError::Fatal("the collector never plans".into()))
        }

        async fn plan_delete(
            &self,
            _: &ServiceIdentity,
        ) -> Result<hawser_providers::ChangePlan, hawser_providers::ProviderError> {
            Err(hawser_providers::ProviderError::Fatal("the collector never plans".into()))
        }

        async fn delete(&self, identity: &ServiceIdentity) -> Result<(), hawser_providers::ProviderError> {
            self.deleted.lock().unwrap().push(identity.uid.clone());
            Ok(())
        }

        async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, hawser_providers::ProviderError> {
            let deleted = self.deleted.lock().unwrap();
            Ok(self.owned.iter().filter(|lb| !deleted.contains(&lb.identity.uid)).cloned().collect())
        }
    }

    #[tokio::test]
    async fn a_vanished_members_part_is_removed_only_under_its_groups_lock() {
        let member = OwnedLoadBalancer { group: Some("default/edge".into()), ..lb("gone-member") };
        // A Service with a load balancer of its own and a part of the group's (a move cut
        // short): its deletion removes both, so it waits whichever entry is due.
        let own = OwnedLoadBalancer { id: "lb-own".into(), ..lb("gone-member") };
        let provider = Arc::new(Inventory { owned: vec![lb("gone"), own, member], deleted: Default::default() });
        let (store, _writer) = kube::runtime::reflector::store::<Service>();
        let settings = Arc::new(GcSettings {
            mode: GcMode::On,
            interval: Duration::ZERO,
            grace: Duration::ZERO,
            class: "hawser.dev/lb".into(),
        });
        let (owners, groups) = (Arc::new(KeyedLocks::default()), Arc::new(KeyedLocks::default()));
        // A member joining the group holds its lock, and the reconcile of the Service "gone",
        // deleted while it ran, holds its owner's.
        let joining = groups.lock("default/edge").await;
        let reconciling = owners.lock("gone").await;
        let collect = || {
            let (provider, owners, groups) = (provider.clone(), owners.clone(), groups.clone());
            let (store, settings) = (store.clone(), settings.clone());
            tokio::spawn(async move {
                let metrics = crate::metrics::Metrics::new();
                let mut collector = Collector::new(Duration::ZERO);
                pass(provider.as_ref(), &store, &settings, &metrics, &mut collector, &owners, &groups).await;
            })
        };
        let collecting = collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(provider.deleted.lock().unwrap().is_empty(), "nothing goes while the join or its reconcile runs");
        assert!(!collecting.is_finished(), "the member's part waits for the join");
        drop(joining);
        collecting.await.unwrap();
        // Once: its own load balancer went with its part of the group's. "gone", whose
        // reconcile still runs, is left for a later pass, which does not wait for it.
        assert_eq!(*provider.deleted.lock().unwrap(), ["gone-member"]);
        drop(reconciling);
        collect().await.unwrap();
        assert_eq!(*provider.deleted.lock().unwrap(), ["gone-member", "gone"], "gone goes once its reconcile is done");
        assert!(groups.is_empty() && owners.is_empty());
    }

    fn service(uid: &str, spec: serde_json::Value, finalizers: &[&str]) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": uid, "finalizers": finalizers},
            "spec": spec
        }))
        .unwrap()
    }

    fn ours() -> serde_json::Value {
        json!({"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb"})
    }

    #[tokio::test]
    async fn a_reconcile_and_the_collector_exclude_each_other_per_service() {
        let owners = Arc::new(KeyedLocks::default());
        let reconciling = owners.lock("a").await;
        assert!(owners.try_lock("a").is_none(), "the collector must wait while Service a reconciles");
        assert!(owners.try_lock("b").is_some(), "another Service is not held up");
        drop(reconciling);
        let collecting = owners.try_lock("a");
        assert!(collecting.is_some(), "free once the reconcile is done");
        // A reconcile starting meanwhile waits for the deletion to finish.
        let waiting = tokio::spawn({
            let owners = owners.clone();
            async move { owners.lock("a").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(collecting);
        drop(waiting.await.unwrap());
        assert!(owners.is_empty(), "locks nobody holds are forgotten");
    }

    #[test]
    fn orphans_are_load_balancers_whose_owner_uid_is_gone_or_released() {
        let services = [
            service("alive", ours(), &["hawser.dev/cleanup"]),
            service("new-uid-same-name", ours(), &[]),
            service("released", json!({"type": "ClusterIP"}), &[]),
            service("releasing", json!({"type": "ClusterIP"}), &["hawser.dev/cleanup"]),
            service("other-class", json!({"type": "LoadBalancer", "loadBalancerClass": "x.io/lb"}), &[]),
        ];
        let owners = owners(services.iter(), "hawser.dev/lb");
        let inventory = [lb("alive"), lb("old-uid"), lb("released"), lb("releasing"), lb("other-class")];
        let found: Vec<(&str, Orphaned)> =
            find_orphans(&inventory, &owners).into_iter().map(|(l, why)| (l.identity.uid.as_str(), why)).collect();
        assert_eq!(
            found,
            vec![
                ("old-uid", Orphaned::ServiceGone),
                ("released", Orphaned::NotOurs),
                ("other-class", Orphaned::NotOurs)
            ],
            "a same-named Service with a new UID does not protect the old load balancer; our finalizer does"
        );
    }

    #[test]
    fn a_live_services_resource_on_no_load_balancer_is_a_leftover_of_its_own() {
        let services = [service("alive", ours(), &["hawser.dev/cleanup"])];
        let owners = owners(services.iter(), "hawser.dev/lb");
        let detached = OwnedLoadBalancer { id: "tg-left".into(), detached: true, ..lb("alive") };
        let gone = OwnedLoadBalancer { id: "tg-gone".into(), detached: true, ..lb("gone") };
        let inventory = [lb("alive"), detached, gone];
        let found: Vec<(&str, Orphaned)> =
            find_orphans(&inventory, &owners).into_iter().map(|(l, why)| (l.id.as_str(), why)).collect();
        assert_eq!(found, vec![("tg-left", Orphaned::Leftover), ("tg-gone", Orphaned::ServiceGone)]);
    }

    #[test]
    fn group_members_on_one_load_balancer_keep_their_own_clocks() {
        let mut collector = Collector::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let (a, b) = (lb("a"), OwnedLoadBalancer { id: lb("a").id, ..lb("b") });
        assert_eq!(a.id, b.id, "one group load balancer");
        assert!(collector.due(&[(&a, Orphaned::ServiceGone)], t0).is_empty());
        let later = t0 + Duration::from_secs(10);
        let due = collector.due(&[(&a, Orphaned::ServiceGone), (&b, Orphaned::ServiceGone)], later);
        let uids: Vec<&str> = due.iter().map(|(l, _)| l.identity.uid.as_str()).collect();
        assert_eq!(uids, ["a"], "b's clock starts when b is first seen orphaned");
    }

    #[test]
    fn an_orphan_is_due_only_after_the_grace_period_and_its_clock_restarts_when_it_goes() {
        let start = Instant::now();
        let (a, b) = (lb("a"), lb("b"));
        let mut c = Collector::new(Duration::from_secs(60));
        let both = [(&a, Orphaned::ServiceGone), (&b, Orphaned::ServiceGone)];
        assert!(c.due(&both, start).is_empty(), "first seen: not yet");
        assert!(c.due(&both, start + Duration::from_secs(59)).is_empty());
        // b is adopted again (or deleted by someone else): it leaves the orphans.
        let only_a = [(&a, Orphaned::ServiceGone)];
        let due = c.due(&only_a, start + Duration::from_secs(60));
        assert_eq!(due.iter().map(|(l, _)| l.id.as_str()).collect::<Vec<_>>(), ["lb-a"]);
        assert!(c.due(&both, start + Duration::from_secs(61)).len() == 1, "b's clock started over");
        assert_eq!(c.due(&both, start + Duration::from_secs(121)).len(), 2);
    }
}
