//! The browser chat client at `/chat` (`assets/chat/`): a page and three ES modules, embedded in
//! the binary and served with a Content-Security-Policy that allows nothing but this origin, so
//! it works with no internet access and model text can never load or run anything. On unless
//! `COACHD_CHAT_UI=false` (then the routes do not exist). `coachd-client.js` is the protocol
//! client other front ends can copy; `app.js` is the page.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// The chat router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/chat", get(page))
        .route("/chat/", get(page))
        .route("/chat/app.js", get(|| script(APP_JS)))
        .route("/chat/coachd-client.js", get(|| script(CLIENT_JS)))
        .route("/chat/markdown.js", get(|| script(MARKDOWN_JS)))
        .route("/chat/style.css", get(css))
}

const PAGE: &str = include_str!("../../assets/chat/index.html");
const APP_JS: &str = include_str!("../../assets/chat/app.js");
const CLIENT_JS: &str = include_str!("../../assets/chat/coachd-client.js");
const MARKDOWN_JS: &str = include_str!("../../assets/chat/markdown.js");
const CSS: &str = include_str!("../../assets/chat/style.css");

/// This origin only: scripts, styles, fetches, the WebSocket and the event stream (`'self'`
/// covers `ws:`/`wss:` of the same host in CSP Level 3); no inline script, no plugin, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The modules change with the binary only; a short cache keeps a redeploy visible soon.
const ASSET_CACHE: &str = "public, max-age=300";

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        CSS,
    )
        .into_response()
}
