//! Write-behind of finished turns: each finished (or interrupted) turn is queued and written by a
//! worker to the ContextCache (session and user–coach context) and the MemoryStore (long-term
//! memory), so the token path never waits on storage. Queues are bounded; failures are retried
//! with back-off; on shutdown the queues are drained before the process exits.
//!
//! Records are sharded by session over the workers. A worker writes several records at once
//! (`concurrency`), never two of the same session, so one session's turns are written in order
//! and a record whose store is slow or retrying holds up only its own session.
//! Each store is attempted on its own (at once, each with its own retries): a store that stays down
//! costs only its own copy of the turn, which is then counted per store and logged.
//!
//! When a queue is full, nothing waits and nothing is lost: the session's [`SessionWriter`] keeps
//! the record in a backlog of its own (in order, counted in `queue_full_waits` and `backlog`) and
//! the session task hands it over as soon as the queue has room, between its other work. A backlog
//! grows by at most one record per finished turn, so it stays as small as the stall is short.
//! When the session ends, its backlog is handed over before the task finishes, so the ordered
//! shutdown (sessions end, then write-behind drains) still stores it. Only a record refused by a
//! queue that has already stopped (after the shutdown grace period) is lost, and that is counted
//! in `failed` and logged with its session and turn.
//!
//! Each record is written inside a `write_behind` span whose parent is the turn's span (through
//! the span context the record carries, so the turn span itself ends with the turn).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{ContextCache, ContextMessage, StoredThrough, TurnKey};
use crate::error::StoreError;
use crate::llm::Usage;
use crate::memory::{MemoryStore, NewMemory};
use crate::metric;

/// The longest prefix of `text` within `max` bytes, cut at a character boundary.
pub(crate) fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Memory type of stored conversation turns.
pub const TURN_MEMORY_TYPE: &str = "conversation";

/// One finished or interrupted turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRecord {
    /// Session.
    pub session_id: String,
    /// User.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// Turn number in the session.
    pub turn_number: u32,
    /// What the user said.
    pub user_text: String,
    /// The reply (partial when interrupted).
    pub reply_text: String,
    /// Cancelled, interrupted or failed before its end.
    pub interrupted: bool,
    /// Why it ended.
    pub finish_reason: String,
    /// Token counts.
    pub usage: Option<Usage>,
    /// When the turn ended.
    pub at: DateTime<Utc>,
    /// The trace context of the turn's span, when traces are on: the write joins that trace.
    pub trace: Option<SpanContext>,
    /// The seq of its `turn_end` in the session's log (0: not from a session log), recorded
    /// with the session once every store holds the turn (see `ContextCache::mark_stored`).
    pub end_seq: u64,
}

/// Write-behind settings.
#[derive(Debug, Clone, Copy)]
pub struct WriteBehindConfig {
    /// Workers (and queues).
    pub workers: usize,
    /// Records each worker writes at once, of different sessions.
    pub concurrency: usize,
    /// Capacity of each queue.
    pub queue_capacity: usize,
    /// Attempts per store before the record is given up (and logged).
    pub max_attempts: u32,
    /// First retry delay, doubled per attempt up to 5 s.
    pub retry_base: Duration,
    /// Longest memory text the store takes; longer turns are stored as an excerpt (the context
    /// cache keeps them whole).
    pub memory_max_bytes: usize,
}

/// Counters shown in `/realtime/stats`.
#[derive(Debug, Default, Serialize)]
pub struct WriteStats {
    /// Records handed to write-behind (queued, or waiting in a session's backlog).
    pub enqueued: AtomicU64,
    /// Records written to every store.
    pub written: AtomicU64,
    /// Individual store attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Records given up for at least one store after its attempts failed (see `given_up`), or
    /// refused by a stopped queue.
    pub failed: AtomicU64,
    /// Records given up, per store.
    pub given_up: StoreCounts,
    /// Records that found their queue full and waited in their session's backlog.
    pub queue_full_waits: AtomicU64,
    /// Records waiting in session backlogs now.
    pub backlog: AtomicU64,
}

