//! The PostgreSQL backend the workers run on: apalis-postgres in everything but its fetch loop.
//! Its queue table and SQL (`apalis.get_jobs`: `FOR UPDATE SKIP LOCKED`), its lock and
//! acknowledge layers, worker registration, heartbeats and re-enqueueing of orphaned jobs are
//! used as they are. Only the poll differs: rc.8's `PgPollFetcher` ignores the configured poll
//! strategy and waits 2 s after the first empty fetch, doubling up to 5 minutes, so a job
//! submitted to an idle worker could wait minutes. Here an idle worker polls every
//! `COACHD_JOBS_POLL_MS`, backing off to `COACHD_JOBS_POLL_MAX_MS`, and fetches again at once
//! after a fetch that found work.

use std::time::Duration;

use apalis_core::backend::{Backend, TaskStream};
use apalis_core::layers::Stack;
use apalis_core::worker::context::WorkerContext;
use apalis_core::worker::ext::ack::AcknowledgeLayer;
use apalis_postgres::{Config, JsonCodec, LockTaskLayer, PgAck, PgContext, PgTask, TaskRow};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;

use super::backend::JobTask;

/// One queue of apalis-postgres, polled by coachd.
#[derive(Debug, Clone)]
pub struct PgQueue {
    pool: PgPool,
    config: Config,
    poll: Duration,
    poll_max: Duration,
}

impl PgQueue {
    /// The queue of `config` on `pool`, polled every `poll` when idle (backing off to `poll_max`).
    pub fn new(pool: PgPool, config: Config, poll: Duration, poll_max: Duration) -> Self {
        PgQueue {
            pool,
            config,
            poll,
            poll_max: poll_max.max(poll),
        }
    }
}

type Row = (
    String,
    Vec<u8>,
    String,
    String,
    i32,
    i32,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<i32>,
    Option<String>,
);

/// Claims up to `count` due entries for `worker` (apalis' own `get_jobs`).
async fn fetch(
    pool: &PgPool,
    config: &Config,
    worker: &str,
    count: usize,
) -> Result<Vec<PgTask<JobTask>>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "select id, job, job_type, status, attempts, max_attempts, run_at, lock_by, priority, idempotency_key \
         from apalis.get_jobs($1, $2, $3)",
    )
    .bind(worker)
    .bind(config.queue().to_string())
    .bind(i32::try_from(count).unwrap_or(i32::MAX))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(
            |(
                id,
                job,
                job_type,
                status,
                attempts,
                max_attempts,
                run_at,
                lock_by,
                priority,
                idempotency_key,
            )| {
                let row = TaskRow {
                    job,
                    id,
                    job_type,
                    status,
                    attempts: usize::try_from(attempts).unwrap_or(0),
                    max_attempts: usize::try_from(max_attempts).ok(),
                    run_at: Some(run_at.unwrap_or_else(Utc::now)),
                    last_result: None,
                    lock_at: None,
                    lock_by,
                    done_at: None,
                    priority: priority.and_then(|p| usize::try_from(p).ok()),
                    metadata: None,
                    idempotency_key,
                };
                row.try_into_task::<JsonCodec<Vec<u8>>, JobTask, _, PgPool>()
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))
            },
        )
        .collect()
}

impl Backend for PgQueue {
    type Args = JobTask;
    type IdType = ulid::Ulid;
    type Context = PgContext;
    type Error = sqlx::Error;
    type Stream = TaskStream<PgTask<JobTask>, sqlx::Error>;
    type Beat = BoxStream<'static, Result<(), sqlx::Error>>;
    type Layer = Stack<LockTaskLayer, AcknowledgeLayer<PgAck>>;

    fn heartbeat(&self, worker: &WorkerContext) -> Self::Beat {
        let keep_alive =
            apalis_postgres::keep_alive_stream(self.pool.clone(), self.config.clone(), worker.clone());
        let reenqueue = apalis_postgres::reenqueue_orphaned_stream(
            self.pool.clone(),
            self.config.clone(),
            *self.config.keep_alive(),
        )
        .map_ok(|_| ());
        futures::stream::select(keep_alive, reenqueue).boxed()
    }

    fn middleware(&self) -> Self::Layer {
        Stack::new(
            LockTaskLayer::new(self.pool.clone()),
            AcknowledgeLayer::new(PgAck::new(self.pool.clone())),
        )
    }

    fn poll(self, worker: &WorkerContext) -> Self::Stream {
        let worker = worker.clone();
        let PgQueue {
            pool,
            config,
            poll,
            poll_max,
        } = self;
        let count = config.buffer_size().max(1);
        async_stream::stream! {
            // Registers the worker and takes up the jobs of dead ones, as apalis' own poll does.
            match apalis_postgres::initial_heartbeat(pool.clone(), config.clone(), worker.clone(), "CoachdPgQueue").await {
                Ok(()) => yield Ok(None),
                Err(e) => yield Err(e),
            }
            let mut delay = poll;
            loop {
                if worker.is_shutting_down() {
                    break;
                }
                match fetch(&pool, &config, worker.name(), count).await {
                    Ok(tasks) if !tasks.is_empty() => {
                        delay = poll;
                        for task in tasks {
                            yield Ok(Some(task));
                        }
                    }
                    Ok(_) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(poll_max);
                        yield Ok(None);
                    }
                    Err(e) => {
                        yield Err(e);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(poll_max);
                    }
                }
            }
        }
        .boxed()
    }
}
