//! The [`JobBackend`] trait: coachd's job records (status, progress, events, uploads, results)
//! together with the queue entries of the engine, so that submitting a job and queueing its run
//! happen in one step (one transaction on PostgreSQL). Two implementations: `pg` (PostgreSQL +
//! apalis-postgres) and `in_process` (memory + apalis' in-memory storage).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Job, JobError, JobEvent, JobInput, JobKind, JobStatus, Queue};
use crate::error::StoreError;

/// What an engine queue entry carries: the id of the coachd job to run. Everything else is read
/// from the job record when the run starts, so a retry or a re-enqueued run sees the latest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTask {
    /// The job.
    pub job_id: Uuid,
}

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Its id (UUID v7).
    pub id: Uuid,
    /// What it does.
    pub kind: JobKind,
    /// Owner.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// The live session it reports to.
    pub session_id: Option<String>,
    /// The kind's options.
    pub options: Value,
    /// Inline text, chain steps.
    pub input: JobInput,
    /// Returns the existing job of the same user and key instead of a second one.
    pub idempotency_key: Option<String>,
    /// The chain it is a step of.
    pub parent_id: Option<Uuid>,
    /// Most runs.
    pub max_attempts: u32,
}

/// An uploaded file.
#[derive(Debug, Clone)]
pub struct Upload {
    /// As the client named it.
    pub filename: Option<String>,
    /// As the client declared it.
    pub content_type: Option<String>,
    /// The bytes.
    pub bytes: Bytes,
}

/// An upload as the job shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadInfo {
    /// As the client named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// As the client declared it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Bytes.
    pub size: u64,
    /// When it is deleted (with the job, if that comes first).
    pub expires_at: DateTime<Utc>,
}

/// The outcome of a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job as recorded.
    pub job: Job,
    /// False when the idempotency key named an existing job, which is returned instead.
    pub created: bool,
}

/// A run handed to a worker: the job and its input.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job, now `running`, with its attempt counted.
    pub job: Job,
    /// Its input.
    pub input: JobInput,
}

/// Which jobs a list shows.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this user's.
    pub user_id: Option<String>,
    /// Only this kind.
    pub kind: Option<JobKind>,
    /// Only this status.
    pub status: Option<JobStatus>,
    /// Only steps of this chain.
    pub parent_id: Option<Uuid>,
    /// Page size.
    pub limit: usize,
    /// Jobs skipped (newest first).
    pub offset: usize,
}

/// One queue's numbers for `GET /api/v1/jobs/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// `extraction`, `transcription` or `llm`.
    pub queue: String,
    /// Jobs waiting.
    pub queued: u64,
    /// Jobs running.
    pub running: u64,
    /// Jobs succeeded (still kept).
    pub succeeded: u64,
    /// Jobs failed (still kept).
    pub failed: u64,
    /// Jobs cancelled (still kept).
    pub cancelled: u64,
    /// Median run time of the jobs succeeded in the last 24 h, first start to finish (ms).
    pub p50_ms: Option<f64>,
    /// 95th percentile of the same (ms).
    pub p95_ms: Option<f64>,
    /// Workers of the queue whose heartbeat is recent, over every process.
    pub workers_alive: u64,
}

impl QueueStats {
    /// A queue with nothing in it.
    pub fn empty(queue: Queue) -> Self {
        QueueStats {
            queue: queue.as_str().to_owned(),
            queued: 0,
            running: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            p50_ms: None,
            p95_ms: None,
            workers_alive: 0,
        }
    }
}

/// Where jobs are recorded and queued.
#[async_trait::async_trait]
pub trait JobBackend: Send + Sync + std::fmt::Debug {
    /// `postgresql` or `in-process`.
    fn name(&self) -> &'static str;

    /// Records a job (with its upload) and queues its first run, in one step. A job of a user
    /// with an idempotency key that user already used is not recorded: the existing one is
    /// returned. A chain parent is recorded as `running` and not queued.
    async fn submit(&self, job: NewJob, upload: Option<Upload>) -> Result<Submitted, StoreError>;

