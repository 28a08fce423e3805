//! The shared application state: a `Clone` bag of cheap handles built once by `startup`.

use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::coach::notes::NotesStore;
use crate::config::Settings;
use crate::context::ContextCache;
use crate::context::rate_limit::RateLimiter;
use crate::embed::Embedder;
use crate::jobs::{JobBackend, Runner};
use crate::llm::Llm;
use crate::memory::MemoryStore;
use crate::persist::WriteBehind;
use crate::session::ConnectionManager;
use crate::session::token::TokenKey;

/// Everything a handler may need. Cloning is cheap: every field is a handle.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// PostgreSQL pool, when `DATABASE_URL` is set.
    pub db: Option<PgPool>,
    /// Redis pool, when `REDIS_URL` is set.
    pub redis: Option<fred::clients::Pool>,
    /// Short-term context: Redis when `REDIS_URL` is set, in-process otherwise.
    pub context: Arc<dyn ContextCache>,
    /// Per-user, per-endpoint rate limits: Redis, in-process, or disabled (`RATE_LIMIT_ENABLED`).
    pub rate_limiter: Arc<dyn RateLimiter>,
    /// Long-term memory: PostgreSQL + pgvector when `DATABASE_URL` is set, in-process otherwise.
    pub memory: Arc<dyn MemoryStore>,
    /// The embedder the memory store uses (`COACHD_EMBEDDING_PROVIDER`).
    pub embedder: Arc<dyn Embedder>,
    /// Live realtime sessions.
    pub sessions: Arc<ConnectionManager>,
    /// Issues and checks session tokens.
    pub session_tokens: TokenKey,
    /// Write-behind of finished turns (for its statistics).
    pub write_behind: WriteBehind,
    /// Session notes.
    pub notes: Arc<dyn NotesStore>,
    /// Job records and queues: PostgreSQL + apalis when `DATABASE_URL` is set, in-process otherwise.
    pub jobs: Arc<dyn JobBackend>,
    /// Runs jobs for this process's workers; the API uses it to stop a local run at once on cancel.
    pub job_runner: Arc<Runner>,
    /// Tasks that outlive a request: WebSocket and SSE connection tasks and session tasks; waited
    /// for at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// The LLM gateway: providers and task routing.
    pub llm: Arc<Llm>,
    /// API-key and JWT verification.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Coach personas.
    pub personas: Arc<crate::coach::Personas>,
    /// Cancelled when a stop is asked for (a signal, `Application::shutdown_token`):
    /// from then on `/health/ready` answers 503, while the server serves on for the drain delay.
    pub draining: CancellationToken,
    /// Cancelled when the server stops accepting (after the drain delay); long-lived streams
    /// watch it and end.
    pub shutdown: CancellationToken,
    /// When the process started serving.
    pub started_at: Instant,
}
