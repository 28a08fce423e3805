//! The PostgreSQL [`JobBackend`]: job records in `coachd_jobs` (events in `coachd_job_events`,
//! uploads in `coachd_job_uploads` or a directory), and each run queued in apalis-postgres'
//! `apalis.jobs` inside the same transaction that records the job or its retry, so a job is never
//! recorded without its queue entry nor queued without its record.

use std::path::PathBuf;
use std::time::Duration;

use apalis_core::task::Task;
use apalis_postgres::{Config, PgContext, PgTask};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::backend::{Claimed, JobTask, event_of};
use super::{
    Job, JobBackend, JobError, JobEvent, JobFilter, JobInput, JobKind, JobStatus, NewJob, Queue, QueueStats,
    Submitted, Upload, UploadInfo,
};
use crate::error::StoreError;

/// The columns of a [`Job`], with its upload's.
const JOB_COLUMNS: &str = "j.id, j.kind, j.queue, j.user_id, j.coach_id, j.session_id, j.status, j.progress, \
     j.stage, j.attempts, j.max_attempts, j.options, j.error, j.idempotency_key, j.parent_id, j.created_at, \
     j.updated_at, j.started_at, j.finished_at, (j.result is not null) as has_result, u.filename as up_filename, \
     u.content_type as up_content_type, u.size as up_size, u.expires_at as up_expires_at \
     from coachd_jobs j left join coachd_job_uploads u on u.job_id = j.id";

const PGCRYPTO: &str = "CREATE EXTENSION IF NOT EXISTS pgcrypto;";

const PGCRYPTO_IF_AVAILABLE: &str = "DO $pgcrypto$ BEGIN \
     IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgcrypto') THEN \
     CREATE EXTENSION IF NOT EXISTS pgcrypto; END IF; END $pgcrypto$;";

/// A fixed list of migrations as a sqlx migration source.
#[derive(Debug)]
struct Migrations(Vec<sqlx::migrate::Migration>);

impl<'s> sqlx::migrate::MigrationSource<'s> for Migrations {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<'s, Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

/// Jobs and their queue on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgJobBackend {
    pool: PgPool,
    upload_dir: Option<PathBuf>,
    upload_ttl: Duration,
    wake: broadcast::Sender<Uuid>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    queue: String,
    user_id: String,
    coach_id: String,
    session_id: Option<String>,
    status: String,
    progress: f32,
    stage: Option<String>,
    attempts: i32,
    max_attempts: i32,
    options: Value,
    error: Option<Value>,
    idempotency_key: Option<String>,
    parent_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    has_result: bool,
    up_filename: Option<String>,
    up_content_type: Option<String>,
    up_size: Option<i64>,
    up_expires_at: Option<DateTime<Utc>>,
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Internal {
        backend: "postgresql",
        reason: format!("coachd_jobs holds an unknown {what} {value:?}"),
    }
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        let upload = match (r.up_size, r.up_expires_at) {
            (Some(size), Some(expires_at)) => Some(UploadInfo {
                filename: r.up_filename,
                content_type: r.up_content_type,
                size: u64::try_from(size).unwrap_or(0),
                expires_at,
            }),
            _ => None,
        };
        Ok(Job {
            id: r.id,
            kind: JobKind::parse(&r.kind).ok_or_else(|| corrupt("kind", &r.kind))?,
            queue: r.queue,
            user_id: r.user_id,
            coach_id: r.coach_id,
            session_id: r.session_id,
            status: JobStatus::parse(&r.status).ok_or_else(|| corrupt("status", &r.status))?,
            progress: r.progress,
            stage: r.stage,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            max_attempts: u32::try_from(r.max_attempts).unwrap_or(0),
            options: r.options,
            error: r.error.and_then(|e| serde_json::from_value(e).ok()),
            idempotency_key: r.idempotency_key,
            parent_id: r.parent_id,
            upload,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            has_result: r.has_result,
        })
    }
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Internal {
        backend: "upload directory",
        reason: e.to_string(),
    }
}

