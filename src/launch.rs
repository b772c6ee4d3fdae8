//! Launches: the configuration of one (grid, block, dynamic shared memory),
//! the limits each GPU arch puts on it, and the check every launch passes
//! before it runs, on the GPU and on the emulator alike. A launch the driver
//! would refuse (too many threads or registers, shared memory past the arch's
//! limit, a grid too large) is a typed [`Error::LaunchResources`] naming the
//! kernel, the arch and what does not fit, never a CUDA failure.

use std::ffi::c_void;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::{params, KernelResources};

/// Grid, block and dynamic shared memory of a launch (cuLaunchKernel's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch.
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes,
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> u64 {
        self.block.iter().map(|&d| u64::from(d)).product()
    }
}

/// What a GPU arch allows a launch and holds per SM (CUDA programming guide,
/// "Compute capabilities"; on a real device, its driver's attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ArchLimits {
    /// SM arch, e.g. 80 for sm_80.
    pub arch: u32,
    /// Most threads in a block.
    pub threads_per_block: u32,
    /// Most threads in x, y, z of a block.
    pub block_dims: [u32; 3],
    /// Most blocks in x, y, z of a grid.
    pub grid_dims: [u32; 3],
    /// 32-bit registers a block may hold (allocated per warp in units of 256).
    pub registers_per_block: u32,
    /// Static + dynamic shared memory a block may have without opting in.
    pub shared_default: u32,
    /// Static + dynamic shared memory a block may have once its kernel sets
    /// the max-dynamic-shared-memory attribute.
    pub shared_optin: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// Shared memory per SM.
    pub shared_per_sm: u32,
    /// Resident warps per SM.
    pub warps_per_sm: u32,
    /// Resident blocks per SM.
    pub blocks_per_sm: u32,
}

/// Shared memory every arch gives a block without opting in.
pub const SHARED_DEFAULT: u32 = 48 * 1024;

/// The limits of sm_80 (A100), sm_86 (RTX 30xx, A40), sm_89 (L4, RTX 40xx)
/// and sm_90 (H100/H200); `None` for another arch.
pub fn arch_limits(arch: u32) -> Option<ArchLimits> {
    // (opt-in shared KiB per block, shared KiB per SM, warps per SM, blocks per SM)
    let (optin_kib, sm_kib, warps, blocks) = match arch {
        80 => (163, 164, 64, 32),
        86 => (99, 100, 48, 16),
        89 => (99, 100, 48, 24),
        90 => (227, 228, 64, 32),
        _ => return None,
    };
    Some(ArchLimits {
        arch,
        threads_per_block: 1024,
        block_dims: [1024, 1024, 64],
        grid_dims: [i32::MAX as u32, 65535, 65535],
        registers_per_block: 65536,
        shared_default: SHARED_DEFAULT,
        shared_optin: optin_kib * 1024,
        registers_per_sm: 65536,
        shared_per_sm: sm_kib * 1024,
        warps_per_sm: warps,
        blocks_per_sm: blocks,
    })
}

/// Registers a block of `threads` threads takes at `per_thread` each: whole
/// warps, 256-register allocation units per warp.
pub fn block_registers(per_thread: u32, threads: u64) -> u64 {
    let per_warp = u64::from(per_thread * 32).div_ceil(256) * 256;
    threads.div_ceil(32) * per_warp
}

/// A launch that passed [`check`]: what the launcher must set before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedLaunch {
    /// The value to give the kernel's max-dynamic-shared-memory attribute
    /// (the opt-in past 48 KiB), or 0 when the block fits without it.
    pub shared_optin: u32,
}

