//! `GET /metrics`: the Prometheus text exposition of every metric (names and labels in the
//! README's "Metrics" section), behind an optional bearer token (`COACHD_METRICS_TOKEN`, compared
//! in constant time) and switched off by `COACHD_METRICS_ENABLED=false`; and the middleware that
//! counts and times every HTTP request by its route template.
//!
//! Gauges of state this node already tracks (live sessions, connections, the write-behind queues,
//! the job queues) are read when scraped, so they cost the hot paths nothing.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;
#[allow(unused_imports, reason = "named by the OpenAPI annotations")]
use crate::error::ErrorBody;
use crate::metric;
use crate::state::AppState;

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics router.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

/// The OpenAPI description of the route.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(scrape))]
pub struct MetricsDoc;

#[utoipa::path(
    get, path = "/metrics", tag = "metrics",
    description = "Prometheus text exposition of coachd's metrics. With COACHD_METRICS_TOKEN set, needs `Authorization: Bearer <token>`; 404 with COACHD_METRICS_ENABLED=false.",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "text/plain; version=0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "COACHD_METRICS_TOKEN is set and the bearer token is missing or wrong", body = ErrorBody),
        (status = 404, description = "Metrics are switched off", body = ErrorBody),
        (status = 503, description = "Another metrics recorder owns this process", body = ErrorBody),
    )
)]
async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, Error> {
    let settings = &state.settings.metrics;
    if !settings.enabled {
        return Err(Error::NotFound("route".to_owned()));
    }
    if let Some(token) = &settings.token
        && !bearer_matches(&headers, token.expose())
    {
        return Err(Error::Unauthorized);
    }
    let Some(handle) = metric::handle() else {
        return Err(Error::Unavailable(
            "another metrics recorder was installed in this process".to_owned(),
        ));
    };
    sample(&state).await;
    let body = handle.render();
    Ok(([(header::CONTENT_TYPE, TEXT_FORMAT)], body).into_response())
}

/// Whether the request carries `Authorization: Bearer <expected>`, compared as SHA-256 digests in
/// constant time, so neither the token's bytes nor its length show in the timing.
fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or_default();
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    bool::from(a.ct_eq(&b)) && !presented.is_empty()
}

/// Sets the gauges of state this node tracks anyway. With several apps in one process (tests),
/// the app scraped last sets them.
async fn sample(state: &AppState) {
    let stats = state.sessions.stats();
    metrics::gauge!(metric::SESSIONS_LIVE).set(state.sessions.live_count() as f64);
    metrics::gauge!(metric::CONNECTIONS, "transport" => "websocket").set(stats.ws_connections.get() as f64);
    metrics::gauge!(metric::CONNECTIONS, "transport" => "sse").set(stats.sse_connections.get() as f64);
    let wb = &state.write_behind;
    metrics::gauge!(metric::WRITE_BEHIND_DEPTH).set(wb.depth() as f64);
    let backlog = wb.stats().backlog.load(std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(metric::WRITE_BEHIND_BACKLOG).set(backlog as f64);
    // The job store may be remote (PostgreSQL): bounded like a health check, and a scrape
    // without job figures beats no scrape.
    let jobs = tokio::time::timeout(
        state.settings.health_timeout,
        state.jobs.stats(state.settings.jobs.orphan_after),
    )
    .await;
    match jobs {
        Ok(Ok(queues)) => {
            for q in queues {
                metrics::gauge!(metric::JOB_QUEUE_DEPTH, "queue" => q.queue.clone(), "state" => "queued")
                    .set(q.queued as f64);
                metrics::gauge!(metric::JOB_QUEUE_DEPTH, "queue" => q.queue, "state" => "running")
                    .set(q.running as f64);
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: cannot read the job queues"),
        Err(_) => tracing::warn!("metrics: the job queues did not answer in time"),
    }
}

/// Counts and times one HTTP request by method, route template (never the raw path, so the label
/// set stays bounded; `unmatched` for the 404 fallback) and status. The time is to the response
/// head: a stream's body is measured by its own metrics.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let began = Instant::now();
    let response = next.run(request).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_str().to_owned()),
    ];
    metrics::histogram!(metric::HTTP_DURATION, &labels).record(began.elapsed().as_secs_f64());
    metrics::counter!(metric::HTTP_REQUESTS, &labels).increment(1);
    response
}

/// The method as a label: the standard ones by name, anything else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        assert!(bearer_matches(&with_auth("Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3crets"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&with_auth("s3cret"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
