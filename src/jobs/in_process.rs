//! The in-process [`JobBackend`] (no `DATABASE_URL`): job records, events and uploads in memory,
//! each run handed to apalis' in-memory storage of its queue. Nothing survives a restart, as
//! with the other embedded stores; the number of jobs kept is capped (oldest finished go first).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apalis_core::backend::memory::{MemorySink, MemoryStorage};
use apalis_core::task::Task;
use apalis_core::task::extensions::Extensions;
use apalis_core::task::task_id::RandomId;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::backend::{Claimed, JobTask, event_of, percentiles};
use super::{
    Job, JobBackend, JobError, JobEvent, JobFilter, JobInput, JobStatus, NewJob, Queue, QueueStats,
    Submitted, Upload, UploadInfo,
};
use crate::error::StoreError;

/// An entry of apalis' in-memory storage.
pub type MemoryTask = Task<JobTask, Extensions, RandomId>;

#[derive(Debug)]
struct Entry {
    job: Job,
    input: JobInput,
    result: Option<Value>,
    events: Vec<JobEvent>,
    upload: Option<(UploadInfo, Bytes)>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<Uuid, Entry>,
    /// Ids in submission order, for eviction and listing.
    order: VecDeque<Uuid>,
    idempotency: HashMap<(String, String), Uuid>,
}

/// Jobs in memory, their runs in apalis' `MemoryStorage`.
#[derive(Debug, Clone)]
pub struct InProcessJobBackend {
    inner: Arc<Mutex<Inner>>,
    senders: Arc<HashMap<Queue, UnboundedSender<MemoryTask>>>,
    receivers: Arc<Mutex<HashMap<Queue, UnboundedReceiver<MemoryTask>>>>,
    cap: usize,
    upload_ttl: Duration,
    wake: broadcast::Sender<Uuid>,
    /// Delayed retries wait here; cancelled at shutdown (the job then stays queued, as it would
    /// be lost anyway with the process).
    delayed: TaskTracker,
    stop: CancellationToken,
    workers: Arc<Mutex<HashMap<Queue, u64>>>,
}

fn poisoned<T>(e: PoisonError<T>) -> T {
    e.into_inner()
}

impl InProcessJobBackend {
    /// A backend keeping at most `cap` jobs.
    pub fn new(cap: usize, upload_ttl: Duration) -> Self {
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for q in Queue::ALL {
            let (tx, rx) = unbounded();
            senders.insert(q, tx);
            receivers.insert(q, rx);
        }
        let (wake, _) = broadcast::channel(1_024);
        InProcessJobBackend {
            inner: Arc::new(Mutex::new(Inner::default())),
            senders: Arc::new(senders),
            receivers: Arc::new(Mutex::new(receivers)),
            cap: cap.max(1),
            upload_ttl,
            wake,
            delayed: TaskTracker::new(),
            stop: CancellationToken::new(),
            workers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// apalis' in-memory storage of a queue, for its worker; `None` once taken (one worker per
    /// queue in a process).
    pub fn storage(&self, queue: Queue) -> Option<MemoryStorage<JobTask>> {
        let rx = self.receivers.lock().unwrap_or_else(poisoned).remove(&queue)?;
        let tx = self.senders.get(&queue)?.clone();
        type Boxed = Box<
            dyn futures::Sink<MemoryTask, Error = futures::channel::mpsc::SendError> + Send + Sync + Unpin,
        >;
        let sink: Boxed = Box::new(tx);
        let sink = MemorySink::new(Arc::new(futures::lock::Mutex::new(sink)));
        *self
            .workers
            .lock()
            .unwrap_or_else(poisoned)
            .entry(queue)
            .or_default() += 1;
        Some(MemoryStorage::new_with(sink, rx.boxed()))
    }

    /// Stops delayed retries from firing.
    pub async fn close(&self) {
        self.stop.cancel();
        self.delayed.close();
        self.delayed.wait().await;
    }

    fn push(&self, queue: Queue, id: Uuid) {
        if let Some(tx) = self.senders.get(&queue) {
            // Unbounded: a send fails only when the receiver is gone, i.e. the worker stopped.
            let _ = tx.unbounded_send(Task::builder(JobTask { job_id: id }).build());
        }
    }

    fn push_later(&self, queue: Queue, id: Uuid, delay: Duration) {
        if delay.is_zero() {
            return self.push(queue, id);
        }
        let this = self.clone();
        let stop = self.stop.clone();
        self.delayed.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => this.push(queue, id),
                () = stop.cancelled() => {}
            }
        });
    }

    /// Applies `change` to a job whose status is one of `from`, records the event `name` and
    /// returns the job after it.
    fn transition(
        &self,
        id: Uuid,
        from: &[JobStatus],
        name: &str,
        error: Option<&JobError>,
        change: impl FnOnce(&mut Entry),
    ) -> Option<Job> {
        let job = {
            let mut inner = self.inner.lock().unwrap_or_else(poisoned);
            let entry = inner.jobs.get_mut(&id)?;
            if !from.contains(&entry.job.status) {
                return None;
            }
            change(entry);
            entry.job.updated_at = Utc::now();
            if entry.job.status.is_final() {
                entry.job.finished_at = Some(entry.job.updated_at);
            }
            let seq = entry.events.len() as u64 + 1;
            entry.events.push(event_of(&entry.job, seq, name, error));
            entry.job.clone()
        };
        let _ = self.wake.send(id);
        Some(job)
    }

    fn evict(inner: &mut Inner, cap: usize) {
        while inner.jobs.len() >= cap {
            let victim = inner
                .order
                .iter()
                .position(|id| inner.jobs.get(id).is_none_or(|e| e.job.status.is_final()));
            let Some(pos) = victim else { break };
            if let Some(id) = inner.order.remove(pos)
                && let Some(e) = inner.jobs.remove(&id)
                && let Some(key) = e.job.idempotency_key
            {
                inner.idempotency.remove(&(e.job.user_id, key));
            }
        }
    }
}

