//! `coachd memory reembed`: moves every stored memory to the configured embedder, in batches
//! that each commit their vectors together with the cursor, so an interrupted run resumes where
//! it stopped and no memory is ever deleted or left out.
//!
//! While it runs (and until it finishes) `coach_memory_settings` records the target, and every
//! start-up refuses to serve ([`SetupError::ReembedUnfinished`]): the table then holds vectors of
//! two models. The HNSW index (if `COACHD_MEMORY_HNSW` kept one) and the dimension check are
//! dropped at the start (updating every row through an HNSW index is far slower than building it
//! once) and rebuilt at the end by [`PgMemoryStore::prepare`], the index only when the setting is on.

use std::ops::ControlFlow;
use std::sync::Arc;

use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use super::PgMemoryStore;
use crate::embed::Embedder;
use crate::memory::{MemorySettings, SetupError};

/// Only one re-embed at a time.
const REEMBED_LOCK: &str = "coachd.coach_memory.reembed";

/// How far a re-embed is, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReembedProgress {
    /// Memories that hold vectors of the target embedder.
    pub done: u64,
    /// Memories in the table.
    pub total: u64,
}

/// How a re-embed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReembedOutcome {
    /// The database already held the configured embedder's vectors.
    UpToDate,
    /// Every memory was re-embedded and the new model recorded.
    Finished {
        /// Memories re-embedded by this run (an earlier, interrupted run may have done others).
        reembedded: u64,
    },
    /// `on_progress` asked to stop; the next run resumes after the last committed batch.
    Stopped {
        /// Memories re-embedded by this run.
        reembedded: u64,
    },
}

/// The `coach_memory_settings` row: dimension, model, and the target and cursor of a re-embed.
type Recorded = (i32, String, Option<String>, Option<i32>, Option<Uuid>);

fn failed(e: impl std::fmt::Display) -> SetupError {
    SetupError::Memory(e.to_string())
}

