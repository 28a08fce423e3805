//! The Transport trait and the one loop that drives a pushed-to transport over a session: replay
//! (or a resync), live events, client frames, heartbeats, slow-client and shutdown handling. The
//! WebSocket ([`ws`]) and HTTP-turn ([`http`]) adapters only say how to deliver an event, read a
//! frame, beat the heart and close; SSE ([`sse`]) is a response body pulled from the subscription.

pub mod http;
pub mod sse;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
pub use crate::session::event::TransportKind;
use crate::session::event::{ErrorCause, EventBody, Published, SessionState, SessionStatus};
use crate::session::log::Subscription;
use crate::session::{ClientFrame, SessionHandle, Stats};

/// Why a connection ends (WebSocket close codes are documented in `proto/README.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detach {
    /// The transport's job is done (an HTTP turn got its `turn_end`).
    Done,
    /// The client went away.
    ClientGone,
    /// The client did not keep up with its queue (close 4001).
    SlowClient,
    /// No pong in time (close 4002).
    NoPong,
    /// The session ended (close 1000).
    SessionEnded,
    /// The server is shutting down (close 1001).
    Shutdown,
    /// Another node runs the session now (close 4003): reconnect and resume.
    Moved,
    /// The server dropped the session's connections (close 4004): reconnect and resume.
    Disconnected,
    /// The client broke the protocol (close 1003, 1007, 1008 or 1009).
    Protocol {
        /// WebSocket close code.
        code: u16,
        /// Reason sent with it.
        reason: String,
    },
}

/// What a transport read from its client.
#[derive(Debug)]
pub enum Inbound {
    /// A well-formed frame.
    Frame(ClientFrame),
    /// A frame that could not be understood; answered with an `error` event.
    Invalid(String),
    /// The client answered a heartbeat; nothing to deliver.
    Alive,
    /// A violation that ends the connection.
    Fatal(Detach),
    /// The client closed.
    Closed,
}

/// One client connection attached to a session. Only used generically (by [`drive`]), so its
/// methods are plain `async` functions whose futures are `Send`, with no boxing.
pub trait Transport: Send {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;

    /// Delivers one event. `Err` detaches the connection.
    fn send(&mut self, event: &Published) -> impl Future<Output = Result<(), Detach>> + Send;

    /// The next frame from the client. Transports without a client-to-server direction never
    /// resolve. Must be cancel-safe: the drive loop drops it whenever an event goes out first.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;

    /// Queues one event to go out with the next [`Transport::flush`], so events that are already
    /// waiting leave in one write. Transports that cannot batch deliver it at once.
    fn feed(&mut self, event: &Published) -> impl Future<Output = Result<(), Detach>> + Send {
        self.send(event)
    }

    /// Pushes out what [`Transport::feed`] queued. `Err` detaches the connection.
    fn flush(&mut self) -> impl Future<Output = Result<(), Detach>> + Send {
        std::future::ready(Ok(()))
    }

    /// A keepalive (a WebSocket ping).
    fn heartbeat(&mut self) -> impl Future<Output = Result<(), Detach>> + Send;

    /// When the connection counts as dead unless the client answers a heartbeat first.
    fn liveness_deadline(&self) -> Option<Instant> {
        None
    }

    /// Whether this connection is finished after delivering `event`.
    fn done_after(&self, _event: &Published) -> bool {
        false
    }

    /// Ends the connection, telling the client why where the transport can.
    fn close(&mut self, why: &Detach) -> impl Future<Output = ()> + Send;
}

/// How long a connection keeps delivering a shutting-down session's last events (its `error`
/// and `session` events) before it closes anyway.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// Timing and limits of the drive loop.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Consecutive malformed frames tolerated before closing with 1008.
    pub max_bad_frames: u32,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// An event for one connection only (`pong`, `resync`, a refused frame's `error`): it carries
/// the seq of the latest logged event.
pub(crate) fn per_connection(session: &SessionHandle, body: EventBody) -> Published {
    let (last_seq, _) = session.log.bounds();
    Published::new(&session.id, last_seq, body)
}

