//! The node agent loop: reflectors for Services, EndpointSlices and the own Node feed
//! debounced syncs (model → render → one nft transaction → conntrack cleanup → health).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::conntrack::{ConntrackCommand, stale_udp_flows};
use crate::health::HealthState;
use crate::metrics::{Metrics, SyncKind};
use crate::model::{ClusterModel, ModelConfig, NodeModel, build_model, is_our_service};
use crate::nft::{Applier, NftCommand, NftError};
use crate::render::{RenderConfig, render_from};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Which Services we serve and which node we are.
    pub model: ModelConfig,
    /// Rendering settings.
    pub render: RenderConfig,
    /// A sync happens at least this often even without changes.
    pub resync_period: Duration,
    /// Syncs are at least this far apart (changes arriving meanwhile are batched).
    pub min_sync_interval: Duration,
    /// A full resync (tables replaced) happens at least this often, repairing drift made by
    /// others in our tables; `None`: only at start and after failures.
    pub full_resync_period: Option<Duration>,
    /// Upper bound of the exponential backoff after consecutive failed syncs.
    pub max_sync_backoff: Duration,
    /// Command line running nft.
    pub nft_argv: Vec<String>,
    /// Command line running conntrack.
    pub conntrack_argv: Vec<String>,
}

/// Failure of the agent as a whole.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A reflector ended before its first list.
    #[error("watch of {0} ended before the first list")]
    WatchEnded(&'static str),
    /// A blocking sync task panicked.
    #[error("sync task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
}

/// Wakes the sync loop and counts watch events, so that a resync can tell whether anything
/// happened since the last successful sync.
#[derive(Default)]
struct Changes {
    notify: Notify,
    events: AtomicU64,
}

fn watch<K>(api: Api<K>, config: watcher::Config, changed: Arc<Changes>) -> (Store<K>, impl Stream<Item = ()> + Send)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer).map(move |event| {
        match event {
            Ok(_) => {
                changed.events.fetch_add(1, Ordering::SeqCst);
                changed.notify.notify_one();
            }
            // Errors are retried by the backoff; the store keeps its last state.
            Err(e) => warn!(error = %e, "watch error"),
        }
    });
    (store, stream)
}

/// Runs until `shutdown` resolves. Rules are left in place on shutdown so that traffic keeps
/// flowing while the agent is upgraded.
pub async fn run(
    client: Client,
    config: AgentConfig,
    health: HealthState,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let changed = Arc::new(Changes::default());
    let node_selector = format!("metadata.name={}", config.model.node_name);
    let (services, s1) = watch(Api::<Service>::all(client.clone()), watcher::Config::default(), changed.clone());
    let (slices, s2) = watch(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), changed.clone());
    let (node, s3) =
        watch(Api::<Node>::all(client), watcher::Config::default().fields(&node_selector), changed.clone());
    let stores = Stores { services, slices, node };
    let watches = tokio::spawn(stream::select(stream::select(s1, s2), s3).for_each(|()| async {}));

    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = sync_loop(&stores, &config, &health, &metrics, &changed) => r,
        () = &mut shutdown => {
            info!("shutting down; nftables rules stay in place");
            Ok(())
        }
    };
    watches.abort();
    result
}

