//! Benchmarks the job engine (apalis on PostgreSQL) with `noop` jobs: queue latency (submit →
//! start, from the job records' timestamps, both PostgreSQL's clock) p50/p99 of jobs submitted one
//! at a time with a pause between them, and throughput (no-op jobs per second) of a burst, with
//! one and with two worker processes. The workers are this example started again as child
//! processes (`--worker`), each a `coachd worker` in all but name; jobs are submitted through the
//! job backend of an API-only app in this process. It creates a scratch database and drops it.
//!
//! ```sh
//! DATABASE_URL=postgres://coachd:coachd@127.0.0.1:54329/coachd cargo run --release --example jobs_bench
//! ```
//!
//! `BENCH_PACED` (jobs of the latency phase, default 200), `BENCH_PACE_MS` (pause between them,
//! 20), `BENCH_BURST` (jobs of the throughput phase, 2000), `BENCH_CONCURRENCY` (runs at once per
//! worker process, 8), `BENCH_POLL_MS` / `BENCH_POLL_MAX_MS` (the workers' poll interval and
//! idle back-off; default 100 / 1000, coachd's defaults) change the run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coachd::jobs::{JobBackend, JobInput, JobKind, NewJob};
use coachd::{Application, Settings};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn worker_settings(url: &str) -> anyhow::Result<Settings> {
    let poll = env_or("BENCH_POLL_MS", 100).to_string();
    let poll_max = env_or("BENCH_POLL_MAX_MS", 1_000).to_string();
    let concurrency = env_or("BENCH_CONCURRENCY", 8).to_string();
    let mut s = Settings::for_tests(&[
        ("DATABASE_URL", url),
        ("COACHD_JOBS_QUEUES", "llm"),
        ("COACHD_JOBS_POLL_MS", &poll),
        ("COACHD_JOBS_POLL_MAX_MS", &poll_max),
        ("COACHD_JOBS_CONCURRENCY_LLM", &concurrency),
        ("COACHD_DB_MAX_CONNECTIONS", "20"),
        ("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "0"),
        ("COACHD_LOG", "warn"),
    ])?;
    s.jobs.serve_api = false;
    Ok(s)
}

/// The child: a worker-only coachd until its stdin closes.
async fn worker(url: &str) -> anyhow::Result<()> {
    let app = Application::build(worker_settings(url)?).await?;
    let stop = async {
        let mut buf = String::new();
        // The parent holds our stdin; EOF (its exit or its drop) is the stop signal.
        let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut buf)).await;
    };
    app.run(stop).await
}

fn spawn_workers(url: &str, n: usize) -> anyhow::Result<Vec<Child>> {
    let exe = std::env::current_exe()?;
    (0..n)
        .map(|_| {
            Command::new(&exe)
                .args(["--worker", url])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("start a worker process")
        })
        .collect()
}

fn stop_workers(workers: Vec<Child>) {
    for mut w in workers {
        drop(w.stdin.take());
        let _ = w.wait();
    }
}

fn noop(user: &str) -> NewJob {
    NewJob {
        id: uuid::Uuid::now_v7(),
        kind: JobKind::Noop,
        user_id: user.to_owned(),
        coach_id: "bench".to_owned(),
        session_id: None,
        options: json!({}),
        input: JobInput::default(),
        idempotency_key: None,
        parent_id: None,
        max_attempts: 1,
    }
}

async fn wait_all_done(pool: &PgPool, user: &str, n: i64, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from coachd_jobs where user_id = $1 and status = 'succeeded'",
        )
        .bind(user)
        .fetch_one(pool)
        .await?;
        if done >= n {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("only {done} of {n} jobs of {user} finished within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Percentiles (ms) of submit → start of a user's jobs.
async fn latency(pool: &PgPool, user: &str) -> anyhow::Result<(f64, f64, f64)> {
    let row: (f64, f64, f64) = sqlx::query_as(
        "select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms), \
           max(ms) \
         from (select (extract(epoch from started_at - created_at) * 1000)::float8 as ms \
               from coachd_jobs where user_id = $1) t",
    )
    .bind(user)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

async fn round(
    url: &str,
    jobs: &Arc<dyn JobBackend>,
    pool: &PgPool,
    processes: usize,
) -> anyhow::Result<String> {
    let workers = spawn_workers(url, processes)?;
    // Let the workers register and reach their steady poll.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let paced = env_or("BENCH_PACED", 200);
    let pace = Duration::from_millis(env_or("BENCH_PACE_MS", 20));
    let user = format!("paced{processes}");
    for _ in 0..paced {
        jobs.submit(noop(&user), None).await?;
        tokio::time::sleep(pace).await;
    }
    wait_all_done(pool, &user, paced as i64, Duration::from_secs(60)).await?;
    let (p50, p99, max) = latency(pool, &user).await?;

    let burst = env_or("BENCH_BURST", 2_000);
    let user = format!("burst{processes}");
    let start = Instant::now();
    let mut submitted = futures::stream::iter(0..burst)
        .map(|_| {
            let jobs = jobs.clone();
            let user = user.clone();
            async move { jobs.submit(noop(&user), None).await }
        })
        .buffer_unordered(16);
    while let Some(r) = submitted.next().await {
        r?;
    }
    let submit_secs = start.elapsed().as_secs_f64();
    wait_all_done(pool, &user, burst as i64, Duration::from_secs(600)).await?;
    let total = start.elapsed().as_secs_f64();
    stop_workers(workers);
    Ok(format!(
        "| {processes} | {paced} paced ({} ms apart) | {p50:.1} | {p99:.1} | {max:.1} | {burst} | {:.0} | {:.0} |",
        pace.as_millis(),
        burst as f64 / submit_secs,
        burst as f64 / total,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let url = args.get(2).context("--worker needs the database URL")?;
        return worker(url).await;
    }
    let admin = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .context("set DATABASE_URL to a server where this user may create databases")?;
    let scratch = coachd::db::ScratchDatabase::create(&admin, "coachd_jobs_bench_").await?;
    let url = scratch.url.clone();

    let mut api = Settings::for_tests(&[
        ("DATABASE_URL", url.as_str()),
        ("COACHD_JOBS_WORKERS", "false"),
        ("COACHD_DB_MAX_CONNECTIONS", "20"),
    ])?;
    api.jobs.enable_noop = true;
    let app = Application::build(api).await?;
    let jobs = app.state().jobs.clone();
    let pool = app.state().db.clone().context("the app has a pool")?;

    let mut rows = Vec::new();
    for processes in [1, 2] {
        rows.push(round(&url, &jobs, &pool, processes).await?);
    }
    println!(
        "jobs_bench: noop jobs on apalis-postgres; per worker process concurrency {}, poll {} ms (idle back-off to {} ms)\n",
        env_or("BENCH_CONCURRENCY", 8),
        env_or("BENCH_POLL_MS", 100),
        env_or("BENCH_POLL_MAX_MS", 1_000)
    );
    println!(
        "| worker processes | latency phase | submit→start p50 ms | p99 ms | max ms | burst jobs | submitted/s | no-op jobs/s (submit → all done) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    drop(app);
    pool.close().await;
    scratch.drop_now().await?;
    Ok(())
}
