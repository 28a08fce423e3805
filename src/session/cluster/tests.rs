//! The owner's side of the cluster with paused time, on the in-process shared store: the writer
//! copies the session's log in order and in batches, records progress, keeps its lease alive,
//! stops the session when fenced, hands the session over at shutdown; a taken-over session ends
//! its old owner's open turn as interrupted and stores it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::ClusterStats;
use super::takeover::{FinishedTurn, Recovered, finished_after};
use super::writer::{OwnerSetup, Writer};
use crate::context::StoredThrough;
use crate::session::TurnMode;
use crate::session::event::{EndedBy, EventBody, SessionStatus, TransportKind};
use crate::session::event::{FinishReason, Published, TurnEndEvent};
use crate::session::log::EventLog;
use crate::session::store::{EventStore, InProcessEventStore, Progress, SessionMeta, StoreLimits};
use crate::session::testing::{Setup, harness};

const LEASE: Duration = Duration::from_secs(3);

fn store() -> Arc<InProcessEventStore> {
    Arc::new(InProcessEventStore::new(StoreLimits {
        log_events: 1_000,
        session_ttl: Duration::from_secs(3_600),
        lease_ttl: LEASE,
    }))
}

fn meta(id: &str) -> SessionMeta {
    SessionMeta {
        session_id: id.to_owned(),
        user_id: "u".into(),
        coach_id: "c".into(),
        transport: TransportKind::WebSocket,
        created_at: Utc::now(),
        status: SessionStatus::Active,
        ended_by: None,
        ended_at: None,
        progress: Progress {
            turns_done: 0,
            next_turn: 1,
            open_turn: None,
        },
    }
}

struct Running {
    log: Arc<EventLog>,
    fenced: CancellationToken,
    ended: oneshot::Sender<EndedBy>,
    stats: Arc<ClusterStats>,
    task: tokio::task::JoinHandle<()>,
}

async fn writer(store: &Arc<InProcessEventStore>, id: &str) -> Running {
    let lease = store.create(&meta(id), "node-a").await.unwrap().unwrap();
    let wake = Arc::new(Notify::new());
    let log = Arc::new(EventLog::starting_at(id, 1_000, 0, Some(wake.clone())));
    let stats = Arc::new(ClusterStats::default());
    let setup = OwnerSetup {
        store: store.clone(),
        meta: meta(id),
        lease: Some(lease),
        written: 0,
        renew_every: LEASE / 3,
        node: "node-a".into(),
        stats: stats.clone(),
    };
    let fenced = CancellationToken::new();
    let (ended, ended_rx) = oneshot::channel();
    let task = tokio::spawn(Writer::new(setup, log.clone(), wake, fenced.clone(), ended_rx).run());
    Running {
        log,
        fenced,
        ended,
        stats,
        task,
    }
}

fn token(text: &str, index: u32) -> EventBody {
    EventBody::Token {
        turn_number: 1,
        text: text.into(),
        index,
    }
}

