//! What the DOCX and PPTX readers share: the zip package, its parts read under a size bound,
//! relationship files, and the text of XML elements.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use zip::ZipArchive;

use super::ExtractError;

/// Most bytes one part may inflate to: a zip bomb stops here rather than at the memory limit.
const MAX_PART_BYTES: u64 = 256 << 20;

/// An opened OOXML package.
pub(crate) struct Package<'a> {
    zip: ZipArchive<Cursor<&'a [u8]>>,
    kind: &'static str,
}

impl<'a> Package<'a> {
    /// Opens the zip; `kind` ("DOCX") names the format in error messages.
    pub(crate) fn open(bytes: &'a [u8], kind: &'static str) -> Result<Self, ExtractError> {
        let zip = ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| ExtractError::Corrupt(format!("not a {kind} file (bad zip: {e})")))?;
        Ok(Package { zip, kind })
    }

    /// A part's bytes, or `None` when the package has no such part.
    pub(crate) fn part(&mut self, name: &str) -> Result<Option<Vec<u8>>, ExtractError> {
        let kind = self.kind;
        let file = match self.zip.by_name(name) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(ExtractError::Corrupt(format!("{kind} part {name}: {e}"))),
        };
        let mut out = Vec::new();
        file.take(MAX_PART_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| ExtractError::Corrupt(format!("{kind} part {name}: {e}")))?;
        if out.len() as u64 > MAX_PART_BYTES {
            return Err(ExtractError::Corrupt(format!(
                "{kind} part {name} inflates past {MAX_PART_BYTES} bytes"
            )));
        }
        Ok(Some(out))
    }

    /// A part that must be there.
    pub(crate) fn required(&mut self, name: &str) -> Result<Vec<u8>, ExtractError> {
        let kind = self.kind;
        self.part(name)?
            .ok_or_else(|| ExtractError::Corrupt(format!("not a {kind} file (no {name})")))
    }

    /// The relationships of a part (`ppt/presentation.xml` → `ppt/_rels/presentation.xml.rels`):
    /// id → target, resolved against the part's folder.
    pub(crate) fn relationships(&mut self, part: &str) -> Result<HashMap<String, String>, ExtractError> {
        let (dir, file) = part.rsplit_once('/').unwrap_or(("", part));
        let rels_name = if dir.is_empty() {
            format!("_rels/{file}.rels")
        } else {
            format!("{dir}/_rels/{file}.rels")
        };
        let Some(xml) = self.part(&rels_name)? else {
            return Ok(HashMap::new());
        };
        let mut reader = Reader::from_str(utf8(self.kind, &rels_name, &xml)?);
        let mut map = HashMap::new();
        loop {
            match reader.read_event() {
                Ok(Event::Start(e) | Event::Empty(e)) if name(&e) == "Relationship" => {
                    if let (Some(id), Some(target)) = (attr(&e, "Id"), attr(&e, "Target")) {
                        map.insert(id, resolve(dir, &target));
                    }
                }
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => return Err(xml_error(self.kind, &rels_name, &e)),
            }
        }
        Ok(map)
    }
}

/// A target path relative to `dir` (`slides/slide1.xml` from `ppt`, or `../media/x` or `/abs`).
fn resolve(dir: &str, target: &str) -> String {
    if let Some(abs) = target.strip_prefix('/') {
        return abs.to_owned();
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for seg in target.split('/') {
        match seg {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// An element's local name (namespace prefixes differ between producers).
pub(crate) fn name<'e>(e: &'e BytesStart<'_>) -> &'e str {
    let full: &str = e.name().0;
    full.rsplit_once(':').map_or(full, |(_, local)| local)
}

/// An attribute's value by local name.
pub(crate) fn attr(e: &BytesStart<'_>, local: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| {
            let key: &str = a.key.0;
            key.rsplit_once(':').map_or(key, |(_, l)| l) == local
        })
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::default())
                .ok()
                .map(|v| v.into_owned())
        })
}

/// The text an event adds: character data, CDATA, or a resolved entity reference.
pub(crate) fn text_piece(event: &Event<'_>) -> Option<String> {
    match event {
        Event::Text(t) => Some(t.xml10_content().into_owned()),
        Event::CData(c) => Some(c.to_string()),
        Event::GeneralRef(r) => {
            if r.is_char_ref() {
                r.resolve_char_ref().ok().flatten().map(String::from)
            } else {
                quick_xml::escape::resolve_predefined_entity(r).map(str::to_owned)
            }
        }
        _ => None,
    }
}

/// A part's XML as text (OOXML parts are UTF-8, with or without a BOM).
pub(crate) fn utf8<'b>(kind: &str, part: &str, bytes: &'b [u8]) -> Result<&'b str, ExtractError> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|_| ExtractError::Corrupt(format!("{kind} part {part} is not UTF-8")))
}

pub(crate) fn xml_error(kind: &str, part: &str, e: &dyn std::fmt::Display) -> ExtractError {
    ExtractError::Corrupt(format!("{kind} part {part} is not well-formed XML: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relationship_targets() {
        assert_eq!(resolve("ppt", "slides/slide1.xml"), "ppt/slides/slide1.xml");
        assert_eq!(resolve("ppt/slides", "../media/a.png"), "ppt/media/a.png");
        assert_eq!(resolve("word", "/word/numbering.xml"), "word/numbering.xml");
    }
}
