//! Reconcile against a mocked API server, asserting the exact requests, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use hawser_providers::mock::{MockCloud, MockConfig, RecordedCall};
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::testutil::merge;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request: method, path (without query), and a check of the JSON body.
struct Expect {
    method: Method,
    path: String,
    check: Box<dyn FnOnce(&Value) + Send>,
    reply: Box<dyn FnOnce(Value) -> Value + Send>,
}

fn expect(method: Method, path: &str, check: impl FnOnce(&Value) + Send + 'static) -> Expect {
    // Service patches answer with a Service (its content is not read back); Events are echoed.
    let is_service = path.contains("/services/");
    let reply = move |body: Value| {
        if is_service {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}})
        } else {
            body
        }
    };
    Expect { method, path: path.to_owned(), check: Box::new(check), reply: Box::new(reply) }
}

fn event(reason: &'static str, type_: &'static str) -> Expect {
    expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", move |body| {
        assert_eq!(body["reason"], reason, "{body}");
        assert_eq!(body["type"], type_, "{body}");
        assert_eq!(body["regarding"]["name"], "web");
    })
}

/// The same Event again (same reason and message): it counts the series up instead of creating one.
fn event_again() -> Expect {
    expect(Method::PATCH, "/apis/events.k8s.io/v1/namespaces/shop/events/", |body| {
        assert!(body["series"]["count"].as_u64().is_some_and(|n| n >= 2), "{body}");
    })
}

/// Answers the expected requests in order; fails on anything else, including any request after them.
async fn verify(mut handle: Handle, script: Vec<Expect>) {
    for step in script {
        let Some((request, send)) = handle.next_request().await else {
            panic!("{} {} was expected but the reconcile ended without it", step.method, step.path);
        };
        assert_eq!(request.method(), step.method, "unexpected {} {}", request.method(), request.uri());
        let path = request.uri().path();
        let matches = if step.path.ends_with('/') { path.starts_with(&step.path) } else { path == step.path };
        assert!(matches, "unexpected {} {}, expected {}", request.method(), request.uri(), step.path);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (step.check)(&body);
        let reply = (step.reply)(body);
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
    }
    if let Some((request, _)) = handle.next_request().await {
        panic!("unexpected extra request {} {}", request.method(), request.uri());
    }
}

fn service(patch: Value) -> Arc<Service> {
    let mut base = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1", "generation": 1, "resourceVersion": "10"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "hawser.dev/lb",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
            "externalTrafficPolicy": "Cluster"
        }
    });
    merge(&mut base, patch);
    Arc::new(serde_json::from_value(base).unwrap())
}

fn with_finalizer(patch: Value) -> Arc<Service> {
    let mut p = json!({"metadata": {"finalizers": ["hawser.dev/cleanup"]}});
    merge(&mut p, patch);
    service(p)
}

struct Harness {
    ctx: Arc<Context>,
    cloud: MockCloud,
    handle: Option<Handle>,
}

fn harness(cloud: MockCloud) -> Harness {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (_, targets) = watch::channel(crate::testutil::one_target());
    let settings = Settings {
        class: "hawser.dev/lb".into(),
        desired: DesiredConfig { capabilities: cloud.capabilities(), ..crate::testutil::mock_desired_config() },
        node_policy: NodePolicy::default(),
        resync_period: Duration::from_secs(600),
    };
    let events = EventPublisher::new(client.clone(), "hawser-operator", None);
    let retry = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(300), Duration::from_secs(600), Some(1));
    let mut ctx =
        Context::new(client, Arc::new(cloud.clone()), targets, settings, events, Arc::new(Metrics::new()), retry);
    ctx.now = || "2026-11-26T10:00:00Z".parse().unwrap();
    Harness { ctx: Arc::new(ctx), cloud, handle: Some(handle) }
}

fn cloud() -> MockCloud {
    MockCloud::new(MockConfig::new("demo")).unwrap()
}

