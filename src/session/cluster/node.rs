//! The ConnectionManager's multi-node side: creating a session registered in the shared store,
//! finding a session wherever it lives (here, on another node behind a relay, ended, or with a
//! lapsed lease to take over), routing forwarded commands, and the node's background task
//! (pub/sub dispatch and heartbeat).

use std::sync::{Arc, Weak};

use chrono::Utc;
use fred::interfaces::EventInterface;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::forward::{self, NodeMessage, WireCommand};
use super::relay::Relay;
use super::writer::OwnerSetup;
use super::{Cluster, lock};
use crate::error::Error;
use crate::session::actor::Command;
use crate::session::event::{SessionStatus, TransportKind};
use crate::session::manager::{ConnectionManager, EndedSession, SessionHandle};
use crate::session::store::{Progress, SessionMeta};

/// Where a session is, as a route needs to know.
#[derive(Debug)]
pub enum Found {
    /// Live: run here, or relayed from its owner.
    Live(SessionHandle),
    /// Over.
    Ended(EndedSession),
    /// Unknown.
    Missing,
}

impl ConnectionManager {
    /// Starts a session; with a cluster, it is recorded in the shared store (with this node's
    /// lease) before this returns, so every node finds it at once. When Redis cannot take it,
    /// the session still starts here and its writer registers it as soon as Redis answers.
    pub async fn open(
        &self,
        user_id: &str,
        coach_id: &str,
        transport: TransportKind,
    ) -> Result<SessionHandle, Error> {
        let Some(cluster) = self.cluster.clone() else {
            return self.create(user_id, coach_id, transport);
        };
        self.check_capacity()?;
        let id = Self::new_id();
        let meta = SessionMeta {
            session_id: id.to_string(),
            user_id: user_id.to_owned(),
            coach_id: coach_id.to_owned(),
            transport,
            created_at: Utc::now(),
            status: SessionStatus::Active,
            ended_by: None,
            ended_at: None,
            progress: Progress {
                turns_done: 0,
                next_turn: 1,
                open_turn: None,
            },
        };
        let lease = match cluster.shared.create(&meta, cluster.node_id()).await {
            // A new id has no lease yet; were one there, the writer's registration finds out.
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "cannot register the new session in Redis; it runs here and registers later");
                None
            }
        };
        let owner = OwnerSetup {
            store: cluster.shared.clone(),
            meta,
            lease,
            written: 0,
            renew_every: cluster.settings.renew_every(),
            node: cluster.node_id().to_owned(),
            stats: cluster.stats.clone(),
        };
        self.spawn_session(id, Some(owner), None)
    }

    /// Finds a session: live here, live on another node (a relay here), ended, or unknown. A
    /// live session whose owner's lease lapsed is taken over by this node.
    pub async fn find(self: &Arc<Self>, id: &str) -> Result<Found, Error> {
        if let Some(handle) = self.get(id) {
            return Ok(Found::Live(handle));
        }
        if let Some(ended) = self.ended(id) {
            return Ok(Found::Ended(ended));
        }
        let Some(cluster) = self.cluster.clone() else {
            return Ok(Found::Missing);
        };
        if let Some(handle) = lock(&self.remotes).get(id).cloned() {
            return Ok(Found::Live(handle));
        }
        let Some(meta) = cluster.shared.meta(id).await? else {
            return Ok(Found::Missing);
        };
        if meta.status == SessionStatus::Ended {
            return Ok(Found::Ended(ended_record(meta)));
        }
        match cluster.shared.owner(id).await? {
            Some(lease) if lease.node != cluster.node_id() => {
                Ok(Found::Live(self.relay(&cluster, meta).await))
            }
            Some(stale) => {
                // Ours by the lease, not running here and not ended here: an earlier run of
                // this node id died holding it (node ids are unique among live nodes).
                self.drop_stale_lease(&cluster, id, &stale).await?;
                match self.take_over(meta.clone()).await? {
                    Some(handle) => Ok(Found::Live(handle)),
                    None => Ok(Found::Live(self.relay(&cluster, meta).await)),
                }
            }
            None => match self.take_over(meta.clone()).await? {
                Some(handle) => Ok(Found::Live(handle)),
                // Another node was quicker.
                None => Ok(Found::Live(self.relay(&cluster, meta).await)),
            },
        }
    }

    /// This node's relay of a session owned elsewhere (made on first use).
    async fn relay(self: &Arc<Self>, cluster: &Arc<Cluster>, meta: SessionMeta) -> SessionHandle {
        // One relay per session: attaches that race wait for the first to set it up.
        let _one_at_a_time = self.relay_setup.lock().await;
        if let Some(handle) = lock(&self.remotes).get(meta.session_id.as_str()).cloned() {
            return handle;
        }
        let (tx, rx) = crate::session::actor::command_channel(self.deps.limits.max_queued_turns + 8);
        let handle = self.remote_handle(&meta, tx);
        let channel = cluster.store.channel(&meta.session_id);
        let (inbox_tx, inbox) = mpsc::channel(cluster.settings.relay_queue);
        // Subscribe first, then read the history: nothing published in between is missed.
        cluster.subscribe_relay(channel.clone(), inbox_tx).await;
        let mut relay = Relay::new(
            cluster.clone(),
            Arc::downgrade(self),
            handle.clone(),
            channel,
            inbox,
            self.deps.limits.log_events,
        );
        relay.catch_up(true).await;
        lock(&self.remotes).insert(handle.id.clone(), handle.clone());
        self.tracker.spawn(relay.run(self.deps.shutdown.clone()));
        self.tracker.spawn(forward_commands(
            Arc::downgrade(self),
            handle.id.clone(),
            rx,
            self.tracker.clone(),
        ));
        handle
    }

    /// Sessions of other nodes relayed here now.
    pub fn relay_count(&self) -> usize {
        lock(&self.remotes).len()
    }

    /// Forgets a relay (it ended).
    pub(crate) fn drop_remote(&self, id: &str) {
        lock(&self.remotes).remove(id);
    }

    /// Runs a command for a session wherever it lives: here, at its owner, or (its owner gone)
    /// here after taking it over.
    pub(crate) async fn command(self: &Arc<Self>, id: &str, command: WireCommand) -> Result<Value, Error> {
        let Some(cluster) = self.cluster.clone() else {
            return Err(Error::NotFound("session".to_owned()));
        };
        for _ in 0..3 {
            if let Some(local) = self.get(id) {
                return forward::serve(&cluster, Some(local), command)
                    .await
                    .map_err(|e| e.into_error(self.deps.limits.max_queued_turns));
            }
            match cluster.shared.owner(id).await? {
                Some(lease) if lease.node != cluster.node_id() => {
                    match cluster.forward(&lease.node, id, command.clone()).await {
                        // The owner may have died: look at the lease again.
                        Err(Error::Unavailable(why)) => {
                            if cluster.shared.owner(id).await?.is_some_and(|l| l == lease) {
                                return Err(Error::Unavailable(why));
                            }
                        }
                        other => {
                            return other.map_err(|e| match e {
                                Error::QueueFull { .. } => Error::QueueFull {
                                    max: self.deps.limits.max_queued_turns,
                                },
                                e => e,
                            });
                        }
                    }
                }
                Some(stale) => {
                    if self.ended(id).is_some() {
                        return Err(Error::SessionEnded);
                    }
                    self.drop_stale_lease(&cluster, id, &stale).await?;
                }
                None => {
                    let Some(meta) = cluster.shared.meta(id).await? else {
                        return Err(Error::NotFound("session".to_owned()));
                    };
                    if meta.status == SessionStatus::Ended {
                        return Err(Error::SessionEnded);
                    }
                    self.take_over(meta).await?;
                }
            }
        }
        Err(Error::Unavailable(
            "the session is moving between nodes; try again".to_owned(),
        ))
    }

    /// Gives up a lease this node id holds with no task behind it (left by an earlier run).
    async fn drop_stale_lease(
        &self,
        cluster: &Arc<Cluster>,
        id: &str,
        lease: &crate::session::store::Lease,
    ) -> Result<(), Error> {
        // A takeover on this node holds the lease before its task is registered: not stale.
        let _one_at_a_time = self.relay_setup.lock().await;
        if self.get(id).is_some() {
            return Ok(());
        }
        tracing::info!(session_id = id, node_id = %cluster.node_id(), fence = lease.fence, "releasing a session lease an earlier run of this node left");
        cluster.shared.release(id, lease).await?;
        Ok(())
    }

    /// Starts the node's background task (pub/sub dispatch, heartbeat) on the session tracker.
    pub fn start_cluster(self: &Arc<Self>) {
        if let Some(cluster) = self.cluster.clone() {
            tracing::info!(node_id = %cluster.node_id(), "cluster: sessions shared through Redis");
            self.tracker.spawn(run_node(self.clone(), cluster));
        }
    }

    /// The cluster, when sessions are shared.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }
}

