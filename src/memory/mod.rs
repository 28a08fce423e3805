//! Long-term coach memory: texts with their embeddings per (user, coach, memory type), searched by
//! cosine similarity. [`MemoryStore`] has a PostgreSQL + pgvector implementation ([`pg`]) and an
//! in-process one ([`in_process`]) that behave the same; both embed through an [`Embedder`].
//!
//! [`Embedder`]: crate::embed::Embedder

pub mod in_process;
pub mod pg;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use crate::error::StoreError;
pub use in_process::InProcessMemoryStore;
pub use pg::PgMemoryStore;

/// Limits and tuning of the coach memory store (`COACHD_MEMORY_*`).
#[derive(Debug, Clone)]
pub struct MemorySettings {
    /// `COACHD_MEMORY_MAX_TEXT_BYTES`: longest memory text and search query.
    pub max_text_bytes: usize,
    /// `COACHD_MEMORY_LIST_MAX`: largest page of a list and largest `limit` of a search.
    pub list_max: usize,
    /// `COACHD_MEMORY_HNSW`: keep an HNSW index on the embeddings (for cross-user or very large
    /// per-pair searches). Off by default: a per-pair search is an exact scan of the pair's few
    /// rows through the btree, and every insert into an HNSW graph costs ~10 ms of CPU (see
    /// BENCHMARKS.md). PostgreSQL store only; set the same value on every instance.
    pub hnsw: bool,
    /// `COACHD_MEMORY_EF_SEARCH`: `hnsw.ef_search`, the candidate list of one HNSW scan.
    pub ef_search: u32,
    /// `COACHD_MEMORY_MAX_SCAN_TUPLES`: `hnsw.max_scan_tuples`, how far an iterative scan goes
    /// before the exact per-user scan takes over.
    pub max_scan_tuples: u32,
    /// `COACHD_MEMORY_EMBEDDED_MAX`: most memories the in-process store holds; the oldest go first.
    pub embedded_max: usize,
    /// `COACHD_MEMORY_MERGE_SIMILARITY`: a new memory whose cosine similarity to a stored one of
    /// the same (user, coach, type) is at least this is merged into it (its timestamp refreshed)
    /// instead of stored; 0 (the default) turns merging off. Both stores.
    pub merge_similarity: f32,
}

/// Why the memory store could not be set up at start-up; each message is one line meant for an
/// operator.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The configured embedding dimension differs from the one the database was set up with.
    #[error(
        "COACHD_EMBEDDING_DIM is {configured} but the memory database holds {stored}-dimensional embeddings; \
         run `coachd memory reembed` to re-embed every memory with the configured embedder, or set \
         COACHD_EMBEDDING_DIM={stored} (with the embedding model that filled it)"
    )]
    EmbeddingDimension {
        /// `COACHD_EMBEDDING_DIM`.
        configured: usize,
        /// The dimension recorded in the database.
        stored: usize,
    },
    /// Same dimension, another model: the stored vectors are not comparable with new ones.
    #[error(
        "the memory database was filled by the embedding model {stored:?} but the configured one is \
         {configured:?}; run `coachd memory reembed` to re-embed every memory with it, or configure \
         the model that filled it{hint}"
    )]
    EmbeddingModel {
        /// The model of the configured embedder.
        configured: String,
        /// The model recorded in the database.
        stored: String,
        /// What else may help (the install command when the local model's files are missing).
        hint: String,
    },
    /// A `coachd memory reembed` was interrupted: the memories hold vectors of two models.
    #[error(
        "a re-embed of the memory database to {target:?} is unfinished; run `coachd memory reembed` \
         (with that embedder configured) to finish it"
    )]
    ReembedUnfinished {
        /// The model the interrupted re-embed moves to.
        target: String,
    },
    /// The store could not be set up (dimension record, index).
    #[error("cannot set up the memory store: {0}")]
    Memory(String),
}

/// Longest user id, coach id or memory type accepted (bytes).
pub const MAX_ID_BYTES: usize = 256;