impl Harness {
    /// Runs one reconcile against the script; returns its result once every request was checked.
    async fn run(&mut self, svc: Arc<Service>, script: Vec<Expect>) -> Result<Action, Error> {
        let handle = self.handle.take().unwrap();
        let verifier = tokio::spawn(verify(handle, script));
        let result = tokio::time::timeout(Duration::from_secs(10), reconcile(svc, self.ctx.clone()))
            .await
            .expect("reconcile hung");
        // Dropping the context drops every client clone, which ends the verifier's stream.
        self.ctx = dummy_ctx();
        verifier.await.unwrap();
        result
    }

    fn cloud_writes(&self) -> Vec<&'static str> {
        self.cloud.calls().into_iter().filter(RecordedCall::is_mutating).map(|c| c.operation).collect()
    }
}

fn dummy_ctx() -> Arc<Context> {
    harness(cloud()).ctx
}

fn finalizer_added(body: &Value) {
    assert_eq!(
        body,
        &json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["hawser.dev/cleanup"]}
        ])
    );
}

#[tokio::test]
async fn finalizer_is_added_before_any_cloud_call() {
    let mut h = harness(cloud());
    let script = vec![expect(Method::PATCH, "/api/v1/namespaces/shop/services/web", finalizer_added)];
    let action = h.run(service(json!({})), script).await.unwrap();
    assert_eq!(action, Action::await_change(), "the patch itself triggers the next reconcile");
    assert!(h.cloud.calls().is_empty(), "no cloud call before the finalizer is in place");
}

#[tokio::test]
async fn ensure_writes_ingress_condition_and_events_then_a_second_reconcile_writes_nothing() {
    let mut h = harness(cloud());
    let status_seen = Arc::new(std::sync::Mutex::new(Value::Null));
    let seen = status_seen.clone();
    let script = vec![
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", move |body| {
            assert_eq!(
                body["status"]["loadBalancer"]["ingress"],
                json!([{"ip": "203.0.113.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]}])
            );
            let cond = &body["status"]["conditions"][0];
            assert_eq!(cond["type"], "hawser.dev/LoadBalancerReady");
            assert_eq!(cond["status"], "True");
            assert_eq!(cond["observedGeneration"], 1);
            *seen.lock().unwrap() = body.clone();
        }),
        event("EnsuredLoadBalancer", "Normal"),
    ];
    let action = h.run(with_finalizer(json!({})), script).await.unwrap();
    assert_eq!(action, Action::await_change(), "no polling: changes and the drift check wake it");
    assert_eq!(h.cloud_writes(), vec!["CreateLoadBalancer"]);
    let lb = &h.cloud.load_balancers()[0];
    assert_eq!(lb.targets[0].name, "node-a");
    assert_eq!(lb.health_check.path.as_deref(), Some("/healthz"));

    // The Service now carries what was written: reconciling again makes no write anywhere.
    let written = status_seen.lock().unwrap().clone();
    let svc = with_finalizer(written);
    h.handle = Some(fresh_handle(&mut h));
    h.run(svc, vec![]).await.unwrap();
    assert_eq!(h.cloud_writes(), vec!["CreateLoadBalancer"], "no second cloud write");
}

/// A new API mock for the next reconcile, sharing the same cloud; like an operator restart.
fn fresh_handle(h: &mut Harness) -> Handle {
    let mut fresh = harness(h.cloud.clone());
    h.ctx = fresh.ctx;
    fresh.handle.take().unwrap()
}

#[tokio::test]
async fn invalid_annotation_gives_warning_event_false_condition_and_no_cloud_call() {
    let mut h = harness(cloud());
    let script = vec![
        expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "InvalidConfiguration");
            let note = body["note"].as_str().unwrap();
            assert!(
                note.contains("hawser.dev/scheme") && note.contains("\"internet-facing\" and \"internal\""),
                "{note}"
            );
        }),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            let cond = &body["status"]["conditions"][0];
            assert_eq!(cond["status"], "False");
            assert_eq!(cond["reason"], "InvalidConfiguration");
            assert!(body["status"].get("loadBalancer").is_none(), "an existing address is left alone");
        }),
    ];
    let svc = with_finalizer(json!({"metadata": {"annotations": {"hawser.dev/scheme": "public"}}}));
    let err = h.run(svc, script).await.unwrap_err();
    assert_eq!(err.class(), Some(ErrorClass::InvalidInput));
    assert!(h.cloud.calls().is_empty(), "no cloud call at all");
    let ctx = dummy_ctx();
    assert_eq!(
        error_policy(service(json!({})), &err, ctx),
        Action::requeue(Duration::from_secs(600)),
        "not hot-retried"
    );
}

