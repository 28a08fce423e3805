//! PPTX: slides in presentation order (`p:sldIdLst` through the relationships), one section per
//! slide. The title placeholder becomes the slide's `##` heading; body placeholders and
//! bulleted paragraphs become list items at their level; `a:tbl` frames become tables.

use quick_xml::Reader;
use quick_xml::events::Event;

use super::markdown::{Block, render};
use super::ooxml::{Package, attr, name, text_piece, utf8, xml_error};
use super::{DocFormat, ExtractError, Extracted, Limits, Section};

const KIND: &str = "PPTX";
const PRESENTATION: &str = "ppt/presentation.xml";

pub(crate) fn extract(bytes: &[u8], limits: Limits) -> Result<Extracted, ExtractError> {
    let mut pkg = Package::open(bytes, KIND)?;
    let presentation = pkg.required(PRESENTATION)?;
    let rels = pkg.relationships(PRESENTATION)?;
    let slide_ids = slide_rel_ids(utf8(KIND, PRESENTATION, &presentation)?)?;
    let pages = u32::try_from(slide_ids.len()).unwrap_or(u32::MAX);
    if pages > limits.max_pages {
        return Err(ExtractError::TooManyPages {
            pages,
            max: limits.max_pages,
        });
    }
    let mut sections = Vec::with_capacity(slide_ids.len());
    for (i, id) in slide_ids.iter().enumerate() {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let path = rels.get(id).ok_or_else(|| {
            ExtractError::Corrupt(format!("PPTX slide {number} has no part (relationship {id})"))
        })?;
        let xml = pkg.required(path)?;
        let (title, blocks) = slide(utf8(KIND, path, &xml)?, path)?;
        let heading = title.clone().unwrap_or_else(|| format!("Slide {number}"));
        let mut all = vec![Block::Heading(2, heading)];
        all.extend(blocks);
        sections.push(Section {
            title,
            page: Some(number),
            markdown: render(&all),
        });
    }
    Ok(Extracted::from_sections(DocFormat::Pptx, sections, Some(pages)))
}

fn slide_rel_ids(xml: &str) -> Result<Vec<String>, ExtractError> {
    let mut reader = Reader::from_str(xml);
    let mut ids = Vec::new();
    loop {
        match reader
            .read_event()
            .map_err(|e| xml_error(KIND, PRESENTATION, &e))?
        {
            Event::Start(e) | Event::Empty(e) if name(&e) == "sldId" => ids.extend(relationship_id(&e)),
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(ids)
}

/// `r:id` of a `p:sldId` (its plain `id` attribute is the numeric slide id, not the relationship).
fn relationship_id(e: &quick_xml::events::BytesStart<'_>) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.0.ends_with(":id"))
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::default())
                .ok()
                .map(|v| v.into_owned())
        })
}

#[derive(Debug, Default)]
struct Shape {
    placeholder: Option<String>,
}

#[derive(Debug, Default)]
struct Para {
    level: u8,
    bullet: Option<bool>,
    no_bullet: bool,
    text: String,
}

#[derive(Debug, Default)]
struct Table {
    rows: Vec<Vec<String>>,
    row: Vec<String>,
    cell: String,
}

fn slide(xml: &str, path: &str) -> Result<(Option<String>, Vec<Block>), ExtractError> {
    let mut reader = Reader::from_str(xml);
    let mut title: Option<String> = None;
    let mut blocks = Vec::new();
    let mut shape: Option<Shape> = None;
    let mut para: Option<Para> = None;
    let mut table: Option<Table> = None;
    let mut in_text = false;
    let mut depth: usize = 0;
    loop {
        let event = reader.read_event().map_err(|e| xml_error(KIND, path, &e))?;
        match &event {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Eof if depth > 0 => return Err(super::docx::truncated(path)),
            _ => {}
        }
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let empty = matches!(event, Event::Empty(_));
                match name(e) {
                    "sp" if !empty => shape = Some(Shape::default()),
                    "ph" => {
                        if let Some(s) = shape.as_mut() {
                            s.placeholder = Some(attr(e, "type").unwrap_or_else(|| "obj".to_owned()));
                        }
                    }
                    "p" if !empty => para = Some(Para::default()),
                    "pPr" => {
                        if let Some(p) = para.as_mut() {
                            p.level = attr(e, "lvl").and_then(|v| v.parse().ok()).unwrap_or(0).min(8);
                        }
                    }
                    "buChar" | "buBlip" => para.iter_mut().for_each(|p| p.bullet = Some(false)),
                    "buAutoNum" => para.iter_mut().for_each(|p| p.bullet = Some(true)),
                    "buNone" => para.iter_mut().for_each(|p| p.no_bullet = true),
                    "t" if !empty => in_text = true,
                    "br" => para.iter_mut().for_each(|p| p.text.push(' ')),
                    "tbl" if !empty => table = Some(Table::default()),
                    _ => {}
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "sp" => shape = None,
                "p" => {
                    let Some(p) = para.take() else { continue };
                    let text = p.text.trim();
                    if text.is_empty() {
                        continue;
                    }
                    if let Some(t) = table.as_mut() {
                        if !t.cell.is_empty() {
                            t.cell.push(' ');
                        }
                        t.cell.push_str(text);
                        continue;
                    }
                    let placeholder = shape.as_ref().and_then(|s| s.placeholder.as_deref());
                    match placeholder {
                        Some("title" | "ctrTitle") => {
                            let t = title.get_or_insert_with(String::new);
                            if !t.is_empty() {
                                t.push(' ');
                            }
                            t.push_str(text);
                        }
                        _ => {
                            // Body and content placeholders are bulleted unless a paragraph
                            // says otherwise; free text boxes only when one says so.
                            let bulleted_by_default = matches!(placeholder, Some("body" | "obj"));
                            let text = text.to_owned();
                            let block = match p.bullet {
                                _ if p.no_bullet => Block::Paragraph(text),
                                Some(ordered) => Block::Item {
                                    level: p.level,
                                    ordered,
                                    text,
                                },
                                None if bulleted_by_default => Block::Item {
                                    level: p.level,
                                    ordered: false,
                                    text,
                                },
                                None => Block::Paragraph(text),
                            };
                            blocks.push(block);
                        }
                    }
                }
                "tc" => {
                    if let Some(t) = table.as_mut() {
                        let cell = std::mem::take(&mut t.cell);
                        t.row.push(cell);
                    }
                }
                "tr" => {
                    if let Some(t) = table.as_mut() {
                        let row = std::mem::take(&mut t.row);
                        t.rows.push(row);
                    }
                }
                "tbl" => {
                    if let Some(t) = table.take().filter(|t| !t.rows.is_empty()) {
                        blocks.push(Block::Table(t.rows));
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
    Ok((title, blocks))
}
