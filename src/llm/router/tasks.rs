//! The task table: the built-in tasks of the reference AI backend with their default models, and
//! the TOML tasks file (`COACHD_LLM_TASKS_FILE`) that adds or overrides tasks.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::llm::Params;
use crate::llm::ProviderKind;

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
}
