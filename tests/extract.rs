//! Document extraction through the real child process (`coachd __extract`): every format's
//! Markdown structure, bad input as typed errors, and parsers that panic, abort, hang or
//! exhaust memory failing one extraction while the caller goes on. The docling-serve client
//! runs against a stand-in written from docling-serve's documented async API (no real
//! docling-serve runs here).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use coachd::extract::{DocFormat, ExtractError, ExtractSettings, Extracted, Extractor, Isolation, sample};
use coachd::secret::{Secret, ServiceUrl};

fn settings() -> ExtractSettings {
    ExtractSettings {
        isolation: Isolation::Process {
            executable: Some(PathBuf::from(env!("CARGO_BIN_EXE_coachd"))),
        },
        timeout: Duration::from_secs(30),
        ..ExtractSettings::default()
    }
}

async fn extract(bytes: Vec<u8>, format: DocFormat) -> Result<Extracted, ExtractError> {
    Extractor::new(settings())
        .extract(Bytes::from(bytes), format)
        .await
}

fn lines(md: &str) -> Vec<&str> {
    md.lines().collect()
}

#[tokio::test]
async fn pdf_keeps_pages_headings_lists_and_the_table() {
    let e = extract(sample::pdf(3), DocFormat::Pdf).await.unwrap();
    assert_eq!(e.format, DocFormat::Pdf);
    assert_eq!(e.pages, Some(3));
    let pages: Vec<_> = e.sections.iter().map(|s| s.page).collect();
    assert_eq!(pages, [Some(1), Some(2), Some(3)]);
    let p1 = &e.sections[0].markdown;
    assert!(
        lines(p1)
            .iter()
            .any(|l| l.starts_with('#') && l.contains("Quarterly Report")),
        "{p1}"
    );
    assert_eq!(e.sections[0].title.as_deref(), Some("Quarterly Report"));
    for item in [
        "Collect the session data",
        "Review the results with the client",
        "Agree on the next goals",
    ] {
        assert!(
            lines(p1).iter().any(|l| l.contains(item)
                && (l.starts_with("1.")
                    || l.starts_with("2.")
                    || l.starts_with("3.")
                    || l.starts_with("- "))),
            "{item} in {p1}"
        );
    }
    let p2 = &e.sections[1].markdown;
    assert!(
        lines(p2)
            .iter()
            .any(|l| l.starts_with('#') && l.contains("Results")),
        "{p2}"
    );
    assert!(
        lines(p2).iter().any(|l| l.starts_with('|')
            && l.contains("Client")
            && l.contains("Sessions")
            && l.contains("Score")),
        "{p2}"
    );
    assert!(
        lines(p2)
            .iter()
            .any(|l| l.starts_with('|') && l.contains("Ada") && l.contains("12")),
        "{p2}"
    );
    // Page 3's text is there; its running header and page number are not. (edgeparse also
    // takes page 3's top heading for a running header: a known gap, see README.)
    let p3 = &e.sections[2].markdown;
    assert!(
        p3.contains("Line 0 of page 3") && p3.contains("Line 19 of page 3"),
        "{p3}"
    );
    assert!(
        !e.markdown.contains("Coaching Programme - Quarterly Report"),
        "{}",
        e.markdown
    );
    // Reading order: page 1's paragraph comes before its list.
    let summary = p1.find("summarises").unwrap();
    assert!(summary < p1.find("Collect the session data").unwrap());
    assert!(e.markdown.starts_with(p1.as_str()));
}

#[tokio::test]
async fn docx_keeps_headings_nested_lists_tables_and_sections() {
    let e = extract(sample::docx(), DocFormat::Docx).await.unwrap();
    let md = &e.markdown;
    let l = lines(md);
    for expected in [
        "# Coaching Plan",
        "This plan covers the next quarter & beyond.",
        "## Goals",
        "1. Run three times a week",
        "   - Start with 20 minutes",
        "2. Sleep eight hours",
        "- Water",
        "- Protein",
        "## Schedule",
        "| Day | Activity | Minutes |",
        "| --- | --- | --- |",
        "| Monday | Run | 20 |",
    ] {
        assert!(l.contains(&expected), "{expected:?} missing in\n{md}");
    }
    let titles: Vec<_> = e.sections.iter().map(|s| s.title.as_deref()).collect();
    assert_eq!(titles, [Some("Coaching Plan"), Some("Goals"), Some("Schedule")]);
    assert_eq!(e.pages, None);
}

