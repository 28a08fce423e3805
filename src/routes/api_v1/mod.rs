//! The reference AI backend's v1 API: service status, the task table, completions as JSON or SSE,
//! intent classification over a label set, and entity extraction whose character spans coachd
//! computes itself from the input (a model's offsets are never trusted).
//!
//! `status.rs` holds the status and the tasks, `complete.rs` completions, `analysis.rs` intent
//! classification and entity extraction, `check.rs` the input checks every LLM route shares,
//! `relay.rs` the SSE relay of a routed stream; this file the router and the OpenAPI description.

mod analysis;
mod complete;
pub(crate) mod relay;
mod status;

use axum::Router;
use axum::routing::{get, post};
use utoipa::OpenApi;

pub use analysis::{
    ClassifyIntentRequest, ClassifyIntentResponse, Entity, ExtractEntitiesRequest, ExtractEntitiesResponse,
    locate,
};
pub use complete::{CompleteRequest, CompletionResponse, UsageInfo};
pub use status::{AuthModes, ModelInfo, StatusResponse, StorageModes, TaskInfo, TasksResponse};

use crate::error::ErrorBody;
use crate::llm::{Message, Params, Role};
use crate::state::AppState;

/// The v1 router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/status", get(status::status))
        .route("/api/v1/llm/tasks", get(status::tasks))
        .route("/api/v1/llm/complete", post(complete::complete))
        .route("/api/v1/llm/stream", post(complete::stream))
        .route("/api/v1/llm/classify-intent", post(analysis::classify_intent))
        .route("/api/v1/llm/extract-entities", post(analysis::extract_entities))
}

/// The OpenAPI description of these routes.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(
        status::status,
        status::tasks,
        complete::complete,
        complete::stream,
        analysis::classify_intent,
        analysis::extract_entities
    ),
    components(schemas(
        StatusResponse,
        StorageModes,
        AuthModes,
        TasksResponse,
        TaskInfo,
        ModelInfo,
        CompleteRequest,
        CompletionResponse,
        UsageInfo,
        ClassifyIntentRequest,
        ClassifyIntentResponse,
        ExtractEntitiesRequest,
        ExtractEntitiesResponse,
        Entity,
        Message,
        Role,
        Params,
        ErrorBody
    ))
)]
pub struct ApiV1Doc;
