//! The apalis workers of this process: one per queue it takes (`COACHD_JOBS_QUEUES`, or
//! `coachd worker --queues`), each with the queue's concurrency, on apalis-postgres (heartbeats,
//! re-enqueueing of a dead worker's jobs; polled as `poller` says) or on apalis' in-memory
//! storage. Plus the sweeper of
//! expired uploads and old jobs. All run on one task tracker and stop on one token: start-up's
//! ordered shutdown stops them after the HTTP drain and waits for in-flight runs within the
//! grace period (a run cut off there is taken up again by a live worker once its heartbeat lapses).

use std::sync::Arc;
use std::time::Duration;

use apalis::layers::WorkerBuilderExt;
use apalis_core::error::{BoxDynError, WorkerError};
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;
use apalis_postgres::Config;
use futures::FutureExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend::JobTask;
use super::in_process::InProcessJobBackend;
use super::poller::PgQueue;
use super::{JobsSettings, Queue, Runner};

/// The engine under the workers.
#[derive(Debug, Clone)]
pub enum Engine {
    /// apalis-postgres on this pool.
    Postgres(PgPool),
    /// apalis' in-memory storage, fed by this backend.
    InProcess(InProcessJobBackend),
}

/// The running workers and sweeper.
#[derive(Debug)]
pub struct Workers {
    tasks: TaskTracker,
    stop: CancellationToken,
    in_process: Option<InProcessJobBackend>,
}

/// The engine's entry point for one queue entry.
async fn handle(task: JobTask, runner: Data<Arc<Runner>>, worker: WorkerContext) -> Result<(), BoxDynError> {
    runner
        .run(task.job_id, worker.name())
        .await
        .map_err(|e| Box::new(e) as BoxDynError)
}

impl Workers {
    /// Starts the workers of `settings.queues` when `run_workers`, and the sweeper always (any
    /// process may sweep; the statements are idempotent).
    pub fn start(engine: Engine, runner: Arc<Runner>, settings: &JobsSettings) -> Self {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        // Worker names must be unique across processes: apalis registers each in apalis.workers
        // and re-enqueues the jobs locked by a name whose heartbeat stopped.
        let node = uuid::Uuid::new_v4().simple().to_string();
        let node = &node[..12];
        let in_process = match &engine {
            Engine::InProcess(b) => Some(b.clone()),
            Engine::Postgres(_) => None,
        };
        if settings.run_workers {
            for &queue in &settings.queues {
                let concurrency = settings.concurrency_of(queue).max(1);
                let name = format!("coachd-{}-{node}", queue.as_str());
                match &engine {
                    Engine::Postgres(pool) => {
                        let fut = run_pg(
                            pool.clone(),
                            queue,
                            name,
                            concurrency,
                            runner.clone(),
                            settings.clone(),
                            stop.clone(),
                        );
                        tasks.spawn(fut);
                    }
                    Engine::InProcess(backend) => {
                        let Some(storage) = backend.storage(queue) else {
                            tracing::warn!(queue = queue.as_str(), "this queue already has its worker");
                            continue;
                        };
                        let worker = WorkerBuilder::new(name.clone())
                            .backend(storage)
                            .data(runner.clone())
                            .concurrency(concurrency)
                            .build(handle);
                        let stop = stop.clone();
                        tasks.spawn(async move {
                            let signal = stop.cancelled_owned().map(Ok::<(), WorkerError>);
                            if let Err(e) = worker.run_until(signal).await {
                                tracing::error!(worker = %name, error = %e, "in-process job worker stopped");
                            }
                        });
                    }
                }
                tracing::info!(queue = queue.as_str(), concurrency, "jobs: worker started");
            }
        } else {
            tracing::info!("jobs: no workers in this process (COACHD_JOBS_WORKERS=false)");
        }
        let sweeper = sweep(runner, settings.sweep_interval, settings.retention, stop.clone());
        tasks.spawn(sweeper);
        Workers {
            tasks,
            stop,
            in_process,
        }
    }

    /// Stops taking jobs and waits up to `grace` for the runs in flight.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                "job runs still in flight after the grace period: their workers' heartbeats lapse and another worker takes them up"
            );
        }
        if let Some(b) = &self.in_process {
            b.close().await;
        }
    }
}

/// One PostgreSQL worker, rebuilt after a failure of its stream (the database went away, say)
/// until the stop token fires.
async fn run_pg(
    pool: PgPool,
    queue: Queue,
    name: String,
    concurrency: usize,
    runner: Arc<Runner>,
    s: JobsSettings,
    stop: CancellationToken,
) {
    let config = Config::new(&queue.engine_name())
        .set_keep_alive(s.heartbeat)
        .set_buffer_size(concurrency)
        .set_reenqueue_orphaned_after(s.orphan_after);
    while !stop.is_cancelled() {
        let storage = PgQueue::new(pool.clone(), config.clone(), s.poll_interval, s.poll_max);
        let worker = WorkerBuilder::new(name.clone())
            .backend(storage)
            .data(runner.clone())
            .concurrency(concurrency)
            .build(handle);
        let signal = stop.clone().cancelled_owned().map(Ok::<(), WorkerError>);
        match worker.run_until(signal).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "job worker failed; restarting in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
}

async fn sweep(runner: Arc<Runner>, every: Duration, retention: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match runner.backend().sweep(retention).await {
            Ok((0, 0)) => {}
            Ok((uploads, jobs)) => tracing::info!(uploads, jobs, "jobs: swept expired uploads and old jobs"),
            Err(e) => tracing::warn!(error = %e, "jobs: sweep failed"),
        }
    }
}
