//! Typed errors of the LLM layer, whether they came as an HTTP status, as an error inside a 200
//! stream, or from a timeout, and how each maps to the crate's client-facing [`Error`].

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::llm::ProviderKind;

/// Which of the four upstream timeouts fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// TCP/TLS connect.
    Connect,
    /// Waiting for the first token.
    FirstToken,
    /// Silence between two events once tokens flowed.
    Idle,
    /// The whole call.
    Total,
}

impl fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::FirstToken => "first token",
            TimeoutPhase::Idle => "idle",
            TimeoutPhase::Total => "total",
        })
    }
}

/// One failed attempt of a routed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Provider tried.
    pub provider: ProviderKind,
    /// Model tried.
    pub model: String,
    /// Why it failed.
    pub error: String,
}

/// What went wrong talking to a provider. Messages never contain API keys.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// 401/403: the key is wrong or lacks access.
    #[error("{provider}: authentication failed: {message}")]
    Authentication {
        /// Provider.
        provider: ProviderKind,
        /// Provider's message.
        message: String,
    },
    /// 429 (or Anthropic's rate_limit_error): try again after `retry_after`.
    #[error("{provider}: rate limited{}: {message}", retry_after.map(|d| format!(" (retry after {} ms)", d.as_millis())).unwrap_or_default())]
    RateLimited {
        /// Provider.
        provider: ProviderKind,
        /// From `retry-after-ms` / `retry-after`.
        retry_after: Option<Duration>,
        /// Provider's message.
        message: String,
    },
    /// 429 `insufficient_quota` or 402: waiting will not help.
    #[error("{provider}: quota exhausted: {message}")]
    QuotaExceeded {
        /// Provider.
        provider: ProviderKind,
        /// Provider's message.
        message: String,
    },
    /// The prompt does not fit the model's context window.
    #[error("{provider}: context too long: {message}")]
    ContextTooLong {
        /// Provider.
        provider: ProviderKind,
        /// Provider's message.
        message: String,
    },
    /// Any other 4xx: the request itself is wrong (unknown model, bad parameter).
    #[error("{provider}: bad request ({status}): {message}")]
    BadRequest {
        /// Provider.
        provider: ProviderKind,
        /// HTTP status.
        status: u16,
        /// Provider's message.
        message: String,
    },
    /// 5xx, 529 overloaded, connection refused or reset: the upstream cannot serve now.
    #[error("{provider}: upstream unavailable{}: {message}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Unavailable {
        /// Provider.
        provider: ProviderKind,
        /// HTTP status, if one came.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
    /// One of the four timeouts fired.
    #[error("{provider}: {phase} timeout after {} ms", after.as_millis())]
    Timeout {
        /// Provider.
        provider: ProviderKind,
        /// Which timeout.
        phase: TimeoutPhase,
        /// Its configured length.
        after: Duration,
    },
    /// The provider reported an error inside a 200 stream.
    #[error("{provider}: error in stream: {message}")]
    Stream {
        /// Provider.
        provider: ProviderKind,
        /// Provider's error type or code.
        kind: String,
        /// Provider's message.
        message: String,
    },
    /// The stream ended without a finish reason or `[DONE]`: the reply may be truncated.
    #[error("{provider}: stream ended without a finish reason")]
    Incomplete {
        /// Provider.
        provider: ProviderKind,
    },
    /// The provider sent something that is not its documented wire format.
    #[error("{provider}: malformed response: {message}")]
    Protocol {
        /// Provider.
        provider: ProviderKind,
        /// What was wrong.
        message: String,
    },
    /// The provider is referenced but has no API key.
    #[error("{provider}: not configured (no API key)")]
    NotConfigured {
        /// Provider.
        provider: ProviderKind,
    },
    /// `generate_json` got no valid JSON, even after the repair attempt.
    #[error("the model did not return valid JSON: {message}")]
    InvalidJson {
        /// Parse or schema error.
        message: String,
    },
    /// Every model of a task failed; each attempt and its reason, in order.
    #[error("all models failed for task {task}: {}", attempts.iter().map(|a| format!("{}/{}: {}", a.provider, a.model, a.error)).collect::<Vec<_>>().join("; "))]
    AllFailed {
        /// The task.
        task: String,
        /// Each attempt, in order.
        attempts: Vec<Attempt>,
    },
    /// No task of that name.
    #[error("unknown task {0:?}")]
    UnknownTask(String),
}

