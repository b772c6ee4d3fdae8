//! Devices ([`Device`]) and element types ([`DType`], [`Element`]).

use std::fmt;
use std::sync::Arc;

use crate::cuda::CudaBackend;
use crate::error::Result;

/// Where tensors live and ops run.
///
/// - `Cpu`: host memory; ops run the multi-threaded host code
///   (`src/host`: GEMM, attention, RoPE, the model's elementwise ops, the
///   fused loss; `ops::cosine_topk`'s host path) where there is one, and the
///   references in [`crate::cpu`] otherwise.
/// - `Emulated`: host memory, ops launch the CUDA kernels on the host emulator
///   (same .cu source, launch configuration and arguments as on the GPU).
/// - `Cuda`: a GPU through the CUDA driver (loaded at run time).
#[derive(Clone)]
pub enum Device {
    /// Host memory and host code.
    Cpu,
    /// The CUDA kernels, run on the host emulator.
    Emulated,
    /// A CUDA device with its stream.
    Cuda(Arc<CudaBackend>),
}

impl Device {
    /// The CUDA device `ordinal`, on a new stream. Errors (never panics) when
    /// there is no driver, no such device, or the crate was built without nvcc.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(Arc::new(CudaBackend::new(ordinal)?)))
    }

    /// Runs the ops of this device on `stream`, a stream another crate owns
    /// (its context and device are used as they are).
    pub fn from_cuda_stream(stream: Arc<cudarc::driver::CudaStream>) -> Result<Device> {
        Ok(Device::Cuda(Arc::new(CudaBackend::from_stream(stream)?)))
    }

    /// Waits until all work queued on this device has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cuda(c) => c.synchronize(),
            Device::Cpu | Device::Emulated => Ok(()),
        }
    }

    /// (free, total) bytes of a CUDA device's memory; `None` for host memory.
    pub fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        match self {
            Device::Cuda(c) => Ok(Some(c.memory_info()?)),
            Device::Cpu | Device::Emulated => Ok(None),
        }
    }

    /// True if `self` and `other` are the same device (and, for CUDA, the same context).
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) | (Device::Emulated, Device::Emulated) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.same_context(b),
            _ => false,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Emulated => write!(f, "emulated"),
            Device::Cuda(c) => write!(f, "cuda:{}", c.ordinal()),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (positions, indices).
    I32,
    /// 32-bit unsigned integer (indices).
    U32,
    /// 64-bit signed integer (indices).
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 => 8,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// `v` rounded to the nearest value a tensor of this dtype holds (float
    /// dtypes; the integer dtypes return `v` as it is).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F16 => half::f16::from_f32(v).to_f32(),
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            _ => v,
        }
    }

    /// Suffix of the kernel names for this element type (`rmsnorm_forward_bf16`).
    pub(crate) fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_suffix())
    }
}

/// A Rust type that is the storage of a [`DType`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// Its dtype.
    const DTYPE: DType;
    /// Converts to f32 (exactly for floats, by `as` for integers).
    fn to_f32(self) -> f32;
    /// Converts from f32, rounding to nearest.
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
        }
    };
}

element!(f32, DType::F32, |v| v, |v| v);
element!(
    half::f16,
    DType::F16,
    half::f16::to_f32,
    half::f16::from_f32
);
element!(
    half::bf16,
    DType::BF16,
    half::bf16::to_f32,
    half::bf16::from_f32
);
element!(i32, DType::I32, |v: i32| v as f32, |v: f32| v as i32);
element!(u32, DType::U32, |v: u32| v as f32, |v: f32| v as u32);
element!(i64, DType::I64, |v: i64| v as f32, |v: f32| v as i64);
