//! Several coachd nodes on one Redis: any node serves any session. The node that runs a
//! session's task owns it (a lease in [`super::store`]); its [`writer`] copies the session's
//! in-process log to the shared log off the token path. Other nodes hold a [`relay`] of the
//! owner's events for their own connections and [`forward`] commands to the owner over Redis
//! pub/sub; when the owner's lease lapses, the next node to touch the session takes it over
//! ([`takeover`]). Redis is the engine: a Stream per session, pub/sub channels, keys with TTLs.
//!
//! Channels: `{prefix}sess:{<id>}:ch` carries a session's events (published by the append
//! script), `{prefix}node:{node_id}` a node's forwarded commands and their replies. The node
//! registry (`{prefix}nodes`, a hash of heartbeats) feeds the cluster view of `/realtime/stats`.

pub mod forward;
pub mod node;
pub mod relay;
pub mod takeover;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::Utc;
use fred::clients::Client;
use fred::interfaces::{ClientLike, HashesInterface, KeysInterface, PubsubInterface};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::manager::Counter;
use super::store::{EventStore, RedisEventStore};

/// How a node takes part in the cluster, all configurable (`COACHD_NODE_ID`, `COACHD_CLUSTER_*`).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's id (generated when unset).
    pub node_id: String,
    /// Owner lease time to live; an owner that stops renewing loses its sessions after this.
    pub lease_ttl: Duration,
    /// Time to live of a session's shared keys after its last write.
    pub session_ttl: Duration,
    /// Interval of the node heartbeat.
    pub heartbeat: Duration,
    /// Longest wait for the owner's answer to a forwarded command.
    pub forward_timeout: Duration,
    /// Longest wait for a forwarded `end` that generates notes (an LLM call on the owner).
    pub end_timeout: Duration,
    /// Relayed events queued per session before the relay falls back to reading the history.
    pub relay_queue: usize,
}

impl ClusterSettings {
    /// How often an owner renews its leases: three times per lease time to live.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }
}

/// Counters of this node's part in the cluster.
#[derive(Debug, Default, Serialize)]
pub struct ClusterStats {
    /// Appends to the shared log that succeeded (each one script call, a batch of events).
    pub appends: Counter,
    /// Events appended to the shared log.
    pub events_appended: Counter,
    /// Appends that failed (Redis down or slow); retried while the in-process log holds them.
    pub append_failures: Counter,
    /// Events that never reached the shared log (the in-process log dropped them first).
    pub events_lost: Counter,
    /// Sessions this node stopped because another node holds their lease.
    pub fenced: Counter,
    /// Sessions taken over from a node whose lease lapsed.
    pub takeovers: Counter,
    /// Commands forwarded to another node.
    pub forwarded: Counter,
    /// Forwarded commands without an answer (owner unreachable or too slow).
    pub forward_failures: Counter,
    /// Commands served for another node.
    pub served: Counter,
    /// Events relayed from other nodes to this node's connections.
    pub relayed: Counter,
    /// Times a relay read the history to fill a gap.
    pub relay_catch_ups: Counter,
    /// Times a relay sent its connections a `resync` (the history no longer covered them).
    pub relay_resyncs: Counter,
}

/// A relay's inbox: the session channel's payloads, or a request to re-read the history.
#[derive(Debug)]
pub(crate) enum RelayInput {
    /// A channel payload (`{epoch} {event json}`).
    Message(String),
    /// The subscription was re-established: events may have been missed.
    CatchUp,
}

