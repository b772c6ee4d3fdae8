//! Token embedding: out [tokens, hidden] = table[ids], the table [vocab,
//! hidden] read in its stored dtype and the rows written in the activation
//! dtype.
//!
//! Kernels: `kernels/embedding.cu` (`embedding_{table}_{out}`, every pair of
//! f32/f16/bf16). Host code: [`crate::host::elementwise::gather_rows`].
//! Reference: [`crate::cpu::embedding`] (a plain gather).

use super::{check_aligned, check_device, check_float, check_nonempty, check_shape, to_i32};
use super::{threads_for_row, vectorizable};
use crate::host;
use crate::kernels::params::EmbeddingParams;
use crate::launch::LaunchConfig;
use crate::{DType, Device, Error, Result, Tensor};

/// Threads per block of the kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;

/// Rows `ids` of `table` as a new [ids.len(), hidden] tensor of `dtype` (any
/// float dtype) on the table's device. No ids give a [0, hidden] tensor.
pub fn forward(table: &Tensor, ids: &[u32], dtype: DType) -> Result<Tensor> {
    const OP: &str = "embedding::forward";
    if !dtype.is_float() {
        return Err(Error::DType {
            op: OP,
            arg: "dtype",
            expected: "f32, f16 or bf16".into(),
            got: dtype,
        });
    }
    let hidden = check_table(OP, table, ids)?;
    let mut out = Tensor::zeros(&[ids.len(), hidden], dtype, table.device())?;
    gather(OP, table, ids, &mut out)?;
    Ok(out)
}

/// Like [`forward`], writing into `out` ([ids.len(), hidden], any float
/// dtype, on the table's device).
pub fn forward_into(table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
    const OP: &str = "embedding::forward";
    let hidden = check_table(OP, table, ids)?;
    check_float(OP, "out", out)?;
    check_shape(OP, "out", out, &[ids.len(), hidden])?;
    check_device(OP, "out", out, table.device())?;
    check_aligned(OP, "out", out)?;
    gather(OP, table, ids, out)
}

/// Checks the table [vocab, hidden] (float, not empty) and every id; returns hidden.
fn check_table(op: &'static str, table: &Tensor, ids: &[u32]) -> Result<usize> {
    check_float(op, "table", table)?;
    let &[vocab, hidden] = table.shape() else {
        return Err(Error::Shape {
            op,
            arg: "table",
            expected: "[vocab, hidden]".into(),
            got: table.shape().to_vec(),
        });
    };
    check_nonempty(op, "table", table)?;
    check_aligned(op, "table", table)?;
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::Invalid {
            op,
            arg: "ids",
            what: format!("ids[{i}] = {id} is not below the vocabulary size {vocab}"),
        });
    }
    Ok(hidden)
}

/// The gather into a checked `out`: host code on the CPU, else the kernel.
fn gather(op: &'static str, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
    let hidden = table.shape()[1];
    if ids.is_empty() {
        return Ok(());
    }
    if let Device::Cpu = table.device() {
        let weights = host::view::weights(op, "table", table)?;
        if out.dtype() == DType::F32 {
            host::elementwise::gather_rows(
                weights,
                hidden,
                ids,
                host::view::f32s_mut(op, "out", out)?,
            );
        } else {
            let mut rows = vec![0.0f32; ids.len() * hidden];
            host::elementwise::gather_rows(weights, hidden, ids, &mut rows);
            *out = Tensor::from_f32(&rows, out.shape(), out.dtype(), &Device::Cpu)?;
        }
        return Ok(());
    }
    let device = table.device();
    let ids_t = Tensor::from_slice(ids, &[ids.len()], device)?;
    let (e_in, e_out) = (table.dtype().size(), out.dtype().size());
    let vectorized = vectorizable(&[table, out], hidden * e_in.min(e_out));
    let per_access = if vectorized { 16 / e_in.min(e_out) } else { 1 };
    let mut params = EmbeddingParams {
        table: table.device_address() as *const _,
        ids: ids_t.device_address() as *const u32,
        out: out.device_address() as *mut _,
        tokens: to_i32(op, "ids", ids.len())?,
        hidden: to_i32(op, "table", hidden)?,
        vectorized: vectorized as i32,
        pad0: 0,
    };
    let cfg = LaunchConfig::linear(
        ids.len() as u32,
        threads_for_row(hidden, per_access, THREADS),
        0,
    );
    let kernel = format!(
        "embedding_{}_{}",
        table.dtype().kernel_suffix(),
        out.dtype().kernel_suffix()
    );
    device.launch(&kernel, cfg, &mut params)
}
