//! One client per path: each runs one stream and returns its [`Trace`]. OpenAI chunks (direct to
//! the fake, coachd's `/v1/chat/completions`, LiteLLM's), coachd's `/api/v1/llm/stream` events,
//! a turn over the session SSE route, and a turn over a session's WebSocket. Decoding borrows
//! from the frame, so the load generator's cost per token stays small.

use std::time::Instant;

use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::BoxError;
use crate::coachd::API_KEY;
use crate::measure::Trace;

/// Just enough of an OpenAI chunk to tell a text delta.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// Just the `type` of a coachd frame.
#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// Where an OpenAI-compatible stream is asked for.
#[derive(Debug, Clone)]
pub struct OpenAiTarget {
    /// The full `.../chat/completions` URL.
    pub url: String,
    /// Sent as `Authorization: Bearer`.
    pub key: String,
    /// The request's `model`.
    pub model: String,
}

/// The response when its status is a success; otherwise an error with the status and body.
async fn success(resp: reqwest::Response) -> Result<reqwest::Response, BoxError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(format!("{status}: {}", body.chars().take(300).collect::<String>()).into())
}

/// One `stream: true` chat completion, as an OpenAI SDK asks for it; a token is a chunk with
/// non-empty `delta.content`, the end is `data: [DONE]`.
pub async fn openai_chat(client: &reqwest::Client, target: &OpenAiTarget) -> Result<Trace, BoxError> {
    let body = json!({"model": target.model, "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]});
    let start = Instant::now();
    let resp = client
        .post(&target.url)
        .bearer_auth(&target.key)
        .json(&body)
        .send()
        .await?;
    let resp = success(resp).await?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        if ev.data == "[DONE]" {
            return Ok(trace);
        }
        let chunk: Chunk = serde_json::from_str(&ev.data)?;
        if chunk
            .choices
            .first()
            .and_then(|c| c.delta.as_ref())
            .and_then(|d| d.content.as_deref())
            .is_some_and(|t| !t.is_empty())
        {
            trace.token(start);
        }
    }
    Err("the stream ended without [DONE]".into())
}

/// One completion over coachd's `POST /api/v1/llm/stream`: `start`, `token` events, `done`.
pub async fn llm_stream(client: &reqwest::Client, base: &str) -> Result<Trace, BoxError> {
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/api/v1/llm/stream"))
        .header("x-api-key", API_KEY)
        .json(&json!({"task": "chat", "prompt": "hello"}))
        .send()
        .await?;
    let resp = success(resp).await?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.event.as_str() {
            "token" => trace.token(start),
            "done" => return Ok(trace),
            "error" => return Err(format!("stream error: {}", ev.data).into()),
            _ => {}
        }
    }
    Err("the stream ended without done".into())
}

/// Creates a coachd session (not timed); returns its id and WebSocket token.
pub async fn create_session(
    client: &reqwest::Client,
    base: &str,
    user: usize,
) -> Result<(String, String), BoxError> {
    let v = client
        .post(format!("{base}/realtime/sessions"))
        .header("x-api-key", API_KEY)
        .json(&json!({"user_id": format!("bench-{user}"), "coach_id": "sales", "transport": "websocket"}))
        .send()
        .await?;
    let v: Value = success(v).await?.json().await?;
    let id = v["session_id"].as_str().ok_or("no session_id")?.to_owned();
    let token = v["token"].as_str().ok_or("no token")?.to_owned();
    Ok((id, token))
}

/// Ends a session (not timed); failures are ignored, the process ends soon anyway.
pub async fn end_session(client: &reqwest::Client, base: &str, session: &str) {
    let _ = client
        .post(format!("{base}/realtime/sessions/{session}/end"))
        .header("x-api-key", API_KEY)
        .json(&json!({}))
        .send()
        .await;
}

/// One turn through coachd's session SSE turn route.
pub async fn session_sse(client: &reqwest::Client, base: &str, session: &str) -> Result<Trace, BoxError> {
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/realtime/sessions/{session}/turn"))
        .header("accept", "text/event-stream")
        .header("x-api-key", API_KEY)
        .json(&json!({"text": "hello"}))
        .send()
        .await?;
    let resp = success(resp).await?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.event.as_str() {
            "token" => trace.token(start),
            "turn_end" => return Ok(trace),
            "error" => return Err(format!("turn error: {}", ev.data).into()),
            _ => {}
        }
    }
    Err("the stream ended without turn_end".into())
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a session's WebSocket (not timed) and reads its first event, the session state.
pub async fn ws_open(port: u16, session: &str, token: &str) -> Result<Ws, BoxError> {
    // tungstenite's default 128 KiB read buffer is zeroed on every read: a load generator's
    // cost per frame that would crowd coachd off the CPU.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://127.0.0.1:{port}/realtime/sessions/{session}/ws?token={token}"),
        Some(config),
        true,
    )
    .await?;
    ws.next().await.ok_or("closed")??;
    Ok(ws)
}

/// One turn over an open WebSocket.
pub async fn ws_turn(ws: &mut Ws) -> Result<Trace, BoxError> {
    let start = Instant::now();
    ws.send(Message::text(
        json!({"type": "user_message", "text": "hello"}).to_string(),
    ))
    .await?;
    let mut trace = Trace::default();
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        let frame: Frame = serde_json::from_str(text.as_str())?;
        match frame.kind.as_ref() {
            "token" => trace.token(start),
            "turn_end" => return Ok(trace),
            "error" => return Err(format!("turn error: {text}").into()),
            _ => {}
        }
    }
    Err("the WebSocket closed before turn_end".into())
}
