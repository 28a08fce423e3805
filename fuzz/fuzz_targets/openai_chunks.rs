//! The OpenAI-compatible chunk decoder (`llm::openai::decode_stream`, also Groq's and
//! OpenRouter's) over a body cut into chunks. Checks: it never panics or stalls; what it yields
//! is text deltas, then either one error or an optional usage and one finish, and nothing after
//! that; and the same events come out however the body is cut.
#![no_main]

use coachd::llm::openai::decode_stream;
use coachd::llm::{LlmEvent, ProviderKind};
use coachd_fuzz::{chunks, drain, response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let decode = |parts: Vec<Vec<u8>>| {
        let mut stream = decode_stream(ProviderKind::Openai, response(parts));
        drain(stream.as_mut())
    };
    let whole = decode(vec![body.to_vec()]);
    check_shape(&whole);
    let cut = decode(
        chunks(body, u64::from(seed))
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect(),
    );
    assert_eq!(whole, cut, "the events depend on where the body is cut");
});

fn check_shape(events: &[Result<LlmEvent, coachd::llm::LlmError>]) {
    let (last, init) = events
        .split_last()
        .expect("a decoded stream ends with a finish or an error");
    let mut rest = init;
    while let [Ok(LlmEvent::Delta(text)), tail @ ..] = rest {
        assert!(!text.is_empty(), "an empty delta");
        rest = tail;
    }
    match (rest, last) {
        ([], Err(_))
        | ([], Ok(LlmEvent::Finish(_)))
        | ([Ok(LlmEvent::Usage(_))], Ok(LlmEvent::Finish(_))) => {}
        _ => panic!("out of order: {events:?}"),
    }
}
