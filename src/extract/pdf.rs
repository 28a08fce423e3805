//! PDF text layer through `edgeparse-core`: its pipeline rebuilds headings (font sizes),
//! lists, tables and reading order; we render each page on its own so every page is a
//! section. No OCR here: a scan comes back as `NoText` (docling-serve does OCR).

use edgeparse_core::api::config::ProcessingConfig;
use edgeparse_core::models::document::PdfDocument;
use edgeparse_core::{EdgePdfError, convert_bytes, output::markdown::to_markdown, pdf::loader};

use super::markdown::heading;
use super::{DocFormat, ExtractError, Extracted, Limits, Section};

pub(crate) fn extract(bytes: &[u8], limits: Limits) -> Result<Extracted, ExtractError> {
    if !bytes.starts_with(b"%PDF-") && !bytes[..bytes.len().min(1024)].windows(5).any(|w| w == b"%PDF-") {
        return Err(ExtractError::Corrupt(
            "not a PDF file (no %PDF- header)".to_owned(),
        ));
    }
    // Counting pages first costs one more parse of the cross-reference table, and spares the
    // layout pipeline on a document that will be refused anyway.
    let pages = loader::load_pdf_from_bytes(bytes, None)
        .map_err(corrupt)?
        .num_pages;
    if pages > limits.max_pages {
        return Err(ExtractError::TooManyPages {
            pages,
            max: limits.max_pages,
        });
    }
    let config = ProcessingConfig {
        quiet: true,
        raster_table_ocr: false,
        ..ProcessingConfig::default()
    };
    let doc = convert_bytes(bytes, "document.pdf", &config).map_err(corrupt)?;
    let pages = doc.number_of_pages.max(pages);
    let mut sections = Vec::with_capacity(pages as usize);
    for page in 1..=pages {
        let kids: Vec<_> = doc
            .kids
            .iter()
            .filter(|k| k.page_number() == Some(page))
            .cloned()
            .collect();
        let markdown = if kids.is_empty() {
            String::new()
        } else {
            let page_doc = PdfDocument {
                kids,
                ..PdfDocument::new(doc.file_name.clone())
            };
            to_markdown(&page_doc).map_err(corrupt)?.trim().to_owned()
        };
        let title = markdown.lines().find_map(heading).map(|(_, t)| t.to_owned());
        sections.push(Section {
            title,
            page: Some(page),
            markdown,
        });
    }
    Ok(Extracted::from_sections(DocFormat::Pdf, sections, Some(pages)))
}

fn corrupt(e: EdgePdfError) -> ExtractError {
    let message = e.to_string();
    if message.to_ascii_lowercase().contains("encrypt") || message.to_ascii_lowercase().contains("password") {
        return ExtractError::Corrupt(format!("the PDF is encrypted: {message}"));
    }
    ExtractError::Corrupt(message)
}
