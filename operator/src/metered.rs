//! A provider wrapper that measures every call and slows the whole provider down when throttled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hawser_providers::{
    Capabilities, ChangePlan, InvalidField, LoadBalancerSpec, LoadBalancerStatus, OwnedLoadBalancer, Provider,
    ProviderError, ServiceIdentity,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::metrics::{CallLabels, Metrics, ProviderLabels};

const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// When the cloud throttles one call, every call waits: hammering a throttled API with the other
/// Services' reconciles only prolongs the throttling (a common complaint about cloud controllers).
#[derive(Debug, Default)]
pub struct ThrottleGate {
    paused_until: Mutex<Option<Instant>>,
    consecutive: AtomicU32,
}

impl ThrottleGate {
    /// Waits while the provider is paused.
    pub async fn wait(&self) {
        let until = *self.paused_until.lock().await;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// The cloud throttled a call: pause everyone, for as long as it said or exponentially longer.
    pub async fn throttled(&self, retry_after: Option<Duration>) -> Duration {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed).min(16);
        let pause = retry_after.unwrap_or_else(|| FIRST_PAUSE.saturating_mul(1 << n)).min(LONGEST_PAUSE);
        let until = Instant::now() + pause;
        let mut guard = self.paused_until.lock().await;
        if guard.is_none_or(|u| u < until) {
            *guard = Some(until);
        }
        pause
    }

    /// A call went through: the next throttle starts from the shortest pause again.
    pub fn succeeded(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }
}

/// Wraps a provider with metrics and the throttle gate.
pub struct MeteredProvider {
    inner: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    gate: Arc<ThrottleGate>,
}

impl MeteredProvider {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Provider>, metrics: Arc<Metrics>, gate: Arc<ThrottleGate>) -> Self {
        Self { inner, metrics, gate }
    }

    async fn measured<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.gate.wait().await;
        let started = Instant::now();
        let result = call.await;
        let outcome = match &result {
            Ok(_) => {
                self.gate.succeeded();
                "success"
            }
            Err(e) => {
                if let ProviderError::Throttled { retry_after, .. } = e {
                    self.metrics
                        .throttles
                        .get_or_create(&ProviderLabels { provider: self.inner.name().to_owned() })
                        .inc();
                    let pause = self.gate.throttled(*retry_after).await;
                    tracing::warn!(
                        provider = self.inner.name(),
                        ?pause,
                        "cloud API throttled; pausing every provider call"
                    );
                }
                e.class().as_str()
            }
        };
        let labels = CallLabels {
            provider: self.inner.name().to_owned(),
            operation: operation.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.metrics.provider_calls.get_or_create(&labels).inc();
        self.metrics.provider_call_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        result
    }
}

#[async_trait]
impl Provider for MeteredProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn annotations(&self) -> &'static [&'static str] {
        self.inner.annotations()
    }

    fn group_annotations(&self) -> &'static [&'static str] {
        self.inner.group_annotations()
    }

    fn validate(&self, spec: &LoadBalancerSpec) -> Result<(), Vec<InvalidField>> {
        self.inner.validate(spec)
    }

    fn fingerprint(&self, spec: &LoadBalancerSpec) -> Option<String> {
        self.inner.fingerprint(spec)
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        self.measured("ensure", self.inner.ensure(spec)).await
    }

    async fn plan(&self, spec: &LoadBalancerSpec) -> Result<ChangePlan, ProviderError> {
        self.measured("plan", self.inner.plan(spec)).await
    }

    async fn plan_delete(&self, identity: &ServiceIdentity) -> Result<ChangePlan, ProviderError> {
        self.measured("plan_delete", self.inner.plan_delete(identity)).await
    }

    async fn plan_leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<ChangePlan, ProviderError> {
        self.measured("plan_leave_group", self.inner.plan_leave_group(identity, group)).await
    }

    async fn delete(&self, identity: &ServiceIdentity) -> Result<(), ProviderError> {
        self.measured("delete", self.inner.delete(identity)).await
    }

    async fn delete_detached(&self, leftover: &OwnedLoadBalancer) -> Result<(), ProviderError> {
        self.measured("delete_detached", self.inner.delete_detached(leftover)).await
    }

    async fn leave_group(&self, identity: &ServiceIdentity, group: &str) -> Result<(), ProviderError> {
        self.measured("leave_group", self.inner.leave_group(identity, group)).await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedLoadBalancer>, ProviderError> {
        self.measured("list_owned", self.inner.list_owned()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_every_caller_and_backs_off_exponentially() {
        let gate = ThrottleGate::default();
        assert_eq!(gate.throttled(None).await, Duration::from_millis(500));
        assert_eq!(gate.throttled(None).await, Duration::from_secs(1));
        let started = Instant::now();
        gate.wait().await;
        assert_eq!(started.elapsed(), Duration::from_secs(1), "waits out the longest pause");
        assert_eq!(
            gate.throttled(Some(Duration::from_secs(7))).await,
            Duration::from_secs(7),
            "the cloud's retry-after wins"
        );
        assert_eq!(gate.throttled(Some(Duration::from_secs(600))).await, LONGEST_PAUSE, "bounded");
        gate.succeeded();
        assert_eq!(gate.throttled(None).await, Duration::from_millis(500), "reset after a success");
    }
}
