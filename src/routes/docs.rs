//! The API description: an OpenAPI 3.1 document generated from the handlers' `#[utoipa::path]`
//! annotations at `/openapi.json`, and Swagger UI at `/docs`, served from assets vendored in
//! `assets/swagger-ui/` (no CDN: it works with no internet access, and its Content-Security-Policy
//! forbids loading anything from elsewhere).

use std::sync::LazyLock;

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{api_v1, health, openai_compat, personas};
use crate::state::AppState;

/// The docs router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(page))
        .route("/docs/swagger-ui.css", get(css))
        .route("/docs/swagger-ui-bundle.js", get(bundle))
        .route("/docs/swagger-initializer.js", get(initializer))
}

/// The document's frame: info, tags and security schemes; the paths come from each route module.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "coachd",
        description = "Streaming-first realtime server for AI coaching conversations. Errors are \
            `{\"error\":{\"code\",\"message\"}}`, except on the OpenAI-compatible `/v1` routes, which \
            use OpenAI's error shape.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "health", description = "Liveness, readiness and dependency checks"),
        (name = "api_v1", description = "The reference AI backend's v1 API"),
        (name = "openai", description = "OpenAI-compatible chat completions"),
        (name = "coach", description = "Coach personas, replies and notes"),
        (name = "realtime", description = "Realtime sessions over HTTP turns, SSE and WebSocket"),
        (name = "memory", description = "Long-term coach memory"),
        (name = "jobs", description = "Async jobs: transcription, extraction, analysis"),
        (name = "metrics", description = "Prometheus metrics"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "XENIOS_BACKEND_API_KEY or one of COACHD_API_KEYS",
            ))),
        );
        components.add_security_scheme(
            "jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "End-user Supabase JWT (HS256), checked when SUPABASE_JWT_SECRET is set",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("COACHD_METRICS_TOKEN (/metrics only, when set)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "bearer_api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key as OpenAI clients send it (/v1 routes only)"))
                    .build(),
            ),
        );
    }
}

/// The whole document: the frame plus every route module's part.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(health::HealthDoc::openapi());
    doc.merge(api_v1::ApiV1Doc::openapi());
    doc.merge(openai_compat::OpenAiCompatDoc::openapi());
    doc.merge(personas::PersonasDoc::openapi());
    doc.merge(super::realtime::RealtimeDoc::openapi());
    doc.merge(super::coach::CoachDoc::openapi());
    doc.merge(super::memory::MemoryDoc::openapi());
    doc.merge(super::jobs::JobsDoc::openapi());
    doc.merge(super::prometheus::MetricsDoc::openapi());
    // Realtime, coach (respond, notes) and memory routes: derive a `*Doc` with `#[openapi(paths(..))]`
    // in their module, as above, and merge it here; add its tag to `ApiDoc` too.
    doc
}

/// The document is the same for the life of the process: serialise it once.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(|| {
    openapi()
        .to_json()
        .unwrap_or_else(|e| format!(r#"{{"error":{{"code":"internal","message":"{e}"}}}}"#))
});

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON.as_str(),
    )
        .into_response()
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>coachd API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-initializer.js"></script>
</body>
</html>
"#;

// `validatorUrl: null`: Swagger UI would otherwise send the document to an online validator.
const INITIALIZER: &str = r##"window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"##;

/// Only this origin, whatever the page or the bundle might try (Swagger UI sets inline styles).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; frame-ancestors 'none'";

static BUNDLE_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
static CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");

/// Assets are versioned with the binary: caching them for a day is safe enough.
const ASSET_CACHE: &str = "public, max-age=86400";

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        PAGE,
    )
        .into_response()
}

async fn initializer() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        INITIALIZER,
    )
        .into_response()
}

async fn bundle() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        BUNDLE_JS,
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        CSS,
    )
        .into_response()
}
