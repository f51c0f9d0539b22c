//! Command line and environment: every flag can also be set by an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::desired::HealthCheckMode;
use crate::gc::GcMode;
use crate::names::DEFAULT_LOAD_BALANCER_CLASS;

/// Which cloud to build load balancers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// The in-process mock cloud (tests, the local sandbox, kind).
    Mock,
    /// AWS Network Load Balancers.
    Aws,
    /// GCP passthrough Network Load Balancers.
    Gcp,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (in-cluster).
    Json,
    /// Human-readable.
    Text,
}

/// How `audit` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// An aligned table.
    Table,
    /// A JSON array of rows.
    Json,
}

/// How `plan` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanOutput {
    /// One block per Service: `+ create`, `~ update`, `! replace`, `- delete`.
    Text,
    /// A JSON array, one object per Service.
    Json,
}

/// What to do instead of running the controller.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Compare every load balancer this cluster owns in the cloud with every Service of the
    /// class, read-only; exit status 1 when a row needs attention (orphan, missing, drifted,
    /// invalid), 2 when the audit itself failed.
    Audit {
        /// Table or JSON.
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Print the cloud changes hawser would make for Services, without making them (read-only):
    /// for the Services of a manifest as `kubectl apply` would leave them (`-f FILE`, `-f -` for
    /// stdin), or for existing Services (`NAMESPACE/NAME`). Exit status 0 when planned, 1 when a
    /// Service is invalid or blocked by a resource hawser does not own, 2 when planning failed.
    Plan {
        /// A manifest with one or more Services (YAML or JSON; `-` reads stdin).
        #[arg(short = 'f', long = "filename", value_name = "FILE", conflicts_with = "services")]
        file: Option<PathBuf>,
        /// Existing Services, as `namespace/name` (or `name` in --namespace).
        #[arg(value_name = "NAMESPACE/NAME", required_unless_present = "file")]
        services: Vec<String>,
        /// The namespace of Services that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Plan what deleting the Services would do.
        #[arg(long)]
        delete: bool,
        /// Text or JSON.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: PlanOutput,
    },
}

