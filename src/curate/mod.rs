//! Dataset curation the Platypus way (arXiv 2308.07317, its
//! `data_pipeline/`): exact dedup, greedy near-dedup and benchmark
//! decontamination of an instruction dataset by the cosine similarity of
//! sentence embeddings.
//!
//!
//! The steps take embeddings from an [`Embedder`]:
//! - [`encoder`]: a BERT-family sentence-transformers model folder
//!   (all-MiniLM-L6-v2 first of all): WordPiece tokenizer, transformer,
//!   pooling, Normalize.
//! - [`bert`]: the BERT transformer's forward pass on the host, over packed
//!   sequences (no padding).

pub mod bert;
pub mod encoder;

use crate::progress::Progress;
use crate::Result;

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
