//! The job system against the real PostgreSQL (apalis-postgres queues) and the fake LLM upstream:
//! `analyze` end to end with its memories recalled in a later coach turn, chains, idempotency,
//! cancel of a queued and of a running job, retries on transient upstream errors, bad input,
//! JWT isolation on every job route, SSE replay, a `coachd worker` process killed mid-job and the
//! job finished by another, and the in-process engine of embedded mode.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::{Services, TestApp, spawn_app_with};
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const KEY: &str = "jobs-test-key";
const SECRET: &str = "jobs-test-jwt-secret";

const NOTES: &str = r#"{"summary": "The client plans to run a marathon in spring and worries about knee pain.", "key_points": ["marathon in spring", "knee pain"], "action_items": [{"task": "Book a physiotherapist", "owner": "client", "due": "next week", "priority": "high"}]}"#;
const INSIGHTS: &str = r#"{"insights": [{"text": "The client is training for a spring marathon and fears knee pain will stop them.", "category": "goal"}]}"#;
const TRANSCRIPT: &str = "Coach: What is on your mind this week?\nClient: I signed up for a marathon in spring. \
    My knee hurts after long runs and I am worried it will stop me.\nCoach: Let us get a physiotherapist to look at it.";

fn base_vars(fake: &FakeUpstream) -> Vec<(String, String)> {
    [
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "upstream-key"),
        ("OPENAI_MODEL", "gpt-4o-mini"),
        ("COACHD_OPENAI_BASE_URL", fake.base_url().as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("XENIOS_BACKEND_API_KEY", KEY),
        ("COACHD_JOBS_ENABLE_NOOP", "true"),
        ("COACHD_JOBS_POLL_MS", "20"),
        ("COACHD_JOBS_POLL_MAX_MS", "100"),
        ("COACHD_JOBS_RETRY_BASE_MS", "0"),
        ("COACHD_JOBS_CANCEL_POLL_MS", "50"),
        ("COACHD_JOBS_EVENTS_POLL_MS", "50"),
        ("COACHD_PROMPT_MIN_SIMILARITY", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn app(fake: &FakeUpstream, services: Services, extra: &[(&str, &str)]) -> TestApp {
    let mut vars = base_vars(fake);
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_app_with(services, &pairs).await
}

fn jwt(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": sub, "aud": "authenticated", "exp": now + 600, "iat": now});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn send(app: &TestApp, req: reqwest::RequestBuilder, bearer: Option<&str>) -> (u16, Value) {
    let mut req = req.header("x-api-key", KEY);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let _ = app;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn submit(app: &TestApp, body: Value) -> (u16, Value) {
    send(app, app.client.post(app.url("/api/v1/jobs")).json(&body), None).await
}

async fn get_job(app: &TestApp, id: &str) -> Value {
    let (status, body) = send(app, app.client.get(app.url(&format!("/api/v1/jobs/{id}"))), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls a job until `done(job)` or 30 s pass.
async fn wait_for(app: &TestApp, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job = get_job(app, id).await;
        if done(&job) {
            return job;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "job never {what}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_status(app: &TestApp, id: &str, status: &str) -> Value {
    wait_for(app, id, status, |j| j["status"] == status).await
}

fn id_of(body: &Value) -> String {
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_owned()
}

/// Reads a job's SSE stream to its end; returns (seq, data) of every `job` event.
async fn read_events(app: &TestApp, id: &str, last_event_id: Option<u64>) -> Vec<(u64, Value)> {
    let mut req = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{id}/events")))
        .header("x-api-key", KEY);
    if let Some(n) = last_event_id {
        req = req.header("last-event-id", n.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let mut out = Vec::new();
    let read = async {
        while let Some(ev) = stream.next().await {
            let ev = ev.unwrap();
            assert_eq!(ev.event, "job");
            out.push((ev.id.parse().unwrap(), serde_json::from_str(&ev.data).unwrap()));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the event stream ends with the job's final status");
    out
}

fn script_analysis(fake: &FakeUpstream) {
    fake.enqueue("*", Script::text(NOTES));
    fake.enqueue("*", Script::text(INSIGHTS));
}

#[tokio::test]
async fn analyze_stores_notes_insights_and_memories_the_coach_recalls_in_a_later_turn() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[]).await;
    script_analysis(&fake);

    let (status, body) = submit(
        &app,
        json!({"kind": "analyze", "user_id": "u1", "coach_id": "fitness", "text": TRANSCRIPT}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    let id = id_of(&body);
    let job = wait_status(&app, &id, "succeeded").await;
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["progress"], 1.0);

    let (status, result) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let r = &result["result"];
    assert!(r["notes"]["summary"].as_str().unwrap().contains("marathon"));
    assert_eq!(r["notes"]["action_items"][0]["task"], "Book a physiotherapist");
    assert_eq!(r["insights"].as_array().unwrap().len(), 1);
    assert!(r["memories"]["stored"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["notes_id"].is_string());

    // The memories are the coach's: transcript chunks and the insight.
    let (status, memories) = send(&app, app.client.get(app.url("/ai/coach/memory/u1/fitness")), None).await;
    assert_eq!(status, 200, "{memories}");
    let types: Vec<&str> = memories["memories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["memory_type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"transcript") && types.contains(&"insight"),
        "{memories}"
    );

    // A later turn: the prompt the model gets carries what the job stored.
    fake.enqueue("*", Script::text("Let us plan your knee care."));
    let (status, reply) = send(
        &app,
        app.client.post(app.url("/ai/coach/respond")).json(&json!({
            "user_id": "u1", "coach_id": "fitness", "text": "How should I train for my spring marathon with this knee?"
        })),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let chat = fake
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/chat/completions"))
        .unwrap();
    let prompt = chat.body.to_string();
    assert!(
        prompt.contains("spring marathon and fears knee pain"),
        "the insight is recalled in the turn's prompt: {prompt}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_chain_runs_its_steps_on_each_others_output() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[]).await;
    script_analysis(&fake);
    let (status, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "fitness", "text": TRANSCRIPT, "then": ["analyze"],
               "options": {"store_memories": false}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["kind"], "chain");
    let id = id_of(&body);
    let job = wait_status(&app, &id, "succeeded").await;
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{job}");
    assert_eq!(steps[0]["kind"], "noop");
    assert_eq!(steps[1]["kind"], "analyze");
    assert!(
        steps
            .iter()
            .all(|s| s["status"] == "succeeded" && s["parent_id"] == id.as_str())
    );
    let (_, result) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    let last = &result["result"]["steps"][1]["result"];
    assert!(
        last["notes"]["summary"].as_str().unwrap().contains("marathon"),
        "{result}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_idempotency_key_returns_the_existing_job() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[("COACHD_JOBS_WORKERS", "false")]).await;
    let body = json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "idempotency_key": "upload-42"});
    let (s1, first) = submit(&app, body.clone()).await;
    let (s2, second) = submit(&app, body).await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(first["id"], second["id"]);
    assert_eq!(
        (first["created"].clone(), second["created"].clone()),
        (json!(true), json!(false))
    );
    // Another user's key is their own.
    let (s3, third) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u2", "coach_id": "c", "idempotency_key": "upload-42"}),
    )
    .await;
    assert_eq!(s3, 202);
    assert_ne!(third["id"], first["id"]);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_queued_and_a_running_job_can_be_cancelled() {
    let fake = FakeUpstream::start().await.unwrap();
    // Queued: no worker in this process takes it.
    let idle = app(&fake, Services::Real, &[("COACHD_JOBS_WORKERS", "false")]).await;
    let (_, body) = submit(&idle, json!({"kind": "noop", "user_id": "u1", "coach_id": "c"})).await;
    let id = id_of(&body);
    let (status, job) = send(
        &idle,
        idle.client.post(idle.url(&format!("/api/v1/jobs/{id}/cancel"))),
        None,
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled");
    let (status, again) = send(
        &idle,
        idle.client.post(idle.url(&format!("/api/v1/jobs/{id}/cancel"))),
        None,
    )
    .await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("job_finished"))
    );
    let (status, r) = send(
        &idle,
        idle.client.get(idle.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (409, Some("job_cancelled"))
    );
    idle.stop().await.unwrap();

    // Running: a slow job stopped mid-way; it stays cancelled and never succeeds.
    let app = app(&fake, Services::Real, &[]).await;
    let (_, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "options": {"sleep_ms": 20000, "steps": 40}}),
    )
    .await;
    let id = id_of(&body);
    wait_for(&app, &id, "made progress", |j| {
        j["status"] == "running" && j["progress"].as_f64() > Some(0.0)
    })
    .await;
    let (status, job) = send(
        &app,
        app.client.post(app.url(&format!("/api/v1/jobs/{id}/cancel"))),
        None,
    )
    .await;
    assert_eq!(
        (status, job["status"].as_str()),
        (200, Some("cancelled")),
        "{job}"
    );
    let events = read_events(&app, &id, None).await;
    assert_eq!(events.last().unwrap().1["event"], "cancelled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = get_job(&app, &id).await;
    assert_eq!(after["status"], "cancelled");
    let progress_after_cancel = after["progress"].clone();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        get_job(&app, &id).await["progress"],
        progress_after_cancel,
        "the run stopped"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn transient_upstream_errors_are_retried_and_permanent_ones_fail_with_their_error() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(
        &fake,
        Services::Real,
        &[("COACHD_JOBS_MAX_ATTEMPTS_ANALYZE", "3")],
    )
    .await;
    // Attempt 1: a 503; attempt 2: a 429 with retry-after; attempt 3 succeeds.
    fake.enqueue("*", Script::status(503));
    fake.enqueue(
        "*",
        Script::text("").with_fault(Fault::Status {
            status: 429,
            retry_after: Some(0),
        }),
    );
    script_analysis(&fake);
    let (_, body) = submit(
        &app,
        json!({"kind": "analyze", "user_id": "u1", "coach_id": "c", "text": TRANSCRIPT, "options": {"store_memories": false}}),
    )
    .await;
    let id = id_of(&body);
    let job = wait_status(&app, &id, "succeeded").await;
    assert_eq!(job["attempts"], 3, "{job}");
    let events = read_events(&app, &id, None).await;
    let retries: Vec<&Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["event"] == "retrying")
        .collect();
    assert_eq!(retries.len(), 2, "{events:?}");
    assert!(retries.iter().all(|e| e["error"]["retryable"] == true));

    // Every attempt fails: the job fails with the last error, visible.
    fake.set_default(Script::status(500));
    let (_, body) = submit(
        &app,
        json!({"kind": "analyze", "user_id": "u1", "coach_id": "c", "text": "hello"}),
    )
    .await;
    let id = id_of(&body);
    let job = wait_status(&app, &id, "failed").await;
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["error"]["retryable"], true, "{job}");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("(500)"),
        "{job}"
    );
    let (status, listed) = send(&app, app.client.get(app.url("/api/v1/jobs?status=failed")), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["total"], 1, "{listed}");

    // A permanent error is not retried.
    fake.set_default(Script::text("this is not JSON"));
    let (_, body) = submit(
        &app,
        json!({"kind": "analyze", "user_id": "u1", "coach_id": "c", "text": "hello"}),
    )
    .await;
    let id = id_of(&body);
    let job = wait_status(&app, &id, "failed").await;
    assert_eq!(job["attempts"], 1, "{job}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_at_submit_with_a_typed_error() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[("COACHD_JOBS_MAX_UPLOAD_BYTES", "1024")]).await;
    let cases = [
        (
            json!({"kind": "resize", "user_id": "u", "coach_id": "c"}),
            400,
            "unsupported_kind",
        ),
        (
            json!({"kind": "chain", "user_id": "u", "coach_id": "c"}),
            400,
            "unsupported_kind",
        ),
        (
            json!({"kind": "analyze", "user_id": "u", "coach_id": "c"}),
            400,
            "missing_input",
        ),
        (
            json!({"kind": "analyze", "user_id": "u", "coach_id": "c", "text": "  "}),
            400,
            "empty_text",
        ),
        (
            json!({"kind": "analyze", "user_id": "u", "coach_id": "c", "text": "x", "options": {"bogus": 1}}),
            400,
            "invalid_options",
        ),
        (
            json!({"kind": "analyze", "user_id": "u", "coach_id": "c", "text": "x", "options": [1]}),
            400,
            "invalid_options",
        ),
        (
            json!({"kind": "noop", "user_id": "u", "coach_id": "c", "then": ["chain"]}),
            400,
            "unsupported_kind",
        ),
        (json!({"kind": "noop", "coach_id": "c"}), 400, "missing_field"),
        (
            json!({"kind": "noop", "user_id": "u", "coach_id": "c", "url": "http://example.com/a.pdf"}),
            400,
            "invalid_field",
        ),
    ];
    for (body, status, code) in cases {
        let (s, b) = submit(&app, body.clone()).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} → {b}"
        );
    }

    let form = |file: reqwest::multipart::Part| {
        reqwest::multipart::Form::new()
            .text("kind", "analyze")
            .text("user_id", "u")
            .text("coach_id", "c")
            .part("file", file)
    };
    let post = |form: reqwest::multipart::Form| app.client.post(app.url("/api/v1/jobs")).multipart(form);
    let text = reqwest::multipart::Part::bytes(TRANSCRIPT.as_bytes().to_vec())
        .file_name("call.txt")
        .mime_str("text/plain")
        .unwrap();
    let (s, b) = send(&app, post(form(text)), None).await;
    assert_eq!(s, 202, "a text file is accepted: {b}");
    assert_eq!(b["upload"]["filename"], "call.txt");
    assert_eq!(b["upload"]["size"], TRANSCRIPT.len());

    let big = reqwest::multipart::Part::bytes(vec![b'a'; 2048]).file_name("big.txt");
    let (s, b) = send(&app, post(form(big)), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{b}"
    );

    let pdf = reqwest::multipart::Part::bytes(b"%PDF-1.4".to_vec())
        .file_name("a.pdf")
        .mime_str("application/pdf")
        .unwrap();
    let (s, b) = send(&app, post(form(pdf)), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unsupported_type")),
        "{b}"
    );

    let binary = reqwest::multipart::Part::bytes(vec![0xff, 0xfe, 0x00]).file_name("x.txt");
    let (s, b) = send(&app, post(form(binary)), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_text")),
        "{b}"
    );

    // A multipart body cut before its closing boundary.
    let truncated = "--XyZ\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nanalyze\r\n--XyZ\r\n\
                     Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\npartial cont";
    let (s, b) = send(
        &app,
        app.client
            .post(app.url("/api/v1/jobs"))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(truncated),
        None,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_multipart")),
        "{b}"
    );

    // Unknown ids answer 404, whatever their form.
    for path in [
        "/api/v1/jobs/not-a-uuid",
        "/api/v1/jobs/0190f5a2-0000-7000-8000-000000000000",
    ] {
        let (s, _) = send(&app, app.client.get(app.url(path)), None).await;
        assert_eq!(s, 404);
    }
    // The workers survived all of it.
    let (_, body) = submit(&app, json!({"kind": "noop", "user_id": "u", "coach_id": "c"})).await;
    wait_status(&app, &id_of(&body), "succeeded").await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_jwt_user_sees_and_acts_on_their_own_jobs_only() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(
        &fake,
        Services::Real,
        &[("SUPABASE_JWT_SECRET", SECRET), ("COACHD_JOBS_WORKERS", "false")],
    )
    .await;
    let (alice, bob) = (jwt("alice"), jwt("bob"));
    let (s, body) = send(
        &app,
        app.client
            .post(app.url("/api/v1/jobs"))
            .json(&json!({"kind": "noop", "coach_id": "c"})),
        Some(&alice),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["user_id"], "alice", "a JWT user's jobs are theirs");
    let id = id_of(&body);

    let (s, _) = send(
        &app,
        app.client
            .post(app.url("/api/v1/jobs"))
            .json(&json!({"kind": "noop", "user_id": "alice", "coach_id": "c"})),
        Some(&bob),
    )
    .await;
    assert_eq!(s, 403, "bob cannot submit for alice");

    for (method, path) in [
        ("GET", format!("/api/v1/jobs/{id}")),
        ("GET", format!("/api/v1/jobs/{id}/result")),
        ("GET", format!("/api/v1/jobs/{id}/events")),
        ("POST", format!("/api/v1/jobs/{id}/cancel")),
    ] {
        let req = match method {
            "GET" => app.client.get(app.url(&path)),
            _ => app.client.post(app.url(&path)),
        };
        let (s, b) = send(&app, req, Some(&bob)).await;
        assert_eq!(s, 404, "{method} {path} for another user: {b}");
    }
    let (s, list) = send(&app, app.client.get(app.url("/api/v1/jobs")), Some(&bob)).await;
    assert_eq!((s, list["total"].as_u64()), (200, Some(0)));
    let (s, _) = send(
        &app,
        app.client.get(app.url("/api/v1/jobs?user_id=alice")),
        Some(&bob),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = send(&app, app.client.get(app.url("/api/v1/jobs/stats")), Some(&bob)).await;
    assert_eq!(s, 403, "stats cover every user: not for an end user");

    let (s, list) = send(&app, app.client.get(app.url("/api/v1/jobs")), Some(&alice)).await;
    assert_eq!((s, list["total"].as_u64()), (200, Some(1)));
    let (s, job) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}"))),
        Some(&alice),
    )
    .await;
    assert_eq!((s, job["id"].as_str()), (200, Some(id.as_str())));
    let (s, job) = send(
        &app,
        app.client.post(app.url(&format!("/api/v1/jobs/{id}/cancel"))),
        Some(&alice),
    )
    .await;
    assert_eq!((s, job["status"].as_str()), (200, Some("cancelled")));

    // Without the API key nothing answers.
    let resp = app
        .client
        .get(app.url("/api/v1/jobs"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn job_events_replay_after_last_event_id_and_end_with_the_final_status() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[]).await;
    let (_, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "text": "hi", "options": {"sleep_ms": 600, "steps": 3}}),
    )
    .await;
    let id = id_of(&body);
    let all = read_events(&app, &id, None).await;
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq from 1 without gaps"
    );
    let names: Vec<&str> = all.iter().map(|(_, e)| e["event"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"queued"));
    assert_eq!(names[1], "started");
    assert_eq!(names.iter().filter(|n| **n == "progress").count(), 3);
    assert_eq!(names.last(), Some(&"succeeded"));
    assert!(
        all.iter()
            .all(|(s, e)| e["seq"] == *s && e["job_id"] == id.as_str())
    );

    let replay = read_events(&app, &id, Some(2)).await;
    assert_eq!(replay.first().map(|(s, _)| *s), Some(3));
    assert_eq!(replay.len(), all.len() - 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn embedded_mode_runs_jobs_on_the_in_memory_engine() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Embedded, &[]).await;
    let (s, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "options": {"fail_attempts": 1}}),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let job = wait_status(&app, &id_of(&body), "succeeded").await;
    assert_eq!(job["attempts"], 2, "retried once: {job}");
    let (s, stats) = send(&app, app.client.get(app.url("/api/v1/jobs/stats")), None).await;
    assert_eq!(s, 200);
    assert_eq!(stats["backend"], "in-process");
    let llm = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "llm")
        .unwrap();
    assert_eq!(
        (llm["succeeded"].as_u64(), llm["workers_alive"].as_u64()),
        (Some(1), Some(1))
    );
    app.stop().await.unwrap();
}

/// A `coachd worker` process on the test's database.
fn worker_process(database_url: &str) -> Child {
    worker_process_with(database_url, &[])
}

/// A `coachd worker` process on the test's database, with `extra` settings.
fn worker_process_with(database_url: &str, extra: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_coachd"))
        .args(["worker", "--queues", "llm"])
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("PORT", "0")
        .env("COACHD_HOST", "127.0.0.1")
        .env("COACHD_JOBS_POLL_MS", "20")
        .env("COACHD_JOBS_POLL_MAX_MS", "100")
        .env("COACHD_JOBS_HEARTBEAT_SECS", "1")
        .env("COACHD_JOBS_ORPHAN_AFTER_SECS", "3")
        .env("COACHD_LOG", "warn")
        // The embedder the test app records in the database (start-up refuses another one).
        .env("COACHD_EMBEDDING_PROVIDER", "offline")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start coachd worker")
}

#[tokio::test]
async fn a_worker_told_to_stop_finishes_its_run_and_takes_no_new_job() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[("COACHD_JOBS_WORKERS", "false")]).await;
    let db = app.database_url.clone().unwrap();
    let mut worker = worker_process_with(
        &db,
        &[
            ("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "0"),
            ("COACHD_SHUTDOWN_GRACE_SECS", "20"),
        ],
    );
    let (_, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "text": "in flight", "options": {"sleep_ms": 2000, "steps": 2}}),
    )
    .await;
    let running = id_of(&body);
    wait_for(&app, &running, "ran", |j| j["status"] == "running").await;

    // SIGTERM, as an orchestrator stops a container.
    let term = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let job = wait_status(&app, &running, "succeeded").await;
    assert_eq!(job["attempts"], 1, "the stopping worker finished its run: {job}");

    // It takes nothing new while it stops, and exits cleanly.
    let (_, body) = submit(&app, json!({"kind": "noop", "user_id": "u1", "coach_id": "c"})).await;
    let later = id_of(&body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_job(&app, &later).await["status"], "queued");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_whose_worker_process_is_killed_is_finished_by_another_worker() {
    let fake = FakeUpstream::start().await.unwrap();
    // The API node runs no worker; the work goes to `coachd worker` processes.
    let app = app(
        &fake,
        Services::Real,
        &[
            ("COACHD_JOBS_WORKERS", "false"),
            ("COACHD_JOBS_HEARTBEAT_SECS", "1"),
            ("COACHD_JOBS_ORPHAN_AFTER_SECS", "3"),
        ],
    )
    .await;
    let db = app.database_url.clone().unwrap();
    let mut first = worker_process(&db);
    let (_, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "text": "survivor", "options": {"sleep_ms": 3000, "steps": 6}}),
    )
    .await;
    let id = id_of(&body);
    wait_for(&app, &id, "ran on the first worker", |j| {
        j["status"] == "running" && j["attempts"] == 1
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();

    let mut second = worker_process(&db);
    let job = wait_status(&app, &id, "succeeded").await;
    assert_eq!(job["attempts"], 2, "the second worker ran it again: {job}");
    let (_, result) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    assert_eq!(result["result"]["text"], "survivor");
    let (status, stats) = send(&app, app.client.get(app.url("/api/v1/jobs/stats")), None).await;
    assert_eq!(status, 200, "{stats}");
    let llm = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "llm")
        .unwrap();
    assert_eq!(
        llm["workers_alive"], 1,
        "only the second worker's heartbeat is recent: {stats}"
    );
    second.kill().unwrap();
    second.wait().unwrap();
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_started_from_a_live_session_reports_job_events_to_its_clients() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(&fake, Services::Real, &[]).await;
    let session = sse_session(&app).await;

    let (s, b) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u2", "coach_id": "c", "session_id": session.id}),
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("session_mismatch")));
    let (s, _) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "session_id": "nope"}),
    )
    .await;
    assert_eq!(s, 404);

    let (s, body) = submit(
        &app,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "session_id": session.id,
               "options": {"sleep_ms": 300, "steps": 2}}),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let id = id_of(&body);
    // Every event is checked against proto/server.schema.json by the reader.
    let (jobs, _) = session_job_events(&app, &session).await;
    assert!(jobs.iter().all(|j| j["job_id"] == id.as_str()), "{jobs:?}");
    let names: Vec<&str> = jobs.iter().map(|j| j["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["queued", "started", "progress", "progress", "succeeded"],
        "{jobs:?}"
    );
    app.stop().await.unwrap();
}

