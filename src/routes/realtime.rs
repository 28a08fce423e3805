//! Realtime session routes: the reference service's HTTP turn routes (create, status, turn, end,
//! stats), the SSE routes (a turn streamed with `Accept: text/event-stream`, and the whole session
//! with replay from `Last-Event-ID`), the WebSocket route, cancel, and the operator's disconnect.
//! Handlers are thin: the session task and the transport drive loop do the work.
//!
//! Who may act on a session ([`SessionAccess`]): an API key (where keys are configured), an
//! end user's JWT for their own sessions (where JWTs are verified), or the session's token in
//! `X-Session-Token`. The last two are what a browser holds: it must never hold an API key.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::rate_limit::enforce;
use super::validate::Id;
use super::{JsonBody, QueryParams, wants_sse};
use crate::auth::{Caller, Policy, UserOrKey};
use crate::error::Error;
#[allow(unused_imports, reason = "named by the OpenAPI annotations")]
use crate::error::ErrorBody;
use crate::session::cluster::node::Found;
use crate::session::event::{SessionEvent, SessionStatus, TransportKind};
use crate::session::manager::Gauge;
use crate::session::{SessionHandle, TurnMode};
use crate::state::AppState;
use crate::transport::http::HttpTurn;
use crate::transport::sse::{self, SseOptions};
use crate::transport::ws::WsTransport;
use crate::transport::{DriveOptions, drive};

/// The realtime router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/realtime/sessions", post(create))
        .route("/realtime/sessions/{id}", get(status))
        .route("/realtime/sessions/{id}/turn", post(turn))
        .route("/realtime/sessions/{id}/cancel", post(cancel))
        .route("/realtime/sessions/{id}/end", post(end))
        .route("/realtime/sessions/{id}/disconnect", post(disconnect))
        .route("/realtime/sessions/{id}/events", get(events))
        .route("/realtime/sessions/{id}/ws", get(websocket))
        .route("/realtime/stats", get(stats))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Optional for a caller with a JWT: the token's user is taken.
    #[serde(default)]
    user_id: Option<Id>,
    coach_id: Id,
    #[serde(default)]
    transport: Option<String>,
}

#[utoipa::path(
    post, path = "/realtime/sessions", tag = "realtime",
    request_body = CreateBody,
    description = "Creates a session. Body: {user_id, coach_id (string or integer), transport: http|sse|websocket}. Returns session_id, a short-lived token for the SSE/WebSocket routes (and X-Session-Token on the session's routes), persona and endpoints. Where SUPABASE_JWT_SECRET is set, an end-user JWT (Authorization: Bearer) may replace the API key: the session is then the token's user's (user_id may be left out; another one answers 403).",
    security((), ("api_key" = []), ("api_key" = [], "jwt" = []), ("jwt" = [])),
    responses(
        (status = 201, description = "The session"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 429, description = "The user created RATE_LIMIT_REQUESTS sessions within RATE_LIMIT_TTL", body = ErrorBody),
        (status = 503, description = "At COACHD_MAX_SESSIONS", body = ErrorBody),
    )
)]
async fn create(
    State(state): State<AppState>,
    UserOrKey(caller): UserOrKey,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, Error> {
    let user_id = match (body.user_id, caller.user_id()) {
        (Some(id), _) => {
            caller.authorize_user(&id)?;
            id
        }
        // A JWT's `sub` is the user; it must fit the id rule like any other user id.
        (None, Some(sub)) => Id::parse(sub)
            .map_err(|e| Error::bad_request("invalid_field", format!("the JWT's sub as user_id {e}")))?,
        (None, None) => {
            return Err(Error::bad_request("invalid_field", "user_id is required"));
        }
    };
    let name = body.transport.as_deref().unwrap_or("http");
    let Some(transport) = TransportKind::parse(name) else {
        return Err(Error::bad_request(
            "invalid_field",
            format!("transport must be http, sse or websocket, not {name:?}"),
        ));
    };
    // Creation is counted per user like the other per-user routes: without it one user could
    // take every one of the node's COACHD_MAX_SESSIONS places in a burst.
    let rate = enforce(&state, &user_id, CREATE_ROUTE).await?;
    let session = state.sessions.open(&user_id, &body.coach_id, transport).await?;
    let (token, expires) = state.session_tokens.issue(&session.id, &session.user_id);
    let persona = state.personas.resolve(&body.coach_id);
    let id = &session.id;
    let body = json!({
        "session_id": id,
        "user_id": session.user_id,
        "coach_id": session.coach_id,
        "transport": transport,
        "status": SessionStatus::Active,
        "persona": {"id": persona.id, "name": persona.name, "domain": persona.domain},
        "token": token,
        "token_expires_at": expires,
        "endpoints": {
            "self": format!("/realtime/sessions/{id}"),
            "turn": format!("/realtime/sessions/{id}/turn"),
            "cancel": format!("/realtime/sessions/{id}/cancel"),
            "end": format!("/realtime/sessions/{id}/end"),
            "events": format!("/realtime/sessions/{id}/events?token={token}"),
            "websocket": format!("/realtime/sessions/{id}/ws?token={token}"),
        },
    });
    Ok((StatusCode::CREATED, rate, Json(body)).into_response())
}

/// The rate limiter's endpoint name of session creation.
const CREATE_ROUTE: &str = "/realtime/sessions";

/// Who acts on one session: the session's token (`X-Session-Token`, checked against the session
/// once it is found), else the caller by [`Policy::KeyOrUser`].
#[derive(Debug, Clone)]
pub(crate) enum SessionAccess {
    /// An API key, a JWT user, or nobody where no key is configured.
    Caller(Caller),
    /// The token issued with the session.
    Token(String),
}

impl FromRequestParts<AppState> for SessionAccess {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(SESSION_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            Some(token) => Ok(SessionAccess::Token(token.to_owned())),
            None => state
                .auth
                .authenticate_headers(&parts.headers, Policy::KeyOrUser)
                .map(SessionAccess::Caller),
        }
    }
}

