//! Token embedding: out [tokens, hidden] = table[ids], the table [vocab,
//! hidden] read in its stored dtype and the rows written in the activation
//! dtype.
//!
//! Host code: [`crate::host::elementwise::gather_rows`] (a copy: its own
//! reference).

use super::{check_float, no_kernel_yet};
use crate::host;
use crate::{DType, Device, Error, Result, Tensor};

/// Rows `ids` of `table` as a new [ids.len(), hidden] tensor of `dtype`.
pub fn forward(table: &Tensor, ids: &[u32], dtype: DType) -> Result<Tensor> {
    const OP: &str = "embedding::forward";
    check_float(OP, "table", table)?;
    let &[vocab, hidden] = table.shape() else {
        return Err(Error::Shape {
            op: OP,
            arg: "table",
            expected: "[vocab, hidden]".into(),
            got: table.shape().to_vec(),
        });
    };
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::Invalid {
            op: OP,
            arg: "ids",
            what: format!("ids[{i}] = {id} is not below the vocabulary size {vocab}"),
        });
    }
    match table.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(&[ids.len(), hidden], DType::F32, &Device::Cpu)?;
            host::elementwise::gather_rows(
                host::view::weights(OP, "table", table)?,
                hidden,
                ids,
                host::view::f32s_mut(OP, "out", &mut out)?,
            );
            if dtype == DType::F32 {
                Ok(out)
            } else {
                Tensor::from_f32(
                    &out.to_f32_vec()?,
                    &[ids.len(), hidden],
                    dtype,
                    &Device::Cpu,
                )
            }
        }
        _ => Err(no_kernel_yet(OP, table.device())),
    }
}
