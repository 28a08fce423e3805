//! Write-behind of finished turns: each finished (or interrupted) turn is queued and written by a
//! worker to the ContextCache (session and user–coach context) and the MemoryStore (long-term
//! memory), so the token path never waits on storage. Queues are bounded; failures are retried
//! with back-off; on shutdown the queues are drained before the process exits.
//!
//! Records are sharded by session over the workers, so one session's turns are written in order.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{ContextCache, ContextMessage};
use crate::error::StoreError;
use crate::llm::Usage;
use crate::memory::{MemoryStore, NewMemory};

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
}

/// Write-behind settings.
#[derive(Debug, Clone, Copy)]
pub struct WriteBehindConfig {
    /// Workers (and queues).
    pub workers: usize,
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
    /// Records queued.
    pub enqueued: AtomicU64,
    /// Records written completely.
    pub written: AtomicU64,
    /// Individual store attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Records given up after every attempt failed.
    pub failed: AtomicU64,
    /// Times a producer found its queue full and had to wait.
    pub queue_full_waits: AtomicU64,
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
                context: context.clone(),
                memory: memory.clone(),
                stats: stats.clone(),
                config,
            };
            tracker.spawn(worker.run(shutdown.clone()));
        }
        WriteBehind {
            queues: Arc::new(queues),
            capacity: config.queue_capacity,
            stats,
        }
    }

    /// Queues a record. Never drops it: when the queue is full this waits for room (the caller is
    /// a session task between turns, never the token path).
    pub async fn enqueue(&self, record: TurnRecord) {
        let mut h = DefaultHasher::new();
        record.session_id.hash(&mut h);
        let Some(queue) = self.queues.get((h.finish() as usize) % self.queues.len().max(1)) else {
            return;
        };
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
                if queue.send(record).await.is_err() {
                    tracing::error!("write-behind queue closed: a turn was not stored");
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(mpsc::error::TrySendError::Closed(record)) => {
                tracing::error!(session_id = %record.session_id, turn = record.turn_number, "write-behind stopped: turn not stored");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
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

struct Worker {
    rx: mpsc::Receiver<TurnRecord>,
    context: Arc<dyn ContextCache>,
    memory: Arc<dyn MemoryStore>,
    stats: Arc<WriteStats>,
    config: WriteBehindConfig,
}

impl Worker {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                record = self.rx.recv() => match record {
                    Some(r) => self.write(r).await,
                    None => return,
                },
                () = shutdown.cancelled() => break,
            }
        }
        // Shutting down: refuse new records and drain what is queued.
        self.rx.close();
        let mut drained = 0u64;
        while let Some(r) = self.rx.recv().await {
            self.write(r).await;
            drained += 1;
        }
        if drained > 0 {
            tracing::info!(drained, "write-behind drained on shutdown");
        }
    }

    async fn write(&self, r: TurnRecord) {
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
        let ok = self
            .retry("session context", || async {
                self.context
                    .append_messages(&r.session_id, &r.user_id, &r.coach_id, messages.clone())
                    .await
            })
            .await
            && self
                .retry("user-coach context", || async {
                    self.context
                        .append_user_coach_messages(&r.user_id, &r.coach_id, messages.clone())
                        .await
                })
                .await
            && self
                .retry("memory", || async {
                    let mut text = format!("User: {}", r.user_text);
                    if !r.reply_text.is_empty() {
                        text.push_str("\nCoach: ");
                        text.push_str(&r.reply_text);
                    }
                    self.memory
                        .store(NewMemory {
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
                })
                .await;
        if ok {
            self.stats.written.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                session_id = %r.session_id, turn = r.turn_number, user_chars = r.user_text.len(),
                reply_chars = r.reply_text.len(), "turn not stored after every retry"
            );
        }
    }

    /// Runs `op` until it succeeds or the attempts run out; invalid input is not retried.
    async fn retry<F, Fut>(&self, what: &str, op: F) -> bool
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
                    return false;
                }
                Err(e) => {
                    tracing::warn!(what, attempt, error = %e, "write-behind: store failed; retrying");
                    if attempt < self.config.max_attempts {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        false
    }
}
