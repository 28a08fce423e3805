//! The cluster section: this node's id and the timings of session sharing through Redis
//! (leases, key lifetimes, heartbeats, forwarded commands), built as the session layer's
//! [`ClusterSettings`]. Used only when `REDIS_URL` is set.

use super::ConfigError;
use super::source::{DAY_SECS, Reader, Source, invalid};
use crate::session::cluster::ClusterSettings;

/// Reads the section; an unset `COACHD_NODE_ID` gets a random one (`node-` and 8 hex digits).
pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<ClusterSettings, ConfigError> {
    let node_id = match r.raw("COACHD_NODE_ID").filter(|v| !v.trim().is_empty()) {
        Some(id) => {
            let id = id.trim().to_owned();
            let fits = id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !fits {
                return Err(invalid(
                    "COACHD_NODE_ID",
                    "at most 64 letters, digits, '-', '_' or '.'",
                    Some(id),
                ));
            }
            id
        }
        None => format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    };
    Ok(ClusterSettings {
        node_id,
        lease_ttl: r.millis("COACHD_CLUSTER_LEASE_MS", 5_000, 300, 600_000)?,
        session_ttl: r.seconds("COACHD_CLUSTER_SESSION_TTL_SECS", 7_200, 60, 30 * DAY_SECS)?,
        heartbeat: r.seconds("COACHD_CLUSTER_HEARTBEAT_SECS", 5, 1, 3_600)?,
        forward_timeout: r.millis("COACHD_CLUSTER_FORWARD_TIMEOUT_MS", 5_000, 10, 600_000)?,
        end_timeout: r.millis("COACHD_CLUSTER_END_TIMEOUT_MS", 120_000, 10, 3_600_000)?,
        relay_queue: r.int("COACHD_CLUSTER_RELAY_QUEUE", 4_096, 16, 1_000_000)?,
    })
}
