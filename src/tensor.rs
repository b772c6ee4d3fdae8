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
/// AddressSanitizer sees an emulated kernel that runs past the end), or
/// memory the caller lent for one call ([`Tensor::with_borrowed`]).
pub(crate) struct HostBuffer {
    ptr: NonNull<u8>,
    bytes: usize,
    /// False for lent memory: never freed here.
    owned: bool,
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
            return Ok(HostBuffer {
                ptr,
                bytes,
                owned: true,
            });
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
        Ok(HostBuffer {
            ptr,
            bytes,
            owned: true,
        })
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
        if self.owned && self.bytes != 0 {
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
        const OP: &str = "Tensor::from_cuda_slice";
        let backend = cuda_backend(device, OP)?;
        let bytes = cuda_slice_bytes(OP, slice.len(), shape, T::DTYPE)?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(backend.stream());
            ptr
        };
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

    /// Runs `f` on `slice` (device memory another crate owns through
    /// cudarc) seen as a tensor of `shape` on `device`, without copying it
    /// or taking it: the tensor borrows the slice for the call. cudarc's
    /// stream ordering is kept: the slice's pending writes are waited for
    /// on `device`'s stream before `f`, and the owner's later use waits for
    /// what `f` queued.
    pub fn with_cuda_slice<T: Element + cudarc::driver::DeviceRepr, R>(
        slice: &cudarc::driver::CudaSlice<T>,
        shape: &[usize],
        device: &Device,
        f: impl FnOnce(&Tensor) -> Result<R>,
    ) -> Result<R> {
        use cudarc::driver::DevicePtr;
        const OP: &str = "Tensor::with_cuda_slice";
        let backend = cuda_backend(device, OP)?;
        let bytes = cuda_slice_bytes(OP, slice.len(), shape, T::DTYPE)?;
        let (ptr, _sync) = slice.device_ptr(backend.stream());
        let t = Tensor::foreign_cuda(backend, ptr, bytes, shape, T::DTYPE, device);
        f(&t)
    }

    /// As [`Tensor::with_cuda_slice`], writable. `f` must leave the tensor
    /// in place: replacing it aborts the process, because the borrowed
    /// tensor could then outlive the slice.
    pub fn with_cuda_slice_mut<T: Element + cudarc::driver::DeviceRepr, R>(
        slice: &mut cudarc::driver::CudaSlice<T>,
        shape: &[usize],
        device: &Device,
        f: impl FnOnce(&mut Tensor) -> Result<R>,
    ) -> Result<R> {
        use cudarc::driver::DevicePtrMut;
        const OP: &str = "Tensor::with_cuda_slice_mut";
        let backend = cuda_backend(device, OP)?;
        let bytes = cuda_slice_bytes(OP, slice.len(), shape, T::DTYPE)?;
        let (ptr, _sync) = slice.device_ptr_mut(backend.stream());
        let mut t = Tensor::foreign_cuda(backend, ptr, bytes, shape, T::DTYPE, device);
        let result = f(&mut t);
        if !matches!(&t.storage, Storage::Cuda(c) if c.ptr() == ptr) {
            eprintln!("platypus: {OP}: the closure replaced the borrowed tensor; aborting");
            std::process::abort();
        }
        result
    }

