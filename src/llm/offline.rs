//! The built-in offline provider: deterministic, no network, used when no provider key is set so
//! coachd works for development and demos. Its replies say plainly that they are offline, stream
//! word by word at a configurable pace, and in JSON mode follow the requested schema.

use std::time::Duration;

use serde_json::{Value, json};

use super::{
    ChatRequest, EventStream, FinishReason, LlmError, LlmEvent, Provider, ResponseFormat, Role, Usage,
};
use crate::llm::ProviderKind;

/// The model name the offline provider reports.
pub const MODEL: &str = "coachd-offline-1";
/// Longest part of the user's message quoted back.
const QUOTE_CHARS: usize = 200;

/// The offline provider.
#[derive(Debug, Clone)]
pub struct Offline {
    token_delay: Duration,
}

impl Offline {
    /// A provider that waits `token_delay` between tokens.
    pub fn new(token_delay: Duration) -> Self {
        Offline { token_delay }
    }

    /// The full reply to a request (what the stream spells out token by token).
    pub fn reply(request: &ChatRequest) -> String {
        match &request.response_format {
            Some(ResponseFormat::JsonSchema { schema, .. }) => example(schema, 0).to_string(),
            Some(ResponseFormat::JsonObject) => {
                json!({"offline": true, "message": "offline reply: no LLM provider is configured"})
                    .to_string()
            }
            None => {
                let last = request
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .map(|m| m.content.trim())
                    .unwrap_or("");
                let quoted: String = last.chars().take(QUOTE_CHARS).collect();
                let ellipsis = if last.chars().count() > QUOTE_CHARS {
                    "…"
                } else {
                    ""
                };
                format!(
                    "(Offline reply: no LLM provider is configured, so coachd answers locally.) \
                     You said: \"{quoted}{ellipsis}\". Set an API key such as OPENAI_API_KEY to get a real coach."
                )
            }
        }
    }
}

#[async_trait::async_trait]
impl Provider for Offline {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Offline
    }

    fn default_model(&self) -> &str {
        MODEL
    }

    fn supports_json_schema(&self) -> bool {
        true
    }

    fn supports_json_object(&self) -> bool {
        true
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream, LlmError> {
        let reply = Self::reply(&request);
        let prompt_words: usize = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum::<usize>()
            + request
                .system
                .as_deref()
                .map_or(0, |s| s.split_whitespace().count());
        let delay = self.token_delay;
        let tokens = split_words(&reply);
        let completion = tokens.len();
        Ok(Box::pin(async_stream::stream! {
            for (i, token) in tokens.into_iter().enumerate() {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                yield Ok(LlmEvent::Delta(token));
            }
            yield Ok(LlmEvent::Usage(Usage {
                prompt_tokens: u32::try_from(prompt_words).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(completion).unwrap_or(u32::MAX),
            }));
            yield Ok(LlmEvent::Finish(FinishReason::Stop));
        }))
    }

    async fn check(&self) -> Result<(), LlmError> {
        Ok(())
    }
}

/// Words with their leading space, so concatenation restores the text.
fn split_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        if ch == ' ' && !current.trim().is_empty() {
            out.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A small instance of a JSON Schema: first enum value, one array item, every property.
pub fn example(schema: &Value, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema.get(key).and_then(Value::as_array).and_then(|v| v.first()) {
            return example(first, depth + 1);
        }
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let mut obj = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    obj.insert(name.clone(), example(sub, depth + 1));
                }
            }
            Value::Object(obj)
        }
        "array" => {
            let item = schema.get("items").map_or(Value::Null, |s| example(s, depth + 1));
            json!([item])
        }
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(0)),
        "number" => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.5)),
        "boolean" => json!(false),
        "null" => Value::Null,
        _ => json!("offline reply: no LLM provider is configured"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Message, Params, Routed, collect};

    fn request(text: &str, format: Option<ResponseFormat>) -> ChatRequest {
        ChatRequest {
            model: String::new(),
            system: Some("sys".into()),
            messages: vec![Message::user(text)],
            params: Params::default(),
            response_format: format,
        }
    }

    #[tokio::test]
    async fn replies_deterministically_and_says_it_is_offline() {
        let p = Offline::new(Duration::ZERO);
        let routed = |stream| Routed {
            provider: ProviderKind::Offline,
            model: MODEL.to_owned(),
            stream,
        };
        let a = collect(routed(p.stream(request("How do I scale?", None)).await.unwrap()))
            .await
            .unwrap();
        let b = collect(routed(p.stream(request("How do I scale?", None)).await.unwrap()))
            .await
            .unwrap();
        assert_eq!(a.content, b.content);
        assert!(a.content.contains("Offline reply") && a.content.contains("How do I scale?"));
        assert_eq!(a.finish_reason, FinishReason::Stop);
        assert!(a.usage.is_some_and(|u| u.completion_tokens > 5));
    }

    #[test]
    fn json_mode_follows_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "intent": {"type": "string", "enum": ["goal_setting", "other"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "action_items": {"type": "array", "items": {"type": "object", "properties": {"task": {"type": "string"}}}}
            },
            "required": ["summary"]
        });
        let reply = Offline::reply(&request(
            "x",
            Some(ResponseFormat::JsonSchema {
                name: "n".into(),
                schema,
            }),
        ));
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["intent"], "goal_setting");
        assert!(v["summary"].is_string());
        assert!(v["action_items"][0]["task"].is_string());
    }
}
