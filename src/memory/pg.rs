//! The PostgreSQL + pgvector memory store. Embeddings live in an untyped `vector` column; the
//! dimension is recorded on first start and guarded by an HNSW cosine index on
//! `embedding::vector(n)` plus a check constraint, so a changed `COACHD_EMBEDDING_DIM` fails
//! start-up instead of corrupting searches.
//!
//! Why not a typed `vector(n)` column: a migration cannot know `n`, and one column per dimension
//! would need DDL per deployment anyway. The expression index gives the same speed, and searches
//! use the same expression so the planner can pick it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    Memory, MemoryLimits, MemorySettings, MemoryStore, NewMemory, Prepared, ScoredMemory, SetupError,
    StoreError, StoreOutcome, check_query, prepare,
};
use crate::embed::{EmbedError, Embedder};

/// Serialises the first-start set-up of concurrently starting instances.
const SETUP_LOCK: &str = "coachd.coach_memory.setup";

/// Largest dimension an HNSW index takes for `vector`.
pub const MAX_INDEXED_DIMENSION: usize = 2_000;

/// Stores and searches memories in PostgreSQL with pgvector.
#[derive(Debug, Clone)]
pub struct PgMemoryStore {
    pool: PgPool,
    embedder: Arc<dyn Embedder>,
    limits: MemoryLimits,
    /// `BEGIN` plus the HNSW search settings, sent as one simple query (one round trip).
    begin_search_sql: String,
    dimension: usize,
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
            // The materialized CTE hides the HNSW index from the ordering: an exact scan of the
            // pair's rows through the btree index on (user_id, coach_id).
            search_exact: format!(
                "with mine as materialized (select {columns}, embedding from coach_memory \
                 where user_id = $1 and coach_id = $2) \
                 select {columns}, 1 - (embedding <=> $3) as similarity from mine \
                 order by embedding <=> $3, id desc limit $4"
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
    /// Checks the database against the embedder's dimension and returns the store. On the first
    /// start it records the dimension and model and creates the HNSW index and the dimension
    /// check; later starts with another dimension fail with [`SetupError::EmbeddingDimension`].
    /// Safe when several instances start at once (an advisory lock serialises them).
    pub async fn prepare(
        pool: PgPool,
        embedder: Arc<dyn Embedder>,
        settings: &MemorySettings,
    ) -> Result<Self, SetupError> {
        let dimension = embedder.dimension();
        if !(1..=MAX_INDEXED_DIMENSION).contains(&dimension) {
            return Err(SetupError::Memory(format!(
                "embedding dimension {dimension} is outside 1..={MAX_INDEXED_DIMENSION}, the range an HNSW index takes"
            )));
        }
        let failed = |e: sqlx::Error| SetupError::Memory(e.to_string());
        let mut tx = pool.begin().await.map_err(failed)?;
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(SETUP_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        let recorded: Option<(i32, String)> =
            sqlx::query_as("select embedding_dim, embedding_model from coach_memory_settings")
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed)?;
        match recorded {
            Some((stored, model)) => {
                let stored = usize::try_from(stored).unwrap_or(0);
                if stored != dimension {
                    return Err(SetupError::EmbeddingDimension {
                        configured: dimension,
                        stored,
                    });
                }
                if model != embedder.model() {
                    // Same length, other model: the vectors are not comparable. Not fatal, since
                    // an operator may switch deliberately and re-embed, but worth shouting about.
                    tracing::warn!(
                        stored_model = %model,
                        configured_model = %embedder.model(),
                        "the memory database was filled by another embedding model: similarity scores \
                         between old and new memories are meaningless until they are re-embedded"
                    );
                }
            }
            None => {
                sqlx::query(
                    "insert into coach_memory_settings (embedding_dim, embedding_model) values ($1, $2)",
                )
                .bind(i32::try_from(dimension).unwrap_or(i32::MAX))
                .bind(embedder.model())
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
                // DDL with the dimension formatted in: see typed_embedding for why that is safe.
                let check = format!(
                    "alter table coach_memory add constraint coach_memory_embedding_dim \
                     check (vector_dims(embedding) = {dimension})"
                );
                sqlx::query(&check).execute(&mut *tx).await.map_err(failed)?;
            }
        }
        // Checked at every start, in case the index was dropped. Looked up first because even
        // CREATE INDEX IF NOT EXISTS takes a lock that blocks writers of running instances.
        let indexed: bool =
            sqlx::query_scalar("select to_regclass('coach_memory_embedding_hnsw') is not null")
                .fetch_one(&mut *tx)
                .await
                .map_err(failed)?;
        if !indexed {
            // Default HNSW parameters (m = 16, ef_construction = 64); changing them later needs a
            // REINDEX anyway. Over existing rows this build blocks start-up: see BENCHMARKS.md.
            tracing::info!(dimension, "building the HNSW index of coach_memory");
            let index = format!(
                "create index if not exists coach_memory_embedding_hnsw on coach_memory \
                 using hnsw ({} vector_cosine_ops)",
                typed_embedding(dimension)
            );
            sqlx::query(&index).execute(&mut *tx).await.map_err(failed)?;
        }
        tx.commit().await.map_err(failed)?;

        Ok(Self {
            pool,
            embedder,
            limits: MemoryLimits::from(settings),
            // Integers from the settings, never text from outside: safe to format into SQL.
            begin_search_sql: format!(
                "begin; set local hnsw.iterative_scan = strict_order; \
                 set local hnsw.ef_search = {}; set local hnsw.max_scan_tuples = {}",
                settings.ef_search, settings.max_scan_tuples
            ),
            dimension,
            sql: Arc::new(Sql::new(dimension)),
            stats: Arc::default(),
        })
    }

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

    /// The plan of the first (index) step of [`MemoryStore::search_similar`], for diagnostics,
    /// tests and the benchmark: it names `coach_memory_embedding_hnsw` when the HNSW index is used.
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
        let mut tx = self.begin_search().await?;
        let lines: Vec<String> =
            sqlx::query_scalar(&format!("explain (costs off) {}", self.sql.search_index))
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

#[async_trait]
impl MemoryStore for PgMemoryStore {
    async fn store_batch(&self, memories: Vec<NewMemory>) -> Result<Vec<StoreOutcome>, StoreError> {
        let prepared = memories
            .into_iter()
            .map(|m| prepare(m, &self.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcomes: Vec<Option<StoreOutcome>> = vec![None; prepared.len()];

        // First occurrence of each key in the batch; later ones are duplicates of it.
        let mut first_of: HashMap<_, usize> = HashMap::new();
        let mut copies: Vec<(usize, usize)> = Vec::new();
        let mut unique: Vec<usize> = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            match first_of.get(&p.dedup_key()) {
                Some(&first) => copies.push((i, first)),
                None => {
                    first_of.insert(p.dedup_key(), i);
                    unique.push(i);
                }
            }
        }

        // Already stored: no embedding (which may cost money), no insert.
        let candidates: Vec<&Prepared> = unique.iter().map(|&i| &prepared[i]).collect();
        let existing = self.existing(&candidates).await?;
        let mut fresh: Vec<usize> = Vec::new();
        for (pos, &i) in unique.iter().enumerate() {
            match existing.get(&pos) {
                Some(id) => {
                    outcomes[i] = Some(StoreOutcome {
                        id: *id,
                        created: false,
                    })
                }
                None => fresh.push(i),
            }
        }

        if !fresh.is_empty() {
            let texts: Vec<String> = fresh.iter().map(|&i| prepared[i].text.clone()).collect();
            let vectors = self.embed(&texts).await?;
            let ids: Vec<Uuid> = fresh.iter().map(|_| Uuid::now_v7()).collect();
            let rows = fresh.iter().map(|&i| &prepared[i]);
            let inserted: Vec<Uuid> = sqlx::query_scalar(
                "insert into coach_memory \
                   (id, user_id, coach_id, memory_type, content, content_hash, metadata, embedding) \
                 select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                      $6::bytea[], $7::jsonb[], $8::vector[]) \
                 on conflict (user_id, coach_id, memory_type, content_hash) do nothing \
                 returning id",
            )
            .bind(&ids)
            .bind(rows.clone().map(|p| p.user_id.as_str()).collect::<Vec<_>>())
            .bind(rows.clone().map(|p| p.coach_id.as_str()).collect::<Vec<_>>())
            .bind(rows.clone().map(|p| p.memory_type.as_str()).collect::<Vec<_>>())
            .bind(rows.clone().map(|p| p.text.as_str()).collect::<Vec<_>>())
            .bind(rows.clone().map(|p| p.hash.to_vec()).collect::<Vec<_>>())
            .bind(rows.clone().map(|p| p.metadata.clone()).collect::<Vec<_>>())
            .bind(&vectors)
            .fetch_all(&self.pool)
            .await?;
            let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();

            let mut raced: Vec<usize> = Vec::new();
            for (&i, id) in fresh.iter().zip(&ids) {
                if inserted.contains(id) {
                    outcomes[i] = Some(StoreOutcome {
                        id: *id,
                        created: true,
                    });
                } else {
                    raced.push(i);
                }
            }
            // Stored by another writer between our check and our insert: report its id.
            if !raced.is_empty() {
                let keys: Vec<&Prepared> = raced.iter().map(|&i| &prepared[i]).collect();
                let found = self.existing(&keys).await?;
                for (pos, &i) in raced.iter().enumerate() {
                    let id = found.get(&pos).ok_or_else(|| StoreError::Internal {
                        backend: "postgresql",
                        reason: "a conflicting memory vanished during insert".to_owned(),
                    })?;
                    outcomes[i] = Some(StoreOutcome {
                        id: *id,
                        created: false,
                    });
                }
            }
        }

        for (i, first) in copies {
            outcomes[i] = outcomes[first].map(|o| StoreOutcome {
                id: o.id,
                created: false,
            });
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| StoreError::Internal {
                    backend: "postgresql",
                    reason: "a memory of the batch got no outcome".to_owned(),
                })
            })
            .collect()
    }

    async fn search_similar(
        &self,
        user_id: &str,
        coach_id: &str,
        query: &str,
        limit: usize,
        min_similarity: f32,
    ) -> Result<Vec<ScoredMemory>, StoreError> {
        check_query(query, &self.limits)?;
        let limit = limit.min(self.limits.list_max);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let q = self
            .embed(&[query.to_owned()])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Embed(EmbedError::Decode("no vector for the query".to_owned())))?;
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);