/// One counter per store a turn is written to.
#[derive(Debug, Default, Serialize)]
pub struct StoreCounts {
    /// The session's context list (ContextCache).
    pub session_context: AtomicU64,
    /// The user–coach context list (ContextCache).
    pub user_coach_context: AtomicU64,
    /// Long-term memory (MemoryStore).
    pub memory: AtomicU64,
}

/// The producer side: cheap to clone.
#[derive(Debug, Clone)]
pub struct WriteBehind {
    queues: Arc<Vec<mpsc::Sender<TurnRecord>>>,
    capacity: usize,
    stats: Arc<WriteStats>,
}

impl WriteBehind {
    /// Starts the workers on `tracker`. They stop once `shutdown` is cancelled and every queued
    /// record has been written (or given up).
    pub fn start(
        config: WriteBehindConfig,
        context: Arc<dyn ContextCache>,
        memory: Arc<dyn MemoryStore>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let stats = Arc::new(WriteStats::default());
        let mut queues = Vec::new();
        for _ in 0..config.workers.max(1) {
            let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
            queues.push(tx);
            let worker = Worker {
                rx,
                writer: Writer {
                    context: context.clone(),
                    memory: memory.clone(),
                    stats: stats.clone(),
                    config,
                },
            };
            tracker.spawn(worker.run(shutdown.clone()));
        }
        WriteBehind {
            queues: Arc::new(queues),
            capacity: config.queue_capacity,
            stats,
        }
    }

    fn queue_of(&self, session_id: &str) -> Option<&mpsc::Sender<TurnRecord>> {
        let mut h = DefaultHasher::new();
        session_id.hash(&mut h);
        self.queues.get((h.finish() as usize) % self.queues.len().max(1))
    }

    /// The producer of one session: hands its records over without waiting (see the module
    /// header for what happens when the queue is full).
    pub fn session_writer(&self, session_id: &str) -> SessionWriter {
        SessionWriter {
            queue: self.queue_of(session_id).cloned(),
            stats: self.stats.clone(),
            backlog: VecDeque::new(),
            room: None,
        }
    }

    /// Queues a record, waiting for room when the queue is full. For callers off every session's
    /// command path; a session task uses its [`SessionWriter`].
    pub async fn enqueue(&self, record: TurnRecord) {
        let mut writer = self.session_writer(&record.session_id);
        writer.push(record);
        writer.flush().await;
    }

    /// Records waiting in the queues.
    pub fn depth(&self) -> usize {
        self.queues
            .iter()
            .map(|q| self.capacity.saturating_sub(q.capacity()))
            .sum()
    }

    /// The counters.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Total capacity of the queues.
    pub fn capacity(&self) -> usize {
        self.capacity * self.queues.len()
    }
}

/// Waits for room in a queue; boxed so that it lives across the session task's loop turns (a
/// fresh one per turn would queue and unqueue a waiter every time).
type Room =
    Pin<Box<dyn Future<Output = Result<mpsc::OwnedPermit<TurnRecord>, mpsc::error::SendError<()>>> + Send>>;

/// One session's producer: hands records to the session's queue without ever waiting; what does
/// not fit waits here, in order, until [`SessionWriter::hand_over`] finds room.
pub struct SessionWriter {
    queue: Option<mpsc::Sender<TurnRecord>>,
    stats: Arc<WriteStats>,
    backlog: VecDeque<TurnRecord>,
    room: Option<Room>,
}

impl std::fmt::Debug for SessionWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionWriter")
            .field("backlog", &self.backlog.len())
            .finish_non_exhaustive()
    }
}

