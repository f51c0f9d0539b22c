//! The real `hawser-operator` binary with `--provider aws`, against the fake Kubernetes API server
//! and a moto server: a Service whose finalizer was stripped before it was deleted loses its NLB
//! to the orphan collector, with nothing left behind.

#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../../providers/tests/aws/moto.rs"]
mod moto;

use std::process::{Command, Stdio};

use common::{Operator, free_port, wait_for};
use hawser_fake_apiserver::{Config, FakeApiServer};
use hawser_providers::Provider;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn a_force_deleted_services_nlb_is_collected() {
    let Some(cloud) = moto::moto() else { return };
    let aws = moto::provider(&cloud).await;
    let world = moto::seed(&aws).await;
    let server = FakeApiServer::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    for (i, instance) in world.instances.iter().enumerate() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": format!("node-{i}"), "labels": {"topology.kubernetes.io/zone": "us-east-1a"}},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": format!("10.0.1.{}", 10 + i)}]}
        }))
        .unwrap();
        Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await.unwrap();
    }
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_hawser-operator"))
            .args(["--provider", "aws", "--cluster-name", "prod", "--node-debounce", "200ms"])
            .args(["--aws-region", "us-east-1", "--aws-endpoint-url", &cloud.url, "--aws-vpc-id", &world.vpc])
            .args(["--gc-interval", "500ms", "--gc-grace-period", "1s"])
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--health-probe-bind-address=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("HAWSER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("hawser-operator starts"),
    );

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.create(&PostParams::default(), &common::lb_service("web")).await.unwrap();
    let hostname = |s: &Service| s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref()?.first()?.hostname.clone();
    wait_for("web's NLB hostname", || async { services.get("web").await.ok().as_ref().and_then(hostname) }).await;
    assert_eq!(aws.list_owned().await.unwrap().len(), 1);

    // The finalizer stripped by hand, then the Service deleted: only the collector cleans up.
    let strip = json!({"metadata": {"finalizers": null}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    // The NLB goes first and its frontend security group last, so wait for both.
    wait_for("the orphaned NLB and its security group collected", || async {
        let groups = aws.clients().ec2.describe_security_groups().send().await.unwrap();
        let group_left =
            groups.security_groups().iter().any(|g| g.group_name().unwrap_or_default().starts_with("hawser-"));
        (aws.list_owned().await.unwrap().is_empty() && !group_left).then_some(())
    })
    .await;
    server.stop().await;
}
