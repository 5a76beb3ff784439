//! The admin endpoints every service serves: `/healthz` (the process runs), `/readyz` (its
//! dependencies are ready) and `/metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Named readiness conditions; the service is ready when every registered one is.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    pub fn new(names: &[&str]) -> Self {
        let readiness = Self::default();
        for name in names {
            readiness.set(name, false);
        }
        readiness
    }

    pub fn set(&self, name: &str, ready: bool) {
        if let Ok(mut conditions) = self.conditions.lock() {
            conditions.insert(name.to_owned(), ready);
        }
    }

    /// Whether every condition holds, and each condition's state.
    pub fn snapshot(&self) -> (bool, BTreeMap<String, bool>) {
        let conditions = self.conditions.lock().map(|guard| guard.clone()).unwrap_or_default();
        (conditions.values().all(|ready| *ready), conditions)
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

/// Health routes without `/metrics`, for a service that serves them next to its API.
pub fn health_routes(readiness: Readiness) -> Router {
    router(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> Response {
    let (ready, conditions) = readiness.snapshot();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready, "conditions": conditions }))).into_response()
}

async fn metrics() -> Response {
    let body = crate::telemetry::metrics_handle().render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Serves a router until the token is cancelled, letting in-flight requests finish.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, token: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { token.cancelled().await }).await
}
