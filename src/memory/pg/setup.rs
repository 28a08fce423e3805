//! First-start and every-start set-up of the pgvector store: the dimension record, the
//! dimension check constraint and the optional HNSW index (`COACHD_MEMORY_HNSW`), under an
//! advisory lock.

use std::sync::Arc;

use sqlx::PgPool;

use super::{HNSW_INDEX, MAX_INDEXED_DIMENSION, PgMemoryStore, Sql, typed_embedding};
use crate::embed::Embedder;
use crate::memory::{MemoryLimits, MemorySettings, SetupError};

/// Serialises the first-start set-up of concurrently starting instances.
pub(super) const SETUP_LOCK: &str = "coachd.coach_memory.setup";

impl PgMemoryStore {
    /// Checks the database against the embedder's dimension and returns the store. On the first
    /// start it records the dimension and model and creates the dimension check; at every start it
    /// builds the HNSW index when `COACHD_MEMORY_HNSW` is on and it is missing (minutes over many
    /// rows), and drops it when the setting is off (instant); later starts with another dimension or model fail with
    /// [`SetupError::EmbeddingDimension`] / [`SetupError::EmbeddingModel`], naming
    /// `coachd memory reembed`.
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
        let recorded: Option<(i32, String, Option<String>)> =
            sqlx::query_as("select embedding_dim, embedding_model, reembed_model from coach_memory_settings")
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed)?;
        match recorded {
            Some((_, _, Some(target))) => return Err(SetupError::ReembedUnfinished { target }),
            Some((stored, model, None)) => {
                let stored = usize::try_from(stored).unwrap_or(0);
                if stored != dimension {
                    return Err(SetupError::EmbeddingDimension {
                        configured: dimension,
                        stored,
                    });
                }
                if model != embedder.model() {
                    // Same length, other model: the vectors are not comparable, and every search
                    // would quietly rank by noise. `coachd memory reembed` moves them over.
                    let hint = if model == crate::embed::local::LOCAL_MODEL {
                        format!(" (its files: {})", crate::embed::local::INSTALL_COMMAND)
                    } else {
                        String::new()
                    };
                    return Err(SetupError::EmbeddingModel {
                        configured: embedder.model().to_owned(),
                        stored: model,
                        hint,
                    });
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
        // The vector index follows COACHD_MEMORY_HNSW at every start. Looked up first because even
        // CREATE INDEX IF NOT EXISTS / DROP INDEX IF EXISTS take a lock that blocks the writers of
        // running instances.
        let indexed: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(HNSW_INDEX)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        if settings.hnsw && !indexed {
            // Default HNSW parameters (m = 16, ef_construction = 64); changing them later needs a
            // REINDEX anyway. Over existing rows this build blocks start-up: see BENCHMARKS.md.
            tracing::info!(
                dimension,
                "building the HNSW index of coach_memory (COACHD_MEMORY_HNSW=on)"
            );
            let index = format!(
                "create index if not exists {HNSW_INDEX} on coach_memory \
                 using hnsw ({} vector_cosine_ops)",
                typed_embedding(dimension)
            );
            sqlx::query(&index).execute(&mut *tx).await.map_err(failed)?;
        } else if !settings.hnsw && indexed {
            // Dropping is instant whatever the size, and gives the writes their speed back; per-pair
            // searches never needed the index (an exact scan of the pair's rows).
            tracing::info!("dropping the HNSW index of coach_memory (COACHD_MEMORY_HNSW=off)");
            sqlx::query(&format!("drop index if exists {HNSW_INDEX}"))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
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
            hnsw: settings.hnsw,
            merge_similarity: (settings.merge_similarity > 0.0).then_some(settings.merge_similarity),
            sql: Arc::new(Sql::new(dimension)),
            stats: Arc::default(),
        })
    }
}
