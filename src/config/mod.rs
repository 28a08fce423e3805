//! Typed settings read once at start-up from the environment (and a `.env` file), validated with
//! messages that name the variable and the form it expects. Secrets are wrapped so `Debug` hides them.
//!
//! One reader per section builds the type its consumer takes (`llm`, `store`, `realtime`, `jobs`); the
//! server, auth and API settings stay flat here. The reference services' names are kept as they
//! are; everything coachd adds is `COACHD_`-prefixed.

mod api;
mod cluster;
mod extract;
mod jobs;
mod llm;
mod realtime;
mod source;
mod store;
mod telemetry;
#[cfg(test)]
mod tests;
mod transcribe;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use api::{DEFAULT_ENTITY_TYPES, DEFAULT_INTENT_LABELS, is_label};
pub use jobs::parse_queues;
pub use realtime::RealtimeSettings;
pub use source::{Env, Source};
pub use telemetry::TracesSettings;

use crate::context::ContextLimits;
use crate::embed::EmbeddingSettings;
use crate::extract::ExtractSettings;
use crate::jobs::JobsSettings;
use crate::llm::LlmSettings;
use crate::memory::MemorySettings;
pub use crate::metric::MetricsSettings;
pub use crate::secret::{Secret, ServiceUrl};
use crate::transcribe::TranscribeSettings;
use source::{DAY_SECS, Reader, invalid};

