//! The curation steps and `run_curate` with a synthetic embedder (a table
//! from text to vector), so every outcome can be compared with a brute-force
//! computation in f64: the greedy near-dedup over all earlier kept rows,
//! decontamination of every row at or above τ, the notebook's nearest row
//! per test item — on the fast CPU search with whole and split blocks, and
//! once on the emulated kernels. Then the files: the same rows as JSONL,
//! JSON and CSV curate alike and come back in their format; malformed input
//! names file, line and field and writes nothing; an output that is an
//! input is refused.

mod common;

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::{Rng, Scratch};
use platypus::curate::pipeline::{
    decontaminate, near_dedup, CurateConfig, Embeddings, StepOutcome, Target,
};
use platypus::curate::{run_curate, CurateJob, Embedder};
use platypus::progress::Progress;
use platypus::{Device, Error, Result};

/// Scores the searches report in f32 against the f64 brute force.
const SCORE_TOL: f64 = 1e-5;
/// No pair's cosine is this close to τ, so f32 rounding cannot flip a decision.
const TAU_MARGIN: f64 = 1e-4;

/// `n` unit rows of width `dim` in clusters of about `per_cluster`, each
/// row its centre plus noise of a random size, so cosines spread over
/// (−1, 1) with many above 0.8.
fn clustered(rng: &mut Rng, n: usize, dim: usize, per_cluster: usize) -> Vec<Vec<f64>> {
    let centres: Vec<Vec<f32>> = (0..n.div_ceil(per_cluster))
        .map(|_| rng.normal_vec(dim, 1.0))
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[(rng.next_u64() % centres.len() as u64) as usize];
            let noise = 0.05 + 0.6 * (rng.uniform() as f64 + 1.0) / 2.0;
            let v: Vec<f64> = c
                .iter()
                .zip(rng.normal_vec(dim, 1.0))
                .map(|(&c, e)| c as f64 + noise * e as f64)
                .collect();
            unit(v)
        })
        .collect()
}

fn unit(v: Vec<f64>) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn embeddings(rows: &[Vec<f64>]) -> Embeddings {
    Embeddings {
        dim: rows[0].len(),
        data: rows.iter().flatten().map(|&x| x as f32).collect(),
    }
}

/// A threshold near `want` that no cosine between `a` and `b` rows comes
/// within [`TAU_MARGIN`] of.
fn clear_threshold(a: &[Vec<f64>], b: &[Vec<f64>], want: f64) -> f32 {
    let cosines: Vec<f64> = a
        .iter()
        .flat_map(|x| b.iter().map(move |y| cos(x, y)))
        .collect();
    let mut tau = want;
    while cosines.iter().any(|c| (c - tau).abs() < TAU_MARGIN) {
        tau += 2.0 * TAU_MARGIN;
    }
    tau as f32
}

/// Brute-force greedy near-dedup: row i (position) goes when its best
/// kept earlier row has cos > τ; (row, best kept earlier row, score, the
/// runner-up's score).
fn greedy(x: &[Vec<f64>], tau: f64) -> Vec<(usize, usize, f64, f64)> {
    let mut kept: Vec<usize> = Vec::new();
    let mut removed = Vec::new();
    for i in 0..x.len() {
        let mut scores: Vec<(f64, usize)> = kept.iter().map(|&j| (cos(&x[i], &x[j]), j)).collect();
        scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        match scores.first() {
            Some(&(score, j)) if score > tau => {
                let second = scores.get(1).map_or(-2.0, |s| s.0);
                removed.push((i, j, score, second));
            }
            _ => kept.push(i),
        }
    }
    removed
}

