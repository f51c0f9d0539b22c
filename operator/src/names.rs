//! Names fixed by the design: class, finalizer, condition, annotation prefix.

/// The default `spec.loadBalancerClass` hawser serves.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "hawser.dev/lb";
/// The finalizer that keeps a Service until its cloud load balancer is gone.
pub const FINALIZER: &str = "hawser.dev/cleanup";
/// The Service status condition hawser owns.
pub const CONDITION_TYPE: &str = "hawser.dev/LoadBalancerReady";
/// The Service status condition that records the load-balancer groups whose load balancers hold
/// parts of the Service.
pub const GROUP_CONDITION_TYPE: &str = "hawser.dev/LoadBalancerGroup";
/// Every hawser annotation starts with this.
pub const ANNOTATION_PREFIX: &str = "hawser.dev/";
/// The controller name on Events and as field manager.
pub const CONTROLLER_NAME: &str = "hawser-operator";
