//! An OpenAI-compatible embeddings client: `POST {base_url}/embeddings`, batched, with typed
//! errors. Works with OpenAI and with servers that speak its wire format (vLLM, Ollama, LiteLLM).

use std::time::Duration;

use async_trait::async_trait;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use url::Url;

use super::{EmbedError, Embedder};
use crate::secret::Secret;

/// How much of an unparseable error body is kept in the message.
const MAX_ERROR_BODY_CHARS: usize = 300;

/// What [`OpenAiEmbedder`] needs to know.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL ending before `/embeddings`, e.g. `https://api.openai.com/v1`.
    pub base_url: Url,
    /// Bearer token; `None` sends no `Authorization` header (local servers).
    pub api_key: Option<Secret>,
    /// Model name.
    pub model: String,
    /// Expected vector length; every answer is checked against it.
    pub dimension: usize,
    /// Whether to send `dimensions` (text-embedding-3 models shorten their vectors to it; some
    /// compatible servers reject the field).
    pub send_dimensions: bool,
    /// Most inputs in one request; longer lists are split.
    pub batch_size: usize,
    /// Limit of one request, from connect to the last byte.
    pub timeout: Duration,
    /// Limit of the TCP + TLS connect.
    pub connect_timeout: Duration,
}

/// Embeds through an OpenAI-compatible `/embeddings` endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    endpoint: Url,
    config: OpenAiConfig,
}

impl OpenAiEmbedder {
    /// A client for `config`; fails only if the HTTP client cannot be built.
    pub fn new(config: OpenAiConfig) -> Result<Self, EmbedError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| EmbedError::Connect(e.to_string()))?;
        let endpoint = Url::parse(&format!(
            "{}/embeddings",
            config.base_url.as_str().trim_end_matches('/')
        ))
        .map_err(|e| EmbedError::Connect(format!("invalid base URL: {e}")))?;
        Ok(Self {
            client,
            endpoint,
            config,
        })
    }

    async fn embed_batch(&self, input: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = EmbeddingsRequest {
            model: &self.config.model,
            input,
            encoding_format: "float",
            dimensions: self.config.send_dimensions.then_some(self.config.dimension),
        };
        let mut request = self.client.post(self.endpoint.clone()).json(&body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(http_error(status.as_u16(), &headers, &bytes));
        }
        let parsed: EmbeddingsResponse =
            serde_json::from_slice(&bytes).map_err(|e| EmbedError::Decode(e.to_string()))?;
        reorder(parsed, input.len(), self.config.dimension)
    }

    fn transport_error(&self, e: &reqwest::Error) -> EmbedError {
        if e.is_timeout() {
            EmbedError::Timeout(self.config.timeout)
        } else if e.is_decode() {
            EmbedError::Decode(e.to_string())
        } else {
            // reqwest's Display names the URL, which never carries the key (that is a header).
            EmbedError::Connect(e.to_string())
        }
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn dimension(&self) -> usize {
        self.config.dimension
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        // One batch at a time: providers rate-limit per request and per token, and the caller is a
        // background writer or one search, neither of which gains from fanning out.
        for batch in texts.chunks(self.config.batch_size.max(1)) {
            out.extend(self.embed_batch(batch).await?);
        }
        Ok(out)
    }
}

/// Puts the vectors back in input order (the API tags each with `index`) and checks that every
/// input got exactly one vector of the expected length.
fn reorder(
    response: EmbeddingsResponse,
    inputs: usize,
    dimension: usize,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; inputs];
    for item in response.data {
        if item.embedding.len() != dimension {
            return Err(EmbedError::Dimension {
                expected: dimension,
                got: item.embedding.len(),
            });
        }
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            Some(Some(_)) => return Err(EmbedError::Decode(format!("index {} appears twice", item.index))),
            None => {
                return Err(EmbedError::Decode(format!(
                    "index {} out of range for {inputs} inputs",
                    item.index
                )));
            }
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| EmbedError::Decode(format!("no embedding for input {i}"))))
        .collect()
}

