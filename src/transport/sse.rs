//! The SSE adapter: a response body pulled straight from the session subscription, so the
//! subscription's bounded queue is the client's only queue, and overflowing it detaches the client
//! as slow, as for a WebSocket (it can reconnect with `Last-Event-ID` and replay what it missed).
//! Each event goes out as the `id:`/`event:`/`data:` frame made once at publish, a refcounted
//! clone; a `: keepalive` comment beats the heart while the session is quiet.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{SHUTDOWN_DRAIN, per_connection, resync_event};
use crate::session::event::{ErrorCause, EventBody, TransportKind};
use crate::session::log::Subscription;
use crate::session::manager::GaugeGuard;
use crate::session::{SessionHandle, Stats};

/// The heartbeat comment.
const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Tells proxies and CDNs neither to buffer nor to transform (compress) an event stream; every SSE
/// response of coachd carries these headers.
pub fn no_buffering(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// Timing and bounds of a session event stream.
#[derive(Debug, Clone)]
pub struct SseOptions {
    /// Heartbeat comment interval.
    pub heartbeat: Duration,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Counters.
    pub stats: Arc<Stats>,
    /// End the stream after this turn's `turn_end` (the streaming form of a turn request).
    pub until_turn_end: Option<u32>,
}

/// The SSE response of a subscription; `gauge` (the `sse_connections` count) is held until the
/// body is dropped.
pub fn response(session: SessionHandle, sub: Subscription, opts: SseOptions, gauge: GaugeGuard) -> Response {
    let body = events(session, sub, opts, gauge);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    no_buffering(headers);
    response
}

/// What the stream does next.
enum Step {
    Event(Arc<crate::session::event::Published>),
    Keepalive,
    Lagged,
    Disconnected,
    LogClosed,
    ShutdownStarted,
    DrainOver,
}

/// The frames of a session event stream: the resync or replay, then live events and heartbeats,
/// until the session ends, the requested turn ended, the client falls too far behind (then a
/// `slow_client` error event closes it), or the server shuts down (the session's last events
/// first).
pub fn events(
    session: SessionHandle,
    mut sub: Subscription,
    opts: SseOptions,
    gauge: GaugeGuard,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        let _gauge = gauge;
        let done = |event: &crate::session::event::Published| {
            opts.until_turn_end.is_some_and(|n| event.ends_turn(n))
        };
        if sub.resync_needed {
            yield Ok(resync_event(&session).await.sse);
        }
        for event in std::mem::take(&mut sub.replay) {
            yield Ok(event.sse.clone());
            if done(&event) {
                return;
            }
        }
        let mut heartbeat = tokio::time::interval_at(Instant::now() + opts.heartbeat, opts.heartbeat);
        let shutdown = opts.shutdown.cancelled();
        tokio::pin!(shutdown);
        let mut drain_until: Option<Instant> = None;
        loop {
            let step = tokio::select! {
                event = sub.live.recv() => match event {
                    Some(event) => Step::Event(event),
                    None if sub.lagged.load(Ordering::SeqCst) => Step::Lagged,
                    None if sub.disconnected.load(Ordering::SeqCst) => Step::Disconnected,
                    None => Step::LogClosed,
                },
                _ = heartbeat.tick(), if drain_until.is_none() => Step::Keepalive,
                () = &mut shutdown, if drain_until.is_none() => Step::ShutdownStarted,
                () = super::sleep_until_opt(drain_until) => Step::DrainOver,
            };
            match step {
                Step::Event(event) => {
                    yield Ok(event.sse.clone());
                    if done(&event) {
                        return;
                    }
                }
                Step::Keepalive => yield Ok(Bytes::from_static(KEEPALIVE)),
                Step::Lagged => {
                    opts.stats.slow_clients.inc();
                    crate::metric::disconnect(TransportKind::Sse.as_str(), "slow_client");
                    tracing::info!(session_id = %session.id, "slow SSE client detached");
                    // The client reads again eventually (or never): this frame is the next thing
                    // it sees, with the seq to resume after.
                    yield Ok(close_frame(&session, ErrorCause::SlowClient));
                    return;
                }
                // Dropped by the server while the session goes on: say so, so the client
                // reconnects instead of taking the session as over.
                Step::Disconnected => {
                    yield Ok(close_frame(&session, ErrorCause::Disconnected));
                    return;
                }
                // The session ended; its last events are out.
                Step::LogClosed => return,
                // Keep delivering what the session still publishes (its `error` and final
                // `session` events) until it closes its log, for a bounded time.
                Step::ShutdownStarted => drain_until = Some(Instant::now() + SHUTDOWN_DRAIN),
                Step::DrainOver => {
                    yield Ok(close_frame(&session, ErrorCause::ServerShutdown));
                    return;
                }
            }
        }
    }
}

