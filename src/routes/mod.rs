//! HTTP routes: thin handlers only, one module per surface, merged into one router here.

pub mod coach;
pub mod health;
pub mod memory;
pub mod realtime;

use axum::Router;

use crate::state::AppState;

/// Every route of coachd.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(realtime::router())
        .merge(coach::router())
        .merge(memory::router())
}
