//! The HTTP-turn adapter: collects one turn's events and answers with a JSON body once its
//! `turn_end` arrives (the reference coach service's turn-based contract).

use super::{Detach, Inbound, Transport, TransportKind};
use crate::session::event::Published;

/// Collects the events of one turn.
#[derive(Debug, Default)]
pub struct HttpTurn {
    turn: u32,
    /// The `turn_end` event, once seen.
    pub turn_end: Option<serde_json::Value>,
    /// The first `error` event of the turn, if any.
    pub error: Option<serde_json::Value>,
}

impl HttpTurn {
    /// Waits for turn `turn`.
    pub fn new(turn: u32) -> Self {
        HttpTurn {
            turn,
            ..Self::default()
        }
    }
}

#[async_trait::async_trait]
impl Transport for HttpTurn {
    fn kind(&self) -> TransportKind {
        TransportKind::Http
    }

    async fn send(&mut self, event: &Published) -> Result<(), Detach> {
        if event.turn_number != Some(self.turn) {
            return Ok(());
        }
        match event.kind {
            "turn_end" => self.turn_end = serde_json::from_str(&event.json).ok(),
            "error" if self.error.is_none() => self.error = serde_json::from_str(&event.json).ok(),
            _ => {}
        }
        Ok(())
    }

    async fn recv(&mut self) -> Inbound {
        std::future::pending().await
    }

    async fn heartbeat(&mut self) -> Result<(), Detach> {
        Ok(())
    }

    fn done_after(&self, event: &Published) -> bool {
        event.kind == "turn_end" && event.turn_number == Some(self.turn)
    }

    async fn close(&mut self, _why: &Detach) {}
}
