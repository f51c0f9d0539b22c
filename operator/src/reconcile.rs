//! The Service reconciler: finalizer first, then the cloud, then the status.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hawser_providers::{
    ErrorClass, InvalidField, LoadBalancerSpec, LoadBalancerStatus, Provider, ProviderError, ServiceIdentity, Targets,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, warn};

use crate::desired::{self, DesiredConfig};
use crate::events::{EventPublisher, EventType, Note};
use crate::gc::KeyedLocks;
use crate::groups::{self, GroupConflict, Member};
use crate::metrics::Metrics;
use crate::names::{CONDITION_TYPE, CONTROLLER_NAME, FINALIZER};
use crate::nodes::NodePolicy;
use crate::retry::RetryPolicy;
use crate::status::{DesiredCondition, GroupRecord, StatusChange, ingress_of, patched, status_patch};

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The loadBalancerClass served.
    pub class: String,
    /// Inputs of the desired-state builder.
    pub desired: DesiredConfig,
    /// Which Nodes are targets.
    pub node_policy: NodePolicy,
    /// Period of the cloud drift check, and retry delay of Services waiting for the user.
    pub resync_period: Duration,
}

/// What the last successful ensure of one Service made, remembered so that a reconcile whose
/// inputs did not change (our own finalizer or status write woke it, a resync, a restarted watch)
/// costs no cloud call and no write.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensured {
    /// The Service, as `namespace`/`name`.
    pub namespace: String,
    /// See `namespace`.
    pub name: String,
    /// Digest of the spec that was ensured.
    pub spec_digest: u64,
    /// The provider's fingerprint of that spec, for the drift check.
    pub fingerprint: Option<String>,
    /// What the cloud answered.
    pub status: LoadBalancerStatus,
    /// The load-balancer group (`namespace/name`) it was ensured in, if any.
    pub group: Option<String>,
}

/// What was last ensured per Service UID, and how many Services each cloud load balancer serves
/// (one, or a group's members), kept in step so the gauges cost nothing per reconcile.
#[derive(Debug, Default)]
struct EnsuredBook {
    by_uid: HashMap<String, Ensured>,
    per_lb: HashMap<String, usize>,
    /// Services whose cloud may have moved off their record: a change began after it and did
    /// not finish, so even their recorded spec must be ensured again.
    unsettled: std::collections::HashSet<String>,
}

impl EnsuredBook {
    fn get(&self, uid: &str) -> Option<&Ensured> {
        self.by_uid.get(uid)
    }

    /// The record of `uid`, if the cloud is known to match it.
    fn settled(&self, uid: &str) -> Option<&Ensured> {
        self.by_uid.get(uid).filter(|_| !self.unsettled.contains(uid))
    }

    /// A change of `uid`'s load balancer begins.
    fn unsettle(&mut self, uid: &str) {
        if self.by_uid.contains_key(uid) {
            self.unsettled.insert(uid.to_owned());
        }
    }

    fn insert(&mut self, uid: String, record: Ensured) {
        self.unsettled.remove(&uid);
        *self.per_lb.entry(record.status.id.clone()).or_default() += 1;
        if let Some(old) = self.by_uid.insert(uid, record) {
            self.release(&old.status.id);
        }
    }

    fn remove(&mut self, uid: &str) -> Option<Ensured> {
        self.unsettled.remove(uid);
        let old = self.by_uid.remove(uid)?;
        self.release(&old.status.id);
        Some(old)
    }

    fn release(&mut self, lb: &str) {
        if let Some(n) = self.per_lb.get_mut(lb) {
            *n -= 1;
            if *n == 0 {
                self.per_lb.remove(lb);
            }
        }
    }
}

/// A digest of everything a spec asks of the cloud; equal digests mean nothing to do.
pub fn spec_digest(spec: &LoadBalancerSpec) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    spec.hash(&mut h);
    h.finish()
}

