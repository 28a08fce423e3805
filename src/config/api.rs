//! The API section's validated lists: intent labels and entity types, with their defaults.

/// Whether `s` can be an intent label or entity type: 1 to 64 ASCII letters, digits, `_`, `-`, `.`.
pub fn is_label(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The default intent labels: what people bring to a coach.
pub const DEFAULT_INTENT_LABELS: [&str; 7] = [
    "goal_setting",
    "progress_update",
    "question",
    "feedback",
    "scheduling",
    "smalltalk",
    "other",
];

/// The default entity types of entity extraction.
pub const DEFAULT_ENTITY_TYPES: [&str; 10] = [
    "person",
    "organization",
    "location",
    "date",
    "time",
    "duration",
    "money",
    "quantity",
    "goal",
    "metric",
];