#[tokio::test]
async fn another_class_is_never_touched() {
    let mut h = harness(cloud());
    for patch in [
        json!({"spec": {"loadBalancerClass": "example.com/other"}}),
        json!({"spec": {"loadBalancerClass": null}}),
        json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}}),
    ] {
        h.handle = Some(fresh_handle(&mut h));
        assert_eq!(h.run(service(patch), vec![]).await.unwrap(), Action::await_change());
    }
    assert!(h.cloud.calls().is_empty());
}

fn ensured_status() -> Value {
    json!({"status": {
        "loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]},
        "conditions": [{"type": "hawser.dev/LoadBalancerReady", "status": "True", "reason": "LoadBalancerReady", "message": "m", "lastTransitionTime": "2026-11-26T09:00:00Z"}]
    }})
}

fn clearing_status(body: &Value) {
    assert_eq!(
        body,
        &json!({"status": {"loadBalancer": {"ingress": null}, "conditions": [{"$patch": "delete", "type": "hawser.dev/LoadBalancerReady"}]}})
    );
}

async fn cloud_with_lb() -> MockCloud {
    let cloud = cloud();
    let mut h = harness(cloud.clone());
    h.run(
        with_finalizer(json!({})),
        vec![
            event("EnsuringLoadBalancer", "Normal"),
            expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |_| {}),
            event("EnsuredLoadBalancer", "Normal"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(cloud.load_balancers().len(), 1);
    cloud
}

/// What cleaning up looks like on the wire: Events, status cleared, then our finalizer (at
/// `index`) removed with a `test` guard so nobody else's finalizer can be removed by mistake.
fn cleanup_script(index: usize) -> Vec<Expect> {
    let path = format!("/metadata/finalizers/{index}");
    vec![
        event("DeletingLoadBalancer", "Normal"),
        event("DeletedLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", clearing_status),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web", move |body| {
            assert_eq!(
                body,
                &json!([{"op": "test", "path": path, "value": "hawser.dev/cleanup"}, {"op": "remove", "path": path}])
            );
        }),
    ]
}

#[tokio::test]
async fn deletion_removes_the_load_balancer_then_the_finalizer() {
    let cloud = cloud_with_lb().await;
    let mut h = harness(cloud.clone());
    let mut patch = ensured_status();
    merge(
        &mut patch,
        json!({"metadata": {"deletionTimestamp": "2026-11-26T10:00:00Z", "finalizers": ["example.com/keep", "hawser.dev/cleanup"]}}),
    );
    let script = cleanup_script(1);
    h.run(service(patch), script).await.unwrap();
    assert!(cloud.load_balancers().is_empty(), "load balancer deleted before the finalizer went");
}

#[tokio::test]
async fn type_change_to_cluster_ip_cleans_up_and_releases_the_service() {
    let cloud = cloud_with_lb().await;
    let mut h = harness(cloud.clone());
    let mut patch = ensured_status();
    merge(
        &mut patch,
        json!({"metadata": {"finalizers": ["hawser.dev/cleanup"]}, "spec": {"type": "ClusterIP", "loadBalancerClass": null}}),
    );
    let script = cleanup_script(0);
    assert_eq!(h.run(service(patch), script).await.unwrap(), Action::await_change());
    assert!(cloud.load_balancers().is_empty());
}

