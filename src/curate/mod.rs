//! Dataset curation the Platypus way (arXiv 2308.07317, its
//! `data_pipeline/`): exact dedup, greedy near-dedup and benchmark
//! decontamination of an instruction dataset by the cosine similarity of
//! sentence embeddings.
//!
//! The steps take embeddings from an [`Embedder`]; [`run_curate`] is the
//! whole command: read, embed (through the cache), search, write the report.
//! - [`encoder`]: a BERT-family sentence-transformers model folder
//!   (all-MiniLM-L6-v2 first of all): WordPiece tokenizer, transformer,
//!   pooling, Normalize.
//! - [`bert`]: the BERT transformer's forward pass on the host, over packed
//!   sequences (no padding).

pub mod bert;
pub mod encoder;

/// An on-disk embedding cache around any [`Embedder`].
pub mod cache;
/// Training rows and benchmark items from JSONL, JSON, CSV and Parquet files.
pub mod dataset;
/// The steps: exact dedup, greedy near-dedup, decontamination.
pub mod pipeline;
/// The outputs: filtered dataset, `report.json`, `report.html`, pairs.
pub mod report;

use std::path::PathBuf;

use crate::output::Outputs;
use crate::progress::Progress;
use crate::{Error, Result};
use pipeline::CurateConfig;
use report::{Report, ReportPaths};

/// Turns texts into embeddings: what the curation steps need from a model.
pub trait Embedder {
    /// Names the model and every setting that changes its output (the
    /// embedding cache's key, with the text).
    fn fingerprint(&self) -> String;
    /// Width of an embedding.
    fn dim(&self) -> usize;
    /// Embeds `texts`: `texts.len()` rows of [`Embedder::dim`] f32, in the
    /// order given, each of unit L2 norm when the model normalizes (a text
    /// the model sees as empty still gets its row). `progress` advances by
    /// one per text.
    fn embed(&self, texts: &[&str], progress: &Progress) -> Result<Vec<f32>>;
}

/// One curation run: its files and settings ([`run_curate`]).
#[derive(Debug, Clone)]
pub struct CurateJob {
    /// The training file.
    pub train: PathBuf,
    /// The benchmark files.
    pub benchmarks: Vec<PathBuf>,
    /// The output folder (created when missing).
    pub out: PathBuf,
    /// A folder for the embedding cache.
    pub cache: Option<PathBuf>,
    /// Where to write the flagged pairs as JSONL.
    pub export_pairs: Option<PathBuf>,
    /// The steps and their settings.
    pub config: CurateConfig,
    /// No progress bars.
    pub quiet: bool,
}

/// Flagged pairs shown in [`run_curate`]'s summary.
const SUMMARY_PAIRS: usize = 5;

/// What [`run_curate`] did.
#[derive(Debug, Clone)]
pub struct CurateRun {
    /// The one-screen summary: rows in and out, removed per step and
    /// category, the top flagged pairs, the files written.
    pub summary: String,
    /// The counts of `report.json`.
    pub counts: pipeline::Counts,
    /// The filtered dataset written.
    pub dataset: PathBuf,
    /// `report.html` written.
    pub report: PathBuf,
}

/// Runs `job` with `embedder`: reads the files, curates, writes the
/// filtered dataset, `report.json`, `report.html` (and the pairs) as one
/// group into `job.out`, and returns the summary and counts. The outputs
/// are checked before any work; none may be an input.
pub fn run_curate(job: &CurateJob, embedder: &dyn Embedder) -> Result<CurateRun> {
    let paths = ReportPaths::new(&job.train, &job.out, job.export_pairs.as_deref());
    let mut inputs = vec![job.train.as_path()];
    inputs.extend(job.benchmarks.iter().map(PathBuf::as_path));
    let outputs = Outputs::new(&inputs);
    for path in paths.all() {
        outputs.check(path)?;
    }
    let train = dataset::read_train(&job.train, &job.config.text_fields)?;
    let benchmarks = job
        .benchmarks
        .iter()
        .map(|path| dataset::read_benchmark(path, &job.config.benchmark_fields))
        .collect::<Result<Vec<_>>>()?;
    let cached;
    let embedder = match &job.cache {
        Some(dir) => {
            cached = cache::CachedEmbedder::new(embedder, dir);
            &cached as &dyn Embedder
        }
        None => embedder,
    };
    let curation = pipeline::curate(&train, &benchmarks, embedder, &job.config, job.quiet)?;
    let report = Report {
        train: &train,
        benchmarks: &benchmarks,
        config: &job.config,
        curation: &curation,
    };
    std::fs::create_dir_all(&job.out).map_err(|e| Error::Output {
        path: job.out.clone(),
        what: e.to_string(),
    })?;
    let mut group = outputs.group();
    report.add_to(&mut group, &paths)?;
    group.commit()?;
    let mut summary = report.summary(SUMMARY_PAIRS);
    let written: Vec<String> = paths
        .all()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    summary.push_str(&format!("wrote {}\n", written.join(", ")));
    Ok(CurateRun {
        summary,
        counts: report.counts(),
        dataset: paths.dataset,
        report: paths.html,
    })
}

/// The guard of `platypus train --decontaminate-against`: the contamination
/// step alone (in place of `job.config`'s steps) on `job.train` against
/// `job.benchmarks`, its filtered dataset and report written into `job.out`. Rows at or above τ_cont are an [`Error::Contaminated`] unless
/// `drop` is set; then [`CurateRun::dataset`] is the data to train on.
pub fn guard_training(job: &CurateJob, embedder: &dyn Embedder, drop: bool) -> Result<CurateRun> {
    let mut job = job.clone();
    job.config.steps = vec![pipeline::Step::Contamination];
    if job.benchmarks.is_empty() {
        return Err(Error::Invalid {
            op: "guard_training",
            arg: "benchmarks",
            what: "is empty: name at least one benchmark file".into(),
        });
    }
    let run = run_curate(&job, embedder)?;
    if run.counts.removed > 0 && !drop {
        return Err(Error::Contaminated {
            path: job.train.clone(),
            rows: run.counts.removed,
            rows_in: run.counts.rows_in,
            threshold: job.config.contamination_threshold,
            report: run.report.clone(),
            summary: run.summary.clone(),
        });
    }
    Ok(run)
}
