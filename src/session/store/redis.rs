//! The shared session store in Redis: per session a Stream (the event log, `MAXLEN ~`, ids are
//! the seqs), a hash with the seq counter and its epoch, a hash of metadata, the lease and its
//! fencing counter, all under `{prefix}sess:{<id>}:…` (hash-tagged, so one session's keys share a
//! Cluster slot) with a TTL that every write and lease renewal refreshes. Every write is one Lua
//! script that checks the lease first, so a fenced node changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::clients::Pool;
use fred::interfaces::{HashesInterface, KeysInterface};
use fred::types::Value;

use super::{
    Appended, EventStore, History, Lease, Progress, SessionMeta, StoreError, StoreLimits, decode_event,
    new_epoch,
};
use crate::redis::Script;
use crate::session::event::{EndedBy, EventBody, Published, SessionStatus};

/// KEYS: meta, lease, fence. ARGV: info JSON, progress JSON, node, lease ms, ttl ms. -1: a live
/// lease is held (the metadata is left as it is).
static CREATE: Script = Script::new(
    r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local f = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[1], 'info', ARGV[1], 'progress', ARGV[2], 'status', 'active')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[3] .. '/' .. f, 'PX', ARGV[4])
return f
",
);

/// KEYS: meta, lease, fence. ARGV: node, lease ms, ttl ms. -1: held; -2: no live session.
static ACQUIRE: Script = Script::new(
    r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'active' then return -2 end
local f = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1] .. '/' .. f, 'PX', ARGV[2])
return f
",
);

/// KEYS: lease, meta, seq, log, fence. ARGV: lease value, lease ms, ttl ms.
static RENEW: Script = Script::new(
    r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
",
);

/// KEYS: lease, seq, log, meta. ARGV: lease value, maxlen, ttl ms, channel, fresh epoch,
/// progress JSON (empty: unchanged), then (seq, event JSON) pairs in ascending seq. Returns
/// {last seq, epoch}, or {-1, ''} when fenced. The keys' TTLs are set when the log starts and
/// refreshed by every lease renewal, not here: an append on the token's way costs as few
/// commands as it can.
static APPEND: Script = Script::new(
    r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, ''} end
local c = redis.call('HMGET', KEYS[2], 'epoch', 'seq')
local epoch = c[1]
local last = tonumber(c[2] or '0')
local last_s = tostring(last)
local fresh = not epoch
if fresh then
  -- The counter is gone (restart, eviction): a new epoch, and no entries of the old one.
  epoch = ARGV[5]
  redis.call('DEL', KEYS[3])
end
for i = 7, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], ARGV[i] .. '-0', 'e', ARGV[i + 1])
    redis.call('PUBLISH', ARGV[4], epoch .. ' ' .. ARGV[i + 1])
    last = tonumber(ARGV[i])
    last_s = ARGV[i]
  end
end
if fresh then
  redis.call('HSET', KEYS[2], 'seq', last_s, 'epoch', epoch)
  for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
else
  redis.call('HSET', KEYS[2], 'seq', last_s)
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[4], 'progress', ARGV[6])
end
return {last_s, epoch}
",
);

/// KEYS: seq, log. ARGV: exclusive start id, count. Returns {epoch, last seq, oldest id, JSON...}.
static HISTORY: Script = Script::new(
    r"
local c = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = ''
if #first > 0 then oldest = first[1][1] end
local out = {c[1] or '', c[2] or '0', oldest}
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
for _, e in ipairs(entries) do out[#out + 1] = e[2][2] end
return out
",
);

/// KEYS: lease. ARGV: lease value.
static RELEASE: Script = Script::new(
    r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
);

/// KEYS: lease, meta. ARGV: lease value, ended_by, ended_at, progress JSON.
static END: Script = Script::new(
    r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'status', 'ended', 'ended_by', ARGV[2], 'ended_at', ARGV[3], 'progress', ARGV[4])
return 1
",
);

