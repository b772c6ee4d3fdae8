//! LoRA fine-tuning: the step's forward and backward through the model
//! ([`step`]), AdamW with schedules and clipping ([`optim`]).

pub mod optim;
pub mod step;

pub use step::{Layout, LoraGrads, StepBatch};
