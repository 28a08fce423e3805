//! The job API under `/api/v1/jobs` (an API key on every route; a JWT user sees and acts on their
//! own jobs only, others' answer 404) and the monitor page at `/jobs/board`:
//! submit (multipart upload or JSON with inline text; never a URL to fetch), read, result, list,
//! cancel, progress events as SSE (`id:` = seq, `Last-Event-ID` replay, ends with the final
//! status), and per-queue stats.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::{ApiCaller, Caller};
use crate::error::{Error, ErrorBody};
use crate::extract::DocFormat;
use crate::jobs::analyze::AnalyzeOptions;
use crate::jobs::transcription;
use crate::jobs::{Job, JobEvent, JobFilter, JobInput, JobKind, JobStatus, NewJob, Upload};
use crate::routes::validate::Id;
use crate::routes::{JsonBody, QueryParams, sse_response};
use crate::session::SessionHandle;
use crate::session::event::JobUpdate;
use crate::state::AppState;
use crate::transcribe::AudioFormat;
use futures::StreamExt;

/// Bytes a multipart body may carry on top of its file: the other fields and the part headers.
const MULTIPART_OVERHEAD: usize = 1 << 20;

/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// The OpenAPI description of these routes (merged in `routes::docs`).
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(submit, show, result, list, cancel, events, stats))]
pub struct JobsDoc;

/// The job routes.
pub fn router(max_upload_bytes: usize) -> axum::Router<AppState> {
    let limit = max_upload_bytes.saturating_add(MULTIPART_OVERHEAD);
    axum::Router::new()
        .route(
            "/api/v1/jobs",
            post(submit).get(list).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/api/v1/jobs/stats", get(stats))
        .route("/api/v1/jobs/{id}", get(show))
        .route("/api/v1/jobs/{id}/result", get(result))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/events", get(events))
        .route("/jobs/board", get(board))
}

/// `POST /api/v1/jobs` as JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitRequest {
    kind: String,
    #[serde(default)]
    user_id: Option<String>,
    coach_id: String,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// Kinds to run after `kind`, each on the previous one's output, as one chain.
    #[serde(default)]
    then: Vec<String>,
}

fn job_id(raw: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(raw).map_err(|_| Error::NotFound("job".to_owned()))
}

/// A job the caller may see; 404 for a missing job and for another user's.
async fn visible(state: &AppState, caller: &Caller, id: Uuid) -> Result<Job, Error> {
    let job = state
        .jobs
        .get(id)
        .await?
        .ok_or_else(|| Error::NotFound("job".to_owned()))?;
    if caller.user_id().is_some_and(|own| own != job.user_id) {
        return Err(Error::NotFound("job".to_owned()));
    }
    Ok(job)
}

fn kind_of(state: &AppState, name: &str) -> Result<JobKind, Error> {
    let allowed: Vec<&str> = JobKind::ALL
        .into_iter()
        .filter(|k| submittable(state, *k))
        .map(JobKind::as_str)
        .collect();
    match JobKind::parse(name) {
        Some(k) if submittable(state, k) => Ok(k),
        _ => Err(Error::bad_request(
            "unsupported_kind",
            format!("unsupported job kind {name:?}; supported: {}", allowed.join(", ")),
        )),
    }
}

fn submittable(state: &AppState, kind: JobKind) -> bool {
    match kind {
        JobKind::Analyze | JobKind::Transcribe | JobKind::Extract => true,
        JobKind::Noop => state.settings.jobs.enable_noop,
        JobKind::Chain => false,
    }
}

/// Kinds that take text as input, so they can follow another step in a chain.
fn takes_text(kind: JobKind) -> bool {
    matches!(kind, JobKind::Analyze | JobKind::Noop)
}

