//! Helpers shared by the operator's integration tests.

// Each test file compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

pub mod campaign;

/// How long a test waits for something the operator should do before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A local port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `probe` every 100 ms until it answers, failing the test after [`TIMEOUT`].
pub async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The IPs in a Service's `status.loadBalancer.ingress`.
pub fn ingress_ips(svc: &k8s_openapi::api::core::v1::Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|e| e.ip.clone()).collect())
        .unwrap_or_default()
}

/// The operator (or another child process) under test, SIGKILLed when dropped.
pub struct Operator(pub std::process::Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A LoadBalancer Service `name` of class `hawser.dev/lb` with one port, 80 → 8080.
pub fn lb_service(name: &str) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap()
}
