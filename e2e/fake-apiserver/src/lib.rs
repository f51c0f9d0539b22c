//! An honest Kubernetes API stand-in for tests where no real cluster exists.
//!
//! It serves namespaces, services (+status), nodes (+status), configmaps, Events (one store,
//! served as core/v1 and events.k8s.io/v1), discovery.k8s.io EndpointSlices and
//! coordination.k8s.io Leases, as JSON or as the Tables kubectl prints, over
//! HTTPS with bearer-token auth, with the apiserver's object semantics (resourceVersion,
//! conflicts, finalizers, status subresource, watches with bookmarks and 410 Gone) and its
//! Service behaviour (cluster IP and node port allocation, defaults, validation). What it does
//! not support it refuses with a Kubernetes `Status` (404, 405, 415, 422). Test infrastructure
//! only: the product never depends on it.

pub mod audit;
pub mod discovery;
pub mod error;
pub mod events;
pub mod kubeconfig;
pub mod meta;
pub mod patch;
pub mod resources;
pub mod routes;
pub mod selectors;
pub mod server;
pub mod service;
pub mod service_alloc;
pub mod store;
pub mod strategy;
pub mod table;
pub mod tls;
pub mod view;
pub mod watch;

pub use server::{Config, FakeApiServer, StartError};
