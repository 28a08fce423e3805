//! HTTP routes: thin handlers only, one module per surface, merged into one router here.

pub mod health;
pub mod memory;

use axum::Router;

use crate::state::AppState;

/// Every route of coachd.
pub fn router() -> Router<AppState> {
    Router::new().merge(health::router()).merge(memory::router())
}
