//! The WebSocket adapter: events as text frames, client frames from text frames, protocol pings
//! with a pong deadline, a send timeout, and close codes for every way a connection can end.
//! Generic over the socket's `Sink` + `Stream`, so the tests below drive it, and the drive loop,
//! over channels.

use std::future::Future;
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
    /// The node is at its connection capacity: try again later, or another node.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client did not keep up with its event queue.
    pub const SLOW_CLIENT: u16 = 4001;
    /// No pong within the deadline.
    pub const NO_PONG: u16 = 4002;
    /// The session moved to another node (this one lost its lease): reconnect and resume.
    pub const MOVED: u16 = 4003;
    /// The server dropped the session's connections (an operator's disconnect): reconnect and
    /// resume.
    pub const DISCONNECTED: u16 = 4004;
}

/// A WebSocket connection attached to a session.
#[derive(Debug)]
pub struct WsTransport<S> {
    socket: S,
    send_timeout: Duration,
    pong_timeout: Duration,
    awaiting_pong: Option<Instant>,
    /// Set by the first `feed` after a flush: a batch and its flush share one send timeout.
    batch_deadline: Option<Instant>,
}

impl<S> WsTransport<S> {
    /// Wraps a socket.
    pub fn new(socket: S, send_timeout: Duration, pong_timeout: Duration) -> Self {
        WsTransport {
            socket,
            send_timeout,
            pong_timeout,
            awaiting_pong: None,
            batch_deadline: None,
        }
    }
}

impl<S, E> WsTransport<S>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display + Send,
{
    async fn write(&mut self, message: Message) -> Result<(), Detach> {
        within(Instant::now() + self.send_timeout, self.socket.send(message)).await
    }

    /// When the frames fed since the last flush must be out: one send timeout from the first.
    fn batch_deadline(&mut self) -> Instant {
        *self
            .batch_deadline
            .get_or_insert_with(|| Instant::now() + self.send_timeout)
    }
}

