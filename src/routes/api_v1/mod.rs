//! The reference AI backend's v1 API: service status, the task table, completions as JSON or SSE,
//! intent classification over a label set, and entity extraction whose character spans coachd
//! computes itself from the input (a model's offsets are never trusted).
//!
//! `analysis.rs` holds intent classification and entity extraction; this file the status, the
//! tasks, completions and the input checks every LLM route shares.

mod analysis;

use axum::extract::State;
use axum::response::Response;
use axum::response::sse::Event;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

pub use analysis::{
    ClassifyIntentRequest, ClassifyIntentResponse, Entity, ExtractEntitiesRequest, ExtractEntitiesResponse,
    locate,
};

use crate::auth::{ApiCaller, ApiUser, Caller};
use crate::error::{Error, ErrorBody};
use crate::llm::{FinishReason, LlmError, LlmEvent, Message, ModelRef, Params, Role, TaskSpec, Usage};
use crate::routes::validate::{Id, check_messages, check_params, check_text};
use crate::routes::{JsonBody, sse_response};
use crate::state::AppState;

/// The v1 router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/llm/tasks", get(tasks))
        .route("/api/v1/llm/complete", post(complete))
        .route("/api/v1/llm/stream", post(stream))
        .route("/api/v1/llm/classify-intent", post(analysis::classify_intent))
        .route("/api/v1/llm/extract-entities", post(analysis::extract_entities))
}

/// The OpenAPI description of these routes.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(
        status,
        tasks,
        complete,
        stream,
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

