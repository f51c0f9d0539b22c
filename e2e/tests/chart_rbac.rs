//! The chart's RBAC is exactly what the binaries use. The real `hawser-operator` and
//! `hawser-dataplane`, started with the arguments the chart renders, run against the fake API
//! server with its audit log on, each with its own token; a Service goes through its whole life.
//! Then every audited request must be granted by the rules the chart binds to that binary's
//! ServiceAccount, and every granted verb must have been used (or be listed in UNEXERCISED with
//! the reason).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hawser_fake_apiserver::audit::Entry;
use hawser_fake_apiserver::{Config, FakeApiServer, kubeconfig};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const NAMESPACE: &str = "hawser-system";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Granted (user, apiGroup, resource, verb) that the scenario cannot reach, with the reason.
const UNEXERCISED: &[(&str, &str, &str, &str, &str)] = &[];

/// Discovery and health paths every authenticated user may read (`system:discovery`,
/// `system:public-info-viewer`).
fn public_path(path: &str) -> bool {
    ["/api", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Builds both binaries once; returns (operator, dataplane).
fn binaries() -> (PathBuf, PathBuf) {
    hawser_e2e::binaries::build_once().expect("building the binaries");
    let path = |name: &str| hawser_e2e::binaries::binary(name).expect("built");
    (path("hawser-operator"), path("hawser-dataplane"))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, then wait for a clean exit, as the kubelet stops a pod.
    fn terminate(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.0.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn render_chart(python: &Path) -> Vec<Value> {
    let out = Command::new(python)
        .args(["charts/hawser/tests/chartlib.py", "--provider", "mock", "--namespace", NAMESPACE])
        .current_dir(common::repo_root())
        .output()
        .expect("chartlib runs");
    assert!(out.status.success(), "rendering failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn object<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().unwrap().ends_with(name_suffix))
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix} rendered"))
}

/// The container's args, with the flags named in `replace` swapped for the given values.
fn args(workload: &Value, replace: &[(&str, String)]) -> Vec<String> {
    let container = &workload["spec"]["template"]["spec"]["containers"][0];
    let mut out: Vec<String> =
        container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    for (flag, value) in replace {
        let i = out.iter().position(|a| a.split('=').next() == Some(*flag));
        let i = i.unwrap_or_else(|| panic!("the chart renders no {flag}"));
        out[i] = format!("{flag}={value}");
    }
    out
}

/// One RBAC rule, with the namespace it applies in (`None`: cluster-wide).
#[derive(Debug)]
struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

/// Rules the rendered bindings give the ServiceAccount `sa`.
fn rules_for(docs: &[Value], sa: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    for binding in docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") {
        let bound = binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == NAMESPACE);
        if !bound {
            continue;
        }
        let namespace = binding["metadata"]["namespace"].as_str().map(str::to_owned);
        let role =
            object(docs, binding["roleRef"]["kind"].as_str().unwrap(), binding["roleRef"]["name"].as_str().unwrap());
        assert_eq!(role["metadata"]["name"], binding["roleRef"]["name"]);
        for r in role["rules"].as_array().unwrap() {
            rules.push(Rule {
                namespace: namespace.clone(),
                groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                verbs: strings(&r["verbs"]),
                names: strings(&r["resourceNames"]),
            });
        }
    }
    assert!(!rules.is_empty(), "nothing is bound to {sa}");
    rules
}

fn resource_of(e: &Entry) -> Option<String> {
    let r = e.request.resource.as_ref()?;
    Some(match &e.request.subresource {
        Some(s) => format!("{r}/{s}"),
        None => r.clone(),
    })
}

fn grants(rule: &Rule, e: &Entry) -> bool {
    let Some(resource) = resource_of(e) else { return false };
    rule.namespace.as_ref().is_none_or(|ns| e.request.namespace.as_ref() == Some(ns))
        && rule.groups.iter().any(|g| Some(g) == e.request.api_group.as_ref())
        && rule.resources.contains(&resource)
        && rule.verbs.contains(&e.request.verb)
        && (rule.names.is_empty() || e.request.name.as_ref().is_some_and(|n| rule.names.contains(n)))
}

fn kubeconfig_for(server: &FakeApiServer, dir: &Path, user: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{user}.kubeconfig"));
    kubeconfig::write(&path, &kubeconfig::document(server.url(), server.ca_pem(), token)).unwrap();
    path
}

async fn wait_for<T, F: AsyncFnMut() -> Option<T>>(what: &str, mut f: F) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn read_audit(path: &Path) -> Vec<Entry> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_rbac_is_exactly_what_the_binaries_use() {
    let Some(python) = common::venv_python() else { return };
    let docs = render_chart(&python);
    let (operator_bin, dataplane_bin) = binaries();

    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let server = FakeApiServer::start(Config {
        audit_log: Some(audit_path.clone()),
        users: vec![("operator-token".into(), "operator".into()), ("dataplane-token".into(), "dataplane".into())],
        ..Config::default()
    })
    .await
    .unwrap();
    let admin = server.client().await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap())
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
                "spec": {"providerID": "mock://node-a"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}],
                           "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    // The stubs stand in for nft and conntrack: they record what they were asked and succeed.
    let nft_log = dir.path().join("nft.log");
    let stub = dir.path().join("stub.sh");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$0 $*\" >> {log}\ncat >> {log}\nexit 0\n", log = nft_log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let deployment = object(&docs, "Deployment", "-operator");
    let operator_sa = deployment["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap().to_owned();
    let operator_args = args(
        deployment,
        &[
            ("--metrics-bind-address", format!("127.0.0.1:{}", free_port())),
            ("--health-probe-bind-address", format!("127.0.0.1:{}", free_port())),
            // Renewals (Lease update) every second instead of every three.
            ("--leader-election-lease-duration", "5s".to_owned()),
        ],
    );
    assert!(operator_args.iter().any(|a| a == "--leader-elect"), "the chart elects a leader: {operator_args:?}");
    let log_to = || if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() };
    let operator = Proc(
        Command::new(&operator_bin)
            .args(&operator_args)
            .env("KUBECONFIG", kubeconfig_for(&server, dir.path(), "operator", "operator-token"))
            .env("POD_NAME", "hawser-operator-7d4b9-x2x8q")
            .env("POD_NAMESPACE", NAMESPACE)
            .stdout(log_to())
            .stderr(log_to())
            .spawn()
            .unwrap(),
    );

    let daemonset = object(&docs, "DaemonSet", "-dataplane");
    let dataplane_sa = daemonset["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap().to_owned();
    let mut dataplane_args = args(
        daemonset,
        &[
            ("--health-port", free_port().to_string()),
            ("--metrics-bind-address", format!("127.0.0.1:{}", free_port())),
            ("--min-sync-interval-ms", "100".to_owned()),
        ],
    );
    dataplane_args.extend([
        "--health-bind-address=127.0.0.1".to_owned(),
        format!("--nft-command={}", stub.display()),
        format!("--conntrack-command={}", stub.display()),
    ]);
    let dataplane = Proc(
        Command::new(&dataplane_bin)
            .args(&dataplane_args)
            .env("KUBECONFIG", kubeconfig_for(&server, dir.path(), "dataplane", "dataplane-token"))
            .env("NODE_NAME", "node-a")
            .stdout(log_to())
            .stderr(log_to())
            .spawn()
            .unwrap(),
    );

    // A Service's life: load balancer, endpoints, a change, deletion.
    let services: Api<Service> = Api::namespaced(admin.clone(), "default");
    let service = json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "UDP"}]}
    });
    services.create(&PostParams::default(), &serde_json::from_value(service).unwrap()).await.unwrap();
    let ip = wait_for("the load-balancer address", async || {
        let svc = services.get("web").await.ok()?;
        svc.status?.load_balancer?.ingress?.first()?.ip.clone()
    })
    .await;
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), "default");
    let slice = json!({
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true, "serving": true}, "nodeName": "node-a"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "UDP"}]
    });
    slices.create(&PostParams::default(), &serde_json::from_value(slice).unwrap()).await.unwrap();
    wait_for("the dataplane to program the load-balancer address", async || {
        std::fs::read_to_string(&nft_log).ok().filter(|t| t.contains(&ip) && t.contains("10.244.0.5")).map(|_| ())
    })
    .await;
    // The endpoint goes away: the dataplane clears its UDP flows (conntrack).
    slices.delete("web-abc", &DeleteParams::default()).await.unwrap();
    wait_for("conntrack cleanup of the UDP endpoint", async || {
        std::fs::read_to_string(&nft_log).ok().filter(|t| t.contains("-D") && t.contains("10.244.0.5")).map(|_| ())
    })
    .await;
    // A second port: the operator ensures again, and its repeated Event becomes a series (patch).
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "UDP"},
                {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}]}})),
        )
        .await
        .unwrap();
    wait_for("the Event series", async || {
        read_audit(&audit_path)
            .iter()
            .any(|e| {
                e.user.as_deref() == Some("operator")
                    && e.request.resource.as_deref() == Some("events")
                    && e.request.verb == "patch"
            })
            .then_some(())
    })
    .await;
    services.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("the Service to be gone after cleanup", async || {
        services.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    wait_for("a Lease renewal", async || {
        read_audit(&audit_path)
            .iter()
            .any(|e| {
                e.user.as_deref() == Some("operator")
                    && e.request.resource.as_deref() == Some("leases")
                    && e.request.verb == "update"
            })
            .then_some(())
    })
    .await;
    operator.terminate();
    dataplane.terminate();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let lease = leases.get("hawser-operator").await.expect("the Lease the chart names exists");
    // Held by the pod, or released on SIGTERM (run.rs aborts the renewal task before releasing, so
    // today the Lease is left to expire; either way it is the Lease the chart's Role names).
    let holder = lease.spec.unwrap().holder_identity;
    assert!(holder.is_none() || holder.as_deref() == Some("hawser-operator-7d4b9-x2x8q"), "{holder:?}");
    drop(admin);
    server.stop().await;

    let entries = read_audit(&audit_path);
    let mut failures = Vec::new();
    for (user, sa) in [("operator", &operator_sa), ("dataplane", &dataplane_sa)] {
        let rules = rules_for(&docs, sa);
        let requests: Vec<&Entry> = entries.iter().filter(|e| e.user.as_deref() == Some(user)).collect();
        assert!(requests.len() > 5, "{user} made only {} requests", requests.len());
        // Each binary names itself, so an API server's audit log tells its requests apart.
        let agent = format!("hawser-{user}/");
        let anonymous: Vec<&Option<String>> = requests
            .iter()
            .map(|e| &e.user_agent)
            .filter(|a| !a.as_deref().is_some_and(|a| a.starts_with(&agent)))
            .collect();
        assert!(anonymous.is_empty(), "{user} requests without the User-Agent {agent}…: {anonymous:?}");
        for e in &requests {
            if let Some(path) = &e.request.path {
                if !public_path(path) {
                    failures.push(format!("{user}: {} {path} is not a public path", e.request.verb));
                }
                continue;
            }
            if !rules.iter().any(|r| grants(r, e)) {
                failures.push(format!("{user}: not granted by the chart: {:?}", e.request));
            }
        }
        for rule in &rules {
            for group in &rule.groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        let used = requests.iter().any(|e| {
                            e.request.api_group.as_ref() == Some(group)
                                && resource_of(e).as_ref() == Some(resource)
                                && &e.request.verb == verb
                                && grants(rule, e)
                        });
                        let excused = UNEXERCISED
                            .iter()
                            .any(|(u, g, r, v, _why)| *u == user && g == group && r == resource && v == verb);
                        if !used && !excused {
                            failures.push(format!(
                                "{user}: the chart grants {verb} on {group}/{resource} but no request used it"
                            ));
                        }
                    }
                }
            }
        }
    }
    let summary: std::collections::BTreeSet<String> = entries
        .iter()
        .filter(|e| e.user.as_deref() != Some("admin"))
        .map(|e| {
            format!(
                "{:>9} {:>6} {}",
                e.user.as_deref().unwrap_or("-"),
                e.request.verb,
                resource_of(e).or(e.request.path.clone()).unwrap_or_default()
            )
        })
        .collect();
    println!("requests by the binaries:\n{}", summary.into_iter().collect::<Vec<_>>().join("\n"));
    assert!(failures.is_empty(), "RBAC and the binaries disagree:\n{}", failures.join("\n"));
}

