//! The jobs section (`COACHD_JOBS_*`): workers, queues and their concurrency, retries, the
//! engine's polling and heartbeats, upload and text limits, retention; read into
//! [`JobsSettings`], the type the job system takes.

use std::path::PathBuf;

use super::ConfigError;
use super::source::{DAY_SECS, Reader, Source, invalid};
use crate::jobs::{JobsSettings, MaxAttempts, Queue};

/// Parses a comma-separated list of queue names (`COACHD_JOBS_QUEUES`, `coachd worker --queues`).
pub fn parse_queues(raw: &str) -> Result<Vec<Queue>, String> {
    let mut queues = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let q = Queue::parse(name)
            .ok_or_else(|| format!("unknown queue {name:?} (expected extraction, transcription or llm)"))?;
        if !queues.contains(&q) {
            queues.push(q);
        }
    }
    if queues.is_empty() {
        return Err("no queue named".to_owned());
    }
    Ok(queues)
}

/// Reads the section.
pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<JobsSettings, ConfigError> {
    let queues = match r.raw("COACHD_JOBS_QUEUES") {
        None => Queue::ALL.to_vec(),
        Some(raw) => parse_queues(&raw).map_err(|_| {
            invalid(
                "COACHD_JOBS_QUEUES",
                "a comma-separated list of extraction, transcription, llm",
                Some(raw.clone()),
            )
        })?,
    };
    let heartbeat = r.seconds("COACHD_JOBS_HEARTBEAT_SECS", 5, 1, 3_600)?;
    let orphan_after = r.seconds("COACHD_JOBS_ORPHAN_AFTER_SECS", 30, 2, DAY_SECS)?;
    if orphan_after <= heartbeat {
        return Err(invalid(
            "COACHD_JOBS_ORPHAN_AFTER_SECS",
            "more seconds than COACHD_JOBS_HEARTBEAT_SECS (a live worker must not look dead)",
            r.raw("COACHD_JOBS_ORPHAN_AFTER_SECS"),
        ));
    }
    let poll_interval = r.millis("COACHD_JOBS_POLL_MS", 100, 1, 60_000)?;
    let poll_max = r
        .millis("COACHD_JOBS_POLL_MAX_MS", 1_000, 1, 600_000)?
        .max(poll_interval);
    Ok(JobsSettings {
        run_workers: r.boolean("COACHD_JOBS_WORKERS", true)?,
        serve_api: true,
        queues,
        concurrency: [
            r.int("COACHD_JOBS_CONCURRENCY_EXTRACTION", 1, 1, 1_024)?,
            r.int("COACHD_JOBS_CONCURRENCY_TRANSCRIPTION", 2, 1, 1_024)?,
            r.int("COACHD_JOBS_CONCURRENCY_LLM", 4, 1, 1_024)?,
        ],
        max_attempts: MaxAttempts {
            analyze: r.int("COACHD_JOBS_MAX_ATTEMPTS_ANALYZE", 3, 1, 100)?,
            transcribe: r.int("COACHD_JOBS_MAX_ATTEMPTS_TRANSCRIBE", 3, 1, 100)?,
            extract: r.int("COACHD_JOBS_MAX_ATTEMPTS_EXTRACT", 2, 1, 100)?,
            noop: r.int("COACHD_JOBS_MAX_ATTEMPTS_NOOP", 3, 1, 100)?,
        },
        retry_base: r.millis("COACHD_JOBS_RETRY_BASE_MS", 1_000, 0, 3_600_000)?,
        retry_max: r.millis("COACHD_JOBS_RETRY_MAX_MS", 60_000, 0, 86_400_000)?,
        poll_interval,
        poll_max,
        heartbeat,
        orphan_after,
        run_timeout: r.seconds("COACHD_JOBS_TIMEOUT_SECS", 1_800, 1, 7 * DAY_SECS)?,
        cancel_poll: r.millis("COACHD_JOBS_CANCEL_POLL_MS", 500, 10, 600_000)?,
        events_poll: r.millis("COACHD_JOBS_EVENTS_POLL_MS", 250, 10, 600_000)?,
        max_upload_bytes: r.int("COACHD_JOBS_MAX_UPLOAD_BYTES", 25 * 1024 * 1024, 1, 4 << 30)?,
        max_text_chars: r.int("COACHD_JOBS_MAX_TEXT_CHARS", 1_000_000, 1, 100_000_000)?,
        upload_dir: r.raw("COACHD_JOBS_UPLOAD_DIR").map(PathBuf::from),
        upload_ttl: r.seconds("COACHD_JOBS_UPLOAD_TTL_SECS", DAY_SECS, 1, 365 * DAY_SECS)?,
        retention: r.seconds("COACHD_JOBS_RETENTION_SECS", 7 * DAY_SECS, 1, 3_650 * DAY_SECS)?,
        sweep_interval: r.seconds("COACHD_JOBS_SWEEP_SECS", 300, 1, DAY_SECS)?,
        list_max: r.int("COACHD_JOBS_LIST_MAX", 100, 1, 10_000)?,
        embedded_max: r.int("COACHD_JOBS_EMBEDDED_MAX", 10_000, 1, 10_000_000)?,
        enable_noop: r.boolean("COACHD_JOBS_ENABLE_NOOP", false)?,
        memory_chunk_chars: r.int("COACHD_JOBS_MEMORY_CHUNK_CHARS", 1_500, 50, 100_000)?,
        max_memory_chunks: r.int("COACHD_JOBS_MAX_MEMORY_CHUNKS", 200, 1, 100_000)?,
    })
}
