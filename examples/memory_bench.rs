//! Benchmarks the PostgreSQL + pgvector memory store over 100 000 memories of 1 000 users, with
//! the offline embedder: a bulk load (batched, before the HNSW index exists), the index build,
//! stores into the indexed table (batched and one at a time), then search and list latency.
//! It creates a scratch database and drops it at the end.
//!
//! ```sh
//! DATABASE_URL=postgres://coachd:coachd@127.0.0.1:54329/coachd cargo run --release --example memory_bench
//! ```
//!
//! `DATABASE_URL` (or `TEST_DATABASE_URL`) names a server and a user allowed to create databases.
//! `BENCH_MEMORIES`, `BENCH_USERS`, `BENCH_COACHES`, `BENCH_INDEXED` (batched stores into the
//! indexed table), `BENCH_SINGLE` (stores one at a time), `BENCH_BATCH`, `BENCH_QUERIES` and
//! `BENCH_LIMIT` change the sizes; the defaults finish in a few minutes on two cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coachd::Settings;
use coachd::embed::{Embedder, OfflineEmbedder};
use coachd::memory::{MemoryStore, NewMemory, PgMemoryStore};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const DIMENSION: usize = 384;

/// Words memory texts and queries are made of: coaching topics, so that queries share words with
/// some memories and not others, as real ones do.
const WORDS: &[&str] = &[
    "sales",
    "pipeline",
    "funnel",
    "pricing",
    "enterprise",
    "customers",
    "churn",
    "retention",
    "hiring",
    "engineers",
    "managers",
    "delegation",
    "trust",
    "feedback",
    "board",
    "investors",
    "fundraising",
    "seed",
    "runway",
    "burn",
    "revenue",
    "growth",
    "marketing",
    "brand",
    "content",
    "launch",
    "product",
    "roadmap",
    "priorities",
    "focus",
    "energy",
    "sleep",
    "stress",
    "family",
    "health",
    "exercise",
    "habits",
    "mornings",
    "meetings",
    "calendar",
    "goals",
    "quarter",
    "targets",
    "metrics",
    "team",
    "culture",
    "conflict",
    "cofounder",
    "equity",
    "partnership",
    "negotiation",
    "contract",
    "legal",
    "operations",
    "process",
    "automation",
    "tools",
    "budget",
    "costs",
    "margins",
    "partners",
    "channel",
    "outbound",
    "inbound",
    "referrals",
    "community",
    "events",
    "speaking",
    "writing",
    "clarity",
    "vision",
    "mission",
    "values",
    "strategy",
    "competition",
    "market",
    "expansion",
    "europe",
    "remote",
    "office",
    "onboarding",
    "training",
    "coaching",
    "mentor",
    "promotion",
    "performance",
    "review",
    "compensation",
    "benefits",
    "recruiting",
    "interview",
    "offer",
    "resignation",
    "layoffs",
    "morale",
];

struct Config {
    memories: usize,
    users: usize,
    coaches: usize,
    indexed: usize,
    single: usize,
    batch: usize,
    queries: usize,
    limit: usize,
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name} must be a whole number")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let c = Config {
            memories: env_usize("BENCH_MEMORIES", 100_000)?,
            users: env_usize("BENCH_USERS", 1_000)?,
            coaches: env_usize("BENCH_COACHES", 4)?,
            indexed: env_usize("BENCH_INDEXED", 5_000)?,
            single: env_usize("BENCH_SINGLE", 1_000)?,
            batch: env_usize("BENCH_BATCH", 500)?,
            queries: env_usize("BENCH_QUERIES", 1_000)?,
            limit: env_usize("BENCH_LIMIT", 5)?,
        };
        if c.users == 0 || c.coaches == 0 || c.batch == 0 || c.single > c.memories {
            bail!(
                "BENCH_USERS, BENCH_COACHES and BENCH_BATCH must be positive, BENCH_SINGLE at most BENCH_MEMORIES"
            );
        }
        Ok(c)
    }
}

