//! Markdown and plain text: decoded (UTF-8, or Latin-1 when it is not), line endings
//! normalised, and split into heading sections.

use super::markdown::sections_by_headings;
use super::{DocFormat, Extracted, Section};

/// Text from bytes: UTF-8 without its BOM, else Latin-1 (every byte is a character), so a
/// legacy file is read rather than refused.
pub(crate) fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    text.replace("\r\n", "\n").replace('\r', "\n")
}

pub(crate) fn extract_markdown(bytes: &[u8]) -> Extracted {
    let markdown = decode(bytes).trim().to_owned();
    let sections = sections_by_headings(&markdown);
    Extracted {
        markdown,
        sections,
        pages: None,
        format: DocFormat::Markdown,
    }
}

pub(crate) fn extract_text(bytes: &[u8]) -> Extracted {
    let markdown = decode(bytes).trim().to_owned();
    let sections = if markdown.is_empty() {
        Vec::new()
    } else {
        vec![Section {
            title: None,
            page: None,
            markdown: markdown.clone(),
        }]
    };
    Extracted {
        markdown,
        sections,
        pages: None,
        format: DocFormat::Text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_utf8_with_bom_and_latin1() {
        assert_eq!(decode(b"\xef\xbb\xbfa\r\nb"), "a\nb");
        assert_eq!(decode(b"caf\xe9"), "caf\u{e9}");
    }
}