/// hawser-operator: gives LoadBalancer Services of one class a real cloud load balancer.
#[derive(Debug, Clone, Parser)]
#[command(name = "hawser-operator", version, about)]
pub struct Cli {
    /// Run the controller (default), or a one-off command with the same provider flags.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The cloud to build load balancers in.
    #[arg(long, env = "HAWSER_PROVIDER", value_enum)]
    pub provider: ProviderKind,
    /// Name of this cluster; goes into every cloud resource's ownership tags.
    #[arg(long, env = "HAWSER_CLUSTER_NAME", value_parser = parse_cluster_name)]
    pub cluster_name: String,
    /// The spec.loadBalancerClass this operator serves.
    #[arg(long, env = "HAWSER_LOAD_BALANCER_CLASS", default_value = DEFAULT_LOAD_BALANCER_CLASS)]
    pub load_balancer_class: String,
    /// Services reconciled at once.
    #[arg(long, env = "HAWSER_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Address of the /metrics endpoint.
    #[arg(long, env = "HAWSER_METRICS_BIND_ADDRESS", default_value = ":8080", value_parser = parse_bind)]
    pub metrics_bind_address: SocketAddr,
    /// Address of the /healthz and /readyz endpoints.
    #[arg(long, env = "HAWSER_HEALTH_PROBE_BIND_ADDRESS", default_value = ":8081", value_parser = parse_bind)]
    pub health_probe_bind_address: SocketAddr,
    /// Reconcile only while holding a Lease, so that replicas never both act.
    #[arg(long, env = "HAWSER_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "HAWSER_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "HAWSER_LEADER_ELECTION_ID", default_value = "hawser-operator")]
    pub leader_election_id: String,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, env = "HAWSER_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_election_lease_duration: Duration,
    /// The hawser dataplane's health port, which load balancers probe.
    #[arg(long, env = "HAWSER_NODE_HEALTH_PORT", default_value_t = 10266)]
    pub node_health_port: u16,
    /// Probe the hawser dataplane, or kube-proxy (clusters without the dataplane).
    #[arg(long, env = "HAWSER_HEALTH_CHECK_MODE", value_enum, default_value = "hawser")]
    pub health_check_mode: HealthCheckMode,
    /// Let control-plane Nodes receive load-balancer traffic.
    #[arg(long, env = "HAWSER_INCLUDE_CONTROL_PLANE_NODES", default_value_t = false)]
    pub include_control_plane_nodes: bool,
    /// Plan instead of change: every reconcile reads the cloud and logs, publishes as an Event
    /// and serves at /plans what it would change, and writes nothing (no cloud change, no
    /// finalizer, no status; the orphan collector only reports). For trying hawser on Services
    /// another controller still serves, or a new version on a live cluster.
    #[arg(long, env = "HAWSER_DRY_RUN", default_value_t = false)]
    pub dry_run: bool,
    /// How often one batched cloud inventory is compared with every Service, to repair drift
    /// (only the Services whose load balancer changed or vanished are ensured again).
    #[arg(long, env = "HAWSER_RESYNC_PERIOD", default_value = "10m", value_parser = parse_duration)]
    pub resync_period: Duration,
    /// Orphaned load balancers (Service gone, or no longer of this class, without our
    /// finalizer): delete them after the grace period (`on`), only log and count them
    /// (`report`), or do not look (`off`).
    #[arg(long, env = "HAWSER_GC", value_enum, default_value = "on")]
    pub gc: GcMode,
    /// Time between two searches for orphaned load balancers (the first runs once the caches
    /// have synced).
    #[arg(long, env = "HAWSER_GC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// How long a load balancer must stay orphaned before it is deleted.
    #[arg(long, env = "HAWSER_GC_GRACE_PERIOD", default_value = "5m", value_parser = parse_duration)]
    pub gc_grace_period: Duration,
    /// How long Node changes are collected before Services are re-reconciled.
    #[arg(long, env = "HAWSER_NODE_DEBOUNCE", default_value = "2s", value_parser = parse_duration)]
    pub node_debounce: Duration,
    /// Log format.
    #[arg(long, env = "HAWSER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Mock cloud: the CIDRs load-balancer addresses come from, comma-separated, at most one
    /// per IP family (a bare address is a pool of one).
    #[arg(long, env = "HAWSER_MOCK_ADDRESS_POOL", default_value = "203.0.113.0/24", value_parser = parse_pools)]
    pub mock_address_pool: Pools,
    /// Mock cloud: latency added to every API call.
    #[arg(long, env = "HAWSER_MOCK_LATENCY", default_value = "0s", value_parser = parse_duration)]
    pub mock_latency: Duration,
    /// Mock cloud: API calls per second before it answers "throttled" (unlimited if unset).
    #[arg(long, env = "HAWSER_MOCK_RATE_LIMIT")]
    pub mock_rate_limit: Option<f64>,
    /// Mock cloud: fraction of API calls that fail with an injected fault (0 to 1).
    #[arg(long, env = "HAWSER_MOCK_ERROR_RATE", default_value_t = 0.0)]
    pub mock_error_rate: f64,
    /// Mock cloud: seed of the fault injection.
    #[arg(long, env = "HAWSER_MOCK_SEED", default_value_t = 0)]
    pub mock_seed: u64,
    /// Mock cloud: file its state is kept in, so a restart sees the same cloud.
    #[arg(long, env = "HAWSER_MOCK_STATE_FILE")]
    pub mock_state_file: Option<PathBuf>,
    /// AWS: the region (else from the default chain: AWS_REGION, profile, instance metadata).
    #[arg(long, env = "HAWSER_AWS_REGION")]
    pub aws_region: Option<String>,
    /// AWS: the VPC of the load balancers (else discovered from the nodes' instances).
    #[arg(long, env = "HAWSER_AWS_VPC_ID")]
    pub aws_vpc_id: Option<String>,
    /// AWS: an endpoint URL for every AWS API (tests against moto, unusual private endpoints).
    #[arg(long, env = "HAWSER_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// GCP: the project of the nodes and load balancers.
    #[arg(long, env = "HAWSER_GCP_PROJECT")]
    pub gcp_project: Option<String>,
    /// GCP: the cluster's region.
    #[arg(long, env = "HAWSER_GCP_REGION")]
    pub gcp_region: Option<String>,
    /// GCP: the nodes' VPC network (name or URL).
    #[arg(long, env = "HAWSER_GCP_NETWORK")]
    pub gcp_network: Option<String>,
    /// GCP: the subnetwork internal load balancers take addresses from (name or URL).
    #[arg(long, env = "HAWSER_GCP_SUBNETWORK")]
    pub gcp_subnetwork: Option<String>,
    /// GCP: the nodes' network tags, comma-separated (the firewall rules' targets).
    #[arg(long, env = "HAWSER_GCP_NODE_TAGS", value_delimiter = ',')]
    pub gcp_node_tags: Vec<String>,
    /// GCP: the nodes' service account, the firewall target when no tags are given.
    #[arg(long, env = "HAWSER_GCP_NODE_SERVICE_ACCOUNT")]
    pub gcp_node_service_account: Option<String>,
    /// GCP: an endpoint URL for the Compute API (tests against a fake Compute server).
    #[arg(long, env = "HAWSER_GCP_ENDPOINT_URL")]
    pub gcp_endpoint_url: Option<String>,
    /// GCP: send no credentials at all. Only for a fake Compute server given with
    /// --gcp-endpoint-url; refused without it.
    #[arg(long, env = "HAWSER_GCP_ANONYMOUS_CREDENTIALS", requires = "gcp_endpoint_url")]
    pub gcp_anonymous_credentials: bool,
    /// GCP: first wait between two polls of a running Compute operation (doubling up to 5s).
    #[arg(long, env = "HAWSER_GCP_OPERATION_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub gcp_operation_poll_interval: Duration,
}

