//! Starting, serving and stopping the fake apiserver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditLog, Users};
use crate::kubeconfig;
use crate::routes::{AppState, router};
use crate::service_alloc::ServiceAllocator;
use crate::store::Store;
use crate::tls;

/// Makes rustls use ring in this process (idempotent). Needed wherever a kube client is built in
/// a process whose dependencies enable more than one rustls backend, as a workspace build with
/// every feature does.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Serve HTTPS (default) or plain HTTP (for debugging with curl).
    pub tls: bool,
    /// Bearer token clients must send; random when `None`.
    pub token: Option<String>,
    /// Where to write the kubeconfig; a temporary file owned by the handle when `None`.
    pub kubeconfig_path: Option<PathBuf>,
    /// IPv4 service CIDR for cluster IPs.
    pub service_cidr: Ipv4Net,
    /// IPv6 service CIDR; `Some` makes the cluster dual-stack.
    pub service_cidr_v6: Option<Ipv6Net>,
    /// First node port.
    pub node_port_min: u16,
    /// Last node port.
    pub node_port_max: u16,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// How many changes are kept for watches to resume from.
    pub history_limit: usize,
    /// Appends one JSON line per request here (see [`crate::audit`]).
    pub audit_log: Option<PathBuf>,
    /// Extra bearer tokens, as (token, user), accepted like `token` and told apart in the audit log.
    pub users: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            token: None,
            kubeconfig_path: None,
            service_cidr: Ipv4Net::new(std::net::Ipv4Addr::new(10, 96, 0, 0), 16).unwrap_or_default(),
            service_cidr_v6: None,
            node_port_min: 30000,
            node_port_max: 32767,
            bookmark_interval: Duration::from_secs(60),
            history_limit: 10_000,
            audit_log: None,
            users: Vec::new(),
        }
    }
}

/// Why the server could not start or a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding or writing the kubeconfig failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Certificates or TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The node port range is empty.
    #[error("invalid node port range {0}-{1}")]
    NodePortRange(u16, u16),
    /// Building a kube client from the kubeconfig failed.
    #[error("kube client: {0}")]
    Kube(String),
}

/// A running server. Dropping it stops the server without waiting; prefer [`FakeApiServer::stop`].
pub struct FakeApiServer {
    addr: SocketAddr,
    url: String,
    token: String,
    ca_pem: Option<String>,
    kubeconfig_path: PathBuf,
    store: Arc<Store>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    _tempdir: Option<tempfile::TempDir>,
}

fn random_token() -> String {
    let bytes: [u8; 24] = crate::meta::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FakeApiServer {
    /// Binds, writes the kubeconfig, and starts serving in the background.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        install_crypto_provider();
        if config.node_port_min > config.node_port_max {
            return Err(StartError::NodePortRange(config.node_port_min, config.node_port_max));
        }
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let token = config.token.clone().unwrap_or_else(random_token);
        let (tls, ca_pem) = if config.tls {
            let material = tls::generate(Some(addr.ip()))?;
            (Some(TlsAcceptor::from(material.server_config)), Some(material.ca_pem))
        } else {
            (None, None)
        };
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let scheme = if config.tls { "https" } else { "http" };
        let url = format!("{scheme}://{host}:{}", addr.port());

        let (tempdir, kubeconfig_path) = match &config.kubeconfig_path {
            Some(p) => (None, p.clone()),
            None => {
                let dir = tempfile::tempdir()?;
                let p = dir.path().join("kubeconfig");
                (Some(dir), p)
            }
        };
        kubeconfig::write(&kubeconfig_path, &kubeconfig::document(&url, ca_pem.as_deref(), &token))?;

        let alloc = ServiceAllocator::new(
            config.service_cidr,
            config.service_cidr_v6,
            config.node_port_min..=config.node_port_max,
        );
        let store = Arc::new(Store::new(alloc, config.history_limit));
        let audit = config.audit_log.as_deref().map(AuditLog::open).transpose()?.map(Arc::new);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = AppState {
            users: Arc::new(Users::new(&token, &config.users)),
            audit,
            store: store.clone(),
            token: token.clone(),
            server_address: format!("{host}:{}", addr.port()),
            bookmark_interval: config.bookmark_interval,
            shutdown: shutdown_rx.clone(),
        };
        let task = tokio::spawn(serve(listener, tls, router(state), shutdown_rx));
        tracing::info!(%url, kubeconfig = %kubeconfig_path.display(), "fake apiserver listening");
        Ok(Self { addr, url, token, ca_pem, kubeconfig_path, store, shutdown, task: Some(task), _tempdir: tempdir })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server URL, e.g. `https://127.0.0.1:40123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// PEM of the CA that signed the serving certificate (`None` for plain HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Where the kubeconfig was written.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// A kube client configured from the written kubeconfig, as any program would make one.
    pub async fn client(&self) -> Result<kube::Client, StartError> {
        install_crypto_provider();
        let kc =
            kube::config::Kubeconfig::read_from(&self.kubeconfig_path).map_err(|e| StartError::Kube(e.to_string()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| StartError::Kube(e.to_string()))?;
        kube::Client::try_from(cfg).map_err(|e| StartError::Kube(e.to_string()))
    }

    /// Forgets all watch history, like etcd compaction: watches resuming from an older
    /// resourceVersion get 410 Gone. For tests of watch recovery.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.current_resource_version()
    }

    /// Stops accepting, ends watches, and waits for open connections to finish.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let app = app.clone();
        let tls = tls.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => serve_connection(s, app, stop).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
                None => serve_connection(stream, app, stop).await,
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<S>(stream: S, app: axum::Router, mut stop: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