impl PgJobBackend {
    /// A backend on the pool; uploads go to `upload_dir` when set, into the table otherwise.
    pub fn new(pool: PgPool, upload_dir: Option<PathBuf>, upload_ttl: Duration) -> Self {
        let (wake, _) = broadcast::channel(1_024);
        PgJobBackend {
            pool,
            upload_dir,
            upload_ttl,
            wake,
        }
    }

    /// Sets up apalis-postgres' schema (`apalis`), with its own migrations. They share
    /// `_sqlx_migrations` with coachd's, so each migrator ignores the other's entries.
    ///
    /// Two of them start with `CREATE EXTENSION IF NOT EXISTS pgcrypto`, for a SQL function
    /// (`apalis.push_job`, via `generate_ulid`) that apalis' Rust code never calls: it makes its
    /// ids itself. Servers without pgcrypto (a bare PostgreSQL build without contrib) would fail
    /// there, so that statement runs only where the extension is available. The checksums stay
    /// apalis' own, so a database apalis migrated by itself validates unchanged.
    pub async fn setup(pool: &PgPool) -> Result<(), StoreError> {
        let setup_error = |e: String| StoreError::Internal {
            backend: "postgresql",
            reason: format!("apalis migrations: {e}"),
        };
        let patched: Vec<sqlx::migrate::Migration> = apalis_postgres::PostgresStorage::migrations()
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.sql.contains(PGCRYPTO) {
                    m.sql = m.sql.replace(PGCRYPTO, PGCRYPTO_IF_AVAILABLE).into();
                }
                m
            })
            .collect();
        let mut migrator = sqlx::migrate::Migrator::new(Migrations(patched))
            .await
            .map_err(|e| setup_error(e.to_string()))?;
        migrator.set_ignore_missing(true);
        migrator.run(pool).await.map_err(|e| setup_error(e.to_string()))
    }

    async fn fetch(&self, tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(&format!("select {JOB_COLUMNS} where j.id = $1"))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        row.map(Job::try_from).transpose()
    }

    /// Records the event of a state change that set `event_seq` to `seq`.
    async fn record(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: Uuid,
        seq: i64,
        name: &str,
        error: Option<&JobError>,
    ) -> Result<Option<Job>, StoreError> {
        let Some(job) = self.fetch(tx, id).await? else {
            return Ok(None);
        };
        let event = event_of(&job, u64::try_from(seq).unwrap_or(0), name, error);
        sqlx::query("insert into coachd_job_events (job_id, seq, event) values ($1, $2, $3)")
            .bind(id)
            .bind(seq)
            .bind(sqlx::types::Json(&event))
            .execute(&mut **tx)
            .await?;
        Ok(Some(job))
    }

    /// Queues a run of `id` on `queue` after `delay`, inside `tx`.
    async fn enqueue(
        tx: &mut Transaction<'_, Postgres>,
        queue: Queue,
        id: Uuid,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let args = serde_json::to_vec(&JobTask { job_id: id }).map_err(|e| StoreError::Internal {
            backend: "postgresql",
            reason: e.to_string(),
        })?;
        // One engine attempt per queue entry: coachd counts attempts itself and queues each retry
        // as a new entry with its backoff (`run_after`), which apalis' own retry does not delay.
        let task: PgTask<Vec<u8>> = Task::builder(args)
            .with_ctx(PgContext::new().with_max_attempts(1))
            .run_after(delay)
            .build();
        apalis_postgres::sink::push_tasks(&mut **tx, Config::new(&queue.engine_name()), vec![task]).await?;
        Ok(())
    }

    fn woke(&self, id: Uuid) {
        // No receiver is fine: nobody follows this job in this process.
        let _ = self.wake.send(id);
    }

    /// Runs a guarded state change (`sql` sets the new state and bumps `event_seq`, binding the
    /// id as $1, and returns `event_seq`), records its event, and commits.
    async fn transition(
        &self,
        sql: &str,
        id: Uuid,
        binds: impl FnOnce(
            sqlx::query::QueryScalar<'_, Postgres, i64, sqlx::postgres::PgArguments>,
        ) -> sqlx::query::QueryScalar<'_, Postgres, i64, sqlx::postgres::PgArguments>,
        name: &str,
        error: Option<&JobError>,
        requeue: Option<(Queue, Duration)>,
    ) -> Result<Option<Job>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq: Option<i64> = binds(sqlx::query_scalar(sql).bind(id))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(seq) = seq else {
            return Ok(None);
        };
        if let Some((queue, delay)) = requeue {
            Self::enqueue(&mut tx, queue, id, delay).await?;
        }
        let job = self.record(&mut tx, id, seq, name, error).await?;
        tx.commit().await?;
        self.woke(id);
        Ok(job)
    }
}

