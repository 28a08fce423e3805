//! The offline embedder: deterministic feature hashing, no network, no model files. Good enough for
//! development, demos and tests (texts that share words score clearly higher than unrelated ones);
//! not a substitute for a trained model in production.

use async_trait::async_trait;

use super::{EmbedError, Embedder};

/// The model name recorded with vectors made here; bump the suffix if the hashing ever changes,
/// since vectors from two versions are not comparable.
pub const OFFLINE_MODEL: &str = "coachd-offline-hash-v1";

/// Weight of one character trigram relative to a whole word: trigrams add fuzzy matching
/// (`goal` / `goals`, typos) without drowning the words themselves.
const TRIGRAM_WEIGHT: f32 = 0.35;

/// Function words that would make unrelated sentences look alike.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "for", "from", "has", "have", "he", "her",
    "his", "i", "if", "in", "is", "it", "its", "me", "my", "of", "on", "or", "our", "she", "so", "that",
    "the", "their", "them", "they", "this", "to", "was", "we", "were", "what", "with", "you", "your",
];

/// Feature hashing of normalised words and their character trigrams into `dimension` signed
/// buckets, L2-normalised. Deterministic across runs, platforms and versions of Rust.
#[derive(Debug, Clone)]
pub struct OfflineEmbedder {
    dimension: usize,
}

impl OfflineEmbedder {
    /// An embedder of vectors with `dimension` components (at least 1).
    pub fn new(dimension: usize) -> Self {
        Self {
            dimension: dimension.max(1),
        }
    }

    /// The vector of one text, synchronously.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0.0_f32; self.dimension];
        let lower = text.to_lowercase();
        let mut any = false;
        for word in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            if STOP_WORDS.contains(&word) {
                continue;
            }
            any = true;
            self.add(&mut v, b'w', word.as_bytes(), 1.0);
            let padded: Vec<char> = std::iter::once('#')
                .chain(word.chars())
                .chain(std::iter::once('#'))
                .collect();
            for tri in padded.windows(3) {
                let tri: String = tri.iter().collect();
                self.add(&mut v, b't', tri.as_bytes(), TRIGRAM_WEIGHT);
            }
        }
        if !any {
            // Only stop words, symbols or nothing at all: hash the whole text so the vector is never
            // zero (a zero vector has no cosine similarity; pgvector answers NaN).
            self.add(&mut v, b'x', lower.trim().as_bytes(), 1.0);
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x /= norm;
            }
        } else {
            // Every feature cancelled out (vanishingly rare): fall back to a fixed unit vector.
            v[0] = 1.0;
        }
        v
    }

    fn add(&self, v: &mut [f32], kind: u8, feature: &[u8], weight: f32) {
        let h = mix(fnv1a(kind, feature));
        // The low bits pick the bucket, the top bit the sign: signed hashing keeps collisions
        // from adding up to a bias.
        let bucket = (h % self.dimension as u64) as usize;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[bucket] += sign * weight;
    }
}

#[async_trait]
impl Embedder for OfflineEmbedder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn model(&self) -> &str {
        OFFLINE_MODEL
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}

/// FNV-1a over a kind byte and the feature: stable, unlike `std`'s `DefaultHasher`.
fn fnv1a(kind: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(&kind).chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_have_the_dimension_and_unit_length() {
        let e = OfflineEmbedder::new(384);
        for text in ["User wants to improve their sales funnel", "", "!!!", "the", "🍺"] {
            let v = e.embed_one(text);
            assert_eq!(v.len(), 384);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{text:?} has norm {norm}");
        }
    }

    #[test]
    fn the_same_text_always_gives_the_same_vector() {
        let a = OfflineEmbedder::new(64).embed_one("Grüße aus Köln");
        let b = OfflineEmbedder::new(64).embed_one("Grüße aus Köln");
        assert_eq!(a, b);
        // Pinned: a change here means stored vectors are no longer comparable (bump OFFLINE_MODEL).
        let pinned = OfflineEmbedder::new(8).embed_one("sales");
        let expected = [-0.428_393, 0.428_393, 0.0, -0.795_587, 0.0, 0.0, 0.0, 0.0];
        for (got, want) in pinned.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{pinned:?}");
        }
        let again = OfflineEmbedder::new(8).embed_one("SALES!");
        assert_eq!(pinned, again, "case and punctuation are normalised away");
    }

    #[test]
    fn texts_sharing_words_score_clearly_higher_than_unrelated_ones() {
        let e = OfflineEmbedder::new(384);
        let query = e.embed_one("sales optimization strategies");
        let related = e.embed_one("User wants to improve their sales funnel and sales strategy");
        let unrelated = e.embed_one("I sleep badly and feel tired in the morning");
        let (r, u) = (cosine(&query, &related), cosine(&query, &unrelated));
        assert!(r > 0.2, "related similarity {r}");
        assert!(u.abs() < 0.1, "unrelated similarity {u}");
        assert!(r > u + 0.15, "related {r} vs unrelated {u}");
    }

    #[tokio::test]
    async fn embed_keeps_the_order_of_the_inputs() {
        let e = OfflineEmbedder::new(32);
        let texts = vec!["one".to_owned(), "two".to_owned()];
        let out = e.embed(&texts).await.unwrap();
        assert_eq!(out, vec![e.embed_one("one"), e.embed_one("two")]);
        assert!(e.embed(&[]).await.unwrap().is_empty());
        assert_eq!(e.model(), OFFLINE_MODEL);
    }
}
