//! The OpenAPI 3.1 document (every route is in it), `/docs` and `/chat` served from embedded
//! assets with no external URL, and the personas routes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Services, spawn_app_with};
use serde_json::Value;

#[tokio::test]
async fn openapi_document_is_3_1_and_lists_every_route() {
    let app = spawn_app_with(Services::Embedded, &[]).await;
    let resp = app.get("/openapi.json").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = resp.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let routes = [
        ("get", "/health"),
        ("get", "/health/live"),
        ("get", "/health/ready"),
        ("get", "/health/db"),
        ("get", "/health/redis"),
        ("get", "/health/llm"),
        ("get", "/health/all"),
        ("get", "/api/v1/status"),
        ("get", "/api/v1/llm/tasks"),
        ("post", "/api/v1/llm/complete"),
        ("post", "/api/v1/llm/stream"),
        ("post", "/api/v1/llm/classify-intent"),
        ("post", "/api/v1/llm/extract-entities"),
        ("post", "/v1/chat/completions"),
        ("get", "/v1/models"),
        ("get", "/v1/models/{id}"),
        ("get", "/ai/coach/personas"),
        ("get", "/ai/coach/personas/{id}"),
        ("post", "/api/v1/jobs"),
        ("get", "/api/v1/jobs"),
        ("get", "/api/v1/jobs/{id}"),
        ("get", "/api/v1/jobs/{id}/result"),
        ("post", "/api/v1/jobs/{id}/cancel"),
        ("get", "/api/v1/jobs/{id}/events"),
        ("get", "/api/v1/jobs/stats"),
        ("post", "/realtime/sessions"),
        ("post", "/realtime/sessions/{id}/disconnect"),
    ];
    for (method, path) in routes {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} missing");
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert_eq!(schemes["jwt"]["scheme"], "bearer");
    assert_eq!(schemes["session_token"]["name"], "X-Session-Token");
    let schemas = &doc["components"]["schemas"];
    for name in [
        "CompleteRequest",
        "ChatCompletionRequest",
        "ErrorBody",
        "Entity",
        "ComponentReport",
    ] {
        assert!(schemas[name].is_object(), "schema {name} missing");
    }
    let complete = &doc["paths"]["/api/v1/llm/complete"]["post"];
    assert!(complete["requestBody"].is_object());
    assert!(complete["responses"]["401"].is_object());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn docs_page_and_its_assets_are_served_locally() {
    let app = spawn_app_with(Services::Embedded, &[]).await;
    let resp = app.get("/docs").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = resp.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));

    // Every src/href of the page is a local asset that is served.
    let refs: Vec<&str> = ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| {
            html.split(attr)
                .skip(1)
                .map(|rest| rest.split('"').next().unwrap())
        })
        .collect();
    assert!(refs.len() >= 3, "{refs:?}");
    for r in refs {
        if r.starts_with("data:") {
            continue;
        }
        assert!(r.starts_with("/docs/"), "{r}");
        let asset = app.get(r).await;
        assert_eq!(asset.status(), 200, "{r}");
        let ty = asset.headers()["content-type"].to_str().unwrap().to_owned();
        let body = asset.text().await.unwrap();
        assert!(!body.is_empty(), "{r}");
        if r.ends_with(".js") {
            assert!(ty.starts_with("text/javascript"), "{r}: {ty}");
        } else {
            assert!(ty.starts_with("text/css"), "{r}: {ty}");
        }
        if r.ends_with("swagger-initializer.js") {
            assert!(body.contains("\"/openapi.json\"") && body.contains("validatorUrl: null"));
            assert!(!body.contains("http://") && !body.contains("https://"));
        }
        if r.ends_with("swagger-ui-bundle.js") {
            assert!(body.len() > 1_000_000 && body.contains("SwaggerUIBundle"));
        }
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_chat_page_and_its_modules_are_served_locally_and_can_be_switched_off() {
    let app = spawn_app_with(Services::Embedded, &[]).await;
    let resp = app.get("/chat").await;
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = resp.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<script>"), "no inline script: the CSP forbids it");

    // The page's assets, and every module they import, are served from /chat/.
    let mut pending: Vec<String> = ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| {
            html.split(attr)
                .skip(1)
                .map(|rest| rest.split('"').next().unwrap().to_owned())
        })
        .filter(|r| !r.starts_with("data:"))
        .collect();
    let mut seen = Vec::new();
    while let Some(r) = pending.pop() {
        if seen.contains(&r) {
            continue;
        }
        assert!(r.starts_with("/chat/"), "{r}");
        let asset = app.get(&r).await;
        assert_eq!(asset.status(), 200, "{r}");
        assert_eq!(asset.headers()["x-content-type-options"], "nosniff");
        let ty = asset.headers()["content-type"].to_str().unwrap().to_owned();
        let body = asset.text().await.unwrap();
        assert!(!body.contains("http://"), "{r} loads nothing from elsewhere");
        if r.ends_with(".js") {
            assert!(ty.starts_with("text/javascript"), "{r}: {ty}");
            for sink in [".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"] {
                assert!(
                    !body.contains(sink),
                    "{r}: no HTML is ever parsed from text ({sink})"
                );
            }
            for import in body.split("from \"./").skip(1) {
                pending.push(format!("/chat/{}", import.split('"').next().unwrap()));
            }
        } else {
            assert!(ty.starts_with("text/css"), "{r}: {ty}");
        }
        seen.push(r);
    }
    for module in [
        "/chat/app.js",
        "/chat/coachd-client.js",
        "/chat/markdown.js",
        "/chat/style.css",
    ] {
        assert!(seen.iter().any(|s| s == module), "{module} in {seen:?}");
    }
    app.stop().await.unwrap();

    let off = spawn_app_with(Services::Embedded, &[("COACHD_CHAT_UI", "false")]).await;
    for path in ["/chat", "/chat/app.js"] {
        let resp = off.get(path).await;
        assert_eq!(resp.status(), 404, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    off.stop().await.unwrap();
}

#[tokio::test]
async fn personas_are_listed_and_fetched_by_id_or_alias() {
    let app = spawn_app_with(Services::Embedded, &[]).await;
    let resp = app.get("/ai/coach/personas").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let list = body["personas"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|p| p["id"].as_str().unwrap()).collect();
    for id in [
        "general",
        "sales",
        "marketing",
        "operations",
        "finance",
        "leadership",
        "mindset",
    ] {
        assert!(ids.contains(&id), "{id}");
    }
    assert!(list[0].get("system_prompt").is_none(), "the list stays short");

    let sales: Value = app.get("/ai/coach/personas/sales").await.json().await.unwrap();
    assert_eq!(sales["domain"], "sales");
    assert!(sales["system_prompt"].as_str().unwrap().contains("sales"));
    let by_alias: Value = app.get("/ai/coach/personas/1").await.json().await.unwrap();
    assert_eq!(by_alias["id"], "sales");
    let missing = app.get("/ai/coach/personas/astrology").await;
    assert_eq!(missing.status(), 404);
    let e: Value = missing.json().await.unwrap();
    assert_eq!(e["error"]["code"], "not_found");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn personas_from_the_file_are_listed() {
    let path = std::env::temp_dir().join(format!("personas-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &path,
        "[[personas]]\nid = \"pricing\"\nname = \"Pia\"\ndomain = \"pricing\"\nsystem_prompt = \"You are Pia.\"\naliases = [\"42\"]\n",
    )
    .unwrap();
    let app = spawn_app_with(
        Services::Embedded,
        &[
            ("COACHD_PERSONAS_FILE", path.to_str().unwrap()),
            ("COACHD_API_KEYS", "k"),
        ],
    )
    .await;
    assert_eq!(
        app.get("/ai/coach/personas/42").await.status(),
        401,
        "keys configured"
    );
    let resp = app
        .client
        .get(app.url("/ai/coach/personas/42"))
        .header("x-api-key", "k")
        .send()
        .await
        .unwrap();
    let p: Value = resp.json().await.unwrap();
    assert_eq!(
        (p["id"].as_str(), p["name"].as_str()),
        (Some("pricing"), Some("Pia"))
    );
    app.stop().await.unwrap();
}
