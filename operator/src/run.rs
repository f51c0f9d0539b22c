//! Wiring: clients, caches, the controller, leader election, HTTP and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{FutureExt, StreamExt};
use hawser_providers::Provider;
use hawser_providers::{Target, Targets};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Config as WatcherConfig, watcher};
use kube::runtime::{Controller, WatchStreamExt, controller};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::audit;
use crate::config::{Cli, OutputFormat, PlanOutput, ProviderKind};
use crate::desired::DesiredConfig;
use crate::drift;
use crate::events::EventPublisher;
use crate::gc::{self, GcSettings};
use crate::http::{self, HttpState, MockViews};
use crate::leader::LeaderElector;
use crate::metered::{MeteredProvider, ThrottleGate};
use crate::metrics::Metrics;
use crate::names::CONTROLLER_NAME;
use crate::nodes::{NodePolicy, TargetSet, eligibility};
use crate::plan;
use crate::plan::{PlanBook, ServicePlan};
use crate::reconcile::{self, Context, Settings};
use crate::retry::RetryPolicy;

/// The Kubernetes client of KUBECONFIG or the in-cluster service account, naming itself
/// `hawser-operator/VERSION` in every request's User-Agent, as kubectl and controllers do, so an
/// API server's audit log tells its requests apart.
pub async fn kube_client() -> anyhow::Result<Client> {
    let config = kube::Config::infer().await.context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    let agent = axum::http::HeaderValue::from_static(concat!("hawser-operator/", env!("CARGO_PKG_VERSION")));
    let layer = tower::util::MapRequestLayer::new(move |mut request: axum::http::Request<kube::client::Body>| {
        request.headers_mut().insert(axum::http::header::USER_AGENT, agent.clone());
        request
    });
    let builder = kube::client::ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    Ok(builder.with_layer(&layer).build())
}

async fn build_provider(cli: &Cli) -> anyhow::Result<(Arc<dyn Provider>, Option<MockViews>)> {
    match cli.provider {
        #[cfg(feature = "mock")]
        ProviderKind::Mock => {
            let config = hawser_providers::mock::MockConfig {
                cluster: cli.cluster_name.clone(),
                address_pools: cli.mock_address_pool.0.clone(),
                latency: cli.mock_latency,
                rate_limit: cli.mock_rate_limit,
                error_rate: cli.mock_error_rate,
                seed: cli.mock_seed,
                state_file: cli.mock_state_file.clone(),
            };
            let cloud =
                hawser_providers::mock::MockCloud::new(config).map_err(anyhow::Error::msg).context("mock cloud")?;
            let (full, counts) = (cloud.clone(), cloud.clone());
            let views = MockViews {
                state: Arc::new(move || serde_json::to_value(full.snapshot()).unwrap_or_default()),
                summary: Arc::new(move || serde_json::to_value(counts.summary()).unwrap_or_default()),
            };
            Ok((Arc::new(cloud), Some(views)))
        }
        #[cfg(not(feature = "mock"))]
        ProviderKind::Mock => bail!("this hawser-operator was built without the mock provider (cargo feature `mock`)"),
        #[cfg(feature = "aws")]
        ProviderKind::Aws => {
            let mut config = hawser_providers::aws::AwsConfig::new(cli.cluster_name.clone());
            config.region = cli.aws_region.clone();
            config.vpc_id = cli.aws_vpc_id.clone();
            config.endpoint_url = cli.aws_endpoint_url.clone();
            let cloud = hawser_providers::aws::AwsProvider::new(config).await.context("AWS provider")?;
            Ok((Arc::new(cloud), None))
        }
        #[cfg(not(feature = "aws"))]
        ProviderKind::Aws => bail!("this hawser-operator was built without the AWS provider (cargo feature `aws`)"),
        #[cfg(feature = "gcp")]
        ProviderKind::Gcp => {
            let required =
                |v: &Option<String>, flag: &str| v.clone().with_context(|| format!("--provider gcp needs {flag}"));
            let mut config = hawser_providers::gcp::GcpConfig::new(
                cli.cluster_name.clone(),
                required(&cli.gcp_project, "--gcp-project")?,
                required(&cli.gcp_region, "--gcp-region")?,
                required(&cli.gcp_network, "--gcp-network")?,
            );
            config.subnetwork = cli.gcp_subnetwork.clone();
            config.node_tags = cli.gcp_node_tags.iter().filter(|t| !t.is_empty()).cloned().collect();
            config.node_service_account = cli.gcp_node_service_account.clone();
            config.endpoint_url = cli.gcp_endpoint_url.clone();
            config.anonymous_credentials = cli.gcp_anonymous_credentials;
            config.poll_interval = cli.gcp_operation_poll_interval;
            config.poll_max_interval = config.poll_max_interval.max(config.poll_interval);
            let cloud = hawser_providers::gcp::GcpProvider::new(config).await.context("GCP provider")?;
            Ok((Arc::new(cloud), None))
        }
        #[cfg(not(feature = "gcp"))]
        ProviderKind::Gcp => bail!("this hawser-operator was built without the GCP provider (cargo feature `gcp`)"),
    }
}

