//! HTTP routes: thin handlers only, one module per surface, merged into one router here.

pub mod health;

use axum::Router;

use crate::state::AppState;

/// Every route of coachd.
pub fn router() -> Router<AppState> {
    Router::new().merge(health::router())
}
