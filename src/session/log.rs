//! A session's event log: assigns each event its seq, keeps the last N for replay after a
//! reconnect, and fans each event out to the attached connections through bounded queues. A
//! connection whose queue is full is detached as a slow client rather than buffered without bound.
//!
//! Publishing and subscribing take the same lock, so a subscriber gets every event after its
//! `after_seq` exactly once: the replay and the live queue never overlap or leave a gap. The lock
//! is a std `Mutex` because it is never held across an `.await` and critical sections are short.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, mpsc};

use super::event::{EventBody, Published, envelope};
use super::ring::{Replay, Ring};

/// Shared by the session task (publishing) and the transports (subscribing).
#[derive(Debug)]
pub struct EventLog {
    session_id: String,
    /// `{"session_id":"…","seq":`, serialised once for every event of the session.
    envelope: String,
    inner: Mutex<Inner>,
    /// Woken after each publish when a shared-log writer follows this log (multi-node mode).
    follower: Option<Arc<Notify>>,
}

#[derive(Debug)]
struct Inner {
    last_seq: u64,
    ring: Ring,
    subscribers: Vec<Subscriber>,
    closed: bool,
    /// Closed because another node runs the session now.
    moved: bool,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Arc<Published>>,
    lagged: Arc<AtomicBool>,
    disconnected: Arc<AtomicBool>,
    /// Held by one request (an HTTP turn), which [`EventLog::disconnect_all`] leaves alone.
    request: bool,
}

/// A connection's view of the log.
#[derive(Debug)]
pub struct Subscription {
    /// Logged events after the requested seq, to send first.
    pub replay: Vec<Arc<Published>>,
    /// The requested seq is older than the log keeps: send a `resync` instead of a replay.
    pub resync_needed: bool,
    /// Live events.
    pub live: mpsc::Receiver<Arc<Published>>,
    /// Set when the live queue overflowed and the connection was detached.
    pub lagged: Arc<AtomicBool>,
    /// Set when the connection was detached on purpose ([`EventLog::disconnect_all`]): the
    /// session goes on and the client should reconnect and resume.
    pub disconnected: Arc<AtomicBool>,
    /// The latest seq when subscribing.
    pub last_seq: u64,
}

impl EventLog {
    /// An empty log keeping the last `capacity` events.
    pub fn new(session_id: &str, capacity: usize) -> Self {
        Self::starting_at(session_id, capacity, 0, None)
    }

