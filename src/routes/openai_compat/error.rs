//! Errors in OpenAI's shape (what the SDKs parse and turn into typed exceptions), and the
//! extractors of the `/v1` routes, whose rejections use that shape too.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Credentials, Policy};
use crate::error::Error;
use crate::llm::LlmError;
use crate::routes::JsonBody;
use crate::state::AppState;

/// An error in OpenAI's shape. Built from the crate's [`Error`], so status codes stay the same.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    body: OpenAiErrorBody,
    retryable: bool,
    retry_after: Option<u64>,
}

/// `{"error":{...}}` as OpenAI sends it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// The error.
    pub error: OpenAiErrorDetail,
}

/// The fields OpenAI's SDKs read from an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `rate_limit_error`,
    /// `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending parameter, when one is known.
    pub param: Option<String>,
    /// Stable code (coachd's error codes; `model_not_found` for unknown models).
    pub code: Option<String>,
}

impl OpenAiError {
    pub(super) fn new(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Self {
        OpenAiError {
            status,
            body: OpenAiErrorBody {
                error: OpenAiErrorDetail {
                    message: message.into(),
                    kind: kind.to_owned(),
                    param: None,
                    code: Some(code.to_owned()),
                },
            },
            retryable: false,
            retry_after: None,
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_field",
            message,
        )
    }

    pub(super) fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model {model:?} does not exist: use a task name (see GET /v1/models) or \
                 provider/model with a configured provider"
            ),
        )
        .with_param("model")
    }

    pub(super) fn with_param(mut self, param: &str) -> Self {
        self.body.error.param = Some(param.to_owned());
        self
    }

    /// The error as a `data:` line inside a stream that had already begun.
    pub(super) fn sse_event(&self) -> Event {
        let data = serde_json::to_string(&self.body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal"}}"#
                .to_owned()
        });
        Event::default().data(data)
    }
}

impl From<Error> for OpenAiError {
    fn from(e: Error) -> Self {
        if let Error::Internal(cause) = &e {
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let status = e.status_code();
        let kind = match status.as_u16() {
            400 | 404 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        let mut out = OpenAiError::new(status, kind, e.code(), e.to_string());
        out.retryable = e.retryable();
        if let Error::RateLimited { retry_after_secs, .. } = e {
            out.retry_after = Some(retry_after_secs);
        }
        out
    }
}

impl From<LlmError> for OpenAiError {
    fn from(e: LlmError) -> Self {
        Error::from(e).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        // OpenAI's SDKs honour this header over their own status-code guess.
        let retry = if self.retryable { "true" } else { "false" };
        headers.insert("x-should-retry", HeaderValue::from_static(retry));
        if self.status == axum::http::StatusCode::UNAUTHORIZED {
            headers.insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(crate::error::WWW_AUTHENTICATE),
            );
        }
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// The caller of a `/v1` route: an API key is required, as `X-API-Key` or as
/// `Authorization: Bearer <key>` (what OpenAI SDKs send). A bearer next to an `X-API-Key` is a JWT.
#[derive(Debug, Clone)]
pub struct OpenAiCaller(pub Caller);

impl FromRequestParts<AppState> for OpenAiCaller {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let creds = Credentials::from_headers(&parts.headers).bearer_as_key();
        state
            .auth
            .authenticate(creds, Policy::ApiKey)
            .map(OpenAiCaller)
            .map_err(OpenAiError::from)
    }
}

/// A JSON body whose rejections are OpenAI-shaped.
#[derive(Debug)]
pub struct OpenAiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        JsonBody::<T>::from_request(req, state)
            .await
            .map(|JsonBody(v)| OpenAiJson(v))
            .map_err(OpenAiError::from)
    }
}