#[tokio::test]
async fn cloud_failure_gives_sync_failed_and_a_classified_retry() {
    let mut config = MockConfig::new("demo");
    config.error_rate = 1.0;
    let mut h = harness(MockCloud::new(config).unwrap());
    let script = vec![
        event("EnsuringLoadBalancer", "Normal"),
        event("SyncFailed", "Warning"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            let cond = &body["status"]["conditions"][0];
            assert_eq!(cond["status"], "False");
            assert_eq!(cond["reason"], "SyncFailed");
            assert!(cond["message"].as_str().unwrap().contains("injected fault"));
        }),
    ];
    let err = h.run(with_finalizer(json!({})), script).await.unwrap_err();
    assert_eq!(err.class(), Some(ErrorClass::Transient));
    let Action { .. } = error_policy(service(json!({})), &err, dummy_ctx());
}

#[tokio::test]
async fn failed_cloud_delete_keeps_the_finalizer() {
    let cloud = cloud_with_lb().await;
    let mut config = MockConfig::new("demo");
    config.error_rate = 1.0;
    let failing = MockCloud::new(config).unwrap();
    let mut h = harness(failing);
    let script = vec![event("DeletingLoadBalancer", "Normal"), event("SyncFailed", "Warning")];
    let svc = with_finalizer(json!({"metadata": {"deletionTimestamp": "2026-11-26T10:00:00Z"}}));
    let err = h.run(svc, script).await.unwrap_err();
    assert_eq!(err.class(), Some(ErrorClass::Transient), "no finalizer patch was sent: the verifier saw none");
    assert_eq!(cloud.load_balancers().len(), 1);
}

impl Harness {
    /// Starts answering `script`, which may span several reconciles of this same context (and
    /// its memory of what was ensured); `finish` checks that nothing else was asked.
    fn expect_all(&mut self, script: Vec<Expect>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(verify(self.handle.take().unwrap(), script))
    }

    async fn reconcile(&self, svc: Arc<Service>) -> Result<Action, Error> {
        tokio::time::timeout(Duration::from_secs(10), reconcile(svc, self.ctx.clone())).await.expect("reconcile hung")
    }

    async fn finish(mut self, verifier: tokio::task::JoinHandle<()>) {
        self.ctx = dummy_ctx();
        verifier.await.unwrap();
    }
}

/// The requests of a first ensure; the status it wrote lands in `written`.
fn first_ensure(written: Arc<std::sync::Mutex<Value>>) -> Vec<Expect> {
    vec![
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", move |body| {
            *written.lock().unwrap() = body.clone();
        }),
        event("EnsuredLoadBalancer", "Normal"),
    ]
}

#[tokio::test]
async fn our_own_writes_waking_the_service_cost_no_cloud_call() {
    let mut h = harness(cloud());
    let written = Arc::new(std::sync::Mutex::new(Value::Null));
    let verifier = h.expect_all(first_ensure(written.clone()));
    h.reconcile(with_finalizer(json!({}))).await.unwrap();
    let calls = h.cloud.calls().len();
    assert_eq!(calls, 2, "one describe, one create");

    // The status write (and then a resync or a watch restart) wakes the Service again.
    let svc = with_finalizer(written.lock().unwrap().clone());
    for _ in 0..3 {
        assert_eq!(h.reconcile(svc.clone()).await.unwrap(), Action::await_change());
    }
    assert_eq!(h.cloud.calls().len(), calls, "not even a cloud read");
    h.finish(verifier).await;
}

