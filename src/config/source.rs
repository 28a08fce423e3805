//! Where raw values come from ([`Source`]: the environment, or a map in tests) and the typed
//! readers every section uses: integers in a range, durations, booleans, URLs, secrets, labels, and
//! renamed variables. Every failure is a [`ConfigError`] that names the variable.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use super::{ConfigError, is_label};
use crate::secret::{Secret, ServiceUrl};

/// Reads raw values by name; the process environment in production, a map in tests.
pub trait Source {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|v| (*v).to_owned())
    }
}

/// Wraps a [`Source`] and treats empty or whitespace-only values as unset, as `.env` files
/// commonly leave optional variables blank (`REDIS_PASSWORD=`).
pub(super) struct Reader<'a, S: Source>(pub(super) &'a S);

impl<S: Source> Reader<'_, S> {
    pub(super) fn raw(&self, var: &str) -> Option<String> {
        self.0
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_owned())
    }

    pub(super) fn secret(&self, var: &str) -> Option<Secret> {
        self.raw(var).map(Secret::new)
    }

    pub(super) fn parse<T: FromStr>(&self, var: &str, default: T, expected: &str) -> Result<T, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| invalid(var, expected, Some(v))),
        }
    }

    /// An integer in `min..=max`.
    pub(super) fn int<T>(&self, var: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Copy + fmt::Display,
    {
        let expected = format!("an integer from {min} to {max}");
        let value = self.parse(var, default, &expected)?;
        if value < min || value > max {
            return Err(invalid(var, &expected, self.raw(var)));
        }
        Ok(value)
    }

    pub(super) fn seconds(
        &self,
        var: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.int(var, default, min, max).map(Duration::from_secs)
    }

    pub(super) fn millis(
        &self,
        var: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.int(var, default, min, max).map(Duration::from_millis)
    }

    /// A number from 0 to 1.
    pub(super) fn fraction(&self, var: &str, default: f32) -> Result<f32, ConfigError> {
        let expected = "a number from 0 to 1";
        let value: f32 = self.parse(var, default, expected)?;
        if !(0.0..=1.0).contains(&value) {
            return Err(invalid(var, expected, self.raw(var)));
        }
        Ok(value)
    }

    pub(super) fn boolean(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(var, "true or false", Some(v))),
            },
        }
    }

    /// A URL with one of `schemes`; the value is never echoed because URLs carry passwords.
    pub(super) fn service_url(&self, var: &str, schemes: &[&str]) -> Result<Option<ServiceUrl>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(None);
        };
        let expected = format!(
            "a URL such as {}://user:password@host:port/name",
            schemes.first().copied().unwrap_or("scheme")
        );
        let mut url = Url::parse(&raw).map_err(|_| invalid(var, &expected, None))?;
        // The Python services use SQLAlchemy URLs such as `postgresql+asyncpg://`; accept them.
        let scheme = url.scheme().split('+').next().unwrap_or_default().to_owned();
        if !schemes.contains(&scheme.as_str()) || url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(var, &expected, None));
        }
        if scheme != url.scheme() {
            let rest = &raw[raw.find("://").unwrap_or(0)..];
            url = Url::parse(&format!("{scheme}{rest}")).map_err(|_| invalid(var, &expected, None))?;
        }
        Ok(Some(ServiceUrl::new(url)))
    }

    /// A comma-separated list of labels (see [`is_label`]), without duplicates, or `default`.
    pub(super) fn labels(&self, var: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(default.iter().map(|l| (*l).to_owned()).collect());
        };
        let expected =
            "a comma-separated list of 1 to 100 distinct labels of letters, digits, _ - . (at most 64 each)";
        let labels: Vec<String> = raw.split(',').map(|l| l.trim().to_owned()).collect();
        let distinct = labels.iter().collect::<std::collections::HashSet<_>>().len() == labels.len();
        if labels.is_empty() || labels.len() > 100 || !distinct || !labels.iter().all(|l| is_label(l)) {
            return Err(invalid(var, expected, Some(raw)));
        }
        Ok(labels)
    }

    /// API keys: comma-separated, each of visible ASCII (so it fits an HTTP header). Never echoed.
    pub(super) fn api_keys(&self, var: &str) -> Result<Vec<Secret>, ConfigError> {
        let Some(raw) = self.raw(var) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                if k.bytes().all(|b| b.is_ascii_graphic()) {
                    Ok(Secret::new(k))
                } else {
                    Err(invalid(
                        var,
                        "comma-separated keys of visible ASCII characters",
                        None,
                    ))
                }
            })
            .collect()
    }

    /// A setting that was renamed: `new` wins; `old` alone still works, with a warning that
    /// names `new`.
    pub(super) fn renamed<T>(
        &self,
        new: &str,
        old: &str,
        warnings: &mut Vec<String>,
        read: impl Fn(&str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match (self.raw(new), self.raw(old)) {
            (None, Some(_)) => {
                warnings.push(format!(
                    "{old} is deprecated: set {new} instead (it is read for now)"
                ));
                read(old)
            }
            (Some(_), Some(_)) => {
                warnings.push(format!("{old} is deprecated and ignored: {new} is set"));
                read(new)
            }
            _ => read(new),
        }
    }

    pub(super) fn base_url(&self, var: &str, default: &str) -> Result<Url, ConfigError> {
        let raw = self.string(var, default);
        let expected = "an http(s) URL such as https://api.example.com/v1";
        let url =
            Url::parse(raw.trim_end_matches('/')).map_err(|_| invalid(var, expected, Some(raw.clone())))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(var, expected, Some(raw)));
        }
        Ok(url)
    }
}

pub(super) fn invalid(var: &str, expected: &str, shown: Option<String>) -> ConfigError {
    ConfigError {
        var: var.to_owned(),
        expected: expected.to_owned(),
        shown,
    }
}

pub(super) const DAY_SECS: u64 = 86_400;
