//! Document extraction: PDF (text layer), DOCX, PPTX, XLSX, HTML, Markdown and plain text to
//! Markdown that keeps headings, lists and tables, with the page (PDF, PPTX) or section structure.
//! Parsers run in a child process (`coachd __extract`), bounded in bytes, pages, output, memory
//! and time, so one that panics, aborts or loops costs a failed job, never a worker.
//!
//! # Libraries, and why
//! Measured on the sample documents of `sample` (tests in `tests/extract.rs`; numbers in
//! BENCHMARKS.md "Document extraction"):
//! - PDF: `edgeparse-core` (on `pdf-cos`, a lopdf fork). Its pipeline rebuilds headings from
//!   font sizes, numbered and bulleted lists, ruled tables and reading order, which the tests
//!   check page by page. `pdf-extract`, the other candidate, returns plain text per page by
//!   design (no heading or table structure), so it was not taken. Cost: edgeparse pulls the
//!   `image` crate with its default codecs (136 crates more in Cargo.lock in all), the largest
//!   part of this module's compile time.
//! - DOCX, PPTX: our own readers over `zip` + `quick-xml` (`docx`, `pptx`): the OOXML parts
//!   that carry structure (paragraph styles, numbering, tables, slide placeholders) are small
//!   and well specified. The `docling` crate's declarative backends were the other candidate;
//!   its build (about 490 crates, Rust 1.92) did not finish within the time set for choosing on
//!   this shared 2-core machine, so its output was not compared.
//! - XLSX: `calamine`. HTML: `htmd` (headings, lists and tables become Markdown).
//! - Markdown and text pass through, decoded and normalised.
//!
//! With `DOCLING_SERVE_URL` set, documents go to a docling-serve instance instead
//! ([`docling_serve`]: layout models and OCR), through its async API.

mod child;
mod docling_serve;
mod docx;
mod html;
mod markdown;
mod ooxml;
mod pdf;
mod pptx;
#[cfg(feature = "fake-upstream")]
pub mod sample;
mod text;
mod xlsx;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::secret::{Secret, ServiceUrl};

pub use child::run_child;

/// The hidden subcommand of the `coachd` binary that runs one parse (see [`run_child`]).
pub const CHILD_COMMAND: &str = "__extract";

/// A document format coachd can extract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    /// PDF, text layer only (no OCR unless docling-serve is configured).
    Pdf,
    /// Word (Office Open XML).
    Docx,
    /// PowerPoint (Office Open XML).
    Pptx,
    /// Excel (Office Open XML).
    Xlsx,
    /// HTML or XHTML.
    Html,
    /// Markdown.
    Markdown,
    /// Plain text.
    Text,
}

impl DocFormat {
    /// Every format, in a stable order.
    pub const ALL: [DocFormat; 7] = [
        DocFormat::Pdf,
        DocFormat::Docx,
        DocFormat::Pptx,
        DocFormat::Xlsx,
        DocFormat::Html,
        DocFormat::Markdown,
        DocFormat::Text,
    ];

