//! DOCX: `word/document.xml` read as a stream of paragraphs and tables. Headings come from
//! paragraph styles (`heading N`, `Title`, or an outline level, resolved through
//! `word/styles.xml`), list items from numbering (bullet or numbered, per `word/numbering.xml`),
//! tables from `w:tbl`; the Markdown is then split into heading sections.

use std::collections::HashMap;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::markdown::{Block, render, sections_by_headings};
use super::ooxml::{Package, attr, name, text_piece, utf8, xml_error};
use super::{DocFormat, ExtractError, Extracted};

const KIND: &str = "DOCX";
const DOCUMENT: &str = "word/document.xml";

pub(crate) fn extract(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let mut pkg = Package::open(bytes, KIND)?;
    let document = pkg.required(DOCUMENT)?;
    let styles = match pkg.part("word/styles.xml")? {
        Some(xml) => Styles::read(utf8(KIND, "word/styles.xml", &xml)?)?,
        None => Styles::default(),
    };
    let numbering = match pkg.part("word/numbering.xml")? {
        Some(xml) => Numbering::read(utf8(KIND, "word/numbering.xml", &xml)?)?,
        None => Numbering::default(),
    };
    let blocks = blocks(utf8(KIND, DOCUMENT, &document)?, &styles, &numbering)?;
    let markdown = render(&blocks);
    let sections = sections_by_headings(&markdown);
    Ok(Extracted {
        markdown,
        sections,
        pages: None,
        format: DocFormat::Docx,
    })
}

/// What a paragraph style means for Markdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StyleKind {
    Heading(u8),
    Bullet,
    Numbered,
}

#[derive(Debug, Default)]
struct Styles(HashMap<String, StyleKind>);

