//! The LLM gateway [`Llm`]: the configured providers, the task table, timeouts and retry policy,
//! and the calls built on routing. A call retries one model with back-off and falls back to the
//! next only before the first token; when every model fails, one error lists each attempt.
//!
//! `route.rs` holds the routing function, `tasks.rs` the task table and the tasks file.

mod metered;
mod route;
mod tasks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

pub use route::{RetryPolicy, Routed};
pub use tasks::{BUILTIN_TASKS, ModelRef, TaskSpec, default_tasks, load_tasks_file, parse_tasks};

use super::offline::Offline;
use super::{Completion, LlmError, Message, Params, Provider, anthropic, collect, groq, openai, openrouter};
use crate::llm::{LlmSettings, LlmTimeouts, ProviderKind};

/// The LLM gateway: configured providers, the task table, timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct Llm {
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    tasks: BTreeMap<String, TaskSpec>,
    default_provider: ProviderKind,
    timeouts: LlmTimeouts,
    retry: RetryPolicy,
    /// Every model a task names and every provider's default: the values the `model` label of
    /// the metrics may take.
    known_models: Arc<HashMap<ProviderKind, HashSet<String>>>,
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
        let mut known_models: HashMap<ProviderKind, HashSet<String>> = HashMap::new();
        for p in &providers {
            known_models
                .entry(p.kind())
                .or_default()
                .insert(p.default_model().to_owned());
        }
        for task in &tasks {
            for m in std::iter::once(&task.primary).chain(&task.fallbacks) {
                known_models
                    .entry(m.provider)
                    .or_default()
                    .insert(m.model.clone());
            }
        }
        Llm {
            providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
            tasks: tasks.into_iter().map(|t| (t.name.clone(), t)).collect(),
            default_provider,
            timeouts,
            retry,
            known_models: Arc::new(known_models),
        }
    }

    /// The `model` label of the metrics for `provider`'s `model`: its name when a task or the
    /// provider's default names it, `other` for a model a client named directly
    /// (`/v1/chat/completions` with `provider/model`), so clients cannot grow the label set.
    pub fn model_label(&self, provider: ProviderKind, model: &str) -> String {
        if self
            .known_models
            .get(&provider)
            .is_some_and(|models| models.contains(model))
        {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Builds every provider that has a key (plus the offline one), the default task table, and
    /// the tasks of `COACHD_LLM_TASKS_FILE`. LLM_PROVIDER without a key falls back to offline.
    pub fn from_settings(s: &impl AsRef<LlmSettings>) -> Result<Self, String> {
        let s = s.as_ref();
        let t = s.llm_timeouts;
        // One connection pool per provider: their connections never mix, and a saturated
        // provider does not hold back the others.
        let upstream = |p: &crate::llm::ProviderSettings| {
            crate::llm::http::Upstream::new(
                crate::llm::http::ClientConfig {
                    connect_timeout: t.connect,
                    version: p.http_version,
                    tls: p.base_url.scheme() == "https",
                },
                s.upstream_pool,
            )
        };
        let mut providers: Vec<Arc<dyn Provider>> = vec![Arc::new(Offline::new(s.offline_token_delay))];
        if let Some(key) = &s.openai.api_key {
            providers.push(Arc::new(openai::OpenAiCompatible::new(
                ProviderKind::Openai,
                upstream(&s.openai)?,
                &s.openai,
                key.clone(),
                Default::default(),
                true,
                t.connect,
            )));
        }
        if let Some(key) = &s.groq.api_key {
            providers.push(Arc::new(groq::provider(
                upstream(&s.groq)?,
                &s.groq,
                key.clone(),
                t.connect,
            )));
        }
        if let Some(key) = &s.anthropic.api_key {
            providers.push(Arc::new(anthropic::Anthropic::new(
                upstream(&s.anthropic)?,
                &s.anthropic,
                key.clone(),
                t.connect,
            )));
        }
        if let Some(key) = &s.openrouter.api_key {
            providers.push(Arc::new(openrouter::provider(
                upstream(&s.openrouter)?,
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
        let routed = self
            .route_task(
                task,
                &Params::default(),
                system_prompt.map(str::to_owned),
                messages,
                None,
            )
            .await?;
        collect(routed).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_model_label_is_a_configured_model_or_other() {
        let offline: Arc<dyn Provider> = Arc::new(Offline::new(Duration::ZERO));
        let default_model = offline.default_model().to_owned();
        let task = TaskSpec {
            name: "chat".to_owned(),
            description: String::new(),
            primary: ModelRef {
                provider: ProviderKind::Offline,
                model: "named-by-a-task".to_owned(),
                params: Params::default(),
            },
            fallbacks: Vec::new(),
            params: Params::default(),
        };
        let timeouts = LlmTimeouts {
            connect: Duration::from_secs(1),
            first_token: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            total: Duration::from_secs(1),
        };
        let retry = RetryPolicy {
            max_retries: 0,
            base: Duration::from_millis(1),
            max_wait: Duration::from_millis(1),
        };
        let llm = Llm::new(vec![offline], vec![task], ProviderKind::Offline, timeouts, retry);
        assert_eq!(
            llm.model_label(ProviderKind::Offline, &default_model),
            default_model
        );
        assert_eq!(
            llm.model_label(ProviderKind::Offline, "named-by-a-task"),
            "named-by-a-task"
        );
        assert_eq!(
            llm.model_label(ProviderKind::Offline, "a-client-chose-this"),
            "other"
        );
        assert_eq!(
            llm.model_label(ProviderKind::Openai, "named-by-a-task"),
            "other",
            "per provider"
        );
    }
}
