//! Every provider against every wire behaviour of the fake upstream: normal streams, HTTP error
//! statuses, errors inside the stream, cuts, CRLF, splits mid-line and mid-character, byte-order
//! marks, comment lines, and replays of real captured traffic (`tests/wire/`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use coachd::Settings;
use coachd::fake_upstream::{FakeUpstream, Fault, Flavor, Script};
use coachd::llm::ProviderKind;
use coachd::llm::{
    ChatRequest, Completion, FinishReason, Llm, LlmError, LlmEvent, Message, Params, Routed, collect,
};
use futures::StreamExt;

const KEY: &str = "test-key-123";
const KINDS: [ProviderKind; 4] = [
    ProviderKind::Openai,
    ProviderKind::Groq,
    ProviderKind::Openrouter,
    ProviderKind::Anthropic,
];

fn llm(kind: ProviderKind, fake: &FakeUpstream, key: &str) -> Llm {
    let base = fake.base_url();
    let settings = Settings::for_tests(&[
        ("LLM_PROVIDER", kind.as_str()),
        ("OPENAI_API_KEY", key),
        ("GROQ_API_KEY", key),
        ("ANTHROPIC_API_KEY", key),
        ("OPENROUTER_API_KEY", key),
        ("OPENAI_MODEL", "gpt-test"),
        ("GROQ_MODEL", "llama-test"),
        ("ANTHROPIC_MODEL", "claude-test"),
        ("COACHD_OPENROUTER_MODEL", "router/test"),
        ("COACHD_OPENAI_BASE_URL", &base),
        ("COACHD_GROQ_BASE_URL", &base),
        ("COACHD_ANTHROPIC_BASE_URL", &base),
        ("COACHD_OPENROUTER_BASE_URL", &base),
        ("COACHD_OPENROUTER_REFERER", "https://coach.example"),
    ])
    .unwrap();
    Llm::from_settings(&settings).unwrap()
}

fn flavored(kind: ProviderKind, script: Script) -> Script {
    script.flavor(match kind {
        ProviderKind::Groq => Flavor::Groq,
        ProviderKind::Openrouter => Flavor::OpenRouter,
        _ => Flavor::OpenAi,
    })
}

fn request() -> ChatRequest {
    ChatRequest {
        model: String::new(),
        system: Some("You are a coach.".into()),
        messages: vec![Message::user("How do I scale my sales team?")],
        params: Params {
            max_tokens: Some(100),
            ..Params::default()
        },
        response_format: None,
    }
}

/// Streams one request straight from the provider (no routing) and collects it.
async fn call(
    kind: ProviderKind,
    script: Script,
) -> (Result<Completion, LlmError>, Vec<String>, FakeUpstream) {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    fake.set_default(flavored(kind, script));
    let llm = llm(kind, &fake, KEY);
    let provider = llm.provider(kind).unwrap().clone();
    let mut deltas = Vec::new();
    let result = match provider.stream(request()).await {
        Err(e) => Err(e),
        Ok(stream) => {
            // Tee the deltas so tests can see what arrived before an error.
            let (tx, rx) = std::sync::mpsc::channel();
            let teed = stream.inspect(move |e| {
                if let Ok(LlmEvent::Delta(t)) = e {
                    let _ = tx.send(t.clone());
                }
            });
            let routed = Routed {
                provider: kind,
                model: String::new(),
                stream: Box::pin(teed),
            };
            let r = collect(routed).await;
            deltas.extend(rx.try_iter());
            r
        }
    };
    (result, deltas, fake)
}

