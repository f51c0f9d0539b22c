//! kubectl smoke test: the real kubectl (Debian `kubernetes-client`) against the fake apiserver,
//! with the kubeconfig it writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::start;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;

const KUBECTL: &str = "kubectl";

async fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("HOME", cache)
        .output()
        .await
        .expect("kubectl runs (CI installs the Debian package kubernetes-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn kubectl_get_create_patch_delete() {
    let (server, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = server.kubeconfig_path().to_path_buf();
    let cache = dir.path();

    let (ok, out, err) = kubectl(&kc, cache, &["get", "namespaces"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("kube-system"), "{out}");

    let manifest = dir.path().join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  loadBalancerClass: hawser.dev/lb\n  ports:\n  - port: 80\n",
    )
    .unwrap();
    // kubectl's client-side validation needs the OpenAPI schema, which this server does not
    // publish (/openapi/v2 and /openapi/v3 are 404), so validation is turned off.
    let (ok, out, err) = kubectl(&kc, cache, &["create", "--validate=false", "-f", manifest.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("service/web created"), "{out}");

    let (ok, out, err) = kubectl(&kc, cache, &["get", "services"]).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("web ")), "{out}");

    let (ok, out, err) = kubectl(
        &kc,
        cache,
        &["patch", "service", "web", "--type", "merge", "-p", r#"{"metadata":{"labels":{"team":"net"}}}"#],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("patched"), "{out}");
    let svc = Api::<Service>::namespaced(client.clone(), "default").get("web").await.unwrap();
    assert_eq!(svc.metadata.labels.unwrap()["team"], "net");

    let (ok, out, err) = kubectl(&kc, cache, &["get", "service", "web", "-o", "yaml"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("team: net"), "{out}");
    assert!(out.contains("clusterIP: 10.96."), "{out}");
    assert!(out.contains("nodePort: 3"), "{out}");

    let (ok, _, err) = kubectl(&kc, cache, &["delete", "service", "web"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&kc, cache, &["get", "service", "web"]).await;
    assert!(!ok);
    assert!(err.contains("NotFound"), "{err}");
    server.stop().await;
}
