//! HTTP routes: thin handlers only, one module per surface, merged into one router here, plus the
//! two pieces every surface shares: a JSON body extractor with crate-shaped errors and the SSE
//! response with the streaming headers.

pub mod api_v1;
pub mod capacity;
pub mod chat;
pub mod coach;
pub mod docs;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod memory;
pub mod openai_compat;
pub mod personas;
pub mod prometheus;
pub mod rate_limit;
pub mod realtime;
pub mod validate;

use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::de::DeserializeOwned;

use crate::error::{Error, from_json_rejection};
use crate::state::AppState;

/// Every route of coachd but the job routes, which need the upload limit ([`jobs::router`]).
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(realtime::router())
        .merge(coach::router())
        .merge(memory::router())
        .merge(api_v1::router())
        .merge(openai_compat::router())
        .merge(personas::router())
        .merge(docs::router())
        .merge(prometheus::router())
}

/// A JSON request body whose rejections (bad JSON, missing or mistyped fields, wrong content type,
/// oversized body) are [`Error`]s with the crate's JSON shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(match from_json_rejection(rejection) {
                // The rejection does not know the limit; the settings do.
                Error::PayloadTooLarge { .. } => Error::PayloadTooLarge {
                    limit: state.settings.max_body_bytes,
                },
                other => other,
            }),
        }
    }
}

/// A query string whose rejections (a missing or mistyped parameter) are [`Error`]s with the
/// crate's JSON shape (code `invalid_query`).
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(Error::bad_request("invalid_query", rejection.body_text())),
        }
    }
}

/// An SSE response that reaches the client event by event: each event is its own body frame
/// (never buffered to a size), proxies are told not to buffer or transform it
/// (`Cache-Control: no-cache, no-transform`, `X-Accel-Buffering: no`), and a keep-alive comment
/// goes out every `keep_alive` while no event does.
pub fn sse_response<S>(events: S, keep_alive: Duration) -> Response
where
    S: Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
{
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response();
    crate::transport::sse::no_buffering(response.headers_mut());
    response
}

/// Whether the client asked for an event stream (`Accept: text/event-stream`).
pub fn wants_sse(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}
