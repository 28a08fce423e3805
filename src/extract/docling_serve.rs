//! The docling-serve client (`DOCLING_SERVE_URL`): layout models and OCR on a separate
//! service. Async API, as documented for docling-serve v1: `POST /v1/convert/file/async`
//! (multipart `files`, `to_formats=md`) → `task_id`; `GET /v1/status/poll/{id}?wait=N` until
//! `success` or `failure`; `GET /v1/result/{id}` → `document.md_content`. Pages come back
//! through `md_page_break_placeholder`; `X-Api-Key` when a key is set.

use bytes::Bytes;
use serde::Deserialize;
use url::Url;

use super::markdown::{heading, sections_by_headings};
use super::{DocFormat, ExtractError, ExtractSettings, Extracted, Section};

/// Marks page ends in docling-serve's Markdown; an HTML comment, so it never collides with text.
const PAGE_BREAK: &str = "<!-- coachd:page-break -->";
/// Seconds docling-serve may hold one status poll open.
const POLL_WAIT_SECS: u64 = 5;

#[derive(Debug, Deserialize)]
struct TaskStatus {
    task_id: String,
    task_status: String,
}

#[derive(Debug, Deserialize)]
struct ConvertResult {
    document: Option<ConvertedDocument>,
    #[serde(default)]
    status: String,
    #[serde(default)]
    errors: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ConvertedDocument {
    md_content: Option<String>,
}

pub(super) async fn extract(
    http: &reqwest::Client,
    base: &Url,
    settings: &ExtractSettings,
    bytes: Bytes,
    format: DocFormat,
) -> Result<Extracted, ExtractError> {
    let secs = settings.timeout.as_secs().max(1);
    let work = convert(http, base, settings, bytes, format);
    let markdown = tokio::time::timeout(settings.timeout, work)
        .await
        .map_err(|_| ExtractError::Timeout { secs })??;
    if markdown.len() > settings.max_output_bytes {
        return Err(ExtractError::OutputTooLarge {
            max: settings.max_output_bytes,
        });
    }
    let extracted = assemble(&markdown, format);
    if extracted.pages.is_some_and(|p| p > settings.max_pages) {
        return Err(ExtractError::TooManyPages {
            pages: extracted.pages.unwrap_or(0),
            max: settings.max_pages,
        });
    }
    if extracted.markdown.trim().is_empty() {
        return Err(ExtractError::NoText { ocr_hint: false });
    }
    Ok(extracted)
}

async fn convert(
    http: &reqwest::Client,
    base: &Url,
    settings: &ExtractSettings,
    bytes: Bytes,
    format: DocFormat,
) -> Result<String, ExtractError> {
    let part = reqwest::multipart::Part::stream(bytes)
        .file_name(format!("document.{}", format.extension()))
        .mime_str(format.mime())
        .map_err(|e| ExtractError::Internal(e.to_string()))?;
    let form = reqwest::multipart::Form::new()
        .part("files", part)
        .text("to_formats", "md")
        .text("image_export_mode", "placeholder")
        .text("md_page_break_placeholder", PAGE_BREAK);
    let submit = request(http.post(endpoint(base, "v1/convert/file/async")?), settings).multipart(form);
    let mut status: TaskStatus = json(submit).await?;
    let mut interval = tokio::time::interval(settings.docling_poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        match status.task_status.as_str() {
            "success" | "partial_success" => break,
            "failure" => {
                // The result of a failed task carries its errors; fetch them for the message.
                let result = fetch(http, base, settings, &status.task_id).await;
                let detail = match result {
                    Ok(r) if !r.errors.is_empty() => errors(&r.errors),
                    _ => "the conversion failed".to_owned(),
                };
                return Err(ExtractError::Corrupt(format!("docling-serve: {detail}")));
            }
            _ => {}
        }
        interval.tick().await;
        let mut url = endpoint(base, &format!("v1/status/poll/{}", status.task_id))?;
        url.query_pairs_mut()
            .append_pair("wait", &POLL_WAIT_SECS.to_string());
        status = json(request(http.get(url), settings)).await?;
    }
    let result = fetch(http, base, settings, &status.task_id).await?;
    if result.status == "failure" {
        return Err(ExtractError::Corrupt(format!(
            "docling-serve: {}",
            errors(&result.errors)
        )));
    }
    result
        .document
        .and_then(|d| d.md_content)
        .ok_or_else(|| ExtractError::Upstream("the result has no md_content".to_owned()))
}

async fn fetch(
    http: &reqwest::Client,
    base: &Url,
    settings: &ExtractSettings,
    task_id: &str,
) -> Result<ConvertResult, ExtractError> {
    json(request(
        http.get(endpoint(base, &format!("v1/result/{task_id}"))?),
        settings,
    ))
    .await
}

fn endpoint(base: &Url, path: &str) -> Result<Url, ExtractError> {
    // A base with a path prefix (https://host/docling/) keeps it.
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join(path)
        .map_err(|e| ExtractError::Internal(format!("bad docling-serve URL: {e}")))
}

fn request(builder: reqwest::RequestBuilder, settings: &ExtractSettings) -> reqwest::RequestBuilder {
    match &settings.docling_serve_api_key {
        Some(key) => builder.header("X-Api-Key", key.expose()),
        None => builder,
    }
}

async fn json<T: serde::de::DeserializeOwned>(builder: reqwest::RequestBuilder) -> Result<T, ExtractError> {
    let response = builder
        .send()
        .await
        .map_err(|e| ExtractError::Unavailable(e.without_url().to_string()))?;
    let status = response.status();
    if status.as_u16() == 429 || status.is_server_error() {
        return Err(ExtractError::Unavailable(format!("HTTP {status}")));
    }
    if !status.is_success() {
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        return Err(ExtractError::Upstream(format!("HTTP {status}: {body}")));
    }
    response
        .json()
        .await
        .map_err(|e| ExtractError::Upstream(format!("unexpected answer: {}", e.without_url())))
}

fn errors(errors: &[serde_json::Value]) -> String {
    errors
        .iter()
        .map(|e| {
            e.get("error_message")
                .and_then(|m| m.as_str())
                .map_or_else(|| e.to_string(), str::to_owned)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Pages from the break markers for paged formats, heading sections for the others.
fn assemble(markdown: &str, format: DocFormat) -> Extracted {
    let paged = matches!(format, DocFormat::Pdf | DocFormat::Pptx);
    if paged && markdown.contains(PAGE_BREAK) {
        let sections: Vec<Section> = markdown
            .split(PAGE_BREAK)
            .enumerate()
            .map(|(i, page)| {
                let markdown = page.trim().to_owned();
                let title = markdown.lines().find_map(heading).map(|(_, t)| t.to_owned());
                Section {
                    title,
                    page: Some(u32::try_from(i + 1).unwrap_or(u32::MAX)),
                    markdown,
                }
            })
            .collect();
        let pages = u32::try_from(sections.len()).unwrap_or(u32::MAX);
        return Extracted::from_sections(format, sections, Some(pages));
    }
    let markdown = markdown.replace(PAGE_BREAK, "").trim().to_owned();
    let sections = sections_by_headings(&markdown);
    let pages = paged.then_some(1);
    Extracted {
        markdown,
        sections,
        pages,
        format,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pages_at_the_break_marker() {
        let md = format!("# One\na\n\n{PAGE_BREAK}\n\nb\n## Two");
        let e = assemble(&md, DocFormat::Pdf);
        assert_eq!(e.pages, Some(2));
        assert_eq!(e.sections[0].title.as_deref(), Some("One"));
        assert_eq!(e.sections[1].page, Some(2));
        assert!(!e.markdown.contains("coachd:page-break"));
    }

    #[test]
    fn endpoints_keep_a_path_prefix() {
        let base = Url::parse("http://h:5001/docling").unwrap();
        assert_eq!(
            endpoint(&base, "v1/result/x").unwrap().as_str(),
            "http://h:5001/docling/v1/result/x"
        );
    }
}
