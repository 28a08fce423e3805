//! `POST /api/v1/llm/complete` (one completion as JSON) and `POST /api/v1/llm/stream` (the same
//! as server-sent events): a task and a conversation, routed through the task's models.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use axum::response::sse::Event;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::relay::{FirstTokenClock, Format, Relay};
use crate::auth::{ApiUser, Caller};
use crate::error::{Error, ErrorBody};
use crate::llm::ProviderKind;
use crate::llm::{FinishReason, LlmError, LlmEvent, Message, Params, Routed, Usage, collect};
use crate::metric::FirstToken;
use crate::routes::validate::{Id, check_messages, check_params, check_text};
use crate::routes::{JsonBody, sse_response};
use crate::session::event::TransportKind;
use crate::state::AppState;

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

    /// Routes the request through its task's models (the caller's parameters win).
    async fn route(self, state: &AppState) -> Result<Routed, LlmError> {
        state
            .llm
            .route_task(&self.task, &self.params, self.system, self.messages, None)
            .await
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
        (status = 504, description = "Every model timed out", body = ErrorBody),
    )
)]
pub(super) async fn complete(
    State(state): State<AppState>,
    ApiUser(caller): ApiUser,
    JsonBody(req): JsonBody<CompleteRequest>,
) -> Result<Json<CompletionResponse>, Error> {
    let input = LlmInput::validate(&state, &caller, req)?;
    let (task, user_id) = (input.task.clone(), input.user_id.clone());
    let c = collect(input.route(&state).await?).await?;
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

/// An event of `/api/v1/llm/stream`, for the API description.
pub(super) struct LlmStreamEvent;

impl utoipa::PartialSchema for LlmStreamEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use serde_json::json;
        let served = json!({"type": "string"});
        crate::routes::docs::sse_events(&[
            (
                "start",
                json!({"type": "object", "required": ["task", "provider", "model"],
                "properties": {"task": served, "provider": served, "model": served}}),
            ),
            (
                "token",
                json!({"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}),
            ),
            (
                "done",
                json!({"type": "object", "required": ["finish_reason", "provider", "model", "usage"],
                "properties": {"finish_reason": served, "provider": served, "model": served,
                    "usage": {"type": ["object", "null"], "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                        "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                            "total_tokens": {"type": "integer"}}}}}),
            ),
            ("error", crate::routes::docs::error_data()),
        ])
    }
}

impl utoipa::ToSchema for LlmStreamEvent {}

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
            {error: {code, message}} after the stream began", content_type = "text/event-stream", body = LlmStreamEvent),
        (status = 400, description = "Invalid input or unknown task", body = ErrorBody),
        (status = 401, description = "Missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "A JWT caller named another user's user_id", body = ErrorBody),
        (status = 502, description = "Every model failed before the first token", body = ErrorBody),
        (status = 504, description = "Every model timed out before the first token", body = ErrorBody),
    )
)]
pub(super) async fn stream(
    State(state): State<AppState>,
    ApiUser(caller): ApiUser,
    JsonBody(req): JsonBody<CompleteRequest>,
) -> Result<Response, Error> {
    let started = Instant::now();
    let input = LlmInput::validate(&state, &caller, req)?;
    let (task, user_id) = (input.task.clone(), input.user_id.clone());
    // Routing returns before anything is sent, so a failure before the first token (every model
    // failed, a timeout) gets its own HTTP status rather than a 200 with an error event.
    let routing = Instant::now();
    let Routed {
        provider,
        model,
        stream,
    } = input.route(&state).await?;
    let clock = FirstTokenClock {
        started,
        routing: routing.elapsed(),
        histograms: FirstToken::new(
            provider.as_str(),
            state.llm.model_label(provider, &model),
            TransportKind::Sse.as_str(),
        ),
    };
    let format = StreamFormat {
        task,
        user_id,
        provider,
        model,
        usage: None,
        finish: None,
        ended: false,
    };
    Ok(sse_response(
        Relay::new(stream, format).timed(clock),
        state.settings.realtime.sse_heartbeat,
    ))
}

/// The events of `/api/v1/llm/stream`: `start`, `token` per text, then `done` or `error`.
struct StreamFormat {
    task: String,
    user_id: Option<String>,
    provider: ProviderKind,
    model: String,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    ended: bool,
}

/// The data of a `token` event, `{"text":…}`: a borrowed struct, not a `json!` tree per token.
fn token_data(text: &str) -> String {
    #[derive(Serialize)]
    struct Token<'a> {
        text: &'a str,
    }
    serde_json::to_string(&Token { text }).unwrap_or_else(|_| r#"{"text":""}"#.to_owned())
}

impl Format for StreamFormat {
    fn start(&mut self) -> Event {
        let data = json!({"task": self.task, "provider": self.provider.as_str(), "model": self.model});
        Event::default().event("start").data(data.to_string())
    }

    fn event(&mut self, event: LlmEvent) -> Option<Event> {
        match event {
            LlmEvent::Delta(text) => Some(Event::default().event("token").data(token_data(&text))),
            LlmEvent::Usage(u) => {
                self.usage = Some(u);
                None
            }
            LlmEvent::Finish(reason) => {
                self.finish = Some(reason);
                None
            }
        }
    }

    fn error(&mut self, error: LlmError) -> Event {
        Error::from(error).sse_event()
    }

    fn end(&mut self) -> Option<Event> {
        if std::mem::replace(&mut self.ended, true) {
            return None;
        }
        // The router ends a stream without a finish reason with an error; this is a safety net
        // so a stream never ends cleanly without saying how it ended.
        let Some(finish) = self.finish.take() else {
            let e = LlmError::Incomplete {
                provider: self.provider,
            };
            return Some(Error::from(e).sse_event());
        };
        let provider = self.provider.as_str();
        record_usage(
            &self.task,
            self.user_id.as_deref(),
            provider,
            &self.model,
            self.usage,
        );
        let data = json!({
            "finish_reason": finish.as_str(),
            "provider": provider,
            "model": self.model,
            "usage": self.usage.map(UsageInfo::from),
        });
        Some(Event::default().event("done").data(data.to_string()))
    }
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
