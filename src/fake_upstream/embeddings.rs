//! The fake's OpenAI `POST /v1/embeddings`: deterministic vectors (hashed words, L2-normalised)
//! so equal texts embed equally and texts sharing words are close.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Dialect, Fault, Shared, check_key, error_response, quota_response};

/// Dimension when the request names none (text-embedding-3-small's).
const DEFAULT_DIMENSION: usize = 1536;

pub(super) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.record("/v1/embeddings", &headers, &body);
    if let Some(denied) = check_key(&shared, &headers, Dialect::OpenAi) {
        return denied;
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let script = shared.script_for(&model);
    match script.fault {
        Some(Fault::Status { status, retry_after }) => {
            return error_response(Dialect::OpenAi, status, retry_after);
        }
        Some(Fault::Quota) => return quota_response(),
        _ => {}
    }
    if !script.header_delay.is_zero() {
        tokio::time::sleep(script.header_delay).await;
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if inputs.is_empty() {
        return error_response(Dialect::OpenAi, 400, None);
    }
    let dim = body["dimensions"]
        .as_u64()
        .map_or(DEFAULT_DIMENSION, |d| d as usize)
        .max(1);
    let tokens: usize = inputs.iter().map(|s| s.split_whitespace().count()).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text, dim)}))
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

fn embed(text: &str, dim: usize) -> Vec<f32> {
    let mut v = vec![0f32; dim];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = Sha256::digest(word.to_lowercase().as_bytes());
        let idx = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) as usize % dim;
        v[idx] += if h[8] & 1 == 0 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else if let Some(first) = v.first_mut() {
        *first = 1.0;
    }
    v
}