#[tokio::test(start_paused = true)]
async fn the_writer_copies_the_log_in_order_in_batches_and_records_the_open_turn() {
    let store = store();
    let w = writer(&store, "s").await;
    w.log.publish(EventBody::TurnStart {
        turn_number: 1,
        user_text: "hi".into(),
        client_id: None,
    });
    for i in 0..100 {
        w.log.publish(token(&format!("w{i}"), i));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;

    let h = store.history("s", 0, 1_000).await.unwrap();
    let seqs: Vec<u64> = h.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
    assert!(
        w.stats.appends.get() < 10,
        "events that wait go in one append ({} appends)",
        w.stats.appends.get()
    );
    let open = store
        .meta("s")
        .await
        .unwrap()
        .unwrap()
        .progress
        .open_turn
        .unwrap();
    assert_eq!(
        (open.number, open.start_seq, open.user_text.as_str()),
        (1, 1, "hi")
    );
    w.fenced.cancel();
    w.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_session_lives() {
    let store = store();
    let w = writer(&store, "s").await;
    tokio::time::sleep(LEASE * 5).await;
    assert_eq!(store.owner("s").await.unwrap().unwrap().node, "node-a");
    assert!(store.acquire("s", "node-b").await.unwrap().is_none());
    w.fenced.cancel();
    w.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn another_owner_fences_the_writer_which_stops_the_session() {
    let store = store();
    let w = writer(&store, "s").await;
    w.log.publish(token("a", 0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Node B took the session over (A's lease lapsed while it was stuck).
    store.drop_lease("s");
    let b = store.acquire("s", "node-b").await.unwrap().unwrap();
    w.log.publish(token("b", 1));
    tokio::time::timeout(Duration::from_secs(1), w.fenced.cancelled())
        .await
        .expect("fenced at its next append");
    w.task.await.unwrap();
    assert_eq!(w.stats.fenced.get(), 1);
    let h = store.history("s", 0, 10).await.unwrap();
    assert_eq!(h.events.len(), 1, "nothing written after the fence");
    assert_eq!(store.owner("s").await.unwrap(), Some(b));
}

#[tokio::test(start_paused = true)]
async fn an_owner_without_a_lease_that_another_node_holds_stops_at_its_next_renewal() {
    // Found by tests/faults.rs: Redis was out of reach longer than the lease; the owner's writer
    // saw no lease at all and dropped its own, another node then took the session over, and
    // this copy, idle with nothing to append, went on as the owner (renewing nothing), later
    // served a turn with its stale turn count and re-registered over the other node's lease.
    let store = store();
    let b = store.create(&meta("s"), "node-b").await.unwrap().unwrap();
    let wake = Arc::new(Notify::new());
    let log = Arc::new(EventLog::starting_at("s", 1_000, 0, Some(wake.clone())));
    let setup = OwnerSetup {
        store: store.clone(),
        meta: meta("s"),
        lease: None,
        written: 0,
        renew_every: LEASE / 3,
        node: "node-a".into(),
        stats: Arc::new(ClusterStats::default()),
    };
    let fenced = CancellationToken::new();
    let (_ended, ended_rx) = oneshot::channel();
    let task = tokio::spawn(Writer::new(setup, log, wake, fenced.clone(), ended_rx).run());
    tokio::time::timeout(LEASE, fenced.cancelled())
        .await
        .expect("fenced at its next renewal, with nothing published");
    task.await.unwrap();
    assert_eq!(
        store.owner("s").await.unwrap(),
        Some(b),
        "the lease stays with node b"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_owner_whose_lapsed_lease_nobody_took_takes_it_back() {
    let store = store();
    let w = writer(&store, "s").await;
    let first = store.owner("s").await.unwrap().unwrap();
    store.drop_lease("s");
    tokio::time::sleep(LEASE).await;
    let now = store.owner("s").await.unwrap().unwrap();
    assert_eq!(now.node, "node-a");
    assert!(now.fence > first.fence, "taken back under a new fencing token");
    assert!(store.acquire("s", "node-b").await.unwrap().is_none());
    assert!(!w.fenced.is_cancelled());
    w.fenced.cancel();
    w.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_with_no_other_owner_is_taken_again() {
    let store = store();
    let w = writer(&store, "s").await;
    w.log.publish(token("a", 0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    store.drop_lease("s");
    store.lose_log("s");
    w.log.publish(token("b", 1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!w.fenced.is_cancelled());
    assert_eq!(store.owner("s").await.unwrap().unwrap().node, "node-a");
    let h = store.history("s", 0, 10).await.unwrap();
    assert_eq!(h.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
    assert!(!h.covers(0), "a reader from before the loss resyncs");
    w.fenced.cancel();
    w.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_the_lease_is_handed_back_and_at_the_end_the_session_is_marked_ended() {
    let store = store();
    let w = writer(&store, "s1").await;
    w.ended.send(EndedBy::Shutdown).unwrap();
    w.log.close();
    w.task.await.unwrap();
    assert!(store.owner("s1").await.unwrap().is_none());
    assert_eq!(
        store.meta("s1").await.unwrap().unwrap().status,
        SessionStatus::Active
    );

    let w = writer(&store, "s2").await;
    w.ended.send(EndedBy::Expired).unwrap();
    w.log.close();
    w.task.await.unwrap();
    let m = store.meta("s2").await.unwrap().unwrap();
    assert_eq!(
        (m.status, m.ended_by),
        (SessionStatus::Ended, Some(EndedBy::Expired))
    );
}

#[tokio::test(start_paused = true)]
async fn a_taken_over_session_ends_the_open_turn_as_interrupted_stores_it_and_goes_on() {
    let h = harness(Setup::default());
    let store = store();
    let lease = store.create(&meta("s"), "node-a").await.unwrap().unwrap();
    store.drop_lease("s");
    let lease_b = store.acquire("s", "node-b").await.unwrap().unwrap();
    assert!(lease_b.fence > lease.fence);
    let owner = OwnerSetup {
        store: store.clone(),
        meta: meta("s"),
        lease: Some(lease_b),
        written: 41,
        renew_every: LEASE / 3,
        node: "node-b".into(),
        stats: Arc::new(ClusterStats::default()),
    };
    let recovered = Recovered {
        turns_done: 2,
        next_turn: 4,
        transcript: [
            ("one".to_owned(), "r1".to_owned()),
            ("two".to_owned(), "r2".to_owned()),
        ]
        .into(),
        open: Some((3, "three".to_owned(), "half a rep".to_owned())),
        // Turn 2 finished on the old owner, which died before its write-behind stored it.
        unstored: vec![FinishedTurn {
            number: 2,
            user_text: "two".into(),
            reply_text: "r2".into(),
            finish_reason: FinishReason::Stop,
            interrupted: false,
            usage: None,
            end_seq: 30,
        }],
    };
    let session = h
        .manager
        .spawn_session("s".into(), Some(owner), Some(recovered))
        .unwrap();
    let mut sub = session.subscribe(Some(41));
    let first = sub.live.recv().await.unwrap();
    assert_eq!(first.seq, 42, "the log goes on from the shared log's seq");
    let EventBody::TurnEnd(end) = &first.body else {
        panic!("a turn_end first: {:?}", first.body)
    };
    assert_eq!(
        (end.turn_number, end.reply_text.as_str(), end.interrupted),
        (3, "half a rep", true)
    );
    assert_eq!(end.finish_reason.as_str(), "interrupted");
    assert!(matches!(
        &sub.live.recv().await.unwrap().body,
        EventBody::Session(s) if s.turn_count == 3
    ));

    let n = session
        .user_message("four".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    assert_eq!(n, 4, "turn numbers go on");

    // The unstored turn and the interrupted one went to write-behind like any other.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let context = h.manager.deps.context.recent_messages("s", 10).await.unwrap();
    let texts: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(&texts[..4], ["two", "r2", "three", "half a rep"]);
    // The shared log got the new events, numbered on.
    let shared = store.history("s", 41, 10).await.unwrap();
    assert_eq!(shared.events.first().map(|e| e.seq), Some(42));
    h.stop().await;
}

/// A cluster member whose shared store is the in-process one; its Redis pool (for pub/sub,
/// which these tests do not touch) points at a closed port and is never connected.
fn relay_cluster(store: Arc<InProcessEventStore>) -> Arc<super::Cluster> {
    use fred::prelude::{Builder, Config};
    let config = Config::from_url("redis://127.0.0.1:1").unwrap();
    let pool = Builder::from_config(config).build_pool(1).unwrap();
    let redis = crate::session::store::RedisEventStore::new(
        pool,
        "t:",
        StoreLimits {
            log_events: 1_000,
            session_ttl: Duration::from_secs(60),
            lease_ttl: LEASE,
        },
    );
    let cluster = super::Cluster::new(
        super::ClusterSettings {
            node_id: "node-b".into(),
            lease_ttl: LEASE,
            session_ttl: Duration::from_secs(60),
            heartbeat: Duration::from_secs(5),
            forward_timeout: Duration::from_secs(1),
            end_timeout: Duration::from_secs(1),
            relay_queue: 64,
        },
        redis,
    );
    let mut cluster = Arc::into_inner(cluster).unwrap();
    cluster.shared = store;
    Arc::new(cluster)
}

/// A relay on node B of session `s`, owned by node A through `store`, and the owner's lease.
async fn relay_of(
    store: &Arc<InProcessEventStore>,
) -> (
    super::relay::Relay,
    crate::session::SessionHandle,
    crate::session::store::Lease,
) {
    let h = harness(Setup::default());
    let lease = store.create(&meta("s"), "node-a").await.unwrap().unwrap();
    let cluster = relay_cluster(store.clone());
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    let handle = h.manager.remote_handle(&meta("s"), tx);
    let (_inbox_tx, inbox) = tokio::sync::mpsc::channel(4);
    let relay = super::relay::Relay::new(
        cluster,
        std::sync::Weak::new(),
        handle.clone(),
        "ch".into(),
        inbox,
        1_000,
    );
    (relay, handle, lease)
}

fn tokens(from: u64, to: u64) -> Vec<Arc<crate::session::event::Published>> {
    (from..=to)
        .map(|seq| {
            Arc::new(crate::session::event::Published::new(
                "s",
                seq,
                token(&format!("w{seq}"), seq as u32),
            ))
        })
        .collect()
}

fn payload(epoch: &str, event: &crate::session::event::Published) -> String {
    crate::session::store::channel_message(epoch, event.json.as_str())
}

async fn epoch_of(store: &Arc<InProcessEventStore>) -> String {
    store.history("s", 0, 1).await.unwrap().epoch.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_relay_merges_history_and_live_messages_by_seq_without_duplicates_or_gaps() {
    let store = store();
    let (mut relay, handle, lease) = relay_of(&store).await;
    store
        .append("s", &lease, &tokens(1, 5), &Progress::default())
        .await
        .unwrap();
    let epoch = epoch_of(&store).await;
    // Subscribed first, so messages of events the history also holds arrive too.
    relay.catch_up(true).await;
    let mut sub = handle.subscribe(Some(0));
    assert_eq!(
        sub.replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    for event in tokens(4, 6) {
        relay.on_message_for_test(&payload(&epoch, &event)).await;
    }
    // 7 and 8 were published while this node missed them; 9 arrives: the gap is read back.
    store
        .append("s", &lease, &tokens(6, 9), &Progress::default())
        .await
        .unwrap();
    relay
        .on_message_for_test(&payload(&epoch, &tokens(9, 9)[0]))
        .await;
    let mut live = Vec::new();
    while let Ok(e) = sub.live.try_recv() {
        live.push(e.seq);
    }
    assert_eq!(live, [6, 7, 8, 9]);
    assert_eq!(relay.cluster_stats().relay_catch_ups.get(), 1);
    assert_eq!(relay.cluster_stats().relay_resyncs.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_relay_whose_place_the_history_lost_logs_a_resync_in_its_place() {
    let store = store();
    let (mut relay, handle, lease) = relay_of(&store).await;
    store
        .append("s", &lease, &tokens(1, 3), &Progress::default())
        .await
        .unwrap();
    relay.catch_up(true).await;
    let mut sub = handle.subscribe(None);
    // Redis lost the log while the owner went on (events 4..=9 are gone for good).
    store.lose_log("s");
    store
        .append("s", &lease, &tokens(10, 11), &Progress::default())
        .await
        .unwrap();
    let epoch = epoch_of(&store).await;
    relay
        .on_message_for_test(&payload(&epoch, &tokens(11, 11)[0]))
        .await;

    let resync = sub.live.try_recv().unwrap();
    assert_eq!(resync.seq, 9, "in the place of the last lost event");
    let EventBody::Resync { state, .. } = &resync.body else {
        panic!("a resync first: {:?}", resync.body)
    };
    assert_eq!((state.oldest_seq, state.last_seq), (10, 11));
    let after: Vec<u64> = std::iter::from_fn(|| sub.live.try_recv().ok())
        .map(|e| e.seq)
        .collect();
    assert_eq!(after, [10, 11]);
    assert_eq!(relay.cluster_stats().relay_resyncs.get(), 1);
    // A client resuming from before the loss gets the resync in its replay, where the gap is.
    let late = handle.subscribe(Some(2));
    let replay: Vec<(u64, &str)> = late.replay.iter().map(|e| (e.seq, e.kind())).collect();
    assert_eq!(
        replay,
        [(3, "token"), (9, "resync"), (10, "token"), (11, "token")]
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_epoch_that_still_covers_the_relay_goes_on_without_a_resync() {
    let store = store();
    let (mut relay, handle, lease) = relay_of(&store).await;
    store
        .append("s", &lease, &tokens(1, 3), &Progress::default())
        .await
        .unwrap();
    relay.catch_up(true).await;
    let mut sub = handle.subscribe(None);
    // Redis restarted between two appends: nothing this relay had not seen was lost.
    store.lose_log("s");
    store
        .append("s", &lease, &tokens(4, 5), &Progress::default())
        .await
        .unwrap();
    let epoch = epoch_of(&store).await;
    relay
        .on_message_for_test(&payload(&epoch, &tokens(4, 4)[0]))
        .await;
    relay
        .on_message_for_test(&payload(&epoch, &tokens(5, 5)[0]))
        .await;
    let seqs: Vec<u64> = std::iter::from_fn(|| sub.live.try_recv().ok())
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [4, 5]);
    assert_eq!(relay.cluster_stats().relay_resyncs.get(), 0);
}

#[test]
fn the_turns_to_store_again_are_those_finished_after_the_stored_mark() {
    let start = |seq, n: u32| {
        Arc::new(Published::new(
            "s",
            seq,
            EventBody::TurnStart {
                turn_number: n,
                user_text: format!("q{n}"),
                client_id: None,
            },
        ))
    };
    let end = |seq, n: u32| {
        Arc::new(Published::new(
            "s",
            seq,
            EventBody::TurnEnd(Box::new(TurnEndEvent {
                turn_number: n,
                reply_text: format!("a{n}"),
                actions: Vec::new(),
                usage: None,
                finish_reason: FinishReason::Stop,
                interrupted: false,
                provider: None,
                model: None,
            })),
        ))
    };
    // Turn 1's start is older than the log; turn 4 is still open.
    let events = vec![
        end(10, 1),
        start(11, 2),
        end(15, 2),
        start(16, 3),
        end(20, 3),
        start(21, 4),
    ];
    let numbers = |stored| -> Vec<(u32, String, u64)> {
        finished_after(&events, stored)
            .into_iter()
            .map(|t| (t.number, t.user_text, t.end_seq))
            .collect()
    };
    assert_eq!(
        numbers(None),
        [(2, "q2".to_owned(), 15), (3, "q3".to_owned(), 20)],
        "without a mark, every turn the log keeps whole"
    );
    let mark = StoredThrough { turn: 2, end_seq: 15 };
    assert_eq!(numbers(Some(mark)), [(3, "q3".to_owned(), 20)]);
    let all = StoredThrough { turn: 3, end_seq: 20 };
    assert!(numbers(Some(all)).is_empty());
}
