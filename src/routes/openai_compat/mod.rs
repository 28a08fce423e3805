//! An OpenAI-compatible surface, so the official OpenAI SDKs (and anything built on them) work
//! with coachd as their base URL unchanged: `POST /v1/chat/completions` (streaming in OpenAI's exact
//! chunk format, or one `chat.completion` object) and `GET /v1/models`. A `model` is a coachd task
//! (`chat`, routed with fallbacks) or a provider model as `provider/model`. Errors use OpenAI's
//! shape `{"error":{"message","type","param","code"}}`, which is what the SDKs parse.
//!
//! `error.rs` holds the OpenAI-shaped errors and the extractors; `request.rs` the request types and
//! their validation; this file the handlers and the response and chunk formats.

mod error;
mod request;

use std::collections::HashSet;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};

pub use error::{OpenAiCaller, OpenAiError, OpenAiErrorBody, OpenAiErrorDetail, OpenAiJson};
pub use request::{
    ChatCompletionRequest, ChatMessage, ContentPart, JsonSchemaSpec, MessageContent, ResponseFormatSpec,
    StopSpec, StreamOptions,
};

use crate::llm::ProviderKind;
use crate::llm::{FinishReason, LlmError, LlmEvent};
use crate::metric::FirstToken;
use crate::routes::api_v1::relay::{FirstTokenClock, Format, Relay};
use crate::routes::sse_response;
use crate::session::event::TransportKind;
use crate::state::AppState;
use request::ChatInput;

/// The OpenAI-compatible router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
}

/// The OpenAPI description of these routes.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(chat_completions, list_models, get_model),
    components(schemas(
        ChatCompletionRequest,
        ChatMessage,
        MessageContent,
        ContentPart,
        StopSpec,
        StreamOptions,
        ResponseFormatSpec,
        JsonSchemaSpec,
        ModelObject,
        ModelList,
        OpenAiErrorBody,
        OpenAiErrorDetail
    ))
)]
pub struct OpenAiCompatDoc;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's finish reasons; anything else coachd knows is a normal stop to an OpenAI client.
fn openai_finish(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::Other(_) => "stop",
    }
}

fn usage_json(usage: Option<crate::llm::Usage>) -> Value {
    match usage {
        Some(u) => json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
        }),
        None => Value::Null,
    }
}

/// The chunks of one streamed completion: the role chunk, one per text, the finish chunk, with
/// `include_usage` a usage chunk, then `[DONE]`; or an error chunk, and nothing more.
struct Chunks {
    /// `provider/model` of the model that serves.
    model: String,
    provider: ProviderKind,
    include_usage: bool,
    usage: Option<crate::llm::Usage>,
    finished: bool,
    end: End,
    id: String,
    created: u64,
    /// What follows `choices` in every chunk: the keys after it, in serde_json's (sorted) order.
    tail: String,
    /// The chunk being written, reused: one chunk per token is the hot path of this route.
    buf: Vec<u8>,
}

/// How far the end of a streamed completion got.
enum End {
    Pending,
    Usage,
    Done,
}

