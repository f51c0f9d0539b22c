//! Plans: the cloud changes hawser would make for a Service, found by reading only.
//!
//! `hawser-operator plan` prints them for a manifest (what `kubectl apply` of it would cause) or
//! for a Service as it is; `--dry-run` runs the controller with plans in place of changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hawser_providers::{Change, ChangePlan, Conflict, InvalidField, Provider, ProviderError, ServiceIdentity, Targets};
use k8s_openapi::api::core::v1::Service;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::{info, warn};

use crate::desired::{self, DesiredConfig};
use crate::events::{EventType, Note};
use crate::groups::{self, GroupConflict, Member};
use crate::reconcile::{Context, Error, group_of, has_finalizer, is_ours, spec_digest};

/// The UID a Service gets until the API server gives it its own (`plan -f` of a new Service).
pub const NEW_SERVICE_UID: &str = "00000000-0000-0000-0000-000000000000";

/// What hawser would do with a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intent {
    /// Create or update its load balancer.
    Ensure,
    /// Delete its load balancer (the Service is deleted, or stops being ours).
    Delete,
    /// Nothing: the Service is not a LoadBalancer of our class and never was.
    Ignore,
    /// Nothing until the user fixes the Service: its configuration is invalid.
    Invalid,
}

/// The plan of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    /// `namespace/name`.
    pub service: String,
    /// Its UID; `None` for a Service that does not exist yet.
    pub uid: Option<String>,
    /// What hawser would do.
    pub intent: Intent,
    /// One line: what changes, or why nothing does.
    pub summary: String,
    /// Whether a change replaces a resource, so that traffic stops while it is recreated.
    pub replaces: bool,
    /// The changes, in the order they would be made.
    pub changes: Vec<Change>,
    /// Resources with hawser's names that hawser does not own: the change would stop there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// Why the configuration is invalid: the same messages as the Warning Event.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<InvalidField>,
    /// What the reader should know to read the plan right.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl ServicePlan {
    fn new(service: String, uid: Option<String>, intent: Intent, plan: ChangePlan, notes: Vec<String>) -> Self {
        Self {
            service,
            uid,
            intent,
            summary: plan.summary(),
            replaces: plan.replaces(),
            changes: plan.changes,
            conflicts: plan.conflicts,
            problems: Vec::new(),
            notes,
        }
    }

    /// Whether hawser would change anything, or could not (invalid, blocked).
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty() || !self.conflicts.is_empty()
    }

    /// Whether the plan cannot be carried out as the Service stands.
    pub fn is_blocked(&self) -> bool {
        self.intent == Intent::Invalid || !self.conflicts.is_empty()
    }

    /// The text form: a header line, then one line per change.
    pub fn text(&self) -> String {
        let mut out = format!("Service {}: {}\n", self.service, self.summary);
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        for p in &self.problems {
            out.push_str(&format!("  invalid: {p}\n"));
        }
        let plan = ChangePlan { changes: self.changes.clone(), conflicts: self.conflicts.clone() };
        out.push_str(&plan.to_string());
        if self.replaces {
            out.push_str("  warning: a resource is replaced; traffic through it stops until it is recreated\n");
        }
        out
    }
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_else(|| "default".to_owned()), svc.name_any())
}

fn identity(svc: &Service, cluster: &str) -> ServiceIdentity {
    ServiceIdentity {
        cluster: cluster.to_owned(),
        namespace: svc.namespace().unwrap_or_else(|| "default".to_owned()),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
    }
}

