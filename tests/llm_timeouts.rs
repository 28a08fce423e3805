//! The four upstream timeouts (connect, first token, idle, total), each against a real socket:
//! a listener whose accept queue is full, and the fake upstream pacing or stalling its stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use coachd::Settings;
use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use coachd::llm::ProviderKind;
use coachd::llm::error::TimeoutPhase;
use coachd::llm::timeout::with_timeouts;
use coachd::llm::{ChatRequest, LlmError, LlmEvent, Message, Params, Routed, collect};
use futures::StreamExt;

fn settings(kind: ProviderKind, base: &str, timeouts: &[(&str, &str)]) -> Settings {
    let mut vars = vec![
        ("LLM_PROVIDER", kind.as_str()),
        ("OPENAI_API_KEY", "k"),
        ("ANTHROPIC_API_KEY", "k"),
        ("COACHD_OPENAI_BASE_URL", base),
        ("COACHD_ANTHROPIC_BASE_URL", base),
    ];
    vars.extend_from_slice(timeouts);
    Settings::for_tests(&vars).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        model: String::new(),
        system: None,
        messages: vec![Message::user("hi")],
        params: Params::default(),
        response_format: None,
    }
}

/// Streams one request through the timeout wrapper, returning the deltas seen and the outcome.
async fn timed_call(kind: ProviderKind, s: &Settings) -> (usize, Result<(), LlmError>) {
    let llm = coachd::llm::Llm::from_settings(s).unwrap();
    let provider = llm.provider(kind).unwrap().clone();
    let deadline = tokio::time::Instant::now() + s.llm.llm_timeouts.total;
    let mut stream = with_timeouts(kind, s.llm.llm_timeouts, deadline, async move {
        provider.stream(request()).await
    });
    let mut deltas = 0;
    while let Some(item) = stream.next().await {
        match item {
            Ok(LlmEvent::Delta(_)) => deltas += 1,
            Ok(_) => {}
            Err(e) => return (deltas, Err(e)),
        }
    }
    (deltas, Ok(()))
}

fn phase(r: &Result<(), LlmError>) -> Option<TimeoutPhase> {
    match r {
        Err(LlmError::Timeout { phase, .. }) => Some(*phase),
        _ => None,
    }
}

/// A listener that never accepts, with its accept queue filled: further connects get no answer.
fn unanswered_listener() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    // Linux completes backlog+1 handshakes, then drops further SYNs: fill until a connect hangs.
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    (addr, held, socket)
}

#[tokio::test]
async fn connect_timeout_fires_when_the_upstream_never_answers_the_handshake() {
    let (addr, _held, _listener) = unanswered_listener();
    let base = format!("http://{addr}/v1");
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let s = settings(kind, &base, &[("COACHD_LLM_CONNECT_TIMEOUT_MS", "300")]);
        let (_, r) = timed_call(kind, &s).await;
        assert_eq!(phase(&r), Some(TimeoutPhase::Connect), "{kind}: {r:?}");
    }
}

#[tokio::test]
async fn first_token_timeout_fires_on_a_slow_first_token_and_on_slow_headers() {
    let fake = FakeUpstream::start().await.unwrap();
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let s = settings(
            kind,
            &fake.base_url(),
            &[("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "300")],
        );
        fake.set_default(Script::counted(3).paced(Duration::from_secs(5), Duration::ZERO));
        let (deltas, r) = timed_call(kind, &s).await;
        assert_eq!(
            (deltas, phase(&r)),
            (0, Some(TimeoutPhase::FirstToken)),
            "{kind}: {r:?}"
        );

        let mut slow_headers = Script::counted(3);
        slow_headers.header_delay = Duration::from_secs(5);
        fake.set_default(slow_headers);
        let (_, r) = timed_call(kind, &s).await;
        assert_eq!(phase(&r), Some(TimeoutPhase::FirstToken), "{kind}: {r:?}");
    }
}

#[tokio::test]
async fn idle_timeout_fires_when_a_stream_stalls_after_some_tokens() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(10).with_fault(Fault::Stall { after: 4 }));
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let s = settings(kind, &fake.base_url(), &[("COACHD_LLM_IDLE_TIMEOUT_MS", "300")]);
        let (deltas, r) = timed_call(kind, &s).await;
        assert_eq!(
            (deltas, phase(&r)),
            (4, Some(TimeoutPhase::Idle)),
            "{kind}: {r:?}"
        );
    }
}

#[tokio::test]
async fn total_timeout_fires_on_a_stream_that_flows_but_too_long() {
    let fake = FakeUpstream::start().await.unwrap();
    // 100 tokens 50 ms apart: never idle for long, but 5 s in all.
    fake.set_default(Script::counted(100).paced(Duration::ZERO, Duration::from_millis(50)));
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let s = settings(
            kind,
            &fake.base_url(),
            &[
                ("COACHD_LLM_TOTAL_TIMEOUT_MS", "600"),
                ("COACHD_LLM_IDLE_TIMEOUT_MS", "2000"),
            ],
        );
        let (deltas, r) = timed_call(kind, &s).await;
        assert_eq!(phase(&r), Some(TimeoutPhase::Total), "{kind}: {r:?}");
        assert!(
            deltas > 0 && deltas < 100,
            "{kind}: {deltas} tokens before the total timeout"
        );
    }
}

#[tokio::test]
async fn within_every_timeout_the_stream_completes() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(5).paced(Duration::from_millis(50), Duration::from_millis(20)));
    let s = settings(
        ProviderKind::Openai,
        &fake.base_url(),
        &[
            ("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "2000"),
            ("COACHD_LLM_IDLE_TIMEOUT_MS", "2000"),
        ],
    );
    let llm = coachd::llm::Llm::from_settings(&s).unwrap();
    let p = llm.provider(ProviderKind::Openai).unwrap().clone();
    let deadline = tokio::time::Instant::now() + s.llm.llm_timeouts.total;
    let stream = with_timeouts(ProviderKind::Openai, s.llm.llm_timeouts, deadline, async move {
        p.stream(request()).await
    });
    let routed = Routed {
        provider: ProviderKind::Openai,
        model: String::new(),
        stream,
    };
    let c = collect(routed).await.unwrap();
    assert_eq!(c.content, "t0 t1 t2 t3 t4");
}
