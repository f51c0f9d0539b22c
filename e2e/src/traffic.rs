//! Real traffic: a client that reports what a user would notice, and an echo server speaking
//! the subset of agnhost `netexec` the suite uses, so the same client works on kind.
//!
//! `netexec` protocol: HTTP `GET /hostname` answers the pod name, `GET /clientip` the peer as
//! `ip:port`; a UDP datagram `hostname` or `clientip` gets the same answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use crate::netns;

/// TCP port of the echo server (netexec's default `--http-port`).
pub const HTTP_PORT: u16 = 8080;
/// UDP port of the echo server (netexec's default `--udp-port`).
pub const UDP_PORT: u16 = 8081;

/// What one request observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An answer (the body, trimmed).
    Reply(String),
    /// Refused: TCP reset or ICMP unreachable.
    Refused,
    /// Nothing came back in time (dropped).
    Timeout,
    /// Anything else.
    Other(String),
}

impl Outcome {
    /// The reply's text, if it is one.
    pub fn reply(&self) -> Option<&str> {
        match self {
            Outcome::Reply(s) => Some(s),
            _ => None,
        }
    }
}

/// Where requests come from: a netns (local backend) or the runner itself (kind), optionally
/// from a chosen source address.
#[derive(Debug, Clone)]
pub struct Client {
    /// Namespace the sockets are made in; `None` is the caller's.
    pub netns: Option<String>,
    /// Source address to bind.
    pub source: Option<IpAddr>,
    /// How long one request may take before it counts as dropped.
    pub timeout: Duration,
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable => Outcome::Refused,
        TimedOut | WouldBlock => Outcome::Timeout,
        _ => Outcome::Other(e.to_string()),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

impl Client {
    /// A client in `netns` with the default timeout.
    pub fn new(netns: Option<&str>, source: Option<IpAddr>) -> Self {
        Self { netns: netns.map(str::to_owned), source, timeout: Duration::from_millis(1500) }
    }

    /// One HTTP GET of `path` at `addr:port`.
    pub async fn http(&self, addr: IpAddr, port: u16, path: &str) -> Outcome {
        let (me, path) = (self.clone(), path.to_owned());
        self.blocking(move || me.http_now(SocketAddr::new(addr, port), &path)).await
    }

    /// One UDP exchange: sends `msg` to `addr:port`, returns the answer.
    pub async fn udp(&self, addr: IpAddr, port: u16, msg: &str) -> Outcome {
        let (me, msg) = (self.clone(), msg.to_owned());
        self.blocking(move || me.udp_now(SocketAddr::new(addr, port), &msg)).await
    }

    async fn blocking(&self, f: impl FnOnce() -> Outcome + Send + 'static) -> Outcome {
        let ns = self.netns.clone();
        match tokio::task::spawn_blocking(move || netns::in_netns(ns.as_deref(), f)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Outcome::Other(format!("{e:#}")),
            Err(e) => Outcome::Other(e.to_string()),
        }
    }

    /// Blocking HTTP GET from the current thread's namespace.
    pub fn http_now(&self, dst: SocketAddr, path: &str) -> Outcome {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => return Outcome::Other(e.to_string()),
        };
        let source = self.source;
        let fut = async move {
            let sock = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            if let Some(src) = source {
                sock.bind(SocketAddr::new(src, 0))?;
            }
            let mut stream = sock.connect(dst).await?;
            let req = format!("GET {path} HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
            stream.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match rt.block_on(async { tokio::time::timeout(self.timeout, fut).await }) {
            Err(_) => Outcome::Timeout,
            Ok(Err(e)) => classify(&e),
            Ok(Ok(text)) => match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => {
                    Outcome::Reply(body.trim().to_owned())
                }
                _ => Outcome::Other(format!("unexpected answer {text:?}")),
            },
        }
    }

    /// Blocking UDP exchange from the current thread's namespace.
    pub fn udp_now(&self, dst: SocketAddr, msg: &str) -> Outcome {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => return Outcome::Other(e.to_string()),
        };
        let bind = match (self.source, dst.is_ipv4()) {
            (Some(src), _) => SocketAddr::new(src, 0),
            (None, true) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (None, false) => SocketAddr::from(([0u16; 8], 0)),
        };
        let msg = msg.to_owned();
        let fut = async move {
            let sock = UdpSocket::bind(bind).await?;
            sock.connect(dst).await?;
            sock.send(msg.as_bytes()).await?;
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        };
        match rt.block_on(async { tokio::time::timeout(self.timeout, fut).await }) {
            Err(_) => Outcome::Timeout,
            Ok(Err(e)) => classify(&e),
            Ok(Ok(text)) => Outcome::Reply(text),
        }
    }