    /// A log whose next seq follows `last_seq`, and whose publishes wake `follower` (the
    /// session's writer to the shared log, which reads with [`EventLog::since`]).
    pub fn starting_at(
        session_id: &str,
        capacity: usize,
        last_seq: u64,
        follower: Option<Arc<Notify>>,
    ) -> Self {
        EventLog {
            session_id: session_id.to_owned(),
            envelope: envelope(session_id),
            inner: Mutex::new(Inner {
                last_seq,
                ring: Ring::new(capacity),
                subscribers: Vec::new(),
                closed: false,
                moved: false,
            }),
            follower,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data (every update is one push).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Assigns the next seq, logs the event and hands it to every live queue. Never waits.
    pub fn publish(&self, body: EventBody) -> u64 {
        let mut inner = self.lock();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let event = Arc::new(Published::with_envelope(&self.envelope, seq, body));
        Self::fan_out(&mut inner, event);
        drop(inner);
        if let Some(follower) = &self.follower {
            // A stored permit when the writer is busy: it reads everything new when it looks.
            follower.notify_one();
        }
        seq
    }

    /// Logs an event numbered elsewhere (a relay of another node's log) and hands it to every
    /// live queue; an event at or below the last seq is a duplicate and dropped (`false`).
    pub fn insert(&self, event: Arc<Published>) -> bool {
        let mut inner = self.lock();
        if event.seq <= inner.last_seq || inner.closed {
            return false;
        }
        inner.last_seq = event.seq;
        Self::fan_out(&mut inner, event);
        true
    }

    fn fan_out(inner: &mut Inner, event: Arc<Published>) {
        inner.ring.push(event.clone());
        inner.subscribers.retain(|s| match s.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.lagged.store(true, Ordering::SeqCst);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Up to `max` logged events after `after_seq`, and whether some after it were already
    /// dropped from the ring (a gap for whoever reads this late).
    pub fn since(&self, after_seq: u64, max: usize) -> (Vec<Arc<Published>>, bool) {
        let inner = self.lock();
        let oldest = inner.ring.oldest().unwrap_or(inner.last_seq + 1);
        let gap = after_seq < inner.last_seq && after_seq + 1 < oldest;
        let replay = inner.ring.after(after_seq, max);
        drop(inner);
        (replay.publish(&self.envelope), gap)
    }

    /// Closes the log because another node runs the session now (see [`EventLog::moved`]).
    pub fn close_moved(&self) {
        self.lock().moved = true;
        self.close();
    }

    /// Whether the log was closed because the session moved to another node: its connections
    /// should reconnect (and land on the new owner or a relay of it), not take the session as over.
    pub fn moved(&self) -> bool {
        self.lock().moved
    }

    /// Whether [`EventLog::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Attaches a connection. With `after_seq`, logged events after it are replayed (or a resync is
    /// flagged when they are gone); without, only live events follow.
    pub fn subscribe(&self, after_seq: Option<u64>, queue: usize) -> Subscription {
        self.attach(after_seq, queue, false)
    }

    /// [`EventLog::subscribe`] for one request that ends with its turn (an HTTP or SSE turn):
    /// not a connection that [`EventLog::disconnect_all`] drops.
    pub fn subscribe_request(&self, after_seq: Option<u64>, queue: usize) -> Subscription {
        self.attach(after_seq, queue, true)
    }

    fn attach(&self, after_seq: Option<u64>, queue: usize, request: bool) -> Subscription {
        let (tx, live) = mpsc::channel(queue.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let disconnected = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        let oldest = inner.ring.oldest().unwrap_or(inner.last_seq + 1);
        let (replay, resync_needed) = match after_seq {
            None => (Replay::default(), false),
            Some(after) if after >= inner.last_seq => (Replay::default(), false),
            // Events after `after` start at after+1; the log must still hold that one.
            Some(after) if after + 1 < oldest => (Replay::default(), true),
            Some(after) => (inner.ring.after(after, usize::MAX), false),
        };
        if !inner.closed {
            inner.subscribers.push(Subscriber {
                tx,
                lagged: lagged.clone(),
                disconnected: disconnected.clone(),
                request,
            });
        }
        let last_seq = inner.last_seq;
        drop(inner);
        Subscription {
            replay: replay.publish(&self.envelope),
            resync_needed,
            live,
            lagged,
            disconnected,
            last_seq,
        }
    }

    /// The latest seq and the oldest still replayable.
    pub fn bounds(&self) -> (u64, u64) {
        let inner = self.lock();
        let oldest = inner.ring.oldest().unwrap_or(inner.last_seq + 1);
        (inner.last_seq, oldest)
    }

    /// Number of attached connections.
    pub fn subscriber_count(&self) -> usize {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.tx.is_closed());
        inner.subscribers.len()
    }

    /// Detaches every attached connection while the session goes on: their live queues end after
    /// what is already in them, flagged [`Subscription::disconnected`], so each transport closes
    /// with "reconnect and resume" (WebSocket 4004, an SSE `disconnected` error event). Requests
    /// waiting for their turn ([`EventLog::subscribe_request`]) stay. The operator's way to drop a
    /// session's clients (and the browser test's way to make the server cut a socket mid-reply).
    /// Returns how many connections were dropped.
    pub fn disconnect_all(&self) -> usize {
        let mut inner = self.lock();
        let mut count = 0;
        inner.subscribers.retain(|s| {
            if s.request {
                return true;
            }
            if !s.tx.is_closed() {
                count += 1;
            }
            s.disconnected.store(true, Ordering::SeqCst);
            false
        });
        count
    }

    /// Ends every live queue (the session is over); later subscribers get the replay only.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
        drop(inner);
        if let Some(follower) = &self.follower {
            follower.notify_one();
        }
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(i: u32) -> EventBody {
        EventBody::Token {
            turn_number: 1,
            text: format!("t{i}"),
            index: i,
        }
    }

    #[tokio::test]
    async fn replay_and_live_never_overlap_or_gap() {
        let log = EventLog::new("s", 100);
        for i in 0..5 {
            log.publish(token(i));
        }
        let mut sub = log.subscribe(Some(2), 16);
        log.publish(token(5));
        let replayed: Vec<u64> = sub.replay.iter().map(|e| e.seq).collect();
        assert_eq!(replayed, [3, 4, 5]);
        assert_eq!(sub.live.recv().await.unwrap().seq, 6);
    }

    #[test]
    fn a_client_too_far_behind_needs_a_resync() {
        let log = EventLog::new("s", 3);
        for i in 0..10 {
            log.publish(token(i));
        }
        assert_eq!(log.bounds(), (10, 8));
        assert!(log.subscribe(Some(2), 4).resync_needed);
        assert!(!log.subscribe(Some(7), 4).resync_needed);
        assert_eq!(log.subscribe(Some(7), 4).replay.len(), 3);
    }

    #[tokio::test]
    async fn events_numbered_elsewhere_go_in_by_seq_and_duplicates_are_dropped() {
        let log = EventLog::starting_at("s", 100, 10, None);
        let mut sub = log.subscribe(None, 16);
        let numbered = |seq| Arc::new(Published::new("s", seq, token(seq as u32)));
        assert!(!log.insert(numbered(10)), "at or below the last seq");
        assert!(log.insert(numbered(11)));
        assert!(
            log.insert(numbered(14)),
            "a relay may jump (it logs a resync first)"
        );
        assert!(!log.insert(numbered(12)), "never back");
        assert_eq!(sub.live.recv().await.unwrap().seq, 11);
        assert_eq!(sub.live.recv().await.unwrap().seq, 14);
        assert_eq!(log.publish(token(0)), 15, "publishing goes on from the last seq");
    }

    #[test]
    fn a_follower_reads_what_is_new_and_learns_of_what_it_missed() {
        let log = EventLog::new("s", 4);
        for i in 0..3 {
            log.publish(token(i));
        }
        let (events, gap) = log.since(1, 10);
        assert_eq!(
            (events.iter().map(|e| e.seq).collect::<Vec<_>>(), gap),
            (vec![2, 3], false)
        );
        for i in 3..10 {
            log.publish(token(i));
        }
        let (events, gap) = log.since(3, 2);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 8]);
        assert!(gap, "4..=6 are gone from the ring");
        assert!(log.since(10, 10).0.is_empty());
    }

    #[tokio::test]
    async fn disconnecting_ends_every_queue_after_what_it_holds_and_the_log_goes_on() {
        let log = EventLog::new("s", 100);
        let mut a = log.subscribe(None, 8);
        let mut b = log.subscribe(Some(0), 8);
        let mut turn = log.subscribe_request(None, 8);
        log.publish(token(0));
        assert_eq!(log.disconnect_all(), 2);
        assert_eq!(log.subscriber_count(), 1, "the request stays");
        log.publish(token(1));
        assert_eq!(turn.live.recv().await.unwrap().seq, 1);
        assert_eq!(turn.live.recv().await.unwrap().seq, 2);
        assert!(!turn.disconnected.load(Ordering::SeqCst));
        drop(turn);
        for sub in [&mut a, &mut b] {
            assert_eq!(
                sub.live.recv().await.unwrap().seq,
                1,
                "queued events still arrive"
            );
            assert!(sub.live.recv().await.is_none());
            assert!(sub.disconnected.load(Ordering::SeqCst));
            assert!(!sub.lagged.load(Ordering::SeqCst));
        }
        assert!(!log.is_closed(), "the session is not over");
        let again = log.subscribe(Some(0), 8);
        assert_eq!(again.replay.len(), 2);
        assert!(!again.disconnected.load(Ordering::SeqCst));
        assert_eq!(log.subscriber_count(), 1);
    }

    #[test]
    fn a_full_queue_detaches_the_slow_subscriber() {
        let log = EventLog::new("s", 100);
        let sub = log.subscribe(None, 2);
        for i in 0..3 {
            log.publish(token(i));
        }
        assert!(sub.lagged.load(Ordering::SeqCst));
        assert_eq!(log.subscriber_count(), 0);
    }
}
