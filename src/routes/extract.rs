//! The extractors that apply the auth rules to a request, with the state's [`Authenticator`]:
//! `caller: Caller` ([`Policy::KeyIfConfigured`]), [`UserOrKey`] ([`Policy::KeyOrUser`]),
//! [`ApiCaller`] ([`Policy::ApiKey`]) and [`ApiUser`] ([`Policy::ApiKeyAndUser`]). `auth` itself never sees the state.
//!
//! [`Authenticator`]: crate::auth::Authenticator

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{ApiCaller, ApiUser, Caller, Policy, UserOrKey};
use crate::error::Error;
use crate::state::AppState;

/// The coach and realtime rule ([`Policy::KeyIfConfigured`]): put `caller: Caller` in a handler.
impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate_headers(&parts.headers, Policy::KeyIfConfigured)
    }
}

/// The rule of the routes a browser client needs ([`Policy::KeyOrUser`]).
impl FromRequestParts<AppState> for UserOrKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate_headers(&parts.headers, Policy::KeyOrUser)
            .map(UserOrKey)
    }
}

/// The rule of `/api/v1` status and tasks ([`Policy::ApiKey`]).
impl FromRequestParts<AppState> for ApiCaller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate_headers(&parts.headers, Policy::ApiKey)
            .map(ApiCaller)
    }
}

/// The rule of the `/api/v1/llm/*` routes ([`Policy::ApiKeyAndUser`]).
impl FromRequestParts<AppState> for ApiUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate_headers(&parts.headers, Policy::ApiKeyAndUser)
            .map(ApiUser)
    }
}
