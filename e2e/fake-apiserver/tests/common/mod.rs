//! Shared set-up for the integration suites.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use hawser_fake_apiserver::{Config, FakeApiServer};

/// Starts a server with the default configuration and a client for it.
pub async fn start() -> (FakeApiServer, kube::Client) {
    start_with(Config::default()).await
}

/// Starts a server with `config` and a client made from its kubeconfig.
pub async fn start_with(config: Config) -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start(config).await.expect("server starts");
    let client = server.client().await.expect("client from kubeconfig");
    (server, client)
}

/// The HTTP code of a kube API error; panics on success or another error.
pub fn code<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The Status of a kube API error.
pub fn status<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
