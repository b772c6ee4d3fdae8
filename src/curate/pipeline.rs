//! The curation steps, each usable alone, and [`curate`] running them in
//! order: exact dedup, greedy near-dedup, benchmark decontamination.
//!
//! - **Exact** ([`exact_dedup`]): rows with the same instruction and input
//!   (exact strings) keep one: the longest output, the earliest on a tie.
//! - **Near** ([`near_dedup`]): rows in file order; row i is kept iff its
//!   highest cosine to the rows *already kept* is ≤ τ_dup, so a cosine of
//!   exactly τ_dup keeps the row. Candidates come from
//!   [`cosine_topk::above_threshold_self`] (pairs j < i with cos ≥ τ), split
//!   into query blocks when there are more than `max_pairs`: memory grows
//!   with rows + pairs, never rows².
//! - **Contamination** ([`decontaminate`]): every row whose cosine to any
//!   benchmark item is ≥ τ_cont is removed (equality removes).
//!   `paper_compat` does what the Platypus notebook did instead: for each
//!   benchmark item only its single nearest row, when that cosine is ≥ τ.
//!
//! Each removed row is put in a [`Category`] by its score ([`Bands`]), after
//! the paper's three kinds of benchmark overlap.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::BTreeMap;
use std::ops::Range;

use serde::Serialize;

use super::dataset::{Benchmark, TrainRow, TrainSet};
use super::Embedder;
use crate::ops::cosine_topk::{self, Exclude, Pair, NO_INDEX};
use crate::progress::Progress;
use crate::{Device, Error, Result, Tensor};

/// A curation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Exact duplicates of instruction + input.
    Exact,
    /// Greedy near-duplicate removal by cosine.
    Near,
    /// Removal of rows similar to benchmark items.
    Contamination,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 3] = [Step::Exact, Step::Near, Step::Contamination];

    /// Its name (`exact`, `near`, `contamination`).
    pub fn name(self) -> &'static str {
        match self {
            Step::Exact => "exact",
            Step::Near => "near",
            Step::Contamination => "contamination",
        }
    }
}

impl std::str::FromStr for Step {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Step, String> {
        Step::ALL
            .into_iter()
            .find(|step| step.name() == s)
            .ok_or_else(|| format!("unknown step {s:?}; expected exact, near or contamination"))
    }
}

/// How close a removed row is to what it matched, after the paper's kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Near-verbatim (score ≥ [`Bands::duplicate`]; every exact duplicate).
    Duplicate,
    /// The gray area: the same question reworded (score ≥ [`Bands::rephrase`]).
    Rephrase,
    /// Similar but not the same (below [`Bands::rephrase`]).
    Similar,
}

impl Category {
    /// Every category, closest first.
    pub const ALL: [Category; 3] = [Category::Duplicate, Category::Rephrase, Category::Similar];

    /// Its name (`duplicate`, `rephrase`, `similar`).
    pub fn name(self) -> &'static str {
        match self {
            Category::Duplicate => "duplicate",
            Category::Rephrase => "rephrase",
            Category::Similar => "similar",
        }
    }
}

/// The lower score bounds of the categories (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bands {
    /// [`Category::Duplicate`] from here (default 0.95).
    pub duplicate: f32,
    /// [`Category::Rephrase`] from here (default 0.85).
    pub rephrase: f32,
}

impl Default for Bands {
    fn default() -> Bands {
        Bands {
            duplicate: 0.95,
            rephrase: 0.85,
        }
    }
}

impl Bands {
    /// The category of `score`.
    pub fn category(&self, score: f32) -> Category {
        if score >= self.duplicate {
            Category::Duplicate
        } else if score >= self.rephrase {
            Category::Rephrase
        } else {
            Category::Similar
        }
    }
}

