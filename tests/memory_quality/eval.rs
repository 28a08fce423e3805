//! The labelled retrieval set of `tests/data/memory_quality` and its evaluation through the real
//! PostgreSQL memory store: shared by `tests/memory_quality.rs` (which asserts the targets) and
//! `examples/memory_quality.rs` (which prints the table), so both measure the same thing.

// The test and the example each read part of what is here.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use coachd::Settings;
use coachd::embed::Embedder;
use coachd::memory::{MemoryStore, NewMemory, PgMemoryStore};
use serde::Deserialize;

/// Results asked of each search (`search_similar` limit).
pub const K: usize = 5;

/// Memory types the store is given by coachd itself: stored turns, analysis insights and the
/// chunks of analysed transcripts and documents.
pub const MEMORY_TYPES: [&str; 4] = ["conversation", "insight", "transcript", "document"];

const MEMORIES: &str = include_str!("../data/memory_quality/memories.jsonl");
const QUERIES: &str = include_str!("../data/memory_quality/queries.jsonl");

/// One labelled memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemory {
    pub id: String,
    pub user: String,
    pub coach: String,
    #[serde(rename = "type")]
    pub memory_type: String,
    pub text: String,
}

/// One query with the ids of the memories of its pair that answer it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuery {
    pub id: String,
    pub user: String,
    pub coach: String,
    pub text: String,
    pub relevant: Vec<String>,
}

/// The whole set.
#[derive(Debug, Clone)]
pub struct LabelledSet {
    pub memories: Vec<SetMemory>,
    pub queries: Vec<SetQuery>,
}

fn jsonl<T: for<'de> Deserialize<'de>>(name: &str, raw: &str) -> anyhow::Result<Vec<T>> {
    raw.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{name} line {}", n + 1)))
        .collect()
}

/// Size and shape of the set.
#[derive(Debug, Clone)]
pub struct Shape {
    pub memories: usize,
    pub users: usize,
    pub pairs: usize,
    pub min_coaches_per_user: usize,
    pub max_coaches_per_user: usize,
    pub queries: usize,
    pub min_pair_size: usize,
    pub mean_pair_size: f64,
    /// Expected recall@5 of a search returning 5 random memories of the pair.
    pub chance_recall: f64,
}

impl LabelledSet {
    /// The committed set, checked: unique ids, known coaches and memory types, every relevant
    /// memory in the query's own pair.
    pub fn load() -> anyhow::Result<Self> {
        let set = Self {
            memories: jsonl("memories.jsonl", MEMORIES)?,
            queries: jsonl("queries.jsonl", QUERIES)?,
        };
        set.validate()?;
        Ok(set)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let personas: HashSet<String> = coachd::coach::persona::builtins()
            .into_iter()
            .map(|p| p.id)
            .collect();
        let mut by_id = HashMap::new();
        let mut texts = HashSet::new();
        for m in &self.memories {
            ensure!(
                personas.contains(&m.coach),
                "memory {}: unknown coach {:?}",
                m.id,
                m.coach
            );
            ensure!(
                MEMORY_TYPES.contains(&m.memory_type.as_str()),
                "memory {}: unknown type {:?}",
                m.id,
                m.memory_type
            );
            ensure!(!m.text.trim().is_empty(), "memory {}: empty text", m.id);
            ensure!(texts.insert(m.text.trim()), "memory {}: duplicate text", m.id);
            if by_id.insert(m.id.as_str(), m).is_some() {
                bail!("duplicate memory id {}", m.id);
            }
        }
        let mut ids = HashSet::new();
        for q in &self.queries {
            ensure!(ids.insert(q.id.as_str()), "duplicate query id {}", q.id);
            ensure!(!q.relevant.is_empty(), "query {}: no relevant memory", q.id);
            for r in &q.relevant {
                let m = by_id
                    .get(r.as_str())
                    .with_context(|| format!("query {}: unknown memory {r}", q.id))?;
                ensure!(
                    m.user == q.user && m.coach == q.coach,
                    "query {}: memory {r} belongs to another (user, coach) pair",
                    q.id
                );
            }
        }
        Ok(())
    }

    fn pair_sizes(&self) -> HashMap<(&str, &str), usize> {
        let mut sizes = HashMap::new();
        for m in &self.memories {
            *sizes.entry((m.user.as_str(), m.coach.as_str())).or_insert(0) += 1;
        }
        sizes
    }

    pub fn shape(&self) -> Shape {
        let sizes = self.pair_sizes();
        let mut coaches: HashMap<&str, usize> = HashMap::new();
        for (user, _) in sizes.keys() {
            *coaches.entry(user).or_insert(0) += 1;
        }
        let chance = self
            .queries
            .iter()
            .map(|q| {
                let n = sizes
                    .get(&(q.user.as_str(), q.coach.as_str()))
                    .copied()
                    .unwrap_or(1);
                K.min(n) as f64 / n as f64
            })
            .sum::<f64>()
            / self.queries.len().max(1) as f64;
        Shape {
            memories: self.memories.len(),
            users: coaches.len(),
            pairs: sizes.len(),
            min_coaches_per_user: coaches.values().copied().min().unwrap_or(0),
            max_coaches_per_user: coaches.values().copied().max().unwrap_or(0),
            queries: self.queries.len(),
            min_pair_size: sizes.values().copied().min().unwrap_or(0),
            mean_pair_size: self.memories.len() as f64 / sizes.len().max(1) as f64,
            chance_recall: chance,
        }
    }

