//! Dependency checks behind the health routes: each component reports its status and how long
//! its check took. Checks run concurrently and each is bounded by `COACHD_HEALTH_TIMEOUT_MS`.

use std::future::Future;
use std::time::{Duration, Instant};

use fred::prelude::ClientLike;
use serde::Serialize;

use crate::embed::offline::OFFLINE_MODEL;
use crate::embed::{Embedder, EmbeddingProvider, local};
use crate::llm::{Llm, ProviderKind};

/// Status of one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Configured and answering.
    Up,
    /// Configured and not answering (or failing).
    Down,
    /// Not configured: the in-process implementation serves instead.
    Embedded,
}

/// The report of one component check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ComponentReport {
    /// Status of the component.
    pub status: Status,
    /// What serves it: `postgresql`, `redis`, `embedded`, or an LLM provider name.
    pub backend: String,
    /// How long the check took, in milliseconds.
    pub latency_ms: f64,
    /// Why it is down, or a note on what serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ComponentReport {
    /// Whether this component makes the service unready.
    pub fn is_down(&self) -> bool {
        self.status == Status::Down
    }
}

async fn timed<F, E>(timeout: Duration, backend: &str, check: F) -> ComponentReport
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, check).await;
    let latency_ms = (start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1_000.0;
    let (status, detail) = match result {
        Ok(Ok(())) => (Status::Up, None),
        Ok(Err(e)) => (Status::Down, Some(e.to_string())),
        Err(_) => (
            Status::Down,
            Some(format!("no answer within {} ms", timeout.as_millis())),
        ),
    };
    ComponentReport {
        status,
        backend: backend.to_owned(),
        latency_ms,
        detail,
    }
}

fn embedded(what: &str) -> ComponentReport {
    ComponentReport {
        status: Status::Embedded,
        backend: "embedded".to_owned(),
        latency_ms: 0.0,
        detail: Some(format!("{what} unset: the in-process implementation is used")),
    }
}

/// PostgreSQL: one round trip on a pooled connection.
pub async fn check_db(db: Option<&sqlx::PgPool>, timeout: Duration) -> ComponentReport {
    match db {
        None => embedded("DATABASE_URL"),
        Some(pool) => {
            timed(timeout, "postgresql", async {
                sqlx::query("select 1").execute(pool).await.map(|_| ())
            })
            .await
        }
    }
}

/// Redis: a PING through the pool.
pub async fn check_redis(redis: Option<&fred::clients::Pool>, timeout: Duration) -> ComponentReport {
    match redis {
        None => embedded("REDIS_URL"),
        Some(pool) => {
            timed(timeout, "redis", async {
                pool.next().ping::<String>(None).await.map(|_| ())
            })
            .await
        }
    }
}

/// The default LLM provider: a models listing (cheap, generates nothing), or `embedded` when
/// the offline provider answers because no key is configured (`configured` is `LLM_PROVIDER`).
pub async fn check_llm(llm: &Llm, configured: ProviderKind, timeout: Duration) -> ComponentReport {
    let kind = llm.default_provider();
    if kind == ProviderKind::Offline {
        let detail = if configured == ProviderKind::Offline {
            "LLM_PROVIDER=offline: the built-in offline provider answers".to_owned()
        } else {
            format!("no API key for {configured}: the offline provider answers")
        };
        return ComponentReport {
            status: Status::Embedded,
            backend: ProviderKind::Offline.to_string(),
            latency_ms: 0.0,
            detail: Some(detail),
        };
    }
    timed(timeout, kind.as_str(), llm.check_default()).await
}

/// The embedder that serves memory (no request: an embedding may cost money). `up` with the
/// model's name for the local or a remote model; `embedded` when feature hashing serves, either
/// by choice or because the local model's files are missing (`configured` is
/// `COACHD_EMBEDDING_PROVIDER`).
pub fn embedder_report(configured: EmbeddingProvider, embedder: &dyn Embedder) -> ComponentReport {
    let hashing = embedder.model() == OFFLINE_MODEL;
    let detail = match (hashing, configured) {
        (true, EmbeddingProvider::Offline) => {
            "COACHD_EMBEDDING_PROVIDER=offline: feature hashing (words, not meaning)".to_owned()
        }
        (true, _) => format!(
            "the {configured} embedder is not available (its files are missing: run {}): feature hashing serves",
            local::INSTALL_COMMAND
        ),
        (false, _) => format!("{configured}: {} dimensions", embedder.dimension()),
    };
    ComponentReport {
        status: if hashing { Status::Embedded } else { Status::Up },
        backend: embedder.model().to_owned(),
        latency_ms: 0.0,
        detail: Some(detail),
    }
}
