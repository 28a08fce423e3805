//! The in-process memory store: exact cosine search over the pair's memories in a map, for a
//! coachd without PostgreSQL. Same validation, de-duplication, ordering and paging as the
//! pgvector store, near-duplicate merging included; bounded by `COACHD_MEMORY_EMBEDDED_MAX` (the
//! oldest memories go first).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use uuid::Uuid;

use super::{
    Memory, MemoryLimits, MemoryStore, NewMemory, Prepared, ScoredMemory, StoreError, StoreOutcome,
    check_query, cosine_similarity, prepare, timed_search,
};
use crate::embed::Embedder;

type Pair = (String, String);
type DedupKey = (String, String, String, [u8; 32]);

#[derive(Debug)]
struct Entry {
    memory: Memory,
    embedding: Vec<f32>,
    hash: [u8; 32],
}

#[derive(Debug, Default)]
struct Inner {
    /// Every memory by id; UUID v7 ids sort by creation, so the first entry is the oldest.
    entries: BTreeMap<Uuid, Entry>,
    /// Ids of each (user, coach) pair, so a search reads only the pair's memories.
    pairs: HashMap<Pair, BTreeSet<Uuid>>,
    dedup: HashMap<DedupKey, Uuid>,
}

impl Inner {
    fn insert(&mut self, p: Prepared, embedding: Vec<f32>, max: usize) -> StoreOutcome {
        let key = p.dedup_key();
        if let Some(id) = self.dedup.get(&key) {
            return StoreOutcome {
                id: *id,
                created: false,
            };
        }
        while self.entries.len() >= max {
            let Some(oldest) = self.entries.keys().next().copied() else {
                break;
            };
            tracing::warn!(max, "in-process memory store full: dropping the oldest memory");
            self.remove(oldest);
        }
        let id = Uuid::now_v7();
        let memory = Memory {
            id,
            user_id: p.user_id,
            coach_id: p.coach_id,
            memory_type: p.memory_type,
            text: p.text,
            metadata: p.metadata,
            // Microseconds, as PostgreSQL keeps them, so both stores return the same values.
            created_at: Utc::now().trunc_subsecs(6),
        };
        self.pairs
            .entry((memory.user_id.clone(), memory.coach_id.clone()))
            .or_default()
            .insert(id);
        self.dedup.insert(key, id);
        self.entries.insert(
            id,
            Entry {
                memory,
                embedding,
                hash: p.hash,
            },
        );
        StoreOutcome { id, created: true }
    }

    fn remove(&mut self, id: Uuid) -> bool {
        let Some(e) = self.entries.remove(&id) else {
            return false;
        };
        let m = e.memory;
        let pair = (m.user_id, m.coach_id);
        if let Some(ids) = self.pairs.get_mut(&pair) {
            ids.remove(&id);
            if ids.is_empty() {
                self.pairs.remove(&pair);
            }
        }
        self.dedup.remove(&(pair.0, pair.1, m.memory_type, e.hash));
        true
    }

