//! OpenRouter: OpenAI-compatible chat completions with OpenRouter's defaults
//! (`OPENROUTER_API_KEY`, base URL `https://openrouter.ai/api/v1`) and attribution headers
//! (`HTTP-Referer`, `X-Title`). Its `: OPENROUTER PROCESSING` comment lines are skipped by the SSE
//! parser, and its error chunks inside a 200 stream become typed errors in the shared decoder.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};

use super::openai::OpenAiCompatible;
use crate::llm::{ProviderKind, ProviderSettings};
use crate::secret::Secret;

/// Builds the OpenRouter provider.
pub fn provider(
    upstream: std::sync::Arc<super::http::Upstream>,
    settings: &ProviderSettings,
    key: Secret,
    referer: Option<&str>,
    title: &str,
    connect: Duration,
) -> OpenAiCompatible {
    let mut headers = HeaderMap::new();
    if let Some(v) = referer.and_then(|r| HeaderValue::from_str(r).ok()) {
        headers.insert("http-referer", v);
    }
    if let Ok(v) = HeaderValue::from_str(title) {
        headers.insert("x-title", v);
    }
    OpenAiCompatible::new(
        ProviderKind::Openrouter,
        upstream,
        settings,
        key,
        headers,
        true,
        connect,
    )
}