/// What [`curate`] does. `Default` is the Open-Platypus dataset card's
/// settings (τ 0.8 for both searches, every row ≥ τ_cont removed);
/// [`CurateConfig::paper_compat`] the notebook's.
#[derive(Debug, Clone, Serialize)]
pub struct CurateConfig {
    /// The steps to run (always in the order exact, near, contamination).
    pub steps: Vec<Step>,
    /// τ_dup: a row is removed when a kept earlier row's cosine is > τ_dup.
    pub dup_threshold: f32,
    /// τ_cont: a row is removed when a benchmark item's cosine is ≥ τ_cont.
    pub contamination_threshold: f32,
    /// Decontaminate as the notebook did: per benchmark item, only its nearest row.
    pub paper_compat: bool,
    /// The score bands of the categories.
    pub bands: Bands,
    /// The fields of a training row joined into the text embedded.
    pub text_fields: Vec<String>,
    /// The fields of a benchmark item joined into its text.
    pub benchmark_fields: Vec<String>,
    /// Benchmark matches kept per contaminated row, best first.
    pub top_matches: usize,
    /// Most pairs one threshold search may return; more are searched in blocks.
    pub max_pairs: usize,
    /// Where the searches run.
    #[serde(serialize_with = "display")]
    pub device: Device,
}

fn display<S: serde::Serializer>(device: &Device, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(device)
}

impl Default for CurateConfig {
    fn default() -> CurateConfig {
        CurateConfig {
            steps: Step::ALL.to_vec(),
            dup_threshold: 0.8,
            contamination_threshold: 0.8,
            paper_compat: false,
            bands: Bands::default(),
            text_fields: vec!["instruction".into(), "input".into()],
            benchmark_fields: vec!["question".into()],
            top_matches: 3,
            max_pairs: 1 << 24,
            device: Device::Cpu,
        }
    }
}

impl CurateConfig {
    /// The Platypus notebook's settings: τ 0.7 for both searches, and only
    /// each benchmark item's nearest row removed.
    pub fn paper_compat() -> CurateConfig {
        CurateConfig {
            dup_threshold: 0.7,
            contamination_threshold: 0.7,
            paper_compat: true,
            ..CurateConfig::default()
        }
    }

    /// Whether `step` is to run.
    pub fn runs(&self, step: Step) -> bool {
        self.steps.contains(&step)
    }

    fn check(&self) -> Result<()> {
        let invalid = |arg, what: String| Error::Invalid {
            op: "curate",
            arg,
            what,
        };
        for (arg, t) in [
            ("dup_threshold", self.dup_threshold),
            ("contamination_threshold", self.contamination_threshold),
        ] {
            if !(-1.0..=1.0).contains(&t) {
                return Err(invalid(
                    arg,
                    format!("is {t}; expected a cosine in [-1, 1]"),
                ));
            }
        }
        if self.bands.rephrase > self.bands.duplicate {
            return Err(invalid(
                "bands",
                format!(
                    "rephrase {} is above duplicate {}",
                    self.bands.rephrase, self.bands.duplicate
                ),
            ));
        }
        if self.max_pairs == 0 || self.top_matches == 0 {
            return Err(invalid(
                "max_pairs",
                "max_pairs and top_matches are at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What a removed row matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A kept training row.
    Row(usize),
    /// Item `item` of benchmark `set` (an index into the benchmarks given).
    Benchmark {
        /// Which benchmark.
        set: usize,
        /// Which of its items.
        item: usize,
    },
}

/// A match of a removed row, and its score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Match {
    /// What it matched.
    pub target: Target,
    /// The cosine (1 for an exact duplicate).
    pub score: f32,
}

/// A removed row and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Removal {
    /// Its index in the training file.
    pub row: usize,
    /// The step that removed it.
    pub step: Step,
    /// Its category, by `score`.
    pub category: Category,
    /// The best match's score.
    pub score: f32,
    /// What it matched, best first: the kept row it duplicates, or the
    /// closest benchmark items (at most [`CurateConfig::top_matches`]).
    pub matches: Vec<Match>,
}

/// What one step kept and removed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The rows kept, in file order.
    pub kept: Vec<usize>,
    /// The rows removed, in file order.
    pub removed: Vec<Removal>,
}

/// Embeddings of a set of rows: `data` holds rows × `dim` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Width of a row.
    pub dim: usize,
    /// The rows, one after the other.
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// The rows at `positions`, in that order.
    pub fn select(&self, positions: &[usize]) -> Embeddings {
        let data = positions
            .iter()
            .flat_map(|&p| &self.data[p * self.dim..(p + 1) * self.dim])
            .copied()
            .collect();
        Embeddings {
            dim: self.dim,
            data,
        }
    }

