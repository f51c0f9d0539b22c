//! hawser-operator: gives `type: LoadBalancer` Services of class `hawser.dev/lb` a real cloud
//! load balancer, through a [`hawser_providers::Provider`].
//!
//! Pure parts (annotations, node eligibility, desired state, status patches) are separate from
//! the I/O (reconcile, leader election, HTTP), so most of it is tested without any API.

pub mod annotations;
pub mod audit;
pub mod config;
pub mod desired;
pub mod drift;
pub mod events;
pub mod gc;
pub mod groups;
pub mod http;
pub mod leader;
pub mod metered;
pub mod metrics;
pub mod names;
pub mod nodes;
pub mod plan;
pub mod reconcile;
pub mod retry;
pub mod run;
pub mod status;
pub mod telemetry;
#[cfg(test)]
mod testutil;
