//! HTML to Markdown with `htmd` (headings, lists, tables, links); scripts, styles and the
//! head are dropped, and the result is split into heading sections.

use super::markdown::sections_by_headings;
use super::{DocFormat, ExtractError, Extracted, text};

pub(crate) fn extract(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let html = text::decode(bytes);
    let converter = htmd::HtmlToMarkdown::builder()
        .skip_tags(vec![
            "script", "style", "head", "noscript", "template", "svg", "iframe",
        ])
        .build();
    let markdown = converter
        .convert(&html)
        .map_err(|e| ExtractError::Corrupt(format!("cannot read the HTML: {e}")))?;
    let markdown = markdown.trim().to_owned();
    let sections = sections_by_headings(&markdown);
    Ok(Extracted {
        markdown,
        sections,
        pages: None,
        format: DocFormat::Html,
    })
}
