//! The extract section: document extraction's bounds, isolation and the optional
//! docling-serve, read into the [`ExtractSettings`] the `Extractor` takes.

use std::path::PathBuf;

use super::ConfigError;
use super::source::{Reader, Source, invalid};
use crate::extract::{ExtractSettings, Isolation};

pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<ExtractSettings, ConfigError> {
    let d = ExtractSettings::default();
    let isolation = match r
        .string("COACHD_EXTRACT_ISOLATION", "process")
        .to_ascii_lowercase()
        .as_str()
    {
        "process" => Isolation::Process {
            executable: r.raw("COACHD_EXTRACT_EXECUTABLE").map(PathBuf::from),
        },
        "in_process" | "none" => Isolation::InProcess,
        other => {
            return Err(invalid(
                "COACHD_EXTRACT_ISOLATION",
                "process or in_process",
                Some(other.to_owned()),
            ));
        }
    };
    Ok(ExtractSettings {
        max_bytes: r.int("COACHD_EXTRACT_MAX_BYTES", d.max_bytes, 1, 1 << 32)?,
        max_pages: r.int("COACHD_EXTRACT_MAX_PAGES", d.max_pages, 1, 1_000_000)?,
        timeout: r.seconds("COACHD_EXTRACT_TIMEOUT_SECS", d.timeout.as_secs(), 1, 86_400)?,
        max_output_bytes: r.int(
            "COACHD_EXTRACT_MAX_OUTPUT_BYTES",
            d.max_output_bytes,
            1_024,
            1 << 32,
        )?,
        max_memory_mb: r.int("COACHD_EXTRACT_MAX_MEMORY_MB", d.max_memory_mb, 0, 1 << 20)?,
        isolation,
        docling_serve_url: r.service_url("DOCLING_SERVE_URL", &["http", "https"])?,
        docling_serve_api_key: r.secret("DOCLING_SERVE_API_KEY"),
        docling_poll_interval: r.millis("COACHD_DOCLING_POLL_MS", 500, 10, 60_000)?,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Settings;
    use crate::extract::Isolation;

    #[test]
    fn defaults_and_overrides() {
        let d = Settings::for_tests(&[]).unwrap().extract;
        assert_eq!(d.max_bytes, 50 << 20);
        assert_eq!(d.isolation, Isolation::Process { executable: None });
        assert!(d.docling_serve_url.is_none());

        let s = Settings::for_tests(&[
            ("COACHD_EXTRACT_MAX_BYTES", "1000"),
            ("COACHD_EXTRACT_MAX_PAGES", "7"),
            ("COACHD_EXTRACT_TIMEOUT_SECS", "9"),
            ("COACHD_EXTRACT_ISOLATION", "in_process"),
            ("DOCLING_SERVE_URL", "http://docling:5001"),
            ("DOCLING_SERVE_API_KEY", "k"),
        ])
        .unwrap()
        .extract;
        assert_eq!(
            (s.max_bytes, s.max_pages, s.timeout),
            (1000, 7, Duration::from_secs(9))
        );
        assert_eq!(s.isolation, Isolation::InProcess);
        assert_eq!(
            s.docling_serve_url.unwrap().url().as_str(),
            "http://docling:5001/"
        );
        assert!(s.docling_serve_api_key.is_some());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("COACHD_EXTRACT_MAX_PAGES", "0"),
            ("COACHD_EXTRACT_ISOLATION", "thread"),
            ("DOCLING_SERVE_URL", "ftp://x"),
        ] {
            let err = Settings::for_tests(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
        }
    }
}