/// A configuration value that could not be used; the message is one line meant for an operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}: expected {expected}{}", shown.as_ref().map(|v| format!(" (got {v:?})")).unwrap_or_default())]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: String,
    /// The form it must take.
    pub expected: String,
    /// The offending value, only for variables that are not secret.
    pub shown: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting of coachd, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to bind (`COACHD_HOST`).
    pub host: IpAddr,
    /// Port to bind (`PORT`); 0 picks a free one.
    pub port: u16,
    /// `DEBUG`: more verbose logs by default.
    pub debug: bool,
    /// `DATABASE_URL`; `None` selects the embedded memory store.
    pub database_url: Option<ServiceUrl>,
    /// `COACHD_DB_MAX_CONNECTIONS`.
    pub db_max_connections: u32,
    /// `COACHD_DB_CONNECT_TIMEOUT_SECS`.
    pub db_connect_timeout: Duration,
    /// `REDIS_URL`; `None` selects the embedded context cache.
    pub redis_url: Option<ServiceUrl>,
    /// `REDIS_PASSWORD`, used when the URL carries none.
    pub redis_password: Option<Secret>,
    /// `COACHD_REDIS_POOL_SIZE`.
    pub redis_pool_size: usize,
    /// `COACHD_REDIS_KEY_PREFIX`: prepended to every key so deployments can share one Redis.
    pub redis_key_prefix: String,
    /// `COACHD_REDIS_COMMAND_TIMEOUT_MS`.
    pub redis_command_timeout: Duration,
    /// Limits of the context cache (`SESSION_CONTEXT_TTL`, `USER_SESSION_TTL`,
    /// `COACHD_CONTEXT_MAX_MESSAGES`).
    pub context: ContextLimits,
    /// `RATE_LIMIT_TTL` (seconds): the rate-limit window.
    pub rate_limit_ttl: Duration,
    /// `RATE_LIMIT_REQUESTS` per window.
    pub rate_limit_requests: u32,
    /// `RATE_LIMIT_ENABLED`.
    pub rate_limit_enabled: bool,
    /// `RATE_LIMIT_FAIL_OPEN`: when the limiter's store (Redis) cannot answer, admit the request
    /// (true, the default: an outage of Redis does not take the routes down) or refuse it with 503.
    pub rate_limit_fail_open: bool,
    /// The embedder.
    pub embedding: EmbeddingSettings,
    /// The coach memory store.
    pub memory: MemorySettings,
    /// The LLM gateway: providers, timeouts, retries, tasks.
    pub llm: LlmSettings,
    /// Live sessions and transports.
    pub realtime: RealtimeSettings,
    /// Async jobs (`COACHD_JOBS_*`).
    pub jobs: JobsSettings,
    /// The speech-to-text client (`COACHD_TRANSCRIBE_*`).
    pub transcribe: TranscribeSettings,
    /// Document extraction: `COACHD_EXTRACT_*`, `DOCLING_SERVE_URL`, `DOCLING_SERVE_API_KEY`.
    pub extract: ExtractSettings,
    /// This node in a cluster (`COACHD_NODE_ID`, `COACHD_CLUSTER_*`; used with `REDIS_URL`).
    pub cluster: crate::session::cluster::ClusterSettings,
    /// How many client connections the node takes, and the answer past that.
    pub connections: crate::listener::ConnectionLimits,
    /// Time and size limits of request heads and bodies (`COACHD_HTTP_*`).
    pub http: crate::server::HttpLimits,
    /// `COACHD_MAX_TRANSCRIPT_CHARS`: longest transcript for notes.
    pub max_transcript_chars: usize,
    /// `COACHD_PERSONAS_FILE`: TOML file of extra or replacing coach personas.
    pub personas_file: Option<PathBuf>,
    /// `SUPABASE_JWT_SECRET`.
    pub supabase_jwt_secret: Option<Secret>,
    /// `XENIOS_BACKEND_API_KEY`.
    pub backend_api_key: Option<Secret>,
    /// Every accepted API key: `XENIOS_BACKEND_API_KEY` plus the comma-separated `COACHD_API_KEYS`.
    pub api_keys: Vec<Secret>,
    /// `COACHD_JWT_AUDIENCE`: the `aud` end-user JWTs must carry (Supabase's is `authenticated`).
    pub jwt_audience: String,
    /// `COACHD_JWT_LEEWAY_SECS`: clock skew tolerated on `exp` and `nbf`.
    pub jwt_leeway: Duration,
    /// `COACHD_API_MAX_TEXT_CHARS`: longest text, prompt, system prompt or message (characters).
    pub api_max_text_chars: usize,
    /// `COACHD_API_MAX_MESSAGES`: most messages in one LLM request.
    pub api_max_messages: usize,
    /// `COACHD_API_MAX_OUTPUT_TOKENS`: highest `max_tokens` a request may ask for.
    pub api_max_output_tokens: u32,
    /// `COACHD_API_MAX_LABELS`: most intent labels or entity types one request may name.
    pub api_max_labels: usize,
    /// `COACHD_INTENT_LABELS`: the default labels of `/api/v1/llm/classify-intent`.
    pub intent_labels: Vec<String>,
    /// `COACHD_ENTITY_TYPES`: the default entity types of `/api/v1/llm/extract-entities`.
    pub entity_types: Vec<String>,
    /// `COACHD_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `COACHD_LOG`: a tracing filter directive; defaults from `DEBUG`.
    pub log_filter: String,
    /// OpenTelemetry traces (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, …).
    pub traces: TracesSettings,
    /// `COACHD_SHUTDOWN_GRACE_SECS`: how long in-flight requests may run after the listener closes.
    pub shutdown_grace: Duration,
    /// `COACHD_SHUTDOWN_DRAIN_DELAY_SECS`: how long the server serves on after a stop signal with
    /// `/health/ready` answering 503, so load balancers stop routing here before it stops accepting.
    pub shutdown_drain_delay: Duration,
    /// `COACHD_HEALTH_TIMEOUT_MS`: limit of one dependency check.
    pub health_timeout: Duration,
    /// `COACHD_MAX_BODY_BYTES`: largest accepted request body.
    pub max_body_bytes: usize,
    /// `COACHD_CHAT_UI`: serve the browser chat client at `/chat`.
    pub chat_ui: bool,
    /// `/metrics`: `COACHD_METRICS_ENABLED`, `COACHD_METRICS_TOKEN`.
    pub metrics: MetricsSettings,
    /// What the operator should change (a deprecated variable name, say): logged as warnings at
    /// start-up, once tracing is set up.
    pub warnings: Vec<String>,
}

