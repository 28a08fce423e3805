//! The `MemoryStore` calls on PostgreSQL: batched idempotent inserts, the exact per-pair search
//! (or, with `COACHD_MEMORY_HNSW` on, the HNSW search with its exact fallback), listing and
//! deletion.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use pgvector::Vector;
use uuid::Uuid;

use super::{PgMemoryStore, Row, ScoredRow};
use crate::embed::EmbedError;
use crate::memory::{
    Memory, MemoryStore, NewMemory, Prepared, ScoredMemory, StoreError, StoreOutcome, check_query, prepare,
    timed_search,
};

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

        let texts: Vec<String> = fresh.iter().map(|&i| prepared[i].text.clone()).collect();
        let mut vectors = if texts.is_empty() {
            Vec::new()
        } else {
            self.embed(&texts).await?
        };
        if let Some(threshold) = self.merge_similarity
            && !fresh.is_empty()
        {
            // Near-duplicates of stored memories are merged into them: the stored row's
            // timestamp is refreshed and its id reported, nothing new is inserted. Compared
            // with rows already stored, not with others of the same batch.
            let mut kept = Vec::with_capacity(fresh.len());
            let mut kept_vectors = Vec::with_capacity(fresh.len());
            for (&i, vector) in fresh.iter().zip(vectors) {
                let p = &prepared[i];
                let merged: Option<Uuid> = sqlx::query_scalar(
                    "update coach_memory set created_at = now() where id = ( \
                           select id from coach_memory \
                           where user_id = $1 and coach_id = $2 and memory_type = $3 \
                             and 1 - (embedding <=> $4) >= $5 \
                           order by embedding <=> $4 limit 1) \
                         returning id",
                )
                .bind(&p.user_id)
                .bind(&p.coach_id)
                .bind(&p.memory_type)
                .bind(&vector)
                .bind(f64::from(threshold))
                .fetch_optional(&self.pool)
                .await?;
                match merged {
                    Some(id) => outcomes[i] = Some(StoreOutcome { id, created: false }),
                    None => {
                        kept.push(i);
                        kept_vectors.push(vector);
                    }
                }
            }
            fresh = kept;
            vectors = kept_vectors;
        }
        if !fresh.is_empty() {
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
        timed_search("pgvector", async {
            check_query(query, &self.limits)?;
            let limit = limit.min(self.limits.list_max);
            if limit == 0 {
                return Ok(Vec::new());
            }
            let q =
                self.embed(&[query.to_owned()]).await?.pop().ok_or_else(|| {
                    StoreError::Embed(EmbedError::Decode("no vector for the query".to_owned()))
                })?;
            let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);

            self.stats.searches.fetch_add(1, Ordering::Relaxed);
            let rows: Vec<ScoredRow> = if self.hnsw {
                self.search_through_index(user_id, coach_id, &q, limit).await?
            } else {
                sqlx::query_as(&self.sql.search_exact)
                    .bind(user_id)
                    .bind(coach_id)
                    .bind(&q)
                    .bind(limit_sql)
                    .fetch_all(&self.pool)
                    .await?
            };

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
        })
        .await
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

impl PgMemoryStore {
    /// The search with `COACHD_MEMORY_HNSW` on: the HNSW index with an iterative scan, and the
    /// exact scan of the pair when that comes back short while the pair has more rows.
    async fn search_through_index(
        &self,
        user_id: &str,
        coach_id: &str,
        q: &Vector,
        limit: usize,
    ) -> Result<Vec<ScoredRow>, StoreError> {
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut tx = self.begin_search().await?;
        let mut rows: Vec<ScoredRow> = sqlx::query_as(&self.sql.search_index)
            .bind(user_id)
            .bind(coach_id)
            .bind(q)
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
                    .bind(q)
                    .bind(limit_sql)
                    .fetch_all(&mut *tx)
                    .await?;
            }
        }
        // Read-only: no commit round trip on the prompt's path. Dropping the transaction queues
        // its ROLLBACK, which the pool flushes with the ping it sends on every release, in the
        // background, before the connection serves anyone else.
        drop(tx);
        Ok(rows)
    }
}