/// A memory to store. `user_id` and `coach_id` are strings because the reference services use
/// both integers and UUIDs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    /// The text; surrounding whitespace is trimmed before storing.
    pub text: String,
    /// Owner.
    pub user_id: String,
    /// Coach the memory belongs to.
    pub coach_id: String,
    /// Kind of memory, e.g. `insight`, `goal`, `conversation`.
    pub memory_type: String,
    /// A JSON object (or null, stored as `{}`).
    pub metadata: serde_json::Value,
    /// What identifies the memory for de-duplication when not its text: a conversation turn is
    /// keyed by its session and turn number, so a turn written twice (a retry whose first reply
    /// was lost, or a turn two nodes each ended while they could not see each other) is stored
    /// once, whichever text came first.
    pub dedup_key: Option<String>,
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// Time-ordered id (UUID v7).
    pub id: Uuid,
    /// Owner.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// Kind of memory.
    pub memory_type: String,
    /// The text.
    pub text: String,
    /// Caller-defined JSON object.
    pub metadata: serde_json::Value,
    /// When it was stored (microsecond precision in both stores).
    pub created_at: DateTime<Utc>,
}

/// A memory found by a similarity search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoredMemory {
    /// The memory.
    pub memory: Memory,
    /// Cosine similarity to the query, from -1 to 1 (1 = same direction).
    pub similarity: f32,
}

/// What [`MemoryStore::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOutcome {
    /// The id of the memory: the new one, or the existing duplicate's.
    pub id: Uuid,
    /// False when an identical memory (same user, coach, type and text) already existed.
    pub created: bool,
}

/// Long-term memory of (user, coach) pairs.
#[async_trait]
pub trait MemoryStore: Send + Sync + fmt::Debug {
    /// Embeds and stores one memory; an exact duplicate is not stored twice. A batch of one.
    async fn store(&self, memory: NewMemory) -> Result<StoreOutcome, StoreError> {
        let mut outcomes = self.store_batch(vec![memory]).await?;
        outcomes.pop().ok_or_else(|| StoreError::Internal {
            backend: "memory",
            reason: "no outcome for a stored memory".to_owned(),
        })
    }

    /// Stores many memories with one embedding call and one insert; outcomes in input order.
    /// Duplicates inside the batch are stored once.
    async fn store_batch(&self, memories: Vec<NewMemory>) -> Result<Vec<StoreOutcome>, StoreError>;

    /// The `limit` memories of the pair most similar to `query` with a similarity of at least
    /// `min_similarity`, most similar first. Never fewer than `limit` when that many qualify.
    /// `limit` is capped at `COACHD_MEMORY_LIST_MAX`.
    async fn search_similar(
        &self,
        user_id: &str,
        coach_id: &str,
        query: &str,
        limit: usize,
        min_similarity: f32,
    ) -> Result<Vec<ScoredMemory>, StoreError>;

    /// One page of the pair's memories, newest first, and how many the pair has in total.
    /// `limit` is capped at `COACHD_MEMORY_LIST_MAX`; `limit = 0` only counts.
    async fn list(
        &self,
        user_id: &str,
        coach_id: &str,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<Memory>, u64), StoreError>;

    /// Deletes one memory of the pair; false when it does not exist (or belongs to another pair).
    async fn delete(&self, user_id: &str, coach_id: &str, id: Uuid) -> Result<bool, StoreError>;

    /// Deletes every memory of the pair; returns how many.
    async fn clear(&self, user_id: &str, coach_id: &str) -> Result<u64, StoreError>;

    /// Deletes every memory of the user, with every coach; returns how many.
    async fn erase_user(&self, user_id: &str) -> Result<u64, StoreError>;
}

/// The limits both stores apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Longest text and query, in bytes.
    pub max_text_bytes: usize,
    /// Largest list page and search result.
    pub list_max: usize,
}

impl From<&MemorySettings> for MemoryLimits {
    fn from(s: &MemorySettings) -> Self {
        Self {
            max_text_bytes: s.max_text_bytes,
            list_max: s.list_max,
        }
    }
}

/// A validated [`NewMemory`] with its text trimmed, its metadata an object and its hash.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) text: String,
    pub(crate) user_id: String,
    pub(crate) coach_id: String,
    pub(crate) memory_type: String,
    pub(crate) metadata: serde_json::Value,
    pub(crate) hash: [u8; 32],
}

