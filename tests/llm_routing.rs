//! Task routing against the fake upstream: retry and fallback order, no fallback after the first
//! token, one error listing every attempt, cancellation reaching the upstream, generate and
//! generate_json (with repair), tasks files, the offline provider, and /health/llm.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use coachd::Settings;
use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use coachd::llm::ProviderKind;
use coachd::llm::error::TimeoutPhase;
use coachd::llm::{Llm, LlmError, LlmEvent, Message, Params, collect};
use futures::StreamExt;
use serde_json::json;

const TASKS: &str = r#"
[tasks.routed]
description = "three models"
primary = { provider = "openai", model = "model-a" }
fallbacks = [
  { provider = "anthropic", model = "model-b" },
  { provider = "openai", model = "model-c", temperature = 0.1 },
]
"#;

fn tasks_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("coachd-tasks-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

fn settings(fake: &FakeUpstream, extra: &[(&str, &str)]) -> Settings {
    let base = fake.base_url();
    let file = tasks_file(TASKS);
    let mut vars = vec![
        ("OPENAI_API_KEY", "k"),
        ("ANTHROPIC_API_KEY", "k"),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
        ("COACHD_ANTHROPIC_BASE_URL", base.as_str()),
        ("COACHD_LLM_MAX_RETRIES", "1"),
        ("COACHD_LLM_RETRY_BASE_MS", "10"),
        ("COACHD_LLM_MAX_RETRY_WAIT_MS", "1000"),
    ];
    let file = file.to_string_lossy().into_owned();
    vars.push(("COACHD_LLM_TASKS_FILE", &file));
    vars.extend_from_slice(extra);
    Settings::for_tests(&vars).unwrap()
}

fn models_requested(fake: &FakeUpstream) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Who served (when routing chose a model), the events read, and the error that ended the call.
type Run = (Option<(ProviderKind, String)>, Vec<LlmEvent>, Option<LlmError>);

async fn run(llm: &Llm, task: &str) -> Run {
    let routed = llm
        .route_task(
            task,
            &Params::default(),
            Some("sys".into()),
            vec![Message::user("hello")],
            None,
        )
        .await;
    let mut routed = match routed {
        Ok(r) => r,
        Err(e) => return (None, Vec::new(), Some(e)),
    };
    let served = Some((routed.provider, routed.model.clone()));
    let mut events = Vec::new();
    while let Some(item) = routed.stream.next().await {
        match item {
            Ok(e) => events.push(e),
            Err(e) => return (served, events, Some(e)),
        }
    }
    (served, events, None)
}

#[tokio::test]
async fn retries_then_falls_back_in_order_before_the_first_token() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model("model-a", Script::status(500));
    fake.set_model(
        "model-b",
        Script::default().with_fault(Fault::Status {
            status: 529,
            retry_after: None,
        }),
    );
    fake.set_model("model-c", Script::text("from c"));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();

    let (served, events, error) = run(&llm, "routed").await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(served, Some((ProviderKind::Openai, "model-c".into())));
    assert_eq!(events[0], LlmEvent::Delta("from".into()));
    // One retry per model (COACHD_LLM_MAX_RETRIES=1), in the task's order.
    assert_eq!(
        models_requested(&fake),
        ["model-a", "model-a", "model-b", "model-b", "model-c"]
    );
    let c_request = fake.requests().pop().unwrap();
    assert_eq!(c_request.body["temperature"], 0.1, "per-model parameters apply");
}

#[tokio::test]
async fn non_retryable_errors_fall_back_without_retrying() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model("model-a", Script::default().with_fault(Fault::Quota));
    fake.set_model("model-b", Script::status(400));
    fake.set_model("model-c", Script::text("ok"));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let (served, _, error) = run(&llm, "routed").await;
    assert!(error.is_none());
    assert_eq!(served, Some((ProviderKind::Openai, "model-c".into())));
    assert_eq!(models_requested(&fake), ["model-a", "model-b", "model-c"]);
}

#[tokio::test]
async fn a_retry_after_longer_than_allowed_goes_to_the_fallback_at_once() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model(
        "model-a",
        Script::default().with_fault(Fault::Status {
            status: 429,
            retry_after: Some(60),
        }),
    );
    fake.set_model("model-b", Script::text("b"));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let (served, _, error) = run(&llm, "routed").await;
    assert!(error.is_none());
    assert_eq!(served, Some((ProviderKind::Anthropic, "model-b".into())));
    assert_eq!(models_requested(&fake), ["model-a", "model-b"]);
}

#[tokio::test]
async fn a_short_retry_after_is_honoured_on_the_same_model() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.enqueue(
        "model-a",
        Script::default().with_fault(Fault::Status {
            status: 429,
            retry_after: Some(0),
        }),
    );
    fake.set_model("model-a", Script::text("a after retry"));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let (served, _, error) = run(&llm, "routed").await;
    assert!(error.is_none());
    assert_eq!(served, Some((ProviderKind::Openai, "model-a".into())));
    assert_eq!(models_requested(&fake), ["model-a", "model-a"]);
}

