//! Prometheus metrics, all prefixed `hawser_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a reconcile.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `success`, `invalid_input`, `throttled`, `transient`, `conflict`, `fatal` or `kubernetes_error`.
    pub outcome: String,
}

/// Labels of a provider call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `mock`, `aws` or `gcp`.
    pub provider: String,
    /// `ensure`, `delete` or `list_owned`.
    pub operation: String,
    /// `success` or the error class.
    pub outcome: String,
}

/// Labels naming a provider.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// `mock`, `aws` or `gcp`.
    pub provider: String,
}

fn latency_histogram() -> Histogram {
    // 5 ms to ~80 s: cloud calls range from cached reads to minutes-long provisioning.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles by outcome.
    pub reconciles: Family<OutcomeLabels, Counter>,
    /// Reconcile durations by outcome.
    pub reconcile_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    /// Provider calls by operation and outcome.
    pub provider_calls: Family<CallLabels, Counter>,
    /// Provider call latency by operation and outcome.
    pub provider_call_duration: Family<CallLabels, Histogram, fn() -> Histogram>,
    /// Times the cloud throttled us.
    pub throttles: Family<ProviderLabels, Counter>,
    /// Services whose load balancer is ensured.
    pub managed_load_balancers: Gauge,
    /// Cloud load balancers behind them (fewer where Services share one in a group).
    pub load_balancers: Gauge,
    /// 1 while this replica leads (or leader election is off).
    pub leader: Gauge,
    /// Drift checks by outcome (`success` or the error class).
    pub drift_checks: Family<OutcomeLabels, Counter>,
    /// Load balancers the drift check found changed or missing in the cloud.
    pub drifted: Counter,
    /// Orphaned load balancers found by the last collector pass.
    pub orphans: Gauge,
    /// Orphaned load balancers deleted.
    pub gc_deletions: Counter,
    /// Collector passes by outcome.
    pub gc_passes: Family<OutcomeLabels, Counter>,
    /// `--dry-run`: cloud changes the last plans would make, over every Service.
    pub dry_run_changes: Gauge,
    /// `--dry-run`: Services whose last plan has a change (or a conflict).
    pub dry_run_services: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hawser");
        let reconciles = Family::default();
        let reconcile_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let provider_calls = Family::default();
        let provider_call_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let throttles = Family::default();
        let managed_load_balancers = Gauge::default();
        let load_balancers = Gauge::default();
        let leader = Gauge::default();
        let drift_checks = Family::default();
        let drifted = Counter::default();
        let orphans = Gauge::default();
        let gc_deletions = Counter::default();
        let gc_passes = Family::default();
        let dry_run_changes = Gauge::default();
        let dry_run_services = Gauge::default();
        registry.register(
            "dry_run_planned_changes",
            "With --dry-run: cloud changes hawser would make, over every Service",
            dry_run_changes.clone(),
        );
        registry.register(
            "dry_run_services_with_changes",
            "With --dry-run: Services whose load balancer hawser would change",
            dry_run_services.clone(),
        );
        registry.register("reconciles", "Service reconciles by outcome", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Service reconcile duration by outcome",
            reconcile_duration.clone(),
        );
        registry.register("provider_calls", "Cloud provider calls by operation and outcome", provider_calls.clone());
        registry.register(
            "provider_call_duration_seconds",
            "Cloud provider call latency by operation and outcome",
            provider_call_duration.clone(),
        );
        registry.register("provider_throttles", "Times the cloud API throttled hawser", throttles.clone());
        registry.register(
            "managed_load_balancers",
            "Services whose cloud load balancer hawser manages",
            managed_load_balancers.clone(),
        );
        registry.register(
            "load_balancers",
            "Cloud load balancers serving the managed Services (fewer where groups share one)",
            load_balancers.clone(),
        );
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        registry.register("drift_checks", "Periodic cloud inventories by outcome", drift_checks.clone());
        registry.register(
            "drifted_load_balancers",
            "Load balancers found changed or missing in the cloud, and ensured again",
            drifted.clone(),
        );
        registry.register("orphans", "Owned load balancers whose Service is gone or released", orphans.clone());
        registry.register("gc_deletions", "Orphaned load balancers deleted", gc_deletions.clone());
        registry.register("gc_passes", "Orphan collector passes by outcome", gc_passes.clone());
        Self {
            reconciles,
            reconcile_duration,
            provider_calls,
            provider_call_duration,
            throttles,
            managed_load_balancers,
            load_balancers,
            leader,
            drift_checks,
            drifted,
            orphans,
            gc_deletions,
            gc_passes,
            dry_run_changes,
            dry_run_services,
            registry,
        }
    }

    /// Records one reconcile.
    pub fn reconciled(&self, outcome: &str, seconds: f64) {
        let labels = OutcomeLabels { outcome: outcome.to_owned() };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration.get_or_create(&labels).observe(seconds);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_the_prefix_and_labels() {
        let m = Metrics::new();
        m.reconciled("success", 0.01);
        m.managed_load_balancers.set(3);
        let text = m.encode();
        assert!(text.contains("hawser_reconciles_total{outcome=\"success\"} 1"), "{text}");
        assert!(text.contains("hawser_reconcile_duration_seconds_count{outcome=\"success\"} 1"), "{text}");
        assert!(text.contains("hawser_managed_load_balancers 3"), "{text}");
    }
}
