//! The memory store: one behaviour suite run against PostgreSQL + pgvector (default layout, no
//! vector index) and against the in-process store, then what only PostgreSQL has: the per-pair
//! search over a crowded table, exact without the index and through a crowded HNSW index
//! (`COACHD_MEMORY_HNSW=on`), the index following the setting, and the dimension recorded at
//! start-up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use coachd::Settings;
use coachd::embed::{Embedder, OfflineEmbedder};
use coachd::memory::MemorySettings;
use coachd::memory::SetupError;
use coachd::memory::{InProcessMemoryStore, MemoryLimits, MemoryStore, NewMemory, PgMemoryStore, StoreError};
use coachd::startup::StartupError;
use pgvector::Vector;
use serde_json::json;
use sqlx::PgPool;

const DIM: usize = 384;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Pg,
    InProcess,
}

fn memory_settings(overrides: &[(&str, &str)]) -> MemorySettings {
    Settings::for_tests(overrides).unwrap().memory
}

async fn fresh_pool() -> PgPool {
    let url = common::fresh_database().await;
    let settings = Settings::for_tests(&[("DATABASE_URL", &url)]).unwrap();
    let pool = coachd::db::connect(settings.database_url.as_ref().unwrap(), &settings)
        .await
        .unwrap();
    coachd::db::migrate(&pool).await.unwrap();
    pool
}

/// A new pool on an existing test database, so database-level settings apply to its connections.
async fn fresh_pool_of(db: &str) -> PgPool {
    let mut url = url::Url::parse(&common::admin_database_url()).unwrap();
    url.set_path(db);
    PgPool::connect(url.as_str()).await.unwrap()
}

fn embedder() -> Arc<dyn Embedder> {
    Arc::new(OfflineEmbedder::new(DIM))
}

async fn store_of(kind: Kind, overrides: &[(&str, &str)]) -> Arc<dyn MemoryStore> {
    let settings = memory_settings(overrides);
    match kind {
        Kind::Pg => Arc::new(
            PgMemoryStore::prepare(fresh_pool().await, embedder(), &settings)
                .await
                .unwrap(),
        ),
        Kind::InProcess => Arc::new(
            InProcessMemoryStore::new(embedder(), MemoryLimits::from(&settings), settings.embedded_max)
                .with_merge_similarity(settings.merge_similarity),
        ),
    }
}

fn new(user: &str, coach: &str, kind: &str, text: &str) -> NewMemory {
    NewMemory {
        dedup_key: None,
        text: text.to_owned(),
        user_id: user.to_owned(),
        coach_id: coach.to_owned(),
        memory_type: kind.to_owned(),
        metadata: json!({}),
    }
}

/// Every behaviour test runs once per store: `<test>::pg` and `<test>::in_process`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn pg() {
                super::$name(super::Kind::Pg).await;
            }
            #[tokio::test]
            async fn in_process() {
                super::$name(super::Kind::InProcess).await;
            }
        }
    )*};
}

on_both_stores!(
    stored_memories_are_listed_newest_first_with_paging,
    an_exact_duplicate_is_stored_once,
    a_memory_with_a_dedup_key_is_stored_once_per_key_whatever_its_text,
    a_batch_reports_outcomes_in_input_order,
    search_ranks_related_memories_first,
    search_stays_within_the_pair_and_honours_min_similarity,
    delete_clear_and_erase_remove_exactly_their_memories,
    integer_and_uuid_ids_both_work,
    invalid_input_is_refused,
    limits_are_capped_at_the_list_maximum,
    near_duplicates_merge_only_when_the_setting_is_on,
);

