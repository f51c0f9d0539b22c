//! The resources this server serves, and what discovery says about them.

/// One served resource (a group/version/plural).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural, as used in paths.
    pub plural: &'static str,
    /// Singular name, for discovery.
    pub singular: &'static str,
    /// Kind of the objects.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the resource has a `/status` subresource.
    pub has_status: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
}

impl ResourceDef {
    /// `apiVersion` of the objects, e.g. `v1` or `discovery.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    /// Kind of the list, e.g. `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

/// Every served resource, in discovery order. events.k8s.io/v1 Events are stored with the core
/// ones and converted (see [`crate::events`]), as the apiserver does.
pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        has_status: true,
        short_names: &["ns"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        has_status: true,
        short_names: &["svc"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        has_status: true,
        short_names: &["no"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        has_status: false,
        short_names: &["cm"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        has_status: false,
        short_names: &["ev"],
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        has_status: false,
        short_names: &[],
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        has_status: false,
        short_names: &["ev"],
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        has_status: false,
        short_names: &[],
    },
];

/// Index of the namespaces resource in [`RESOURCES`].
pub const NAMESPACES: usize = 0;

/// Finds a resource by group, version and plural; returns its index in [`RESOURCES`].
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The API groups (other than core), each with its single served version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}
