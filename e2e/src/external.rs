//! An existing API server for the local backend (`HAWSER_E2E_KUBECONFIG`): a real
//! kube-apiserver, or any cluster's, instead of the fake one.
//!
//! What the fake does for the harness has to be done here instead:
//! - the node namespaces cannot reach a server on the host's loopback (or any address outside
//!   the harness's links), so each node gets a forwarder listening inside its namespace on the
//!   kubeconfig's server address, which connects from the host: the dataplanes use the
//!   kubeconfig unchanged, credentials and certificate names included;
//! - nothing the suite made may outlive it: namespaces and Nodes carry [`LABEL`] and are
//!   removed when the cluster goes (also after a panic) and, for runs that crashed, when the
//!   next one starts. Without a namespace controller (no controller-manager) a deleted
//!   namespace stays Terminating for ever, so its contents are deleted here and the namespace
//!   finalized, as that controller would;
//! - one cluster at a time per machine uses the server (a lock under `/run/hawser-e2e/`): every
//!   cluster's operator watches every namespace, and the Nodes have fixed names.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope, verbs};
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::netns::{Netns, in_netns};

/// Label (value `"true"`) on every namespace and Node the suite creates in a cluster.
pub const LABEL: &str = "hawser.dev/e2e";

/// How long the removal of what the suite made may take.
const SWEEP_LIMIT: Duration = Duration::from_secs(60);

/// The API server of a kubeconfig, while this process is the only local cluster using it.
pub struct ExternalApiServer {
    kubeconfig: PathBuf,
    servers: Vec<SocketAddr>,
    _lock: Flock<File>,
}

impl ExternalApiServer {
    /// Waits until no other local cluster on this machine uses an existing API server, then
    /// removes what crashed runs left there.
    pub async fn acquire(kubeconfig: &Path) -> anyhow::Result<(Self, kube::Client)> {
        let dir = Path::new("/run/hawser-e2e");
        std::fs::create_dir_all(dir).context("creating /run/hawser-e2e")?;
        let file = File::create(dir.join("external.lock"))?;
        let lock = tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
            .await?
            .map_err(|(_, e)| anyhow::anyhow!("locking /run/hawser-e2e/external.lock: {e}"))?;
        let (client, servers) = connect(kubeconfig).await?;
        sweep(&client).await.context("removing what an earlier run left in the cluster")?;
        Ok((Self { kubeconfig: kubeconfig.to_path_buf(), servers, _lock: lock }, client))
    }

    /// The kubeconfig the harness, the operator and the dataplanes use.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Makes the server reachable from inside `ns` at the address the kubeconfig names.
    pub fn forward_into(&self, ns: &Netns) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        for addr in &self.servers {
            if let IpAddr::V4(v4) = addr.ip()
                && !v4.is_loopback()
            {
                ns.exec(&["ip", "addr", "add", &format!("{v4}/32"), "dev", "lo"])?;
            }
            let at = *addr;
            let listener = in_netns(Some(&ns.name), move || -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(at)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("listening on {at} in {}", ns.name))?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.push(tokio::spawn(async move {
                while let Ok((mut inner, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut outer) = tokio::net::TcpStream::connect(at).await {
                            let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                        }
                    });
                }
            }));
        }
        Ok(tasks)
    }

    /// Removes what the suite made, from a thread of its own: this runs in `Drop`, maybe while
    /// a panic unwinds, inside a runtime that must not be blocked on.
    pub fn sweep_blocking(&self) {
        let kubeconfig = self.kubeconfig.clone();
        let done = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let (client, _) = connect(&kubeconfig).await?;
                tokio::time::timeout(SWEEP_LIMIT, sweep(&client)).await.context("timed out")?
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("hawser-e2e: removing the suite's objects from the cluster: {e:#}"),
            Err(_) => eprintln!("hawser-e2e: removing the suite's objects from the cluster panicked"),
        }
    }
}

/// A client of the kubeconfig's current context, and the addresses of its server.
async fn connect(kubeconfig: &Path) -> anyhow::Result<(kube::Client, Vec<SocketAddr>)> {
    hawser_fake_apiserver::server::install_crypto_provider();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let url = config.cluster_url.clone();
    let host = url.host().context("kubeconfig server without a host")?.trim_matches(['[', ']']);
    let port = url.port_u16().unwrap_or(if url.scheme_str() == Some("http") { 80 } else { 443 });
    let servers: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, port)]
    } else if host == "localhost" {
        vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)]
    } else {
        tokio::net::lookup_host((host, port)).await?.filter(SocketAddr::is_ipv4).collect()
    };
    if servers.is_empty() {
        bail!("no IPv4 address for the kubeconfig's server {url}");
    }
    Ok((kube::Client::try_from(config)?, servers))
}

/// Deletes every Node and namespace labelled [`LABEL`], with the namespaces' contents.
async fn sweep(client: &kube::Client) -> anyhow::Result<()> {
    let labelled = ListParams::default().labels(&format!("{LABEL}=true"));
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&labelled).await? {
        let name = n.metadata.name.unwrap_or_default();
        ignore_gone(nodes.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = namespaces.list(&labelled).await?;
    if list.items.is_empty() {
        return Ok(());
    }
    let discovery = Discovery::new(client.clone()).run().await?;
    for ns in list {
        let name = ns.metadata.name.clone().unwrap_or_default();
        // Terminating first: nothing new is created in it while it is emptied.
        ignore_gone(namespaces.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if caps.scope != Scope::Namespaced
                    || !caps.supports_operation(verbs::LIST)
                    || !caps.supports_operation(verbs::DELETE)
                {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &name, &ar);
                let Ok(objects) = api.list(&ListParams::default()).await else { continue };
                for o in objects {
                    let oname = o.metadata.name.clone().unwrap_or_default();
                    // No controller of ours runs any more to remove its finalizer.
                    if o.metadata.finalizers.as_ref().is_some_and(|f| !f.is_empty()) {
                        let unfinalize = json!({"metadata": {"finalizers": null}});
                        let patched = api.patch(&oname, &PatchParams::default(), &Patch::Merge(&unfinalize)).await;
                        ignore_gone(patched.map(|_| ()))?;
                    }
                    ignore_gone(api.delete(&oname, &DeleteParams::default()).await.map(|_| ()))?;
                }
            }
        }
        // What the namespace controller does once the namespace is empty.
        if let Some(mut ns) = namespaces.get_opt(&name).await? {
            if let Some(spec) = ns.spec.as_mut() {
                spec.finalizers = None;
            }
            ignore_gone(
                namespaces.replace_subresource("finalize", &name, &PostParams::default(), &ns).await.map(|_| ()),
            )?;
        }
    }
    Ok(())
}

fn ignore_gone(r: kube::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        other => Ok(other?),
    }
}
