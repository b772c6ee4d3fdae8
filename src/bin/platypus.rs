//! The `platypus` command line.

use std::fmt::Write as _;
use std::io::Write as _;

use clap::{Parser, Subcommand};

/// Appends a line to a report string (writing to a String cannot fail).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

#[derive(Parser)]
#[command(
    name = "platypus",
    version,
    about = "CUDA kernels and tools for LoRA fine-tuning of Llama 2 the Platypus way"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What this machine offers: NVIDIA driver and devices, archs the kernels were built for, the emulator.
    Info {
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The ptxas report of every GPU kernel on every arch it was built for.
    Kernels {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cosine-similarity top-k of embeddings in .npy files (2-D float32):
    /// queries against a database, or a database against itself.
    CosineTopk {
        /// Query embeddings [m, d]; without it, the database is searched against itself.
        #[arg(long)]
        queries: Option<std::path::PathBuf>,
        /// Database embeddings [n, d].
        #[arg(long)]
        database: std::path::PathBuf,
        /// Results per query.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Self-search: compare row i with earlier rows only (greedy dedup) instead of all others.
        #[arg(long)]
        earlier_only: bool,
        /// Where to write the indices [m, k] (u32 .npy); the scores go beside it with `.scores.npy`.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where to search: `cpu`, `cuda` (device 0) or `emulated` (the
        /// kernels on the host emulator: slow, for checking).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// On `cuda`/`emulated` with --queries: database rows copied to the
        /// device per chunk (the database stays in host memory).
        #[arg(long, default_value_t = 1 << 20)]
        chunk_rows: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Info { json } => info(json),
        Command::Kernels { json } => kernels(json),
        Command::CosineTopk {
            queries,
            database,
            k,
            earlier_only,
            out,
            threads,
            device,
            chunk_rows,
        } => match cosine_topk(
            queries.as_deref(),
            &database,
            (k, earlier_only),
            out.as_deref(),
            threads,
            (&device, chunk_rows),
        ) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("platypus cosine-topk: {e}");
                std::process::exit(2);
            }
        },
    };
    // A closed pipe (`platypus kernels | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(report.as_bytes());
}

/// What `platypus info` reports.
#[derive(serde::Serialize)]
struct Info {
    version: &'static str,
    /// nvcc's version line, when the kernels were built.
    nvcc: Option<&'static str>,
    /// SASS archs of the kernels.
    cuda_archs: &'static [u32],
    /// Kernels the host emulator can run.
    emulated_kernels: usize,
    /// CUDA driver version (e.g. 13000), when a driver answered.
    driver: Option<i32>,
    /// Why there is no driver or device, when there is none.
    no_driver: Option<String>,
    devices: Vec<platypus::cuda::DeviceInfo>,
}

fn info(json: bool) -> String {
    use platypus::kernels;
    let probe = platypus::cuda::probe();
    let info = Info {
        version: env!("CARGO_PKG_VERSION"),
        nvcc: kernels::NVCC_VERSION,
        cuda_archs: kernels::CUDA_ARCHS,
        emulated_kernels: platypus::emu::kernel_names().count(),
        driver: probe.as_ref().ok().map(|(v, _)| *v),
        no_driver: probe.as_ref().err().cloned(),
        devices: probe.map(|(_, d)| d).unwrap_or_default(),
    };
    if json {
        return serde_json::to_string_pretty(&info).expect("serializing the info") + "\n";
    }
    let mut out = String::new();
    say!(out, "platypus {}", info.version);
    match info.nvcc {
        Some(v) => {
            say!(
                out,
                "kernels:  built by nvcc ({v}) for {}",
                archs(info.cuda_archs)
            );
        }
        None => {
            say!(
                out,
                "kernels:  none (built without nvcc): only the CPU and emulated devices work"
            );
        }
    }
    if info.emulated_kernels > 0 {
        say!(
            out,
            "emulator: {} kernels can run on the host emulator",
            info.emulated_kernels
        );
    } else {
        say!(out, "emulator: not built (no CUDA headers at build time)");
    }
    if let Some(why) = &info.no_driver {
        say!(out, "driver:   none: {why}");
    } else if let Some(version) = info.driver {
        say!(
            out,
            "driver:   CUDA {}.{}",
            version / 1000,
            (version % 1000) / 10
        );
    }
    if info.devices.is_empty() {
        say!(out, "devices:  none");
    }
    for d in &info.devices {
        let (major, minor) = d.compute_capability;
        let usable = info
            .cuda_archs
            .iter()
            .any(|&a| a / 10 == major as u32 && a % 10 <= minor as u32);
        say!(
            out,
            "device {}: {} (sm_{major}{minor}, {} SMs at {} MHz, {:.1} GiB at {}-bit {} MHz, {} MiB L2){}",
            d.ordinal,
            d.name,
            d.multiprocessors,
            d.clock_khz / 1000,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.memory_bus_bits,
            d.memory_clock_khz / 1000,
            d.l2_bytes >> 20,
            if usable {
                ""
            } else {
                " - no SASS for this arch in this build (PTX JIT)"
            }
        );
    }
    out
}

