//! Micro-benchmark of the LLM side of the token path, without sockets: N OpenAI-format SSE chunks
//! (one per token, as the fake upstream writes them) go through `sse::events` → the OpenAI
//! decoder → `with_timeouts` → the routed chain → the `/v1/chat/completions` relay and axum's SSE
//! body. Deterministic, so it is measured in instructions and allocations under callgrind:
//!
//! ```text
//! cargo bench --bench decode --no-run
//! valgrind --tool=callgrind --callgrind-out-file=cg.N target/release/deps/decode-<hash> relay N
//! ```
//!
//! for N = 1000 and N = 21000; (total(21000) − total(1000)) / 20000 is the cost of one token, in
//! instructions (callgrind's total) and in allocations (the `calls=` to `__rust_alloc` and
//! `__rust_realloc` in the callgrind file).
//! The stage (`sse`, `decode`, `timeouts`, `relay`) says how far down the path the tokens go;
//! `body` only builds the input, to subtract. `routed` is `relay` through the real routing
//! (`Llm::route_model`, with the per-attempt metering of `llm::router` and the Prometheus recorder
//! installed, as a server with metrics on runs it) instead of the hand-made chain.

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORDS: [&str; 8] = [
    "Hello",
    " world",
    ",",
    " café",
    " \"quoted\"",
    " 👋",
    " and",
    "\n",
];

/// The upstream body: a role chunk, one chunk per token, a finish chunk, usage, `[DONE]`.
fn body(tokens: usize) -> Vec<Bytes> {
    let chunk = |delta: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
             \"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_fake\",\"choices\":[{{\"index\":0,\
             \"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        ))
    };
    let mut out = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
    for i in 0..tokens {
        let text = serde_json::to_string(WORDS[i % WORDS.len()]).unwrap_or_default();
        out.push(chunk(&format!("{{\"content\":{text}}}"), "null"));
    }
    out.push(chunk("{}", "\"stop\""));
    out.push(Bytes::from_static(
        b"data: {\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
          \"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\
          \"total_tokens\":21}}\n\n",
    ));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

fn response(chunks: Vec<Bytes>) -> reqwest::Response {
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    reqwest::Response::from(http::Response::new(reqwest::Body::wrap_stream(stream)))
}

/// Runs `tokens` tokens through the path up to `stage`; returns how many items (or bytes) came out.
async fn run(stage: &str, chunks: Vec<Bytes>) -> usize {
    use coachd::llm::{LlmTimeouts, ProviderKind};
    let provider = ProviderKind::Openai;
    let t = LlmTimeouts {
        connect: Duration::from_secs(10),
        first_token: Duration::from_secs(30),
        idle: Duration::from_secs(30),
        total: Duration::from_secs(300),
    };
    match stage {
        // Only the setup (building and dropping the body), to subtract from the others.
        "body" => chunks.len(),
        "sse" => {
            let body = response(chunks).bytes_stream();
            coachd::llm::sse::events(body).count().await
        }
        "decode" => {
            coachd::llm::openai::decode_stream(provider, response(chunks))
                .count()
                .await
        }
        "routed" => {
            let _ = coachd::metric::install();
            let retry = coachd::llm::router::RetryPolicy {
                max_retries: 0,
                base: Duration::from_millis(1),
                max_wait: Duration::from_secs(1),
            };
            let prepared = Prepared(std::sync::Mutex::new(Some(chunks)));
            let llm = coachd::llm::Llm::new(
                vec![std::sync::Arc::new(prepared)],
                Vec::new(),
                provider,
                t,
                retry,
            );
            let model = coachd::llm::ModelRef {
                provider,
                model: "gpt-4o-mini".to_owned(),
                params: Default::default(),
            };
            let Ok(routed) = llm
                .route_model(model, None, vec![coachd::llm::Message::user("hi")], None)
                .await
            else {
                return 0;
            };
            drain(coachd::routes::openai_compat::stream_response(
                routed.stream,
                true,
            ))
            .await
        }
        _ => {
            let start = async move { Ok(coachd::llm::openai::decode_stream(provider, response(chunks))) };
            let mut stream =
                coachd::llm::timeout::with_timeouts(provider, t, Instant::now() + t.total, start);
            // What routing does: read up to the first text, then chain it back in front.
            let head = stream.next().await.into_iter().collect::<Vec<_>>();
            let routed: coachd::llm::EventStream = Box::pin(futures::stream::iter(head).chain(stream));
            if stage == "timeouts" {
                return routed.count().await;
            }
            drain(coachd::routes::openai_compat::stream_response(routed, true)).await
        }
    }
}

/// Reads a response body to its end; returns its length.
async fn drain(response: axum::response::Response) -> usize {
    let mut data = response.into_body().into_data_stream();
    let mut bytes = 0;
    while let Some(Ok(b)) = data.next().await {
        bytes += b.len();
    }
    bytes
}

/// A provider whose one stream decodes the prepared upstream body.
#[derive(Debug)]
struct Prepared(std::sync::Mutex<Option<Vec<Bytes>>>);

#[async_trait::async_trait]
impl coachd::llm::Provider for Prepared {
    fn kind(&self) -> coachd::llm::ProviderKind {
        coachd::llm::ProviderKind::Openai
    }
    fn default_model(&self) -> &str {
        "gpt-4o-mini"
    }
    fn supports_json_schema(&self) -> bool {
        true
    }
    fn supports_json_object(&self) -> bool {
        true
    }
    async fn stream(
        &self,
        _request: coachd::llm::ChatRequest,
    ) -> Result<coachd::llm::EventStream, coachd::llm::LlmError> {
        let chunks = self.0.lock().ok().and_then(|mut c| c.take()).unwrap_or_default();
        Ok(coachd::llm::openai::decode_stream(
            coachd::llm::ProviderKind::Openai,
            response(chunks),
        ))
    }
    async fn check(&self) -> Result<(), coachd::llm::LlmError> {
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let stage = args.next().unwrap_or_else(|| "relay".to_owned());
    let tokens: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(run(&stage, body(tokens)));
    println!("stage={stage} tokens={tokens} out={out}");
    Ok(())
}
