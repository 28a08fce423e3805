//! The in-process context cache: the same lists, caps and TTLs as the Redis one, in a map, for a
//! single coachd with no Redis. Expired entries vanish on read and are swept now and then on write.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{ContextCache, ContextLimits, ContextMessage, StoreError, StoredThrough, TurnKey, keys};

/// Writes between two sweeps of expired entries: often enough that abandoned sessions do not pile
/// up, rarely enough that the O(n) sweep costs nothing per write.
const SWEEP_EVERY: u64 = 1_024;

#[derive(Debug)]
struct Expiring<T> {
    value: T,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    lists: HashMap<String, Expiring<VecDeque<ContextMessage>>>,
    pointers: HashMap<String, Expiring<String>>,
    /// Per list, the turns it holds (see `ContextCache::append_turn`), expiring with it.
    turns: HashMap<String, Expiring<HashSet<String>>>,
    /// Per session (by its `session_stored` key), how far write-behind has stored it.
    stored: HashMap<String, Expiring<StoredThrough>>,
    writes: u64,
}

impl Inner {
    fn after_write(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes.is_multiple_of(SWEEP_EVERY) {
            self.lists.retain(|_, e| e.expires_at > now);
            self.pointers.retain(|_, e| e.expires_at > now);
            self.turns.retain(|_, e| e.expires_at > now);
            self.stored.retain(|_, e| e.expires_at > now);
        }
    }

    fn push(&mut self, key: String, msg: ContextMessage, limits: &ContextLimits, now: Instant) {
        let entry = self.lists.entry(key).or_insert_with(|| Expiring {
            value: VecDeque::new(),
            expires_at: now,
        });
        if entry.expires_at <= now {
            // Expired but not yet swept: it is gone, as in Redis.
            entry.value.clear();
        }
        entry.value.push_back(msg);
        while entry.value.len() > limits.max_messages {
            entry.value.pop_front();
        }
        entry.expires_at = now + limits.session_ttl;
    }

    /// Appends `msgs` to `list` (and points `pointer`'s user at the session); with `mark`, only
    /// when that turn is not in the list yet (`false` then, and nothing is written).
    fn append(
        &mut self,
        list: String,
        pointer: Option<(&str, &str)>,
        mark: Option<String>,
        msgs: Vec<ContextMessage>,
        limits: &ContextLimits,
        now: Instant,
    ) -> bool {
        if msgs.is_empty() {
            return true;
        }
        if let Some(mark) = mark
            && !self.mark_turn(&list, mark, limits.session_ttl, now)
        {
            return false;
        }
        for msg in msgs {
            self.push(list.clone(), msg, limits, now);
        }
        if let Some((user_id, session_id)) = pointer {
            self.set_pointer(
                keys::last_session(user_id),
                session_id,
                limits.user_session_ttl,
                now,
            );
        }
        self.after_write(now);
        true
    }

    /// Records `mark` as stored in `list`; `false` when it was already.
    fn mark_turn(&mut self, list: &str, mark: String, ttl: Duration, now: Instant) -> bool {
        let entry = self.turns.entry(list.to_owned()).or_insert_with(|| Expiring {
            value: HashSet::new(),
            expires_at: now,
        });
        if entry.expires_at <= now {
            entry.value.clear();
        }
        entry.expires_at = now + ttl;
        entry.value.insert(mark)
    }

    fn tail(&self, key: &str, limit: usize, now: Instant) -> Vec<ContextMessage> {
        match self.lists.get(key) {
            Some(e) if e.expires_at > now => {
                let skip = e.value.len().saturating_sub(limit);
                e.value.iter().skip(skip).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    fn set_pointer(&mut self, key: String, value: &str, ttl: Duration, now: Instant) {
        self.pointers.insert(
            key,
            Expiring {
                value: value.to_owned(),
                expires_at: now + ttl,
            },
        );
    }
}

/// Context held in this process; lost on restart and not shared between instances.
#[derive(Debug)]
pub struct InProcessContextCache {
    limits: ContextLimits,
    // A std Mutex, not tokio's: it is never held across an await and every critical section is
    // a few map operations, so an async lock would only add overhead.
    inner: Mutex<Inner>,
}

impl InProcessContextCache {
    /// An empty cache applying `limits`.
    pub fn new(limits: ContextLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner, Instant) -> T) -> Result<T, StoreError> {
        let mut inner = self.inner.lock().map_err(|_| StoreError::Internal {
            backend: "in-process",
            reason: "context cache lock poisoned".to_owned(),
        })?;
        Ok(f(&mut inner, Instant::now()))
    }

    /// Time left before a key (unprefixed, from [`keys`]) expires; `None` when absent or expired.
    /// The in-process counterpart of Redis' `PTTL`, for tests.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        self.with(|inner, now| {
            let at = inner
                .lists
                .get(key)
                .map(|e| e.expires_at)
                .or_else(|| inner.pointers.get(key).map(|e| e.expires_at))
                .or_else(|| inner.stored.get(key).map(|e| e.expires_at))?;
            (at > now).then(|| at - now)
        })
        .ok()
        .flatten()
    }
}

