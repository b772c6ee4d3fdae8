//! Training and eval rows from JSONL, built the way Platypus' `finetune.py`
//! builds them, and right-padded batches of them.
//!
//! Each non-blank line is one JSON object of one of two kinds:
//! - **pre-tokenized**: `{"input_ids": [...], "labels": [...],
//!   "attention_mask": [...]}`; `labels` default to the ids and the mask to
//!   all ones; when given they have one entry per id. Ids are below the
//!   config's `vocab_size`, labels are [`IGNORE_INDEX`] or such an id, and a
//!   mask holds ones then zeros (right padding only).
//! - **instruction**: `{"instruction": ..., "input": ..., "output": ...}`
//!   (Open-Platypus' rows; other fields are ignored), formatted with
//!   [`alpaca_prompt`] and tokenized as described at [`read_jsonl`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::llama::tokenizer::Tokenizer;
use crate::llama::LlamaConfig;
use crate::{Error, Result};

/// The label of a position the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized row: a causal LM learns `labels` (unshifted: position `t`'s
/// label is the token at `t`, predicted from the positions before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// One label per id: the id itself, or [`IGNORE_INDEX`] where the loss
    /// ignores it (the prompt, padding).
    pub labels: Vec<i64>,
    /// One per id: 1 for a real token, 0 for right padding.
    pub attention_mask: Vec<u8>,
}

/// The prompt of an instruction row, in the two Alpaca templates Platypus
/// trained with (`templates/alpaca.json` of github.com/arielnlee/Platypus,
/// filled in as its `utils/prompter.py` does): the form with an input when
/// `input` is a non-empty string, the no-input form otherwise. The response
/// follows the returned text directly.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|input| !input.is_empty()) {
        Some(input) => format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    }
}

/// Reads the rows of the JSONL file at `path` (see the module doc for the
/// two kinds of line).
///
/// Instruction rows need `tokenizer` and are built as Platypus'
/// `finetune.py` does with `train_on_inputs=False` and `add_eos_token=False`
/// (its `fine-tuning.sh`), `max_len` playing its `cutoff_len`: the prompt
/// followed by the output is tokenized with BOS and cut to `max_len` tokens;
/// EOS is appended unless the cut row already ends with it or fills
/// `max_len`; the prompt alone is tokenized the same way (without EOS) and
/// that many leading labels become [`IGNORE_INDEX`] (at most all of them),
/// so the loss covers the output and its EOS. Pre-tokenized rows are cut to
/// `max_len` as they are. `usize::MAX` cuts nothing.
///
/// Blank lines are skipped. Any other line that is not such a row, a row
/// longer than `config.max_position_embeddings` after the cut, and a file
/// without rows are [`Error::File`]s naming the line.
pub fn read_jsonl(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    config: &LlamaConfig,
    max_len: usize,
) -> Result<Vec<Example>> {
    let options = ReadOptions {
        max_len,
        train_on_inputs: false,
        skip_bad_rows: false,
    };
    Ok(read_rows(path, tokenizer, config, &options)?.examples)
}

/// How [`read_rows`] builds and checks rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Cut every row to this many tokens (`cutoff_len`).
    pub max_len: usize,
    /// Keep the prompt's labels of instruction rows (no masking).
    pub train_on_inputs: bool,
    /// Skip malformed rows (each counted, with its reason) instead of failing.
    pub skip_bad_rows: bool,
}

/// The rows of a file, and the lines skipped as malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    /// The rows read.
    pub examples: Vec<Example>,
    /// `line N: what was wrong` of every skipped line.
    pub skipped: Vec<String>,
}

