//! One run of a job, as a worker executes it: claim the record (counting the attempt), do the
//! kind's work under a cancel watch, a time limit and a panic guard, then record success, a retry
//! with backoff (queued through the engine, so it survives restarts), or the failure. A chain
//! step that succeeds queues the next step with its output; the last one finishes the chain.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::analyze::{self, AnalyzeDeps};
use super::backend::Claimed;
use super::{
    Job, JobBackend, JobError, JobInput, JobKind, JobStatus, JobsSettings, NewJob, extraction, transcription,
};
use crate::extract::Extractor;
use crate::metric;
use crate::transcribe::Transcriber;

/// Reports a running job's progress.
#[derive(Debug, Clone)]
pub struct Progress {
    backend: Arc<dyn JobBackend>,
    id: Uuid,
}

impl Progress {
    /// Records progress (0–1) and stage. A failure to record is logged, never fatal: progress is
    /// informative, the result is what matters.
    pub async fn report(&self, progress: f32, stage: &str) {
        if let Err(e) = self.backend.progress(self.id, progress, Some(stage)).await {
            tracing::warn!(job_id = %self.id, error = %e, "cannot record job progress");
        }
    }
}

/// Executes job runs for the workers of this process.
#[derive(Debug)]
pub struct Runner {
    backend: Arc<dyn JobBackend>,
    settings: JobsSettings,
    analyze: AnalyzeDeps,
    transcriber: Transcriber,
    extractor: Extractor,
    /// Cancel tokens of the runs in this process, so a cancel here stops them at once (a cancel
    /// on another node is seen by the status watch).
    running: Mutex<HashMap<Uuid, CancellationToken>>,
}

impl Runner {
    /// A runner over the backend.
    pub fn new(
        backend: Arc<dyn JobBackend>,
        settings: JobsSettings,
        analyze: AnalyzeDeps,
        transcriber: Transcriber,
        extractor: Extractor,
    ) -> Self {
        Runner {
            backend,
            settings,
            analyze,
            transcriber,
            extractor,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn JobBackend> {
        &self.backend
    }

    /// Stops the run of `id` if it runs in this process.
    pub fn cancel_local(&self, id: Uuid) {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = running.get(&id) {
            token.cancel();
        }
    }

    /// Runs one queue entry of job `id` on `worker`. Returns an error only when the job failed
    /// for good (the engine records it on its entry); retries and cancellations are `Ok`.
    pub async fn run(&self, id: Uuid, worker: &str) -> Result<(), JobError> {
        let claimed = match self.backend.claim(id, worker).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                tracing::debug!(job_id = %id, "job is final or gone; queue entry dropped");
                return Ok(());
            }
            Err(e) => {
                // The entry is lost with this error; the job would stay queued. Retrying the
                // entry is the engine's business: report it as a failure of this entry.
                tracing::warn!(job_id = %id, error = %e, "cannot claim a job");
                return Err(JobError::transient("store_unavailable", e.to_string()));
            }
        };
        let job = claimed.job.clone();
        tracing::info!(job_id = %id, kind = job.kind.as_str(), attempt = job.attempts, worker, "job started");
        if job.attempts > job.max_attempts {
            // Only runs whose worker died count past the limit (a failed run stops earlier).
            let error = JobError::permanent(
                "worker_lost",
                format!(
                    "the job's worker stopped during each of its {} attempts",
                    job.max_attempts
                ),
            );
            return self.finish_failed(&job, error).await;
        }

        let token = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, token.clone());
        let began = std::time::Instant::now();
        let outcome = self.guarded(&claimed, &token).await;
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let status = match &outcome {
            None => "cancelled",
            Some(Ok(_)) => "succeeded",
            Some(Err(e)) if e.retryable && job.attempts < job.max_attempts => "retrying",
            Some(Err(_)) => "failed",
        };
        metrics::histogram!(metric::JOB_DURATION, "kind" => job.kind.as_str(), "status" => status)
            .record(began.elapsed().as_secs_f64());

