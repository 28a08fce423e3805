//! The owner's writer of one session: follows the session's in-process log and appends what is
//! new to the shared log in batches (one script call per batch, however many events wait), and
//! renews the owner lease. It runs beside the session task, never on the token path: a token
//! reaches local connections before this task looks at it, and a slow or dead Redis only delays
//! or drops cross-node delivery (counted in the cluster stats). A fenced append or renewal
//! (another node holds the lease) stops the session on this node.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::ClusterStats;
use crate::session::event::{EndedBy, EventBody, Published};
use crate::session::log::EventLog;
use crate::session::store::{Appended, EventStore, Lease, OpenTurn, Progress, SessionMeta};

/// Events at most per append.
const MAX_BATCH: usize = 256;

/// Wait before retrying a failed append.
const RETRY: Duration = Duration::from_millis(250);

/// What the owner of a session hands its writer.
#[derive(Debug)]
pub struct OwnerSetup {
    /// The store.
    pub store: Arc<dyn EventStore>,
    /// The session as stored.
    pub meta: SessionMeta,
    /// The lease, when the store gave one (`None`: registered by the writer as soon as it can).
    pub lease: Option<Lease>,
    /// The last seq already in the shared log (a taken-over session goes on from it).
    pub written: u64,
    /// Lease renewal interval.
    pub renew_every: Duration,
    /// This node.
    pub node: String,
    /// Counters.
    pub stats: Arc<ClusterStats>,
}

/// The writer task's state.
#[derive(Debug)]
pub(crate) struct Writer {
    setup: OwnerSetup,
    log: Arc<EventLog>,
    wake: Arc<Notify>,
    fenced: CancellationToken,
    ended: oneshot::Receiver<EndedBy>,
    failures: u64,
}

enum Drained {
    /// Everything logged is in the shared log (or lost for good).
    Done,
    /// An append failed; try again later.
    Behind,
    /// Another node holds the lease.
    Fenced,
}

impl Writer {
    pub(crate) fn new(
        setup: OwnerSetup,
        log: Arc<EventLog>,
        wake: Arc<Notify>,
        fenced: CancellationToken,
        ended: oneshot::Receiver<EndedBy>,
    ) -> Self {
        Writer {
            setup,
            log,
            wake,
            fenced,
            ended,
            failures: 0,
        }
    }

    fn fence(&self) {
        self.setup.stats.fenced.inc();
        tracing::warn!(session_id = %self.setup.meta.session_id, node = %self.setup.node, "another node holds the session's lease: stopping it here");
        self.fenced.cancel();
    }