fn error_event(session: &SessionHandle, e: &Error) -> Published {
    per_connection(session, EventBody::error(ErrorCause::Request(e), None))
}

/// The `resync` event for a client too far behind to replay.
pub(crate) async fn resync_event(session: &SessionHandle) -> Published {
    let (last_seq, oldest_seq) = session.log.bounds();
    let info = session.info().await.ok();
    let state = SessionState {
        status: if info.is_some() {
            SessionStatus::Active
        } else {
            SessionStatus::Ended
        },
        turn_count: info.as_ref().map_or(0, |i| i.turn_count),
        current_turn: None,
        oldest_seq,
        last_seq,
    };
    let body = EventBody::Resync {
        reason: "the requested events are no longer in the session log".to_owned(),
        state: Box::new(state),
    };
    per_connection(session, body)
}

/// Sends the replay of a subscription (or a resync when the client is too far behind).
async fn send_backlog<T: Transport>(
    session: &SessionHandle,
    sub: &mut Subscription,
    transport: &mut T,
) -> Result<(), Detach> {
    if sub.resync_needed {
        transport.send(&resync_event(session).await).await?;
    }
    for event in std::mem::take(&mut sub.replay) {
        transport.send(&event).await?;
        if transport.done_after(&event) {
            return Err(Detach::Done);
        }
    }
    Ok(())
}

/// Drives a transport until the client leaves, the session ends, the transport is done, or the
/// server shuts down. The session's generation never depends on this loop.
pub async fn drive<T: Transport>(
    session: SessionHandle,
    mut sub: Subscription,
    transport: &mut T,
    opts: DriveOptions,
) {
    let mut why = run(&session, &mut sub, transport, &opts).await;
    // At shutdown the session's task stops too, and its log may close before this loop sees the
    // shutdown token: the client must still learn that the server went away (1001, reconnect
    // elsewhere), not that its session ended (1000).
    if why == Detach::SessionEnded && opts.shutdown.is_cancelled() {
        why = Detach::Shutdown;
    }
    match why {
        Detach::SlowClient => {
            opts.stats.slow_clients.inc();
            crate::metric::disconnect(transport.kind().as_str(), "slow_client");
            tracing::info!(session_id = %session.id, kind = ?transport.kind(), "slow client detached");
        }
        Detach::NoPong => {
            opts.stats.no_pong_closes.inc();
            crate::metric::disconnect(transport.kind().as_str(), "no_pong");
            tracing::info!(session_id = %session.id, "no pong in time: connection closed");
        }
        _ => {}
    }
    Box::pin(transport.close(&why)).await;
}