/// The header that carries a session token on the session's routes.
const SESSION_TOKEN_HEADER: &str = "x-session-token";

impl SessionAccess {
    /// Allows acting on session `session_id` of `user_id`: a token only of that session (401
    /// otherwise, like any refused credential), a caller by [`Caller::authorize_user`].
    fn authorize(&self, state: &AppState, session_id: &str, user_id: &str) -> Result<(), Error> {
        match self {
            SessionAccess::Caller(caller) => caller.authorize_user(user_id),
            SessionAccess::Token(token) => {
                state
                    .session_tokens
                    .verify(token, session_id, user_id)
                    .map_err(|e| {
                        tracing::debug!(session_id, reason = ?e, "session token refused");
                        Error::Unauthorized
                    })
            }
        }
    }
}

/// A live session `access` may act on; a known but ended one answers 410 only to whoever may
/// see it.
async fn live_for(state: &AppState, access: &SessionAccess, id: &str) -> Result<SessionHandle, Error> {
    match state.sessions.find(id).await? {
        Found::Live(session) => {
            access.authorize(state, &session.id, &session.user_id)?;
            Ok(session)
        }
        Found::Ended(ended) => {
            access.authorize(state, &ended.session_id, &ended.user_id)?;
            Err(Error::SessionEnded)
        }
        Found::Missing => Err(Error::NotFound("session".to_owned())),
    }
}

/// A live session the caller may act on (a JWT user only on their own: 403 otherwise).
/// With a cluster the session may live on another node (its handle is then this node's relay).
pub(crate) async fn live(state: &AppState, caller: &Caller, id: &str) -> Result<SessionHandle, Error> {
    match state.sessions.find(id).await? {
        Found::Live(session) => {
            caller.authorize_user(&session.user_id)?;
            Ok(session)
        }
        Found::Ended(ended) => {
            caller.authorize_user(&ended.user_id)?;
            Err(Error::SessionEnded)
        }
        Found::Missing => Err(Error::NotFound("session".to_owned())),
    }
}