/// The Service as the API server would hold it after `manifest` is applied over `live`: the
/// UID and the server-allocated node ports carry over, as they do with `kubectl apply`. A new
/// Service gets a placeholder UID and, where the cloud needs them, placeholder node ports.
fn applied(manifest: &Service, live: Option<&Service>, cfg: &DesiredConfig, notes: &mut Vec<String>) -> Service {
    let mut svc = manifest.clone();
    if svc.metadata.namespace.is_none() {
        svc.metadata.namespace = Some("default".to_owned());
    }
    match live {
        Some(live) => {
            svc.metadata.uid = live.metadata.uid.clone();
            let live_spec = live.spec.clone().unwrap_or_default();
            if let Some(spec) = svc.spec.as_mut() {
                // The API server defaults a port's protocol to TCP; a manifest often leaves it out.
                let protocol =
                    |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
                for port in spec.ports.iter_mut().flatten() {
                    if port.node_port.is_none() {
                        port.node_port = live_spec.ports.iter().flatten().find_map(|l| {
                            (l.port == port.port && protocol(l) == protocol(port)).then_some(l.node_port).flatten()
                        });
                    }
                }
                if spec.health_check_node_port.is_none() {
                    spec.health_check_node_port = live_spec.health_check_node_port;
                }
            }
        }
        None => {
            svc.metadata.uid = Some(NEW_SERVICE_UID.to_owned());
            notes.push(
                "the Service does not exist yet: resource names below come from a placeholder UID; the real ones \
                 derive from the UID the API server gives it"
                    .to_owned(),
            );
        }
    }
    // Ports that get their node port only when applied.
    if let Some(spec) = svc.spec.as_mut()
        && spec.type_.as_deref() == Some("LoadBalancer")
        && spec.allocate_load_balancer_node_ports != Some(false)
    {
        let taken: Vec<i32> = spec.ports.iter().flatten().filter_map(|p| p.node_port).collect();
        let mut placeholders = (30_000..).filter(|n| !taken.contains(n));
        let mut allocated = 0;
        for port in spec.ports.iter_mut().flatten().filter(|p| p.node_port.is_none()) {
            allocated += 1;
            if cfg.capabilities.needs_node_ports {
                port.node_port = placeholders.next();
            }
        }
        if allocated > 0 {
            notes.push(if cfg.capabilities.needs_node_ports {
                format!(
                    "the API server allocates the node port of {allocated} port(s) when the manifest is applied; the \
                     plan uses placeholders from 30000"
                )
            } else {
                format!("the API server allocates the node port of {allocated} port(s) when the manifest is applied")
            });
        }
    }
    svc
}

/// What a plan reads besides the Service itself.
#[derive(Clone, Copy)]
pub struct Planner<'a> {
    /// The eligible nodes.
    pub targets: &'a Targets,
    /// The cloud, read only.
    pub provider: &'a dyn Provider,
    /// The desired-state builder's inputs.
    pub cfg: &'a DesiredConfig,
    /// The loadBalancerClass served.
    pub class: &'a str,
    /// The other Services hawser knows, for the members of a load-balancer group.
    pub others: &'a [Service],
}

