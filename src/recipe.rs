//! The whole Platypus recipe in one call ([`quickstart`], `platypus
//! quickstart`): curate a training set against a benchmark (exact dedup,
//! near-dedup, decontamination by sentence embeddings), make a small Llama
//! 2-architecture model with a tokenizer trained on the curated rows (or
//! take a model folder), evaluate it on held-back rows, LoRA-fine-tune it on
//! the others, evaluate again, merge the adapter, and answer held-back
//! prompts with the base and the merged model side by side. Everything goes
//! into one folder, with a `summary.md` of the numbers.
//!
//! The folder is filled under a temporary sibling name and renamed at the
//! end: a run that fails or is killed leaves the previous folder as it was.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::curate::encoder::SentenceEncoder;
use crate::curate::pipeline::{Counts, CurateConfig};
use crate::curate::{self, CurateJob};
use crate::llama::train::{self, TrainConfig};
use crate::llama::{data, eval, generate, init, merge, tokenizer};
use crate::llama::{Adapter, Llama, LlamaConfig, Module};
use crate::output::Outputs;
use crate::progress::Progress;
use crate::{Device, Error, Result};

/// The file that marks a quickstart folder (and holds its numbers).
pub const SUMMARY_FILE: &str = "summary.md";

/// What [`quickstart`] runs on, and how much.
#[derive(Debug, Clone)]
pub struct QuickstartConfig {
    /// Training rows, JSONL with Open-Platypus' fields.
    pub train: PathBuf,
    /// Benchmark questions to decontaminate against.
    pub benchmark: PathBuf,
    /// The sentence-encoder folder (all-MiniLM-L6-v2).
    pub encoder: PathBuf,
    /// A Llama model folder (with `tokenizer.json`) to fine-tune; `None`
    /// makes the `mini` preset with a tokenizer trained on the training rows.
    pub model: Option<PathBuf>,
    /// The output folder: new, empty, or an earlier quickstart's (replaced).
    pub out: PathBuf,
    /// The embedding cache (a second run embeds nothing again).
    pub cache: Option<PathBuf>,
    /// Where every stage runs.
    pub device: Device,
    /// Seed of the model, the adapter, the data order and dropout.
    pub seed: u64,
    /// Curated rows held back from training for the evaluations, evenly
    /// spread over the file.
    pub held_back: usize,
    /// Held-back prompts answered by both models.
    pub prompts: usize,
    /// Passes over the training rows.
    pub epochs: u64,
    /// Optimizer steps of the run instead of `epochs` (the smoke size).
    pub max_steps: Option<u64>,
    /// Most new tokens per answer (greedy decoding).
    pub max_new_tokens: usize,
    /// No progress bars.
    pub quiet: bool,
}

/// One held-back prompt and the two models' answers.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The instruction (and input) asked.
    pub prompt: String,
    /// The row's own output.
    pub reference: String,
    /// The base model's answer.
    pub base: String,
    /// The merged model's answer.
    pub merged: String,
}