/// [`read_jsonl`] with `options`: `train_on_inputs` keeps the prompt's
/// labels, `skip_bad_rows` turns a malformed line into an entry of
/// [`Rows::skipped`] (a file left without rows is still an error).
pub fn read_rows(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    config: &LlamaConfig,
    options: &ReadOptions,
) -> Result<Rows> {
    if options.max_len == 0 {
        return Err(Error::Invalid {
            op: "read_jsonl",
            arg: "max_len",
            what: "is 0; rows need at least one token".into(),
        });
    }
    let fail = |what: String| Error::File {
        path: path.to_path_buf(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let reader = RowReader {
        tokenizer,
        config,
        max_len: options.max_len,
        train_on_inputs: options.train_on_inputs,
    };
    let mut rows = Rows {
        examples: Vec::new(),
        skipped: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match reader.parse(line) {
            Ok(example) => rows.examples.push(example),
            Err(what) if options.skip_bad_rows => {
                rows.skipped.push(format!("line {}: {what}", i + 1))
            }
            Err(what) => return Err(fail(format!("line {}: {what}", i + 1))),
        }
    }
    if rows.examples.is_empty() {
        return Err(fail(match rows.skipped.len() {
            0 => "has no rows; expected one JSON object per line".into(),
            n => format!(
                "has no usable rows ({n} skipped as malformed; the first: {})",
                rows.skipped[0]
            ),
        }));
    }
    Ok(rows)
}

/// What every row of one file is read with; errors are the message after
/// `line N: `.
struct RowReader<'a> {
    tokenizer: Option<&'a Tokenizer>,
    config: &'a LlamaConfig,
    max_len: usize,
    train_on_inputs: bool,
}

impl RowReader<'_> {
    fn parse(&self, line: &str) -> std::result::Result<Example, String> {
        let row = json_object(line)?;
        let example = match (
            row.contains_key("input_ids"),
            row.contains_key("instruction"),
        ) {
            (true, false) => self.pre_tokenized(&row)?,
            (false, true) => self.instruction(&row)?,
            (true, true) => {
                return Err(
                    "has both \"input_ids\" and \"instruction\"; expected one kind of row".into(),
                )
            }
            (false, false) => {
                let keys: Vec<&String> = row.keys().collect();
                return Err(format!(
                    "has keys {keys:?}; expected \"input_ids\" (pre-tokenized) or \
                     \"instruction\" and \"output\" (an instruction row)"
                ));
            }
        };
        let limit = self.config.max_position_embeddings;
        if example.input_ids.len() > limit {
            return Err(format!(
                "has {} tokens, more than config.json's max_position_embeddings {limit}",
                example.input_ids.len()
            ));
        }
        Ok(example)
    }

    fn pre_tokenized(&self, row: &Map<String, Value>) -> std::result::Result<Example, String> {
        let vocab = self.config.vocab_size;
        let in_vocab = |v: i64| usize::try_from(v).is_ok_and(|v| v < vocab);
        let ids = integers(row, "input_ids")?.ok_or("\"input_ids\" is null")?;
        if ids.is_empty() {
            return Err("\"input_ids\" is empty".into());
        }
        let labels = integers(row, "labels")?;
        let mask = integers(row, "attention_mask")?;
        for (field, values) in [("labels", &labels), ("attention_mask", &mask)] {
            if let Some(values) = values.as_ref().filter(|v| v.len() != ids.len()) {
                return Err(format!(
                    "\"{field}\" has {} entries, \"input_ids\" {}",
                    values.len(),
                    ids.len()
                ));
            }
        }
        check_each(
            "input_ids",
            &ids,
            |&id| in_vocab(id),
            || format!("a token id below config.json's vocab_size {vocab}"),
        )?;
        let labels = labels.unwrap_or_else(|| ids.clone());
        check_each(
            "labels",
            &labels,
            |&l| l == IGNORE_INDEX || in_vocab(l),
            || format!("{IGNORE_INDEX} or a token id below config.json's vocab_size {vocab}"),
        )?;
        let mask = mask.unwrap_or_else(|| vec![1; ids.len()]);
        check_each(
            "attention_mask",
            &mask,
            |&m| m == 0 || m == 1,
            || "0 or 1".into(),
        )?;
        if mask[0] == 0 {
            return Err("\"attention_mask\" starts with 0; a row starts with a real token".into());
        }
        if let Some(t) = (1..mask.len()).find(|&t| mask[t] > mask[t - 1]) {
            return Err(format!(
                "\"attention_mask\" has a 1 after a 0 at index {t}; only right padding (ones, then zeros) is supported"
            ));
        }
        let cut = ids.len().min(self.max_len);
        Ok(Example {
            // Checked above: ids are below vocab_size, the mask 0 or 1.
            input_ids: ids[..cut].iter().map(|&id| id as u32).collect(),
            labels: labels[..cut].to_vec(),
            attention_mask: mask[..cut].iter().map(|&m| m as u8).collect(),
        })
    }

    fn instruction(&self, row: &Map<String, Value>) -> std::result::Result<Example, String> {
        let tokenizer = self.tokenizer.ok_or(
            "is an instruction row, which needs a tokenizer (tokenizer.json); none was given",
        )?;
        let instruction = string(row, "instruction")?.ok_or("\"instruction\" is null")?;
        let input = string(row, "input")?;
        let output = string(row, "output")?.ok_or("\"output\" is missing")?;
        if tokenizer.bos_id().is_none() {
            return Err(
                "instruction rows start with BOS, and config.json has no bos_token_id".into(),
            );
        }
        let &eos = tokenizer
            .eos_ids()
            .first()
            .ok_or("instruction rows end with EOS, and config.json has no eos_token_id")?;
        let prompt = alpaca_prompt(instruction, input);
        let encode = |text: &str| -> std::result::Result<Vec<u32>, String> {
            let mut ids = tokenizer.encode(text, true).map_err(|e| e.to_string())?;
            ids.truncate(self.max_len);
            Ok(ids)
        };
        let mut input_ids = encode(&format!("{prompt}{output}"))?;
        if input_ids.last() != Some(&eos) && input_ids.len() < self.max_len {
            input_ids.push(eos);
        }
        let masked = if self.train_on_inputs {
            0
        } else {
            encode(&prompt)?.len().min(input_ids.len())
        };
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                if t < masked {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let vocab = self.config.vocab_size;
        if let Some(&id) = input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!(
                "the tokenizer gave id {id}, not below config.json's vocab_size {vocab}"
            ));
        }
        Ok(Example {
            attention_mask: vec![1; input_ids.len()],
            input_ids,
            labels,
        })
    }
}

