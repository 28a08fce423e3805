//! The LLM layer: one streaming call per provider (a chat request in, a stream of events out),
//! task routing with retries and fallbacks on top, and `generate` / `generate_json` as the
//! reference coach service offers them (a non-streaming call is the same stream, collected).
//!
//! Streaming is the primary path. Each provider file keeps the same internal order: constants,
//! struct, trait impl, error mapping, stream decoding, wire structs, tests.

pub mod anthropic;
pub mod error;
pub mod groq;
pub mod http;
pub mod json;
pub mod offline;
pub mod openai;
pub mod openrouter;
pub mod router;
pub mod settings;
pub mod sse;
pub mod timeout;

use std::pin::Pin;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

pub use error::LlmError;
pub use router::{Llm, ModelRef, Routed, TaskSpec};
pub use settings::{LlmSettings, LlmTimeouts, ProviderKind, ProviderSettings};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions (providers that take a separate system prompt get it there).
    System,
    /// The end user.
    User,
    /// The model.
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
}

/// Structured-output mode of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// Schema name (OpenAI requires one).
        name: String,
        /// The JSON Schema.
        schema: serde_json::Value,
    },
}

/// Sampling parameters of one model call; unset means the provider's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Params {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Longest reply in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Params {
    /// `self`, with every unset field taken from `base`.
    pub fn or(&self, base: &Params) -> Params {
        Params {
            temperature: self.temperature.or(base.temperature),
            top_p: self.top_p.or(base.top_p),
            max_tokens: self.max_tokens.or(base.max_tokens),
            stop: if self.stop.is_empty() {
                base.stop.clone()
            } else {
                self.stop.clone()
            },
        }
    }
}

/// A chat request to one provider and model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Provider-specific model name.
    pub model: String,
    /// System prompt, if any (kept apart because Anthropic takes it apart).
    pub system: Option<String>,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// Sampling parameters.
    pub params: Params,
    /// Structured-output mode.
    pub response_format: Option<ResponseFormat>,
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens in the reply.
    pub completion_tokens: u32,
}

/// Why a reply ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model finished (`stop`, `end_turn`, `stop_sequence`).
    Stop,
    /// The token limit was reached (`length`, `max_tokens`).
    Length,
    /// A content filter stopped it.
    ContentFilter,
    /// The model asked for a tool.
    ToolCalls,
    /// The client cancelled the turn.
    Cancelled,
    /// Something else the provider said.
    Other(String),
}

impl FinishReason {
    /// Maps a provider's finish/stop reason.
    pub fn from_provider(reason: &str) -> Self {
        match reason {
            "stop" | "end_turn" | "stop_sequence" => FinishReason::Stop,
            "length" | "max_tokens" => FinishReason::Length,
            "content_filter" | "refusal" => FinishReason::ContentFilter,
            "tool_calls" | "tool_use" | "function_call" => FinishReason::ToolCalls,
            other => FinishReason::Other(other.to_owned()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Other(s) => s,
        }
    }
}

/// One event of a provider stream. Which model serves is not an event: routing returns it next
/// to the stream ([`Routed`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// A piece of reply text.
    Delta(String),
    /// Token counts (may come before or after `Finish`).
    Usage(Usage),
    /// The reply ended normally. A stream without one ended in error.
    Finish(FinishReason),
}

/// A stream of provider events; an `Err` item ends it.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<LlmEvent, LlmError>> + Send>>;

/// One upstream LLM API.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// The model used when a request names none.
    fn default_model(&self) -> &str;

    /// Whether `response_format: json_schema` is honoured natively.
    fn supports_json_schema(&self) -> bool;

    /// Whether `response_format: json_object` is honoured natively.
    fn supports_json_object(&self) -> bool;

    /// Sends the request and returns the event stream once the response headers arrived (an
    /// HTTP error status is an `Err` here). Dropping the stream aborts the upstream request.
    async fn stream(&self, request: ChatRequest) -> Result<EventStream, LlmError>;

    /// A cheap reachability and credentials check (lists models; never generates tokens).
    async fn check(&self) -> Result<(), LlmError>;
}

/// A finished, collected reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The reply text.
    pub content: String,
    /// Who answered.
    pub provider: ProviderKind,
    /// Which model answered.
    pub model: String,
    /// Token counts, when the provider reported them.
    pub usage: Option<Usage>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Collects a routed stream into a [`Completion`]; a stream that ends without `Finish` is an
/// error.
pub async fn collect(routed: Routed) -> Result<Completion, LlmError> {
    let Routed {
        provider,
        model,
        mut stream,
    } = routed;
    let mut content = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(event) = stream.next().await {
        match event? {
            LlmEvent::Delta(text) => content.push_str(&text),
            LlmEvent::Usage(u) => usage = Some(u),
            LlmEvent::Finish(reason) => finish = Some(reason),
        }
    }
    let finish_reason = finish.ok_or(LlmError::Incomplete { provider })?;
    Ok(Completion {
        content,
        provider,
        model,
        usage,
        finish_reason,
    })
}