// ---------------------------------------------------------------------------------------------
// Status and tasks

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
async fn status(State(state): State<AppState>, _caller: ApiCaller) -> Json<StatusResponse> {
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
async fn tasks(State(state): State<AppState>, _caller: ApiCaller) -> Json<TasksResponse> {
    Json(TasksResponse {
        tasks: state.llm.tasks().map(Into::into).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Completions

fn default_task() -> String {
    "chat".to_owned()
}

/// `POST /api/v1/llm/complete` and `/api/v1/llm/stream`: a task and a conversation. Give
/// `messages`, `prompt` or both (the prompt is then the last user message).
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompleteRequest {
    /// Task name (see `/api/v1/llm/tasks`).
    #[serde(default = "default_task")]
    #[schema(default = "chat", example = "chat")]
    pub task: String,
    /// The conversation, oldest first.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// A user message appended after `messages`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// System prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Parameters that win over the task's (`temperature`, `top_p`, `max_tokens`, `stop`).
    #[serde(default)]
    pub params: Params,
    /// The end user this completion is for, recorded with its token usage. A JWT caller may only
    /// name themselves (403 otherwise); it defaults to the JWT's user.
    #[serde(default)]
    pub user_id: Option<Id>,
}

/// A validated LLM request.
struct LlmInput {
    user_id: Option<String>,
    task: String,
    system: Option<String>,
    messages: Vec<Message>,
    params: Params,
}

fn unknown_task(state: &AppState, task: &str) -> Error {
    let known: Vec<&str> = state.llm.tasks().map(|t| t.name.as_str()).collect();
    Error::bad_request(
        "unknown_task",
        format!("unknown task {task:?}; known tasks: {}", known.join(", ")),
    )
}

impl LlmInput {
    fn validate(state: &AppState, caller: &Caller, req: CompleteRequest) -> Result<Self, Error> {
        let s = &state.settings;
        if let Some(user_id) = &req.user_id {
            caller.authorize_user(user_id)?;
        }
        let user_id = req
            .user_id
            .map(Id::into_string)
            .or_else(|| caller.user_id().map(str::to_owned));
        if state.llm.task(&req.task).is_none() {
            return Err(unknown_task(state, &req.task));
        }
        if let Some(system) = &req.system {
            check_text("system", system, s)?;
        }
        let mut messages = req.messages;
        if let Some(prompt) = req.prompt {
            check_text("prompt", &prompt, s)?;
            messages.push(Message::user(prompt));
        }
        if messages.is_empty() {
            return Err(Error::bad_request(
                "missing_field",
                "give messages, prompt, or both",
            ));
        }
        check_messages(&messages, s)?;
        check_params(&req.params, s)?;
        Ok(LlmInput {
            user_id,
            task: req.task,
            system: req.system,
            messages,
            params: req.params,
        })
    }

    fn stream(self, state: &AppState) -> crate::llm::EventStream {
        state
            .llm
            .stream_task_with(&self.task, &self.params, self.system, self.messages, None)
    }
}

/// Token counts of a reply.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct UsageInfo {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens in the reply.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl From<Usage> for UsageInfo {
    fn from(u: Usage) -> Self {
        UsageInfo {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// A finished completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionResponse {
    /// The task that ran.
    pub task: String,
    /// The reply text.
    pub content: String,
    /// Provider that answered (after any fallback).
    pub provider: String,
    /// Model that answered.
    pub model: String,
    /// Token counts, when the provider reported them.
    pub usage: Option<UsageInfo>,
    /// `stop`, `length`, `content_filter`, `tool_calls`, ...
    pub finish_reason: String,
}

/// One completion, returned whole.
#[utoipa::path(
    post, path = "/api/v1/llm/complete", tag = "api_v1",
    security(("api_key" = [], "jwt" = [])),
    request_body = CompleteRequest,
    responses(
        (status = 200, description = "The completion", body = CompletionResponse),
        (status = 400, description = "Invalid input or unknown task", body = ErrorBody),
        (status = 401, description = "Missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "A JWT caller named another user's user_id", body = ErrorBody),
        (status = 502, description = "Every model of the task failed", body = ErrorBody),
        (status = 504, description = "An upstream timeout fired", body = ErrorBody),
    )
)]
async fn complete(
    State(state): State<AppState>,
    ApiUser(caller): ApiUser,
    JsonBody(req): JsonBody<CompleteRequest>,
) -> Result<Json<CompletionResponse>, Error> {
    let input = LlmInput::validate(&state, &caller, req)?;
    let (task, user_id) = (input.task.clone(), input.user_id.clone());
    let c = crate::llm::collect(input.stream(&state), (state.llm.default_provider(), "")).await?;
    record_usage(&task, user_id.as_deref(), c.provider.as_str(), &c.model, c.usage);
    Ok(Json(CompletionResponse {
        task,
        content: c.content,
        provider: c.provider.to_string(),
        model: c.model,
        usage: c.usage.map(Into::into),
        finish_reason: c.finish_reason.as_str().to_owned(),
    }))
}

/// One completion, streamed as server-sent events (format in the README): `start`, then `token`
/// events, then `done`; or an `error` event when it fails after the stream began. A failure
/// before the first token answers with an HTTP error status instead.
#[utoipa::path(
    post, path = "/api/v1/llm/stream", tag = "api_v1",
    security(("api_key" = [], "jwt" = [])),
    request_body = CompleteRequest,
    responses(
        (status = 200, description = "`event: start` {task, provider, model}; `event: token` {text} per \
            piece of text; `event: done` {finish_reason, provider, model, usage}; or `event: error` \
            {error: {code, message}} after the stream began", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid input or unknown task", body = ErrorBody),
        (status = 401, description = "Missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "A JWT caller named another user's user_id", body = ErrorBody),
        (status = 502, description = "Every model failed before the first token", body = ErrorBody),
        (status = 504, description = "An upstream timeout fired before the first token", body = ErrorBody),
    )
)]
async fn stream(
    State(state): State<AppState>,
    ApiUser(caller): ApiUser,
    JsonBody(req): JsonBody<CompleteRequest>,
) -> Result<Response, Error> {
    let input = LlmInput::validate(&state, &caller, req)?;
    let (task, user_id) = (input.task.clone(), input.user_id.clone());
    let default_provider = state.llm.default_provider();
    let mut upstream = input.stream(&state);
    // Until the first event nothing is sent, so a failure here (every model failed, a timeout)
    // still gets its own HTTP status rather than a 200 with an error event.
    let first = match upstream.next().await {
        Some(Ok(event)) => event,
        Some(Err(e)) => return Err(e.into()),
        None => {
            return Err(LlmError::Incomplete {
                provider: default_provider,
            }
            .into());
        }
    };
    let events = async_stream::stream! {
        let mut upstream = futures::stream::iter([Ok(first)]).chain(upstream);
        let (mut provider, mut model) = (default_provider.to_string(), String::new());
        let (mut usage, mut finish) = (None::<Usage>, None::<FinishReason>);
        while let Some(item) = upstream.next().await {
            match item {
                Ok(LlmEvent::Start { provider: p, model: m }) => {
                    provider = p.to_string();
                    model = m;
                    let data = json!({"task": task, "provider": provider, "model": model});
                    yield Ok(Event::default().event("start").data(data.to_string()));
                }
                Ok(LlmEvent::Delta(text)) => {
                    yield Ok(Event::default().event("token").data(json!({"text": text}).to_string()));
                }
                Ok(LlmEvent::Usage(u)) => usage = Some(u),
                Ok(LlmEvent::Finish(reason)) => finish = Some(reason),
                Err(e) => {
                    yield Ok(Error::from(e).sse_event());
                    return;
                }
            }
        }
        // The router ends a stream without a finish reason with an error; this is a safety net
        // so a stream never ends cleanly without saying how it ended.
        let Some(finish) = finish else {
            let e = LlmError::Incomplete { provider: default_provider };
            yield Ok(Error::from(e).sse_event());
            return;
        };
        let data = json!({
            "finish_reason": finish.as_str(),
            "provider": provider,
            "model": model,
            "usage": usage.map(UsageInfo::from),
        });
        record_usage(&task, user_id.as_deref(), &provider, &model, usage);
        yield Ok(Event::default().event("done").data(data.to_string()));
    };
    Ok(sse_response(events, state.settings.realtime.sse_heartbeat))
}

/// Token usage per task, model and user, as a structured log line (metrics can be derived from it).
fn record_usage(task: &str, user_id: Option<&str>, provider: &str, model: &str, usage: Option<Usage>) {
    let u = usage.unwrap_or_default();
    tracing::info!(
        task,
        user_id = user_id.unwrap_or("-"),
        provider,
        model,
        prompt_tokens = u.prompt_tokens,
        completion_tokens = u.completion_tokens,
        usage_known = usage.is_some(),
        "llm usage"
    );
}
