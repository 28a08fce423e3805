//! Benchmarks the PostgreSQL + pgvector memory store with the offline embedder, at a size given
//! on the command line: a load of `--memories` memories (batched), then batched stores and
//! stores one at a time into the full table, then per-pair search and list latency, and
//! optionally searches of one large pair. `--hnsw on` measures the layout with the HNSW index
//! (loaded without it, then built as `PgMemoryStore::prepare` builds it at start-up); the default
//! is coachd's default layout, no vector index. It creates a scratch database and drops it at
//! the end.
//!
//! ```sh
//! DATABASE_URL=postgres://coachd:coachd@127.0.0.1:54329/coachd \
//!   cargo run --release --example memory_bench -- [MEMORIES] [--users U] [--hnsw on|off] ...
//! ```
//!
//! `DATABASE_URL` (or `TEST_DATABASE_URL`) names a server and a user allowed to create databases.
//! Options (defaults in brackets): the first positional argument or `--memories` [100000];
//! `--users` [memories / 100, at least 1]; `--coaches` [4]; `--hnsw on|off` [off];
//! `--batched` [5000] memories stored with `store_batch` after the load; `--single` [1000]
//! stored one at a time; `--batch` [500] per `store_batch` call; `--queries` [1000];
//! `--limit` [5]; `--large-pair` [0] memories of one extra pair, searched `--queries / 10` times.
//! The default run takes well under two minutes on two cores.

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

#[derive(Debug)]
struct Config {
    memories: usize,
    users: usize,
    coaches: usize,
    hnsw: bool,
    batched: usize,
    single: usize,
    batch: usize,
    queries: usize,
    limit: usize,
    large_pair: usize,
}

/// The user and coach of the `--large-pair` pair; no generated memory belongs to them.
const LARGE_USER: &str = "user-large";
const LARGE_COACH: &str = "coach-large";

fn number(flag: &str, value: Option<String>) -> anyhow::Result<usize> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    value
        .trim()
        .replace('_', "")
        .parse()
        .with_context(|| format!("{flag} must be a whole number, not {value:?}"))
}