#[utoipa::path(
    post, path = "/api/v1/jobs", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    description = "Submits a job: JSON {kind, user_id, coach_id, text?, options?, idempotency_key?, session_id?, then?} or multipart/form-data with the same fields and one `file` part. Kinds: analyze, transcribe, extract (and chains through `then`). URLs are never fetched.",
    responses(
        (status = 202, description = "The job, queued (Location: /api/v1/jobs/{id})"),
        (status = 200, description = "The user's job of the same idempotency key"),
        (status = 400, description = "Unsupported kind or type, missing or invalid input, bad multipart", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "A JWT user submitting for another user", body = ErrorBody),
        (status = 413, description = "Upload over the limit", body = ErrorBody),
    )
)]
async fn submit(
    State(state): State<AppState>,
    caller: ApiCaller,
    headers: HeaderMap,
    req: Request,
) -> Response {
    match submit_inner(&state, &caller.0, &headers, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn submit_inner(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: Request,
) -> Result<Response, Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (request, upload) = if content_type.starts_with("multipart/form-data") {
        read_multipart(state, req).await?
    } else {
        let JsonBody(r) = JsonBody::<SubmitRequest>::from_request(req, state).await?;
        (r, None)
    };
    let header_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let job = validate(state, caller, request, header_key, upload.as_ref())?;
    let session = match &job.job.session_id {
        Some(sid) => {
            // Wherever the session lives: on another node the handle is this node's relay, and
            // the job events go to the owner as commands.
            let session = crate::routes::realtime::live(state, caller, sid).await?;
            if *session.user_id != job.job.user_id || *session.coach_id != job.job.coach_id {
                return Err(Error::bad_request(
                    "session_mismatch",
                    "session_id belongs to another user or coach",
                ));
            }
            Some(session)
        }
        None => None,
    };
    let submitted = state
        .jobs
        .submit(job.job, if job.chain.is_none() { upload.clone() } else { None })
        .await?;
    if let (Some(mut step), true) = (job.chain, submitted.created) {
        step.parent_id = Some(submitted.job.id);
        if let Err(e) = state.jobs.submit(step, upload).await {
            let error = crate::jobs::JobError::transient(
                "store_unavailable",
                "the chain's first step could not be queued",
            );
            let _ = state.jobs.fail(submitted.job.id, &error).await;
            return Err(e.into());
        }
    }
    if let (Some(session), true) = (session, submitted.created) {
        let relay = relay_to_session(state.clone(), session, submitted.job.id, submitted.job.kind);
        state.tasks.spawn(relay);
    }
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/api/v1/jobs/{}", submitted.job.id);
    let mut body = serde_json::to_value(&submitted.job).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut body {
        m.insert("created".to_owned(), Value::Bool(submitted.created));
    }
    let mut response = (status, Json(body)).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// A validated submission: the job, and for a chain the first step to record under it.
struct Validated {
    job: NewJob,
    chain: Option<NewJob>,
}

fn validate(
    state: &AppState,
    caller: &Caller,
    r: SubmitRequest,
    header_key: Option<String>,
    upload: Option<&Upload>,
) -> Result<Validated, Error> {
    let js = &state.settings.jobs;
    let kind = kind_of(state, r.kind.trim())?;
    let user_id = match r.user_id {
        Some(u) => Id::parse(u)
            .map_err(|_| {
                Error::bad_request(
                    "invalid_field",
                    "user_id must be 1 to 256 bytes without control characters",
                )
            })?
            .into_string(),
        None => caller
            .user_id()
            .map(str::to_owned)
            .ok_or_else(|| Error::bad_request("missing_field", "user_id is required"))?,
    };
    caller.authorize_user(&user_id)?;
    let coach_id = Id::parse(r.coach_id)
        .map_err(|_| {
            Error::bad_request(
                "invalid_field",
                "coach_id must be 1 to 256 bytes without control characters",
            )
        })?
        .into_string();
    let session_id = match r.session_id {
        Some(s) => Some(
            Id::parse(s)
                .map_err(|_| Error::bad_request("invalid_field", "session_id is not a valid id"))?
                .into_string(),
        ),
        None => None,
    };
    let idempotency_key = r.idempotency_key.or(header_key);
    if let Some(k) = &idempotency_key
        && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || k.chars().any(char::is_control))
    {
        return Err(Error::bad_request(
            "invalid_field",
            format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes without control characters"),
        ));
    }
    let options = match r.options {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            return Err(Error::bad_request(
                "invalid_options",
                "options must be a JSON object",
            ));
        }
    };
    let mut steps = Vec::with_capacity(r.then.len());
    for name in &r.then {
        let k = kind_of(state, name.trim())?;
        if !takes_text(k) {
            return Err(Error::bad_request(
                "invalid_chain",
                format!("{} cannot follow another step: it does not take text", k.as_str()),
            ));
        }
        steps.push(k);
    }
    if steps.len() > 8 {
        return Err(Error::bad_request("invalid_chain", "a chain has at most 9 steps"));
    }
    let chain_kinds: Vec<JobKind> = std::iter::once(kind).chain(steps.iter().copied()).collect();
    if let Value::Object(map) = &options {
        for name in map.keys() {
            if !chain_kinds.iter().any(|k| k.options().contains(&name.as_str())) {
                let known: Vec<&str> = chain_kinds
                    .iter()
                    .flat_map(|k| k.options().iter().copied())
                    .collect();
                return Err(Error::bad_request(
                    "invalid_options",
                    format!("unknown option {name:?}; this job reads: {}", known.join(", ")),
                ));
            }
        }
    }
    if chain_kinds.contains(&JobKind::Analyze) {
        AnalyzeOptions::parse(&options).map_err(|m| Error::bad_request("invalid_options", m))?;
    }
    if kind == JobKind::Transcribe {
        transcription::options(&options).map_err(|m| Error::bad_request("invalid_options", m))?;
        if r.text.is_some() {
            return Err(Error::bad_request(
                "invalid_input",
                "transcribe takes an audio file, not text",
            ));
        }
        let upload = upload.ok_or_else(|| {
            Error::bad_request(
                "missing_input",
                "transcribe needs an audio file (multipart field file)",
            )
        })?;
        check_audio_upload(state, upload)?;
    }
    if kind == JobKind::Extract {
        if r.text.is_some() {
            return Err(Error::bad_request(
                "invalid_input",
                "extract takes a document file, not text",
            ));
        }
        let upload = upload.ok_or_else(|| {
            Error::bad_request("missing_input", "extract needs a document (multipart field file)")
        })?;
        check_document_upload(state, upload)?;
    }
    if let Some(text) = &r.text {
        if text.trim().is_empty() {
            return Err(Error::bad_request("empty_text", "text must not be empty"));
        }
        if text.chars().count() > js.max_text_chars {
            return Err(Error::bad_request(
                "text_too_long",
                format!("text is longer than {} characters", js.max_text_chars),
            ));
        }
    }
    if r.text.is_some() && upload.is_some() {
        return Err(Error::bad_request(
            "invalid_input",
            "send text or a file, not both",
        ));
    }
    if kind == JobKind::Analyze {
        match upload {
            None if r.text.is_none() => {
                return Err(Error::bad_request(
                    "missing_input",
                    "analyze needs text or a text file",
                ));
            }
            Some(u) => check_text_upload(u)?,
            None => {}
        }
    }
    let input = JobInput {
        text: r.text,
        steps: Vec::new(),
        step: None,
        source: None,
    };
    let new = |kind: JobKind, input: JobInput, key: Option<String>| NewJob {
        id: Uuid::now_v7(),
        kind,
        user_id: user_id.clone(),
        coach_id: coach_id.clone(),
        session_id: session_id.clone(),
        options: options.clone(),
        input,
        idempotency_key: key,
        parent_id: None,
        max_attempts: js.max_attempts_of(kind),
    };
    if steps.is_empty() {
        return Ok(Validated {
            job: new(kind, input, idempotency_key),
            chain: None,
        });
    }
    let count = u32::try_from(steps.len() + 1).unwrap_or(u32::MAX);
    let mut all = vec![kind];
    all.extend(&steps);
    let parent = new(
        JobKind::Chain,
        JobInput {
            steps: all,
            ..JobInput::default()
        },
        idempotency_key,
    );
    let first = new(
        kind,
        JobInput {
            steps,
            step: Some((0, count)),
            ..input
        },
        None,
    );
    Ok(Validated {
        job: parent,
        chain: Some(first),
    })
}

