//! The WebSocket adapter: events as text frames, client frames from text frames, protocol pings
//! with a pong deadline, a send timeout, and close codes for every way a connection can end.
//! Generic over the socket's `Sink` + `Stream`, so tests can drive it with channels.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;

use super::{Detach, Inbound, Transport, TransportKind};
use crate::session::ClientFrame;
use crate::session::event::Published;

/// Close codes: the one table, kept in step with `proto/README.md`.
pub mod close {
    /// The session ended.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame (only JSON text frames are spoken).
    pub const UNSUPPORTED: u16 = 1003;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Too many malformed frames.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The client did not keep up with its event queue.
    pub const SLOW_CLIENT: u16 = 4001;
    /// No pong within the deadline.
    pub const NO_PONG: u16 = 4002;
}

/// A WebSocket connection attached to a session.
#[derive(Debug)]
pub struct WsTransport<S> {
    socket: S,
    send_timeout: Duration,
    pong_timeout: Duration,
    awaiting_pong: Option<Instant>,
}

impl<S> WsTransport<S> {
    /// Wraps a socket.
    pub fn new(socket: S, send_timeout: Duration, pong_timeout: Duration) -> Self {
        WsTransport {
            socket,
            send_timeout,
            pong_timeout,
            awaiting_pong: None,
        }
    }
}

impl<S, E> WsTransport<S>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display + Send,
{
    async fn write(&mut self, message: Message) -> Result<(), Detach> {
        match tokio::time::timeout(self.send_timeout, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Detach::ClientGone),
            // The socket would not take a frame in time: the client is not reading.
            Err(_) => Err(Detach::SlowClient),
        }
    }
}

fn classify(error: &str) -> Inbound {
    let lower = error.to_ascii_lowercase();
    if lower.contains("utf-8") || lower.contains("utf8") {
        Inbound::Fatal(Detach::Protocol {
            code: close::INVALID_PAYLOAD,
            reason: "text frames must be UTF-8".into(),
        })
    } else if lower.contains("too long") || lower.contains("too big") || lower.contains("capacity") {
        Inbound::Fatal(Detach::Protocol {
            code: close::TOO_BIG,
            reason: "frame over the size limit".into(),
        })
    } else {
        Inbound::Closed
    }
}

impl<S, E> Transport for WsTransport<S>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display + Send,
{
    fn kind(&self) -> TransportKind {
        TransportKind::WebSocket
    }

    async fn send(&mut self, event: &Published) -> Result<(), Detach> {
        // A refcounted clone of the bytes made at publish.
        self.write(Message::Text(event.json.clone())).await
    }

    async fn recv(&mut self) -> Inbound {
        loop {
            let Some(message) = self.socket.next().await else {
                return Inbound::Closed;
            };
            match message {
                Ok(Message::Text(text)) => {
                    return match serde_json::from_str::<ClientFrame>(text.as_str()) {
                        Ok(frame) => Inbound::Frame(frame),
                        Err(e) => Inbound::Invalid(format!("malformed frame: {e}")),
                    };
                }
                Ok(Message::Binary(_)) => {
                    return Inbound::Fatal(Detach::Protocol {
                        code: close::UNSUPPORTED,
                        reason: "only JSON text frames are accepted".into(),
                    });
                }
                Ok(Message::Pong(_)) => self.awaiting_pong = None,
                // Pings are answered by the WebSocket layer itself.
                Ok(Message::Ping(_)) => {}
                Ok(Message::Close(_)) => return Inbound::Closed,
                Err(e) => return classify(&e.to_string()),
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<(), Detach> {
        if self.awaiting_pong.is_none() {
            self.awaiting_pong = Some(Instant::now() + self.pong_timeout);
        }
        self.write(Message::Ping(Default::default())).await
    }

    fn liveness_deadline(&self) -> Option<Instant> {
        self.awaiting_pong
    }

    async fn close(&mut self, why: &Detach) {
        let (code, reason) = match why {
            Detach::Done | Detach::SessionEnded => (close::NORMAL, "session ended".to_owned()),
            Detach::Shutdown => (close::GOING_AWAY, "server shutting down".to_owned()),
            Detach::SlowClient => (
                close::SLOW_CLIENT,
                "client too slow for its event queue".to_owned(),
            ),
            Detach::NoPong => (close::NO_PONG, "no pong".to_owned()),
            Detach::Protocol { code, reason } => (*code, reason.clone()),
            Detach::ClientGone => return,
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        // Best effort: a client that is gone or stuck cannot be told.
        let _ = tokio::time::timeout(self.send_timeout, self.socket.send(Message::Close(Some(frame)))).await;
    }
}