#[utoipa::path(
    get, path = "/realtime/sessions/{id}", tag = "realtime",
    description = "State of a live session, or the record of a recently ended one.",
    security((), ("api_key" = []), ("api_key" = [], "jwt" = []), ("jwt" = []), ("session_token" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "Session state"),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn status(
    State(state): State<AppState>,
    access: SessionAccess,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    match state.sessions.find(&id).await? {
        Found::Live(session) => {
            access.authorize(&state, &session.id, &session.user_id)?;
            Ok(Json(session.info().await?).into_response())
        }
        Found::Ended(ended) => {
            access.authorize(&state, &ended.session_id, &ended.user_id)?;
            Ok(Json(ended).into_response())
        }
        Found::Missing => Err(Error::NotFound("session".to_owned())),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TurnBody {
    text: String,
    #[serde(default)]
    mode: TurnMode,
    #[serde(default)]
    client_id: Option<String>,
}

/// An SSE response pulled from the subscription (counted in `sse_connections` while the body
/// lives); with `until_turn_end`, the stream ends after that turn's `turn_end`.
fn attach_sse(
    state: &AppState,
    session: SessionHandle,
    sub: crate::session::log::Subscription,
    until_turn_end: Option<u32>,
) -> Response {
    let gauge = Gauge::enter(state.sessions.stats(), |s| &s.sse_connections);
    let opts = SseOptions {
        heartbeat: state.settings.realtime.sse_heartbeat,
        shutdown: state.shutdown.clone(),
        stats: state.sessions.stats().clone(),
        until_turn_end,
    };
    sse::response(session, sub, opts, gauge)
}

fn drive_options(state: &AppState, heartbeat: std::time::Duration) -> DriveOptions {
    DriveOptions {
        heartbeat,
        max_bad_frames: state.settings.realtime.ws_max_bad_frames,
        shutdown: state.shutdown.clone(),
        stats: state.sessions.stats().clone(),
    }
}

#[utoipa::path(
    post, path = "/realtime/sessions/{id}/turn", tag = "realtime",
    request_body = TurnBody,
    description = "Sends a turn. Body: {text, mode?: queue|interrupt, client_id?}. JSON {reply_text, turn_number, actions, usage, finish_reason, interrupted}; with Accept: text/event-stream the turn's events (proto/server.schema.json).",
    security((), ("api_key" = []), ("api_key" = [], "jwt" = []), ("jwt" = []), ("session_token" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The reply, or its event stream"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
        (status = 429, description = "Too many messages queued", body = ErrorBody),
        (status = 502, description = "Every model failed before any text", body = ErrorBody),
        (status = 504, description = "The model timed out before any text", body = ErrorBody),
    )
)]
async fn turn(
    State(state): State<AppState>,
    access: SessionAccess,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TurnBody>,
) -> Result<Response, Error> {
    let session = live_for(&state, &access, &id).await?;
    run_turn(
        &state,
        session,
        body.text,
        body.mode,
        body.client_id,
        wants_sse(&headers),
        false,
    )
    .await
}

/// Runs one turn in a session: a JSON answer once its `turn_end` arrives, or (with `sse`) its
/// events as they happen. With `end_after`, the session ends itself once the turn is over (even
/// if the client has left): the one-turn sessions of `POST /ai/coach/respond`.
pub(crate) async fn run_turn(
    state: &AppState,
    session: SessionHandle,
    text: String,
    mode: TurnMode,
    client_id: Option<String>,
    sse: bool,
    end_after: bool,
) -> Result<Response, Error> {
    let rt = &state.settings.realtime;
    let id = session.id.to_string();
    // Subscribe before sending the message, so none of the turn's events can slip past.
    let sub = session.subscribe_request(None);
    let accepted = session.user_message(text, mode, client_id).await;
    if end_after {
        session.end_when_idle().await?;
    }
    let number = accepted?;

    if sse {
        return Ok(attach_sse(state, session, sub, Some(number)));
    }

    let mut collector = HttpTurn::new(number);
    // The client may go away; the turn still completes in its session and is stored.
    drive(
        session,
        sub,
        &mut collector,
        drive_options(state, rt.sse_heartbeat),
    )
    .await;
    Ok(Json(collector.into_reply(&id)?).into_response())
}

#[utoipa::path(
    post, path = "/realtime/sessions/{id}/cancel", tag = "realtime",
    description = "Cancels the reply streaming now; the upstream request is aborted and the partial turn stored as interrupted.",
    security((), ("api_key" = []), ("api_key" = [], "jwt" = []), ("jwt" = []), ("session_token" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "{session_id, cancelled}"),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    access: SessionAccess,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let session = live_for(&state, &access, &id).await?;
    let cancelled = session.cancel().await?;
    Ok(Json(json!({ "session_id": id, "cancelled": cancelled })))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EndBody {
    #[serde(default)]
    generate_notes: bool,
}

#[utoipa::path(
    post, path = "/realtime/sessions/{id}/end", tag = "realtime",
    description = "Ends a session. Body: {generate_notes?}. Notes (summary, key_points, action_items) are generated on task session_summary and stored.",
    security((), ("api_key" = []), ("api_key" = [], "jwt" = []), ("jwt" = []), ("session_token" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "{session_id, status, turn_count, notes, notes_id, notes_error}"),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn end(
    State(state): State<AppState>,
    access: SessionAccess,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json<Value>, Error> {
    // The body is optional: a request without a Content-Type has none, any other is read as
    // JSON with the crate's rejections.
    let body = if request.headers().contains_key(axum::http::header::CONTENT_TYPE) {
        JsonBody::<EndBody>::from_request(request, &state).await?.0
    } else {
        EndBody::default()
    };
    let session = live_for(&state, &access, &id).await?;
    let generate_notes = body.generate_notes;
    let outcome = session.end(generate_notes).await?;
    state.sessions.note_ended();
    Ok(Json(json!({
        "session_id": outcome.session_id,
        "status": SessionStatus::Ended,
        "turn_count": outcome.turn_count,
        "notes": outcome.notes,
        "notes_id": outcome.notes_id,
        "notes_error": outcome.notes_error,
    })))
}

// Unknown parameters are refused (400 `invalid_query`), as on every other route: a misspelt
// `after_seq` must not silently replay the whole log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachQuery {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    after_seq: Option<u64>,
}

/// Checks the session token of an SSE or WebSocket attach (query `token` or `X-Session-Token`).
fn authorize_attach(
    state: &AppState,
    session: &SessionHandle,
    query: &AttachQuery,
    headers: &HeaderMap,
) -> Result<(), Error> {
    let token = query
        .token
        .as_deref()
        .or_else(|| headers.get("x-session-token").and_then(|v| v.to_str().ok()))
        .ok_or(Error::Unauthorized)?;
    state
        .session_tokens
        .verify(token, &session.id, &session.user_id)
        .map_err(|e| {
            tracing::debug!(session_id = %session.id, reason = ?e, "session token refused");
            Error::Unauthorized
        })
}

fn after_seq(query: &AttachQuery, headers: &HeaderMap) -> Result<Option<u64>, Error> {
    if let Some(v) = headers.get("last-event-id") {
        let v = v.to_str().ok().and_then(|s| s.trim().parse().ok());
        return v.map(Some).ok_or_else(|| {
            Error::bad_request("invalid_last_event_id", "Last-Event-ID must be an event seq")
        });
    }
    Ok(query.after_seq)
}

#[utoipa::path(
    get, path = "/realtime/sessions/{id}/events", tag = "realtime",
    description = "SSE of every session event; id: is the seq; Last-Event-ID or ?after_seq= replays what was missed. Needs ?token= (or X-Session-Token).",
    security(()),
    params(("id" = String, Path, description = "Session id"), ("token" = String, Query, description = "Session token"), ("after_seq" = Option<u64>, Query, description = "Replay after this seq")),
    responses(
        (status = 200, description = "text/event-stream"),
        (status = 401, description = "Missing or invalid session token", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<AttachQuery>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    // The session token is the credential here: browsers cannot send headers on these routes.
    let session = live(&state, &Caller::Anonymous, &id).await?;
    authorize_attach(&state, &session, &query, &headers)?;
    // Without a position the whole retained log is replayed: a new follower sees the session so far.
    let sub = session.subscribe(Some(after_seq(&query, &headers)?.unwrap_or(0)));
    Ok(attach_sse(&state, session, sub, None))
}

#[utoipa::path(
    get, path = "/realtime/sessions/{id}/ws", tag = "realtime",
    description = "WebSocket of the session: frames of proto/client.schema.json in, proto/server.schema.json out; close codes in proto/README.md. Needs ?token=.",
    security(()),
    params(("id" = String, Path, description = "Session id"), ("token" = String, Query, description = "Session token"), ("after_seq" = Option<u64>, Query, description = "Replay after this seq")),
    responses(
        (status = 101, description = "Switching protocols"),
        (status = 401, description = "Missing or invalid session token", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn websocket(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<AttachQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    // axum's own rejection is plain text; a client that did not ask to upgrade gets the JSON error.
    let upgrade = upgrade.map_err(|e| Error::bad_request("websocket_upgrade_required", e.body_text()))?;
    // The session token is the credential here: browsers cannot send headers on these routes.
    let session = live(&state, &Caller::Anonymous, &id).await?;
    authorize_attach(&state, &session, &query, &headers)?;
    let rt = &state.settings.realtime;
    let after = after_seq(&query, &headers)?;
    let opts = drive_options(&state, rt.ws_ping);
    // Only what the connection needs moves into its task, which lives as long as the socket.
    let (send_timeout, pong_timeout) = (rt.send_timeout, rt.ws_pong_timeout);
    let stats = state.sessions.stats().clone();
    // axum runs the upgraded connection on a task of its own; this token counts it on the
    // shutdown tracker from the upgrade on, so shutdown waits until it has delivered the
    // session's last events and closed with 1001.
    let tracked = state.tasks.token();
    let response = upgrade
        .max_message_size(rt.ws_max_message_bytes)
        .max_frame_size(rt.ws_max_message_bytes)
        // tungstenite's defaults (128 KiB read buffer, 128 KiB write batching) would dominate the
        // memory of an idle connection and hold tokens back; frames here are small and urgent.
        .read_buffer_size(rt.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let _tracked = tracked;
            let _gauge = Gauge::enter(&stats, |s| &s.ws_connections);
            let mut transport = WsTransport::new(socket, send_timeout, pong_timeout);
            // The first event of a connection is the session's state, then the replay (if asked).
            let sub = session.subscribe(after);
            if let Ok(info) = session.info().await {
                let body = crate::session::EventBody::Session(Box::new(SessionEvent {
                    user_id: info.user_id,
                    coach_id: info.coach_id,
                    persona: info.persona,
                    status: info.status,
                    turn_count: info.turn_count,
                    created_at: info.created_at.to_rfc3339(),
                }));
                let event = crate::session::event::Published::new(&session.id, sub.last_seq, body);
                if crate::transport::Transport::send(&mut transport, &event)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            drive(session, sub, &mut transport, opts).await;
        });
    Ok(response)
}

#[utoipa::path(
    post, path = "/realtime/sessions/{id}/disconnect", tag = "realtime",
    description = "Drops this node's WebSocket and SSE connections of a session (WebSocket close 4004, an SSE `disconnected` error event); the session and a reply in flight go on, and clients reconnect and resume with after_seq. For operators and backends: 403 with a JWT; a session token does not count.",
    security((), ("api_key" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "{session_id, disconnected}: how many connections were dropped"),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "An end user's JWT", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session has ended", body = ErrorBody),
    )
)]
async fn disconnect(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    // Cutting every client of a session is an operator's tool, not an end user's.
    if caller.user_id().is_some() {
        return Err(Error::Forbidden);
    }
    let session = live(&state, &caller, &id).await?;
    let disconnected = session.disconnect_clients();
    tracing::info!(session_id = %session.id, disconnected, "session's connections dropped on request");
    Ok(Json(json!({ "session_id": id, "disconnected": disconnected })))
}

#[utoipa::path(
    get, path = "/realtime/stats", tag = "realtime",
    description = "Session, connection and write-behind counters, and the tasks alive on the runtime. Not for end users (403 with a JWT).",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    responses(
        (status = 200, description = "Statistics"),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
    )
)]
async fn stats(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, Error> {
    // Server-wide figures are for operators and backends, not for one end user.
    if caller.user_id().is_some() {
        return Err(Error::Forbidden);
    }
    let wb = &state.write_behind;
    let runtime = tokio::runtime::Handle::current().metrics();
    let cluster = match state.sessions.cluster() {
        None => Value::Null,
        Some(cluster) => {
            let nodes = match cluster.nodes().await {
                Ok(nodes) => json!(nodes),
                Err(e) => json!({ "error": Error::from(e).body().error }),
            };
            json!({
                "node_id": cluster.node_id(),
                "nodes": nodes,
                "relayed_sessions": state.sessions.relay_count(),
                "counters": cluster.stats(),
            })
        }
    };
    Ok(Json(json!({
        "node_id": state.settings.cluster.node_id,
        "cluster": cluster,
        "active_sessions": state.sessions.live_count(),
        "max_sessions": state.settings.realtime.sessions.max_sessions,
        "sessions": state.sessions.stats(),
        // Tasks alive on the runtime: what a soak watches for leaks (sessions, connections,
        // write-behind and upkeep all run as tasks).
        "runtime": {
            "alive_tasks": runtime.num_alive_tasks(),
            "workers": runtime.num_workers(),
        },
        "write_behind": {
            "queue_depth": wb.depth(),
            "queue_capacity": wb.capacity(),
            "counters": wb.stats(),
        },
    })))
}

/// The OpenAPI description of these routes (merged in `routes::docs`).
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(create, status, turn, cancel, end, disconnect, events, websocket, stats))]
pub struct RealtimeDoc;