/// The unchanging part of a session's metadata, stored as one JSON field.
#[derive(serde::Serialize, serde::Deserialize)]
struct Info {
    user_id: String,
    coach_id: String,
    transport: crate::session::event::TransportKind,
    created_at: DateTime<Utc>,
}

/// Sessions in Redis, shared by every node on the same Redis and key prefix.
#[derive(Debug, Clone)]
pub struct RedisEventStore {
    pool: Pool,
    prefix: String,
    limits: StoreLimits,
}

fn internal(reason: impl Into<String>) -> StoreError {
    StoreError::Internal {
        backend: "redis",
        reason: reason.into(),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| internal(format!("cannot encode: {e}")))
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl RedisEventStore {
    /// A store on `pool` whose keys start with `prefix` (`COACHD_REDIS_KEY_PREFIX`).
    pub fn new(pool: Pool, prefix: impl Into<String>, limits: StoreLimits) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            limits,
        }
    }

    /// A key of a session: `{prefix}sess:{<id>}:{part}`.
    pub fn key(&self, session_id: &str, part: &str) -> String {
        format!("{}sess:{{{session_id}}}:{part}", self.prefix)
    }

    /// The pub/sub channel of a session's events.
    pub fn channel(&self, session_id: &str) -> String {
        self.key(session_id, "ch")
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn grant(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        node: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let fence: i64 = script.run(&self.pool, keys, args).await?;
        Ok(u64::try_from(fence).ok().map(|fence| Lease {
            node: node.to_owned(),
            fence,
        }))
    }
}

#[async_trait]
impl EventStore for RedisEventStore {
    async fn create(&self, meta: &SessionMeta, node: &str) -> Result<Option<Lease>, StoreError> {
        let id = &meta.session_id;
        let info = json(&Info {
            user_id: meta.user_id.clone(),
            coach_id: meta.coach_id.clone(),
            transport: meta.transport,
            created_at: meta.created_at,
        })?;
        let keys = vec![self.key(id, "meta"), self.key(id, "lease"), self.key(id, "fence")];
        let args = vec![
            info.into(),
            json(&meta.progress)?.into(),
            node.into(),
            millis(self.limits.lease_ttl).into(),
            millis(self.limits.session_ttl).into(),
        ];
        self.grant(&CREATE, keys, args, node).await
    }

    async fn acquire(&self, session_id: &str, node: &str) -> Result<Option<Lease>, StoreError> {
        let keys = vec![
            self.key(session_id, "meta"),
            self.key(session_id, "lease"),
            self.key(session_id, "fence"),
        ];
        let args = vec![
            node.into(),
            millis(self.limits.lease_ttl).into(),
            millis(self.limits.session_ttl).into(),
        ];
        self.grant(&ACQUIRE, keys, args, node).await
    }

    async fn renew(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let keys = ["lease", "meta", "seq", "log", "fence"]
            .iter()
            .map(|part| self.key(session_id, part))
            .collect();
        let args = vec![
            lease.value().into(),
            millis(self.limits.lease_ttl).into(),
            millis(self.limits.session_ttl).into(),
        ];
        let renewed: i64 = RENEW.run(&self.pool, keys, args).await?;
        Ok(renewed == 1)
    }

    async fn release(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let keys = vec![self.key(session_id, "lease")];
        let released: i64 = RELEASE.run(&self.pool, keys, vec![lease.value().into()]).await?;
        Ok(released == 1)
    }

    async fn owner(&self, session_id: &str) -> Result<Option<Lease>, StoreError> {
        let value: Option<String> = self.pool.get(self.key(session_id, "lease")).await?;
        Ok(value.as_deref().and_then(Lease::parse))
    }