    /// The format of an upload, from its declared content type, its file name and its first
    /// bytes. A PDF signature wins over what is declared (uploads are often mislabelled); then
    /// a specific content type, then the file extension, then the bytes alone. `None`: not a
    /// format coachd extracts.
    pub fn detect(content_type: Option<&str>, filename: Option<&str>, head: &[u8]) -> Option<Self> {
        if head.starts_with(b"%PDF-") {
            return Some(DocFormat::Pdf);
        }
        let declared = content_type
            .map(|ct| {
                ct.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|ct| !ct.is_empty() && ct != "application/octet-stream");
        if let Some(ct) = declared.as_deref()
            && let Some(format) = Self::from_content_type(ct)
        {
            return Some(format);
        }
        if let Some(ext) = filename
            .and_then(|f| f.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase())
            && let Some(format) = Self::from_extension(&ext)
        {
            return Some(format);
        }
        // A declared type we do not extract (image/png, say) is not second-guessed by sniffing.
        if declared.is_some() {
            return None;
        }
        Self::sniff(head)
    }

    /// The format of a MIME type (without parameters, lowercase).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        Some(match ct {
            "application/pdf" | "application/x-pdf" => DocFormat::Pdf,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => DocFormat::Docx,
            "application/vnd.openxmlformats-officedocument.presentationml.presentation" => DocFormat::Pptx,
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" => DocFormat::Xlsx,
            "text/html" | "application/xhtml+xml" => DocFormat::Html,
            "text/markdown" | "text/x-markdown" => DocFormat::Markdown,
            "text/plain" => DocFormat::Text,
            _ => return None,
        })
    }

    /// The format of a file extension (without the dot, lowercase).
    pub fn from_extension(ext: &str) -> Option<Self> {
        Some(match ext {
            "pdf" => DocFormat::Pdf,
            "docx" => DocFormat::Docx,
            "pptx" => DocFormat::Pptx,
            "xlsx" => DocFormat::Xlsx,
            "html" | "htm" | "xhtml" => DocFormat::Html,
            "md" | "markdown" => DocFormat::Markdown,
            "txt" | "text" => DocFormat::Text,
            _ => return None,
        })
    }

    fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(b"PK\x03\x04") {
            // The parts' names are stored in clear in the local headers; which folder shows up
            // first in the head tells the three OOXML kinds apart.
            let find = |needle: &[u8]| head.windows(needle.len()).position(|w| w == needle);
            return [
                (&b"word/"[..], DocFormat::Docx),
                (b"ppt/", DocFormat::Pptx),
                (b"xl/", DocFormat::Xlsx),
            ]
            .into_iter()
            .filter_map(|(n, f)| find(n).map(|i| (i, f)))
            .min_by_key(|(i, _)| *i)
            .map(|(_, f)| f);
        }
        let text = match std::str::from_utf8(head) {
            Ok(t) => t,
            // The head may end inside a multi-byte character.
            Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
            Err(_) => return None,
        };
        if text.contains('\0') {
            return None;
        }
        let start = text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .to_ascii_lowercase();
        if start.starts_with("<!doctype html") || start.starts_with("<html") {
            Some(DocFormat::Html)
        } else {
            Some(DocFormat::Text)
        }
    }

    /// The lowercase name used in the API and in job options (`pdf`, `docx`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            DocFormat::Pdf => "pdf",
            DocFormat::Docx => "docx",
            DocFormat::Pptx => "pptx",
            DocFormat::Xlsx => "xlsx",
            DocFormat::Html => "html",
            DocFormat::Markdown => "markdown",
            DocFormat::Text => "text",
        }
    }

    /// The inverse of [`DocFormat::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The MIME type sent to docling-serve.
    pub fn mime(&self) -> &'static str {
        match self {
            DocFormat::Pdf => "application/pdf",
            DocFormat::Docx => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            DocFormat::Pptx => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            DocFormat::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            DocFormat::Html => "text/html",
            DocFormat::Markdown => "text/markdown",
            DocFormat::Text => "text/plain",
        }
    }

    fn extension(&self) -> &'static str {
        match self {
            DocFormat::Markdown => "md",
            DocFormat::Text => "txt",
            other => other.as_str(),
        }
    }
}

impl std::fmt::Display for DocFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the parse runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In a child process running `executable __extract` (`None`: this very executable): a
    /// panic, abort or endless loop there is a typed error here. The default.
    Process {
        /// The binary that has the `__extract` subcommand.
        executable: Option<PathBuf>,
    },
    /// On a blocking thread of this process: no protection against aborts, and a parser that
    /// loops keeps its thread after the timeout. For embedders without the `coachd` binary only.
    InProcess,
}

