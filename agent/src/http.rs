//! /metrics, /healthz, /readyz, and /v1/activity (per-app idle times, for
//! peers deciding whether an app sleeps). Bounded: at most 16 requests at
//! once, each answered within 5 s or dropped.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::{
    conntrack::monotonic_coarse_ns, directory::Directory, health::Health, maps::DataplaneMaps, metrics::Metrics,
    peers::ActivityReport,
};

/// What the endpoints read.
#[derive(Clone)]
pub struct Status {
    pub metrics: Metrics,
    pub health: Health,
    pub maps: Arc<DataplaneMaps>,
    pub directory: Directory,
}

pub fn router(status: Status) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/activity", get(activity))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(5)))
        .layer(GlobalConcurrencyLimitLayer::new(16))
        .with_state(status)
}

pub async fn serve(listen: SocketAddr, status: Status) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics/health listener on {listen} (--listen): {e}"))?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz, /v1/activity");
    axum::serve(listener, router(status)).await?;
    Ok(())
}

/// Seconds since each app's last packet on this node.
async fn activity(State(s): State<Status>) -> impl IntoResponse {
    let report = tokio::task::spawn_blocking(move || {
        let now = monotonic_coarse_ns();
        let mut report = ActivityReport::default();
        for (app, id) in s.directory.all() {
            let Some(last) = id.and_then(|id| s.maps.activity(id)).map(|a| a.last_seen_ns).filter(|t| *t != 0) else {
                continue;
            };
            report.idle_seconds.insert(app.hostname.clone(), now.saturating_sub(last) as f64 / 1e9);
        }
        report
    })
    .await;
    match report {
        Ok(report) => Json(report).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "activity report failed\n").into_response(),
    }
}

async fn metrics_handler(State(s): State<Status>) -> impl IntoResponse {
    // Reading the maps is a few syscalls per counter: keep it off the runtime threads.
    let metrics = s.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n").into_response(),
    }
}

async fn healthz(State(s): State<Status>) -> impl IntoResponse {
    respond(s.health.live())
}

async fn readyz(State(s): State<Status>) -> impl IntoResponse {
    respond(s.health.ready())
}

fn respond(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
