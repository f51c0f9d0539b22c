//! Leader election over a `coordination.k8s.io` Lease, so that two replicas never both reconcile.
//!
//! Expiry is judged by the local clock from when this replica last saw the Lease change, not by
//! the timestamps inside it, so clock skew between nodes cannot make two leaders (the approach
//! client-go takes). Writes use the Lease's resourceVersion: of two contenders, one gets 409.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tracing::{info, warn};

/// What to do with the Lease as last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Its holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds it: wait.
    Wait,
}

/// Decides the next step. `unchanged_for` is how long the Lease's record has been the same as
/// this replica observed it (by the local clock).
pub fn decide(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> Step {
    let Some(lease) = lease else { return Step::Create };
    let spec = lease.spec.as_ref();
    let holder = spec.and_then(|s| s.holder_identity.as_deref()).unwrap_or_default();
    if holder == identity {
        return Step::Renew;
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map_or(Duration::from_secs(15), Duration::from_secs);
    if holder.is_empty() || unchanged_for > duration { Step::TakeOver } else { Step::Wait }
}

/// One replica's view of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    observed: Option<(String, Instant)>,
}

impl LeaderElector {
    /// An elector for Lease `namespace/name`, as `identity` (the pod name).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
            observed: None,
        }
    }

    /// How often to retry or renew.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 5
    }

    /// One attempt to become or stay leader. `Ok(true)` while leading.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let version = current.as_ref().and_then(|l| l.metadata.resource_version.clone()).unwrap_or_default();
        let unchanged_for = match &self.observed {
            Some((v, since)) if *v == version => since.elapsed(),
            _ => {
                self.observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        };
        let now = MicroTime(Timestamp::now());
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match decide(current.as_ref(), &self.identity, unchanged_for) {
            Step::Wait => return Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            step @ (Step::Renew | Step::TakeOver) => {
                let mut lease = current.unwrap_or_default();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == Step::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(secs);
                spec.renew_time = Some(now);
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(lease) => {
                self.observed = Some((lease.metadata.resource_version.unwrap_or_default(), Instant::now()));
                Ok(true)
            }
            // Another replica wrote first; it leads.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&mut self) {
        info!(lease = %self.name, identity = %self.identity, "waiting for leadership");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews until leadership is lost; returns when it is. A renewal that cannot succeed within
    /// two thirds of the lease duration counts as lost, so this replica stops before another
    /// could take over.
    pub async fn hold(&mut self) {
        let deadline = self.lease_duration * 2 / 3;
        let mut last_success = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_success = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "leadership taken by another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "lease renewal failed"),
            }
            if last_success.elapsed() > deadline {
                warn!(lease = %self.name, "could not renew the lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up on shutdown so a standby takes over at once instead of after expiry.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            warn!(error = %e, "could not release the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn election_steps() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0)), Step::Create);
        assert_eq!(decide(Some(&lease(Some("a"))), "a", s(100)), Step::Renew);
        assert_eq!(decide(Some(&lease(Some("b"))), "a", s(10)), Step::Wait, "b renewed within the lease duration");
        assert_eq!(decide(Some(&lease(Some("b"))), "a", s(16)), Step::TakeOver, "b stopped renewing");
        assert_eq!(decide(Some(&lease(None)), "a", s(0)), Step::TakeOver, "released lease");
        assert_eq!(decide(Some(&lease(Some(""))), "a", s(0)), Step::TakeOver);
    }
}