/// Maps an error answer to [`EmbedError::Http`], reading OpenAI's `{"error":{...}}` body when
/// there is one and the retry hints in the headers.
fn http_error(status: u16, headers: &HeaderMap, body: &[u8]) -> EmbedError {
    let parsed = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .map(|r| r.error);
    let code = parsed
        .as_ref()
        .and_then(|e| e.code.as_ref().or(e.kind.as_ref()))
        .and_then(|c| match c {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    let message = parsed.and_then(|e| e.message).unwrap_or_else(|| {
        String::from_utf8_lossy(body)
            .chars()
            .take(MAX_ERROR_BODY_CHARS)
            .collect()
    });
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // 429 means "slow down" except when the quota is gone, which waiting does not fix.
    let mut retryable =
        matches!(status, 408 | 409 | 429 | 500..=599) && code.as_deref() != Some("insufficient_quota");
    match header("x-should-retry") {
        Some("true") => retryable = true,
        Some("false") => retryable = false,
        _ => {}
    }
    let retry_after = header("retry-after-ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            header("retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
        });
    EmbedError::Http {
        status,
        code,
        message,
        retryable,
        retry_after,
    }
}

#[derive(Debug, Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct ErrorResponse {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    code: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE: &str = include_str!("../../tests/wire/openai_embeddings_response.json");

    #[test]
    fn the_request_has_the_openai_wire_shape() {
        let input = vec![
            "The food was delicious and the waiter...".to_owned(),
            "Grüße aus Köln 🍺".to_owned(),
        ];
        let body = EmbeddingsRequest {
            model: "text-embedding-3-small",
            input: &input,
            encoding_format: "float",
            dimensions: Some(8),
        };
        let expected: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/wire/openai_embeddings_request.json")).unwrap();
        assert_eq!(serde_json::to_value(&body).unwrap(), expected);
        let without = EmbeddingsRequest {
            dimensions: None,
            ..body
        };
        assert!(
            serde_json::to_value(&without)
                .unwrap()
                .get("dimensions")
                .is_none()
        );
    }

    #[test]
    fn vectors_come_back_in_input_order() {
        let mut parsed: EmbeddingsResponse = serde_json::from_str(RESPONSE).unwrap();
        let first = parsed.data[0].embedding.clone();
        parsed.data.reverse();
        let out = reorder(parsed, 2, 8).unwrap();
        assert_eq!(out[0], first);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_wrong_dimension_or_a_missing_vector_is_an_error() {
        let parsed: EmbeddingsResponse = serde_json::from_str(RESPONSE).unwrap();
        assert_eq!(
            reorder(parsed, 2, 384).unwrap_err(),
            EmbedError::Dimension {
                expected: 384,
                got: 8
            }
        );
        let parsed: EmbeddingsResponse = serde_json::from_str(RESPONSE).unwrap();
        assert!(matches!(reorder(parsed, 3, 8), Err(EmbedError::Decode(_))));
        let parsed: EmbeddingsResponse = serde_json::from_str(RESPONSE).unwrap();
        assert!(matches!(reorder(parsed, 1, 8), Err(EmbedError::Decode(_))));
    }

    #[test]
    fn http_errors_are_typed_with_their_retry_hints() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "27".parse().unwrap());
        headers.insert("retry-after-ms", "26604".parse().unwrap());
        let body = br#"{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        let e = http_error(429, &headers, body);
        assert_eq!(
            e,
            EmbedError::Http {
                status: 429,
                code: Some("rate_limit_exceeded".into()),
                message: "Rate limit reached".into(),
                retryable: true,
                retry_after: Some(Duration::from_millis(26_604)),
            }
        );

        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(!http_error(429, &HeaderMap::new(), quota).retryable());

        let e = http_error(
            401,
            &HeaderMap::new(),
            br#"{"error":{"message":"Incorrect API key","code":"invalid_api_key"}}"#,
        );
        assert!(!e.retryable());
        assert!(
            e.to_string()
                .contains("HTTP 401 (invalid_api_key): Incorrect API key"),
            "{e}"
        );

        let e = http_error(502, &HeaderMap::new(), b"<html>bad gateway</html>");
        assert!(e.retryable());
        assert!(e.to_string().contains("<html>bad gateway</html>"));
    }
}