    pub(crate) async fn run(mut self) {
        let every = self.setup.renew_every.max(Duration::from_millis(10));
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Read before draining: whatever is published before the close is drained below.
            let closed = self.log.is_closed();
            let behind = match self.drain().await {
                Drained::Fenced => return self.fence(),
                Drained::Behind => true,
                Drained::Done => false,
            };
            if closed && !behind {
                break;
            }
            if closed && self.failures > 3 {
                tracing::warn!(session_id = %self.setup.meta.session_id, "session over; its last events never reached the shared log");
                break;
            }
            tokio::select! {
                () = self.wake.notified(), if !behind => {}
                () = tokio::time::sleep(RETRY), if behind => {}
                _ = renew.tick() => {
                    if !self.renew().await {
                        return self.fence();
                    }
                }
                () = self.fenced.cancelled() => return,
            }
        }
        self.finish().await;
    }

    /// Appends everything new; records progress with it.
    async fn drain(&mut self) -> Drained {
        loop {
            let (batch, gap) = self.log.since(self.setup.written, MAX_BATCH);
            if batch.is_empty() {
                return Drained::Done;
            }
            if gap {
                let first = batch.first().map_or(0, |e| e.seq);
                let lost = first.saturating_sub(self.setup.written + 1);
                self.setup.stats.events_lost.add(lost);
                tracing::warn!(session_id = %self.setup.meta.session_id, lost, "the shared log misses events the in-process log dropped");
            }
            if self.setup.lease.is_none() {
                match self.reclaim().await {
                    Drained::Done => {}
                    other => return other,
                }
            }
            let Some(lease) = self.setup.lease.clone() else {
                return Drained::Behind;
            };
            let mut progress = self.setup.meta.progress.clone();
            for event in &batch {
                track(&mut progress, event);
            }
            let result = self
                .setup
                .store
                .append(&self.setup.meta.session_id, &lease, &batch, &progress)
                .await;
            match result {
                Ok(Appended::Ok { .. }) => {
                    self.setup.stats.appends.inc();
                    self.setup.stats.events_appended.add(batch.len() as u64);
                    self.setup.written = batch.last().map_or(self.setup.written, |e| e.seq);
                    self.setup.meta.progress = progress;
                    self.failures = 0;
                }
                Ok(Appended::Fenced) => return self.fenced_or_lost(&lease).await,
                Err(e) => {
                    self.setup.stats.append_failures.inc();
                    self.failures += 1;
                    if self.failures == 1 || self.failures.is_multiple_of(100) {
                        tracing::warn!(session_id = %self.setup.meta.session_id, error = %e, failures = self.failures, "cannot append to the shared log; cross-node delivery is behind");
                    }
                    return Drained::Behind;
                }
            }
        }
    }

    /// A refused append or renewal: another owner (fenced), or no lease at all: take it back.
    async fn fenced_or_lost(&mut self, lease: &Lease) -> Drained {
        match self.setup.store.owner(&self.setup.meta.session_id).await {
            Ok(Some(owner)) if owner != *lease => Drained::Fenced,
            Ok(_) => {
                self.setup.lease = None;
                self.reclaim().await
            }
            Err(_) => Drained::Behind,
        }
    }

    /// Without a lease (it lapsed while Redis was out of reach, Redis lost the keys, or the first
    /// registration failed): take the lease back only if no other node took it meanwhile, since
    /// that node has taken the session over and this copy must stop. `Done` once the lease is
    /// ours again.
    async fn reclaim(&mut self) -> Drained {
        let id = &self.setup.meta.session_id;
        match self.setup.store.acquire(id, &self.setup.node).await {
            Ok(Some(lease)) => {
                tracing::info!(session_id = %id, fence = lease.fence, "lease taken back after it lapsed");
                self.setup.lease = Some(lease);
                return Drained::Done;
            }
            Ok(None) => {}
            Err(_) => return Drained::Behind,
        }
        // Refused: the lease is held by another node, or the session's keys are gone.
        match self.setup.store.owner(id).await {
            Ok(Some(_)) => Drained::Fenced,
            Ok(None) => self.register().await,
            Err(_) => Drained::Behind,
        }
    }

    /// Records the session again and takes a lease: after a failed create, or after Redis lost
    /// the keys. Refused (fenced) when another node holds a live lease by then.
    async fn register(&mut self) -> Drained {
        match self.setup.store.create(&self.setup.meta, &self.setup.node).await {
            Ok(Some(lease)) => {
                tracing::info!(session_id = %self.setup.meta.session_id, fence = lease.fence, "session registered in the shared store");
                self.setup.lease = Some(lease);
                Drained::Done
            }
            Ok(None) => Drained::Fenced,
            Err(e) => {
                self.failures += 1;
                if self.failures == 1 || self.failures.is_multiple_of(100) {
                    tracing::warn!(session_id = %self.setup.meta.session_id, error = %e, "cannot register the session in the shared store");
                }
                Drained::Behind
            }
        }
    }

    /// Renews the lease (or, without one, takes it back); `false` only when another node holds
    /// it. An idle session finds out here that it was taken over, before it serves anything.
    async fn renew(&mut self) -> bool {
        let Some(lease) = self.setup.lease.clone() else {
            return !matches!(self.reclaim().await, Drained::Fenced);
        };
        match self.setup.store.renew(&self.setup.meta.session_id, &lease).await {
            Ok(true) => true,
            Ok(false) => !matches!(self.fenced_or_lost(&lease).await, Drained::Fenced),
            // Redis unreachable: the lease may still hold; the next renewal tells.
            Err(_) => true,
        }
    }

    /// The session task is over: mark it ended, or (shutdown) give the lease up so another node
    /// takes the session over on its next command.
    async fn finish(mut self) {
        let Some(lease) = self.setup.lease.clone() else {
            return;
        };
        let ended_by = self.ended.try_recv().unwrap_or(EndedBy::Ended);
        let id = self.setup.meta.session_id.clone();
        let store = &self.setup.store;
        let result = match ended_by {
            EndedBy::Shutdown => store.release(&id, &lease).await,
            _ => store.end(&id, &lease, ended_by, &self.setup.meta.progress).await,
        };
        if let Err(e) = result {
            tracing::warn!(session_id = %id, error = %e, "cannot record the session's end in the shared store");
        }
    }
}

/// Follows turn numbers and the open turn through the events, as the metadata records them.
pub(crate) fn track(progress: &mut Progress, event: &Published) {
    match &event.body {
        EventBody::TurnStart {
            turn_number,
            user_text,
            ..
        } => {
            progress.next_turn = progress.next_turn.max(turn_number + 1);
            progress.open_turn = Some(OpenTurn {
                number: *turn_number,
                start_seq: event.seq,
                user_text: user_text.clone(),
            });
        }
        EventBody::TurnEnd(end) => {
            let turn_number = &end.turn_number;
            progress.turns_done += 1;
            if progress
                .open_turn
                .as_ref()
                .is_some_and(|t| t.number == *turn_number)
            {
                progress.open_turn = None;
            }
        }
        _ => {}
    }
}
