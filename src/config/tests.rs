//! The settings reader's tests: defaults, error messages, secrets, renamed variables.

use super::*;
use crate::embed::EmbeddingProvider;
use crate::llm::ProviderKind;

fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let map: HashMap<&str, &str> = pairs.iter().copied().collect();
    Settings::from_source(&map)
}

#[test]
fn defaults_match_the_reference_services() {
    let s = load(&[]).unwrap();
    assert_eq!(s.port, 8000);
    assert_eq!(s.context.session_ttl, Duration::from_secs(3600));
    assert_eq!(s.context.user_session_ttl, Duration::from_secs(86_400));
    assert_eq!(s.rate_limit_ttl, Duration::from_secs(60));
    assert_eq!(s.rate_limit_requests, 60);
    assert!(s.rate_limit_enabled);
    assert_eq!(s.llm.llm_provider, ProviderKind::Openai);
    assert!(s.database_url.is_none() && s.redis_url.is_none());
    assert_eq!(s.context.max_messages, 100);
    assert_eq!(s.embedding.provider, EmbeddingProvider::Local);
    assert_eq!(s.embedding.local.dir, std::path::PathBuf::from(".models"));
    assert_eq!(s.embedding.local.max_tokens, 256);
    assert_eq!(s.embedding.dimension, 384);
    assert_eq!(s.embedding.base_url.as_str(), "https://api.openai.com/v1");
    assert!(s.chat_ui, "the chat page is on unless switched off");
    assert!(!load(&[("COACHD_CHAT_UI", "false")]).unwrap().chat_ui);
}

