//! Llama's tokenizer: the `tokenizer.json` Hugging Face saves beside a
//! model, checked against the model's `config.json`, and [`train_bpe`], a
//! small Llama-like tokenizer for tests and walkthroughs where no real one
//! can be downloaded.
//!
//! Encoding follows Llama 2: the text is tokenized without the
//! tokenizer's own special tokens (its post-processor would prepend `<s>`),
//! then `config.json`'s BOS id is prepended on request; no EOS is added.

use std::fmt;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainerBuilder, Merges, Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

use crate::llama::LlamaConfig;
use crate::output::Outputs;
use crate::{Error, Result};

/// Llama's special tokens, at ids 0, 1 and 2.
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// SentencePiece's word-boundary mark, which stands for a space.
const SPACE_MARK: char = '\u{2581}';

/// A Hugging Face tokenizer with the BOS and EOS ids of the model it serves.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// One more than the largest id, added tokens included.
    size: usize,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` at `path` for the model `config` describes:
    /// refused when it does not parse, when its ids (added tokens included)
    /// do not fit `config.vocab_size`, or when the config's BOS or EOS ids
    /// are not tokens of it. Truncation and padding saved in the file are
    /// switched off: callers cut and pad themselves.
    pub fn from_file(path: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
        let fail = |what: String| Error::File {
            path: path.to_path_buf(),
            what,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            fail(format!(
                "not a tokenizer.json the tokenizers crate can load: {e}"
            ))
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| fail(format!("cannot switch off truncation: {e}")))?
            .with_padding(None);
        let tokenizer = Tokenizer::new(inner, config.bos_token_id, config.eos_token_ids.clone());
        if tokenizer.size > config.vocab_size {
            return Err(fail(format!(
                "tokenizer has {} tokens, config.json's vocab_size is {}",
                tokenizer.size, config.vocab_size
            )));
        }
        let ids = tokenizer.bos.iter().map(|&id| ("bos_token_id", id));
        for (field, id) in ids.chain(tokenizer.eos.iter().map(|&id| ("eos_token_id", id))) {
            if tokenizer.inner.id_to_token(id).is_none() {
                return Err(fail(format!(
                    "config.json's {field} {id} is not a token of this tokenizer"
                )));
            }
        }
        Ok(tokenizer)
    }

    fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Vec<u32>) -> Tokenizer {
        let size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        Tokenizer {
            inner,
            bos,
            eos,
            size,
        }
    }

    /// The ids of `text`, with the BOS id first when `add_bos` (an error
    /// when the config has none); never an EOS.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Invalid {
            op: "Tokenizer::encode",
            arg: "text",
            what: e.to_string(),
        })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos {
            ids.push(self.bos.ok_or_else(|| Error::Invalid {
                op: "Tokenizer::encode",
                arg: "add_bos",
                what: "config.json has no bos_token_id".into(),
            })?);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens (BOS, EOS, unknown) left out; an
    /// id that is no token of this tokenizer is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let invalid = |what: String| Error::Invalid {
            op: "Tokenizer::decode",
            arg: "ids",
            what,
        };
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| self.inner.id_to_token(id).is_none())
        {
            return Err(invalid(format!(
                "ids[{i}] is {id}, not a token of this tokenizer"
            )));
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| invalid(e.to_string()))
    }

    /// The beginning-of-sequence id (config.json's `bos_token_id`), if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence ids (config.json's `eos_token_id`); the first is
    /// the one appended to training rows.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// One more than the largest token id, added tokens included: the rows
    /// an embedding needs at least.
    pub fn vocab_size(&self) -> usize {
        self.size
    }

    /// Saves the tokenizer as `tokenizer.json` text at `path` (written whole
    /// or not at all, see [`crate::output`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(|e| Error::Output {
            path: path.to_path_buf(),
            what: format!("cannot serialize the tokenizer: {e}"),
        })?;
        Outputs::new(&[]).write_file(path, |w| w.write_all(json.as_bytes()))
    }
}

/// The texts of a tokenizer corpus file: every string field of each JSONL
/// row, or each non-blank line that is not a JSON object.
pub fn corpus_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        what: format!("cannot read: {e}"),
    })?;
    let mut texts = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(row)) => {
                texts.extend(row.values().filter_map(|v| v.as_str().map(str::to_string)))
            }
            _ => texts.push(line.to_string()),
        }
    }
    if texts.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            what: "holds no text to train a tokenizer on".into(),
        });
    }
    Ok(texts)
}

/// Trains a small Llama-like BPE tokenizer on `texts`, `vocab_size` ids in
/// all, laid out as Llama 2's: `<unk>` = 0, `<s>` = 1 (BOS), `</s>` = 2
/// (EOS), the 256 byte-fallback tokens `<0x00>`..`<0xFF>` at 3..=258, then
/// the learned pieces, fewer when the texts offer fewer merges. Like Llama's
/// `tokenizer.json` it has a Metaspace pre-tokenizer (`▁` for spaces,
/// prepended to the first word), byte fallback (any text encodes, none to
/// `<unk>`), the decoder `Replace(▁, " ")`, `ByteFallback`, `Fuse`,
/// `Strip(1 leading space)`, and a post-processor that prepends `<s>` (which
/// [`Tokenizer::encode`] does not use).
pub fn train_bpe(texts: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    let invalid = |arg, what: String| Error::Invalid {
        op: "train_bpe",
        arg,
        what,
    };
    let failed = |e: tokenizers::Error| invalid("texts", format!("training failed: {e}"));
    let fixed = SPECIALS.len() + 256;
    if vocab_size <= fixed {
        return Err(invalid(
            "vocab_size",
            format!(
                "is {vocab_size}; it must exceed {fixed} (3 special tokens and 256 byte tokens)"
            ),
        ));
    }
    // The trainer's vocabulary: the special tokens, an alphabet of single
    // characters (rarer ones are left to byte fallback), then the merges.
    let learned = vocab_size - 256;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(learned)
        .limit_alphabet(learned - SPECIALS.len())
        .special_tokens(
            SPECIALS
                .iter()
                .map(|&t| AddedToken::from(t, true))
                .collect(),
        )
        .show_progress(false)
        .build();
    let mut pieces: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    pieces.with_pre_tokenizer(Some(Metaspace::new(SPACE_MARK, PrependScheme::First, true)));
    pieces.train(&mut trainer, texts.iter()).map_err(failed)?;
    let trained = pieces.get_model();

    // The same pieces and merges, renumbered with the byte tokens after the
    // special ones (merges name pieces by text, so they stay as they are).
    let merges: Merges = serde_json::to_value(trained)
        .and_then(|model| serde_json::from_value(model["merges"].clone()))
        .map_err(|e| invalid("texts", format!("cannot read the trained merges: {e}")))?;
    let mut learned_pieces: Vec<(String, u32)> = trained.get_vocab().into_iter().collect();
    learned_pieces.sort_by_key(|&(_, id)| id);
    let mut vocab = Vocab::default();
    let tokens = SPECIALS
        .iter()
        .map(|&t| t.to_string())
        .chain((0..=255u8).map(|b| format!("<0x{b:02X}>")))
        .chain(learned_pieces.into_iter().map(|(piece, _)| piece));
    for token in tokens {
        let next = vocab.len() as u32;
        vocab.entry(token).or_insert(next);
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(SPECIALS[0].into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(failed)?;

    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Metaspace::new(
        SPACE_MARK,
        PrependScheme::First,
        false,
    )));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_MARK.to_string(), " ")
            .map_err(failed)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    inner.with_decoder(Some(Sequence::new(decoders)));
    let prepend_bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A <s> $B:1"))
        .map_err(|e| invalid("texts", format!("post-processor: {e}")))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| invalid("texts", format!("post-processor: {e}")))?;
    inner.with_post_processor(Some(prepend_bos));
    inner
        .add_special_tokens(SPECIALS.iter().map(|&t| AddedToken::from(t, true)))
        .map_err(failed)?;
    Ok(Tokenizer::new(inner, Some(1), vec![2]))
}
