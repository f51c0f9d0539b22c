//! The real `hawser-sandbox` binary as a person uses it: it serves from this machine; a second
//! one refuses and leaves the first working; Ctrl-C and SIGTERM leave nothing behind; SIGKILL
//! leaves no running child, and the next start clears what it left. One test, in order: there
//! is one sandbox slot per machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hawser_e2e::local::{self, SlotBusy};
use hawser_e2e::{binaries, netns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const STATE_DIR: &str = "/run/hawser-sandbox-test";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A running `hawser-sandbox`; interrupted (then killed) on drop, so a failing test cleans up.
struct Sandbox {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
}

impl Sandbox {
    fn spawn() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hawser-sandbox"))
            .args(["--state-dir", STATE_DIR])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting hawser-sandbox");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self { child, lines, output: Vec::new() }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Waits for the ready banner; returns the load-balancer address it printed.
    fn ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut addr = None;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(a) = line.trim().strip_prefix("load-balancer address:") {
                        addr = Some(a.trim().to_owned());
                    }
                    let done = line.starts_with("Ctrl-C stops it");
                    self.output.push(line);
                    if done {
                        return addr.expect("a load-balancer address before the banner's end");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("hawser-sandbox not ready; it printed:\n{}", self.output.join("\n"));
    }

    /// Waits for it to exit; returns its status and everything it printed.
    fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The readers end with the pipes.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.output.push(line);
                }
                return (status, self.output.join("\n"));
            }
            assert!(Instant::now() < deadline, "hawser-sandbox still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(self.pid(), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The body of `GET /hostname` on port 80 of `addr`, from this machine.
fn hostname(addr: &str) -> String {
    let mut conn = TcpStream::connect_timeout(&format!("{addr}:80").parse().unwrap(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}:80: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /hostname HTTP/1.0\r\nHost: sandbox\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// Every answer of `n` requests comes from a demo backend.
fn serves(addr: &str, n: usize) {
    for _ in 0..n {
        let name = hostname(addr);
        assert!(name.starts_with("demo-"), "unexpected answer {name:?} from {addr}");
    }
}

/// The sandbox's child processes, as it records them.
fn children() -> Vec<i32> {
    let text = std::fs::read_to_string(Path::new(STATE_DIR).join("pids")).expect("the sandbox's pids file");
    text.split_whitespace().map(|p| p.parse().unwrap()).collect()
}

/// Running (a zombie waiting for a parent to reap it is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn wait_dead(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let running: Vec<String> = pids
        .iter()
        .filter(|p| alive(**p))
        .map(|p| format!("{p} ({})", std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim()))
        .collect();
    assert!(running.is_empty(), "still running: {running:?}");
}

/// Nothing of a sandbox is left on this machine.
fn assert_clean(pids: &[i32]) {
    wait_dead(pids);
    let mut left = netns::list("hws-");
    let out = |args: &[&str]| netns::sh(args).unwrap_or_default().trim().to_owned();
    if !out(&["ip", "link", "show", "hws-h"]).is_empty() {
        left.push("host link hws-h".into());
    }
    for route in ["203.0.113.0/24", "10.231.0.0/22"] {
        if !out(&["ip", "route", "show", route]).is_empty() {
            left.push(format!("route to {route}"));
        }
    }
    for path in ["/run/hawser-e2e/slot-0.lock", STATE_DIR] {
        if PathBuf::from(path).exists() {
            left.push(path.into());
        }
    }
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sandbox_refuses_a_second_one_and_leaves_nothing_behind() {
    if let Err(why) = netns::prerequisites() {
        assert!(!ci(), "CI is set but the sandbox cannot run: {why}");
        eprintln!("skipping the sandbox test: {why}");
        return;
    }
    // Slot 0 is the sandbox's; a person's sandbox on this machine is not the test's to stop.
    match local::lock_slot(Some(0)) {
        Ok(lock) => drop(lock),
        Err(e) if e.downcast_ref::<SlotBusy>().is_some() && !ci() => {
            eprintln!("skipping the sandbox test: a sandbox is running ({e})");
            return;
        }
        Err(e) => panic!("{e:#}"),
    }
    binaries::build_once().expect("building hawser-operator and hawser-dataplane");

    // It serves from this machine.
    let mut first = Sandbox::spawn();
    let addr = first.ready();
    serves(&addr, 10);
    let pids = children();
    assert!(pids.len() >= 3, "operator and two dataplanes expected, got {pids:?}");

    // A second one refuses, says which one runs, and touches nothing.
    let mut second = Sandbox::spawn();
    let (status, output) = second.wait(Duration::from_secs(20));
    assert!(!status.success(), "a second sandbox started:\n{output}");
    let holder = format!("another sandbox is running (pid {})", first.pid());
    assert!(output.contains(&holder), "no clear refusal:\n{output}");
    assert!(!output.contains("Some("), "debug formatting in:\n{output}");
    serves(&addr, 10);
    assert!(pids.iter().all(|p| alive(*p)), "the first sandbox lost a child: {pids:?}");
    assert!(Path::new(STATE_DIR).join("kubeconfig").exists(), "the first sandbox's files were removed");

    // Ctrl-C removes everything.
    first.signal(Signal::SIGINT);
    let (status, output) = first.wait(Duration::from_secs(30));
    assert!(status.success(), "exit after SIGINT: {status}\n{output}");
    assert_clean(&pids);

    // SIGKILL leaves no running child (operator, dataplanes; the fake apiserver and the echo
    // backends live in the sandbox's own process).
    let mut killed = Sandbox::spawn();
    killed.ready();
    let mut pids = children();
    pids.push(killed.pid().as_raw());
    killed.signal(Signal::SIGKILL);
    killed.wait(Duration::from_secs(10));
    wait_dead(&pids);

    // The next start clears what it left, serves, and SIGTERM removes everything.
    let mut next = Sandbox::spawn();
    let addr = next.ready();
    serves(&addr, 5);
    let pids = children();
    next.signal(Signal::SIGTERM);
    let (status, output) = next.wait(Duration::from_secs(30));
    assert!(status.success(), "exit after SIGTERM: {status}\n{output}");
    assert_clean(&pids);
}