    /// A job.
    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// A job's result (succeeded jobs only).
    async fn result(&self, id: Uuid) -> Result<Option<Value>, StoreError>;

    /// A page of jobs, newest first, and how many match in all.
    async fn list(&self, filter: &JobFilter) -> Result<(Vec<Job>, u64), StoreError>;

    /// A job's upload and its bytes.
    async fn upload(&self, id: Uuid) -> Result<Option<(UploadInfo, Bytes)>, StoreError>;

    /// Starts a run: a `queued` (or, after its worker died, `running`) job becomes `running`
    /// with one more attempt. `None` when the job is gone or already final (cancelled while
    /// queued, say): the queue entry is then dropped.
    async fn claim(&self, id: Uuid, worker: &str) -> Result<Option<Claimed>, StoreError>;

    /// Records progress of a running job; false when it is no longer running (cancelled).
    async fn progress(&self, id: Uuid, progress: f32, stage: Option<&str>) -> Result<bool, StoreError>;

    /// A running job succeeded with `result`; false when it was no longer running.
    async fn succeed(&self, id: Uuid, result: Value) -> Result<bool, StoreError>;

    /// A job failed for good (running, or a queued chain step whose chain failed).
    async fn fail(&self, id: Uuid, error: &JobError) -> Result<bool, StoreError>;

    /// A run failed and another follows after `delay`: the job is `queued` again, with the error
    /// kept as its last, and its next run is queued in the same step.
    async fn retry(&self, id: Uuid, error: &JobError, delay: Duration) -> Result<bool, StoreError>;

    /// Cancels a queued or running job and its unfinished steps; the job after it, or `None` when
    /// it does not exist. A final job is returned unchanged.
    async fn cancel(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// A job's status (the cancel watch of a running job polls it).
    async fn status(&self, id: Uuid) -> Result<Option<JobStatus>, StoreError>;

    /// Events of a job with `seq > after`, oldest first, at most `limit`.
    async fn events_after(&self, id: Uuid, after: u64, limit: usize) -> Result<Vec<JobEvent>, StoreError>;

    /// Per-queue numbers; `alive_within` is how recent a worker's heartbeat must be.
    async fn stats(&self, alive_within: Duration) -> Result<Vec<QueueStats>, StoreError>;

    /// Deletes uploads older than their expiry and finished jobs older than `retention`
    /// (events, uploads and files with them); returns (uploads, jobs) deleted.
    async fn sweep(&self, retention: Duration) -> Result<(u64, u64), StoreError>;

    /// Deletes a job with its steps, events and upload; false when it did not exist.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Woken with a job id whenever this process records an event of that job, so event streams
    /// need not wait for their next poll.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Uuid>;
}

/// The event a state change records, from the job after the change.
pub(crate) fn event_of(job: &Job, seq: u64, name: &str, error: Option<&JobError>) -> JobEvent {
    JobEvent {
        seq,
        job_id: job.id,
        event: name.to_owned(),
        status: job.status,
        progress: job.progress,
        stage: job.stage.clone(),
        attempt: job.attempts,
        error: error.cloned(),
        at: job.updated_at,
    }
}

/// The 50th and 95th percentiles of durations in ms (nearest rank on the sorted values), as
/// PostgreSQL's `percentile_disc` computes them.
pub(crate) fn percentiles(mut ms: Vec<f64>) -> (Option<f64>, Option<f64>) {
    if ms.is_empty() {
        return (None, None);
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = (p * ms.len() as f64).ceil() as usize;
        ms[rank.clamp(1, ms.len()) - 1]
    };
    (Some(at(0.5)), Some(at(0.95)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentiles(vec![]), (None, None));
        assert_eq!(percentiles(vec![5.0]), (Some(5.0), Some(5.0)));
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(v), (Some(50.0), Some(95.0)));
    }
}
