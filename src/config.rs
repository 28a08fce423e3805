//! Typed settings read once at start-up from the environment (and a `.env` file), validated with
//! messages that name the variable and the form it expects. Secrets are wrapped so `Debug` hides them.
//!
//! The reference services' names are kept as they are; everything coachd adds is `COACHD_`-prefixed.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use crate::context::ContextLimits;
use crate::embed::{EmbeddingProvider, EmbeddingSettings};
use crate::llm::{LlmSettings, LlmTimeouts, ProviderKind, ProviderSettings};
use crate::memory::MemorySettings;
pub use crate::secret::{Secret, ServiceUrl};

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

/// Settings of live sessions and their transports.
#[derive(Debug, Clone)]
pub struct RealtimeSettings {
    /// `COACHD_MAX_SESSIONS`: live sessions at most.
    pub max_sessions: usize,
    /// `COACHD_SESSION_IDLE_SECS`: a session idle this long with no connection ends.
    pub idle_timeout: Duration,
    /// `COACHD_SESSION_LOG_EVENTS`: events kept per session for replay.
    pub log_events: usize,
    /// `COACHD_CLIENT_QUEUE_EVENTS`: events queued per connection before it counts as slow.
    pub client_queue: usize,
    /// `COACHD_SEND_TIMEOUT_MS`: longest wait to hand one event to a connection.
    pub send_timeout: Duration,
    /// `COACHD_MAX_QUEUED_TURNS`: messages waiting behind a streaming reply at most.
    pub max_queued_turns: usize,
    /// `COACHD_MAX_TEXT_CHARS`: longest user message.
    pub max_text_chars: usize,
    /// `COACHD_SESSION_TOKEN_SECRET`: key of session tokens (random per process when unset).
    pub token_secret: Option<Secret>,
    /// `COACHD_SESSION_TOKEN_TTL_SECS`.
    pub token_ttl: Duration,
    /// `COACHD_SSE_HEARTBEAT_SECS` (formerly `COACHD_SSE_KEEP_ALIVE_SECS`, still read): interval
    /// of the `:` comment every SSE response sends while no event does, session and stateless
    /// streams alike.
    pub sse_heartbeat: Duration,
    /// `COACHD_WS_PING_SECS`.
    pub ws_ping: Duration,
    /// `COACHD_WS_PONG_TIMEOUT_SECS`.
    pub ws_pong_timeout: Duration,
    /// `COACHD_WS_MAX_MESSAGE_BYTES`.
    pub ws_max_message_bytes: usize,
    /// `COACHD_WS_READ_BUFFER_BYTES`: per-connection read buffer (grows for larger frames).
    pub ws_read_buffer_bytes: usize,
    /// `COACHD_WS_MAX_BAD_FRAMES`: consecutive malformed frames before closing with 1008.
    pub ws_max_bad_frames: u32,
    /// `COACHD_PROMPT_CONTEXT_MESSAGES`: recent messages in a prompt.
    pub prompt_context_messages: usize,
    /// `COACHD_PROMPT_MEMORIES`: memories in a prompt.
    pub prompt_memories: usize,
    /// `COACHD_PROMPT_MIN_SIMILARITY`: least similarity of a memory in a prompt.
    pub prompt_min_similarity: f32,
    /// `COACHD_PROMPT_FETCH_TIMEOUT_MS`: longest wait for context and memories.
    pub prompt_fetch_timeout: Duration,
    /// `COACHD_WRITE_BEHIND_QUEUE`: queued turns per write-behind worker.
    pub write_behind_queue: usize,
    /// `COACHD_WRITE_BEHIND_WORKERS`.
    pub write_behind_workers: usize,
    /// `COACHD_WRITE_BEHIND_MAX_ATTEMPTS`: attempts per store before a turn is given up.
    pub write_behind_max_attempts: u32,
    /// `COACHD_ENDED_SESSIONS_KEPT`: ended sessions remembered for status queries.
    pub ended_kept: usize,
    /// `COACHD_NOTES_MAX_TURNS`: turns kept for end-of-session notes.
    pub notes_max_turns: usize,
    /// `COACHD_MAX_ACTIONS`: action items per turn.
    pub max_actions: usize,
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
    /// `COACHD_SHUTDOWN_GRACE_SECS`: how long in-flight requests may run after the listener closes.
    pub shutdown_grace: Duration,
    /// `COACHD_SHUTDOWN_DRAIN_DELAY_SECS`: how long the server serves on after a stop signal with
    /// `/health/ready` answering 503, so load balancers stop routing here before it stops accepting.
    pub shutdown_drain_delay: Duration,
    /// `COACHD_HEALTH_TIMEOUT_MS`: limit of one dependency check.
    pub health_timeout: Duration,
    /// `COACHD_MAX_BODY_BYTES`: largest accepted request body.
    pub max_body_bytes: usize,
    /// What the operator should change (a deprecated variable name, say): logged as warnings at
    /// start-up, once tracing is set up.
    pub warnings: Vec<String>,
}

