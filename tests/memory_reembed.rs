//! Changing embedder on the real PostgreSQL: start-up refuses a database filled by another
//! embedder (dimension or model) naming `coachd memory reembed`, and the re-embed moves every
//! memory over in batches, resumes after an interruption, loses none, and lets the server start.
//! The model change uses the local embedder, so it needs `scripts/embedder` (FAILS without).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use coachd::Settings;
use coachd::embed::{Embedder, LocalConfig, LocalEmbedder, OfflineEmbedder};
use coachd::memory::pg::{ReembedOutcome, ReembedProgress, reembed};
use coachd::memory::{MemoryStore, NewMemory, PgMemoryStore, SetupError};
use coachd::startup::StartupError;
use sqlx::PgPool;

const MEMORIES: usize = 45;

async fn pool_of(url: &str) -> PgPool {
    let settings = Settings::for_tests(&[("DATABASE_URL", url)]).unwrap();
    let pool = coachd::db::connect(settings.database_url.as_ref().unwrap(), &settings)
        .await
        .unwrap();
    coachd::db::migrate(&pool).await.unwrap();
    pool
}

fn texts() -> Vec<String> {
    let topics = [
        "sales pipeline",
        "marathon training",
        "sleep schedule",
        "hiring a designer",
        "public speaking",
    ];
    (0..MEMORIES)
        .map(|i| format!("note {i}: the user talked about {}", topics[i % topics.len()]))
        .collect()
}

/// A database filled with `MEMORIES` memories by `embedder`.
async fn filled(embedder: Arc<dyn Embedder>) -> (String, PgPool) {
    let url = common::fresh_database().await;
    let pool = pool_of(&url).await;
    let settings = Settings::for_tests(&[]).unwrap().memory;
    let store = PgMemoryStore::prepare(pool.clone(), embedder, &settings)
        .await
        .unwrap();
    let batch = texts()
        .into_iter()
        .enumerate()
        .map(|(i, text)| NewMemory {
            dedup_key: None,
            text,
            user_id: format!("user-{}", i % 3),
            coach_id: "coach-1".to_owned(),
            memory_type: "insight".to_owned(),
            metadata: serde_json::json!({}),
        })
        .collect();
    store.store_batch(batch).await.unwrap();
    (url, pool)
}