async fn run<T: Transport>(
    session: &SessionHandle,
    sub: &mut Subscription,
    transport: &mut T,
    opts: &DriveOptions,
) -> Detach {
    // The rare awaits of this loop are boxed: a connection's task holds its future for as long
    // as the client stays, sized for the largest await in it, so only the per-event one
    // (`deliver`) stays inline; the others allocate when they happen.
    if let Err(why) = Box::pin(send_backlog(session, sub, transport)).await {
        return why;
    }
    let mut heartbeat = tokio::time::interval_at(Instant::now() + opts.heartbeat, opts.heartbeat);
    let mut bad_frames = 0u32;
    // Made once, not per event: a fresh one per loop turn registers and drops a waiter per token.
    let shutdown = opts.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let deadline = transport.liveness_deadline();
        tokio::select! {
            event = sub.live.recv() => match event {
                Some(event) => {
                    if let Err(why) = deliver(transport, sub, &event).await {
                        return why;
                    }
                }
                None if sub.lagged.load(Ordering::SeqCst) => return Detach::SlowClient,
                None if sub.disconnected.load(Ordering::SeqCst) => return Detach::Disconnected,
                None if session.log.moved() => return Detach::Moved,
                None => return Detach::SessionEnded,
            },
            inbound = transport.recv() => match inbound {
                Inbound::Closed => return Detach::ClientGone,
                Inbound::Alive => {}
                Inbound::Fatal(why) => return why,
                Inbound::Invalid(message) => {
                    bad_frames += 1;
                    if bad_frames > opts.max_bad_frames {
                        return Detach::Protocol { code: 1008, reason: "too many malformed frames".into() };
                    }
                    let e = Error::bad_request("invalid_frame", message);
                    if let Err(why) = Box::pin(transport.send(&error_event(session, &e))).await {
                        return why;
                    }
                }
                Inbound::Frame(frame) => {
                    bad_frames = 0;
                    let reply = match frame {
                        ClientFrame::UserMessage { text, mode, client_id } => {
                            Box::pin(session.user_message(text, mode, client_id)).await.err().map(|e| error_event(session, &e))
                        }
                        ClientFrame::Cancel => match Box::pin(session.cancel()).await {
                            Ok(_) => None,
                            Err(e) => Some(error_event(session, &e)),
                        },
                        ClientFrame::Ping { nonce } => Some(per_connection(session, EventBody::Pong { nonce })),
                        ClientFrame::Resume { after_seq } => {
                            // A fresh subscription from the client's seq replaces the live one.
                            *sub = session.subscribe(Some(after_seq));
                            if let Err(why) = Box::pin(send_backlog(session, sub, transport)).await {
                                return why;
                            }
                            None
                        }
                    };
                    if let Some(event) = reply
                        && let Err(why) = Box::pin(transport.send(&event)).await {
                            return why;
                        }
                }
            },
            _ = heartbeat.tick() => {
                if let Err(why) = Box::pin(transport.heartbeat()).await {
                    return why;
                }
            }
            () = sleep_until_opt(deadline) => return Detach::NoPong,
            () = &mut shutdown => return Box::pin(drain_for_shutdown(sub, transport)).await,
        }
    }
}

/// Most events one delivery writes before its flush: a bound on how long the connection's other
/// duties (client frames, heartbeats) wait behind a long backlog.
const MAX_BATCH: usize = 64;

/// Delivers a live event that just arrived, with every event already queued behind it (up to
/// [`MAX_BATCH`]), then flushes once: one socket write and one wakeup of the client for all of
/// them, and nothing ever waits for more to come. `Err` ends the connection (`Detach::Done`
/// when the transport is finished after one of them). Public for the publish micro-benchmark
/// (`benches/publish.rs`).
pub async fn deliver<T: Transport>(
    transport: &mut T,
    sub: &mut Subscription,
    event: &Published,
) -> Result<(), Detach> {
    transport.feed(event).await?;
    let mut done = transport.done_after(event);
    let mut fed = 1;
    while !done && fed < MAX_BATCH {
        // Empty, or closed (the next `recv` tells a slow client from an ended session).
        let Ok(next) = sub.live.try_recv() else {
            break;
        };
        transport.feed(&next).await?;
        done = transport.done_after(&next);
        fed += 1;
    }
    transport.flush().await?;
    if done { Err(Detach::Done) } else { Ok(()) }
}

/// At shutdown, delivers what the session still publishes (its `error` and final `session`
/// events) until it closes its log, for at most [`SHUTDOWN_DRAIN`]; then the connection closes
/// as shutting down (1001), so a client learns the server went away only after the last event.
async fn drain_for_shutdown<T: Transport>(sub: &mut Subscription, transport: &mut T) -> Detach {
    let drain = async {
        while let Some(event) = sub.live.recv().await {
            deliver(transport, sub, &event).await?;
        }
        Ok(())
    };
    match tokio::time::timeout(SHUTDOWN_DRAIN, drain).await {
        Ok(Err(why)) => why,
        Ok(Ok(())) | Err(_) => Detach::Shutdown,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! What the adapters' unit tests share: a live session of the session layer's own test
    //! harness (scripted provider, in-process stores), kept alive by the returned harness.
    use super::{SessionHandle, TransportKind};
    use crate::session::testing::{Harness, Setup, harness};

    /// A live session, its first `session` event logged: what the transports' unit tests drive.
    pub(crate) async fn test_session() -> (Harness, SessionHandle) {
        let h = harness(Setup::default());
        let session = h.live(TransportKind::WebSocket).await;
        (h, session)
    }
}