impl Settings {
    /// Settings from the process environment. Call [`load_dotenv`] first to include `.env`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    /// Settings from any [`Source`]; tests use a map so they never touch the process environment.
    pub fn from_source<S: Source>(source: &S) -> Result<Self, ConfigError> {
        let r = Reader(source);
        let mut warnings = Vec::new();
        let debug = r.boolean("DEBUG", false)?;

        let log_format = match r
            .string("COACHD_LOG_FORMAT", "text")
            .to_ascii_lowercase()
            .as_str()
        {
            "text" | "pretty" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "COACHD_LOG_FORMAT",
                    "text or json",
                    Some(other.to_owned()),
                ));
            }
        };
        let log_filter = r.string("COACHD_LOG", if debug { "debug" } else { "info" });
        tracing_subscriber::EnvFilter::try_new(&log_filter).map_err(|_| {
            invalid(
                "COACHD_LOG",
                "a tracing filter such as info or coachd=debug,tower_http=info",
                Some(log_filter.clone()),
            )
        })?;

        let memory = store::memory(&r)?;
        let realtime = realtime::read(&r, &memory, &mut warnings)?;
        let backend_api_key = r.secret("XENIOS_BACKEND_API_KEY");
        if backend_api_key
            .as_ref()
            .is_some_and(|k| !k.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "XENIOS_BACKEND_API_KEY",
                "a key of visible ASCII characters",
                None,
            ));
        }
        let mut api_keys: Vec<Secret> = backend_api_key.iter().cloned().collect();
        api_keys.extend(r.api_keys("COACHD_API_KEYS")?);
        let metrics = MetricsSettings {
            enabled: r.boolean("COACHD_METRICS_ENABLED", true)?,
            token: r.secret("COACHD_METRICS_TOKEN"),
        };
        if metrics
            .token
            .as_ref()
            .is_some_and(|t| !t.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "COACHD_METRICS_TOKEN",
                "a token of visible ASCII characters",
                None,
            ));
        }

        Ok(Settings {
            host: r.parse(
                "COACHD_HOST",
                IpAddr::from([0, 0, 0, 0]),
                "an IP address such as 0.0.0.0 or 127.0.0.1",
            )?,
            port: r.int("PORT", 8000, 0, u16::MAX)?,
            debug,
            database_url: r.service_url("DATABASE_URL", &["postgres", "postgresql"])?,
            db_max_connections: r.int("COACHD_DB_MAX_CONNECTIONS", 10, 1, 10_000)?,
            db_connect_timeout: r.seconds("COACHD_DB_CONNECT_TIMEOUT_SECS", 5, 1, 600)?,
            redis_url: r.service_url("REDIS_URL", &["redis", "rediss"])?,
            redis_password: r.secret("REDIS_PASSWORD"),
            redis_pool_size: r.int("COACHD_REDIS_POOL_SIZE", 4, 1, 256)?,
            redis_key_prefix: r.string("COACHD_REDIS_KEY_PREFIX", ""),
            redis_command_timeout: r.millis("COACHD_REDIS_COMMAND_TIMEOUT_MS", 2_000, 1, 600_000)?,
            context: store::context(&r)?,
            rate_limit_ttl: r.seconds("RATE_LIMIT_TTL", 60, 1, DAY_SECS)?,
            rate_limit_requests: r.int("RATE_LIMIT_REQUESTS", 60, 1, 1_000_000)?,
            rate_limit_enabled: r.boolean("RATE_LIMIT_ENABLED", true)?,
            rate_limit_fail_open: r.boolean("RATE_LIMIT_FAIL_OPEN", true)?,
            embedding: store::embedding(&r)?,
            memory,
            llm: llm::read(&r)?,
            realtime,
            jobs: jobs::read(&r)?,
            transcribe: transcribe::read(&r)?,
            extract: extract::read(&r)?,
            cluster: cluster::read(&r)?,
            connections: crate::listener::ConnectionLimits {
                max_connections: r.int("COACHD_MAX_CONNECTIONS", 0, 0, 100_000_000)?,
                fd_reserve: r.int("COACHD_FD_RESERVE", 256, 16, 1_000_000)?,
                retry_after: r.seconds("COACHD_CAPACITY_RETRY_AFTER_SECS", 5, 1, 3_600)?,
            },
            http: crate::server::HttpLimits {
                header_timeout: r.seconds("COACHD_HTTP_HEADER_TIMEOUT_SECS", 10, 1, 3_600)?,
                body_timeout: r.seconds("COACHD_HTTP_BODY_TIMEOUT_SECS", 30, 1, 3_600)?,
                max_header_bytes: r.int("COACHD_HTTP_MAX_HEADER_BYTES", 65_536, 8_192, 16 << 20)?,
                max_headers: r.int("COACHD_HTTP_MAX_HEADERS", 100, 16, 10_000)?,
                h2_max_streams: r.int("COACHD_HTTP2_MAX_STREAMS", 200, 1, 100_000)?,
            },
            max_transcript_chars: r.int("COACHD_MAX_TRANSCRIPT_CHARS", 200_000, 1, 10_000_000)?,
            personas_file: r.raw("COACHD_PERSONAS_FILE").map(PathBuf::from),
            supabase_jwt_secret: r.secret("SUPABASE_JWT_SECRET"),
            backend_api_key,
            api_keys,
            jwt_audience: r.string("COACHD_JWT_AUDIENCE", "authenticated"),
            jwt_leeway: r.seconds("COACHD_JWT_LEEWAY_SECS", 30, 0, 600)?,
            api_max_text_chars: r.int("COACHD_API_MAX_TEXT_CHARS", 32_000, 1, 10_000_000)?,
            api_max_messages: r.int("COACHD_API_MAX_MESSAGES", 200, 1, 100_000)?,
            api_max_output_tokens: r.int("COACHD_API_MAX_OUTPUT_TOKENS", 16_384, 1, 1_000_000)?,
            api_max_labels: r.int("COACHD_API_MAX_LABELS", 50, 1, 1_000)?,
            intent_labels: r.labels("COACHD_INTENT_LABELS", &DEFAULT_INTENT_LABELS)?,
            entity_types: r.labels("COACHD_ENTITY_TYPES", &DEFAULT_ENTITY_TYPES)?,
            log_format,
            log_filter,
            traces: telemetry::read(&r)?,
            shutdown_grace: r.seconds("COACHD_SHUTDOWN_GRACE_SECS", 30, 0, 3_600)?,
            shutdown_drain_delay: r.seconds("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", 5, 0, 600)?,
            health_timeout: r.millis("COACHD_HEALTH_TIMEOUT_MS", 2_000, 1, 60_000)?,
            max_body_bytes: r.int("COACHD_MAX_BODY_BYTES", 1 << 20, 1_024, 1 << 30)?,
            chat_ui: r.boolean("COACHD_CHAT_UI", true)?,
            metrics,
            warnings,
        })
    }

    /// Settings for tests and examples: every default, no external service, the given overrides.
    pub fn for_tests(overrides: &[(&str, &str)]) -> Result<Self, ConfigError> {
        // Feature hashing unless a test asks for another embedder: deterministic, and the tests
        // built on word overlap keep their meaning whether or not scripts/embedder has run.
        let mut map: HashMap<&str, &str> = HashMap::from([
            ("PORT", "0"),
            ("COACHD_HOST", "127.0.0.1"),
            ("COACHD_EMBEDDING_PROVIDER", "offline"),
        ]);
        map.extend(overrides.iter().copied());
        Self::from_source(&map)
    }
}

