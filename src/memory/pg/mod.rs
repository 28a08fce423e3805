//! The PostgreSQL + pgvector memory store. Embeddings live in an untyped `vector` column; the
//! dimension is recorded on first start and guarded by a check constraint, so a changed
//! `COACHD_EMBEDDING_DIM` fails start-up instead of corrupting searches.
//!
//! The layout is chosen by measurement (BENCHMARKS.md, "Coach memory"): by default there is no
//! vector index. A search is per (user, coach) pair, an exact scan of that pair's rows through the
//! btree on (user_id, coach_id) — under a millisecond at a million rows — while every insert
//! into an HNSW graph costs ~10 ms of CPU and held writes to ~90 memories/s. `COACHD_MEMORY_HNSW=on`
//! keeps an HNSW cosine index on `embedding::vector(n)` for deployments whose pairs hold many
//! thousands of memories; searches then use the same expression so the planner can pick it,
//! with an iterative scan and an exact fallback.
//!
//! Why not a typed `vector(n)` column: a migration cannot know `n`, and one column per dimension
//! would need DDL per deployment anyway. The expression index gives the same speed.
//!
//! `setup` checks and prepares the database at start-up; `store` answers the `MemoryStore`
//! calls; `reembed` moves every memory to another embedder; this file holds the store, its SQL and the helpers both share.

mod reembed;
mod setup;
mod store;

pub use reembed::{ReembedOutcome, ReembedProgress, reembed};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Memory, MemoryLimits, Prepared, StoreError, check_query};
use crate::embed::{EmbedError, Embedder};

/// Largest dimension an HNSW index takes for `vector`.
pub const MAX_INDEXED_DIMENSION: usize = 2_000;

/// The HNSW index kept when `COACHD_MEMORY_HNSW` is on.
pub const HNSW_INDEX: &str = "coach_memory_embedding_hnsw";

/// Stores and searches memories in PostgreSQL with pgvector.
#[derive(Debug, Clone)]
pub struct PgMemoryStore {
    pool: PgPool,
    embedder: Arc<dyn Embedder>,
    limits: MemoryLimits,
    /// `BEGIN` plus the HNSW search settings, sent as one simple query (one round trip).
    begin_search_sql: String,
    dimension: usize,
    /// `COACHD_MEMORY_HNSW`: searches go through the HNSW index (with the exact fallback) rather
    /// than straight to the exact scan of the pair.
    hnsw: bool,
    /// `COACHD_MEMORY_MERGE_SIMILARITY`; `None` when merging is off.
    merge_similarity: Option<f32>,
    sql: Arc<Sql>,
    stats: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    searches: AtomicU64,
    exact_fallbacks: AtomicU64,
}

/// How searches went since start: how often the HNSW scan came back short and the exact scan of
/// the pair had to fill in. Many fallbacks call for a larger `COACHD_MEMORY_MAX_SCAN_TUPLES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SearchStats {
    /// Similarity searches run.
    pub searches: u64,
    /// Of those, how many needed the exact fallback.
    pub exact_fallbacks: u64,
}

/// Statements that name the dimension, built once.
#[derive(Debug)]
struct Sql {
    search_index: String,
    search_exact: String,
}

impl Sql {
    fn new(dimension: usize) -> Self {
        let typed = typed_embedding(dimension);
        let columns = "id, user_id, coach_id, memory_type, content, metadata, created_at";
        Self {
            // Ordered by the indexed expression, so the planner may use the HNSW index; with
            // hnsw.iterative_scan it keeps scanning until `limit` rows of this pair are found.
            // The pair's row count rides along (an uncorrelated subquery, run once), so a short
            // answer needs no second round trip to tell "the pair has no more" from "the scan
            // stopped early".
            search_index: format!(
                "select {columns}, 1 - ({typed} <=> $3) as similarity, \
                 (select count(*) from coach_memory where user_id = $1 and coach_id = $2) as pair_total \
                 from coach_memory \
                 where user_id = $1 and coach_id = $2 order by {typed} <=> $3 limit $4"
            ),
            // Ordered by the untyped column, which the index (on `embedding::vector(n)`) does not
            // match: always an exact scan of the pair's rows through the btree on (user_id,
            // coach_id), with a top-N sort (memory bounded by `limit`, however large the pair).
            // Without the index (the default) this is the whole search: one statement, no
            // transaction.
            search_exact: format!(
                "select {columns}, 1 - (embedding <=> $3) as similarity from coach_memory \
                 where user_id = $1 and coach_id = $2 order by embedding <=> $3, id desc limit $4"
            ),
        }
    }
}

