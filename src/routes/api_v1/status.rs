//! `GET /api/v1/status` (what serves and which credentials are checked) and `GET /api/v1/llm/tasks`
//! (the task table with its models).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::ApiCaller;
use crate::error::ErrorBody;
use crate::llm::{ModelRef, Params, TaskSpec};
use crate::state::AppState;

/// `GET /api/v1/status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    /// Always `coachd`.
    pub service: &'static str,
    /// Always `ok` (dependency health is under `/health/*`).
    pub status: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// Seconds since the server started.
    pub uptime_secs: u64,
    /// Provider of requests that name none.
    pub default_provider: String,
    /// Every configured provider (`offline` is always there).
    pub providers: Vec<String>,
    /// What serves each store.
    pub storage: StorageModes,
    /// Which credentials are checked.
    pub auth: AuthModes,
}

/// Storage modes of `/api/v1/status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StorageModes {
    /// `postgresql` or `embedded`.
    pub database: &'static str,
    /// `redis` or `embedded`.
    pub redis: &'static str,
}

/// Auth modes of `/api/v1/status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthModes {
    /// API keys are configured (always true for a caller who got this far).
    pub api_keys: bool,
    /// End-user JWTs are verified (`SUPABASE_JWT_SECRET` is set).
    pub jwt: bool,
}

/// Service status.
#[utoipa::path(
    get, path = "/api/v1/status", tag = "api_v1",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Service status", body = StatusResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub(super) async fn status(State(state): State<AppState>, _caller: ApiCaller) -> Json<StatusResponse> {
    let providers = crate::llm::ProviderKind::ALL
        .into_iter()
        .filter(|k| state.llm.provider(*k).is_some())
        .map(|k| k.to_string())
        .collect();
    Json(StatusResponse {
        service: "coachd",
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started_at.elapsed().as_secs(),
        default_provider: state.llm.default_provider().to_string(),
        providers,
        storage: StorageModes {
            database: if state.db.is_some() {
                "postgresql"
            } else {
                "embedded"
            },
            redis: if state.redis.is_some() {
                "redis"
            } else {
                "embedded"
            },
        },
        auth: AuthModes {
            api_keys: state.auth.has_keys(),
            jwt: state.auth.has_jwt(),
        },
    })
}

/// `GET /api/v1/llm/tasks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TasksResponse {
    /// Every task, by name.
    pub tasks: Vec<TaskInfo>,
}

/// One task and its models.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskInfo {
    /// Task name, e.g. `chat`.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Tried first.
    pub primary: ModelInfo,
    /// Tried in order when the primary fails before its first token.
    pub fallbacks: Vec<ModelInfo>,
    /// The task's default parameters.
    pub params: Params,
}

/// One model of a task.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInfo {
    /// Provider, e.g. `openai`.
    pub provider: String,
    /// Provider-specific model name.
    pub model: String,
    /// Parameters of this model (they win over the task's).
    pub params: Params,
}

impl From<&ModelRef> for ModelInfo {
    fn from(m: &ModelRef) -> Self {
        ModelInfo {
            provider: m.provider.to_string(),
            model: m.model.clone(),
            params: m.params.clone(),
        }
    }
}

impl From<&TaskSpec> for TaskInfo {
    fn from(t: &TaskSpec) -> Self {
        TaskInfo {
            name: t.name.clone(),
            description: t.description.clone(),
            primary: (&t.primary).into(),
            fallbacks: t.fallbacks.iter().map(Into::into).collect(),
            params: t.params.clone(),
        }
    }
}

/// The LLM tasks and their models.
#[utoipa::path(
    get, path = "/api/v1/llm/tasks", tag = "api_v1",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Every task", body = TasksResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub(super) async fn tasks(State(state): State<AppState>, _caller: ApiCaller) -> Json<TasksResponse> {
    Json(TasksResponse {
        tasks: state.llm.tasks().map(Into::into).collect(),
    })
}