async fn stored_memories_are_listed_newest_first_with_paging(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut m = new("1", "2", "insight", &format!("memory number {i}"));
        m.metadata = json!({"n": i});
        let out = store.store(m).await.unwrap();
        assert!(out.created);
        ids.push(out.id);
    }
    let (page, total) = store.list("1", "2", 2, 0).await.unwrap();
    assert_eq!(total, 5);
    assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[4], ids[3]]);
    assert_eq!(page[0].text, "memory number 4");
    assert_eq!(page[0].metadata, json!({"n": 4}));
    assert_eq!((page[0].user_id.as_str(), page[0].coach_id.as_str()), ("1", "2"));
    assert_eq!(page[0].memory_type, "insight");

    let (page, _) = store.list("1", "2", 2, 4).await.unwrap();
    assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[0]]);
    let (page, total) = store.list("1", "2", 10, 99).await.unwrap();
    assert!(page.is_empty());
    assert_eq!(total, 5);
    let (page, total) = store.list("1", "2", 0, 0).await.unwrap();
    assert!(page.is_empty(), "limit 0 only counts");
    assert_eq!(total, 5);
    assert_eq!(store.list("1", "other", 10, 0).await.unwrap().1, 0);
}

async fn a_memory_with_a_dedup_key_is_stored_once_per_key_whatever_its_text(kind: Kind) {
    // Write-behind keys a conversation turn by session and turn: a turn one node finished and
    // another ended as interrupted (a split) is one memory, the first text written.
    let store = store_of(kind, &[]).await;
    let turn = |text: &str, key: &str| NewMemory {
        dedup_key: Some(key.to_owned()),
        ..new("1", "2", "conversation", text)
    };
    let first = store
        .store(turn("User: hi\nCoach: the whole reply", "turn s1 3"))
        .await
        .unwrap();
    assert!(first.created);
    let again = store
        .store(turn("User: hi\nCoach: the whole", "turn s1 3"))
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (first.id, false));
    let other = store
        .store(turn("User: hi\nCoach: the whole reply", "turn s1 4"))
        .await
        .unwrap();
    assert!(
        other.created,
        "another key is another memory, even with the same text"
    );
    let (listed, total) = store.list("1", "2", 10, 0).await.unwrap();
    assert_eq!(total, 2);
    assert!(
        listed
            .iter()
            .all(|m| m.text == "User: hi\nCoach: the whole reply")
    );
}

async fn an_exact_duplicate_is_stored_once(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let first = store
        .store(new("1", "2", "insight", "Wants to hire a sales lead"))
        .await
        .unwrap();
    assert!(first.created);
    let again = store
        .store(new("1", "2", "insight", "  Wants to hire a sales lead\n"))
        .await
        .unwrap();
    assert_eq!(
        (again.id, again.created),
        (first.id, false),
        "same text after trimming"
    );
    assert!(
        store
            .store(new("1", "2", "goal", "Wants to hire a sales lead"))
            .await
            .unwrap()
            .created
    );
    assert!(
        store
            .store(new("1", "3", "insight", "Wants to hire a sales lead"))
            .await
            .unwrap()
            .created
    );
    assert!(
        store
            .store(new("9", "2", "insight", "Wants to hire a sales lead"))
            .await
            .unwrap()
            .created
    );
    assert!(
        store
            .store(new("1", "2", "insight", "wants to hire a sales lead"))
            .await
            .unwrap()
            .created
    );
    assert_eq!(store.list("1", "2", 10, 0).await.unwrap().1, 3);

    // Deleted, then stored again: a new memory.
    assert!(store.delete("1", "2", first.id).await.unwrap());
    let back = store
        .store(new("1", "2", "insight", "Wants to hire a sales lead"))
        .await
        .unwrap();
    assert!(back.created);
    assert_ne!(back.id, first.id);
}

async fn a_batch_reports_outcomes_in_input_order(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let existing = store
        .store(new("1", "2", "insight", "already here"))
        .await
        .unwrap();
    let outcomes = store
        .store_batch(vec![
            new("1", "2", "insight", "first new"),
            new("1", "2", "insight", "already here"),
            new("1", "2", "insight", "second new"),
            new("1", "2", "insight", "first new"),
        ])
        .await
        .unwrap();
    let created: Vec<bool> = outcomes.iter().map(|o| o.created).collect();
    assert_eq!(created, [true, false, true, false]);
    assert_eq!(outcomes[1].id, existing.id);
    assert_eq!(
        outcomes[3].id, outcomes[0].id,
        "a duplicate inside the batch gets the first's id"
    );
    assert_eq!(store.list("1", "2", 10, 0).await.unwrap().1, 3);
    assert!(store.store_batch(Vec::new()).await.unwrap().is_empty());
}

