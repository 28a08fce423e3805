//! Realtime session routes: the reference service's HTTP turn routes (create, status, turn, end,
//! stats), the SSE routes (a turn streamed with `Accept: text/event-stream`, and the whole session
//! with replay from `Last-Event-ID`), the WebSocket route, and cancel. Handlers are thin: the
//! session task and the transport drive loop do the work.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::error::{Error, from_json_rejection};
use crate::session::manager::Gauge;
use crate::session::{SessionHandle, TurnMode};
use crate::state::AppState;
use crate::transport::http::HttpTurn;
use crate::transport::sse::SseTransport;
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
        .route("/realtime/sessions/{id}/events", get(events))
        .route("/realtime/sessions/{id}/ws", get(websocket))
        .route("/realtime/stats", get(stats))
}

/// Longest user or coach id accepted.
pub const MAX_ID_CHARS: usize = 128;

/// Accepts an id as a JSON string or integer (the reference services use both).
pub fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err(serde::de::Error::custom("expected a string or an integer id")),
    }
}

/// Checks an id's shape.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    if id.trim().is_empty() || id.chars().count() > MAX_ID_CHARS || id.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "invalid_field",
            format!("{field} must be 1 to {MAX_ID_CHARS} printable characters"),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(deserialize_with = "id_string")]
    user_id: String,
    #[serde(deserialize_with = "id_string")]
    coach_id: String,
    #[serde(default)]
    transport: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Error> {
    let Json(body) = body.map_err(from_json_rejection)?;
    check_id("user_id", &body.user_id)?;
    check_id("coach_id", &body.coach_id)?;
    let transport = match body.transport.as_deref().unwrap_or("http") {
        "http" => "http",
        "sse" => "sse",
        "websocket" | "ws" => "websocket",
        other => {
            return Err(Error::bad_request(
                "invalid_field",
                format!("transport must be http, sse or websocket, not {other:?}"),
            ));
        }
    };
    let session = state.sessions.create(&body.user_id, &body.coach_id, transport)?;
    let (token, expires) = state.session_tokens.issue(&session.id, &session.user_id);
    let persona = state.personas.resolve(&body.coach_id);
    let id = &session.id;
    let body = json!({
        "session_id": id,
        "user_id": session.user_id,
        "coach_id": session.coach_id,
        "transport": transport,
        "status": "active",
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
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn live(state: &AppState, id: &str) -> Result<SessionHandle, Error> {
    state.sessions.get(id).ok_or_else(|| {
        if state.sessions.ended(id).is_some() {
            Error::SessionEnded
        } else {
            Error::NotFound("session".to_owned())
        }
    })
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, Error> {
    if let Some(session) = state.sessions.get(&id) {
        return Ok(Json(session.info().await?).into_response());
    }
    match state.sessions.ended(&id) {
        Some(ended) => Ok(Json(ended).into_response()),
        None => Err(Error::NotFound("session".to_owned())),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TurnBody {
    text: String,
    #[serde(default)]
    mode: TurnMode,
    #[serde(default)]
    client_id: Option<String>,
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

fn drive_options(state: &AppState, heartbeat: std::time::Duration) -> DriveOptions {
    DriveOptions {
        heartbeat,
        max_bad_frames: state.settings.realtime.ws_max_bad_frames,
        shutdown: state.shutdown.clone(),
        stats: state.sessions.stats().clone(),
    }
}

async fn turn(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<TurnBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Error> {
    let Json(body) = body.map_err(from_json_rejection)?;
    let session = live(&state, &id)?;
    let rt = &state.settings.realtime;
    // Subscribe before sending the message, so none of the turn's events can slip past.
    let sub = session.subscribe(None);
    let number = session.user_message(body.text, body.mode, body.client_id).await?;

    if wants_sse(&headers) {
        let (mut transport, response) = SseTransport::new(rt.client_queue, rt.send_timeout, Some(number));
        let gauge = Gauge::enter(state.sessions.stats(), |s| &s.sse_connections);
        let opts = drive_options(&state, rt.sse_heartbeat);
        state.tasks.spawn(async move {
            let _gauge = gauge;
            drive(session, sub, &mut transport, opts).await;
        });
        return Ok(response);
    }

    let mut collector = HttpTurn::new(number);
    // The client may go away; the turn still completes in its session and is stored.
    drive(
        session,
        sub,
        &mut collector,
        drive_options(&state, rt.sse_heartbeat),
    )
    .await;
    let Some(end) = collector.turn_end else {
        return Err(Error::Unavailable(
            "the session ended before the turn finished".to_owned(),
        ));
    };
    let reply = end["reply_text"].as_str().unwrap_or_default();
    if let (Some(err), true) = (&collector.error, reply.is_empty()) {
        let code = err["code"].as_str().unwrap_or("upstream_error").to_owned();
        let message = err["message"].as_str().unwrap_or("the turn failed").to_owned();
        return Err(Error::TurnFailed {
            code,
            message,
            retryable: err["retryable"].as_bool().unwrap_or(false),
        });
    }
    let mut out = json!({
        "session_id": id,
        "turn_number": number,
        "reply_text": end["reply_text"],
        "actions": end["actions"],
        "usage": end["usage"],
        "finish_reason": end["finish_reason"],
        "interrupted": end["interrupted"],
        "provider": end["provider"],
        "model": end["model"],
    });
    if let Some(err) = collector.error {
        out["error"] = json!({"code": err["code"], "message": err["message"]});
    }
    Ok(Json(out).into_response())
}

async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Error> {
    let session = live(&state, &id)?;
    let cancelled = session.cancel().await?;
    Ok(Json(json!({ "session_id": id, "cancelled": cancelled })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndBody {
    #[serde(default)]
    generate_notes: bool,
}

async fn end(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<EndBody>>,
) -> Result<Json<Value>, Error> {
    let session = live(&state, &id)?;
    let generate_notes = body.map(|Json(b)| b.generate_notes).unwrap_or(false);
    let outcome = session.end(generate_notes).await?;
    state.sessions.note_ended();
    Ok(Json(json!({
        "session_id": outcome.session_id,
        "status": "ended",
        "turn_count": outcome.turn_count,
        "notes": outcome.notes,
        "notes_id": outcome.notes_id,
        "notes_error": outcome.notes_error,
    })))
}

#[derive(Debug, Deserialize)]
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

async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<AttachQuery>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let session = live(&state, &id)?;
    authorize_attach(&state, &session, &query, &headers)?;
    // Without a position the whole retained log is replayed: a new follower sees the session so far.
    let sub = session.subscribe(Some(after_seq(&query, &headers)?.unwrap_or(0)));
    let rt = &state.settings.realtime;
    let (mut transport, response) = SseTransport::new(rt.client_queue, rt.send_timeout, None);
    let gauge = Gauge::enter(state.sessions.stats(), |s| &s.sse_connections);
    let opts = drive_options(&state, rt.sse_heartbeat);
    state.tasks.spawn(async move {
        let _gauge = gauge;
        drive(session, sub, &mut transport, opts).await;
    });
    Ok(response)
}

async fn websocket(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<AttachQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Error> {
    let session = live(&state, &id)?;
    authorize_attach(&state, &session, &query, &headers)?;
    let rt = state.settings.realtime.clone();
    let after = after_seq(&query, &headers)?;
    let opts = drive_options(&state, rt.ws_ping);
    let stats = state.sessions.stats().clone();
    let response = upgrade
        .max_message_size(rt.ws_max_message_bytes)
        .max_frame_size(rt.ws_max_message_bytes)
        .on_upgrade(move |socket| async move {
            let _gauge = Gauge::enter(&stats, |s| &s.ws_connections);
            let mut transport = WsTransport::new(socket, rt.send_timeout, rt.ws_pong_timeout);
            // The first event of a connection is the session's state, then the replay (if asked).
            let sub = session.subscribe(after);
            if let Ok(info) = session.info().await {
                let body = crate::session::EventBody::Session {
                    user_id: info.user_id,
                    coach_id: info.coach_id,
                    persona: info.persona,
                    status: info.status,
                    turn_count: info.turn_count,
                    created_at: info.created_at.to_rfc3339(),
                };
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

async fn stats(State(state): State<AppState>) -> Json<Value> {
    let wb = &state.write_behind;
    Json(json!({
        "active_sessions": state.sessions.live_count(),
        "max_sessions": state.settings.realtime.max_sessions,
        "sessions": state.sessions.stats(),
        "write_behind": {
            "queue_depth": wb.depth(),
            "queue_capacity": wb.capacity(),
            "counters": wb.stats(),
        },
    }))
}
