//! The contract between the hawser operator and the clouds.
//!
//! The operator turns a Kubernetes Service into a [`LoadBalancerSpec`] (which holds no Kubernetes
//! types) and hands it to a [`Provider`]; the provider makes the cloud match it and answers with a
//! [`LoadBalancerStatus`]. Each cloud lives in its own module behind a cargo feature; the mock
//! cloud is a faithful in-memory cloud that tests and the local sandbox use.

#[cfg(feature = "aws")]
pub mod aws;
mod changes;
mod error;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(any(feature = "mock", feature = "aws", feature = "gcp"))]
pub mod limiter;
#[cfg(feature = "mock")]
pub mod mock;
mod naming;
mod provider;
mod spec;
mod status;

pub use changes::{Action, Change, ChangePlan, Conflict, FieldChange, listed, membership, shown};
pub use error::{ErrorClass, InvalidField, ProviderError};
pub use naming::{
    OWNERSHIP_TAG_CLUSTER, OWNERSHIP_TAG_GROUP, OWNERSHIP_TAG_RESOURCE, OWNERSHIP_TAG_SERVICE,
    OWNERSHIP_TAG_SERVICE_UID, ownership_tags, stable_hash,
};
pub use provider::{Capabilities, GroupLimits, OwnedLoadBalancer, PROVIDER_ANNOTATION_PREFIXES, Provider};
pub use spec::{
    HealthCheck, HealthCheckProtocol, IpFamily, Listener, LoadBalancerSpec, Protocol, Scheme, ServiceIdentity,
    SessionAffinity, Target, Targets,
};
pub use status::{IngressPoint, IpMode, LoadBalancerStatus, PortStatus};