#[tokio::test]
async fn a_cleared_status_is_written_again_from_memory_without_a_cloud_call() {
    let mut h = harness(cloud());
    let written = Arc::new(std::sync::Mutex::new(Value::Null));
    let mut script = first_ensure(written.clone());
    script.push(expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
        assert_eq!(body["status"]["loadBalancer"]["ingress"][0]["ip"], "203.0.113.1", "{body}");
    }));
    let verifier = h.expect_all(script);
    h.reconcile(with_finalizer(json!({}))).await.unwrap();
    let calls = h.cloud.calls().len();
    h.reconcile(with_finalizer(json!({"status": {}}))).await.unwrap();
    assert_eq!(h.cloud.calls().len(), calls);
    h.finish(verifier).await;
}

#[tokio::test]
async fn a_changed_service_is_ensured_once_with_one_write() {
    let mut h = harness(cloud());
    let written = Arc::new(std::sync::Mutex::new(Value::Null));
    let mut script = first_ensure(written.clone());
    // "Ensuring … 2 listener(s)" is news; "Load balancer … serves 203.0.113.1" is a repeat.
    script.extend([
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(body["status"]["loadBalancer"]["ingress"][0]["ports"][1]["port"], 443, "{body}");
        }),
        event_again(),
    ]);
    let verifier = h.expect_all(script);
    h.reconcile(with_finalizer(json!({}))).await.unwrap();
    let mut changed = written.lock().unwrap().clone();
    merge(
        &mut changed,
        json!({"metadata": {"generation": 2}, "spec": {"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
            {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}
        ]}}),
    );
    h.reconcile(with_finalizer(changed)).await.unwrap();
    assert_eq!(h.cloud_writes(), vec!["CreateLoadBalancer", "ModifyLoadBalancer"]);
    h.finish(verifier).await;
}

#[tokio::test]
async fn the_drift_check_wakes_only_the_service_whose_load_balancer_vanished() {
    let mut h = harness(cloud());
    let written = Arc::new(std::sync::Mutex::new(Value::Null));
    let mut script = first_ensure(written.clone());
    // The drift is told to the user, then the load balancer is made again: only the status,
    // with its new address, is written.
    script.extend([
        event("LoadBalancerDrifted", "Warning"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(body["status"]["loadBalancer"]["ingress"][0]["ip"], "203.0.113.2", "{body}");
        }),
    ]);
    let verifier = h.expect_all(script);
    let svc = with_finalizer(json!({}));
    h.reconcile(svc.clone()).await.unwrap();
    let (wake, mut woken) = tokio::sync::mpsc::channel(8);

    let reads_before = h.cloud.calls().len();
    assert!(crate::drift::check_once(&h.ctx, &wake).await);
    assert!(woken.try_recv().is_err(), "nothing drifted, nobody woken");
    assert_eq!(h.cloud.calls().len(), reads_before + 1, "one listing for the whole cluster");

    // Someone deletes the load balancer in the cloud console.
    h.cloud
        .delete(&ServiceIdentity {
            cluster: "demo".into(),
            namespace: "shop".into(),
            name: "web".into(),
            uid: "uid-1".into(),
        })
        .await
        .unwrap();
    assert!(crate::drift::check_once(&h.ctx, &wake).await);
    let woken_ref = woken.try_recv().unwrap();
    assert_eq!((woken_ref.name.as_str(), woken_ref.namespace.as_deref()), ("web", Some("shop")));
    let svc = with_finalizer(written.lock().unwrap().clone());
    h.reconcile(svc).await.unwrap();
    assert_eq!(h.cloud.load_balancers().len(), 1, "recreated");
    assert_eq!(h.cloud_writes(), vec!["CreateLoadBalancer", "DeleteLoadBalancer", "CreateLoadBalancer"]);
    h.finish(verifier).await;
}

