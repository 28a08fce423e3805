//! Coach routes of the reference service that are not memory or realtime: notes from a raw
//! transcript (`POST /ai/coach/notes`).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::realtime::{check_id, id_string};
use crate::coach::notes::{self, StoredNotes};
use crate::error::{Error, from_json_rejection};
use crate::state::AppState;

/// The coach router.
pub fn router() -> Router<AppState> {
    Router::new().route("/ai/coach/notes", post(create_notes))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotesBody {
    #[serde(deserialize_with = "id_string")]
    user_id: String,
    #[serde(deserialize_with = "id_string")]
    coach_id: String,
    transcript: String,
    #[serde(default)]
    session_id: Option<String>,
}

async fn create_notes(
    State(state): State<AppState>,
    body: Result<Json<NotesBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<StoredNotes>, Error> {
    let Json(body) = body.map_err(from_json_rejection)?;
    check_id("user_id", &body.user_id)?;
    check_id("coach_id", &body.coach_id)?;
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
