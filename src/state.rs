//! The shared application state: a `Clone` bag of cheap handles built once by `startup`.

use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::llm::Llm;

/// Everything a handler may need. Cloning is cheap: every field is a handle.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// PostgreSQL pool, when `DATABASE_URL` is set.
    pub db: Option<PgPool>,
    /// Redis pool, when `REDIS_URL` is set.
    pub redis: Option<fred::clients::Pool>,
    /// The LLM gateway: providers and task routing.
    pub llm: Arc<Llm>,
    /// API-key and JWT verification.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Coach personas.
    pub personas: Arc<crate::coach::Personas>,
    /// Cancelled when the server begins to shut down; long-lived streams watch it.
    pub shutdown: CancellationToken,
    /// When the process started serving.
    pub started_at: Instant,
}
