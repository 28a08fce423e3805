//! The shared session store in memory: the Redis store's semantics (fenced appends, epochs,
//! capped logs, expiring leases on Tokio's clock) for the shared test suite and the session
//! layer's paused-time tests. One process only; nothing is shared between nodes with it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::Utc;
use tokio::time::Instant;

use super::{
    Appended, EventStore, History, Lease, Progress, SessionMeta, StoreError, StoreLimits, new_epoch,
};
use crate::session::event::{EndedBy, Published, SessionStatus};

#[derive(Debug, Default)]
struct Entry {
    meta: Option<SessionMeta>,
    lease: Option<(Lease, Instant)>,
    fence: u64,
    /// `(seq, epoch)` of the counter; `None` models a counter Redis lost.
    counter: Option<(u64, String)>,
    log: VecDeque<Arc<Published>>,
}

impl Entry {
    fn live_lease(&self) -> Option<&Lease> {
        self.lease
            .as_ref()
            .filter(|(_, until)| *until > Instant::now())
            .map(|(lease, _)| lease)
    }
}

/// Sessions in a map behind one lock (never held across an `.await`).
#[derive(Debug)]
pub struct InProcessEventStore {
    limits: StoreLimits,
    sessions: Mutex<HashMap<String, Entry>>,
}

impl InProcessEventStore {
    /// An empty store.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets a session's log and counter, as a Redis restart without persistence would (tests).
    pub fn lose_log(&self, session_id: &str) {
        if let Some(e) = self.lock().get_mut(session_id) {
            e.counter = None;
            e.log.clear();
        }
    }

    /// Drops a session's lease, as its expiry would (tests).
    pub fn drop_lease(&self, session_id: &str) {
        if let Some(e) = self.lock().get_mut(session_id) {
            e.lease = None;
        }
    }

    fn grant(&self, entry: &mut Entry, node: &str) -> Lease {
        entry.fence += 1;
        let lease = Lease {
            node: node.to_owned(),
            fence: entry.fence,
        };
        entry.lease = Some((lease.clone(), Instant::now() + self.limits.lease_ttl));
        lease
    }
}

#[async_trait]
impl EventStore for InProcessEventStore {
    async fn create(&self, meta: &SessionMeta, node: &str) -> Result<Option<Lease>, StoreError> {
        let mut sessions = self.lock();
        let entry = sessions.entry(meta.session_id.clone()).or_default();
        if entry.live_lease().is_some() {
            return Ok(None);
        }
        entry.meta = Some(meta.clone());
        Ok(Some(self.grant(entry, node)))
    }

    async fn acquire(&self, session_id: &str, node: &str) -> Result<Option<Lease>, StoreError> {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(session_id) else {
            return Ok(None);
        };
        let live = entry
            .meta
            .as_ref()
            .is_some_and(|m| m.status == SessionStatus::Active);
        if entry.live_lease().is_some() || !live {
            return Ok(None);
        }
        Ok(Some(self.grant(entry, node)))
    }

    async fn renew(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(session_id) else {
            return Ok(false);
        };
        if entry.live_lease() != Some(lease) {
            return Ok(false);
        }
        entry.lease = Some((lease.clone(), Instant::now() + self.limits.lease_ttl));
        Ok(true)
    }

    async fn release(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(session_id) else {
            return Ok(false);
        };
        if entry.live_lease() != Some(lease) {
            return Ok(false);
        }
        entry.lease = None;
        Ok(true)
    }

    async fn owner(&self, session_id: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self.lock().get(session_id).and_then(|e| e.live_lease().cloned()))
    }

    async fn append(
        &self,
        session_id: &str,
        lease: &Lease,
        events: &[Arc<Published>],
        progress: &Progress,
    ) -> Result<Appended, StoreError> {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(session_id) else {
            return Ok(Appended::Fenced);
        };
        if entry.live_lease() != Some(lease) {
            return Ok(Appended::Fenced);
        }
        let (mut last, epoch) = entry.counter.take().unwrap_or_else(|| (0, new_epoch()));
        for event in events {
            if event.seq > last {
                entry.log.push_back(event.clone());
                last = event.seq;
            }
        }
        while entry.log.len() > self.limits.log_events {
            entry.log.pop_front();
        }
        entry.counter = Some((last, epoch.clone()));
        if let Some(meta) = entry.meta.as_mut() {
            meta.progress = progress.clone();
        }
        Ok(Appended::Ok {
            epoch,
            last_seq: last,
        })
    }

    async fn history(&self, session_id: &str, after_seq: u64, max: usize) -> Result<History, StoreError> {
        let sessions = self.lock();
        let Some(entry) = sessions.get(session_id) else {
            return Ok(History {
                epoch: None,
                last_seq: 0,
                oldest_seq: None,
                events: Vec::new(),
            });
        };
        Ok(History {
            epoch: entry.counter.as_ref().map(|(_, epoch)| epoch.clone()),
            last_seq: entry.counter.as_ref().map_or(0, |(seq, _)| *seq),
            oldest_seq: entry.log.front().map(|e| e.seq),
            events: entry
                .log
                .iter()
                .filter(|e| e.seq > after_seq)
                .take(max)
                .cloned()
                .collect(),
        })
    }

    async fn meta(&self, session_id: &str) -> Result<Option<SessionMeta>, StoreError> {
        Ok(self.lock().get(session_id).and_then(|e| e.meta.clone()))
    }

    async fn end(
        &self,
        session_id: &str,
        lease: &Lease,
        ended_by: EndedBy,
        progress: &Progress,
    ) -> Result<bool, StoreError> {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(session_id) else {
            return Ok(false);
        };
        if entry.live_lease() != Some(lease) {
            return Ok(false);
        }
        entry.lease = None;
        if let Some(meta) = entry.meta.as_mut() {
            meta.status = SessionStatus::Ended;
            meta.ended_by = Some(ended_by);
            meta.ended_at = Some(Utc::now());
            meta.progress = progress.clone();
        }
        Ok(true)
    }
}