/// An uploaded recording must be one of the audio formats, non-empty and within the
/// transcription client's limit.
fn check_audio_upload(state: &AppState, u: &Upload) -> Result<(), Error> {
    if u.bytes.is_empty() {
        return Err(Error::bad_request("empty_file", "the uploaded file is empty"));
    }
    let limit = state.settings.transcribe.max_bytes;
    if u.bytes.len() > limit {
        return Err(Error::PayloadTooLarge { limit });
    }
    let head = &u.bytes[..u.bytes.len().min(64)];
    if AudioFormat::detect(u.content_type.as_deref(), u.filename.as_deref(), head).is_none() {
        return Err(Error::bad_request(
            "unsupported_type",
            "transcribe takes wav, mp3, m4a, webm, ogg or flac audio",
        ));
    }
    Ok(())
}

/// An uploaded document must be one of the formats `extract` reads, non-empty and within its limit.
fn check_document_upload(state: &AppState, u: &Upload) -> Result<(), Error> {
    if u.bytes.is_empty() {
        return Err(Error::bad_request("empty_file", "the uploaded file is empty"));
    }
    let limit = state.settings.extract.max_bytes;
    if u.bytes.len() > limit {
        return Err(Error::PayloadTooLarge { limit });
    }
    let head = &u.bytes[..u.bytes.len().min(4096)];
    if DocFormat::detect(u.content_type.as_deref(), u.filename.as_deref(), head).is_none() {
        return Err(Error::bad_request(
            "unsupported_type",
            "extract takes PDF, DOCX, PPTX, XLSX, HTML, Markdown or plain text",
        ));
    }
    Ok(())
}

