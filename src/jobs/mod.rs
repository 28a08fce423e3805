//! Async jobs (transcription, document extraction, analysis, chains of them) on an existing
//! queue engine: **apalis**, with its PostgreSQL backend when `DATABASE_URL` is set and its
//! in-memory storage when embedded. coachd keeps a table of its own (`coachd_jobs`, plus events and
//! uploads) for what the job API shows; apalis owns the queue: fetching with `SKIP LOCKED`, worker
//! registration and heartbeats, and re-enqueueing the jobs of a worker whose heartbeat stopped.
//!
//! Engine choice (checked 2026-12-02): apalis-postgres 1.0.0 and 1.0.0-rc.9 depend on sqlx 0.9,
//! which would put a second sqlx (and a second connection pool) next to ours. apalis-postgres
//! 1.0.0-rc.8 is the last release of the 1.0 line on sqlx 0.8 (`cargo tree -d` shows one sqlx);
//! it pairs with apalis, apalis-core and apalis-sql 1.0.0-rc.9 and apalis-codec 0.1.0-rc.9, all
//! pinned with `=` in Cargo.toml. graphile_worker was not needed.
//!
//! - [`backend`]: the [`JobBackend`] trait: submit (job row + queue entry in one transaction),
//!   read, claim, progress, finish, retry, cancel, events, uploads, stats;
//!   [`pg`] and [`in_process`] implement it.
//! - [`engine`]: the apalis workers, one per queue with its own concurrency, and their shutdown;
//!   [`poller`]: apalis-postgres' backend with a fetch loop whose idle poll is bounded.
//! - [`runner`]: one job run: claim, the kind's work under a cancel watch and a time limit,
//!   retries with backoff, chains of child jobs.
//! - [`analyze`]: the `analyze` kind: notes, insights, coach memories.
//! - [`transcription`]: the `transcribe` kind, on `transcribe::Transcriber`; [`extraction`]: the
//!   `extract` kind, on `extract::Extractor`.

pub mod analyze;
pub mod backend;
pub mod engine;
pub mod extraction;
pub mod in_process;
pub mod pg;
pub mod poller;
pub mod runner;
pub mod transcription;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use backend::{JobBackend, JobFilter, NewJob, QueueStats, Submitted, Upload, UploadInfo};
pub use engine::Workers;
pub use runner::Runner;

/// A kind of work a queue holds; each has its own workers and concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Queue {
    /// Document extraction (CPU-bound parsers).
    Extraction,
    /// Speech to text (an upstream API).
    Transcription,
    /// LLM work: analysis.
    Llm,
}

impl Queue {
    /// Every queue.
    pub const ALL: [Queue; 3] = [Queue::Extraction, Queue::Transcription, Queue::Llm];

    /// The name in settings, the API and the stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Extraction => "extraction",
            Queue::Transcription => "transcription",
            Queue::Llm => "llm",
        }
    }

    /// The queue named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Queue::ALL.into_iter().find(|q| q.as_str() == s)
    }

    /// apalis' queue name (`apalis.jobs.job_type`).
    pub fn engine_name(self) -> String {
        format!("coachd::{}", self.as_str())
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A transcript or document text → notes, insights and coach memories.
    Analyze,
    /// A recording → a transcript with timed segments (`transcribe::Transcriber`).
    Transcribe,
    /// A document → Markdown with its page or section structure (`extract::Extractor`).
    Extract,
    /// A parent of child jobs run one after another (`then` in the request); runs nothing itself.
    Chain,
    /// Does nothing but wait and report progress (`COACHD_JOBS_ENABLE_NOOP`): tests and the
    /// queue benchmark use it to measure the engine itself.
    Noop,
}

impl JobKind {
    /// Every kind.
    pub const ALL: [JobKind; 5] = [
        JobKind::Analyze,
        JobKind::Transcribe,
        JobKind::Extract,
        JobKind::Chain,
        JobKind::Noop,
    ];

    /// The name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Analyze => "analyze",
            JobKind::Transcribe => "transcribe",
            JobKind::Extract => "extract",
            JobKind::Chain => "chain",
            JobKind::Noop => "noop",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The option names the kind reads (a submission naming one no kind of its chain reads is
    /// refused).
    pub fn options(self) -> &'static [&'static str] {
        match self {
            JobKind::Analyze => &["store_notes", "store_memories", "insights", "source"],
            JobKind::Transcribe => &["language", "prompt", "model"],
            JobKind::Extract => &[],
            JobKind::Noop => &["sleep_ms", "steps", "fail_attempts"],
            JobKind::Chain => &[],
        }
    }

