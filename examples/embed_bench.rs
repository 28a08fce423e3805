//! Benchmarks the local embedder (all-MiniLM-L6-v2, int8 ONNX, see src/embed/local.rs): the
//! latency of one query of 64 tokens (what a turn waits for before its memory search) through the
//! async `embed` path and directly, and the throughput of batched embedding (what stores use),
//! for each intra-op thread count asked for.
//!
//! ```sh
//! scripts/embedder && cargo run --release --example embed_bench
//! ```
//!
//! `BENCH_THREADS` (comma list, default `1,2`), `BENCH_QUERIES` (default 2000), `BENCH_TEXTS`
//! (batched texts, default 1024), `BENCH_BATCH` (default 32), `COACHD_EMBEDDING_LOCAL_DIR`
//! (default `.models`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coachd::embed::{Embedder, LocalConfig, LocalEmbedder};

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1_000.0)
}

/// A text of exactly `tokens` tokens (with [CLS] and [SEP]) for this tokenizer.
fn text_of(e: &LocalEmbedder, tokens: usize) -> anyhow::Result<String> {
    let words = [
        "the",
        "client",
        "wants",
        "to",
        "grow",
        "revenue",
        "through",
        "better",
        "sales",
        "calls",
        "and",
        "sleep",
        "more",
        "before",
        "the",
        "quarterly",
        "review",
        "with",
        "her",
        "manager",
    ];
    let mut text = String::new();
    let mut i = 0;
    while e.token_count(&text)? < tokens {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(words[i % words.len()]);
        i += 1;
    }
    if e.token_count(&text)? != tokens {
        bail!("could not make a text of exactly {tokens} tokens");
    }
    Ok(text)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("COACHD_EMBEDDING_LOCAL_DIR").unwrap_or_else(|_| ".models".to_owned());
    let threads: Vec<usize> = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".to_owned())
        .split(',')
        .map(|t| t.trim().parse().context("BENCH_THREADS"))
        .collect::<anyhow::Result<_>>()?;
    let queries = env_usize("BENCH_QUERIES", 2_000)?;
    let n_texts = env_usize("BENCH_TEXTS", 1_024)?;
    let batch = env_usize("BENCH_BATCH", 32)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    println!(
        "local embedder benchmark: all-MiniLM-L6-v2 int8 ONNX, {} cores",
        std::thread::available_parallelism()?
    );
    for &t in &threads {
        let config = LocalConfig {
            dir: dir.clone().into(),
            max_tokens: 256,
            threads: t,
            batch_size: batch,
            queue: 64,
        };
        let load = Instant::now();
        let e = LocalEmbedder::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let loaded = load.elapsed();
        let query = text_of(&e, 64)?;
        let one = vec![query.clone()];
        for _ in 0..50 {
            e.embed_blocking(&one).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let mut direct = Vec::with_capacity(queries);
        for _ in 0..queries {
            let s = Instant::now();
            e.embed_blocking(&one).map_err(|e| anyhow::anyhow!("{e}"))?;
            direct.push(s.elapsed());
        }
        direct.sort();
        let mut through = Vec::with_capacity(queries);
        runtime.block_on(async {
            for _ in 0..queries {
                let s = Instant::now();
                e.embed(&one).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                through.push(s.elapsed());
            }
            anyhow::Ok(())
        })?;
        through.sort();

        // Stores: memory-sized texts of 12 to 60 tokens, in batches.
        let texts: Vec<String> = (0..n_texts)
            .map(|i| text_of(&e, 12 + (i * 7) % 49))
            .collect::<anyhow::Result<_>>()?;
        let s = Instant::now();
        let out = runtime
            .block_on(e.embed(&texts))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let took = s.elapsed();
        assert_eq!(out.len(), texts.len());

        println!("\nintra-op threads: {t} (model load {})", ms(loaded));
        println!(
            "  query, 64 tokens, direct:       p50 {}  p99 {}  max {}  ({queries} runs)",
            ms(percentile(&direct, 0.50)),
            ms(percentile(&direct, 0.99)),
            ms(*direct.last().unwrap_or(&Duration::ZERO))
        );
        println!(
            "  query, 64 tokens, async embed:  p50 {}  p99 {}  max {}  ({queries} runs)",
            ms(percentile(&through, 0.50)),
            ms(percentile(&through, 0.99)),
            ms(*through.last().unwrap_or(&Duration::ZERO))
        );
        println!(
            "  batched, {n_texts} texts of 12-60 tokens, {batch} per batch: {:.0} texts/s ({} total)",
            n_texts as f64 / took.as_secs_f64(),
            ms(took)
        );
    }
    Ok(())
}