#[tokio::test]
async fn pptx_gives_one_section_per_slide_in_presentation_order() {
    let e = extract(sample::pptx(), DocFormat::Pptx).await.unwrap();
    assert_eq!(e.pages, Some(3));
    let titles: Vec<_> = e.sections.iter().map(|s| (s.page, s.title.as_deref())).collect();
    assert_eq!(
        titles,
        [
            (Some(1), Some("Kickoff")),
            (Some(2), Some("Agenda")),
            (Some(3), Some("Numbers"))
        ]
    );
    assert_eq!(
        lines(&e.sections[0].markdown),
        ["## Kickoff", "", "Spring programme"]
    );
    assert_eq!(
        lines(&e.sections[1].markdown),
        [
            "## Agenda",
            "",
            "- Introductions",
            "   - Coach and client",
            "- Goals for the quarter"
        ]
    );
    assert!(
        e.sections[2]
            .markdown
            .contains("| Metric | Target |\n| --- | --- |\n| Sessions | 12 |")
    );
}

#[tokio::test]
async fn xlsx_gives_one_table_per_sheet() {
    let e = extract(sample::xlsx(), DocFormat::Xlsx).await.unwrap();
    let titles: Vec<_> = e.sections.iter().map(|s| s.title.as_deref()).collect();
    assert_eq!(titles, [Some("Clients"), Some("Sessions")]);
    assert_eq!(
        e.sections[0].markdown,
        "## Clients\n\n| Name | Goal | Sessions |\n| --- | --- | --- |\n| Ada | Run 10k | 12 |\n| Grace | Sleep better | 8 |"
    );
    assert!(e.markdown.contains("| 2026-01-05 | Ada | 45 |"));
}

#[tokio::test]
async fn html_becomes_markdown_without_scripts() {
    let e = extract(sample::html(), DocFormat::Html).await.unwrap();
    let md = &e.markdown;
    let l = lines(md);
    assert!(l.contains(&"# Session Notes"), "{md}");
    assert!(l.contains(&"## Actions"), "{md}");
    assert!(
        l.iter()
            .any(|x| x.ends_with("Book the next session") && x.trim_start().starts_with(['-', '*'])),
        "{md}"
    );
    assert!(
        l.iter()
            .any(|x| x.trim_start().starts_with("1.") && x.ends_with("First")),
        "{md}"
    );
    assert!(
        l.iter()
            .any(|x| x.starts_with('|') && x.contains("Item") && x.contains("Owner")),
        "{md}"
    );
    assert!(!md.contains("alert") && !md.contains("color:red"), "{md}");
    let titles: Vec<_> = e.sections.iter().map(|s| s.title.as_deref()).collect();
    assert_eq!(titles, [Some("Session Notes"), Some("Actions")]);
}

#[tokio::test]
async fn markdown_and_text_pass_through() {
    let e = extract(sample::markdown(), DocFormat::Markdown).await.unwrap();
    assert_eq!(e.sections.len(), 2);
    assert!(e.markdown.contains("| a | b |"));
    let t = extract(b"\xef\xbb\xbfline one\r\nline two\r\n".to_vec(), DocFormat::Text)
        .await
        .unwrap();
    assert_eq!(t.markdown, "line one\nline two");
    assert_eq!(t.sections.len(), 1);
}

