//! The local embedder (all-MiniLM-L6-v2, int8 ONNX in process): parity with sentence-transformers
//! on the fp32 weights, meaning rather than word overlap, batching, and the app serving with it
//! (or, without its files, with feature hashing, saying so in /health/all).
//!
//! Needs the files `scripts/embedder` installs into `.models/` (scripts/test runs it); without
//! them these tests FAIL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use coachd::embed::local::{LOCAL_DIMENSION, LOCAL_MODEL};
use coachd::embed::{Embedder, LocalConfig, LocalEmbedder};
use serde_json::Value;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models")
}

fn config() -> LocalConfig {
    LocalConfig {
        dir: models_dir(),
        max_tokens: 256,
        threads: 1,
        batch_size: 4,
        queue: 8,
    }
}

fn embedder() -> LocalEmbedder {
    LocalEmbedder::load(&config()).unwrap_or_else(|e| panic!("{e} (run scripts/embedder)"))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Vectors made once by scripts/embedder_reference.py with sentence-transformers.
fn reference() -> Vec<(String, Vec<f32>)> {
    let raw = include_str!("data/minilm_reference.json");
    let doc: Value = serde_json::from_str(raw).unwrap();
    assert_eq!(doc["max_seq_length"], 256);
    doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let v = i["vector"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (i["text"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

#[tokio::test]
async fn vectors_match_sentence_transformers_on_the_fp32_weights() {
    let e = embedder();
    let reference = reference();
    assert_eq!(reference.len(), 10);
    let texts: Vec<String> = reference.iter().map(|(t, _)| t.clone()).collect();
    // Batched (mixed lengths) and one by one give the same vectors: each text is its own inference.
    let batched = e.embed(&texts).await.unwrap();
    for ((text, want), got) in reference.iter().zip(&batched) {
        assert_eq!(got.len(), LOCAL_DIMENSION);
        let c = cosine(got, want);
        assert!(c >= 0.98, "cosine {c} for {text:?}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalised, got {norm}");
        let single = e.embed(std::slice::from_ref(text)).await.unwrap();
        let same = cosine(&single[0], got);
        assert!(same > 0.9999, "padding changed {text:?}: {same}");
    }
    // The long text is cut at 256 tokens, not at tokenizer.json's 128.
    assert_eq!(e.token_count(&texts[9]).unwrap(), 256);
}

#[tokio::test]
async fn it_matches_meaning_not_words() {
    let e = embedder();
    let texts: Vec<String> = [
        "I want more customers",
        "grow revenue through sales",
        "my goal is to run a marathon",
    ]
    .map(String::from)
    .to_vec();
    let v = e.embed(&texts).await.unwrap();
    let related = cosine(&v[0], &v[1]);
    let unrelated = cosine(&v[0], &v[2]);
    assert!(
        related > unrelated + 0.1,
        "related {related}, unrelated {unrelated}"
    );
    assert_eq!(e.model(), LOCAL_MODEL);
    assert!(e.embed(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn many_concurrent_callers_share_the_bounded_queue() {
    let e = Arc::new(LocalEmbedder::load(&LocalConfig { queue: 2, ..config() }).unwrap());
    let calls = (0..16).map(|i| {
        let e = e.clone();
        async move { e.embed(&[format!("note number {i} about sleep")]).await.unwrap() }
    });
    let out = futures::future::join_all(calls).await;
    assert_eq!(out.len(), 16);
    assert!(out.iter().all(|v| v.len() == 1 && v[0].len() == LOCAL_DIMENSION));
}

async fn embedder_report(overrides: &[(&str, &str)]) -> Value {
    let app = common::spawn_app_with(common::Services::Embedded, overrides).await;
    let body: Value = app
        .client
        .get(app.url("/health/all"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    app.stop().await.unwrap();
    body["components"]["embedder"].clone()
}

#[tokio::test]
async fn the_app_serves_with_the_local_model_and_says_which() {
    let dir = models_dir();
    let report = embedder_report(&[
        ("COACHD_EMBEDDING_PROVIDER", "local"),
        ("COACHD_EMBEDDING_LOCAL_DIR", dir.to_str().unwrap()),
    ])
    .await;
    assert_eq!(report["status"], "up", "{report}");
    assert_eq!(report["backend"], LOCAL_MODEL);

    // Without the files: still starts, with feature hashing, and names the install command.
    let report = embedder_report(&[
        ("COACHD_EMBEDDING_PROVIDER", "local"),
        ("COACHD_EMBEDDING_LOCAL_DIR", "/nonexistent-coachd-models"),
    ])
    .await;
    assert_eq!(report["status"], "embedded", "{report}");
    assert_eq!(report["backend"], "coachd-offline-hash-v1");
    assert!(
        report["detail"].as_str().unwrap().contains("scripts/embedder"),
        "{report}"
    );
}