impl LlmError {
    /// Whether retrying the same model may help (before the first token was handed on).
    pub fn retryable(&self) -> bool {
        match self {
            LlmError::RateLimited { .. }
            | LlmError::Unavailable { .. }
            | LlmError::Stream { .. }
            | LlmError::Incomplete { .. } => true,
            LlmError::Timeout { phase, .. } => *phase != TimeoutPhase::Total,
            _ => false,
        }
    }

    /// The stable code sent to clients.
    pub fn code(&self) -> &'static str {
        match self {
            LlmError::Authentication { .. } => "upstream_auth",
            LlmError::RateLimited { .. } => "upstream_rate_limited",
            LlmError::QuotaExceeded { .. } => "upstream_quota",
            LlmError::ContextTooLong { .. } => "context_too_long",
            LlmError::BadRequest { .. } => "upstream_bad_request",
            LlmError::Unavailable { .. } => "upstream_unavailable",
            LlmError::Timeout { .. } => "upstream_timeout",
            LlmError::Stream { .. } => "upstream_stream_error",
            LlmError::Incomplete { .. } => "upstream_incomplete",
            LlmError::Protocol { .. } => "upstream_protocol",
            LlmError::NotConfigured { .. } => "provider_not_configured",
            LlmError::InvalidJson { .. } => "invalid_model_json",
            LlmError::AllFailed { .. } => "all_models_failed",
            LlmError::UnknownTask(_) => "unknown_task",
        }
    }
}

impl From<LlmError> for Error {
    fn from(e: LlmError) -> Self {
        match &e {
            LlmError::UnknownTask(_) => Error::bad_request("unknown_task", e.to_string()),
            LlmError::Timeout { .. } => Error::Timeout(e.to_string()),
            LlmError::AllFailed { attempts, .. } => Error::Upstream {
                code: e.code(),
                message: e.to_string(),
                retryable: attempts.iter().any(|a| !a.error.contains("authentication")),
            },
            _ => Error::Upstream {
                code: e.code(),
                retryable: e.retryable(),
                message: e.to_string(),
            },
        }
    }
}

/// Reads `retry-after-ms` (OpenAI) or `retry-after` (seconds, or an HTTP date we treat as 1 s).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let v = text("retry-after")?;
    match v.parse::<f64>() {
        Ok(secs) => Some(Duration::from_secs_f64(secs.max(0.0))),
        Err(_) => Some(Duration::from_secs(1)),
    }
}

/// Maps a transport error of reqwest (no HTTP status) to a typed error.
pub fn from_reqwest(provider: ProviderKind, e: &reqwest::Error, connect_timeout: Duration) -> LlmError {
    if e.is_connect() && is_timeout(e) {
        return LlmError::Timeout {
            provider,
            phase: TimeoutPhase::Connect,
            after: connect_timeout,
        };
    }
    // The message of a reqwest error never includes request headers, so no key can leak here.
    LlmError::Unavailable {
        provider,
        status: None,
        message: error_chain(e),
    }
}

fn is_timeout(e: &reqwest::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.to_string().contains("timed out") {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("27"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(27)));
        h.insert("retry-after-ms", HeaderValue::from_static("26604"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(26_604)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn retryability_follows_the_error_kind() {
        let p = ProviderKind::Openai;
        assert!(
            LlmError::RateLimited {
                provider: p,
                retry_after: None,
                message: String::new()
            }
            .retryable()
        );
        assert!(
            !LlmError::QuotaExceeded {
                provider: p,
                message: String::new()
            }
            .retryable()
        );
        assert!(
            !LlmError::Authentication {
                provider: p,
                message: String::new()
            }
            .retryable()
        );
        assert!(
            LlmError::Timeout {
                provider: p,
                phase: TimeoutPhase::FirstToken,
                after: Duration::ZERO
            }
            .retryable()
        );
        assert!(
            !LlmError::Timeout {
                provider: p,
                phase: TimeoutPhase::Total,
                after: Duration::ZERO
            }
            .retryable()
        );
    }
}