impl Config {
    fn from_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut memories = None;
        let mut users = None;
        let mut c = Config {
            memories: 100_000,
            users: 0,
            coaches: 4,
            hnsw: false,
            batched: 5_000,
            single: 1_000,
            batch: 500,
            queries: 1_000,
            limit: 5,
            large_pair: 0,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--memories" => memories = Some(number(&arg, args.next())?),
                "--users" => users = Some(number(&arg, args.next())?),
                "--coaches" => c.coaches = number(&arg, args.next())?,
                "--batched" => c.batched = number(&arg, args.next())?,
                "--single" => c.single = number(&arg, args.next())?,
                "--batch" => c.batch = number(&arg, args.next())?,
                "--queries" => c.queries = number(&arg, args.next())?,
                "--limit" => c.limit = number(&arg, args.next())?,
                "--large-pair" => c.large_pair = number(&arg, args.next())?,
                "--hnsw" => {
                    c.hnsw = match args.next().as_deref() {
                        Some("on") => true,
                        Some("off") => false,
                        other => bail!("--hnsw takes on or off, not {other:?}"),
                    }
                }
                "-h" | "--help" => {
                    println!(
                        "memory_bench [MEMORIES] [--users U] [--coaches C] [--hnsw on|off] [--batched N] \
                         [--single N] [--batch N] [--queries N] [--limit N] [--large-pair N]"
                    );
                    std::process::exit(0);
                }
                other if !other.starts_with('-') && memories.is_none() => {
                    memories = Some(number("MEMORIES", Some(other.to_owned()))?)
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        c.memories = memories.unwrap_or(c.memories);
        c.users = users.unwrap_or((c.memories / 100).max(1));
        if c.users == 0 || c.coaches == 0 || c.batch == 0 || c.limit == 0 {
            bail!("--users, --coaches, --batch and --limit must be positive");
        }
        if c.batched + c.single > c.memories {
            bail!("--batched plus --single must be at most the number of memories");
        }
        Ok(c)
    }

    /// Memories stored before the measured stores.
    fn load(&self) -> usize {
        self.memories - self.batched - self.single
    }
}

fn sentence(rng: &mut StdRng, words: usize) -> String {
    (0..words)
        .map(|_| *WORDS.choose(rng).unwrap_or(&"coaching"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Memory `i`: round-robin over users and coaches, so every pair gets the same share (and a
/// pair's rows lie far apart in the table, as when many users write at once).
fn memory(rng: &mut StdRng, cfg: &Config, i: usize) -> NewMemory {
    let words = rng.gen_range(8..=16);
    NewMemory {
        dedup_key: None,
        // The number keeps every text distinct, so de-duplication does not shrink the data set.
        text: format!("{} (note {i})", sentence(rng, words)),
        user_id: format!("user-{}", i % cfg.users),
        coach_id: format!("coach-{}", (i / cfg.users) % cfg.coaches),
        memory_type: "insight".to_owned(),
        metadata: serde_json::json!({ "n": i }),
    }
}

/// Memory `i` of the large pair.
fn large_memory(rng: &mut StdRng, i: usize) -> NewMemory {
    let words = rng.gen_range(8..=16);
    NewMemory {
        dedup_key: None,
        text: format!("{} (large {i})", sentence(rng, words)),
        user_id: LARGE_USER.to_owned(),
        coach_id: LARGE_COACH.to_owned(),
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
        count as f64 / elapsed.as_secs_f64().max(1e-9)
    );
}

async fn store_batches(
    store: &PgMemoryStore,
    batch: usize,
    range: std::ops::Range<usize>,
    mut make: impl FnMut(usize) -> NewMemory,
) -> anyhow::Result<()> {
    let mut i = range.start;
    while i < range.end {
        let end = (i + batch).min(range.end);
        let memories: Vec<NewMemory> = (i..end).map(&mut make).collect();
        let outcomes = store.store_batch(memories).await?;
        if outcomes.iter().any(|o| !o.created) {
            bail!("a generated memory was a duplicate");
        }
        i = end;
    }
    Ok(())
}

/// Times `count` searches of pairs drawn by `pair`; returns how many came back short of `limit`.
async fn searches(
    store: &PgMemoryStore,
    rng: &mut StdRng,
    cfg: &Config,
    count: usize,
    label: &str,
    mut pair: impl FnMut(&mut StdRng) -> (String, String),
) -> anyhow::Result<usize> {
    let mut samples = Vec::with_capacity(count);
    let mut short = 0;
    for _ in 0..count {
        let (user, coach) = pair(rng);
        let words = rng.gen_range(2..=5);
        let query = sentence(rng, words);
        let t = Instant::now();
        let found = store
            .search_similar(&user, &coach, &query, cfg.limit, -1.0)
            .await?;
        samples.push(t.elapsed());
        if found.len() < cfg.limit {
            short += 1;
        }
    }
    latency_row(label, samples);
    Ok(short)
}

async fn run(pool: PgPool, cfg: &Config) -> anyhow::Result<()> {
    let run_started = Instant::now();
    let hnsw = if cfg.hnsw { "on" } else { "off" };
    let settings = Settings::for_tests(&[("COACHD_MEMORY_HNSW", hnsw)])?;
    let embedder: Arc<dyn Embedder> = Arc::new(OfflineEmbedder::new(DIMENSION));
    let store = PgMemoryStore::prepare(pool.clone(), embedder.clone(), &settings.memory).await?;
    let mut rng = StdRng::seed_from_u64(42);

    let version: String = sqlx::query_scalar("select current_setting('server_version')")
        .fetch_one(&pool)
        .await?;
    let pgvector: String = sqlx::query_scalar("select extversion from pg_extension where extname = 'vector'")
        .fetch_one(&pool)
        .await?;
    let load = cfg.load();
    println!(
        "coachd memory benchmark: PostgreSQL {version}, pgvector {pgvector}, offline embedder ({DIMENSION} dimensions), {} CPUs, COACHD_MEMORY_HNSW={hnsw}",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "{} memories over {} users x {} coaches (~{} per pair): {load} loaded, then {} in batches of {} and {} one at a time into the full table{}\n",
        cfg.memories,
        cfg.users,
        cfg.coaches,
        cfg.memories / (cfg.users * cfg.coaches).max(1),
        cfg.batched,
        cfg.batch,
        cfg.single,
        if cfg.large_pair > 0 {
            format!("; plus one pair of {} memories", cfg.large_pair)
        } else {
            String::new()
        }
    );
    println!("| step | count | result |");
    println!("|---|---:|---|");

    // The load. With the HNSW index, as when importing: without the index, built afterwards
    // (growing it row by row would take hours at a million rows).
    if cfg.hnsw {
        sqlx::query("drop index coach_memory_embedding_hnsw")
            .execute(&pool)
            .await?;
    }
    let started = Instant::now();
    store_batches(&store, cfg.batch, 0..load, |n| memory(&mut rng, cfg, n)).await?;
    rate_row(
        &format!(
            "load: store_batch, {} per call{}",
            cfg.batch,
            if cfg.hnsw { ", before the HNSW index" } else { "" }
        ),
        load,
        started.elapsed(),
    );
    if cfg.large_pair > 0 {
        let mut large_rng = StdRng::seed_from_u64(7);
        let started = Instant::now();
        store_batches(&store, cfg.batch, 0..cfg.large_pair, |n| {
            large_memory(&mut large_rng, n)
        })
        .await?;
        rate_row("load: the large pair", cfg.large_pair, started.elapsed());
    }

    let store = if cfg.hnsw {
        // What the first start with COACHD_MEMORY_HNSW=on over existing rows (or a REINDEX) costs:
        // prepare() builds the index exactly as coachd does at start-up.
        let started = Instant::now();
        let store = PgMemoryStore::prepare(pool.clone(), embedder.clone(), &settings.memory).await?;
        println!(
            "| HNSW index build at start-up | {} | {:.1} s |",
            load + cfg.large_pair,
            started.elapsed().as_secs_f64()
        );
        store
    } else {
        // A start over the full table: with the index off it only checks the settings row.
        let started = Instant::now();
        let store = PgMemoryStore::prepare(pool.clone(), embedder.clone(), &settings.memory).await?;
        println!(
            "| prepare() at start-up, no vector index | {} | {:.1} ms |",
            load + cfg.large_pair,
            started.elapsed().as_secs_f64() * 1_000.0
        );
        store
    };
    sqlx::query("analyze coach_memory").execute(&pool).await?;

    // Steady state: the full table, every index in place.
    let started = Instant::now();
    store_batches(&store, cfg.batch, load..load + cfg.batched, |n| {
        memory(&mut rng, cfg, n)
    })
    .await?;
    if cfg.batched > 0 {
        rate_row(
            &format!("store_batch, {} per call, full table", cfg.batch),
            cfg.batched,
            started.elapsed(),
        );
    }

    let started = Instant::now();
    let mut single = Vec::with_capacity(cfg.single);
    for n in load + cfg.batched..cfg.memories {
        let m = memory(&mut rng, cfg, n);
        let t = Instant::now();
        store.store(m).await?;
        single.push(t.elapsed());
    }
    if cfg.single > 0 {
        rate_row("store, one at a time, full table", cfg.single, started.elapsed());
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
    let short = searches(
        &store,
        &mut rng,
        cfg,
        cfg.queries,
        &format!("search_similar, limit {}", cfg.limit),
        pair,
    )
    .await?;
    let large_short = if cfg.large_pair > 0 {
        searches(
            &store,
            &mut rng,
            cfg,
            (cfg.queries / 10).max(1),
            &format!(
                "search_similar of the pair of {}, limit {}",
                cfg.large_pair, cfg.limit
            ),
            |_| (LARGE_USER.to_owned(), LARGE_COACH.to_owned()),
        )
        .await?
    } else {
        0
    };
    let after = store.stats();

    let mut samples = Vec::with_capacity(cfg.queries);
    for _ in 0..cfg.queries {
        let (user, coach) = pair(&mut rng);
        let t = Instant::now();
        store.list(&user, &coach, 20, 0).await?;
        samples.push(t.elapsed());
    }
    latency_row("list, limit 20, with total", samples);

    let sizes: Vec<(String, String)> = sqlx::query_as(
        "select 'table ' || c.relname, pg_size_pretty(pg_total_relation_size(c.oid)) from pg_class c \
         where c.relname = 'coach_memory' \
         union all \
         select 'index ' || i.indexrelid::regclass::text, pg_size_pretty(pg_relation_size(i.indexrelid)) \
         from pg_index i where i.indrelid = 'coach_memory'::regclass",
    )
    .fetch_all(&pool)
    .await?;
    println!(
        "\nsizes (table total includes indexes): {}",
        sizes
            .iter()
            .map(|(n, s)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "searches: {}, exact fallbacks after a short HNSW scan: {}, results shorter than the limit: {short} (large pair: {large_short})",
        after.searches - before.searches,
        after.exact_fallbacks - before.exact_fallbacks
    );
    let (user, coach) = pair(&mut rng);
    let plan = store
        .explain_search(&user, &coach, "sales pipeline", cfg.limit)
        .await?;
    println!("plan of a per-pair search:\n{}", elide_vectors(&plan));
    if cfg.large_pair > 0 {
        let plan = store
            .explain_search(LARGE_USER, LARGE_COACH, "sales pipeline", cfg.limit)
            .await?;
        println!("plan of a search of the large pair:\n{}", elide_vectors(&plan));
    }
    println!("\ntotal run time {:.1} s", run_started.elapsed().as_secs_f64());
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
    let cfg = Config::from_args(std::env::args().skip(1))?;
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
        // The HNSW build (`--hnsw on`) stays in memory with this; no effect on the default layout.
        // The name is the scratch database's own (a prefix and a UUID), safe to format into DDL.
        {
            use sqlx::{Connection, Executor};
            let name = url::Url::parse(&scratch.url)?
                .path()
                .trim_start_matches('/')
                .to_owned();
            let mut conn = sqlx::PgConnection::connect(&admin).await?;
            conn.execute(format!(r#"alter database "{name}" set maintenance_work_mem = '512MB'"#).as_str())
                .await?;
            conn.close().await?;
        }
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
