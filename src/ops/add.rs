//! y += t elementwise, same shape, dtype and device: the sums of a backward
//! pass (residual gradients, a projection input's gradients from q, k and v,
//! gradient accumulation over micro-batches). On the kernel devices the
//! fused LoRA module's `lora_add_scaled` kernel (scale 1; one read of y and
//! t and one write of y, 3 n bytes per element size); f32 on the host.

use super::{check_device, check_dtype, check_float, check_shape};
use crate::kernels::params::LoraAddParams;
use crate::launch::LaunchConfig;
use crate::{DType, Device, Error, Result, Tensor};

/// y += t.
pub fn add_assign(y: &mut Tensor, t: &Tensor) -> Result<()> {
    const OP: &str = "add::add_assign";
    check_float(OP, "y", y)?;
    check_shape(OP, "t", t, y.shape())?;
    check_dtype(OP, "t", t, y.dtype())?;
    check_device(OP, "t", t, y.device())?;
    let n = y.elem_count();
    if n == 0 {
        return Ok(());
    }
    match (y.device().clone(), y.dtype()) {
        (Device::Cpu, DType::F32) => {
            let t = crate::host::view::f32s(OP, "t", t)?;
            crate::host::elementwise::add(crate::host::view::f32s_mut(OP, "y", y)?, t);
            Ok(())
        }
        (Device::Cpu, dtype) => {
            let sum: Vec<f32> = y
                .to_f32_vec()?
                .iter()
                .zip(t.to_f32_vec()?)
                .map(|(a, b)| a + b)
                .collect();
            *y = Tensor::from_f32(&sum, y.shape(), dtype, &Device::Cpu)?;
            Ok(())
        }
        (device, dtype) => {
            if dtype == DType::F32 {
                return Err(Error::DType {
                    op: OP,
                    arg: "y",
                    expected: "f16 or bf16 on the kernel devices (fp32 sums run on Device::Cpu)"
                        .into(),
                    got: dtype,
                });
            }
            let blocks = u32::try_from(n.div_ceil(256)).map_err(|_| Error::Invalid {
                op: OP,
                arg: "y",
                what: format!("{n} elements are too many for one launch"),
            })?;
            let mut p = LoraAddParams {
                y: y.device_address() as *mut _,
                t: t.device_address() as *const _,
                n: n as i64,
                scale: 1.0,
                pad0: 0,
            };
            device.launch(
                &format!("lora_add_scaled_{}", dtype.kernel_suffix()),
                LaunchConfig::linear(blocks, 256, 0),
                &mut p,
            )
        }
    }
}
