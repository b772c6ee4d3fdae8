//! What a curation writes, all as one [`Group`] (the files appear together
//! or not at all):
//! - the filtered dataset, in the input's format and row order;
//! - `report.json`: the config, the counts, every removed row with its
//!   matches and their texts;
//! - `report.html`: one self-contained page to review them (no network):
//!   the counts at the top (elements with `data-count`, and `data-step`,
//!   `data-category` or `data-source` naming what they count, the totals
//!   with ids `rows-in`, `removed`, `rows-out`), the removed rows by
//!   descending score with the two texts side by side and their word-level
//!   differences marked, filters by category and source;
//! - optionally the flagged pairs as JSONL, for a second opinion.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::dataset::{Benchmark, TrainSet};
use super::pipeline::{Category, Counts, CurateConfig, Curation, Removal, Step, Target, NO_SOURCE};
use crate::output::Group;
use crate::Result;

/// What a report is made of.
pub struct Report<'a> {
    /// The training file, as read.
    pub train: &'a TrainSet,
    /// The benchmark files, as read.
    pub benchmarks: &'a [Benchmark],
    /// The settings used.
    pub config: &'a CurateConfig,
    /// The outcome.
    pub curation: &'a Curation,
}

/// The files a report is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportPaths {
    /// The filtered dataset: the input's file name in the output folder.
    pub dataset: PathBuf,
    /// `report.json`.
    pub json: PathBuf,
    /// `report.html`.
    pub html: PathBuf,
    /// The flagged pairs (JSONL), when asked for.
    pub pairs: Option<PathBuf>,
}

impl ReportPaths {
    /// The paths for the training file `train` in the folder `out`.
    pub fn new(train: &Path, out: &Path, pairs: Option<&Path>) -> ReportPaths {
        let name = train.file_name().unwrap_or(train.as_os_str());
        ReportPaths {
            dataset: out.join(name),
            json: out.join("report.json"),
            html: out.join("report.html"),
            pairs: pairs.map(Path::to_path_buf),
        }
    }

    /// Every path, in the order written.
    pub fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.dataset.as_path(), &self.json, &self.html];
        all.extend(self.pairs.as_deref());
        all
    }
}

