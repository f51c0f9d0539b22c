//! The node agent loop: watches of Services, EndpointSlices and the own Node feed the
//! projected inputs, which mark the Services they change; debounced syncs program only those
//! (model → render → diff → one nft transaction → conntrack cleanup → health).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::conntrack::ConntrackCommand;
use crate::health::HealthState;
use crate::inputs::ClusterInputs;
use crate::metrics::{Metrics, SyncKind, WriterLabel};
use crate::model::{ModelConfig, NodeModel};
use crate::netlink::Netlink;
use crate::nft::{NftCommand, NftError};
use crate::render::RenderConfig;
use crate::sync::Syncer;

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
    /// Whether syncs go over a netlink socket of the agent's network namespace where they can.
    pub netlink: bool,
    /// Command line running conntrack.
    pub conntrack_argv: Vec<String>,
}

/// Failure of the agent as a whole.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A watch ended before its first list.
    #[error("watch of {0} ended before the first list")]
    WatchEnded(&'static str),
    /// A blocking sync task panicked.
    #[error("sync task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the watches share with the sync loop.
struct Shared {
    inputs: Mutex<ClusterInputs>,
    /// Wakes the sync loop after an event.
    changed: Notify,
    /// Watches whose first list is complete, by name.
    listed: Mutex<HashMap<&'static str, bool>>,
    first_lists: Notify,
}

impl Shared {
    fn inputs(&self) -> MutexGuard<'_, ClusterInputs> {
        // Each event is applied whole under the lock; a panic cannot leave half of one.
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listed(&self, name: &'static str) {
        self.listed.lock().unwrap_or_else(|p| p.into_inner()).insert(name, true);
        self.first_lists.notify_waiters();
    }

    fn all_listed(&self) -> bool {
        self.listed.lock().unwrap_or_else(|p| p.into_inner()).len() == 3
    }
}

/// A watch whose events go to `on`; errors are retried with backoff.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    shared: Arc<Shared>,
    mut on: impl FnMut(&Shared, Event<K>) + Send + 'static,
) -> impl Stream<Item = ()> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, config).default_backoff().map(move |event| match event {
        Ok(event) => {
            on(&shared, event);
            shared.changed.notify_one();
        }
        // The backoff retries; the inputs keep their last state.
        Err(e) => warn!(error = %e, "watch error"),
    })
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
    let shared = Arc::new(Shared {
        inputs: Mutex::new(ClusterInputs::default()),
        changed: Notify::new(),
        listed: Mutex::new(HashMap::new()),
        first_lists: Notify::new(),
    });
    let class = config.model.load_balancer_class.clone();
    let services =
        watch(Api::<Service>::all(client.clone()), watcher::Config::default(), shared.clone(), move |s, e| match e {
            Event::Init => s.inputs().begin_service_relist(),
            Event::InitApply(svc) | Event::Apply(svc) => s.inputs().apply_service(&svc, &class),
            Event::Delete(svc) => s.inputs().delete_service(&svc),
            Event::InitDone => {
                s.inputs().end_service_relist();
                s.listed("services");
            }
        });
    let slices =
        watch(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), shared.clone(), |s, e| match e {
            Event::Init => s.inputs().begin_slice_relist(),
            Event::InitApply(slice) | Event::Apply(slice) => s.inputs().apply_slice(&slice),
            Event::Delete(slice) => s.inputs().delete_slice(&slice),
            Event::InitDone => {
                s.inputs().end_slice_relist();
                s.listed("endpointslices");
            }
        });
    // The own Node only decides health answers; no rule depends on it.
    let node_name = config.model.node_name.clone();
    let node_health = health.clone();
    let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let node = watch(Api::<Node>::all(client), node_config, shared.clone(), move |s, e| match e {
        Event::InitApply(node) | Event::Apply(node) => {
            node_health.record_node(NodeModel::from_node(&node_name, Some(&node)))
        }
        Event::Delete(_) => node_health.record_node(NodeModel::from_node(&node_name, None)),
        Event::Init => {}
        Event::InitDone => s.listed("node"),
    });
    let watches = tokio::spawn(stream::select(stream::select(services, slices), node).for_each(|()| async {}));

    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = sync_loop(&shared, &config, &health, &metrics) => r,
        () = &mut shutdown => {
            info!("shutting down; nftables rules stay in place");
            Ok(())
        }
    };
    watches.abort();
    result
}