async fn snapshot(pool: &PgPool) -> Vec<(uuid::Uuid, String, i32)> {
    sqlx::query_as("select id, content, vector_dims(embedding) from coach_memory order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn recorded(pool: &PgPool) -> (i32, String) {
    sqlx::query_as("select embedding_dim, embedding_model from coach_memory_settings")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn start(url: &str, overrides: &[(&str, &str)]) -> Result<coachd::Application, StartupError> {
    let mut pairs = vec![("DATABASE_URL", url)];
    pairs.extend_from_slice(overrides);
    coachd::Application::build(Settings::for_tests(&pairs).unwrap()).await
}

#[tokio::test]
async fn a_new_dimension_is_refused_then_reembedded_with_a_resume() {
    let (url, pool) = filled(Arc::new(OfflineEmbedder::new(384))).await;
    let before = snapshot(&pool).await;
    assert_eq!(before.len(), MEMORIES);

    let err = start(&url, &[("COACHD_EMBEDDING_DIM", "64")]).await.unwrap_err();
    assert!(err.to_string().contains("coachd memory reembed"), "{err}");

    // Interrupted after two batches of 10.
    let target: Arc<dyn Embedder> = Arc::new(OfflineEmbedder::new(64));
    // With the HNSW index kept (COACHD_MEMORY_HNSW=on), so the end of the run rebuilds it.
    let settings = Settings::for_tests(&[("COACHD_EMBEDDING_DIM", "64"), ("COACHD_MEMORY_HNSW", "on")])
        .unwrap()
        .memory;
    let mut seen: Vec<ReembedProgress> = Vec::new();
    let outcome = reembed(&pool, target.clone(), &settings, 10, |p| {
        seen.push(p);
        if seen.len() == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome, ReembedOutcome::Stopped { reembedded: 20 });
    assert_eq!(
        seen.last().unwrap(),
        &ReembedProgress {
            done: 20,
            total: MEMORIES as u64
        }
    );
    // Half done: the server refuses to serve a table of mixed vectors, whatever it is given.
    for dim in ["64", "384"] {
        let err = start(&url, &[("COACHD_EMBEDDING_DIM", dim)]).await.unwrap_err();
        assert!(
            matches!(err, StartupError::Memory(SetupError::ReembedUnfinished { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("coachd memory reembed"), "{err}");
    }

    // Resumed: it carries on after the 20 done, not from the start.
    let mut seen: Vec<ReembedProgress> = Vec::new();
    let outcome = reembed(&pool, target.clone(), &settings, 10, |p| {
        seen.push(p);
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(outcome, ReembedOutcome::Finished { reembedded: 25 });
    assert_eq!(seen.first().unwrap().done, 30);
    assert_eq!(seen.last().unwrap(), &ReembedProgress { done: 45, total: 45 });

    // Nothing lost, every vector of the new length, equal to what the new embedder gives.
    let after = snapshot(&pool).await;
    assert_eq!(after.len(), MEMORIES);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((b.0, &b.1), (a.0, &a.1));
        assert_eq!(a.2, 64);
    }
    let (content, stored): (String, pgvector::Vector) =
        sqlx::query_as("select content, embedding from coach_memory order by id limit 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    let want = target.embed(&[content]).await.unwrap().remove(0);
    assert_eq!(stored.to_vec(), want);
    assert_eq!(recorded(&pool).await, (64, "coachd-offline-hash-v1".to_owned()));
    // The check and the index are back.
    let (checked, indexed): (bool, bool) = sqlx::query_as(
        "select exists (select 1 from pg_constraint where conname = 'coach_memory_embedding_dim'), \
         to_regclass('coach_memory_embedding_hnsw') is not null",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(checked && indexed);

    // A start with the default layout (COACHD_MEMORY_HNSW off) drops the index again.
    start(&url, &[("COACHD_EMBEDDING_DIM", "64")]).await.unwrap();
    let indexed: bool = sqlx::query_scalar("select to_regclass('coach_memory_embedding_hnsw') is not null")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!indexed);
    // A second run has nothing to do.
    let outcome = reembed(&pool, target, &settings, 10, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(outcome, ReembedOutcome::UpToDate);
}

#[tokio::test]
async fn a_new_model_of_the_same_size_is_refused_then_reembedded() {
    let (url, pool) = filled(Arc::new(OfflineEmbedder::new(384))).await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models");
    let dir = dir.to_str().unwrap();
    let local_env = [
        ("COACHD_EMBEDDING_PROVIDER", "local"),
        ("COACHD_EMBEDDING_LOCAL_DIR", dir),
    ];

    let err = start(&url, &local_env).await.unwrap_err();
    assert!(
        matches!(err, StartupError::Memory(SetupError::EmbeddingModel { .. })),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("coachd memory reembed") && message.contains("all-MiniLM-L6-v2"),
        "{message}"
    );

    let local: Arc<dyn Embedder> = Arc::new(
        LocalEmbedder::load(&LocalConfig {
            dir: dir.into(),
            max_tokens: 256,
            threads: 1,
            batch_size: 16,
            queue: 4,
        })
        .unwrap_or_else(|e| panic!("{e} (run scripts/embedder)")),
    );
    let settings = Settings::for_tests(&[]).unwrap().memory;
    let outcome = reembed(&pool, local.clone(), &settings, 16, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ReembedOutcome::Finished {
            reembedded: MEMORIES as u64
        }
    );
    assert_eq!(recorded(&pool).await, (384, "all-MiniLM-L6-v2".to_owned()));
    assert_eq!(snapshot(&pool).await.len(), MEMORIES);

    // The server starts with the local model and searches by meaning now.
    start(&url, &local_env).await.unwrap();
    let store = PgMemoryStore::prepare(pool.clone(), local, &settings)
        .await
        .unwrap();
    let hits = store
        .search_similar("user-0", "coach-1", "getting more clients to buy", 3, -1.0)
        .await
        .unwrap();
    assert!(
        hits[0].memory.text.contains("sales pipeline"),
        "{:?}",
        hits[0].memory.text
    );

    // Back to hashing without its files: start-up names the install command too.
    let err = start(
        &url,
        &[
            ("COACHD_EMBEDDING_PROVIDER", "local"),
            ("COACHD_EMBEDDING_LOCAL_DIR", "/nonexistent-coachd-models"),
        ],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("scripts/embedder"), "{err}");
}
