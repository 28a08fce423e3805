//! The coach personas: the list (built-ins plus `COACHD_PERSONAS_FILE`) and one persona by id or
//! alias. The list also takes an end user's JWT instead of the key ([`UserOrKey`]): a browser
//! client picks its coach from it. One persona (with its system prompt) needs the key, as every
//! coach route.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Caller, UserOrKey};
use crate::coach::Persona;
use crate::error::{Error, ErrorBody};
use crate::state::AppState;

/// The personas router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ai/coach/personas", get(list))
        .route("/ai/coach/personas/{id}", get(one))
}

/// The OpenAPI description of these routes.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(list, one),
    components(schemas(PersonaList, PersonaSummary, PersonaDetail))
)]
pub struct PersonasDoc;

/// A persona in the list (its system prompt is in the single-persona route).
#[derive(Debug, Serialize, ToSchema)]
pub struct PersonaSummary {
    /// Stable id, matched against `coach_id`.
    #[schema(example = "sales")]
    pub id: String,
    /// Display name.
    pub name: String,
    /// Business domain.
    pub domain: String,
    /// Other ids that select it (the reference service used integers).
    pub aliases: Vec<String>,
}

/// `GET /ai/coach/personas`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PersonaList {
    /// Every persona, by id.
    pub personas: Vec<PersonaSummary>,
}

/// One persona, with its system prompt.
#[derive(Debug, Serialize, ToSchema)]
pub struct PersonaDetail {
    /// Stable id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Business domain.
    pub domain: String,
    /// Other ids that select it.
    pub aliases: Vec<String>,
    /// The system prompt that makes the model this coach.
    pub system_prompt: String,
}

impl From<&Persona> for PersonaSummary {
    fn from(p: &Persona) -> Self {
        PersonaSummary {
            id: p.id.clone(),
            name: p.name.clone(),
            domain: p.domain.clone(),
            aliases: p.aliases.clone(),
        }
    }
}

/// Every coach persona.
#[utoipa::path(
    get, path = "/ai/coach/personas", tag = "coach",
    security((), ("api_key" = []), ("jwt" = [])),
    responses(
        (status = 200, description = "Every persona", body = PersonaList),
        (status = 401, description = "API keys are configured and neither a valid key nor (where JWTs are verified) a valid JWT was sent", body = ErrorBody),
    )
)]
async fn list(State(state): State<AppState>, _caller: UserOrKey) -> Json<PersonaList> {
    Json(PersonaList {
        personas: state.personas.all().map(Into::into).collect(),
    })
}

/// One coach persona, by id or alias.
#[utoipa::path(
    get, path = "/ai/coach/personas/{id}", tag = "coach",
    security((), ("api_key" = [])),
    params(("id" = String, Path, description = "Persona id or alias", example = "sales")),
    responses(
        (status = 200, description = "The persona", body = PersonaDetail),
        (status = 401, description = "API keys are configured and none valid was sent", body = ErrorBody),
        (status = 404, description = "No persona has this id or alias", body = ErrorBody),
    )
)]
async fn one(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PersonaDetail>, Error> {
    let p = state
        .personas
        .get(&id)
        .ok_or_else(|| Error::NotFound("persona".to_owned()))?;
    Ok(Json(PersonaDetail {
        id: p.id.clone(),
        name: p.name.clone(),
        domain: p.domain.clone(),
        aliases: p.aliases.clone(),
        system_prompt: p.system_prompt.clone(),
    }))
}