        self.stats.searches.fetch_add(1, Ordering::Relaxed);
        let mut tx = self.begin_search().await?;
        let mut rows: Vec<ScoredRow> = sqlx::query_as(&self.sql.search_index)
            .bind(user_id)
            .bind(coach_id)
            .bind(&q)
            .bind(limit_sql)
            .fetch_all(&mut *tx)
            .await?;
        if rows.len() < limit {
            // HNSW filters after the scan: even an iterative scan stops at max_scan_tuples, and
            // may come back short while the pair has more rows. Then scan the pair exactly.
            let total: i64 = match rows.first().and_then(|r| r.pair_total) {
                Some(total) => total,
                // No row to carry the count: ask (a pair without memories, or a scan that found
                // none of its rows).
                None => {
                    sqlx::query_scalar(
                        "select count(*) from coach_memory where user_id = $1 and coach_id = $2",
                    )
                    .bind(user_id)
                    .bind(coach_id)
                    .fetch_one(&mut *tx)
                    .await?
                }
            };
            if usize::try_from(total).unwrap_or(usize::MAX) > rows.len() {
                tracing::debug!(
                    found = rows.len(),
                    total,
                    limit,
                    "HNSW scan came back short: exact scan"
                );
                self.stats.exact_fallbacks.fetch_add(1, Ordering::Relaxed);
                rows = sqlx::query_as(&self.sql.search_exact)
                    .bind(user_id)
                    .bind(coach_id)
                    .bind(&q)
                    .bind(limit_sql)
                    .fetch_all(&mut *tx)
                    .await?;
            }
        }
        // Read-only: no commit round trip on the prompt's path. Dropping the transaction queues
        // its ROLLBACK, which the pool flushes with the ping it sends on every release, in the
        // background, before the connection serves anyone else.
        drop(tx);

