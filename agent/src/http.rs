//! /metrics, /healthz, /readyz. Bounded: at most 16 requests at once, each
//! answered within 5 s or dropped.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::{health::Health, metrics::Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(5)))
        .layer(GlobalConcurrencyLimitLayer::new(16))
        .with_state(AppState { metrics, health })
}

pub async fn serve(listen: SocketAddr, metrics: Metrics, health: Health) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics/health listener on {listen} (--listen): {e}"))?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(metrics, health)).await?;
    Ok(())
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
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

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    respond(s.health.live())
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    respond(s.health.ready())
}

fn respond(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
