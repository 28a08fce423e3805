//! Text embeddings for coach memory: the [`Embedder`] trait, the local neural embedder
//! (all-MiniLM-L6-v2 in process, the default when `scripts/embedder` has installed its files), an
//! offline feature-hashing embedder (the fallback: words, not meaning) and an OpenAI-compatible
//! `/embeddings` client.
//!
//! The dimension is fixed per database (see `memory::pg`), so the provider is chosen explicitly in
//! configuration and never switched implicitly by the presence of an API key.

pub mod local;
pub mod offline;
pub mod openai;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use url::Url;

use crate::secret::Secret;

pub use local::{LocalConfig, LocalEmbedder};
pub use offline::OfflineEmbedder;
pub use openai::OpenAiEmbedder;

/// Which embedder turns memory text into vectors (`COACHD_EMBEDDING_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingProvider {
    /// all-MiniLM-L6-v2 in process (ONNX Runtime, CPU); no network.
    Local,
    /// Deterministic feature hashing in process; no network.
    Offline,
    /// An OpenAI-compatible `/embeddings` endpoint.
    Openai,
}

impl fmt::Display for EmbeddingProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmbeddingProvider::Local => "local",
            EmbeddingProvider::Offline => "offline",
            EmbeddingProvider::Openai => "openai",
        })
    }
}

/// Settings of the embedder (`COACHD_EMBEDDING_*`).
#[derive(Debug, Clone)]
pub struct EmbeddingSettings {
    /// `COACHD_EMBEDDING_PROVIDER`: chosen explicitly, never from the presence of a key, because
    /// the dimension of stored vectors is fixed per database.
    pub provider: EmbeddingProvider,
    /// `COACHD_EMBEDDING_MODEL` (OpenAI-compatible provider only).
    pub model: String,
    /// `COACHD_EMBEDDING_DIM`: length of every vector; checked against the database at start-up.
    pub dimension: usize,
    /// `COACHD_EMBEDDING_BASE_URL`.
    pub base_url: Url,
    /// `COACHD_EMBEDDING_API_KEY`, else `OPENAI_API_KEY`.
    pub api_key: Option<Secret>,
    /// `COACHD_EMBEDDING_SEND_DIMENSIONS`: send `dimensions` in requests.
    pub send_dimensions: bool,
    /// `COACHD_EMBEDDING_BATCH_SIZE`: most texts in one request.
    pub batch_size: usize,
    /// `COACHD_EMBEDDING_TIMEOUT_MS`: limit of one request.
    pub timeout: Duration,
    /// `COACHD_EMBEDDING_LOCAL_*`: the local embedder (its batch size is `batch_size`).
    pub local: LocalConfig,
}

/// Turns texts into vectors of a fixed dimension.
#[async_trait]
pub trait Embedder: Send + Sync + fmt::Debug {
    /// Length of every vector this embedder returns.
    fn dimension(&self) -> usize;

    /// Name of the model, recorded next to the vectors so a change of model can be noticed.
    fn model(&self) -> &str;

    /// One vector per text, in the order of `texts`. An empty slice gives an empty result without
    /// any request.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Why texts could not be embedded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmbedError {
    /// The provider answered with an HTTP error.
    #[error("embedding provider answered HTTP {status}{}: {message}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Http {
        /// The HTTP status.
        status: u16,
        /// The provider's error code (`error.code` or `error.type`), when it sent one.
        code: Option<String>,
        /// The provider's message, or the start of the body.
        message: String,
        /// Whether the same request may succeed later (429 for rate limits, 5xx, `x-should-retry`).
        retryable: bool,
        /// How long the provider asked us to wait (`retry-after-ms` / `retry-after`).
        retry_after: Option<Duration>,
    },
    /// No answer within `COACHD_EMBEDDING_TIMEOUT_MS`.
    #[error("embedding provider did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The provider could not be reached.
    #[error("cannot reach the embedding provider: {0}")]
    Connect(String),
    /// The answer is not the expected JSON shape.
    #[error("unexpected answer from the embedding provider: {0}")]
    Decode(String),
    /// The local embedder could not load or run.
    #[error("local embedder: {0}")]
    Local(String),
    /// A vector of the wrong length: the configured dimension does not fit the model.
    #[error("the embedding model returned {got}-dimensional vectors but COACHD_EMBEDDING_DIM is {expected}")]
    Dimension {
        /// The configured dimension.
        expected: usize,
        /// What the model returned.
        got: usize,
    },
}

impl EmbedError {
    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            EmbedError::Http { retryable, .. } => *retryable,
            EmbedError::Timeout(_) | EmbedError::Connect(_) => true,
            EmbedError::Decode(_) | EmbedError::Dimension { .. } | EmbedError::Local(_) => false,
        }
    }
}

/// The embedder selected by `COACHD_EMBEDDING_PROVIDER`; a remote one connects within
/// `connect_timeout` (the LLM connect timeout).
///
/// With `fallback`, a local embedder whose files are missing is replaced by feature hashing, with
/// a warning naming the missing files and the install command, so the server still starts (the
/// memory store then refuses a database filled by the local model; see `memory::pg`). Without it
/// (`coachd memory reembed`) the missing files are an error.
pub fn from_settings(
    e: &EmbeddingSettings,
    connect_timeout: Duration,
    fallback: bool,
) -> Result<Arc<dyn Embedder>, EmbedError> {
    Ok(match e.provider {
        EmbeddingProvider::Local => {
            let mut local = e.local.clone();
            local.batch_size = e.batch_size;
            let missing = local.missing();
            if !missing.is_empty() && fallback {
                let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
                tracing::warn!(
                    missing = %list.join(", "),
                    install = local::INSTALL_COMMAND,
                    "the local embedder's files are missing: run `{}` to install them; \
                     memory runs with feature hashing (words, not meaning) until then",
                    local::INSTALL_COMMAND
                );
                Arc::new(OfflineEmbedder::new(e.dimension))
            } else {
                Arc::new(LocalEmbedder::load(&local)?)
            }
        }
        EmbeddingProvider::Offline => Arc::new(OfflineEmbedder::new(e.dimension)),
        EmbeddingProvider::Openai => Arc::new(OpenAiEmbedder::new(openai::OpenAiConfig {
            base_url: e.base_url.clone(),
            api_key: e.api_key.clone(),
            model: e.model.clone(),
            dimension: e.dimension,
            send_dimensions: e.send_dimensions,
            batch_size: e.batch_size,
            timeout: e.timeout,
            connect_timeout,
        })?),
    })
}
