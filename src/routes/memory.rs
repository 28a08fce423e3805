//! Coach memory routes of the reference coach service: list or search a (user, coach) pair's
//! memories, clear them; plus erasing one memory or everything of a user. Rate-limited per user,
//! with the route template as the endpoint name.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::rate_limit::{RateHeaders, enforce};
use super::validate::Id;
use crate::auth::Caller;
use crate::error::Error;
#[allow(unused_imports, reason = "named by the OpenAPI annotations")]
use crate::error::ErrorBody;
use crate::memory::{Memory, ScoredMemory};
use crate::state::AppState;

/// The pair's memories: GET lists or searches, DELETE clears.
pub const PAIR_ROUTE: &str = "/ai/coach/memory/{user_id}/{coach_id}";
/// One memory: DELETE.
pub const ONE_ROUTE: &str = "/ai/coach/memory/{user_id}/{coach_id}/{memory_id}";
/// Every memory of a user: DELETE.
pub const USER_ROUTE: &str = "/ai/coach/memory/{user_id}";

/// Page size when the client gives none.
const DEFAULT_LIMIT: usize = 20;

/// The memory router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(PAIR_ROUTE, get(list).delete(clear))
        .route(ONE_ROUTE, delete(delete_one))
        .route(USER_ROUTE, delete(erase_user))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    offset: Option<usize>,
    query: Option<String>,
    min_similarity: Option<f32>,
}

#[derive(Debug, Serialize)]
struct MemoryView {
    id: Uuid,
    text: String,
    memory_type: String,
    metadata: Value,
    created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<f32>,
}

impl MemoryView {
    fn new(m: Memory, similarity: Option<f32>) -> Self {
        Self {
            id: m.id,
            text: m.text,
            memory_type: m.memory_type,
            metadata: m.metadata,
            created_at: m.created_at,
            similarity,
        }
    }
}

