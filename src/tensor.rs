//! [`Tensor`]: a contiguous, row-major array of one [`DType`] bound to a [`Device`].

use std::alloc::{self, Layout};
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::cuda::{CudaBackend, CudaBuffer};
use crate::device::{DType, Device, Element};
use crate::error::{Error, Result};

/// Alignment of host allocations: what cudaMalloc guarantees, so the kernels'
/// 128-bit paths see the same alignment on the emulator as on a GPU.
const HOST_ALIGN: usize = 256;

/// Exactly `bytes` of host memory aligned to [`HOST_ALIGN`] (exact, so that
/// AddressSanitizer sees an emulated kernel that runs past the end).
pub(crate) struct HostBuffer {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: a HostBuffer owns its allocation like a Vec<u8> does.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `bytes` zeroed bytes, or `Error::Invalid` when the allocation fails.
    fn zeroed(bytes: usize) -> Result<HostBuffer> {
        if bytes == 0 {
            // An aligned dangling pointer: never read, written or freed.
            let ptr = NonNull::new(HOST_ALIGN as *mut u8).unwrap();
            return Ok(HostBuffer { ptr, bytes });
        }
        let refused = || Error::Invalid {
            op: "Tensor::zeros",
            arg: "shape",
            what: format!("{bytes} bytes of host memory could not be allocated"),
        };
        let layout = Layout::from_size_align(bytes, HOST_ALIGN).map_err(|_| refused())?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(refused)?;
        Ok(HostBuffer { ptr, bytes })
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for `bytes` bytes (or bytes == 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.bytes) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.bytes) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.bytes != 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align(self.bytes, HOST_ALIGN).unwrap(),
                )
            }
        }
    }
}

pub(crate) enum Storage {
    Host(HostBuffer),
    Cuda(CudaBuffer),
}

/// A contiguous, row-major tensor on a device. Every tensor is contiguous by
/// construction (there are no strided views), so ops never see a gap.
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
}

fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Bytes of a `dtype` tensor of `shape`, or `Error::Invalid` when the element
/// count or the byte count overflows, or the bytes exceed what one allocation
/// may hold (`isize::MAX`).
fn checked_bytes(op: &'static str, shape: &[usize], dtype: DType) -> Result<usize> {
    let bytes = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .filter(|&b| b <= isize::MAX as usize);
    bytes.ok_or_else(|| Error::Invalid {
        op,
        arg: "shape",
        what: format!("{shape:?} of {dtype} is more than one allocation can hold"),
    })
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let bytes = checked_bytes("Tensor::zeros", shape, dtype)?;
        let storage = match device {
            Device::Cpu | Device::Emulated => Storage::Host(HostBuffer::zeroed(bytes)?),
            Device::Cuda(c) => Storage::Cuda(c.alloc_zeroed(bytes)?),
        };
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            dtype,
            device: device.clone(),
        })
    }

    /// Copies `data` (row-major, `shape`) to `device`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        checked_bytes("Tensor::from_slice", shape, T::DTYPE)?;
        if data.len() != elem_count(shape) {
            return Err(Error::Invalid {
                op: "Tensor::from_slice",
                arg: "data",
                what: format!(
                    "has {} elements, shape {shape:?} needs {}",
                    data.len(),
                    elem_count(shape)
                ),
            });
        }
        Tensor::from_bytes(bytemuck::cast_slice(data), shape, T::DTYPE, device)
    }

    /// Copies `bytes` (little-endian elements of `dtype`, row-major `shape`)
    /// to `device`, keeping the dtype: how checkpoints are loaded.
    pub fn from_bytes(
        bytes: &[u8],
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let want = checked_bytes("Tensor::from_bytes", shape, dtype)?;
        if bytes.len() != want {
            return Err(Error::Invalid {
                op: "Tensor::from_bytes",
                arg: "bytes",
                what: format!(
                    "has {} bytes, shape {shape:?} of {dtype} needs {want}",
                    bytes.len()
                ),
            });
        }
        let mut t = Tensor::zeros(shape, dtype, device)?;
        match &mut t.storage {
            Storage::Host(h) => h.as_bytes_mut().copy_from_slice(bytes),
            Storage::Cuda(c) => c.copy_from_host(bytes)?,
        }
        Ok(t)
    }

    /// Converts f32 values to `dtype` (rounding to nearest) and copies them to `device`.
    pub fn from_f32(
        data: &[f32],
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_slice(data, shape, device),
            DType::F16 => Tensor::from_slice(&convert::<half::f16>(data), shape, device),
            DType::BF16 => Tensor::from_slice(&convert::<half::bf16>(data), shape, device),
            other => Err(Error::DType {
                op: "Tensor::from_f32",
                arg: "dtype",
                expected: "f32, f16 or bf16".into(),
                got: other,
            }),
        }
    }

    /// Copies the elements to the host. `T` must match the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "Tensor::to_vec",
                arg: "T",
                expected: self.dtype.to_string(),
                got: T::DTYPE,
            });
        }
        let mut out = vec![T::zeroed(); self.elem_count()];
        match &self.storage {
            Storage::Host(h) => bytemuck::cast_slice_mut(&mut out).copy_from_slice(h.as_bytes()),
            Storage::Cuda(c) => c.copy_to_host(bytemuck::cast_slice_mut(&mut out))?,
        }
        Ok(out)
    }

    /// Copies the stored bytes to the host (little-endian, row-major).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.elem_count() * self.dtype.size()];
        match &self.storage {
            Storage::Host(h) => out.copy_from_slice(h.as_bytes()),
            Storage::Cuda(c) => c.copy_to_host(&mut out)?,
        }
        Ok(out)
    }

    /// Copies a float tensor to the host as f32 (exact for f16 and bf16).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(),
            DType::F16 => Ok(self
                .to_vec::<half::f16>()?
                .into_iter()
                .map(half::f16::to_f32)
                .collect()),
            DType::BF16 => Ok(self
                .to_vec::<half::bf16>()?
                .into_iter()
                .map(half::bf16::to_f32)
                .collect()),
            other => Err(Error::DType {
                op: "Tensor::to_f32_vec",
                arg: "self",
                expected: "f32, f16 or bf16".into(),
                got: other,
            }),
        }
    }

    /// A copy of this tensor on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let mut t = Tensor::zeros(&self.shape, self.dtype, device)?;
        t.copy_from(self)?;
        Ok(t)
    }

    /// Overwrites this tensor with `src` (same shape and dtype, any devices).
    /// Between buffers of one CUDA device the copy is device to device, in
    /// stream order like a kernel; every other copy has finished on return.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        if src.shape != self.shape {
            return Err(Error::Shape {
                op: "Tensor::copy_from",
                arg: "src",
                got: src.shape.clone(),
                expected: format!("{:?}", self.shape),
            });
        }
        if src.dtype != self.dtype {
            return Err(Error::DType {
                op: "Tensor::copy_from",
                arg: "src",
                expected: self.dtype.to_string(),
                got: src.dtype,
            });
        }
        match (&src.storage, &mut self.storage) {
            (Storage::Host(src), Storage::Host(dst)) => {
                dst.as_bytes_mut().copy_from_slice(src.as_bytes())
            }
            (Storage::Host(src), Storage::Cuda(dst)) => dst.copy_from_host(src.as_bytes())?,
            (Storage::Cuda(src), Storage::Host(dst)) => src.copy_to_host(dst.as_bytes_mut())?,
            (Storage::Cuda(src), Storage::Cuda(dst)) => dst.copy_from_device(src)?,
        }
        Ok(())
    }

    /// The same data with another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Tensor> {
        checked_bytes("Tensor::reshape", shape, self.dtype)?;
        if elem_count(shape) != self.elem_count() {
            return Err(Error::Shape {
                op: "Tensor::reshape",
                arg: "shape",
                expected: format!("{} elements", self.elem_count()),
                got: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }

    /// Takes `slice` (memory another crate allocated with cudarc) as a tensor
    /// of `shape` on `device`, without copying. The slice is kept alive, and
    /// freed, by the tensor. `device` must be a CUDA device of the slice's context.
    pub fn from_cuda_slice<T: Element + cudarc::driver::DeviceRepr>(
        slice: cudarc::driver::CudaSlice<T>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        use cudarc::driver::DevicePtr;
        let backend = cuda_backend(device, "Tensor::from_cuda_slice")?;
        checked_bytes("Tensor::from_cuda_slice", shape, T::DTYPE)?;
        if slice.len() != elem_count(shape) {
            return Err(Error::Invalid {
                op: "Tensor::from_cuda_slice",
                arg: "slice",
                what: format!(
                    "has {} elements, shape {shape:?} needs {}",
                    slice.len(),
                    elem_count(shape)
                ),
            });
        }
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(backend.stream());
            ptr
        };
        let bytes = slice.len() * T::DTYPE.size();
        let owner: Box<dyn Any + Send + Sync> = Box::new(slice);
        let storage = Storage::Cuda(CudaBuffer::foreign(
            backend.clone(),
            ptr,
            bytes,
            Some(owner),
        ));
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            device: device.clone(),
        })
    }

    /// Wraps device memory another crate owns, without copying or taking ownership.
    ///
    /// # Safety
    /// `ptr` must point to at least `shape.product() * dtype.size()` bytes of
    /// device memory of `device`'s context that stay valid, and are not used
    /// concurrently by other streams, for as long as the tensor lives.
    pub unsafe fn from_raw_cuda(
        ptr: u64,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if ptr % dtype.size() as u64 != 0 {
            return Err(Error::Invalid {
                op: "Tensor::from_raw_cuda",
                arg: "ptr",
                what: format!(
                    "0x{ptr:x} is not aligned to the {}-byte elements of {dtype}",
                    dtype.size()
                ),
            });
        }
        let backend = cuda_backend(device, "Tensor::from_raw_cuda")?;
        let bytes = checked_bytes("Tensor::from_raw_cuda", shape, dtype)?;
        let storage = Storage::Cuda(CudaBuffer::foreign(backend.clone(), ptr, bytes, None));
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            dtype,
            device: device.clone(),
        })
    }

    /// The bytes of a tensor in host memory (Cpu, Emulated); None on CUDA.
    pub(crate) fn host_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Host(h) => Some(h.as_bytes()),
            Storage::Cuda(_) => None,
        }
    }

    /// As [`Tensor::host_bytes`], writable.
    pub(crate) fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.storage {
            Storage::Host(h) => Some(h.as_bytes_mut()),
            Storage::Cuda(_) => None,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the data lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }

    /// The address kernels see: a device pointer on CUDA, a host pointer on the
    /// emulator and the CPU.
    pub fn device_address(&self) -> u64 {
        match &self.storage {
            Storage::Host(h) => h.ptr.as_ptr() as u64,
            Storage::Cuda(c) => c.ptr(),
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape, self.dtype, self.device
        )
    }
}

fn convert<T: Element>(data: &[f32]) -> Vec<T> {
    data.iter().map(|&v| T::from_f32(v)).collect()
}

fn cuda_backend<'a>(device: &'a Device, op: &'static str) -> Result<&'a Arc<CudaBackend>> {
    match device {
        Device::Cuda(c) => Ok(c),
        other => Err(Error::Device {
            op,
            arg: "device",
            expected: "a CUDA device".into(),
            got: other.to_string(),
        }),
    }
}
