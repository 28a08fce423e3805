//! XLSX through `calamine`: one section per sheet, each sheet's used range as a Markdown table
//! whose first row is the header.

use std::io::Cursor;

use calamine::{Data, Reader, Xlsx};

use super::markdown::table;
use super::{DocFormat, ExtractError, Extracted, Section};

pub(crate) fn extract(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let mut book: Xlsx<_> = Xlsx::new(Cursor::new(bytes))
        .map_err(|e| ExtractError::Corrupt(format!("cannot open the workbook: {e}")))?;
    let mut sections = Vec::new();
    for name in book.sheet_names() {
        let range = book
            .worksheet_range(&name)
            .map_err(|e| ExtractError::Corrupt(format!("cannot read sheet {name:?}: {e}")))?;
        let rows: Vec<Vec<String>> = range
            .rows()
            .map(|row| row.iter().map(cell).collect::<Vec<_>>())
            .filter(|row| row.iter().any(|c| !c.is_empty()))
            .collect();
        let mut markdown = format!("## {name}");
        if !rows.is_empty() {
            markdown.push_str("\n\n");
            table(&mut markdown, &rows);
        }
        sections.push(Section {
            title: Some(name),
            page: None,
            markdown,
        });
    }
    Ok(Extracted::from_sections(DocFormat::Xlsx, sections, None))
}

fn cell(data: &Data) -> String {
    match data {
        Data::Empty => String::new(),
        Data::Error(e) => format!("#{e:?}"),
        // Whole numbers print without ".0"; everything else as calamine formats it.
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
        other => other.to_string(),
    }
}