impl Planner<'_> {
    /// What hawser would do for a Service: `manifest` is the Service as it would be applied
    /// (`None`: as it is), `live` the Service the API server holds (`None`: it does not exist),
    /// `delete` asks what deleting it would do.
    pub async fn plan(
        &self,
        manifest: Option<&Service>,
        live: Option<&Service>,
        delete: bool,
    ) -> Result<ServicePlan, ProviderError> {
        let Self { targets, provider, cfg, class, .. } = *self;
        let Some(shown) = manifest.or(live) else {
            return Err(ProviderError::Fatal("no Service to plan".to_owned()));
        };
        let service = key(shown);
        let managed = |svc: &Service| is_ours(svc, class) || has_finalizer(svc);
        let deleting = manifest.is_none() && live.is_some_and(|l| l.metadata.deletion_timestamp.is_some());
        if delete || deleting {
            return match live {
                Some(live) if managed(live) => {
                    let plan = provider.plan_delete(&identity(live, &cfg.cluster)).await?;
                    Ok(ServicePlan::new(service, live.uid(), Intent::Delete, plan, Vec::new()))
                }
                Some(live) => Ok(ignored(service, live.uid(), class)),
                None => Ok(ignored(service, None, class)),
            };
        }
        let mut notes = Vec::new();
        let wanted = match manifest {
            Some(m) => applied(m, live, cfg, &mut notes),
            None => shown.clone(),
        };
        if is_ours(&wanted, class) {
            let built =
                desired::build(&wanted, targets.clone(), cfg).and_then(|spec| provider.validate(&spec).map(|()| spec));
            let spec = match built {
                Ok(spec) => spec,
                Err(problems) => return Ok(invalid(service, wanted.uid(), problems)),
            };
            if let Err(conflict) = self.admit(&wanted, &spec) {
                let mut plan =
                    invalid(service, wanted.uid(), vec![InvalidField::new(conflict.setting, conflict.message)]);
                plan.summary = format!(
                    "refused from load-balancer group {} (clashes with {}); hawser makes no cloud change for it",
                    spec.group.as_deref().unwrap_or_default(),
                    conflict.with
                );
                return Ok(plan);
            }
            let mut plan = match provider.plan(&spec).await {
                Ok(plan) => plan,
                Err(ProviderError::InvalidInput(problems)) => return Ok(invalid(service, wanted.uid(), problems)),
                Err(e) => return Err(e),
            };
            // The groups it would leave, as the reconciler finds them: those its status names.
            if let Some(live) = live {
                let group = spec.group.as_ref().map(|g| format!("{}/{g}", spec.identity.namespace));
                for old in groups::named_in_status(live).iter().filter(|g| Some(*g) != group.as_ref()) {
                    let leaving = provider.plan_leave_group(&spec.identity, old).await?;
                    if !leaving.is_empty() {
                        notes.push(format!("the Service leaves load-balancer group {old}: its part there goes"));
                    }
                    plan.changes.extend(leaving.changes);
                    plan.conflicts.extend(leaving.conflicts);
                }
            }
            return Ok(ServicePlan::new(service, live.and_then(ResourceExt::uid), Intent::Ensure, plan, notes));
        }
        match live {
            Some(live) if managed(live) => {
                notes.push(format!("the Service stops being a LoadBalancer of class {class}: its load balancer goes"));
                let plan = provider.plan_delete(&identity(live, &cfg.cluster)).await?;
                Ok(ServicePlan::new(service, live.uid(), Intent::Delete, plan, notes))
            }
            _ => Ok(ignored(service, live.and_then(ResourceExt::uid), class)),
        }
    }

    /// Whether `svc` would be admitted to its load-balancer group, beside the other members
    /// among [`Planner::others`], as the controller decides it.
    fn admit(&self, svc: &Service, spec: &hawser_providers::LoadBalancerSpec) -> Result<(), GroupConflict> {
        let (Some(group), Some(limits)) = (spec.group.as_deref(), self.cfg.capabilities.groups) else { return Ok(()) };
        let namespace = &spec.identity.namespace;
        let specs: Vec<(&Service, hawser_providers::LoadBalancerSpec)> = self
            .others
            .iter()
            .filter(|o| {
                o.namespace().as_deref() == Some(namespace.as_str())
                    && o.name_any() != spec.identity.name
                    && o.metadata.deletion_timestamp.is_none()
                    && is_ours(o, self.class)
                    && group_of(o).as_deref() == Some(group)
            })
            .filter_map(|o| desired::build(o, self.targets.clone(), self.cfg).ok().map(|s| (o, s)))
            .collect();
        let mut members: Vec<Member<'_>> = specs.iter().map(|(service, spec)| Member { service, spec }).collect();
        members.push(Member { service: svc, spec });
        let key = format!("{namespace}/{group}");
        groups::admit(&spec.identity.uid, &key, &members, limits, self.provider.group_annotations())
    }
}

fn ignored(service: String, uid: Option<String>, class: &str) -> ServicePlan {
    let mut plan = ServicePlan::new(service, uid, Intent::Ignore, ChangePlan::default(), Vec::new());
    plan.summary = format!("not a LoadBalancer of class {class}; hawser makes no cloud change");
    plan
}

fn invalid(service: String, uid: Option<String>, problems: Vec<InvalidField>) -> ServicePlan {
    let mut plan = ServicePlan::new(service, uid, Intent::Invalid, ChangePlan::default(), Vec::new());
    plan.summary = "invalid configuration; hawser makes no cloud change until it is fixed".to_owned();
    plan.problems = problems;
    plan
}

/// Services read from a manifest: every `kind: Service` document, and the Services of a
/// `kind: List`. Anything else is named in the second list and skipped.
pub fn services_in(text: &str) -> anyhow::Result<(Vec<Service>, Vec<String>)> {
    use anyhow::Context as _;
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).context("the manifest is not valid YAML or JSON")?;
    let mut services = Vec::new();
    let mut skipped = Vec::new();
    let mut pending: Vec<serde_json::Value> = documents.into_iter().filter(|d| !d.is_null()).collect();
    pending.reverse();
    while let Some(doc) = pending.pop() {
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        let name = doc.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or("(unnamed)").to_owned();
        match kind.as_str() {
            "Service" => {
                let svc: Service = serde_json::from_value(doc)
                    .with_context(|| format!("Service {name} does not follow the core/v1 Service schema"))?;
                if svc.metadata.name.is_none() {
                    anyhow::bail!("a Service in the manifest has no metadata.name");
                }
                services.push(svc);
            }
            "List" | "ServiceList" => {
                let items = doc.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
                pending.extend(items.into_iter().rev());
            }
            "" => skipped.push(format!("a document without kind ({name})")),
            other => skipped.push(format!("{other} {name}")),
        }
    }
    Ok((services, skipped))
}