/// Reads raw values by name; the process environment in production, a map in tests.
pub trait Source {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|v| (*v).to_owned())
    }
}

/// Wraps a [`Source`] and treats empty or whitespace-only values as unset, as `.env` files
/// commonly leave optional variables blank (`REDIS_PASSWORD=`).
struct Reader<'a, S: Source>(&'a S);

impl<S: Source> Reader<'_, S> {
    fn raw(&self, var: &str) -> Option<String> {
        self.0
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_owned())
    }

    fn secret(&self, var: &str) -> Option<Secret> {
        self.raw(var).map(Secret::new)
    }

    fn parse<T: FromStr>(&self, var: &str, default: T, expected: &str) -> Result<T, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| invalid(var, expected, Some(v))),
        }
    }

    /// An integer in `min..=max`.
    fn int<T>(&self, var: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Copy + fmt::Display,
    {
        let expected = format!("an integer from {min} to {max}");
        let value = self.parse(var, default, &expected)?;
        if value < min || value > max {
            return Err(invalid(var, &expected, self.raw(var)));
        }
        Ok(value)
    }

    fn seconds(&self, var: &str, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.int(var, default, min, max).map(Duration::from_secs)
    }

    fn millis(&self, var: &str, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.int(var, default, min, max).map(Duration::from_millis)
    }

    /// A number from 0 to 1.
    fn fraction(&self, var: &str, default: f32) -> Result<f32, ConfigError> {
        let expected = "a number from 0 to 1";
        let value: f32 = self.parse(var, default, expected)?;
        if !(0.0..=1.0).contains(&value) {
            return Err(invalid(var, expected, self.raw(var)));
        }
        Ok(value)
    }

    fn boolean(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(var, "true or false", Some(v))),
            },
        }
    }

    /// A URL with one of `schemes`; the value is never echoed because URLs carry passwords.
    fn service_url(&self, var: &str, schemes: &[&str]) -> Result<Option<ServiceUrl>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(None);
        };
        let expected = format!(
            "a URL such as {}://user:password@host:port/name",
            schemes.first().copied().unwrap_or("scheme")
        );
        let mut url = Url::parse(&raw).map_err(|_| invalid(var, &expected, None))?;
        // The Python services use SQLAlchemy URLs such as `postgresql+asyncpg://`; accept them.
        let scheme = url.scheme().split('+').next().unwrap_or_default().to_owned();
        if !schemes.contains(&scheme.as_str()) || url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(var, &expected, None));
        }
        if scheme != url.scheme() {
            let rest = &raw[raw.find("://").unwrap_or(0)..];
            url = Url::parse(&format!("{scheme}{rest}")).map_err(|_| invalid(var, &expected, None))?;
        }
        Ok(Some(ServiceUrl::new(url)))
    }

    /// A comma-separated list of labels (see [`is_label`]), without duplicates, or `default`.
    fn labels(&self, var: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(default.iter().map(|l| (*l).to_owned()).collect());
        };
        let expected =
            "a comma-separated list of 1 to 100 distinct labels of letters, digits, _ - . (at most 64 each)";
        let labels: Vec<String> = raw.split(',').map(|l| l.trim().to_owned()).collect();
        let distinct = labels.iter().collect::<std::collections::HashSet<_>>().len() == labels.len();
        if labels.is_empty() || labels.len() > 100 || !distinct || !labels.iter().all(|l| is_label(l)) {
            return Err(invalid(var, expected, Some(raw)));
        }
        Ok(labels)
    }

    /// API keys: comma-separated, each of visible ASCII (so it fits an HTTP header). Never echoed.
    fn api_keys(&self, var: &str) -> Result<Vec<Secret>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                if k.bytes().all(|b| b.is_ascii_graphic()) {
                    Ok(Secret::new(k))
                } else {
                    Err(invalid(
                        var,
                        "comma-separated keys of visible ASCII characters",
                        None,
                    ))
                }
            })
            .collect()
    }

    /// A setting that was renamed: `new` wins; `old` alone still works, with a warning that
    /// names `new`.
    fn renamed<T>(
        &self,
        new: &str,
        old: &str,
        warnings: &mut Vec<String>,
        read: impl Fn(&str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match (self.raw(new), self.raw(old)) {
            (None, Some(_)) => {
                warnings.push(format!(
                    "{old} is deprecated: set {new} instead (it is read for now)"
                ));
                read(old)
            }
            (Some(_), Some(_)) => {
                warnings.push(format!("{old} is deprecated and ignored: {new} is set"));
                read(new)
            }
            _ => read(new),
        }
    }

    fn base_url(&self, var: &str, default: &str) -> Result<Url, ConfigError> {
        let raw = self.string(var, default);
        let expected = "an http(s) URL such as https://api.example.com/v1";
        let url =
            Url::parse(raw.trim_end_matches('/')).map_err(|_| invalid(var, expected, Some(raw.clone())))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(var, expected, Some(raw)));
        }
        Ok(url)
    }
}

