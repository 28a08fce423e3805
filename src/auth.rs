//! Who is calling: API keys (`X-API-Key`, compared in constant time) for backend-to-backend calls,
//! Supabase JWTs (`Authorization: Bearer`, HS256) for end users, and the per-route rules that
//! combine them (the axum extractors that apply them are in `routes::extract`). Every failure answers the same generic 401 so a client cannot
//! tell a wrong key from an expired token; the reason is logged at debug, never the credential.
//!
//! Route families and their [`Policy`]:
//! - `/api/v1` status and tasks: an API key, always ([`ApiCaller`]).
//! - `/api/v1/llm/*`: an API key, plus a JWT when `SUPABASE_JWT_SECRET` is set ([`ApiUser`]).
//! - `/v1/*` (OpenAI-compatible): an API key, also accepted as `Authorization: Bearer`.
//! - `/ai/coach/*`, `/realtime/*`: an API key when any is configured; a JWT is optional and, when
//!   sent, must be valid and pins the caller to its user ([`Caller`] itself).
//! - Creating a realtime session, its turn, cancel, end and status, and the persona list: the
//!   same, or instead of the key a valid end-user JWT when JWTs are verified ([`UserOrKey`],
//!   [`Policy::KeyOrUser`]). A browser must never hold an API key, so this is how a browser
//!   client (the `/chat` page) starts a session for its signed-in user in a keyed deployment: the
//!   JWT pins it to that user. On a session's own routes the session token (`X-Session-Token`)
//!   is accepted too (`routes::realtime`): it already lets its holder talk and cancel over the
//!   WebSocket, so accepting it for the HTTP turn, cancel and end grants nothing more.

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::error::Error;

/// The header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A valid API key: a trusted backend that may act for any user.
    Service,
    /// A valid end-user JWT (plus a valid API key wherever keys are configured): may act only for
    /// `user_id`, the token's `sub`.
    User {
        /// The JWT's `sub`.
        user_id: String,
    },
    /// No credentials, on a route that needs none because no API key is configured at all.
    Anonymous,
}

impl Caller {
    /// Allows acting on `user_id`'s data: a JWT user only on their own (403 otherwise); a service
    /// or an anonymous caller (no keys configured) on anyone's.
    pub fn authorize_user(&self, user_id: &str) -> Result<(), Error> {
        match self {
            Caller::User { user_id: own } if own != user_id => {
                tracing::debug!("caller's JWT user differs from the user id in the request");
                Err(Error::Forbidden)
            }
            _ => Ok(()),
        }
    }

    /// The end user's id, when the caller is one.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Caller::User { user_id } => Some(user_id),
            _ => None,
        }
    }
}

/// Which credentials a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// An API key, always; with no key configured every request is refused.
    ApiKey,
    /// An API key, always, plus a JWT when `SUPABASE_JWT_SECRET` is set.
    ApiKeyAndUser,
    /// An API key when any is configured (otherwise callers are anonymous); a JWT is optional.
    KeyIfConfigured,
    /// As [`Policy::KeyIfConfigured`], except that a valid end-user JWT (when JWTs are verified)
    /// replaces the key: the caller is then that user, on their own data only.
    KeyOrUser,
}

/// Credentials presented by a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The API key (`X-API-Key`).
    pub api_key: Option<&'a str>,
    /// The bearer token of `Authorization: Bearer` (a JWT on every route but `/v1/*`).
    pub bearer: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    /// `X-API-Key` and the bearer token of `Authorization`.
    pub fn from_headers(headers: &'a HeaderMap) -> Self {
        let api_key = headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|v| !v.is_empty());
        Credentials { api_key, bearer }
    }

    /// As OpenAI clients send them: the API key as `Authorization: Bearer` when there is no
    /// `X-API-Key` (a bearer next to an `X-API-Key` stays a JWT).
    pub fn bearer_as_key(self) -> Self {
        match (self.api_key, self.bearer) {
            (None, Some(key)) => Credentials {
                api_key: Some(key),
                bearer: None,
            },
            _ => self,
        }
    }
}

