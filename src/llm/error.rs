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
    /// Why it failed, typed: retryability and the HTTP status are read from it.
    pub error: LlmError,
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
    /// Whether retrying the same model within this call may help (before the first token was
    /// handed on). A spent total deadline ends the call instead.
    pub fn retryable(&self) -> bool {
        match self {
            LlmError::Timeout {
                phase: TimeoutPhase::Total,
                ..
            } => false,
            LlmError::AllFailed { .. } => false,
            _ => self.transient(),
        }
    }

    /// Whether the same request may succeed when sent again later (what clients are told): the
    /// upstream was busy, down, slow or cut the stream, rather than refusing the request.
    pub fn transient(&self) -> bool {
        match self {
            LlmError::RateLimited { .. }
            | LlmError::Unavailable { .. }
            | LlmError::Stream { .. }
            | LlmError::Incomplete { .. }
            | LlmError::Timeout { .. } => true,
            LlmError::AllFailed { attempts, .. } => attempts.iter().any(|a| a.error.transient()),
            _ => false,
        }
    }

    /// Whether the call failed by running out of time: a timeout, or a routed call whose every
    /// attempt timed out (connect, first token or the total deadline). Such a call answers 504.
    pub fn timed_out(&self) -> bool {
        match self {
            LlmError::Timeout { .. } => true,
            LlmError::AllFailed { attempts, .. } => {
                !attempts.is_empty() && attempts.iter().all(|a| a.error.timed_out())
            }
            _ => false,
        }
    }

    /// The variant, as the `kind` label of `coachd_llm_upstream_errors_total`: one value per
    /// variant (timeouts per phase), so the label set is fixed whatever the providers say.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::Authentication { .. } => "authentication",
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::QuotaExceeded { .. } => "quota_exceeded",
            LlmError::ContextTooLong { .. } => "context_too_long",
            LlmError::BadRequest { .. } => "bad_request",
            LlmError::Unavailable { .. } => "unavailable",
            LlmError::Timeout { phase, .. } => match phase {
                TimeoutPhase::Connect => "timeout_connect",
                TimeoutPhase::FirstToken => "timeout_first_token",
                TimeoutPhase::Idle => "timeout_idle",
                TimeoutPhase::Total => "timeout_total",
            },
            LlmError::Stream { .. } => "stream",
            LlmError::Incomplete { .. } => "incomplete",
            LlmError::Protocol { .. } => "protocol",
            LlmError::NotConfigured { .. } => "not_configured",
            LlmError::InvalidJson { .. } => "invalid_json",
            LlmError::AllFailed { .. } => "all_failed",
            LlmError::UnknownTask(_) => "unknown_task",
        }
    }

    /// The stable code sent to clients.
    pub fn code(&self) -> &'static str {
        if self.timed_out() {
            return "upstream_timeout";
        }
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

/// The one place that decides how an LLM failure answers a client: 504 `upstream_timeout` when
/// it ran out of time ([`LlmError::timed_out`]), 400 for an unknown task, 502 otherwise. Every
/// route (and the session's error events) goes through it.
impl From<LlmError> for Error {
    fn from(e: LlmError) -> Self {
        if e.timed_out() {
            return Error::Timeout(e.to_string());
        }
        match &e {
            LlmError::UnknownTask(_) => Error::bad_request("unknown_task", e.to_string()),
            _ => Error::Upstream {
                code: e.code(),
                retryable: e.transient(),
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
    // reqwest's `is_timeout` walks the source chain by type (its own `TimedOut`, hyper's
    // timeout, an `io::Error` of kind `TimedOut`, which is what the connector's timeout gives).
    if e.is_connect() && e.is_timeout() {
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

    const P: ProviderKind = ProviderKind::Openai;

    fn attempt(error: LlmError) -> Attempt {
        Attempt {
            provider: P,
            model: "m".into(),
            error,
        }
    }

    fn timeout(phase: TimeoutPhase) -> LlmError {
        LlmError::Timeout {
            provider: P,
            phase,
            after: Duration::from_millis(300),
        }
    }

    fn all_failed(errors: Vec<LlmError>) -> LlmError {
        LlmError::AllFailed {
            task: "chat".into(),
            attempts: errors.into_iter().map(attempt).collect(),
        }
    }

    #[test]
    fn a_call_that_only_timed_out_answers_504_and_any_other_failure_502() {
        let timed_out = all_failed(vec![
            timeout(TimeoutPhase::Connect),
            timeout(TimeoutPhase::FirstToken),
            timeout(TimeoutPhase::Total),
        ]);
        let e = Error::from(timed_out);
        assert_eq!((e.status_code().as_u16(), e.code()), (504, "upstream_timeout"));
        assert!(e.retryable());
        assert!(e.to_string().contains("first token timeout"), "{e}");

        let one = Error::from(timeout(TimeoutPhase::FirstToken));
        assert_eq!(
            (one.status_code().as_u16(), one.code()),
            (504, "upstream_timeout")
        );

        let unavailable = LlmError::Unavailable {
            provider: P,
            status: Some(500),
            message: String::new(),
        };
        let mixed = Error::from(all_failed(vec![
            timeout(TimeoutPhase::FirstToken),
            unavailable.clone(),
        ]));
        assert_eq!(
            (mixed.status_code().as_u16(), mixed.code()),
            (502, "all_models_failed")
        );
        assert!(mixed.retryable());

        let failed = Error::from(all_failed(vec![unavailable]));
        assert_eq!(failed.status_code().as_u16(), 502);
    }

    #[test]
    fn client_retryability_comes_from_the_attempts_types() {
        let refused = all_failed(vec![
            LlmError::Authentication {
                provider: P,
                message: "a message that says nothing of authentication".into(),
            },
            LlmError::QuotaExceeded {
                provider: P,
                message: String::new(),
            },
        ]);
        assert!(!refused.transient() && !Error::from(refused).retryable());
        let busy = all_failed(vec![LlmError::RateLimited {
            provider: P,
            retry_after: None,
            message: "authentication".into(),
        }]);
        assert!(busy.transient() && Error::from(busy).retryable());
    }
}