/// An uploaded file for `analyze` must be UTF-8 text (documents go through `extract` first).
fn check_text_upload(u: &Upload) -> Result<(), Error> {
    let declared = u
        .content_type
        .as_deref()
        .unwrap_or("text/plain")
        .to_ascii_lowercase();
    let text_like = declared.starts_with("text/") || declared == "application/octet-stream";
    if !text_like {
        return Err(Error::bad_request(
            "unsupported_type",
            format!("analyze takes text files (text/plain, text/markdown), not {declared}"),
        ));
    }
    if u.bytes.is_empty() {
        return Err(Error::bad_request("empty_file", "the uploaded file is empty"));
    }
    if std::str::from_utf8(&u.bytes).is_err() {
        return Err(Error::bad_request(
            "invalid_text",
            "the uploaded file is not UTF-8 text",
        ));
    }
    Ok(())
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> Error {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge { limit }
    } else {
        Error::bad_request(
            "invalid_multipart",
            format!("cannot read the multipart body: {}", e.body_text()),
        )
    }
}

/// Reads a multipart submission: text fields named as the JSON fields (`options` as JSON text,
/// `then` comma-separated) and one `file` part, streamed and cut off at the upload limit.
async fn read_multipart(state: &AppState, req: Request) -> Result<(SubmitRequest, Option<Upload>), Error> {
    let limit = state.settings.jobs.max_upload_bytes;
    let mut mp = Multipart::from_request(req, state)
        .await
        .map_err(|e| Error::bad_request("invalid_multipart", e.body_text()))?;
    let mut r = SubmitRequest::default();
    let mut kind = None;
    let mut coach = None;
    let mut upload = None;
    while let Some(mut field) = mp.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if upload.is_some() {
                return Err(Error::bad_request("invalid_multipart", "send one file per job"));
            }
            let filename = field.file_name().map(str::to_owned);
            let content_type = field.content_type().map(str::to_owned);
            let mut buf = BytesMut::new();
            while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
                if buf.len() + chunk.len() > limit {
                    return Err(Error::PayloadTooLarge { limit });
                }
                buf.extend_from_slice(&chunk);
            }
            upload = Some(Upload {
                filename,
                content_type,
                bytes: Bytes::from(buf),
            });
            continue;
        }
        let value = field.text().await.map_err(|e| multipart_error(e, limit))?;
        match name.as_str() {
            "kind" => kind = Some(value),
            "user_id" => r.user_id = Some(value),
            "coach_id" => coach = Some(value),
            "session_id" => r.session_id = Some(value),
            "text" => r.text = Some(value),
            "idempotency_key" => r.idempotency_key = Some(value),
            "options" => {
                r.options = Some(serde_json::from_str(&value).map_err(|e| {
                    Error::bad_request("invalid_options", format!("options is not JSON: {e}"))
                })?)
            }
            "then" => {
                r.then = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            other => {
                return Err(Error::bad_request(
                    "invalid_multipart",
                    format!("unknown field {other:?}"),
                ));
            }
        }
    }
    r.kind = kind.ok_or_else(|| Error::bad_request("missing_field", "kind is required"))?;
    r.coach_id = coach.ok_or_else(|| Error::bad_request("missing_field", "coach_id is required"))?;
    Ok((r, upload))
}