/// The last plan of each Service, kept by the controller under `--dry-run`.
#[derive(Debug, Default)]
pub struct PlanBook {
    entries: Mutex<BTreeMap<String, (u64, ServicePlan)>>,
}

impl PlanBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, ServicePlan)>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every Service's last plan, by `namespace/name`.
    pub fn snapshot(&self) -> Vec<ServicePlan> {
        self.lock().values().map(|(_, p)| p.clone()).collect()
    }

    /// The digest the last plan of `key` was made for.
    fn digest(&self, key: &str) -> Option<u64> {
        self.lock().get(key).map(|(d, _)| *d)
    }

    /// Keeps `plan`; says whether it differs from the one before.
    fn record(&self, key: String, digest: u64, plan: ServicePlan) -> bool {
        let mut entries = self.lock();
        let changed = entries.get(&key).is_none_or(|(_, p)| *p != plan);
        entries.insert(key, (digest, plan));
        changed
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// `(changes, Services with changes)` over every plan.
    fn totals(&self) -> (usize, usize) {
        let entries = self.lock();
        let changes = entries.values().map(|(_, p)| p.changes.len() + p.conflicts.len()).sum();
        let services = entries.values().filter(|(_, p)| p.has_changes()).count();
        (changes, services)
    }
}

/// A digest of what a plan of `svc` depends on, besides the cloud.
fn plan_digest(svc: &Service, ctx: &Context) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    let class = &ctx.settings.class;
    (is_ours(svc, class), has_finalizer(svc), svc.metadata.deletion_timestamp.is_some()).hash(&mut h);
    if is_ours(svc, class) {
        match desired::build(svc, ctx.targets.borrow().clone(), &ctx.settings.desired) {
            Ok(spec) => spec_digest(&spec).hash(&mut h),
            Err(problems) => problems.iter().map(ToString::to_string).collect::<Vec<_>>().hash(&mut h),
        }
    }
    h.finish()
}

/// The `--dry-run` reconcile: plans what the real one would change, logs it, publishes it as an
/// Event and keeps it for `/plans`, and writes nothing: no cloud change, no finalizer, no status.
pub async fn reconcile_dry(svc: Arc<Service>, ctx: Arc<Context>, book: &PlanBook) -> Result<Action, Error> {
    let key = key(&svc);
    let class = ctx.settings.class.clone();
    if !is_ours(&svc, &class) && !has_finalizer(&svc) {
        book.forget(&key);
        publish_totals(&ctx, book);
        return Ok(Action::await_change());
    }
    let digest = plan_digest(&svc, &ctx);
    if book.digest(&key) == Some(digest) {
        return Ok(Action::await_change());
    }
    let targets = ctx.targets.borrow().clone();
    // Only a member of a load-balancer group is planned against the other Services.
    let others: Vec<Service> = match (&ctx.services, group_of(&svc)) {
        (Some(store), Some(_)) => store.state().iter().map(|s| s.as_ref().clone()).collect(),
        _ => Vec::new(),
    };
    let planner = Planner {
        targets: &targets,
        provider: ctx.provider.as_ref(),
        cfg: &ctx.settings.desired,
        class: &class,
        others: &others,
    };
    let plan = planner.plan(None, Some(&svc), false).await.map_err(Error::Provider)?;
    if book.record(key.clone(), digest, plan.clone()) {
        let text = plan.text();
        info!(service = %key, summary = %plan.summary, plan = %text, "dry run: planned, not applied");
        if plan.has_changes() || plan.intent == Intent::Invalid {
            let (type_, reason) = match plan.intent {
                Intent::Invalid => (EventType::Warning, "InvalidConfiguration"),
                _ if plan.is_blocked() => (EventType::Warning, "DryRunBlocked"),
                _ => (EventType::Normal, "DryRunPlanned"),
            };
            let note = format!("Dry run, nothing changed: {}", text.trim_end());
            let event = Note { type_, reason, action: "Plan", note: &note };
            if let Err(e) = ctx.events.publish(&event, &svc.object_ref(&())).await {
                warn!(error = %e, "could not publish event");
            }
        }
    }
    publish_totals(&ctx, book);
    Ok(Action::await_change())
}

fn publish_totals(ctx: &Context, book: &PlanBook) {
    let (changes, services) = book.totals();
    ctx.metrics.dry_run_changes.set(i64::try_from(changes).unwrap_or(i64::MAX));
    ctx.metrics.dry_run_services.set(i64::try_from(services).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests;