/// Limits and routing of extraction (read by `config::extract`).
#[derive(Debug, Clone)]
pub struct ExtractSettings {
    /// `COACHD_EXTRACT_MAX_BYTES`: largest document accepted.
    pub max_bytes: usize,
    /// `COACHD_EXTRACT_MAX_PAGES`: most PDF pages or PPTX slides.
    pub max_pages: u32,
    /// `COACHD_EXTRACT_TIMEOUT_SECS`: longest one extraction may take, child start included.
    pub timeout: Duration,
    /// `COACHD_EXTRACT_MAX_OUTPUT_BYTES`: longest Markdown produced.
    pub max_output_bytes: usize,
    /// `COACHD_EXTRACT_MAX_MEMORY_MB`: address-space limit of the child (0: none).
    pub max_memory_mb: u64,
    /// `COACHD_EXTRACT_ISOLATION` (`process` or `in_process`) and `COACHD_EXTRACT_EXECUTABLE`.
    pub isolation: Isolation,
    /// `DOCLING_SERVE_URL`: send documents to this docling-serve instead of parsing them here.
    pub docling_serve_url: Option<ServiceUrl>,
    /// `DOCLING_SERVE_API_KEY`: sent as `X-Api-Key`.
    pub docling_serve_api_key: Option<Secret>,
    /// `COACHD_DOCLING_POLL_MS`: interval between status polls of a docling-serve task.
    pub docling_poll_interval: Duration,
}

impl Default for ExtractSettings {
    fn default() -> Self {
        ExtractSettings {
            max_bytes: 50 << 20,
            max_pages: 1_000,
            timeout: Duration::from_secs(120),
            max_output_bytes: 32 << 20,
            max_memory_mb: 2_048,
            isolation: Isolation::Process { executable: None },
            docling_serve_url: None,
            docling_serve_api_key: None,
            docling_poll_interval: Duration::from_millis(500),
        }
    }
}

/// One page, slide, sheet or section of an extracted document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The section's heading, the slide's title or the sheet's name.
    pub title: Option<String>,
    /// 1-based page (PDF) or slide (PPTX) number.
    pub page: Option<u32>,
    /// The section's Markdown.
    pub markdown: String,
}

/// An extracted document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    /// The whole document as Markdown (the sections joined by blank lines).
    pub markdown: String,
    /// Pages (PDF), slides (PPTX), sheets (XLSX) or heading sections (the others), in order.
    pub sections: Vec<Section>,
    /// Number of pages or slides, where the format has them.
    pub pages: Option<u32>,
    /// The format it was read as.
    pub format: DocFormat,
}

impl Extracted {
    /// Builds the document from its sections, joining their Markdown.
    pub fn from_sections(format: DocFormat, sections: Vec<Section>, pages: Option<u32>) -> Self {
        let markdown = sections
            .iter()
            .map(|s| s.markdown.trim_end())
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n");
        Extracted {
            markdown,
            sections,
            pages,
            format,
        }
    }
}

/// Why a document could not be extracted. Crosses the child's stdout as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", content = "detail", rename_all = "snake_case")]
pub enum ExtractError {
    /// Not a format coachd extracts.
    #[error("unsupported document type: {0}")]
    Unsupported(String),
    /// Larger than `COACHD_EXTRACT_MAX_BYTES`.
    #[error("document of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The document's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// More pages or slides than `COACHD_EXTRACT_MAX_PAGES`.
    #[error("document has {pages} pages, more than the limit of {max}")]
    TooManyPages {
        /// The document's pages.
        pages: u32,
        /// The limit.
        max: u32,
    },
    /// The Markdown would be longer than `COACHD_EXTRACT_MAX_OUTPUT_BYTES`.
    #[error("extracted text is longer than the limit of {max} bytes")]
    OutputTooLarge {
        /// The limit.
        max: usize,
    },
    /// The file is damaged, encrypted or not what its type says.
    #[error("corrupt document: {0}")]
    Corrupt(String),
    /// The document parsed but holds no text (a scanned PDF without a text layer, say).
    #[error("the document has no extractable text{}", if *.ocr_hint { " (a scan? configure DOCLING_SERVE_URL for OCR)" } else { "" })]
    NoText {
        /// Whether OCR through docling-serve could help.
        ocr_hint: bool,
    },
    /// The parse did not finish within `COACHD_EXTRACT_TIMEOUT_SECS`.
    #[error("extraction did not finish within {secs} s")]
    Timeout {
        /// The limit in seconds.
        secs: u64,
    },
    /// The parser crashed (panic, abort, out of memory, killed); the message says how.
    #[error("the document parser crashed: {0}")]
    Crashed(String),
    /// docling-serve answered with an error.
    #[error("docling-serve failed: {0}")]
    Upstream(String),
    /// docling-serve could not be reached or answered 429/5xx: worth another attempt.
    #[error("docling-serve unavailable: {0}")]
    Unavailable(String),
    /// The parser could not be started (no executable, no process slot): worth another attempt.
    #[error("cannot run the document parser: {0}")]
    Internal(String),
}