    /// What a step of this kind hands to the next one of its chain as `source`.
    pub fn produces(self) -> Option<&'static str> {
        match self {
            JobKind::Transcribe => Some("transcript"),
            JobKind::Extract => Some("document"),
            _ => None,
        }
    }

    /// The queue its runs go to; `None` for a chain, which never runs itself.
    pub fn queue(self) -> Option<Queue> {
        match self {
            JobKind::Analyze | JobKind::Noop => Some(Queue::Llm),
            JobKind::Transcribe => Some(Queue::Transcription),
            JobKind::Extract => Some(Queue::Extraction),
            JobKind::Chain => None,
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker (also between retries).
    Queued,
    /// A worker runs it.
    Running,
    /// Done; its result is ready.
    Succeeded,
    /// Gave up; `error` says why.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobStatus {
    /// Every status.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The name in the API and the table.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// The status named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        JobStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Why a job (or one attempt of it) failed, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct JobError {
    /// Stable machine-readable code, e.g. `upstream_rate_limited`, `invalid_input`.
    pub code: String,
    /// Human-readable, safe to show.
    pub message: String,
    /// Whether another attempt may succeed (the runner retries those while attempts remain).
    pub retryable: bool,
}

impl JobError {
    /// A failure another attempt cannot fix.
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        JobError {
            code: code.to_owned(),
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure another attempt may not see.
    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        JobError {
            code: code.to_owned(),
            message: message.into(),
            retryable: true,
        }
    }
}

impl From<crate::llm::LlmError> for JobError {
    fn from(e: crate::llm::LlmError) -> Self {
        let err = crate::error::Error::from(e);
        JobError {
            code: err.code().to_owned(),
            message: err.to_string(),
            retryable: err.retryable(),
        }
    }
}

impl From<crate::error::StoreError> for JobError {
    fn from(e: crate::error::StoreError) -> Self {
        let err = crate::error::Error::from(e);
        JobError {
            code: err.code().to_owned(),
            message: err.to_string(),
            retryable: err.retryable(),
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// Time-ordered id (UUID v7).
    pub id: Uuid,
    /// What it does.
    pub kind: JobKind,
    /// The queue it runs on (`chain` for a parent).
    pub queue: String,
    /// Owner.
    pub user_id: String,
    /// Coach whose memories it may fill.
    pub coach_id: String,
    /// The live session it reports to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Where it is.
    pub status: JobStatus,
    /// 0 to 1.
    pub progress: f32,
    /// What it is doing now, e.g. `notes`, `insights`, `memories`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Runs started so far.
    pub attempts: u32,
    /// Most runs it may take.
    pub max_attempts: u32,
    /// The kind's options as submitted.
    pub options: Value,
    /// The last error (kept when a retry follows, and on the failed job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The submitter's idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The chain this job is a step of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    /// The uploaded file, if any (its bytes are not part of the job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadInfo>,
    /// Submitted.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// First run started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Reached its final status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Whether a result can be fetched (`GET /api/v1/jobs/{id}/result`).
    pub has_result: bool,
}

/// The input of a job besides its upload: inline text, or (for a chain step) where it comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobInput {
    /// Inline text (JSON submissions, chain steps fed by the previous step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For a chain: the kinds still to run after the current step, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<JobKind>,
    /// For a chain step: which step it is (0-based) and how many there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<(u32, u32)>,
    /// What the text is (`transcript` or `document`): the memory type of its chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One event of a job, as its SSE stream and its session's `job` events carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Monotonic per job, from 1: the SSE `id:`.
    pub seq: u64,
    /// The job.
    pub job_id: Uuid,
    /// `queued`, `started`, `progress`, `retrying`, `succeeded`, `failed` or `cancelled`.
    pub event: String,
    /// The job's status after the event.
    pub status: JobStatus,
    /// 0 to 1.
    pub progress: f32,
    /// Stage, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The run this event belongs to (1-based; 0 before the first).
    pub attempt: u32,
    /// The error of a `failed` or `retrying` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// When.
    pub at: DateTime<Utc>,
}

/// Settings of the job system (`COACHD_JOBS_*`), read by `config::jobs`.
#[derive(Debug, Clone)]
pub struct JobsSettings {
    /// `COACHD_JOBS_WORKERS`: whether `coachd serve` runs workers in-process (default true).
    pub run_workers: bool,
    /// Whether the HTTP API is served: false in `coachd worker`, which serves health only.
    pub serve_api: bool,
    /// `COACHD_JOBS_QUEUES` (or `coachd worker --queues`): the queues this process's workers take.
    pub queues: Vec<Queue>,
    /// `COACHD_JOBS_CONCURRENCY_EXTRACTION`, `_TRANSCRIPTION`, `_LLM`: jobs run at once per queue
    /// per process.
    pub concurrency: [usize; 3],
    /// `COACHD_JOBS_MAX_ATTEMPTS_ANALYZE`, `_NOOP` (and the extraction and transcription kinds'):
    /// most runs of one job.
    pub max_attempts: MaxAttempts,
    /// `COACHD_JOBS_RETRY_BASE_MS`: first retry delay, doubled per attempt.
    pub retry_base: Duration,
    /// `COACHD_JOBS_RETRY_MAX_MS`: longest retry delay.
    pub retry_max: Duration,
    /// `COACHD_JOBS_POLL_MS`: how often an idle worker asks PostgreSQL for work.
    pub poll_interval: Duration,
    /// `COACHD_JOBS_POLL_MAX_MS`: longest poll interval an idle worker backs off to.
    pub poll_max: Duration,
    /// `COACHD_JOBS_HEARTBEAT_SECS`: a worker's heartbeat interval.
    pub heartbeat: Duration,
    /// `COACHD_JOBS_ORPHAN_AFTER_SECS`: a worker silent this long is dead; its jobs run again.
    pub orphan_after: Duration,
    /// `COACHD_JOBS_TIMEOUT_SECS`: longest run of one attempt.
    pub run_timeout: Duration,
    /// `COACHD_JOBS_CANCEL_POLL_MS`: how often a running job checks whether it was cancelled on
    /// another node.
    pub cancel_poll: Duration,
    /// `COACHD_JOBS_EVENTS_POLL_MS`: how often an event stream looks for new events written by
    /// another process.
    pub events_poll: Duration,
    /// `COACHD_JOBS_MAX_UPLOAD_BYTES`: largest upload (default 25 MB).
    pub max_upload_bytes: usize,
    /// `COACHD_JOBS_MAX_TEXT_CHARS`: longest inline text.
    pub max_text_chars: usize,
    /// `COACHD_JOBS_UPLOAD_DIR`: keep uploads in this directory instead of PostgreSQL.
    pub upload_dir: Option<std::path::PathBuf>,
    /// `COACHD_JOBS_UPLOAD_TTL_SECS`: how long an upload is kept (it goes earlier with its job).
    pub upload_ttl: Duration,
    /// `COACHD_JOBS_RETENTION_SECS`: finished jobs (with events and uploads) are deleted after this.
    pub retention: Duration,
    /// `COACHD_JOBS_SWEEP_SECS`: interval of the sweep of expired uploads and old jobs.
    pub sweep_interval: Duration,
    /// `COACHD_JOBS_LIST_MAX`: largest page of `GET /api/v1/jobs`.
    pub list_max: usize,
    /// `COACHD_JOBS_EMBEDDED_MAX`: most jobs the in-process backend keeps (oldest finished go first).
    pub embedded_max: usize,
    /// `COACHD_JOBS_ENABLE_NOOP`: accept the `noop` kind (tests, benchmarks).
    pub enable_noop: bool,
    /// `COACHD_JOBS_MEMORY_CHUNK_CHARS`: size of the text chunks stored as coach memories.
    pub memory_chunk_chars: usize,
    /// `COACHD_JOBS_MAX_MEMORY_CHUNKS`: most chunks one analysis stores.
    pub max_memory_chunks: usize,
}

/// Most runs of one job, per kind.
#[derive(Debug, Clone, Copy)]
pub struct MaxAttempts {
    /// `analyze`.
    pub analyze: u32,
    /// `transcribe`.
    pub transcribe: u32,
    /// `extract`.
    pub extract: u32,
    /// `noop`.
    pub noop: u32,
}

impl JobsSettings {
    /// The concurrency of a queue.
    pub fn concurrency_of(&self, queue: Queue) -> usize {
        match queue {
            Queue::Extraction => self.concurrency[0],
            Queue::Transcription => self.concurrency[1],
            Queue::Llm => self.concurrency[2],
        }
    }

    /// The most runs of a kind.
    pub fn max_attempts_of(&self, kind: JobKind) -> u32 {
        match kind {
            JobKind::Analyze => self.max_attempts.analyze,
            JobKind::Transcribe => self.max_attempts.transcribe,
            JobKind::Extract => self.max_attempts.extract,
            JobKind::Noop => self.max_attempts.noop,
            JobKind::Chain => 1,
        }
    }

    /// The delay before run `attempt + 1` after run `attempt` failed.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

impl Default for JobsSettings {
    fn default() -> Self {
        JobsSettings {
            run_workers: true,
            serve_api: true,
            queues: Queue::ALL.to_vec(),
            concurrency: [1, 2, 4],
            max_attempts: MaxAttempts {
                analyze: 3,
                transcribe: 3,
                extract: 2,
                noop: 3,
            },
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            poll_interval: Duration::from_millis(100),
            poll_max: Duration::from_millis(1_000),
            heartbeat: Duration::from_secs(5),
            orphan_after: Duration::from_secs(30),
            run_timeout: Duration::from_secs(1_800),
            cancel_poll: Duration::from_millis(500),
            events_poll: Duration::from_millis(250),
            max_upload_bytes: 25 * 1024 * 1024,
            max_text_chars: 1_000_000,
            upload_dir: None,
            upload_ttl: Duration::from_secs(86_400),
            retention: Duration::from_secs(7 * 86_400),
            sweep_interval: Duration::from_secs(300),
            list_max: 100,
            embedded_max: 10_000,
            enable_noop: false,
            memory_chunk_chars: 1_500,
            max_memory_chunks: 200,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for q in Queue::ALL {
            assert_eq!(Queue::parse(q.as_str()), Some(q));
        }
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobKind::parse("resize"), None);
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let s = JobsSettings {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(350),
            ..JobsSettings::default()
        };
        assert_eq!(s.retry_delay(1), Duration::from_millis(100));
        assert_eq!(s.retry_delay(2), Duration::from_millis(200));
        assert_eq!(s.retry_delay(3), Duration::from_millis(350));
        assert_eq!(s.retry_delay(40), Duration::from_millis(350));
    }
}
