//! Short-lived session tokens: created with a session and passed by browsers as `?token=` on the
//! SSE and WebSocket routes, where they cannot set headers. A token is
//! `{session_id}.{expiry}.{hmac}` with HMAC-SHA256 over session, user and expiry, checked in
//! constant time. The key comes from `COACHD_SESSION_TOKEN_SECRET`, or is random per process
//! (then tokens only work on the node that issued them).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Issues and checks session tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused (never shown to clients in detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the token's form.
    Malformed,
    /// For another session.
    WrongSession,
    /// Past its expiry.
    Expired,
    /// The signature does not check out.
    BadSignature,
}

impl TokenKey {
    /// A key from the configured secret, or a random one.
    pub fn new(secret: Option<&Secret>, ttl: Duration) -> Self {
        let key = match secret {
            Some(s) => s.expose().as_bytes().to_vec(),
            None => {
                use rand::RngCore;
                let mut k = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                k
            }
        };
        TokenKey { key, ttl }
    }

    fn mac(&self, session_id: &str, user_id: &str, expires: u64) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(session_id.as_bytes());
        mac.update(b"\0");
        mac.update(user_id.as_bytes());
        mac.update(b"\0");
        mac.update(expires.to_string().as_bytes());
        Some(mac)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// A token for this session and user, and its expiry (Unix seconds).
    pub fn issue(&self, session_id: &str, user_id: &str) -> (String, u64) {
        let expires = Self::now() + self.ttl.as_secs();
        let sig = self
            .mac(session_id, user_id, expires)
            .map(|m| hex::encode(m.finalize().into_bytes()))
            .unwrap_or_default();
        (format!("{session_id}.{expires}.{sig}"), expires)
    }

    /// Checks a token against the session it is presented for.
    pub fn verify(&self, token: &str, session_id: &str, user_id: &str) -> Result<(), TokenError> {
        let mut parts = token.rsplitn(3, '.');
        let (Some(sig), Some(expires), Some(sid)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| TokenError::Malformed)?;
        if sid != session_id {
            return Err(TokenError::WrongSession);
        }
        let mac = self
            .mac(session_id, user_id, expires)
            .ok_or(TokenError::Malformed)?;
        // verify_slice compares in constant time.
        mac.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
        if expires < Self::now() {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_session_user_and_time() {
        let key = TokenKey::new(Some(&Secret::new("k")), Duration::from_secs(60));
        let (t, _) = key.issue("s1", "u1");
        assert_eq!(key.verify(&t, "s1", "u1"), Ok(()));
        assert_eq!(key.verify(&t, "s2", "u1"), Err(TokenError::WrongSession));
        assert_eq!(key.verify(&t, "s1", "u2"), Err(TokenError::BadSignature));
        let other = TokenKey::new(Some(&Secret::new("other")), Duration::from_secs(60));
        assert_eq!(other.verify(&t, "s1", "u1"), Err(TokenError::BadSignature));
        assert_eq!(key.verify("garbage", "s1", "u1"), Err(TokenError::Malformed));
        let expired = TokenKey::new(Some(&Secret::new("k")), Duration::ZERO);
        let (t, exp) = expired.issue("s1", "u1");
        // Forge nothing: re-sign an expiry in the past with the right key.
        let past = exp - 10;
        let sig = hex::encode(expired.mac("s1", "u1", past).unwrap().finalize().into_bytes());
        assert_eq!(
            expired.verify(&format!("s1.{past}.{sig}"), "s1", "u1"),
            Err(TokenError::Expired)
        );
        assert!(t.starts_with("s1."));
    }
}
