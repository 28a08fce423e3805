//! The Redis context cache: JSON messages in capped lists under the reference key patterns, behind
//! the deployment's key prefix. Every append is one Lua script, so the push, the trim to the cap,
//! the TTL and the last-session pointer are written together or not at all.

use async_trait::async_trait;
use fred::clients::Pool;
use fred::interfaces::{KeysInterface, ListInterface};
use fred::types::{Expiration, Value};

use super::{ContextCache, ContextLimits, ContextMessage, StoreError, StoredThrough, TurnKey, keys};
use crate::redis::Script;

/// KEYS[1]: a context list; KEYS[2]: the list's set of stored turns (a hash with the list's TTL);
/// KEYS[3] (optional): a last-session pointer. ARGV: cap, list TTL (ms), session id and pointer TTL
/// (ms) (unused without KEYS[3]), the turn's mark ('' for an append that is not a turn), then one
/// or more message JSONs, pushed in order by one RPUSH. -1: that turn was stored already.
/// coachd talks to one Redis (not Cluster), so the keys need not share a hash slot.
static APPEND: Script = Script::new(
    r"
if ARGV[5] ~= '' then
  if redis.call('HSETNX', KEYS[2], ARGV[5], '1') == 0 then return -1 end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local n = redis.call('RPUSH', KEYS[1], unpack(ARGV, 6))
local cap = tonumber(ARGV[1])
if n > cap then
  redis.call('LTRIM', KEYS[1], -cap, -1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
end
return n
",
);

/// Context in Redis, shared by every coachd instance that uses the same Redis and key prefix.
#[derive(Debug, Clone)]
pub struct RedisContextCache {
    pool: Pool,
    prefix: String,
    limits: ContextLimits,
}

impl RedisContextCache {
    /// A cache on `pool` whose keys all start with `prefix` (`COACHD_REDIS_KEY_PREFIX`).
    pub fn new(pool: Pool, prefix: impl Into<String>, limits: ContextLimits) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            limits,
        }
    }

    /// The full Redis key of an unprefixed key from [`keys`].
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn append(
        &self,
        list: String,
        pointer: Option<(String, &str)>,
        msgs: &[ContextMessage],
    ) -> Result<(), StoreError> {
        self.append_with(list, pointer, None, msgs).await.map(|_| ())
    }

    /// Appends `msgs`; with `once`, only when that turn mark is new (`false` otherwise).
    async fn append_with(
        &self,
        list: String,
        pointer: Option<(String, &str)>,
        once: Option<String>,
        msgs: &[ContextMessage],
    ) -> Result<bool, StoreError> {
        if msgs.is_empty() {
            return Ok(true);
        }
        let marks = format!("{list}:turns");
        let mut keys = vec![list, marks];
        let mut args: Vec<Value> = vec![
            clamp_i64(self.limits.max_messages).into(),
            millis(self.limits.session_ttl).into(),
        ];
        match pointer {
            Some((key, session_id)) => {
                keys.push(key);
                args.push(session_id.into());
                args.push(millis(self.limits.user_session_ttl).into());
            }
            None => args.extend([Value::from(""), Value::from(0_i64)]),
        }
        args.push(once.unwrap_or_default().into());
        for msg in msgs {
            let json = serde_json::to_string(msg).map_err(|e| StoreError::Internal {
                backend: "redis",
                reason: format!("cannot encode a context message: {e}"),
            })?;
            args.push(json.into());
        }
        let n = APPEND.run::<i64>(&self.pool, keys, args).await?;
        Ok(n >= 0)
    }

    async fn tail(&self, list: String, limit: usize) -> Result<Vec<ContextMessage>, StoreError> {
        if limit == 0 {
            // LRANGE key -0 -1 would return the whole list.
            return Ok(Vec::new());
        }
        let start = -clamp_i64(limit);
        let raw: Vec<String> = self.pool.lrange(&list, start, -1).await?;
        Ok(decode(&list, raw))
    }
}

#[async_trait]
impl ContextCache for RedisContextCache {
    async fn append_messages(
        &self,
        session_id: &str,
        user_id: &str,
        _coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError> {
        let list = self.key(&keys::session_context(session_id));
        let pointer = self.key(&keys::last_session(user_id));
        self.append(list, Some((pointer, session_id)), &msgs).await
    }

    async fn append_turn(&self, turn: &TurnKey<'_>, msgs: Vec<ContextMessage>) -> Result<bool, StoreError> {
        let list = self.key(&keys::session_context(turn.session_id));
        let pointer = self.key(&keys::last_session(turn.user_id));
        self.append_with(list, Some((pointer, turn.session_id)), Some(turn.mark()), &msgs)
            .await
    }

    async fn append_user_coach_turn(
        &self,
        turn: &TurnKey<'_>,
        msgs: Vec<ContextMessage>,
    ) -> Result<bool, StoreError> {
        let list = self.key(&keys::user_coach_context(turn.user_id, turn.coach_id));
        self.append_with(list, None, Some(turn.mark()), &msgs).await
    }

    async fn mark_stored(&self, session_id: &str, mark: StoredThrough) -> Result<(), StoreError> {
        let ttl = Expiration::PX(millis(self.limits.session_ttl));
        self.pool
            .set::<(), _, _>(
                self.key(&keys::session_stored(session_id)),
                mark.encode(),
                Some(ttl),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    async fn stored_through(&self, session_id: &str) -> Result<Option<StoredThrough>, StoreError> {
        let value: Option<String> = self.pool.get(self.key(&keys::session_stored(session_id))).await?;
        Ok(value.as_deref().and_then(StoredThrough::decode))
    }

    async fn recent_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError> {
        self.tail(self.key(&keys::session_context(session_id)), limit)
            .await
    }

    async fn append_user_coach_messages(
        &self,
        user_id: &str,
        coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError> {
        self.append(
            self.key(&keys::user_coach_context(user_id, coach_id)),
            None,
            &msgs,
        )
        .await
    }

    async fn user_coach_context(
        &self,
        user_id: &str,
        coach_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError> {
        self.tail(self.key(&keys::user_coach_context(user_id, coach_id)), limit)
            .await
    }

    async fn set_last_session(&self, user_id: &str, session_id: &str) -> Result<(), StoreError> {
        let ttl = Expiration::PX(millis(self.limits.user_session_ttl));
        self.pool
            .set::<(), _, _>(
                self.key(&keys::last_session(user_id)),
                session_id,
                Some(ttl),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    async fn last_session(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.pool.get(self.key(&keys::last_session(user_id))).await?)
    }

    async fn clear_session(&self, session_id: &str) -> Result<(), StoreError> {
        let list = self.key(&keys::session_context(session_id));
        // Two commands, not one DEL of both: the keys need not share a Cluster slot.
        self.pool.del::<i64, _>(format!("{list}:turns")).await?;
        self.pool
            .del::<i64, _>(self.key(&keys::session_stored(session_id)))
            .await?;
        self.pool.del::<i64, _>(list).await?;
        Ok(())
    }
}

/// Decodes list entries, skipping (and logging) any that are not a [`ContextMessage`]: one bad
/// entry, e.g. written by another program, must not make the whole context unreadable.
fn decode(key: &str, raw: Vec<String>) -> Vec<ContextMessage> {
    raw.into_iter()
        .filter_map(|entry| match serde_json::from_str(&entry) {
            Ok(msg) => Some(msg),
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping an undecodable context entry");
                None
            }
        })
        .collect()
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
