//! Helpers shared by the benches: deterministic data, the work of a call
//! (bytes moved or FLOPs), the Criterion settings, and where a bench runs
//! (the CPU path or a CUDA GPU, with achieved bandwidth or tensor-core
//! throughput printed against the GPU's peak). With `PLATYPUS_BENCH_JSON=FILE`
//! every GPU result is also appended to FILE as one JSON line as soon as it
//! is measured (the GPU bundle's summary reads them).
#![allow(dead_code)] // each bench uses its own subset

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use platypus::{DType, Device};

/// Criterion settings small enough for a 2-core CPU; command-line flags
/// (`--measurement-time`, `--quick`, ...) still override them.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// `n` pseudo-random values in [-1, 1), the same for the same `seed` (a 64-bit LCG).
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // The top 24 bits, exactly representable in f32.
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The work one call does, for throughput figures.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    /// Bytes of memory read and written (memory-bound kernels).
    Bytes(u64),
    /// Floating-point operations (tensor-core kernels).
    Flops(u64),
}

/// Memory traffic of a kernel: `elems` elements of `dtype` read or written, plus `extra` bytes.
pub fn bytes(dtype: DType, elems: usize, extra: usize) -> Work {
    Work::Bytes((elems * dtype.size() + extra) as u64)
}

/// Peak memory bandwidth in GB/s of the GPUs we know, by case-insensitive
/// substrings that must all occur in the device name.
const PEAK_GBPS: &[(&[&str], f64)] = &[
    (&["A100", "80GB"], 2039.0),
    (&["A100", "40GB"], 1555.0),
    (&["H100", "PCIe"], 2000.0),
    // The SXM part calls itself "NVIDIA H100 80GB HBM3".
    (&["H100", "SXM"], 3350.0),
    (&["H100", "HBM3"], 3350.0),
    (&["H200"], 4800.0),
];

/// Dense bf16 tensor-core peak in TFLOP/s, matched like [`PEAK_GBPS`].
const PEAK_BF16_TFLOPS: &[(&[&str], f64)] = &[
    (&["A100"], 312.0),
    (&["H100", "PCIe"], 756.0),
    (&["H100", "SXM"], 989.0),
    (&["H100", "HBM3"], 989.0),
    (&["H200"], 989.0),
];

/// The peak of the GPU called `name` in `table`, if it is there.
fn peak(table: &[(&[&str], f64)], name: &str) -> Option<f64> {
    let name = name.to_lowercase();
    table
        .iter()
        .find(|(parts, _)| parts.iter().all(|p| name.contains(&p.to_lowercase())))
        .map(|&(_, peak)| peak)
}

/// A CUDA GPU and the bandwidth achieved by each bench run on it so far.
pub struct Gpu {
    /// The device the tensors live on.
    device: Device,
    /// Its name as the driver reports it.
    name: String,
    /// Bench id, work per call, median seconds per call.
    results: Vec<(String, Work, f64)>,
    /// Name of the group being benched.
    group: String,
}

impl Gpu {
    /// Appends one result to the `PLATYPUS_BENCH_JSON` file, if set: bench
    /// id, work, median seconds per call, rate and % of the known peak.
    fn record(&self, bench: &str, work: Work, secs: f64) {
        use std::io::Write as _;
        let Ok(path) = std::env::var("PLATYPUS_BENCH_JSON") else {
            return;
        };
        let (work, rate, unit, table) = match work {
            Work::Bytes(b) => (b, b as f64 / secs / 1e9, "GB/s", PEAK_GBPS),
            Work::Flops(f) => (f, f as f64 / secs / 1e12, "TFLOP/s", PEAK_BF16_TFLOPS),
        };
        let peak = peak(table, &self.name);
        let line = serde_json::json!({
            "bench": bench,
            "seconds": secs,
            "work": work,
            "unit": unit,
            "rate": rate,
            "device": self.name,
            "peak": peak,
            "percent_of_peak": peak.map(|p| 100.0 * rate / p),
        });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            panic!("PLATYPUS_BENCH_JSON {path}: {e}");
        }
    }
}

/// Where a bench runs.
pub enum Target {
    /// `Device::Cpu` (the host code where the op has it, else the reference).
    Cpu,
    /// CUDA device 0.
    Cuda(Gpu),
}

impl Target {
    /// CUDA device 0, or `None` after printing why the GPU benches are skipped.
    pub fn cuda() -> Option<Target> {
        let device = match Device::cuda(0) {
            Ok(device) => device,
            Err(e) => {
                println!("GPU benches skipped: {e}");
                return None;
            }
        };
        let name = platypus::cuda::probe()
            .ok()
            .and_then(|(_, devices)| devices.into_iter().find(|d| d.ordinal == 0))
            .map_or_else(|| "unknown GPU".to_string(), |d| d.name);
        Some(Target::Cuda(Gpu {
            device,
            name,
            results: Vec::new(),
            group: String::new(),
        }))
    }