/// Everything a reconcile needs. Time is injectable so tests are deterministic.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The cloud.
    pub provider: Arc<dyn Provider>,
    /// The eligible Nodes, as the node watch last published them.
    pub targets: watch::Receiver<Targets>,
    /// Settings.
    pub settings: Settings,
    /// Publishes Events.
    pub events: EventPublisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry delays by error class.
    pub retry: RetryPolicy,
    /// The clock for condition timestamps.
    pub now: fn() -> Timestamp,
    /// What was last ensured, per Service UID.
    ensured: Mutex<EnsuredBook>,
    /// `--dry-run`: plan instead of change, and keep the plans here.
    pub dry_run: Option<Arc<crate::plan::PlanBook>>,
    /// The Service cache, for the members of load-balancer groups.
    pub services: Option<Store<Service>>,
    /// Wakes Services: a group's other members when one of them changed or left.
    pub wake: Option<mpsc::Sender<ObjectRef<Service>>>,
    /// One lock per Service UID, shared with the orphan collector (see [`KeyedLocks`]).
    pub owners: Arc<KeyedLocks>,
    /// One lock per load-balancer group: its members are admitted and ensured one at a time, and
    /// the orphan collector removes a vanished member's part under it too.
    pub groups: Arc<KeyedLocks>,
}

impl Context {
    /// A context.
    pub fn new(
        client: Client,
        provider: Arc<dyn Provider>,
        targets: watch::Receiver<Targets>,
        settings: Settings,
        events: EventPublisher,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            client,
            provider,
            targets,
            settings,
            events,
            metrics,
            retry,
            now: Timestamp::now,
            ensured: Mutex::default(),
            dry_run: None,
            services: None,
            wake: None,
            owners: Arc::default(),
            groups: Arc::default(),
        }
    }

    fn ensured(&self) -> std::sync::MutexGuard<'_, EnsuredBook> {
        self.ensured.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of what was last ensured, per Service UID.
    pub fn ensured_snapshot(&self) -> HashMap<String, Ensured> {
        self.ensured().by_uid.clone()
    }

    /// Forgets what was ensured for `uid` if it is still `seen`: the cloud drifted from it, so the
    /// next reconcile of that Service ensures again. A record that changed meanwhile is newer
    /// than the inventory that found the drift, and stays.
    pub fn forget_drifted(&self, uid: &str, seen: &Ensured) -> bool {
        let mut ensured = self.ensured();
        if ensured.by_uid.get(uid) == Some(seen) {
            ensured.remove(uid);
            return true;
        }
        false
    }

    fn set_managed(&self) {
        let ensured = self.ensured();
        self.metrics.managed_load_balancers.set(i64::try_from(ensured.by_uid.len()).unwrap_or(i64::MAX));
        self.metrics.load_balancers.set(i64::try_from(ensured.per_lb.len()).unwrap_or(i64::MAX));
    }

    /// The other Services of `group` (`namespace/name`) in the cache, with what is needed to
    /// tell which may share its load balancer.
    fn group_members(&self, group: &str, except_uid: &str) -> Vec<Arc<Service>> {
        let Some(store) = &self.services else { return Vec::new() };
        let Some((namespace, name)) = group.split_once('/') else { return Vec::new() };
        store
            .state()
            .into_iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(namespace)
                    && s.uid().as_deref() != Some(except_uid)
                    && s.metadata.deletion_timestamp.is_none()
                    && is_ours(s, &self.settings.class)
                    && group_of(s).as_deref() == Some(name)
            })
            .collect()
    }

    /// Wakes the other members of `group`: a port or a place may have been freed.
    fn wake_group(&self, group: &str, except_uid: &str) {
        let Some(wake) = &self.wake else { return };
        for member in self.group_members(group, except_uid) {
            let _ = wake.try_send(ObjectRef::from_obj(member.as_ref()));
        }
    }
}

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Service asks for something hawser cannot build; the user must change it.
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<InvalidField>),
    /// The cloud failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed, or the reconcile inside it did.
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The error at the root, below the finalizer wrapper.
    fn root(&self) -> &Self {
        match self {
            Self::Finalizer(f) => match f.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.root(),
                _ => self,
            },
            other => other,
        }
    }

    /// The class of the error, when it is not a Kubernetes API error.
    pub fn class(&self) -> Option<ErrorClass> {
        match self.root() {
            Self::Invalid(_) => Some(ErrorClass::InvalidInput),
            Self::Provider(e) => Some(e.class()),
            Self::Kube(_) | Self::Finalizer(_) => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self.root() {
            Self::Provider(ProviderError::Throttled { retry_after, .. }) => *retry_after,
            _ => None,
        }
    }

    fn outcome(&self) -> &'static str {
        self.class().map_or("kubernetes_error", ErrorClass::as_str)
    }
}

