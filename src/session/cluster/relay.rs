//! A relay: this node's copy of a session owned by another node. It subscribes to the session's
//! channel first, then reads the history, and feeds both into an in-process [`EventLog`] by the
//! owner's seq, dropping duplicates; the transports drive on that log exactly as on a local
//! session's. A gap in the seqs (a missed message, a reconnect) is filled from the history; when
//! the history no longer covers it (trimmed, or the log's epoch changed), the connections get a
//! logged `resync` event in its place, never a silent gap.
//!
//! While connections are attached it keeps the owner's idle timer going and watches the lease;
//! a lapsed lease makes this node take the session over. With no connection for two lease
//! periods it goes away.

use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::forward::WireCommand;
use super::{Cluster, RelayInput};
use crate::session::event::{EventBody, Published, SessionState, SessionStatus};
use crate::session::manager::{ConnectionManager, SessionHandle};
use crate::session::store::{History, parse_channel_message};

/// A relay and its place in the owner's log.
#[derive(Debug)]
pub(crate) struct Relay {
    cluster: Arc<Cluster>,
    manager: Weak<ConnectionManager>,
    handle: SessionHandle,
    channel: String,
    inbox: mpsc::Receiver<RelayInput>,
    epoch: Option<String>,
    log_events: usize,
    ended: bool,
}

impl Relay {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        manager: Weak<ConnectionManager>,
        handle: SessionHandle,
        channel: String,
        inbox: mpsc::Receiver<RelayInput>,
        log_events: usize,
    ) -> Self {
        Relay {
            cluster,
            manager,
            handle,
            channel,
            inbox,
            epoch: None,
            log_events,
            ended: false,
        }
    }

    fn last_seq(&self) -> u64 {
        self.handle.log.bounds().0
    }

    fn insert(&mut self, event: Arc<Published>) {
        let ends = matches!(&event.body, EventBody::Session(s) if s.status == SessionStatus::Ended);
        if self.handle.log.insert(event) {
            self.cluster.stats.relayed.inc();
            if ends {
                self.ended = true;
            }
        }
    }

    /// Reads the history after the relay's last seq; `initial` for the first read (the log is
    /// empty, so there is no place to lose).
    pub(crate) async fn catch_up(&mut self, initial: bool) {
        let id = self.handle.id.clone();
        if !initial {
            self.cluster.stats.relay_catch_ups.inc();
        }
        loop {
            let after = self.last_seq();
            let history = match self.cluster.shared.history(&id, after, self.log_events).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "relay cannot read the session's history");
                    return;
                }
            };
            let Some(epoch) = history.epoch.clone() else {
                // No log (yet, or lost with Redis): the owner's next append starts one.
                return;
            };
            if !initial && !history.covers(after) {
                self.resync(&history).await;
            }
            self.epoch = Some(epoch);
            let full = history.events.len() >= self.log_events;
            for event in history.events {
                self.insert(event);
            }
            if !full {
                return;
            }
        }
    }

    /// Logs a `resync` in the place of the events the history lost.
    async fn resync(&mut self, history: &History) {
        let seq = history
            .oldest_seq
            .map_or(history.last_seq, |o| o.saturating_sub(1));
        self.resync_at(seq, history.last_seq).await;
    }

    /// Logs a `resync` at `seq` (the last lost event), the log going on at `seq + 1`.
    async fn resync_at(&mut self, seq: u64, last_seq: u64) {
        self.cluster.stats.relay_resyncs.inc();
        let turn_count = match self.cluster.shared.meta(&self.handle.id).await {
            Ok(Some(meta)) => meta.progress.turns_done,
            _ => 0,
        };
        tracing::info!(session_id = %self.handle.id, seq, "relay lost events: resync");
        let body = EventBody::Resync {
            reason: "events were lost between nodes (Redis restarted or trimmed the log)".to_owned(),
            state: Box::new(SessionState {
                status: SessionStatus::Active,
                turn_count,
                current_turn: None,
                oldest_seq: seq + 1,
                last_seq,
            }),
        };
        self.insert(Arc::new(Published::new(&self.handle.id, seq, body)));
    }

    /// [`Relay::on_message`], for the unit tests.
    #[cfg(test)]
    pub(crate) async fn on_message_for_test(&mut self, payload: &str) {
        self.on_message(payload).await;
    }

    /// The cluster's counters (unit tests).
    #[cfg(test)]
    pub(crate) fn cluster_stats(&self) -> &super::ClusterStats {
        &self.cluster.stats
    }

    async fn on_message(&mut self, payload: &str) {
        let Some((epoch, event)) = parse_channel_message(payload) else {
            tracing::debug!(channel = %self.channel, "undecodable relay message");
            return;
        };
        let last = self.last_seq();
        if self.epoch.as_deref() != Some(epoch) || event.seq > last + 1 {
            self.catch_up(false).await;
        }
        if event.seq > self.last_seq() + 1 {
            // The history could not be read: say so rather than leave a silent gap.
            self.resync_at(event.seq - 1, event.seq).await;
        }
        self.insert(event);
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let period = self.cluster.settings.lease_ttl;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut idle_ticks = 0;
        while !self.ended {
            tokio::select! {
                () = shutdown.cancelled() => break,
                input = self.inbox.recv() => match input {
                    Some(RelayInput::Message(payload)) => self.on_message(&payload).await,
                    Some(RelayInput::CatchUp) => self.catch_up(false).await,
                    None => break,
                },
                _ = tick.tick() => {
                    if self.handle.log.subscriber_count() == 0 {
                        idle_ticks += 1;
                        if idle_ticks >= 2 {
                            break;
                        }
                        continue;
                    }
                    idle_ticks = 0;
                    self.keep_alive().await;
                }
            }
        }
        self.handle.log.close();
        self.cluster.unsubscribe_relay(&self.channel).await;
        if let Some(manager) = self.manager.upgrade() {
            manager.drop_remote(&self.handle.id);
        }
    }

    /// Connections are attached here: keep the owner's idle timer going (a command is activity),
    /// and take the session over when its owner's lease lapsed.
    async fn keep_alive(&mut self) {
        let Some(manager) = self.manager.upgrade() else {
            return;
        };
        if let Err(e) = manager.command(&self.handle.id, WireCommand::Info).await {
            tracing::debug!(session_id = %self.handle.id, error = %e, "relay keep-alive failed");
        }
    }
}
