//! The one error type of the HTTP surface. Its status code, JSON body, headers, SSE `error` event
//! and retryability are all derived here, so every transport reports a failure the same way (the
//! WebSocket close codes are the table in `transport::ws`, as `proto/README.md` lists them). [`StoreError`], the failure of a store, lives here too so its mapping to
//! [`Error`] is in one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error a client can be told about. Internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or a field is invalid.
    #[error("{message}")]
    BadRequest {
        /// Stable machine-readable code, e.g. `invalid_field`.
        code: &'static str,
        /// What is wrong, for a human.
        message: String,
    },
    /// No credentials, or credentials that do not check out.
    #[error("authentication required")]
    Unauthorized,
    /// Authenticated, but not allowed to touch this resource.
    #[error("not allowed")]
    Forbidden,
    /// The resource does not exist (or is not visible to the caller).
    #[error("{0} not found")]
    NotFound(String),
    /// The resource is in a state that does not allow the request (a job that is not finished,
    /// already final, ...).
    #[error("{message}")]
    Conflict {
        /// Stable code, e.g. `job_not_finished`.
        code: &'static str,
        /// Description, safe to show.
        message: String,
    },
    /// The request body is larger than the configured limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Too many requests in the current window.
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited {
        /// Requests allowed per window (`X-RateLimit-Limit`).
        limit: u32,
        /// Requests left in the window (`X-RateLimit-Remaining`); 0 when limited.
        remaining: u32,
        /// Seconds until the window resets (`Retry-After`, `X-RateLimit-Reset`).
        retry_after_secs: u64,
    },
    /// The session existed but has ended.
    #[error("the session has ended")]
    SessionEnded,
    /// Too many messages wait behind the reply streaming now.
    #[error("{max} messages already wait for the current reply; wait for it or send with mode \"interrupt\"")]
    QueueFull {
        /// The configured limit.
        max: usize,
    },
    /// A dependency (database, Redis, LLM provider) cannot serve the request now.
    #[error("{0}")]
    Unavailable(String),
    /// The node holds as many connections as its open-file limit leaves room for; this one is
    /// answered and closed (`routes::capacity`).
    #[error("this server is at its connection capacity; retry in {retry_after_secs} s or on another node")]
    OverCapacity {
        /// Seconds a client should wait (`Retry-After`).
        retry_after_secs: u64,
    },
    /// An LLM provider did not answer in time (every attempt timed out); built only by
    /// `From<LlmError>`, which decides 504 against 502.
    #[error("{0}")]
    Timeout(String),
    /// An LLM provider failed; the message is safe to show.
    #[error("{message}")]
    Upstream {
        /// Stable code of the upstream failure, e.g. `upstream_rate_limited`.
        code: &'static str,
        /// Description without secrets.
        message: String,
        /// Whether trying again later may succeed.
        retryable: bool,
    },
    /// A bug or an unexpected failure; details go to the log only.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The JSON body of every error response: `{"error":{"code","message"}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// Code and message of an [`ErrorBody`].
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    #[schema(example = "invalid_field")]
    pub code: String,
    /// Human-readable message, safe to show.
    pub message: String,
}