/// What [`quickstart`] did: the numbers of `summary.md`.
#[derive(Debug, Clone)]
pub struct QuickstartReport {
    /// The curation's counts.
    pub curation: Counts,
    /// Rows trained on.
    pub train_rows: usize,
    /// Rows held back for the evaluations and prompts.
    pub held_back_rows: usize,
    /// Held-back loss of the base model.
    pub loss_before: f64,
    /// Held-back loss with the adapter attached.
    pub loss_after: f64,
    /// Held-back loss of the merged model.
    pub loss_merged: f64,
    /// Optimizer steps of the training run.
    pub steps: u64,
    /// Tokens per second of the training run.
    pub tokens_per_s: f64,
    /// The held-back prompts' answers.
    pub answers: Vec<Answer>,
    /// Seconds per stage, in order.
    pub stages: Vec<(&'static str, f64)>,
    /// The device, in words.
    pub device: String,
    /// Whether the model was made here (random weights).
    pub random_model: bool,
    /// `summary.md`'s text.
    pub summary: String,
}

/// Runs the recipe of `cfg` (see the module doc) and returns its numbers;
/// `cfg.out` holds the curated data and reports (`curated/`), the split
/// (`data/`), the model when made here (`model/`), the training run (`run/`:
/// adapter, log.jsonl, loss.png), the merged model (`merged/`) and
/// `summary.md`.
pub fn quickstart(cfg: &QuickstartConfig) -> Result<QuickstartReport> {
    let staging = staging_dir(&cfg.out)?;
    let mut stages = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |stages: &mut Vec<(&'static str, f64)>, name| {
        stages.push((name, clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };

    let encoder = SentenceEncoder::load(&cfg.encoder, &cfg.device)?;
    let job = CurateJob {
        train: cfg.train.clone(),
        benchmarks: vec![cfg.benchmark.clone()],
        out: staging.join("curated"),
        cache: cfg.cache.clone(),
        export_pairs: None,
        config: CurateConfig {
            device: cfg.device.clone(),
            ..CurateConfig::default()
        },
        quiet: cfg.quiet,
    };
    let curated = curate::run_curate(&job, &encoder)?;
    drop(encoder);
    let (train_path, held_path, held_rows) = split(&curated.dataset, &staging, cfg.held_back)?;
    lap(&mut stages, "curate");

    let model_dir = match &cfg.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = staging.join("model");
            let texts = tokenizer::corpus_texts(&train_path)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let mut config = init::Preset::Mini.config();
            let tok = tokenizer::train_bpe(&refs, config.vocab_size)?;
            config.vocab_size = tok.vocab_size();
            init::write_random_model(&dir, &config, crate::DType::F32, cfg.seed, Some(&tok))?;
            dir
        }
    };
    let config = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let tok_path = model_dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::File {
            path: tok_path,
            what: "is missing: the quickstart tokenizes instruction rows".into(),
        });
    }
    let tok = tokenizer::Tokenizer::from_file(&tok_path, &config)?;
    let cutoff = config.max_position_embeddings.min(512);
    let train_rows = data::read_jsonl(&train_path, Some(&tok), &config, cutoff)?;
    let held = data::read_jsonl(&held_path, Some(&tok), &config, cutoff)?;
    let pad = config.pad_token_id.unwrap_or(0);
    // One model in memory at a time: the base answers its prompts before
    // training and takes the adapter after it; the merged model comes last.
    let answer = |model: &Llama, ids: &[u32]| -> Result<String> {
        let g = generate::generate(
            model,
            ids,
            &generate::GenerateConfig {
                max_new_tokens: cfg.max_new_tokens,
                sampling: None,
                stop: config.eos_token_ids.clone(),
                keep_logits: false,
            },
        )?;
        tok.decode(&g.ids)
    };
    let prompts = held_rows
        .iter()
        .take(cfg.prompts)
        .map(|(instruction, input, _)| {
            let input = (!input.is_empty()).then_some(input.as_str());
            tok.encode(&data::alpaca_prompt(instruction, input), true)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut model = Llama::load(&model_dir, &cfg.device)?;
    let before = eval::evaluate(&model, &held, 8, pad)?;
    let base_answers = prompts
        .iter()
        .map(|ids| answer(&model, ids))
        .collect::<Result<Vec<_>>>()?;
    lap(&mut stages, "model + eval + base answers");

    let run_dir = staging.join("run");
    let train_config = TrainConfig {
        learning_rate: 2e-3,
        lora_r: 8,
        target_modules: Module::ALL.to_vec(),
        warmup_steps: 2,
        per_device_batch_size: 4,
        gradient_accumulation_steps: 1,
        num_epochs: cfg.epochs,
        max_steps: cfg.max_steps,
        cutoff_len: cutoff,
        seed: cfg.seed,
        packing: true,
        ..TrainConfig::default()
    };
    let total = train_config.total_steps(train_rows.len());
    let bar = Progress::bar_with_message(total, "training steps", cfg.quiet);
    let trained = train::train(
        train::Run {
            model_dir: &model_dir,
            data: &train_rows,
            pad_id: pad,
            out: &run_dir,
            config: train_config,
            adapter_init: None,
            // The model's folder once the staging folder has its final name.
            base_model_name: Some(
                cfg.model
                    .clone()
                    .unwrap_or_else(|| cfg.out.join("model"))
                    .display()
                    .to_string(),
            ),
            resume: None,
            device: cfg.device.clone(),
        },
        &mut |line, _| {
            bar.set_position(line.step);
            bar.set_message(format!("loss {:.4}", line.loss));
        },
    )?;
    drop(bar);
    lap(&mut stages, "train");

    let adapter = Adapter::load(&trained.adapter, &config)?;
    model.attach(&adapter)?;
    let after = eval::evaluate(&model, &held, 8, pad)?;
    drop(model);
    let merged_dir = staging.join("merged");
    merge::merge(&model_dir, &[(adapter, 1.0)], &merged_dir)?;
    let merged = Llama::load(&merged_dir, &cfg.device)?;
    let merged_eval = eval::evaluate(&merged, &held, 8, pad)?;
    let answers = held_rows
        .iter()
        .zip(prompts.iter().zip(base_answers))
        .map(|((instruction, input, output), (ids, base))| {
            Ok(Answer {
                prompt: [instruction.as_str(), input.as_str()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" "),
                reference: output.clone(),
                base,
                merged: answer(&merged, ids)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    lap(&mut stages, "eval + merge + merged answers");

    let mut report = QuickstartReport {
        curation: curated.counts,
        train_rows: train_rows.len(),
        held_back_rows: held.len(),
        loss_before: before.loss,
        loss_after: after.loss,
        loss_merged: merged_eval.loss,
        steps: trained.steps,
        tokens_per_s: trained.tokens as f64 / trained.seconds.max(1e-9),
        answers,
        stages,
        device: match &cfg.device {
            Device::Cpu => format!("CPU, {} threads", rayon::current_num_threads()),
            other => other.to_string(),
        },
        random_model: cfg.model.is_none(),
        summary: String::new(),
    };
    report.summary = summary_md(cfg, &report);
    Outputs::default().write_file(&staging.join(SUMMARY_FILE), |out| {
        out.write_all(report.summary.as_bytes())
    })?;
    finish(&staging, &cfg.out)?;
    Ok(report)
}

/// A folder beside `out` with a name of its own (`.NAME.suffix`).
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let name = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    out.with_file_name(format!(".{name}.{suffix}"))
}

/// The fresh staging folder of a run into `out`, which must be new, empty
/// or an earlier quickstart's folder (it holds [`SUMMARY_FILE`]).
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let output = |what: String| Error::Output {
        path: out.to_path_buf(),
        what,
    };
    if let Ok(mut entries) = fs::read_dir(out) {
        if entries.next().is_some() && !out.join(SUMMARY_FILE).exists() {
            return Err(output(format!(
                "exists, is not empty and is not a quickstart folder (no {SUMMARY_FILE}): choose a new folder"
            )));
        }
    } else if out.exists() {
        return Err(output("exists and is not a folder".into()));
    }
    let staging = sibling(out, "partial");
    // The staging folder of a run that failed or was killed: ours to drop.
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .map_err(|e| output(format!("cannot clear {}: {e}", staging.display())))?;
    }
    fs::create_dir_all(&staging)
        .map_err(|e| output(format!("cannot create {}: {e}", staging.display())))?;
    Ok(staging)
}

/// Puts the finished `staging` folder in `out`'s place (an earlier folder
/// is renamed away first, then deleted).
fn finish(staging: &Path, out: &Path) -> Result<()> {
    let output = |e: std::io::Error| Error::Output {
        path: out.to_path_buf(),
        what: e.to_string(),
    };
    let old = sibling(out, "old");
    if old.exists() {
        fs::remove_dir_all(&old).map_err(output)?;
    }
    if out.exists() {
        fs::rename(out, &old).map_err(output)?;
    }
    fs::rename(staging, out).map_err(output)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(output)?;
    }
    Ok(())
}

/// (instruction, input, output) of a JSONL row of the curated file.
type Row = (String, String, String);

/// Splits the curated JSONL `dataset` into `data/train.jsonl` and
/// `data/held_back.jsonl` (`held_back` rows evenly spread over the file)
/// under `staging`; returns both paths and the held-back rows' fields.
fn split(dataset: &Path, staging: &Path, held_back: usize) -> Result<(PathBuf, PathBuf, Vec<Row>)> {
    let fail = |what: String| Error::File {
        path: dataset.to_path_buf(),
        what,
    };
    let text = fs::read_to_string(dataset).map_err(|e| fail(format!("cannot read: {e}")))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if held_back == 0 || held_back >= lines.len() {
        return Err(Error::Invalid {
            op: "quickstart",
            arg: "held_back",
            what: format!(
                "is {held_back}: expected 1 to {} for the {} curated rows (some must be left to train on)",
                lines.len().saturating_sub(1),
                lines.len()
            ),
        });
    }
    // Every (n / held_back)-th row, so that every topic of a file sorted by
    // topic is held back.
    let n = lines.len();
    let is_held = |i: usize| (i + 1) * held_back / n != i * held_back / n;
    let (mut held, mut train) = (Vec::new(), Vec::new());
    for (i, &line) in lines.iter().enumerate() {
        match is_held(i) {
            true => held.push(line),
            false => train.push(line),
        }
    }
    let rows = held
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let row: Value = serde_json::from_str(line)
                .map_err(|e| fail(format!("held-back row {}: {e}", i + 1)))?;
            let field = |name: &str| row[name].as_str().unwrap_or("").to_string();
            Ok((field("instruction"), field("input"), field("output")))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = staging.join("data");
    let outputs = Outputs::new(&[dataset]);
    let write = |name: &str, lines: &[&str]| -> Result<PathBuf> {
        let path = dir.join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::Output {
            path: dir.clone(),
            what: e.to_string(),
        })?;
        outputs.write_file(&path, |out| {
            lines.iter().try_for_each(|l| writeln!(out, "{l}"))
        })?;
        Ok(path)
    };
    Ok((
        write("train.jsonl", &train)?,
        write("held_back.jsonl", &held)?,
        rows,
    ))
}