        match outcome {
            None => {
                tracing::info!(job_id = %id, "job cancelled while running");
                Ok(())
            }
            Some(Ok(result)) => {
                match self.backend.succeed(id, result.clone()).await {
                    Ok(true) => {
                        tracing::info!(job_id = %id, "job succeeded");
                        self.advance_chain(&job, &claimed.input, &result).await;
                    }
                    Ok(false) => tracing::info!(job_id = %id, "job finished after it was cancelled"),
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "cannot record a job's success");
                        return Err(JobError::transient("store_unavailable", e.to_string()));
                    }
                }
                Ok(())
            }
            Some(Err(error)) if error.retryable && job.attempts < job.max_attempts => {
                let delay = self.settings.retry_delay(job.attempts);
                tracing::info!(
                    job_id = %id,
                    code = %error.code,
                    attempt = job.attempts,
                    delay_ms = delay.as_millis() as u64,
                    "job failed; retrying"
                );
                self.backend
                    .retry(id, &error, delay)
                    .await
                    .map_err(|e| JobError::transient("store_unavailable", e.to_string()))?;
                Ok(())
            }
            Some(Err(error)) => self.finish_failed(&job, error).await,
        }
    }

    async fn finish_failed(&self, job: &Job, error: JobError) -> Result<(), JobError> {
        tracing::info!(job_id = %job.id, code = %error.code, "job failed");
        if let Err(e) = self.backend.fail(job.id, &error).await {
            tracing::warn!(job_id = %job.id, error = %e, "cannot record a job's failure");
        }
        if let Some(parent) = job.parent_id {
            let chained = JobError {
                message: format!("step {} failed: {}", job.kind.as_str(), error.message),
                ..error.clone()
            };
            if let Err(e) = self.backend.fail(parent, &chained).await {
                tracing::warn!(job_id = %parent, error = %e, "cannot record a chain's failure");
            }
        }
        Err(error)
    }

    /// The kind's work, stopped by a cancel (here or, through the status watch, anywhere), by the
    /// run time limit, or by a panic (which fails the job, never the worker). `None` = cancelled.
    async fn guarded(&self, claimed: &Claimed, token: &CancellationToken) -> Option<Result<Value, JobError>> {
        let id = claimed.job.id;
        let watch = async {
            loop {
                tokio::time::sleep(self.settings.cancel_poll).await;
                match self.backend.status(id).await {
                    Ok(Some(JobStatus::Running)) => {}
                    Ok(_) => return,
                    // A store hiccup is no reason to stop a run; look again next time.
                    Err(e) => {
                        tracing::debug!(job_id = %id, error = %e, "cancel watch cannot read the status")
                    }
                }
            }
        };
        let work = AssertUnwindSafe(self.execute(claimed)).catch_unwind();
        tokio::select! {
            r = work => Some(r.unwrap_or_else(|_| {
                tracing::error!(job_id = %id, "job panicked");
                Err(JobError::permanent("job_panicked", "the job failed unexpectedly"))
            })),
            () = token.cancelled() => None,
            () = watch => None,
            () = tokio::time::sleep(self.settings.run_timeout) => Some(Err(JobError::transient(
                "job_timeout",
                format!("the run took longer than {} s", self.settings.run_timeout.as_secs()),
            ))),
        }
    }

    async fn execute(&self, claimed: &Claimed) -> Result<Value, JobError> {
        let job = &claimed.job;
        let progress = Progress {
            backend: self.backend.clone(),
            id: job.id,
        };
        match job.kind {
            JobKind::Analyze => {
                let text = self.text_of(job, &claimed.input).await?;
                analyze::run(
                    &self.analyze,
                    &self.settings,
                    job,
                    &claimed.input,
                    &text,
                    &progress,
                )
                .await
            }
            JobKind::Transcribe => {
                transcription::run(&self.transcriber, self.backend.as_ref(), job, &progress).await
            }
            JobKind::Extract => extraction::run(&self.extractor, self.backend.as_ref(), job, &progress).await,
            JobKind::Noop => noop(job, &claimed.input, &progress).await,
            JobKind::Chain => Err(JobError::permanent("invalid_job", "a chain does not run itself")),
        }
    }

    /// The text a job works on: its inline text, else its upload as UTF-8.
    async fn text_of(&self, job: &Job, input: &JobInput) -> Result<String, JobError> {
        if let Some(text) = &input.text {
            return Ok(text.clone());
        }
        match self.backend.upload(job.id).await? {
            Some((_, bytes)) => String::from_utf8(bytes.to_vec())
                .map_err(|_| JobError::permanent("invalid_text", "the uploaded file is not UTF-8 text")),
            None => Err(JobError::permanent(
                "missing_input",
                "the job has neither text nor an upload (an expired upload is deleted)",
            )),
        }
    }

    /// After a chain step succeeded: queue the next step with this step's text, or finish the chain.
    async fn advance_chain(&self, job: &Job, input: &JobInput, result: &Value) {
        let Some(parent) = job.parent_id else { return };
        let (index, count) = input.step.unwrap_or((0, 1));
        let outcome = match input.steps.split_first() {
            Some((next, rest)) => {
                let text = ["text", "markdown"]
                    .iter()
                    .find_map(|k| result.get(k).and_then(Value::as_str))
                    .map(str::to_owned)
                    .or_else(|| input.text.clone());
                let step = NewJob {
                    id: Uuid::now_v7(),
                    kind: *next,
                    user_id: job.user_id.clone(),
                    coach_id: job.coach_id.clone(),
                    session_id: job.session_id.clone(),
                    options: job.options.clone(),
                    input: JobInput {
                        text,
                        steps: rest.to_vec(),
                        step: Some((index + 1, count)),
                        source: job
                            .kind
                            .produces()
                            .map(str::to_owned)
                            .or_else(|| input.source.clone()),
                    },
                    idempotency_key: None,
                    parent_id: Some(parent),
                    max_attempts: self.settings.max_attempts_of(*next),
                };
                let fraction = (index + 1) as f32 / count.max(1) as f32;
                match self.backend.submit(step, None).await {
                    Ok(_) => self
                        .backend
                        .progress(parent, fraction, Some(next.as_str()))
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            None => self.finish_chain(parent).await,
        };
        if let Err(e) = outcome {
            tracing::warn!(job_id = %parent, error = %e, "cannot advance a chain");
            let error = JobError::transient("store_unavailable", "the chain could not queue its next step");
            let _ = self.backend.fail(parent, &error).await;
        }
    }

    async fn finish_chain(&self, parent: Uuid) -> Result<(), crate::error::StoreError> {
        let filter = super::JobFilter {
            parent_id: Some(parent),
            limit: 1_000,
            ..super::JobFilter::default()
        };
        let (mut steps, _) = self.backend.list(&filter).await?;
        steps.reverse();
        let mut out = Vec::with_capacity(steps.len());
        for s in &steps {
            out.push(json!({
                "job_id": s.id,
                "kind": s.kind,
                "result": self.backend.result(s.id).await?,
            }));
        }
        self.backend.succeed(parent, json!({ "steps": out })).await?;
        Ok(())
    }
}

/// The `noop` kind: waits `sleep_ms` (default 0) in `steps` progress steps, fails with a
/// retryable error while its attempt is at most `fail_attempts`, and returns its input text.
async fn noop(job: &Job, input: &JobInput, progress: &Progress) -> Result<Value, JobError> {
    let opt = |name: &str| job.options.get(name).and_then(Value::as_u64).unwrap_or(0);
    if u64::from(job.attempts) <= opt("fail_attempts") {
        return Err(JobError::transient(
            "noop_failure",
            format!("attempt {} fails as asked", job.attempts),
        ));
    }
    let steps = opt("steps").clamp(1, 100);
    let sleep = std::time::Duration::from_millis(opt("sleep_ms").min(600_000) / steps);
    for i in 0..steps {
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        }
        if steps > 1 {
            progress.report((i + 1) as f32 / steps as f32, "waiting").await;
        }
    }
    Ok(json!({ "text": input.text, "attempt": job.attempts }))
}
