//! What the LLM gateway is built from: the provider kinds, each provider's key, model and base
//! URL, the four upstream timeouts, retries and the tasks file. The settings reader fills
//! [`LlmSettings`]; [`super::Llm::from_settings`] builds the gateway from it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use crate::secret::Secret;

/// Which LLM provider serves requests that name none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions (or any OpenAI-compatible server via its base URL).
    Openai,
    /// Groq's OpenAI-compatible API.
    Groq,
    /// Anthropic's Messages API.
    Anthropic,
    /// OpenRouter's OpenAI-compatible API.
    Openrouter,
    /// The built-in deterministic provider that needs no network.
    Offline,
}

impl ProviderKind {
    /// Every kind, in the order they are documented.
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::Openai,
        ProviderKind::Groq,
        ProviderKind::Anthropic,
        ProviderKind::Openrouter,
        ProviderKind::Offline,
    ];

    /// The lowercase name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Groq => "groq",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Openrouter => "openrouter",
            ProviderKind::Offline => "offline",
        }
    }
}

impl FromStr for ProviderKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProviderKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or(())
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of one upstream LLM provider.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// API key; `None` means the provider is not configured.
    pub api_key: Option<Secret>,
    /// Default model.
    pub model: String,
    /// Base URL of the API (ends before `/chat/completions` or `/messages`).
    pub base_url: Url,
    /// `COACHD_<PROVIDER>_HTTP_VERSION`: `auto`, `http1`, or `h2` (prior knowledge).
    pub http_version: super::http::HttpVersion,
}

/// The four upstream timeouts every provider call runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmTimeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// From sending the request to the first content token.
    pub first_token: Duration,
    /// Longest silence between two stream events once tokens flow.
    pub idle: Duration,
    /// Whole call, from request to end of stream.
    pub total: Duration,
}

/// Every setting of the LLM gateway, validated.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `LLM_PROVIDER`.
    pub llm_provider: ProviderKind,
    /// OpenAI (`OPENAI_API_KEY`, `OPENAI_MODEL`, `COACHD_OPENAI_BASE_URL`).
    pub openai: ProviderSettings,
    /// Groq (`GROQ_API_KEY`, `GROQ_MODEL`, `COACHD_GROQ_BASE_URL`).
    pub groq: ProviderSettings,
    /// Anthropic (`ANTHROPIC_API_KEY`, `ANTHROPIC_MODEL`, `COACHD_ANTHROPIC_BASE_URL`).
    pub anthropic: ProviderSettings,
    /// OpenRouter (`OPENROUTER_API_KEY`, `COACHD_OPENROUTER_MODEL`, `COACHD_OPENROUTER_BASE_URL`).
    pub openrouter: ProviderSettings,
    /// `COACHD_OPENROUTER_REFERER`: sent as OpenRouter's `HTTP-Referer`.
    pub openrouter_referer: Option<String>,
    /// `COACHD_OPENROUTER_TITLE`: sent as OpenRouter's `X-Title`.
    pub openrouter_title: String,
    /// Upstream timeouts (`COACHD_LLM_*_TIMEOUT_MS`).
    pub llm_timeouts: LlmTimeouts,
    /// `COACHD_LLM_MAX_RETRIES`: retries of one model before falling back.
    pub llm_max_retries: u32,
    /// `COACHD_LLM_RETRY_BASE_MS`: first backoff delay, doubled on each retry.
    pub llm_retry_base: Duration,
    /// `COACHD_LLM_MAX_RETRY_WAIT_MS`: longest back-off (or provider retry-after) honoured before
    /// falling back to the next model instead.
    pub llm_max_retry_wait: Duration,
    /// `COACHD_LLM_TASKS_FILE`: TOML file of extra or overriding tasks.
    pub llm_tasks_file: Option<PathBuf>,
    /// `COACHD_OFFLINE_TOKEN_DELAY_MS`: pace of the offline provider.
    pub offline_token_delay: Duration,
    /// `COACHD_LLM_MAX_STREAMS` and `COACHD_LLM_STREAMS_PER_CONNECTION`: the connection pool of
    /// each provider.
    pub upstream_pool: super::http::PoolLimits,
}

impl AsRef<LlmSettings> for LlmSettings {
    fn as_ref(&self) -> &LlmSettings {
        self
    }
}
