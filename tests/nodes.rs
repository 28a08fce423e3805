//! Several coachd nodes on one Redis and one PostgreSQL (app instances in this process, each with
//! its own listener, node id and session task set, sharing a key prefix and a database): any
//! node serves any session. Clients are deliberately spread over the nodes; every event is
//! validated against `proto/server.schema.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Script};
use common::TestApp;
use common::realtime::{Session, WsRead, tokens_text, ws_connect, ws_next, ws_send, ws_until};
use common::services::{OwnRedis, free_port, redis_client};
use fred::interfaces::{ClientLike, KeysInterface, ListInterface};
use serde_json::{Value, json};

/// The settings of one node on the fake upstream, database `db` and key prefix `prefix` at `redis`.
fn node_env(fake: &FakeUpstream, node: &str, db: &str, prefix: &str, redis: &str) -> Vec<(String, String)> {
    [
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "test-key"),
        ("OPENAI_MODEL", "gpt-test"),
        ("COACHD_OPENAI_BASE_URL", fake.base_url().as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_LLM_RETRY_BASE_MS", "1"),
        ("COACHD_REDIS_KEY_PREFIX", prefix),
        ("DATABASE_URL", db),
        ("REDIS_URL", redis),
        ("COACHD_NODE_ID", node),
        // Short enough for takeovers within a test, long enough for a loaded machine to renew.
        ("COACHD_CLUSTER_LEASE_MS", "1500"),
        ("COACHD_CLUSTER_HEARTBEAT_SECS", "1"),
        // One embedder for every node, child processes included (start-up refuses a database
        // another embedder filled).
        ("COACHD_EMBEDDING_PROVIDER", "offline"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// An app instance in this process with `vars`.
async fn node_app(vars: &[(String, String)]) -> TestApp {
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    common::spawn_app_with(common::Services::Embedded, &pairs).await
}

/// `n` nodes (`node-a`, `node-b`, ...) on the fake upstream, one database and one key prefix
/// (on the shared Redis, or the one at `redis_url`).
async fn nodes(n: usize, fake: &FakeUpstream, redis_url: Option<&str>) -> Vec<TestApp> {
    let prefix = common::fresh_prefix();
    let db = common::fresh_database().await;
    let redis = redis_url.map_or_else(common::redis_url, str::to_owned);
    let mut apps = Vec::new();
    for i in 0..n {
        let node = format!("node-{}", (b'a' + i as u8) as char);
        apps.push(node_app(&node_env(fake, &node, &db, &prefix, &redis)).await);
    }
    apps
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let resp = app.client.post(app.url(path)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn turn_tokens(events: &[Value], turn: u64) -> Vec<(u64, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "token" && e["turn_number"] == turn)
        .map(|e| (e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap().to_owned()))
        .collect()
}

/// The WebSocket's events up to the `turn_end` of `turn`.
async fn ws_turn(ws: &mut common::realtime::Ws, turn: u64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let batch = ws_until(ws, "turn_end").await;
        let done = batch.last().is_some_and(|e| e["turn_number"] == turn);
        out.extend(batch);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn a_session_made_on_a_streams_to_b_and_c_in_one_order_with_the_turn_sent_through_c() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(40).paced(Duration::from_millis(20), Duration::from_millis(5)));
    let apps = nodes(3, &fake, None).await;
    let (a, b, c) = (&apps[0], &apps[1], &apps[2]);
    let session = a.create_session("u1", "sales", "websocket").await;

    // The token issued by A is accepted by B and C; the session is found on both.
    let mut ws_b = ws_connect(b, &session, "").await;
    let mut ws_a = ws_connect(a, &session, "").await;
    let first_b = match ws_next(&mut ws_b).await {
        WsRead::Event(e) => e,
        WsRead::Close(code) => panic!("closed {code:?}"),
    };
    assert_eq!(first_b["type"], "session");
    assert_eq!(first_b["user_id"], "u1");
    let status = c.get(&format!("/realtime/sessions/{}", session.id)).await;
    assert_eq!(status.status(), 200);
    let info: Value = status.json().await.unwrap();
    assert_eq!(
        (info["user_id"].as_str(), info["status"].as_str()),
        (Some("u1"), Some("active"))
    );

    let sse_c = c
        .client
        .get(c.url(&format!(
            "/realtime/sessions/{}/events?token={}",
            session.id, session.token
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(sse_c.status(), 200);
    let mut sse_c = common::realtime::SseReader::new(sse_c);

    let (status, reply) = post(
        c,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "hi"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let expected: String = (0..40)
        .map(|i| if i == 0 { "t0".to_owned() } else { format!(" t{i}") })
        .collect();
    assert_eq!(reply["reply_text"], expected.as_str());

    let on_a = ws_turn(&mut ws_a, 1).await;
    let on_b = ws_turn(&mut ws_b, 1).await;
    let mut on_c = Vec::new();
    loop {
        let ev = sse_c.next().await.expect("SSE event");
        let end = ev.event == "turn_end";
        on_c.push(ev.data);
        if end {
            break;
        }
    }
    let (ta, tb, tc) = (
        turn_tokens(&on_a, 1),
        turn_tokens(&on_b, 1),
        turn_tokens(&on_c, 1),
    );
    assert_eq!(ta.len(), 40);
    assert_eq!(
        ta, tb,
        "A's and B's clients see the same tokens with the same seqs"
    );
    assert_eq!(ta, tc, "and so does C's SSE client");
    assert_eq!(tokens_text(&on_b), expected);
    for events in [&on_a, &on_b, &on_c] {
        let s = seqs(events);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "seqs rise: {s:?}");
    }

    // Stats show the cluster: three nodes alive, the session on A, B relaying it.
    let stats: Value = b.get("/realtime/stats").await.json().await.unwrap();
    assert_eq!(stats["node_id"], "node-b");
    assert_eq!(stats["cluster"]["relayed_sessions"], 1);
    assert!(stats["cluster"]["counters"]["relayed"].as_u64().unwrap() >= 40);
    let health: Value = c.get("/health/all").await.json().await.unwrap();
    assert_eq!(health["node_id"], "node-c");
    let stats: Value = a.get("/realtime/stats").await.json().await.unwrap();
    let nodes = stats["cluster"]["nodes"].as_array().unwrap().clone();
    let mut ids: Vec<&str> = nodes.iter().map(|n| n["node_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["node-a", "node-b", "node-c"]);
    assert!(
        stats["cluster"]["counters"]["served"].as_u64().unwrap() >= 1,
        "C's turn was served by A"
    );

    // Ending through B ends it everywhere; C then reports the ended record.
    let (status, ended) = post(b, &format!("/realtime/sessions/{}/end", session.id), json!({})).await;
    assert_eq!(status, 200, "{ended}");
    assert_eq!(ended["turn_count"], 1);
    let closed = loop {
        match ws_next(&mut ws_b).await {
            WsRead::Event(_) => {}
            WsRead::Close(code) => break code,
        }
    };
    assert_eq!(closed, Some(1000));
    let mut record = Value::Null;
    for _ in 0..50 {
        record = c
            .get(&format!("/realtime/sessions/{}", session.id))
            .await
            .json()
            .await
            .unwrap();
        if record["status"] == "ended" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(record["status"], "ended");
    assert_eq!(record["turn_count"], 1);
    let (status, body) = post(
        c,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "again"}),
    )
    .await;
    assert_eq!(status, 410, "{body}");
    for app in apps {
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_connection_dropped_on_b_mid_turn_resumes_on_a_from_its_seq() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(60).paced(Duration::from_millis(10), Duration::from_millis(10)));
    let apps = nodes(2, &fake, None).await;
    let (a, b) = (&apps[0], &apps[1]);
    let session = a.create_session("u2", "sales", "websocket").await;
    let mut ws_b = ws_connect(b, &session, "").await;
    ws_send(&mut ws_b, json!({"type": "user_message", "text": "go"})).await;
    let mut seen = Vec::new();
    while turn_tokens(&seen, 1).len() < 10 {
        match ws_next(&mut ws_b).await {
            WsRead::Event(e) => seen.push(e),
            WsRead::Close(code) => panic!("closed {code:?}"),
        }
    }
    drop(ws_b);
    let last = *seqs(&seen).last().unwrap();

    let mut ws_a = ws_connect(a, &session, &format!("&after_seq={last}")).await;
    let rest = ws_turn(&mut ws_a, 1).await;
    // The connection's first event is the session state; the replay follows from last + 1.
    let after: Vec<&Value> = rest.iter().filter(|e| e["type"] != "session").collect();
    assert_eq!(
        after[0]["seq"].as_u64().unwrap(),
        last + 1,
        "no gap, no duplicate"
    );
    let mut all = seen.clone();
    all.extend(rest.into_iter().filter(|e| e["type"] != "session"));
    let expected: String = (0..60)
        .map(|i| if i == 0 { "t0".to_owned() } else { format!(" t{i}") })
        .collect();
    assert_eq!(tokens_text(&all), expected);
    let end = all.last().unwrap();
    assert_eq!(end["reply_text"], expected.as_str());
    for app in apps {
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_cancel_sent_to_b_stops_the_upstream_request_on_a() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(1000).paced(Duration::ZERO, Duration::from_millis(20)));
    let apps = nodes(2, &fake, None).await;
    let (a, b) = (&apps[0], &apps[1]);
    let session = a.create_session("u3", "sales", "websocket").await;
    let mut ws_a = ws_connect(a, &session, "").await;
    ws_send(&mut ws_a, json!({"type": "user_message", "text": "long one"})).await;
    ws_until(&mut ws_a, "token").await;

    let (status, body) = post(b, &format!("/realtime/sessions/{}/cancel", session.id), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancelled"], true);
    assert_eq!(
        fake.wait_disconnects(1, Duration::from_secs(5)).await,
        1,
        "the fake upstream saw A's request go away"
    );
    let events = ws_until(&mut ws_a, "turn_end").await;
    let end = events.last().unwrap();
    assert_eq!(end["finish_reason"], "cancelled");
    assert_eq!(end["interrupted"], true);
    for app in apps {
        app.stop().await.unwrap();
    }
}

/// The session context write-behind stored under `key`, once it holds `n` messages (5 s at most).
async fn stored_context(redis: &fred::clients::Client, key: &str, n: usize) -> Vec<Value> {
    let mut stored: Vec<String> = Vec::new();
    for _ in 0..100 {
        stored = redis.lrange(key, 0, -1).await.unwrap();
        if stored.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stored.iter().map(|s| serde_json::from_str(s).unwrap()).collect()
}

#[tokio::test]
async fn when_the_owner_loses_its_lease_mid_turn_another_node_takes_over_and_stores_the_partial_turn() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(1000).paced(Duration::ZERO, Duration::from_millis(10)));
    let apps = nodes(3, &fake, None).await;
    let (a, b, c) = (&apps[0], &apps[1], &apps[2]);
    let session = a.create_session("u4", "sales", "websocket").await;
    let mut ws_a = ws_connect(a, &session, "").await;
    let mut ws_b = ws_connect(b, &session, "").await;
    ws_send(
        &mut ws_b,
        json!({"type": "user_message", "text": "tell me everything"}),
    )
    .await;
    let mut seen = Vec::new();
    while turn_tokens(&seen, 1).len() < 20 {
        match ws_next(&mut ws_b).await {
            WsRead::Event(e) => seen.push(e),
            WsRead::Close(code) => panic!("closed {code:?}"),
        }
    }

    // A "dies": its lease goes to a node that is gone too (it never renews), so A is fenced at
    // its next append and stops, and the lease lapses 600 ms later.
    let redis = redis_client(&common::redis_url()).await;
    let lease_key = format!(
        "{}sess:{{{}}}:lease",
        a.state.settings.redis_key_prefix, session.id
    );
    let killed = Instant::now();
    redis
        .set::<(), _, _>(
            &lease_key,
            "ghost/999999",
            Some(fred::types::Expiration::PX(600)),
            None,
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        fake.wait_disconnects(1, Duration::from_secs(5)).await,
        1,
        "the fenced owner dropped its upstream request"
    );

    // A's own client is told the session moved, so it reconnects instead of giving up.
    let code = loop {
        match ws_next(&mut ws_a).await {
            WsRead::Event(_) => {}
            WsRead::Close(code) => break code,
        }
    };
    assert_eq!(code, Some(4003));

    // B's relay notices the lapsed lease and takes over; the streaming turn ends interrupted
    // with the partial text that reached the log.
    let rest = ws_turn(&mut ws_b, 1).await;
    seen.extend(rest);
    let end = seen
        .iter()
        .rev()
        .find(|e| e["type"] == "turn_end")
        .unwrap()
        .clone();
    assert_eq!(end["interrupted"], true);
    assert_eq!(end["finish_reason"], "interrupted");
    let partial = end["reply_text"].as_str().unwrap();
    assert!(partial.starts_with("t0 t1"), "{partial}");
    assert_eq!(
        partial,
        tokens_text(&seen),
        "the partial text is what the clients saw"
    );

    // The next turn is served elsewhere (C forwards to the new owner).
    fake.set_default(Script::text("back again"));
    let (status, reply) = post(
        c,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "still there?"}),
    )
    .await;
    let took = killed.elapsed();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["turn_number"], 2);
    assert_eq!(reply["reply_text"], "back again");
    println!("owner lost -> next turn served elsewhere: {took:?} (lease 600 ms, relay check every 1.5 s)");
    let owner: String = redis.get(&lease_key).await.unwrap();
    assert!(
        owner.starts_with("node-b/") || owner.starts_with("node-c/"),
        "{owner}"
    );

    // The interrupted turn was stored through write-behind (Redis context of the session).
    let context_key = format!(
        "{}session:{}:context",
        a.state.settings.redis_key_prefix, session.id
    );
    let contents = stored_context(&redis, &context_key, 4).await;
    assert_eq!(contents[0]["content"], "tell me everything");
    assert_eq!(contents[1]["content"], partial);
    assert_eq!(contents[2]["content"], "still there?");
    // The prompt of turn 2 carried the recovered turn.
    let last = fake.requests().last().unwrap().body.clone();
    let prompt = last["messages"].to_string();
    assert!(prompt.contains("tell me everything"), "{prompt}");
    redis.quit().await.unwrap();
    for app in apps {
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_coachd_process_killed_mid_turn_hands_its_session_to_another_node() {
    // The owner is a real `coachd serve` process, killed with SIGKILL mid-turn: no shutdown
    // code runs, its lease simply stops being renewed.
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(1000).paced(Duration::ZERO, Duration::from_millis(10)));
    let (db, prefix, redis) = (
        common::fresh_database().await,
        common::fresh_prefix(),
        common::redis_url(),
    );
    let mut env = node_env(&fake, "node-proc", &db, &prefix, &redis);
    env.push(("COACHD_LOG".into(), "warn".into()));
    let scratch = common::services::ScratchDir::new("nodes");
    let owner = common::services::Coachd::start(&["serve"], &env, &scratch.0.join("owner.log")).await;
    let base = owner.base();
    let client = reqwest::Client::new();
    let b = node_app(&node_env(&fake, "node-b", &db, &prefix, &redis)).await;

    let created: Value = client
        .post(format!("{base}/realtime/sessions"))
        .json(&json!({"user_id": "u9", "coach_id": "sales", "transport": "websocket"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = Session {
        id: created["session_id"].as_str().unwrap().to_owned(),
        token: created["token"].as_str().unwrap().to_owned(),
        body: created.clone(),
    };
    // The client is on b; the turn runs in the owner process.
    let mut ws_b = ws_connect(&b, &session, "").await;
    ws_send(
        &mut ws_b,
        json!({"type": "user_message", "text": "tell me everything"}),
    )
    .await;
    let mut seen = Vec::new();
    while turn_tokens(&seen, 1).len() < 20 {
        match ws_next(&mut ws_b).await {
            WsRead::Event(e) => seen.push(e),
            WsRead::Close(code) => panic!("closed {code:?}"),
        }
    }

    owner.kill().await;
    let killed = Instant::now();
    assert_eq!(
        fake.wait_disconnects(1, Duration::from_secs(5)).await,
        1,
        "the killed owner's upstream request is gone"
    );

    // b's relay sees the lease lapse and takes the session over: turn 1 ends interrupted with
    // the partial text of the log, and b's client never saw a gap or a duplicate.
    seen.extend(ws_turn(&mut ws_b, 1).await);
    let end = seen
        .iter()
        .rev()
        .find(|e| e["type"] == "turn_end")
        .unwrap()
        .clone();
    assert_eq!(end["finish_reason"], "interrupted", "{end}");
    let partial = end["reply_text"].as_str().unwrap().to_owned();
    assert!(partial.starts_with("t0 t1"), "{partial}");
    assert_eq!(
        partial,
        tokens_text(&seen),
        "the partial text is what the client saw"
    );
    let logged: Vec<u64> = seqs(
        &seen
            .iter()
            .filter(|e| e["type"] != "session")
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(logged.windows(2).all(|w| w[0] < w[1]), "{logged:?}");

    // The next turn is served by b.
    fake.set_default(Script::text("back again"));
    let (status, reply) = post(
        &b,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "still there?"}),
    )
    .await;
    let took = killed.elapsed();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["turn_number"].as_u64(), reply["reply_text"].as_str()),
        (Some(2), Some("back again"))
    );
    println!("kill -9 of the owner process -> next turn served on b: {took:?} (lease 1.5 s)");

    // The interrupted turn went through b's write-behind like any other.
    let redis = redis_client(&redis).await;
    let context_key = format!("{prefix}session:{}:context", session.id);
    let contents = stored_context(&redis, &context_key, 4).await;
    assert_eq!(contents.len(), 4, "{contents:?}");
    assert_eq!(contents[0]["content"], "tell me everything");
    assert_eq!(contents[1]["content"], partial.as_str());
    assert_eq!(contents[3]["content"], "back again");
    redis.quit().await.unwrap();
    b.stop().await.unwrap();
}

/// How a stream came out of the Redis restart.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    /// Its turn ended with every token in order.
    Complete,
    /// It was told it missed events.
    Resync,
}

async fn outcome(ws: &mut common::realtime::Ws, mut seen: Vec<Value>) -> (Outcome, Vec<Value>) {
    loop {
        match ws_next(ws).await {
            WsRead::Event(e) => {
                let kind = e["type"].as_str().unwrap().to_owned();
                seen.push(e);
                match kind.as_str() {
                    "resync" => return (Outcome::Resync, seen),
                    "turn_end" => return (Outcome::Complete, seen),
                    _ => {}
                }
            }
            WsRead::Close(code) => panic!("closed ({code:?}) without a turn_end or resync: {seen:?}"),
        }
    }
}

#[tokio::test]
async fn a_redis_restart_under_load_ends_every_stream_cleanly_or_with_a_resync() {
    const SESSIONS: usize = 6;
    const TOKENS: usize = 200;
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(TOKENS).paced(Duration::ZERO, Duration::from_millis(10)));
    let redis = OwnRedis::start(free_port()).await;
    let apps = nodes(2, &fake, Some(&redis.url())).await;
    let (a, b) = (&apps[0], &apps[1]);

    let mut streams = Vec::new();
    for i in 0..SESSIONS {
        let session: Session = a.create_session(&format!("u{i}"), "sales", "websocket").await;
        let remote = ws_connect(b, &session, "").await;
        let mut local = ws_connect(a, &session, "").await;
        ws_send(&mut local, json!({"type": "user_message", "text": "go"})).await;
        streams.push((local, remote));
    }
    // Every relayed stream is under way before Redis goes.
    let mut remote_seen = Vec::new();
    for (_, remote) in &mut streams {
        let mut seen = Vec::new();
        while turn_tokens(&seen, 1).len() < 5 {
            match ws_next(remote).await {
                WsRead::Event(e) => seen.push(e),
                WsRead::Close(code) => panic!("closed {code:?}"),
            }
        }
        remote_seen.push(seen);
    }
    let (port, _) = redis.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = OwnRedis::start(port).await;

    let expected: String = (0..TOKENS)
        .map(|i| if i == 0 { "t0".to_owned() } else { format!(" t{i}") })
        .collect();
    let mut outcomes = Vec::new();
    for ((local, remote), seen) in streams.iter_mut().zip(remote_seen) {
        // A local stream never depends on Redis: it runs to its end.
        let (local_outcome, local_events) = outcome(local, Vec::new()).await;
        assert_eq!(local_outcome, Outcome::Complete);
        assert_eq!(tokens_text(&local_events), expected);
        // A relayed one ends complete (gap filled from the history) or is told to resync.
        let (remote_outcome, events) = outcome(remote, seen).await;
        let s = seqs(&events);
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "never a duplicate or a step back: {s:?}"
        );
        if remote_outcome == Outcome::Complete {
            assert_eq!(tokens_text(&events), expected, "complete means no token missing");
        }
        outcomes.push(remote_outcome);
    }
    println!("relayed streams after the Redis restart: {outcomes:?}");
    // The relays saw the log's epoch change (Redis lost it) and read the history.
    let stats: Value = b.get("/realtime/stats").await.json().await.unwrap();
    let counters = &stats["cluster"]["counters"];
    println!("relay counters: {counters}");
    assert!(
        counters["relay_catch_ups"].as_u64().unwrap() + counters["relay_resyncs"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    for app in apps {
        app.stop().await.unwrap();
    }
    redis.kill().await;
}

#[tokio::test]
async fn a_turn_a_killed_owner_finished_but_never_stored_is_stored_by_the_node_that_takes_over() {
    // Write-behind lives in memory: turn 2 ends on the owner process while PostgreSQL is down,
    // so its memory write is still being retried when the owner is killed. The node that takes
    // the session over finds turn 2 after the last turn recorded as stored, and stores it (the
    // context, which had it already, keeps it once).
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("noted"));
    let pg = common::services::OwnPostgres::start().await;
    let (prefix, redis) = (common::fresh_prefix(), common::redis_url());
    let mut env = node_env(&fake, "node-proc", &pg.url(), &prefix, &redis);
    env.push(("COACHD_PROMPT_FETCH_TIMEOUT_MS".into(), "200".into()));
    env.push(("COACHD_LOG".into(), "warn".into()));
    let scratch = common::services::ScratchDir::new("nodes");
    let owner = common::services::Coachd::start(&["serve"], &env, &scratch.0.join("owner.log")).await;
    let base = owner.base();
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("{base}/realtime/sessions"))
        .json(&json!({"user_id": "u-kill", "coach_id": "sales", "transport": "http"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["session_id"].as_str().unwrap().to_owned();
    let turn = |text: &'static str| {
        let (client, url) = (client.clone(), format!("{base}/realtime/sessions/{id}/turn"));
        async move {
            let r = client
                .post(url)
                .json(&json!({"text": text}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let stored_turns = |db: sqlx::PgPool, id: String| async move {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "select (metadata->>'turn_number')::bigint from coach_memory \
             where memory_type = 'conversation' and metadata->>'session_id' = $1 order by 1",
        )
        .bind(id)
        .fetch_all(&db)
        .await
        .unwrap();
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>()
    };
    turn("first, stored everywhere").await;
    for _ in 0..100 {
        if stored_turns(db.clone(), id.clone()).await == [1] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored_turns(db.clone(), id.clone()).await, [1]);
    db.close().await;

    pg.crash().await;
    turn("second, while PostgreSQL is down").await;
    let redis_conn = redis_client(&redis).await;
    let context_key = format!("{prefix}session:{id}:context");
    assert_eq!(
        stored_context(&redis_conn, &context_key, 4).await.len(),
        4,
        "turn 2 is in the context"
    );
    owner.kill().await;
    pg.start_server().await;

    let b = node_app(&node_env(&fake, "node-b", &pg.url(), &prefix, &redis)).await;
    // 503 until the dead owner's lease lapses (1.5 s), then b takes the session over.
    let mut answer = (0, Value::Null);
    for _ in 0..50 {
        answer = post(
            &b,
            &format!("/realtime/sessions/{id}/turn"),
            json!({"text": "third, on b"}),
        )
        .await;
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, reply) = answer;
    assert_eq!((status, reply["turn_number"].as_u64()), (200, Some(3)), "{reply}");
    b.wait_written(2).await;
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    assert_eq!(
        stored_turns(db.clone(), id.clone()).await,
        [1, 2, 3],
        "turn 2 stored by b, once"
    );
    let contents = stored_context(&redis_conn, &context_key, 6).await;
    let turns: Vec<u64> = contents
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["metadata"]["turn_number"].as_u64().unwrap())
        .collect();
    assert_eq!(turns, [1, 2, 3], "the context keeps each turn once: {contents:?}");
    db.close().await;
    redis_conn.quit().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_that_shuts_down_hands_its_sessions_to_the_next_node_that_touches_them() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("one two three"));
    let mut apps = nodes(2, &fake, None).await;
    let b = apps.pop().unwrap();
    let a = apps.pop().unwrap();
    let session = a.create_session("u5", "sales", "websocket").await;
    let mut ws_b = ws_connect(&b, &session, "").await;
    let (status, _) = post(
        &b,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "first"}),
    )
    .await;
    assert_eq!(status, 200);
    ws_turn(&mut ws_b, 1).await;

    a.stop().await.unwrap();
    // A said it was going; B's client stays attached (the session is not over).
    let note = ws_until(&mut ws_b, "error").await;
    assert_eq!(note.last().unwrap()["code"], "server_shutdown");

    let (status, reply) = post(
        &b,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "second"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["turn_number"], 2);
    let events = ws_turn(&mut ws_b, 2).await;
    assert_eq!(events.last().unwrap()["reply_text"], "one two three");
    let stats: Value = b.get("/realtime/stats").await.json().await.unwrap();
    assert_eq!(stats["cluster"]["counters"]["takeovers"], 1);
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_restarted_under_the_same_id_takes_back_a_lease_its_earlier_run_left() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("here again"));
    let apps = nodes(2, &fake, None).await;
    let (a, b) = (&apps[0], &apps[1]);
    let session = b.create_session("u6", "sales", "http").await;
    // The lease says node-a holds the session for another minute, as if an earlier run of
    // node-a had taken it over and died; B, fenced by it, stops the session.
    let redis = redis_client(&common::redis_url()).await;
    let lease_key = format!(
        "{}sess:{{{}}}:lease",
        b.state.settings.redis_key_prefix, session.id
    );
    redis
        .set::<(), _, _>(
            &lease_key,
            "node-a/999999",
            Some(fred::types::Expiration::PX(60_000)),
            None,
            false,
        )
        .await
        .unwrap();
    let mut fenced = 0;
    for _ in 0..100 {
        let stats: Value = b.get("/realtime/stats").await.json().await.unwrap();
        fenced = stats["cluster"]["counters"]["fenced"].as_u64().unwrap();
        if fenced == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fenced, 1);

    // node-a runs nothing under that lease: it is stale, so A takes the session back at once
    // rather than answering 404 for a minute.
    let status = a.get(&format!("/realtime/sessions/{}", session.id)).await;
    assert_eq!(status.status(), 200);
    let (status, reply) = post(
        b,
        &format!("/realtime/sessions/{}/turn", session.id),
        json!({"text": "hello?"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["reply_text"], "here again");
    let owner: String = redis.get(&lease_key).await.unwrap();
    assert!(
        owner.starts_with("node-a/") && owner != "node-a/999999",
        "{owner}"
    );
    redis.quit().await.unwrap();
    for app in apps {
        app.stop().await.unwrap();
    }
}
