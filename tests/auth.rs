//! Auth over HTTP: API keys on /api/v1 (always), /v1 (also as a bearer) and the coach routes
//! (only when keys are configured); end-user JWTs on the LLM routes (expired, not yet valid,
//! wrong audience, wrong signature, `alg: none` and other algorithms all refused with one body);
//! a JWT user acting for another user refused with 403; and what a browser holds instead of a
//! key: a JWT to list coaches and start its user's session, then the session token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use coachd::auth::{Authenticator, Caller, Policy};
use coachd::fake_upstream::{FakeUpstream, Script};
use common::{Services, TestApp, spawn_app_with};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "super-secret-jwt-signing-key-for-tests";
const KEY: &str = "backend-key-0123456789";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn jwt_with(alg: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "aud": "authenticated", "exp": now() + 600, "iat": now(), "role": "authenticated"})
}

fn jwt(sub: &str) -> String {
    jwt_with(Algorithm::HS256, SECRET, &claims(sub))
}

/// A token with `alg: none` and no signature.
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// A JWT with this header, signed HMAC-SHA256 with `secret` whatever the header says.
fn signed_with_header(header: &str, secret: &str, claims: &Value) -> String {
    use hmac::{Hmac, Mac};
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// The text of an RSA public key, as an attacker of RS/HS confusion would use for an HMAC key.
const PUBLIC_KEY_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END PUBLIC KEY-----\n";

async fn app_with(fake: &FakeUpstream, extra: &[(&str, &str)]) -> TestApp {
    let base = fake.base_url();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "upstream-key"),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(Services::Embedded, &vars).await
}