    /// The rows `range` as a tensor on `device`.
    fn tensor(&self, range: Range<usize>, device: &Device) -> Result<Tensor> {
        let values = &self.data[range.start * self.dim..range.end * self.dim];
        Tensor::from_slice(values, &[range.len(), self.dim], device)
    }
}

/// [`Step::Exact`] over `rows` (indices into `train`, in file order).
pub fn exact_dedup(train: &[TrainRow], rows: &[usize]) -> StepOutcome {
    let mut keeper: HashMap<(&str, &str), usize> = HashMap::new();
    for &r in rows {
        let row = &train[r];
        match keeper.entry((&row.instruction, &row.input)) {
            Entry::Vacant(slot) => {
                slot.insert(r);
            }
            Entry::Occupied(mut slot) => {
                let longest = train[*slot.get()].output.chars().count();
                if row.output.chars().count() > longest {
                    slot.insert(r);
                }
            }
        }
    }
    let mut outcome = StepOutcome {
        kept: Vec::new(),
        removed: Vec::new(),
    };
    for &r in rows {
        let keep = keeper[&(train[r].instruction.as_str(), train[r].input.as_str())];
        if keep == r {
            outcome.kept.push(r);
        } else {
            outcome.removed.push(Removal {
                row: r,
                step: Step::Exact,
                category: Category::Duplicate,
                score: 1.0,
                matches: vec![Match {
                    target: Target::Row(keep),
                    score: 1.0,
                }],
            });
        }
    }
    outcome
}

/// [`Step::Near`] over `rows` (file order), `x` holding their embeddings
/// (row p of `x` is row `rows[p]`).
pub fn near_dedup(rows: &[usize], x: &Embeddings, config: &CurateConfig) -> Result<StepOutcome> {
    let tau = config.dup_threshold;
    let n = rows.len();
    let mut outcome = StepOutcome {
        kept: Vec::new(),
        removed: Vec::new(),
    };
    if n == 0 {
        return Ok(outcome);
    }
    let search = Search {
        queries: x,
        items: x,
        threshold: tau,
        config,
        earlier_only: true,
    };
    let whole = x.tensor(0..n, &config.device)?;
    let pairs =
        match cosine_topk::above_threshold_self(&whole, tau, config.max_pairs, Exclude::NotEarlier)
        {
            Err(e) if too_many(&e) => search.blocks(0..n, 0..n)?,
            found => found?,
        };
    // Sorted by (query, item): row i's candidates are one run, lowest j first.
    let mut kept = vec![false; n];
    let mut next = 0;
    for i in 0..n {
        let mut best: Option<Pair> = None;
        while let Some(p) = pairs.get(next).filter(|p| p.query as usize == i) {
            let earlier_kept = kept[p.item as usize];
            if earlier_kept && p.score > tau && best.is_none_or(|b| p.score > b.score) {
                best = Some(*p);
            }
            next += 1;
        }
        match best {
            None => {
                kept[i] = true;
                outcome.kept.push(rows[i]);
            }
            Some(p) => outcome.removed.push(Removal {
                row: rows[i],
                step: Step::Near,
                category: config.bands.category(p.score),
                score: p.score,
                matches: vec![Match {
                    target: Target::Row(rows[p.item as usize]),
                    score: p.score,
                }],
            }),
        }
    }
    Ok(outcome)
}

