//! The answer to a connection accepted past capacity (`crate::listener`): 503 with `Retry-After`
//! and `Connection: close` for HTTP, a WebSocket close 1013 for an upgrade (a browser's WebSocket
//! cannot read the status of a refused handshake, only a close code), so a client learns to come
//! back later or go to another node instead of hanging in the accept backlog.

use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::Error;
use crate::listener::Admission;
use crate::state::AppState;
use crate::transport::ws::close;

/// Passes requests of admitted connections on; answers the others with a refusal. A request
/// without [`Admission`] (a router driven without the counting listener, as in unit tests) passes.
pub async fn refuse_past_capacity(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let admitted = request
        .extensions()
        .get::<ConnectInfo<Admission>>()
        .is_none_or(|ConnectInfo(a)| a.admitted);
    if admitted {
        return next.run(request).await;
    }
    let retry_after_secs = state.settings.connections.retry_after.as_secs();
    let refusal = Error::OverCapacity { retry_after_secs };
    if !wants_websocket(&request) {
        return refusal.into_response();
    }
    let (mut parts, _body) = request.into_parts();
    let Ok(upgrade) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
        return refusal.into_response();
    };
    let send_timeout = state.settings.realtime.send_timeout;
    // Counted on the shutdown tracker like every upgraded connection; it lives one frame long.
    let tracked = state.tasks.token();
    upgrade.on_upgrade(move |mut socket| async move {
        let _tracked = tracked;
        let frame = CloseFrame {
            code: close::TRY_AGAIN_LATER,
            reason: format!("server at connection capacity; retry in {retry_after_secs} s").into(),
        };
        let _ = tokio::time::timeout(send_timeout, socket.send(Message::Close(Some(frame)))).await;
    })
}

/// A WebSocket handshake (`Upgrade: websocket`), told apart before extracting the upgrade.
fn wants_websocket(request: &Request) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}
