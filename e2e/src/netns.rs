//! Network namespaces and commands: the building blocks of the local backend's topology.

use std::fs::File;
use std::process::Command;

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Runs a command and returns its stdout; an error carries the command and its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let (cmd, rest) = args.split_first().context("empty command")?;
    let out = Command::new(cmd).args(rest).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command whose failure is expected at times (cleanup of things that may be gone).
pub fn sh_quiet(args: &[&str]) {
    if let Some((cmd, rest)) = args.split_first() {
        let _ = Command::new(cmd).args(rest).output();
    }
}

/// Runs `f` on a fresh thread that has entered netns `ns` (or stays in the caller's one for
/// `None`). Sockets created there belong to that namespace for their whole life, wherever they
/// are used afterwards.
pub fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let ns = ns.map(str::to_owned);
    std::thread::spawn(move || -> anyhow::Result<T> {
        if let Some(ns) = ns {
            enter(&ns)?;
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Moves the calling thread into netns `ns`; only for threads made for that purpose.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {ns}"))?;
    Ok(())
}

/// Names of the existing network namespaces that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let out = sh(&["ip", "netns", "list"]).unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Deletes netns `name` after killing what still runs inside it. Only namespaces this crate
/// created are passed here, so everything inside was started by it (possibly by an earlier run
/// that crashed).
pub fn delete(name: &str) {
    if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    sh_quiet(&["ip", "netns", "del", name]);
}

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates `name` with loopback up and IPv4 forwarding as given.
    pub fn create(name: &str, forwarding: bool) -> anyhow::Result<Self> {
        sh(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        let fwd = if forwarding { "net.ipv4.ip_forward=1" } else { "net.ipv4.ip_forward=0" };
        ns.exec(&["sysctl", "-qw", fwd])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Connects two namespaces with a veth pair made directly inside them, so interface names only
/// need to be unique per namespace (`None` is the caller's own namespace).
pub fn veth(a: Option<&str>, a_if: &str, b: &str, b_if: &str) -> anyhow::Result<()> {
    let mut args = vec!["ip", "link", "add", a_if];
    if let Some(a) = a {
        args.extend(["netns", a]);
    }
    args.extend(["type", "veth", "peer", "name", b_if, "netns", b]);
    sh(&args)?;
    Ok(())
}

/// Whether the host has what the local backend needs (root, ip, nft, conntrack). Missing
/// prerequisites fail under `CI=true` and skip with a printed reason otherwise.
pub fn prerequisites() -> Result<(), String> {
    let root = nix::unistd::Uid::effective().is_root();
    let tool = |t: &str, arg: &str| Command::new(t).arg(arg).output().is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = [
        (!root).then_some("root"),
        (!tool("ip", "-V")).then_some("ip (iproute2)"),
        (!tool("nft", "--version")).then_some("nft (nftables)"),
        (!tool("conntrack", "--version")).then_some("conntrack"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() { Ok(()) } else { Err(format!("missing {}", missing.join(", "))) }
}
