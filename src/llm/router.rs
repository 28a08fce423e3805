//! Task routing, as in the reference AI backend: each task (session_summary, insight_generation,
//! chat, intent_classification, entity_extraction, plus tasks from a TOML file) has a primary
//! model and ordered fallbacks. A call retries one model with back-off and falls back to the next
//! only before the first token has been handed on; after that, a failure ends the stream with an
//! error event. When every model fails, one error lists each attempt and why.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::{Attempt, TimeoutPhase};
use super::offline::Offline;
use super::timeout::with_timeouts;
use super::{
    ChatRequest, Completion, EventStream, LlmError, LlmEvent, Message, Params, Provider, ResponseFormat,
    anthropic, collect, groq, openai, openrouter,
};
use crate::llm::{LlmSettings, LlmTimeouts, ProviderKind};

/// The built-in task names of the reference AI backend.
pub const BUILTIN_TASKS: [&str; 5] = [
    "session_summary",
    "insight_generation",
    "chat",
    "intent_classification",
    "entity_extraction",
];

/// One model a task may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Provider.
    pub provider: ProviderKind,
    /// Provider-specific model name.
    pub model: String,
    /// Parameters for this model (override the task's).
    #[serde(flatten)]
    pub params: Params,
}

/// A task and its models.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSpec {
    /// Task name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Tried first.
    pub primary: ModelRef,
    /// Tried in order when the primary fails before its first token.
    pub fallbacks: Vec<ModelRef>,
    /// Default parameters of the task.
    #[serde(flatten)]
    pub params: Params,
}

impl<'de> Deserialize<'de> for ProviderKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|()| {
            serde::de::Error::custom(format!(
                "unknown provider {s:?} (expected openai, groq, anthropic, openrouter or offline)"
            ))
        })
    }
}

/// Retry and back-off policy of routed calls.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries of one model before falling back.
    pub max_retries: u32,
    /// First back-off delay; doubled on each retry, with ±25 % jitter.
    pub base: Duration,
    /// A provider asking to wait longer than this (retry-after) is skipped for the fallback.
    pub max_wait: Duration,
}

/// What routing chose: the model that serves and its stream, which has already read its first
/// text (or ended without any). Failures from here on end the stream; they are not retried.
pub struct Routed {
    /// Provider that serves.
    pub provider: ProviderKind,
    /// Model that serves.
    pub model: String,
    /// Its events, from the first one the provider sent.
    pub stream: EventStream,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The parts of a routed call every attempt shares.
struct Call<'a> {
    task: &'a str,
    task_params: &'a Params,
    system: Option<String>,
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
}

/// The old streaming shape over a routed call: `Start`, then the model's events; a routing
/// failure is the only item.
fn started(
    route: impl std::future::Future<Output = Result<Routed, LlmError>> + Send + 'static,
) -> EventStream {
    Box::pin(
        futures::stream::once(route)
            .map(|routed| match routed {
                Ok(r) => {
                    let start = LlmEvent::Start {
                        provider: r.provider,
                        model: r.model,
                    };
                    futures::stream::once(async move { Ok(start) })
                        .chain(r.stream)
                        .left_stream()
                }
                Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
            })
            .flatten(),
    )
}

/// The LLM gateway: configured providers, the task table, timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct Llm {
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    tasks: BTreeMap<String, TaskSpec>,
    default_provider: ProviderKind,
    timeouts: LlmTimeouts,
    retry: RetryPolicy,
}

impl Llm {
    /// A gateway over the given providers and tasks.
    pub fn new(
        providers: Vec<Arc<dyn Provider>>,
        tasks: Vec<TaskSpec>,
        default_provider: ProviderKind,
        timeouts: LlmTimeouts,
        retry: RetryPolicy,
    ) -> Self {
        Llm {
            providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
            tasks: tasks.into_iter().map(|t| (t.name.clone(), t)).collect(),
            default_provider,
            timeouts,
            retry,
        }
    }

