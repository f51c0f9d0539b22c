//! hawser node agent: programs nftables so that load-balancer traffic for Services of our
//! class reaches ready endpoints, and answers the load balancer's health checks.

pub mod agent;
pub mod conntrack;
pub mod diff;
pub mod health;
pub mod inputs;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod render;
pub mod sync;
pub mod telemetry;
