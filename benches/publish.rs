//! Micro-benchmark of the session side of the token path: token events published into an
//! `EventLog` with K subscribers, one of them relayed by the drive loop's delivery step through the
//! WebSocket transport and tungstenite onto an in-memory socket that counts its writes.
//!
//! Deterministic on a shared machine: run it under valgrind and difference two token counts.
//! `cargo bench --bench publish --no-run`, then `PUBLISH_TOKENS=N valgrind --tool=callgrind` (or
//! `--tool=dhat` for allocations) on the built binary, for two N; it prints socket writes itself.
//! `PUBLISH_SUBSCRIBERS` (default 2) and `PUBLISH_BURST` (tokens queued per wakeup, default 1).

// A benchmark, not a server path: it stops at the first surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use coachd::session::EventBody;
use coachd::session::log::EventLog;
use coachd::transport::deliver;
use coachd::transport::ws::WsTransport;
use futures::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self as ts, Utf8Bytes};

/// A socket that takes every write at once and counts them (each stands for one `sendto`);
/// nothing is ever read from it.
#[derive(Debug, Default)]
struct MemSocket {
    writes: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl AsyncRead for MemSocket {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for MemSocket {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// axum's `WebSocket` in miniature: axum messages over a tungstenite stream.
struct Ws(WebSocketStream<MemSocket>);

fn to_tungstenite(message: Message) -> ts::Message {
    match message {
        // axum converts without a check; this one re-validates the UTF-8 (a few instructions a byte).
        Message::Text(text) => ts::Message::Text(Utf8Bytes::try_from(Bytes::from(text)).unwrap_or_default()),
        Message::Binary(b) => ts::Message::Binary(b),
        Message::Ping(b) => ts::Message::Ping(b),
        Message::Pong(b) => ts::Message::Pong(b),
        Message::Close(_) => ts::Message::Close(None),
    }
}

impl Sink<Message> for Ws {
    type Error = ts::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.0.start_send_unpin(to_tungstenite(item))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_close_unpin(cx)
    }
}

impl Stream for Ws {
    type Item = Result<Message, ts::Error>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Pending
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let tokens = env("PUBLISH_TOKENS", 20_000) as u32;
    let subscribers = env("PUBLISH_SUBSCRIBERS", 2).max(1) as usize;
    // Tokens published before the connection task runs (several are queued at 1 000 streams).
    let burst = env("PUBLISH_BURST", 1).max(1) as u32;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = MemSocket::default();
        let (writes, bytes) = (socket.writes.clone(), socket.bytes.clone());
        let ws = WebSocketStream::from_raw_socket(socket, Role::Server, None).await;
        let mut transport = WsTransport::new(Ws(ws), Duration::from_secs(5), Duration::from_secs(8));
        let log = EventLog::new("0193d0a4-6c1e-7b3a-9f52-2d7e8c1a4b60", 1024);
        let mut others: Vec<_> = (1..subscribers).map(|_| log.subscribe(None, 256)).collect();
        let mut sub = log.subscribe(None, 256);
        let mut index = 0;
        while index < tokens {
            for _ in 0..burst {
                log.publish(EventBody::Token {
                    turn_number: 1,
                    text: " word".to_owned(),
                    index,
                });
                index += 1;
            }
            for other in &mut others {
                while other.live.try_recv().is_ok() {}
            }
            // As the drive loop: one event wakes it, the delivery step takes it from there.
            let first = sub.live.recv().await.expect("a live event");
            deliver(&mut transport, &mut sub, &first).await.expect("delivered");
            while let Ok(event) = sub.live.try_recv() {
                deliver(&mut transport, &mut sub, &event).await.expect("delivered");
            }
        }
        let writes = writes.load(Ordering::Relaxed);
        println!(
            "tokens {tokens} subscribers {subscribers} burst {burst}: socket writes {writes} ({:.3}/token), {} bytes",
            writes as f64 / f64::from(tokens),
            bytes.load(Ordering::Relaxed)
        );
    });
}