impl SessionWriter {
    /// Hands `record` over, or keeps it in the backlog when the queue is full (or older records
    /// still wait, so the session's turns stay in order). Never waits.
    pub fn push(&mut self, record: TurnRecord) {
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        if !self.backlog.is_empty() {
            self.keep(record);
            return;
        }
        let Some(queue) = &self.queue else {
            return self.refused(&record);
        };
        match queue.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
                self.keep(record);
            }
            Err(mpsc::error::TrySendError::Closed(record)) => self.refused(&record),
        }
    }

    fn keep(&mut self, record: TurnRecord) {
        self.stats.backlog.fetch_add(1, Ordering::Relaxed);
        self.backlog.push_back(record);
    }

    fn refused(&self, record: &TurnRecord) {
        tracing::error!(session_id = %record.session_id, turn = record.turn_number, "write-behind stopped: turn not stored");
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::WRITE_BEHIND_FAILURES, "store" => "queue").increment(1);
    }

    /// Whether records wait for room.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Waits for room and hands the oldest waiting record over; pending forever with no backlog.
    /// Cancel-safe: dropped before it finishes, it keeps its place in the queue's line.
    pub async fn hand_over(&mut self) {
        if self.backlog.is_empty() {
            return std::future::pending().await;
        }
        let Some(queue) = &self.queue else {
            return std::future::pending().await;
        };
        let room = self
            .room
            .get_or_insert_with(|| Box::pin(queue.clone().reserve_owned()));
        let permit = room.await;
        self.room = None;
        let Some(record) = self.backlog.pop_front() else {
            return;
        };
        self.stats.backlog.fetch_sub(1, Ordering::Relaxed);
        match permit {
            Ok(permit) => {
                permit.send(record);
            }
            Err(_) => self.refused(&record),
        }
    }

    /// Hands every waiting record over, waiting for room as long as it takes: for the end of a
    /// session, which shutdown waits for before it stops the workers.
    pub async fn flush(mut self) {
        while self.has_backlog() {
            if self.queue.is_none() {
                while let Some(record) = self.backlog.pop_front() {
                    self.stats.backlog.fetch_sub(1, Ordering::Relaxed);
                    self.refused(&record);
                }
                return;
            }
            self.hand_over().await;
        }
    }
}

struct Worker {
    rx: mpsc::Receiver<TurnRecord>,
    writer: Writer,
}

/// What writes one record: the stores and the counters.
struct Writer {
    context: Arc<dyn ContextCache>,
    memory: Arc<dyn MemoryStore>,
    stats: Arc<WriteStats>,
    config: WriteBehindConfig,
}

/// Records a worker holds: being written (one per session at a time) and, behind them, the
/// later records of those sessions, which wait so that a session's turns are stored in order.
#[derive(Default)]
struct Held {
    /// Per session with a record in flight, its next records.
    waiting: HashMap<String, VecDeque<TurnRecord>>,
    count: usize,
}

impl Worker {
    /// Writes up to `concurrency` records at once, never two of one session: one record whose
    /// store is slow or retrying holds up only its own session's later turns, not every
    /// session sharded to this worker.
    async fn run(self, shutdown: CancellationToken) {
        let Worker { mut rx, writer } = self;
        let concurrency = writer.config.concurrency.max(1);
        let writer = &writer;
        let write = |r: TurnRecord| async move {
            let session = r.session_id.clone();
            writer.write(r).await;
            session
        };
        let mut in_flight = FuturesUnordered::new();
        let mut held = Held::default();
        let (mut open, mut stopping, mut drained) = (true, false, 0u64);
        loop {
            tokio::select! {
                biased;
                Some(session) = in_flight.next() => {
                    held.count -= 1;
                    let next = held.waiting.get_mut(&session).and_then(VecDeque::pop_front);
                    match next {
                        Some(r) => in_flight.push(write(r)),
                        None => {
                            held.waiting.remove(&session);
                        }
                    }
                }
                // Once the queue is closed and empty there is nothing left to drain.
                () = shutdown.cancelled(), if open && !stopping => {
                    // Shutting down: refuse new records and drain what is queued.
                    stopping = true;
                    rx.close();
                }
                record = rx.recv(), if open && held.count < concurrency => match record {
                    Some(r) => {
                        held.count += 1;
                        drained += u64::from(stopping);
                        if let Some(later) = held.waiting.get_mut(&r.session_id) {
                            later.push_back(r);
                        } else {
                            held.waiting.insert(r.session_id.clone(), VecDeque::new());
                            in_flight.push(write(r));
                        }
                    }
                    None => open = false,
                },
                else => break,
            }
        }
        if drained > 0 {
            tracing::info!(drained, "write-behind drained on shutdown");
        }
    }
}