/// Whether hawser should give this Service a load balancer.
pub fn is_ours(svc: &Service, class: &str) -> bool {
    svc.spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.as_deref() == Some(class))
}

/// Whether the Service carries hawser's finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(book) = ctx.dry_run.clone() {
        let started = tokio::time::Instant::now();
        let result = crate::plan::reconcile_dry(svc, ctx.clone(), &book).await;
        ctx.metrics
            .reconciled(result.as_ref().map_or_else(Error::outcome, |_| "success"), started.elapsed().as_secs_f64());
        return result;
    }
    let class = ctx.settings.class.clone();
    if !is_ours(&svc, &class) && !has_finalizer(&svc) {
        // Not ours and never was: not even a read.
        return Ok(Action::await_change());
    }
    // While this runs, the collector leaves this Service's unattached resources alone.
    let _owner = match svc.uid() {
        Some(uid) => Some(ctx.owners.lock(&uid).await),
        None => None,
    };
    let started = tokio::time::Instant::now();
    let span = tracing::info_span!("reconcile", service = %key(&svc));
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            finalizer::Event::Apply(svc) if is_ours(&svc, &class) => apply(&svc, &ctx, &api).await,
            finalizer::Event::Apply(svc) => release(&svc, &ctx, &api).await,
            finalizer::Event::Cleanup(svc) => cleanup(&svc, &ctx, &api).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let outcome = match &result {
        Ok(_) => "success",
        Err(e) => e.outcome(),
    };
    ctx.metrics.reconciled(outcome, started.elapsed().as_secs_f64());
    result
}