async fn sync_loop(
    shared: &Shared,
    config: &AgentConfig,
    health: &HealthState,
    metrics: &Metrics,
) -> Result<(), AgentError> {
    let mut nft = NftCommand::with_argv(config.nft_argv.clone());
    if config.netlink {
        match Netlink::open() {
            Ok(socket) => nft = nft.with_netlink(socket),
            Err(e) => warn!(error = %e, "cannot open a netlink socket; every sync runs nft"),
        }
    }
    let mut syncer = Syncer::new(nft, config.render);
    // Into a node without our tables, the frame the first sync fills goes in while the
    // initial lists load.
    let preparing = tokio::task::spawn_blocking(move || {
        match syncer.prepare() {
            Ok(true) => debug!("wrote the tables' frame while the initial lists load"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot write the tables' frame ahead; the first sync writes it"),
        }
        syncer
    });
    while !shared.all_listed() {
        let listed = shared.first_lists.notified();
        if shared.all_listed() {
            break;
        }
        listed.await;
    }
    let mut syncer = preparing.await?;
    info!(services = shared.inputs().services(), "initial lists done; starting full sync");
    let conntrack = ConntrackCommand::with_argv(config.conntrack_argv.clone());
    let mut last_sync = Instant::now() - config.min_sync_interval;
    let mut last_full = Instant::now();
    let mut failures = 0u32;
    loop {
        // The interval is between syncs that write: a wake-up that finds nothing to do (a
        // Node heartbeat, an event that changes no field we use) does not delay the next.
        let wait = config.min_sync_interval.saturating_sub(last_sync.elapsed());
        tokio::time::sleep(wait).await;
        if config.full_resync_period.is_some_and(|period| last_full.elapsed() >= period) {
            debug!("periodic full resync");
            syncer.force_full_resync();
        }
        let pending = shared.inputs().pending();
        metrics.sync_pending_changes.set(to_i64(pending));
        if pending == 0 && !syncer.has_work() {
            // Nothing happened since the last successful sync: the kernel already has it.
            health.record_idle_sync(Instant::now());
            metrics.last_sync_timestamp.set(unix_now());
            wait_for_change(shared, config.resync_period).await;
            continue;
        }

        let started = Instant::now();
        last_sync = started;
        // A full resync lists the kernel's tables while the models are built.
        syncer.prefetch();
        let mut warnings = Vec::new();
        let changes = shared.inputs().take_changes(&config.model, &mut warnings);
        for w in &warnings {
            warn!(service = %w.service, "{}", w.message);
        }
        let full = syncer.full_next();
        let sync_health = health.clone();
        let (back, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = syncer.sync(changes, &sync_health);
            (syncer, outcome)
        })
        .await?;
        syncer = back;
        metrics.sync_duration.get_or_create(&SyncKind::of(full)).observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(report) => {
                failures = 0;
                if report.full {
                    metrics.full_syncs.inc();
                    last_full = Instant::now();
                }
                debug!(?report, "synced");
                if let Some(why) = &report.replaced {
                    metrics.tables_replaced.inc();
                    info!(reason = %why, "replaced the tables instead of adopting them");
                }
                if report.applied {
                    metrics.kernel_writes.get_or_create(&WriterLabel { writer: report.writer.as_str() }).inc();
                }
                metrics.affinity_entries_purged.inc_by(report.affinity_purged as u64);
                metrics.sync_pending_changes.set(to_i64(shared.inputs().pending()));
                metrics.last_sync_timestamp.set(unix_now());
                clean_conntrack(&conntrack, syncer.take_stale_flows()).await?;
                let (rules, elements, endpoints) = syncer.counts();
                metrics.services.set(to_i64(syncer.models().len()));
                metrics.endpoints.set(to_i64(endpoints));
                metrics.nft_elements.set(to_i64(elements));
                metrics.nft_rules.set(to_i64(rules));
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
        wait_for_change(shared, config.resync_period).await;
    }
}

async fn wait_for_change(shared: &Shared, resync_period: Duration) {
    tokio::select! {
        () = shared.changed.notified() => {}
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
    flows: Vec<crate::conntrack::StaleFlow>,
) -> Result<(), AgentError> {
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
