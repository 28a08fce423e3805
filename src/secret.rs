//! Values that must never reach a log line: [`Secret`] (keys, passwords) and [`ServiceUrl`] (a
//! connection URL whose password is hidden). At the bottom of the crate so every layer that holds
//! one can use them without importing the settings.

use std::fmt;

use url::Url;

/// A value that must never reach a log line or a `Debug` dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A connection URL whose password is hidden from `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(Url);

impl ServiceUrl {
    /// Wraps a parsed URL.
    pub fn new(url: Url) -> Self {
        Self(url)
    }

    /// The full URL, password included; for connecting only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The URL with any password replaced by `***`, safe to log.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // set_password only fails for URLs that cannot carry credentials, which we never build.
            let _ = url.set_password(Some("***"));
        }
        url.to_string()
    }

    /// The parsed URL, for reading components; never log it as a whole.
    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({})", self.redacted())
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}