/// Compares a near-dedup outcome over `rows` with [`greedy`].
fn assert_greedy(outcome: &StepOutcome, rows: &[usize], x: &[Vec<f64>], tau: f32, what: &str) {
    let want = greedy(x, tau as f64);
    let got: Vec<usize> = outcome.removed.iter().map(|r| r.row).collect();
    let want_rows: Vec<usize> = want.iter().map(|w| rows[w.0]).collect();
    assert_eq!(got, want_rows, "{what}: removed rows");
    assert_eq!(
        outcome.kept.len() + got.len(),
        rows.len(),
        "{what}: kept + removed"
    );
    for (r, &(_, j, score, second)) in outcome.removed.iter().zip(&want) {
        assert!((r.score as f64 - score).abs() < SCORE_TOL, "{what}: {r:?}");
        if score - second > SCORE_TOL {
            assert_eq!(r.matches[0].target, Target::Row(rows[j]), "{what}: {r:?}");
        }
    }
}

#[test]
fn near_dedup_is_the_exact_greedy_pass_in_whole_and_split_searches() {
    let mut rng = Rng::new(15);
    for (n, dim, want_tau) in [(300, 12, 0.8), (200, 24, 0.7), (120, 8, 0.95)] {
        let x = clustered(&mut rng, n, dim, 6);
        let tau = clear_threshold(&x, &x, want_tau);
        // Rows are file indices, not positions: every other row of a file.
        let rows: Vec<usize> = (0..n).map(|p| 2 * p + 1).collect();
        for max_pairs in [1 << 24, 7] {
            let config = CurateConfig {
                dup_threshold: tau,
                max_pairs,
                ..CurateConfig::default()
            };
            let outcome = near_dedup(&rows, &embeddings(&x), &config).unwrap();
            let what = format!("n {n} dim {dim} τ {tau} max_pairs {max_pairs}");
            assert!(
                outcome.removed.len() > n / 10,
                "{what}: too few duplicates to test anything"
            );
            assert_greedy(&outcome, &rows, &x, tau, &what);
        }
    }
}

/// Benchmark items: perturbed copies of some rows plus unrelated ones.
fn benchmark_near(rng: &mut Rng, x: &[Vec<f64>], n: usize) -> Vec<Vec<f64>> {
    let dim = x[0].len();
    (0..n)
        .map(|k| {
            let noise: Vec<f32> = rng.normal_vec(dim, 0.15);
            if k % 3 == 2 {
                return unit(rng.normal_vec(dim, 1.0).iter().map(|&v| v as f64).collect());
            }
            let base = &x[(rng.next_u64() % x.len() as u64) as usize];
            unit(base.iter().zip(noise).map(|(&b, e)| b + e as f64).collect())
        })
        .collect()
}