/// The claims coachd reads from an end-user JWT (the signature, `exp`, `nbf` and `aud` are
/// checked by the validation itself).
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// Verifies credentials; built once at start-up from the settings.
pub struct Authenticator {
    /// SHA-256 digests of the accepted keys: comparing fixed-length digests in constant time
    /// leaks neither a key's content nor its length.
    key_digests: Vec<[u8; 32]>,
    jwt: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.key_digests.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Authenticator {
    /// Keys from `XENIOS_BACKEND_API_KEY` and `COACHD_API_KEYS`, JWTs per `SUPABASE_JWT_SECRET`,
    /// `COACHD_JWT_AUDIENCE` and `COACHD_JWT_LEEWAY_SECS`.
    pub fn from_settings(s: &Settings) -> Self {
        let jwt = s.supabase_jwt_secret.as_ref().map(|secret| {
            // Pinned to HS256: a token naming any other algorithm (or `none`) is rejected.
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = s.jwt_leeway.as_secs();
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_audience(&[s.jwt_audience.as_str()]);
            // `aud` is only checked when present unless required; a token without one is refused.
            validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            // Supabase signs with the secret's bytes as they are (not base64-decoded).
            (DecodingKey::from_secret(secret.expose().as_bytes()), validation)
        });
        Authenticator {
            key_digests: s.api_keys.iter().map(|k| digest(k.expose())).collect(),
            jwt,
        }
    }

    /// Logs what the configuration means for access, once at start-up.
    pub fn log_summary(&self) {
        if self.key_digests.is_empty() {
            tracing::warn!(
                "auth: no API key configured (XENIOS_BACKEND_API_KEY, COACHD_API_KEYS): every /api/v1 and \
                 /v1 route answers 401, and the coach and realtime routes are open to anyone"
            );
        } else {
            tracing::info!(keys = self.key_digests.len(), "auth: API keys configured");
        }
        if self.jwt.is_none() {
            tracing::warn!(
                "auth: SUPABASE_JWT_SECRET unset: end-user JWTs are not checked and the LLM routes of \
                 /api/v1 accept an API key alone"
            );
        }
    }

    /// Whether any API key is configured.
    pub fn has_keys(&self) -> bool {
        !self.key_digests.is_empty()
    }

    /// Whether end-user JWTs are verified (`SUPABASE_JWT_SECRET` is set).
    pub fn has_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// Whether `key` is one of the configured keys, in time independent of which one (if any)
    /// matched and of the keys' lengths.
    pub fn key_matches(&self, key: &str) -> bool {
        let presented = digest(key);
        let mut matched = subtle::Choice::from(0u8);
        for known in &self.key_digests {
            matched |= known.ct_eq(&presented);
        }
        matched.into()
    }

    /// The user id (`sub`) of a valid JWT; `None` when it is invalid or JWTs are not configured.
    pub fn verify_jwt(&self, token: &str) -> Option<String> {
        let (key, validation) = self.jwt.as_ref()?;
        match jsonwebtoken::decode::<Claims>(token, key, validation) {
            Ok(data) if !data.claims.sub.trim().is_empty() => Some(data.claims.sub),
            Ok(_) => {
                tracing::debug!(reason = "empty sub", "JWT rejected");
                None
            }
            Err(e) => {
                // The kind only: never the token, nor claim values from a parse error.
                tracing::debug!(reason = jwt_reason(e.kind()), "JWT rejected");
                None
            }
        }
    }

    /// Applies a route's policy to the presented credentials. Every refusal is the same
    /// [`Error::Unauthorized`]; the reason goes to the debug log.
    pub fn authenticate(&self, creds: Credentials<'_>, policy: Policy) -> Result<Caller, Error> {
        let key_ok = creds.api_key.is_some_and(|k| self.key_matches(k));
        let key_needed = match policy {
            Policy::ApiKey | Policy::ApiKeyAndUser => true,
            Policy::KeyIfConfigured => self.has_keys(),
            // The JWT itself is checked below; a bad one is refused there.
            Policy::KeyOrUser => self.has_keys() && !(self.has_jwt() && creds.bearer.is_some()),
        };
        if key_needed && !key_ok {
            tracing::debug!(
                reason = match (creds.api_key, self.has_keys()) {
                    (_, false) => "no API key is configured",
                    (None, true) => "no API key sent",
                    (Some(_), true) => "unknown API key",
                },
                "request refused"
            );
            return Err(Error::Unauthorized);
        }
        match (creds.bearer, self.has_jwt()) {
            // A presented token is always checked: an invalid one is never ignored.
            (Some(token), true) => match self.verify_jwt(token) {
                Some(user_id) => Ok(Caller::User { user_id }),
                None => Err(Error::Unauthorized),
            },
            (None, true) if policy == Policy::ApiKeyAndUser => {
                tracing::debug!(reason = "no JWT sent", "request refused");
                Err(Error::Unauthorized)
            }
            // Without a secret a bearer cannot be verified: the API key alone decides.
            _ if key_ok => Ok(Caller::Service),
            _ => Ok(Caller::Anonymous),
        }
    }

    /// [`Authenticator::authenticate`] with the credentials of a request's headers.
    pub fn authenticate_headers(&self, headers: &HeaderMap, policy: Policy) -> Result<Caller, Error> {
        self.authenticate(Credentials::from_headers(headers), policy)
    }
}

fn jwt_reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidToken => "malformed token",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => "algorithm not allowed",
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid",
        K::InvalidAudience => "wrong audience",
        K::MissingRequiredClaim(_) => "missing claim",
        K::Base64(_) | K::Json(_) | K::Utf8(_) => "undecodable token",
        _ => "invalid token",
    }
}

/// The rule of the routes a browser client needs ([`Policy::KeyOrUser`]); its extractor is in
/// `routes::extract`.
#[derive(Debug, Clone)]
pub struct UserOrKey(pub Caller);

