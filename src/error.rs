//! The one error type of the HTTP surface. Its status code, JSON body, SSE `error` event,
//! retryability and WebSocket close code are all derived here, so every transport reports a
//! failure the same way.

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
    /// The request body is larger than the configured limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Too many requests in the current window.
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until the window resets.
        retry_after_secs: u64,
    },
    /// A dependency (database, Redis, LLM provider) cannot serve the request now.
    #[error("{0}")]
    Unavailable(String),
    /// A dependency did not answer in time.
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    #[schema(value_type = String, example = "invalid_field")]
    pub code: &'static str,
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
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code sent to clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest { code, .. } | Error::Upstream { code, .. } => code,
            Error::Unauthorized => "unauthorized",
            Error::Forbidden => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::RateLimited { .. } => "rate_limited",
            Error::Unavailable(_) => "unavailable",
            Error::Timeout(_) => "timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Unavailable(_) | Error::Timeout(_) => true,
            Error::Upstream { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The WebSocket close code for an error that ends a connection (RFC 6455 §7.4 and the
    /// registered 4xxx private range documented in `proto/`).
    pub fn ws_close_code(&self) -> u16 {
        match self {
            Error::BadRequest { .. } => 1008,
            Error::PayloadTooLarge { .. } => 1009,
            Error::Unauthorized => 4401,
            Error::Forbidden => 4403,
            Error::NotFound(_) => 4404,
            Error::RateLimited { .. } => 4429,
            Error::Unavailable(_) | Error::Timeout(_) | Error::Upstream { .. } => 1013,
            Error::Internal(_) => 1011,
        }
    }

    /// The body sent to clients.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
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
        if let Error::RateLimited { retry_after_secs } = self {
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
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
    fn every_error_maps_to_status_code_and_close_code() {
        let cases = [
            (
                Error::bad_request("invalid_field", "x"),
                400,
                "invalid_field",
                1008,
            ),
            (Error::Unauthorized, 401, "unauthorized", 4401),
            (Error::NotFound("session".into()), 404, "not_found", 4404),
            (
                Error::RateLimited { retry_after_secs: 3 },
                429,
                "rate_limited",
                4429,
            ),
            (Error::Unavailable("redis down".into()), 503, "unavailable", 1013),
            (Error::Internal(anyhow::anyhow!("boom")), 500, "internal", 1011),
        ];
        for (err, status, code, close) in cases {
            assert_eq!(err.status_code().as_u16(), status);
            assert_eq!(err.code(), code);
            assert_eq!(err.ws_close_code(), close);
        }
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
