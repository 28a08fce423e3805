//! Retrieval quality on the labelled set of `tests/data/memory_quality` (its README says how it
//! was made): every memory stored through the real PostgreSQL store, every query searched with
//! limit 5 in its own (user, coach) pair. The local embedder must reach recall@5 >= 0.9 and
//! feature hashing must do measurably worse, which is what shows the queries are paraphrases.
//!
//! Needs the files `scripts/embedder` installs into `.models/` (scripts/test runs it); without
//! them this test FAILS. The figures per embedder: `cargo run --example memory_quality`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "memory_quality/eval.rs"]
mod eval;

use std::sync::Arc;

use coachd::Settings;
use coachd::embed::{Embedder, LocalEmbedder, OfflineEmbedder};
use eval::{K, LabelledSet, Report};

fn local_embedder() -> LocalEmbedder {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".models");
    let settings = Settings::for_tests(&[("COACHD_EMBEDDING_LOCAL_DIR", dir.to_str().unwrap())]).unwrap();
    LocalEmbedder::load(&settings.embedding.local).unwrap_or_else(|e| panic!("{e} (run scripts/embedder)"))
}

fn summary(r: &Report) -> String {
    format!(
        "{}: recall@1 {:.3}, recall@{K} {:.3}, MRR {:.3}",
        r.embedder,
        r.recall(1),
        r.recall(K),
        r.mrr()
    )
}

#[test]
fn the_set_is_big_enough_paraphrased_and_consistent() {
    let set = LabelledSet::load().unwrap();
    let shape = set.shape();
    assert!(shape.memories >= 240, "{shape:?}");
    assert!(shape.users >= 12, "{shape:?}");
    assert!(
        shape.min_coaches_per_user >= 2 && shape.max_coaches_per_user <= 4,
        "{shape:?}"
    );
    assert!(shape.queries >= 120, "{shape:?}");
    // Pairs large enough that 5 results out of them is a real choice.
    assert!(shape.min_pair_size >= 15, "{shape:?}");
    assert!(shape.chance_recall <= 0.35, "{shape:?}");
    let overlap = set.overlap();
    assert!(overlap.mean_coverage <= 0.1, "{overlap:?}");
    assert!(overlap.zero_share >= 0.7, "{overlap:?}");
    // Stop words and stems: "hiring" and "hire" meet, "the" is not a topic.
    assert_eq!(
        eval::content_tokens("Hiring the customers"),
        eval::content_tokens("hire a customer")
    );
}

#[tokio::test]
async fn the_local_model_finds_paraphrases_that_feature_hashing_misses() {
    let set = LabelledSet::load().unwrap();
    let admin = common::admin_database_url();
    let hashing: Arc<dyn Embedder> = Arc::new(OfflineEmbedder::new(coachd::embed::local::LOCAL_DIMENSION));
    let local: Arc<dyn Embedder> = Arc::new(local_embedder());

    let hashing = eval::evaluate(&admin, "feature hashing", hashing, &set)
        .await
        .unwrap();
    let local = eval::evaluate(&admin, "local", local, &set).await.unwrap();
    println!("{}\n{}", summary(&hashing), summary(&local));

    for r in [&hashing, &local] {
        assert_eq!(r.results.len(), set.queries.len());
        assert_eq!(r.leaks, 0, "{}: memories of another pair came back", r.embedder);
        // Every pair holds at least K memories and min_similarity is -1: always K results.
        assert!(r.results.iter().all(|q| q.returned.len() == K));
    }
    let misses: Vec<String> = local
        .misses()
        .iter()
        .map(|m| {
            format!(
                "{} {:?}: got {:?}, want {:?}",
                m.query, m.text, m.returned, m.relevant
            )
        })
        .collect();
    assert!(
        local.recall(K) >= 0.9,
        "{}; missed:\n{}",
        summary(&local),
        misses.join("\n")
    );
    assert!(
        hashing.recall(K) + 0.2 <= local.recall(K),
        "{} vs {}",
        summary(&hashing),
        summary(&local)
    );
    assert!(hashing.mrr() + 0.2 <= local.mrr());
    // Without the pair filter other pairs' memories on the same topics crowd in: the per-pair
    // search is what keeps them out.
    assert!(local.pooled.foreign_share > 0.3, "{:?}", local.pooled);
    assert!(local.pooled.recall < local.recall(K), "{:?}", local.pooled);
}
