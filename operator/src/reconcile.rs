//! The Service reconciler: finalizer first, then the cloud, then the status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hawser_providers::{ErrorClass, InvalidField, LoadBalancerSpec, Provider, ProviderError, ServiceIdentity};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, info, warn};

use crate::desired::{self, DesiredConfig};
use crate::metrics::Metrics;
use crate::names::{CONDITION_TYPE, CONTROLLER_NAME, FINALIZER};
use crate::nodes::{NodePolicy, eligible_targets};
use crate::retry::RetryPolicy;
use crate::status::{DesiredCondition, StatusChange, ingress_of, status_patch};

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The loadBalancerClass served.
    pub class: String,
    /// Inputs of the desired-state builder.
    pub desired: DesiredConfig,
    /// Which Nodes are targets.
    pub node_policy: NodePolicy,
    /// Re-check period of healthy Services.
    pub resync_period: Duration,
}

/// Everything a reconcile needs. Time is injectable so tests are deterministic.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The cloud.
    pub provider: Arc<dyn Provider>,
    /// Cached Nodes.
    pub nodes: Store<Node>,
    /// Settings.
    pub settings: Settings,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry delays by error class.
    pub retry: RetryPolicy,
    /// The clock for condition timestamps.
    pub now: fn() -> Timestamp,
    /// Last spec ensured per Service UID: Normal Events are published only when it changes.
    ensured: Mutex<HashMap<String, LoadBalancerSpec>>,
}

impl Context {
    /// A context.
    pub fn new(
        client: Client,
        provider: Arc<dyn Provider>,
        nodes: Store<Node>,
        settings: Settings,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            client,
            provider,
            nodes,
            settings,
            recorder,
            metrics,
            retry,
            now: Timestamp::now,
            ensured: Mutex::default(),
        }
    }

    fn ensured(&self) -> std::sync::MutexGuard<'_, HashMap<String, LoadBalancerSpec>> {
        self.ensured.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let class = ctx.settings.class.clone();
    if !is_ours(&svc, &class) && !has_finalizer(&svc) {
        // Not ours and never was: not even a read.
        return Ok(Action::await_change());
    }
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
    let targets = eligible_targets(ctx.nodes.state().iter().map(AsRef::as_ref), ctx.settings.node_policy);
    let desired = desired::build(svc, &targets, &ctx.settings.desired)
        .and_then(|spec| ctx.provider.validate(&spec).map(|()| spec));
    let spec = match desired {
        Ok(spec) => spec,
        Err(fields) => return invalid(svc, ctx, api, fields).await,
    };
    let uid = spec.identity.uid.clone();
    let changed = match ctx.ensured().get(&uid) {
        Some(previous) => *previous != spec,
        None => !condition_is_true(svc),
    };
    if changed {
        let note = format!(
            "Ensuring load balancer: {} listener(s), {} eligible node(s)",
            spec.listeners.len(),
            spec.targets.len()
        );
        publish(ctx, svc, EventType::Normal, "EnsuringLoadBalancer", "Ensure", note).await;
    }
    match ctx.provider.ensure(&spec).await {
        Ok(status) => {
            let ingress = ingress_of(&status);
            let addresses: Vec<String> =
                ingress.iter().filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone())).collect();
            let message = format!("Load balancer {} serves {}", status.id, addresses.join(", "));
            write_status(
                svc,
                ctx,
                api,
                StatusChange {
                    ingress: Some(ingress),
                    condition: Some(Some(DesiredCondition::ready(message.clone()))),
                },
            )
            .await?;
            if changed {
                publish(ctx, svc, EventType::Normal, "EnsuredLoadBalancer", "Ensure", message).await;
                info!(load_balancer = %status.id, addresses = ?addresses, "load balancer ensured");
            }
            {
                let mut ensured = ctx.ensured();
                ensured.insert(uid, spec);
                ctx.metrics.managed_load_balancers.set(i64::try_from(ensured.len()).unwrap_or(i64::MAX));
            }
            ctx.retry.on_success(&key(svc));
            Ok(Action::requeue(ctx.settings.resync_period))
        }
        Err(ProviderError::InvalidInput(fields)) => invalid(svc, ctx, api, fields).await,
        Err(e) => {
            let reason = match e.class() {
                ErrorClass::Throttled => "Throttled",
                ErrorClass::Conflict => "Conflict",
                _ => "SyncFailed",
            };
            publish(ctx, svc, EventType::Warning, "SyncFailed", "Ensure", format!("Error ensuring load balancer: {e}"))
                .await;
            write_status(
                svc,
                ctx,
                api,
                StatusChange {
                    ingress: None,
                    condition: Some(Some(DesiredCondition::not_ready(reason, e.to_string()))),
                },
            )
            .await?;
            Err(e.into())
        }
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
    write_status(svc, ctx, api, StatusChange { ingress: None, condition: Some(Some(condition)) }).await?;
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
    if let Err(e) = ctx.provider.delete(&identity).await {
        publish(ctx, svc, EventType::Warning, "SyncFailed", "Delete", format!("Error deleting load balancer: {e}"))
            .await;
        return Err(e.into());
    }
    publish(ctx, svc, EventType::Normal, "DeletedLoadBalancer", "Delete", "Deleted load balancer".to_owned()).await;
    info!("load balancer deleted");
    {
        let mut ensured = ctx.ensured();
        ensured.remove(&identity.uid);
        ctx.metrics.managed_load_balancers.set(i64::try_from(ensured.len()).unwrap_or(i64::MAX));
    }
    ctx.retry.on_success(&key(svc));
    write_status(svc, ctx, api, StatusChange { ingress: Some(Vec::new()), condition: Some(None) }).await?;
    Ok(Action::await_change())
}

fn condition_is_true(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == CONDITION_TYPE && c.status == "True"))
}

async fn write_status(svc: &Service, ctx: &Context, api: &Api<Service>, change: StatusChange) -> Result<(), Error> {
    let Some(patch) = status_patch(svc.status.as_ref(), svc.metadata.generation, &change, (ctx.now)()) else {
        return Ok(());
    };
    let params = PatchParams { field_manager: Some(CONTROLLER_NAME.to_owned()), ..PatchParams::default() };
    match api.patch_status(&svc.name_any(), &params, &Patch::Strategic(patch)).await {
        Ok(_) => Ok(()),
        // The Service is gone: nothing left to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, action: &str, note: String) {
    let event =
        Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &svc.object_ref(&())).await {
        // An Event is advice to the user; failing to write one must not fail the reconcile.
        warn!(error = %e, reason, "could not publish event");
    }
}

#[cfg(test)]
mod tests;