#[async_trait::async_trait]
impl JobBackend for InProcessJobBackend {
    fn name(&self) -> &'static str {
        "in-process"
    }

    async fn submit(&self, new: NewJob, upload: Option<Upload>) -> Result<Submitted, StoreError> {
        let queue = new.kind.queue();
        let job = {
            let mut inner = self.inner.lock().unwrap_or_else(poisoned);
            if let Some(key) = &new.idempotency_key
                && let Some(existing) = inner.idempotency.get(&(new.user_id.clone(), key.clone()))
                && let Some(e) = inner.jobs.get(existing)
            {
                return Ok(Submitted {
                    job: e.job.clone(),
                    created: false,
                });
            }
            Self::evict(&mut inner, self.cap);
            if inner.jobs.len() >= self.cap {
                return Err(StoreError::Unavailable {
                    backend: "in-process",
                    reason: format!("{} unfinished jobs fill the embedded job store", self.cap),
                });
            }
            let now = Utc::now();
            let upload = upload.map(|u| {
                let info = UploadInfo {
                    filename: u.filename,
                    content_type: u.content_type,
                    size: u.bytes.len() as u64,
                    expires_at: now + chrono::Duration::from_std(self.upload_ttl).unwrap_or_default(),
                };
                (info, u.bytes)
            });
            let status = if queue.is_some() {
                JobStatus::Queued
            } else {
                JobStatus::Running
            };
            let job = Job {
                id: new.id,
                kind: new.kind,
                queue: queue.map_or("chain", Queue::as_str).to_owned(),
                user_id: new.user_id.clone(),
                coach_id: new.coach_id,
                session_id: new.session_id,
                status,
                progress: 0.0,
                stage: None,
                attempts: 0,
                max_attempts: new.max_attempts,
                options: new.options,
                error: None,
                idempotency_key: new.idempotency_key.clone(),
                parent_id: new.parent_id,
                upload: upload.as_ref().map(|(info, _)| info.clone()),
                created_at: now,
                updated_at: now,
                started_at: (status == JobStatus::Running).then_some(now),
                finished_at: None,
                has_result: false,
            };
            let events = vec![event_of(&job, 1, status.as_str(), None)];
            inner.jobs.insert(
                new.id,
                Entry {
                    job: job.clone(),
                    input: new.input,
                    result: None,
                    events,
                    upload,
                },
            );
            inner.order.push_back(new.id);
            if let Some(key) = new.idempotency_key {
                inner.idempotency.insert((new.user_id, key), new.id);
            }
            job
        };
        if let Some(queue) = queue {
            self.push(queue, job.id);
        }
        let _ = self.wake.send(job.id);
        Ok(Submitted { job, created: true })
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(inner.jobs.get(&id).map(|e| e.job.clone()))
    }

    async fn result(&self, id: Uuid) -> Result<Option<Value>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(inner
            .jobs
            .get(&id)
            .filter(|e| e.job.status == JobStatus::Succeeded)
            .and_then(|e| e.result.clone()))
    }

    async fn list(&self, f: &JobFilter) -> Result<(Vec<Job>, u64), StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        let matching: Vec<&Job> = inner
            .order
            .iter()
            .rev()
            .filter_map(|id| inner.jobs.get(id).map(|e| &e.job))
            .filter(|j| f.user_id.as_ref().is_none_or(|u| *u == j.user_id))
            .filter(|j| f.kind.is_none_or(|k| k == j.kind))
            .filter(|j| f.status.is_none_or(|s| s == j.status))
            .filter(|j| f.parent_id.is_none_or(|p| Some(p) == j.parent_id))
            .collect();
        let total = matching.len() as u64;
        Ok((
            matching
                .into_iter()
                .skip(f.offset)
                .take(f.limit)
                .cloned()
                .collect(),
            total,
        ))
    }

    async fn upload(&self, id: Uuid) -> Result<Option<(UploadInfo, Bytes)>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(inner.jobs.get(&id).and_then(|e| e.upload.clone()))
    }

    async fn claim(&self, id: Uuid, _worker: &str) -> Result<Option<Claimed>, StoreError> {
        let job = self.transition(
            id,
            &[JobStatus::Queued, JobStatus::Running],
            "started",
            None,
            |e| {
                e.job.status = JobStatus::Running;
                e.job.attempts += 1;
                e.job.started_at.get_or_insert_with(Utc::now);
            },
        );
        let Some(job) = job else { return Ok(None) };
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        let input = inner.jobs.get(&id).map(|e| e.input.clone()).unwrap_or_default();
        Ok(Some(Claimed { job, input }))
    }

    async fn progress(&self, id: Uuid, progress: f32, stage: Option<&str>) -> Result<bool, StoreError> {
        Ok(self
            .transition(id, &[JobStatus::Running], "progress", None, |e| {
                e.job.progress = progress.clamp(0.0, 1.0);
                if let Some(stage) = stage {
                    e.job.stage = Some(stage.to_owned());
                }
            })
            .is_some())
    }

    async fn succeed(&self, id: Uuid, result: Value) -> Result<bool, StoreError> {
        Ok(self
            .transition(id, &[JobStatus::Running], "succeeded", None, |e| {
                e.job.status = JobStatus::Succeeded;
                e.job.progress = 1.0;
                e.job.error = None;
                e.job.has_result = true;
                e.result = Some(result);
            })
            .is_some())
    }

    async fn fail(&self, id: Uuid, error: &JobError) -> Result<bool, StoreError> {
        Ok(self
            .transition(
                id,
                &[JobStatus::Queued, JobStatus::Running],
                "failed",
                Some(error),
                |e| {
                    e.job.status = JobStatus::Failed;
                    e.job.error = Some(error.clone());
                },
            )
            .is_some())
    }

    async fn retry(&self, id: Uuid, error: &JobError, delay: Duration) -> Result<bool, StoreError> {
        let job = self.transition(id, &[JobStatus::Running], "retrying", Some(error), |e| {
            e.job.status = JobStatus::Queued;
            e.job.error = Some(error.clone());
            e.job.progress = 0.0;
            e.job.stage = None;
        });
        let Some(job) = job else { return Ok(false) };
        if let Some(queue) = job.kind.queue() {
            self.push_later(queue, id, delay);
        }
        Ok(true)
    }

    async fn cancel(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let steps: Vec<Uuid> = {
            let inner = self.inner.lock().unwrap_or_else(poisoned);
            inner
                .jobs
                .values()
                .filter(|e| e.job.parent_id == Some(id) && !e.job.status.is_final())
                .map(|e| e.job.id)
                .collect()
        };
        let active = [JobStatus::Queued, JobStatus::Running];
        for step in steps {
            self.transition(step, &active, "cancelled", None, |e| {
                e.job.status = JobStatus::Cancelled;
            });
        }
        match self.transition(id, &active, "cancelled", None, |e| {
            e.job.status = JobStatus::Cancelled;
        }) {
            Some(job) => Ok(Some(job)),
            None => self.get(id).await,
        }
    }

    async fn status(&self, id: Uuid) -> Result<Option<JobStatus>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(inner.jobs.get(&id).map(|e| e.job.status))
    }

    async fn events_after(&self, id: Uuid, after: u64, limit: usize) -> Result<Vec<JobEvent>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(inner
            .jobs
            .get(&id)
            .map(|e| {
                e.events
                    .iter()
                    .filter(|ev| ev.seq > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn stats(&self, _alive_within: Duration) -> Result<Vec<QueueStats>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(poisoned);
        let workers = self.workers.lock().unwrap_or_else(poisoned).clone();
        let day_ago = Utc::now() - chrono::Duration::hours(24);
        Ok(Queue::ALL
            .into_iter()
            .map(|q| {
                let mut s = QueueStats::empty(q);
                let mut durations = Vec::new();
                for e in inner.jobs.values().filter(|e| e.job.queue == q.as_str()) {
                    match e.job.status {
                        JobStatus::Queued => s.queued += 1,
                        JobStatus::Running => s.running += 1,
                        JobStatus::Succeeded => s.succeeded += 1,
                        JobStatus::Failed => s.failed += 1,
                        JobStatus::Cancelled => s.cancelled += 1,
                    }
                    if e.job.status == JobStatus::Succeeded
                        && let (Some(start), Some(end)) = (e.job.started_at, e.job.finished_at)
                        && end > day_ago
                    {
                        durations.push((end - start).num_microseconds().unwrap_or(0) as f64 / 1_000.0);
                    }
                }
                (s.p50_ms, s.p95_ms) = percentiles(durations);
                s.workers_alive = workers.get(&q).copied().unwrap_or(0);
                s
            })
            .collect())
    }

    async fn sweep(&self, retention: Duration) -> Result<(u64, u64), StoreError> {
        let now = Utc::now();
        let cutoff = now - chrono::Duration::from_std(retention).unwrap_or_default();
        let mut inner = self.inner.lock().unwrap_or_else(poisoned);
        let mut uploads = 0;
        for e in inner.jobs.values_mut() {
            if e.upload.as_ref().is_some_and(|(info, _)| info.expires_at < now) {
                e.upload = None;
                e.job.upload = None;
                uploads += 1;
            }
        }
        let old: Vec<Uuid> = inner
            .jobs
            .values()
            .filter(|e| e.job.parent_id.is_none() && e.job.finished_at.is_some_and(|f| f < cutoff))
            .map(|e| e.job.id)
            .collect();
        let mut jobs = 0;
        for id in old {
            jobs += remove_with_steps(&mut inner, id);
        }
        Ok((uploads, jobs))
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(poisoned);
        Ok(remove_with_steps(&mut inner, id) > 0)
    }

    fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.wake.subscribe()
    }
}

/// Removes a job and its steps; returns how many went.
fn remove_with_steps(inner: &mut Inner, id: Uuid) -> u64 {
    let mut ids: Vec<Uuid> = inner
        .jobs
        .values()
        .filter(|e| e.job.parent_id == Some(id))
        .map(|e| e.job.id)
        .collect();
    ids.push(id);
    let mut removed = 0;
    for id in ids {
        if let Some(e) = inner.jobs.remove(&id) {
            removed += 1;
            if let Some(key) = e.job.idempotency_key {
                inner.idempotency.remove(&(e.job.user_id, key));
            }
        }
    }
    inner.order.retain(|i| inner.jobs.contains_key(i));
    removed
}