/// [`Step::Contamination`] of `rows` (file order, embeddings `x` as in
/// [`near_dedup`]) against the embedded benchmark sets `benchmarks`.
pub fn decontaminate(
    rows: &[usize],
    x: &Embeddings,
    benchmarks: &[Embeddings],
    config: &CurateConfig,
) -> Result<StepOutcome> {
    let tau = config.contamination_threshold;
    let n = rows.len();
    let mut found: Vec<Vec<Match>> = vec![Vec::new(); n];
    for (set, bench) in benchmarks.iter().enumerate() {
        if n == 0 || bench.rows() == 0 {
            continue;
        }
        let benchmark = |item: u32| Target::Benchmark {
            set,
            item: item as usize,
        };
        if config.paper_compat {
            let top = cosine_topk::topk(
                &bench.tensor(0..bench.rows(), &config.device)?,
                &x.tensor(0..n, &config.device)?,
                1,
            )?;
            let scores = top.scores.to_vec::<f32>()?;
            let nearest = top.indices.to_vec::<u32>()?;
            for (item, (&score, &p)) in scores.iter().zip(&nearest).enumerate() {
                if p != NO_INDEX && score >= tau {
                    found[p as usize].push(Match {
                        target: benchmark(item as u32),
                        score,
                    });
                }
            }
        } else {
            let search = Search {
                queries: x,
                items: bench,
                threshold: tau,
                config,
                earlier_only: false,
            };
            for p in search.blocks(0..n, 0..bench.rows())? {
                found[p.query as usize].push(Match {
                    target: benchmark(p.item),
                    score: p.score,
                });
            }
        }
    }
    let mut outcome = StepOutcome {
        kept: Vec::new(),
        removed: Vec::new(),
    };
    for (p, mut matches) in found.into_iter().enumerate() {
        if matches.is_empty() {
            outcome.kept.push(rows[p]);
            continue;
        }
        // Best first; equal scores by benchmark and item.
        matches.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| order(a.target).cmp(&order(b.target)))
        });
        matches.truncate(config.top_matches);
        outcome.removed.push(Removal {
            row: rows[p],
            step: Step::Contamination,
            category: config.bands.category(matches[0].score),
            score: matches[0].score,
            matches,
        });
    }
    Ok(outcome)
}

fn order(target: Target) -> (usize, usize) {
    match target {
        Target::Row(r) => (0, r),
        Target::Benchmark { set, item } => (set + 1, item),
    }
}

/// Whether `e` is a threshold search's "more than max_pairs" refusal.
fn too_many(e: &Error) -> bool {
    matches!(
        e,
        Error::Invalid {
            arg: "max_pairs",
            ..
        }
    )
}

/// A threshold search of row blocks of `queries` against `items`, split
/// into smaller blocks whenever one finds more than `max_pairs` pairs.
struct Search<'a> {
    queries: &'a Embeddings,
    items: &'a Embeddings,
    threshold: f32,
    config: &'a CurateConfig,
    /// `queries` and `items` are one set: only pairs item < query.
    earlier_only: bool,
}

