//! Session tokens (`{session_id}.{expiry}.{hmac}`). Checks: `verify` never panics on any token;
//! a token issued for a session and user verifies for exactly them; an edited token verifies only
//! if it still names the same session, expiry and signature (so it re-encodes to the one issued),
//! and never for another session or user.
#![no_main]

use std::time::Duration;

use coachd::secret::Secret;
use coachd::session::token::{TokenError, TokenKey};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    key: String,
    session: String,
    user: String,
    other_user: String,
    /// Bytes spliced into the issued token.
    at: u16,
    cut: u8,
    insert: String,
    /// A token from nowhere.
    raw: String,
}

/// The parts of a token as `verify` reads them, in canonical form.
fn canonical(token: &str) -> Option<(String, u64, Vec<u8>)> {
    let mut parts = token.rsplitn(3, '.');
    let (sig, expires, sid) = (parts.next()?, parts.next()?, parts.next()?);
    Some((sid.to_owned(), expires.parse().ok()?, hex_decode(sig)?))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

fuzz_target!(|input: Input| {
    let key = TokenKey::new(Some(&Secret::new(input.key.clone())), Duration::from_secs(3600));
    // Whatever is presented: a typed answer, no panic.
    let _ = key.verify(&input.raw, &input.session, &input.user);

    let (token, _) = key.issue(&input.session, &input.user);
    assert_eq!(key.verify(&token, &input.session, &input.user), Ok(()), "{token}");
    if input.other_user != input.user {
        assert_eq!(
            key.verify(&token, &input.session, &input.other_user),
            Err(TokenError::BadSignature)
        );
    }
    let other_session = format!("{}x", input.session);
    assert_eq!(
        key.verify(&token, &other_session, &input.user),
        Err(TokenError::WrongSession)
    );

    // An edited token.
    let mut at = usize::from(input.at) % (token.len() + 1);
    while !token.is_char_boundary(at) {
        at -= 1;
    }
    let mut end = (at + usize::from(input.cut) % 8).min(token.len());
    while !token.is_char_boundary(end) {
        end -= 1;
    }
    let edited = format!("{}{}{}", &token[..at], input.insert, &token[end..]);
    if key.verify(&edited, &input.session, &input.user).is_ok() {
        assert_eq!(
            canonical(&edited),
            canonical(&token),
            "an edited token verified: {edited:?} from {token:?}"
        );
    }
    if input.other_user != input.user {
        assert!(key.verify(&edited, &input.session, &input.other_user).is_err());
    }
});