/// Address pools of the mock cloud, checked when the flags are parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools(pub Vec<IpNet>);

/// `203.0.113.0/24,2001:db8::/120`; a bare address is a /32 or /128; one pool per family.
fn parse_pools(s: &str) -> Result<Pools, String> {
    let mut pools: Vec<IpNet> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let net = match item.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match item.parse::<std::net::IpAddr>() {
                Ok(addr) => IpNet::from(addr),
                Err(_) => {
                    return Err(format!(
                        "{item:?} is not a CIDR; give one such as 203.0.113.0/24 (or a single address)"
                    ));
                }
            },
        };
        if let Some(other) =
            pools.iter().find(|p| matches!((p, &net), (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))))
        {
            return Err(format!(
                "{other} and {net} are both pools of one IP family; give at most one IPv4 and one IPv6 pool"
            ));
        }
        pools.push(net);
    }
    if pools.is_empty() {
        return Err("give at least one CIDR, such as 203.0.113.0/24".to_owned());
    }
    Ok(Pools(pools))
}

/// `:8080` means every address; `127.0.0.1:8080` one.
fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_owned() };
    full.parse().map_err(|_| format!("{s:?} is not an address; give host:port or :port"))
}

/// `500ms`, `15s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration; give a number with ms, s, m or h, like 15s");
    let (digits, scale_ms) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1_000)
    } else if let Some(d) = s.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = s.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        return Err(err());
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    Ok(Duration::from_millis(n.saturating_mul(scale_ms)))
}

/// Cluster names go into tags and resource names: keep them short and plain.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a cluster name; use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["hawser-operator", "--provider", "mock", "--cluster-name", "demo"]).unwrap();
        assert_eq!(cli.load_balancer_class, "hawser.dev/lb");
        assert_eq!(cli.concurrency, 8);
        assert_eq!(cli.metrics_bind_address.to_string(), "0.0.0.0:8080");
        assert_eq!(cli.health_probe_bind_address.to_string(), "0.0.0.0:8081");
        assert_eq!(cli.mock_address_pool, Pools(vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]));
        assert_eq!(cli.health_check_mode, HealthCheckMode::Hawser);
        assert!(!cli.leader_elect);
        assert_eq!(cli.node_health_port, 10266, "the dataplane's default --health-port");
    }

    #[test]
    fn bad_flags_are_refused_with_what_is_accepted() {
        let err = Cli::try_parse_from(["hawser-operator", "--provider", "azure", "--cluster-name", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("mock") && err.contains("aws") && err.contains("gcp"), "{err}");
        let err = Cli::try_parse_from(["hawser-operator", "--provider", "mock"]).unwrap_err().to_string();
        assert!(err.contains("--cluster-name"), "{err}");
        let err = Cli::try_parse_from(["hawser-operator", "--provider", "mock", "--cluster-name", "bad name"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a cluster name"), "{err}");
        let err = Cli::try_parse_from([
            "hawser-operator",
            "--provider",
            "mock",
            "--cluster-name",
            "x",
            "--resync-period",
            "10",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("like 15s"), "{err}");
    }

    #[test]
    fn address_pools_take_cidrs_or_single_addresses_one_per_family() {
        let pools = parse_pools("203.0.113.5, 2001:db8::/120").unwrap();
        assert_eq!(pools.0, vec!["203.0.113.5/32".parse::<IpNet>().unwrap(), "2001:db8::/120".parse().unwrap()]);
        let err = parse_pools("203.0.113.0/24,198.51.100.0/24").unwrap_err();
        assert!(err.contains("at most one IPv4 and one IPv6"), "{err}");
        let err = parse_pools("banana").unwrap_err();
        assert!(err.contains("such as 203.0.113.0/24"), "{err}");
        assert!(parse_pools(" , ").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1d").is_err());
    }
}