/// The `error` event that tells a client why its stream closes.
fn close_frame(session: &SessionHandle, cause: ErrorCause<'_>) -> Bytes {
    per_connection(session, EventBody::error(cause, None)).sse
}

#[cfg(test)]
mod tests {
    //! The session event stream with paused time: heartbeats, the slow-client close, shutdown.

    use futures::StreamExt;

    use super::*;
    use crate::session::manager::Gauge;
    use crate::transport::tests::test_session;

    const HEARTBEAT: Duration = Duration::from_secs(15);

    fn options(shutdown: &CancellationToken, stats: &Arc<Stats>) -> SseOptions {
        SseOptions {
            heartbeat: HEARTBEAT,
            shutdown: shutdown.clone(),
            stats: stats.clone(),
            until_turn_end: None,
        }
    }

    fn text(frame: Option<Result<Bytes, Infallible>>) -> String {
        let Some(Ok(bytes)) = frame else { panic!("a frame") };
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn data(frame: &str) -> serde_json::Value {
        let line = frame.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        serde_json::from_str(line).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn replay_first_then_a_keepalive_comment_each_quiet_interval() {
        let (_app, session) = test_session().await;
        let stats = Arc::new(Stats::default());
        let gauge = Gauge::enter(&stats, |s| &s.sse_connections);
        let sub = session.subscribe(Some(0));
        let mut events = Box::pin(events(
            session,
            sub,
            options(&CancellationToken::new(), &stats),
            gauge,
        ));
        assert!(text(events.next().await).starts_with("id: 1\nevent: session\ndata: "));
        let start = Instant::now();
        assert_eq!(text(events.next().await), ": keepalive\n\n");
        assert_eq!(start.elapsed(), HEARTBEAT);
        assert_eq!(stats.sse_connections.get(), 1);
        drop(events);
        assert_eq!(
            stats.sse_connections.get(),
            0,
            "the gauge lives as long as the body"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_behind_its_queue_gets_what_was_queued_then_a_slow_client_event() {
        let (_app, session) = test_session().await;
        let stats = Arc::new(Stats::default());
        let gauge = Gauge::enter(&stats, |s| &s.sse_connections);
        let sub = session.log.subscribe(None, 2);
        for i in 0..3 {
            session.log.publish(EventBody::Token {
                turn_number: 1,
                text: format!("t{i}"),
                index: i,
            });
        }
        let id = session.id.to_string();
        let events = events(session, sub, options(&CancellationToken::new(), &stats), gauge);
        tokio::pin!(events);
        assert_eq!(data(&text(events.next().await))["text"], "t0");
        assert_eq!(data(&text(events.next().await))["text"], "t1");
        let close = data(&text(events.next().await));
        assert_eq!(
            (
                close["type"].as_str(),
                close["code"].as_str(),
                close["session_id"].as_str()
            ),
            (Some("error"), Some("slow_client"), Some(id.as_str()))
        );
        assert_eq!(close["seq"], 4, "the latest seq, to resume after");
        assert!(events.next().await.is_none());
        assert_eq!(stats.slow_clients.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_the_sessions_last_events_go_out_before_the_stream_ends() {
        let (app, session) = test_session().await;
        let stats = Arc::new(Stats::default());
        let gauge = Gauge::enter(&stats, |s| &s.sse_connections);
        let sub = session.subscribe(None);
        // The app's own token: the session task sees it too.
        let shutdown = app.shutdown.clone();
        let events = events(session, sub, options(&shutdown, &stats), gauge);
        tokio::pin!(events);
        shutdown.cancel();
        let error = data(&text(events.next().await));
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("server_shutdown"))
        );
        let end = data(&text(events.next().await));
        assert_eq!(
            (end["type"].as_str(), end["status"].as_str()),
            (Some("session"), Some("ended"))
        );
        assert!(events.next().await.is_none(), "then the stream ends");
    }
}