#[test]
fn decontamination_removes_every_row_at_or_above_tau_with_its_best_matches() {
    let mut rng = Rng::new(16);
    let x = clustered(&mut rng, 250, 16, 5);
    let sets = [
        benchmark_near(&mut rng, &x, 40),
        benchmark_near(&mut rng, &x, 25),
    ];
    let all: Vec<Vec<f64>> = sets.iter().flatten().cloned().collect();
    let tau = clear_threshold(&x, &all, 0.8);
    let rows: Vec<usize> = (0..x.len()).map(|p| p + 3).collect();
    let bench: Vec<Embeddings> = sets.iter().map(|s| embeddings(s)).collect();
    let mut every = 0;
    for max_pairs in [1 << 24, 5] {
        let config = CurateConfig {
            contamination_threshold: tau,
            max_pairs,
            ..CurateConfig::default()
        };
        let outcome = decontaminate(&rows, &embeddings(&x), &bench, &config).unwrap();
        let mut want = Vec::new();
        for (p, row) in x.iter().enumerate() {
            let mut matches: Vec<(f64, usize, usize)> = sets
                .iter()
                .enumerate()
                .flat_map(|(s, set)| {
                    set.iter()
                        .enumerate()
                        .map(move |(i, item)| (cos(row, item), s, i))
                })
                .filter(|m| m.0 >= tau as f64)
                .collect();
            matches.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            if !matches.is_empty() {
                want.push((rows[p], matches));
            }
        }
        assert!(
            want.len() > 20,
            "too few contaminated rows to test anything"
        );
        let got: Vec<usize> = outcome.removed.iter().map(|r| r.row).collect();
        let want_rows: Vec<usize> = want.iter().map(|w| w.0).collect();
        assert_eq!(got, want_rows, "max_pairs {max_pairs}");
        every = got.len();
        for (r, (_, matches)) in outcome.removed.iter().zip(&want) {
            assert_eq!(r.matches.len(), matches.len().min(config.top_matches));
            assert!((r.score as f64 - matches[0].0).abs() < SCORE_TOL);
            if matches.len() == 1 || matches[0].0 - matches[1].0 > SCORE_TOL {
                let (_, set, item) = matches[0];
                assert_eq!(r.matches[0].target, Target::Benchmark { set, item });
            }
        }
    }
    // The notebook's rule: per item, its single nearest row, when ≥ τ.
    let config = CurateConfig {
        contamination_threshold: tau,
        paper_compat: true,
        ..CurateConfig::default()
    };
    let outcome = decontaminate(&rows, &embeddings(&x), &bench, &config).unwrap();
    let mut nearest = BTreeSet::new();
    for item in &all {
        let scores: Vec<f64> = x.iter().map(|row| cos(row, item)).collect();
        let best = (0..x.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
            .unwrap();
        if scores[best] >= tau as f64 {
            nearest.insert(rows[best]);
        }
    }
    let got: BTreeSet<usize> = outcome.removed.iter().map(|r| r.row).collect();
    assert_eq!(got, nearest);
    assert!(
        !nearest.is_empty() && nearest.len() < every,
        "paper-compat removed {} rows, the default {every}",
        nearest.len()
    );
}

#[test]
fn the_emulated_kernels_curate_like_the_cpu() {
    let mut rng = Rng::new(17);
    let x = clustered(&mut rng, 48, 16, 4);
    let items = benchmark_near(&mut rng, &x, 12);
    let tau_dup = clear_threshold(&x, &x, 0.8);
    let tau_cont = clear_threshold(&x, &items, 0.8);
    let rows: Vec<usize> = (0..x.len()).collect();
    let run = |device: Device, max_pairs: usize| {
        let config = CurateConfig {
            dup_threshold: tau_dup,
            contamination_threshold: tau_cont,
            max_pairs,
            device,
            ..CurateConfig::default()
        };
        let near = near_dedup(&rows, &embeddings(&x), &config).unwrap();
        let cont = decontaminate(&rows, &embeddings(&x), &[embeddings(&items)], &config).unwrap();
        (near, cont)
    };
    let (near, cont) = run(Device::Emulated, 6);
    assert_greedy(&near, &rows, &x, tau_dup, "emulated");
    let (cpu_near, cpu_cont) = run(Device::Cpu, 1 << 24);
    assert!(!near.removed.is_empty() && !cont.removed.is_empty());
    let targets = |o: &StepOutcome| -> Vec<(usize, Vec<Target>)> {
        o.removed
            .iter()
            .map(|r| (r.row, r.matches.iter().map(|m| m.target).collect()))
            .collect()
    };
    assert_eq!(targets(&near), targets(&cpu_near));
    assert_eq!(targets(&cont), targets(&cpu_cont));
}

/// Texts to vectors; counts the texts it is asked for.
struct TableEmbedder {
    dim: usize,
    vectors: HashMap<String, Vec<f32>>,
    embedded: Cell<usize>,
}

impl Embedder for TableEmbedder {
    fn fingerprint(&self) -> String {
        format!("table {}", self.vectors.len())
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str], progress: &Progress) -> Result<Vec<f32>> {
        self.embedded.set(self.embedded.get() + texts.len());
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        for text in texts {
            let v = self.vectors.get(*text).ok_or_else(|| Error::Invalid {
                op: "embed",
                arg: "texts",
                what: format!("no vector for {text:?}"),
            })?;
            out.extend(v);
            progress.inc(1);
        }
        Ok(out)
    }
}