/// Runs the operator until SIGTERM/Ctrl-C, or until leadership is lost.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (inner, mock) = build_provider(&cli).await?;
    let provider: Arc<dyn Provider> =
        Arc::new(MeteredProvider::new(inner, metrics.clone(), Arc::new(ThrottleGate::default())));
    let client = kube_client().await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received");
        let _ = stop_tx.send(true);
    });

    let ready = Arc::new(AtomicBool::new(false));
    let book = cli.dry_run.then(|| Arc::new(PlanBook::default()));
    let plans: Option<http::JsonView> = book.clone().map(|b| {
        let view: http::JsonView = Arc::new(move || serde_json::to_value(b.snapshot()).unwrap_or_default());
        view
    });
    let state = HttpState { metrics: metrics.clone(), ready: ready.clone(), mock, plans };
    let probes = http::serve(cli.health_probe_bind_address, http::probes(state.clone()), stopped())
        .await
        .with_context(|| format!("cannot listen on --health-probe-bind-address {}", cli.health_probe_bind_address))?;
    let metrics_server = http::serve(cli.metrics_bind_address, http::metrics(state), stopped())
        .await
        .with_context(|| format!("cannot listen on --metrics-bind-address {}", cli.metrics_bind_address))?;

    let mut elector = None;
    if cli.leader_elect {
        let namespace = cli
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".to_owned());
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("hawser-operator-{}", std::process::id()));
        let mut e = LeaderElector::new(
            client.clone(),
            &namespace,
            &cli.leader_election_id,
            &identity,
            cli.leader_election_lease_duration,
        );
        // A standby is ready: it serves its purpose by standing by.
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            () = e.acquire() => {}
            () = stopped() => {
                info!("stopped before becoming leader");
                return Ok(());
            }
        }
        ready.store(false, Ordering::Relaxed);
        elector = Some(e);
    }
    metrics.leader.set(1);

    let (lost_tx, lost_rx) = watch::channel(false);
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let hold = elector.map(|mut e| {
        tokio::spawn(async move {
            tokio::select! {
                () = e.hold() => {
                    let _ = lost_tx.send(true);
                }
                // Shutting down while leading: hand the Lease back for a fast takeover.
                _ = release_rx => e.release().await,
            }
        })
    });
    let lost = {
        let mut rx = lost_rx.clone();
        async move {
            // Without leader election the sender is gone at once: that is not a loss.
            if rx.wait_for(|l| *l).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };

    if book.is_some() {
        warn!("dry run: planning only; no cloud change, no finalizer and no status will be written");
    }
    let result = run_controller(&cli, client, provider, metrics.clone(), ready.clone(), book, async move {
        tokio::select! {
            () = stopped() => {}
            () = lost => warn!("leadership lost; stopping reconciles"),
        }
    })
    .await;

    if *lost_rx.borrow() {
        bail!("leadership lost; exiting so that only one replica reconciles");
    }
    if let Some(hold) = hold {
        let _ = release_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), hold).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = probes.await;
        let _ = metrics_server.await;
    })
    .await;
    result
}

