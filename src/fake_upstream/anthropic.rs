//! The fake's Anthropic `POST /v1/messages`, streaming and not (see `shared/wire/anthropic_*`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{
    Dialect, Fault, Piece, Script, Shared, check_key, error_response, prompt_tokens, reply_tokens, sse_body,
    sse_response,
};

pub(super) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.record("/v1/messages", &headers, &body);
    if let Some(denied) = check_key(&shared, &headers, Dialect::Anthropic) {
        return denied;
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let script = shared.script_for(&model);
    if !script.header_delay.is_zero() {
        tokio::time::sleep(script.header_delay).await;
    }
    match script.fault {
        Some(Fault::Status { status, retry_after }) => {
            return error_response(Dialect::Anthropic, status, retry_after);
        }
        Some(Fault::Quota) => return error_response(Dialect::Anthropic, 429, Some(1)),
        _ => {}
    }
    let tokens = reply_tokens(&script, &body);
    let input = prompt_tokens(&body);
    let stop = script
        .finish_reason
        .clone()
        .unwrap_or_else(|| "end_turn".to_owned());

    if body["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": tokens.concat()}],
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": tokens.len()},
        }))
        .into_response();
    }
    let pieces = stream_pieces(&script, &model, &tokens, &stop, input);
    sse_response(sse_body(shared, &script, pieces))
}

fn event(name: &str, data: &Value) -> Piece {
    Piece::Bytes(format!("event: {name}\ndata: {data}\n\n"))
}

fn stream_pieces(script: &Script, model: &str, tokens: &[String], stop: &str, input: u64) -> Vec<Piece> {
    let mut p = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
        Piece::Sleep(script.first_token_delay),
    ];
    for (i, token) in tokens.iter().enumerate() {
        match &script.fault {
            Some(Fault::MidStreamError { after }) if *after == i => {
                p.push(event(
                    "error",
                    &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                ));
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
        p.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}),
        ));
    }
    match &script.fault {
        Some(Fault::Stall { .. }) => {
            p.push(Piece::Stall);
            return p;
        }
        Some(Fault::Cut { .. }) => return p,
        _ => {}
    }
    p.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    p.push(event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"output_tokens": tokens.len()}}),
    ));
    p.push(event("message_stop", &json!({"type": "message_stop"})));
    p
}
