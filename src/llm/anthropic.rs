//! Anthropic's native Messages API, streaming: `x-api-key` + `anthropic-version`, the system
//! prompt apart, and the event sequence message_start → content_block_* → message_delta →
//! message_stop (with `ping` and `error` events in between).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{TimeoutPhase, from_reqwest, retry_after};
use super::http::{Upstream, hold};
use super::openai::sanitize;
use super::sse;
use super::{ChatRequest, EventStream, FinishReason, LlmError, LlmEvent, Provider, Role, Usage};
use crate::llm::{ProviderKind, ProviderSettings};
use crate::secret::Secret;

/// The API version coachd speaks.
pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when the task sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The Anthropic provider.
#[derive(Debug, Clone)]
pub struct Anthropic {
    upstream: Arc<Upstream>,
    base_url: String,
    api_key: Secret,
    default_model: String,
    connect_timeout: Duration,
}

impl Anthropic {
    /// Builds the provider from its settings.
    pub fn new(
        upstream: Arc<Upstream>,
        settings: &ProviderSettings,
        api_key: Secret,
        connect_timeout: Duration,
    ) -> Self {
        Anthropic {
            upstream,
            base_url: settings.base_url.as_str().trim_end_matches('/').to_owned(),
            api_key,
            default_model: settings.model.clone(),
            connect_timeout,
        }
    }

    fn headers(&self) -> Result<HeaderMap, LlmError> {
        let mut h = HeaderMap::new();
        let mut key = HeaderValue::from_str(self.api_key.expose()).map_err(|_| LlmError::NotConfigured {
            provider: ProviderKind::Anthropic,
        })?;
        key.set_sensitive(true);
        h.insert("x-api-key", key);
        h.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        Ok(h)
    }

    /// The JSON body of a streaming request. System messages join the system prompt; consecutive
    /// messages of one role are merged, since the API wants user and assistant to alternate.
    pub fn request_body(&self, req: &ChatRequest) -> Value {
        let mut system: Vec<&str> = req.system.iter().map(String::as_str).collect();
        let mut messages: Vec<(&'static str, String)> = Vec::new();
        for m in &req.messages {
            let role = match m.role {
                Role::System => {
                    system.push(&m.content);
                    continue;
                }
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            match messages.last_mut() {
                Some((last, text)) if *last == role => {
                    text.push_str("\n\n");
                    text.push_str(&m.content);
                }
                _ => messages.push((role, m.content.clone())),
            }
        }
        if messages.first().is_some_and(|(role, _)| *role == "assistant") {
            messages.insert(0, ("user", "(continuing our conversation)".to_owned()));
        }
        let model = if req.model.is_empty() {
            &self.default_model
        } else {
            &req.model
        };
        let p = &req.params;
        let mut body = json!({
            "model": model,
            "max_tokens": p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
            "stream": true,
        });
        if !system.is_empty() {
            body["system"] = json!(system.join("\n\n"));
        }
        if let Some(t) = p.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(t) = p.top_p {
            body["top_p"] = json!(t);
        }
        if !p.stop.is_empty() {
            body["stop_sequences"] = json!(p.stop);
        }
        body
    }
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn default_model(&self) -> &str {
        &self.default_model
    }

    fn supports_json_schema(&self) -> bool {
        false
    }

    fn supports_json_object(&self) -> bool {
        false
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream, LlmError> {
        let lease = self.upstream.acquire().await.map_err(|_| LlmError::Timeout {
            provider: ProviderKind::Anthropic,
            phase: TimeoutPhase::Connect,
            after: self.connect_timeout,
        })?;
        let response = lease
            .client()
            .post(format!("{}/messages", self.base_url))
            .headers(self.headers()?)
            .header(ACCEPT, "text/event-stream")
            .json(&self.request_body(&request))
            .send()
            .await
            .map_err(|e| from_reqwest(ProviderKind::Anthropic, &e, self.connect_timeout))?;
        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let text = response.text().await.unwrap_or_default();
            return Err(map_status(status.as_u16(), &headers, &text));
        }
        Ok(hold(decode_stream(response), lease))
    }

    async fn check(&self) -> Result<(), LlmError> {
        let response = self
            .upstream
            .client()
            .get(format!("{}/models", self.base_url))
            .headers(self.headers()?)
            .send()
            .await
            .map_err(|e| from_reqwest(ProviderKind::Anthropic, &e, self.connect_timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        Err(map_status(status.as_u16(), &headers, &text))
    }
}

/// Maps an HTTP error and Anthropic's `{"type":"error","error":{type,message}}` body.
pub fn map_status(status: u16, headers: &HeaderMap, body: &str) -> LlmError {
    let provider = ProviderKind::Anthropic;
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let kind = parsed["error"]["type"].as_str().unwrap_or_default();
    let message = sanitize(
        parsed["error"]["message"]
            .as_str()
            .unwrap_or(&format!("HTTP {status}")),
    );
    match (status, kind) {
        (401 | 403, _) | (_, "authentication_error" | "permission_error") => {
            LlmError::Authentication { provider, message }
        }
        (429, _) | (_, "rate_limit_error") => LlmError::RateLimited {
            provider,
            retry_after: retry_after(headers),
            message,
        },
        (413, _) | (_, "request_too_large") => LlmError::ContextTooLong { provider, message },
        (400, _) if message.contains("prompt is too long") => LlmError::ContextTooLong { provider, message },
        (402, _) | (_, "billing_error") => LlmError::QuotaExceeded { provider, message },
        (500..=599, _) | (_, "overloaded_error" | "api_error") => LlmError::Unavailable {
            provider,
            status: Some(status),
            message,
        },
        _ => LlmError::BadRequest {
            provider,
            status,
            message,
        },
    }
}

/// Decodes Anthropic's event stream. Text deltas pass through at once; usage (input tokens from
/// `message_start`, output tokens from `message_delta`) and the stop reason come at the end, after
/// `message_stop`. A stream without `message_stop` is [`LlmError::Incomplete`].
pub fn decode_stream(response: reqwest::Response) -> EventStream {
    let provider = ProviderKind::Anthropic;
    let body = response.bytes_stream();
    Box::pin(async_stream::stream! {
        let mut events = Box::pin(sse::events(body));
        let mut usage = Usage::default();
        let mut stop: Option<FinishReason> = None;
        let mut stopped = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    yield Err(LlmError::Unavailable { provider, status: None, message: e.to_string() });
                    return;
                }
            };
            if event.data.trim().is_empty() {
                continue;
            }
            let wire: WireEvent<'_> = match serde_json::from_str(&event.data) {
                Ok(w) => w,
                Err(e) => {
                    yield Err(LlmError::Protocol { provider, message: format!("bad event {:?}: {e}", event.event) });
                    return;
                }
            };
            match &*wire.kind {
                "message_start" => {
                    if let Some(u) = wire.message.and_then(|m| m.usage) {
                        usage.prompt_tokens = u.input_tokens.unwrap_or(0);
                        usage.completion_tokens = u.output_tokens.unwrap_or(0);
                    }
                }
                "content_block_delta" => {
                    if let Some(text) = wire.delta.and_then(|d| d.text)
                        && !text.is_empty() {
                            yield Ok(LlmEvent::Delta(text.into_owned()));
                        }
                }
                "message_delta" => {
                    if let Some(reason) = wire.delta.and_then(|d| d.stop_reason) {
                        stop = Some(FinishReason::from_provider(&reason));
                    }
                    if let Some(out) = wire.usage.and_then(|u| u.output_tokens) {
                        usage.completion_tokens = out;
                    }
                }
                "message_stop" => {
                    stopped = true;
                    break;
                }
                "error" => {
                    let err = wire.error.unwrap_or_default();
                    yield Err(LlmError::Stream { provider, kind: err.kind, message: sanitize(&err.message) });
                    return;
                }
                // ping, content_block_start/stop, and event types added later.
                _ => {}
            }
        }
        if !stopped {
            yield Err(LlmError::Incomplete { provider });
            return;
        }
        yield Ok(LlmEvent::Usage(usage));
        yield Ok(LlmEvent::Finish(stop.unwrap_or(FinishReason::Stop)));
    })
}

