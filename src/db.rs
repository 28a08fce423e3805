//! PostgreSQL: the shared connection pool and the migrations, which need the pgvector
//! extension. Start-up fails early, with a message that says so, when pgvector is missing.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::{ServiceUrl, Settings};

/// Why PostgreSQL could not be set up; each message is one line meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL could not be reached or the URL is unusable.
    #[error("cannot connect to PostgreSQL at {url}: {reason}")]
    Connect {
        /// The URL with its password redacted.
        url: String,
        /// The driver's reason.
        reason: String,
    },
    /// The server has no pgvector.
    #[error(
        "the PostgreSQL server has no pgvector extension (\"vector\" is not in pg_available_extensions); \
         install pgvector 0.8+ on it, or run scripts/services for a development server that has it"
    )]
    NoPgvector,
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(String),
}

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// coachd's migrations, run next to the job engine's (apalis-postgres records its own in the same
/// `_sqlx_migrations`), so each side ignores the entries it does not know.
fn coachd_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// Opens the pool and checks one connection, so a wrong URL fails start-up at once.
pub async fn connect(url: &ServiceUrl, settings: &Settings) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| DbError::Connect {
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
        .map_err(|e| DbError::Connect {
            url: url.redacted(),
            reason: e.to_string(),
        })
}

/// Applies every pending migration: coachd's and the job engine's (schema `apalis`). Safe to run again, and from several instances at once
/// (sqlx serialises them with an advisory lock). Returns how many were newly applied.
pub async fn migrate(pool: &PgPool) -> Result<usize, DbError> {
    let available: bool =
        sqlx::query_scalar("select exists(select 1 from pg_available_extensions where name = 'vector')")
            .fetch_one(pool)
            .await
            .map_err(|e| DbError::Migrate(e.to_string()))?;
    if !available {
        return Err(DbError::NoPgvector);
    }
    let before = applied_count(pool).await;
    coachd_migrator()
        .run(pool)
        .await
        .map_err(|e| DbError::Migrate(e.to_string()))?;
    crate::jobs::pg::PgJobBackend::setup(pool)
        .await
        .map_err(|e| DbError::Migrate(e.to_string()))?;
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

/// A throwaway database on the server of an admin URL, for tests, examples and benchmarks.
#[derive(Debug, Clone)]
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
    /// Its URL: the admin URL with the scratch database's name as path.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates an empty database named `{prefix}{uuid}`. `prefix` must be lowercase letters,
    /// digits and `_`: with a UUID after it, the name is safe to format into DDL (database names
    /// cannot be bound parameters).
    pub async fn create(admin_url: &str, prefix: &str) -> Result<Self, sqlx::Error> {
        use sqlx::{Connection, Executor};
        if !prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(sqlx::Error::Configuration(
                format!("scratch database prefix {prefix:?}: only a-z, 0-9 and _").into(),
            ));
        }
        let name = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(admin_url).map_err(|e| sqlx::Error::Configuration(e.into()))?;
        url.set_path(&name);
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        conn.execute(format!(r#"create database "{name}""#).as_str())
            .await?;
        conn.close().await?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        })
    }

    /// Drops the database, closing whatever connections it still has.
    pub async fn drop_now(self) -> Result<(), sqlx::Error> {
        use sqlx::{Connection, Executor};
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        conn.execute(format!(r#"drop database if exists "{}" with (force)"#, self.name).as_str())
            .await?;
        conn.close().await
    }
}