impl AsRef<LlmSettings> for Settings {
    fn as_ref(&self) -> &LlmSettings {
        &self.llm
    }
}

/// Loads `.env` from the working directory into the process environment, without overriding
/// variables that are already set. A missing file is fine; an unreadable one is an error.
pub fn load_dotenv() -> Result<Option<PathBuf>, String> {
    match dotenvy::dotenv() {
        Ok(path) => Ok(Some(path)),
        Err(e) if e.not_found() => Ok(None),
        Err(e) => Err(dotenv_error(e)),
    }
}

/// Parses `.env` text as [`load_dotenv`] reads its file, without touching the process
/// environment: the pairs in file order, or the same message. For the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn parse_dotenv(text: &[u8]) -> Result<Vec<(String, String)>, String> {
    // `dotenvy::dotenv` skips a leading byte-order mark before iterating; so does this.
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    dotenvy::from_read_iter(text)
        .map(|pair| pair.map_err(dotenv_error))
        .collect()
}

fn dotenv_error(e: dotenvy::Error) -> String {
    match e {
        // dotenvy's message quotes the rest of the file, which holds API keys: name the variable
        // only, as the key grammar reads it (everything before a `=` may be a value too, when
        // the line has no `=` or its key is quoted).
        dotenvy::Error::LineParse(line, _) => {
            let line = line.trim_start();
            let line = match line.strip_prefix("export") {
                Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
                _ => line,
            };
            let end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(line.len());
            match &line[..end] {
                "" => "cannot read .env: syntax error in a line that starts with no variable name".to_owned(),
                var => format!("cannot read .env: syntax error in the line of {var} (check its quoting)"),
            }
        }
        e => format!("cannot read .env: {e}"),
    }
}
