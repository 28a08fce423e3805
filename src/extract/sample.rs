//! Small sample documents of every format, built in code (feature `fake-upstream`): the
//! fixtures of the extraction tests and the inputs of the extraction benchmark. Each holds a
//! heading, a list and a table; the PDF has as many pages as asked.

use std::io::{Cursor, Write};

use pdf_cos::content::{Content, Operation};
use pdf_cos::{Document, Object, Stream, dictionary};
use zip::write::SimpleFileOptions;

/// A zip of `(name, content)` parts.
pub fn zip_parts(parts: &[(&str, String)]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, content) in parts {
        if out.start_file(*name, options).is_err() || out.write_all(content.as_bytes()).is_err() {
            return Vec::new();
        }
    }
    out.finish().map(Cursor::into_inner).unwrap_or_default()
}

const W: &str = r#"xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main""#;

fn w_para(style: Option<&str>, num: Option<(u32, u32)>, text: &str) -> String {
    let mut ppr = String::new();
    if let Some(s) = style {
        ppr.push_str(&format!(r#"<w:pStyle w:val="{s}"/>"#));
    }
    if let Some((id, lvl)) = num {
        ppr.push_str(&format!(
            r#"<w:numPr><w:ilvl w:val="{lvl}"/><w:numId w:val="{id}"/></w:numPr>"#
        ));
    }
    format!(r#"<w:p><w:pPr>{ppr}</w:pPr><w:r><w:t xml:space="preserve">{text}</w:t></w:r></w:p>"#)
}

fn w_table(rows: &[&[&str]]) -> String {
    let mut t = String::from("<w:tbl><w:tblPr/>");
    for row in rows {
        t.push_str("<w:tr>");
        for cell in *row {
            t.push_str(&format!("<w:tc><w:tcPr/>{}</w:tc>", w_para(None, None, cell)));
        }
        t.push_str("</w:tr>");
    }
    t.push_str("</w:tbl>");
    t
}

/// A DOCX: title, two heading-2 sections, a numbered and a bulleted list, a table, an entity.
pub fn docx() -> Vec<u8> {
    docx_with_paragraphs(0)
}

/// [`docx`] with `extra` more body paragraphs (for the benchmark).
pub fn docx_with_paragraphs(extra: usize) -> Vec<u8> {
    let mut body = String::new();
    body.push_str(&w_para(Some("Heading1"), None, "Coaching Plan"));
    body.push_str(&w_para(
        None,
        None,
        "This plan covers the next quarter &amp; beyond.",
    ));
    body.push_str(&w_para(Some("Heading2"), None, "Goals"));
    body.push_str(&w_para(
        Some("ListParagraph"),
        Some((1, 0)),
        "Run three times a week",
    ));
    body.push_str(&w_para(
        Some("ListParagraph"),
        Some((1, 1)),
        "Start with 20 minutes",
    ));
    body.push_str(&w_para(Some("ListParagraph"), Some((1, 0)), "Sleep eight hours"));
    body.push_str(&w_para(Some("ListParagraph"), Some((2, 0)), "Water"));
    body.push_str(&w_para(Some("ListParagraph"), Some((2, 0)), "Protein"));
    body.push_str(&w_para(Some("Heading2"), None, "Schedule"));
    body.push_str(&w_table(&[
        &["Day", "Activity", "Minutes"],
        &["Monday", "Run", "20"],
        &["Wednesday", "Swim", "30"],
    ]));
    for i in 0..extra {
        body.push_str(&w_para(None, None, &format!("Paragraph {i}: notes from the session about progress and the next steps agreed with the client.")));
    }
    let document = format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document {W}><w:body>{body}<w:sectPr/></w:body></w:document>"#
    );
    let styles = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><w:styles {W}><w:style w:type="paragraph" w:styleId="Heading1"><w:name w:val="heading 1"/></w:style><w:style w:type="paragraph" w:styleId="Heading2"><w:name w:val="heading 2"/></w:style><w:style w:type="paragraph" w:styleId="ListParagraph"><w:name w:val="List Paragraph"/></w:style></w:styles>"#
    );
    let numbering = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><w:numbering {W}><w:abstractNum w:abstractNumId="10"><w:lvl w:ilvl="0"><w:numFmt w:val="decimal"/></w:lvl><w:lvl w:ilvl="1"><w:numFmt w:val="bullet"/></w:lvl></w:abstractNum><w:abstractNum w:abstractNumId="20"><w:lvl w:ilvl="0"><w:numFmt w:val="bullet"/></w:lvl></w:abstractNum><w:num w:numId="1"><w:abstractNumId w:val="10"/></w:num><w:num w:numId="2"><w:abstractNumId w:val="20"/></w:num></w:numbering>"#
    );
    let content_types = r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/><Override PartName="/word/styles.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.styles+xml"/><Override PartName="/word/numbering.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.numbering+xml"/></Types>"#;
    let rels = r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#;
    let doc_rels = r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/styles" Target="styles.xml"/><Relationship Id="rId2" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/numbering" Target="numbering.xml"/></Relationships>"#;
    zip_parts(&[
        ("[Content_Types].xml", content_types.to_owned()),
        ("_rels/.rels", rels.to_owned()),
        ("word/_rels/document.xml.rels", doc_rels.to_owned()),
        ("word/document.xml", document),
        ("word/styles.xml", styles),
        ("word/numbering.xml", numbering),
    ])
}

