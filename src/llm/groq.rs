//! Groq: OpenAI-compatible chat completions with Groq's defaults (`GROQ_API_KEY`, `GROQ_MODEL`,
//! base URL `https://api.groq.com/openai/v1`). Its streams also carry usage under `x_groq.usage`,
//! which the shared decoder reads; JSON mode is `json_object` only.

use std::time::Duration;

use reqwest::header::HeaderMap;

use super::openai::OpenAiCompatible;
use crate::llm::{ProviderKind, ProviderSettings};
use crate::secret::Secret;

/// Builds the Groq provider.
pub fn provider(
    upstream: std::sync::Arc<super::http::Upstream>,
    settings: &ProviderSettings,
    key: Secret,
    connect: Duration,
) -> OpenAiCompatible {
    // Groq rejects json_schema on most models; json_object plus validation is the safe mode.
    OpenAiCompatible::new(
        ProviderKind::Groq,
        upstream,
        settings,
        key,
        HeaderMap::new(),
        false,
        connect,
    )
}