async fn search_ranks_related_memories_first(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let texts = [
        "User wants to improve their sales funnel",
        "Sales team misses its quarterly sales targets",
        "Feels tired and sleeps badly before board meetings",
        "Plans a family holiday in Portugal",
        "Hiring a head of engineering is the top priority",
    ];
    for t in texts {
        store.store(new("1", "2", "insight", t)).await.unwrap();
    }
    let found = store
        .search_similar("1", "2", "sales optimization strategies for the funnel", 3, -1.0)
        .await
        .unwrap();
    assert_eq!(found.len(), 3);
    let top: Vec<&str> = found.iter().take(2).map(|s| s.memory.text.as_str()).collect();
    assert!(top.contains(&texts[0]) && top.contains(&texts[1]), "{top:?}");
    assert!(found[0].similarity > 0.2, "{found:?}");
    assert!(
        found[0].similarity > found[2].similarity + 0.1,
        "clearly higher: {found:?}"
    );
    for w in found.windows(2) {
        assert!(
            w[0].similarity >= w[1].similarity,
            "ordered by similarity: {found:?}"
        );
    }
    for s in &found {
        assert!((-1.0..=1.0001).contains(&s.similarity));
    }
    let all = store.search_similar("1", "2", "sales", 100, -1.0).await.unwrap();
    assert_eq!(all.len(), 5, "no more than exist");
}