    /// Word overlap between each query and each of its relevant memories.
    pub fn overlap(&self) -> Overlap {
        let by_id: HashMap<&str, &SetMemory> = self.memories.iter().map(|m| (m.id.as_str(), m)).collect();
        let mut coverage = Vec::new();
        let mut jaccard = Vec::new();
        let mut zero = 0;
        for q in &self.queries {
            let qt = content_tokens(&q.text);
            for r in &q.relevant {
                let Some(m) = by_id.get(r.as_str()) else { continue };
                let mt = content_tokens(&m.text);
                let shared = qt.intersection(&mt).count();
                if shared == 0 {
                    zero += 1;
                }
                coverage.push(shared as f64 / qt.len().max(1) as f64);
                jaccard.push(shared as f64 / qt.union(&mt).count().max(1) as f64);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        Overlap {
            pairs: coverage.len(),
            mean_coverage: mean(&coverage),
            mean_jaccard: mean(&jaccard),
            zero_share: zero as f64 / coverage.len().max(1) as f64,
        }
    }
}

/// How many content tokens queries share with their relevant memories.
#[derive(Debug, Clone, Copy)]
pub struct Overlap {
    /// (query, relevant memory) pairs measured.
    pub pairs: usize,
    /// Mean share of the query's content tokens found in the memory.
    pub mean_coverage: f64,
    /// Mean Jaccard index of the two token sets.
    pub mean_jaccard: f64,
    /// Share of pairs with no content token in common.
    pub zero_share: f64,
}

/// Words that carry no topic: articles, pronouns, auxiliaries, prepositions, fillers.
const STOPWORDS: &[&str] = &[
    "a", "about", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "because", "been", "before", "being", "but", "by", "can", "coach", "could", "did", "do", "does", "doing",
    "don", "done", "even", "every", "for", "from", "get", "got", "had", "has", "have", "having", "he", "her",
    "here", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "just", "let", "like", "me",
    "more", "most", "my", "never", "no", "not", "now", "of", "on", "one", "only", "or", "our", "out", "over",
    "really", "she", "should", "since", "so", "some", "still", "than", "that", "the", "their", "them",
    "then", "there", "these", "they", "this", "those", "to", "too", "up", "us", "user", "very", "was", "we",
    "were", "what", "when", "where", "which", "who", "why", "will", "with", "would", "you", "your", "ll",
    "ve", "re", "s", "t", "m", "d",
];

/// Lower-cased alphanumeric words minus [`STOPWORDS`], each cut to a crude stem (plural and
/// verb endings off) so "customers" and "customer", "hiring" and "hire" count as one word.
pub fn content_tokens(text: &str) -> BTreeSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(w))
        .map(stem)
        .collect()
}

fn stem(word: &str) -> String {
    for suffix in ["ing", "ed", "es", "s", "e", "ly"] {
        if let Some(base) = word.strip_suffix(suffix)
            && base.chars().count() >= 3
        {
            return base.to_owned();
        }
    }
    word.to_owned()
}

/// What one search returned.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub query: String,
    pub text: String,
    /// Ids of the returned memories, most similar first.
    pub returned: Vec<String>,
    pub relevant: Vec<String>,
}

impl QueryResult {
    /// 1-based rank of the first relevant memory among the returned ones.
    pub fn first_hit(&self) -> Option<usize> {
        self.returned
            .iter()
            .position(|id| self.relevant.contains(id))
            .map(|p| p + 1)
    }

    /// Share of the relevant memories among the first `k` returned, out of at most `k`
    /// (so recall@1 is 1 when the top result is relevant).
    pub fn recall(&self, k: usize) -> f64 {
        let found = self
            .returned
            .iter()
            .take(k)
            .filter(|id| self.relevant.contains(id))
            .count();
        found as f64 / self.relevant.len().min(k).max(1) as f64
    }
}

/// The searches of one embedder over the whole set.
#[derive(Debug, Clone)]
pub struct Report {
    pub embedder: String,
    pub results: Vec<QueryResult>,
    /// Returned memories that belong to another (user, coach) pair: must be 0.
    pub leaks: usize,
    /// The same queries over all memories at once, without the pair filter (exact cosine over
    /// the embedder's vectors): the top 5 then holds other pairs' memories on the same topic,
    /// which is what shows the set has cross-pair hard negatives.
    pub pooled: Pooled,
}

/// Search without the (user, coach) filter.
#[derive(Debug, Clone, Copy)]
pub struct Pooled {
    /// Mean recall@5 of the relevant memories.
    pub recall: f64,
    /// Share of the top-5 results that belong to another pair.
    pub foreign_share: f64,
}

