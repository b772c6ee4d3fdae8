//! The dev fixture (`../shared/fixtures/dev`, see its meta.json): a tiny
//! Llama, a PEFT adapter and one training step of transformers + PEFT.

use std::path::{Path, PathBuf};

use platypus::formats::safetensors::SafetensorsFile;
use platypus::llama::model::shift_labels;
use platypus::llama::train::{Layout, StepBatch};
use platypus::llama::TokenBatch;

/// The fixture's folder.
pub fn dev_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dev")
}

/// The fixture batch: ids, labels (unshifted), per-row lengths, batch, seq.
pub struct Step {
    pub file: SafetensorsFile,
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub lens: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl Step {
    pub fn load() -> Step {
        let file = SafetensorsFile::open(&dev_dir().join("step.safetensors")).unwrap();
        let ints = |name: &str| -> Vec<i64> {
            bytemuck::cast_slice::<u8, i64>(file.bytes(name).unwrap()).to_vec()
        };
        let shape = file.info("input_ids").unwrap().shape.clone();
        let (batch, seq) = (shape[0], shape[1]);
        let ids = ints("input_ids").iter().map(|&v| v as u32).collect();
        let mask = ints("attention_mask");
        let lens = mask
            .chunks(seq)
            .map(|row| row.iter().sum::<i64>() as u32)
            .collect();
        Step {
            ids,
            labels: ints("labels"),
            lens,
            batch,
            seq,
            file,
        }
    }

    pub fn batch(&self) -> TokenBatch<'_> {
        TokenBatch {
            ids: &self.ids,
            batch: self.batch,
            seq: self.seq,
            lens: &self.lens,
        }
    }

    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.file.load_f32(name).unwrap()
    }

    pub fn scalar(&self, name: &str) -> f64 {
        self.f32s(name)[0] as f64
    }

    /// Indices (token rows) of the real, unpadded tokens.
    pub fn real_rows(&self) -> Vec<usize> {
        (0..self.batch)
            .flat_map(|b| (0..self.lens[b] as usize).map(move |t| b * self.seq + t))
            .collect()
    }

    /// Positions 0.. of every row (what transformers uses for right padding).
    pub fn positions(&self) -> Vec<i32> {
        (0..self.batch).flat_map(|_| 0..self.seq as i32).collect()
    }

    /// The shifted labels each token's logits predict.
    pub fn targets(&self) -> Vec<i32> {
        shift_labels(&self.labels, self.seq)
    }

    /// The batch as a training step reads it, from `positions` and `targets`.
    pub fn step_batch<'a>(&'a self, positions: &'a [i32], targets: &'a [i32]) -> StepBatch<'a> {
        StepBatch {
            ids: &self.ids,
            rows: self.batch,
            seq: self.seq,
            positions,
            targets,
            layout: Layout::Padded { lens: &self.lens },
        }
    }

    /// The fixture's name of a LoRA factor's tensor under `prefix` (`grad/`, `post_step/`).
    pub fn factor_key(prefix: &str, layer: usize, path: &str, factor: char) -> String {
        format!("{prefix}base_model.model.model.layers.{layer}.{path}.lora_{factor}.default.weight")
    }
}
