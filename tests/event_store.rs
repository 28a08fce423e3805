//! The shared session store's one test suite, run against both implementations: the Redis one
//! (real Redis, a key prefix per test) and the in-process one. Fencing, epochs, trimming,
//! duplicates and the metadata must behave the same in both.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use coachd::session::event::{EndedBy, EventBody, Published, SessionStatus, TransportKind};
use coachd::session::store::{
    Appended, EventStore, InProcessEventStore, Lease, OpenTurn, Progress, RedisEventStore, SessionMeta,
    StoreLimits,
};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, PubsubInterface};

const LIMITS: StoreLimits = StoreLimits {
    log_events: 50,
    session_ttl: Duration::from_secs(600),
    lease_ttl: Duration::from_secs(60),
};

fn meta(id: &str) -> SessionMeta {
    SessionMeta {
        session_id: id.to_owned(),
        user_id: "u1".into(),
        coach_id: "c1".into(),
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

fn token(id: &str, seq: u64) -> Arc<Published> {
    Arc::new(Published::new(
        id,
        seq,
        EventBody::Token {
            turn_number: 1,
            text: format!("t{seq} \"q\""),
            index: u32::try_from(seq).unwrap(),
        },
    ))
}

fn tokens(id: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Arc<Published>> {
    seqs.map(|s| token(id, s)).collect()
}

fn seqs(events: &[Arc<Published>]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// What each implementation must do; `lose` makes the store forget a session's log and
/// counter, as a Redis restart without persistence would.
struct Backend {
    store: Arc<dyn EventStore>,
    lose: Box<dyn Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
}

async fn redis_backend() -> (Backend, RedisEventStore) {
    let conn = coachd::redis::connect(
        &coachd::secret::ServiceUrl::new(url::Url::parse(&common::redis_url()).unwrap()),
        None,
        2,
        Duration::from_secs(2),
    )
    .unwrap();
    conn.pool.wait_for_connect().await.unwrap();
    let store = RedisEventStore::new(conn.pool.clone(), common::fresh_prefix(), LIMITS);
    let keys = store.clone();
    let lose = Box::new(move |id: String| {
        let keys = keys.clone();
        Box::pin(async move {
            let doomed = vec![keys.key(&id, "seq"), keys.key(&id, "log")];
            keys.pool().del::<i64, _>(doomed).await.unwrap();
        }) as futures::future::BoxFuture<'static, ()>
    });
    (
        Backend {
            store: Arc::new(store.clone()),
            lose,
        },
        store,
    )
}

fn in_process_backend() -> Backend {
    let store = Arc::new(InProcessEventStore::new(LIMITS));
    let handle = store.clone();
    Backend {
        store,
        lose: Box::new(move |id: String| {
            handle.lose_log(&id);
            Box::pin(async {}) as futures::future::BoxFuture<'static, ()>
        }),
    }
}

async fn appends_keep_one_order_and_drop_duplicates(b: &Backend) {
    let s = &b.store;
    let lease = s.create(&meta("s1"), "node-a").await.unwrap().unwrap();
    let progress = Progress::default();
    let Appended::Ok { epoch, last_seq } = s
        .append("s1", &lease, &tokens("s1", 1..=5), &progress)
        .await
        .unwrap()
    else {
        panic!("fenced")
    };
    assert_eq!(last_seq, 5);
    // A batch overlapping what is stored (a retried append) adds only the new events.
    let again = s
        .append("s1", &lease, &tokens("s1", 4..=7), &progress)
        .await
        .unwrap();
    assert_eq!(
        again,
        Appended::Ok {
            epoch: epoch.clone(),
            last_seq: 7
        }
    );

    let h = s.history("s1", 2, 100).await.unwrap();
    assert_eq!(h.epoch.as_deref(), Some(epoch.as_str()));
    assert_eq!((h.last_seq, h.oldest_seq), (7, Some(1)));
    assert_eq!(seqs(&h.events), [3, 4, 5, 6, 7]);
    assert_eq!(
        h.events[0].json,
        token("s1", 3).json,
        "the stored bytes are the published bytes"
    );
    assert!(h.covers(0) && h.covers(7));
    assert_eq!(seqs(&s.history("s1", 2, 2).await.unwrap().events), [3, 4]);
}

async fn a_lease_once_replaced_is_fenced(b: &Backend) {
    let s = &b.store;
    let first = s.create(&meta("s2"), "node-a").await.unwrap().unwrap();
    assert_eq!(s.owner("s2").await.unwrap(), Some(first.clone()));
    assert!(s.acquire("s2", "node-b").await.unwrap().is_none(), "held");
    assert!(
        s.create(&meta("s2"), "node-b").await.unwrap().is_none(),
        "a registration never steals a live lease"
    );
    assert_eq!(
        s.owner("s2").await.unwrap(),
        Some(first.clone()),
        "still the first"
    );
    assert!(s.renew("s2", &first).await.unwrap());

    assert!(s.release("s2", &first).await.unwrap());
    let second = s
        .acquire("s2", "node-b")
        .await
        .unwrap()
        .expect("free after release");
    assert!(second.fence > first.fence, "fencing tokens only grow");
    assert_eq!(second.node, "node-b");

    let stale = s
        .append("s2", &first, &tokens("s2", 1..=1), &Progress::default())
        .await
        .unwrap();
    assert_eq!(stale, Appended::Fenced);
    assert!(!s.renew("s2", &first).await.unwrap());
    assert!(!s.release("s2", &first).await.unwrap());
    assert!(
        s.history("s2", 0, 10).await.unwrap().events.is_empty(),
        "a fenced append writes nothing"
    );
    let forged = Lease {
        node: "node-b".into(),
        fence: second.fence + 1,
    };
    assert_eq!(
        s.append("s2", &forged, &tokens("s2", 1..=1), &Progress::default())
            .await
            .unwrap(),
        Appended::Fenced
    );
    assert!(matches!(
        s.append("s2", &second, &tokens("s2", 1..=1), &Progress::default())
            .await
            .unwrap(),
        Appended::Ok { last_seq: 1, .. }
    ));
}

async fn a_lost_log_gets_a_new_epoch_and_stops_covering(b: &Backend) {
    let s = &b.store;
    let lease = s.create(&meta("s3"), "node-a").await.unwrap().unwrap();
    let Appended::Ok { epoch: before, .. } = s
        .append("s3", &lease, &tokens("s3", 1..=10), &Progress::default())
        .await
        .unwrap()
    else {
        panic!("fenced")
    };
    (b.lose)("s3".into()).await;
    let lost = s.history("s3", 4, 10).await.unwrap();
    assert_eq!(lost.epoch, None, "no log");

    // The owner goes on numbering; the new log starts where it is.
    let Appended::Ok {
        epoch: after,
        last_seq,
    } = s
        .append("s3", &lease, &tokens("s3", 14..=16), &Progress::default())
        .await
        .unwrap()
    else {
        panic!("fenced")
    };
    assert_ne!(after, before);
    assert_eq!(last_seq, 16);
    let h = s.history("s3", 4, 10).await.unwrap();
    assert_eq!(h.oldest_seq, Some(14));
    assert!(!h.covers(4), "a reader at seq 4 missed 5..13");
    assert!(h.covers(13));
    assert_eq!(seqs(&h.events), [14, 15, 16]);
}

async fn the_log_is_capped(b: &Backend) {
    let s = &b.store;
    let lease = s.create(&meta("s4"), "node-a").await.unwrap().unwrap();
    for chunk in 0..10u64 {
        let first = chunk * 20 + 1;
        s.append(
            "s4",
            &lease,
            &tokens("s4", first..=first + 19),
            &Progress::default(),
        )
        .await
        .unwrap();
    }
    let h = s.history("s4", 0, 1_000).await.unwrap();
    assert_eq!(h.last_seq, 200);
    // `MAXLEN ~` trims whole nodes only, so Redis may keep somewhat more than the cap.
    assert!(
        h.events.len() >= 50 && h.events.len() < 200,
        "kept {}",
        h.events.len()
    );
    assert_eq!(h.events.last().unwrap().seq, 200);
    assert!(!h.covers(10));
    assert!(h.covers(199));
}

async fn metadata_follows_progress_and_end(b: &Backend) {
    let s = &b.store;
    assert!(s.meta("nope").await.unwrap().is_none());
    assert!(
        s.acquire("nope", "node-a").await.unwrap().is_none(),
        "no session, no lease"
    );
    let lease = s.create(&meta("s5"), "node-a").await.unwrap().unwrap();
    let progress = Progress {
        turns_done: 2,
        next_turn: 4,
        open_turn: Some(OpenTurn {
            number: 3,
            start_seq: 9,
            user_text: "and then?".into(),
        }),
    };
    // Progress moves with a turn's start or end (the writer tracks it from the events).
    let mut batch = tokens("s5", 1..=8);
    batch.push(Arc::new(Published::new(
        "s5",
        9,
        EventBody::TurnStart {
            turn_number: 3,
            user_text: "and then?".into(),
            client_id: None,
        },
    )));
    s.append("s5", &lease, &batch, &progress).await.unwrap();
    let m = s.meta("s5").await.unwrap().unwrap();
    assert_eq!((m.user_id.as_str(), m.coach_id.as_str()), ("u1", "c1"));
    assert_eq!(m.transport, TransportKind::WebSocket);
    assert_eq!(m.status, SessionStatus::Active);
    assert_eq!(m.progress, progress);

    let done = Progress {
        turns_done: 3,
        next_turn: 4,
        open_turn: None,
    };
    assert!(s.end("s5", &lease, EndedBy::Expired, &done).await.unwrap());
    let m = s.meta("s5").await.unwrap().unwrap();
    assert_eq!(m.status, SessionStatus::Ended);
    assert_eq!(m.ended_by, Some(EndedBy::Expired));
    assert!(m.ended_at.is_some());
    assert_eq!(m.progress, done);
    assert!(s.owner("s5").await.unwrap().is_none());
    assert!(
        s.acquire("s5", "node-b").await.unwrap().is_none(),
        "an ended session is not taken over"
    );
}

async fn suite(b: Backend) {
    appends_keep_one_order_and_drop_duplicates(&b).await;
    a_lease_once_replaced_is_fenced(&b).await;
    a_lost_log_gets_a_new_epoch_and_stops_covering(&b).await;
    the_log_is_capped(&b).await;
    metadata_follows_progress_and_end(&b).await;
}

#[tokio::test]
async fn the_redis_store_passes_the_suite() {
    let (backend, _) = redis_backend().await;
    suite(backend).await;
}

#[tokio::test]
async fn the_in_process_store_passes_the_suite() {
    suite(in_process_backend()).await;
}

#[tokio::test]
async fn redis_keys_are_hash_tagged_prefixed_and_expire() {
    let (backend, store) = redis_backend().await;
    let lease = backend
        .store
        .create(&meta("s6"), "node-a")
        .await
        .unwrap()
        .unwrap();
    backend
        .store
        .append("s6", &lease, &tokens("s6", 1..=2), &Progress::default())
        .await
        .unwrap();
    for part in ["meta", "seq", "log", "lease", "fence"] {
        let key = store.key("s6", part);
        assert!(
            key.starts_with(store.prefix()) && key.contains("sess:{s6}:"),
            "{key}"
        );
        let ttl: i64 = store.pool().pttl(&key).await.unwrap();
        assert!(ttl > 0, "{key} has a TTL ({ttl})");
    }
}

#[tokio::test]
async fn each_appended_event_is_published_with_its_epoch_in_order() {
    let (backend, store) = redis_backend().await;
    let subscriber = store.pool().next().clone_new();
    subscriber.init().await.unwrap();
    let mut messages = subscriber.message_rx();
    subscriber.subscribe(store.channel("s7")).await.unwrap();

    let lease = backend
        .store
        .create(&meta("s7"), "node-a")
        .await
        .unwrap()
        .unwrap();
    let Appended::Ok { epoch, .. } = backend
        .store
        .append("s7", &lease, &tokens("s7", 1..=3), &Progress::default())
        .await
        .unwrap()
    else {
        panic!("fenced")
    };
    for expected in 1..=3 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .unwrap()
            .unwrap();
        let payload = m.value.as_string().unwrap();
        let (e, event) = coachd::session::store::parse_channel_message(&payload).unwrap();
        assert_eq!((e, event.seq), (epoch.as_str(), expected));
        assert_eq!(event.json, token("s7", expected).json);
    }
    subscriber.quit().await.unwrap();
}