#[async_trait::async_trait]
impl JobBackend for PgJobBackend {
    fn name(&self) -> &'static str {
        "postgresql"
    }

    async fn submit(&self, new: NewJob, upload: Option<Upload>) -> Result<Submitted, StoreError> {
        let queue = new.kind.queue();
        let status = if queue.is_some() {
            JobStatus::Queued
        } else {
            JobStatus::Running
        };
        let mut tx = self.pool.begin().await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "insert into coachd_jobs (id, kind, queue, user_id, coach_id, session_id, status, max_attempts, \
               options, input, idempotency_key, parent_id, event_seq, started_at) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, \
               case when $7 = 'running' then now() end) \
             on conflict (user_id, idempotency_key) where idempotency_key is not null do nothing \
             returning event_seq",
        )
        .bind(new.id)
        .bind(new.kind.as_str())
        .bind(queue.map_or("chain", Queue::as_str))
        .bind(&new.user_id)
        .bind(&new.coach_id)
        .bind(&new.session_id)
        .bind(status.as_str())
        .bind(to_i32(new.max_attempts))
        .bind(&new.options)
        .bind(sqlx::types::Json(&new.input))
        .bind(&new.idempotency_key)
        .bind(new.parent_id)
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            tx.rollback().await?;
            let existing: Option<JobRow> = sqlx::query_as(&format!(
                "select {JOB_COLUMNS} where j.user_id = $1 and j.idempotency_key = $2"
            ))
            .bind(&new.user_id)
            .bind(&new.idempotency_key)
            .fetch_optional(&self.pool)
            .await?;
            let job = existing
                .map(Job::try_from)
                .transpose()?
                .ok_or_else(|| StoreError::Internal {
                    backend: "postgresql",
                    reason: "idempotency conflict without an existing job".to_owned(),
                })?;
            return Ok(Submitted { job, created: false });
        }

        let mut written: Option<PathBuf> = None;
        if let Some(up) = upload {
            let expires_at = Utc::now() + chrono::Duration::from_std(self.upload_ttl).unwrap_or_default();
            let (data, path) = match &self.upload_dir {
                Some(dir) => {
                    let file = dir.join(new.id.to_string());
                    tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
                    tokio::fs::write(&file, &up.bytes).await.map_err(io_error)?;
                    written = Some(file);
                    (None, Some(new.id.to_string()))
                }
                None => (Some(up.bytes.to_vec()), None),
            };
            let stored = sqlx::query(
                "insert into coachd_job_uploads (job_id, filename, content_type, size, data, path, expires_at) \
                 values ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(new.id)
            .bind(&up.filename)
            .bind(&up.content_type)
            .bind(to_i64(up.bytes.len()))
            .bind(data)
            .bind(path)
            .bind(expires_at)
            .execute(&mut *tx)
            .await;
            if let Err(e) = stored {
                if let Some(file) = &written {
                    let _ = tokio::fs::remove_file(file).await;
                }
                return Err(e.into());
            }
        }
        let outcome = async {
            if let Some(queue) = queue {
                Self::enqueue(&mut tx, queue, new.id, Duration::ZERO).await?;
            }
            let job = self
                .record(&mut tx, new.id, 1, status.as_str(), None)
                .await?
                .ok_or_else(|| StoreError::Internal {
                    backend: "postgresql",
                    reason: "a job vanished inside its own transaction".to_owned(),
                })?;
            tx.commit().await?;
            Ok::<Job, StoreError>(job)
        }
        .await;
        match outcome {
            Ok(job) => {
                self.woke(job.id);
                Ok(Submitted { job, created: true })
            }
            Err(e) => {
                if let Some(file) = &written {
                    let _ = tokio::fs::remove_file(file).await;
                }
                Err(e)
            }
        }
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(&format!("select {JOB_COLUMNS} where j.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Job::try_from).transpose()
    }

    async fn result(&self, id: Uuid) -> Result<Option<Value>, StoreError> {
        Ok(
            sqlx::query_scalar("select result from coachd_jobs where id = $1 and status = 'succeeded'")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    async fn list(&self, f: &JobFilter) -> Result<(Vec<Job>, u64), StoreError> {
        let condition = "($1::text is null or j.user_id = $1) and ($2::text is null or j.kind = $2) \
                         and ($3::text is null or j.status = $3) and ($4::uuid is null or j.parent_id = $4)";
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "select {JOB_COLUMNS} where {condition} order by j.created_at desc, j.id desc limit $5 offset $6"
        ))
        .bind(&f.user_id)
        .bind(f.kind.map(JobKind::as_str))
        .bind(f.status.map(JobStatus::as_str))
        .bind(f.parent_id)
        .bind(to_i64(f.limit))
        .bind(to_i64(f.offset))
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar(&format!("select count(*) from coachd_jobs j where {condition}"))
            .bind(&f.user_id)
            .bind(f.kind.map(JobKind::as_str))
            .bind(f.status.map(JobStatus::as_str))
            .bind(f.parent_id)
            .fetch_one(&self.pool)
            .await?;
        let jobs = rows
            .into_iter()
            .map(Job::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((jobs, u64::try_from(total).unwrap_or(0)))
    }

    async fn upload(&self, id: Uuid) -> Result<Option<(UploadInfo, Bytes)>, StoreError> {
        type Row = (
            Option<String>,
            Option<String>,
            i64,
            DateTime<Utc>,
            Option<Vec<u8>>,
            Option<String>,
        );
        let row: Option<Row> = sqlx::query_as(
            "select filename, content_type, size, expires_at, data, path from coachd_job_uploads where job_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((filename, content_type, size, expires_at, data, path)) = row else {
            return Ok(None);
        };
        let bytes = match (data, path, &self.upload_dir) {
            (Some(data), _, _) => Bytes::from(data),
            (None, Some(path), Some(dir)) => {
                Bytes::from(tokio::fs::read(dir.join(path)).await.map_err(io_error)?)
            }
            _ => return Ok(None),
        };
        let info = UploadInfo {
            filename,
            content_type,
            size: u64::try_from(size).unwrap_or(0),
            expires_at,
        };
        Ok(Some((info, bytes)))
    }

    async fn claim(&self, id: Uuid, worker: &str) -> Result<Option<Claimed>, StoreError> {
        let job = self
            .transition(
                "update coachd_jobs set status = 'running', attempts = attempts + 1, worker = $2, \
                   started_at = coalesce(started_at, now()), updated_at = now(), event_seq = event_seq + 1 \
                 where id = $1 and status in ('queued', 'running') returning event_seq",
                id,
                |q| q.bind(worker.to_owned()),
                "started",
                None,
                None,
            )
            .await?;
        let Some(job) = job else {
            return Ok(None);
        };
        let input: Option<sqlx::types::Json<JobInput>> =
            sqlx::query_scalar("select input from coachd_jobs where id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(Some(Claimed {
            job,
            input: input.map(|j| j.0).unwrap_or_default(),
        }))
    }

    async fn progress(&self, id: Uuid, progress: f32, stage: Option<&str>) -> Result<bool, StoreError> {
        let stage = stage.map(str::to_owned);
        let job = self
            .transition(
                "update coachd_jobs set progress = $2, stage = coalesce($3, stage), updated_at = now(), \
                   event_seq = event_seq + 1 \
                 where id = $1 and status = 'running' returning event_seq",
                id,
                |q| q.bind(progress.clamp(0.0, 1.0)).bind(stage),
                "progress",
                None,
                None,
            )
            .await?;
        Ok(job.is_some())
    }

    async fn succeed(&self, id: Uuid, result: Value) -> Result<bool, StoreError> {
        let job = self
            .transition(
                "update coachd_jobs set status = 'succeeded', progress = 1, result = $2, error = null, \
                   finished_at = now(), updated_at = now(), event_seq = event_seq + 1 \
                 where id = $1 and status = 'running' returning event_seq",
                id,
                |q| q.bind(result),
                "succeeded",
                None,
                None,
            )
            .await?;
        Ok(job.is_some())
    }

    async fn fail(&self, id: Uuid, error: &JobError) -> Result<bool, StoreError> {
        let json = serde_json::to_value(error).unwrap_or(Value::Null);
        let job = self
            .transition(
                "update coachd_jobs set status = 'failed', error = $2, finished_at = now(), updated_at = now(), \
                   event_seq = event_seq + 1 \
                 where id = $1 and status in ('queued', 'running') returning event_seq",
                id,
                |q| q.bind(json),
                "failed",
                Some(error),
                None,
            )
            .await?;
        Ok(job.is_some())
    }

    async fn retry(&self, id: Uuid, error: &JobError, delay: Duration) -> Result<bool, StoreError> {
        let queue: Option<String> = sqlx::query_scalar("select queue from coachd_jobs where id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(queue) = queue.as_deref().and_then(Queue::parse) else {
            return Ok(false);
        };
        let json = serde_json::to_value(error).unwrap_or(Value::Null);
        let job = self
            .transition(
                "update coachd_jobs set status = 'queued', error = $2, progress = 0, stage = null, worker = null, \
                   updated_at = now(), event_seq = event_seq + 1 \
                 where id = $1 and status = 'running' returning event_seq",
                id,
                |q| q.bind(json),
                "retrying",
                Some(error),
                Some((queue, delay)),
            )
            .await?;
        Ok(job.is_some())
    }

    async fn cancel(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let steps: Vec<Uuid> = sqlx::query_scalar(
            "select id from coachd_jobs where parent_id = $1 and status in ('queued', 'running')",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let sql = "update coachd_jobs set status = 'cancelled', finished_at = now(), updated_at = now(), \
                     event_seq = event_seq + 1 \
                   where id = $1 and status in ('queued', 'running') returning event_seq";
        for step in steps {
            self.transition(sql, step, |q| q, "cancelled", None, None).await?;
        }
        match self.transition(sql, id, |q| q, "cancelled", None, None).await? {
            Some(job) => Ok(Some(job)),
            None => self.get(id).await,
        }
    }

    async fn status(&self, id: Uuid) -> Result<Option<JobStatus>, StoreError> {
        let s: Option<String> = sqlx::query_scalar("select status from coachd_jobs where id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(s.as_deref().and_then(JobStatus::parse))
    }

    async fn events_after(&self, id: Uuid, after: u64, limit: usize) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Vec<sqlx::types::Json<JobEvent>> = sqlx::query_scalar(
            "select event from coachd_job_events where job_id = $1 and seq > $2 order by seq limit $3",
        )
        .bind(id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(to_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|j| j.0).collect())
    }

    async fn stats(&self, alive_within: Duration) -> Result<Vec<QueueStats>, StoreError> {
        let counts: Vec<(String, String, i64)> =
            sqlx::query_as("select queue, status, count(*) from coachd_jobs group by queue, status")
                .fetch_all(&self.pool)
                .await?;
        let durations: Vec<(String, Option<f64>, Option<f64>)> = sqlx::query_as(
            "select queue, \
               percentile_disc(0.5) within group (order by (extract(epoch from finished_at - started_at) * 1000)::float8), \
               percentile_disc(0.95) within group (order by (extract(epoch from finished_at - started_at) * 1000)::float8) \
             from coachd_jobs where status = 'succeeded' and started_at is not null \
               and finished_at > now() - interval '24 hours' group by queue",
        )
        .fetch_all(&self.pool)
        .await?;
        let workers: Vec<(String, i64)> = sqlx::query_as(
            "select worker_type, count(*) from apalis.workers where last_seen > now() - $1 group by worker_type",
        )
        .bind(chrono::Duration::from_std(alive_within).unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        Ok(Queue::ALL
            .into_iter()
            .map(|q| {
                let mut s = QueueStats::empty(q);
                for (queue, status, n) in &counts {
                    if queue != q.as_str() {
                        continue;
                    }
                    let n = u64::try_from(*n).unwrap_or(0);
                    match JobStatus::parse(status) {
                        Some(JobStatus::Queued) => s.queued = n,
                        Some(JobStatus::Running) => s.running = n,
                        Some(JobStatus::Succeeded) => s.succeeded = n,
                        Some(JobStatus::Failed) => s.failed = n,
                        Some(JobStatus::Cancelled) => s.cancelled = n,
                        None => {}
                    }
                }
                if let Some((_, p50, p95)) = durations.iter().find(|(queue, ..)| queue == q.as_str()) {
                    (s.p50_ms, s.p95_ms) = (*p50, *p95);
                }
                s.workers_alive = workers
                    .iter()
                    .find(|(t, _)| *t == q.engine_name())
                    .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0));
                s
            })
            .collect())
    }

    async fn sweep(&self, retention: Duration) -> Result<(u64, u64), StoreError> {
        let expired: Vec<Option<String>> =
            sqlx::query_scalar("delete from coachd_job_uploads where expires_at < now() returning path")
                .fetch_all(&self.pool)
                .await?;
        let old_paths: Vec<Option<String>> = sqlx::query_scalar(
            "select u.path from coachd_job_uploads u join coachd_jobs j on j.id = u.job_id \
             where j.finished_at < now() - $1",
        )
        .bind(chrono::Duration::from_std(retention).unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        let jobs =
            sqlx::query("delete from coachd_jobs where finished_at < now() - $1 and parent_id is null")
                .bind(chrono::Duration::from_std(retention).unwrap_or_default())
                .execute(&self.pool)
                .await?
                .rows_affected();
        // The engine's queue entries of finished runs: apalis never deletes them (its `vacuum`
        // deletes every finished entry at once, new ones too), so they go after the same
        // retention as the job records. Each coachd run is one entry of one attempt, so a
        // `Failed` entry is finished too.
        let entries = sqlx::query(
            "delete from apalis.jobs where done_at < now() - $1 \
             and (status in ('Done', 'Killed') or (status = 'Failed' and attempts >= max_attempts))",
        )
        .bind(chrono::Duration::from_std(retention).unwrap_or_default())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if entries > 0 {
            tracing::debug!(entries, "jobs: swept finished queue entries");
        }
        let uploads = expired.len() as u64;
        if let Some(dir) = &self.upload_dir {
            let mut paths: Vec<String> = expired.into_iter().flatten().collect();
            paths.extend(old_paths.into_iter().flatten());
            for path in paths {
                let _ = tokio::fs::remove_file(dir.join(path)).await;
            }
        }
        Ok((uploads, jobs))
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let paths: Vec<Option<String>> = sqlx::query_scalar(
            "select u.path from coachd_job_uploads u join coachd_jobs j on j.id = u.job_id \
             where j.id = $1 or j.parent_id = $1",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let deleted = sqlx::query("delete from coachd_jobs where id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if let Some(dir) = &self.upload_dir {
            for path in paths.into_iter().flatten() {
                let _ = tokio::fs::remove_file(dir.join(path)).await;
            }
        }
        Ok(deleted > 0)
    }

    fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.wake.subscribe()
    }
}
