//! The request validators every route shares, so one rule holds on every surface: [`Id`], the
//! user or coach id of a request body or path, and the checks of LLM request texts, conversations
//! and parameters that `/api/v1` and `/v1` both apply.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::config::Settings;
use crate::error::Error;
use crate::llm::{Message, Params};

/// Longest user or coach id accepted.
pub const MAX_ID_CHARS: usize = 128;

/// What an id may be, for error messages (and the README, which says the same).
const ID_RULE: &str = "1 to 128 letters, digits, '-', '_', '.' or '@'";

/// A user or coach id: 1 to [`MAX_ID_CHARS`] ASCII letters, digits, `-`, `_`, `.` or `@`, so
/// integers, UUIDs and e-mail-like tokens fit. Anything else, `:` above all (the separator of
/// Redis keys, which would let two different pairs share a key), is refused before it reaches a
/// store. In a JSON body it may be a string or an integer, as the reference services send both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Id(String);

/// The id rule as a JSON Schema pattern (the same check as [`Id::parse`]).
const ID_PATTERN: &str = "^[A-Za-z0-9._@-]{1,128}$";

// Written out rather than derived: the document must say both forms (a string of the rule, or a
// 64-bit integer), or a fuzzer reading it takes an accepted integer for a bug.
impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(ID_PATTERN))
                    .examples(["user-42"]),
            )
            .item(
                // What serde_json reads as an integer: i64 or u64.
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(i64::MIN as f64))
                    .maximum(Some(u64::MAX as f64)),
            )
            .description(Some(format!("A user or coach id: {ID_RULE}, or an integer")))
            .into()
    }
}

impl utoipa::ToSchema for Id {}

/// Why a value is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be {ID_RULE}")]
pub struct IdError;

impl Id {
    /// Checks `value` against the id rule.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        let ok = !value.is_empty()
            && value.len() <= MAX_ID_CHARS
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
        if ok { Ok(Id(value)) } else { Err(IdError) }
    }

    /// An id taken from a URL path: a bad one answers 400 `invalid_path` naming `field`.
    pub fn from_path(field: &str, value: String) -> Result<Self, Error> {
        Id::parse(value).map_err(|e| Error::bad_request("invalid_path", format!("{field} {e}")))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<Id> for str {
    fn eq(&self, other: &Id) -> bool {
        self == other.0
    }
}

// A bad id in a body is a data error of that field: axum's JSON rejection names the field and
// answers 400 `invalid_field`.
impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = match Value::deserialize(d)? {
            Value::String(s) => s,
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(serde::de::Error::custom("expected a string or an integer id")),
        };
        Id::parse(raw).map_err(serde::de::Error::custom)
    }
}

/// Stop sequences per request: the most OpenAI accepts, so every provider takes the request.
pub const MAX_STOP_SEQUENCES: usize = 4;

fn too_long(field: &str, max: usize) -> Error {
    Error::bad_request(
        "text_too_long",
        format!("{field} is longer than {max} characters"),
    )
}

/// Checks a text field: not blank, within the configured length.
pub fn check_text(field: &str, text: &str, s: &Settings) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::bad_request(
            "invalid_field",
            format!("{field} must not be empty"),
        ));
    }
    if text.chars().count() > s.api_max_text_chars {
        return Err(too_long(field, s.api_max_text_chars));
    }
    Ok(())
}

/// Checks request parameters against the ranges every provider accepts and the configured cap.
pub fn check_params(params: &Params, s: &Settings) -> Result<(), Error> {
    let bad = |message: String| Err(Error::bad_request("invalid_field", message));
    if params.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return bad("temperature must be between 0 and 2".to_owned());
    }
    if params.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return bad("top_p must be between 0 and 1".to_owned());
    }
    if params
        .max_tokens
        .is_some_and(|m| m == 0 || m > s.api_max_output_tokens)
    {
        return bad(format!(
            "max_tokens must be between 1 and {}",
            s.api_max_output_tokens
        ));
    }
    if params.stop.len() > MAX_STOP_SEQUENCES || params.stop.iter().any(String::is_empty) {
        return bad(format!(
            "stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences"
        ));
    }
    Ok(())
}

/// Checks a conversation: not too many messages, each within the text limit.
pub fn check_messages(messages: &[Message], s: &Settings) -> Result<(), Error> {
    if messages.len() > s.api_max_messages {
        return Err(Error::bad_request(
            "too_many_messages",
            format!("at most {} messages are accepted", s.api_max_messages),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        check_text(&format!("messages[{i}].content"), &m.content, s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_admits_tokens_and_refuses_separators() {
        for ok in ["1", "user-42", "a.b@c_d", "7d1f3b0e-4f5a-4c3e-9a55-2d9e2c7e1a11"] {
            assert!(Id::parse(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(MAX_ID_CHARS + 1);
        for bad in ["", "a:coach:b", "has space", "ü", "a/b", "a\nb", long.as_str()] {
            assert_eq!(Id::parse(bad), Err(IdError), "{bad:?}");
        }
    }

    #[test]
    fn a_body_id_is_a_string_or_an_integer() {
        let id: Id = serde_json::from_value(serde_json::json!(42)).unwrap();
        assert_eq!(id.as_str(), "42");
        let id: Id = serde_json::from_value(serde_json::json!("u-1")).unwrap();
        assert_eq!(id, *"u-1");
        for bad in [
            serde_json::json!(1.5),
            serde_json::json!(null),
            serde_json::json!("a:b"),
        ] {
            assert!(serde_json::from_value::<Id>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_path_id_names_its_field() {
        let e = Id::from_path("coach_id", "b:coach:c".to_owned()).unwrap_err();
        assert_eq!(e.code(), "invalid_path");
        assert!(e.to_string().starts_with("coach_id must be"));
    }

    #[test]
    fn params_are_checked() {
        let s = crate::config::Settings::for_tests(&[]).unwrap();
        let p = |t: f64| Params {
            temperature: Some(t),
            ..Params::default()
        };
        assert!(check_params(&p(0.7), &s).is_ok());
        assert!(check_params(&p(3.0), &s).is_err());
        let big = Params {
            max_tokens: Some(s.api_max_output_tokens + 1),
            ..Params::default()
        };
        assert!(check_params(&big, &s).is_err());
    }
}