    /// Builds every provider that has a key (plus the offline one), the default task table, and
    /// the tasks of `COACHD_LLM_TASKS_FILE`. LLM_PROVIDER without a key falls back to offline.
    pub fn from_settings(s: &impl AsRef<LlmSettings>) -> Result<Self, String> {
        let s = s.as_ref();
        let t = s.llm_timeouts;
        let client = reqwest::Client::builder()
            // Nagle would hold small upstream writes; the first token should not wait 40 ms.
            .tcp_nodelay(true)
            .connect_timeout(t.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("coachd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut providers: Vec<Arc<dyn Provider>> = vec![Arc::new(Offline::new(s.offline_token_delay))];
        if let Some(key) = &s.openai.api_key {
            providers.push(Arc::new(openai::OpenAiCompatible::new(
                ProviderKind::Openai,
                client.clone(),
                &s.openai,
                key.clone(),
                Default::default(),
                true,
                t.connect,
            )));
        }
        if let Some(key) = &s.groq.api_key {
            providers.push(Arc::new(groq::provider(
                client.clone(),
                &s.groq,
                key.clone(),
                t.connect,
            )));
        }
        if let Some(key) = &s.anthropic.api_key {
            providers.push(Arc::new(anthropic::Anthropic::new(
                client.clone(),
                &s.anthropic,
                key.clone(),
                t.connect,
            )));
        }
        if let Some(key) = &s.openrouter.api_key {
            providers.push(Arc::new(openrouter::provider(
                client.clone(),
                &s.openrouter,
                key.clone(),
                s.openrouter_referer.as_deref(),
                &s.openrouter_title,
                t.connect,
            )));
        }
        let configured: Vec<ProviderKind> = providers.iter().map(|p| p.kind()).collect();
        let default_provider = if configured.contains(&s.llm_provider) {
            s.llm_provider
        } else {
            ProviderKind::Offline
        };
        let model_of = |kind: ProviderKind| -> String {
            providers
                .iter()
                .find(|p| p.kind() == kind)
                .map(|p| p.default_model().to_owned())
                .unwrap_or_default()
        };
        let mut tasks = default_tasks(default_provider, &configured, model_of);
        if let Some(path) = &s.llm_tasks_file {
            for task in load_tasks_file(path)? {
                tasks.retain(|t| t.name != task.name);
                tasks.push(task);
            }
        }
        for task in &tasks {
            for m in std::iter::once(&task.primary).chain(&task.fallbacks) {
                if !configured.contains(&m.provider) {
                    return Err(format!(
                        "task {:?} uses provider {} which has no API key configured",
                        task.name, m.provider
                    ));
                }
            }
        }
        let retry = RetryPolicy {
            max_retries: s.llm_max_retries,
            base: s.llm_retry_base,
            max_wait: s.llm_max_retry_wait,
        };
        Ok(Llm::new(providers, tasks, default_provider, t, retry))
    }

    /// The provider requests without a task go to.
    pub fn default_provider(&self) -> ProviderKind {
        self.default_provider
    }

    /// A configured provider.
    pub fn provider(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        self.providers.get(&kind)
    }

    /// Every task, by name.
    pub fn tasks(&self) -> impl Iterator<Item = &TaskSpec> {
        self.tasks.values()
    }

    /// One task.
    pub fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks.get(name)
    }

    /// Checks the default provider (lists models; generates nothing).
    pub async fn check_default(&self) -> Result<(), LlmError> {
        match self.providers.get(&self.default_provider) {
            Some(p) => p.check().await,
            None => Err(LlmError::NotConfigured {
                provider: self.default_provider,
            }),
        }
    }

    /// Routes a task's call through its models: retries and fallbacks until one model's stream
    /// yields its first text (or ends cleanly without any), all under the total deadline. Returns
    /// the model that serves and its stream, or the typed error of the whole call. Dropping the
    /// stream aborts the upstream request.
    pub async fn route_task(
        &self,
        task: &str,
        overrides: &Params,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> Result<Routed, LlmError> {
        let Some(spec) = self.tasks.get(task) else {
            return Err(LlmError::UnknownTask(task.to_owned()));
        };
        let chain: Vec<ModelRef> = std::iter::once(&spec.primary)
            .chain(&spec.fallbacks)
            .map(|m| ModelRef {
                params: overrides.or(&m.params),
                ..m.clone()
            })
            .collect();
        let call = Call {
            task: &spec.name,
            task_params: &spec.params,
            system,
            messages,
            response_format,
        };
        self.route_chain(chain, call).await
    }

    /// Routes a call to one model (retries, no fallback), e.g. a provider model named directly.
    pub async fn route_model(
        &self,
        model: ModelRef,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> Result<Routed, LlmError> {
        let label = format!("{}/{}", model.provider, model.model);
        let params = Params::default();
        let call = Call {
            task: &label,
            task_params: &params,
            system,
            messages,
            response_format,
        };
        self.route_chain(vec![model], call).await
    }

    /// Streams a task's reply, routed through its models: the first event is `Start` naming the
    /// model that serves, and a routing failure is the stream's only item.
    pub fn stream_task(
        &self,
        task: &str,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> EventStream {
        self.stream_task_with(task, &Params::default(), system, messages, response_format)
    }

    /// [`Llm::stream_task`] with parameters set by the caller (an API request's `temperature`,
    /// `max_tokens`, ...), which win over the task's and each model's own.
    pub fn stream_task_with(
        &self,
        task: &str,
        overrides: &Params,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> EventStream {
        let llm = self.clone();
        let (task, overrides) = (task.to_owned(), overrides.clone());
        started(async move {
            llm.route_task(&task, &overrides, system, messages, response_format)
                .await
        })
    }

    /// Streams from one model (with retries, no fallback), as [`Llm::stream_task`] does.
    pub fn stream_model(
        &self,
        model: ModelRef,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> EventStream {
        let llm = self.clone();
        started(async move { llm.route_model(model, system, messages, response_format).await })
    }

    async fn route_chain(&self, chain: Vec<ModelRef>, call: Call<'_>) -> Result<Routed, LlmError> {
        let timeouts = self.timeouts;
        // The total timeout bounds the whole call, retries and fallbacks included.
        let deadline = tokio::time::Instant::now() + timeouts.total;
        let mut attempts: Vec<Attempt> = Vec::new();
        'models: for model in chain {
            let Some(provider) = self.providers.get(&model.provider).cloned() else {
                attempts.push(Attempt {
                    provider: model.provider,
                    model: model.model.clone(),
                    error: LlmError::NotConfigured {
                        provider: model.provider,
                    }
                    .to_string(),
                });
                continue;
            };
            let mut tries = 0u32;
            loop {
                if tokio::time::Instant::now() >= deadline {
                    attempts.push(Attempt {
                        provider: model.provider,
                        model: model.model.clone(),
                        error: LlmError::Timeout {
                            provider: model.provider,
                            phase: TimeoutPhase::Total,
                            after: timeouts.total,
                        }
                        .to_string(),
                    });
                    break 'models;
                }
                let request = ChatRequest {
                    model: model.model.clone(),
                    system: call.system.clone(),
                    messages: call.messages.clone(),
                    params: model.params.or(call.task_params),
                    response_format: call.response_format.clone(),
                };
                let p = provider.clone();
                let mut stream = with_timeouts(model.provider, timeouts, deadline, async move {
                    p.stream(request).await
                });
                // Read up to the first text delta: until then a failure can still be retried or
                // fallen back without the client having seen anything.
                let mut head = Vec::new();
                let failed = loop {
                    match stream.next().await {
                        Some(Ok(LlmEvent::Delta(text))) => {
                            head.push(LlmEvent::Delta(text));
                            break None;
                        }
                        Some(Ok(event)) => head.push(event),
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    }
                };
                let Some(e) = failed else {
                    return Ok(Routed {
                        provider: model.provider,
                        model: model.model,
                        stream: Box::pin(futures::stream::iter(head.into_iter().map(Ok)).chain(stream)),
                    });
                };
                tries += 1;
                tracing::warn!(
                    task = %call.task, provider = %model.provider, model = %model.model,
                    attempt = tries, error = %e, "LLM attempt failed before the first token"
                );
                let wait = backoff(&self.retry, tries, &e);
                let budget_spent = matches!(
                    e,
                    LlmError::Timeout {
                        phase: TimeoutPhase::Total,
                        ..
                    }
                );
                let retry = e.retryable() && tries <= self.retry.max_retries;
                attempts.push(Attempt {
                    provider: model.provider,
                    model: model.model.clone(),
                    error: e.to_string(),
                });
                if budget_spent {
                    break 'models;
                }
                match wait {
                    Some(wait) if retry => {
                        tokio::time::sleep_until((tokio::time::Instant::now() + wait).min(deadline)).await;
                    }
                    _ => break,
                }
            }
        }
        Err(LlmError::AllFailed {
            task: call.task.to_owned(),
            attempts,
        })
    }

    /// The reference coach service's `generate(prompt, system_prompt, history)`, on task `chat`.
    pub async fn generate(
        &self,
        prompt: &str,
        system_prompt: Option<&str>,
        history: &[Message],
    ) -> Result<Completion, LlmError> {
        self.generate_task("chat", prompt, system_prompt, history).await
    }

    /// `generate` on a named task.
    pub async fn generate_task(
        &self,
        task: &str,
        prompt: &str,
        system_prompt: Option<&str>,
        history: &[Message],
    ) -> Result<Completion, LlmError> {
        let mut messages = history.to_vec();
        messages.push(Message::user(prompt));
        let stream = self.stream_task(task, system_prompt.map(str::to_owned), messages, None);
        collect(stream, (self.default_provider, "")).await
    }
}

/// How long to wait before retry number `tries` (1-based), or `None` when the provider asks for
/// longer than the policy allows.
fn backoff(policy: &RetryPolicy, tries: u32, error: &LlmError) -> Option<Duration> {
    let exp = policy
        .base
        .saturating_mul(1u32 << tries.saturating_sub(1).min(16));
    let jitter = rand::thread_rng().gen_range(0.75..1.25);
    let mut wait = exp.mul_f64(jitter);
    if let LlmError::RateLimited {
        retry_after: Some(after),
        ..
    } = error
    {
        if *after > policy.max_wait {
            return None;
        }
        wait = wait.max(*after);
    }
    Some(wait.min(policy.max_wait))
}

fn model(provider: ProviderKind, name: &str) -> ModelRef {
    ModelRef {
        provider,
        model: name.to_owned(),
        params: Params::default(),
    }
}

fn params(temperature: f64, max_tokens: u32) -> Params {
    Params {
        temperature: Some(temperature),
        max_tokens: Some(max_tokens),
        ..Params::default()
    }
}

/// The default task table. With LLM_PROVIDER=openrouter it is the reference AI backend's
/// (Opus 4.5 → Sonnet 4; Sonnet 4 → GPT-4o-mini); otherwise every task uses the default
/// provider's model, falling back to each other configured provider's default model.
pub fn default_tasks(
    default: ProviderKind,
    configured: &[ProviderKind],
    model_of: impl Fn(ProviderKind) -> String,
) -> Vec<TaskSpec> {
    let described = [
        (
            "session_summary",
            "Summarise a coaching session into notes with action items",
            params(0.3, 2048),
        ),
        (
            "insight_generation",
            "Derive insights about the client from their sessions",
            params(0.5, 2048),
        ),
        ("chat", "Coach conversation turns", params(0.7, 1024)),
        (
            "intent_classification",
            "Classify the intent of a message",
            params(0.0, 256),
        ),
        (
            "entity_extraction",
            "Extract typed entities with their text spans",
            params(0.0, 1024),
        ),
    ];
    described
        .into_iter()
        .map(|(name, description, params)| {
            let (primary, fallbacks) = if default == ProviderKind::Openrouter {
                let heavy = !matches!(name, "intent_classification" | "entity_extraction");
                if heavy {
                    (
                        model(default, "anthropic/claude-opus-4.5"),
                        vec![model(default, "anthropic/claude-sonnet-4")],
                    )
                } else {
                    (
                        model(default, "anthropic/claude-sonnet-4"),
                        vec![model(default, "openai/gpt-4o-mini")],
                    )
                }
            } else {
                let fallbacks = ProviderKind::ALL
                    .into_iter()
                    .filter(|k| *k != default && *k != ProviderKind::Offline && configured.contains(k))
                    .map(|k| model(k, &model_of(k)))
                    .collect();
                (model(default, &model_of(default)), fallbacks)
            };
            TaskSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                primary,
                fallbacks,
                params,
            }
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksFile {
    tasks: BTreeMap<String, FileTask>,
}

#[derive(Debug, Deserialize)]
struct FileTask {
    #[serde(default)]
    description: String,
    primary: ModelRef,
    #[serde(default)]
    fallbacks: Vec<ModelRef>,
    #[serde(flatten)]
    params: Params,
}

/// Reads a TOML tasks file:
///
/// ```toml
/// [tasks.chat]
/// description = "Coach conversation turns"
/// temperature = 0.7
/// primary = { provider = "openai", model = "gpt-4o-mini" }
/// fallbacks = [{ provider = "anthropic", model = "claude-3-5-haiku-latest", max_tokens = 512 }]
/// ```
pub fn load_tasks_file(path: &Path) -> Result<Vec<TaskSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read COACHD_LLM_TASKS_FILE {}: {e}", path.display()))?;
    parse_tasks(&text).map_err(|e| format!("invalid COACHD_LLM_TASKS_FILE {}: {e}", path.display()))
}

/// Parses the TOML of a tasks file.
pub fn parse_tasks(text: &str) -> Result<Vec<TaskSpec>, String> {
    let file: TasksFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    Ok(file
        .tasks
        .into_iter()
        .map(|(name, t)| TaskSpec {
            name,
            description: t.description,
            primary: t.primary,
            fallbacks: t.fallbacks,
            params: t.params,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openrouter_default_table_matches_the_reference() {
        let tasks = default_tasks(ProviderKind::Openrouter, &[ProviderKind::Openrouter], |_| {
            String::new()
        });
        let chat = tasks.iter().find(|t| t.name == "chat").unwrap();
        assert_eq!(chat.primary.model, "anthropic/claude-opus-4.5");
        assert_eq!(chat.fallbacks[0].model, "anthropic/claude-sonnet-4");
        let intent = tasks.iter().find(|t| t.name == "intent_classification").unwrap();
        assert_eq!(intent.primary.model, "anthropic/claude-sonnet-4");
        assert_eq!(intent.fallbacks[0].model, "openai/gpt-4o-mini");
        assert_eq!(tasks.len(), BUILTIN_TASKS.len());
    }

    #[test]
    fn other_configured_providers_become_fallbacks() {
        let configured = [
            ProviderKind::Offline,
            ProviderKind::Openai,
            ProviderKind::Anthropic,
        ];
        let tasks = default_tasks(ProviderKind::Anthropic, &configured, |k| format!("{k}-model"));
        let chat = tasks.iter().find(|t| t.name == "chat").unwrap();
        assert_eq!(chat.primary, model(ProviderKind::Anthropic, "anthropic-model"));
        assert_eq!(chat.fallbacks, vec![model(ProviderKind::Openai, "openai-model")]);
    }

    #[test]
    fn tasks_file_parses_and_rejects_unknown_providers() {
        let tasks = parse_tasks(
            r#"
            [tasks.coach_reflection]
            description = "Reflect"
            temperature = 0.2
            primary = { provider = "groq", model = "llama-3.3-70b-versatile" }
            fallbacks = [{ provider = "openai", model = "gpt-4o-mini", max_tokens = 300 }]
            "#,
        )
        .unwrap();
        assert_eq!(tasks[0].name, "coach_reflection");
        assert_eq!(tasks[0].params.temperature, Some(0.2));
        assert_eq!(tasks[0].fallbacks[0].params.max_tokens, Some(300));
        let err = parse_tasks("[tasks.x]\nprimary = { provider = \"cohere\", model = \"m\" }").unwrap_err();
        assert!(err.contains("unknown provider"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after_up_to_the_cap() {
        let policy = RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(100),
            max_wait: Duration::from_secs(2),
        };
        let e = LlmError::Unavailable {
            provider: ProviderKind::Openai,
            status: Some(503),
            message: String::new(),
        };
        let w1 = backoff(&policy, 1, &e).unwrap();
        let w3 = backoff(&policy, 3, &e).unwrap();
        assert!(
            w1 >= Duration::from_millis(75) && w1 <= Duration::from_millis(125),
            "{w1:?}"
        );
        assert!(
            w3 >= Duration::from_millis(300) && w3 <= Duration::from_millis(500),
            "{w3:?}"
        );
        let limited = |secs| LlmError::RateLimited {
            provider: ProviderKind::Openai,
            retry_after: Some(Duration::from_secs(secs)),
            message: String::new(),
        };
        assert_eq!(backoff(&policy, 1, &limited(1)), Some(Duration::from_secs(1)));
        assert_eq!(
            backoff(&policy, 1, &limited(30)),
            None,
            "too long a wait goes to the fallback"
        );
    }
}