#[tokio::test]
async fn corrupt_documents_are_corrupt_not_crashes() {
    for (bytes, format) in [
        (b"%PDF-1.7\nthis is not a pdf at all".to_vec(), DocFormat::Pdf),
        (b"hello".to_vec(), DocFormat::Pdf),
        (b"PK\x03\x04 definitely not a zip".to_vec(), DocFormat::Docx),
        (
            sample::zip_parts(&[("hello.txt", "hi".to_owned())]),
            DocFormat::Docx,
        ),
        (
            sample::zip_parts(&[("word/document.xml", "<w:document><w:body><w:p>".to_owned())]),
            DocFormat::Docx,
        ),
        (b"garbage".to_vec(), DocFormat::Pptx),
        (b"garbage".to_vec(), DocFormat::Xlsx),
    ] {
        let err = extract(bytes, format).await.unwrap_err();
        assert!(matches!(err, ExtractError::Corrupt(_)), "{format}: {err:?}");
        assert_eq!(err.code(), "corrupt");
        assert!(!err.is_retryable());
    }
    // A truncated PDF (the first half of a good one) also fails cleanly, whichever way.
    let pdf = sample::pdf(3);
    let err = extract(pdf[..pdf.len() / 2].to_vec(), DocFormat::Pdf)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExtractError::Corrupt(_) | ExtractError::NoText { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn unsupported_uploads_are_refused_by_type() {
    let extractor = Extractor::new(settings());
    let err = extractor
        .extract_upload(
            Bytes::from_static(b"\x89PNG\r\n\x1a\n"),
            Some("image/png"),
            Some("face.png"),
        )
        .await
        .unwrap_err();
    assert_eq!(err, ExtractError::Unsupported("image/png".to_owned()));
    let ok = extractor
        .extract_upload(Bytes::from(sample::docx()), None, Some("plan.docx"))
        .await
        .unwrap();
    assert_eq!(ok.format, DocFormat::Docx);
}

#[tokio::test]
async fn size_and_page_limits_are_enforced() {
    let small = Extractor::new(ExtractSettings {
        max_bytes: 100,
        ..settings()
    });
    let err = small
        .extract(Bytes::from(sample::docx()), DocFormat::Docx)
        .await
        .unwrap_err();
    assert!(matches!(err, ExtractError::TooLarge { max: 100, .. }), "{err:?}");

    let few_pages = Extractor::new(ExtractSettings {
        max_pages: 3,
        ..settings()
    });
    let err = few_pages
        .extract(Bytes::from(sample::pdf(5)), DocFormat::Pdf)
        .await
        .unwrap_err();
    assert_eq!(err, ExtractError::TooManyPages { pages: 5, max: 3 });
    let err = few_pages
        .extract(Bytes::from(sample::pptx_with_slides(2)), DocFormat::Pptx)
        .await
        .unwrap_err();
    assert_eq!(err, ExtractError::TooManyPages { pages: 5, max: 3 });

    let short = Extractor::new(ExtractSettings {
        max_output_bytes: 1_024,
        ..settings()
    });
    let err = short
        .extract(Bytes::from(vec![b'a'; 4_096]), DocFormat::Text)
        .await
        .unwrap_err();
    assert_eq!(err, ExtractError::OutputTooLarge { max: 1_024 });
}

fn fault(kind: &str) -> Bytes {
    Bytes::from(format!("%coachd-test-fault:{kind}\n"))
}

#[tokio::test]
async fn a_panicking_or_aborting_parser_is_a_crash_and_the_caller_goes_on() {
    let extractor = Extractor::new(settings());
    let err = extractor
        .extract(fault("panic"), DocFormat::Text)
        .await
        .unwrap_err();
    match &err {
        ExtractError::Crashed(m) => assert!(m.contains("panicked") && m.contains("test fault"), "{m}"),
        other => panic!("{other:?}"),
    }
    let err = extractor
        .extract(fault("abort"), DocFormat::Text)
        .await
        .unwrap_err();
    match &err {
        ExtractError::Crashed(m) => assert!(m.contains("signal 6"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), "crashed");
    let ok = extractor
        .extract(Bytes::from(sample::docx()), DocFormat::Docx)
        .await
        .unwrap();
    assert!(ok.markdown.contains("# Coaching Plan"));
}

#[tokio::test]
async fn a_hanging_parser_times_out_and_is_killed() {
    let extractor = Extractor::new(ExtractSettings {
        timeout: Duration::from_secs(2),
        ..settings()
    });
    for kind in ["hang", "spin"] {
        let started = std::time::Instant::now();
        let err = extractor.extract(fault(kind), DocFormat::Text).await.unwrap_err();
        assert_eq!(err, ExtractError::Timeout { secs: 2 }, "{kind}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{kind} took {:?}",
            started.elapsed()
        );
    }
    let ok = extractor
        .extract(Bytes::from(sample::xlsx()), DocFormat::Xlsx)
        .await
        .unwrap();
    assert_eq!(ok.sections.len(), 2);
}

#[tokio::test]
async fn a_parser_that_eats_memory_hits_the_limit() {
    let extractor = Extractor::new(ExtractSettings {
        max_memory_mb: 512,
        ..settings()
    });
    let err = extractor
        .extract(fault("alloc"), DocFormat::Text)
        .await
        .unwrap_err();
    match &err {
        ExtractError::Crashed(m) => assert!(m.contains("memory allocation"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The same limit leaves room for a real document, the PDF parser's thread pool included.
    let ok = extractor
        .extract(Bytes::from(sample::pdf(3)), DocFormat::Pdf)
        .await
        .unwrap();
    assert_eq!(ok.pages, Some(3));
}

#[tokio::test]
async fn in_process_isolation_still_types_a_panic() {
    let extractor = Extractor::new(ExtractSettings {
        isolation: Isolation::InProcess,
        ..settings()
    });
    let err = extractor
        .extract(fault("panic"), DocFormat::Text)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ExtractError::Crashed(m) if m.contains("test fault")),
        "{err:?}"
    );
    let ok = extractor
        .extract(Bytes::from(sample::pptx()), DocFormat::Pptx)
        .await
        .unwrap();
    assert_eq!(ok.pages, Some(3));
}

#[tokio::test]
async fn a_missing_parser_executable_is_retryable() {
    let extractor = Extractor::new(ExtractSettings {
        isolation: Isolation::Process {
            executable: Some(PathBuf::from("/nonexistent/coachd")),
        },
        ..settings()
    });
    let err = extractor
        .extract(Bytes::from_static(b"hi"), DocFormat::Text)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "internal");
    assert!(err.is_retryable());
}

mod docling_stand_in {
    //! A stand-in for docling-serve's async API, to the documented wire format: it checks what
    //! coachd sends and answers pending, then success, then the result.

    use super::*;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::{Value, json};

    #[derive(Clone, Default)]
    struct Seen {
        polls: Arc<AtomicU32>,
        fail: bool,
    }

    const KEY: &str = "docling-key";

    fn authorised(h: &HeaderMap) -> bool {
        h.get("x-api-key").and_then(|v| v.to_str().ok()) == Some(KEY)
    }

    /// The substring of a multipart body after `marker`, up to the next boundary line.
    fn part_after<'a>(body: &'a str, marker: &str) -> Option<&'a str> {
        let start = body.find(marker)? + marker.len();
        let rest = &body[start..];
        let value = &rest[rest.find("\r\n\r\n")? + 4..];
        Some(&value[..value.find("\r\n--")?])
    }

    async fn submit(headers: HeaderMap, body: Bytes) -> (StatusCode, Json<Value>) {
        if !authorised(&headers) {
            return (StatusCode::UNAUTHORIZED, Json(json!({"detail": "bad key"})));
        }
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("multipart/form-data; boundary="),
            "{content_type}"
        );
        let body = String::from_utf8_lossy(&body);
        let file = part_after(&body, r#"name="files"; filename="document.pdf""#).expect("a files part");
        assert!(file.starts_with("%PDF-"));
        assert_eq!(part_after(&body, r#"name="to_formats""#), Some("md"));
        assert!(part_after(&body, r#"name="md_page_break_placeholder""#).is_some());
        (
            StatusCode::OK,
            Json(json!({"task_id": "t-1", "task_status": "pending", "task_position": 1, "task_meta": null})),
        )
    }

    async fn poll(State(seen): State<Seen>, headers: HeaderMap, Path(id): Path<String>) -> Json<Value> {
        assert!(authorised(&headers));
        assert_eq!(id, "t-1");
        let n = seen.polls.fetch_add(1, Ordering::SeqCst);
        let status = match (n, seen.fail) {
            (0, _) => "started",
            (_, true) => "failure",
            _ => "success",
        };
        Json(json!({"task_id": id, "task_status": status, "task_position": null, "task_meta": null}))
    }

    async fn result(State(seen): State<Seen>, headers: HeaderMap, Path(_id): Path<String>) -> Json<Value> {
        assert!(authorised(&headers));
        if seen.fail {
            return Json(json!({"document": {"md_content": null}, "status": "failure",
                "errors": [{"component_type": "doc_backend", "module_name": "pdf", "error_message": "Input document is not valid."}],
                "processing_time": 0.1, "timings": {}}));
        }
        Json(json!({
            "document": {"filename": "document.pdf", "md_content": "## Report\n\nfirst page\n\n<!-- coachd:page-break -->\n\n| a | b |\n|---|---|\n| 1 | 2 |",
                "json_content": null, "html_content": null, "text_content": null, "doctags_content": null},
            "status": "success", "errors": [], "processing_time": 0.5, "timings": {}
        }))
    }

    /// The stand-in's task, aborted when the test ends.
    struct Server(tokio::task::JoinHandle<()>);

    impl Drop for Server {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    async fn serve(fail: bool) -> (String, Seen, Server) {
        let seen = Seen {
            fail,
            ..Seen::default()
        };
        let app = Router::new()
            .route("/v1/convert/file/async", post(submit))
            .route("/v1/status/poll/{id}", get(poll))
            .route("/v1/result/{id}", get(result))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), seen, Server(task))
    }

    fn docling(url: &str) -> Extractor {
        Extractor::new(ExtractSettings {
            docling_serve_url: Some(ServiceUrl::new(url::Url::parse(url).unwrap())),
            docling_serve_api_key: Some(Secret::new(KEY)),
            docling_poll_interval: Duration::from_millis(10),
            ..settings()
        })
    }

    #[tokio::test]
    async fn documents_go_through_submit_poll_and_result() {
        let (url, seen, _server) = serve(false).await;
        let e = docling(&url)
            .extract(Bytes::from(sample::pdf(2)), DocFormat::Pdf)
            .await
            .unwrap();
        assert_eq!(e.pages, Some(2));
        assert_eq!(e.sections[0].title.as_deref(), Some("Report"));
        assert_eq!(e.sections[1].page, Some(2));
        assert!(e.sections[1].markdown.starts_with("| a | b |"));
        assert!(seen.polls.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_failed_conversion_is_corrupt_with_docling_message() {
        let (url, _, _server) = serve(true).await;
        let err = docling(&url)
            .extract(Bytes::from(sample::pdf(2)), DocFormat::Pdf)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ExtractError::Corrupt(m) if m.contains("Input document is not valid")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_docling_serve_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = docling(&url)
            .extract(Bytes::from(sample::pdf(2)), DocFormat::Pdf)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "unavailable");
        assert!(err.is_retryable());
    }
}

/// Processes whose command line holds `needle` (a marker passed as an argument).
fn processes_with(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&&b"__extract"[..]) && args.contains(&needle.as_bytes())
        })
        .count()
}

#[tokio::test]
async fn dropping_the_extraction_kills_the_child() {
    // An unusual page limit marks this test's child among the others running in parallel.
    let marker = "987654";
    let extractor = Extractor::new(ExtractSettings {
        max_pages: marker.parse().unwrap(),
        ..settings()
    });
    // Boxed, so that `drop` below ends the future itself (a pinned local would live on).
    let mut work = Box::pin(extractor.extract(fault("hang"), DocFormat::Text));
    let appeared = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while processes_with(marker) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        processes_with(marker) > 0
    };
    tokio::select! {
        done = &mut work => panic!("the hang finished: {done:?}"),
        seen = appeared => assert!(seen, "the child never showed up in /proc"),
    }
    drop(work);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while processes_with(marker) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child outlived its extraction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// extract_parse target: a PDF whose page names itself as its parent sends the PDF reader into
/// endless recursion (a stack overflow, or with an unlimited stack, gigabytes). In the child it
/// is a typed failure within the limits (today `crashed`: the child aborts on the stack
/// overflow), and the next document extracts.
#[tokio::test]
async fn a_pdf_page_that_is_its_own_parent_is_a_typed_failure_and_the_caller_goes_on() {
    let extractor = Extractor::new(settings());
    let pdf = include_bytes!("data/fuzz/pdf-page-its-own-parent.pdf");
    let err = extractor
        .extract(Bytes::from_static(pdf), DocFormat::Pdf)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ExtractError::Crashed(_) | ExtractError::Corrupt(_) | ExtractError::Timeout { .. }
        ),
        "{err:?}"
    );
    let ok = extractor
        .extract(Bytes::from(sample::docx()), DocFormat::Docx)
        .await
        .unwrap();
    assert!(ok.markdown.contains("# Coaching Plan"));
}
