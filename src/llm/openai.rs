//! OpenAI Chat Completions, streaming, and the core every OpenAI-compatible provider shares
//! (Groq, OpenRouter, and self-hosted servers such as Ollama, vLLM, llama.cpp or LM Studio
//! through `COACHD_OPENAI_BASE_URL`). Always asks for usage in streams.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{TimeoutPhase, from_reqwest, retry_after};
use super::http::{Upstream, hold};
use super::sse;
use super::{
    ChatRequest, EventStream, FinishReason, LlmError, LlmEvent, Provider, ResponseFormat, Role, Usage,
};
use crate::llm::{ProviderKind, ProviderSettings};
use crate::secret::Secret;

/// Longest provider error message kept (they can quote whole prompts).
const MAX_ERROR_MESSAGE: usize = 500;

/// An OpenAI-compatible chat-completions API.
#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    kind: ProviderKind,
    upstream: Arc<Upstream>,
    base_url: String,
    api_key: Secret,
    default_model: String,
    extra_headers: HeaderMap,
    json_schema: bool,
    connect_timeout: Duration,
}

impl OpenAiCompatible {
    /// A provider of `kind` at `settings.base_url`; `extra_headers` go on every request.
    pub fn new(
        kind: ProviderKind,
        upstream: Arc<Upstream>,
        settings: &ProviderSettings,
        api_key: Secret,
        extra_headers: HeaderMap,
        json_schema: bool,
        connect_timeout: Duration,
    ) -> Self {
        OpenAiCompatible {
            kind,
            upstream,
            base_url: settings.base_url.as_str().trim_end_matches('/').to_owned(),
            api_key,
            default_model: settings.model.clone(),
            extra_headers,
            json_schema,
            connect_timeout,
        }
    }

