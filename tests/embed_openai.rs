//! The OpenAI-compatible embedder against the project's fake upstream (`coachd::fake_upstream`):
//! the wire format, batching, order, typed HTTP errors, timeouts, and the whole app embedding
//! memories through it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use coachd::config::Secret;
use coachd::embed::openai::OpenAiConfig;
use coachd::embed::{EmbedError, Embedder, OpenAiEmbedder};
use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use coachd::memory::NewMemory;
use serde_json::json;

const KEY: &str = "sk-embed-test";
const MODEL: &str = "text-embedding-3-small";

fn config(base_url: &str) -> OpenAiConfig {
    OpenAiConfig {
        base_url: url::Url::parse(base_url).unwrap(),
        api_key: Some(Secret::new(KEY)),
        model: MODEL.to_owned(),
        dimension: 8,
        send_dimensions: true,
        batch_size: 3,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("memory number {i} about sales")).collect()
}

#[tokio::test]
async fn inputs_are_batched_and_vectors_come_back_in_order() {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    let embedder = OpenAiEmbedder::new(config(&fake.base_url())).unwrap();

    let inputs = texts(7);
    let vectors = embedder.embed(&inputs).await.unwrap();
    assert_eq!(vectors.len(), 7);
    assert!(vectors.iter().all(|v| v.len() == 8));

    // 7 inputs with a batch size of 3: three requests of 3, 3 and 1.
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let sizes: Vec<usize> = requests
        .iter()
        .map(|r| r.body["input"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    let first = &requests[0];
    assert_eq!(first.path, "/v1/embeddings");
    assert_eq!(first.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(
        first.body,
        json!({"model": MODEL, "input": inputs[..3], "encoding_format": "float", "dimensions": 8})
    );

    // Each vector is the one of its own text, whatever batch it travelled in.
    for (i, text) in inputs.iter().enumerate() {
        let alone = embedder.embed(std::slice::from_ref(text)).await.unwrap();
        assert_eq!(alone[0], vectors[i], "input {i}");
    }
    assert!(embedder.embed(&[]).await.unwrap().is_empty());
    assert_eq!(
        fake.request_count("/embeddings"),
        3 + 7,
        "no request for an empty input"
    );
    assert_eq!((embedder.model(), embedder.dimension()), (MODEL, 8));
}

#[tokio::test]
async fn http_errors_are_typed_with_their_retry_hints() {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    let embedder = OpenAiEmbedder::new(config(&fake.base_url())).unwrap();

    fake.enqueue(MODEL, Script::status(429));
    match embedder.embed(&texts(1)).await.unwrap_err() {
        EmbedError::Http {
            status: 429,
            retryable: true,
            retry_after: Some(wait),
            ..
        } => assert!(wait <= Duration::from_secs(1), "{wait:?}"),
        other => panic!("expected a retryable 429, got {other:?}"),
    }

    fake.enqueue(MODEL, Script::default().with_fault(Fault::Quota));
    let e = embedder.embed(&texts(1)).await.unwrap_err();
    assert!(
        matches!(&e, EmbedError::Http { status: 429, code: Some(c), .. } if c == "insufficient_quota"),
        "{e:?}"
    );
    assert!(!e.retryable(), "an exhausted quota is not retried");

    fake.enqueue(MODEL, Script::status(500));
    let e = embedder.embed(&texts(1)).await.unwrap_err();
    assert!(
        matches!(e, EmbedError::Http { status: 500, .. }) && e.retryable(),
        "{e:?}"
    );

    // A failure in the second batch fails the call: no partial result is returned.
    fake.enqueue(MODEL, Script::default());
    fake.enqueue(MODEL, Script::status(503));
    assert!(matches!(
        embedder.embed(&texts(5)).await,
        Err(EmbedError::Http { status: 503, .. })
    ));

    let mut wrong = config(&fake.base_url());
    wrong.api_key = Some(Secret::new("sk-wrong"));
    let e = OpenAiEmbedder::new(wrong)
        .unwrap()
        .embed(&texts(1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, EmbedError::Http { status: 401, .. }) && !e.retryable(),
        "{e:?}"
    );
    assert!(
        !e.to_string().contains("sk-wrong"),
        "the key never reaches a message: {e}"
    );
}

#[tokio::test]
async fn a_vector_of_another_length_is_refused() {
    let fake = FakeUpstream::start().await.unwrap();
    let mut c = config(&fake.base_url());
    // Without `dimensions` the fake answers text-embedding-3-small's native 1536.
    c.send_dimensions = false;
    let e = OpenAiEmbedder::new(c)
        .unwrap()
        .embed(&texts(2))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        EmbedError::Dimension {
            expected: 8,
            got: 1536
        }
    );
    assert!(fake.requests()[0].body.get("dimensions").is_none());
}

#[tokio::test]
async fn a_slow_or_absent_provider_is_a_timeout_or_a_connect_error() {
    let fake = FakeUpstream::start().await.unwrap();
    let mut c = config(&fake.base_url());
    c.timeout = Duration::from_millis(200);
    let slow = Script {
        header_delay: Duration::from_secs(2),
        ..Script::default()
    };
    fake.enqueue(MODEL, slow);
    let e = OpenAiEmbedder::new(c)
        .unwrap()
        .embed(&texts(1))
        .await
        .unwrap_err();
    assert_eq!(e, EmbedError::Timeout(Duration::from_millis(200)));
    assert!(e.retryable());

    // Port 1 on loopback: nothing listens there.
    let e = OpenAiEmbedder::new(config("http://127.0.0.1:1/v1"))
        .unwrap()
        .embed(&texts(1))
        .await
        .unwrap_err();
    assert!(matches!(e, EmbedError::Connect(_)), "{e:?}");
}

/// The whole app with COACHD_EMBEDDING_PROVIDER=openai: memories are embedded by the fake, the
/// dimension is recorded in PostgreSQL, and an embedding failure answers 502 `embedding_failed`.
#[tokio::test]
async fn the_app_embeds_memories_through_the_openai_provider() {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    let base = fake.base_url();
    let app = common::spawn_app(&[
        ("COACHD_EMBEDDING_PROVIDER", "openai"),
        ("COACHD_EMBEDDING_BASE_URL", &base),
        ("COACHD_EMBEDDING_API_KEY", KEY),
        ("COACHD_EMBEDDING_DIM", "64"),
    ])
    .await;
    assert_eq!(app.state.embedder.dimension(), 64);

    let memory = |text: &str| NewMemory {
        dedup_key: None,
        text: text.to_owned(),
        user_id: "1".to_owned(),
        coach_id: "2".to_owned(),
        memory_type: "insight".to_owned(),
        metadata: json!({}),
    };
    app.state
        .memory
        .store_batch(vec![
            memory("grow the sales pipeline"),
            memory("sleep before board meetings"),
        ])
        .await
        .unwrap();
    assert_eq!(fake.request_count("/embeddings"), 1, "one batched request");

    let resp = app
        .get("/ai/coach/memory/1/2?query=sales%20pipeline&limit=1")
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["memories"][0]["text"], "grow the sales pipeline");

    let pool = app.state.db.clone().unwrap();
    let (dim, model): (i32, String) =
        sqlx::query_as("select embedding_dim, embedding_model from coach_memory_settings")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((dim, model.as_str()), (64, MODEL));

    fake.enqueue(MODEL, Script::status(500));
    let resp = app.get("/ai/coach/memory/1/2?query=sales").await;
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "embedding_failed");
    app.stop().await.unwrap();
}
