//! Prometheus metrics of the agent (`hawser_dataplane_…`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of `sync_duration_seconds`: `full` replaces the tables, `partial` changes what changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SyncKind {
    /// `full` or `partial`.
    pub kind: &'static str,
}

impl SyncKind {
    /// The label for a full (`true`) or partial sync.
    pub fn of(full: bool) -> Self {
        Self { kind: if full { "full" } else { "partial" } }
    }
}

/// Label of `kernel_writes`: what wrote a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WriterLabel {
    /// `nft`, `netlink` or `nft+netlink` (see [`crate::nft::Writer`]).
    pub writer: &'static str,
}

/// The agent's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Duration of a whole sync, from the model update to the kernel's acknowledgement, seconds.
    pub sync_duration: Family<SyncKind, Histogram>,
    /// Watch events (changed Services) not yet in the kernel.
    pub sync_pending_changes: Gauge,
    /// Unix time of the last successful sync, seconds.
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Syncs that failed.
    pub sync_failures: Counter,
    /// Full resyncs done.
    pub full_syncs: Counter,
    /// Full resyncs that replaced existing tables rather than adopting them.
    pub tables_replaced: Counter,
    /// Transactions written to the kernel, by writer.
    pub kernel_writes: Family<WriterLabel, Counter>,
    /// Services programmed.
    pub services: Gauge,
    /// Endpoints (Service port × endpoint) programmed.
    pub endpoints: Gauge,
    /// nftables map/set elements programmed.
    pub nft_elements: Gauge,
    /// nftables rules programmed.
    pub nft_rules: Gauge,
    /// ClientIP affinity entries deleted because a sync made them invalid.
    pub affinity_entries_purged: Counter,
}

impl Metrics {
    /// Registers all metrics under the `hawser_dataplane` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hawser_dataplane");
        let sync_duration = Family::<SyncKind, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let sync_pending_changes = Gauge::default();
        let last_sync_timestamp = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let sync_failures = Counter::default();
        let full_syncs = Counter::default();
        let tables_replaced = Counter::default();
        let kernel_writes = Family::<WriterLabel, Counter>::default();
        let services = Gauge::default();
        let endpoints = Gauge::default();
        let nft_elements = Gauge::default();
        let nft_rules = Gauge::default();
        let affinity_entries_purged = Counter::default();
        registry.register(
            "sync_duration_seconds",
            "Time of one sync, from the model update to the kernel's acknowledgement",
            sync_duration.clone(),
        );
        registry.register("sync_pending_changes", "Changed Services not yet programmed", sync_pending_changes.clone());
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            last_sync_timestamp.clone(),
        );
        registry.register("sync_failures", "Syncs that failed", sync_failures.clone());
        registry.register("full_syncs", "Full resyncs", full_syncs.clone());
        registry.register(
            "tables_replaced",
            "Full resyncs that replaced existing tables through nft instead of adopting them (their frame differed, or they could not be listed)",
            tables_replaced.clone(),
        );
        registry.register(
            "kernel_writes",
            "Syncs written to the kernel, by writer (nft, hawser's netlink batches, or both for a full sync into a node without our tables)",
            kernel_writes.clone(),
        );
        registry.register("services", "Services programmed", services.clone());
        registry.register("endpoints", "Endpoints programmed (per Service port)", endpoints.clone());
        registry.register("nft_elements", "nftables map elements programmed", nft_elements.clone());
        registry.register("nft_rules", "nftables rules programmed", nft_rules.clone());
        registry.register(
            "affinity_entries_purged",
            "ClientIP affinity entries deleted because their endpoint or frontend left (or its traffic policy changed)",
            affinity_entries_purged.clone(),
        );
        Self {
            registry,
            sync_duration,
            sync_pending_changes,
            last_sync_timestamp,
            sync_failures,
            full_syncs,
            tables_replaced,
            kernel_writes,
            services,
            endpoints,
            nft_elements,
            nft_rules,
            affinity_entries_purged,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Router serving `/metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(serve)).with_state(metrics)
}

async fn serve(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