/// Whether `s` can be an intent label or entity type: 1 to 64 ASCII letters, digits, `_`, `-`, `.`.
pub fn is_label(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The default intent labels: what people bring to a coach.
pub const DEFAULT_INTENT_LABELS: [&str; 7] = [
    "goal_setting",
    "progress_update",
    "question",
    "feedback",
    "scheduling",
    "smalltalk",
    "other",
];

/// The default entity types of entity extraction.
pub const DEFAULT_ENTITY_TYPES: [&str; 10] = [
    "person",
    "organization",
    "location",
    "date",
    "time",
    "duration",
    "money",
    "quantity",
    "goal",
    "metric",
];

fn invalid(var: &str, expected: &str, shown: Option<String>) -> ConfigError {
    ConfigError {
        var: var.to_owned(),
        expected: expected.to_owned(),
        shown,
    }
}

const DAY_SECS: u64 = 86_400;

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

        let llm_provider = match r.raw("LLM_PROVIDER") {
            None => ProviderKind::Openai,
            Some(v) => v.parse().map_err(|()| {
                invalid(
                    "LLM_PROVIDER",
                    "one of openai, groq, anthropic, openrouter, offline",
                    Some(v),
                )
            })?,
        };
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

        let provider =
            |key: &str, model_var: &str, default_model: &str, base_var: &str, default_base: &str| {
                Ok::<_, ConfigError>(ProviderSettings {
                    api_key: r.secret(key),
                    model: r.string(model_var, default_model),
                    base_url: r.base_url(base_var, default_base)?,
                })
            };

        let llm_timeouts = LlmTimeouts {
            connect: r.millis("COACHD_LLM_CONNECT_TIMEOUT_MS", 5_000, 1, 600_000)?,
            first_token: r.millis("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", 30_000, 1, 3_600_000)?,
            idle: r.millis("COACHD_LLM_IDLE_TIMEOUT_MS", 30_000, 1, 3_600_000)?,
            total: r.millis("COACHD_LLM_TOTAL_TIMEOUT_MS", 300_000, 1, 86_400_000)?,
        };

        let embedding = EmbeddingSettings {
            provider: match r
                .string("COACHD_EMBEDDING_PROVIDER", "offline")
                .to_ascii_lowercase()
                .as_str()
            {
                "offline" => EmbeddingProvider::Offline,
                "openai" => EmbeddingProvider::Openai,
                other => {
                    return Err(invalid(
                        "COACHD_EMBEDDING_PROVIDER",
                        "offline or openai",
                        Some(other.to_owned()),
                    ));
                }
            },
            model: r.string("COACHD_EMBEDDING_MODEL", "text-embedding-3-small"),
            // HNSW indexes `vector` columns of at most 2000 dimensions.
            dimension: r.int("COACHD_EMBEDDING_DIM", 384, 1, 2_000)?,
            base_url: r.base_url("COACHD_EMBEDDING_BASE_URL", "https://api.openai.com/v1")?,
            api_key: r
                .secret("COACHD_EMBEDDING_API_KEY")
                .or_else(|| r.secret("OPENAI_API_KEY")),
            send_dimensions: r.boolean("COACHD_EMBEDDING_SEND_DIMENSIONS", true)?,
            batch_size: r.int("COACHD_EMBEDDING_BATCH_SIZE", 128, 1, 2_048)?,
            timeout: r.millis("COACHD_EMBEDDING_TIMEOUT_MS", 30_000, 1, 600_000)?,
        };
        let memory = MemorySettings {
            max_text_bytes: r.int("COACHD_MEMORY_MAX_TEXT_BYTES", 16_384, 1, 1 << 20)?,
            list_max: r.int("COACHD_MEMORY_LIST_MAX", 100, 1, 10_000)?,
            ef_search: r.int("COACHD_MEMORY_EF_SEARCH", 40, 1, 1_000)?,
            max_scan_tuples: r.int("COACHD_MEMORY_MAX_SCAN_TUPLES", 20_000, 1, 100_000_000)?,
            embedded_max: r.int("COACHD_MEMORY_EMBEDDED_MAX", 100_000, 1, 100_000_000)?,
        };
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
            context: ContextLimits {
                session_ttl: r.seconds("SESSION_CONTEXT_TTL", 3_600, 1, 365 * DAY_SECS)?,
                user_session_ttl: r.seconds("USER_SESSION_TTL", DAY_SECS, 1, 365 * DAY_SECS)?,
                // A cap on each context list, so no session grows a key without bound.
                max_messages: r.int("COACHD_CONTEXT_MAX_MESSAGES", 100, 1, 100_000)?,
            },
            rate_limit_ttl: r.seconds("RATE_LIMIT_TTL", 60, 1, DAY_SECS)?,
            rate_limit_requests: r.int("RATE_LIMIT_REQUESTS", 60, 1, 1_000_000)?,
            rate_limit_enabled: r.boolean("RATE_LIMIT_ENABLED", true)?,
            rate_limit_fail_open: r.boolean("RATE_LIMIT_FAIL_OPEN", true)?,
            embedding,
            memory,
            llm: LlmSettings {
                llm_provider,
                openai: provider(
                    "OPENAI_API_KEY",
                    "OPENAI_MODEL",
                    "gpt-4-turbo-preview",
                    "COACHD_OPENAI_BASE_URL",
                    "https://api.openai.com/v1",
                )?,
                groq: provider(
                    "GROQ_API_KEY",
                    "GROQ_MODEL",
                    "llama-3.1-70b-versatile",
                    "COACHD_GROQ_BASE_URL",
                    "https://api.groq.com/openai/v1",
                )?,
                anthropic: provider(
                    "ANTHROPIC_API_KEY",
                    "ANTHROPIC_MODEL",
                    "claude-3-sonnet-20240229",
                    "COACHD_ANTHROPIC_BASE_URL",
                    "https://api.anthropic.com/v1",
                )?,
                openrouter: provider(
                    "OPENROUTER_API_KEY",
                    "COACHD_OPENROUTER_MODEL",
                    "anthropic/claude-sonnet-4",
                    "COACHD_OPENROUTER_BASE_URL",
                    "https://openrouter.ai/api/v1",
                )?,
                openrouter_referer: r.raw("COACHD_OPENROUTER_REFERER"),
                openrouter_title: r.string("COACHD_OPENROUTER_TITLE", "coachd"),
                llm_timeouts,
                llm_max_retries: r.int("COACHD_LLM_MAX_RETRIES", 2, 0, 10)?,
                llm_retry_base: r.millis("COACHD_LLM_RETRY_BASE_MS", 250, 0, 60_000)?,
                llm_max_retry_wait: r.millis("COACHD_LLM_MAX_RETRY_WAIT_MS", 10_000, 0, 600_000)?,
                llm_tasks_file: r.raw("COACHD_LLM_TASKS_FILE").map(PathBuf::from),
                offline_token_delay: r.millis("COACHD_OFFLINE_TOKEN_DELAY_MS", 20, 0, 10_000)?,
            },
            realtime: RealtimeSettings {
                max_sessions: r.int("COACHD_MAX_SESSIONS", 10_000, 1, 10_000_000)?,
                idle_timeout: r.seconds("COACHD_SESSION_IDLE_SECS", 1_800, 1, 7 * DAY_SECS)?,
                log_events: r.int("COACHD_SESSION_LOG_EVENTS", 2_048, 16, 1_000_000)?,
                client_queue: r.int("COACHD_CLIENT_QUEUE_EVENTS", 1_024, 1, 1_000_000)?,
                send_timeout: r.millis("COACHD_SEND_TIMEOUT_MS", 5_000, 1, 600_000)?,
                max_queued_turns: r.int("COACHD_MAX_QUEUED_TURNS", 4, 0, 1_000)?,
                max_text_chars: r.int("COACHD_MAX_TEXT_CHARS", 8_000, 1, 1_000_000)?,
                token_secret: r.secret("COACHD_SESSION_TOKEN_SECRET"),
                token_ttl: r.seconds("COACHD_SESSION_TOKEN_TTL_SECS", 3_600, 1, 30 * DAY_SECS)?,
                sse_heartbeat: r.renamed(
                    "COACHD_SSE_HEARTBEAT_SECS",
                    "COACHD_SSE_KEEP_ALIVE_SECS",
                    &mut warnings,
                    |var| r.seconds(var, 15, 1, 3_600),
                )?,
                ws_ping: r.seconds("COACHD_WS_PING_SECS", 25, 1, 3_600)?,
                ws_pong_timeout: r.seconds("COACHD_WS_PONG_TIMEOUT_SECS", 8, 1, 3_600)?,
                ws_max_message_bytes: r.int("COACHD_WS_MAX_MESSAGE_BYTES", 65_536, 256, 64 << 20)?,
                ws_read_buffer_bytes: r.int("COACHD_WS_READ_BUFFER_BYTES", 8_192, 256, 16 << 20)?,
                ws_max_bad_frames: r.int("COACHD_WS_MAX_BAD_FRAMES", 10, 0, 1_000)?,
                prompt_context_messages: r.int("COACHD_PROMPT_CONTEXT_MESSAGES", 20, 0, 1_000)?,
                prompt_memories: r.int("COACHD_PROMPT_MEMORIES", 5, 0, 100)?,
                prompt_min_similarity: r.fraction("COACHD_PROMPT_MIN_SIMILARITY", 0.3)?,
                prompt_fetch_timeout: r.millis("COACHD_PROMPT_FETCH_TIMEOUT_MS", 1_500, 1, 60_000)?,
                write_behind_queue: r.int("COACHD_WRITE_BEHIND_QUEUE", 10_000, 1, 10_000_000)?,
                write_behind_workers: r.int("COACHD_WRITE_BEHIND_WORKERS", 2, 1, 64)?,
                write_behind_max_attempts: r.int("COACHD_WRITE_BEHIND_MAX_ATTEMPTS", 8, 1, 100)?,
                ended_kept: r.int("COACHD_ENDED_SESSIONS_KEPT", 1_000, 1, 1_000_000)?,
                notes_max_turns: r.int("COACHD_NOTES_MAX_TURNS", 200, 1, 10_000)?,
                max_actions: r.int("COACHD_MAX_ACTIONS", 5, 0, 100)?,
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
            shutdown_grace: r.seconds("COACHD_SHUTDOWN_GRACE_SECS", 30, 0, 3_600)?,
            shutdown_drain_delay: r.seconds("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", 5, 0, 600)?,
            health_timeout: r.millis("COACHD_HEALTH_TIMEOUT_MS", 2_000, 1, 60_000)?,
            max_body_bytes: r.int("COACHD_MAX_BODY_BYTES", 1 << 20, 1_024, 1 << 30)?,
            warnings,
        })
    }

    /// Settings for tests and examples: every default, no external service, the given overrides.
    pub fn for_tests(overrides: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let mut map: HashMap<&str, &str> = HashMap::from([("PORT", "0"), ("COACHD_HOST", "127.0.0.1")]);
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
        // dotenvy's message quotes the rest of the file, which holds API keys: name the variable only.
        Err(dotenvy::Error::LineParse(line, _)) => {
            let var = line.split('=').next().unwrap_or_default().trim();
            Err(format!(
                "cannot read .env: syntax error in the line of {var} (check its quoting)"
            ))
        }
        Err(e) => Err(format!("cannot read .env: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_source(&map)
    }

    #[test]
    fn defaults_match_the_reference_services() {
        let s = load(&[]).unwrap();
        assert_eq!(s.port, 8000);
        assert_eq!(s.context.session_ttl, Duration::from_secs(3600));
        assert_eq!(s.context.user_session_ttl, Duration::from_secs(86_400));
        assert_eq!(s.rate_limit_ttl, Duration::from_secs(60));
        assert_eq!(s.rate_limit_requests, 60);
        assert!(s.rate_limit_enabled);
        assert_eq!(s.llm.llm_provider, ProviderKind::Openai);
        assert!(s.database_url.is_none() && s.redis_url.is_none());
        assert_eq!(s.context.max_messages, 100);
        assert_eq!(s.embedding.provider, EmbeddingProvider::Offline);
        assert_eq!(s.embedding.dimension, 384);
        assert_eq!(s.embedding.base_url.as_str(), "https://api.openai.com/v1");
    }

    #[test]
    fn the_embedding_provider_is_never_switched_by_a_key() {
        let s = load(&[("OPENAI_API_KEY", "sk-x")]).unwrap();
        assert_eq!(s.embedding.provider, EmbeddingProvider::Offline);
        assert_eq!(s.embedding.api_key.as_ref().map(Secret::expose), Some("sk-x"));
        let s = load(&[("OPENAI_API_KEY", "sk-x"), ("COACHD_EMBEDDING_API_KEY", "sk-e")]).unwrap();
        assert_eq!(s.embedding.api_key.as_ref().map(Secret::expose), Some("sk-e"));

        let e = load(&[("COACHD_EMBEDDING_PROVIDER", "cohere")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid COACHD_EMBEDDING_PROVIDER: expected offline or openai (got \"cohere\")"
        );
        let e = load(&[("COACHD_EMBEDDING_DIM", "3072")]).unwrap_err();
        assert_eq!(e.var, "COACHD_EMBEDDING_DIM");
        assert!(e.to_string().contains("from 1 to 2000"));
    }

    #[test]
    fn errors_name_the_variable_and_the_expected_form() {
        let e = load(&[("PORT", "abc")]).unwrap_err();
        assert_eq!(e.var, "PORT");
        assert_eq!(
            e.to_string(),
            "invalid PORT: expected an integer from 0 to 65535 (got \"abc\")"
        );

        let e = load(&[("RATE_LIMIT_REQUESTS", "-1")]).unwrap_err();
        assert_eq!(e.var, "RATE_LIMIT_REQUESTS");
        assert!(e.to_string().contains("an integer from 1 to"));

        let e = load(&[("RATE_LIMIT_ENABLED", "maybe")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid RATE_LIMIT_ENABLED: expected true or false (got \"maybe\")"
        );

        let e = load(&[("LLM_PROVIDER", "cohere")]).unwrap_err();
        assert_eq!(e.var, "LLM_PROVIDER");
    }

    #[test]
    fn url_errors_never_echo_the_value() {
        let e = load(&[("DATABASE_URL", "not a url with s3cret")]).unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("s3cret"));
        let e = load(&[("REDIS_URL", "http://u:s3cret@localhost")]).unwrap_err();
        assert_eq!(e.var, "REDIS_URL");
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn sqlalchemy_urls_are_accepted_and_passwords_redacted() {
        let s = load(&[(
            "DATABASE_URL",
            "postgresql+asyncpg://postgres:hunter2@localhost:5432/10xcoach",
        )])
        .unwrap();
        let url = s.database_url.unwrap();
        assert_eq!(
            url.expose(),
            "postgresql://postgres:hunter2@localhost:5432/10xcoach"
        );
        assert_eq!(
            url.redacted(),
            "postgresql://postgres:***@localhost:5432/10xcoach"
        );
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn blank_values_mean_unset() {
        let s = load(&[("REDIS_PASSWORD", "   "), ("PORT", "")]).unwrap();
        assert!(s.redis_password.is_none());
        assert_eq!(s.port, 8000);
    }

    #[test]
    fn api_keys_combine_both_variables_and_are_never_echoed() {
        let s = load(&[
            ("XENIOS_BACKEND_API_KEY", "backend-key"),
            ("COACHD_API_KEYS", " key-one, ,key-two "),
        ])
        .unwrap();
        let keys: Vec<&str> = s.api_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["backend-key", "key-one", "key-two"]);
        assert!(load(&[]).unwrap().api_keys.is_empty());
        let e = load(&[("COACHD_API_KEYS", "ok-key,bad key\u{7f}")]).unwrap_err();
        assert_eq!(e.var, "COACHD_API_KEYS");
        assert!(!e.to_string().contains("ok-key"));
    }

    #[test]
    fn labels_are_validated() {
        let s = load(&[]).unwrap();
        assert_eq!(s.intent_labels.len(), DEFAULT_INTENT_LABELS.len());
        assert_eq!(s.jwt_audience, "authenticated");
        let s = load(&[("COACHD_INTENT_LABELS", "a, b_c ,d-e")]).unwrap();
        assert_eq!(s.intent_labels, ["a", "b_c", "d-e"]);
        for bad in ["a,a", "a,,b", "has space", "ü"] {
            let e = load(&[("COACHD_INTENT_LABELS", bad)]).unwrap_err();
            assert_eq!(e.var, "COACHD_INTENT_LABELS", "{bad}");
        }
        assert!(load(&[("COACHD_ENTITY_TYPES", "x,x")]).is_err());
    }

    #[test]
    fn the_old_sse_keep_alive_name_still_sets_the_heartbeat_with_a_warning() {
        let s = load(&[]).unwrap();
        assert_eq!(s.realtime.sse_heartbeat, Duration::from_secs(15));
        assert!(s.warnings.is_empty());

        let s = load(&[("COACHD_SSE_KEEP_ALIVE_SECS", "7")]).unwrap();
        assert_eq!(s.realtime.sse_heartbeat, Duration::from_secs(7));
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].contains("COACHD_SSE_KEEP_ALIVE_SECS")
                && s.warnings[0].contains("COACHD_SSE_HEARTBEAT_SECS"),
            "the warning names the new variable: {:?}",
            s.warnings
        );

        let s = load(&[
            ("COACHD_SSE_KEEP_ALIVE_SECS", "7"),
            ("COACHD_SSE_HEARTBEAT_SECS", "3"),
        ])
        .unwrap();
        assert_eq!(
            s.realtime.sse_heartbeat,
            Duration::from_secs(3),
            "the new name wins"
        );
        assert!(s.warnings[0].contains("ignored"), "{:?}", s.warnings);

        let e = load(&[("COACHD_SSE_KEEP_ALIVE_SECS", "0")]).unwrap_err();
        assert_eq!(
            e.var, "COACHD_SSE_KEEP_ALIVE_SECS",
            "an old value is checked under its own name"
        );
    }

    #[test]
    fn secrets_are_hidden_from_debug() {
        let s = load(&[
            ("OPENAI_API_KEY", "sk-live-abcdef"),
            ("SUPABASE_JWT_SECRET", "jwt-secret-xyz"),
            ("XENIOS_BACKEND_API_KEY", "backend-key-123"),
            ("COACHD_API_KEYS", "extra-key-789"),
            ("REDIS_PASSWORD", "redis-pass-456"),
            ("REDIS_URL", "redis://:urlpass789@localhost:6379/0"),
        ])
        .unwrap();
        let dump = format!("{s:?}");
        for secret in [
            "sk-live-abcdef",
            "jwt-secret-xyz",
            "backend-key-123",
            "extra-key-789",
            "redis-pass-456",
            "urlpass789",
        ] {
            assert!(!dump.contains(secret), "{secret} leaked into Debug output");
        }
    }
}