    /// The device to put the bench's tensors on.
    pub fn device(&self) -> &Device {
        match self {
            Target::Cpu => &Device::Cpu,
            Target::Cuda(gpu) => &gpu.device,
        }
    }

    /// Short name for benchmark group names.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Cuda(_) => "cuda",
        }
    }

    /// A benchmark group called `name`, whose results this target records.
    pub fn group<'c>(&mut self, c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
        if let Target::Cuda(gpu) = self {
            gpu.group = name.to_string();
        }
        c.benchmark_group(name)
    }

    /// Benches `op`, which does `work` per call, as `id` in `group` (Criterion
    /// prints FLOPs as elements/s). On a GPU every call is followed by a
    /// synchronize inside the timed region.
    pub fn bench<R>(
        &mut self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        work: Work,
        mut op: impl FnMut() -> R,
    ) {
        group.throughput(match work {
            Work::Bytes(b) => Throughput::Bytes(b),
            Work::Flops(f) => Throughput::Elements(f),
        });
        let gpu = match self {
            Target::Cpu => {
                group.bench_function(id, |b| b.iter(&mut op));
                return;
            }
            Target::Cuda(gpu) => gpu,
        };
        let mut per_call = Vec::new();
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(op());
                    gpu.device.synchronize().expect("CUDA synchronize failed");
                }
                let elapsed = start.elapsed();
                per_call.push(elapsed.as_secs_f64() / iters as f64);
                elapsed
            })
        });
        // Empty when a command-line filter skipped this bench.
        if !per_call.is_empty() {
            per_call.sort_by(f64::total_cmp);
            let median = per_call[per_call.len() / 2];
            gpu.record(&format!("{}/{id}", gpu.group), work, median);
            gpu.results.push((id.to_string(), work, median));
        }
    }

    /// Median seconds per call of the last bench run on a GPU (None on the
    /// CPU, or when a filter skipped it).
    pub fn last_seconds(&self) -> Option<f64> {
        match self {
            Target::Cpu => None,
            Target::Cuda(gpu) => gpu.results.last().map(|&(_, _, secs)| secs),
        }
    }

    /// Prints, for a GPU, the achieved GB/s or TFLOP/s of each bench of
    /// `group` against the device's peak, and forgets them; does nothing for
    /// the CPU.
    pub fn report(&mut self, group: &str) {
        let Target::Cuda(gpu) = self else { return };
        for (id, work, secs) in gpu.results.drain(..) {
            let (rate, unit, table) = match work {
                Work::Bytes(b) => (b as f64 / secs / 1e9, "GB/s", PEAK_GBPS),
                Work::Flops(f) => (f as f64 / secs / 1e12, "TFLOP/s", PEAK_BF16_TFLOPS),
            };
            match peak(table, &gpu.name) {
                Some(peak) => println!(
                    "{group}/{id}: {rate:.1} {unit}, {:.1}% of the {peak:.0} {unit} peak of {}",
                    100.0 * rate / peak,
                    gpu.name
                ),
                None => println!(
                    "{group}/{id}: {rate:.1} {unit} ({}: peak unknown)",
                    gpu.name
                ),
            }
        }
    }
}

/// Runs `bench_target` on the CPU shapes, then on the GPU shapes if there is a GPU.
pub fn cpu_then_gpu<S>(
    c: &mut Criterion,
    bench_target: fn(&mut Criterion, Target, &[S]),
    cpu: &[S],
    gpu: &[S],
) {
    bench_target(c, Target::Cpu, cpu);
    if let Some(target) = Target::cuda() {
        bench_target(c, target, gpu);
    }
}

/// The `main` of a bench binary: `bench_target` on the CPU shapes, then on
/// the GPU shapes if there is a GPU ([`cpu_then_gpu`]), under [`config`].
#[allow(unused_macros)] // as dead_code above
macro_rules! cpu_then_gpu_main {
    ($bench_target:expr, $cpu:expr, $gpu:expr) => {
        fn benches(c: &mut criterion::Criterion) {
            common::cpu_then_gpu(c, $bench_target, $cpu, $gpu);
        }
        criterion::criterion_group! {
            name = group;
            config = common::config();
            targets = benches
        }
        criterion::criterion_main!(group);
    };
}
#[allow(unused_imports)]
pub(crate) use cpu_then_gpu_main;
