//! Retrieval quality of each available embedder on the labelled set of
//! `tests/data/memory_quality` (see its README): every memory stored through the real
//! PostgreSQL memory store in a scratch database (created and dropped here, one per embedder),
//! every query searched with `search_similar` limit 5 in its own (user, coach) pair, then
//! recall@1, recall@5 and MRR per embedder and the queries each one missed.
//!
//! ```sh
//! DATABASE_URL=postgres://coachd:coachd@127.0.0.1:54329/coachd cargo run --example memory_quality
//! ```
//!
//! `DATABASE_URL` (or `TEST_DATABASE_URL`) names a server and a user allowed to create
//! databases. Feature hashing always runs; the local model when its files are in
//! `COACHD_EMBEDDING_LOCAL_DIR` (default `.models`, installed by `scripts/embedder`); an
//! OpenAI-compatible model when `COACHD_EMBEDDING_API_KEY` or `OPENAI_API_KEY` is set (with
//! `COACHD_EMBEDDING_BASE_URL`, `COACHD_EMBEDDING_MODEL` and `COACHD_EMBEDDING_DIM` as coachd
//! reads them; `.env` is read too). `QUALITY_MISSES=0` hides the list of missed queries.

#[path = "../tests/memory_quality/eval.rs"]
mod eval;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use coachd::Settings;
use coachd::embed::{self, Embedder, EmbeddingProvider, LocalEmbedder, OfflineEmbedder};
use eval::{K, LabelledSet, Report};

fn print_misses(r: &Report) {
    let misses = r.misses();
    println!(
        "\n{}: {} queries missed a relevant memory in the top {K}",
        r.embedder,
        misses.len()
    );
    for m in misses {
        println!(
            "- {} {:?}: want {:?}, got {:?}",
            m.query, m.text, m.relevant, m.returned
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    coachd::config::load_dotenv().map_err(anyhow::Error::msg)?;
    let admin = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .context("set DATABASE_URL (or TEST_DATABASE_URL) to a PostgreSQL with pgvector")?;
    let settings = Settings::from_env()?;
    let show_misses = std::env::var("QUALITY_MISSES").as_deref() != Ok("0");

    let set = LabelledSet::load()?;
    let shape = set.shape();
    let overlap = set.overlap();
    println!(
        "coachd retrieval quality: {} memories of {} users ({} (user, coach) pairs, {}-{} coaches per user, {}-{:.1} memories per pair, min-mean), {} queries",
        shape.memories,
        shape.users,
        shape.pairs,
        shape.min_coaches_per_user,
        shape.max_coaches_per_user,
        shape.min_pair_size,
        shape.mean_pair_size,
        shape.queries
    );
    println!(
        "word overlap of a query with its relevant memories ({} pairs, content tokens): mean coverage {:.3}, mean Jaccard {:.3}, no shared token in {:.0} percent",
        overlap.pairs,
        overlap.mean_coverage,
        overlap.mean_jaccard,
        overlap.zero_share * 100.0
    );
    println!(
        "chance recall@{K} (5 random memories of the pair): {:.3}\n",
        shape.chance_recall
    );

    let mut embedders: Vec<(String, Arc<dyn Embedder>)> = vec![(
        "feature hashing (offline)".to_owned(),
        Arc::new(OfflineEmbedder::new(embed::local::LOCAL_DIMENSION)),
    )];
    let local = settings.embedding.local.clone();
    if local.missing().is_empty() {
        let loaded = tokio::task::spawn_blocking(move || LocalEmbedder::load(&local)).await??;
        embedders.push((format!("local ({})", loaded.model()), Arc::new(loaded)));
    } else {
        println!(
            "local model skipped: its files are not in {} (run scripts/embedder)",
            local.dir.display()
        );
    }
    if settings.embedding.api_key.is_some() {
        let mut remote = settings.embedding.clone();
        remote.provider = EmbeddingProvider::Openai;
        let e = embed::from_settings(&remote, settings.llm.llm_timeouts.connect, false)?;
        embedders.push((
            format!("OpenAI-compatible ({}, {} dimensions)", e.model(), e.dimension()),
            e,
        ));
    } else {
        println!("OpenAI-compatible model skipped: no COACHD_EMBEDDING_API_KEY or OPENAI_API_KEY");
    }

    let mut reports = Vec::new();
    for (name, embedder) in embedders {
        let started = Instant::now();
        let report = eval::evaluate(&admin, &name, embedder, &set).await?;
        reports.push((report, started.elapsed()));
    }

    println!(
        "\n| embedder | recall@1 | recall@{K} | MRR | queries | missed | leaks | without the pair filter: recall@{K}, other pairs' share of the top {K} | store + search |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (r, took) in &reports {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.3}, {:.0} % | {:.1} s |",
            r.embedder,
            r.recall(1),
            r.recall(K),
            r.mrr(),
            r.results.len(),
            r.misses().len(),
            r.leaks,
            r.pooled.recall,
            r.pooled.foreign_share * 100.0,
            took.as_secs_f64()
        );
    }
    if show_misses {
        for (r, _) in &reports {
            print_misses(r);
        }
    }
    Ok(())
}