/// A live session of (u1, c) on `app`, for SSE.
async fn sse_session(app: &TestApp) -> common::realtime::Session {
    let (s, created) = send(
        app,
        app.client
            .post(app.url("/realtime/sessions"))
            .json(&json!({"user_id": "u1", "coach_id": "c", "transport": "sse"})),
        None,
    )
    .await;
    assert_eq!(s, 201, "{created}");
    common::realtime::Session {
        id: created["session_id"].as_str().unwrap().to_owned(),
        token: created["token"].as_str().unwrap().to_owned(),
        body: created.clone(),
    }
}

/// The `job` events of a session's SSE stream, read until the job's final `succeeded`, with the
/// seqs of every event seen on the way.
async fn session_job_events(app: &TestApp, session: &common::realtime::Session) -> (Vec<Value>, Vec<u64>) {
    let resp = app
        .client
        .get(app.url(&format!(
            "/realtime/sessions/{}/events?token={}&after_seq=0",
            session.id, session.token
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = common::realtime::SseReader::new(resp);
    let (mut jobs, mut seqs) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(ev) = reader.next().await {
            if let Some(seq) = ev.data["seq"].as_u64() {
                seqs.push(seq);
            }
            if ev.event == "job" {
                let last = ev.data["status"] == "succeeded";
                jobs.push(ev.data);
                if last {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the session's stream carries the job to its end");
    (jobs, seqs)
}

#[tokio::test]
async fn a_job_submitted_on_another_node_reports_to_the_session_through_its_owner() {
    // Two nodes on one database and one Redis prefix: the session lives on `a`, the job is
    // submitted on `b`. Its events must reach the session's clients on both nodes, published by
    // the session's own task on `a` (one writer: seqs strictly increasing, none twice).
    let fake = FakeUpstream::start().await.unwrap();
    let db = common::fresh_database().await;
    let prefix = common::fresh_prefix();
    let redis = common::redis_url();
    let node = |id: &'static str| {
        vec![
            ("DATABASE_URL", db.as_str()),
            ("REDIS_URL", redis.as_str()),
            ("COACHD_REDIS_KEY_PREFIX", prefix.as_str()),
            ("COACHD_NODE_ID", id),
        ]
    };
    let a = app(&fake, Services::Embedded, &node("node-a")).await;
    let b = app(&fake, Services::Embedded, &node("node-b")).await;
    let session = sse_session(&a).await;

    // The session is checked on `b` too (it is not in b's memory): wrong user, then a real job.
    let (s, body) = submit(
        &b,
        json!({"kind": "noop", "user_id": "u2", "coach_id": "c", "session_id": session.id}),
    )
    .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("session_mismatch")),
        "{body}"
    );
    let (s, body) = submit(
        &b,
        json!({"kind": "noop", "user_id": "u1", "coach_id": "c", "session_id": session.id,
               "options": {"sleep_ms": 200, "steps": 2}}),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let id = id_of(&body);

    for (node, app) in [("owner a", &a), ("relay b", &b)] {
        let (jobs, seqs) = session_job_events(app, &session).await;
        let names: Vec<&str> = jobs.iter().map(|j| j["event"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["queued", "started", "progress", "progress", "succeeded"],
            "{node}: {jobs:?}"
        );
        assert!(
            jobs.iter().all(|j| j["job_id"] == id.as_str()),
            "{node}: {jobs:?}"
        );
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{node}: seqs strictly increasing: {seqs:?}"
        );
    }
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn finished_jobs_and_their_queue_entries_are_swept_after_the_retention() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app(
        &fake,
        Services::Real,
        &[
            ("COACHD_JOBS_RETENTION_SECS", "5"),
            ("COACHD_JOBS_SWEEP_SECS", "1"),
        ],
    )
    .await;
    let pool = sqlx::PgPool::connect(app.database_url.as_deref().unwrap())
        .await
        .unwrap();
    let entries = |id: String| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from apalis.jobs where convert_from(job, 'UTF8')::jsonb ->> 'job_id' = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
    };
    let (s, body) = submit(&app, json!({"kind": "noop", "user_id": "u1", "coach_id": "c"})).await;
    assert_eq!(s, 202, "{body}");
    let id = id_of(&body);
    wait_status(&app, &id, "succeeded").await;
    assert_eq!(
        entries(id.clone()).await,
        1,
        "the run's queue entry is there while the job is new"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = send(&app, app.client.get(app.url(&format!("/api/v1/jobs/{id}"))), None).await;
        if status == 404 && entries(id.clone()).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} was not swept (status {status})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await.unwrap();
}

/// One second of a 440 Hz tone (or silence) as a 16 kHz mono 16-bit WAV.
fn wav(tone: bool) -> Vec<u8> {
    let rate = 16_000u32;
    let samples: Vec<i16> = (0..rate)
        .map(|i| {
            if tone {
                ((i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 12_000.0) as i16
            } else {
                0
            }
        })
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

fn audio_form(kind: &str, bytes: Vec<u8>, name: &str, then: Option<&str>) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new()
        .text("kind", kind.to_owned())
        .text("user_id", "u1")
        .text("coach_id", "fitness")
        .text("options", r#"{"language": "en"}"#)
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes)
                .file_name(name.to_owned())
                .mime_str("audio/wav")
                .unwrap(),
        );
    if let Some(then) = then {
        form = form.text("then", then.to_owned());
    }
    form
}

async fn transcribe_app(fake: &FakeUpstream) -> TestApp {
    let base = fake.base_url();
    app(
        fake,
        Services::Real,
        &[
            ("COACHD_TRANSCRIBE_BASE_URL", base.as_str()),
            ("COACHD_TRANSCRIBE_API_KEY", "upstream-key"),
            ("COACHD_TRANSCRIBE_MODEL", "whisper-1"),
            ("COACHD_TRANSCRIBE_MAX_RETRIES", "0"),
        ],
    )
    .await
}

#[tokio::test]
async fn a_recording_becomes_a_transcript_notes_and_memories_in_one_chain() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = transcribe_app(&fake).await;
    // The first transcription attempt meets a 503: the job retries it.
    fake.enqueue("whisper-1", Script::status(503));
    fake.enqueue("whisper-1", Script::text(TRANSCRIPT));
    fake.enqueue("gpt-4o-mini", Script::text(NOTES));
    fake.enqueue("gpt-4o-mini", Script::text(INSIGHTS));

    let (s, body) = send(
        &app,
        app.client.post(app.url("/api/v1/jobs")).multipart(audio_form(
            "transcribe",
            wav(true),
            "session.wav",
            Some("analyze"),
        )),
        None,
    )
    .await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["kind"], "chain");
    let id = id_of(&body);
    let job = wait_status(&app, &id, "succeeded").await;
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(
        (steps[0]["kind"].as_str(), steps[0]["attempts"].as_u64()),
        (Some("transcribe"), Some(2))
    );
    assert_eq!(steps[0]["upload"]["filename"], "session.wav");

    let (_, result) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    let transcript = &result["result"]["steps"][0]["result"];
    assert!(
        transcript["text"]
            .as_str()
            .unwrap()
            .contains("marathon in spring"),
        "{transcript}"
    );
    assert!(!transcript["segments"].as_array().unwrap().is_empty());
    let analysis = &result["result"]["steps"][1]["result"];
    assert_eq!(analysis["source"], "transcript");
    assert!(
        analysis["memories"]["stored"].as_u64().unwrap() >= 2,
        "{analysis}"
    );

    let sent = fake
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/audio/transcriptions"))
        .unwrap();
    assert_eq!(sent.body["language"], "en");
    assert!(
        sent.body["file"]["name"].as_str().unwrap().ends_with(".wav"),
        "{}",
        sent.body
    );

    let (s, memories) = send(&app, app.client.get(app.url("/ai/coach/memory/u1/fitness")), None).await;
    assert_eq!(s, 200);
    assert!(
        memories["memories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["memory_type"] == "transcript"),
        "{memories}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_recordings_fail_at_submit_or_as_a_failed_job_with_a_clear_error() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = transcribe_app(&fake).await;
    let post = |form| app.client.post(app.url("/api/v1/jobs")).multipart(form);

    let (s, b) = send(
        &app,
        post(audio_form("transcribe", b"just some text".to_vec(), "notes.txt", None).text("x", "y")),
        None,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_multipart")),
        "{b}"
    );
    let text_as_audio = reqwest::multipart::Form::new()
        .text("kind", "transcribe")
        .text("user_id", "u1")
        .text("coach_id", "c")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"plain words".to_vec())
                .file_name("notes.txt")
                .mime_str("text/plain")
                .unwrap(),
        );
    let (s, b) = send(&app, post(text_as_audio), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unsupported_type")),
        "{b}"
    );
    let (s, b) = submit(
        &app,
        json!({"kind": "transcribe", "user_id": "u1", "coach_id": "c", "text": "hi"}),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_input")),
        "{b}"
    );
    let (s, b) = send(
        &app,
        post(audio_form("transcribe", Vec::new(), "empty.wav", None)),
        None,
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("empty_file")), "{b}");

    // Silence passes the submit checks and fails its job, once, with its reason.
    let (s, b) = send(
        &app,
        post(audio_form("transcribe", wav(false), "quiet.wav", None)),
        None,
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let job = wait_status(&app, &id_of(&b), "failed").await;
    assert_eq!(
        (job["error"]["code"].as_str(), job["attempts"].as_u64()),
        (Some("silent_audio"), Some(1)),
        "{job}"
    );

    // A corrupt WAV (a header and nothing that decodes) fails likewise; the worker lives on.
    let mut corrupt = wav(true);
    corrupt.truncate(30);
    let (s, b) = send(
        &app,
        post(audio_form("transcribe", corrupt, "cut.wav", None)),
        None,
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let job = wait_status(&app, &id_of(&b), "failed").await;
    assert_eq!(job["error"]["retryable"], false, "{job}");
    fake.enqueue("whisper-1", Script::text("fine"));
    let (_, b) = send(
        &app,
        post(audio_form("transcribe", wav(true), "ok.wav", None)),
        None,
    )
    .await;
    wait_status(&app, &id_of(&b), "succeeded").await;
    app.stop().await.unwrap();
}

fn doc_form(
    kind: &str,
    bytes: Vec<u8>,
    name: &str,
    mime: &str,
    then: Option<&str>,
) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new()
        .text("kind", kind.to_owned())
        .text("user_id", "u1")
        .text("coach_id", "fitness")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes)
                .file_name(name.to_owned())
                .mime_str(mime)
                .unwrap(),
        );
    if let Some(then) = then {
        form = form.text("then", then.to_owned());
    }
    form
}