#[utoipa::path(
    get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    params(("id" = String, Path, description = "Job id")),
    description = "Status, progress and stage, attempts, timestamps, last error; a chain lists its steps.",
    responses(
        (status = 200, description = "The job"),
        (status = 404, description = "No such job (or another user's)", body = ErrorBody),
    )
)]
async fn show(
    State(state): State<AppState>,
    caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let job = visible(&state, &caller.0, job_id(&id)?).await?;
    let mut body = serde_json::to_value(&job).unwrap_or(Value::Null);
    if job.kind == JobKind::Chain {
        let filter = JobFilter {
            parent_id: Some(job.id),
            limit: 100,
            ..JobFilter::default()
        };
        let (mut steps, _) = state.jobs.list(&filter).await?;
        steps.reverse();
        if let Value::Object(m) = &mut body {
            m.insert(
                "steps".to_owned(),
                serde_json::to_value(&steps).unwrap_or(Value::Null),
            );
        }
    }
    Ok(Json(body))
}

#[utoipa::path(
    get, path = "/api/v1/jobs/{id}/result", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "{job_id, kind, result}"),
        (status = 404, description = "No such job (or another user's)", body = ErrorBody),
        (status = 409, description = "Not finished, failed or cancelled", body = ErrorBody),
    )
)]
async fn result(
    State(state): State<AppState>,
    caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let job = visible(&state, &caller.0, job_id(&id)?).await?;
    match job.status {
        JobStatus::Succeeded => {
            let result = state.jobs.result(job.id).await?.unwrap_or(Value::Null);
            Ok(Json(
                json!({"job_id": job.id, "kind": job.kind, "result": result}),
            ))
        }
        JobStatus::Failed => Err(Error::Conflict {
            code: "job_failed",
            message: format!(
                "the job failed: {}",
                job.error.map(|e| e.message).unwrap_or_default()
            ),
        }),
        JobStatus::Cancelled => Err(Error::Conflict {
            code: "job_cancelled",
            message: "the job was cancelled".to_owned(),
        }),
        JobStatus::Queued | JobStatus::Running => Err(Error::Conflict {
            code: "job_not_finished",
            message: format!("the job is {}; its result is not ready", job.status.as_str()),
        }),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    user_id: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    parent_id: Option<Uuid>,
    limit: Option<usize>,
    offset: Option<usize>,
}

#[utoipa::path(
    get, path = "/api/v1/jobs", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    params(
        ("user_id" = Option<String>, Query, description = "Only this user's (a JWT user: only their own)"),
        ("kind" = Option<String>, Query, description = "Only this kind"),
        ("status" = Option<String>, Query, description = "queued, running, succeeded, failed or cancelled"),
        ("parent_id" = Option<String>, Query, description = "Only the steps of this chain"),
        ("limit" = Option<usize>, Query, description = "Page size, 1 to COACHD_JOBS_LIST_MAX (default 20)"),
        ("offset" = Option<usize>, Query, description = "Jobs skipped, newest first"),
    ),
    responses(
        (status = 200, description = "{jobs, total, limit, offset}"),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 403, description = "A JWT user asking for another user's jobs", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<AppState>,
    caller: ApiCaller,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Value>, Error> {
    let user_id = match (caller.0.user_id(), q.user_id) {
        (Some(own), Some(asked)) if own != asked => return Err(Error::Forbidden),
        (Some(own), _) => Some(own.to_owned()),
        (None, asked) => asked,
    };
    let kind = match q.kind.as_deref() {
        Some(k) => Some(
            JobKind::parse(k)
                .ok_or_else(|| Error::bad_request("invalid_query", format!("unknown kind {k:?}")))?,
        ),
        None => None,
    };
    let status = match q.status.as_deref() {
        Some(s) => Some(
            JobStatus::parse(s)
                .ok_or_else(|| Error::bad_request("invalid_query", format!("unknown status {s:?}")))?,
        ),
        None => None,
    };
    let max = state.settings.jobs.list_max;
    let limit = q.limit.unwrap_or(20.min(max));
    if limit == 0 || limit > max {
        return Err(Error::bad_request(
            "invalid_query",
            format!("limit must be 1 to {max}"),
        ));
    }
    let filter = JobFilter {
        user_id,
        kind,
        status,
        parent_id: q.parent_id,
        limit,
        offset: q.offset.unwrap_or(0),
    };
    let (jobs, total) = state.jobs.list(&filter).await?;
    Ok(Json(
        json!({"jobs": jobs, "total": total, "limit": filter.limit, "offset": filter.offset}),
    ))
}

#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    params(("id" = String, Path, description = "Job id")),
    description = "Stops a queued or running job (a chain step cancels its chain).",
    responses(
        (status = 200, description = "The job, cancelled"),
        (status = 404, description = "No such job (or another user's)", body = ErrorBody),
        (status = 409, description = "Already final", body = ErrorBody),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Job>, Error> {
    let job = visible(&state, &caller.0, job_id(&id)?).await?;
    if job.status.is_final() {
        return Err(Error::Conflict {
            code: "job_finished",
            message: format!("the job is already {}", job.status.as_str()),
        });
    }
    // A step is cancelled with its chain.
    let target = job.parent_id.unwrap_or(job.id);
    let filter = JobFilter {
        parent_id: Some(target),
        limit: 100,
        ..JobFilter::default()
    };
    let (steps, _) = state.jobs.list(&filter).await?;
    let after = state.jobs.cancel(target).await?;
    for s in steps.iter().map(|s| s.id).chain([target]) {
        state.job_runner.cancel_local(s);
    }
    let shown = if target == job.id {
        after
    } else {
        state.jobs.get(job.id).await?
    };
    shown.map(Json).ok_or_else(|| Error::NotFound("job".to_owned()))
}

/// An event of `/api/v1/jobs/{id}/events`, for the API description.
struct JobStreamEvent;

impl utoipa::PartialSchema for JobStreamEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::routes::docs::sse_events(&[(
            "job",
            json!({"type": "object", "required": ["seq", "job_id", "event", "status", "progress", "attempt", "at"],
            "properties": {
                "seq": {"type": "integer", "minimum": 1},
                "job_id": {"type": "string"},
                "event": {"enum": ["queued", "started", "progress", "retrying", "succeeded", "failed", "cancelled"]},
                "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "stage": {"type": ["string", "null"]},
                "attempt": {"type": "integer", "minimum": 0},
                "error": {"type": ["object", "null"]},
                "at": {"type": "string"},
            }}),
        )])
    }
}

impl utoipa::ToSchema for JobStreamEvent {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after_seq: Option<u64>,
}

#[utoipa::path(
    get, path = "/api/v1/jobs/{id}/events", tag = "jobs", security(("api_key" = []), ("api_key" = [], "jwt" = [])),
    params(
        ("id" = String, Path, description = "Job id"),
        ("after_seq" = Option<u64>, Query, description = "Replay after this seq (or send Last-Event-ID)"),
    ),
    description = "Server-sent events: `event: job`, `id:` = seq, data {seq, job_id, event, status, progress, stage, attempt, error?, at}; ends after the final status.",
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = JobStreamEvent),
        (status = 404, description = "No such job (or another user's)", body = ErrorBody),
    )
)]
async fn events(
    State(state): State<AppState>,
    caller: ApiCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<EventsQuery>,
) -> Result<Response, Error> {
    let job = visible(&state, &caller.0, job_id(&id)?).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let after = last_event_id.or(q.after_seq).unwrap_or(0);
    let poll = state.settings.jobs.events_poll;
    let heartbeat = state.settings.realtime.sse_heartbeat;
    let stream = job_events(state, job.id, after, poll);
    Ok(sse_response(stream, heartbeat))
}

