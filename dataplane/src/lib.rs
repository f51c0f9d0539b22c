//! hawser node agent: programs nftables so that load-balancer traffic for Services of our
//! class reaches ready endpoints, and answers the load balancer's health checks.

pub mod adopt;
pub mod affinity;
pub mod agent;
pub mod conntrack;
pub mod diff;
pub mod health;
pub mod inputs;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod render;
pub mod sync;
pub mod telemetry;

/// The allocator of every binary built on this crate: mimalloc returns the memory a full resync
/// frees (its whole transient ruleset and script) to the system, where glibc's allocator kept
/// most of it as fragmented heap (see dataplane/README.md, "Scale"). It is built without
/// transparent huge pages (`no_thp`): faulting in and zeroing 2 MiB pages took about half of
/// the time a full resync spends taking in 10k Services.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