async fn sync_loop(
    stores: &Stores,
    config: &AgentConfig,
    health: &HealthState,
    metrics: &Metrics,
    changed: &Changes,
) -> Result<(), AgentError> {
    for (name, ready) in [
        ("services", stores.services.wait_until_ready().await),
        ("endpointslices", stores.slices.wait_until_ready().await),
        ("node", stores.node.wait_until_ready().await),
    ] {
        ready.map_err(|_| AgentError::WatchEnded(name))?;
    }
    info!("initial lists done; starting full sync");
    let mut applier = Applier::new(NftCommand::with_argv(config.nft_argv.clone()));
    let conntrack = ConntrackCommand::with_argv(config.conntrack_argv.clone());
    let mut last_model = ClusterModel::default();
    let mut last_sync = Instant::now() - config.min_sync_interval;
    let mut last_full = Instant::now();
    let mut failures = 0u32;
    // Watch events counted when the last successful sync read the stores.
    let mut synced_events: Option<u64> = None;
    loop {
        let wait = config.min_sync_interval.saturating_sub(last_sync.elapsed());
        tokio::time::sleep(wait).await;
        last_sync = Instant::now();
        if config.full_resync_period.is_some_and(|period| last_full.elapsed() >= period) {
            debug!("periodic full resync");
            applier.force_full_resync();
        }

        let node = stores.node.state().into_iter().next();
        health.record_node(NodeModel::from_node(&config.model.node_name, node.as_deref()));
        let events = changed.events.load(Ordering::SeqCst);
        metrics
            .sync_pending_changes
            .set(events.saturating_sub(synced_events.unwrap_or(0)).try_into().unwrap_or(i64::MAX));
        if synced_events == Some(events) && applier.applied().is_some() {
            // Nothing happened since the last successful sync: the kernel already has it.
            health.record_idle_sync(Instant::now());
            metrics.last_sync_timestamp.set(unix_now());
            wait_for_change(changed, config.resync_period).await;
            continue;
        }
        let started = Instant::now();
        let services: Vec<Arc<Service>> = stores
            .services
            .state()
            .into_iter()
            .filter(|s| is_our_service(s, &config.model.load_balancer_class))
            .collect();
        let slices = stores.slices.state();
        let model = build_model(services.iter().map(|s| s.as_ref()), slices.iter().map(|s| s.as_ref()), &config.model);
        for w in &model.warnings {
            warn!(service = %w.service, "{}", w.message);
        }
        let ruleset = render_from(&model, &config.render, applier.applied());
        let (elements, rules) = (ruleset.element_count(), ruleset.rule_count());
        let full = applier.applied().is_none();
        let (back, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = applier.sync(ruleset);
            (applier, outcome)
        })
        .await?;
        applier = back;
        metrics.sync_duration.get_or_create(&SyncKind::of(full)).observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(report) => {
                failures = 0;
                synced_events = Some(events);
                metrics
                    .sync_pending_changes
                    .set(changed.events.load(Ordering::SeqCst).saturating_sub(events).try_into().unwrap_or(i64::MAX));
                metrics.last_sync_timestamp.set(unix_now());
                if report.full {
                    metrics.full_syncs.inc();
                    last_full = Instant::now();
                }
                debug!(?report, "synced");
                clean_conntrack(&conntrack, &last_model, &model).await?;
                health.record_sync(&model, Instant::now());
                metrics.services.set(to_i64(model.services.len()));
                metrics
                    .endpoints
                    .set(to_i64(model.services.values().flat_map(|s| s.ports.iter()).map(|p| p.endpoints.len()).sum()));
                metrics.nft_elements.set(to_i64(elements));
                metrics.nft_rules.set(to_i64(rules));
                last_model = model;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(config.min_sync_interval, failures, config.max_sync_backoff);
                log_failure(metrics, &e, delay);
                // Retry without waiting for a change, backing off while failures repeat.
                tokio::time::sleep(delay.saturating_sub(config.min_sync_interval)).await;
                continue;
            }
        }
        wait_for_change(changed, config.resync_period).await;
    }
}

async fn wait_for_change(changed: &Changes, resync_period: Duration) {
    tokio::select! {
        () = changed.notify.notified() => {}
        () = tokio::time::sleep(resync_period) => {}
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn log_failure(metrics: &Metrics, e: &NftError, retry_in: Duration) {
    metrics.sync_failures.inc();
    warn!(error = %e, ?retry_in, "sync failed; next sync is a full resync");
}

/// Time from a failed sync to the next attempt after `failures` consecutive failures:
/// `base`, doubling with each further failure, at most `max` (but never below `base`).
pub fn retry_delay(base: Duration, failures: u32, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(max.max(base))
}

async fn clean_conntrack(
    conntrack: &ConntrackCommand,
    before: &ClusterModel,
    after: &ClusterModel,
) -> Result<(), AgentError> {
    let flows = stale_udp_flows(before, after);
    if flows.is_empty() {
        return Ok(());
    }
    let conntrack = conntrack.clone();
    tokio::task::spawn_blocking(move || {
        for flow in flows {
            if let Err(e) = conntrack.delete(&flow) {
                warn!(error = %e, ?flow, "conntrack cleanup failed");
            }
        }
    })
    .await?;
    Ok(())
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