fn ended_record(meta: SessionMeta) -> EndedSession {
    EndedSession {
        session_id: meta.session_id,
        user_id: meta.user_id,
        coach_id: meta.coach_id,
        status: SessionStatus::Ended,
        ended_by: meta.ended_by.unwrap_or(crate::session::event::EndedBy::Ended),
        turn_count: meta.progress.turns_done,
        ended_at: meta.ended_at.unwrap_or_else(Utc::now),
    }
}

/// The commands of a relayed session's handle, each run where the session lives.
async fn forward_commands(
    manager: Weak<ConnectionManager>,
    id: Arc<str>,
    mut rx: mpsc::Receiver<Box<Command>>,
    tracker: tokio_util::task::TaskTracker,
) {
    while let Some(command) = rx.recv().await {
        let Some(manager) = manager.upgrade() else {
            return;
        };
        let id = id.clone();
        tracker.spawn(async move { run_forwarded(&manager, &id, *command).await });
    }
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Internal(e.into()))
}

async fn run_forwarded(manager: &Arc<ConnectionManager>, id: &str, command: Command) {
    // A failed forward drops the reply sender of the commands whose answer has no error case;
    // their caller then reports the session as gone.
    match command {
        Command::UserMessage {
            text,
            mode,
            client_id,
            reply,
        } => {
            let wire = WireCommand::UserMessage {
                text,
                mode,
                client_id,
            };
            let result = manager.command(id, wire).await.and_then(parse);
            let _ = reply.send(result);
        }
        Command::Cancel { reply } => {
            if let Ok(Ok(v)) = manager.command(id, WireCommand::Cancel).await.map(parse) {
                let _ = reply.send(v);
            }
        }
        Command::End {
            generate_notes,
            reply,
        } => {
            if let Ok(Ok(v)) = manager
                .command(id, WireCommand::End { generate_notes })
                .await
                .map(parse)
            {
                let _ = reply.send(v);
            }
        }
        Command::EndWhenIdle => {
            let _ = manager.command(id, WireCommand::EndWhenIdle).await;
        }
        Command::Info { reply } => {
            if let Ok(Ok(v)) = manager.command(id, WireCommand::Info).await.map(parse) {
                let _ = reply.send(v);
            }
        }
        Command::Job { update, reply } => {
            if manager
                .command(id, WireCommand::Job { update: *update })
                .await
                .is_ok()
            {
                let _ = reply.send(());
            }
        }
    }
}