/// Checks `cfg` for `kernel` against `limits`, with the kernel's resources
/// on that arch where they are known (ptxas or the driver): block and grid
/// dimensions, threads against `__launch_bounds__`, registers against the
/// register file, static + dynamic shared memory against the arch's opt-in
/// limit. With the static size unknown, any dynamic shared memory opts in.
pub fn check(
    kernel: &str,
    cfg: &LaunchConfig,
    res: Option<&KernelResources>,
    limits: &ArchLimits,
) -> Result<CheckedLaunch> {
    let refuse = |what: String| {
        Err(Error::LaunchResources {
            kernel: kernel.to_string(),
            arch: limits.arch,
            what,
        })
    };
    let threads = cfg.threads();
    let dims_ok = cfg
        .block
        .iter()
        .zip(limits.block_dims)
        .all(|(&d, max)| d >= 1 && d <= max);
    if !dims_ok || threads > u64::from(limits.threads_per_block) {
        return refuse(format!(
            "block {:?} ({threads} threads): at most {:?} per dimension and {} threads in all",
            cfg.block, limits.block_dims, limits.threads_per_block
        ));
    }
    if !cfg
        .grid
        .iter()
        .zip(limits.grid_dims)
        .all(|(&d, max)| d >= 1 && d <= max)
    {
        return refuse(format!(
            "grid {:?}: each dimension 1 to {:?}",
            cfg.grid, limits.grid_dims
        ));
    }
    let static_bytes = res.map(|r| r.shared_bytes);
    if let Some(r) = res {
        if r.max_threads != 0 && threads > u64::from(r.max_threads) {
            return refuse(format!(
                "{threads} threads per block, more than its __launch_bounds__ ({})",
                r.max_threads
            ));
        }
        let registers = block_registers(r.registers, threads);
        if registers > u64::from(limits.registers_per_block) {
            return refuse(format!(
                "{threads} threads x {} registers take {registers} registers, more than the {} a block may have",
                r.registers, limits.registers_per_block
            ));
        }
    }
    let total = u64::from(static_bytes.unwrap_or(0)) + u64::from(cfg.shared_bytes);
    if total > u64::from(limits.shared_optin) {
        return refuse(format!(
            "{} bytes of static + {} of dynamic shared memory, more than the {} a block may have",
            static_bytes.unwrap_or(0),
            cfg.shared_bytes,
            limits.shared_optin
        ));
    }
    let optin = match static_bytes {
        Some(_) => total > u64::from(limits.shared_default),
        None => cfg.shared_bytes > 0,
    };
    Ok(CheckedLaunch {
        shared_optin: if optin { cfg.shared_bytes } else { 0 },
    })
}

/// Marks the structs of `kernels/params.h` that kernels take as their only argument.
pub(crate) trait KernelParams {}
impl KernelParams for params::RmsNormForwardParams {}
impl KernelParams for params::RmsNormBackwardParams {}
impl KernelParams for params::RmsNormDwReduceParams {}
impl KernelParams for params::RmsNormAddForwardParams {}
impl KernelParams for params::EmbeddingParams {}
impl KernelParams for params::SwigluParams {}
impl KernelParams for params::LayerNormForwardParams {}
impl KernelParams for params::LinearParams {}
impl KernelParams for params::RopeParams {}
impl KernelParams for params::AttentionParams {}
impl KernelParams for params::CacheWriteParams {}
impl KernelParams for params::LoraGemmParams {}
impl KernelParams for params::LoraReduceParams {}
impl KernelParams for params::LoraMergeParams {}
impl KernelParams for params::LoraPackParams {}
impl KernelParams for params::LoraAddParams {}
impl KernelParams for params::CosinePrepareParams {}
impl KernelParams for params::CosineSearchParams {}
impl KernelParams for params::CosineMergeParams {}
impl KernelParams for params::CrossEntropyRowsParams {}
impl KernelParams for params::CrossEntropyGradParams {}
impl KernelParams for params::AdamWParams {}
impl KernelParams for params::ArgmaxParams {}
impl KernelParams for params::SampleParams {}

impl Device {
    /// Launches `kernel` with `params` as its one argument. The same call runs
    /// the kernel on a GPU or on the host emulator: only the runtime under it
    /// differs, and both check the launch against their arch first.
    pub(crate) fn launch<P: KernelParams>(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut P,
    ) -> Result<()> {
        let mut args: [*mut c_void; 1] = [params as *mut P as *mut c_void];
        match self {
            Device::Cuda(c) => c.launch(kernel, &cfg, &mut args),
            Device::Emulated => crate::emu::launch(kernel, &cfg, &mut args),
            Device::Cpu => Err(Error::Launch {
                kernel: kernel.into(),
                message: "kernels do not run on Device::Cpu".into(),
            }),
        }
    }

