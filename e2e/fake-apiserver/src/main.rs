//! `hawser-fake-apiserver`: runs the fake apiserver until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hawser_fake_apiserver::{Config, FakeApiServer};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(name = "hawser-fake-apiserver", about = "A Kubernetes API stand-in for hawser's tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write the kubeconfig.
    #[arg(long)]
    kubeconfig_out: PathBuf,
    /// Serve plain HTTP instead of HTTPS (debugging only).
    #[arg(long)]
    plain_http: bool,
    /// Bearer token; random when not given.
    #[arg(long, env = "HAWSER_FAKE_APISERVER_TOKEN")]
    token: Option<String>,
    /// IPv4 service CIDR.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: ipnet::Ipv4Net,
    /// IPv6 service CIDR; makes the cluster dual-stack.
    #[arg(long)]
    service_cidr_v6: Option<ipnet::Ipv6Net>,
    /// Node port range, `MIN-MAX`.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: String,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_seconds: u64,
    /// Append one JSON line per request to this file (verb, apiGroup, resource, user, ...).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Extra bearer token naming a user in the audit log, `TOKEN=USER`; repeatable.
    #[arg(long = "user", value_parser = hawser_fake_apiserver::audit::parse_user)]
    users: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hawser_fake_apiserver::server::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let Some((min, max)) = args
        .node_port_range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
    else {
        eprintln!("invalid --node-port-range {:?}: expected MIN-MAX", args.node_port_range);
        return std::process::ExitCode::from(2);
    };
    let config = Config {
        listen: args.listen,
        tls: !args.plain_http,
        token: args.token,
        kubeconfig_path: Some(args.kubeconfig_out),
        service_cidr: args.service_cidr,
        service_cidr_v6: args.service_cidr_v6,
        node_port_min: min,
        node_port_max: max,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_seconds.max(1)),
        audit_log: args.audit_log,
        users: args.users,
        ..Config::default()
    };
    let server = match FakeApiServer::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hawser-fake-apiserver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The first stdout line is the bound address, for scripts that started it with port 0.
    println!("{}", server.addr());
    let _ = tokio::signal::ctrl_c().await;
    server.stop().await;
    std::process::ExitCode::SUCCESS
}