/// The events of a job after `after`, then live ones, until the event of its final status (or
/// shutdown, or a store error, which ends the stream with it).
fn follow(
    state: AppState,
    id: Uuid,
    mut after: u64,
    poll: Duration,
) -> impl futures::Stream<Item = Result<JobEvent, Error>> + Send + 'static {
    async_stream::stream! {
        let mut wake = state.jobs.subscribe();
        loop {
            let batch = match state.jobs.events_after(id, after, 256).await {
                Ok(b) => b,
                Err(e) => {
                    yield Err(Error::from(e));
                    return;
                }
            };
            let mut done = false;
            for ev in batch {
                after = ev.seq;
                done |= ev.status.is_final() && ev.event == ev.status.as_str();
                yield Ok(ev);
            }
            if done {
                return;
            }
            // Woken at once for events recorded in this process; the poll catches the others.
            let deadline = tokio::time::sleep(poll);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    () = state.shutdown.cancelled() => return,
                    woke = wake.recv() => match woke {
                        Ok(job) if job == id => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                    },
                }
            }
        }
    }
}

/// A job's events as SSE frames: `id:` = seq, `event: job`.
fn job_events(
    state: AppState,
    id: Uuid,
    after: u64,
    poll: Duration,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    follow(state, id, after, poll).map(|item| {
        Ok(match item {
            Ok(ev) => {
                let data = serde_json::to_string(&ev).unwrap_or_default();
                Event::default().id(ev.seq.to_string()).event("job").data(data)
            }
            Err(e) => e.sse_event(),
        })
    })
}