#[async_trait]
impl ContextCache for InProcessContextCache {
    async fn append_messages(
        &self,
        session_id: &str,
        user_id: &str,
        _coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError> {
        let limits = self.limits;
        let list = keys::session_context(session_id);
        self.with(|inner, now| {
            inner.append(list, Some((user_id, session_id)), None, msgs, &limits, now);
        })
    }

    async fn append_turn(&self, turn: &TurnKey<'_>, msgs: Vec<ContextMessage>) -> Result<bool, StoreError> {
        let limits = self.limits;
        let list = keys::session_context(turn.session_id);
        let pointer = Some((turn.user_id, turn.session_id));
        self.with(|inner, now| inner.append(list, pointer, Some(turn.mark()), msgs, &limits, now))
    }

    async fn append_user_coach_turn(
        &self,
        turn: &TurnKey<'_>,
        msgs: Vec<ContextMessage>,
    ) -> Result<bool, StoreError> {
        let limits = self.limits;
        let list = keys::user_coach_context(turn.user_id, turn.coach_id);
        self.with(|inner, now| inner.append(list, None, Some(turn.mark()), msgs, &limits, now))
    }

    async fn mark_stored(&self, session_id: &str, mark: StoredThrough) -> Result<(), StoreError> {
        let ttl = self.limits.session_ttl;
        self.with(|inner, now| {
            inner.stored.insert(
                keys::session_stored(session_id),
                Expiring {
                    value: mark,
                    expires_at: now + ttl,
                },
            );
        })
    }

    async fn stored_through(&self, session_id: &str) -> Result<Option<StoredThrough>, StoreError> {
        self.with(|inner, now| {
            inner
                .stored
                .get(&keys::session_stored(session_id))
                .filter(|e| e.expires_at > now)
                .map(|e| e.value)
        })
    }

    async fn recent_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError> {
        self.with(|inner, now| inner.tail(&keys::session_context(session_id), limit, now))
    }

    async fn append_user_coach_messages(
        &self,
        user_id: &str,
        coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError> {
        let limits = self.limits;
        let list = keys::user_coach_context(user_id, coach_id);
        self.with(|inner, now| {
            inner.append(list, None, None, msgs, &limits, now);
        })
    }

    async fn user_coach_context(
        &self,
        user_id: &str,
        coach_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError> {
        self.with(|inner, now| inner.tail(&keys::user_coach_context(user_id, coach_id), limit, now))
    }

    async fn set_last_session(&self, user_id: &str, session_id: &str) -> Result<(), StoreError> {
        let ttl = self.limits.user_session_ttl;
        self.with(|inner, now| {
            inner.set_pointer(keys::last_session(user_id), session_id, ttl, now);
            inner.after_write(now);
        })
    }

    async fn last_session(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        self.with(
            |inner, now| match inner.pointers.get(&keys::last_session(user_id)) {
                Some(e) if e.expires_at > now => Some(e.value.clone()),
                _ => None,
            },
        )
    }

    async fn clear_session(&self, session_id: &str) -> Result<(), StoreError> {
        self.with(|inner, _| {
            let list = keys::session_context(session_id);
            inner.turns.remove(&list);
            inner.stored.remove(&keys::session_stored(session_id));
            inner.lists.remove(&list);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ContextLimits {
        ContextLimits {
            session_ttl: Duration::from_secs(3_600),
            user_session_ttl: Duration::from_secs(86_400),
            max_messages: 3,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lists_expire_a_ttl_after_their_last_append() {
        let cache = InProcessContextCache::new(limits());
        cache
            .append_message("s1", "u1", "c1", ContextMessage::new("user", "hi"))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3_000)).await;
        cache
            .append_message("s1", "u1", "c1", ContextMessage::new("assistant", "hello"))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3_000)).await;
        assert_eq!(
            cache.recent_messages("s1", 10).await.unwrap().len(),
            2,
            "the append refreshed the TTL"
        );
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(cache.recent_messages("s1", 10).await.unwrap().is_empty());
        assert_eq!(cache.last_session("u1").await.unwrap().as_deref(), Some("s1"));
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert_eq!(cache.last_session("u1").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeping_drops_expired_entries() {
        let cache = InProcessContextCache::new(limits());
        for i in 0..SWEEP_EVERY {
            cache
                .append_user_coach(&format!("u{i}"), "c", ContextMessage::new("user", "x"))
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(3_601)).await;
        for i in 0..SWEEP_EVERY {
            cache
                .append_user_coach(&format!("v{i}"), "c", ContextMessage::new("user", "x"))
                .await
                .unwrap();
        }
        let lists = cache.inner.lock().unwrap().lists.len();
        assert_eq!(lists, SWEEP_EVERY as usize, "only the live lists remain");
    }
}
