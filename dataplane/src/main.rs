//! `hawser-dataplane`: the hawser node agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use hawser_dataplane::agent::{self, AgentConfig};
use hawser_dataplane::health::{self, DEFAULT_HEALTH_PORT, HealthState};
use hawser_dataplane::metrics::{self, Metrics};
use hawser_dataplane::model::{DEFAULT_LOAD_BALANCER_CLASS, ModelConfig};
use hawser_dataplane::nft::{Applier, NftCommand};
use hawser_dataplane::render::RenderConfig;
use hawser_dataplane::telemetry;
use tracing::{error, info};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// hawser node agent: forwards load-balancer traffic to ready endpoints with nftables and
/// answers the load balancer's health checks.
#[derive(Debug, Parser)]
#[command(name = "hawser-dataplane", version)]
struct Args {
    /// Serve Services whose spec.loadBalancerClass is this.
    #[arg(long, env = "HAWSER_LOAD_BALANCER_CLASS", default_value = DEFAULT_LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
    /// Name of this node (endpoints with this nodeName are local).
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Port of the health server (/healthz, /livez, /services/{namespace}/{name}).
    #[arg(long, env = "HAWSER_HEALTH_PORT", default_value_t = DEFAULT_HEALTH_PORT)]
    health_port: u16,
    /// Address the health server binds; the node's addresses under hostNetwork. `::` serves
    /// IPv4 and IPv6 (IPv4 alone where the node has no IPv6).
    #[arg(long, env = "HAWSER_HEALTH_BIND_ADDRESS", default_value = "::")]
    health_bind_address: IpAddr,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, env = "HAWSER_METRICS_BIND_ADDRESS", default_value = "0.0.0.0:10267")]
    metrics_bind_address: SocketAddr,
    /// Sync at least this often (seconds); /healthz fails after twice this without a sync.
    #[arg(long, env = "HAWSER_RESYNC_PERIOD_SECONDS", default_value_t = 30)]
    resync_period_seconds: u64,
    /// Compare the tables with what they should hold this often (seconds), repairing changes
    /// others made to them; 0 disables. Recorded ClientIP affinity clients stay, unless the
    /// tables' frame (base chains, set declarations) had to be replaced.
    #[arg(long, env = "HAWSER_FULL_RESYNC_PERIOD_SECONDS", default_value_t = 3600)]
    full_resync_period_seconds: u64,
    /// Upper bound of the exponential backoff between failed syncs (seconds).
    #[arg(long, env = "HAWSER_MAX_SYNC_BACKOFF_SECONDS", default_value_t = 60)]
    max_sync_backoff_seconds: u64,
    /// Minimum time between syncs (milliseconds); changes in between are batched.
    #[arg(long, env = "HAWSER_MIN_SYNC_INTERVAL_MS", default_value_t = 1000)]
    min_sync_interval_ms: u64,
    /// Packet-mark bit (0-31) requesting masquerade; must differ from kube-proxy's (14) and
    /// from any other use on the node: it is cleared on new connections that are for no
    /// Service.
    #[arg(long, env = "HAWSER_MASQUERADE_BIT", default_value_t = 22, value_parser = clap::value_parser!(u8).range(0..32))]
    masquerade_bit: u8,
    /// Command running nft, split on whitespace (e.g. "ip netns exec node1 nft").
    #[arg(long, env = "HAWSER_NFT_COMMAND", default_value = "nft")]
    nft_command: String,
    /// Write partial syncs (element changes, Service chains) and the bulk of a full sync into a
    /// node without our tables over the agent's own netlink socket instead of nft: used only
    /// when nft runs in the agent's own network namespace (the default `--nft-command`), as
    /// netlink talks to that namespace.
    #[arg(long, env = "HAWSER_NETLINK", default_value_t = true, action = clap::ArgAction::Set)]
    netlink: bool,
    /// Command running conntrack, split on whitespace.
    #[arg(long, env = "HAWSER_CONNTRACK_COMMAND", default_value = "conntrack")]
    conntrack_command: String,
    /// Log format.
    #[arg(long, env = "HAWSER_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Delete hawser's nftables tables and exit.
    #[arg(long, env = "HAWSER_CLEANUP")]
    cleanup: bool,
}

fn argv(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}

/// The Kubernetes client of KUBECONFIG or the in-cluster service account, naming itself
/// `hawser-dataplane/VERSION` in every request's User-Agent.
async fn kube_client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.context("building Kubernetes client (KUBECONFIG or in-cluster)")?;
    let agent = axum::http::HeaderValue::from_static(concat!("hawser-dataplane/", env!("CARGO_PKG_VERSION")));
    let layer = tower::util::MapRequestLayer::new(move |mut request: axum::http::Request<kube::client::Body>| {
        request.headers_mut().insert(axum::http::header::USER_AGENT, agent.clone());
        request
    });
    let builder = kube::client::ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    Ok(builder.with_layer(&layer).build())
}

async fn serve(addr: SocketAddr, router: axum::Router, what: &'static str) -> anyhow::Result<()> {
    let listener = health::listen(addr).with_context(|| format!("binding {what} server on {addr}"))?;
    let addr = listener.local_addr().unwrap_or(addr);
    info!(%addr, "{what} server listening");
    axum::serve(listener, router).await.with_context(|| format!("{what} server"))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The kube client uses rustls; pick its ring backend before any client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    telemetry::init(matches!(args.log_format, LogFormat::Json));
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %telemetry::causes(&e), "hawser-dataplane failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        let mut applier = Applier::new(NftCommand::with_argv(argv(&args.nft_command)));
        applier.cleanup().context("deleting hawser tables")?;
        info!("hawser nftables tables deleted");
        return Ok(());
    }
    let node_name = args.node_name.clone().context("--node-name is required")?;

    let resync_period = Duration::from_secs(args.resync_period_seconds.max(1));
    let health = HealthState::new(&node_name, resync_period);
    let metrics = Arc::new(Metrics::new());
    let client = kube_client().await?;

    let config = AgentConfig {
        model: ModelConfig { load_balancer_class: args.load_balancer_class.clone(), node_name },
        render: RenderConfig { masquerade_mark: 1u32 << args.masquerade_bit },
        resync_period,
        min_sync_interval: Duration::from_millis(args.min_sync_interval_ms),
        full_resync_period: (args.full_resync_period_seconds > 0)
            .then(|| Duration::from_secs(args.full_resync_period_seconds)),
        max_sync_backoff: Duration::from_secs(args.max_sync_backoff_seconds),
        nft_argv: argv(&args.nft_command),
        netlink: args.netlink && argv(&args.nft_command) == ["nft"],
        conntrack_argv: argv(&args.conntrack_command),
    };

    let health_addr = SocketAddr::new(args.health_bind_address, args.health_port);
    let servers = async {
        tokio::try_join!(
            serve(health_addr, health::router(health.clone()), "health"),
            serve(args.metrics_bind_address, metrics::router(metrics.clone()), "metrics"),
        )
    };
    tokio::select! {
        r = agent::run(client, config, health.clone(), metrics.clone(), shutdown_signal()) => {
            r.context("agent")?;
        }
        r = servers => {
            r?;
        }
    }
    Ok(())
}
