//! The session task on its own, with paused time: a scripted provider stands in for the paid LLM
//! API at the trait level (scripted tokens, scripted delays); the stores are the real in-process
//! implementations, and for the full-queue case a real Redis client pointed at a closed port.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::session::TurnMode;
use crate::session::event::EndedBy;
use crate::session::log::Subscription;
use crate::session::testing::{Script, Setup, harness};

/// The next event's JSON, replayed ones first.
async fn next(sub: &mut Subscription) -> Value {
    let event = if sub.replay.is_empty() {
        sub.live.recv().await.expect("the log is open")
    } else {
        sub.replay.remove(0)
    };
    serde_json::from_str(event.json.as_str()).unwrap()
}

/// Events up to and including the first one of type `kind` (for `turn`, when given).
async fn until(sub: &mut Subscription, kind: &str, turn: Option<u32>) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next(sub).await;
        let hit = e["type"] == kind && turn.is_none_or(|t| e["turn_number"] == t);
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

/// How long a command may take at most, in paused time, to count as answered at once.
const PROMPT: Duration = Duration::from_millis(5);

#[tokio::test(start_paused = true)]
async fn a_turn_streams_its_tokens_and_ends_with_the_provider_and_model() {
    let h = harness(Setup::default());
    let (s, mut sub) = h.session();

    let n = s
        .user_message("hello".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    let events = until(&mut sub, "turn_end", Some(n)).await;

    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["session", "turn_start", "token", "token", "token", "turn_end"]
    );
    let end = events.last().unwrap();
    assert_eq!(end["reply_text"], "w0 w1 w2 ");
    assert_eq!(end["finish_reason"], "stop");
    assert_eq!(end["interrupted"], false);
    assert_eq!(
        (end["provider"].as_str(), end["model"].as_str()),
        (Some("openai"), Some("scripted"))
    );
    assert_eq!(end["usage"]["completion_tokens"], 3);
    let stats = h.manager.stats();
    assert_eq!((stats.first_token.count(), stats.prompt.count()), (1, 1));
    let (wb, memory) = h.stop().await;
    assert_eq!(wb.stats().written.load(Ordering::Relaxed), 1);
    assert_eq!(memory.list("u", "c", 10, 0).await.unwrap().1, 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_sent_while_a_reply_streams_waits_for_it() {
    let h = harness(Setup::default());
    let (s, mut sub) = h.session();

    let first = s.user_message("one".into(), TurnMode::Queue, None).await.unwrap();
    let second = s.user_message("two".into(), TurnMode::Queue, None).await.unwrap();
    assert_eq!(s.info().await.unwrap().queued_turns, 1);

    let events = until(&mut sub, "turn_end", Some(second)).await;
    let order: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["type"] == "turn_start" || e["type"] == "turn_end")
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["turn_number"].as_u64().unwrap(),
            )
        })
        .collect();
    let (f, sc) = (u64::from(first), u64::from(second));
    assert_eq!(
        order,
        [
            ("turn_start".to_owned(), f),
            ("turn_end".to_owned(), f),
            ("turn_start".to_owned(), sc),
            ("turn_end".to_owned(), sc)
        ]
    );
    assert!(
        events.iter().all(|e| e["interrupted"] != true),
        "nothing was interrupted"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_interrupting_message_ends_the_reply_as_interrupted_and_drops_its_upstream() {
    let h = harness(Setup {
        scripts: vec![Script::Reply {
            tokens: 100,
            gap: Duration::from_millis(100),
        }],
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    let first = s
        .user_message("long".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    until(&mut sub, "token", Some(first)).await;

    let second = s
        .user_message("now".into(), TurnMode::Interrupt, None)
        .await
        .unwrap();

    let events = until(&mut sub, "turn_end", Some(first)).await;
    let end = events.last().unwrap();
    assert_eq!(
        (end["finish_reason"].as_str(), end["interrupted"].as_bool()),
        (Some("interrupted"), Some(true))
    );
    let next_start = until(&mut sub, "turn_start", Some(second)).await;
    assert_eq!(
        next_start.len(),
        1,
        "the new turn starts right after the interrupted one ends"
    );
    assert_eq!(
        h.open.load(Ordering::SeqCst),
        1,
        "the first upstream stream was dropped"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_drops_the_upstream_at_once_and_stores_the_partial_turn() {
    let h = harness(Setup {
        scripts: vec![Script::Reply {
            tokens: 100,
            gap: Duration::from_millis(100),
        }],
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    let n = s
        .user_message("long".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    until(&mut sub, "token", Some(n)).await;
    until(&mut sub, "token", Some(n)).await;

    let began = tokio::time::Instant::now();
    assert!(s.cancel().await.unwrap(), "a reply was running");
    assert!(began.elapsed() < PROMPT, "answered at once");
    assert_eq!(h.open.load(Ordering::SeqCst), 0, "the upstream stream is gone");

    let end = until(&mut sub, "turn_end", Some(n)).await.pop().unwrap();
    assert_eq!(end["finish_reason"], "cancelled");
    assert_eq!(end["interrupted"], true);
    assert_eq!(end["reply_text"], "w0 w1 ");
    assert!(!s.cancel().await.unwrap(), "nothing runs any more");
    assert_eq!(h.manager.stats().turns_interrupted.get(), 1);
    let (wb, memory) = h.stop().await;
    assert_eq!(
        wb.stats().written.load(Ordering::Relaxed),
        1,
        "the partial turn is stored"
    );
    assert_eq!(memory.list("u", "c", 10, 0).await.unwrap().1, 1);
}

#[tokio::test(start_paused = true)]
async fn cancel_while_the_prompt_is_assembled_drops_the_turn_before_any_token() {
    let h = harness(Setup {
        scripts: vec![Script::Reply {
            tokens: 3,
            gap: Duration::from_secs(5),
        }],
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    let n = s.user_message("hi".into(), TurnMode::Queue, None).await.unwrap();
    until(&mut sub, "turn_start", Some(n)).await;

    assert!(
        s.cancel().await.unwrap(),
        "the turn counts as running while it is routed"
    );

    let end = until(&mut sub, "turn_end", Some(n)).await.pop().unwrap();
    assert_eq!(
        (end["finish_reason"].as_str(), end["reply_text"].as_str()),
        (Some("cancelled"), Some(""))
    );
    assert_eq!(
        h.open.load(Ordering::SeqCst),
        0,
        "no upstream stream is left open"
    );
    assert_eq!(h.manager.stats().tokens.get(), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_routing_failure_publishes_the_error_and_a_failed_turn_end() {
    let h = harness(Setup {
        scripts: vec![
            Script::Refuse,
            Script::Reply {
                tokens: 1,
                gap: Duration::from_millis(1),
            },
        ],
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    let n = s.user_message("hi".into(), TurnMode::Queue, None).await.unwrap();

    let events = until(&mut sub, "turn_end", Some(n)).await;
    let error = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("an error event");
    assert_eq!(error["turn_number"], n);
    assert_eq!(error["retryable"], true, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("scripted outage"),
        "{error}"
    );
    let end = events.last().unwrap();
    assert_eq!(
        (end["finish_reason"].as_str(), end["interrupted"].as_bool()),
        (Some("error"), Some(true))
    );
    assert!(end.get("provider").is_none(), "no model served: {end}");
    assert_eq!(h.manager.stats().turns_failed.get(), 1);

    // The session goes on.
    let again = s
        .user_message("again".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    let end = until(&mut sub, "turn_end", Some(again)).await.pop().unwrap();
    assert_eq!(end["finish_reason"], "stop");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_without_connections_expires() {
    let h = harness(Setup {
        idle: Duration::from_secs(60),
        ..Setup::default()
    });
    let (s, sub) = h.session();
    drop(sub);

    tokio::time::sleep(Duration::from_secs(59)).await;
    assert!(h.manager.get(&s.id).is_some(), "not idle long enough yet");
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert!(h.manager.get(&s.id).is_none(), "expired");
    assert_eq!(h.manager.ended(&s.id).unwrap().ended_by, EndedBy::Expired);
    assert_eq!(h.manager.stats().expired.get(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_attached_connection_keeps_an_idle_session_alive() {
    let h = harness(Setup {
        idle: Duration::from_secs(60),
        ..Setup::default()
    });
    let (s, _sub) = h.session();

    tokio::time::sleep(Duration::from_secs(300)).await;

    assert!(h.manager.get(&s.id).is_some(), "a connection is activity");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn end_when_idle_lets_the_running_and_queued_turns_finish_first() {
    let h = harness(Setup::default());
    let (s, mut sub) = h.session();
    s.user_message("one".into(), TurnMode::Queue, None).await.unwrap();
    let second = s.user_message("two".into(), TurnMode::Queue, None).await.unwrap();

    s.end_when_idle().await.unwrap();

    assert_eq!(next(&mut sub).await["status"], "active");
    let events = until(&mut sub, "session", None).await;
    let ended = events.last().unwrap();
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["turn_count"], 2);
    let last_end = events.iter().rfind(|e| e["type"] == "turn_end").unwrap();
    assert_eq!(
        (
            last_end["turn_number"].as_u64(),
            last_end["interrupted"].as_bool()
        ),
        (Some(u64::from(second)), Some(false))
    );
    tokio::task::yield_now().await;
    assert_eq!(h.manager.ended(&s.id).unwrap().ended_by, EndedBy::Ended);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_interrupts_the_reply_and_stores_it_before_write_behind_stops() {
    let h = harness(Setup {
        scripts: vec![Script::Reply {
            tokens: 100,
            gap: Duration::from_millis(100),
        }],
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    let n = s
        .user_message("long".into(), TurnMode::Queue, None)
        .await
        .unwrap();
    until(&mut sub, "token", Some(n)).await;

    h.shutdown.cancel();

    let end = until(&mut sub, "turn_end", Some(n)).await.pop().unwrap();
    assert_eq!(end["finish_reason"], "server_shutdown");
    let error = until(&mut sub, "error", None).await.pop().unwrap();
    assert_eq!(error["code"], "server_shutdown");
    let (wb, _) = h.stop().await;
    assert_eq!(wb.stats().written.load(Ordering::Relaxed), 1);
}

/// Issue 10 (7g): a full write-behind queue in front of a store that cannot answer must not hold
/// up the session: cancel and the next turn are answered at once, and every turn is still stored
/// (or counted as given up for the store that is down), none dropped.
#[tokio::test(start_paused = true)]
async fn a_full_write_behind_queue_does_not_hold_up_cancel_or_the_next_turn() {
    let h = harness(Setup {
        queue_capacity: 1,
        max_attempts: 3,
        context: Some(crate::persist::tests::unreachable_redis()),
        ..Setup::default()
    });
    let (s, mut sub) = h.session();
    // Turn 1 keeps the worker busy retrying, turn 2 fills the queue, turn 3 finds it full.
    for text in ["one", "two", "three"] {
        let n = s.user_message(text.into(), TurnMode::Queue, None).await.unwrap();
        until(&mut sub, "turn_end", Some(n)).await;
    }

    let began = tokio::time::Instant::now();
    let cancelled = tokio::time::timeout(PROMPT, s.cancel()).await;
    assert!(
        matches!(cancelled, Ok(Ok(false))),
        "cancel is answered at once: {cancelled:?}"
    );
    let fourth = tokio::time::timeout(PROMPT, s.user_message("four".into(), TurnMode::Queue, None)).await;
    let fourth = fourth.expect("the next turn is accepted at once").unwrap();
    until(&mut sub, "token", Some(fourth)).await;
    assert!(
        began.elapsed() < Duration::from_millis(100),
        "it streams without waiting for storage"
    );
    until(&mut sub, "turn_end", Some(fourth)).await;

    let (wb, memory) = h.stop().await;
    let stats = wb.stats();
    assert_eq!(stats.enqueued.load(Ordering::Relaxed), 4);
    assert!(
        stats.queue_full_waits.load(Ordering::Relaxed) >= 1,
        "the queue was full"
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        4,
        "each turn is counted as given up for Redis"
    );
    assert_eq!(
        memory.list("u", "c", 10, 0).await.unwrap().1,
        4,
        "and each is in long-term memory"
    );
}

#[test]
fn a_sessions_command_channel_holds_pointers_because_it_allocates_32_slots_at_once() {
    // tokio's mpsc allocates a block of 32 slots with the channel, each as large as what the
    // channel carries: with the job update inline (208 bytes) that was 6.6 KiB per session,
    // with 64-byte commands 2 KiB.
    fn slot<T>(_: &tokio::sync::mpsc::Sender<T>) -> usize {
        std::mem::size_of::<T>()
    }
    let (tx, _rx) = super::command_channel(1);
    assert_eq!(slot(&tx), std::mem::size_of::<usize>());
    // And a command stays small, so its box does too.
    assert!(std::mem::size_of::<super::Command>() <= 72);
}

#[test]
fn an_idle_sessions_actor_stays_small_because_its_turn_is_boxed() {
    // Every live session holds its actor for its whole life, idle or not: 976 bytes with the
    // turn and the session limits inline (mimalloc's 1 KiB size class), 496 without.
    eprintln!("Actor {} bytes", std::mem::size_of::<super::Actor>());
    assert!(std::mem::size_of::<super::Actor>() <= 512);
}
