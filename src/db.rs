//! PostgreSQL: the shared connection pool and the migrations, which need the pgvector
//! extension. Start-up fails early, with a message that says so, when pgvector is missing.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::{ServiceUrl, Settings};
use crate::startup::StartupError;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens the pool and checks one connection, so a wrong URL fails start-up at once.
pub async fn connect(url: &ServiceUrl, settings: &Settings) -> Result<PgPool, StartupError> {
    let options: PgConnectOptions = url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| StartupError::Database {
            url: url.redacted(),
            reason: e.to_string(),
        })?
        .application_name("coachd")
        // Statement logging at INFO would flood the log with every memory search.
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    PgPoolOptions::new()
        .max_connections(settings.db_max_connections)
        .acquire_timeout(settings.db_connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| StartupError::Database {
            url: url.redacted(),
            reason: e.to_string(),
        })
}

/// Applies every pending migration. Safe to run again, and from several instances at once
/// (sqlx serialises them with an advisory lock). Returns how many were newly applied.
pub async fn migrate(pool: &PgPool) -> Result<usize, StartupError> {
    let available: bool =
        sqlx::query_scalar("select exists(select 1 from pg_available_extensions where name = 'vector')")
            .fetch_one(pool)
            .await
            .map_err(|e| StartupError::Migrate(e.to_string()))?;
    if !available {
        return Err(StartupError::NoPgvector);
    }
    let before = applied_count(pool).await;
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StartupError::Migrate(e.to_string()))?;
    Ok(applied_count(pool).await.saturating_sub(before))
}

async fn applied_count(pool: &PgPool) -> usize {
    // The table does not exist before the first run; that counts as zero.
    sqlx::query_scalar::<_, i64>("select count(*) from _sqlx_migrations where success")
        .fetch_one(pool)
        .await
        .map(|n| usize::try_from(n).unwrap_or(0))
        .unwrap_or(0)
}
