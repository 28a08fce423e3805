//! A fake LLM upstream that speaks the providers' exact wire formats (OpenAI-compatible chat
//! completions in OpenAI, Groq and OpenRouter flavours, Anthropic Messages, OpenAI embeddings,
//! OpenAI audio transcriptions),
//! with scripted timing and failure modes. The one stand-in for paid APIs: tests, examples and
//! benchmarks all use it. Compiled only with the `fake-upstream` feature.

mod anthropic;
mod audio;
mod embeddings;
mod openai;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which OpenAI-compatible provider the fake imitates on `/chat/completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// OpenAI: usage in a final chunk with `choices: []` when `stream_options.include_usage`.
    #[default]
    OpenAi,
    /// Groq: usage also under `x_groq.usage`, on the finish chunk.
    Groq,
    /// OpenRouter: `: OPENROUTER PROCESSING` comments, errors as chunks inside a 200 stream.
    OpenRouter,
}

/// A failure the fake produces instead of (or in the middle of) a normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and the provider's real error body for it; 429 carries
    /// `retry-after` (seconds) and, for OpenAI, `retry-after-ms`.
    Status {
        /// HTTP status.
        status: u16,
        /// `retry-after` value in seconds, for 429/503/529.
        retry_after: Option<u64>,
    },
    /// OpenAI's 429 `insufficient_quota`: same status as a rate limit, but not retryable.
    Quota,
    /// After this many tokens, an error inside the 200 stream: Anthropic's `overloaded_error`
    /// event, or OpenRouter's error chunk with `finish_reason: "error"`.
    MidStreamError {
        /// Tokens sent before the error.
        after: usize,
    },
    /// After this many tokens, send nothing more but keep the connection open.
    Stall {
        /// Tokens sent before the stall.
        after: usize,
    },
    /// After this many tokens, close the body without a finish reason or `[DONE]`.
    Cut {
        /// Tokens sent before the cut.
        after: usize,
    },
}

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub struct Script {
    /// The reply, one entry per streamed token.
    pub tokens: Vec<String>,
    /// Reply with `echo: ` + the last user message instead of `tokens`.
    pub echo: bool,
    /// Answer a request that asks for a JSON schema (OpenAI's structured outputs) with the
    /// smallest instance of that schema, as a model that obeys it would; others get `tokens`.
    pub structured: bool,
    /// Delay before the first token (after the response headers).
    pub first_token_delay: Duration,
    /// Delay between tokens.
    pub token_interval: Duration,
    /// Delay before the response headers are sent.
    pub header_delay: Duration,
    /// A failure to inject.
    pub fault: Option<Fault>,
    /// Use CRLF line endings.
    pub crlf: bool,
    /// Re-cut the body into writes of this many bytes (cuts mid-line and mid-UTF-8 character).
    pub split_bytes: Option<usize>,
    /// Start the body with a UTF-8 byte-order mark.
    pub leading_bom: bool,
    /// OpenAI-compatible flavour.
    pub flavor: Flavor,
    /// Finish reason of a normal end (`stop` / `end_turn` are used when this is `None`).
    pub finish_reason: Option<String>,
    /// Replay these exact body writes instead of generating anything (for captured traffic);
    /// with a `Stall` fault, the connection then stays open with nothing more sent.
    pub raw_chunks: Option<Vec<Bytes>>,
}

impl Default for Script {
    fn default() -> Self {
        Script::text("Hello! How can I help you today?")
    }
}

impl Script {
    /// A reply of these words, streamed one word per token (leading spaces kept).
    pub fn text(text: &str) -> Self {
        Script {
            tokens: split_tokens(text),
            echo: false,
            structured: false,
            first_token_delay: Duration::ZERO,
            token_interval: Duration::ZERO,
            header_delay: Duration::ZERO,
            fault: None,
            crlf: false,
            split_bytes: None,
            leading_bom: false,
            flavor: Flavor::OpenAi,
            finish_reason: None,
            raw_chunks: None,
        }
    }

    /// This script, answering requests with a JSON schema by the schema's smallest instance.
    pub fn structured(mut self) -> Self {
        self.structured = true;
        self
    }

    /// A reply of `n` tokens `t0 t1 …`.
    pub fn counted(n: usize) -> Self {
        let mut s = Script::text("");
        s.tokens = (0..n)
            .map(|i| if i == 0 { format!("t{i}") } else { format!(" t{i}") })
            .collect();
        s
    }

    /// A reply that repeats the last user message (`echo: …`).
    pub fn echo() -> Self {
        Script {
            echo: true,
            ..Script::text("")
        }
    }

    /// A failure before any byte of the body.
    pub fn status(status: u16) -> Self {
        Script::default().with_fault(Fault::Status {
            status,
            retry_after: matches!(status, 429 | 503 | 529).then_some(1),
        })
    }

    /// Replays exact body writes.
    pub fn raw(chunks: Vec<Bytes>) -> Self {
        Script {
            raw_chunks: Some(chunks),
            ..Script::default()
        }
    }

    /// Sets the fault.
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Sets first-token delay and token interval.
    pub fn paced(mut self, first_token: Duration, interval: Duration) -> Self {
        self.first_token_delay = first_token;
        self.token_interval = interval;
        self
    }

    /// Sets the flavour.
    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }
}

fn split_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        if ch == ' ' && !current.trim().is_empty() {
            tokens.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Request headers (lowercase names; repeated headers keep the last).
    pub headers: HashMap<String, String>,
    /// Parsed JSON body (`Null` when it was not JSON).
    pub body: Value,
}

/// How many requests the fake keeps for [`FakeUpstream::requests`]: the newest, so a test sees
/// what it just caused while a benchmark's soak (millions of requests, gigabytes of prompts if
/// all were kept) stays flat. Counts ([`FakeUpstream::request_count`]) cover every request.
pub const RECORD_LIMIT: usize = 10_000;

#[derive(Debug, Default)]
struct Recordings {
    newest: VecDeque<Recorded>,
    /// Every request's path, counted.
    per_path: HashMap<String, usize>,
}

#[derive(Debug, Default)]
struct Shared {
    api_key: Option<String>,
    default: Mutex<Option<Script>>,
    per_model: Mutex<HashMap<String, Script>>,
    queued: Mutex<HashMap<String, VecDeque<Script>>>,
    requests: Mutex<Recordings>,
    streams_started: AtomicUsize,
    streams_finished: AtomicUsize,
    disconnects: AtomicUsize,
    disconnected: Notify,
    connections: AtomicUsize,
}

// A poisoned lock only means another test thread panicked mid-update; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn script_for(&self, model: &str) -> Script {
        if let Some(s) = lock(&self.queued).get_mut(model).and_then(VecDeque::pop_front) {
            return s;
        }
        if let Some(s) = lock(&self.queued).get_mut("*").and_then(VecDeque::pop_front) {
            return s;
        }
        if let Some(s) = lock(&self.per_model).get(model) {
            return s.clone();
        }
        lock(&self.default).clone().unwrap_or_default()
    }

    fn record(&self, path: &str, headers: &HeaderMap, body: &Value) {
        let headers = headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let mut recordings = lock(&self.requests);
        *recordings.per_path.entry(path.to_owned()).or_default() += 1;
        if recordings.newest.len() == RECORD_LIMIT {
            recordings.newest.pop_front();
        }
        recordings.newest.push_back(Recorded {
            path: path.to_owned(),
            headers,
            body: body.clone(),
        });
    }
}

/// A running fake upstream on 127.0.0.1.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts a fake on a free port that accepts any API key.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with_key(None).await
    }

    /// Starts a fake that answers 401 (in each provider's format) unless this key is sent.
    pub async fn start_with_key(api_key: Option<&str>) -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?, api_key).await
    }

    /// Starts a fake on a given address (the `fake_upstream` example uses a fixed port).
    pub async fn bind(addr: SocketAddr, api_key: Option<&str>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            api_key: api_key.map(str::to_owned),
            ..Shared::default()
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = Router::new()
            .route("/v1/chat/completions", post(openai::chat))
            .route("/v1/messages", post(anthropic::messages))
            .route("/v1/embeddings", post(embeddings::embeddings))
            // Uploads go past axum's 2 MB default so the fake can answer OpenAI's own 413.
            .route(
                "/v1/audio/transcriptions",
                post(audio::transcriptions).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
            )
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let counted = shared.clone();
        // HTTP/1.1 and h2c (prior knowledge) alike: axum's server tells them apart by the preface.
        let listener = listener.tap_io(move |tcp| {
            counted.connections.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
        #[allow(clippy::disallowed_methods, reason = "the handle is kept and aborted on drop")]
        let task = tokio::spawn(async move {
            let _ = serve.await;
        });
        Ok(FakeUpstream {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// TCP connections accepted so far: with HTTP/2, many streams share one.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Base URL to configure as a provider's base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The script for every model without one of its own.
    pub fn set_default(&self, script: Script) {
        *lock(&self.shared.default) = Some(script);
    }

    /// The script for one model, for every request until changed.
    pub fn set_model(&self, model: &str, script: Script) {
        lock(&self.shared.per_model).insert(model.to_owned(), script);
    }

    /// A one-shot script for the next request of `model` (`*` for any model), used before the
    /// persistent ones; several queue in order.
    pub fn enqueue(&self, model: &str, script: Script) {
        lock(&self.shared.queued)
            .entry(model.to_owned())
            .or_default()
            .push_back(script);
    }

    /// The requests received so far, oldest first: all of them, or the newest
    /// [`RECORD_LIMIT`] past that many.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).newest.iter().cloned().collect()
    }

    /// How many requests reached a path ending with `suffix` (every one, however many).
    pub fn request_count(&self, suffix: &str) -> usize {
        lock(&self.shared.requests)
            .per_path
            .iter()
            .filter(|(path, _)| path.ends_with(suffix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Streams whose client went away before the stream ended.
    pub fn disconnects(&self) -> usize {
        self.shared.disconnects.load(Ordering::SeqCst)
    }

    /// Streams begun and streams that ran to their end.
    pub fn streams(&self) -> (usize, usize) {
        (
            self.shared.streams_started.load(Ordering::SeqCst),
            self.shared.streams_finished.load(Ordering::SeqCst),
        )
    }

    /// Waits until at least `n` disconnects were seen, or the timeout passes; returns the count.
    pub async fn wait_disconnects(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.disconnected.notified();
            let seen = self.disconnects();
            if seen >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.disconnects();
            }
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn models(axum::extract::State(shared): axum::extract::State<Arc<Shared>>, req: Request) -> Response {
    shared.record("/v1/models", req.headers(), &Value::Null);
    if let Some(denied) = check_key(&shared, req.headers(), Dialect::OpenAi) {
        return denied;
    }
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": "fake-model", "object": "model", "created": 1_700_000_000, "owned_by": "fake"}]
    }))
    .into_response()
}

/// Which error-body format to answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    OpenRouter,
    Anthropic,
}

/// 401 in the provider's format unless the configured key was sent.
fn check_key(shared: &Shared, headers: &HeaderMap, dialect: Dialect) -> Option<Response> {
    let expected = shared.api_key.as_deref()?;
    let sent = match dialect {
        Dialect::Anthropic => headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        _ => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned),
    };
    if sent.as_deref() == Some(expected) {
        return None;
    }
    Some(error_response(dialect, 401, None))
}

/// The provider's real error body and headers for a status (bodies from `shared/wire/`).
fn error_response(dialect: Dialect, status: u16, retry_after: Option<u64>) -> Response {
    let body = match (dialect, status) {
        (Dialect::Anthropic, 400) => {
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 205429 tokens > 200000 maximum"},"request_id":"req_011CV5Jab6gR3ZNs9Sj6apiD"}"#
        }
        (Dialect::Anthropic, 401) => {
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#
        }
        (Dialect::Anthropic, 429) => {
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization of 30,000 input tokens per minute."},"request_id":"req_011CZMvKbSEwA55a4LmhFXou"}"#
        }
        (Dialect::Anthropic, 529) => {
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
        }
        (Dialect::Anthropic, _) => {
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#
        }
        (Dialect::OpenRouter, 400) => r#"{"error":{"code":400,"message":"Invalid model specified"}}"#,
        (_, 400) => {
            r#"{"error":{"message":"Input tokens exceed the configured limit of 272000 tokens. Your messages resulted in 3148588 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
        }
        (_, 401) => {
            r#"{"error":{"message":"Incorrect API key provided: sk-****. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#
        }
        (_, 413) => {
            r#"{"error":{"message":"Maximum content size limit (26214400) exceeded (26228340 bytes read)","type":"server_error","param":null,"code":null}}"#
        }
        (_, 429) => {
            r#"{"error":{"message":"Rate limit reached for gpt-4 in organization org-********** on tokens per min (TPM): Limit 10000, Used 9348, Requested 5086. Please try again in 26.604s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#
        }
        (_, 503) => {
            r#"{"error":{"message":"That model is currently overloaded with other requests. You can retry your request.","type":"server_error","param":null,"code":null}}"#
        }
        (_, _) => {
            r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#
        }
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(secs) = retry_after {
        let h = resp.headers_mut();
        if let Ok(v) = secs.to_string().parse() {
            h.insert(header::RETRY_AFTER, v);
        }
        if dialect == Dialect::OpenAi
            && let Ok(v) = (secs * 1000).to_string().parse()
        {
            h.insert("retry-after-ms", v);
        }
    }
    if dialect == Dialect::Anthropic {
        let retry = if matches!(status.as_u16(), 429 | 500 | 529) {
            "true"
        } else {
            "false"
        };
        if let Ok(v) = retry.parse() {
            resp.headers_mut().insert("x-should-retry", v);
        }
    }
    resp
}

fn quota_response() -> Response {
    let body = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The last user message of an OpenAI- or Anthropic-shaped request (string or text blocks).
fn last_user_text(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// A rough prompt-token count: words across system and messages.
fn prompt_tokens(body: &Value) -> u64 {
    let mut words = 0;
    let mut count = |v: &Value| {
        if let Some(s) = v.as_str() {
            words += s.split_whitespace().count();
        } else if let Some(blocks) = v.as_array() {
            for b in blocks {
                words += b["text"].as_str().map_or(0, |s| s.split_whitespace().count());
            }
        }
    };
    count(&body["system"]);
    for m in body["messages"].as_array().into_iter().flatten() {
        count(&m["content"]);
    }
    words as u64
}

/// The reply tokens a script produces for a request.
fn reply_tokens(script: &Script, body: &Value) -> Vec<String> {
    let schema = &body["response_format"]["json_schema"]["schema"];
    if script.structured && schema.is_object() {
        vec![smallest_instance(schema).to_string()]
    } else if script.echo {
        split_tokens(&format!("echo: {}", last_user_text(body)))
    } else {
        script.tokens.clone()
    }
}

/// The smallest value `schema` accepts, for the schemas coachd sends: `const`, `enum` (its first
/// value), the first of `oneOf`/`anyOf`, objects with their required properties, arrays of
/// `minItems`, strings of `minLength`, numbers at their `minimum`.
fn smallest_instance(schema: &Value) -> Value {
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(first) = schema[key].as_array().and_then(|e| e.first()) {
            return smallest_instance(first);
        }
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema["properties"].is_object() => "object",
        _ => "null",
    };
    let count = |key: &str| schema[key].as_u64().unwrap_or(0) as usize;
    match kind {
        "object" => {
            let mut out = serde_json::Map::new();
            for name in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                out.insert(name.to_owned(), smallest_instance(&schema["properties"][name]));
            }
            Value::Object(out)
        }
        "array" => Value::Array(vec![smallest_instance(&schema["items"]); count("minItems")]),
        "string" => Value::String("x".repeat(count("minLength").max(1))),
        "integer" => serde_json::json!(schema["minimum"].as_i64().unwrap_or(0)),
        "number" => serde_json::json!(schema["minimum"].as_f64().unwrap_or(0.0)),
        "boolean" => Value::Bool(false),
        _ => Value::Null,
    }
}

/// Counts a stream as disconnected when its body is dropped before it finished.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl StreamGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.streams_started.fetch_add(1, Ordering::SeqCst);
        StreamGuard {
            shared,
            finished: false,
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.shared.streams_finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.disconnects.fetch_add(1, Ordering::SeqCst);
            self.shared.disconnected.notify_waiters();
        }
    }
}

/// One piece of a scripted SSE body.
enum Piece {
    /// Bytes to write now.
    Bytes(String),
    /// Wait this long.
    Sleep(Duration),
    /// Never send anything again (a stall).
    Stall,
}

/// Turns scripted pieces into an SSE response body: line endings, byte-order mark, re-cutting
/// into small writes, pacing, stalls, and disconnect detection.
fn sse_body(shared: Arc<Shared>, script: &Script, pieces: Vec<Piece>) -> Body {
    let crlf = script.crlf;
    let split = script.split_bytes;
    let bom = script.leading_bom;
    let raw = script.raw_chunks.clone();
    let stall_after_raw = matches!(script.fault, Some(Fault::Stall { .. }));
    let stream = async_stream::stream! {
        let mut guard = StreamGuard::new(shared);
        if let Some(chunks) = raw {
            for c in chunks {
                yield Ok::<Bytes, std::io::Error>(c);
                tokio::task::yield_now().await;
            }
            if stall_after_raw {
                std::future::pending::<()>().await;
            }
            guard.finish();
            return;
        }
        if bom {
            yield Ok(Bytes::from_static(b"\xEF\xBB\xBF"));
        }
        for piece in pieces {
            match piece {
                Piece::Sleep(d) => {
                    if !d.is_zero() {
                        tokio::time::sleep(d).await;
                    }
                }
                Piece::Stall => {
                    std::future::pending::<()>().await;
                }
                Piece::Bytes(text) => {
                    let text = if crlf { text.replace('\n', "\r\n") } else { text };
                    let bytes = Bytes::from(text);
                    match split {
                        Some(n) if n > 0 => {
                            for part in bytes.chunks(n) {
                                yield Ok(Bytes::copy_from_slice(part));
                                // A real network delivers these as separate reads.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                        _ => yield Ok(bytes),
                    }
                }
            }
        }
        guard.finish();
    };
    Body::from_stream(stream)
}

fn sse_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{FakeUpstream, RECORD_LIMIT, smallest_instance};

    #[tokio::test]
    async fn past_the_record_limit_the_newest_requests_are_kept_and_every_one_is_counted() {
        let fake = FakeUpstream::start().await.expect("fake");
        let headers = axum::http::HeaderMap::new();
        for i in 0..RECORD_LIMIT + 5 {
            fake.shared
                .record("/v1/chat/completions", &headers, &json!({"n": i}));
        }
        fake.shared
            .record("/v1/embeddings", &headers, &json!({"n": "last"}));
        let kept = fake.requests();
        assert_eq!(kept.len(), RECORD_LIMIT);
        assert_eq!(kept[0].body, json!({"n": 6}), "the oldest six went");
        assert_eq!(kept[RECORD_LIMIT - 1].body, json!({"n": "last"}));
        assert_eq!(fake.request_count("/chat/completions"), RECORD_LIMIT + 5);
        assert_eq!(fake.request_count("/embeddings"), 1);
    }

    #[test]
    fn the_smallest_instance_meets_required_enum_and_length_rules() {
        let schema = json!({
            "type": "object",
            "required": ["intent", "confidence", "items", "note"],
            "properties": {
                "intent": {"type": "string", "enum": ["goal_setting", "other"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "items": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["task"], "properties": {"task": {"type": "string", "minLength": 2}}}},
                "note": {"type": ["string", "null"]},
                "optional": {"type": "string"},
            },
        });
        assert_eq!(
            smallest_instance(&schema),
            json!({"intent": "goal_setting", "confidence": 0.0, "items": [{"task": "xx"}], "note": "x"})
        );
    }
}