impl Report {
    pub fn recall(&self, k: usize) -> f64 {
        self.results.iter().map(|r| r.recall(k)).sum::<f64>() / self.results.len().max(1) as f64
    }

    /// Mean reciprocal rank of the first relevant memory in the top [`K`] (0 when none is).
    pub fn mrr(&self) -> f64 {
        self.results
            .iter()
            .map(|r| r.first_hit().map_or(0.0, |rank| 1.0 / rank as f64))
            .sum::<f64>()
            / self.results.len().max(1) as f64
    }

    /// Queries that missed at least one relevant memory in the top [`K`].
    pub fn misses(&self) -> Vec<&QueryResult> {
        self.results.iter().filter(|r| r.recall(K) < 1.0).collect()
    }
}

/// Stores the whole set through a real [`PgMemoryStore`] in a scratch database on the server of
/// `admin_url` (created here, dropped at the end), then runs every query with limit [`K`].
pub async fn evaluate(
    admin_url: &str,
    name: &str,
    embedder: Arc<dyn Embedder>,
    set: &LabelledSet,
) -> anyhow::Result<Report> {
    let scratch = coachd::db::ScratchDatabase::create(admin_url, "coachd_quality_")
        .await
        .context("create a scratch database")?;
    let result = async {
        let settings = Settings::for_tests(&[
            ("DATABASE_URL", scratch.url.as_str()),
            ("COACHD_DB_MAX_CONNECTIONS", "4"),
        ])?;
        let url = settings.database_url.as_ref().context("DATABASE_URL")?;
        let pool = coachd::db::connect(url, &settings).await?;
        coachd::db::migrate(&pool).await?;
        let store_embedder = embedder.clone();
        let store = PgMemoryStore::prepare(pool.clone(), embedder, &settings.memory).await?;
        let result = match search_all(&store, name, set).await {
            Ok(mut report) => pooled(store_embedder.as_ref(), set).await.map(|p| {
                report.pooled = p;
                report
            }),
            Err(e) => Err(e),
        };
        pool.close().await;
        result
    }
    .await;
    scratch.drop_now().await?;
    result
}

async fn search_all(store: &PgMemoryStore, name: &str, set: &LabelledSet) -> anyhow::Result<Report> {
    let mut ids = HashMap::new();
    for chunk in set.memories.chunks(64) {
        let batch = chunk
            .iter()
            .map(|m| NewMemory {
                dedup_key: None,
                text: m.text.clone(),
                user_id: m.user.clone(),
                coach_id: m.coach.clone(),
                memory_type: m.memory_type.clone(),
                metadata: serde_json::json!({ "set_id": m.id }),
            })
            .collect();
        let outcomes = store.store_batch(batch).await?;
        ensure!(
            outcomes.len() == chunk.len(),
            "store_batch answered {} outcomes",
            outcomes.len()
        );
        for (m, o) in chunk.iter().zip(outcomes) {
            ensure!(o.created, "memory {} was merged into another", m.id);
            ids.insert(o.id, m);
        }
    }
    let mut results = Vec::with_capacity(set.queries.len());
    let mut leaks = 0;
    for q in &set.queries {
        let found = store.search_similar(&q.user, &q.coach, &q.text, K, -1.0).await?;
        let mut returned = Vec::with_capacity(found.len());
        for f in found {
            let m = ids
                .get(&f.memory.id)
                .with_context(|| format!("query {}: an unknown memory came back", q.id))?;
            if m.user != q.user || m.coach != q.coach {
                leaks += 1;
            }
            returned.push(m.id.clone());
        }
        results.push(QueryResult {
            query: q.id.clone(),
            text: q.text.clone(),
            returned,
            relevant: q.relevant.clone(),
        });
    }
    Ok(Report {
        embedder: name.to_owned(),
        results,
        leaks,
        pooled: Pooled {
            recall: 0.0,
            foreign_share: 0.0,
        },
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

async fn pooled(embedder: &dyn Embedder, set: &LabelledSet) -> anyhow::Result<Pooled> {
    let texts: Vec<String> = set.memories.iter().map(|m| m.text.clone()).collect();
    let queries: Vec<String> = set.queries.iter().map(|q| q.text.clone()).collect();
    let memories = embedder.embed(&texts).await?;
    let asked = embedder.embed(&queries).await?;
    let (mut recall, mut foreign) = (0.0, 0usize);
    for (q, v) in set.queries.iter().zip(&asked) {
        let mut ranked: Vec<(f32, &SetMemory)> = memories
            .iter()
            .zip(&set.memories)
            .map(|(m, meta)| (cosine(v, m), meta))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top = &ranked[..K.min(ranked.len())];
        let found = top.iter().filter(|(_, m)| q.relevant.contains(&m.id)).count();
        recall += found as f64 / q.relevant.len().clamp(1, K) as f64;
        foreign += top
            .iter()
            .filter(|(_, m)| m.user != q.user || m.coach != q.coach)
            .count();
    }
    let n = set.queries.len().max(1) as f64;
    Ok(Pooled {
        recall: recall / n,
        foreign_share: foreign as f64 / (n * K as f64),
    })
}