impl Search<'_> {
    /// Every pair (query in `queries`, item in `items`) with cos ≥ the
    /// threshold, indices into the whole sets, sorted by (query, item).
    fn blocks(&self, queries: Range<usize>, items: Range<usize>) -> Result<Vec<Pair>> {
        // Rows from the block's last query on cannot be an earlier row.
        let items = match self.earlier_only {
            true => items.start..items.end.min(queries.end - 1),
            false => items,
        };
        if queries.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        let device = &self.config.device;
        let found = cosine_topk::above_threshold(
            &self.queries.tensor(queries.clone(), device)?,
            &self.items.tensor(items.clone(), device)?,
            self.threshold,
            self.config.max_pairs,
        );
        let halves = |r: &Range<usize>| {
            let mid = r.start + r.len() / 2;
            (r.start..mid, mid..r.end)
        };
        match found {
            Ok(pairs) => Ok(pairs
                .into_iter()
                .map(|p| Pair {
                    query: p.query + queries.start as u32,
                    item: p.item + items.start as u32,
                    score: p.score,
                })
                .filter(|p| !self.earlier_only || p.item < p.query)
                .collect()),
            Err(e) if too_many(&e) && queries.len() > 1 => {
                let (a, b) = halves(&queries);
                let mut pairs = self.blocks(a, items.clone())?;
                pairs.extend(self.blocks(b, items)?);
                Ok(pairs)
            }
            Err(e) if too_many(&e) && items.len() > 1 => {
                let (a, b) = halves(&items);
                let mut pairs = self.blocks(queries.clone(), a)?;
                pairs.extend(self.blocks(queries, b)?);
                Ok(pairs)
            }
            Err(e) => Err(e),
        }
    }
}

/// The outcome of [`curate`]: what was kept, what was removed and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Curation {
    /// Rows in the training file.
    pub rows_in: usize,
    /// The rows kept, in file order.
    pub kept: Vec<usize>,
    /// The rows removed, in file order.
    pub removed: Vec<Removal>,
}

/// Counts of a [`Curation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Rows in the training file.
    pub rows_in: usize,
    /// Rows removed.
    pub removed: usize,
    /// Rows kept.
    pub rows_out: usize,
    /// Rows removed per step (every step that ran, 0 included).
    pub by_step: BTreeMap<Step, usize>,
    /// Rows removed per category (all three, 0 included).
    pub by_category: BTreeMap<Category, usize>,
    /// Rows removed per `data_source` (`(none)` for rows without one).
    pub by_source: BTreeMap<String, usize>,
}

/// The `data_source` name of rows without one, in [`Counts::by_source`].
pub const NO_SOURCE: &str = "(none)";

impl Curation {
    /// Its counts, the steps of `config` and the sources of `train`.
    pub fn counts(&self, train: &TrainSet, config: &CurateConfig) -> Counts {
        let mut by_step: BTreeMap<Step, usize> = config.steps.iter().map(|&s| (s, 0)).collect();
        let mut by_category: BTreeMap<Category, usize> =
            Category::ALL.iter().map(|&c| (c, 0)).collect();
        let mut by_source = BTreeMap::new();
        for r in &self.removed {
            *by_step.entry(r.step).or_default() += 1;
            *by_category.entry(r.category).or_default() += 1;
            let source = train.rows[r.row]
                .data_source
                .as_deref()
                .unwrap_or(NO_SOURCE);
            *by_source.entry(source.to_string()).or_default() += 1;
        }
        Counts {
            rows_in: self.rows_in,
            removed: self.removed.len(),
            rows_out: self.kept.len(),
            by_step,
            by_category,
            by_source,
        }
    }
}

/// Embeds `texts` with a progress bar over them.
fn embed(embedder: &dyn Embedder, texts: &[&str], what: &str, quiet: bool) -> Result<Embeddings> {
    let bar = Progress::bar(texts.len() as u64, what, quiet);
    let dim = embedder.dim();
    let data = embedder.embed(texts, &bar)?;
    if data.len() != texts.len() * dim {
        return Err(Error::Invalid {
            op: "curate",
            arg: "embedder",
            what: format!(
                "returned {} values for {} texts of dim {dim}",
                data.len(),
                texts.len()
            ),
        });
    }
    Ok(Embeddings { dim, data })
}

