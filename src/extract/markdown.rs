//! The Markdown every reader writes: a small block model (headings, paragraphs, list items,
//! tables) rendered one way, and the split of a Markdown text into heading sections.

use super::Section;

/// One block of a document, as the OOXML readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Block {
    /// `#`-heading of level 1..=6.
    Heading(u8, String),
    /// A paragraph.
    Paragraph(String),
    /// One list item: nesting level from 0, ordered or not.
    Item { level: u8, ordered: bool, text: String },
    /// Rows of cells; the first row is the header.
    Table(Vec<Vec<String>>),
}

/// Renders blocks as Markdown: blank lines between blocks, none between items of one list.
pub(crate) fn render(blocks: &[Block]) -> String {
    let mut out = String::new();
    let mut prev_item = false;
    let mut counters: Vec<u32> = Vec::new();
    for block in blocks {
        let is_item = matches!(block, Block::Item { .. });
        if !out.is_empty() {
            out.push_str(if is_item && prev_item { "\n" } else { "\n\n" });
        }
        if !is_item {
            counters.clear();
        }
        match block {
            Block::Heading(level, text) => {
                out.push_str(&"#".repeat(usize::from((*level).clamp(1, 6))));
                out.push(' ');
                out.push_str(&one_line(text));
            }
            Block::Paragraph(text) => out.push_str(&escape_start(text.trim())),
            Block::Item { level, ordered, text } => {
                let level = usize::from(*level);
                counters.truncate(level + 1);
                counters.resize(level + 1, 0);
                counters[level] += 1;
                out.push_str(&"   ".repeat(level));
                if *ordered {
                    out.push_str(&format!("{}. ", counters[level]));
                } else {
                    out.push_str("- ");
                }
                out.push_str(&one_line(text));
            }
            Block::Table(rows) => table(&mut out, rows),
        }
        prev_item = is_item;
    }
    out
}

/// A Markdown pipe table; ragged rows are padded, cells lose their line breaks and pipes.
pub(crate) fn table(out: &mut String, rows: &[Vec<String>]) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push('|');
        for c in 0..width {
            let cell = row
                .get(c)
                .map(|s| one_line(s).replace('|', "\\|"))
                .unwrap_or_default();
            out.push(' ');
            out.push_str(&cell);
            out.push_str(" |");
        }
        if i == 0 {
            out.push_str("\n|");
            for _ in 0..width {
                out.push_str(" --- |");
            }
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A paragraph that happens to start like Markdown syntax (`# `, `- `, `1. `) stays a paragraph.
fn escape_start(text: &str) -> String {
    let starts_like_syntax = text.starts_with('#')
        || text.starts_with("- ")
        || text.starts_with("* ")
        || text.starts_with("+ ")
        || text.starts_with('>')
        || text.starts_with('|')
        || text
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if starts_like_syntax {
        format!("\\{text}")
    } else {
        text.to_owned()
    }
}

/// The heading text and level of an ATX heading line (`## Title`), if it is one.
pub(crate) fn heading(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.bytes().take_while(|b| *b == b'#').count();
    let rest = &trimmed[level..];
    if !(1..=6).contains(&level) || !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    Some((level, rest.trim().trim_end_matches('#').trim_end()))
}

/// Splits Markdown into sections at headings of level 1 and 2 (outside code fences); text
/// before the first one is a section without a title.
pub(crate) fn sections_by_headings(markdown: &str) -> Vec<Section> {
    let mut sections = Vec::new();
    let mut title: Option<String> = None;
    let mut current = String::new();
    let mut fence: Option<&str> = None;
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(f) = fence {
            if t.starts_with(f) {
                fence = None;
            }
        } else if t.starts_with("```") || t.starts_with("~~~") {
            fence = Some(&t[..3]);
        } else if let Some((level, text)) = heading(line).filter(|(l, _)| *l <= 2) {
            let _ = level;
            push_section(&mut sections, title.take(), &current);
            current.clear();
            title = Some(text.to_owned());
        }
        current.push_str(line);
        current.push('\n');
    }
    push_section(&mut sections, title, &current);
    sections
}

fn push_section(sections: &mut Vec<Section>, title: Option<String>, markdown: &str) {
    let markdown = markdown.trim();
    if markdown.is_empty() && title.is_none() {
        return;
    }
    sections.push(Section {
        title,
        page: None,
        markdown: markdown.to_owned(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_headings_lists_and_tables() {
        let md = render(&[
            Block::Heading(1, "Plan".into()),
            Block::Item {
                level: 0,
                ordered: true,
                text: "one".into(),
            },
            Block::Item {
                level: 1,
                ordered: false,
                text: "sub".into(),
            },
            Block::Item {
                level: 0,
                ordered: true,
                text: "two".into(),
            },
            Block::Table(vec![vec!["a".into(), "b|c".into()], vec!["1".into()]]),
            Block::Paragraph("# not a heading".into()),
        ]);
        assert_eq!(
            md,
            "# Plan\n\n1. one\n   - sub\n2. two\n\n| a | b\\|c |\n| --- | --- |\n| 1 |  |\n\n\\# not a heading"
        );
    }

    #[test]
    fn splits_at_top_headings_but_not_inside_fences() {
        let s = sections_by_headings("intro\n# One\ntext\n### deep\n```\n# code\n```\n## Two\nmore");
        let titles: Vec<_> = s.iter().map(|s| s.title.as_deref()).collect();
        assert_eq!(titles, [None, Some("One"), Some("Two")]);
        assert!(s[1].markdown.contains("# code"));
        assert_eq!(heading("#hashtag"), None);
        assert_eq!(heading("## Two ##"), Some((2, "Two")));
    }
}
