//! The GPU runtime: a device's context and stream, its memory, and kernel
//! launches from the fatbins build.rs embedded (loaded on first use).
//!
//! The CUDA driver is loaded at run time (cudarc's dynamic loading), so the
//! crate builds and runs on machines without one; every entry point checks for
//! libcuda first and returns [`Error::CudaUnavailable`] instead of panicking.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use once_cell::sync::Lazy;

use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, PinnedHostSlice,
};

use crate::error::{Error, Result};
use crate::kernels::{KernelResources, MODULES};
use crate::launch::{self, ArchLimits, LaunchConfig};

/// True if the NVIDIA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

fn check_available() -> Result<()> {
    if MODULES.is_empty() {
        return Err(Error::CudaUnavailable(
            if cfg!(feature = "cuda") {
                "this build of platypus has no GPU kernels (nvcc was not found at build time); \
                 rebuild with NVCC=/path/to/nvcc, or `pip install nvidia-cuda-nvcc nvidia-cuda-cccl` and set NVCC"
            } else {
                "this build of platypus has no GPU kernels: it was built without the `cuda` feature"
            }
            .into(),
        ));
    }
    if !driver_present() {
        return Err(Error::CudaUnavailable(
            "no NVIDIA driver found (libcuda.so could not be loaded)".into(),
        ));
    }
    Ok(())
}

/// A kernel loaded into a context: its function, its resources as the driver
/// reports them, and the largest max-dynamic-shared-memory attribute set so far.
#[derive(Clone)]
struct Loaded {
    function: CudaFunction,
    resources: KernelResources,
    shared_optin: u32,
}