/// The node's background task: routes pub/sub messages (relayed events, forwarded commands and
/// their replies), subscribes again after every reconnect, and beats the heart.
async fn run_node(manager: Arc<ConnectionManager>, cluster: Arc<Cluster>) {
    let shutdown = manager.deps.shutdown.clone();
    let mut messages = cluster.subscriber.message_rx();
    let mut reconnects = cluster.subscriber.reconnect_rx();
    let connection = cluster.connect();
    let mut beat = tokio::time::interval(cluster.settings.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = reconnects.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => cluster.resubscribe().await,
                Err(RecvError::Closed) => break,
            },
            m = messages.recv() => match m {
                Ok(message) => {
                    let Some(payload) = message.value.as_string() else { continue };
                    let Some(node_message) = cluster.route(&message.channel, payload) else { continue };
                    match node_message {
                        NodeMessage::Reply { id, result } => cluster.on_reply(id, result),
                        NodeMessage::Request { id, from, session_id, command } => {
                            let (manager, cluster) = (manager.clone(), cluster.clone());
                            manager.tracker.clone().spawn(async move {
                                let result = forward::serve(&cluster, manager.get(&session_id), command).await;
                                cluster.reply(&from, id, result).await;
                            });
                        }
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "pub/sub messages dropped: relays read the history");
                    cluster.resubscribe().await;
                }
                Err(RecvError::Closed) => break,
            },
            _ = beat.tick() => cluster.heartbeat(manager.live_count()).await,
        }
    }
    cluster.quit().await;
    let _ = connection.await;
}