/// The rule of `/api/v1` status and tasks ([`Policy::ApiKey`]); its extractor is in
/// `routes::extract`.
#[derive(Debug, Clone)]
pub struct ApiCaller(pub Caller);

/// The rule of the `/api/v1/llm/*` routes ([`Policy::ApiKeyAndUser`]); its extractor is in
/// `routes::extract`.
#[derive(Debug, Clone)]
pub struct ApiUser(pub Caller);

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(pairs: &[(&str, &str)]) -> Authenticator {
        Authenticator::from_settings(&Settings::for_tests(pairs).unwrap())
    }

    fn creds<'a>(api_key: Option<&'a str>, bearer: Option<&'a str>) -> Credentials<'a> {
        Credentials { api_key, bearer }
    }

    #[test]
    fn keys_match_exactly_whatever_their_length() {
        let a = auth(&[
            ("XENIOS_BACKEND_API_KEY", "k1"),
            ("COACHD_API_KEYS", "second-key"),
        ]);
        assert!(a.key_matches("k1") && a.key_matches("second-key"));
        for wrong in ["", "k", "k12", "K1", "second-key "] {
            assert!(!a.key_matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn policies_combine_keys_and_jwts() {
        let none = auth(&[]);
        assert!(none.authenticate(creds(None, None), Policy::ApiKey).is_err());
        assert!(none.authenticate(creds(Some("x"), None), Policy::ApiKey).is_err());
        assert_eq!(
            none.authenticate(creds(None, None), Policy::KeyIfConfigured)
                .unwrap(),
            Caller::Anonymous
        );

        let keyed = auth(&[("COACHD_API_KEYS", "k")]);
        assert!(
            keyed
                .authenticate(creds(None, None), Policy::KeyIfConfigured)
                .is_err()
        );
        assert_eq!(
            keyed
                .authenticate(creds(Some("k"), None), Policy::ApiKeyAndUser)
                .unwrap(),
            Caller::Service,
            "no JWT secret: the key alone serves the LLM routes"
        );

        let both = auth(&[("COACHD_API_KEYS", "k"), ("SUPABASE_JWT_SECRET", "s")]);
        assert!(
            both.authenticate(creds(Some("k"), None), Policy::ApiKeyAndUser)
                .is_err()
        );
        assert_eq!(
            both.authenticate(creds(Some("k"), None), Policy::ApiKey).unwrap(),
            Caller::Service
        );
        assert!(
            both.authenticate(creds(Some("k"), Some("not.a.jwt")), Policy::ApiKey)
                .is_err(),
            "a presented token is checked even where none is required"
        );
    }

    #[test]
    fn a_jwt_replaces_the_key_only_where_the_policy_says_and_only_when_verified() {
        let secret = "jwt-secret";
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1", "aud": "authenticated", "exp": 4_000_000_000u64}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let both = auth(&[("COACHD_API_KEYS", "k"), ("SUPABASE_JWT_SECRET", secret)]);
        assert_eq!(
            both.authenticate(creds(None, Some(&token)), Policy::KeyOrUser)
                .unwrap(),
            Caller::User { user_id: "u1".into() }
        );
        assert!(
            both.authenticate(creds(None, Some(&token)), Policy::KeyIfConfigured)
                .is_err(),
            "elsewhere the key is still needed"
        );
        assert!(
            both.authenticate(creds(None, Some("not.a.jwt")), Policy::KeyOrUser)
                .is_err()
        );
        assert!(both.authenticate(creds(None, None), Policy::KeyOrUser).is_err());
        assert_eq!(
            both.authenticate(creds(Some("k"), None), Policy::KeyOrUser)
                .unwrap(),
            Caller::Service
        );
        let keys_only = auth(&[("COACHD_API_KEYS", "k")]);
        assert!(
            keys_only
                .authenticate(creds(None, Some(&token)), Policy::KeyOrUser)
                .is_err(),
            "a bearer nobody can verify never replaces the key"
        );
        assert_eq!(
            auth(&[])
                .authenticate(creds(None, None), Policy::KeyOrUser)
                .unwrap(),
            Caller::Anonymous
        );
    }

    #[test]
    fn bearer_becomes_the_key_only_without_x_api_key() {
        let c = creds(None, Some("key")).bearer_as_key();
        assert_eq!((c.api_key, c.bearer), (Some("key"), None));
        let c = creds(Some("key"), Some("jwt")).bearer_as_key();
        assert_eq!((c.api_key, c.bearer), (Some("key"), Some("jwt")));
    }

    #[test]
    fn a_jwt_user_may_only_act_for_themselves() {
        let user = Caller::User { user_id: "a".into() };
        assert!(user.authorize_user("a").is_ok());
        assert!(matches!(user.authorize_user("b"), Err(Error::Forbidden)));
        assert!(Caller::Service.authorize_user("b").is_ok());
        assert!(Caller::Anonymous.authorize_user("b").is_ok());
    }
}
