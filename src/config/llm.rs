//! The LLM section: `LLM_PROVIDER`, each provider's key, model and base URL, the four upstream
//! timeouts, retries and the tasks file, read into the gateway's own [`LlmSettings`].

use std::path::PathBuf;

use super::ConfigError;
use super::source::{Reader, Source, invalid};
use crate::llm::http::{HttpVersion, PoolLimits};
use crate::llm::{LlmSettings, LlmTimeouts, ProviderKind, ProviderSettings};

/// Reads `LLM_PROVIDER`, `*_API_KEY`, `*_MODEL`, `COACHD_*_BASE_URL` and `COACHD_LLM_*`.
pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<LlmSettings, ConfigError> {
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
    let provider = |key: &str, model_var: &str, default_model: &str, base_var: &str, default_base: &str| {
        let version_var = base_var.replace("_BASE_URL", "_HTTP_VERSION");
        Ok::<_, ConfigError>(ProviderSettings {
            api_key: r.secret(key),
            model: r.string(model_var, default_model),
            base_url: r.base_url(base_var, default_base)?,
            http_version: r.parse(&version_var, HttpVersion::Auto, "one of auto, http1, h2")?,
        })
    };
    Ok(LlmSettings {
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
        llm_timeouts: LlmTimeouts {
            connect: r.millis("COACHD_LLM_CONNECT_TIMEOUT_MS", 5_000, 1, 600_000)?,
            first_token: r.millis("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", 30_000, 1, 3_600_000)?,
            idle: r.millis("COACHD_LLM_IDLE_TIMEOUT_MS", 30_000, 1, 3_600_000)?,
            total: r.millis("COACHD_LLM_TOTAL_TIMEOUT_MS", 300_000, 1, 86_400_000)?,
        },
        llm_max_retries: r.int("COACHD_LLM_MAX_RETRIES", 2, 0, 10)?,
        llm_retry_base: r.millis("COACHD_LLM_RETRY_BASE_MS", 250, 0, 60_000)?,
        llm_max_retry_wait: r.millis("COACHD_LLM_MAX_RETRY_WAIT_MS", 10_000, 0, 600_000)?,
        llm_tasks_file: r.raw("COACHD_LLM_TASKS_FILE").map(PathBuf::from),
        offline_token_delay: r.millis("COACHD_OFFLINE_TOKEN_DELAY_MS", 20, 0, 10_000)?,
        upstream_pool: PoolLimits {
            max_streams: r.int("COACHD_LLM_MAX_STREAMS", 10_000, 1, 10_000_000)?,
            streams_per_connection: r.int("COACHD_LLM_STREAMS_PER_CONNECTION", 100, 1, 100_000)?,
        },
    })
}
