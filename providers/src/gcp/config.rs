//! Settings of the GCP provider (the operator's `--gcp-*` flags).

use std::time::Duration;

/// Where the GCP provider builds load balancers and how it reaches Compute Engine.
#[derive(Debug, Clone)]
pub struct GcpConfig {
    /// The cluster name: part of every resource name and of the ownership record.
    pub cluster: String,
    /// The project that holds the nodes and the load balancers.
    pub project: String,
    /// The region of the cluster; regional load balancers live here.
    pub region: String,
    /// The VPC network name (or URL) of the nodes.
    pub network: String,
    /// The subnetwork internal load balancers take their address from (name or URL); a Service
    /// may override it with `hawser.dev/gcp-subnet`.
    pub subnetwork: Option<String>,
    /// Network tags of the nodes, the targets of the firewalls hawser creates.
    pub node_tags: Vec<String>,
    /// The nodes' service account, the firewall target when no tags are given.
    pub node_service_account: Option<String>,
    /// An endpoint for every Compute call (the fake Compute server in tests); the real API when `None`.
    pub endpoint_url: Option<String>,
    /// Anonymous credentials instead of Application Default Credentials (tests only).
    pub anonymous_credentials: bool,
    /// First wait between two polls of a running operation; doubles up to [`Self::poll_max_interval`].
    pub poll_interval: Duration,
    /// Longest wait between two polls.
    pub poll_max_interval: Duration,
    /// How long one operation is waited for before the reconcile gives up and retries later
    /// (the operation keeps running in GCE and the next reconcile finds its result by name).
    pub operation_timeout: Duration,
    /// Read calls a second at most (Compute's default quota is 1,500 reads a minute per project
    /// and region; the client slows down below this when throttled).
    pub read_rate: f64,
    /// Write calls a second at most.
    pub write_rate: f64,
}

impl GcpConfig {
    /// Defaults for GKE: Application Default Credentials (Workload Identity works unchanged) and
    /// operation polling from 1 s to 5 s for at most 3 minutes.
    pub fn new(
        cluster: impl Into<String>,
        project: impl Into<String>,
        region: impl Into<String>,
        network: impl Into<String>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            project: project.into(),
            region: region.into(),
            network: network.into(),
            subnetwork: None,
            node_tags: Vec::new(),
            node_service_account: None,
            endpoint_url: None,
            anonymous_credentials: false,
            poll_interval: Duration::from_secs(1),
            poll_max_interval: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(180),
            read_rate: 20.0,
            write_rate: 10.0,
        }
    }

    /// Checks the values that no Compute call can correct.
    pub fn validate(&self) -> Result<(), String> {
        for (what, value) in [
            ("a cluster name", &self.cluster),
            ("a project (--gcp-project)", &self.project),
            ("a region (--gcp-region)", &self.region),
            ("a network (--gcp-network)", &self.network),
        ] {
            if value.trim().is_empty() {
                return Err(format!("the GCP provider needs {what}"));
            }
        }
        // Without a target the firewalls would open the Service ports on every VM of the network.
        if self.node_tags.is_empty() && self.node_service_account.is_none() {
            return Err("the GCP provider needs the nodes' network tags (--gcp-node-tags) or service account \
                        (--gcp-node-service-account) to aim its firewall rules at"
                .into());
        }
        if self.poll_interval.is_zero() || self.operation_timeout.is_zero() {
            return Err("GCP operation polling interval and timeout must be positive".into());
        }
        if !(self.read_rate > 0.0 && self.write_rate > 0.0) {
            return Err("GCP read and write rates must be positive calls a second".into());
        }
        Ok(())
    }

    /// `projects/<project>/global/networks/<network>`, unless a URL was given.
    pub fn network_url(&self) -> String {
        if self.network.contains('/') {
            relative(&self.network).to_owned()
        } else {
            format!("projects/{}/global/networks/{}", self.project, self.network)
        }
    }

    /// The subnetwork as a relative URL, from a name or URL.
    pub fn subnetwork_url(&self, subnet: &str) -> String {
        if subnet.contains('/') {
            relative(subnet).to_owned()
        } else {
            format!("projects/{}/regions/{}/subnetworks/{}", self.project, self.region, subnet)
        }
    }
}

/// The `projects/…` part of a Compute URL: GCE answers with full self-links while requests may
/// use partial ones, so references are compared in this form.
pub fn relative(url: &str) -> &str {
    match url.find("projects/") {
        Some(i) => &url[i..],
        None => url,
    }
}