// The type, text and stop reason are borrowed from the event where they need no unescaping: an
// event is parsed per token, and only the text itself is copied out.
#[derive(Debug, Deserialize)]
struct WireEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Message, Params};

    fn provider() -> Anthropic {
        let settings = ProviderSettings {
            api_key: None,
            model: "claude-test".into(),
            base_url: url::Url::parse("http://127.0.0.1:1/v1").unwrap(),
            http_version: crate::llm::http::HttpVersion::Auto,
        };
        let upstream = crate::llm::http::Upstream::new(
            crate::llm::http::ClientConfig {
                connect_timeout: Duration::from_secs(1),
                version: crate::llm::http::HttpVersion::Auto,
                tls: false,
            },
            crate::llm::http::PoolLimits::default(),
        )
        .unwrap();
        Anthropic::new(upstream, &settings, Secret::new("k"), Duration::from_secs(1))
    }

    #[test]
    fn system_is_apart_and_roles_alternate() {
        let req = ChatRequest {
            model: String::new(),
            system: Some("be kind".into()),
            messages: vec![
                Message::assistant("earlier reply"),
                Message::system("extra rule"),
                Message::user("a"),
                Message::user("b"),
            ],
            params: Params::default(),
            response_format: None,
        };
        let body = provider().request_body(&req);
        assert_eq!(body["system"], "be kind\n\nextra rule");
        assert_eq!(body["model"], "claude-test");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        let roles: Vec<&str> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(body["messages"][2]["content"], "a\n\nb");
    }

    #[test]
    fn error_types_map() {
        let h = HeaderMap::new();
        let overloaded = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert!(matches!(
            map_status(529, &h, overloaded),
            LlmError::Unavailable {
                status: Some(529),
                ..
            }
        ));
        let long = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 205429 tokens > 200000 maximum"}}"#;
        assert!(matches!(
            map_status(400, &h, long),
            LlmError::ContextTooLong { .. }
        ));
        let auth =
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert!(matches!(
            map_status(401, &h, auth),
            LlmError::Authentication { .. }
        ));
    }
}
