//! Taking over a session whose owner's lease lapsed (the owner died or lost Redis): take the
//! lease, rebuild the session from the shared store (metadata, turn counters, the log's last seq
//! and the open turn's partial reply) and the context cache (the transcript), and start its task
//! here. The turn that was streaming cannot move with it (a provider stream is a socket on the
//! dead node): the new task ends it as `interrupted` with the partial text, stored through
//! write-behind like any interrupted turn.

use std::collections::VecDeque;

use crate::context::StoredThrough;
use crate::error::Error;
use crate::llm::Usage;
use crate::session::event::{EventBody, FinishReason, Published, TurnEndEvent};
use crate::session::manager::{ConnectionManager, SessionHandle};
use crate::session::store::SessionMeta;

use super::writer::OwnerSetup;

/// A finished turn, as write-behind stores it; at a takeover, read back from the log for the turns
/// the old owner finished.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedTurn {
    /// Turn number.
    pub number: u32,
    /// What the user said.
    pub user_text: String,
    /// The reply.
    pub reply_text: String,
    /// How it ended.
    pub finish_reason: FinishReason,
    /// Cut short.
    pub interrupted: bool,
    /// Token counts.
    pub usage: Option<Usage>,
    /// The seq of its `turn_end`.
    pub end_seq: u64,
}

/// What a taken-over session starts from.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Turns finished.
    pub turns_done: u32,
    /// The next turn number.
    pub next_turn: u32,
    /// `(user, reply)` of the turns so far, oldest first.
    pub transcript: VecDeque<(String, String)>,
    /// The turn that was streaming: number, user text, and the partial reply.
    pub open: Option<(u32, String, String)>,
    /// Turns the old owner finished after the last one write-behind recorded as stored: its
    /// queue died with it, so they are handed to this node's write-behind again.
    pub unstored: Vec<FinishedTurn>,
}

impl ConnectionManager {
    /// Takes the session over when its lease is free; `None` when another node got it first.
    pub(crate) async fn take_over(&self, meta: SessionMeta) -> Result<Option<SessionHandle>, Error> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(None);
        };
        let id = meta.session_id.clone();
        // Two requests on this node may race here; the second finds the first's task.
        let _one_at_a_time = self.relay_setup.lock().await;
        if let Some(handle) = self.get(&id) {
            return Ok(Some(handle));
        }
        self.check_capacity()?;
        let Some(lease) = cluster.shared.acquire(&id, cluster.node_id()).await? else {
            return Ok(None);
        };
        let log_events = self.deps.limits.log_events;
        let progress = meta.progress.clone();
        // From the open turn's start (its tokens make the partial reply); without one, only the
        // log's last seq is needed.
        let open_after = progress
            .open_turn
            .as_ref()
            .map_or(u64::MAX - 1, |o| o.start_seq.saturating_sub(1));
        let history = cluster.shared.history(&id, open_after, log_events).await?;
        // And the turns finished after the last one write-behind recorded as stored: they may
        // have been lost with the old owner's queue (without a record, whatever the log keeps).
        let stored = match self.deps.context.stored_through(&id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "cannot read how far the session is stored; re-storing what its log keeps");
                None
            }
        };
        let mut finished = Vec::new();
        let mut after = stored.map_or(0, |s| s.end_seq);
        // A page at a time up to the open turn; the log keeps at most `log_events` anyway.
        while after < open_after.min(history.last_seq) {
            let page = cluster.shared.history(&id, after, log_events).await?;
            let Some(last) = page.events.last().map(|e| e.seq) else {
                break;
            };
            after = last;
            finished.extend(page.events);
        }
        let unstored = finished_after(&finished, stored);
        let open = progress.open_turn.as_ref().map(|open| {
            let partial: String = history
                .events
                .iter()
                .filter(|e| e.seq > open.start_seq)
                .filter_map(|e| match &e.body {
                    EventBody::Token {
                        turn_number, text, ..
                    } if *turn_number == open.number => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            (open.number, open.user_text.clone(), partial)
        });
        let transcript = self.transcript_of(&id).await;
        let recovered = Recovered {
            turns_done: progress.turns_done,
            next_turn: progress.next_turn.max(1),
            transcript,
            open,
            unstored,
        };
        cluster.stats.takeovers.inc();
        tracing::info!(
            session_id = %id,
            node_id = %cluster.node_id(),
            fence = lease.fence,
            last_seq = history.last_seq,
            interrupted_turn = recovered.open.as_ref().map(|o| o.0),
            restored_turns = recovered.unstored.len(),
            "session taken over: its owner's lease lapsed"
        );
        let owner = OwnerSetup {
            store: cluster.shared.clone(),
            meta,
            lease: Some(lease),
            written: history.last_seq,
            renew_every: cluster.settings.renew_every(),
            node: cluster.node_id().to_owned(),
            stats: cluster.stats.clone(),
        };
        let handle = self.spawn_session(id.as_str().into(), Some(owner), Some(recovered))?;
        // Its connections here (if any) follow the relay until they reconnect; new ones attach
        // to the task.
        Ok(Some(handle))
    }

    /// The session's turns so far, from the context cache (written by write-behind).
    async fn transcript_of(&self, id: &str) -> VecDeque<(String, String)> {
        let limit = self.deps.limits.notes_max_turns * 2;
        let messages = match self.deps.context.recent_messages(id, limit).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(session_id = id, error = %e, "taken-over session starts without its transcript");
                Vec::new()
            }
        };
        let mut transcript = VecDeque::new();
        for message in messages {
            match message.role.as_str() {
                "user" => transcript.push_back((message.content, String::new())),
                "assistant" => match transcript.back_mut() {
                    Some((_, reply)) if reply.is_empty() => *reply = message.content,
                    _ => transcript.push_back((String::new(), message.content)),
                },
                _ => {}
            }
        }
        transcript
    }
}

/// The turns that end in `events` after `stored`, with the user text of their `turn_start` (a
/// turn whose start the log no longer keeps cannot be stored whole, and is left out).
pub(crate) fn finished_after(
    events: &[std::sync::Arc<Published>],
    stored: Option<StoredThrough>,
) -> Vec<FinishedTurn> {
    let done = stored.map_or(0, |s| s.turn);
    let mut started: Vec<(u32, &str)> = Vec::new();
    let mut out = Vec::new();
    for e in events {
        match &e.body {
            EventBody::TurnStart {
                turn_number,
                user_text,
                ..
            } => started.push((*turn_number, user_text.as_str())),
            EventBody::TurnEnd(end) if end.turn_number > done => {
                let TurnEndEvent {
                    turn_number,
                    reply_text,
                    usage,
                    finish_reason,
                    interrupted,
                    ..
                } = &**end;
                let Some(&(_, user_text)) = started.iter().find(|(n, _)| n == turn_number) else {
                    tracing::warn!(
                        seq = e.seq,
                        turn = turn_number,
                        "a finished turn's start is older than the log: not re-stored"
                    );
                    continue;
                };
                out.push(FinishedTurn {
                    number: *turn_number,
                    user_text: user_text.to_owned(),
                    reply_text: reply_text.clone(),
                    finish_reason: finish_reason.clone(),
                    interrupted: *interrupted,
                    usage: *usage,
                    end_seq: e.seq,
                });
            }
            _ => {}
        }
    }
    out
}