impl Styles {
    fn read(xml: &str) -> Result<Self, ExtractError> {
        let mut reader = Reader::from_str(xml);
        let mut map = HashMap::new();
        let mut current: Option<(String, Option<StyleKind>)> = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| xml_error(KIND, "word/styles.xml", &e))?;
            match &event {
                Event::Start(e) if name(e) == "style" => current = attr(e, "styleId").map(|id| (id, None)),
                Event::Start(e) | Event::Empty(e) => {
                    if let Some((_, kind)) = current.as_mut() {
                        match name(e) {
                            "name" => {
                                let n = attr(e, "val").unwrap_or_default().to_ascii_lowercase();
                                *kind = kind.or_else(|| style_kind_from_name(&n));
                            }
                            "outlineLvl" => {
                                if let Some(level) = attr(e, "val")
                                    .and_then(|v| v.parse::<u8>().ok())
                                    .filter(|l| *l < 6)
                                {
                                    kind.get_or_insert(StyleKind::Heading(level + 1));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Event::End(e) if e.local_name().as_ref() == "style" => {
                    if let Some((id, Some(kind))) = current.take() {
                        map.insert(id, kind);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(Styles(map))
    }

    fn kind(&self, style_id: &str) -> Option<StyleKind> {
        self.0
            .get(style_id)
            .copied()
            .or_else(|| style_kind_from_name(&style_id.to_ascii_lowercase()))
    }
}

/// `heading 2` / `Heading2` → heading 2, `Title` → 1, `List Bullet` / `List Number` → items.
fn style_kind_from_name(name: &str) -> Option<StyleKind> {
    let compact: String = name.chars().filter(|c| !c.is_whitespace()).collect();
    if compact == "title" {
        return Some(StyleKind::Heading(1));
    }
    if let Some(n) = compact.strip_prefix("heading").and_then(|n| n.parse::<u8>().ok()) {
        return Some(StyleKind::Heading(n.clamp(1, 6)));
    }
    if compact.starts_with("listbullet") {
        return Some(StyleKind::Bullet);
    }
    if compact.starts_with("listnumber") {
        return Some(StyleKind::Numbered);
    }
    None
}

/// numId → (ilvl → ordered?), resolved through the abstract numberings.
#[derive(Debug, Default)]
struct Numbering(HashMap<String, HashMap<u8, bool>>);

impl Numbering {
    fn read(xml: &str) -> Result<Self, ExtractError> {
        let mut reader = Reader::from_str(xml);
        let mut abstracts: HashMap<String, HashMap<u8, bool>> = HashMap::new();
        let mut nums: HashMap<String, String> = HashMap::new();
        let mut abstract_id: Option<String> = None;
        let mut num_id: Option<String> = None;
        let mut level: Option<u8> = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| xml_error(KIND, "word/numbering.xml", &e))?;
            match &event {
                Event::Start(e) | Event::Empty(e) => match name(e) {
                    "abstractNum" => abstract_id = attr(e, "abstractNumId"),
                    "lvl" => level = attr(e, "ilvl").and_then(|v| v.parse().ok()),
                    "numFmt" => {
                        if let (Some(a), Some(l)) = (&abstract_id, level) {
                            let ordered = attr(e, "val").is_some_and(|v| v != "bullet" && v != "none");
                            abstracts.entry(a.clone()).or_default().insert(l, ordered);
                        }
                    }
                    "num" => num_id = attr(e, "numId"),
                    "abstractNumId" => {
                        if let (Some(n), Some(a)) = (&num_id, attr(e, "val")) {
                            nums.insert(n.clone(), a);
                        }
                    }
                    _ => {}
                },
                Event::End(e) if e.local_name().as_ref() == "abstractNum" => abstract_id = None,
                Event::Eof => break,
                _ => {}
            }
        }
        let map = nums
            .into_iter()
            .filter_map(|(n, a)| abstracts.get(&a).map(|l| (n, l.clone())))
            .collect();
        Ok(Numbering(map))
    }

    fn ordered(&self, num_id: &str, level: u8) -> bool {
        self.0
            .get(num_id)
            .and_then(|l| l.get(&level))
            .copied()
            .unwrap_or(false)
    }
}

#[derive(Debug, Default)]
struct Paragraph {
    style: Option<String>,
    outline: Option<u8>,
    num_id: Option<String>,
    level: u8,
    text: String,
}

#[derive(Debug, Default)]
struct Table {
    rows: Vec<Vec<String>>,
    row: Vec<String>,
    cell: String,
}

fn blocks(xml: &str, styles: &Styles, numbering: &Numbering) -> Result<Vec<Block>, ExtractError> {
    let mut reader = Reader::from_str(xml);
    let mut blocks = Vec::new();
    let mut para: Option<Paragraph> = None;
    // Nested tables are flattened into the cell of the outermost one.
    let mut tables: Vec<Table> = Vec::new();
    let mut in_text = false;
    let mut depth: usize = 0;
    loop {
        let event = reader.read_event().map_err(|e| xml_error(KIND, DOCUMENT, &e))?;
        match &event {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Eof if depth > 0 => return Err(truncated(DOCUMENT)),
            _ => {}
        }
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let empty = matches!(event, Event::Empty(_));
                match name(e) {
                    "p" if !empty => para = Some(Paragraph::default()),
                    "pStyle" => {
                        if let Some(p) = para.as_mut() {
                            p.style = attr(e, "val");
                        }
                    }
                    "outlineLvl" => {
                        if let Some(p) = para.as_mut() {
                            p.outline = attr(e, "val").and_then(|v| v.parse().ok());
                        }
                    }
                    "ilvl" => {
                        if let Some(p) = para.as_mut() {
                            p.level = attr(e, "val").and_then(|v| v.parse().ok()).unwrap_or(0).min(8);
                        }
                    }
                    "numId" => {
                        if let Some(p) = para.as_mut() {
                            p.num_id = attr(e, "val").filter(|v| v != "0");
                        }
                    }
                    "t" if !empty => in_text = true,
                    "tab" | "br" | "cr" => {
                        if let Some(p) = para.as_mut() {
                            p.text.push(' ');
                        }
                    }
                    "tbl" if !empty => tables.push(Table::default()),
                    _ => {}
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "p" => {
                    if let Some(p) = para.take() {
                        if let Some(table) = tables.last_mut() {
                            let text = p.text.trim();
                            if !text.is_empty() {
                                if !table.cell.is_empty() {
                                    table.cell.push(' ');
                                }
                                table.cell.push_str(text);
                            }
                        } else if let Some(block) = paragraph_block(p, styles, numbering) {
                            blocks.push(block);
                        }
                    }
                }
                "tc" => {
                    if let Some(t) = tables.last_mut() {
                        let cell = std::mem::take(&mut t.cell);
                        t.row.push(cell);
                    }
                }
                "tr" => {
                    if let Some(t) = tables.last_mut() {
                        let row = std::mem::take(&mut t.row);
                        t.rows.push(row);
                    }
                }
                "tbl" => {
                    if let Some(t) = tables.pop() {
                        let rows: Vec<Vec<String>> = t.rows;
                        if let Some(outer) = tables.last_mut() {
                            let flat = rows.iter().map(|r| r.join(" ")).collect::<Vec<_>>().join(" ");
                            outer.cell.push_str(&flat);
                        } else if !rows.is_empty() {
                            blocks.push(Block::Table(rows));
                        }
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            other if in_text => {
                if let (Some(p), Some(piece)) = (para.as_mut(), text_piece(other)) {
                    p.text.push_str(&piece);
                }
            }
            _ => {}
        }
    }
    Ok(blocks)
}

pub(crate) fn truncated(part: &str) -> ExtractError {
    ExtractError::Corrupt(format!("part {part} ends before its elements close (truncated?)"))
}

fn paragraph_block(p: Paragraph, styles: &Styles, numbering: &Numbering) -> Option<Block> {
    let text = p.text.trim().to_owned();
    if text.is_empty() {
        return None;
    }
    let style = p.style.as_deref().and_then(|s| styles.kind(s));
    if let Some(StyleKind::Heading(level)) = style {
        return Some(Block::Heading(level, text));
    }
    if let Some(level) = p.outline.filter(|l| *l < 6) {
        return Some(Block::Heading(level + 1, text));
    }
    if let Some(num_id) = &p.num_id {
        return Some(Block::Item {
            level: p.level,
            ordered: numbering.ordered(num_id, p.level),
            text,
        });
    }
    match style {
        Some(StyleKind::Bullet) => Some(Block::Item {
            level: 0,
            ordered: false,
            text,
        }),
        Some(StyleKind::Numbered) => Some(Block::Item {
            level: 0,
            ordered: true,
            text,
        }),
        _ => Some(Block::Paragraph(text)),
    }
}