    /// Sends HTTP requests back to back until the returned handle is stopped, and counts how
    /// they ended: the steady load of a rolling replacement.
    ///
    /// A request is lost when it gets no answer within [`LOAD_TIMEOUT`], which leaves room for
    /// the client's TCP to resend its SYN twice (after 1 s and 3 s), as any client's would. A
    /// request that needed a resend is answered, but recorded in [`LoadReport::slow`].
    pub fn steady_load(&self, addr: IpAddr, port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let me = Self { timeout: LOAD_TIMEOUT, ..self.clone() };
        let flag = stop.clone();
        let ns = self.netns.clone();
        let handle = std::thread::spawn(move || {
            let mut report = LoadReport::default();
            if let Some(ns) = ns
                && let Err(e) = netns::enter(&ns)
            {
                report.failures.push(format!("{e:#}"));
                return report;
            }
            let started = std::time::Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let sent = started.elapsed();
                let outcome = me.http_now(SocketAddr::new(addr, port), "/hostname");
                let took = started.elapsed() - sent;
                let when = || {
                    format!(
                        "sent {:.2}s into the load, at {}, after {:.2}s",
                        sent.as_secs_f64(),
                        utc_at(std::time::SystemTime::now() - took),
                        took.as_secs_f64()
                    )
                };
                match outcome {
                    Outcome::Reply(name) => {
                        report.ok += 1;
                        if took >= SLOW {
                            report.slow.push(format!("{name} ({})", when()));
                        }
                        if !report.backends.contains(&name) {
                            report.backends.push(name);
                        }
                    }
                    other => report.failures.push(format!("{other:?} ({})", when())),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            report
        });
        Load { stop, handle }
    }
}

/// How long a request of a steady load may take before it counts as lost.
pub const LOAD_TIMEOUT: Duration = Duration::from_millis(3500);

/// A request that took this long needed its SYN resent.
const SLOW: Duration = Duration::from_millis(900);

/// A running steady load.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<LoadReport>,
}

/// How a steady load went.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests answered.
    pub ok: usize,
    /// Requests that were not answered, with how they ended.
    pub failures: Vec<String>,
    /// Requests answered only after the client resent its SYN (a second or more).
    pub slow: Vec<String>,
    /// Backends that answered, in order of first answer.
    pub backends: Vec<String>,
}

impl Load {
    /// Stops the load and returns what it saw.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.handle.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| LoadReport { failures: vec!["load thread panicked".into()], ..Default::default() })
    }
}

/// An echo server running on its own thread inside a pod's netns; stops on drop.
pub struct EchoServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts answering as `name` on [`HTTP_PORT`] and [`UDP_PORT`] in `ns`; returns once both
    /// sockets are bound.
    pub fn start(ns: &str, name: &str) -> anyhow::Result<Self> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (ns, name) = (ns.to_owned(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let setup = netns::enter(&ns).and_then(|()| Ok(runtime()?));
            let rt = match setup {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = async {
                    let tcp = TcpListener::bind(("0.0.0.0", HTTP_PORT)).await?;
                    let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).await?;
                    Ok::<_, std::io::Error>((tcp, udp))
                }
                .await;
                let (tcp, udp) = match bound {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                tokio::select! {
                    () = serve_http(tcp, name.clone()) => {}
                    () = serve_udp(udp, name) => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv().map_err(|_| anyhow::anyhow!("echo server thread ended"))??;
        Ok(Self { stop: Some(stop_tx), thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(name: &str, what: &str, peer: SocketAddr) -> String {
    match what {
        "hostname" => name.to_owned(),
        "clientip" => format!("{}:{}", peer.ip().to_canonical(), peer.port()),
        other => format!("unknown command {other:?}"),
    }
}

async fn serve_http(listener: TcpListener, name: String) {
    while let Ok((mut conn, peer)) = listener.accept().await {
        let name = name.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let body = answer(&name, path.trim_start_matches('/'), peer);
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn serve_udp(sock: UdpSocket, name: String) {
    let mut buf = [0u8; 512];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        let what = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        let _ = sock.send_to(answer(&name, &what, peer).as_bytes(), peer).await;
    }
}

/// The time now, as the binaries' logs write it (`HH:MM:SS.mmm`, UTC).
pub fn utc_now() -> String {
    utc_at(std::time::SystemTime::now())
}

/// `at` as `HH:MM:SS.mmm` UTC.
pub fn utc_at(at: std::time::SystemTime) -> String {
    let ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let day_ms = ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}Z", day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000)
}