#[test]
fn the_gauges_count_services_and_the_cloud_load_balancers_behind_them() {
    let record = |lb: &str| Ensured {
        namespace: "default".into(),
        name: "x".into(),
        spec_digest: 1,
        fingerprint: None,
        status: LoadBalancerStatus { id: lb.into(), ingress: Vec::new() },
        group: None,
    };
    let mut book = EnsuredBook::default();
    book.insert("a".into(), record("lb-group"));
    book.insert("b".into(), record("lb-group"));
    book.insert("c".into(), record("lb-c"));
    assert_eq!((book.by_uid.len(), book.per_lb.len()), (3, 2), "three Services, two load balancers");
    book.insert("c".into(), record("lb-group"));
    assert_eq!((book.by_uid.len(), book.per_lb.len()), (3, 1), "c moved into the group");
    book.remove("a");
    book.remove("b");
    assert_eq!(book.per_lb.get("lb-group"), Some(&1));
    book.remove("c");
    assert!(book.per_lb.is_empty());
}

/// The group's record in a status patch: (reason, message), or `"deleted"`.
fn group_record(body: &Value) -> Option<(String, String)> {
    let conditions = body["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == "hawser.dev/LoadBalancerGroup")?;
    if c.get("$patch").is_some() {
        return Some(("deleted".into(), String::new()));
    }
    Some((c["reason"].as_str()?.to_owned(), c["message"].as_str()?.to_owned()))
}

#[tokio::test]
async fn a_join_records_its_group_before_any_cloud_write_so_a_restart_after_a_cut_short_join_leaves_it() {
    let cloud = cloud();
    let mut h = harness(cloud.clone());
    let pre = Arc::new(std::sync::Mutex::new(Value::Null));
    let (seen, c) = (pre.clone(), cloud.clone());
    let script = vec![
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", move |body| {
            let (reason, message) = group_record(body).expect("the group's record");
            assert_eq!(reason, "ChangingGroup");
            assert!(message.ends_with(": shop/edge"), "{message}");
            assert!(body["status"].get("loadBalancer").is_none(), "only the record: {body}");
            assert!(c.calls().iter().all(|call| !call.is_mutating()), "written before any cloud write");
            *seen.lock().unwrap() = body.clone();
        }),
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(
                group_record(body),
                Some(("Member".into(), "Shares the load balancer of load-balancer group: shop/edge".into()))
            );
            let ready = &body["status"]["conditions"][0];
            assert_eq!(ready["type"], "hawser.dev/LoadBalancerReady");
            assert!(ready["message"].as_str().unwrap().contains(" of group shop/edge "), "{body}");
        }),
        event("EnsuredLoadBalancer", "Normal"),
        event("JoinedLoadBalancerGroup", "Normal"),
    ];
    let verifier = h.expect_all(script);
    let member = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": "edge"}}});
    h.reconcile(with_finalizer(member)).await.unwrap();
    h.finish(verifier).await;
    let groups =
        |cloud: &MockCloud| -> Vec<Option<String>> { cloud.load_balancers().iter().map(|l| l.group.clone()).collect() };
    assert_eq!(groups(&cloud), [Some("shop/edge".to_owned())]);

    // The operator was killed after the join's cloud writes but before its status write, and the
    // group was then taken off the Service: a new operator knows the group only from the record.
    let mut h = harness(cloud.clone());
    let status = crate::status::patched(None, &pre.lock().unwrap());
    let script = vec![
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(group_record(body), Some(("deleted".into(), String::new())), "{body}");
            let ready = &body["status"]["conditions"][0];
            assert!(!ready["message"].as_str().unwrap().contains("group"), "{body}");
        }),
        event("EnsuredLoadBalancer", "Normal"),
        expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", |body| {
            assert_eq!(body["reason"], "LeftLoadBalancerGroup");
            assert_eq!(body["note"], "Left load-balancer group shop/edge");
        }),
    ];
    let verifier = h.expect_all(script);
    h.reconcile(with_finalizer(json!({"status": status}))).await.unwrap();
    h.finish(verifier).await;
    assert_eq!(groups(&cloud), [None], "on its own load balancer only");
}