/// `GET /ai/coach/memory/{user_id}/{coach_id}?limit=&offset=&query=&min_similarity=`: newest
/// first, or most similar first when `query` is given. `total` counts all of the pair's memories.
#[utoipa::path(
    get, path = "/ai/coach/memory/{user_id}/{coach_id}", tag = "memory",
    description = "The pair's memories, newest first; with ?query= a similarity search. ?limit=&offset=&min_similarity=. Rate-limited per user.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    params(("user_id" = Id, Path), ("coach_id" = Id, Path)),
    responses(
        (status = 200, description = "{user_id, coach_id, total, memories}"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<(RateHeaders, Json<Value>), Error> {
    let (user_id, coach_id) = pair(path)?;
    caller.authorize_user(&user_id)?;
    let Query(p) = params.map_err(|e| Error::bad_request("invalid_query", e.body_text()))?;
    let max = state.settings.memory.list_max;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT.min(max));
    if !(1..=max).contains(&limit) {
        return Err(Error::bad_request(
            "invalid_query",
            format!("limit must be from 1 to {max}"),
        ));
    }
    let offset = p.offset.unwrap_or(0);
    if p.query.is_some() && offset > 0 {
        return Err(Error::bad_request(
            "invalid_query",
            "offset cannot be combined with query: a search returns the best `limit` matches",
        ));
    }
    if p.query.is_none() && p.min_similarity.is_some() {
        return Err(Error::bad_request(
            "invalid_query",
            "min_similarity needs a query",
        ));
    }
    let min_similarity = p.min_similarity.unwrap_or(-1.0);
    if !(-1.0..=1.0).contains(&min_similarity) {
        return Err(Error::bad_request(
            "invalid_query",
            "min_similarity must be from -1 to 1",
        ));
    }
    let headers = enforce(&state, &user_id, PAIR_ROUTE).await?;

    let memories: Vec<MemoryView> = match p.query {
        Some(query) => state
            .memory
            .search_similar(&user_id, &coach_id, &query, limit, min_similarity)
            .await?
            .into_iter()
            .map(|ScoredMemory { memory, similarity }| MemoryView::new(memory, Some(similarity)))
            .collect(),
        None => {
            let (page, _) = state.memory.list(&user_id, &coach_id, limit, offset).await?;
            page.into_iter().map(|m| MemoryView::new(m, None)).collect()
        }
    };
    let (_, total) = state.memory.list(&user_id, &coach_id, 0, 0).await?;
    Ok((
        headers,
        Json(json!({
            "user_id": user_id,
            "coach_id": coach_id,
            "total": total,
            "memories": memories,
        })),
    ))
}

/// `DELETE /ai/coach/memory/{user_id}/{coach_id}`: forgets every memory of the pair.
#[utoipa::path(
    delete, path = "/ai/coach/memory/{user_id}/{coach_id}", tag = "memory",
    description = "Forgets every memory of the pair.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    params(("user_id" = Id, Path), ("coach_id" = Id, Path)),
    responses(
        (status = 200, description = "{user_id, coach_id, deleted}"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    )
)]
async fn clear(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(RateHeaders, Json<Value>), Error> {
    let (user_id, coach_id) = pair(path)?;
    caller.authorize_user(&user_id)?;
    let headers = enforce(&state, &user_id, PAIR_ROUTE).await?;
    let deleted = state.memory.clear(&user_id, &coach_id).await?;
    Ok((
        headers,
        Json(json!({ "user_id": user_id, "coach_id": coach_id, "deleted": deleted })),
    ))
}

/// `DELETE /ai/coach/memory/{user_id}/{coach_id}/{memory_id}`: forgets one memory; 404 when the
/// pair has no such memory.
#[utoipa::path(
    delete, path = "/ai/coach/memory/{user_id}/{coach_id}/{memory_id}", tag = "memory",
    description = "Forgets one memory.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    params(("user_id" = Id, Path), ("coach_id" = Id, Path), ("memory_id" = String, Path, description = "Memory id (a UUID)")),
    responses(
        (status = 200, description = "{user_id, coach_id, id, deleted}"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such memory", body = ErrorBody),
    )
)]
async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<(RateHeaders, Json<Value>), Error> {
    let Path((user_id, coach_id, memory_id)) = path.map_err(path_error)?;
    let (user_id, coach_id) = (
        Id::from_path("user_id", user_id)?,
        Id::from_path("coach_id", coach_id)?,
    );
    caller.authorize_user(&user_id)?;
    let id = Uuid::parse_str(&memory_id)
        .map_err(|_| Error::bad_request("invalid_path", "memory_id must be a UUID"))?;
    let headers = enforce(&state, &user_id, ONE_ROUTE).await?;
    if !state.memory.delete(&user_id, &coach_id, id).await? {
        return Err(Error::NotFound("memory".to_owned()));
    }
    Ok((
        headers,
        Json(json!({ "user_id": user_id, "coach_id": coach_id, "id": id, "deleted": 1 })),
    ))
}

/// `DELETE /ai/coach/memory/{user_id}`: erases every memory of the user, with every coach.
#[utoipa::path(
    delete, path = "/ai/coach/memory/{user_id}", tag = "memory",
    description = "Erases every memory of the user, with every coach.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    params(("user_id" = Id, Path)),
    responses(
        (status = 200, description = "{user_id, deleted}"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
    )
)]
async fn erase_user(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<(RateHeaders, Json<Value>), Error> {
    let Path(user_id) = path.map_err(path_error)?;
    let user_id = Id::from_path("user_id", user_id)?;
    caller.authorize_user(&user_id)?;
    let headers = enforce(&state, &user_id, USER_ROUTE).await?;
    let deleted = state.memory.erase_user(&user_id).await?;
    Ok((headers, Json(json!({ "user_id": user_id, "deleted": deleted }))))
}

fn pair(path: Result<Path<(String, String)>, PathRejection>) -> Result<(Id, Id), Error> {
    let Path((user_id, coach_id)) = path.map_err(path_error)?;
    Ok((
        Id::from_path("user_id", user_id)?,
        Id::from_path("coach_id", coach_id)?,
    ))
}

fn path_error(e: PathRejection) -> Error {
    Error::bad_request("invalid_path", e.body_text())
}

/// The OpenAPI description of these routes (merged in `routes::docs`).
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(list, clear, delete_one, erase_user))]
pub struct MemoryDoc;