impl ExtractError {
    /// A stable, machine-readable code (`unsupported`, `too_large`, `corrupt`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            ExtractError::Unsupported(_) => "unsupported",
            ExtractError::TooLarge { .. } => "too_large",
            ExtractError::TooManyPages { .. } => "too_many_pages",
            ExtractError::OutputTooLarge { .. } => "output_too_large",
            ExtractError::Corrupt(_) => "corrupt",
            ExtractError::NoText { .. } => "no_text",
            ExtractError::Timeout { .. } => "timeout",
            ExtractError::Crashed(_) => "crashed",
            ExtractError::Upstream(_) => "upstream",
            ExtractError::Unavailable(_) => "unavailable",
            ExtractError::Internal(_) => "internal",
        }
    }

    /// Whether another attempt may succeed. Local parses are deterministic: the same bytes
    /// time out or crash again, so only failures to start and docling-serve outages retry.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ExtractError::Unavailable(_) | ExtractError::Internal(_))
    }
}

/// Extracts documents under [`ExtractSettings`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Extractor {
    settings: Arc<ExtractSettings>,
    http: reqwest::Client,
}

impl Extractor {
    /// An extractor with its own HTTP client (used only with docling-serve).
    pub fn new(settings: ExtractSettings) -> Self {
        Self::with_http(settings, reqwest::Client::new())
    }

    /// An extractor sharing the application's HTTP client.
    pub fn with_http(settings: ExtractSettings, http: reqwest::Client) -> Self {
        Extractor {
            settings: Arc::new(settings),
            http,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &ExtractSettings {
        &self.settings
    }

    /// Detects the format of an upload ([`DocFormat::detect`]) and extracts it; a format coachd
    /// does not read is [`ExtractError::Unsupported`].
    pub async fn extract_upload(
        &self,
        bytes: Bytes,
        content_type: Option<&str>,
        filename: Option<&str>,
    ) -> Result<Extracted, ExtractError> {
        let head = &bytes[..bytes.len().min(4096)];
        let Some(format) = DocFormat::detect(content_type, filename, head) else {
            let what = content_type.or(filename).unwrap_or("unknown content").to_owned();
            return Err(ExtractError::Unsupported(what));
        };
        self.extract(bytes, format).await
    }

    /// Extracts one document, isolated and bounded. Dropping the future kills the child.
    pub async fn extract(&self, bytes: Bytes, format: DocFormat) -> Result<Extracted, ExtractError> {
        let s = &self.settings;
        if bytes.len() > s.max_bytes {
            return Err(ExtractError::TooLarge {
                size: bytes.len(),
                max: s.max_bytes,
            });
        }
        if let Some(url) = &s.docling_serve_url {
            return docling_serve::extract(&self.http, url.url(), s, bytes, format).await;
        }
        let limits = Limits {
            max_pages: s.max_pages,
            max_output_bytes: s.max_output_bytes,
        };
        match &s.isolation {
            Isolation::Process { executable } => {
                let exe = match executable {
                    Some(p) => p.clone(),
                    None => std::env::current_exe().map_err(|e| {
                        ExtractError::Internal(format!("cannot find the coachd executable: {e}"))
                    })?,
                };
                child::run(&exe, bytes, format, limits, s.max_memory_mb, s.timeout).await
            }
            Isolation::InProcess => {
                let task = tokio::task::spawn_blocking(move || parse(&bytes, format, limits));
                match tokio::time::timeout(s.timeout, task).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(e)) => Err(ExtractError::Crashed(child::panic_message(e))),
                    Err(_) => Err(ExtractError::Timeout {
                        secs: s.timeout.as_secs(),
                    }),
                }
            }
        }
    }
}

