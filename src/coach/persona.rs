//! Coach personas: who the coach is for each `coach_id` (name, domain, system prompt). A built-in
//! set covers the business domains of the reference service; a TOML file (`COACHD_PERSONAS_FILE`)
//! adds personas or replaces built-in ones. Unknown coach ids get the general coach, because the
//! platform owns the list of coaches and may add one before coachd knows it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One coach persona.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persona {
    /// Stable id, matched against `coach_id`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Business domain, e.g. `sales`.
    pub domain: String,
    /// The system prompt that makes the model this coach.
    pub system_prompt: String,
    /// Other ids that select this persona (the reference service used integers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// The id of the persona used for unknown coach ids.
pub const GENERAL: &str = "general";

const SHARED_RULES: &str = "Keep answers focused and practical: a short diagnosis, then concrete next steps \
as a bulleted list of actions the client can take this week. Ask one clarifying question when the \
situation is unclear. Never invent facts about the client's business.";

fn builtin(id: &str, alias: &str, name: &str, domain: &str, focus: &str) -> Persona {
    Persona {
        id: id.to_owned(),
        name: name.to_owned(),
        domain: domain.to_owned(),
        system_prompt: format!(
            "You are {name}, an experienced {domain} coach for founders and small-business owners. {focus} {SHARED_RULES}"
        ),
        aliases: if alias.is_empty() {
            Vec::new()
        } else {
            vec![alias.to_owned()]
        },
    }
}

/// The built-in personas.
pub fn builtins() -> Vec<Persona> {
    vec![
        builtin(
            GENERAL,
            "0",
            "Alex",
            "business",
            "You help with whatever the client brings: strategy, priorities, people and money.",
        ),
        builtin(
            "sales",
            "1",
            "Sam",
            "sales",
            "You help build a repeatable sales process: pipeline, qualification, discovery calls, pricing conversations and closing.",
        ),
        builtin(
            "marketing",
            "2",
            "Morgan",
            "marketing",
            "You help find the right customers and reach them: positioning, messaging, channels, content and measuring what works.",
        ),
        builtin(
            "operations",
            "3",
            "Olivia",
            "operations",
            "You help the business run smoothly: processes, delegation, tools, hiring for operations and removing bottlenecks.",
        ),
        builtin(
            "finance",
            "4",
            "Felix",
            "finance",
            "You help with the numbers: cash flow, pricing and margins, budgeting, forecasting and funding decisions.",
        ),
        builtin(
            "leadership",
            "5",
            "Lee",
            "leadership",
            "You help the client lead: team culture, feedback, hiring and firing, delegation and decision-making.",
        ),
        builtin(
            "mindset",
            "6",
            "Maya",
            "mindset",
            "You help with the founder's own state: focus, confidence, stress, habits and staying accountable to goals.",
        ),
    ]
}

/// Personas by id and alias.
#[derive(Debug, Clone)]
pub struct Personas {
    /// Shared, not cloned, by every session of a coach: a persona is a handful of strings
    /// (the system prompt alone is a few hundred bytes) that no session changes.
    by_id: BTreeMap<String, Arc<Persona>>,
    aliases: BTreeMap<String, String>,
    /// Serves unknown coach ids (the `general` persona, possibly replaced by the file).
    fallback: Arc<Persona>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonasFile {
    personas: Vec<Persona>,
}

impl Personas {
    /// The built-in set plus `extra` (an extra persona with a built-in id replaces it).
    pub fn new(extra: Vec<Persona>) -> Self {
        let mut by_id = BTreeMap::new();
        for p in builtins().into_iter().chain(extra) {
            by_id.insert(p.id.clone(), Arc::new(p));
        }
        let mut aliases = BTreeMap::new();
        for p in by_id.values() {
            for a in &p.aliases {
                aliases.insert(a.clone(), p.id.clone());
            }
        }
        let fallback = by_id.get(GENERAL).cloned().unwrap_or_else(|| {
            Arc::new(builtin(
                GENERAL,
                "0",
                "Alex",
                "business",
                "You help with whatever the client brings.",
            ))
        });
        Personas {
            by_id,
            aliases,
            fallback,
        }
    }

    /// The built-ins plus the personas of a TOML file:
    ///
    /// ```toml
    /// [[personas]]
    /// id = "pricing"
    /// name = "Pia"
    /// domain = "pricing"
    /// system_prompt = "You are Pia, a pricing coach..."
    /// aliases = ["42"]
    /// ```
    pub fn from_file(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::new(Vec::new()));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read COACHD_PERSONAS_FILE {}: {e}", path.display()))?;
        let file: PersonasFile = toml::from_str(&text)
            .map_err(|e| format!("invalid COACHD_PERSONAS_FILE {}: {}", path.display(), e.message()))?;
        for p in &file.personas {
            if p.id.trim().is_empty() || p.system_prompt.trim().is_empty() {
                return Err(format!(
                    "invalid COACHD_PERSONAS_FILE {}: every persona needs an id and a system_prompt",
                    path.display()
                ));
            }
        }
        Ok(Self::new(file.personas))
    }

    /// The persona of a coach id (or alias); `None` when unknown.
    pub fn get(&self, coach_id: &str) -> Option<&Arc<Persona>> {
        self.by_id
            .get(coach_id)
            .or_else(|| self.aliases.get(coach_id).and_then(|id| self.by_id.get(id)))
    }

    /// The persona of a coach id, or the general coach for an unknown id.
    pub fn resolve(&self, coach_id: &str) -> &Arc<Persona> {
        self.get(coach_id).unwrap_or(&self.fallback)
    }

    /// Every persona, by id.
    pub fn all(&self) -> impl Iterator<Item = &Persona> {
        self.by_id.values().map(|p| &**p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_cover_the_business_domains_and_numeric_aliases() {
        let p = Personas::new(Vec::new());
        for domain in [
            "sales",
            "marketing",
            "operations",
            "finance",
            "leadership",
            "mindset",
        ] {
            assert_eq!(p.get(domain).unwrap().domain, domain);
        }
        assert_eq!(p.get("1").unwrap().id, "sales");
        assert_eq!(p.resolve("unknown-coach").id, GENERAL);
    }

    #[test]
    fn a_file_adds_and_replaces_personas() {
        let path = std::env::temp_dir().join(format!("personas-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "[[personas]]\nid = \"sales\"\nname = \"Rita\"\ndomain = \"sales\"\nsystem_prompt = \"You are Rita.\"\n\n\
             [[personas]]\nid = \"pricing\"\nname = \"Pia\"\ndomain = \"pricing\"\nsystem_prompt = \"You are Pia.\"\naliases = [\"42\"]\n",
        )
        .unwrap();
        let p = Personas::from_file(Some(&path)).unwrap();
        assert_eq!(p.get("sales").unwrap().name, "Rita");
        assert_eq!(p.get("42").unwrap().id, "pricing");
        std::fs::write(
            &path,
            "[[personas]]\nid = \"x\"\nname = \"X\"\ndomain = \"d\"\nsystem_prompt = \" \"\n",
        )
        .unwrap();
        assert!(
            Personas::from_file(Some(&path))
                .unwrap_err()
                .contains("system_prompt")
        );
    }
}