fn sentence(rng: &mut StdRng, words: usize) -> String {
    (0..words)
        .map(|_| *WORDS.choose(rng).unwrap_or(&"coaching"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Memory `i`: round-robin over users and coaches, so every pair gets the same share.
fn memory(rng: &mut StdRng, cfg: &Config, i: usize) -> NewMemory {
    let words = rng.gen_range(8..=16);
    NewMemory {
        // The number keeps every text distinct, so de-duplication does not shrink the data set.
        text: format!("{} (note {i})", sentence(rng, words)),
        user_id: format!("user-{}", i % cfg.users),
        coach_id: format!("coach-{}", (i / cfg.users) % cfg.coaches),
        memory_type: "insight".to_owned(),
        metadata: serde_json::json!({ "n": i }),
    }
}

/// Percentile of sorted durations, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1_000.0
}

fn latency_row(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1_000.0 / samples.len().max(1) as f64;
    println!(
        "| {name} | {} | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms |",
        samples.len(),
        pct(&samples, 50.0),
        pct(&samples, 99.0),
        pct(&samples, 100.0),
        mean
    );
}

fn rate_row(name: &str, count: usize, elapsed: Duration) {
    println!(
        "| {name} | {count} | {:.1} s, {:.0} memories/s |",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
}

async fn store_batches(
    store: &PgMemoryStore,
    rng: &mut StdRng,
    cfg: &Config,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let mut i = range.start;
    while i < range.end {
        let end = (i + cfg.batch).min(range.end);
        let batch: Vec<NewMemory> = (i..end).map(|n| memory(rng, cfg, n)).collect();
        let outcomes = store.store_batch(batch).await?;
        if outcomes.iter().any(|o| !o.created) {
            bail!("a generated memory was a duplicate");
        }
        i = end;
    }
    Ok(())
}

async fn run(pool: PgPool, cfg: &Config) -> anyhow::Result<()> {
    let settings = Settings::for_tests(&[])?;
    let embedder: Arc<dyn Embedder> = Arc::new(OfflineEmbedder::new(DIMENSION));
    let store = PgMemoryStore::prepare(pool.clone(), embedder, &settings.memory).await?;
    let mut rng = StdRng::seed_from_u64(42);

    let version: String = sqlx::query_scalar("select current_setting('server_version')")
        .fetch_one(&pool)
        .await?;
    let pgvector: String = sqlx::query_scalar("select extversion from pg_extension where extname = 'vector'")
        .fetch_one(&pool)
        .await?;
    println!(
        "coachd memory benchmark: PostgreSQL {version}, pgvector {pgvector}, offline embedder ({DIMENSION} dimensions), {} CPUs",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "{} memories over {} users x {} coaches: {} bulk-loaded, then {} in batches of {} and {} one at a time into the indexed table\n",
        cfg.memories,
        cfg.users,
        cfg.coaches,
        cfg.memories - cfg.indexed - cfg.single,
        cfg.indexed,
        cfg.batch,
        cfg.single
    );
    println!("| step | count | result |");
    println!("|---|---:|---|");

    // Bulk load: without the HNSW index, as when importing; the index is built afterwards.
    sqlx::query("drop index coach_memory_embedding_hnsw")
        .execute(&pool)
        .await?;
    let bulk = cfg.memories - cfg.indexed - cfg.single;
    let started = Instant::now();
    store_batches(&store, &mut rng, cfg, 0..bulk).await?;
    rate_row(
        &format!("store_batch, {} per call, no HNSW index yet", cfg.batch),
        bulk,
        started.elapsed(),
    );

    // The index build: what the first start over existing rows (or a REINDEX) costs. prepare()
    // recreates the index exactly as coachd does at start-up.
    let started = Instant::now();
    let store = PgMemoryStore::prepare(
        pool.clone(),
        Arc::new(OfflineEmbedder::new(DIMENSION)),
        &settings.memory,
    )
    .await?;
    println!(
        "| HNSW index build over {bulk} rows (start-up) | {bulk} | {:.1} s |",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("analyze coach_memory").execute(&pool).await?;

    // Steady state: every insert also goes into the HNSW graph.
    let started = Instant::now();
    store_batches(&store, &mut rng, cfg, bulk..bulk + cfg.indexed).await?;
    rate_row(
        &format!("store_batch, {} per call, indexed", cfg.batch),
        cfg.indexed,
        started.elapsed(),
    );

    let started = Instant::now();
    let mut single = Vec::with_capacity(cfg.single);
    for n in bulk + cfg.indexed..cfg.memories {
        let m = memory(&mut rng, cfg, n);
        let t = Instant::now();
        store.store(m).await?;
        single.push(t.elapsed());
    }
    if cfg.single > 0 {
        rate_row("store, one at a time, indexed", cfg.single, started.elapsed());
        latency_row("store latency, one at a time", single);
    }
    sqlx::query("analyze coach_memory").execute(&pool).await?;

    let pair = |rng: &mut StdRng| {
        (
            format!("user-{}", rng.gen_range(0..cfg.users)),
            format!("coach-{}", rng.gen_range(0..cfg.coaches)),
        )
    };

    let before = store.stats();
    let mut samples = Vec::with_capacity(cfg.queries);
    let mut short = 0;
    for _ in 0..cfg.queries {
        let (user, coach) = pair(&mut rng);
        let words = rng.gen_range(2..=5);
        let query = sentence(&mut rng, words);
        let t = Instant::now();
        let found = store
            .search_similar(&user, &coach, &query, cfg.limit, -1.0)
            .await?;
        samples.push(t.elapsed());
        if found.len() < cfg.limit {
            short += 1;
        }
    }
    let after = store.stats();
    latency_row(&format!("search_similar, limit {}", cfg.limit), samples);

    let mut samples = Vec::with_capacity(cfg.queries);
    for _ in 0..cfg.queries {
        let (user, coach) = pair(&mut rng);
        let t = Instant::now();
        store.list(&user, &coach, 20, 0).await?;
        samples.push(t.elapsed());
    }
    latency_row("list, limit 20, with total", samples);

    let size: String = sqlx::query_scalar(
        "select pg_size_pretty(pg_total_relation_size('coach_memory')) || ' (HNSW index ' || \
         pg_size_pretty(pg_relation_size('coach_memory_embedding_hnsw')) || ')'",
    )
    .fetch_one(&pool)
    .await?;
    println!("\ntable size: {size}");
    println!(
        "searches: {}, exact fallbacks after a short HNSW scan: {}, results shorter than the limit: {short}",
        after.searches - before.searches,
        after.exact_fallbacks - before.exact_fallbacks
    );
    let (user, coach) = pair(&mut rng);
    let plan = store
        .explain_search(&user, &coach, "sales pipeline", cfg.limit)
        .await?;
    println!("plan of a per-user search:\n{}", elide_vectors(&plan));
    Ok(())
}

/// Shortens the query vector literals of a plan to `'[…]'`.
fn elide_vectors(plan: &str) -> String {
    let mut out = String::with_capacity(plan.len());
    let mut rest = plan;
    while let Some(start) = rest.find("'[") {
        out.push_str(&rest[..start]);
        match rest[start..].find("]'") {
            Some(end) => {
                out.push_str("'[…]'");
                rest = &rest[start + end + 2..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let admin = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .context("set DATABASE_URL (or TEST_DATABASE_URL) to a PostgreSQL with pgvector")?;

    let scratch = coachd::db::ScratchDatabase::create(&admin, "coachd_bench_")
        .await
        .context("create a scratch database")?;

    let settings = Settings::for_tests(&[
        ("DATABASE_URL", scratch.url.as_str()),
        ("COACHD_DB_MAX_CONNECTIONS", "4"),
    ])?;
    let result = async {
        let db_url = settings.database_url.as_ref().context("DATABASE_URL")?;
        let pool = coachd::db::connect(db_url, &settings).await?;
        coachd::db::migrate(&pool).await?;
        let result = run(pool.clone(), &cfg).await;
        pool.close().await;
        result
    }
    .await;

    scratch.drop_now().await?;
    result
}