/// `(embedding::vector(n))`. A type modifier cannot be a bound parameter, so the dimension is
/// formatted into the SQL; that is safe because it is a `usize` checked to be within
/// 1..=MAX_INDEXED_DIMENSION, never text from outside.
fn typed_embedding(dimension: usize) -> String {
    format!("(embedding::vector({dimension}))")
}

impl PgMemoryStore {
    /// Search counters since this store was built.
    pub fn stats(&self) -> SearchStats {
        SearchStats {
            searches: self.stats.searches.load(Ordering::Relaxed),
            exact_fallbacks: self.stats.exact_fallbacks.load(Ordering::Relaxed),
        }
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vector>, StoreError> {
        let vectors = self.embedder.embed(texts).await?;
        if vectors.len() != texts.len() {
            return Err(StoreError::Embed(EmbedError::Decode(format!(
                "{} vectors for {} texts",
                vectors.len(),
                texts.len()
            ))));
        }
        vectors
            .into_iter()
            .map(|v| {
                if v.len() == self.dimension {
                    Ok(Vector::from(v))
                } else {
                    Err(StoreError::Embed(EmbedError::Dimension {
                        expected: self.dimension,
                        got: v.len(),
                    }))
                }
            })
            .collect()
    }

    /// A transaction with the HNSW search settings applied to it alone: SET LOCAL ends with the
    /// transaction, so nothing leaks to the next user of the pooled connection. BEGIN and the
    /// settings go in one round trip: every turn's prompt waits for this search.
    async fn begin_search(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.pool.begin_with(self.begin_search_sql.clone()).await?)
    }

    /// The plan of [`MemoryStore::search_similar`] (its first, index step with
    /// `COACHD_MEMORY_HNSW` on), for diagnostics, tests and the benchmark: it names
    /// `coach_memory_embedding_hnsw` when the HNSW index is used.
    pub async fn explain_search(
        &self,
        user_id: &str,
        coach_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<String, StoreError> {
        check_query(query, &self.limits)?;
        let q = self
            .embed(&[query.to_owned()])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Embed(EmbedError::Decode("no vector for the query".to_owned())))?;
        let sql = if self.hnsw {
            &self.sql.search_index
        } else {
            &self.sql.search_exact
        };
        let mut tx = self.begin_search().await?;
        let lines: Vec<String> = sqlx::query_scalar(&format!("explain (costs off) {sql}"))
            .bind(user_id)
            .bind(coach_id)
            .bind(&q)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(lines.join("\n"))
    }

    /// Ids of the stored memories among `keys`, by position in `keys`.
    async fn existing(&self, keys: &[&Prepared]) -> Result<HashMap<usize, Uuid>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(i64, Uuid)> = sqlx::query_as(
            "select k.ord, m.id \
             from unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) \
                  with ordinality as k(user_id, coach_id, memory_type, content_hash, ord) \
             join coach_memory m using (user_id, coach_id, memory_type, content_hash)",
        )
        .bind(keys.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|p| p.coach_id.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|p| p.memory_type.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|p| p.hash.to_vec()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(ord, id)| Some((usize::try_from(ord).ok()?.checked_sub(1)?, id)))
            .collect())
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: Uuid,
    user_id: String,
    coach_id: String,
    memory_type: String,
    content: String,
    metadata: serde_json::Value,
    created_at: DateTime<Utc>,
}

impl From<Row> for Memory {
    fn from(r: Row) -> Self {
        Memory {
            id: r.id,
            user_id: r.user_id,
            coach_id: r.coach_id,
            memory_type: r.memory_type,
            text: r.content,
            metadata: r.metadata,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
struct ScoredRow {
    #[sqlx(flatten)]
    row: Row,
    similarity: f64,
    /// Rows of the pair in all (index search only; absent from the exact one).
    #[sqlx(default)]
    pair_total: Option<i64>,
}