/// Kernels loaded so far, per context: (CUcontext address, kernel name) ->
/// function. A function holds its module and the module its context, so a
/// cached context stays alive (and its address unique) for the process.
static LOADED: Lazy<Mutex<HashMap<(usize, &'static str), Loaded>>> = Lazy::new(Mutex::default);

/// A CUDA device as platypus uses it: a context and the stream ops run on.
/// Kernel modules are loaded into the context on first use and shared by
/// every `CudaBackend` of that context.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    limits: once_cell::sync::OnceCell<ArchLimits>,
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize) -> Result<CudaBackend> {
        check_available()?;
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Ok(CudaBackend::with(ctx, stream))
    }

    pub(crate) fn from_stream(stream: Arc<CudaStream>) -> Result<CudaBackend> {
        check_available()?;
        Ok(CudaBackend::with(stream.context().clone(), stream))
    }

    fn with(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> CudaBackend {
        CudaBackend {
            ctx,
            stream,
            limits: once_cell::sync::OnceCell::new(),
        }
    }

    /// (free, total) bytes of device memory now.
    pub(crate) fn memory_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// What this device allows a launch, from its driver's attributes.
    pub(crate) fn arch_limits(&self) -> Result<ArchLimits> {
        self.limits
            .get_or_try_init(|| {
                use sys::CUdevice_attribute::*;
                let get = |a| -> Result<u32> { Ok(self.ctx.attribute(a)?.max(0) as u32) };
                let (major, minor) = self.ctx.compute_capability()?;
                Ok(ArchLimits {
                    arch: (major * 10 + minor) as u32,
                    threads_per_block: get(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
                    block_dims: [
                        get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
                        get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
                        get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
                    ],
                    grid_dims: [
                        get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
                        get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
                        get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
                    ],
                    registers_per_block: get(CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK)?,
                    shared_default: get(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
                    shared_optin: get(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
                    registers_per_sm: get(CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)?,
                    shared_per_sm: get(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
                    warps_per_sm: get(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)? / 32,
                    blocks_per_sm: get(CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR)?,
                })
            })
            .copied()
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The stream ops are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn same_context(&self, other: &CudaBackend) -> bool {
        self.ctx.cu_ctx() == other.ctx.cu_ctx()
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    pub(crate) fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<CudaBuffer> {
        self.ctx.bind_to_thread()?;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: the stream belongs to this context; the memory is freed in CudaBuffer::drop.
            unsafe {
                let ptr = result::malloc_async(self.stream.cu_stream(), bytes)?;
                result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream())?;
                ptr
            }
        };
        Ok(CudaBuffer {
            backend: self.clone(),
            ptr,
            bytes,
            owner: Owner::Allocated,
        })
    }

    fn function(&self, kernel: &str) -> Result<Loaded> {
        let (index, name) = MODULES
            .iter()
            .enumerate()
            .find_map(|(i, (_, _, names))| names.iter().find(|n| **n == kernel).map(|n| (i, *n)))
            .ok_or_else(|| Error::Launch {
                kernel: kernel.into(),
                message: "no such kernel in the embedded fatbins".into(),
            })?;
        let ctx_key = self.ctx.cu_ctx() as usize;
        let mut loaded = LOADED.lock().unwrap();
        if let Some(f) = loaded.get(&(ctx_key, name)) {
            return Ok(f.clone());
        }
        // Load the kernel's whole module and cache all of its functions, with
        // the resources the driver reports for this device's arch.
        let arch = self.arch_limits()?.arch;
        let image = MODULES[index].1.to_vec();
        let module: Arc<CudaModule> = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))?;
        for n in MODULES[index].2 {
            let function = module.load_function(n)?;
            let attr = |a| -> Result<u32> { Ok(function.get_attribute(a)?.max(0) as u32) };
            use sys::CUfunction_attribute::*;
            let resources = KernelResources {
                name: n,
                arch,
                registers: attr(CU_FUNC_ATTRIBUTE_NUM_REGS)?,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                shared_bytes: attr(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
                stack_bytes: attr(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
                barriers: 0,
                // The driver's bound covers __launch_bounds__ and the register file.
                max_threads: attr(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            };
            loaded.insert(
                (ctx_key, n),
                Loaded {
                    function,
                    resources,
                    shared_optin: 0,
                },
            );
        }
        Ok(loaded[&(ctx_key, name)].clone())
    }

    /// Launches `kernel` with the cuLaunchKernel argument array `args`, after
    /// checking it against the device's limits and the kernel's resources;
    /// opts into more than 48 KiB of shared memory (static + dynamic) when
    /// the launch needs it.
    pub(crate) fn launch(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(kernel)?;
        let checked = launch::check(kernel, cfg, Some(&f.resources), &self.arch_limits()?)?;
        if checked.shared_optin > f.shared_optin {
            f.function.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                checked.shared_optin as i32,
            )?;
            let key = (self.ctx.cu_ctx() as usize, f.resources.name);
            if let Some(l) = LOADED.lock().unwrap().get_mut(&key) {
                l.shared_optin = checked.shared_optin;
            }
        }
        self.ctx.bind_to_thread()?;
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        // SAFETY: `args` holds pointers to the kernel's parameter values, built
        // by the op from the parameter struct the kernel declares.
        unsafe {
            result::launch_kernel(
                f.function.cu_function(),
                (gx, gy, gz),
                (bx, by, bz),
                cfg.shared_bytes,
                self.stream.cu_stream(),
                args,
            )?
        };
        Ok(())
    }
}

enum Owner {
    /// Allocated by platypus; freed on drop.
    Allocated,
    /// Another crate's memory: the owner object (a CudaSlice) if it was handed
    /// over, nothing if only borrowed.
    Foreign {
        _owner: Option<Box<dyn Any + Send + Sync>>,
    },
}

/// Device memory of a tensor.
pub(crate) struct CudaBuffer {
    backend: Arc<CudaBackend>,
    ptr: u64,
    bytes: usize,
    owner: Owner,
}

impl CudaBuffer {
    pub(crate) fn foreign(
        backend: Arc<CudaBackend>,
        ptr: u64,
        bytes: usize,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> CudaBuffer {
        CudaBuffer {
            backend,
            ptr,
            bytes,
            owner: Owner::Foreign { _owner: owner },
        }
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        assert_eq!(src.len(), self.bytes, "copy size checked by the caller");
        if src.is_empty() {
            return Ok(());
        }
        self.backend.ctx.bind_to_thread()?;
        let stream = &self.backend.stream;
        // SAFETY: ptr holds `bytes` bytes; we wait for the copy before `src` can go away.
        unsafe { result::memcpy_htod_async(self.ptr, src, stream.cu_stream())? };
        Ok(stream.synchronize()?)
    }

    pub(crate) fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        assert_eq!(dst.len(), self.bytes, "copy size checked by the caller");
        if dst.is_empty() {
            return Ok(());
        }
        self.backend.ctx.bind_to_thread()?;
        let stream = &self.backend.stream;
        // SAFETY: as in copy_from_host.
        unsafe { result::memcpy_dtoh_async(dst, self.ptr, stream.cu_stream())? };
        Ok(stream.synchronize()?)
    }

    /// Copies `src` (same size) into this buffer: device to device on this
    /// buffer's stream when both belong to one backend (ordered after `src`'s
    /// writes, which were queued on that same stream), else through the host.
    pub(crate) fn copy_from_device(&mut self, src: &CudaBuffer) -> Result<()> {
        assert_eq!(src.bytes, self.bytes, "copy size checked by the caller");
        if self.bytes == 0 {
            return Ok(());
        }
        if !Arc::ptr_eq(&self.backend, &src.backend) {
            let mut staging = vec![0u8; src.bytes];
            src.copy_to_host(&mut staging)?;
            return self.copy_from_host(&staging);
        }
        self.backend.ctx.bind_to_thread()?;
        // SAFETY: both pointers hold `bytes` bytes of live device memory on
        // this context, and the copy is queued on the stream that uses them.
        unsafe {
            result::memcpy_dtod_async(
                self.ptr,
                src.ptr,
                self.bytes,
                self.backend.stream.cu_stream(),
            )?
        };
        Ok(())
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if matches!(self.owner, Owner::Allocated)
            && self.ptr != 0
            && self.backend.ctx.bind_to_thread().is_ok()
        {
            // SAFETY: allocated by malloc_async on this stream; work using it was queued on the same stream.
            let _ = unsafe { result::free_async(self.ptr, self.backend.stream.cu_stream()) };
        }
    }
}

/// Double-buffered host-to-device copies that overlap the work on a
/// backend's stream: chunk c goes host -> pinned staging (a CPU copy) ->
/// device buffer `c % 2` on a second stream, and the backend's stream waits
/// for that copy only; the copy into a buffer waits until the work that read
/// the buffer's previous chunk is done ([`ChunkUploader::release`]).
pub(crate) struct ChunkUploader {
    backend: Arc<CudaBackend>,
    copy_stream: Arc<CudaStream>,
    staging: [PinnedHostSlice<u8>; 2],
    device: [CudaBuffer; 2],
    /// The copy out of staging[s] into device[s] has finished.
    copied: [Option<CudaEvent>; 2],
    /// The backend's work reading device[s] has finished.
    consumed: [Option<CudaEvent>; 2],
}

impl ChunkUploader {
    /// Two staging and two device buffers of `bytes` each.
    pub(crate) fn new(backend: &Arc<CudaBackend>, bytes: usize) -> Result<ChunkUploader> {
        // SAFETY: the pinned buffers are written (upload) before any copy reads them.
        let staging = unsafe {
            [
                backend.ctx.alloc_pinned::<u8>(bytes.max(1))?,
                backend.ctx.alloc_pinned::<u8>(bytes.max(1))?,
            ]
        };
        Ok(ChunkUploader {
            backend: backend.clone(),
            copy_stream: backend.ctx.new_stream()?,
            staging,
            device: [backend.alloc_zeroed(bytes)?, backend.alloc_zeroed(bytes)?],
            copied: [None, None],
            consumed: [None, None],
        })
    }

    /// Queues the copy of `src` into device buffer `slot` and makes the
    /// backend's stream wait for it; returns the buffer's address.
    pub(crate) fn upload(&mut self, slot: usize, src: &[u8]) -> Result<u64> {
        if let Some(done) = &self.copied[slot] {
            done.synchronize()?; // staging[slot] is free again
        }
        self.staging[slot].as_mut_slice()?[..src.len()].copy_from_slice(src);
        if let Some(consumed) = &self.consumed[slot] {
            self.copy_stream.wait(consumed)?;
        }
        self.backend.ctx.bind_to_thread()?;
        let staged = &self.staging[slot].as_slice()?[..src.len()];
        // SAFETY: the device buffer holds at least src.len() bytes (sized by
        // the caller's chunk); the staging memory outlives the copy, which
        // `copied[slot]` is synchronized on before staging[slot] is rewritten
        // and before drop (Drop for ChunkUploader).
        unsafe {
            result::memcpy_htod_async(
                self.device[slot].ptr(),
                staged,
                self.copy_stream.cu_stream(),
            )?
        };
        let done = self.copy_stream.record_event(None)?;
        self.backend.stream.wait(&done)?;
        self.copied[slot] = Some(done);
        Ok(self.device[slot].ptr())
    }

    /// Records that all work reading device buffer `slot` is queued on the backend's stream.
    pub(crate) fn release(&mut self, slot: usize) -> Result<()> {
        self.consumed[slot] = Some(self.backend.stream.record_event(None)?);
        Ok(())
    }
}

impl Drop for ChunkUploader {
    fn drop(&mut self) {
        // The device buffers are freed in stream order on the backend's
        // stream; the staging memory must not go while a copy reads it.
        for done in self.copied.iter().flatten() {
            let _ = done.synchronize();
        }
    }
}

/// One CUDA device as `platypus info` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total memory in bytes.
    pub total_memory: usize,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Peak SM clock in kHz.
    pub clock_khz: u32,
    /// Peak memory clock in kHz.
    pub memory_clock_khz: u32,
    /// Memory bus width in bits.
    pub memory_bus_bits: u32,
    /// L2 cache in bytes.
    pub l2_bytes: u32,
}

/// What the driver reports: its version and the devices, or why there are none.
pub fn probe() -> std::result::Result<(i32, Vec<DeviceInfo>), String> {
    if !driver_present() {
        return Err("no NVIDIA driver found (libcuda.so could not be loaded)".into());
    }
    let err = |e: cudarc::driver::DriverError| e.to_string();
    result::init().map_err(err)?;
    let mut version = 0;
    // SAFETY: the driver is loaded and initialized.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(err)?;
    let count = result::device::get_count().map_err(err)?;
    let mut devices = Vec::new();
    for ordinal in 0..count.max(0) as usize {
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let attr = |a| ctx.attribute(a).map(|v| v.max(0) as u32).map_err(err);
        use sys::CUdevice_attribute as A;
        devices.push(DeviceInfo {
            ordinal,
            name: ctx.name().map_err(err)?,
            compute_capability: ctx.compute_capability().map_err(err)?,
            total_memory: ctx.mem_get_info().map_err(err)?.1,
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
            memory_clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
            memory_bus_bits: attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        });
    }
    Ok((version, devices))
}