impl Chunks {
    fn new(id: String, created: u64, model: String, provider: ProviderKind, include_usage: bool) -> Self {
        // The same bytes `json!(..).to_string()` wrote for the whole chunk (serde_json sorts keys);
        // only the delta and the finish reason change from chunk to chunk.
        let mut tail = format!(
            r#","created":{created},"id":{},"model":{},"object":"chat.completion.chunk","system_fingerprint":null"#,
            Value::from(id.as_str()),
            Value::from(model.as_str()),
        );
        if include_usage {
            // As OpenAI does: every chunk carries `usage: null` except the last one.
            tail.push_str(r#","usage":null"#);
        }
        tail.push('}');
        Chunks {
            model,
            provider,
            include_usage,
            usage: None,
            finished: false,
            end: End::Pending,
            id,
            created,
            tail,
            buf: Vec::with_capacity(256),
        }
    }

    /// One chunk whose delta is `{"content": text}` (`None`: `{}`, `Some(role)`: the role chunk).
    fn chunk(&mut self, delta: Delta<'_>, finish: Option<&str>) -> Event {
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(br#"{"choices":[{"delta":"#);
        // Writing a `&str` into a Vec cannot fail; serde_json escapes it as it always did.
        let mut escaped = true;
        match delta {
            Delta::Role => buf.extend_from_slice(br#"{"content":"","role":"assistant"}"#),
            Delta::Text(text) => {
                buf.extend_from_slice(br#"{"content":"#);
                escaped &= serde_json::to_writer(&mut *buf, text).is_ok();
                buf.push(b'}');
            }
            Delta::Empty => buf.extend_from_slice(b"{}"),
        }
        buf.extend_from_slice(br#","finish_reason":"#);
        match finish {
            Some(reason) => escaped &= serde_json::to_writer(&mut *buf, reason).is_ok(),
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(br#","index":0,"logprobs":null}]"#);
        buf.extend_from_slice(self.tail.as_bytes());
        match std::str::from_utf8(buf) {
            Ok(json) if escaped => Event::default().data(json),
            _ => Event::default().data(r#"{"choices":[]}"#),
        }
    }

    fn usage(&self, usage: Option<crate::llm::Usage>) -> Event {
        let c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage_json(usage),
        });
        Event::default().data(c.to_string())
    }
}

/// The delta of one chunk.
enum Delta<'a> {
    /// The first chunk: the role, and empty content.
    Role,
    /// A piece of text.
    Text(&'a str),
    /// Nothing (the finish chunk).
    Empty,
}

impl Format for Chunks {
    fn start(&mut self) -> Event {
        self.chunk(Delta::Role, None)
    }

    fn event(&mut self, event: LlmEvent) -> Option<Event> {
        match event {
            LlmEvent::Delta(text) => Some(self.chunk(Delta::Text(&text), None)),
            LlmEvent::Usage(u) => {
                self.usage = Some(u);
                None
            }
            LlmEvent::Finish(reason) => {
                self.finished = true;
                Some(self.chunk(Delta::Empty, Some(openai_finish(&reason))))
            }
        }
    }

    fn error(&mut self, error: LlmError) -> Event {
        OpenAiError::from(error).sse_event()
    }

    fn end(&mut self) -> Option<Event> {
        loop {
            match self.end {
                End::Pending if !self.finished => {
                    self.end = End::Done;
                    let e = LlmError::Incomplete {
                        provider: self.provider,
                    };
                    return Some(OpenAiError::from(e).sse_event());
                }
                End::Pending => {
                    self.end = End::Usage;
                    if self.include_usage {
                        return Some(self.usage(self.usage));
                    }
                }
                End::Usage => {
                    self.end = End::Done;
                    return Some(Event::default().data("[DONE]"));
                }
                End::Done => return None,
            }
        }
    }
}

/// Chat completion, OpenAI-compatible.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai",
    security(("api_key" = []), ("bearer_api_key" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` server-sent \
            `chat.completion.chunk` events ending with `data: [DONE]`", body = Object),
        (status = 400, description = "Invalid request", body = OpenAiErrorBody),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 404, description = "Unknown model", body = OpenAiErrorBody),
        (status = 502, description = "Every model failed before the first token", body = OpenAiErrorBody),
        (status = 504, description = "Every model timed out before the first token", body = OpenAiErrorBody),
    )
)]
async fn chat_completions(
    State(state): State<AppState>,
    _caller: OpenAiCaller,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let started = Instant::now();
    let streaming = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let input = ChatInput::validate(&state, req)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    // Routing returns before anything is sent, so a failure of every model still gets its HTTP
    // status (which the SDKs turn into typed exceptions).
    let routing = Instant::now();
    let routed = input.route(&state).await?;
    let routing = routing.elapsed();

    if !streaming {
        let c = crate::llm::collect(routed).await?;
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": format!("{}/{}", c.provider, c.model),
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": c.content, "refusal": null},
                "logprobs": null,
                "finish_reason": openai_finish(&c.finish_reason),
            }],
            "usage": usage_json(c.usage),
        });
        return Ok(Json(body).into_response());
    }

    let model = format!("{}/{}", routed.provider, routed.model);
    let format = Chunks::new(id, created, model, routed.provider, include_usage);
    let clock = FirstTokenClock {
        started,
        routing,
        histograms: FirstToken::new(
            routed.provider.as_str(),
            state.llm.model_label(routed.provider, &routed.model),
            TransportKind::Sse.as_str(),
        ),
    };
    Ok(sse_response(
        Relay::new(routed.stream, format).timed(clock),
        state.settings.realtime.sse_heartbeat,
    ))
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    /// A task name or `provider/model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Always 0 (unknown).
    pub created: u64,
    /// `coachd` for tasks, else the provider.
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Tasks first, then provider models.
    pub data: Vec<ModelObject>,
}

fn models_of(state: &AppState) -> Vec<ModelObject> {
    let model = |id: String, owned_by: String| ModelObject {
        id,
        object: "model",
        created: 0,
        owned_by,
    };
    let mut out: Vec<ModelObject> = state
        .llm
        .tasks()
        .map(|t| model(t.name.clone(), "coachd".to_owned()))
        .collect();
    // Each configured provider's default model, then every model a task names.
    let mut seen = HashSet::new();
    let defaults = ProviderKind::ALL
        .into_iter()
        .filter_map(|k| state.llm.provider(k).map(|p| (k, p.default_model().to_owned())));
    let from_tasks = state.llm.tasks().flat_map(|t| {
        std::iter::once(&t.primary)
            .chain(&t.fallbacks)
            .map(|m| (m.provider, m.model.clone()))
    });
    for (kind, name) in defaults.chain(from_tasks.collect::<Vec<_>>()) {
        if !name.is_empty() && seen.insert((kind, name.clone())) {
            out.push(model(format!("{kind}/{name}"), kind.to_string()));
        }
    }
    out
}

/// The models: every task, and every configured provider's models as `provider/model`.
#[utoipa::path(
    get, path = "/v1/models", tag = "openai",
    security(("api_key" = []), ("bearer_api_key" = [])),
    responses(
        (status = 200, description = "Tasks and provider models", body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
    )
)]
async fn list_models(State(state): State<AppState>, _caller: OpenAiCaller) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: models_of(&state),
    })
}

/// One model (a task name or `provider/model`).
#[utoipa::path(
    get, path = "/v1/models/{id}", tag = "openai",
    security(("api_key" = []), ("bearer_api_key" = [])),
    params(("id" = String, Path, description = "A task name or provider/model")),
    responses(
        (status = 200, description = "The model", body = ModelObject),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 404, description = "Unknown model", body = OpenAiErrorBody),
    )
)]
async fn get_model(
    State(state): State<AppState>,
    _caller: OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, OpenAiError> {
    models_of(&state)
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or_else(|| OpenAiError::model_not_found(&id))
}

/// The streamed `/v1/chat/completions` response of a routed stream, as the route builds it: for
/// the decode micro-benchmark (benches/decode.rs), which measures the relay without a server.
#[cfg(feature = "fake-upstream")]
#[doc(hidden)]
pub fn stream_response(stream: crate::llm::EventStream, include_usage: bool) -> Response {
    let format = Chunks::new(
        "chatcmpl-bench".to_owned(),
        unix_now(),
        "openai/bench".to_owned(),
        ProviderKind::Openai,
        include_usage,
    );
    sse_response(Relay::new(stream, format), std::time::Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `data:` of an event as axum writes it.
    fn data(event: Event) -> String {
        use axum::response::IntoResponse;
        let body =
            axum::response::sse::Sse::new(futures::stream::iter([Ok::<_, std::convert::Infallible>(event)]))
                .into_response()
                .into_body();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(axum::body::to_bytes(body, usize::MAX)).unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        text.strip_prefix("data: ").unwrap().trim_end().to_owned()
    }

    #[test]
    fn chunks_are_the_bytes_json_wrote() {
        for include_usage in [false, true] {
            let mut c = Chunks::new(
                "chatcmpl-1".to_owned(),
                1_700_000_000,
                "openai/gpt \"4\"".to_owned(),
                ProviderKind::Openai,
                include_usage,
            );
            let expected = |delta: Value, finish: Option<&str>| {
                // Keys in sorted order, so the string is the same whether serde_json's maps sort
                // (the default) or keep insertion order (`preserve_order`, which a dependency
                // may switch on for the whole build).
                let mut v = json!({
                    "choices": [{"delta": delta, "finish_reason": finish, "index": 0, "logprobs": null}],
                    "created": 1_700_000_000u64,
                    "id": "chatcmpl-1",
                    "model": "openai/gpt \"4\"",
                    "object": "chat.completion.chunk",
                    "system_fingerprint": null,
                });
                if include_usage {
                    v["usage"] = Value::Null;
                }
                v.to_string()
            };
            assert_eq!(
                data(c.start()),
                expected(json!({"content": "", "role": "assistant"}), None)
            );
            for text in [
                "Hello",
                " café 👋",
                "a\"b\\c\nd\re\tf\u{8}\u{c}\u{1}\u{1f}\u{7f}g",
                "",
            ] {
                let got = c.event(LlmEvent::Delta(text.to_owned())).map(data);
                assert_eq!(got, Some(expected(json!({"content": text}), None)), "{text:?}");
            }
            let got = c.event(LlmEvent::Finish(FinishReason::Length)).map(data);
            assert_eq!(got, Some(expected(json!({}), Some("length"))));
        }
    }
}