    fn headers(&self) -> Result<HeaderMap, LlmError> {
        let mut h = self.extra_headers.clone();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.api_key.expose()))
            .map_err(|_| LlmError::NotConfigured { provider: self.kind })?;
        auth.set_sensitive(true);
        h.insert(AUTHORIZATION, auth);
        Ok(h)
    }

    /// The JSON body of a streaming request.
    pub fn request_body(&self, req: &ChatRequest) -> Value {
        let mut messages = Vec::with_capacity(req.messages.len() + 1);
        if let Some(system) = &req.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        for m in &req.messages {
            let role = match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            messages.push(json!({"role": role, "content": m.content}));
        }
        let model = if req.model.is_empty() {
            &self.default_model
        } else {
            &req.model
        };
        let mut body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            // Without this, OpenAI sends no token counts in a stream.
            "stream_options": {"include_usage": true},
        });
        let p = &req.params;
        if let Some(t) = p.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(t) = p.top_p {
            body["top_p"] = json!(t);
        }
        if let Some(n) = p.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        match &req.response_format {
            Some(ResponseFormat::JsonSchema { name, schema }) if self.json_schema => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": false},
                });
            }
            Some(_) => body["response_format"] = json!({"type": "json_object"}),
            None => {}
        }
        body
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiCompatible {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn default_model(&self) -> &str {
        &self.default_model
    }

    fn supports_json_schema(&self) -> bool {
        self.json_schema
    }

    fn supports_json_object(&self) -> bool {
        true
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream, LlmError> {
        let body = self.request_body(&request);
        let lease = self.upstream.acquire().await.map_err(|_| LlmError::Timeout {
            provider: self.kind,
            phase: TimeoutPhase::Connect,
            after: self.connect_timeout,
        })?;
        let response = lease
            .client()
            .post(format!("{}/chat/completions", self.base_url))
            .headers(self.headers()?)
            .header(ACCEPT, "text/event-stream")
            .json(&body)
            .send()
            .await
            .map_err(|e| from_reqwest(self.kind, &e, self.connect_timeout))?;
        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let text = response.text().await.unwrap_or_default();
            return Err(map_status(self.kind, status.as_u16(), &headers, &text));
        }
        Ok(hold(decode_stream(self.kind, response), lease))
    }

    async fn check(&self) -> Result<(), LlmError> {
        let response = self
            .upstream
            .client()
            .get(format!("{}/models", self.base_url))
            .headers(self.headers()?)
            .send()
            .await
            .map_err(|e| from_reqwest(self.kind, &e, self.connect_timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        Err(map_status(self.kind, status.as_u16(), &headers, &text))
    }
}

/// Maps an HTTP error status and its JSON body (OpenAI's `{"error":{message,type,code}}`, where
/// OpenRouter's `code` is an integer) to a typed error.
pub fn map_status(provider: ProviderKind, status: u16, headers: &HeaderMap, body: &str) -> LlmError {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let err = &parsed["error"];
    let message = err["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = sanitize(&message);
    let code = err["code"].as_str().unwrap_or_default();
    let kind = err["type"].as_str().unwrap_or_default();
    match status {
        401 | 403 => LlmError::Authentication { provider, message },
        402 => LlmError::QuotaExceeded { provider, message },
        429 if code == "insufficient_quota" || kind == "insufficient_quota" => {
            LlmError::QuotaExceeded { provider, message }
        }
        429 => LlmError::RateLimited {
            provider,
            retry_after: retry_after(headers),
            message,
        },
        400 | 413 | 422 if code == "context_length_exceeded" || mentions_context(&message) => {
            LlmError::ContextTooLong { provider, message }
        }
        408 | 500..=599 => LlmError::Unavailable {
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

fn mentions_context(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("context length")
        || m.contains("context window")
        || m.contains("maximum context")
        || m.contains("tokens exceed")
        || m.contains("too long")
}

/// Shortens a provider message and masks anything shaped like an API key.
pub fn sanitize(message: &str) -> String {
    let masked: Vec<String> = message
        .split(' ')
        .map(|w| {
            if w.starts_with("sk-") || w.starts_with("gsk_") || w.starts_with("sk_") {
                "[key]".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let mut out = masked.join(" ");
    if out.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Decodes an OpenAI-compatible SSE body. Text deltas pass through at once; usage and the finish
/// reason are held to the end so `Finish` is always the last event. The stream must end with
/// `[DONE]` or at least a finish reason; anything else is [`LlmError::Incomplete`].
pub fn decode_stream(provider: ProviderKind, response: reqwest::Response) -> EventStream {
    let body = response.bytes_stream();
    Box::pin(async_stream::stream! {
        let mut events = Box::pin(sse::events(body));
        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<Usage> = None;
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    yield Err(LlmError::Unavailable { provider, status: None, message: e.to_string() });
                    return;
                }
            };
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk<'_> = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(e) => {
                    yield Err(LlmError::Protocol { provider, message: format!("bad chunk: {e}") });
                    return;
                }
            };
            // OpenRouter (and some proxies) report failures as a chunk inside a 200 stream.
            if let Some(err) = chunk.error {
                yield Err(LlmError::Stream {
                    provider,
                    kind: err.code.map(|c| c.to_string().trim_matches('"').to_owned()).unwrap_or_default(),
                    message: sanitize(&err.message.unwrap_or_default()),
                });
                return;
            }
            if let Some(u) = chunk.usage.or_else(|| chunk.x_groq.and_then(|g| g.usage)) {
                usage = Some(Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens });
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.and_then(|d| d.content)
                    && !text.is_empty() {
                        yield Ok(LlmEvent::Delta(text.into_owned()));
                    }
                if let Some(reason) = choice.finish_reason {
                    if reason == "error" {
                        yield Err(LlmError::Stream { provider, kind: "error".into(), message: "finish_reason error".into() });
                        return;
                    }
                    finish = Some(FinishReason::from_provider(&reason));
                }
            }
        }
        match finish {
            Some(reason) => {
                if !done {
                    tracing::debug!(%provider, "stream ended after its finish reason but without [DONE]");
                }
                if let Some(u) = usage {
                    yield Ok(LlmEvent::Usage(u));
                }
                yield Ok(LlmEvent::Finish(reason));
            }
            None => yield Err(LlmError::Incomplete { provider }),
        }
    })
}

// Text and finish reason are borrowed from the event where they need no unescaping: a chunk is
// parsed per token, and only the text itself is copied out.
#[derive(Debug, Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Choices<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    x_groq: Option<GroqExtra>,
    #[serde(default)]
    error: Option<WireError>,
}

/// The choices of a chunk. There is one (coachd never asks for `n`), so it is kept inline: no
/// allocation per token for the list.
#[derive(Debug, Default)]
struct Choices<'a> {
    first: Option<Choice<'a>>,
    more: Vec<Choice<'a>>,
}

impl<'a> IntoIterator for Choices<'a> {
    type Item = Choice<'a>;
    type IntoIter = std::iter::Chain<std::option::IntoIter<Choice<'a>>, std::vec::IntoIter<Choice<'a>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.more)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct List<'a>(std::marker::PhantomData<Choices<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for List<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Choices<'a>, A::Error> {
                let mut choices = Choices {
                    first: seq.next_element()?,
                    more: Vec::new(),
                };
                while let Some(choice) = seq.next_element()? {
                    choices.more.push(choice);
                }
                Ok(choices)
            }
        }
        deserializer.deserialize_seq(List(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

#[derive(Debug, Deserialize)]
struct GroqExtra {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_of_a_chunk_is_read_in_order() {
        let texts = |json: &str| -> Vec<String> {
            let chunk: Chunk<'_> = serde_json::from_str(json).unwrap();
            chunk
                .choices
                .into_iter()
                .filter_map(|c| c.delta.and_then(|d| d.content).map(Cow::into_owned))
                .collect()
        };
        assert_eq!(texts(r#"{"choices":[]}"#), Vec::<String>::new());
        assert_eq!(texts(r#"{"usage":null}"#), Vec::<String>::new());
        assert_eq!(
            texts(r#"{"choices":[{"delta":{"content":"a"}},{"delta":{}},{"delta":{"content":"b\"c"}}]}"#),
            ["a", "b\"c"]
        );
        assert!(serde_json::from_str::<Chunk<'_>>(r#"{"choices":{}}"#).is_err());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn real_error_bodies_map_to_typed_errors() {
        let p = ProviderKind::Openai;
        let wire =
            |f: &str| std::fs::read_to_string(format!("{}/../shared/wire/{f}", env!("CARGO_MANIFEST_DIR")));
        // The wire folder sits beside the repository; skip the file-based half where it is absent.
        if let Ok(body) = wire("openai_error_429_insufficient_quota.json") {
            assert!(matches!(
                map_status(p, 429, &HeaderMap::new(), &body),
                LlmError::QuotaExceeded { .. }
            ));
        }
        let rate =
            r#"{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}"#;
        match map_status(
            p,
            429,
            &headers(&[("retry-after", "27"), ("retry-after-ms", "26604")]),
            rate,
        ) {
            LlmError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_millis(26_604)))
            }
            other => panic!("{other:?}"),
        }
        let ctx = r#"{"error":{"message":"Input tokens exceed the configured limit","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert!(matches!(
            map_status(p, 400, &HeaderMap::new(), ctx),
            LlmError::ContextTooLong { .. }
        ));
        let or = r#"{"error":{"code":400,"message":"Invalid model specified"}}"#;
        assert!(matches!(
            map_status(p, 400, &HeaderMap::new(), or),
            LlmError::BadRequest { status: 400, .. }
        ));
        assert!(matches!(
            map_status(p, 503, &HeaderMap::new(), "{}"),
            LlmError::Unavailable {
                status: Some(503),
                ..
            }
        ));
        let auth = r#"{"error":{"message":"Incorrect API key provided: sk-proj-abc123. See docs.","code":"invalid_api_key"}}"#;
        let e = map_status(p, 401, &HeaderMap::new(), auth);
        assert!(matches!(e, LlmError::Authentication { .. }));
        assert!(!e.to_string().contains("sk-proj-abc123"), "{e}");
    }
}