fn archs(list: &[u32]) -> String {
    list.iter()
        .map(|a| format!("sm_{a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(serde::Serialize)]
struct Row {
    name: &'static str,
    arch: u32,
    registers: u32,
    spill_bytes: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    barriers: u32,
    /// Threads of the kernel's __launch_bounds__ (0: none).
    max_threads: u32,
    /// Dynamic shared memory per block at launch, where the launch shape is fixed.
    dynamic_shared_bytes: Option<u32>,
    /// Theoretical occupancy at that launch shape.
    occupancy: Option<platypus::kernels::Occupancy>,
}

fn kernels(json: bool) -> String {
    let mut out = String::new();
    let mut shapes = platypus::ops::attention::kernel_launch_shapes();
    shapes.extend(platypus::ops::lora::kernel_launch_shapes());
    shapes.extend(platypus::ops::cosine_topk::kernel_launch_shapes());
    let rows: Vec<Row> = platypus::kernels::PTXAS
        .iter()
        .map(|r| {
            let shape = shapes.iter().find(|(name, _, _)| name == r.name);
            (r, shape.map(|&(_, threads, smem)| (threads, smem)))
        })
        .map(|(r, shape)| Row {
            name: r.name,
            arch: r.arch,
            registers: r.registers,
            spill_bytes: r.spill_bytes(),
            shared_bytes: r.shared_bytes,
            stack_bytes: r.stack_bytes,
            barriers: r.barriers,
            max_threads: r.max_threads,
            dynamic_shared_bytes: shape.map(|(_, smem)| smem),
            occupancy: shape
                .and_then(|(threads, smem)| platypus::kernels::occupancy(r, threads, smem)),
        })
        .collect();
    if json {
        return serde_json::to_string_pretty(&rows).expect("serializing the ptxas report") + "\n";
    }
    if rows.is_empty() {
        return "no GPU kernels in this build (nvcc was not found at build time)\n".into();
    }
    say!(
        out,
        "{:<40} {:>6} {:>5} {:>7} {:>7} {:>6} {:>5} {:>7} {:>9}  occupancy",
        "kernel",
        "arch",
        "regs",
        "spill B",
        "smem B",
        "stack",
        "bars",
        "bounds",
        "dyn smem"
    );
    for r in rows {
        let dynamic = r.dynamic_shared_bytes.map_or("-".into(), |b| b.to_string());
        let occupancy = r.occupancy.map_or("-".into(), |o| {
            format!(
                "{:.0}% ({} blocks/SM, {})",
                100.0 * o.fraction,
                o.blocks_per_sm,
                o.limiter
            )
        });
        say!(
            out,
            "{:<40} {:>6} {:>5} {:>7} {:>7} {:>6} {:>5} {:>7} {:>9}  {}",
            r.name,
            format!("sm_{}", r.arch),
            r.registers,
            r.spill_bytes,
            r.shared_bytes,
            r.stack_bytes,
            r.barriers,
            r.max_threads,
            dynamic,
            occupancy
        );
    }
    out
}

/// Runs a top-k search over .npy embeddings and reports its time (file
/// reading and writing excluded).
fn cosine_topk(
    queries: Option<&std::path::Path>,
    database: &std::path::Path,
    (k, earlier_only): (usize, bool),
    out: Option<&std::path::Path>,
    threads: Option<usize>,
    (device, chunk_rows): (&str, usize),
) -> platypus::Result<String> {
    use platypus::ops::cosine_topk::{self, Exclude};
    use platypus::{npy, Device, Tensor};
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| platypus::Error::Invalid {
                op: "cosine-topk",
                arg: "threads",
                what: e.to_string(),
            })?;
    }
    let load = |path: &std::path::Path| -> platypus::Result<Tensor> {
        let (data, shape) = npy::read_f32_matrix(path)?;
        Tensor::from_slice(&data, &shape, &Device::Cpu)
    };
    let device = match device {
        "cpu" => Device::Cpu,
        "cuda" => Device::cuda(0)?,
        "emulated" => Device::Emulated,
        other => {
            return Err(platypus::Error::Invalid {
                op: "cosine-topk",
                arg: "device",
                what: format!("is {other:?}; expected cpu, cuda or emulated"),
            })
        }
    };
    let db = load(database)?;
    let q = queries.map(load).transpose()?;
    let start = std::time::Instant::now();
    // A copy on the device, or the tensor itself on the CPU.
    let on_device = |t: &Tensor| -> platypus::Result<Option<Tensor>> {
        match device {
            Device::Cpu => Ok(None),
            _ => t.to_device(&device).map(Some),
        }
    };
    let result = match &q {
        Some(q) => {
            let q_dev = on_device(q)?;
            cosine_topk::topk_streamed(q_dev.as_ref().unwrap_or(q), &db, k, chunk_rows)?
        }
        None => {
            let exclude = if earlier_only {
                Exclude::NotEarlier
            } else {
                Exclude::SameIndex
            };
            let db_dev = on_device(&db)?;
            cosine_topk::topk_self(db_dev.as_ref().unwrap_or(&db), k, exclude)?
        }
    };
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let [m, kk] = [result.indices.shape()[0], result.indices.shape()[1]];
    if let Some(path) = out {
        npy::write_u32_matrix(path, &result.indices.to_vec::<u32>()?, [m, kk])?;
        npy::write_f32_matrix(
            &path.with_extension("scores.npy"),
            &result.scores.to_vec::<f32>()?,
            [m, kk],
        )?;
    }
    let mut report = String::new();
    say!(
        report,
        "searched {m} queries x {} rows (dim {}, k {k}) in {secs:.3} s on {}",
        db.shape()[0],
        db.shape()[1],
        match device {
            Device::Cpu => format!("{} threads", rayon::current_num_threads()),
            other => other.to_string(),
        }
    );
    Ok(report)
}