/// `summary.md`: the numbers of every stage.
fn summary_md(cfg: &QuickstartConfig, r: &QuickstartReport) -> String {
    let c = &r.curation;
    let mut s = String::new();
    let _ = writeln!(s, "# Platypus quickstart\n");
    let _ = writeln!(
        s,
        "Device: {}. Seed: {}. Data: `{}` against `{}`.\n",
        r.device,
        cfg.seed,
        cfg.train.display(),
        cfg.benchmark.display()
    );
    let _ = writeln!(s, "## Curation (`curated/report.html`)\n");
    let _ = writeln!(
        s,
        "{} rows in, {} removed, {} kept.\n",
        c.rows_in, c.removed, c.rows_out
    );
    let _ = writeln!(s, "| step | removed |\n|---|---|");
    for (step, n) in &c.by_step {
        let _ = writeln!(s, "| {} | {n} |", step.name());
    }
    let _ = writeln!(s, "\n| category | removed |\n|---|---|");
    for (category, n) in &c.by_category {
        let _ = writeln!(s, "| {} | {n} |", category.name());
    }
    let _ = writeln!(s, "\n| data_source | removed |\n|---|---|");
    for (source, n) in &c.by_source {
        let _ = writeln!(s, "| {source} | {n} |");
    }
    let _ = writeln!(
        s,
        "\n## Fine-tuning (`run/`: adapter, log.jsonl, loss.png)\n"
    );
    let _ = writeln!(
        s,
        "{} rows trained on, {} held back. {} steps of LoRA (r 8, all linear layers) at {:.0} tokens/s.{}\n",
        r.train_rows,
        r.held_back_rows,
        r.steps,
        r.tokens_per_s,
        if r.random_model {
            " The model is the `mini` preset with random weights (`model/`): only the loss's fall means something; give `--model` for a real Llama."
        } else {
            ""
        }
    );
    let _ = writeln!(s, "| held-back loss | value |\n|---|---|");
    let _ = writeln!(s, "| base model | {:.4} |", r.loss_before);
    let _ = writeln!(s, "| with the adapter | {:.4} |", r.loss_after);
    let _ = writeln!(s, "| merged (`merged/`) | {:.4} |", r.loss_merged);
    let _ = writeln!(
        s,
        "\n## Held-back prompts (greedy, {} new tokens at most)\n",
        cfg.max_new_tokens
    );
    for a in &r.answers {
        let _ = writeln!(s, "- **{}**", a.prompt);
        let _ = writeln!(s, "  - reference: {}", one_line(&a.reference));
        let _ = writeln!(s, "  - base: {}", one_line(&a.base));
        let _ = writeln!(s, "  - merged: {}", one_line(&a.merged));
    }
    let _ = writeln!(s, "\n## Time per stage\n\n| stage | seconds |\n|---|---|");
    for (name, seconds) in &r.stages {
        let _ = writeln!(s, "| {name} | {seconds:.1} |");
    }
    let total: f64 = r.stages.iter().map(|(_, t)| t).sum();
    let _ = writeln!(s, "| total | {total:.1} |");
    s
}

/// `text` on one line (newlines as spaces), for a list item.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