/// A small dataset: 30 rows (row 4 an exact copy of row 1 with a shorter
/// output) from three sources, 6 benchmark questions; vectors from clusters.
struct Dataset {
    /// instruction, input, output, data_source.
    rows: Vec<[String; 4]>,
    questions: Vec<String>,
    embedder: TableEmbedder,
}

fn dataset() -> Dataset {
    let mut rng = Rng::new(18);
    let x = clustered(&mut rng, 30, 8, 3);
    let items = benchmark_near(&mut rng, &x, 6);
    let sources = ["scienceqa", "theoremqa", "arb"];
    let mut rows: Vec<[String; 4]> = (0..30)
        .map(|i| {
            [
                format!("Question {i}, with \"quotes\", commas"),
                if i % 2 == 0 {
                    String::new()
                } else {
                    format!("input {i}")
                },
                format!("answer {i}"),
                sources[i % 3].to_string(),
            ]
        })
        .collect();
    rows[4] = [
        rows[1][0].clone(),
        rows[1][1].clone(),
        "a".into(),
        rows[4][3].clone(),
    ];
    let questions: Vec<String> = (0..6).map(|k| format!("Test item {k}?")).collect();
    let mut vectors = HashMap::new();
    for (row, v) in rows.iter().zip(&x) {
        let text = match row[1].as_str() {
            "" => row[0].clone(),
            input => format!("{} {input}", row[0]),
        };
        vectors.insert(text, v.iter().map(|&f| f as f32).collect());
    }
    for (q, v) in questions.iter().zip(&items) {
        vectors.insert(q.clone(), v.iter().map(|&f| f as f32).collect());
    }
    Dataset {
        rows,
        questions,
        embedder: TableEmbedder {
            dim: 8,
            vectors,
            embedded: Cell::new(0),
        },
    }
}

fn json_rows(d: &Dataset) -> Vec<serde_json::Value> {
    d.rows
        .iter()
        .map(|[instruction, input, output, source]| {
            serde_json::json!({
                "instruction": instruction, "input": input, "output": output, "data_source": source
            })
        })
        .collect()
}

/// Writes the training rows in `format` ("jsonl", "json", "csv" or "parquet").
fn write_train(dir: &Path, d: &Dataset, format: &str) -> PathBuf {
    let path = dir.join(format!("train.{format}"));
    if format == "parquet" {
        let column = |k: usize| -> arrow_array::ArrayRef {
            let values: Vec<&str> = d.rows.iter().map(|row| row[k].as_str()).collect();
            std::sync::Arc::new(arrow_array::StringArray::from(values))
        };
        let names = ["instruction", "input", "output", "data_source"];
        let batch = arrow_array::RecordBatch::try_from_iter(
            names.iter().enumerate().map(|(k, n)| (n, column(k))),
        )
        .unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        return path;
    }
    let text = match format {
        "jsonl" => json_rows(d)
            .iter()
            .map(|r| format!("{r}\n"))
            .collect::<String>(),
        "json" => serde_json::to_string_pretty(&json_rows(d)).unwrap(),
        _ => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["instruction", "input", "output", "data_source"])
                .unwrap();
            for row in &d.rows {
                w.write_record(row).unwrap();
            }
            String::from_utf8(w.into_inner().unwrap()).unwrap()
        }
    };
    std::fs::write(&path, text).unwrap();
    path
}

fn write_benchmark(dir: &Path, d: &Dataset) -> PathBuf {
    let path = dir.join("bench.jsonl");
    let lines: String = d
        .questions
        .iter()
        .map(|q| format!("{}\n", serde_json::json!({ "question": q })))
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
}

