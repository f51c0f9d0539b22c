//! The `hawser-fake-apiserver` binary: prints its address, writes a usable kubeconfig.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncBufReadExt, BufReader};

async fn run(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hawser-fake-apiserver"))
        .arg("--kubeconfig-out")
        .arg(&kc)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: std::net::SocketAddr = lines.next_line().await.unwrap().expect("address line").parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let config =
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&kc).unwrap(), &Default::default())
            .await
            .unwrap();
    assert!(config.cluster_url.to_string().contains(&addr.port().to_string()));
    hawser_fake_apiserver::server::install_crypto_provider();
    let client = kube::Client::try_from(config).unwrap();
    let names: Vec<String> = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"default".to_string()), "{names:?}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn binary_serves_https_with_the_written_kubeconfig() {
    run(&["--listen", "127.0.0.1:0"]).await;
}

#[tokio::test]
async fn binary_serves_plain_http_for_debugging() {
    run(&["--plain-http"]).await;
}