/// How long a failed Service waits.
pub fn error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.retry.on_failure(&key(&svc), error.class(), error.retry_after());
    warn!(service = %key(&svc), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn apply(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action, Error> {
    let targets = ctx.targets.borrow().clone();
    let desired = desired::build(svc, targets, &ctx.settings.desired)
        .and_then(|spec| ctx.provider.validate(&spec).map(|()| spec));
    let spec = match desired {
        Ok(spec) => spec,
        Err(fields) => return invalid(svc, ctx, api, fields).await,
    };
    let uid = spec.identity.uid.clone();
    let group = spec.group.as_ref().map(|g| format!("{}/{g}", spec.identity.namespace));
    // A group's members are admitted and ensured one at a time, each against the others as the
    // cache holds them; admission runs even when nothing of this Service changed, as another
    // member's change may have taken its place. The locks of the groups this Service may leave
    // (the ones its status records, the one it served in) are taken too, all in order, so that
    // a member joining one of those never sees its parts change under it.
    let before = ctx.ensured().get(&uid).and_then(|p| p.group.clone()).or_else(|| groups::serving_group(svc));
    let mut locked = GroupRecord::of(svc.status.as_ref());
    locked.extend(before.iter().chain(&group).cloned());
    let _guards = ctx.groups.lock_all(locked.iter().map(String::as_str)).await;
    if let Some(group) = &group
        && let Err(conflict) = admit(svc, &spec, group, ctx)
    {
        return refused(svc, &spec, group, conflict, ctx, api).await;
    }
    let digest = spec_digest(&spec);
    let (previous, settled) = {
        let book = ctx.ensured();
        (book.get(&uid).cloned(), book.settled(&uid).is_some())
    };
    if let Some(done) = previous.as_ref().filter(|p| settled && p.spec_digest == digest) {
        // Nothing the cloud must know changed since the last ensure, no change begun since was
        // cut short, and the drift check has not found the cloud changed behind our back: at most
        // the Service's status needs repair.
        write_status(svc, ctx, api, ready_change(&done.status, group.as_deref())).await?;
        ctx.retry.on_success(&key(svc));
        return Ok(Action::await_change());
    }
    let changed = match &previous {
        Some(previous) => previous.spec_digest != digest || !settled,
        None => !condition_is_true(svc),
    };
    // Every group whose load balancer may hold parts of this Service once the ensure is under
    // way: the ones recorded, the one it served in, and the one it joins. The record is written
    // before the first cloud write of a join, so that however the operator is stopped, the
    // groups it must leave are known: from memory, or else from the status.
    let recorded = GroupRecord::of(svc.status.as_ref());
    let holding = locked;
    let written;
    let svc = if holding == recorded {
        svc
    } else {
        let change = StatusChange { groups: Some(GroupRecord::changing(holding.clone())), ..StatusChange::default() };
        written = write_status(svc, ctx, api, change).await?;
        written.as_ref().unwrap_or(svc)
    };
    if changed {
        let note = format!(
            "Ensuring load balancer: {} listener(s), {} eligible node(s)",
            spec.listeners.len(),
            spec.targets.len()
        );
        publish(ctx, svc, EventType::Normal, "EnsuringLoadBalancer", "Ensure", note).await;
    }
    // Until this ensure and its leaves succeed, the cloud may be anywhere between the record and
    // the new spec: going back to the recorded spec must ensure again.
    ctx.ensured().unsettle(&uid);
    match ctx.provider.ensure(&spec).await {
        Ok(status) => {
            // A Service that left its group (or moved to another, or whose join was cut short
            // before the group was taken off it) is served by its new load balancer now: its part
            // of the other groups' goes. Until that succeeds, the status keeps naming them.
            let left: Vec<String> = holding.iter().filter(|g| Some(*g) != group.as_ref()).cloned().collect();
            for old in &left {
                ctx.provider.leave_group(&spec.identity, old).await?;
            }
            let change = ready_change(&status, group.as_deref());
            write_status(svc, ctx, api, change).await?;
            if changed {
                let message = ready_message(&status, group.as_deref());
                publish(ctx, svc, EventType::Normal, "EnsuredLoadBalancer", "Ensure", message).await;
                info!(load_balancer = %status.id, "load balancer ensured");
            }
            announce_group_move(svc, ctx, before.as_deref(), &left, group.as_deref()).await;
            // Only a change of group or of ports can let a waiting member in; a change of nodes,
            // which every member sees at once, cannot.
            let ports = |s: &LoadBalancerStatus| s.ingress.first().map(|i| i.ports.clone()).unwrap_or_default();
            let moved = previous.as_ref().is_none_or(|p| p.group != group || ports(&p.status) != ports(&status));
            let record = Ensured {
                namespace: spec.identity.namespace.clone(),
                name: spec.identity.name.clone(),
                spec_digest: digest,
                fingerprint: ctx.provider.fingerprint(&spec),
                status,
                group: group.clone(),
            };
            ctx.ensured().insert(uid.clone(), record);
            ctx.set_managed();
            ctx.retry.on_success(&key(svc));
            // The other members may have been waiting for a port this one gave up, or for the
            // group this one left.
            if moved || !left.is_empty() {
                for g in left.into_iter().chain(group) {
                    ctx.wake_group(&g, &uid);
                }
            }
            // Level-based without polling: Service and Node changes arrive as events, and the
            // periodic drift check wakes exactly the Services whose load balancer drifted.
            Ok(Action::await_change())
        }
        Err(ProviderError::InvalidInput(fields)) => invalid(svc, ctx, api, fields).await,
        Err(e) => {
            let reason = match e.class() {
                ErrorClass::Throttled => "Throttled",
                ErrorClass::Conflict => "Conflict",
                _ => "SyncFailed",
            };
            // A member blocked by the others' parts (the group's load balancer must be replaced
            // for a setting the others no longer share): they are admitted again, and the ones
            // that now clash are refused and withdrawn, which unblocks it.
            if let (Some(group), ErrorClass::Conflict) = (&group, e.class()) {
                ctx.wake_group(group, &uid);
            }
            publish(ctx, svc, EventType::Warning, "SyncFailed", "Ensure", format!("Error ensuring load balancer: {e}"))
                .await;
            write_status(
                svc,
                ctx,
                api,
                StatusChange {
                    condition: Some(Some(DesiredCondition::not_ready(reason, e.to_string()))),
                    ..StatusChange::default()
                },
            )
            .await?;
            Err(e.into())
        }
    }
}

/// The group (`hawser.dev/load-balancer-group`) a Service names, as written.
pub fn group_of(svc: &Service) -> Option<String> {
    svc.annotations().get(crate::annotations::LOAD_BALANCER_GROUP).map(|g| g.trim().to_owned())
}

/// Whether the Service may share `group`'s load balancer with the members in the cache.
fn admit(svc: &Service, spec: &LoadBalancerSpec, group: &str, ctx: &Context) -> Result<(), GroupConflict> {
    let Some(limits) = ctx.settings.desired.capabilities.groups else { return Ok(()) };
    let targets = ctx.targets.borrow().clone();
    let others = ctx.group_members(group, &spec.identity.uid);
    // Members whose own configuration is invalid take no part.
    let specs: Vec<(Arc<Service>, LoadBalancerSpec)> = others
        .into_iter()
        .filter_map(|o| desired::build(&o, targets.clone(), &ctx.settings.desired).ok().map(|s| (o, s)))
        .collect();
    let mut members: Vec<Member<'_>> = specs.iter().map(|(service, spec)| Member { service, spec }).collect();
    members.push(Member { service: svc, spec });
    groups::admit(&spec.identity.uid, group, &members, limits, ctx.provider.group_annotations())
}

/// A member that cannot share its group's load balancer: the user is told which Service and
/// setting it clashes with, and it has no address: whatever it held in the cloud (its part of
/// the group's load balancer, after its own change or a member's before it made it clash, or the
/// load balancer of its own it was moving from) is withdrawn, once per refusal. The other members
/// are not touched.
async fn refused(
    svc: &Service,
    spec: &LoadBalancerSpec,
    group: &str,
    conflict: GroupConflict,
    ctx: &Context,
    api: &Api<Service>,
) -> Result<Action, Error> {
    let message = format!("cannot join load-balancer group {group}: {conflict}");
    // The condition is written only after the withdrawal succeeded: once it says this, there is
    // nothing left to withdraw and the refusal costs no cloud call.
    let already = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_TYPE))
        .is_some_and(|c| c.reason == "GroupConflict" && c.message == message);
    if !already {
        publish(ctx, svc, EventType::Warning, "GroupConflict", "Admit", message.clone()).await;
        warn!(%group, with = %conflict.with, setting = %conflict.setting, "refused from its load-balancer group");
        ctx.provider.delete(&spec.identity).await?;
        ctx.ensured().remove(&spec.identity.uid);
        ctx.set_managed();
    }
    // Withdrawn, it holds no part of any group's load balancer.
    let change = StatusChange {
        ingress: Some(Vec::new()),
        condition: Some(Some(DesiredCondition::not_ready("GroupConflict", message))),
        groups: (!already).then(GroupRecord::default),
    };
    write_status(svc, ctx, api, change).await?;
    Err(Error::Invalid(vec![InvalidField::new(conflict.setting, conflict.message)]))
}