    /// A tensor over device memory it does not own.
    fn foreign_cuda(
        backend: &Arc<CudaBackend>,
        ptr: u64,
        bytes: usize,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Tensor {
        Tensor {
            storage: Storage::Cuda(CudaBuffer::foreign(backend.clone(), ptr, bytes, None)),
            shape: shape.to_vec(),
            dtype,
            device: device.clone(),
        }
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
        Ok(Tensor::foreign_cuda(
            backend, ptr, bytes, shape, dtype, device,
        ))
    }

    /// A copy on the same device (device to device on CUDA). `Clone` does
    /// the same and panics where this returns an error.
    pub fn try_clone(&self) -> Result<Tensor> {
        self.to_device(&self.device)
    }

    /// The values as another float dtype (f32, f16, bf16): exact when
    /// widening, rounded to nearest even when narrowing; a copy when the
    /// dtype is the same. On CUDA the values pass through host memory (there
    /// is no cast kernel yet).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return self.try_clone();
        }
        if !self.dtype.is_float() || !dtype.is_float() {
            return Err(Error::DType {
                op: "Tensor::to_dtype",
                arg: if self.dtype.is_float() {
                    "dtype"
                } else {
                    "self"
                },
                expected: "f32, f16 or bf16".into(),
                got: if self.dtype.is_float() {
                    dtype
                } else {
                    self.dtype
                },
            });
        }
        Tensor::from_f32(&self.to_f32_vec()?, &self.shape, dtype, &self.device)
    }

    /// Runs `f` on `data` seen as a tensor of `shape` on `device` (`Cpu` or
    /// `Emulated`) without copying it: the tensor borrows `data` for the
    /// call. Ops check its alignment as for any tensor (kernels on the
    /// emulator want 16-byte rows for their vector paths).
    pub fn with_borrowed<T: Element, R>(
        data: &[T],
        shape: &[usize],
        device: &Device,
        f: impl FnOnce(&Tensor) -> Result<R>,
    ) -> Result<R> {
        // SAFETY: the tensor is only lent to `f` by shared reference, so it
        // cannot outlive the borrow of `data`, and nothing writes through it.
        let t = unsafe {
            Tensor::lent(
                "Tensor::with_borrowed",
                data.as_ptr(),
                data.len(),
                shape,
                device,
            )?
        };
        f(&t)
    }

    /// As [`Tensor::with_borrowed`], writable: what `f` writes into the
    /// tensor lands in `data`. `f` must leave that tensor in place: replacing
    /// it (`std::mem::swap`, an assignment) aborts the process, because the
    /// borrowed tensor could then outlive `data`.
    pub fn with_borrowed_mut<T: Element, R>(
        data: &mut [T],
        shape: &[usize],
        device: &Device,
        f: impl FnOnce(&mut Tensor) -> Result<R>,
    ) -> Result<R> {
        let ptr = data.as_mut_ptr();
        // SAFETY: `data` is borrowed mutably for this whole call; the check
        // below stops a tensor that escaped `f` from outliving it.
        let mut t =
            unsafe { Tensor::lent("Tensor::with_borrowed_mut", ptr, data.len(), shape, device)? };
        let result = f(&mut t);
        let in_place =
            matches!(&t.storage, Storage::Host(h) if !h.owned && h.ptr.as_ptr() == ptr.cast());
        if !in_place {
            eprintln!("platypus: Tensor::with_borrowed_mut: the closure replaced the borrowed tensor; aborting");
            std::process::abort();
        }
        result
    }

    /// A tensor over `len` elements at `ptr` that it does not own.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` elements for as long as the tensor lives.
    unsafe fn lent<T: Element>(
        op: &'static str,
        ptr: *const T,
        len: usize,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let bytes = checked_bytes(op, shape, T::DTYPE)?;
        if len != elem_count(shape) {
            return Err(Error::Invalid {
                op,
                arg: "data",
                what: format!(
                    "has {len} elements, shape {shape:?} needs {}",
                    elem_count(shape)
                ),
            });
        }
        if let Device::Cuda(_) = device {
            return Err(Error::Invalid {
                op,
                arg: "device",
                what:
                    "host memory cannot be lent to a CUDA device: copy it with Tensor::from_slice"
                        .into(),
            });
        }
        let ptr = NonNull::new(ptr as *mut u8).expect("a slice's pointer is never null");
        Ok(Tensor {
            storage: Storage::Host(HostBuffer {
                ptr,
                bytes,
                owned: false,
            }),
            shape: shape.to_vec(),
            dtype: T::DTYPE,
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

impl Clone for Tensor {
    /// A copy on the same device ([`Tensor::try_clone`]); panics when the
    /// memory for it cannot be had or the device fails, as `Vec` does.
    fn clone(&self) -> Tensor {
        self.try_clone()
            .unwrap_or_else(|e| panic!("Tensor::clone: {e}"))
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

/// The bytes of a `len`-element slice of `dtype` taken as `shape`, or the
/// error naming the mismatch.
fn cuda_slice_bytes(op: &'static str, len: usize, shape: &[usize], dtype: DType) -> Result<usize> {
    let bytes = checked_bytes(op, shape, dtype)?;
    if len != elem_count(shape) {
        return Err(Error::Invalid {
            op,
            arg: "slice",
            what: format!(
                "has {len} elements, shape {shape:?} needs {}",
                elem_count(shape)
            ),
        });
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rmsnorm;

    #[test]
    fn borrowed_host_memory_is_read_and_written_in_place() {
        for dev in [Device::Cpu, Device::Emulated] {
            let x: Vec<f32> = (0..2 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
            let w = Tensor::from_slice(&vec![1.5f32; 64], &[64], &dev).unwrap();
            let copied =
                rmsnorm::forward(&Tensor::from_slice(&x, &[2, 64], &dev).unwrap(), &w, 1e-5)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
            let lent = Tensor::with_borrowed(&x, &[2, 64], &dev, |t| {
                assert_eq!(t.device_address(), x.as_ptr() as u64, "no copy");
                rmsnorm::forward(t, &w, 1e-5)?.to_vec::<f32>()
            })
            .unwrap();
            assert_eq!(lent, copied);
            // Written through: the op's output lands in the caller's slice.
            let mut y = vec![0f32; 2 * 64];
            let xt = Tensor::from_slice(&x, &[2, 64], &dev).unwrap();
            Tensor::with_borrowed_mut(&mut y, &[2, 64], &dev, |t| {
                rmsnorm::forward_into(&xt, &w, t, 1e-5)
            })
            .unwrap();
            assert_eq!(y, copied);
        }
    }

    #[test]
    fn borrowing_checks_its_input() {
        let x = [1f32; 6];
        let e = Tensor::with_borrowed(&x, &[4, 2], &Device::Cpu, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("has 6 elements"), "{e}");
    }

    #[test]
    fn clone_copies_and_to_dtype_rounds_once() {
        let dev = Device::Emulated;
        let a =
            Tensor::from_f32(&[1.0, 1.0 + 1.0 / 1024.0, -3.25], &[3], DType::F32, &dev).unwrap();
        let b = a.clone();
        assert_ne!(a.device_address(), b.device_address());
        assert_eq!(b.to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
        let h = a.to_dtype(DType::BF16).unwrap();
        // 1 + 2^-10 is not a bf16: it rounds to 1 (nearest even).
        assert_eq!(h.to_f32_vec().unwrap(), [1.0, 1.0, -3.25]);
        assert_eq!(
            h.to_dtype(DType::F16).unwrap().to_f32_vec().unwrap(),
            [1.0, 1.0, -3.25]
        );
        let i = Tensor::from_slice(&[1u32, 2], &[2], &dev).unwrap();
        assert!(matches!(
            i.to_dtype(DType::F32),
            Err(Error::DType { arg: "self", .. })
        ));
        assert!(matches!(
            a.to_dtype(DType::U32),
            Err(Error::DType { arg: "dtype", .. })
        ));
    }
}