/// The bounds a parse itself enforces (bytes and time are enforced around it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most pages or slides.
    pub max_pages: u32,
    /// Longest Markdown.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let s = ExtractSettings::default();
        Limits {
            max_pages: s.max_pages,
            max_output_bytes: s.max_output_bytes,
        }
    }
}

/// Parses one document in this thread, without isolation: what the child runs, and what the
/// benchmark measures. Servers call [`Extractor::extract`] instead.
pub fn parse(bytes: &[u8], format: DocFormat, limits: Limits) -> Result<Extracted, ExtractError> {
    #[cfg(feature = "fake-upstream")]
    child::fault(bytes);
    let extracted = match format {
        DocFormat::Pdf => pdf::extract(bytes, limits)?,
        DocFormat::Docx => docx::extract(bytes)?,
        DocFormat::Pptx => pptx::extract(bytes, limits)?,
        DocFormat::Xlsx => xlsx::extract(bytes)?,
        DocFormat::Html => html::extract(bytes)?,
        DocFormat::Markdown => text::extract_markdown(bytes),
        DocFormat::Text => text::extract_text(bytes),
    };
    if extracted.markdown.len() > limits.max_output_bytes {
        return Err(ExtractError::OutputTooLarge {
            max: limits.max_output_bytes,
        });
    }
    if extracted.markdown.trim().is_empty() && !bytes.is_empty() {
        return Err(ExtractError::NoText {
            ocr_hint: matches!(format, DocFormat::Pdf | DocFormat::Pptx),
        });
    }
    Ok(extracted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_prefers_a_pdf_signature_then_the_declared_type_then_the_name() {
        assert_eq!(
            DocFormat::detect(Some("text/plain"), Some("a.txt"), b"%PDF-1.7\n"),
            Some(DocFormat::Pdf)
        );
        assert_eq!(
            DocFormat::detect(
                Some("application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
                None,
                b"PK\x03\x04"
            ),
            Some(DocFormat::Docx)
        );
        assert_eq!(
            DocFormat::detect(Some("application/octet-stream"), Some("Deck.PPTX"), b"PK"),
            Some(DocFormat::Pptx)
        );
        assert_eq!(
            DocFormat::detect(None, Some("notes.md"), b"# x"),
            Some(DocFormat::Markdown)
        );
        assert_eq!(
            DocFormat::detect(Some("image/png"), Some("x.png"), b"\x89PNG"),
            None
        );
        assert_eq!(DocFormat::detect(None, None, b"\x89PNG\r\n\x1a\n\0\0"), None);
    }

    #[test]
    fn detect_sniffs_html_text_and_ooxml_parts() {
        assert_eq!(
            DocFormat::detect(None, None, b"  <!DOCTYPE html><html>"),
            Some(DocFormat::Html)
        );
        assert_eq!(
            DocFormat::detect(None, None, "caf\u{e9} au lait".as_bytes()),
            Some(DocFormat::Text)
        );
        assert_eq!(
            DocFormat::detect(
                None,
                None,
                b"PK\x03\x04....[Content_Types].xml....xl/workbook.xml"
            ),
            Some(DocFormat::Xlsx)
        );
        assert_eq!(
            DocFormat::detect(None, None, b"PK\x03\x04....word/document.xml"),
            Some(DocFormat::Docx)
        );
    }

    #[test]
    fn formats_round_trip_through_their_names() {
        for f in DocFormat::ALL {
            assert_eq!(DocFormat::parse(f.as_str()), Some(f));
            assert_eq!(serde_json::to_value(f).unwrap(), serde_json::json!(f.as_str()));
        }
    }

    #[test]
    fn errors_have_codes_and_cross_json() {
        let e = ExtractError::TooManyPages { pages: 9, max: 2 };
        assert_eq!(e.code(), "too_many_pages");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<ExtractError>(&json).unwrap(), e);
        assert!(!ExtractError::Crashed("x".into()).is_retryable());
        assert!(ExtractError::Unavailable("x".into()).is_retryable());
    }
}
