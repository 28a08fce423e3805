//! The storage sections: the embedder, the coach memory store and the context cache, each read
//! into its consumer's own settings type.

use super::ConfigError;
use super::source::{DAY_SECS, Reader, Source, invalid};
use crate::context::ContextLimits;
use std::path::PathBuf;

use crate::embed::local::{self, LOCAL_DIMENSION};
use crate::embed::{EmbeddingProvider, EmbeddingSettings, LocalConfig};
use crate::memory::MemorySettings;

/// `COACHD_EMBEDDING_*` (the key falls back to `OPENAI_API_KEY`).
pub(super) fn embedding<S: Source>(r: &Reader<'_, S>) -> Result<EmbeddingSettings, ConfigError> {
    let provider = match r
        .string("COACHD_EMBEDDING_PROVIDER", "local")
        .to_ascii_lowercase()
        .as_str()
    {
        "local" => EmbeddingProvider::Local,
        "offline" => EmbeddingProvider::Offline,
        "openai" => EmbeddingProvider::Openai,
        other => {
            return Err(invalid(
                "COACHD_EMBEDDING_PROVIDER",
                "local, offline or openai",
                Some(other.to_owned()),
            ));
        }
    };
    let dimension = r.int("COACHD_EMBEDDING_DIM", LOCAL_DIMENSION, 1, 2_000)?;
    // The local model has one size; the hashing fallback takes the same, so both fit one database.
    if provider == EmbeddingProvider::Local && dimension != LOCAL_DIMENSION {
        return Err(invalid(
            "COACHD_EMBEDDING_DIM",
            "384 with COACHD_EMBEDDING_PROVIDER=local (all-MiniLM-L6-v2)",
            Some(dimension.to_string()),
        ));
    }
    Ok(EmbeddingSettings {
        provider,
        model: r.string("COACHD_EMBEDDING_MODEL", "text-embedding-3-small"),
        // HNSW indexes `vector` columns of at most 2000 dimensions.
        dimension,
        base_url: r.base_url("COACHD_EMBEDDING_BASE_URL", "https://api.openai.com/v1")?,
        api_key: r
            .secret("COACHD_EMBEDDING_API_KEY")
            .or_else(|| r.secret("OPENAI_API_KEY")),
        send_dimensions: r.boolean("COACHD_EMBEDDING_SEND_DIMENSIONS", true)?,
        batch_size: r.int("COACHD_EMBEDDING_BATCH_SIZE", 128, 1, 2_048)?,
        timeout: r.millis("COACHD_EMBEDDING_TIMEOUT_MS", 30_000, 1, 600_000)?,
        local: LocalConfig {
            dir: PathBuf::from(r.string("COACHD_EMBEDDING_LOCAL_DIR", ".models")),
            max_tokens: r.int("COACHD_EMBEDDING_LOCAL_MAX_TOKENS", 256, 2, local::MAX_POSITIONS)?,
            threads: r.int("COACHD_EMBEDDING_LOCAL_THREADS", 1, 1, 64)?,
            batch_size: r.int("COACHD_EMBEDDING_BATCH_SIZE", 128, 1, 2_048)?,
            queue: r.int("COACHD_EMBEDDING_LOCAL_QUEUE", 64, 1, 100_000)?,
        },
    })
}

/// `COACHD_MEMORY_*`.
pub(super) fn memory<S: Source>(r: &Reader<'_, S>) -> Result<MemorySettings, ConfigError> {
    Ok(MemorySettings {
        max_text_bytes: r.int("COACHD_MEMORY_MAX_TEXT_BYTES", 16_384, 1, 1 << 20)?,
        list_max: r.int("COACHD_MEMORY_LIST_MAX", 100, 1, 10_000)?,
        hnsw: r.boolean("COACHD_MEMORY_HNSW", false)?,
        ef_search: r.int("COACHD_MEMORY_EF_SEARCH", 40, 1, 1_000)?,
        max_scan_tuples: r.int("COACHD_MEMORY_MAX_SCAN_TUPLES", 20_000, 1, 100_000_000)?,
        embedded_max: r.int("COACHD_MEMORY_EMBEDDED_MAX", 100_000, 1, 100_000_000)?,
        merge_similarity: r.fraction("COACHD_MEMORY_MERGE_SIMILARITY", 0.0)?,
    })
}

/// `SESSION_CONTEXT_TTL`, `USER_SESSION_TTL`, `COACHD_CONTEXT_MAX_MESSAGES`.
pub(super) fn context<S: Source>(r: &Reader<'_, S>) -> Result<ContextLimits, ConfigError> {
    Ok(ContextLimits {
        session_ttl: r.seconds("SESSION_CONTEXT_TTL", 3_600, 1, 365 * DAY_SECS)?,
        user_session_ttl: r.seconds("USER_SESSION_TTL", DAY_SECS, 1, 365 * DAY_SECS)?,
        // A cap on each context list, so no session grows a key without bound.
        max_messages: r.int("COACHD_CONTEXT_MAX_MESSAGES", 100, 1, 100_000)?,
    })
}
