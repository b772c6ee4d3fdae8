//! A sentence-transformers model folder (all-MiniLM-L6-v2 and any BERT
//! saved the same way) as an [`Embedder`]: what `SentenceTransformer(dir)
//! .encode(texts)` computes.
//!
//! The folder holds `modules.json` (the pipeline: Transformer, Pooling,
//! optionally Normalize), `sentence_bert_config.json` (max_seq_length,
//! do_lower_case), the Transformer's `config.json`, `model.safetensors` and
//! `tokenizer.json` at the module's path, and the Pooling module's
//! `config.json`. As sentence-transformers does, texts are truncated to
//! max_seq_length tokens (specials included) whatever truncation and
//! padding `tokenizer.json` itself saves (all-MiniLM-L6-v2's says 128), and
//! batches are never padded: sequences are sorted by length and packed
//! ([`super::bert`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use super::bert::{BertConfig, BertModel};
use super::Embedder;
use crate::progress::Progress;
use crate::{Device, Error, Result};

/// How token states become one sentence embedding (the Pooling module's
/// `config.json`); several modes are concatenated in this order, as
/// sentence-transformers does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Pooling {
    /// The first token's ([CLS]) state.
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    /// The elementwise maximum over tokens.
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    /// The mean over tokens.
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    /// The sum over tokens divided by √tokens.
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
}

impl Pooling {
    fn modes(&self) -> usize {
        [
            self.pooling_mode_cls_token,
            self.pooling_mode_max_tokens,
            self.pooling_mode_mean_tokens,
            self.pooling_mode_mean_sqrt_len_tokens,
        ]
        .iter()
        .filter(|&&m| m)
        .count()
    }

    /// Pools `states` [tokens, hidden] (tokens ≥ 1) into `out` [modes · hidden].
    fn pool(&self, states: &[f32], hidden: usize, out: &mut [f32]) {
        let tokens = states.len() / hidden;
        let mut parts = out.chunks_exact_mut(hidden);
        if self.pooling_mode_cls_token {
            parts.next().unwrap().copy_from_slice(&states[..hidden]);
        }
        if self.pooling_mode_max_tokens {
            let part = parts.next().unwrap();
            part.copy_from_slice(&states[..hidden]);
            for row in states.chunks_exact(hidden).skip(1) {
                part.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
            }
        }
        let sum = || {
            let mut sum = vec![0.0f64; hidden];
            for row in states.chunks_exact(hidden) {
                sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
            }
            sum
        };
        if self.pooling_mode_mean_tokens {
            let part = parts.next().unwrap();
            let n = tokens as f64;
            part.iter_mut()
                .zip(sum())
                .for_each(|(p, s)| *p = (s / n) as f32);
        }
        if self.pooling_mode_mean_sqrt_len_tokens {
            let part = parts.next().unwrap();
            let n = (tokens as f64).sqrt();
            part.iter_mut()
                .zip(sum())
                .for_each(|(p, s)| *p = (s / n) as f32);
        }
    }
}

/// One entry of `modules.json`.
#[derive(Debug, Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `sentence_bert_config.json`.
#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

/// Tokens per packed forward batch: large enough for full-speed GEMMs,
/// small enough that a batch's activations stay a few tens of MiB.
const BATCH_TOKENS: usize = 8192;

/// A sentence-transformers BERT model, loaded for [`Embedder::embed`].
pub struct SentenceEncoder {
    dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    model: BertModel,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    do_lower_case: bool,
    fingerprint: String,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("dir", &self.dir)
            .field("max_seq_length", &self.max_seq_length)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .finish()
    }
}

fn file_error(path: &Path, what: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        file_error(
            path,
            format!("line {}, column {}: {e}", e.line(), e.column()),
        )
    })
}