/// Runs the steps of `config` in order over `train`: exact dedup on every
/// row, near-dedup on what it kept, decontamination against `benchmarks`
/// on what that kept. Only the rows a step searches are embedded.
pub fn curate(
    train: &TrainSet,
    benchmarks: &[Benchmark],
    embedder: &dyn Embedder,
    config: &CurateConfig,
    quiet: bool,
) -> Result<Curation> {
    config.check()?;
    let mut kept: Vec<usize> = (0..train.rows.len()).collect();
    let mut removed = Vec::new();
    if config.runs(Step::Exact) {
        let outcome = exact_dedup(&train.rows, &kept);
        kept = outcome.kept;
        removed.extend(outcome.removed);
    }
    let contamination = config.runs(Step::Contamination) && !benchmarks.is_empty();
    if config.runs(Step::Near) || contamination {
        let texts: Vec<&str> = kept.iter().map(|&r| train.rows[r].text.as_str()).collect();
        let mut x = embed(embedder, &texts, "training rows embedded", quiet)?;
        if config.runs(Step::Near) {
            let outcome = {
                let _spinner = Progress::spinner("near-dedup search", quiet);
                near_dedup(&kept, &x, config)?
            };
            let positions: Vec<usize> = (0..kept.len())
                .filter(|&p| outcome.kept.binary_search(&kept[p]).is_ok())
                .collect();
            x = x.select(&positions);
            kept = outcome.kept;
            removed.extend(outcome.removed);
        }
        if contamination {
            let sets = benchmarks
                .iter()
                .map(|b| {
                    let texts: Vec<&str> = b.questions.iter().map(String::as_str).collect();
                    embed(embedder, &texts, "benchmark items embedded", quiet)
                })
                .collect::<Result<Vec<_>>>()?;
            let outcome = {
                let _spinner = Progress::spinner("decontamination search", quiet);
                decontaminate(&kept, &x, &sets, config)?
            };
            kept = outcome.kept;
            removed.extend(outcome.removed);
        }
    }
    removed.sort_by_key(|r| r.row);
    Ok(Curation {
        rows_in: train.rows.len(),
        kept,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(instruction: &str, input: &str, output: &str) -> TrainRow {
        TrainRow {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
            data_source: None,
            text: String::new(),
        }
    }

    #[test]
    fn exact_dedup_keeps_the_longest_output_then_the_earliest() {
        let train = [
            row("a", "", "short"),
            row("b", "", "x"),
            row("a", "", "longer one"),
            row("a", "in", "x"),
            row("b", "", "y"),
        ];
        let out = exact_dedup(&train, &[0, 1, 2, 3, 4]);
        assert_eq!(out.kept, [1, 2, 3]);
        let removed: Vec<(usize, Target)> = out
            .removed
            .iter()
            .map(|r| (r.row, r.matches[0].target))
            .collect();
        assert_eq!(removed, [(0, Target::Row(2)), (4, Target::Row(1))]);
    }

    #[test]
    fn bands_and_steps() {
        let bands = Bands::default();
        assert_eq!(bands.category(0.95), Category::Duplicate);
        assert_eq!(bands.category(0.9), Category::Rephrase);
        assert_eq!(bands.category(0.8), Category::Similar);
        assert_eq!("near".parse::<Step>(), Ok(Step::Near));
        assert!("fuzzy".parse::<Step>().is_err());
    }

    #[test]
    fn a_cosine_of_exactly_tau_keeps_the_row() {
        // Every two rows have cosine exactly 0.5, in f32 too.
        let x = Embeddings {
            dim: 4,
            data: vec![1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0.5],
        };
        let config = CurateConfig {
            dup_threshold: 0.5,
            ..CurateConfig::default()
        };
        let out = near_dedup(&[0, 1, 2], &x, &config).unwrap();
        assert_eq!(out.kept, [0, 1, 2]);
        let config = CurateConfig {
            contamination_threshold: 0.5,
            ..CurateConfig::default()
        };
        let bench = x.select(&[0]);
        let out = decontaminate(&[0, 1, 2], &x, &[bench], &config).unwrap();
        assert!(out.kept.is_empty(), "contamination removes at τ");
    }
}