        let mut scored: Vec<ScoredMemory> = rows
            .into_iter()
            .map(|r| ScoredMemory {
                similarity: r.similarity as f32,
                memory: r.row.into(),
            })
            .filter(|s| s.similarity >= min_similarity)
            .collect();
        // Same order as the in-process store, ties included.
        scored.sort_by(|a, b| {
            b.similarity
                .total_cmp(&a.similarity)
                .then_with(|| b.memory.id.cmp(&a.memory.id))
        });
        Ok(scored)
    }

    async fn list(
        &self,
        user_id: &str,
        coach_id: &str,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<Memory>, u64), StoreError> {
        let limit = limit.min(self.limits.list_max);
        let total: i64 =
            sqlx::query_scalar("select count(*) from coach_memory where user_id = $1 and coach_id = $2")
                .bind(user_id)
                .bind(coach_id)
                .fetch_one(&self.pool)
                .await?;
        let total = u64::try_from(total).unwrap_or(0);
        if limit == 0 || offset as u64 >= total {
            return Ok((Vec::new(), total));
        }
        let rows: Vec<Row> = sqlx::query_as(
            "select id, user_id, coach_id, memory_type, content, metadata, created_at from coach_memory \
             where user_id = $1 and coach_id = $2 order by created_at desc, id desc limit $3 offset $4",
        )
        .bind(user_id)
        .bind(coach_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok((rows.into_iter().map(Memory::from).collect(), total))
    }

    async fn delete(&self, user_id: &str, coach_id: &str, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("delete from coach_memory where user_id = $1 and coach_id = $2 and id = $3")
            .bind(user_id)
            .bind(coach_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn clear(&self, user_id: &str, coach_id: &str) -> Result<u64, StoreError> {
        let done = sqlx::query("delete from coach_memory where user_id = $1 and coach_id = $2")
            .bind(user_id)
            .bind(coach_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn erase_user(&self, user_id: &str) -> Result<u64, StoreError> {
        let done = sqlx::query("delete from coach_memory where user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