/// Publishes a job's events into the live session it was started from, as `job` events, until
/// the job's final status, the session's end or shutdown. Runs on the state's task tracker.
async fn relay_to_session(state: AppState, session: SessionHandle, job: Uuid, kind: JobKind) {
    let poll = state.settings.jobs.events_poll;
    let events = follow(state.clone(), job, 0, poll);
    tokio::pin!(events);
    while let Some(item) = events.next().await {
        let ev = match item {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(job_id = %job, error = %e, "cannot relay job events to the session");
                return;
            }
        };
        let update = JobUpdate {
            job_id: job.to_string(),
            kind: kind.as_str().to_owned(),
            event: ev.event,
            status: ev.status.as_str().to_owned(),
            progress: ev.progress,
            stage: ev.stage,
            attempt: ev.attempt,
            error: ev.error.and_then(|e| serde_json::to_value(e).ok()),
        };
        // The session's own task publishes it (here or on its owner's node), so its log keeps
        // one writer; awaiting each keeps the job's events in order. A session that ended (or
        // cannot be reached) stops the relay: the job goes on, its own stream still has it all.
        if let Err(e) = session.job_update(update).await {
            tracing::debug!(job_id = %job, session_id = %session.id, error = %e, "job events no longer go to the session");
            return;
        }
    }
}

#[utoipa::path(
    get, path = "/api/v1/jobs/stats", tag = "jobs", security(("api_key" = [])),
    description = "Per queue: queued, running, succeeded, failed, cancelled, p50/p95 run time of the last 24 h, workers alive.",
    responses(
        (status = 200, description = "{backend, engine, queues: [...]}"),
        (status = 403, description = "A JWT user", body = ErrorBody),
    )
)]
async fn stats(State(state): State<AppState>, caller: ApiCaller) -> Result<Json<Value>, Error> {
    // Every user's numbers: not for an end user's token.
    if caller.0.user_id().is_some() {
        return Err(Error::Forbidden);
    }
    let js = &state.settings.jobs;
    let queues = state.jobs.stats(js.orphan_after).await?;
    Ok(Json(json!({
        "backend": state.jobs.name(),
        "engine": "apalis",
        "queues": queues,
    })))
}

/// The monitor page: static HTML whose script asks for the API key and reads the stats and the
/// job list with it. The page itself holds no data, so it needs no key to load.
async fn board() -> Html<&'static str> {
    Html(include_str!("../../assets/jobs_board.html"))
}