async fn run_controller(
    cli: &Cli,
    client: Client,
    provider: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    dry_run: Option<Arc<PlanBook>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let node_policy = NodePolicy { include_control_plane: cli.include_control_plane_nodes };
    let (targets_tx, targets) = watch::channel(Targets::default());
    let (synced_tx, mut synced) = watch::channel(false);
    let (trigger_tx, trigger_rx) = mpsc::channel::<()>(1);
    let node_task = tokio::spawn(watch_eligible_nodes(
        Api::all(client.clone()),
        node_policy,
        cli.node_debounce,
        NodeOutputs { targets: targets_tx, synced: synced_tx, trigger: trigger_tx },
    ));
    // Services reconciled before the Nodes are known would get load balancers without targets.
    info!("waiting for the Node list");
    let shutdown = shutdown.shared();
    tokio::select! {
        result = synced.wait_for(|s| *s) => if result.is_err() {
            bail!("the Node watch stopped before its first list");
        },
        () = shutdown.clone() => {
            node_task.abort();
            return Ok(());
        }
    }

    let settings = Settings {
        class: cli.load_balancer_class.clone(),
        desired: desired_config(cli, provider.as_ref()),
        node_policy,
        resync_period: cli.resync_period,
    };
    let events = EventPublisher::new(client.clone(), CONTROLLER_NAME, std::env::var("POD_NAME").ok());
    let retry = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(300), cli.resync_period, None);
    let (store, writer) = reflector::store::<Service>();
    let (drift_tx, drift_rx) = mpsc::channel::<ObjectRef<Service>>(1024);
    let mut ctx = Context::new(client.clone(), provider, targets, settings, events, metrics, retry);
    let dry = dry_run.is_some();
    ctx.dry_run = dry_run;
    ctx.services = Some(store.clone());
    ctx.wake = Some(drift_tx.clone());
    let ctx = Arc::new(ctx);

    let services = watcher(Api::<Service>::all(client), WatcherConfig::default().any_semantic())
        .default_backoff()
        .modify(slim_service)
        .reflect(writer)
        .applied_objects();
    // A dry run ensures nothing, so there is nothing to drift from.
    let drift_task = tokio::spawn(if dry {
        futures::future::pending().boxed()
    } else {
        drift::run(ctx.clone(), cli.resync_period, drift_tx).boxed()
    });
    let gc_settings = GcSettings {
        // A dry run deletes nothing: orphans are reported.
        mode: if dry && cli.gc == gc::GcMode::On { gc::GcMode::Report } else { cli.gc },
        interval: cli.gc_interval,
        grace: cli.gc_grace_period,
        class: cli.load_balancer_class.clone(),
    };
    let gc_task = tokio::spawn(gc::run(
        ctx.provider.clone(),
        store.clone(),
        gc_settings,
        ctx.metrics.clone(),
        ctx.owners.clone(),
        ctx.groups.clone(),
    ));
    let controller = Controller::for_stream(services, store.clone())
        .with_config(controller::Config::default().concurrency(cli.concurrency).debounce(Duration::from_millis(100)));
    tokio::spawn(mark_ready(store, ready));
    let trigger = futures::stream::unfold(trigger_rx, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });
    let drifted = futures::stream::unfold(drift_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });

    info!(class = %cli.load_balancer_class, provider = ?cli.provider, cluster = %cli.cluster_name, "starting controller");
    controller
        .reconcile_all_on(trigger)
        .reconcile_on(drifted)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                match e {
                    controller::Error::ReconcilerFailed(..) => {} // logged by the error policy
                    other => warn!(error = %other, "controller"),
                }
            }
        })
        .await;
    drift_task.abort();
    gc_task.abort();
    node_task.abort();
    info!("controller stopped");
    Ok(())
}

/// What the desired-state builder needs from the flags and the provider.
fn desired_config(cli: &Cli, provider: &dyn Provider) -> DesiredConfig {
    DesiredConfig {
        cluster: cli.cluster_name.clone(),
        health_check_mode: cli.health_check_mode,
        node_health_port: cli.node_health_port,
        provider_name: provider.name(),
        provider_annotations: provider.annotations(),
        capabilities: provider.capabilities(),
    }
}

