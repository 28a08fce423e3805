//! End-user JWTs (`Authorization: Bearer`, HS256) through `Authenticator`. Checks, against the
//! rules of `src/auth.rs`: a token signed here with the configured secret yields its `sub`
//! exactly when the algorithm is HS256, `aud` names the configured audience, `exp` is not past
//! and `nbf` not ahead (30 s leeway; the times used are far from either edge) and `sub` is a
//! non-blank string; no other token (wrong key, other algorithm, `none`, edited, or raw bytes)
//! is ever accepted; and `authenticate` makes a `User` only of a verified token and a `Service`
//! only of the configured key.
#![no_main]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use coachd::auth::{Authenticator, Caller, Credentials, Policy};
use coachd::config::Settings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const SECRET: &str = "fuzz-jwt-secret";
const API_KEY: &str = "fuzz-api-key";
const AUDIENCE: &str = "authenticated";

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let settings = Settings::for_tests(&[("SUPABASE_JWT_SECRET", SECRET), ("COACHD_API_KEYS", API_KEY)])
            .expect("fuzz settings");
        Authenticator::from_settings(&settings)
    })
}

#[derive(Debug, Arbitrary)]
enum Sub {
    Missing,
    Text(String),
    Number(i64),
}

#[derive(Debug, Arbitrary)]
enum Aud {
    Missing,
    Ours,
    Other(String),
    List(Vec<String>, bool),
}

/// Times relative to now, each far from the 30 s leeway.
#[derive(Debug, Arbitrary, Clone, Copy)]
enum When {
    Missing,
    LongAgo,
    Ago,
    Soon,
    Later,
}

impl When {
    fn at(self, now: u64) -> Option<u64> {
        match self {
            When::Missing => None,
            When::LongAgo => Some(now - 86_400),
            When::Ago => Some(now - 300),
            When::Soon => Some(now + 300),
            When::Later => Some(now + 86_400),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Alg {
    Hs256,
    Hs384,
    Hs512,
    None,
}

#[derive(Debug, Arbitrary)]
struct Input {
    sub: Sub,
    aud: Aud,
    exp: When,
    nbf: When,
    alg: Alg,
    right_key: bool,
    extra: Vec<(String, String)>,
    /// Where to flip a byte of the signed token, if at all.
    edit: Option<(u16, u8)>,
    raw_bearer: Vec<u8>,
    raw_key: Vec<u8>,
}

fn b64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn check_authenticate(headers: &HeaderMap) {
    let auth = auth();
    let creds = Credentials::from_headers(headers);
    let key_ok = creds.api_key == Some(API_KEY);
    let verified = creds.bearer.and_then(|t| auth.verify_jwt(t));
    for policy in [
        Policy::ApiKey,
        Policy::ApiKeyAndUser,
        Policy::KeyIfConfigured,
        Policy::KeyOrUser,
    ] {
        match auth.authenticate(creds, policy) {
            Ok(Caller::User { user_id }) => {
                assert_eq!(Some(&user_id), verified.as_ref(), "{policy:?}");
                if policy != Policy::KeyOrUser {
                    assert!(key_ok, "{policy:?} let a user in without the key");
                }
            }
            Ok(Caller::Service) => {
                assert!(key_ok, "{policy:?} made a service of a wrong key");
                assert!(creds.bearer.is_none(), "{policy:?} ignored a bearer token");
            }
            Ok(Caller::Anonymous) => panic!("{policy:?} let an anonymous caller in with keys configured"),
            Err(_) => {}
        }
    }
}

fuzz_target!(|input: Input| {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = Map::new();
    for (k, v) in &input.extra {
        if !matches!(k.as_str(), "sub" | "aud" | "exp" | "nbf") {
            claims.insert(k.clone(), Value::String(v.clone()));
        }
    }
    match &input.sub {
        Sub::Missing => {}
        Sub::Text(s) => {
            claims.insert("sub".into(), json!(s));
        }
        Sub::Number(n) => {
            claims.insert("sub".into(), json!(n));
        }
    }
    match &input.aud {
        Aud::Missing => {}
        Aud::Ours => {
            claims.insert("aud".into(), json!(AUDIENCE));
        }
        Aud::Other(a) => {
            claims.insert("aud".into(), json!(a));
        }
        Aud::List(list, ours) => {
            let mut list = list.clone();
            if *ours {
                list.push(AUDIENCE.into());
            }
            claims.insert("aud".into(), json!(list));
        }
    }
    if let Some(exp) = input.exp.at(now) {
        claims.insert("exp".into(), json!(exp));
    }
    if let Some(nbf) = input.nbf.at(now) {
        claims.insert("nbf".into(), json!(nbf));
    }
    let secret = if input.right_key { SECRET } else { "another-secret" };
    let key = EncodingKey::from_secret(secret.as_bytes());
    let token = match input.alg {
        Alg::Hs256 => jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key),
        Alg::Hs384 => jsonwebtoken::encode(&Header::new(Algorithm::HS384), &claims, &key),
        Alg::Hs512 => jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key),
        Alg::None => Ok(format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(&serde_json::to_vec(&claims).expect("claims serialise"))
        )),
    }
    .expect("a token is signed");

    let sub_ok = match &input.sub {
        Sub::Text(s) => (!s.trim().is_empty()).then(|| s.clone()),
        _ => None,
    };
    let aud_ok = match &input.aud {
        Aud::Ours => true,
        Aud::Other(a) => a == AUDIENCE,
        Aud::List(list, ours) => *ours || list.iter().any(|a| a == AUDIENCE),
        Aud::Missing => false,
    };
    let exp_ok = matches!(input.exp, When::Soon | When::Later);
    let nbf_ok = matches!(input.nbf, When::Missing | When::LongAgo | When::Ago);
    let expected = if matches!(input.alg, Alg::Hs256) && input.right_key && aud_ok && exp_ok && nbf_ok {
        sub_ok
    } else {
        None
    };
    assert_eq!(auth().verify_jwt(&token), expected, "{claims:?}");

    if let Some((at, flip)) = input.edit
        && flip != 0
    {
        let mut bytes = token.clone().into_bytes();
        let at = usize::from(at) % bytes.len();
        bytes[at] ^= flip;
        if let Ok(edited) = String::from_utf8(bytes)
            && let Some(sub) = auth().verify_jwt(&edited)
        {
            // Base64 padding bits can change without changing the decoded token.
            assert_eq!(Some(sub), expected, "an edited token verified: {edited}");
        }
    }

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
    headers.insert("x-api-key", HeaderValue::from_static(API_KEY));
    check_authenticate(&headers);

    let mut raw = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&input.raw_bearer) {
        raw.insert(header::AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(&input.raw_key) {
        raw.insert("x-api-key", v);
    }
    check_authenticate(&raw);
});
