//! LoRA fine-tuning: the step's forward and backward through the model
//! ([`step`]), AdamW with schedules and clipping ([`optim`]), micro-batches
//! padded or packed ([`batches`]), the device-memory estimate ([`memory`]),
//! the loop with its checkpoints and exact resume ([`trainer`]) and the loss
//! curve ([`plot`]).

pub mod batches;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod step;
pub mod trainer;

pub use step::{Layout, LoraGrads, StepBatch};
pub use trainer::{check_new_out, train, Resume, Run, StepLog, Summary, TrainConfig, GUARD_DIR};