/// A socket operation bounded by a deadline.
async fn within<E>(deadline: Instant, op: impl Future<Output = Result<(), E>>) -> Result<(), Detach> {
    match tokio::time::timeout_at(deadline, op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Detach::ClientGone),
        // The socket would not take a frame in time: the client is not reading.
        Err(_) => Err(Detach::SlowClient),
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

    async fn feed(&mut self, event: &Published) -> Result<(), Detach> {
        // Into the socket's write buffer; the bytes leave at `flush`.
        let frame = Message::Text(event.json.clone());
        let deadline = self.batch_deadline();
        within(deadline, self.socket.feed(frame)).await
    }

    async fn flush(&mut self) -> Result<(), Detach> {
        let deadline = self.batch_deadline();
        let flushed = within(deadline, self.socket.flush()).await;
        self.batch_deadline = None;
        flushed
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
                // Returned, not swallowed: the drive loop re-arms its pong deadline only when
                // `recv` returns, so a pong read inside this loop would not cancel it.
                Ok(Message::Pong(_)) => {
                    self.awaiting_pong = None;
                    return Inbound::Alive;
                }
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
            Detach::Moved => (
                close::MOVED,
                "session moved to another node; reconnect".to_owned(),
            ),
            Detach::Disconnected => (
                close::DISCONNECTED,
                "disconnected by the server; reconnect and resume".to_owned(),
            ),
            Detach::Protocol { code, reason } => (*code, reason.clone()),
            Detach::ClientGone => return,
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        // Best effort: a client that is gone or stuck cannot be told.
        let _ = within(
            Instant::now() + self.send_timeout,
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    //! The drive loop over a channel-backed WebSocket, with paused time: heartbeats and the pong
    //! deadline, both slow-client rules, resume, and malformed frames. The session is a real
    //! one (the in-process app, offline provider); its log is published to directly.

    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::task::{Context, Poll};

    use futures::channel::mpsc;

    use super::*;
    use crate::session::Stats;
    use crate::session::event::EventBody;
    use crate::transport::tests::test_session as session;
    use crate::transport::{DriveOptions, drive};

    /// A socket whose other end is the test: frames the server sends arrive on `to_client`,
    /// frames the test sends come in on `from_client`.
    struct ChannelSocket {
        to_client: mpsc::Sender<Message>,
        from_client: mpsc::UnboundedReceiver<Message>,
        /// Completed flushes: each is one socket write on a real connection.
        flushes: Arc<AtomicUsize>,
    }

    impl Sink<Message> for ChannelSocket {
        type Error = mpsc::SendError;

        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.to_client).poll_ready(cx)
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            Pin::new(&mut self.to_client).start_send(item)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            let flushed = Pin::new(&mut self.to_client).poll_flush(cx);
            if flushed.is_ready() {
                self.flushes.fetch_add(1, AtomicOrdering::SeqCst);
            }
            flushed
        }

        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.to_client).poll_close(cx)
        }
    }

    impl Stream for ChannelSocket {
        type Item = Result<Message, mpsc::SendError>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.from_client.poll_next_unpin(cx).map(|m| m.map(Ok))
        }
    }

    /// The test's end of a connection.
    struct Client {
        rx: mpsc::Receiver<Message>,
        tx: mpsc::UnboundedSender<Message>,
        flushes: Arc<AtomicUsize>,
    }

    impl Client {
        fn send(&self, frame: &str) {
            self.tx.unbounded_send(Message::Text(frame.into())).unwrap();
        }

        async fn next(&mut self) -> Message {
            self.rx
                .next()
                .await
                .expect("a message before the socket is dropped")
        }

        /// The next text frame as JSON (skipping pings).
        async fn event(&mut self) -> serde_json::Value {
            loop {
                match self.next().await {
                    Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                    Message::Ping(_) => {}
                    other => panic!("expected an event, got {other:?}"),
                }
            }
        }

        /// The close code, skipping anything before it.
        async fn close_code(&mut self) -> u16 {
            loop {
                if let Message::Close(frame) = self.next().await {
                    return frame.map(|f| f.code).unwrap();
                }
            }
        }
    }

    const SEND_TIMEOUT: Duration = Duration::from_secs(5);
    const PING: Duration = Duration::from_secs(25);
    const PONG_TIMEOUT: Duration = Duration::from_secs(8);

    fn connection(buffer: usize) -> (WsTransport<ChannelSocket>, Client) {
        let (to_client, rx) = mpsc::channel(buffer);
        let (tx, from_client) = mpsc::unbounded();
        let flushes = Arc::new(AtomicUsize::new(0));
        let socket = ChannelSocket {
            to_client,
            from_client,
            flushes: flushes.clone(),
        };
        (
            WsTransport::new(socket, SEND_TIMEOUT, PONG_TIMEOUT),
            Client { rx, tx, flushes },
        )
    }

    fn options(stats: &Arc<Stats>) -> DriveOptions {
        DriveOptions {
            heartbeat: PING,
            max_bad_frames: 2,
            shutdown: tokio_util::sync::CancellationToken::new(),
            stats: stats.clone(),
        }
    }

    fn token(i: u32) -> EventBody {
        EventBody::Token {
            turn_number: 1,
            text: format!("t{i}"),
            index: i,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_goes_out_each_interval_and_a_missing_pong_closes_4002() {
        let (_app, session) = session().await;
        let (mut transport, mut client) = connection(16);
        let stats = Arc::new(Stats::default());
        let sub = session.subscribe(None);
        let start = Instant::now();
        let run = drive(session, sub, &mut transport, options(&stats));
        let talk = async {
            // The first ping is answered: the connection lives on to the next one.
            assert!(matches!(client.next().await, Message::Ping(_)));
            assert_eq!(start.elapsed(), PING);
            client
                .tx
                .unbounded_send(Message::Pong(Default::default()))
                .unwrap();
            assert!(matches!(client.next().await, Message::Ping(_)));
            assert_eq!(start.elapsed(), PING * 2);
            // The second is not: closed once the pong deadline passes.
            assert_eq!(client.close_code().await, close::NO_PONG);
            assert_eq!(start.elapsed(), PING * 2 + PONG_TIMEOUT);
        };
        tokio::join!(run, talk);
        assert_eq!(stats.no_pong_closes.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_behind_its_queue_gets_what_was_queued_then_4001() {
        let (_app, session) = session().await;
        let (mut transport, mut client) = connection(16);
        let stats = Arc::new(Stats::default());
        let sub = session.log.subscribe(None, 2);
        // Three events for a queue of two before the connection reads any: it overflows.
        for i in 0..3 {
            session.log.publish(token(i));
        }
        let run = drive(session, sub, &mut transport, options(&stats));
        let talk = async {
            assert_eq!(client.event().await["text"], "t0");
            assert_eq!(client.event().await["text"], "t1");
            assert_eq!(client.close_code().await, close::SLOW_CLIENT);
        };
        tokio::join!(run, talk);
        assert_eq!(stats.slow_clients.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn events_already_queued_go_out_in_order_with_one_flush() {
        let (_app, session) = session().await;
        let (mut transport, mut client) = connection(16);
        let stats = Arc::new(Stats::default());
        let sub = session.subscribe(None);
        // Queued before the connection runs, as when the publisher outpaces its wakeup.
        for i in 0..3 {
            session.log.publish(token(i));
        }
        let run = drive(session, sub, &mut transport, options(&stats));
        let talk = async {
            for i in 0..3 {
                assert_eq!(client.event().await["text"], format!("t{i}"));
            }
            assert_eq!(
                client.flushes.load(AtomicOrdering::SeqCst),
                1,
                "one write for the three"
            );
            drop(client);
        };
        tokio::join!(run, talk);
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_takes_no_frame_within_the_send_timeout_is_a_slow_client() {
        let (_app, session) = session().await;
        // Room for one frame, and a client that never reads.
        let (mut transport, client) = connection(0);
        let stats = Arc::new(Stats::default());
        let sub = session.subscribe(None);
        for i in 0..3 {
            session.log.publish(token(i));
        }
        let start = Instant::now();
        drive(session, sub, &mut transport, options(&stats)).await;
        assert_eq!(stats.slow_clients.get(), 1);
        // Given up after one send timeout (and one more for the close frame, which cannot go out).
        assert_eq!(start.elapsed(), SEND_TIMEOUT * 2);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn resume_replays_after_the_given_seq_then_goes_live() {
        let (_app, session) = session().await;
        let (mut transport, mut client) = connection(16);
        let stats = Arc::new(Stats::default());
        let first = session.log.bounds().0;
        for i in 0..4 {
            session.log.publish(token(i));
        }
        let sub = session.subscribe(None);
        let log = session.log.clone();
        let run = drive(session, sub, &mut transport, options(&stats));
        let talk = async {
            client.send(&format!(r#"{{"type":"resume","after_seq":{}}}"#, first + 2));
            let mut seqs = Vec::new();
            for _ in 0..2 {
                seqs.push(client.event().await["seq"].as_u64().unwrap());
            }
            log.publish(token(4));
            seqs.push(client.event().await["seq"].as_u64().unwrap());
            assert_eq!(
                seqs,
                [first + 3, first + 4, first + 5],
                "replay, then live, no gap"
            );
            drop(client);
        };
        tokio::join!(run, talk);
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_frames_get_error_events_until_the_limit_then_1008() {
        let (_app, session) = session().await;
        let (mut transport, mut client) = connection(16);
        let stats = Arc::new(Stats::default());
        let sub = session.subscribe(None);
        let run = drive(session, sub, &mut transport, options(&stats));
        let talk = async {
            client.send("not json");
            assert_eq!(client.event().await["code"], "invalid_frame");
            // A good frame in between resets the count.
            client.send(r#"{"type":"ping","nonce":"n"}"#);
            assert_eq!(client.event().await["nonce"], "n");
            for _ in 0..2 {
                client.send(r#"{"type":"shout"}"#);
                assert_eq!(client.event().await["code"], "invalid_frame");
            }
            client.send("{");
            assert_eq!(client.close_code().await, close::POLICY);
        };
        tokio::join!(run, talk);
    }
}
