//! The request of `POST /v1/chat/completions` as OpenAI defines it, and its validation into what
//! the LLM layer takes: a task or a provider model, messages, parameters, a response format.

use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::OpenAiError;
use crate::llm::ProviderKind;
use crate::llm::{LlmError, Message, ModelRef, Params, ResponseFormat, Routed};
use crate::routes::validate::{check_messages, check_params};
use crate::state::AppState;

/// `POST /v1/chat/completions`, as OpenAI defines it. Unknown fields are ignored, as the SDKs
/// send many; features coachd does not offer (tools, `n` > 1, non-text content) are refused.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// A task (`chat`, `session_summary`, ...) or `provider/model` (`openai/gpt-4o-mini`).
    #[schema(example = "chat")]
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `include_usage`: a last chunk with `choices: []` and the usage.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Longest reply in tokens (deprecated by OpenAI in favour of `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Longest reply in tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Up to 4 stop sequences.
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// `text`, `json_object` or `json_schema`.
    #[serde(default)]
    pub response_format: Option<ResponseFormatSpec>,
    /// Not supported: a request with tools is refused.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// Not supported: a request with functions is refused.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<Vec<Value>>,
}

/// One message.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Text, or an array of `{"type":"text","text":...}` parts.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// `stop`: one sequence or several.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    /// One sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send the usage in a last chunk.
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResponseFormatSpec {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// With `json_schema`: the schema.
    #[serde(default)]
    pub json_schema: Option<JsonSchemaSpec>,
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct JsonSchemaSpec {
    /// Schema name.
    #[serde(default)]
    pub name: Option<String>,
    /// The JSON Schema.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
}

/// What a model name resolves to.
enum Target {
    Task(String),
    Model(ModelRef),
}

/// A validated chat request.
pub(super) struct ChatInput {
    target: Target,
    messages: Vec<Message>,
    params: Params,
    response_format: Option<ResponseFormat>,
}

fn resolve_model(state: &AppState, model: &str) -> Result<Target, OpenAiError> {
    if state.llm.task(model).is_some() {
        return Ok(Target::Task(model.to_owned()));
    }
    let Some((provider, name)) = model.split_once('/') else {
        return Err(OpenAiError::model_not_found(model));
    };
    match provider.parse::<ProviderKind>() {
        Ok(kind) if !name.trim().is_empty() && state.llm.provider(kind).is_some() => {
            Ok(Target::Model(ModelRef {
                provider: kind,
                model: name.to_owned(),
                params: Params::default(),
            }))
        }
        _ => Err(OpenAiError::model_not_found(model)),
    }
}

fn convert_message(i: usize, m: ChatMessage) -> Result<Message, OpenAiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => crate::llm::Role::System,
        "user" => crate::llm::Role::User,
        "assistant" => crate::llm::Role::Assistant,
        other => {
            return Err(OpenAiError::invalid(format!(
                "messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"
            ))
            .with_param("messages"));
        }
    };
    let content = match m.content {
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(OpenAiError::invalid(format!(
                            "messages[{i}] has a content part of type {kind:?}: only text is supported"
                        ))
                        .with_param("messages"));
                    }
                }
            }
            text
        }
        None => {
            return Err(
                OpenAiError::invalid(format!("messages[{i}].content is required")).with_param("messages")
            );
        }
    };
    Ok(Message::new(role, content))
}

impl ChatInput {
    pub(super) fn validate(state: &AppState, req: ChatCompletionRequest) -> Result<Self, OpenAiError> {
        let s = &state.settings;
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) || req.functions.is_some() {
            return Err(OpenAiError::invalid("tools and functions are not supported").with_param("tools"));
        }
        if req.n.is_some_and(|n| n != 1) {
            return Err(OpenAiError::invalid("only n = 1 is supported").with_param("n"));
        }
        let target = resolve_model(state, &req.model)?;
        if req.messages.is_empty() {
            return Err(OpenAiError::invalid("messages must not be empty").with_param("messages"));
        }
        let messages = req
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        check_messages(&messages, s)?;
        let params = Params {
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            stop: match req.stop {
                None => Vec::new(),
                Some(StopSpec::One(s)) => vec![s],
                Some(StopSpec::Many(v)) => v,
            },
        };
        check_params(&params, s)?;
        let response_format = match req.response_format {
            None => None,
            Some(f) => match f.kind.as_str() {
                "text" => None,
                "json_object" => Some(ResponseFormat::JsonObject),
                "json_schema" => {
                    let spec = f.json_schema.and_then(|j| Some((j.name, j.schema?)));
                    let Some((name, schema)) = spec else {
                        return Err(
                            OpenAiError::invalid("response_format.json_schema.schema is required")
                                .with_param("response_format"),
                        );
                    };
                    Some(ResponseFormat::JsonSchema {
                        name: name.unwrap_or_else(|| "response".to_owned()),
                        schema,
                    })
                }
                other => {
                    return Err(OpenAiError::invalid(format!(
                        "response_format type {other:?} is not supported (text, json_object, json_schema)"
                    ))
                    .with_param("response_format"));
                }
            },
        };
        Ok(ChatInput {
            target,
            messages,
            params,
            response_format,
        })
    }

    /// Routes the request: through a task's models, or to the one provider model it names.
    pub(super) async fn route(self, state: &AppState) -> Result<Routed, LlmError> {
        match self.target {
            Target::Task(task) => {
                state
                    .llm
                    .route_task(&task, &self.params, None, self.messages, self.response_format)
                    .await
            }
            Target::Model(mut model) => {
                model.params = self.params;
                state
                    .llm
                    .route_model(model, None, self.messages, self.response_format)
                    .await
            }
        }
    }
}