#[tokio::test]
async fn every_provider_streams_text_usage_and_finish() {
    for kind in KINDS {
        let (result, deltas, fake) = call(kind, Script::text("Start with your pipeline metrics.")).await;
        let c = result.unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(c.content, "Start with your pipeline metrics.", "{kind}");
        assert_eq!(deltas.len(), 5, "{kind}: one delta per token");
        assert_eq!(c.finish_reason, FinishReason::Stop, "{kind}");
        let usage = c.usage.unwrap_or_else(|| panic!("{kind}: usage reported"));
        assert_eq!(usage.completion_tokens, 5, "{kind}");
        assert!(usage.prompt_tokens > 0, "{kind}");

        let req = fake.requests().pop().unwrap();
        match kind {
            ProviderKind::Anthropic => {
                assert_eq!(req.path, "/v1/messages");
                assert_eq!(req.headers["x-api-key"], KEY);
                assert_eq!(req.headers["anthropic-version"], "2023-06-01");
                assert_eq!(req.body["system"], "You are a coach.");
                assert_eq!(req.body["max_tokens"], 100);
                assert_eq!(req.body["model"], "claude-test");
            }
            _ => {
                assert_eq!(req.path, "/v1/chat/completions");
                assert_eq!(req.headers["authorization"], format!("Bearer {KEY}"));
                assert_eq!(
                    req.body["stream_options"]["include_usage"], true,
                    "{kind}: asks for usage"
                );
                assert_eq!(req.body["messages"][0]["role"], "system");
            }
        }
        if kind == ProviderKind::Openrouter {
            assert_eq!(req.headers["x-title"], "coachd");
            assert_eq!(req.headers["http-referer"], "https://coach.example");
            assert_eq!(req.body["model"], "router/test");
        }
        assert_eq!(req.headers["accept"], "text/event-stream");
    }
}

#[tokio::test]
async fn http_error_statuses_become_typed_errors() {
    for kind in KINDS {
        let (r, _, _) = call(
            kind,
            Script::default().with_fault(Fault::Status {
                status: 429,
                retry_after: Some(7),
            }),
        )
        .await;
        match r {
            Err(LlmError::RateLimited { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)), "{kind}")
            }
            other => panic!("{kind}: 429 → {other:?}"),
        }
        for status in [500, 503] {
            let (r, _, _) = call(kind, Script::status(status)).await;
            assert!(
                matches!(r, Err(LlmError::Unavailable { status: Some(s), .. }) if s == status),
                "{kind} {status}: {r:?}"
            );
        }
        let (r, _, _) = call(kind, Script::status(400)).await;
        if kind == ProviderKind::Openrouter {
            assert!(
                matches!(r, Err(LlmError::BadRequest { status: 400, .. })),
                "{kind}: {r:?}"
            );
        } else {
            assert!(matches!(r, Err(LlmError::ContextTooLong { .. })), "{kind}: {r:?}");
        }
    }
    let (r, _, _) = call(ProviderKind::Anthropic, Script::status(529)).await;
    assert!(
        matches!(
            r,
            Err(LlmError::Unavailable {
                status: Some(529),
                ..
            })
        ),
        "{r:?}"
    );
    let (r, _, _) = call(ProviderKind::Openai, Script::default().with_fault(Fault::Quota)).await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, LlmError::QuotaExceeded { .. }) && !e.retryable(),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_an_authentication_error_without_the_key_in_it() {
    for kind in KINDS {
        let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
        let llm = llm(kind, &fake, "sk-wrong-secret-key");
        let e = llm.provider(kind).unwrap().stream(request()).await.err().unwrap();
        assert!(matches!(e, LlmError::Authentication { .. }), "{kind}: {e:?}");
        assert!(!e.to_string().contains("sk-wrong-secret-key"), "{kind}: {e}");
        let check = llm.provider(kind).unwrap().check().await;
        assert!(
            matches!(check, Err(LlmError::Authentication { .. })),
            "{kind}: {check:?}"
        );
    }
}