    async fn append(
        &self,
        session_id: &str,
        lease: &Lease,
        events: &[Arc<Published>],
        progress: &Progress,
    ) -> Result<Appended, StoreError> {
        let keys = ["lease", "seq", "log", "meta"]
            .iter()
            .map(|part| self.key(session_id, part))
            .collect();
        let mut args: Vec<Value> = Vec::with_capacity(6 + 2 * events.len());
        args.push(lease.value().into());
        args.push(i64::try_from(self.limits.log_events).unwrap_or(i64::MAX).into());
        args.push(millis(self.limits.session_ttl).into());
        args.push(self.channel(session_id).into());
        args.push(new_epoch().into());
        let turn_moved = events
            .iter()
            .any(|e| matches!(e.body, EventBody::TurnStart { .. } | EventBody::TurnEnd { .. }));
        args.push(
            if turn_moved {
                json(progress)?
            } else {
                String::new()
            }
            .into(),
        );
        for event in events {
            args.push(event.seq.to_string().into());
            args.push(event.json.as_str().into());
        }
        let reply: Vec<Value> = APPEND.run(&self.pool, keys, args).await?;
        let mut reply = reply.into_iter();
        let last = reply.next().and_then(|v| v.as_i64()).unwrap_or(-1);
        let epoch = reply.next().and_then(|v| v.into_string()).unwrap_or_default();
        match u64::try_from(last) {
            Ok(last_seq) => Ok(Appended::Ok { epoch, last_seq }),
            Err(_) => Ok(Appended::Fenced),
        }
    }

    async fn history(&self, session_id: &str, after_seq: u64, max: usize) -> Result<History, StoreError> {
        let keys = vec![self.key(session_id, "seq"), self.key(session_id, "log")];
        let args: Vec<Value> = vec![
            format!("({after_seq}-0").into(),
            i64::try_from(max.max(1)).unwrap_or(i64::MAX).into(),
        ];
        let reply: Vec<Value> = HISTORY.run(&self.pool, keys, args).await?;
        let mut reply = reply.into_iter();
        let epoch = reply
            .next()
            .and_then(|v| v.into_string())
            .filter(|e| !e.is_empty());
        let last_seq = reply.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let oldest_seq = reply
            .next()
            .and_then(|v| v.into_string())
            .and_then(|id| id.split('-').next().and_then(|s| s.parse().ok()));
        let mut events = Vec::new();
        for entry in reply {
            let Some(text) = entry.into_string() else { continue };
            match decode_event(&text) {
                Some(event) => events.push(event),
                None => tracing::warn!(session_id, "skipping an undecodable session log entry"),
            }
        }
        Ok(History {
            epoch,
            last_seq,
            oldest_seq,
            events,
        })
    }

    async fn meta(&self, session_id: &str) -> Result<Option<SessionMeta>, StoreError> {
        let fields: std::collections::HashMap<String, String> =
            self.pool.hgetall(self.key(session_id, "meta")).await?;
        let Some(info) = fields.get("info") else {
            return Ok(None);
        };
        let info: Info =
            serde_json::from_str(info).map_err(|e| internal(format!("bad session info: {e}")))?;
        let word = |name: &str| fields.get(name).map(|v| serde_json::Value::String(v.clone()));
        let status = match fields.get("status").map(String::as_str) {
            Some("ended") => SessionStatus::Ended,
            _ => SessionStatus::Active,
        };
        let ended_by: Option<EndedBy> = word("ended_by").and_then(|v| serde_json::from_value(v).ok());
        let ended_at = fields
            .get("ended_at")
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc));
        let progress = fields
            .get("progress")
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or_default();
        Ok(Some(SessionMeta {
            session_id: session_id.to_owned(),
            user_id: info.user_id,
            coach_id: info.coach_id,
            transport: info.transport,
            created_at: info.created_at,
            status,
            ended_by,
            ended_at,
            progress,
        }))
    }

    async fn end(
        &self,
        session_id: &str,
        lease: &Lease,
        ended_by: EndedBy,
        progress: &Progress,
    ) -> Result<bool, StoreError> {
        let keys = vec![self.key(session_id, "lease"), self.key(session_id, "meta")];
        let ended_by = serde_json::to_value(ended_by)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "ended".to_owned());
        let args: Vec<Value> = vec![
            lease.value().into(),
            ended_by.into(),
            Utc::now().to_rfc3339().into(),
            json(progress)?.into(),
        ];
        let ended: i64 = END.run(&self.pool, keys, args).await?;
        Ok(ended == 1)
    }
}