async fn extract_app(fake: &FakeUpstream) -> TestApp {
    // The parser runs in a `coachd __extract` child: the test binary has no such command.
    app(
        fake,
        Services::Real,
        &[("COACHD_EXTRACT_EXECUTABLE", env!("CARGO_BIN_EXE_coachd"))],
    )
    .await
}

const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

#[tokio::test]
async fn a_document_becomes_markdown_notes_and_memories_in_one_chain() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = extract_app(&fake).await;
    script_analysis(&fake);
    let (s, body) = send(
        &app,
        app.client.post(app.url("/api/v1/jobs")).multipart(doc_form(
            "extract",
            coachd::extract::sample::docx(),
            "plan.docx",
            DOCX,
            Some("analyze"),
        )),
        None,
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let id = id_of(&body);
    let job = wait_status(&app, &id, "succeeded").await;
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps[0]["kind"], "extract");
    assert_eq!(steps[0]["queue"], "extraction");
    let (_, result) = send(
        &app,
        app.client.get(app.url(&format!("/api/v1/jobs/{id}/result"))),
        None,
    )
    .await;
    let doc = &result["result"]["steps"][0]["result"];
    assert_eq!(doc["format"], "docx", "{doc}");
    assert!(
        doc["markdown"].as_str().unwrap().contains('#'),
        "headings kept: {doc}"
    );
    assert!(!doc["sections"].as_array().unwrap().is_empty());
    let analysis = &result["result"]["steps"][1]["result"];
    assert_eq!(analysis["source"], "document");
    // The analysis read the document's Markdown.
    let notes_request = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/chat/completions"))
        .unwrap();
    let first_heading = doc["sections"][0]["markdown"]
        .as_str()
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim_start_matches('#')
        .trim()
        .to_owned();
    assert!(
        notes_request.body.to_string().contains(&first_heading),
        "{first_heading}"
    );
    let (_, memories) = send(&app, app.client.get(app.url("/ai/coach/memory/u1/fitness")), None).await;
    assert!(
        memories["memories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["memory_type"] == "document"),
        "{memories}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_documents_fail_at_submit_or_as_a_failed_job_with_a_clear_error() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = extract_app(&fake).await;
    let post = |form| app.client.post(app.url("/api/v1/jobs")).multipart(form);
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let (s, b) = send(
        &app,
        post(doc_form("extract", png, "photo.png", "image/png", None)),
        None,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unsupported_type")),
        "{b}"
    );
    let (s, b) = submit(&app, json!({"kind": "extract", "user_id": "u1", "coach_id": "c"})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("missing_input")),
        "{b}"
    );

    // A DOCX whose document part is cut off, and a PDF that is only a header: failed jobs, once.
    let broken_docx =
        coachd::extract::sample::zip_parts(&[("word/document.xml", "<w:document><w:body><w:p>".to_owned())]);
    let mut cut_pdf = coachd::extract::sample::pdf(2);
    cut_pdf.truncate(40);
    for (bytes, name, mime) in [
        (broken_docx, "broken.docx", DOCX),
        (cut_pdf, "cut.pdf", "application/pdf"),
    ] {
        let (s, b) = send(&app, post(doc_form("extract", bytes, name, mime, None)), None).await;
        assert_eq!(s, 202, "{b}");
        let job = wait_status(&app, &id_of(&b), "failed").await;
        assert!(
            job["error"]["code"].as_str().unwrap().starts_with("document_"),
            "{job}"
        );
        assert_eq!(
            (job["attempts"].as_u64(), job["error"]["retryable"].as_bool()),
            (Some(1), Some(false)),
            "{job}"
        );
    }
    // The worker lives on.
    let (_, b) = send(
        &app,
        post(doc_form(
            "extract",
            coachd::extract::sample::markdown(),
            "notes.md",
            "text/markdown",
            None,
        )),
        None,
    )
    .await;
    wait_status(&app, &id_of(&b), "succeeded").await;
    app.stop().await.unwrap();
}
