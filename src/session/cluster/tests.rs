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
use super::takeover::Recovered;
use super::writer::{OwnerSetup, Writer};
use crate::session::TurnMode;
use crate::session::event::{EndedBy, EventBody, SessionStatus, TransportKind};
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
    let lease = store.create(&meta(id), "node-a").await.unwrap();
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
    let lease = store.create(&meta("s"), "node-a").await.unwrap();
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
    };
    let session = h
        .manager
        .spawn_session("s".into(), Some(owner), Some(recovered))
        .unwrap();
    let mut sub = session.subscribe(Some(41));
    let first = sub.live.recv().await.unwrap();
    assert_eq!(first.seq, 42, "the log goes on from the shared log's seq");
    let EventBody::TurnEnd {
        turn_number,
        reply_text,
        finish_reason,
        interrupted,
        ..
    } = &first.body
    else {
        panic!("a turn_end first: {:?}", first.body)
    };
    assert_eq!(
        (*turn_number, reply_text.as_str(), interrupted),
        (3, "half a rep", &true)
    );
    assert_eq!(finish_reason.as_str(), "interrupted");
    assert!(matches!(
        sub.live.recv().await.unwrap().body,
        EventBody::Session { turn_count: 3, .. }
    ));

    let n = session
        .user_message("four".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    assert_eq!(n, 4, "turn numbers go on");

    // The interrupted turn went to write-behind like any other.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let context = h.manager.deps.context.recent_messages("s", 10).await.unwrap();
    let texts: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(&texts[..2], ["three", "half a rep"]);
    // The shared log got the new events, numbered on.
    let shared = store.history("s", 41, 10).await.unwrap();
    assert_eq!(shared.events.first().map(|e| e.seq), Some(42));
    h.stop().await;
}