#[test]
fn the_embedding_provider_is_never_switched_by_a_key() {
    let s = load(&[("OPENAI_API_KEY", "sk-x")]).unwrap();
    assert_eq!(s.embedding.provider, EmbeddingProvider::Local);
    assert_eq!(s.embedding.api_key.as_ref().map(Secret::expose), Some("sk-x"));
    let s = load(&[("OPENAI_API_KEY", "sk-x"), ("COACHD_EMBEDDING_API_KEY", "sk-e")]).unwrap();
    assert_eq!(s.embedding.api_key.as_ref().map(Secret::expose), Some("sk-e"));

    let e = load(&[("COACHD_EMBEDDING_PROVIDER", "cohere")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid COACHD_EMBEDDING_PROVIDER: expected local, offline or openai (got \"cohere\")"
    );
    let e = load(&[("COACHD_EMBEDDING_DIM", "3072")]).unwrap_err();
    assert_eq!(e.var, "COACHD_EMBEDDING_DIM");
    assert!(e.to_string().contains("from 1 to 2000"));
    // The local model has one size.
    let e = load(&[("COACHD_EMBEDDING_DIM", "64")]).unwrap_err();
    assert_eq!(e.var, "COACHD_EMBEDDING_DIM");
    let s = load(&[
        ("COACHD_EMBEDDING_DIM", "64"),
        ("COACHD_EMBEDDING_PROVIDER", "offline"),
    ])
    .unwrap();
    assert_eq!(s.embedding.dimension, 64);
}

#[test]
fn errors_name_the_variable_and_the_expected_form() {
    let e = load(&[("PORT", "abc")]).unwrap_err();
    assert_eq!(e.var, "PORT");
    assert_eq!(
        e.to_string(),
        "invalid PORT: expected an integer from 0 to 65535 (got \"abc\")"
    );

    let e = load(&[("RATE_LIMIT_REQUESTS", "-1")]).unwrap_err();
    assert_eq!(e.var, "RATE_LIMIT_REQUESTS");
    assert!(e.to_string().contains("an integer from 1 to"));

    let e = load(&[("RATE_LIMIT_ENABLED", "maybe")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid RATE_LIMIT_ENABLED: expected true or false (got \"maybe\")"
    );

    let e = load(&[("LLM_PROVIDER", "cohere")]).unwrap_err();
    assert_eq!(e.var, "LLM_PROVIDER");
}

#[test]
fn url_errors_never_echo_the_value() {
    let e = load(&[("DATABASE_URL", "not a url with s3cret")]).unwrap_err();
    assert_eq!(e.var, "DATABASE_URL");
    assert!(!e.to_string().contains("s3cret"));
    let e = load(&[("REDIS_URL", "http://u:s3cret@localhost")]).unwrap_err();
    assert_eq!(e.var, "REDIS_URL");
    assert!(!e.to_string().contains("s3cret"));
}

#[test]
fn sqlalchemy_urls_are_accepted_and_passwords_redacted() {
    let s = load(&[(
        "DATABASE_URL",
        "postgresql+asyncpg://postgres:hunter2@localhost:5432/10xcoach",
    )])
    .unwrap();
    let url = s.database_url.unwrap();
    assert_eq!(
        url.expose(),
        "postgresql://postgres:hunter2@localhost:5432/10xcoach"
    );
    assert_eq!(
        url.redacted(),
        "postgresql://postgres:***@localhost:5432/10xcoach"
    );
    assert!(!format!("{url:?}").contains("hunter2"));
}

#[test]
fn blank_values_mean_unset() {
    let s = load(&[("REDIS_PASSWORD", "   "), ("PORT", "")]).unwrap();
    assert!(s.redis_password.is_none());
    assert_eq!(s.port, 8000);
}

#[test]
fn api_keys_combine_both_variables_and_are_never_echoed() {
    let s = load(&[
        ("XENIOS_BACKEND_API_KEY", "backend-key"),
        ("COACHD_API_KEYS", " key-one, ,key-two "),
    ])
    .unwrap();
    let keys: Vec<&str> = s.api_keys.iter().map(Secret::expose).collect();
    assert_eq!(keys, ["backend-key", "key-one", "key-two"]);
    assert!(load(&[]).unwrap().api_keys.is_empty());
    let e = load(&[("COACHD_API_KEYS", "ok-key,bad key\u{7f}")]).unwrap_err();
    assert_eq!(e.var, "COACHD_API_KEYS");
    assert!(!e.to_string().contains("ok-key"));
}

#[test]
fn labels_are_validated() {
    let s = load(&[]).unwrap();
    assert_eq!(s.intent_labels.len(), DEFAULT_INTENT_LABELS.len());
    assert_eq!(s.jwt_audience, "authenticated");
    let s = load(&[("COACHD_INTENT_LABELS", "a, b_c ,d-e")]).unwrap();
    assert_eq!(s.intent_labels, ["a", "b_c", "d-e"]);
    for bad in ["a,a", "a,,b", "has space", "ü"] {
        let e = load(&[("COACHD_INTENT_LABELS", bad)]).unwrap_err();
        assert_eq!(e.var, "COACHD_INTENT_LABELS", "{bad}");
    }
    assert!(load(&[("COACHD_ENTITY_TYPES", "x,x")]).is_err());
}

#[test]
fn the_old_sse_keep_alive_name_still_sets_the_heartbeat_with_a_warning() {
    let s = load(&[]).unwrap();
    assert_eq!(s.realtime.sse_heartbeat, Duration::from_secs(15));
    assert!(s.warnings.is_empty());

    let s = load(&[("COACHD_SSE_KEEP_ALIVE_SECS", "7")]).unwrap();
    assert_eq!(s.realtime.sse_heartbeat, Duration::from_secs(7));
    assert_eq!(s.warnings.len(), 1);
    assert!(
        s.warnings[0].contains("COACHD_SSE_KEEP_ALIVE_SECS")
            && s.warnings[0].contains("COACHD_SSE_HEARTBEAT_SECS"),
        "the warning names the new variable: {:?}",
        s.warnings
    );

    let s = load(&[
        ("COACHD_SSE_KEEP_ALIVE_SECS", "7"),
        ("COACHD_SSE_HEARTBEAT_SECS", "3"),
    ])
    .unwrap();
    assert_eq!(
        s.realtime.sse_heartbeat,
        Duration::from_secs(3),
        "the new name wins"
    );
    assert!(s.warnings[0].contains("ignored"), "{:?}", s.warnings);

    let e = load(&[("COACHD_SSE_KEEP_ALIVE_SECS", "0")]).unwrap_err();
    assert_eq!(
        e.var, "COACHD_SSE_KEEP_ALIVE_SECS",
        "an old value is checked under its own name"
    );
}

#[test]
fn secrets_are_hidden_from_debug() {
    let s = load(&[
        ("OPENAI_API_KEY", "sk-live-abcdef"),
        ("SUPABASE_JWT_SECRET", "jwt-secret-xyz"),
        ("XENIOS_BACKEND_API_KEY", "backend-key-123"),
        ("COACHD_API_KEYS", "extra-key-789"),
        ("REDIS_PASSWORD", "redis-pass-456"),
        ("REDIS_URL", "redis://:urlpass789@localhost:6379/0"),
    ])
    .unwrap();
    let dump = format!("{s:?}");
    for secret in [
        "sk-live-abcdef",
        "jwt-secret-xyz",
        "backend-key-123",
        "extra-key-789",
        "redis-pass-456",
        "urlpass789",
    ] {
        assert!(!dump.contains(secret), "{secret} leaked into Debug output");
    }
}

#[test]
fn the_node_id_is_generated_when_unset_and_checked_when_set() {
    let a = load(&[]).unwrap().cluster.node_id;
    let b = load(&[]).unwrap().cluster.node_id;
    assert!(a.starts_with("node-") && a != b, "{a} {b}");
    assert_eq!(
        load(&[("COACHD_NODE_ID", "eu-1.a")]).unwrap().cluster.node_id,
        "eu-1.a"
    );
    let e = load(&[("COACHD_NODE_ID", "a b")]).unwrap_err().to_string();
    assert!(e.contains("COACHD_NODE_ID"), "{e}");
    let c = load(&[("COACHD_CLUSTER_LEASE_MS", "2000")]).unwrap().cluster;
    assert_eq!(c.renew_every(), std::time::Duration::from_millis(2000) / 3);
}

#[test]
fn traces_are_off_without_an_otlp_endpoint() {
    let s = load(&[]).unwrap();
    assert_eq!(s.traces.endpoint, None);
    assert_eq!(s.traces.service_name, "coachd");
}

#[test]
fn the_otlp_endpoint_gets_the_traces_path_and_the_traces_endpoint_is_kept_as_is() {
    let s = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
    assert_eq!(
        s.traces.endpoint.as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    let s = load(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://traces.example/custom",
        ),
        ("OTEL_SERVICE_NAME", "coachd-eu"),
    ])
    .unwrap();
    assert_eq!(
        s.traces.endpoint.as_deref(),
        Some("https://traces.example/custom")
    );
    assert_eq!(s.traces.service_name, "coachd-eu");
}

#[test]
fn traces_settings_are_validated_and_can_be_switched_off() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
    let e = load(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
    assert_eq!(e.var, "OTEL_EXPORTER_OTLP_PROTOCOL");
    let ok = load(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap();
    assert!(ok.traces.endpoint.is_some());
    let e = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
    assert_eq!((e.var.as_str(), e.shown), ("OTEL_EXPORTER_OTLP_ENDPOINT", None));
    let off = load(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap();
    assert_eq!(off.traces.endpoint, None);
    let off = load(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap();
    assert_eq!(off.traces.endpoint, None);
    assert_eq!(
        load(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")])
            .unwrap_err()
            .var,
        "OTEL_TRACES_EXPORTER"
    );
}

#[test]
fn metrics_are_on_and_open_by_default_and_the_token_is_a_hidden_secret() {
    let s = load(&[]).unwrap();
    assert!(s.metrics.enabled && s.metrics.token.is_none());
    let s = load(&[
        ("COACHD_METRICS_ENABLED", "false"),
        ("COACHD_METRICS_TOKEN", "t0k3n"),
    ])
    .unwrap();
    assert!(!s.metrics.enabled);
    assert_eq!(s.metrics.token.as_ref().map(Secret::expose), Some("t0k3n"));
    assert!(!format!("{:?}", s.metrics).contains("t0k3n"));
    let e = load(&[("COACHD_METRICS_TOKEN", "two words")]).unwrap_err();
    assert_eq!(e.var, "COACHD_METRICS_TOKEN");
    assert!(e.shown.is_none(), "the token is never echoed");
    let e = load(&[("COACHD_METRICS_ENABLED", "maybe")]).unwrap_err();
    assert_eq!(e.var, "COACHD_METRICS_ENABLED");
}
