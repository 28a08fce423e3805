//! Health routes of both reference services: `/health` (process), `/health/live` (never touches a
//! dependency), `/health/ready` (DB + Redis), and one route per component plus `/health/all`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use utoipa::OpenApi;

use crate::health::{self, ComponentReport};
use crate::state::AppState;

/// The OpenAPI description of these routes.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(root, live, ready, db, redis, llm, all),
    components(schemas(ComponentReport, health::Status))
)]
pub struct HealthDoc;

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

/// Process is up.
#[utoipa::path(get, path = "/health", tag = "health", responses(
    (status = 200, description = "`{status: healthy, service, version, uptime_secs}`", body = serde_json::Value,
        example = json!({"status": "healthy", "service": "coachd", "version": "0.1.0", "uptime_secs": 42})),
))]
async fn root(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "healthy",
        "service": "coachd",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started_at.elapsed().as_secs(),
    }))
}

/// Liveness: never touches a dependency.
#[utoipa::path(get, path = "/health/live", tag = "health", responses(
    (status = 200, description = "`{status: alive}`", body = serde_json::Value, example = json!({"status": "alive"})),
))]
async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// Readiness: database and Redis.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, description = "`{status: ready, checks: {db, redis}}`", body = serde_json::Value),
    (status = 503, description = "A configured dependency is down, or the server is shutting down", body = serde_json::Value),
))]
async fn ready(State(state): State<AppState>) -> Response {
    let (db, redis) = tokio::join!(check_db(&state), check_redis(&state));
    let draining = state.draining.is_cancelled() || state.shutdown.is_cancelled();
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

async fn check_db(state: &AppState) -> ComponentReport {
    health::check_db(state.db.as_ref(), state.settings.health_timeout).await
}

async fn check_redis(state: &AppState) -> ComponentReport {
    health::check_redis(state.redis.as_ref(), state.settings.health_timeout).await
}

async fn check_llm(state: &AppState) -> ComponentReport {
    let s = &state.settings;
    health::check_llm(&state.llm, s.llm.llm_provider, s.health_timeout).await
}

fn component(report: ComponentReport) -> Response {
    (status_for(report.is_down()), Json(report)).into_response()
}

/// PostgreSQL.
#[utoipa::path(get, path = "/health/db", tag = "health", responses(
    (status = 200, description = "Up, or embedded", body = ComponentReport),
    (status = 503, description = "Down", body = ComponentReport),
))]
async fn db(State(state): State<AppState>) -> Response {
    component(check_db(&state).await)
}

/// Redis.
#[utoipa::path(get, path = "/health/redis", tag = "health", responses(
    (status = 200, description = "Up, or embedded", body = ComponentReport),
    (status = 503, description = "Down", body = ComponentReport),
))]
async fn redis(State(state): State<AppState>) -> Response {
    component(check_redis(&state).await)
}

/// The default LLM provider (lists models; generates nothing).
#[utoipa::path(get, path = "/health/llm", tag = "health", responses(
    (status = 200, description = "Up, or embedded", body = ComponentReport),
    (status = 503, description = "Down", body = ComponentReport),
))]
async fn llm(State(state): State<AppState>) -> Response {
    component(check_llm(&state).await)
}

/// Every component.
#[utoipa::path(get, path = "/health/all", tag = "health", responses(
    (status = 200, description = "`{status, version, node_id, uptime_secs, components: {db, redis, llm, embedder}}`", body = serde_json::Value),
    (status = 503, description = "A configured component is down", body = serde_json::Value),
))]
async fn all(State(state): State<AppState>) -> Response {
    let (db, redis, llm) = tokio::join!(check_db(&state), check_redis(&state), check_llm(&state));
    let down = db.is_down() || redis.is_down() || llm.is_down();
    (
        status_for(down),
        Json(json!({
            "status": if down { "unhealthy" } else { "healthy" },
            "version": env!("CARGO_PKG_VERSION"),
            "node_id": state.settings.cluster.node_id,
            "uptime_secs": state.started_at.elapsed().as_secs(),
            "components": {
                "db": db,
                "redis": redis,
                "llm": llm,
                "embedder": crate::health::embedder_report(state.settings.embedding.provider, state.embedder.as_ref()),
            },
        })),
    )
        .into_response()
}