#[tokio::test]
async fn a_change_cut_short_is_ensured_again_even_when_the_spec_goes_back() {
    let cloud = cloud();
    let mut h = harness(cloud.clone());
    let written = Arc::new(std::sync::Mutex::new(Value::Null));
    let mut script = first_ensure(written.clone());
    script.extend([
        event("EnsuringLoadBalancer", "Normal"),
        event("SyncFailed", "Warning"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(body["status"]["conditions"][0]["reason"], "SyncFailed", "{body}");
        }),
        // The same Events as the first ensure's: counted up.
        event_again(),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(body["status"]["conditions"][0]["reason"], "LoadBalancerReady", "{body}");
        }),
        event_again(),
    ]);
    let verifier = h.expect_all(script);
    h.reconcile(with_finalizer(json!({}))).await.unwrap();
    let ensured = written.lock().unwrap().clone();
    let mut changed = ensured.clone();
    merge(
        &mut changed,
        json!({"metadata": {"generation": 2}, "spec": {"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
            {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}
        ]}}),
    );
    cloud.lose_answers(1);
    assert!(h.reconcile(with_finalizer(changed)).await.is_err());
    assert_eq!(h.cloud.load_balancers()[0].listeners.len(), 2, "the cloud acted");
    // Back to the spec ensured first: the cloud holds the other one, so it is ensured again.
    let mut back = ensured;
    merge(&mut back, json!({"metadata": {"generation": 3}}));
    h.reconcile(with_finalizer(back)).await.unwrap();
    assert_eq!(h.cloud.load_balancers()[0].listeners.len(), 1, "the listener added by the lost change is gone");
    h.finish(verifier).await;
}

#[tokio::test]
async fn a_service_moving_to_another_group_leaves_the_old_one_only_under_its_lock() {
    let cloud = cloud();
    let mut h = harness(cloud.clone());
    let member = Arc::new(std::sync::Mutex::new(Value::Null));
    let seen = member.clone();
    let script = vec![
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |_| {}),
        event("EnsuringLoadBalancer", "Normal"),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", move |body| {
            *seen.lock().unwrap() = body.clone();
        }),
        event("EnsuredLoadBalancer", "Normal"),
        event("JoinedLoadBalancerGroup", "Normal"),
    ];
    let verifier = h.expect_all(script);
    let in_group = |g: &str| json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": g}}});
    h.reconcile(with_finalizer(in_group("edge"))).await.unwrap();
    h.finish(verifier).await;

    // It moves to group core while a member joins edge, under edge's lock.
    let mut h = harness(cloud.clone());
    let status = crate::status::patched(None, &member.lock().unwrap());
    // A new operator: it knows the Service (Ready) from its status only.
    let script = vec![
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            let (reason, message) = group_record(body).expect("the group's record");
            assert_eq!(reason, "ChangingGroup");
            assert!(message.ends_with(": shop/core, shop/edge"), "{message}");
        }),
        expect(Method::PATCH, "/api/v1/namespaces/shop/services/web/status", |body| {
            assert_eq!(group_record(body).map(|(reason, _)| reason).as_deref(), Some("Member"), "{body}");
        }),
        event("JoinedLoadBalancerGroup", "Normal"),
        event("LeftLoadBalancerGroup", "Normal"),
    ];
    let verifier = h.expect_all(script);
    let joining = h.ctx.groups.lock("shop/edge").await;
    let writes = |cloud: &MockCloud| cloud.calls().iter().filter(|c| c.is_mutating()).count();
    let before = writes(&cloud);
    let mut moving = with_finalizer(in_group("core"));
    Arc::make_mut(&mut moving).status = Some(status);
    let reconciling = tokio::spawn(reconcile(moving, h.ctx.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(writes(&cloud), before, "no cloud write while a member joins the group it leaves");
    assert!(!reconciling.is_finished());
    drop(joining);
    reconciling.await.unwrap().unwrap();
    h.finish(verifier).await;
    let groups: Vec<Option<String>> = cloud.load_balancers().iter().map(|l| l.group.clone()).collect();
    assert_eq!(groups, [Some("shop/core".to_owned())], "out of edge, in core");
}
