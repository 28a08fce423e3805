//! The `extract` job kind: the job's uploaded document through `extract::Extractor` (format
//! detection, the isolated and bounded parse, or docling-serve), its typed errors turned into
//! job errors with their retryability. The result is the [`Extracted`] document (`markdown`,
//! `sections`, `pages`, `format`), whose `markdown` feeds the next step of a chain.
//!
//! [`Extracted`]: crate::extract::Extracted

use serde_json::Value;

use super::runner::Progress;
use super::{Job, JobBackend, JobError};
use crate::extract::{ExtractError, Extractor};

impl From<ExtractError> for JobError {
    fn from(e: ExtractError) -> Self {
        JobError {
            code: format!("document_{}", e.code()),
            message: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Extracts the job's upload.
pub async fn run(
    extractor: &Extractor,
    backend: &dyn JobBackend,
    job: &Job,
    progress: &Progress,
) -> Result<Value, JobError> {
    let (info, bytes) = backend.upload(job.id).await?.ok_or_else(|| {
        JobError::permanent(
            "missing_input",
            "the job has no document (an expired upload is deleted)",
        )
    })?;
    progress.report(0.1, "extracting").await;
    let extracted = extractor
        .extract_upload(bytes, info.content_type.as_deref(), info.filename.as_deref())
        .await?;
    serde_json::to_value(&extracted)
        .map_err(|e| JobError::permanent("internal", format!("cannot encode the document: {e}")))
}