/// `hawser-operator audit`: prints the rows; true when one needs attention.
pub async fn audit(cli: Cli, output: OutputFormat) -> anyhow::Result<bool> {
    let (provider, _) = build_provider(&cli).await?;
    let client = kube_client().await?;
    let policy = NodePolicy { include_control_plane: cli.include_control_plane_nodes };
    let services = Api::<Service>::all(client.clone()).list(&Default::default()).await.context("listing Services")?;
    let nodes = Api::<Node>::all(client).list(&Default::default()).await.context("listing Nodes")?;
    let mut targets = TargetSet::new(policy);
    targets.replace(nodes.items.iter().filter_map(|n| eligibility(n, policy).ok()));
    let inventory = provider.list_owned().await.context("listing the load balancers in the cloud")?;
    let cfg = desired_config(&cli, provider.as_ref());
    let rows = audit::audit(
        &services.items,
        &targets.targets(),
        &inventory,
        provider.as_ref(),
        &cfg,
        &cli.load_balancer_class,
    )
    .await
    .context("planning the Services the inventory cannot vouch for")?;
    match output {
        OutputFormat::Table => print!("{}", audit::table(&rows)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows).context("encoding the rows")?),
    }
    Ok(rows.iter().any(|r| r.verdict.is_problem()))
}

/// What `hawser-operator plan` is asked.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// A manifest (`-`: stdin).
    pub file: Option<std::path::PathBuf>,
    /// Existing Services, `namespace/name` or `name`.
    pub services: Vec<String>,
    /// The namespace of those that name none.
    pub namespace: String,
    /// Plan their deletion.
    pub delete: bool,
    /// Text or JSON.
    pub output: PlanOutput,
}

/// `hawser-operator plan`: prints the plans; true when a Service is invalid or blocked.
pub async fn plan(cli: Cli, request: PlanRequest) -> anyhow::Result<bool> {
    let manifests = match &request.file {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the manifest from stdin")?;
                text
            } else {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
            };
            let (services, skipped) = plan::services_in(&text)?;
            for what in skipped {
                eprintln!("skipped {what}: not a Service");
            }
            if services.is_empty() {
                bail!("the manifest has no Service");
            }
            Some(services)
        }
        None => None,
    };
    let (provider, _) = build_provider(&cli).await?;
    let client = kube_client().await?;
    let policy = NodePolicy { include_control_plane: cli.include_control_plane_nodes };
    let nodes = Api::<Node>::all(client.clone()).list(&Default::default()).await.context("listing Nodes")?;
    let mut targets = TargetSet::new(policy);
    targets.replace(nodes.items.iter().filter_map(|n| eligibility(n, policy).ok()));
    let targets = targets.targets();
    let cfg = desired_config(&cli, provider.as_ref());
    let class = &cli.load_balancer_class;
    let mut wanted: Vec<(Option<Service>, String, String)> = Vec::new();
    match manifests {
        Some(services) => {
            for svc in services {
                let namespace = svc.namespace().unwrap_or_else(|| request.namespace.clone());
                let name = svc.name_any();
                wanted.push((Some(svc), namespace, name));
            }
        }
        None => {
            for s in &request.services {
                let (namespace, name) = s.split_once('/').unwrap_or((request.namespace.as_str(), s.as_str()));
                if namespace.is_empty() || name.is_empty() || name.contains('/') {
                    bail!("{s:?} is not a Service; give namespace/name or name");
                }
                wanted.push((None, namespace.to_owned(), name.to_owned()));
            }
        }
    }
    // The Services as they would be after the manifest is applied, for load-balancer groups.
    let mut others: Vec<Service> =
        Api::<Service>::all(client.clone()).list(&Default::default()).await.context("listing Services")?.items;
    for (manifest, namespace, name) in &wanted {
        let Some(manifest) = manifest else { continue };
        let mut applied = manifest.clone();
        applied.metadata.namespace = Some(namespace.clone());
        let same = |s: &Service| s.namespace().as_deref() == Some(namespace.as_str()) && s.name_any() == *name;
        applied.metadata.uid = match others.iter().position(same) {
            Some(i) => others.remove(i).metadata.uid,
            None => Some(format!("new:{namespace}/{name}")),
        };
        others.push(applied);
    }
    let planner = plan::Planner { targets: &targets, provider: provider.as_ref(), cfg: &cfg, class, others: &others };
    let mut plans: Vec<ServicePlan> = Vec::new();
    for (manifest, namespace, name) in wanted {
        let live = Api::<Service>::namespaced(client.clone(), &namespace)
            .get_opt(&name)
            .await
            .with_context(|| format!("reading Service {namespace}/{name}"))?;
        if manifest.is_none() && live.is_none() {
            bail!("Service {namespace}/{name} does not exist; to plan a new one, give its manifest with -f");
        }
        let manifest = manifest.map(|mut m| {
            m.metadata.namespace = Some(namespace.clone());
            m
        });
        let planned = planner
            .plan(manifest.as_ref(), live.as_ref(), request.delete)
            .await
            .with_context(|| format!("planning Service {namespace}/{name}"))?;
        plans.push(planned);
    }
    match request.output {
        PlanOutput::Text => {
            for p in &plans {
                print!("{}", p.text());
            }
        }
        PlanOutput::Json => println!("{}", serde_json::to_string_pretty(&plans).context("encoding the plans")?),
    }
    Ok(plans.iter().any(ServicePlan::is_blocked))
}

