//! Clients for the realtime tests: session creation, an SSE reader, a WebSocket client, and a
//! validator that checks every server event against `proto/server.schema.json`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::TestApp;

static SERVER_SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
static CLIENT_SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();

fn load(name: &str) -> jsonschema::Validator {
    let path = format!("{}/proto/{name}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

/// Panics unless `event` is a valid server event of `proto/`.
pub fn assert_valid_event(event: &Value) {
    let v = SERVER_SCHEMA.get_or_init(|| load("server.schema.json"));
    let errors: Vec<String> = v
        .iter_errors(event)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match proto/server.schema.json: {event}\n{}",
        errors.join("\n")
    );
}

/// Panics unless `frame` is a valid client frame of `proto/`.
pub fn assert_valid_frame(frame: &Value) {
    let v = CLIENT_SCHEMA.get_or_init(|| load("client.schema.json"));
    assert!(
        v.is_valid(frame),
        "frame does not match proto/client.schema.json: {frame}"
    );
}

/// A created session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub token: String,
    pub body: Value,
}

impl TestApp {
    pub async fn create_session(&self, user_id: &str, coach_id: &str, transport: &str) -> Session {
        let resp = self
            .client
            .post(self.url("/realtime/sessions"))
            .json(&json!({"user_id": user_id, "coach_id": coach_id, "transport": transport}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "create session");
        let body: Value = resp.json().await.unwrap();
        Session {
            id: body["session_id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
            body,
        }
    }

    /// An HTTP turn; returns status and body.
    pub async fn turn(&self, session: &Session, text: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(&format!("/realtime/sessions/{}/turn", session.id)))
            .json(&json!({ "text": text }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Polls /realtime/stats until the write-behind has written `n` turns (or 10 s pass).
    pub async fn wait_written(&self, n: u64) {
        self.wait_written_for(n, Duration::from_secs(10)).await;
    }

    pub async fn wait_written_for(&self, n: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let written = self
                .state
                .write_behind
                .stats()
                .written
                .load(std::sync::atomic::Ordering::Relaxed);
            if written >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("write-behind did not write {n} turns in {limit:?}");
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }
}

/// An SSE event as received.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// Reads SSE events from a response, validating each against the schema.
pub struct SseReader {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = Result<eventsource_stream::Event, String>> + Send>>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache, no-transform");
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        let stream = resp
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        SseReader {
            stream: Box::pin(stream),
        }
    }

    /// The next event, or `None` at the end of the stream (10 s timeout).
    pub async fn next(&mut self) -> Option<SseEvent> {
        let ev = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
            .await
            .expect("SSE event within 10 s")?
            .ok()?;
        let data: Value =
            serde_json::from_str(&ev.data).unwrap_or_else(|_| panic!("SSE data is JSON: {}", ev.data));
        assert_valid_event(&data);
        assert_eq!(
            ev.event,
            data["type"].as_str().unwrap_or_default(),
            "SSE event name is the type"
        );
        Some(SseEvent {
            id: ev.id,
            event: ev.event,
            data,
        })
    }

    /// Events until (and including) the first of `kind`.
    pub async fn until(&mut self, kind: &str) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            let done = ev.event == kind;
            out.push(ev);
            if done {
                return out;
            }
        }
        panic!("stream ended before a {kind} event: {out:?}");
    }
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(app: &TestApp, session: &Session, query: &str) -> Ws {
    let url = app.ws_url(&format!(
        "/realtime/sessions/{}/ws?token={}{}",
        session.id, session.token, query
    ));
    let (ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

pub async fn ws_send(ws: &mut Ws, frame: Value) {
    assert_valid_frame(&frame);
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// What a WebSocket read gave.
#[derive(Debug)]
pub enum WsRead {
    Event(Value),
    Close(Option<u16>),
}

/// The next event (validated) or close, skipping pings (10 s timeout).
pub async fn ws_next(ws: &mut Ws) -> WsRead {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a WebSocket message within 10 s");
        match msg {
            None => return WsRead::Close(None),
            Some(Err(_)) => return WsRead::Close(None),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_valid_event(&v);
                return WsRead::Event(v);
            }
            Some(Ok(Message::Close(frame))) => return WsRead::Close(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
        }
    }
}

/// Events until (and including) the first of `kind`.
pub async fn ws_until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        match ws_next(ws).await {
            WsRead::Event(v) => {
                let done = v["type"] == kind;
                out.push(v);
                if done {
                    return out;
                }
            }
            WsRead::Close(code) => panic!("closed ({code:?}) before a {kind} event: {out:?}"),
        }
    }
}

/// Concatenated token texts of a list of events.
pub fn tokens_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}
