//! File formats in one place: safetensors checkpoints (single or sharded).
//! (`.npy` matrices are in [`crate::npy`].)

pub mod safetensors;
