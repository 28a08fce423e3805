//! Health routes of both reference services: `/health` (process), `/health/live` (never touches a
//! dependency), `/health/ready` (DB + Redis), and one route per component plus `/health/all`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::health::{self, ComponentReport};
use crate::state::AppState;

/// The health router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(root))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/db", get(db))
        .route("/health/redis", get(redis))
        .route("/health/llm", get(llm))
        .route("/health/all", get(all))
}

fn status_for(down: bool) -> StatusCode {
    if down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn root(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "healthy",
        "service": "coachd",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started_at.elapsed().as_secs(),
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let (db, redis) = tokio::join!(health::check_db(&state), health::check_redis(&state));
    let draining = state.shutdown.is_cancelled();
    let down = db.is_down() || redis.is_down() || draining;
    let status = if draining {
        "shutting_down"
    } else if down {
        "not_ready"
    } else {
        "ready"
    };
    (
        status_for(down),
        Json(json!({ "status": status, "checks": { "db": db, "redis": redis } })),
    )
        .into_response()
}

fn component(report: ComponentReport) -> Response {
    (status_for(report.is_down()), Json(report)).into_response()
}

async fn db(State(state): State<AppState>) -> Response {
    component(health::check_db(&state).await)
}

async fn redis(State(state): State<AppState>) -> Response {
    component(health::check_redis(&state).await)
}

async fn llm(State(state): State<AppState>) -> Response {
    component(health::check_llm(&state).await)
}

async fn all(State(state): State<AppState>) -> Response {
    let (db, redis, llm) = tokio::join!(
        health::check_db(&state),
        health::check_redis(&state),
        health::check_llm(&state)
    );
    let down = db.is_down() || redis.is_down() || llm.is_down();
    (
        status_for(down),
        Json(json!({
            "status": if down { "unhealthy" } else { "healthy" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": state.started_at.elapsed().as_secs(),
            "components": { "db": db, "redis": redis, "llm": llm },
        })),
    )
        .into_response()
}
