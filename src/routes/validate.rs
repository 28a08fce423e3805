//! The request validators every route shares, so one rule holds on every surface: [`Id`], the
//! user or coach id of a request body or path.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::Error;

/// Longest user or coach id accepted.
pub const MAX_ID_CHARS: usize = 128;

/// What an id may be, for error messages (and the README, which says the same).
const ID_RULE: &str = "1 to 128 letters, digits, '-', '_', '.' or '@'";

/// A user or coach id: 1 to [`MAX_ID_CHARS`] ASCII letters, digits, `-`, `_`, `.` or `@`, so
/// integers, UUIDs and e-mail-like tokens fit. Anything else, `:` above all (the separator of
/// Redis keys, which would let two different pairs share a key), is refused before it reaches a
/// store. In a JSON body it may be a string or an integer, as the reference services send both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, example = "user-42")]
pub struct Id(String);

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
}