async fn send(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String) {
    let mut req = match method {
        "GET" => app.client.get(app.url(path)),
        _ => app.client.post(app.url(path)),
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn complete_body() -> Value {
    json!({"task": "chat", "prompt": "hello"})
}

#[tokio::test]
async fn without_any_configured_key_api_routes_refuse_and_coach_routes_are_open() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake, &[]).await;

    let (status, body) = send(&app, "GET", "/api/v1/status", &[], None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = send(&app, "GET", "/api/v1/status", &[("x-api-key", "anything")], None).await;
    assert_eq!(status, 401, "no key configured: nothing is valid");
    let (status, body) = send(&app, "GET", "/v1/models", &[], None).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "authentication_error"
    );

    let (status, _) = send(&app, "GET", "/ai/coach/personas", &[], None).await;
    assert_eq!(status, 200, "coach routes are open without configured keys");

    // Every 401, in either error shape, names the scheme it wants (RFC 9110).
    for path in ["/api/v1/status", "/v1/models"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="coachd""#),
            "{path}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_no_key_wrong_key_and_every_valid_key() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(
        &fake,
        &[
            ("XENIOS_BACKEND_API_KEY", KEY),
            ("COACHD_API_KEYS", "second-key-abc,third-key-def"),
        ],
    )
    .await;

    let (status, missing) = send(&app, "GET", "/api/v1/status", &[], None).await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&missing).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    for wrong in ["wrong", "backend-key-012345678", "backend-key-01234567890", ""] {
        let (status, body) = send(&app, "GET", "/api/v1/status", &[("x-api-key", wrong)], None).await;
        assert_eq!(status, 401, "{wrong:?}");
        assert_eq!(body, missing, "one generic body, whatever was wrong");
    }
    for good in [KEY, "second-key-abc", "third-key-def"] {
        let (status, body) = send(&app, "GET", "/api/v1/status", &[("x-api-key", good)], None).await;
        assert_eq!(status, 200, "{body}");
    }
    // A bearer API key counts on /v1 only.
    let bearer = format!("Bearer {KEY}");
    let (status, _) = send(&app, "GET", "/api/v1/status", &[("authorization", &bearer)], None).await;
    assert_eq!(status, 401);
    let (status, _) = send(&app, "GET", "/v1/models", &[("authorization", &bearer)], None).await;
    assert_eq!(status, 200);
    let (status, _) = send(
        &app,
        "GET",
        "/v1/models",
        &[("authorization", "Bearer nope")],
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Coach routes: a key is needed now that keys are configured.
    let (status, _) = send(&app, "GET", "/ai/coach/personas", &[], None).await;
    assert_eq!(status, 401);
    let (status, _) = send(&app, "GET", "/ai/coach/personas", &[("x-api-key", KEY)], None).await;
    assert_eq!(status, 200);

    // Without SUPABASE_JWT_SECRET the LLM routes take the key alone.
    fake.set_default(Script::text("hi"));
    let (status, body) = send(
        &app,
        "POST",
        "/api/v1/llm/complete",
        &[("x-api-key", KEY)],
        Some(complete_body()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn llm_routes_need_a_valid_jwt_when_the_secret_is_set() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("hi"));
    let app = app_with(
        &fake,
        &[("XENIOS_BACKEND_API_KEY", KEY), ("SUPABASE_JWT_SECRET", SECRET)],
    )
    .await;
    let post = |headers: Vec<(&'static str, String)>| {
        let app = &app;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(app, "POST", "/api/v1/llm/complete", &h, Some(complete_body())).await
        }
    };
    let bearer = |t: &str| format!("Bearer {t}");

    let (status, body) = post(vec![
        ("x-api-key", KEY.into()),
        ("authorization", bearer(&jwt("user-a"))),
    ])
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, generic) = post(vec![("x-api-key", KEY.into())]).await;
    assert_eq!(status, 401, "an API key alone is not enough");
    let (status, body) = post(vec![("authorization", bearer(&jwt("user-a")))]).await;
    assert_eq!(
        (status, body.as_str()),
        (401, generic.as_str()),
        "a JWT alone is not enough"
    );

    let mut expired = claims("user-a");
    expired["exp"] = json!(now() - 3600);
    let mut not_yet = claims("user-a");
    not_yet["nbf"] = json!(now() + 3600);
    let mut wrong_aud = claims("user-a");
    wrong_aud["aud"] = json!("someone-else");
    let mut no_aud = claims("user-a");
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut no_exp = claims("user-a");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_sub = claims("user-a");
    no_sub.as_object_mut().unwrap().remove("sub");
    let cases = [
        ("expired", jwt_with(Algorithm::HS256, SECRET, &expired)),
        ("not yet valid", jwt_with(Algorithm::HS256, SECRET, &not_yet)),
        ("wrong audience", jwt_with(Algorithm::HS256, SECRET, &wrong_aud)),
        ("no audience", jwt_with(Algorithm::HS256, SECRET, &no_aud)),
        ("no exp", jwt_with(Algorithm::HS256, SECRET, &no_exp)),
        ("no sub", jwt_with(Algorithm::HS256, SECRET, &no_sub)),
        (
            "wrong signature",
            jwt_with(Algorithm::HS256, "another-secret", &claims("user-a")),
        ),
        ("HS384", jwt_with(Algorithm::HS384, SECRET, &claims("user-a"))),
        ("alg none", unsigned(&claims("user-a"))),
        // RS/HS confusion, both ways round: a header naming RS256 over a valid HS256 signature
        // by the secret (the algorithm is pinned, not read from the header), and HS256 keyed
        // with a public key's text (what a server that verified RS256 with it would accept).
        (
            "RS256 header, HS256 signature",
            signed_with_header(r#"{"alg":"RS256","typ":"JWT"}"#, SECRET, &claims("user-a")),
        ),
        (
            "HS256 keyed with a public key",
            jwt_with(Algorithm::HS256, PUBLIC_KEY_PEM, &claims("user-a")),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in cases {
        let (status, body) = post(vec![("x-api-key", KEY.into()), ("authorization", bearer(&token))]).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(body, generic, "{what}: the same body as any other refusal");
        assert!(!body.contains(&token), "{what}: the token is not echoed");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_jwt_user_may_not_act_for_another_user() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("hi"));
    let app = app_with(
        &fake,
        &[("XENIOS_BACKEND_API_KEY", KEY), ("SUPABASE_JWT_SECRET", SECRET)],
    )
    .await;
    let auth = format!("Bearer {}", jwt("user-a"));
    let headers = [("x-api-key", KEY), ("authorization", auth.as_str())];

    let mine = json!({"prompt": "hello", "user_id": "user-a"});
    let (status, body) = send(&app, "POST", "/api/v1/llm/complete", &headers, Some(mine)).await;
    assert_eq!(status, 200, "{body}");

    let theirs = json!({"prompt": "hello", "user_id": "user-b"});
    let (status, body) = send(
        &app,
        "POST",
        "/api/v1/llm/complete",
        &headers,
        Some(theirs.clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
    let (status, _) = send(&app, "POST", "/api/v1/llm/stream", &headers, Some(theirs)).await;
    assert_eq!(status, 403);
    assert_eq!(
        fake.request_count("/chat/completions"),
        1,
        "the refused calls never reached the LLM"
    );

    // The same through the extractor's building blocks, as the coach and realtime routes use them.
    let mut h = axum::http::HeaderMap::new();
    h.insert("x-api-key", KEY.parse().unwrap());
    h.insert("authorization", auth.parse().unwrap());
    let caller = app
        .state
        .auth
        .authenticate_headers(&h, Policy::KeyIfConfigured)
        .unwrap();
    assert_eq!(
        caller,
        Caller::User {
            user_id: "user-a".into()
        }
    );
    assert!(caller.authorize_user("user-a").is_ok());
    let denied = caller.authorize_user("user-b").unwrap_err();
    assert_eq!(denied.status_code().as_u16(), 403);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_browser_starts_a_session_with_a_jwt_alone_and_acts_with_its_session_token() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("hi there"));
    let app = app_with(
        &fake,
        &[("XENIOS_BACKEND_API_KEY", KEY), ("SUPABASE_JWT_SECRET", SECRET)],
    )
    .await;
    let bearer = format!("Bearer {}", jwt("user-a"));
    let as_user = [("authorization", bearer.as_str())];

    let (status, body) = send(&app, "GET", "/ai/coach/personas", &as_user, None).await;
    assert_eq!(status, 200, "a JWT lists the coaches: {body}");
    let (status, _) = send(&app, "GET", "/ai/coach/personas/sales", &as_user, None).await;
    assert_eq!(status, 401, "a system prompt still needs the key");
    let (status, _) = send(&app, "GET", "/ai/coach/personas", &[], None).await;
    assert_eq!(status, 401);

    let create = |user: Option<&str>| match user {
        Some(u) => json!({"user_id": u, "coach_id": "sales", "transport": "sse"}),
        None => json!({"coach_id": "sales", "transport": "sse"}),
    };
    let (status, _) = send(&app, "POST", "/realtime/sessions", &[], Some(create(None))).await;
    assert_eq!(status, 401, "nothing sent");
    let (status, _) = send(
        &app,
        "POST",
        "/realtime/sessions",
        &[("authorization", "Bearer not.a.jwt")],
        Some(create(None)),
    )
    .await;
    assert_eq!(status, 401, "a bad JWT");
    let (status, body) = send(
        &app,
        "POST",
        "/realtime/sessions",
        &as_user,
        Some(create(Some("user-b"))),
    )
    .await;
    assert_eq!(status, 403, "another user's session: {body}");
    let (status, body) = send(
        &app,
        "POST",
        "/realtime/sessions",
        &as_user,
        Some(create(Some("user-a"))),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(&app, "POST", "/realtime/sessions", &as_user, Some(create(None))).await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["user_id"], "user-a", "the user is the token's");
    let (status, body) = send(
        &app,
        "POST",
        "/realtime/sessions",
        &[("x-api-key", KEY)],
        Some(create(None)),
    )
    .await;
    assert_eq!(status, 400, "a backend must say whose session: {body}");
    let odd = format!("Bearer {}", jwt("user:a"));
    let (status, body) = send(
        &app,
        "POST",
        "/realtime/sessions",
        &[("authorization", odd.as_str())],
        Some(create(None)),
    )
    .await;
    assert_eq!(status, 400, "a sub that is no valid id: {body}");

    // The session token works on the session's own routes, and only there.
    let id = created["session_id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    let with_token = [("x-session-token", token)];
    let path = |tail: &str| format!("/realtime/sessions/{id}{tail}");
    let (status, body) = send(
        &app,
        "POST",
        &path("/turn"),
        &with_token,
        Some(json!({"text": "hello"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["reply_text"],
        "hi there"
    );
    let (status, body) = send(&app, "GET", &path(""), &with_token, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(&app, "POST", &path("/cancel"), &with_token, None).await;
    assert_eq!(status, 200);

    let other: Value = serde_json::from_str(
        &send(&app, "POST", "/realtime/sessions", &as_user, Some(create(None)))
            .await
            .1,
    )
    .unwrap();
    let (status, body) = send(
        &app,
        "POST",
        &path("/turn"),
        &[("x-session-token", other["token"].as_str().unwrap())],
        Some(json!({"text": "hello"})),
    )
    .await;
    assert_eq!(status, 401, "another session's token: {body}");
    let (status, _) = send(
        &app,
        "POST",
        &path("/turn"),
        &[("x-session-token", "forged")],
        Some(json!({"text": "hello"})),
    )
    .await;
    assert_eq!(status, 401);

    // Dropping a session's connections is for operators only.
    let (status, _) = send(&app, "POST", &path("/disconnect"), &with_token, None).await;
    assert_eq!(status, 401, "a session token is no operator");
    let (status, _) = send(
        &app,
        "POST",
        &path("/disconnect"),
        &[("x-api-key", KEY), ("authorization", bearer.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 403, "an end user is no operator");
    let (status, body) = send(&app, "POST", &path("/disconnect"), &[("x-api-key", KEY)], None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["disconnected"], 0);

    let (status, body) = send(&app, "POST", &path("/end"), &with_token, Some(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(
        &app,
        "POST",
        &path("/turn"),
        &with_token,
        Some(json!({"text": "more"})),
    )
    .await;
    assert_eq!(status, 410, "ended");
    let (status, body) = send(&app, "GET", &path(""), &with_token, None).await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap()["status"].as_str()
        ),
        (200, Some("ended"))
    );

    // Without JWT verification a bearer can never stand in for the key.
    let keys_only = app_with(&fake, &[("XENIOS_BACKEND_API_KEY", KEY)]).await;
    let (status, _) = send(
        &keys_only,
        "POST",
        "/realtime/sessions",
        &as_user,
        Some(create(Some("user-a"))),
    )
    .await;
    assert_eq!(status, 401);
    keys_only.stop().await.unwrap();
    app.stop().await.unwrap();
}

#[test]
fn authenticator_is_safe_to_debug_print() {
    let s = coachd::Settings::for_tests(&[("XENIOS_BACKEND_API_KEY", KEY), ("SUPABASE_JWT_SECRET", SECRET)])
        .unwrap();
    let dump = format!("{:?}", Authenticator::from_settings(&s));
    assert!(!dump.contains(KEY) && !dump.contains(SECRET), "{dump}");
}