const P_NS: &str = r#"xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships" xmlns:p="http://schemas.openxmlformats.org/presentationml/2006/main""#;

fn p_shape(placeholder: Option<&str>, paras: &[(u8, &str)]) -> String {
    let ph = match placeholder {
        Some("obj") => r#"<p:ph idx="1"/>"#.to_owned(),
        Some(t) => format!(r#"<p:ph type="{t}"/>"#),
        None => String::new(),
    };
    let mut body = String::new();
    for (lvl, text) in paras {
        body.push_str(&format!(
            r#"<a:p><a:pPr lvl="{lvl}"/><a:r><a:rPr lang="en-US"/><a:t>{text}</a:t></a:r></a:p>"#
        ));
    }
    format!(
        r#"<p:sp><p:nvSpPr><p:cNvPr id="2" name="s"/><p:cNvSpPr/><p:nvPr>{ph}</p:nvPr></p:nvSpPr><p:spPr/><p:txBody><a:bodyPr/>{body}</p:txBody></p:sp>"#
    )
}

fn p_table(rows: &[&[&str]]) -> String {
    let mut t = String::from(
        r#"<p:graphicFrame><p:nvGraphicFramePr><p:cNvPr id="4" name="t"/><p:cNvGraphicFramePr/><p:nvPr/></p:nvGraphicFramePr><p:xfrm/><a:graphic><a:graphicData uri="http://schemas.openxmlformats.org/drawingml/2006/table"><a:tbl><a:tblGrid/>"#,
    );
    for row in rows {
        t.push_str(r#"<a:tr h="370840">"#);
        for cell in *row {
            t.push_str(&format!(r#"<a:tc><a:txBody><a:bodyPr/><a:p><a:r><a:t>{cell}</a:t></a:r></a:p></a:txBody><a:tcPr/></a:tc>"#));
        }
        t.push_str("</a:tr>");
    }
    t.push_str("</a:tbl></a:graphicData></a:graphic></p:graphicFrame>");
    t
}

fn p_slide(shapes: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><p:sld {P_NS}><p:cSld><p:spTree><p:nvGrpSpPr><p:cNvPr id="1" name=""/><p:cNvGrpSpPr/><p:nvPr/></p:nvGrpSpPr><p:grpSpPr/>{shapes}</p:spTree></p:cSld></p:sld>"#
    )
}

/// A PPTX of three slides: a title slide, a bulleted agenda with a sub-level, and a table.
/// The slide files are numbered against presentation order, so order must come from the list.
pub fn pptx() -> Vec<u8> {
    pptx_with_slides(0)
}

/// [`pptx`] with `extra` more bulleted slides (for the benchmark).
pub fn pptx_with_slides(extra: usize) -> Vec<u8> {
    let mut slides = vec![
        p_slide(
            &(p_shape(Some("ctrTitle"), &[(0, "Kickoff")])
                + &p_shape(Some("subTitle"), &[(0, "Spring programme")])),
        ),
        p_slide(
            &(p_shape(Some("title"), &[(0, "Agenda")])
                + &p_shape(
                    Some("obj"),
                    &[
                        (0, "Introductions"),
                        (1, "Coach and client"),
                        (0, "Goals for the quarter"),
                    ],
                )),
        ),
        p_slide(
            &(p_shape(Some("title"), &[(0, "Numbers")])
                + &p_table(&[&["Metric", "Target"], &["Sessions", "12"], &["Check-ins", "24"]])),
        ),
    ];
    for i in 0..extra {
        slides.push(p_slide(
            &(p_shape(Some("title"), &[(0, &format!("Topic {i}"))])
                + &p_shape(
                    Some("body"),
                    &[
                        (0, "First point to discuss"),
                        (1, "Detail"),
                        (0, "Second point to discuss"),
                    ],
                )),
        ));
    }
    let n = slides.len();
    // Slide k of the presentation is stored as slide file n+1-k.
    let mut ids = String::new();
    let mut rels = String::new();
    let mut overrides = String::new();
    let mut parts = Vec::new();
    for (k, slide) in slides.into_iter().enumerate() {
        let file = n - k;
        ids.push_str(&format!(r#"<p:sldId id="{}" r:id="rId{}"/>"#, 256 + k, k + 10));
        rels.push_str(&format!(r#"<Relationship Id="rId{}" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/slide" Target="slides/slide{file}.xml"/>"#, k + 10));
        overrides.push_str(&format!(r#"<Override PartName="/ppt/slides/slide{file}.xml" ContentType="application/vnd.openxmlformats-officedocument.presentationml.slide+xml"/>"#));
        parts.push((format!("ppt/slides/slide{file}.xml"), slide));
    }
    let presentation = format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><p:presentation {P_NS}><p:sldIdLst>{ids}</p:sldIdLst><p:sldSz cx="9144000" cy="6858000"/></p:presentation>"#
    );
    let pres_rels = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{rels}</Relationships>"#
    );
    let content_types = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/ppt/presentation.xml" ContentType="application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml"/>{overrides}</Types>"#
    );
    let root_rels = r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="ppt/presentation.xml"/></Relationships>"#;
    let mut all: Vec<(&str, String)> = vec![
        ("[Content_Types].xml", content_types),
        ("_rels/.rels", root_rels.to_owned()),
        ("ppt/presentation.xml", presentation),
        ("ppt/_rels/presentation.xml.rels", pres_rels),
    ];
    all.extend(parts.iter().map(|(name, xml)| (name.as_str(), xml.clone())));
    zip_parts(&all)
}

fn x_sheet(rows: &[Vec<String>]) -> String {
    let mut data = String::new();
    for (r, row) in rows.iter().enumerate() {
        data.push_str(&format!(r#"<row r="{}">"#, r + 1));
        for (c, cell) in row.iter().enumerate() {
            let col = char::from(b'A' + u8::try_from(c % 26).unwrap_or(0));
            let at = format!("{col}{}", r + 1);
            if cell.parse::<f64>().is_ok() {
                data.push_str(&format!(r#"<c r="{at}"><v>{cell}</v></c>"#));
            } else {
                data.push_str(&format!(
                    r#"<c r="{at}" t="inlineStr"><is><t>{cell}</t></is></c>"#
                ));
            }
        }
        data.push_str("</row>");
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>{data}</sheetData></worksheet>"#
    )
}

/// An XLSX of two sheets, "Clients" (a header and two rows) and "Sessions".
pub fn xlsx() -> Vec<u8> {
    xlsx_with_rows(0)
}

/// [`xlsx`] with `extra` more rows on "Sessions" (for the benchmark).
pub fn xlsx_with_rows(extra: usize) -> Vec<u8> {
    let s = |v: &[&str]| v.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>();
    let clients = vec![
        s(&["Name", "Goal", "Sessions"]),
        s(&["Ada", "Run 10k", "12"]),
        s(&["Grace", "Sleep better", "8"]),
    ];
    let mut sessions = vec![s(&["Date", "Client", "Minutes"]), s(&["2026-01-05", "Ada", "45"])];
    for i in 0..extra {
        sessions.push(vec![
            format!("2026-02-{:02}", i % 28 + 1),
            "Grace".to_owned(),
            (30 + i % 30).to_string(),
        ]);
    }
    let workbook = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets><sheet name="Clients" sheetId="1" r:id="rId1"/><sheet name="Sessions" sheetId="2" r:id="rId2"/></sheets></workbook>"#;
    let wb_rels = r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/><Relationship Id="rId2" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet2.xml"/></Relationships>"#;
    let content_types = r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/><Override PartName="/xl/worksheets/sheet2.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>"#;
    let root_rels = r#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>"#;
    zip_parts(&[
        ("[Content_Types].xml", content_types.to_owned()),
        ("_rels/.rels", root_rels.to_owned()),
        ("xl/workbook.xml", workbook.to_owned()),
        ("xl/_rels/workbook.xml.rels", wb_rels.to_owned()),
        ("xl/worksheets/sheet1.xml", x_sheet(&clients)),
        ("xl/worksheets/sheet2.xml", x_sheet(&sessions)),
    ])
}

/// An HTML page with a heading, a list, a table and a script that must not show.
pub fn html() -> Vec<u8> {
    br#"<!DOCTYPE html><html><head><title>t</title><style>p{color:red}</style></head><body>
<h1>Session Notes</h1><p>Met with the client on Monday.</p>
<h2>Actions</h2><ul><li>Book the next session</li><li>Send the plan</li></ul>
<ol><li>First</li><li>Second</li></ol>
<table><thead><tr><th>Item</th><th>Owner</th></tr></thead><tbody><tr><td>Plan</td><td>Coach</td></tr></tbody></table>
<script>alert("x")</script></body></html>"#
        .to_vec()
}

/// A Markdown text with two top-level sections.
pub fn markdown() -> Vec<u8> {
    b"# Intake\n\nFirst meeting.\n\n## Goals\n\n- Run\n- Sleep\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
        .to_vec()
}

fn text_op(ops: &mut Vec<Operation>, font: &str, size: i64, x: i64, y: i64, text: &str) {
    ops.push(Operation::new("BT", vec![]));
    ops.push(Operation::new("Tf", vec![font.into(), size.into()]));
    ops.push(Operation::new("Td", vec![x.into(), y.into()]));
    ops.push(Operation::new("Tj", vec![Object::string_literal(text)]));
    ops.push(Operation::new("ET", vec![]));
}

fn line_op(ops: &mut Vec<Operation>, x1: i64, y1: i64, x2: i64, y2: i64) {
    ops.push(Operation::new("m", vec![x1.into(), y1.into()]));
    ops.push(Operation::new("l", vec![x2.into(), y2.into()]));
    ops.push(Operation::new("S", vec![]));
}

/// A PDF of `pages` pages (at least 2), each with a running header and a page number: page 1
/// a 24 pt heading, a paragraph and a numbered list; page 2 a heading and a ruled 3×3 table;
/// further pages a heading and twenty lines of text.
pub fn pdf(pages: usize) -> Vec<u8> {
    let pages = pages.max(2);
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let regular =
        doc.add_object(dictionary! {"Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica"});
    let bold =
        doc.add_object(dictionary! {"Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica-Bold"});
    let resources = doc.add_object(dictionary! {"Font" => dictionary! {"F1" => regular, "F2" => bold}});
    let mut kids: Vec<Object> = Vec::new();
    for page in 1..=pages {
        let mut ops = Vec::new();
        // A running header and a page number, as real reports have: not content.
        text_op(
            &mut ops,
            "F1",
            9,
            72,
            760,
            "Coaching Programme - Quarterly Report",
        );
        text_op(&mut ops, "F1", 9, 300, 40, &format!("{page}"));
        match page {
            1 => {
                text_op(&mut ops, "F2", 24, 72, 720, "Quarterly Report");
                text_op(
                    &mut ops,
                    "F1",
                    11,
                    72,
                    690,
                    "This report summarises the coaching programme for the quarter.",
                );
                text_op(&mut ops, "F1", 11, 72, 660, "1. Collect the session data");
                text_op(
                    &mut ops,
                    "F1",
                    11,
                    72,
                    645,
                    "2. Review the results with the client",
                );
                text_op(&mut ops, "F1", 11, 72, 630, "3. Agree on the next goals");
            }
            2 => {
                text_op(&mut ops, "F2", 24, 72, 720, "Results");
                let rows = [
                    ["Client", "Sessions", "Score"],
                    ["Ada", "12", "9"],
                    ["Grace", "8", "7"],
                ];
                let (left, top, w, h) = (72, 680, 150, 24);
                ops.push(Operation::new("w", vec![1.into()]));
                for r in 0..=3 {
                    line_op(&mut ops, left, top - r * h, left + 3 * w, top - r * h);
                }
                for c in 0..=3 {
                    line_op(&mut ops, left + c * w, top, left + c * w, top - 3 * h);
                }
                for (r, row) in rows.iter().enumerate() {
                    for (c, cell) in row.iter().enumerate() {
                        let (r, c) = (r as i64, c as i64);
                        text_op(&mut ops, "F1", 11, left + c * w + 6, top - (r + 1) * h + 8, cell);
                    }
                }
            }
            n => {
                text_op(&mut ops, "F2", 24, 72, 720, &format!("Progress Notes {n}"));
                for i in 0..20 {
                    text_op(
                        &mut ops,
                        "F1",
                        11,
                        72,
                        690 - i * 15,
                        &format!(
                            "Line {i} of page {n}: notes on progress, obstacles and the plan for next week."
                        ),
                    );
                }
            }
        }
        let content = Content { operations: ops }.encode().unwrap_or_default();
        let content_id = doc.add_object(Stream::new(dictionary! {}, content));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "Contents" => content_id,
            "MediaBox" => vec![0.into(), 0.into(), 612.into(), 792.into()],
        });
        kids.push(page_id.into());
    }
    let count = i64::try_from(kids.len()).unwrap_or(0);
    doc.objects.insert(
        pages_id,
        Object::Dictionary(
            dictionary! {"Type" => "Pages", "Kids" => kids, "Count" => count, "Resources" => resources},
        ),
    );
    let catalog = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
    doc.trailer.set("Root", catalog);
    let mut out = Vec::new();
    if doc.save_to(&mut out).is_err() {
        return Vec::new();
    }
    out
}