impl Error {
    /// A 400 with the given code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Error::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) | Error::OverCapacity { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::SessionEnded => StatusCode::GONE,
            Error::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code sent to clients.
    pub fn code(&self) -> &str {
        match self {
            Error::BadRequest { code, .. } | Error::Upstream { code, .. } | Error::Conflict { code, .. } => {
                code
            }
            Error::SessionEnded => "session_ended",
            Error::QueueFull { .. } => "turn_queue_full",
            Error::Unauthorized => "unauthorized",
            Error::Forbidden => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::RateLimited { .. } => "rate_limited",
            Error::Unavailable(_) => "unavailable",
            Error::OverCapacity { .. } => "over_capacity",
            Error::Timeout(_) => "upstream_timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. }
            | Error::Unavailable(_)
            | Error::OverCapacity { .. }
            | Error::Timeout(_)
            | Error::QueueFull { .. } => true,
            Error::Upstream { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The body sent to clients.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        }
    }

    /// The SSE event that ends a stream which had already begun (its HTTP status was sent):
    /// `event: error` with the JSON body as data.
    pub fn sse_event(&self) -> Event {
        if let Error::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "internal error in a stream");
        }
        let data = serde_json::to_string(&self.body())
            .unwrap_or_else(|_| r#"{"error":{"code":"internal","message":"internal error"}}"#.to_owned());
        Event::default().event("error").data(data)
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(cause) = &self {
            // Logged here, once, with the cause chain; the client sees only "internal error".
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let status = self.status_code();
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Error::Unauthorized = self {
            // RFC 9110: a 401 names the scheme it wants (keys also go in X-API-Key).
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE),
            );
        }
        if let Error::RateLimited {
            limit,
            remaining,
            retry_after_secs,
        } = self
        {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            insert_rate_limit_headers(headers, limit, remaining, retry_after_secs);
        }
        if let Error::OverCapacity { retry_after_secs } = self {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            // The connection is the resource that ran out: hyper closes it after this answer.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The challenge of every 401.
pub const WWW_AUTHENTICATE: &str = r#"Bearer realm="coachd""#;

/// `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until the window
/// resets, like `Retry-After`), on admitted and refused requests alike.
pub fn insert_rate_limit_headers(headers: &mut http::HeaderMap, limit: u32, remaining: u32, reset_secs: u64) {
    headers.insert(RATE_LIMIT_LIMIT, HeaderValue::from(limit));
    headers.insert(RATE_LIMIT_REMAINING, HeaderValue::from(remaining));
    headers.insert(RATE_LIMIT_RESET, HeaderValue::from(reset_secs));
}

/// `X-RateLimit-Limit`: requests allowed per window.
pub const RATE_LIMIT_LIMIT: header::HeaderName = header::HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`: requests left in the current window.
pub const RATE_LIMIT_REMAINING: header::HeaderName = header::HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset`: seconds until the current window resets.
pub const RATE_LIMIT_RESET: header::HeaderName = header::HeaderName::from_static("x-ratelimit-reset");

/// A failure of a store (context cache, rate limiter, memory store) or of the embedder behind it.
/// Converted into [`Error`] by `?` in handlers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or did not answer in time; trying again later may work.
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// `redis` or `postgresql`.
        backend: &'static str,
        /// The driver's reason (may name hosts: logged, not sent).
        reason: String,
    },
    /// The input cannot be stored or searched (empty, too large, malformed); safe to show.
    #[error("{0}")]
    Invalid(String),
    /// The embedder failed.
    #[error(transparent)]
    Embed(#[from] crate::embed::EmbedError),
    /// Anything else: a bug, corrupt data, an unexpected answer.
    #[error("{backend}: {reason}")]
    Internal {
        /// `redis`, `postgresql` or `in-process`.
        backend: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl From<fred::error::Error> for StoreError {
    fn from(e: fred::error::Error) -> Self {
        use fred::error::ErrorKind as K;
        let reason = e.to_string();
        match e.kind() {
            K::IO | K::Timeout | K::Canceled | K::Backpressure | K::Routing | K::Cluster | K::Sentinel => {
                StoreError::Unavailable {
                    backend: "redis",
                    reason,
                }
            }
            _ => StoreError::Internal {
                backend: "redis",
                reason,
            },
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let reason = e.to_string();
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed => StoreError::Unavailable {
                backend: "postgresql",
                reason,
            },
            _ => StoreError::Internal {
                backend: "postgresql",
                reason,
            },
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable { backend, reason } => {
                // The reason may name hosts and ports: log it, tell the client only which store.
                tracing::warn!(backend, reason, "store unavailable");
                Error::Unavailable(format!("{backend} is unavailable; try again later"))
            }
            StoreError::Invalid(message) => Error::bad_request("invalid_input", message),
            StoreError::Embed(e) => {
                tracing::warn!(error = %e, "embedding failed");
                Error::Upstream {
                    code: "embedding_failed",
                    message: "the embedding provider failed".to_owned(),
                    retryable: e.retryable(),
                }
            }
            StoreError::Internal { backend, reason } => {
                Error::Internal(anyhow::anyhow!("{backend}: {reason}"))
            }
        }
    }
}

/// Turns axum's own rejections (bad JSON, wrong content type, oversized body) into [`Error`]s so
/// they carry the same JSON shape as every other error.
pub fn from_json_rejection(rejection: axum::extract::rejection::JsonRejection) -> Error {
    use axum::extract::rejection::JsonRejection as R;
    match rejection {
        R::JsonDataError(e) => Error::bad_request("invalid_field", e.body_text()),
        R::JsonSyntaxError(e) => Error::bad_request("invalid_json", e.body_text()),
        R::MissingJsonContentType(_) => Error::bad_request(
            "unsupported_content_type",
            "expected a request with Content-Type: application/json",
        ),
        R::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Error::PayloadTooLarge { limit: 0 }
        }
        other => Error::bad_request("invalid_body", other.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_status_code_and_code() {
        let cases = [
            (Error::bad_request("invalid_field", "x"), 400, "invalid_field"),
            (Error::Unauthorized, 401, "unauthorized"),
            (Error::NotFound("session".into()), 404, "not_found"),
            (
                Error::RateLimited {
                    limit: 60,
                    remaining: 0,
                    retry_after_secs: 3,
                },
                429,
                "rate_limited",
            ),
            (Error::Unavailable("redis down".into()), 503, "unavailable"),
            (Error::Internal(anyhow::anyhow!("boom")), 500, "internal"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status_code().as_u16(), status);
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn a_rate_limited_answer_carries_retry_after_and_the_rate_limit_headers() {
        let response = Error::RateLimited {
            limit: 5,
            remaining: 0,
            retry_after_secs: 42,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = response.headers();
        assert_eq!(h[header::RETRY_AFTER], "42");
        assert_eq!(h["x-ratelimit-limit"], "5");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "42");
    }

    #[test]
    fn store_errors_map_to_unavailable_bad_request_upstream_or_internal() {
        let unavailable: Error = StoreError::Unavailable {
            backend: "redis",
            reason: "connection refused to 10.0.0.7:6379".into(),
        }
        .into();
        assert_eq!(unavailable.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            !unavailable.to_string().contains("10.0.0.7"),
            "hosts are not sent"
        );

        let invalid: Error = StoreError::Invalid("text is empty".into()).into();
        assert_eq!(
            (invalid.status_code().as_u16(), invalid.code()),
            (400, "invalid_input")
        );

        let embed: Error = StoreError::Embed(crate::embed::EmbedError::Timeout(
            std::time::Duration::from_secs(1),
        ))
        .into();
        assert_eq!((embed.status_code().as_u16(), embed.retryable()), (502, true));

        let internal: Error = StoreError::Internal {
            backend: "postgresql",
            reason: "bad row".into(),
        }
        .into();
        assert_eq!(internal.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn forbidden_maps_to_403() {
        assert_eq!(Error::Forbidden.status_code().as_u16(), 403);
        assert_eq!(Error::Forbidden.code(), "forbidden");
    }

    #[test]
    fn internal_details_are_not_sent() {
        let body = Error::Internal(anyhow::anyhow!("password=abc")).body();
        assert_eq!(body.error.message, "internal error");
    }
}
