//! The fake's OpenAI-compatible `POST /v1/chat/completions`, streaming and not, in OpenAI, Groq
//! and OpenRouter flavours (see `shared/wire/openai_*`, `groq_*`, `openrouter_*`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{
    Dialect, Fault, Flavor, Piece, Script, Shared, check_key, error_response, prompt_tokens, quota_response,
    reply_tokens, sse_body, sse_response,
};

const CREATED: u64 = 1_735_000_000;

pub(super) async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.record("/v1/chat/completions", &headers, &body);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let script = shared.script_for(&model);
    let dialect = if script.flavor == Flavor::OpenRouter {
        Dialect::OpenRouter
    } else {
        Dialect::OpenAi
    };
    if let Some(denied) = check_key(&shared, &headers, dialect) {
        return denied;
    }
    if !script.header_delay.is_zero() {
        tokio::time::sleep(script.header_delay).await;
    }
    match script.fault {
        Some(Fault::Status { status, retry_after }) => return error_response(dialect, status, retry_after),
        Some(Fault::Quota) => return quota_response(),
        _ => {}
    }
    let tokens = reply_tokens(&script, &body);
    let usage = json!({
        "prompt_tokens": prompt_tokens(&body),
        "completion_tokens": tokens.len(),
        "total_tokens": prompt_tokens(&body) + tokens.len() as u64,
    });
    let finish = script.finish_reason.clone().unwrap_or_else(|| "stop".to_owned());

    if body["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": tokens.concat(), "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage,
        }))
        .into_response();
    }

    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let pieces = stream_pieces(&script, &model, &tokens, &finish, include_usage.then_some(usage));
    sse_response(sse_body(shared, &script, pieces))
}

fn chunk(
    script: &Script,
    model: &str,
    delta: Value,
    finish: Option<&str>,
    extra: Option<(&str, Value)>,
) -> String {
    let mut c = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    if script.flavor == Flavor::OpenRouter {
        c["provider"] = json!("OpenAI");
    }
    if let Some((k, v)) = extra {
        c[k] = v;
    }
    format!("data: {c}\n\n")
}

fn stream_pieces(
    script: &Script,
    model: &str,
    tokens: &[String],
    finish: &str,
    usage: Option<Value>,
) -> Vec<Piece> {
    let mut p = Vec::new();
    if script.flavor == Flavor::OpenRouter {
        p.push(Piece::Bytes(": OPENROUTER PROCESSING\n\n".to_owned()));
    }
    p.push(Piece::Bytes(chunk(
        script,
        model,
        json!({"role": "assistant", "content": ""}),
        None,
        None,
    )));
    p.push(Piece::Sleep(script.first_token_delay));
    for (i, token) in tokens.iter().enumerate() {
        match &script.fault {
            Some(Fault::MidStreamError { after }) if *after == i => {
                let mut c = json!({
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
                    "model": model, "provider": "openai",
                    "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
                    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
                });
                if script.flavor != Flavor::OpenRouter {
                    c.as_object_mut().map(|o| o.remove("provider"));
                }
                p.push(Piece::Bytes(format!("data: {c}\n\n")));
                return p;
            }
            Some(Fault::Stall { after }) if *after == i => {
                p.push(Piece::Stall);
                return p;
            }
            Some(Fault::Cut { after }) if *after == i => return p,
            _ => {}
        }
        if i > 0 {
            p.push(Piece::Sleep(script.token_interval));
        }
        p.push(Piece::Bytes(chunk(
            script,
            model,
            json!({"content": token}),
            None,
            None,
        )));
        if script.flavor == Flavor::OpenRouter && i == tokens.len() / 2 {
            p.push(Piece::Bytes(": OPENROUTER PROCESSING\n\n".to_owned()));
        }
    }
    // A fault placed at or past the end still applies before the finish chunk.
    match &script.fault {
        Some(Fault::Stall { .. }) => {
            p.push(Piece::Stall);
            return p;
        }
        Some(Fault::Cut { .. }) => return p,
        _ => {}
    }
    match (script.flavor, &usage) {
        (Flavor::Groq, Some(u)) => {
            let extra = json!({"id": "req_fake", "usage": u});
            let mut c = chunk(script, model, json!({}), Some(finish), Some(("x_groq", extra)));
            // Groq also repeats the usage at the top level of the same chunk.
            if let Ok(mut v) = serde_json::from_str::<Value>(c.trim_start_matches("data: ").trim_end()) {
                v["usage"] = u.clone();
                c = format!("data: {v}\n\n");
            }
            p.push(Piece::Bytes(c));
        }
        _ => {
            p.push(Piece::Bytes(chunk(script, model, json!({}), Some(finish), None)));
            if let Some(u) = usage {
                let c = json!({
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
                    "model": model, "choices": [], "usage": u,
                });
                p.push(Piece::Bytes(format!("data: {c}\n\n")));
            }
        }
    }
    p.push(Piece::Bytes("data: [DONE]\n\n".to_owned()));
    p
}
