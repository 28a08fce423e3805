//! Coach routes of the reference service that are not memory or realtime: notes from a raw
//! transcript (`POST /ai/coach/notes`).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use axum::http::HeaderMap;
use axum::response::Response;

use super::realtime::{live, run_turn};
use super::validate::Id;
use super::{JsonBody, wants_sse};
use crate::auth::Caller;
use crate::coach::notes::{self, StoredNotes};
use crate::error::Error;
#[allow(unused_imports, reason = "named by the OpenAPI annotations")]
use crate::error::ErrorBody;
use crate::session::TurnMode;
use crate::session::event::TransportKind;
use crate::state::AppState;

/// The coach router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ai/coach/notes", post(create_notes))
        .route("/ai/coach/respond", post(respond))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NotesBody {
    user_id: Id,
    coach_id: Id,
    transcript: String,
    #[serde(default)]
    session_id: Option<String>,
}

#[utoipa::path(
    post, path = "/ai/coach/notes", tag = "coach",
    request_body = NotesBody,
    description = "Notes from a raw transcript. Body: {user_id, coach_id, transcript, session_id?}.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    responses(
        (status = 200, description = "The stored notes"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 502, description = "The model failed", body = ErrorBody),
    )
)]
async fn create_notes(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NotesBody>,
) -> Result<Json<StoredNotes>, Error> {
    caller.authorize_user(&body.user_id)?;
    let transcript = body.transcript.trim();
    if transcript.is_empty() {
        return Err(Error::bad_request("empty_text", "transcript must not be empty"));
    }
    let max = state.settings.max_transcript_chars;
    if transcript.chars().count() > max {
        return Err(Error::bad_request(
            "text_too_long",
            format!("transcript is longer than {max} characters"),
        ));
    }
    let persona = state.personas.resolve(&body.coach_id);
    let generated = notes::generate(&state.llm, &persona.name, transcript).await?;
    let stored = state
        .notes
        .save(
            body.session_id.as_deref(),
            &body.user_id,
            &body.coach_id,
            generated,
        )
        .await?;
    Ok(Json(stored))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RespondBody {
    user_id: Id,
    coach_id: Id,
    text: String,
    #[serde(default)]
    session_id: Option<String>,
}

/// `POST /ai/coach/respond`: one coach reply through the realtime pipeline (persona, memories,
/// context, write-behind). With `session_id` the turn runs in that live session; without, in a
/// one-turn session that ends after it (the user–coach context carries the conversation over).
/// JSON by default, the turn's events with `Accept: text/event-stream`.
#[utoipa::path(
    post, path = "/ai/coach/respond", tag = "coach",
    request_body = RespondBody,
    description = "One coach reply through the realtime pipeline (persona, memories, context, write-behind). Body: {user_id, coach_id, text, session_id?}. JSON, or SSE with Accept: text/event-stream.",
    security((), ("api_key" = []), ("api_key" = [], "bearer" = [])),
    responses(
        (status = 200, description = "The reply, or its event stream"),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 403, description = "A JWT user acting on another user's data", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
    )
)]
async fn respond(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RespondBody>,
) -> Result<Response, Error> {
    caller.authorize_user(&body.user_id)?;
    let sse = wants_sse(&headers);
    let (session, one_turn) = match &body.session_id {
        Some(id) => {
            let session = live(&state, &caller, id).await?;
            if *session.user_id != body.user_id || *session.coach_id != body.coach_id {
                return Err(Error::bad_request(
                    "session_mismatch",
                    "session_id belongs to another user or coach",
                ));
            }
            (session, false)
        }
        None => (
            state
                .sessions
                .open(&body.user_id, &body.coach_id, TransportKind::Http)
                .await?,
            true,
        ),
    };
    run_turn(&state, session, body.text, TurnMode::Queue, None, sse, one_turn).await
}

/// The OpenAPI description of these routes (merged in `routes::docs`).
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(create_notes, respond))]
pub struct CoachDoc;