async fn search_stays_within_the_pair_and_honours_min_similarity(kind: Kind) {
    let store = store_of(kind, &[]).await;
    store
        .store(new("1", "2", "insight", "quarterly sales targets"))
        .await
        .unwrap();
    store
        .store(new("1", "2", "insight", "sleeping badly"))
        .await
        .unwrap();
    store
        .store(new("1", "3", "insight", "quarterly sales targets for coach 3"))
        .await
        .unwrap();
    store
        .store(new("5", "2", "insight", "quarterly sales targets of user 5"))
        .await
        .unwrap();

    let found = store
        .search_similar("1", "2", "sales targets", 10, -1.0)
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
    assert!(
        found
            .iter()
            .all(|s| s.memory.user_id == "1" && s.memory.coach_id == "2")
    );

    let strict = store
        .search_similar("1", "2", "sales targets", 10, 0.3)
        .await
        .unwrap();
    assert_eq!(strict.len(), 1, "{strict:?}");
    assert_eq!(strict[0].memory.text, "quarterly sales targets");
    assert!(strict[0].similarity >= 0.3);

    assert!(
        store
            .search_similar("1", "9", "sales", 10, -1.0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .search_similar("1", "2", "sales", 0, -1.0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn delete_clear_and_erase_remove_exactly_their_memories(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let a = store.store(new("1", "2", "insight", "a")).await.unwrap();
    store.store(new("1", "2", "insight", "b")).await.unwrap();
    store.store(new("1", "3", "insight", "c")).await.unwrap();
    store.store(new("1", "4", "insight", "d")).await.unwrap();
    let other = store.store(new("7", "2", "insight", "e")).await.unwrap();

    assert!(
        !store.delete("1", "3", a.id).await.unwrap(),
        "another pair's memory"
    );
    assert!(
        !store.delete("7", "2", a.id).await.unwrap(),
        "another user's memory"
    );
    assert!(store.delete("1", "2", a.id).await.unwrap());
    assert!(!store.delete("1", "2", a.id).await.unwrap(), "already gone");
    assert!(!store.delete("1", "2", uuid::Uuid::now_v7()).await.unwrap());

    assert_eq!(store.clear("1", "2").await.unwrap(), 1);
    assert_eq!(store.clear("1", "2").await.unwrap(), 0);
    assert_eq!(
        store.list("1", "3", 10, 0).await.unwrap().1,
        1,
        "other coaches untouched"
    );

    assert_eq!(store.erase_user("1").await.unwrap(), 2);
    assert_eq!(store.list("1", "3", 10, 0).await.unwrap().1, 0);
    assert_eq!(store.list("1", "4", 10, 0).await.unwrap().1, 0);
    let (left, total) = store.list("7", "2", 10, 0).await.unwrap();
    assert_eq!((left[0].id, total), (other.id, 1), "other users untouched");
}

async fn integer_and_uuid_ids_both_work(kind: Kind) {
    let store = store_of(kind, &[]).await;
    let user = uuid::Uuid::new_v4().to_string();
    let coach = uuid::Uuid::new_v4().to_string();
    store
        .store(new(&user, &coach, "insight", "uuid ids"))
        .await
        .unwrap();
    store
        .store(new("12345", "7", "insight", "integer ids"))
        .await
        .unwrap();
    assert_eq!(
        store.list(&user, &coach, 10, 0).await.unwrap().0[0].text,
        "uuid ids"
    );
    assert_eq!(
        store.list("12345", "7", 10, 0).await.unwrap().0[0].text,
        "integer ids"
    );
}

async fn invalid_input_is_refused(kind: Kind) {
    let store = store_of(kind, &[("COACHD_MEMORY_MAX_TEXT_BYTES", "20")]).await;
    fn invalid<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Invalid(_)))
    }
    assert!(invalid(store.store(new("1", "2", "insight", "   ")).await));
    assert!(invalid(
        store.store(new("1", "2", "insight", &"x".repeat(21))).await
    ));
    assert!(invalid(store.store(new("", "2", "insight", "x")).await));
    assert!(invalid(store.store(new("1", "2", "", "x")).await));
    let mut m = new("1", "2", "insight", "x");
    m.metadata = json!("not an object");
    assert!(invalid(store.store(m).await));
    assert!(invalid(store.search_similar("1", "2", " ", 5, 0.0).await));
    assert!(invalid(
        store.search_similar("1", "2", &"q".repeat(21), 5, 0.0).await
    ));
    // A batch with one bad memory stores nothing.
    let batch = vec![new("1", "2", "insight", "good"), new("1", "2", "insight", "")];
    assert!(invalid(store.store_batch(batch).await));
    assert_eq!(store.list("1", "2", 10, 0).await.unwrap().1, 0);
}

async fn limits_are_capped_at_the_list_maximum(kind: Kind) {
    let store = store_of(kind, &[("COACHD_MEMORY_LIST_MAX", "3")]).await;
    let batch = (0..5)
        .map(|i| new("1", "2", "insight", &format!("note {i}")))
        .collect();
    store.store_batch(batch).await.unwrap();
    assert_eq!(store.list("1", "2", 100, 0).await.unwrap().0.len(), 3);
    assert_eq!(
        store
            .search_similar("1", "2", "note", 100, -1.0)
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn both_stores_agree_on_order_and_similarity() {
    let pg = store_of(Kind::Pg, &[]).await;
    let mem = store_of(Kind::InProcess, &[]).await;
    let texts = [
        "Struggles to delegate to the new managers",
        "Wants to raise a seed round next spring",
        "Delegation and trust in the management team",
        "Runs every morning to clear the head",
    ];
    for store in [&pg, &mem] {
        for t in texts {
            store.store(new("1", "2", "insight", t)).await.unwrap();
        }
    }
    let query = "how to delegate to managers";
    let a = pg.search_similar("1", "2", query, 4, -1.0).await.unwrap();
    let b = mem.search_similar("1", "2", query, 4, -1.0).await.unwrap();
    let texts_a: Vec<&str> = a.iter().map(|s| s.memory.text.as_str()).collect();
    let texts_b: Vec<&str> = b.iter().map(|s| s.memory.text.as_str()).collect();
    assert_eq!(texts_a, texts_b);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.similarity - y.similarity).abs() < 1e-4, "{x:?} vs {y:?}");
    }
}

// ---- PostgreSQL only -------------------------------------------------------------------------