fn job(train: &Path, benchmark: &Path, out: &Path) -> CurateJob {
    CurateJob {
        train: train.to_path_buf(),
        benchmarks: vec![benchmark.to_path_buf()],
        out: out.to_path_buf(),
        cache: None,
        export_pairs: None,
        config: CurateConfig::default(),
        quiet: true,
    }
}

/// The instructions of a written dataset, by its format.
fn instructions(path: &Path) -> Vec<String> {
    use arrow_array::cast::AsArray;
    if path.extension().unwrap() == "parquet" {
        let file = std::fs::File::open(path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        return reader
            .flat_map(|batch| {
                let batch = batch.unwrap();
                let column = batch
                    .column_by_name("instruction")
                    .unwrap()
                    .as_string::<i32>();
                column
                    .iter()
                    .map(|s| s.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let field = |r: &serde_json::Value| r["instruction"].as_str().unwrap().to_string();
    match path.extension().unwrap().to_str().unwrap() {
        "jsonl" => text
            .lines()
            .map(|l| field(&serde_json::from_str(l).unwrap()))
            .collect(),
        "json" => serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .unwrap()
            .iter()
            .map(field)
            .collect(),
        _ => csv::Reader::from_reader(text.as_bytes())
            .records()
            .map(|r| r.unwrap()[0].to_string())
            .collect(),
    }
}

fn removed(out: &Path) -> Vec<(u64, String)> {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["row"].as_u64().unwrap(), r["step"].to_string()))
        .collect()
}

#[test]
fn jsonl_json_csv_and_parquet_curate_alike_and_come_back_in_their_format() {
    let d = dataset();
    let scratch = Scratch::new("synth-formats");
    let dir = scratch.0.as_path();
    let bench = write_benchmark(dir, &d);
    let mut outcomes = Vec::new();
    for format in ["jsonl", "json", "csv", "parquet"] {
        let train = write_train(dir, &d, format);
        let out = dir.join(format!("out-{format}"));
        run_curate(&job(&train, &bench, &out), &d.embedder).unwrap();
        let removed = removed(&out);
        let gone: BTreeSet<usize> = removed.iter().map(|r| r.0 as usize).collect();
        let want: Vec<String> = (0..d.rows.len())
            .filter(|i| !gone.contains(i))
            .map(|i| d.rows[i][0].clone())
            .collect();
        assert_eq!(instructions(&out.join(format!("train.{format}"))), want);
        outcomes.push(removed);
    }
    assert!(
        outcomes[0].contains(&(4, "\"exact\"".into())),
        "{:?}",
        outcomes[0]
    );
    assert!(outcomes[0].iter().any(|r| r.1 == "\"near\""));
    assert!(outcomes[0].iter().any(|r| r.1 == "\"contamination\""));
    for other in &outcomes[1..] {
        assert_eq!(&outcomes[0], other);
    }
}

#[test]
fn a_second_run_with_the_cache_embeds_nothing_and_curates_alike() {
    let d = dataset();
    let scratch = Scratch::new("synth-cache");
    let dir = scratch.0.as_path();
    let bench = write_benchmark(dir, &d);
    let train = write_train(dir, &d, "jsonl");
    let mut first = job(&train, &bench, &dir.join("a"));
    first.cache = Some(dir.join("cache"));
    run_curate(&first, &d.embedder).unwrap();
    // Exact dedup removed one row before embedding.
    assert_eq!(d.embedder.embedded.get(), 29 + 6);
    let second = CurateJob {
        out: dir.join("b"),
        ..first
    };
    run_curate(&second, &d.embedder).unwrap();
    assert_eq!(d.embedder.embedded.get(), 29 + 6, "the second run embedded");
    assert_eq!(removed(&dir.join("a")), removed(&dir.join("b")));
}

/// `run_curate`'s error for a training file with `text`, and whether the
/// output folder stayed empty.
fn train_error(d: &Dataset, name: &str, text: &str) -> (String, bool) {
    let scratch = Scratch::new(&format!("synth-bad-{}", name.replace('.', "-")));
    let dir = scratch.0.as_path();
    let bench = write_benchmark(dir, d);
    let train = dir.join(name);
    std::fs::write(&train, text).unwrap();
    let out = dir.join("out");
    let err = run_curate(&job(&train, &bench, &out), &d.embedder).unwrap_err();
    let nothing = !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none();
    (err.to_string(), nothing)
}

#[test]
fn malformed_input_names_file_line_and_field_and_writes_nothing() {
    let d = dataset();
    let good =
        "{\"instruction\": \"Question 0, with \\\"quotes\\\", commas\", \"output\": \"x\"}\n";
    for (name, text, want) in [
        (
            "t.jsonl",
            format!("{good}{good}{{\"instruction\": \"a\", \n"),
            "t.jsonl: line 3: ",
        ),
        (
            "t.jsonl",
            format!("{good}\n{{\"instruction\": \"a\"}}\n"),
            "t.jsonl: line 3: has no \"output\"",
        ),
        (
            "t.jsonl",
            format!("{good}{{\"instruction\": 5, \"output\": \"b\"}}\n"),
            "t.jsonl: line 2: \"instruction\" is 5, expected a string",
        ),
        (
            "t.json",
            format!(
                "[{}, {{\"instruction\": \"a\", \"output\": [1]}}]",
                good.trim()
            ),
            "t.json: element 2: \"output\" is [1], expected a string",
        ),
        (
            "t.csv",
            "instruction,output\na,b\nc\n".to_string(),
            "t.csv: row 2: ",
        ),
        (
            "t.csv",
            "instruction,input\na,b\n".to_string(),
            "t.csv: row 1: has no \"output\"",
        ),
        ("t.jsonl", String::new(), "t.jsonl: has no rows"),
    ] {
        let (err, nothing) = train_error(&d, name, &text);
        assert!(err.contains(want), "{name} {text:?}: {err}");
        assert!(nothing, "{name}: an output was written");
    }
}

#[test]
fn a_bad_benchmark_or_an_output_that_is_an_input_is_refused_before_any_work() {
    let d = dataset();
    let scratch = Scratch::new("synth-refuse");
    let dir = scratch.0.as_path();
    let train = write_train(dir, &d, "jsonl");
    let bench = dir.join("b.jsonl");
    std::fs::write(&bench, "{\"question\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let out = dir.join("out");
    let err = run_curate(&job(&train, &bench, &out), &d.embedder).unwrap_err();
    assert!(
        err.to_string()
            .contains("b.jsonl: line 2: has no \"question\""),
        "{err}"
    );
    assert_eq!(
        d.embedder.embedded.get(),
        0,
        "embedded before reading all inputs"
    );
    // The filtered dataset would go to dir/train.jsonl: the input itself.
    let good_bench = write_benchmark(dir, &d);
    let before = std::fs::read(&train).unwrap();
    let err = run_curate(&job(&train, &good_bench, dir), &d.embedder).unwrap_err();
    assert!(err.to_string().contains("train.jsonl"), "{err}");
    assert_eq!(std::fs::read(&train).unwrap(), before);
    assert_eq!(d.embedder.embedded.get(), 0);
}

/// A headless Chromium: `PLATYPUS_CHROMIUM`, else `chromium` on PATH (the
/// test command installs Debian's). None (the test skipped, with the reason
/// printed) only when PLATYPUS_REQUIRE_CHROMIUM is not 1.
fn chromium() -> Option<PathBuf> {
    let browser = std::env::var_os("PLATYPUS_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.exists())
        });
    if browser.is_none() {
        assert!(
            std::env::var("PLATYPUS_REQUIRE_CHROMIUM").map_or(true, |v| v != "1"),
            "PLATYPUS_REQUIRE_CHROMIUM=1 but no chromium on PATH"
        );
        eprintln!("SKIPPED: no chromium on PATH (apt-get install chromium)");
    }
    browser
}

/// The DOM of `page#hash` after its script ran, as Chromium renders it.
fn rendered(browser: &Path, page: &Path, hash: &str) -> String {
    let profile = page.with_file_name(format!("profile-{}", hash.replace(['=', '&'], "-")));
    let mut child = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}#{hash}", page.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > 120 {
            child.kill().unwrap();
            panic!(
                "chromium did not finish rendering {} in 120 s",
                page.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut dom = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut dom).unwrap();
    dom
}

/// The number in `dom` right after `marker`.
fn number_after(dom: &str, marker: &str) -> u64 {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the rendered page"));
    let digits: String = dom[at + marker.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

#[test]
fn the_html_report_renders_in_chromium_with_the_json_counts_and_working_filters() {
    let Some(browser) = chromium() else { return };
    let d = dataset();
    let scratch = Scratch::new("synth-html");
    let dir = scratch.0.as_path();
    let bench = write_benchmark(dir, &d);
    let train = write_train(dir, &d, "jsonl");
    let out = dir.join("out");
    run_curate(&job(&train, &bench, &out), &d.embedder).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let counts = &report["counts"];
    let page = out.join("report.html");
    let dom = rendered(&browser, &page, "");
    assert!(dom.contains("<table id=\"removed-rows\">"), "{dom}");
    let removed = counts["removed"].as_u64().unwrap();
    assert_eq!(dom.matches("<tr class=\"pair\"").count() as u64, removed);
    // "N shown" is written by the page's script: it ran and counted the rows.
    assert_eq!(number_after(&dom, "<span id=\"shown\">"), removed);
    for (id, key) in [
        ("rows-in", "rows_in"),
        ("removed", "removed"),
        ("rows-out", "rows_out"),
    ] {
        let marker = format!("id=\"{id}\" data-count=\"");
        assert_eq!(
            number_after(&dom, &marker),
            counts[key].as_u64().unwrap(),
            "{id}"
        );
    }
    // Each filter, from the address's #category=… or #source=…, shows
    // exactly the rows the JSON counts for it.
    let mut narrower = 0;
    for (attr, key) in [("category", "by_category"), ("source", "by_source")] {
        for (name, n) in counts[key].as_object().unwrap() {
            let n = n.as_u64().unwrap();
            let marker = format!("data-{attr}=\"{name}\" data-count=\"");
            assert_eq!(number_after(&dom, &marker), n, "{attr} {name}");
            let filtered = rendered(&browser, &page, &format!("{attr}={name}"));
            assert_eq!(
                number_after(&filtered, "<span id=\"shown\">"),
                n,
                "{attr} {name}"
            );
            narrower += usize::from(n > 0 && n < removed);
        }
    }
    assert!(narrower >= 2, "no filter hid any row: {counts}");
}

#[test]
#[cfg(feature = "cli")]
fn bench_curate_finds_exactly_the_planted_rows_and_refuses_bad_sizes() {
    let bench = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_platypus"))
            .arg("bench-curate")
            .args(args)
            .output()
            .unwrap()
    };
    let run = bench(&[
        "--rows",
        "3000",
        "--benchmark-rows",
        "600",
        "--dim",
        "128",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let n = |key: &str| report[key].as_u64().unwrap();
    assert_eq!(n("near_planted"), 300);
    assert_eq!(n("near_removed"), 300);
    assert_eq!(n("near_planted_found"), 300);
    assert!(n("contamination_planted") > 40, "{report}");
    assert_eq!(n("contamination_removed"), n("contamination_planted"));
    assert_eq!(n("contamination_planted_found"), n("contamination_planted"));
    let bad = bench(&["--rows", "100", "--plant-every", "1"]);
    assert_eq!(bad.status.code(), Some(3));
    let says = String::from_utf8_lossy(&bad.stderr);
    assert!(
        says.contains("plant-every 1") && says.contains("expected plant-every ≥ 2"),
        "{says}"
    );
}