/// Tells the user when a Service joined a load-balancer group (it served in `before`) or left
/// some.
async fn announce_group_move(svc: &Service, ctx: &Context, before: Option<&str>, left: &[String], now: Option<&str>) {
    if let Some(now) = now
        && before != Some(now)
        && !groups::is_serving_in(svc, now)
    {
        let note = format!("Joined load-balancer group {now}: the Service now shares its load balancer and address");
        publish(ctx, svc, EventType::Normal, "JoinedLoadBalancerGroup", "Ensure", note).await;
    }
    for old in left {
        let note = format!("Left load-balancer group {old}");
        publish(ctx, svc, EventType::Normal, "LeftLoadBalancerGroup", "Ensure", note).await;
    }
}

/// Bad input: tell the user once, mark the condition, call no cloud API; the error policy
/// then waits long (the user must act) instead of hot-retrying.
async fn invalid(svc: &Service, ctx: &Context, api: &Api<Service>, fields: Vec<InvalidField>) -> Result<Action, Error> {
    let message = fields.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let condition = DesiredCondition::not_ready("InvalidConfiguration", message.clone());
    let already_reported = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_TYPE))
        .is_some_and(|c| {
            c.reason == condition.reason
                && c.message == condition.message
                && c.observed_generation == svc.metadata.generation
        });
    if !already_reported {
        publish(ctx, svc, EventType::Warning, "InvalidConfiguration", "Validate", message.clone()).await;
        warn!(problems = %message, "invalid load balancer configuration");
    }
    let change = StatusChange { condition: Some(Some(condition)), ..StatusChange::default() };
    write_status(svc, ctx, api, change).await?;
    Err(Error::Invalid(fields))
}

/// The Service stopped being ours (type or class changed): clean up, then let go of it.
async fn release(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action, Error> {
    cleanup(svc, ctx, api).await?;
    let Some(index) = svc.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(Action::await_change()) };
    let path = format!("/metadata/finalizers/{index}");
    // `test` makes the removal fail rather than remove someone else's finalizer if the list moved.
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    api.patch::<Service>(&svc.name_any(), &PatchParams::default(), &Patch::Json(patch)).await?;
    Ok(Action::await_change())
}