impl Report<'_> {
    /// Adds every file of the report to `group` (committed by the caller).
    pub fn add_to(&self, group: &mut Group, paths: &ReportPaths) -> Result<()> {
        let table = &self.train.table;
        group.file(&paths.dataset, |out| {
            table.write_rows(&self.curation.kept, out)
        })?;
        let json = self.json();
        group.file(&paths.json, |out| {
            serde_json::to_writer_pretty(&mut *out, &json)?;
            out.write_all(b"\n")
        })?;
        let html = self.html();
        group.file(&paths.html, |out| out.write_all(html.as_bytes()))?;
        if let Some(pairs) = &paths.pairs {
            group.file(pairs, |out| {
                for pair in self.pairs() {
                    serde_json::to_writer(&mut *out, &pair)?;
                    out.write_all(b"\n")?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The counts.
    pub fn counts(&self) -> Counts {
        self.curation.counts(self.train, self.config)
    }

    /// The text and a JSON description of what a match points to.
    fn target(&self, target: Target) -> (&str, Value) {
        match target {
            Target::Row(row) => (self.train.rows[row].text.as_str(), json!({ "row": row })),
            Target::Benchmark { set, item } => {
                let bench = &self.benchmarks[set];
                (
                    bench.questions[item].as_str(),
                    json!({ "benchmark": bench.path.display().to_string(), "item": item }),
                )
            }
        }
    }

    fn source(&self, removal: &Removal) -> &str {
        self.train.rows[removal.row]
            .data_source
            .as_deref()
            .unwrap_or(NO_SOURCE)
    }

    /// `report.json`'s contents.
    pub fn json(&self) -> Value {
        let removed: Vec<Value> = self
            .curation
            .removed
            .iter()
            .map(|r| {
                let matches: Vec<Value> = r
                    .matches
                    .iter()
                    .map(|m| {
                        let (text, mut id) = self.target(m.target);
                        id["score"] = json!(m.score);
                        id["text"] = json!(text);
                        id
                    })
                    .collect();
                json!({
                    "row": r.row,
                    "step": r.step,
                    "category": r.category,
                    "score": r.score,
                    "data_source": self.source(r),
                    "text": self.train.rows[r.row].text,
                    "matches": matches,
                })
            })
            .collect();
        json!({
            "train": self.train.table.path().display().to_string(),
            "format": self.train.table.format(),
            "benchmarks": self.benchmarks.iter().map(|b| b.path.display().to_string()).collect::<Vec<_>>(),
            "config": self.config,
            "counts": self.counts(),
            "removed": removed,
        })
    }

    /// The flagged pairs, one per (removed row, match).
    pub fn pairs(&self) -> Vec<Value> {
        self.curation
            .removed
            .iter()
            .flat_map(|r| {
                r.matches.iter().map(move |m| {
                    let (text, id) = self.target(m.target);
                    json!({
                        "step": r.step,
                        "category": r.category,
                        "score": m.score,
                        "a": { "row": r.row, "text": self.train.rows[r.row].text },
                        "b": { "id": id, "text": text },
                    })
                })
            })
            .collect()
    }

    /// The removed rows by descending score (then file order).
    pub fn by_score(&self) -> Vec<&Removal> {
        let mut rows: Vec<&Removal> = self.curation.removed.iter().collect();
        rows.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
        rows
    }

    /// A label for what a match points to (`row 4`, `arc.jsonl #12`).
    pub fn label(&self, target: Target) -> String {
        match target {
            Target::Row(row) => format!("row {row}"),
            Target::Benchmark { set, item } => {
                let path = &self.benchmarks[set].path;
                let name = path.file_name().unwrap_or(path.as_os_str());
                format!("{} #{item}", name.to_string_lossy())
            }
        }
    }

    /// `report.html`'s contents.
    pub fn html(&self) -> String {
        let counts = self.counts();
        let mut page = String::new();
        let title = escape(&self.train.table.path().display().to_string());
        let _ = write!(
            page,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>Curation of {title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
             <h1>Curation of {title}</h1>\n<section id=\"counts\">\n<p>\
             rows in <b id=\"rows-in\" data-count=\"{}\">{0}</b>, \
             removed <b id=\"removed\" data-count=\"{}\">{1}</b>, \
             rows out <b id=\"rows-out\" data-count=\"{}\">{2}</b></p>\n",
            counts.rows_in, counts.removed, counts.rows_out
        );
        let mut list = |title: &str, attr: &str, items: Vec<(String, usize)>| {
            let _ = write!(page, "<p>{title}:");
            for (name, n) in items {
                let name = escape(&name);
                let _ = write!(
                    page,
                    " <span class=\"count\" data-{attr}=\"{name}\" data-count=\"{n}\">{name} {n}</span>"
                );
            }
            page.push_str("</p>\n");
        };
        list(
            "by step",
            "step",
            counts
                .by_step
                .iter()
                .map(|(s, &n)| (s.name().to_string(), n))
                .collect(),
        );
        list(
            "by category",
            "category",
            counts
                .by_category
                .iter()
                .map(|(c, &n)| (c.name().to_string(), n))
                .collect(),
        );
        list(
            "by source",
            "source",
            counts
                .by_source
                .iter()
                .map(|(s, &n)| (s.clone(), n))
                .collect(),
        );
        page.push_str("</section>\n<p id=\"filters\">category <select id=\"filter-category\"><option value=\"\">all</option>");
        for c in Category::ALL {
            let _ = write!(page, "<option>{}</option>", c.name());
        }
        page.push_str(
            "</select> source <select id=\"filter-source\"><option value=\"\">all</option>",
        );
        for source in counts.by_source.keys() {
            let _ = write!(page, "<option>{}</option>", escape(source));
        }
        page.push_str(
            "</select> <span id=\"shown\"></span></p>\n<table id=\"removed-rows\">\n<thead><tr>\
             <th>score</th><th>step</th><th>category</th><th>removed row</th><th>matched</th>\
             </tr></thead>\n<tbody>\n",
        );
        for r in self.by_score() {
            self.html_row(&mut page, r);
        }
        let _ = write!(
            page,
            "</tbody>\n</table>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
        );
        page
    }

    fn html_row(&self, page: &mut String, r: &Removal) {
        let text = &self.train.rows[r.row].text;
        let best = r.matches[0];
        let (other, _) = self.target(best.target);
        let (left, right) = marked(text, other);
        let source = escape(self.source(r));
        let others: String = r.matches[1..]
            .iter()
            .map(|m| {
                let (t, _) = self.target(m.target);
                format!(
                    "<div class=\"more\">{} ({:.3}): {}</div>",
                    escape(&self.label(m.target)),
                    m.score,
                    escape(t)
                )
            })
            .collect();
        let _ = writeln!(
            page,
            "<tr class=\"pair\" data-row=\"{row}\" data-step=\"{step}\" data-category=\"{cat}\" \
             data-source=\"{source}\"><td>{score:.4}</td><td>{step}</td><td>{cat}</td>\
             <td><div class=\"id\">row {row} · {source}</div>{left}</td>\
             <td><div class=\"id\">{label}</div>{right}{others}</td></tr>",
            row = r.row,
            step = r.step.name(),
            cat = r.category.name(),
            score = r.score,
            label = escape(&self.label(best.target)),
        );
    }

    /// A one-screen summary: rows in and out, removals per step and
    /// category, the `top` highest-scoring flagged pairs.
    pub fn summary(&self, top: usize) -> String {
        let counts = self.counts();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} rows in, {} removed, {} rows out",
            self.train.table.path().display(),
            counts.rows_in,
            counts.removed,
            counts.rows_out
        );
        for step in Step::ALL.into_iter().filter(|&s| self.config.runs(s)) {
            let of_step: Vec<&Removal> = self
                .curation
                .removed
                .iter()
                .filter(|r| r.step == step)
                .collect();
            let kinds: Vec<String> = Category::ALL
                .iter()
                .map(|&c| {
                    let n = of_step.iter().filter(|r| r.category == c).count();
                    format!("{} {n}", c.name())
                })
                .collect();
            let _ = writeln!(
                out,
                "  {:<14}{:>7}  ({})",
                step.name(),
                of_step.len(),
                kinds.join(", ")
            );
        }
        let flagged = self.by_score();
        if !flagged.is_empty() {
            let _ = writeln!(out, "top flagged pairs:");
        }
        for r in flagged.into_iter().take(top) {
            let (other, _) = self.target(r.matches[0].target);
            let _ = writeln!(
                out,
                "  {:.3} {:<13} {:<9} row {} ~ {}: {:?} | {:?}",
                r.score,
                r.step.name(),
                r.category.name(),
                r.row,
                self.label(r.matches[0].target),
                clip(&self.train.rows[r.row].text, 40),
                clip(other, 40)
            );
        }
        out
    }
}

/// `text` cut to `n` characters, with `…` when cut.
fn clip(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// HTML-escapes `text` (for element content and quoted attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One word of a [`word_diff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diff<'a> {
    /// In both texts.
    Same(&'a str),
    /// Only in the first.
    Removed(&'a str),
    /// Only in the second.
    Added(&'a str),
}

/// Longest texts (in words, multiplied) [`word_diff`] aligns; longer ones
/// are shown as wholly different.
const MAX_DIFF_CELLS: usize = 4_000_000;

/// The word-level differences of `a` and `b` (words split at whitespace),
/// by a longest common subsequence.
pub fn word_diff<'a>(a: &'a str, b: &'a str) -> Vec<Diff<'a>> {
    let a: Vec<&str> = a.split_whitespace().collect();
    let b: Vec<&str> = b.split_whitespace().collect();
    let (n, m) = (a.len(), b.len());
    if n * m > MAX_DIFF_CELLS {
        let removed = a.iter().map(|w| Diff::Removed(w));
        return removed.chain(b.iter().map(|w| Diff::Added(w))).collect();
    }
    // lcs[i][j]: the LCS length of a[i..] and b[j..].
    let width = m + 1;
    let mut lcs = vec![0u32; (n + 1) * width];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * width + j] = if a[i] == b[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n.max(m));
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push(Diff::Same(a[i]));
            i += 1;
            j += 1;
        } else if j == m || (i < n && lcs[(i + 1) * width + j] >= lcs[i * width + j + 1]) {
            out.push(Diff::Removed(a[i]));
            i += 1;
        } else {
            out.push(Diff::Added(b[j]));
            j += 1;
        }
    }
    out
}

/// `a` and `b` as escaped HTML, the words only in `a` in `<del>`, those
/// only in `b` in `<ins>`.
fn marked(a: &str, b: &str) -> (String, String) {
    let (mut left, mut right) = (String::new(), String::new());
    for d in word_diff(a, b) {
        match d {
            Diff::Same(w) => {
                let w = escape(w);
                let _ = write!(left, "{w} ");
                let _ = write!(right, "{w} ");
            }
            Diff::Removed(w) => {
                let _ = write!(left, "<del>{}</del> ", escape(w));
            }
            Diff::Added(w) => {
                let _ = write!(right, "<ins>{}</ins> ", escape(w));
            }
        }
    }
    (left, right)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}\
td:nth-child(4),td:nth-child(5){width:40%;white-space:pre-wrap}\
del{background:#fdd;text-decoration:none}ins{background:#dfd;text-decoration:none}\
.id{color:#666;font-size:12px}.more{margin-top:.4em;color:#555;font-size:12px}\
.count{margin-right:1em}#counts b{font-size:16px}";

/// The page's filters: by category and source, preset from the address
/// (`report.html#category=rephrase&source=scienceqa`); "N shown" counts the rows shown.
const SCRIPT: &str = "(function(){\
var cat=document.getElementById('filter-category'),src=document.getElementById('filter-source');\
function apply(){var n=0;document.querySelectorAll('tr.pair').forEach(function(r){\
var show=(!cat.value||r.dataset.category===cat.value)&&(!src.value||r.dataset.source===src.value);\
r.style.display=show?'':'none';if(show)n++;});\
document.getElementById('shown').textContent=n+' shown';}\
var h=new URLSearchParams(location.hash.slice(1));\
if(h.has('category'))cat.value=h.get('category');if(h.has('source'))src.value=h.get('source');\
cat.addEventListener('change',apply);src.addEventListener('change',apply);apply();})();";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_diff_marks_the_changed_words() {
        use Diff::*;
        assert_eq!(
            word_diff("the cat sat down", "the dog sat"),
            [
                Same("the"),
                Removed("cat"),
                Added("dog"),
                Same("sat"),
                Removed("down")
            ]
        );
        assert_eq!(word_diff("", "a"), [Added("a")]);
        let (left, right) = marked("a <b>", "a <c>");
        assert_eq!(left, "a <del>&lt;b&gt;</del> ");
        assert_eq!(right, "a <ins>&lt;c&gt;</ins> ");
    }

    #[test]
    fn escape_covers_quotes() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