    /// The limits of the arch this device's kernels launch on: the GPU's,
    /// or the one the emulator stands in for ([`crate::emu::arch`]); `None`
    /// on [`Device::Cpu`], where no kernel runs.
    pub fn arch_limits(&self) -> Result<Option<ArchLimits>> {
        match self {
            Device::Cuda(c) => c.arch_limits().map(Some),
            Device::Emulated => Ok(arch_limits(crate::emu::arch())),
            Device::Cpu => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(registers: u32, shared_bytes: u32, max_threads: u32) -> KernelResources {
        KernelResources {
            name: "k",
            arch: 80,
            registers,
            spill_store_bytes: 0,
            spill_load_bytes: 0,
            shared_bytes,
            stack_bytes: 0,
            barriers: 1,
            max_threads,
        }
    }

    fn refusal(r: Result<CheckedLaunch>) -> String {
        match r {
            Err(e @ Error::LaunchResources { .. }) => e.to_string(),
            other => panic!("expected a LaunchResources error, got {other:?}"),
        }
    }

    #[test]
    fn static_shared_memory_counts_toward_the_opt_in() {
        let sm80 = arch_limits(80).unwrap();
        // 128 B static + 48 KiB dynamic: past the default, so the launch must opt in.
        let c = check(
            "k",
            &LaunchConfig::linear(1, 256, 48 * 1024),
            Some(&res(32, 128, 256)),
            &sm80,
        )
        .unwrap();
        assert_eq!(c.shared_optin, 48 * 1024);
        let c = check(
            "k",
            &LaunchConfig::linear(1, 256, 48 * 1024 - 128),
            Some(&res(32, 128, 256)),
            &sm80,
        )
        .unwrap();
        assert_eq!(c.shared_optin, 0);
        // Static size unknown: any dynamic shared memory opts in.
        let c = check("k", &LaunchConfig::linear(1, 256, 1024), None, &sm80).unwrap();
        assert_eq!(c.shared_optin, 1024);
    }

    #[test]
    fn each_arch_has_its_own_shared_memory_limit() {
        let cfg = LaunchConfig::linear(1, 256, 120 * 1024);
        let r = res(32, 128, 256);
        assert!(check("k", &cfg, Some(&r), &arch_limits(80).unwrap()).is_ok());
        assert!(check("k", &cfg, Some(&r), &arch_limits(90).unwrap()).is_ok());
        for arch in [86, 89] {
            let e = refusal(check("k", &cfg, Some(&r), &arch_limits(arch).unwrap()));
            assert!(
                e.contains(&format!("sm_{arch}"))
                    && e.contains("128 bytes of static + 122880 of dynamic")
                    && e.contains("101376"),
                "{e}"
            );
        }
        // Exactly at sm_80's limit, and one byte past it.
        let sm80 = arch_limits(80).unwrap();
        assert!(check(
            "k",
            &LaunchConfig::linear(1, 256, 163 * 1024 - 128),
            Some(&r),
            &sm80
        )
        .is_ok());
        refusal(check(
            "k",
            &LaunchConfig::linear(1, 256, 163 * 1024 - 127),
            Some(&r),
            &sm80,
        ));
    }

    #[test]
    fn threads_registers_and_grid_are_checked() {
        let sm80 = arch_limits(80).unwrap();
        let e = refusal(check(
            "k",
            &LaunchConfig::linear(1, 512, 0),
            Some(&res(32, 0, 256)),
            &sm80,
        ));
        assert!(e.contains("__launch_bounds__ (256)"), "{e}");
        // 255 registers round to 8192 per warp: 8 warps fit, 9 do not.
        assert!(check(
            "k",
            &LaunchConfig::linear(1, 256, 0),
            Some(&res(255, 0, 0)),
            &sm80
        )
        .is_ok());
        let e = refusal(check(
            "k",
            &LaunchConfig::linear(1, 288, 0),
            Some(&res(255, 0, 0)),
            &sm80,
        ));
        assert!(e.contains("73728 registers"), "{e}");
        let e = refusal(check("k", &LaunchConfig::linear(1, 2048, 0), None, &sm80));
        assert!(e.contains("2048 threads"), "{e}");
        let grid = LaunchConfig {
            grid: [1, 65536, 1],
            block: [32, 1, 1],
            shared_bytes: 0,
        };
        let e = refusal(check("k", &grid, None, &sm80));
        assert!(e.contains("grid [1, 65536, 1]"), "{e}");
        let zero = LaunchConfig::linear(0, 32, 0);
        refusal(check("k", &zero, None, &sm80));
    }
}