#[tokio::test]
async fn an_error_inside_the_stream_is_an_error_after_the_text_before_it() {
    for kind in KINDS {
        let (r, deltas, _) = call(
            kind,
            Script::counted(6).with_fault(Fault::MidStreamError { after: 3 }),
        )
        .await;
        assert_eq!(deltas.len(), 3, "{kind}");
        match r {
            Err(LlmError::Stream { kind: k, .. }) => {
                if kind == ProviderKind::Anthropic {
                    assert_eq!(k, "overloaded_error");
                }
            }
            other => panic!("{kind}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_stream_cut_without_its_end_is_incomplete() {
    for kind in KINDS {
        for after in [0, 4] {
            let (r, deltas, _) = call(kind, Script::counted(6).with_fault(Fault::Cut { after })).await;
            assert!(
                matches!(r, Err(LlmError::Incomplete { .. })),
                "{kind} after {after}: {r:?}"
            );
            assert_eq!(deltas.len(), after, "{kind}");
        }
    }
}

#[tokio::test]
async fn crlf_split_writes_and_byte_order_marks_decode_the_same() {
    let text = "Grüße 👋 aus 東京, ça va?";
    for kind in KINDS {
        for split in [1, 3, 7] {
            let mut script = Script::text(text);
            script.crlf = split != 3;
            script.split_bytes = Some(split);
            script.leading_bom = split == 3;
            let (r, _, _) = call(kind, script).await;
            let c = r.unwrap_or_else(|e| panic!("{kind} split {split}: {e}"));
            assert_eq!(c.content, text, "{kind} split {split}");
            assert_eq!(c.finish_reason, FinishReason::Stop);
        }
    }
}

fn wire(name: &str) -> Bytes {
    Bytes::from(std::fs::read(format!("{}/tests/wire/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap())
}

async fn replay(kind: ProviderKind, chunks: Vec<Bytes>) -> Result<Completion, LlmError> {
    call(kind, Script::raw(chunks)).await.0
}

#[tokio::test]
async fn captured_openai_compatible_streams_decode_as_documented() {
    let c = replay(ProviderKind::Openai, vec![wire("openai_stream_usage.sse")])
        .await
        .unwrap();
    assert_eq!(c.content.chars().count(), 1724);
    assert_eq!(
        c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((16, 300))
    );

    let c = replay(ProviderKind::Openai, vec![wire("openai_stream_basic.sse")])
        .await
        .unwrap();
    assert!(c.content.starts_with("Hello! How can"), "{}", c.content);
    assert_eq!(c.finish_reason, FinishReason::Stop);

    let c = replay(ProviderKind::Openai, vec![wire("openai_stream_toolcall.sse")])
        .await
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::ToolCalls);
    assert_eq!(c.content, "");

    let c = replay(ProviderKind::Groq, vec![wire("groq_stream_usage.sse")])
        .await
        .unwrap();
    assert_eq!(
        c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((45, 662))
    );

    let c = replay(
        ProviderKind::Openrouter,
        vec![wire("openrouter_stream_comments.sse")],
    )
    .await
    .unwrap();
    assert!(c.content.starts_with('1'), "{}", c.content);
    assert!(c.usage.is_some());

    let e = replay(
        ProviderKind::Openrouter,
        vec![wire("openrouter_stream_midstream_error.sse")],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, LlmError::Stream { message, .. } if message.contains("Provider disconnected")),
        "{e:?}"
    );

    let c = replay(ProviderKind::Openai, vec![wire("crlf_variant.sse")])
        .await
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(!c.content.is_empty());
}

#[tokio::test]
async fn captured_anthropic_streams_decode_as_documented() {
    let c = replay(ProviderKind::Anthropic, vec![wire("anthropic_stream_basic.sse")])
        .await
        .unwrap();
    assert_eq!(c.content, "Hello!");
    assert_eq!(
        c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((25, 15))
    );
    let c = replay(
        ProviderKind::Anthropic,
        vec![wire("anthropic_stream_captured.sse")],
    )
    .await
    .unwrap();
    assert_eq!(
        c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((12, 30))
    );
    assert_eq!(c.finish_reason, FinishReason::Stop);
}

#[tokio::test]
async fn the_captured_split_chunk_plan_decodes_exactly() {
    let plan: serde_json::Value = serde_json::from_slice(&wire("split_chunks.json")).unwrap();
    let chunks: Vec<Bytes> = plan["chunks_base64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(c.as_str().unwrap())
                    .unwrap(),
            )
        })
        .collect();
    let c = replay(ProviderKind::Openai, chunks).await.unwrap();
    assert_eq!(c.content, plan["expected_text"].as_str().unwrap());
    assert_eq!(
        c.finish_reason.as_str(),
        plan["expected_finish_reason"].as_str().unwrap()
    );
}

#[tokio::test]
async fn invalid_utf8_in_a_stream_fails_at_once() {
    let chunks = vec![
        Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":null}]}\n\n",
        ),
        Bytes::from_static(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xFF\xFE\"}}]}\n\n"),
    ];
    // The connection stays open afterwards: the error must come from the bad bytes, not the close.
    let script = Script::raw(chunks).with_fault(Fault::Stall { after: 0 });
    let (r, _, _) = tokio::time::timeout(Duration::from_secs(5), call(ProviderKind::Openai, script))
        .await
        .expect("invalid UTF-8 must fail at once, not stall until the connection closes");
    let e = r.unwrap_err();
    assert!(
        matches!(&e, LlmError::Unavailable { message, .. } if message.contains("UTF-8")),
        "{e:?}"
    );
}