impl Prepared {
    /// The identity of a memory for de-duplication.
    pub(crate) fn dedup_key(&self) -> (String, String, String, [u8; 32]) {
        (
            self.user_id.clone(),
            self.coach_id.clone(),
            self.memory_type.clone(),
            self.hash,
        )
    }
}

/// Checks a new memory against the limits; the messages are safe to show to clients.
pub(crate) fn prepare(m: NewMemory, limits: &MemoryLimits) -> Result<Prepared, StoreError> {
    let text = m.text.trim();
    if text.is_empty() {
        return Err(StoreError::Invalid("memory text is empty".to_owned()));
    }
    if text.len() > limits.max_text_bytes {
        return Err(StoreError::Invalid(format!(
            "memory text is {} bytes; the limit is {}",
            text.len(),
            limits.max_text_bytes
        )));
    }
    check_id("user_id", &m.user_id)?;
    check_id("coach_id", &m.coach_id)?;
    check_id("memory_type", &m.memory_type)?;
    let metadata = match m.metadata {
        serde_json::Value::Null => serde_json::Value::Object(serde_json::Map::new()),
        v @ serde_json::Value::Object(_) => v,
        _ => return Err(StoreError::Invalid("metadata must be a JSON object".to_owned())),
    };
    Ok(Prepared {
        hash: content_hash(m.dedup_key.as_deref().unwrap_or(text)),
        text: text.to_owned(),
        user_id: m.user_id,
        coach_id: m.coach_id,
        memory_type: m.memory_type,
        metadata,
    })
}

/// Checks a search query against the limits.
/// Runs one similarity search, timed into `coachd_memory_search_duration_seconds` by backend and
/// outcome (embedding the query included: it is part of what the prompt waits for).
pub(crate) async fn timed_search<F>(backend: &'static str, search: F) -> Result<Vec<ScoredMemory>, StoreError>
where
    F: std::future::Future<Output = Result<Vec<ScoredMemory>, StoreError>>,
{
    let began = std::time::Instant::now();
    let result = search.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(crate::metric::MEMORY_SEARCH, "backend" => backend, "outcome" => outcome)
        .record(began.elapsed().as_secs_f64());
    result
}

pub(crate) fn check_query(query: &str, limits: &MemoryLimits) -> Result<(), StoreError> {
    if query.trim().is_empty() {
        return Err(StoreError::Invalid("query is empty".to_owned()));
    }
    if query.len() > limits.max_text_bytes {
        return Err(StoreError::Invalid(format!(
            "query is {} bytes; the limit is {}",
            query.len(),
            limits.max_text_bytes
        )));
    }
    Ok(())
}

fn check_id(name: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_ID_BYTES || value.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{name} must be 1 to {MAX_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// SHA-256 of the (trimmed) text: the de-duplication key, so the unique index stays small however
/// long the texts are.
pub(crate) fn content_hash(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Cosine similarity; 0 when either vector is zero.
pub(crate) fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0_f64, 0.0_f64, 0.0_f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MemoryLimits {
        MemoryLimits {
            max_text_bytes: 10,
            list_max: 100,
        }
    }

    fn new(text: &str) -> NewMemory {
        NewMemory {
            dedup_key: None,
            text: text.to_owned(),
            user_id: "1".to_owned(),
            coach_id: "2".to_owned(),
            memory_type: "insight".to_owned(),
            metadata: serde_json::Value::Null,
        }
    }

    #[test]
    fn new_memories_are_trimmed_and_checked() {
        let p = prepare(new("  hello \n"), &limits()).unwrap();
        assert_eq!(p.text, "hello");
        assert_eq!(p.metadata, serde_json::json!({}));
        assert_eq!(p.hash, content_hash("hello"));

        for bad in ["", "   ", "01234567890"] {
            assert!(
                matches!(prepare(new(bad), &limits()), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        let mut m = new("x");
        m.metadata = serde_json::json!([1]);
        assert!(matches!(prepare(m, &limits()), Err(StoreError::Invalid(_))));
        let mut m = new("x");
        m.user_id = String::new();
        assert!(matches!(prepare(m, &limits()), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn cosine_similarity_of_simple_vectors() {
        assert!((cosine_similarity(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine_similarity(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert!((cosine_similarity(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