/// Keeps in the cache only what reconciles read: the managed fields and the last-applied
/// configuration are often larger than the rest of a Service put together.
fn slim_service(svc: &mut Service) {
    svc.metadata.managed_fields = None;
    if let Some(annotations) = svc.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

async fn mark_ready(services: Store<Service>, ready: Arc<AtomicBool>) {
    // Polled rather than awaited: a waiter parked on the store before its first list completes
    // is not reliably woken (seen with kube-runtime 5), while a fresh poll always sees its state.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if matches!(services.wait_until_ready().now_or_never(), Some(Ok(()))) {
            info!("caches synced");
            ready.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// Where the node watch reports.
struct NodeOutputs {
    /// The eligible Nodes, whenever they change.
    targets: watch::Sender<Targets>,
    /// True once the first complete list is in.
    synced: watch::Sender<bool>,
    /// Wakes every Service after a change (debounced).
    trigger: mpsc::Sender<()>,
}

/// Follows the Nodes and publishes the eligible set whenever it changes, waking every Service
/// when it does. No Node is cached: each event updates one Node's target, and only a change of
/// membership or of a target (address, zone, provider ID) counts. Readiness and heartbeats
/// change nothing (see `nodes`), and bursts (a node pool scaling) are collected for `debounce`
/// so each Service is reconciled once, not once per Node.
async fn watch_eligible_nodes(api: Api<Node>, policy: NodePolicy, debounce: Duration, out: NodeOutputs) {
    let mut set = TargetSet::new(policy);
    let mut relist: Option<Vec<Target>> = None;
    let mut synced = false;
    let mut pending_since: Option<tokio::time::Instant> = None;
    let events = watcher(api, WatcherConfig::default()).default_backoff();
    futures::pin_mut!(events);
    loop {
        let timeout = pending_since.map_or(Duration::from_secs(3600), |since| debounce.saturating_sub(since.elapsed()));
        tokio::select! {
            event = events.next() => {
                let changed = match event {
                    Some(Ok(watcher::Event::Init)) => {
                        relist = Some(Vec::new());
                        false
                    }
                    Some(Ok(watcher::Event::InitApply(node))) => {
                        if let (Some(list), Ok(target)) = (relist.as_mut(), eligibility(&node, policy)) {
                            list.push(target);
                        }
                        false
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let changed = set.replace(relist.take().unwrap_or_default());
                        if !synced {
                            // The first complete list is no change: Services are reconciled on start.
                            synced = true;
                            out.targets.send_replace(set.targets());
                            out.synced.send_replace(true);
                            continue;
                        }
                        changed
                    }
                    Some(Ok(watcher::Event::Apply(node))) => set.apply(&node),
                    Some(Ok(watcher::Event::Delete(node))) => set.delete(&node.name_any()),
                    Some(Err(e)) => {
                        warn!(error = %e, "node watch");
                        false
                    }
                    None => return,
                };
                if changed && synced {
                    out.targets.send_replace(set.targets());
                    pending_since.get_or_insert_with(tokio::time::Instant::now);
                }
            },
            () = tokio::time::sleep(timeout), if pending_since.is_some() => {
                pending_since = None;
                info!(eligible = set.targets().len(), "eligible nodes changed; re-reconciling Services");
                if out.trigger.send(()).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