#[test]
fn rule_matching_follows_rbac() {
    let entry = |verb: &str, resource: &str, namespace: Option<&str>, name: Option<&str>| -> Entry {
        serde_json::from_value(json!({
            "verb": verb, "apiGroup": "coordination.k8s.io", "resource": resource, "subresource": null,
            "namespace": namespace, "name": name, "path": null, "user": "operator", "userAgent": null, "code": 200
        }))
        .unwrap()
    };
    let rule = Rule {
        namespace: Some(NAMESPACE.to_owned()),
        groups: vec!["coordination.k8s.io".to_owned()],
        resources: vec!["leases".to_owned()],
        verbs: vec!["get".to_owned(), "update".to_owned()],
        names: vec!["hawser-operator".to_owned()],
    };
    assert!(grants(&rule, &entry("get", "leases", Some(NAMESPACE), Some("hawser-operator"))));
    assert!(!grants(&rule, &entry("get", "leases", Some(NAMESPACE), Some("other"))), "resourceNames");
    assert!(!grants(&rule, &entry("get", "leases", Some("default"), Some("hawser-operator"))), "Role namespace");
    assert!(!grants(&rule, &entry("create", "leases", Some(NAMESPACE), None)), "verb");
    assert!(!grants(&rule, &entry("get", "leases/status", Some(NAMESPACE), Some("hawser-operator"))), "subresource");
}