/// SHA-256 over the bytes of several files (the hash of the embedding
/// cache's texts too): what the model computes with, for the cache key.
fn digest(paths: &[&Path]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for path in paths {
        let file =
            std::fs::File::open(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
        // SAFETY: a read-only mapping of a file this process only reads.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| file_error(path, format!("cannot map: {e}")))?;
        h.update(&map[..]);
    }
    Ok(h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl SentenceEncoder {
    /// Loads the sentence-transformers folder `dir` to embed on `device`.
    /// Refused, naming the file and field, when a file is missing or
    /// malformed, or the pipeline holds a module this encoder does not
    /// compute (anything but Transformer → Pooling → optional Normalize).
    /// On [`Device::Cpu`] the model runs in f32 on the host code; on the GPU
    /// and the emulator in f16 on the kernels (the cache keys the two apart).
    pub fn load(dir: &Path, device: &Device) -> Result<SentenceEncoder> {
        let modules_path = dir.join("modules.json");
        let modules: Vec<Module> = read_json(&modules_path)?;
        let kinds: Vec<&str> = modules.iter().map(|m| m.kind.as_str()).collect();
        let normalize = match kinds.as_slice() {
            [TRANSFORMER, POOLING] => false,
            [TRANSFORMER, POOLING, NORMALIZE] => true,
            _ => {
                return Err(file_error(
                    &modules_path,
                    format!(
                        "modules are {kinds:?}, expected [{TRANSFORMER:?}, {POOLING:?}] \
                         optionally followed by {NORMALIZE:?}"
                    ),
                ))
            }
        };
        let transformer = dir.join(&modules[0].path);
        let pooling_path = dir.join(&modules[1].path).join("config.json");
        let pooling: Pooling = read_json(&pooling_path)?;
        if pooling.modes() == 0 {
            return Err(file_error(
                &pooling_path,
                "sets none of pooling_mode_cls_token, pooling_mode_max_tokens, \
                 pooling_mode_mean_tokens, pooling_mode_mean_sqrt_len_tokens \
                 (the only modes this encoder computes)",
            ));
        }
        let st_path = dir.join("sentence_bert_config.json");
        let st: SentenceBertConfig = if st_path.exists() {
            read_json(&st_path)?
        } else {
            SentenceBertConfig::default()
        };
        let config_path = transformer.join("config.json");
        let config = BertConfig::from_file(&config_path)?;
        let max_seq_length = st.max_seq_length.unwrap_or(config.max_position_embeddings);
        if max_seq_length < 2 || max_seq_length > config.max_position_embeddings {
            return Err(file_error(
                &st_path,
                format!(
                    "`max_seq_length` is {max_seq_length}, expected 2..={} \
                     (config.json's max_position_embeddings)",
                    config.max_position_embeddings
                ),
            ));
        }
        let tokenizer_path = transformer.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            file_error(
                &tokenizer_path,
                format!("not a tokenizer.json the tokenizers crate can load: {e}"),
            )
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| file_error(&tokenizer_path, format!("cannot set truncation: {e}")))?
            .with_padding(None);
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(file_error(
                &tokenizer_path,
                format!(
                    "has {vocab} tokens, config.json's vocab_size is {}",
                    config.vocab_size
                ),
            ));
        }
        let weights = transformer.join("model.safetensors");
        let hidden = config.hidden_size;
        let fingerprint = format!(
            "bert:{}:hidden={hidden}:max_seq_length={max_seq_length}:lower={}:pooling={}{}{}{}:normalize={normalize}:precision={}:sha256={}",
            dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            st.do_lower_case,
            u8::from(pooling.pooling_mode_cls_token),
            u8::from(pooling.pooling_mode_max_tokens),
            u8::from(pooling.pooling_mode_mean_tokens),
            u8::from(pooling.pooling_mode_mean_sqrt_len_tokens),
            if matches!(device, Device::Cpu) { "f32" } else { "f16" },
            digest(&[&config_path, &tokenizer_path, &weights])?,
        );
        Ok(SentenceEncoder {
            model: BertModel::load(config, &weights, device)?,
            dir: dir.to_path_buf(),
            tokenizer,
            pooling,
            normalize,
            max_seq_length,
            do_lower_case: st.do_lower_case,
            fingerprint,
        })
    }

    /// The longest token sequence the model sees; longer texts are cut.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The ids the model is fed for each text: [CLS] … [SEP], truncated to
    /// [`SentenceEncoder::max_seq_length`].
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                if self.do_lower_case {
                    t.to_lowercase()
                } else {
                    t.to_string()
                }
            })
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Invalid {
                op: "SentenceEncoder::tokenize",
                arg: "texts",
                what: format!("the tokenizer failed: {e}"),
            })?;
        let vocab = self.model.config().vocab_size;
        encodings
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let ids = e.get_ids().to_vec();
                match ids.iter().find(|&&id| id as usize >= vocab) {
                    Some(id) => Err(Error::Invalid {
                        op: "SentenceEncoder::tokenize",
                        arg: "texts",
                        what: format!("text {i} has token id {id}, not below vocab_size {vocab}"),
                    }),
                    None if ids.is_empty() => Err(Error::Invalid {
                        op: "SentenceEncoder::tokenize",
                        arg: "texts",
                        what: format!("text {i} has no tokens (the tokenizer adds no [CLS]/[SEP])"),
                    }),
                    None => Ok(ids),
                }
            })
            .collect()
    }

    /// The token states [tokens, hidden] of each text (the Transformer
    /// module's output), for inspection and tests.
    pub fn token_states(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let hidden = self.model.config().hidden_size;
        ids.iter()
            .map(|seq| self.model.forward(&[seq.as_slice()]))
            .inspect(|s| debug_assert!(s.as_ref().map_or(true, |s| s.len() % hidden == 0)))
            .collect()
    }
}

impl Embedder for SentenceEncoder {
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn dim(&self) -> usize {
        self.pooling.modes() * self.model.config().hidden_size
    }

    fn embed(&self, texts: &[&str], progress: &Progress) -> Result<Vec<f32>> {
        self.embed_ids(&self.tokenize(texts)?, progress)
    }
}

impl SentenceEncoder {
    /// [`Embedder::embed`] of texts already tokenized ([`SentenceEncoder::tokenize`]).
    pub fn embed_ids(&self, ids: &[Vec<u32>], progress: &Progress) -> Result<Vec<f32>> {
        let hidden = self.model.config().hidden_size;
        let dim = self.dim();
        let mut out = vec![0.0f32; ids.len() * dim];
        // Longest first, so a batch holds sequences of about one length.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut start = 0;
        while start < order.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < order.len()
                && (end == start || tokens + ids[order[end]].len() <= BATCH_TOKENS)
            {
                tokens += ids[order[end]].len();
                end += 1;
            }
            let batch: Vec<&[u32]> = order[start..end]
                .iter()
                .map(|&i| ids[i].as_slice())
                .collect();
            let states = self.model.forward(&batch)?;
            let mut row = 0;
            for (&i, seq) in order[start..end].iter().zip(&batch) {
                let seq_states = &states[row * hidden..(row + seq.len()) * hidden];
                let emb = &mut out[i * dim..(i + 1) * dim];
                self.pooling.pool(seq_states, hidden, emb);
                if self.normalize {
                    let norm = emb.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                    let scale = (1.0 / norm.max(1e-12)) as f32;
                    emb.iter_mut().for_each(|v| *v *= scale);
                }
                row += seq.len();
            }
            progress.inc((end - start) as u64);
            start = end;
        }
        Ok(out)
    }
}
