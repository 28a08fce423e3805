//! Rate-limit enforcement at the edge: counts a request with the limiter of the state (the
//! limiter itself lives in `context::rate_limit`) and turns its verdict into the `X-RateLimit-*`
//! headers of an admitted request or a 429.

use axum::response::{IntoResponseParts, ResponseParts};

use crate::context::rate_limit::RateDecision;
use crate::error::{Error, insert_rate_limit_headers};
use crate::metric;
use crate::state::AppState;

/// The `X-RateLimit-*` headers of an admitted request; empty when rate limiting is off.
/// Return it as part of a response: `Ok((headers, Json(body)))`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateHeaders(Option<RateDecision>);

impl IntoResponseParts for RateHeaders {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        if let Some(d) = self.0 {
            insert_rate_limit_headers(res.headers_mut(), d.limit, d.remaining, d.reset_secs());
        }
        Ok(res)
    }
}

/// Counts a request of `user_id` to `endpoint` (a route template, e.g.
/// `/ai/coach/memory/{user_id}/{coach_id}`): the headers to send when admitted, or
/// [`Error::RateLimited`] (429 with `Retry-After` and `X-RateLimit-*`).
///
/// When the limiter's store fails the request is admitted (an outage of Redis should not take
/// down every rate-limited route with it), or refused with 503 under `RATE_LIMIT_FAIL_OPEN=false`.
/// The failure is logged either way.
pub async fn enforce(state: &AppState, user_id: &str, endpoint: &str) -> Result<RateHeaders, Error> {
    let limiter = &state.rate_limiter;
    if !limiter.enabled() {
        return Ok(RateHeaders(None));
    }
    match limiter.check(user_id, endpoint).await {
        Ok(d) if d.allowed => Ok(RateHeaders(Some(d))),
        Ok(d) => {
            metrics::counter!(metric::RATE_LIMIT_REFUSALS, "endpoint" => endpoint.to_owned()).increment(1);
            Err(Error::RateLimited {
                limit: d.limit,
                remaining: d.remaining,
                retry_after_secs: d.reset_secs().max(1),
            })
        }
        Err(e) if state.settings.rate_limit_fail_open => {
            tracing::warn!(error = %e, endpoint, "rate limiter unavailable: admitting the request");
            metrics::counter!(metric::RATE_LIMITER_ERRORS, "action" => "admitted").increment(1);
            Ok(RateHeaders(None))
        }
        Err(e) => {
            tracing::warn!(error = %e, endpoint, "rate limiter unavailable: refusing the request");
            metrics::counter!(metric::RATE_LIMITER_ERRORS, "action" => "refused").increment(1);
            Err(Error::Unavailable(
                "the rate limiter is unavailable; retry shortly".to_owned(),
            ))
        }
    }
}