/// A unit vector close to `q` (cosine about 0.95): other users' memories that crowd the HNSW
/// neighbourhood of the query, so a post-filtered scan finds none of the target user's rows.
fn near(q: &[f32], seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v: Vec<f32> = q
        .iter()
        .map(|x| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 2_000) as f32 / 1_000.0 - 1.0;
            x + noise * 0.015
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Inserts `n` memories of other users with vectors near `q`, in a few multi-row inserts.
async fn crowd(pool: &PgPool, coach: &str, q: &[f32], n: usize) {
    const CHUNK: usize = 2_500;
    for start in (0..n).step_by(CHUNK) {
        let rows: Vec<usize> = (start..(start + CHUNK).min(n)).collect();
        let ids: Vec<uuid::Uuid> = rows.iter().map(|_| uuid::Uuid::now_v7()).collect();
        let users: Vec<String> = rows.iter().map(|i| format!("other-{}", i % 1_000)).collect();
        let texts: Vec<String> = rows.iter().map(|i| format!("crowding memory {i}")).collect();
        let hashes: Vec<Vec<u8>> = texts.iter().map(|t| sha(t)).collect();
        let vectors: Vec<Vector> = rows.iter().map(|i| Vector::from(near(q, *i as u64))).collect();
        sqlx::query(
            "insert into coach_memory (id, user_id, coach_id, memory_type, content, content_hash, embedding) \
             select id, u, $2, 'insight', t, h, e \
             from unnest($1::uuid[], $3::text[], $4::text[], $5::bytea[], $6::vector[]) as x(id, u, t, h, e)",
        )
        .bind(&ids)
        .bind(coach)
        .bind(&users)
        .bind(&texts)
        .bind(&hashes)
        .bind(&vectors)
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query("analyze coach_memory").execute(pool).await.unwrap();
}

fn sha(text: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).to_vec()
}

/// 20 000 memories of other users nearer the query than any of the target user's 30: the
/// search still returns exactly `limit` of the target's, in the exact similarity order. Run
/// with the default layout (no vector index: an exact scan of the pair), then with
/// `COACHD_MEMORY_HNSW=on` and the planner free to choose, then with the btree indexes gone and a
/// tiny scan budget, so the HNSW iterative scan comes back short and the exact fallback has to
/// fill in; and a start with the setting off again drops the index.
#[tokio::test]
async fn a_per_user_search_never_returns_fewer_than_limit_rows_that_exist() {
    const LIMIT: usize = 10;
    let pool = fresh_pool().await;
    let e = OfflineEmbedder::new(DIM);
    let query = "pricing strategy for the enterprise sales team";
    let q = e.embed_one(query);
    let store = PgMemoryStore::prepare(pool.clone(), embedder(), &memory_settings(&[]))
        .await
        .unwrap();
    let hnsw_on = || memory_settings(&[("COACHD_MEMORY_HNSW", "on")]);
    let indexed = |pool: PgPool| async move {
        sqlx::query_scalar::<_, bool>("select to_regclass('coach_memory_embedding_hnsw') is not null")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert!(!indexed(pool.clone()).await, "no vector index by default");

    let topics = [
        "pricing",
        "enterprise",
        "sales",
        "team",
        "strategy",
        "hiring",
        "sleep",
        "fundraising",
        "family",
        "marketing",
    ];
    let mut expected: Vec<(f32, String)> = Vec::new();
    let batch: Vec<NewMemory> = (0..30)
        .map(|i| {
            let text = format!(
                "note {i}: {} and {} discussed",
                topics[i % topics.len()],
                topics[(i * 7 + 3) % topics.len()]
            );
            let v = e.embed_one(&text);
            expected.push((v.iter().zip(&q).map(|(a, b)| a * b).sum(), text.clone()));
            new("target", "coach-1", "insight", &text)
        })
        .collect();
    store.store_batch(batch).await.unwrap();
    crowd(&pool, "coach-1", &q, 20_000).await;
    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
    let expected: Vec<&str> = expected.iter().take(LIMIT).map(|(_, t)| t.as_str()).collect();

    let check = |found: Vec<coachd::memory::ScoredMemory>, label: &str| {
        assert_eq!(found.len(), LIMIT, "{label}: exactly limit rows");
        assert!(found.iter().all(|s| s.memory.user_id == "target"), "{label}");
        for w in found.windows(2) {
            assert!(w[0].similarity >= w[1].similarity, "{label}: ordered");
        }
        let got: Vec<&str> = found.iter().map(|s| s.memory.text.as_str()).collect();
        // Equal similarities may swap places; compare the sets and the score sequence.
        let mut a = got.clone();
        let mut b = expected.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{label}: the {LIMIT} most similar of the target's memories");
    };
    let plan = store
        .explain_search("target", "coach-1", query, LIMIT)
        .await
        .unwrap();
    assert!(
        plan.contains("coach_memory_owner") || plan.contains("coach_memory_dedup"),
        "the pair is read through its btree:\n{plan}"
    );
    check(
        store
            .search_similar("target", "coach-1", query, LIMIT, -1.0)
            .await
            .unwrap(),
        "no vector index, exact scan of the pair",
    );
    assert_eq!(store.stats().exact_fallbacks, 0, "no HNSW scan to fall back from");

    // Built once over the loaded rows (much faster than growing it row by row), as at a start.
    let store = PgMemoryStore::prepare(pool.clone(), embedder(), &hnsw_on())
        .await
        .unwrap();
    assert!(
        indexed(pool.clone()).await,
        "COACHD_MEMORY_HNSW=on builds the index"
    );
    check(
        store
            .search_similar("target", "coach-1", query, LIMIT, -1.0)
            .await
            .unwrap(),
        "HNSW index kept, planner's choice",
    );

    // A selective filter makes the planner prefer an exact scan of the pair (as it should). To
    // exercise the HNSW path, drop the btree indexes that lead with (user_id, coach_id) and
    // forbid sequential scans in this test database: the HNSW index is all that is left.
    for index in ["coach_memory_owner", "coach_memory_dedup"] {
        sqlx::query(&format!("drop index {index}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(&format!(r#"alter database "{db}" set enable_seqscan = off"#))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let pool = fresh_pool_of(&db).await;
    let squeezed = PgMemoryStore::prepare(
        pool.clone(),
        embedder(),
        &memory_settings(&[
            ("COACHD_MEMORY_HNSW", "on"),
            ("COACHD_MEMORY_MAX_SCAN_TUPLES", "200"),
            ("COACHD_MEMORY_EF_SEARCH", "10"),
        ]),
    )
    .await
    .unwrap();
    let plan = squeezed
        .explain_search("target", "coach-1", query, LIMIT)
        .await
        .unwrap();
    assert!(
        plan.contains("coach_memory_embedding_hnsw"),
        "the HNSW index is used:\n{plan}"
    );
    check(
        squeezed
            .search_similar("target", "coach-1", query, LIMIT, -1.0)
            .await
            .unwrap(),
        "HNSW scan cut short, exact fallback",
    );
    assert_eq!(squeezed.stats().exact_fallbacks, 1, "the fallback ran");
    let store = PgMemoryStore::prepare(pool.clone(), embedder(), &hnsw_on())
        .await
        .unwrap();
    check(
        store
            .search_similar("target", "coach-1", query, LIMIT, -1.0)
            .await
            .unwrap(),
        "HNSW iterative scan with the default budget",
    );

    // Back to the default: the start drops the index, and the search (now a sequential scan, the
    // btrees being gone too) is still exact.
    let store = PgMemoryStore::prepare(pool.clone(), embedder(), &memory_settings(&[]))
        .await
        .unwrap();
    assert!(
        !indexed(pool.clone()).await,
        "COACHD_MEMORY_HNSW=off drops the index"
    );
    check(
        store
            .search_similar("target", "coach-1", query, LIMIT, -1.0)
            .await
            .unwrap(),
        "index dropped, exact scan",
    );
}

#[tokio::test]
async fn a_different_dimension_fails_start_up_naming_both() {
    let url = common::fresh_database().await;
    let app = coachd::Application::build(
        Settings::for_tests(&[("DATABASE_URL", &url), ("COACHD_EMBEDDING_DIM", "384")]).unwrap(),
    )
    .await
    .unwrap();
    drop(app);
    let err = coachd::Application::build(
        Settings::for_tests(&[("DATABASE_URL", &url), ("COACHD_EMBEDDING_DIM", "8")]).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            StartupError::Memory(SetupError::EmbeddingDimension {
                configured: 8,
                stored: 384
            })
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("COACHD_EMBEDDING_DIM is 8")
            && message.contains("384")
            && message.contains("coachd memory reembed"),
        "{message}"
    );

    // The same dimension again is fine.
    coachd::Application::build(
        Settings::for_tests(&[("DATABASE_URL", &url), ("COACHD_EMBEDDING_DIM", "384")]).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_first_starts_record_the_dimension_once() {
    let pool = fresh_pool().await;
    let settings = memory_settings(&[]);
    let starts = (0..4).map(|_| PgMemoryStore::prepare(pool.clone(), embedder(), &settings));
    for result in futures::future::join_all(starts).await {
        result.unwrap();
    }
    let rows: Vec<(i32, String)> =
        sqlx::query_as("select embedding_dim, embedding_model from coach_memory_settings")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, [(384, "coachd-offline-hash-v1".to_owned())]);
}

#[tokio::test]
async fn the_database_refuses_vectors_of_another_dimension() {
    let pool = fresh_pool().await;
    PgMemoryStore::prepare(pool.clone(), embedder(), &memory_settings(&[]))
        .await
        .unwrap();
    let err = sqlx::query(
        "insert into coach_memory (id, user_id, coach_id, memory_type, content, content_hash, embedding) \
         values ($1, '1', '2', 'insight', 'x', '\\x00', $2)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(Vector::from(vec![1.0_f32, 0.0, 0.0]))
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("coach_memory_embedding_dim"), "{err}");
}

fn note(text: &str, memory_type: &str) -> NewMemory {
    NewMemory {
        dedup_key: None,
        text: text.to_owned(),
        user_id: "u-merge".to_owned(),
        coach_id: "c-merge".to_owned(),
        memory_type: memory_type.to_owned(),
        metadata: json!({}),
    }
}

async fn near_duplicates_merge_only_when_the_setting_is_on(kind: Kind) {
    // Off by default: a reworded copy is stored again.
    let off = store_of(kind, &[]).await;
    let first = off
        .store_batch(vec![note("I run every morning before work", "habit")])
        .await
        .unwrap()[0];
    let again = off
        .store_batch(vec![note("I run every morning before work!", "habit")])
        .await
        .unwrap()[0];
    assert!(first.created && again.created && first.id != again.id);

    let on = store_of(kind, &[("COACHD_MEMORY_MERGE_SIMILARITY", "0.95")]).await;
    let first = on
        .store_batch(vec![note("I run every morning before work", "habit")])
        .await
        .unwrap()[0];
    let later = on
        .store_batch(vec![note(
            "my manager wants the quarterly report by Friday",
            "goal",
        )])
        .await
        .unwrap()[0];
    let created_at =
        |page: &[coachd::memory::Memory], id| page.iter().find(|m| m.id == id).map(|m| m.created_at).unwrap();
    let (page, _) = on.list("u-merge", "c-merge", 10, 0).await.unwrap();
    let before = created_at(&page, first.id);
    assert_eq!(page[0].id, later.id, "newest first before the merge");
    let outcomes = on
        .store_batch(vec![
            note("I run every morning before work!", "habit"),
            note("I run every morning before work!", "goal"),
            note("my manager wants the quarterly report by Friday", "habit"),
            // Near-copies inside one batch are compared with stored rows only: both are stored.
            note("the team offsite is in March in Lisbon", "insight"),
            note("the team offsite is in March in Lisbon!", "insight"),
        ])
        .await
        .unwrap();
    // The near-copy is merged into the first memory, refreshing its timestamp.
    assert_eq!((outcomes[0].id, outcomes[0].created), (first.id, false));
    // Another type, an unrelated text and a near-copy within the batch are stored.
    assert!(outcomes[1..].iter().all(|o| o.created), "{outcomes:?}");
    let (page, total) = on.list("u-merge", "c-merge", 10, 0).await.unwrap();
    assert_eq!(total, 6);
    let after = created_at(&page, first.id);
    assert!(after > before, "{before} then {after}");
    // The merged memory now lists before the one stored after it (newest first by timestamp).
    let rank = |id| page.iter().position(|m| m.id == id).unwrap();
    assert!(rank(first.id) < rank(later.id), "{page:#?}");
}