impl Writer {
    async fn write(&self, r: TurnRecord) {
        let span = tracing::info_span!(
            "write_behind",
            session_id = %r.session_id,
            // i64: the OpenTelemetry bridge records unsigned integers as strings.
            turn = i64::from(r.turn_number),
            written = tracing::field::Empty,
        );
        if let Some(turn) = &r.trace {
            // Fails only when the span is already started, which it cannot be yet.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(turn.clone()));
        }
        self.write_traced(r, &span).instrument(span.clone()).await;
    }

    async fn write_traced(&self, r: TurnRecord, span: &tracing::Span) {
        let meta = json!({
            "turn_number": r.turn_number,
            "interrupted": r.interrupted,
            "finish_reason": r.finish_reason,
        });
        let mut user = ContextMessage::new("user", r.user_text.clone());
        user.timestamp = r.at;
        user.metadata = meta.clone();
        let mut assistant = ContextMessage::new("assistant", r.reply_text.clone());
        assistant.timestamp = r.at;
        assistant.metadata = meta.clone();

        // Each list gets the turn's messages in one atomic append: a retry after a failure can
        // never leave the user message stored twice (or without its reply).
        let mut messages = vec![user];
        if !r.reply_text.is_empty() {
            messages.push(assistant);
        }
        // Each store on its own and at once: one that is down neither skips nor delays the others.
        let given_up = &self.stats.given_up;
        // Each store takes the turn once (a repeated write of it stores nothing): see
        // `ContextCache::append_turn` and `NewMemory::dedup_key`.
        let turn = TurnKey {
            session_id: &r.session_id,
            user_id: &r.user_id,
            coach_id: &r.coach_id,
            turn_number: r.turn_number,
        };
        let (session, user_coach, memory) = tokio::join!(
            self.retry("session_context", &given_up.session_context, || async {
                self.context
                    .append_turn(&turn, messages.clone())
                    .await
                    .map(|_| ())
            }),
            self.retry("user_coach_context", &given_up.user_coach_context, || async {
                self.context
                    .append_user_coach_turn(&turn, messages.clone())
                    .await
                    .map(|_| ())
            }),
            self.retry("memory", &given_up.memory, || async {
                let mut text = format!("User: {}", r.user_text);
                if !r.reply_text.is_empty() {
                    text.push_str("\nCoach: ");
                    text.push_str(&r.reply_text);
                }
                self.memory
                    .store(NewMemory {
                        // Once per turn, whatever its text (see `NewMemory::dedup_key`).
                        dedup_key: Some(format!("turn\u{0}{}\u{0}{}", r.session_id, r.turn_number)),
                        text: clip(&text, self.config.memory_max_bytes).to_owned(),
                        user_id: r.user_id.clone(),
                        coach_id: r.coach_id.clone(),
                        memory_type: TURN_MEMORY_TYPE.to_owned(),
                        metadata: json!({
                            "session_id": r.session_id,
                            "turn_number": r.turn_number,
                            "interrupted": r.interrupted,
                        }),
                    })
                    .await
                    .map(|_| ())
            }),
        );
        span.record("written", session && user_coach && memory);
        if session && user_coach && memory {
            self.stats.written.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::WRITE_BEHIND_WRITTEN).increment(1);
            if r.end_seq > 0 {
                let mark = StoredThrough {
                    turn: r.turn_number,
                    end_seq: r.end_seq,
                };
                // Best effort: without the mark, a takeover only re-stores more (and every store
                // takes a turn once).
                if let Err(e) = self.context.mark_stored(&r.session_id, mark).await {
                    tracing::debug!(session_id = %r.session_id, turn = r.turn_number, error = %e, "cannot record how far the session is stored");
                }
            }
        } else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                session_id = %r.session_id, turn = r.turn_number, session_context = session,
                user_coach_context = user_coach, memory, user_chars = r.user_text.len(),
                reply_chars = r.reply_text.len(), "turn not stored in every store after its retries"
            );
        }
    }

    /// Runs `op` until it succeeds or the attempts run out; invalid input is not retried. A record
    /// given up is counted in `given_up` (and the metrics, with `what` as the `store` label) and
    /// logged.
    async fn retry<F, Fut>(&self, what: &'static str, given_up: &AtomicU64, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut delay = self.config.retry_base;
        for attempt in 1..=self.config.max_attempts.max(1) {
            match op().await {
                Ok(()) => return true,
                Err(StoreError::Invalid(reason)) => {
                    tracing::warn!(what, reason, "write-behind: record rejected by the store");
                    given_up.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(metric::WRITE_BEHIND_FAILURES, "store" => what).increment(1);
                    return false;
                }
                Err(e) => {
                    tracing::warn!(what, attempt, error = %e, "write-behind: store failed; retrying");
                    if attempt < self.config.max_attempts {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(metric::WRITE_BEHIND_RETRIES, "store" => what).increment(1);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        tracing::error!(
            what,
            attempts = self.config.max_attempts,
            "write-behind: store given up for this record"
        );
        given_up.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::WRITE_BEHIND_FAILURES, "store" => what).increment(1);
        false
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The worker and the session producer with paused time, against the real in-process stores
    //! (and a real Redis client on a closed port for a store that stays down).

    use super::*;
    use crate::context::ContextLimits;
    use crate::context::in_process::InProcessContextCache;
    use crate::embed::offline::OfflineEmbedder;
    use crate::memory::MemoryLimits;
    use crate::memory::in_process::InProcessMemoryStore;

    fn record(session: &str, turn: u32) -> TurnRecord {
        TurnRecord {
            session_id: session.into(),
            user_id: "u".into(),
            coach_id: "c".into(),
            turn_number: turn,
            user_text: format!("question {turn}"),
            reply_text: format!("answer {turn}"),
            interrupted: false,
            finish_reason: "stop".into(),
            usage: None,
            at: Utc::now(),
            trace: None,
            end_seq: 0,
        }
    }

    fn in_process_context() -> Arc<dyn ContextCache> {
        let long = Duration::from_secs(3600);
        Arc::new(InProcessContextCache::new(ContextLimits {
            session_ttl: long,
            user_session_ttl: long,
            max_messages: 100,
        }))
    }

    fn in_process_memory() -> Arc<dyn MemoryStore> {
        Arc::new(InProcessMemoryStore::new(
            Arc::new(OfflineEmbedder::new(16)),
            MemoryLimits {
                max_text_bytes: 10_000,
                list_max: 100,
            },
            10_000,
        ))
    }

    /// A real Redis client on a port nobody listens on: every command fails after 200 ms. Built
    /// with fred directly, so the test does not depend on how start-up reads its settings.
    pub(crate) fn unreachable_redis() -> Arc<dyn ContextCache> {
        use fred::prelude::{Builder, ClientLike, Config};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = Config::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
        config.fail_fast = false;
        let timeout = Duration::from_millis(200);
        let pool = Builder::from_config(config)
            .with_connection_config(|c| c.connection_timeout = timeout)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .build_pool(1)
            .unwrap();
        // The connection task ends with the test's runtime.
        drop(pool.connect());
        let long = Duration::from_secs(3600);
        Arc::new(crate::context::redis::RedisContextCache::new(
            pool,
            "t:",
            ContextLimits {
                session_ttl: long,
                user_session_ttl: long,
                max_messages: 100,
            },
        ))
    }

    struct Running {
        wb: WriteBehind,
        tracker: TaskTracker,
        stop: CancellationToken,
    }

    fn start(queue_capacity: usize, context: Arc<dyn ContextCache>, memory: Arc<dyn MemoryStore>) -> Running {
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let wb = WriteBehind::start(
            WriteBehindConfig {
                workers: 1,
                concurrency: 4,
                queue_capacity,
                max_attempts: 3,
                retry_base: Duration::from_millis(100),
                memory_max_bytes: 10_000,
            },
            context,
            memory,
            &tracker,
            stop.clone(),
        );
        Running { wb, tracker, stop }
    }

    impl Running {
        async fn shut_down(&self) {
            self.stop.cancel();
            self.tracker.close();
            self.tracker.wait().await;
        }
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The in-process memory store behind a delay chosen per record (paused time), recording
    /// the order in which records finished and how many were being stored at once.
    #[derive(Debug)]
    struct Paced {
        inner: Arc<dyn MemoryStore>,
        delay: fn(&str, u32) -> Duration,
        finished: std::sync::Mutex<Vec<(String, u32)>>,
        now: AtomicU64,
        most: AtomicU64,
    }

    impl Paced {
        fn new(delay: fn(&str, u32) -> Duration) -> Arc<Self> {
            Arc::new(Paced {
                inner: in_process_memory(),
                delay,
                finished: std::sync::Mutex::new(Vec::new()),
                now: AtomicU64::new(0),
                most: AtomicU64::new(0),
            })
        }

        fn finished(&self) -> Vec<(String, u32)> {
            self.finished.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl MemoryStore for Paced {
        async fn store_batch(
            &self,
            memories: Vec<NewMemory>,
        ) -> Result<Vec<crate::memory::StoreOutcome>, StoreError> {
            let meta = &memories[0].metadata;
            let session = meta["session_id"].as_str().unwrap_or_default().to_owned();
            let turn = meta["turn_number"].as_u64().unwrap_or_default() as u32;
            let at_once = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(at_once, Ordering::SeqCst);
            tokio::time::sleep((self.delay)(&session, turn)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.finished.lock().unwrap().push((session, turn));
            self.inner.store_batch(memories).await
        }

        async fn search_similar(
            &self,
            user_id: &str,
            coach_id: &str,
            query: &str,
            limit: usize,
            min_similarity: f32,
        ) -> Result<Vec<crate::memory::ScoredMemory>, StoreError> {
            self.inner
                .search_similar(user_id, coach_id, query, limit, min_similarity)
                .await
        }

        async fn list(
            &self,
            user_id: &str,
            coach_id: &str,
            limit: usize,
            offset: usize,
        ) -> Result<(Vec<crate::memory::Memory>, u64), StoreError> {
            self.inner.list(user_id, coach_id, limit, offset).await
        }

        async fn delete(&self, user_id: &str, coach_id: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
            self.inner.delete(user_id, coach_id, id).await
        }

        async fn clear(&self, user_id: &str, coach_id: &str) -> Result<u64, StoreError> {
            self.inner.clear(user_id, coach_id).await
        }

        async fn erase_user(&self, user_id: &str) -> Result<u64, StoreError> {
            self.inner.erase_user(user_id).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_record_holds_up_only_its_own_session_not_the_others_on_its_worker() {
        let memory = Paced::new(|session, _| Duration::from_secs(if session == "slow" { 60 } else { 1 }));
        let run = start(64, in_process_context(), memory.clone());
        run.wb.enqueue(record("slow", 1)).await;
        run.wb.enqueue(record("slow", 2)).await;
        for i in 0..3 {
            run.wb.enqueue(record(&format!("fast{i}"), 1)).await;
        }

        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut early = memory.finished();
        early.sort();
        assert_eq!(
            early,
            vec![("fast0".into(), 1), ("fast1".into(), 1), ("fast2".into(), 1)],
            "the other sessions were stored while the slow one's first turn was still being stored"
        );

        run.shut_down().await;
        let finished = memory.finished();
        assert_eq!(
            finished[3..],
            [("slow".into(), 1), ("slow".into(), 2)],
            "then the slow one, in order"
        );
        assert_eq!(count(&run.wb.stats().written), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sessions_turns_are_stored_in_order_even_when_its_early_ones_are_slower() {
        // Turn 1 takes longest: written at once, the later turns would finish first.
        let memory = Paced::new(|_, turn| Duration::from_millis(100 * u64::from(7 - turn)));
        let context = in_process_context();
        let run = start(64, context.clone(), memory.clone());
        for turn in 1..=6 {
            run.wb.enqueue(record("s1", turn)).await;
        }

        run.shut_down().await;

        let turns: Vec<u32> = memory.finished().into_iter().map(|(_, t)| t).collect();
        assert_eq!(turns, [1, 2, 3, 4, 5, 6]);
        let stored: Vec<String> = context
            .recent_messages("s1", 20)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(stored.first().map(String::as_str), Some("question 1"));
        assert_eq!(stored.last().map(String::as_str), Some("answer 6"));
        assert_eq!(
            memory.most.load(Ordering::SeqCst),
            1,
            "never two of one session at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_writes_at_most_its_concurrency_at_once() {
        let memory = Paced::new(|_, _| Duration::from_secs(1));
        let run = start(64, in_process_context(), memory.clone());
        for i in 0..10 {
            run.wb.enqueue(record(&format!("s{i}"), 1)).await;
        }

        run.shut_down().await;

        assert_eq!(
            memory.most.load(Ordering::SeqCst),
            4,
            "the configured concurrency, reached"
        );
        assert_eq!(count(&run.wb.stats().written), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_stays_down_is_given_up_after_its_backed_off_retries_and_the_others_are_written() {
        let memory = in_process_memory();
        let run = start(8, unreachable_redis(), memory.clone());
        let began = tokio::time::Instant::now();

        run.wb.enqueue(record("s1", 1)).await;
        run.shut_down().await;

        let stats = run.wb.stats();
        assert_eq!(count(&stats.retries), 4, "two retries for each Redis list");
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "backed off 100 ms, then 200 ms: {:?}",
            began.elapsed()
        );
        let given_up = &stats.given_up;
        assert_eq!(
            (
                count(&given_up.session_context),
                count(&given_up.user_coach_context),
                count(&given_up.memory)
            ),
            (1, 1, 0)
        );
        assert_eq!((count(&stats.failed), count(&stats.written)), (1, 0));
        assert_eq!(
            memory.list("u", "c", 10, 0).await.unwrap().1,
            1,
            "memory was written regardless"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drains_every_queued_record_before_the_worker_stops() {
        let context = in_process_context();
        let run = start(64, context.clone(), in_process_memory());
        for i in 0..10 {
            run.wb.enqueue(record(&format!("s{i}"), 1)).await;
        }

        run.shut_down().await;

        assert_eq!(count(&run.wb.stats().written), 10);
        for i in 0..10 {
            let stored = context.recent_messages(&format!("s{i}"), 10).await.unwrap();
            assert_eq!(stored.len(), 2, "session s{i} has its turn");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_keeps_a_sessions_records_in_its_backlog_in_order_without_waiting() {
        let context = in_process_context();
        let run = start(1, context.clone(), in_process_memory());
        let mut writer = run.wb.session_writer("s1");

        // No await in between: the worker has not taken anything yet, so the queue fills at once.
        for turn in 1..=3 {
            writer.push(record("s1", turn));
        }

        let stats = run.wb.stats();
        assert!(writer.has_backlog());
        assert_eq!((count(&stats.queue_full_waits), count(&stats.backlog)), (1, 2));
        writer.flush().await;
        assert_eq!(count(&stats.backlog), 0);
        run.shut_down().await;
        assert_eq!((count(&stats.enqueued), count(&stats.written)), (3, 3));
        let turns: Vec<u64> = context
            .recent_messages("s1", 10)
            .await
            .unwrap()
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.metadata["turn_number"].as_u64().unwrap())
            .collect();
        assert_eq!(turns, [1, 2, 3], "stored in the order they ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_refused_by_a_stopped_queue_is_counted_not_dropped_silently() {
        let run = start(4, in_process_context(), in_process_memory());
        run.shut_down().await;
        let mut writer = run.wb.session_writer("s1");

        writer.push(record("s1", 1));

        assert!(!writer.has_backlog());
        assert_eq!(count(&run.wb.stats().failed), 1);
    }
}