/// This node's cluster handles: the shared store, the pub/sub connection and its routing.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) settings: ClusterSettings,
    pub(crate) store: Arc<RedisEventStore>,
    /// The store as the writers see it.
    pub(crate) shared: Arc<dyn EventStore>,
    /// A connection of its own: a subscribed Redis connection takes no other commands.
    subscriber: Client,
    pub(crate) stats: Arc<ClusterStats>,
    /// Forwarded commands waiting for their reply, by request id.
    pub(crate) pending: Mutex<HashMap<u64, oneshot::Sender<forward::WireResult>>>,
    pub(crate) next_request: AtomicU64,
    /// The relays on this node, by session channel.
    relays: Mutex<HashMap<String, mpsc::Sender<RelayInput>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// A cluster member on `store`'s Redis; the pub/sub connection starts connecting at once.
    pub fn new(settings: ClusterSettings, store: RedisEventStore) -> Arc<Self> {
        let subscriber = store.pool().next().clone_new();
        let store = Arc::new(store);
        Arc::new(Cluster {
            settings,
            shared: store.clone(),
            store,
            subscriber,
            stats: Arc::new(ClusterStats::default()),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            relays: Mutex::new(HashMap::new()),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.stats
    }

    /// The channel of a node's commands and replies.
    pub(crate) fn node_channel(&self, node: &str) -> String {
        format!("{}node:{node}", self.store.prefix())
    }

    fn nodes_key(&self) -> String {
        format!("{}nodes", self.store.prefix())
    }

    /// Registers a relay's inbox and subscribes to its session's channel.
    pub(crate) async fn subscribe_relay(&self, channel: String, tx: mpsc::Sender<RelayInput>) {
        lock(&self.relays).insert(channel.clone(), tx);
        if let Err(e) = self.subscriber.subscribe(channel.as_str()).await {
            // The relay reads the history meanwhile; the next reconnect subscribes again.
            tracing::warn!(channel, error = %e, "cannot subscribe to a session channel");
        }
    }

    /// Removes a relay and unsubscribes.
    pub(crate) async fn unsubscribe_relay(&self, channel: &str) {
        lock(&self.relays).remove(channel);
        if let Err(e) = self.subscriber.unsubscribe(channel).await {
            tracing::debug!(channel, error = %e, "cannot unsubscribe from a session channel");
        }
    }

    /// Connects the pub/sub connection; the returned handle ends when it quits.
    pub(crate) fn connect(&self) -> fred::types::ConnectHandle {
        self.subscriber.connect()
    }

    /// Closes the pub/sub connection (at shutdown).
    pub(crate) async fn quit(&self) {
        let _ = self.subscriber.quit().await;
        let _ = self
            .store
            .pool()
            .hdel::<i64, _, _>(self.nodes_key(), self.node_id())
            .await;
    }

    /// After every (re)connect: subscribe again to this node's channel and every relay's, and
    /// have every relay read what it may have missed.
    async fn resubscribe(&self) {
        let mut channels = vec![self.node_channel(self.node_id())];
        let relays: Vec<(String, mpsc::Sender<RelayInput>)> = lock(&self.relays)
            .iter()
            .map(|(c, tx)| (c.clone(), tx.clone()))
            .collect();
        channels.extend(relays.iter().map(|(c, _)| c.clone()));
        if let Err(e) = self.subscriber.subscribe(channels).await {
            tracing::warn!(error = %e, "cannot subscribe to the cluster channels");
        }
        for (_, tx) in relays {
            let _ = tx.try_send(RelayInput::CatchUp);
        }
    }

    /// Routes one pub/sub message: to a relay, or (this node's channel) to the command layer.
    fn route(&self, channel: &str, payload: String) -> Option<forward::NodeMessage> {
        if let Some(tx) = lock(&self.relays).get(channel) {
            if tx.try_send(RelayInput::Message(payload)).is_err() {
                // A full inbox: the relay finds the gap by seq and reads the history.
                tracing::debug!(channel, "relay inbox full");
            }
            return None;
        }
        serde_json::from_str(&payload).ok()
    }

    /// Records this node's heartbeat and session count.
    async fn heartbeat(&self, sessions: usize) {
        let beat = serde_json::json!({ "at": Utc::now().to_rfc3339(), "sessions": sessions });
        let key = self.nodes_key();
        let pool = self.store.pool();
        if let Err(e) = pool
            .hset::<i64, _, _>(&key, (self.node_id(), beat.to_string()))
            .await
        {
            tracing::debug!(error = %e, "node heartbeat failed");
            return;
        }
        let ttl = i64::try_from((self.settings.heartbeat * 10).as_secs()).unwrap_or(i64::MAX);
        let _ = pool.expire::<i64, _>(&key, ttl, None).await;
    }

    /// The nodes whose heartbeat is recent (within three intervals), with their last heartbeat
    /// and session count.
    pub async fn nodes(&self) -> Result<Vec<serde_json::Value>, super::store::StoreError> {
        let all: HashMap<String, String> = self.store.pool().hgetall(self.nodes_key()).await?;
        let horizon =
            chrono::Duration::from_std(self.settings.heartbeat * 3).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        let mut nodes: Vec<serde_json::Value> = all
            .into_iter()
            .filter_map(|(node, beat)| {
                let beat: serde_json::Value = serde_json::from_str(&beat).ok()?;
                let at = chrono::DateTime::parse_from_rfc3339(beat["at"].as_str()?).ok()?;
                (now.signed_duration_since(at) <= horizon).then(|| {
                    serde_json::json!({
                        "node_id": node,
                        "last_heartbeat": beat["at"],
                        "sessions": beat["sessions"],
                    })
                })
            })
            .collect();
        nodes.sort_by(|a, b| a["node_id"].as_str().cmp(&b["node_id"].as_str()));
        Ok(nodes)
    }
}

/// The session-token key every node on this Redis and prefix shares when
/// `COACHD_SESSION_TOKEN_SECRET` is unset: the first node to start makes one (`SET NX`), every
/// other reads it. Waits at most `wait` for Redis.
pub async fn shared_token_secret(
    pool: &fred::clients::Pool,
    prefix: &str,
    wait: Duration,
) -> Result<crate::secret::Secret, super::store::StoreError> {
    use rand::RngCore;
    let unavailable = |reason: String| super::store::StoreError::Unavailable {
        backend: "redis",
        reason,
    };
    let key = format!("{prefix}cluster:session_token_secret");
    let mut candidate = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut candidate);
    let exchange = async {
        pool.wait_for_connect().await?;
        pool.set::<(), _, _>(
            &key,
            hex::encode(candidate),
            None,
            Some(fred::types::SetOptions::NX),
            false,
        )
        .await?;
        pool.get::<Option<String>, _>(&key).await
    };
    match tokio::time::timeout(wait, exchange).await {
        Ok(Ok(Some(secret))) => Ok(crate::secret::Secret::new(secret)),
        Ok(Ok(None)) => Err(unavailable("the shared secret vanished".to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(unavailable(format!("no answer within {wait:?}"))),
    }
}

#[cfg(test)]
mod tests;