#[tokio::test]
async fn when_every_model_fails_one_error_lists_each_attempt() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model("model-a", Script::status(503));
    fake.set_model("model-b", Script::counted(3).with_fault(Fault::Cut { after: 0 }));
    fake.set_model("model-c", Script::status(400));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let (served, events, error) = run(&llm, "routed").await;
    assert!(
        served.is_none() && events.is_empty(),
        "nothing reaches the client: {events:?}"
    );
    match error {
        Some(LlmError::AllFailed { task, attempts }) => {
            assert_eq!(task, "routed");
            let models: Vec<&str> = attempts.iter().map(|a| a.model.as_str()).collect();
            assert_eq!(models, ["model-a", "model-a", "model-b", "model-b", "model-c"]);
            // Each attempt keeps its typed error.
            assert!(
                matches!(
                    attempts[0].error,
                    LlmError::Unavailable {
                        status: Some(503),
                        ..
                    }
                ),
                "{}",
                attempts[0].error
            );
            assert!(
                matches!(attempts[2].error, LlmError::Incomplete { .. }),
                "{}",
                attempts[2].error
            );
            assert!(
                matches!(attempts[4].error, LlmError::ContextTooLong { .. }),
                "{}",
                attempts[4].error
            );
            let e = LlmError::AllFailed { task, attempts };
            assert!(e.to_string().contains("503") && e.to_string().contains("context too long"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_total_timeout_bounds_the_whole_call_across_retries_and_fallbacks() {
    let fake = FakeUpstream::start().await.unwrap();
    // Every model answers its first token after 300 ms; each attempt gives up at 200 ms. Three
    // models with one retry each would be six attempts; the call's 500 ms budget ends it first.
    fake.set_default(Script::text("late").paced(Duration::from_millis(300), Duration::ZERO));
    let s = settings(
        &fake,
        &[
            ("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "200"),
            ("COACHD_LLM_TOTAL_TIMEOUT_MS", "500"),
        ],
    );
    let llm = Llm::from_settings(&s).unwrap();
    let (served, events, err) = run(&llm, "routed").await;
    assert!(served.is_none() && events.is_empty(), "{events:?}");
    let Some(LlmError::AllFailed { attempts, .. }) = err else {
        panic!("expected every attempt to fail: {err:?}")
    };
    assert!(
        matches!(
            attempts.last().map(|a| &a.error),
            Some(LlmError::Timeout {
                phase: TimeoutPhase::Total,
                ..
            })
        ),
        "the last attempt is the total timeout: {attempts:?}"
    );
    let tried = fake.requests().len();
    assert!(
        (1..6).contains(&tried),
        "the budget cut the chain short: {tried} upstream requests"
    );
}

#[tokio::test]
async fn after_the_first_token_a_failure_ends_the_stream_with_an_error_and_no_fallback() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model(
        "model-a",
        Script::counted(6).with_fault(Fault::MidStreamError { after: 2 }),
    );
    fake.set_model("model-b", Script::text("never used"));
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let (_, events, error) = run(&llm, "routed").await;
    let deltas: Vec<&LlmEvent> = events
        .iter()
        .filter(|e| matches!(e, LlmEvent::Delta(_)))
        .collect();
    assert_eq!(deltas.len(), 2);
    assert!(matches!(error, Some(LlmError::Stream { .. })), "{error:?}");
    assert_eq!(models_requested(&fake), ["model-a"]);
}

#[tokio::test]
async fn dropping_the_stream_aborts_the_upstream_request() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_model(
        "model-a",
        Script::counted(500).paced(Duration::ZERO, Duration::from_millis(20)),
    );
    let llm = Llm::from_settings(&settings(&fake, &[])).unwrap();
    let mut stream = llm
        .route_task(
            "routed",
            &Params::default(),
            None,
            vec![Message::user("go")],
            None,
        )
        .await
        .unwrap()
        .stream;
    let mut deltas = 0;
    while let Some(Ok(event)) = stream.next().await {
        if matches!(event, LlmEvent::Delta(_)) {
            deltas += 1;
            if deltas == 3 {
                break;
            }
        }
    }
    drop(stream);
    assert_eq!(
        fake.wait_disconnects(1, Duration::from_secs(5)).await,
        1,
        "the fake saw the client go away"
    );
    assert_eq!(fake.streams(), (1, 0), "the stream never ran to its end");
}

#[tokio::test]
async fn generate_sends_system_history_and_prompt() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::echo());
    let llm = Llm::from_settings(&settings(&fake, &[("LLM_PROVIDER", "openai")])).unwrap();
    let history = [Message::user("How do I scale?"), Message::assistant("Hire well.")];
    let c = llm
        .generate("Tell me more", Some("You are a business coach."), &history)
        .await
        .unwrap();
    assert_eq!(c.content, "echo: Tell me more");
    assert_eq!(c.provider, ProviderKind::Openai);
    let body = &fake.requests()[0].body;
    let roles: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(body["messages"][0]["content"], "You are a business coach.");
}

#[tokio::test]
async fn generate_json_uses_native_modes_and_repairs_once() {
    let fake = FakeUpstream::start().await.unwrap();
    let schema = json!({"type": "object", "required": ["actions"], "properties": {"actions": {"type": "array", "items": {"type": "string"}}}});
    let llm = Llm::from_settings(&settings(&fake, &[("LLM_PROVIDER", "openai")])).unwrap();

    fake.enqueue("*", Script::text(r#"{"actions": ["call three leads"]}"#));
    let v = llm
        .generate_json("chat", "List actions", Some("Coach."), Some(&schema))
        .await
        .unwrap();
    assert_eq!(v["actions"][0], "call three leads");
    let req = fake.requests().pop().unwrap();
    assert_eq!(req.body["response_format"]["type"], "json_schema");
    assert!(
        req.body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("JSON Schema")
    );

    // Invalid first, valid after the repair request.
    fake.enqueue("*", Script::text("Here you go: actions are call and email"));
    fake.enqueue("*", Script::text(r#"{"actions": ["email"]}"#));
    let v = llm
        .generate_json("chat", "List actions", None, Some(&schema))
        .await
        .unwrap();
    assert_eq!(v["actions"][0], "email");
    let repair = fake.requests().pop().unwrap();
    let last = repair.body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(last["content"].as_str().unwrap().contains("not valid"), "{last}");

    // Invalid twice: a typed error.
    fake.enqueue("*", Script::text(r#"{"wrong": true}"#));
    fake.enqueue("*", Script::text(r#"{"still": "wrong"}"#));
    let e = llm
        .generate_json("chat", "List actions", None, Some(&schema))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LlmError::InvalidJson { message } if message.contains("actions")),
        "{e:?}"
    );
}

#[tokio::test]
async fn anthropic_json_mode_is_instructions_plus_validation() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("```json\n{\"ok\": true}\n```"));
    let llm = Llm::from_settings(&settings(&fake, &[("LLM_PROVIDER", "anthropic")])).unwrap();
    let v = llm.generate_json("chat", "Say ok", None, None).await.unwrap();
    assert_eq!(v, json!({"ok": true}));
    let req = fake.requests().pop().unwrap();
    assert_eq!(req.path, "/v1/messages");
    assert!(req.body.get("response_format").is_none());
    assert!(req.body["system"].as_str().unwrap().contains("valid JSON"));
}

#[tokio::test]
async fn without_keys_the_offline_provider_serves_every_task() {
    let llm =
        Llm::from_settings(&Settings::for_tests(&[("COACHD_OFFLINE_TOKEN_DELAY_MS", "0")]).unwrap()).unwrap();
    assert_eq!(llm.default_provider(), ProviderKind::Offline);
    let names: Vec<&str> = llm.tasks().map(|t| t.name.as_str()).collect();
    for task in coachd::llm::router::BUILTIN_TASKS {
        assert!(names.contains(&task), "{task} missing");
    }
    let routed = llm
        .route_task(
            "chat",
            &Params::default(),
            None,
            vec![Message::user("Plan my week")],
            None,
        )
        .await
        .unwrap();
    let c = collect(routed).await.unwrap();
    assert_eq!(c.provider, ProviderKind::Offline);
    assert!(c.content.contains("Plan my week"));
}

#[tokio::test]
async fn tasks_files_are_validated_at_start_up() {
    let fake = FakeUpstream::start().await.unwrap();
    let bad = tasks_file("[tasks.x]\nprimary = { provider = \"groq\", model = \"m\" }\n");
    let s = Settings::for_tests(&[
        ("OPENAI_API_KEY", "k"),
        ("COACHD_LLM_TASKS_FILE", bad.to_str().unwrap()),
    ])
    .unwrap();
    let e = Llm::from_settings(&s).unwrap_err();
    assert!(e.contains("groq") && e.contains("no API key"), "{e}");

    let s = settings(&fake, &[]);
    let llm = Llm::from_settings(&s).unwrap();
    assert!(llm.task("routed").is_some() && llm.task("chat").is_some());
    assert!(matches!(
        run(&llm, "nope").await.2,
        Some(LlmError::UnknownTask(_))
    ));
}

#[tokio::test]
async fn health_llm_probes_the_default_provider() {
    let fake = FakeUpstream::start_with_key(Some("right")).await.unwrap();
    let base = fake.base_url();
    let app = common::spawn_app_with(
        common::Services::Embedded,
        &[
            ("LLM_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "right"),
            ("COACHD_OPENAI_BASE_URL", &base),
        ],
    )
    .await;
    let resp = app.get("/health/llm").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["backend"].as_str()),
        (Some("up"), Some("openai"))
    );
    assert_eq!(fake.request_count("/v1/models"), 1);
    app.stop().await.unwrap();

    let app = common::spawn_app_with(
        common::Services::Embedded,
        &[
            ("LLM_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "wrong"),
            ("COACHD_OPENAI_BASE_URL", &base),
        ],
    )
    .await;
    let resp = app.get("/health/llm").await;
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "down");
    assert!(
        !body.to_string().contains("wrong"),
        "no key in the report: {body}"
    );
    app.stop().await.unwrap();
}
