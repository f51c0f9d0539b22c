//! The operator's HTTP endpoints: probes, metrics, the dry run's plans and (mock cloud) state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// True once the caches are synced (or while standing by as a non-leader).
    pub ready: Arc<AtomicBool>,
    /// The mock cloud's views, when the mock provider runs.
    pub mock: Option<MockViews>,
    /// With `--dry-run`: every Service's last plan.
    pub plans: Option<JsonView>,
}

/// A view of the mock cloud as JSON.
pub type JsonView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What `/mock/state` and `/mock/summary` serve.
#[derive(Clone)]
pub struct MockViews {
    /// Everything: load balancers and the recent calls (for tests; grows with the cloud).
    pub state: JsonView,
    /// Counts only, cheap at any size (for benchmarks).
    pub summary: JsonView,
}

/// `/healthz` and `/readyz`.
pub fn probes(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `/metrics`, `/plans` with `--dry-run`, and `/mock/state` and `/mock/summary` with the mock
/// provider.
pub fn metrics(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/mock/state", get(|s: State<HttpState>| mock_view(s, |m| &m.state)))
        .route("/mock/summary", get(|s: State<HttpState>| mock_view(s, |m| &m.summary)))
        .route("/plans", get(plans))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet").into_response()
    }
}

async fn metrics_text(State(state): State<HttpState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

async fn mock_view(State(state): State<HttpState>, view: fn(&MockViews) -> &JsonView) -> Response {
    match &state.mock {
        Some(views) => axum::Json(view(views)()).into_response(),
        None => (StatusCode::NOT_FOUND, "the mock provider is not running").into_response(),
    }
}

async fn plans(State(state): State<HttpState>) -> Response {
    match &state.plans {
        Some(view) => axum::Json(view()).into_response(),
        None => (StatusCode::NOT_FOUND, "plans are kept only with --dry-run").into_response(),
    }
}

/// Binds `addr` (failing at once if it cannot) and serves `router` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving HTTP");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, %addr, "HTTP server failed");
        }
    }))
}
