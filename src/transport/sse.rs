//! The SSE adapter: each event as `id: {seq}` / `event: {type}` / `data: {json}`, written and
//! flushed as produced, heartbeat comments, and a bounded queue between the session and the
//! response body: a client that does not drain it in time is detached (it can reconnect with
//! `Last-Event-ID` and replay what it missed).

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Detach, Inbound, Transport, TransportKind};
use crate::session::event::Published;

/// Tells proxies and CDNs neither to buffer nor to transform (compress) an event stream; every SSE
/// response of coachd carries these headers.
pub fn no_buffering(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// The sending side of an SSE response.
#[derive(Debug)]
pub struct SseTransport {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    send_timeout: Duration,
    until_turn_end: Option<u32>,
}

impl SseTransport {
    /// A transport and the response that streams what it sends. With `until_turn_end`, the stream
    /// ends after that turn's `turn_end` (the streaming form of a turn request).
    pub fn new(queue: usize, send_timeout: Duration, until_turn_end: Option<u32>) -> (Self, Response) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let mut response = Sse::new(ReceiverStream::new(rx)).into_response();
        no_buffering(response.headers_mut());
        (
            SseTransport {
                tx,
                send_timeout,
                until_turn_end,
            },
            response,
        )
    }

    /// Sets the turn after whose `turn_end` the stream ends.
    pub fn set_until_turn_end(&mut self, turn: u32) {
        self.until_turn_end = Some(turn);
    }

    async fn push(&mut self, event: Event) -> Result<(), Detach> {
        match self.tx.send_timeout(Ok(event), self.send_timeout).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Detach::SlowClient),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Detach::ClientGone),
        }
    }
}

#[async_trait::async_trait]
impl Transport for SseTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Sse
    }

    async fn send(&mut self, event: &Published) -> Result<(), Detach> {
        let sse = Event::default()
            .id(event.seq.to_string())
            .event(event.kind)
            .data(event.json.as_str());
        self.push(sse).await
    }

    async fn recv(&mut self) -> Inbound {
        // SSE has no client-to-server direction; a closed response shows up as a failed send.
        // Wake when the body is dropped, so an idle stream notices the client leaving too.
        self.tx.closed().await;
        Inbound::Closed
    }

    async fn heartbeat(&mut self) -> Result<(), Detach> {
        self.push(Event::default().comment("keepalive")).await
    }

    fn done_after(&self, event: &Published) -> bool {
        matches!(self.until_turn_end, Some(n) if event.kind == "turn_end" && event.turn_number == Some(n))
    }

    async fn close(&mut self, why: &Detach) {
        let reason = match why {
            Detach::SlowClient => "slow_client",
            Detach::Shutdown => "server_shutdown",
            _ => return,
        };
        // Tell a client that can still read why the stream ends; it may reconnect and resume.
        let data = format!(
            r#"{{"type":"error","code":"{reason}","message":"stream closed: {reason}","retryable":true}}"#
        );
        let _ = self.tx.try_send(Ok(Event::default().event("error").data(data)));
    }
}