/// `text` as a JSON object; the error is the message after `line N: `.
pub(crate) fn json_object(text: &str) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))? {
        Value::Object(row) => Ok(row),
        value => Err(format!("is {value}, expected a JSON object")),
    }
}

/// The integers of the array `field`, `None` when absent or null.
fn integers(
    row: &Map<String, Value>,
    field: &str,
) -> std::result::Result<Option<Vec<i64>>, String> {
    match row.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .ok_or_else(|| format!("\"{field}\"[{i}] is {v}, expected an integer"))
            })
            .collect::<std::result::Result<_, _>>()
            .map(Some),
        Some(other) => Err(format!(
            "\"{field}\" is {other}, expected an array of integers"
        )),
    }
}

/// The first entry of `values` that is not `ok`, as an error saying it
/// should be `expected`.
fn check_each(
    field: &str,
    values: &[i64],
    ok: impl Fn(&i64) -> bool,
    expected: impl Fn() -> String,
) -> std::result::Result<(), String> {
    match values.iter().position(|v| !ok(v)) {
        Some(i) => Err(format!(
            "\"{field}\"[{i}] is {}, expected {}",
            values[i],
            expected()
        )),
        None => Ok(()),
    }
}

/// The string `field`, `None` when absent or null.
pub(crate) fn string<'a>(
    row: &'a Map<String, Value>,
    field: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match row.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("\"{field}\" is {other}, expected a string")),
    }
}

/// Rows padded on the right to one length, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `pad_id` after each row's end.
    pub input_ids: Vec<u32>,
    /// Labels, [`IGNORE_INDEX`] after each row's end.
    pub labels: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Real tokens of each row (the ones of its mask).
    pub lens: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Positions per row: the longest row's length.
    pub seq: usize,
}

/// Pads `examples` on the right to the longest one: ids with `pad_id`
/// (Platypus pads with 0, `<unk>`), labels with [`IGNORE_INDEX`], the mask
/// with 0. A field shorter than its row's ids is padded the same way.
pub fn batch<E: std::borrow::Borrow<Example>>(examples: &[E], pad_id: u32) -> Batch {
    let seq = examples
        .iter()
        .map(|e| e.borrow().input_ids.len())
        .max()
        .unwrap_or(0);
    let cells = examples.len() * seq;
    let mut out = Batch {
        input_ids: Vec::with_capacity(cells),
        labels: Vec::with_capacity(cells),
        attention_mask: Vec::with_capacity(cells),
        lens: Vec::with_capacity(examples.len()),
        batch: examples.len(),
        seq,
    };
    for e in examples {
        let e = e.borrow();
        let mask_start = out.attention_mask.len();
        for t in 0..seq {
            out.input_ids
                .push(e.input_ids.get(t).copied().unwrap_or(pad_id));
            out.labels
                .push(e.labels.get(t).copied().unwrap_or(IGNORE_INDEX));
            out.attention_mask
                .push(e.attention_mask.get(t).copied().unwrap_or(0));
        }
        let ones = out.attention_mask[mask_start..]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        out.lens.push(ones as u32);
    }
    out
}
