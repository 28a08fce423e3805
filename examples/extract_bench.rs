//! Benchmarks document extraction per format on the sample documents of `extract::sample`
//! (grown to realistic sizes): the parser alone on this thread (`extract::parse`), and the
//! whole isolated path (`Extractor::extract`: child process start, pipes, JSON reply).
//!
//! ```sh
//! cargo build --release --bin coachd && cargo run --release --example extract_bench
//! ```
//!
//! The child is `target/release/coachd` next to this example (or `COACHD_EXTRACT_EXECUTABLE`).
//! `BENCH_SECS` (default 3) is the time spent per format and path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coachd::extract::{DocFormat, ExtractSettings, Extractor, Isolation, Limits, parse, sample};

struct Case {
    name: &'static str,
    format: DocFormat,
    bytes: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let html = {
        let one = String::from_utf8(sample::html()).unwrap_or_default();
        let body = one
            .split("<body>")
            .nth(1)
            .unwrap_or_default()
            .replace("</body></html>", "");
        format!("<!DOCTYPE html><html><body>{}</body></html>", body.repeat(200)).into_bytes()
    };
    let markdown = sample::markdown().repeat(500);
    vec![
        Case {
            name: "pdf, 50 pages",
            format: DocFormat::Pdf,
            bytes: sample::pdf(50),
        },
        Case {
            name: "pdf, 3 pages",
            format: DocFormat::Pdf,
            bytes: sample::pdf(3),
        },
        Case {
            name: "docx, 2000 paragraphs",
            format: DocFormat::Docx,
            bytes: sample::docx_with_paragraphs(2_000),
        },
        Case {
            name: "pptx, 50 slides",
            format: DocFormat::Pptx,
            bytes: sample::pptx_with_slides(47),
        },
        Case {
            name: "xlsx, 5000 rows",
            format: DocFormat::Xlsx,
            bytes: sample::xlsx_with_rows(5_000),
        },
        Case {
            name: "html, 200 copies",
            format: DocFormat::Html,
            bytes: html,
        },
        Case {
            name: "markdown, 500 copies",
            format: DocFormat::Markdown,
            bytes: markdown,
        },
    ]
}

struct Run {
    docs: u32,
    elapsed: Duration,
    pages: Option<u32>,
    sections: usize,
}

fn report(case: &Case, path: &str, run: &Run) {
    let secs = run.elapsed.as_secs_f64();
    let docs_s = f64::from(run.docs) / secs;
    let mb_s = case.bytes.len() as f64 * f64::from(run.docs) / secs / 1e6;
    let pages_s = run
        .pages
        .map_or_else(|| "-".to_owned(), |p| format!("{:.1}", f64::from(p) * docs_s));
    println!(
        "{:<22} {:<9} {:>8.1} {:>6} {:>8} {:>9.2} {:>9.2} {:>9} {:>9.1}",
        case.name,
        path,
        case.bytes.len() as f64 / 1024.0,
        run.docs,
        run.pages.map_or(run.sections as u32, |p| p),
        docs_s,
        mb_s,
        pages_s,
        secs * 1000.0 / f64::from(run.docs),
    );
}

fn executable() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("COACHD_EXTRACT_EXECUTABLE") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.parent()?.join("coachd");
    candidate.exists().then_some(candidate)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let budget = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    );
    let exe = executable();
    println!(
        "extraction benchmark: {} s per format and path; child: {}",
        budget.as_secs(),
        exe.as_ref().map_or(
            "not found (run cargo build --release --bin coachd)".to_owned(),
            |p| p.display().to_string()
        )
    );
    println!(
        "{:<22} {:<9} {:>8} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "document", "path", "KiB", "docs", "pages*", "docs/s", "MB/s", "pages/s", "ms/doc"
    );
    let limits = Limits::default();
    for case in cases() {
        // The parser alone.
        let started = Instant::now();
        let mut run = Run {
            docs: 0,
            elapsed: Duration::ZERO,
            pages: None,
            sections: 0,
        };
        while started.elapsed() < budget || run.docs == 0 {
            let e = parse(&case.bytes, case.format, limits)?;
            run.pages = e.pages;
            run.sections = e.sections.len();
            run.docs += 1;
        }
        run.elapsed = started.elapsed();
        report(&case, "parse", &run);

        // The isolated path, one child per document.
        let Some(exe) = exe.clone() else { continue };
        let extractor = Extractor::new(ExtractSettings {
            isolation: Isolation::Process {
                executable: Some(exe),
            },
            ..ExtractSettings::default()
        });
        let bytes = Bytes::from(case.bytes.clone());
        let started = Instant::now();
        let mut run = Run {
            docs: 0,
            elapsed: Duration::ZERO,
            pages: None,
            sections: 0,
        };
        while started.elapsed() < budget || run.docs == 0 {
            let e = extractor.extract(bytes.clone(), case.format).await?;
            run.pages = e.pages;
            run.sections = e.sections.len();
            run.docs += 1;
        }
        run.elapsed = started.elapsed();
        report(&case, "isolated", &run);
    }
    println!("* pages for PDF and PPTX, sections for the others");
    Ok(())
}
