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
            "session_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Session-Token",
                "The token POST /realtime/sessions returned, on that session's own routes",
            ))),
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

/// A schema written as JSON (used where the derive cannot say it, such as the events of a
/// stream). The values are fixed at compile time; one that does not parse is a bug the docs test
/// catches, and shows as an empty schema rather than a panic.
pub(crate) fn schema_from_json(
    v: serde_json::Value,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    serde_json::from_value(v)
        .unwrap_or_else(|_| utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::default()))
}

/// The schema of one server-sent event: its `event` name and its `data`, JSON of `data` (an
/// OpenAPI 3.1 `schema` of an event stream describes one event, as schemathesis reads it).
pub(crate) fn sse_events(
    events: &[(&str, serde_json::Value)],
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    let one_of: Vec<serde_json::Value> = events
        .iter()
        .map(|(name, data)| {
            serde_json::json!({
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "id": {"type": "string"},
                    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
                },
            })
        })
        .collect();
    schema_from_json(serde_json::json!({ "oneOf": one_of }))
}

/// `{error: {code, message}}`, as the data of an `error` event.
pub(crate) fn error_data() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
    })
}

/// The answers every route can give whatever its own annotation lists, added to each operation
/// that lacks them: 400 where the request has a path, query or body the route parses (the
/// extractors refuse bad ones before the handler runs), 401 where a credential is asked for.
/// Listing them once here keeps the document true to what the server sends (schemathesis checks
/// every status it receives against the document).
fn add_common_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    for (path, item) in doc.paths.paths.iter_mut() {
        // The /v1 routes answer in OpenAI's error shape, every other route in coachd's.
        let body = if path.starts_with("/v1/") {
            "OpenAiErrorBody"
        } else {
            "ErrorBody"
        };
        let response = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(body)))
                            .build(),
                    )
                    .build(),
            )
        };
        let operations = [
            item.get.as_mut(),
            item.post.as_mut(),
            item.put.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for op in operations.into_iter().flatten() {
            let parses_input =
                op.request_body.is_some() || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let responses = &mut op.responses.responses;
            if parses_input && !responses.contains_key("400") {
                responses.insert(
                    "400".to_owned(),
                    response("Bad input: a path, query or body value the route refuses"),
                );
            }
            // A requirement with no scheme (`()`) makes credentials optional, yet a configured
            // key still makes a wrong one answer 401: any named scheme can.
            let asks_credentials = op.security.as_ref().is_some_and(|reqs| {
                reqs.iter().any(|r| {
                    serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|m| !m.is_empty()))
                })
            });
            if asks_credentials && !responses.contains_key("401") {
                responses.insert("401".to_owned(), response("Missing or invalid credentials"));
            }
        }
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
    // A new route module: derive a `*Doc` with `#[openapi(paths(..))]` in it, as above, merge it
    // here and add its tag to `ApiDoc`.
    add_common_responses(&mut doc);
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