/// Re-embeds every memory with `embedder`, `batch` at a time; `on_progress` is called after each
/// committed batch and may break to stop early (the run is then resumable). Stop the servers
/// first: they refuse to start until it has finished, but one already running with the old
/// embedder could still add memories after the cursor has passed.
pub async fn reembed(
    pool: &PgPool,
    embedder: Arc<dyn Embedder>,
    settings: &MemorySettings,
    batch: usize,
    mut on_progress: impl FnMut(ReembedProgress) -> ControlFlow<()>,
) -> Result<ReembedOutcome, SetupError> {
    let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
    let target_model = embedder.model().to_owned();
    let target_dim = embedder.dimension();
    let target_dim_i32 = i32::try_from(target_dim).unwrap_or(i32::MAX);

    // A session-level lock on one connection held for the whole run.
    let mut lock = pool.acquire().await.map_err(failed)?;
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(REEMBED_LOCK)
        .fetch_one(&mut *lock)
        .await
        .map_err(failed)?;
    if !locked {
        return Err(SetupError::Memory(
            "another `coachd memory reembed` is running on this database".to_owned(),
        ));
    }
    let result = run(
        pool,
        &embedder,
        batch,
        &target_model,
        target_dim_i32,
        &mut on_progress,
    )
    .await;
    // Released explicitly so the pooled connection goes back clean.
    let _ = sqlx::query("select pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(REEMBED_LOCK)
        .execute(&mut *lock)
        .await;
    drop(lock);
    let outcome = result?;
    if !matches!(outcome, ReembedOutcome::Stopped { .. }) {
        // Records the dimension on a database that had none, rebuilds the index and the check.
        PgMemoryStore::prepare(pool.clone(), embedder, settings).await?;
    }
    Ok(outcome)
}

async fn run(
    pool: &PgPool,
    embedder: &Arc<dyn Embedder>,
    batch: i64,
    target_model: &str,
    target_dim: i32,
    on_progress: &mut impl FnMut(ReembedProgress) -> ControlFlow<()>,
) -> Result<ReembedOutcome, SetupError> {
    let recorded: Option<Recorded> = sqlx::query_as(
        "select embedding_dim, embedding_model, reembed_model, reembed_dim, reembed_after \
         from coach_memory_settings",
    )
    .fetch_optional(pool)
    .await
    .map_err(failed)?;
    let mut cursor = match recorded {
        // Never set up: nothing stored, prepare records the configured embedder.
        None => return Ok(ReembedOutcome::UpToDate),
        Some((dim, model, None, _, _)) if dim == target_dim && model == target_model => {
            return Ok(ReembedOutcome::UpToDate);
        }
        // The same target as an interrupted run: resume after its cursor.
        Some((_, _, Some(model), Some(dim), after)) if dim == target_dim && model == target_model => {
            tracing::info!(model, after = ?after, "resuming the interrupted re-embed");
            after
        }
        // A new target (or another one than an interrupted run had): start from the first memory.
        Some(_) => {
            let mut tx = pool.begin().await.map_err(failed)?;
            sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(super::setup::SETUP_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            sqlx::query(
                "update coach_memory_settings set reembed_model = $1, reembed_dim = $2, reembed_after = null",
            )
            .bind(target_model)
            .bind(target_dim)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            sqlx::query("drop index if exists coach_memory_embedding_hnsw")
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            sqlx::query("alter table coach_memory drop constraint if exists coach_memory_embedding_dim")
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            None
        }
    };

    let total: i64 = sqlx::query_scalar("select count(*) from coach_memory")
        .fetch_one(pool)
        .await
        .map_err(failed)?;
    let total = u64::try_from(total).unwrap_or(0);
    let mut done: u64 = match cursor {
        Some(after) => {
            let n: i64 = sqlx::query_scalar("select count(*) from coach_memory where id <= $1")
                .bind(after)
                .fetch_one(pool)
                .await
                .map_err(failed)?;
            u64::try_from(n).unwrap_or(0)
        }
        None => 0,
    };
    let mut reembedded: u64 = 0;
    loop {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "select id, content from coach_memory where $1::uuid is null or id > $1 order by id limit $2",
        )
        .bind(cursor)
        .bind(batch)
        .fetch_all(pool)
        .await
        .map_err(failed)?;
        let Some(&(last, _)) = rows.last() else { break };
        let (ids, texts): (Vec<Uuid>, Vec<String>) = rows.into_iter().unzip();
        let vectors = embedder.embed(&texts).await.map_err(failed)?;
        if vectors.len() != texts.len() || vectors.iter().any(|v| v.len() != embedder.dimension()) {
            return Err(SetupError::Memory(format!(
                "the embedder returned {} vectors (of length {}) for {} texts of dimension {}",
                vectors.len(),
                vectors.first().map_or(0, Vec::len),
                texts.len(),
                embedder.dimension()
            )));
        }
        let vectors: Vec<Vector> = vectors.into_iter().map(Vector::from).collect();
        // The vectors and the cursor commit together: a crash repeats at most this batch.
        let mut tx = pool.begin().await.map_err(failed)?;
        sqlx::query(
            "update coach_memory m set embedding = v.embedding \
             from unnest($1::uuid[], $2::vector[]) as v(id, embedding) where m.id = v.id",
        )
        .bind(&ids)
        .bind(&vectors)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        sqlx::query("update coach_memory_settings set reembed_after = $1")
            .bind(last)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        cursor = Some(last);
        let n = ids.len() as u64;
        reembedded += n;
        done += n;
        if on_progress(ReembedProgress {
            done,
            total: total.max(done),
        })
        .is_break()
        {
            return Ok(ReembedOutcome::Stopped { reembedded });
        }
    }

    let mut tx = pool.begin().await.map_err(failed)?;
    sqlx::query(
        "update coach_memory_settings set embedding_model = $1, embedding_dim = $2, \
         reembed_model = null, reembed_dim = null, reembed_after = null",
    )
    .bind(target_model)
    .bind(target_dim)
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    // DDL with the dimension formatted in: an integer from the embedder, never outside text.
    let check = format!(
        "alter table coach_memory add constraint coach_memory_embedding_dim \
         check (vector_dims(embedding) = {target_dim})"
    );
    sqlx::query(&check).execute(&mut *tx).await.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(ReembedOutcome::Finished { reembedded })
}