async fn cleanup(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action, Error> {
    let identity = ServiceIdentity {
        cluster: ctx.settings.desired.cluster.clone(),
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
    };
    publish(ctx, svc, EventType::Normal, "DeletingLoadBalancer", "Delete", "Deleting load balancer".to_owned()).await;
    // A member leaves its group's load balancer under the group's lock, like every change to it:
    // the locks of every group that may hold a part of it (the one it names, and the ones its
    // record or memory name), taken in order so that two deletions never wait on each other.
    let mut groups = groups::named_in_status(svc);
    groups.extend(group_of(svc).map(|g| format!("{}/{g}", identity.namespace)));
    groups.extend(ctx.ensured().get(&identity.uid).and_then(|e| e.group.clone()));
    let guards = ctx.groups.lock_all(groups.iter().map(String::as_str)).await;
    let deleted = ctx.provider.delete(&identity).await;
    drop(guards);
    if let Err(e) = deleted {
        publish(ctx, svc, EventType::Warning, "SyncFailed", "Delete", format!("Error deleting load balancer: {e}"))
            .await;
        return Err(e.into());
    }
    publish(ctx, svc, EventType::Normal, "DeletedLoadBalancer", "Delete", "Deleted load balancer".to_owned()).await;
    info!("load balancer deleted");
    let left = ctx.ensured().remove(&identity.uid).and_then(|e| e.group);
    ctx.set_managed();
    if let Some(group) = left.or_else(|| group_of(svc).map(|g| format!("{}/{g}", identity.namespace))) {
        ctx.wake_group(&group, &identity.uid);
    }
    ctx.retry.on_success(&key(svc));
    let change =
        StatusChange { ingress: Some(Vec::new()), condition: Some(None), groups: Some(GroupRecord::default()) };
    write_status(svc, ctx, api, change).await?;
    Ok(Action::await_change())
}

fn ready_message(status: &LoadBalancerStatus, group: Option<&str>) -> String {
    let addresses: Vec<String> =
        status.ingress.iter().filter_map(|i| i.ip.map(|ip| ip.to_string()).or_else(|| i.hostname.clone())).collect();
    // A group member's message carries the group: it marks the member as serving in it.
    let of_group = group.map(groups::serving_marker).unwrap_or_else(|| " ".to_owned());
    format!("Load balancer {}{of_group}serves {}", status.id, addresses.join(", "))
}

/// The status a Service with this load balancer, in this group and no other, should show.
fn ready_change(status: &LoadBalancerStatus, group: Option<&str>) -> StatusChange {
    StatusChange {
        ingress: Some(ingress_of(status)),
        condition: Some(Some(DesiredCondition::ready(ready_message(status, group)))),
        groups: Some(GroupRecord::settled(group)),
    }
}

fn condition_is_true(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == CONDITION_TYPE && c.status == "True"))
}

/// Writes what `change` asks that the Service's status lacks; returns the Service with its status
/// as written, if anything was.
async fn write_status(
    svc: &Service,
    ctx: &Context,
    api: &Api<Service>,
    change: StatusChange,
) -> Result<Option<Service>, Error> {
    let Some(patch) = status_patch(svc.status.as_ref(), svc.metadata.generation, &change, (ctx.now)()) else {
        return Ok(None);
    };
    let params = PatchParams { field_manager: Some(CONTROLLER_NAME.to_owned()), ..PatchParams::default() };
    match api.patch_status(&svc.name_any(), &params, &Patch::Strategic(&patch)).await {
        Ok(_) => {
            // What this reconcile wrote, over what it read: not the reply, whose spec may be newer
            // than the one reconciled.
            let mut written = svc.clone();
            written.status = Some(patched(svc.status.as_ref(), &patch));
            Ok(Some(written))
        }
        // The Service is gone: nothing left to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Note { type_, reason, action, note: &note };
    if let Err(e) = ctx.events.publish(&event, &svc.object_ref(&())).await {
        // An Event is advice to the user; failing to write one must not fail the reconcile.
        warn!(error = %e, reason, "could not publish event");
    }
}

#[cfg(test)]
mod tests;
