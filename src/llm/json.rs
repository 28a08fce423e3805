//! `generate_json`: structured output on any provider. Native JSON mode where the provider has
//! it (`json_schema`, else `json_object`), instructions in the system prompt always, then parsing
//! and schema validation, with one repair attempt when the reply is not valid.

use serde_json::Value;

use super::router::Llm;
use super::{LlmError, Message, Params, ResponseFormat, collect};

impl Llm {
    /// The reference coach service's `generate_json(prompt, system_prompt[, schema])` on a task
    /// (`chat` in the reference). Returns the parsed, validated JSON value.
    pub async fn generate_json(
        &self,
        task: &str,
        prompt: &str,
        system_prompt: Option<&str>,
        schema: Option<&Value>,
    ) -> Result<Value, LlmError> {
        let mut system = system_prompt.unwrap_or_default().trim().to_owned();
        if !system.is_empty() {
            system.push_str("\n\n");
        }
        system.push_str("Respond with one valid JSON object only: no prose, no code fences.");
        if let Some(schema) = schema {
            system.push_str("\nThe object must match this JSON Schema:\n");
            system.push_str(&schema.to_string());
        }
        let format = match schema {
            Some(s) => ResponseFormat::JsonSchema {
                name: "response".to_owned(),
                schema: s.clone(),
            },
            None => ResponseFormat::JsonObject,
        };
        let mut messages = vec![Message::user(prompt)];
        let first = self.complete_text(task, &system, &messages, &format).await?;
        let error = match parse_and_validate(&first, schema) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        tracing::info!(task, error = %error, "model JSON invalid; one repair attempt");
        messages.push(Message::assistant(first));
        messages.push(Message::user(format!(
            "That reply was not valid: {error}. Reply again with only the corrected JSON object."
        )));
        let second = self.complete_text(task, &system, &messages, &format).await?;
        parse_and_validate(&second, schema).map_err(|message| LlmError::InvalidJson { message })
    }

    async fn complete_text(
        &self,
        task: &str,
        system: &str,
        messages: &[Message],
        format: &ResponseFormat,
    ) -> Result<String, LlmError> {
        let routed = self
            .route_task(
                task,
                &Params::default(),
                Some(system.to_owned()),
                messages.to_vec(),
                Some(format.clone()),
            )
            .await?;
        Ok(collect(routed).await?.content)
    }
}

/// Parses a model's JSON reply (tolerating code fences and text around one object) and checks it
/// against the schema.
pub fn parse_and_validate(text: &str, schema: Option<&Value>) -> Result<Value, String> {
    let value = parse_lenient(text)?;
    if let Some(schema) = schema {
        validate(&value, schema, "$")?;
    }
    Ok(value)
}

fn parse_lenient(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Ok(v);
    }
    // Models wrap JSON in ```json fences or a sentence; take the outermost object.
    match (trimmed.find('{'), trimmed.rfind('}')) {
        (Some(start), Some(end)) if start < end => {
            serde_json::from_str(&trimmed[start..=end]).map_err(|e| format!("not valid JSON ({e})"))
        }
        _ => Err("no JSON object in the reply".to_owned()),
    }
}

/// A JSON Schema subset enough for structured replies: type (one or several), enum, const,
/// required, properties, additionalProperties: false, items, min/max, minItems/maxItems,
/// minLength/maxLength.
pub fn validate(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
    if let Some(c) = schema.get("const")
        && c != value
    {
        return Err(format!("{path} must be {c}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{path} must be one of {}", Value::Array(options.clone())));
    }
    if let Some(ty) = schema.get("type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() && !types.iter().any(|t| has_type(value, t)) {
            return Err(format!("{path} must be of type {}", types.join(" or ")));
        }
    }
    match value {
        Value::Object(obj) => {
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(name) = name.as_str()
                    && !obj.contains_key(name)
                {
                    return Err(format!("{path}.{name} is required"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (name, v) in obj {
                match props.and_then(|p| p.get(name)) {
                    Some(sub) => validate(v, sub, &format!("{path}.{name}"))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("{path}.{name} is not allowed"));
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            let count = items.len() as u64;
            if schema
                .get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| count < m)
            {
                return Err(format!("{path} has too few items"));
            }
            if schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| count > m)
            {
                return Err(format!("{path} has too many items"));
            }
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item, sub, &format!("{path}[{i}]"))?;
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if schema
                .get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| x < m)
            {
                return Err(format!("{path} is below its minimum"));
            }
            if schema
                .get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| x > m)
            {
                return Err(format!("{path} is above its maximum"));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if schema
                .get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len < m)
            {
                return Err(format!("{path} is too short"));
            }
            if schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
            {
                return Err(format!("{path} is too long"));
            }
        }
        _ => {}
    }
    Ok(())
}

fn has_type(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fenced_json_is_accepted() {
        let v = parse_and_validate("Sure!\n```json\n{\"a\": 1}\n```", None).unwrap();
        assert_eq!(v, json!({"a": 1}));
    }

    #[test]
    fn schema_violations_are_reported_with_their_path() {
        let schema = json!({
            "type": "object",
            "required": ["summary", "action_items"],
            "properties": {
                "summary": {"type": "string"},
                "action_items": {"type": "array", "items": {"type": "object", "required": ["task"]}},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1}
            }
        });
        assert!(
            parse_and_validate(r#"{"summary":"s","action_items":[{"task":"t"}]}"#, Some(&schema)).is_ok()
        );
        let e = parse_and_validate(r#"{"summary":"s"}"#, Some(&schema)).unwrap_err();
        assert_eq!(e, "$.action_items is required");
        let e = parse_and_validate(r#"{"summary":"s","action_items":[{}]}"#, Some(&schema)).unwrap_err();
        assert_eq!(e, "$.action_items[0].task is required");
        let e = parse_and_validate(
            r#"{"summary":"s","action_items":[],"confidence":2}"#,
            Some(&schema),
        )
        .unwrap_err();
        assert!(e.contains("confidence"), "{e}");
        assert!(parse_and_validate("no json here", None).is_err());
    }
}