    /// The stored memory of `p`'s (user, coach, type) most similar to `embedding` with a cosine
    /// of at least `threshold`, leaving out `skip` (the memories of the batch being stored, since
    /// the PostgreSQL store compares only with rows stored before the batch).
    fn nearest_of_type(
        &self,
        p: &Prepared,
        embedding: &[f32],
        threshold: f32,
        skip: &BTreeSet<Uuid>,
    ) -> Option<Uuid> {
        self.pairs
            .get(&(p.user_id.clone(), p.coach_id.clone()))?
            .iter()
            .filter(|id| !skip.contains(id))
            .filter_map(|id| self.entries.get(id))
            .filter(|e| e.memory.memory_type == p.memory_type)
            .map(|e| (cosine_similarity(&e.embedding, embedding), e.memory.id))
            .filter(|(sim, _)| *sim >= threshold)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, id)| id)
    }

    fn pair_ids(&self, user_id: &str, coach_id: &str) -> Vec<Uuid> {
        self.pairs
            .get(&(user_id.to_owned(), coach_id.to_owned()))
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Memories held in this process; lost on restart.
#[derive(Debug)]
pub struct InProcessMemoryStore {
    embedder: Arc<dyn Embedder>,
    limits: MemoryLimits,
    max_memories: usize,
    /// `COACHD_MEMORY_MERGE_SIMILARITY`; `None` when merging is off.
    merge_similarity: Option<f32>,
    // A std RwLock: never held across an await (embedding happens before the lock is taken).
    inner: RwLock<Inner>,
}

impl InProcessMemoryStore {
    /// An empty store holding at most `max_memories`.
    pub fn new(embedder: Arc<dyn Embedder>, limits: MemoryLimits, max_memories: usize) -> Self {
        Self {
            embedder,
            limits,
            max_memories: max_memories.max(1),
            merge_similarity: None,
            inner: RwLock::new(Inner::default()),
        }
    }

    /// Merges a new memory into a stored one of the same (user, coach, type) whose cosine
    /// similarity is at least `threshold` (its timestamp refreshed, its id returned) instead of
    /// storing it; 0 or less turns merging off (`COACHD_MEMORY_MERGE_SIMILARITY`).
    pub fn with_merge_similarity(mut self, threshold: f32) -> Self {
        self.merge_similarity = (threshold > 0.0).then_some(threshold);
        self
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Inner>, StoreError> {
        self.inner.read().map_err(|_| poisoned())
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Inner>, StoreError> {
        self.inner.write().map_err(|_| poisoned())
    }
}

fn poisoned() -> StoreError {
    StoreError::Internal {
        backend: "in-process",
        reason: "memory store lock poisoned".to_owned(),
    }
}

#[async_trait]
impl MemoryStore for InProcessMemoryStore {
    async fn store_batch(&self, memories: Vec<NewMemory>) -> Result<Vec<StoreOutcome>, StoreError> {
        let prepared = memories
            .into_iter()
            .map(|m| prepare(m, &self.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcomes: Vec<Option<StoreOutcome>> = vec![None; prepared.len()];
        let mut pending: Vec<(usize, Prepared)> = prepared.into_iter().enumerate().collect();
        // Memories this batch created: never merge targets for the rest of the batch.
        let mut created: BTreeSet<Uuid> = BTreeSet::new();
        // Usually one round. Another only when a memory seen as a duplicate was deleted before the
        // write lock was taken, so it still needs a vector. The locks live in blocks of their
        // own: a std lock guard must never be held across an await.
        while !pending.is_empty() {
            // Embed only what is not stored yet: embedding may cost money and time.
            let missing: Vec<String> = {
                let inner = self.read()?;
                let mut seen = BTreeSet::new();
                pending
                    .iter()
                    .filter(|(_, p)| !inner.dedup.contains_key(&p.dedup_key()))
                    .filter(|(_, p)| seen.insert(p.text.as_str()))
                    .map(|(_, p)| p.text.clone())
                    .collect()
            };
            let vectors = self.embedder.embed(&missing).await?;
            let by_text: HashMap<&str, &Vec<f32>> =
                missing.iter().map(String::as_str).zip(vectors.iter()).collect();
            let mut inner = self.write()?;
            let mut retry = Vec::new();
            for (i, p) in pending {
                if let Some(id) = inner.dedup.get(&p.dedup_key()) {
                    outcomes[i] = Some(StoreOutcome {
                        id: *id,
                        created: false,
                    });
                } else if let Some(v) = by_text.get(p.text.as_str()) {
                    let merged = self
                        .merge_similarity
                        .and_then(|t| inner.nearest_of_type(&p, v, t, &created));
                    if let Some(id) = merged {
                        if let Some(e) = inner.entries.get_mut(&id) {
                            e.memory.created_at = Utc::now().trunc_subsecs(6);
                        }
                        outcomes[i] = Some(StoreOutcome { id, created: false });
                        continue;
                    }
                    let v = (*v).clone();
                    let outcome = inner.insert(p, v, self.max_memories);
                    created.insert(outcome.id);
                    outcomes[i] = Some(outcome);
                } else {
                    retry.push((i, p));
                }
            }
            pending = retry;
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    async fn search_similar(
        &self,
        user_id: &str,
        coach_id: &str,
        query: &str,
        limit: usize,
        min_similarity: f32,
    ) -> Result<Vec<ScoredMemory>, StoreError> {
        timed_search("in_process", async {
            check_query(query, &self.limits)?;
            let limit = limit.min(self.limits.list_max);
            if limit == 0 {
                return Ok(Vec::new());
            }
            let q = self
                .embedder
                .embed(&[query.to_owned()])
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            let inner = self.read()?;
            let mut scored: Vec<ScoredMemory> = inner
                .pair_ids(user_id, coach_id)
                .into_iter()
                .filter_map(|id| inner.entries.get(&id))
                .map(|e| ScoredMemory {
                    memory: e.memory.clone(),
                    similarity: cosine_similarity(&e.embedding, &q),
                })
                .filter(|s| s.similarity >= min_similarity)
                .collect();
            scored.sort_by(|a, b| {
                b.similarity
                    .total_cmp(&a.similarity)
                    .then_with(|| b.memory.id.cmp(&a.memory.id))
            });
            scored.truncate(limit);
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
        let inner = self.read()?;
        let mut entries: Vec<&Entry> = inner
            .pair_ids(user_id, coach_id)
            .iter()
            .filter_map(|id| inner.entries.get(id))
            .collect();
        let total = entries.len() as u64;
        // Newest first by timestamp then id, as the PostgreSQL store orders: a merge refreshes a
        // timestamp, so id order alone is not creation order any more.
        entries.sort_by_key(|e| std::cmp::Reverse((e.memory.created_at, e.memory.id)));
        let page = entries
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|e| e.memory.clone())
            .collect();
        Ok((page, total))
    }

    async fn delete(&self, user_id: &str, coach_id: &str, id: Uuid) -> Result<bool, StoreError> {
        let mut inner = self.write()?;
        let owned = inner
            .entries
            .get(&id)
            .is_some_and(|e| e.memory.user_id == user_id && e.memory.coach_id == coach_id);
        Ok(owned && inner.remove(id))
    }

    async fn clear(&self, user_id: &str, coach_id: &str) -> Result<u64, StoreError> {
        let mut inner = self.write()?;
        let ids = inner.pair_ids(user_id, coach_id);
        Ok(ids.into_iter().filter(|id| inner.remove(*id)).count() as u64)
    }

    async fn erase_user(&self, user_id: &str) -> Result<u64, StoreError> {
        let mut inner = self.write()?;
        let ids: Vec<Uuid> = inner
            .pairs
            .iter()
            .filter(|((u, _), _)| u == user_id)
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        Ok(ids.into_iter().filter(|id| inner.remove(*id)).count() as u64)
    }
}
