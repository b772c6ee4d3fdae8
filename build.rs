//! Builds the kernels in `kernels/` two ways:
//!
//! 1. for the GPU with nvcc: one fatbin per `.cu` file with SASS for every arch
//!    in `PLATYPUS_CUDA_ARCHS` (default `80;86;89;90`) plus PTX of the lowest,
//!    embedded in the library; the `ptxas -v` report of every kernel is kept;
//! 2. for the host emulator with the system C++ compiler and
//!    `kernels/emu/cuda_emu.h`, linked into the library as `platypus_emu`.
//!
//! Generated files land in `OUT_DIR` and are `include!`d by `src/kernels.rs`
//! and `src/emu`. The Rust form of `kernels/params.h` is committed
//! (`src/kernel_params.rs`; `tests/bindings.rs` regenerates it with bindgen
//! and fails when it is stale), so a build needs no libclang.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One kernel's resources for one arch, from `ptxas -v`.
#[derive(Default, Debug, Clone)]
struct PtxasRecord {
    name: String,
    arch: u32,
    registers: u32,
    spill_store_bytes: u32,
    spill_load_bytes: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    barriers: u32,
    /// Threads of the kernel's `__launch_bounds__` (`.maxntid` in its PTX), 0 if none.
    max_threads: u32,
}

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PLATYPUS_CUDA_ARCHS",
        "PLATYPUS_REQUIRE_CUDA",
        "PLATYPUS_EMU_ASAN",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(platypus_emu_asan)");
    println!("cargo::rustc-check-cfg=cfg(platypus_emu_memcheck)");

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = root.join("kernels");
    let sources = cu_files(&kernels);

    // The `cuda` feature (on by default) asks for the GPU kernels; without it
    // nvcc is not looked for and nothing is said about it.
    let want_kernels = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let (nvcc, nvcc_note) = if want_kernels {
        find_nvcc()
    } else {
        (None, String::new())
    };
    if let (Some(found), false) = (&nvcc, nvcc_note.is_empty()) {
        println!(
            "cargo:warning=platypus: {nvcc_note}; using {}",
            found.display()
        );
    }
    let include = find_cuda_include(nvcc.as_deref());
    let require_cuda = env::var("PLATYPUS_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    assert!(
        want_kernels || !require_cuda,
        "PLATYPUS_REQUIRE_CUDA=1 but the `cuda` feature is off: no kernels are built"
    );

    let archs = cuda_archs();
    let gpu = match &nvcc {
        Some(nvcc) => Some(build_gpu(nvcc, &kernels, &sources, &archs, &out)),
        None if require_cuda => panic!(
            "PLATYPUS_REQUIRE_CUDA=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin and PATH); \
             install it with `pip install nvidia-cuda-nvcc nvidia-cuda-cccl` or run scripts/test.sh"
        ),
        None if !want_kernels => None,
        None => {
            // The one warning of a build without kernels.
            let nvcc_note = if nvcc_note.is_empty() { nvcc_note } else { format!("; {nvcc_note}") };
            println!(
                "cargo:warning=platypus: nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH{nvcc_note}): \
                 building without GPU kernels (CPU and emulated devices only); Device::cuda will return an error"
            );
            None
        }
    };
    write_kernel_info(&out, &archs, gpu.as_ref());

    // Without the CUDA headers the emulator uses its own f16/bf16 types
    // (kernels/emu/cuda_types_fallback.h); it never needs nvcc.
    let emu = build_emulator(&kernels, &sources, include.as_deref(), &out);
    write_emu_table(&out, &emu);
}

/// `kernels/*.cu`, sorted, so generated tables are stable.
fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("kernels/ is missing")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
}

/// nvcc, and a note for the warning when `NVCC` names no file.
fn find_nvcc() -> (Option<PathBuf>, String) {
    let mut note = String::new();
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return (Some(p), note);
        }
        note = format!("NVCC={} is not a file", p.display());
    }
    let mut candidates: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var(v).ok())
        .map(|home| Path::new(&home).join("bin").join("nvcc"))
        .collect();
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    (candidates.into_iter().find(|p| p.is_file()), note)
}

/// The directory holding `cuda_bf16.h`: next to nvcc, else under $CUDA_HOME / $CUDA_PATH.
fn find_cuda_include(nvcc: Option<&Path>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(bin) = nvcc.and_then(Path::parent) {
        candidates.push(bin.join("../include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            candidates.push(Path::new(&home).join("include"));
        }
    }
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

fn cuda_archs() -> Vec<u32> {
    let spec = env::var("PLATYPUS_CUDA_ARCHS").unwrap_or_else(|_| "80;86;89;90".to_string());
    let mut archs: Vec<u32> = spec
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                panic!("PLATYPUS_CUDA_ARCHS: `{s}` is not a compute capability like 80")
            })
        })
        .collect();
    archs.sort_unstable();
    archs.dedup();
    assert!(!archs.is_empty(), "PLATYPUS_CUDA_ARCHS names no arch");
    archs
}

struct GpuBuild {
    /// (module stem, fatbin path, kernel names)
    modules: Vec<(String, PathBuf, Vec<String>)>,
    records: Vec<PtxasRecord>,
    version: String,
}

fn build_gpu(
    nvcc: &Path,
    kernels: &Path,
    sources: &[PathBuf],
    archs: &[u32],
    out: &Path,
) -> GpuBuild {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.contains("release"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());

    let results: Vec<(String, PathBuf, String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                scope.spawn(move || {
                    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                    let fatbin = out.join(format!("{stem}.fatbin"));
                    // The intermediate PTX carries each kernel's __launch_bounds__.
                    let keep = out.join(format!("nvcc-{stem}"));
                    fs::create_dir_all(&keep).expect("creating nvcc's keep directory");
                    let mut cmd = Command::new(nvcc);
                    cmd.arg("--keep").arg("--keep-dir").arg(&keep);
                    cmd.args([
                        "-fatbin",
                        "-O3",
                        "-lineinfo",
                        "-std=c++17",
                        "-Xptxas",
                        "-v",
                        "-I",
                    ])
                    .arg(kernels);
                    for a in archs {
                        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
                    }
                    let lowest = archs[0];
                    cmd.arg(format!(
                        "-gencode=arch=compute_{lowest},code=compute_{lowest}"
                    ));
                    cmd.arg("-o").arg(&fatbin).arg(src);
                    let output = cmd
                        .output()
                        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
                    let log = String::from_utf8_lossy(&output.stderr).to_string()
                        + &String::from_utf8_lossy(&output.stdout);
                    if !output.status.success() {
                        panic!("nvcc failed on {}:\n{log}", src.display());
                    }
                    let ptx = fs::read_to_string(keep.join(format!("{stem}.compute_{lowest}.ptx")))
                        .unwrap_or_else(|e| {
                            panic!("reading the PTX nvcc kept for {}: {e}", src.display())
                        });
                    let _ = fs::remove_dir_all(&keep);
                    (stem, fatbin, log, ptx)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("nvcc thread panicked"))
            .collect()
    });

    let mut modules = Vec::new();
    let mut records = Vec::new();
    for (stem, fatbin, log, ptx) in results {
        let bounds = parse_launch_bounds(&ptx);
        let mut recs = parse_ptxas(&log);
        for r in &mut recs {
            r.max_threads = bounds.iter().find(|(n, _)| *n == r.name).map_or(0, |b| b.1);
        }
        let mut names: Vec<String> = recs.iter().map(|r| r.name.clone()).collect();
        names.sort();
        names.dedup();
        records.extend(recs);
        modules.push((stem, fatbin, names));
    }
    records.sort_by(|a, b| (&a.name, a.arch).cmp(&(&b.name, b.arch)));
    GpuBuild {
        modules,
        records,
        version,
    }
}

/// (kernel, threads) of every `.entry` with a `.maxntid x, y, z` directive
/// (what `__launch_bounds__(threads)` becomes) in a PTX file.
fn parse_launch_bounds(ptx: &str) -> Vec<(String, u32)> {
    let mut bounds = Vec::new();
    let mut entry: Option<String> = None;
    for line in ptx.lines().map(str::trim) {
        if let Some(rest) = line.split(".entry ").nth(1) {
            entry = Some(
                rest.split('(')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            );
        } else if line.starts_with('{') {
            entry = None;
        } else if let (Some(name), Some(dims)) = (&entry, line.strip_prefix(".maxntid")) {
            let threads = dims
                .split(',')
                .map(|d| d.trim().parse::<u32>().unwrap_or(1))
                .product();
            bounds.push((name.clone(), threads));
        }
    }
    bounds
}

/// Parses `ptxas -v` output: a "Compiling entry function 'NAME' for 'sm_XX'"
/// line, then "N bytes stack frame, N bytes spill stores, N bytes spill loads"
/// and "Used N registers, used N barriers, N bytes smem, ...".
fn parse_ptxas(log: &str) -> Vec<PtxasRecord> {
    let mut records = Vec::new();
    let mut current: Option<PtxasRecord> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(r) = current.take() {
                records.push(r);
            }
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch = rest
                .split("'sm_")
                .nth(1)
                .and_then(|s| s.trim_end_matches('\'').parse().ok())
                .unwrap_or(0);
            current = Some(PtxasRecord {
                name,
                arch,
                ..Default::default()
            });
        } else if let Some(r) = current.as_mut() {
            for part in line.split(',') {
                let part = part
                    .trim()
                    .trim_start_matches("ptxas info    : ")
                    .trim_start_matches("Used ")
                    .trim_start_matches("used ");
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u32>() else { continue };
                let rest: Vec<&str> = words.collect();
                match (what, rest.as_slice()) {
                    ("registers", _) => r.registers = n,
                    ("barriers", _) => r.barriers = n,
                    ("bytes", ["stack", "frame"]) => r.stack_bytes = n,
                    ("bytes", ["spill", "stores"]) => r.spill_store_bytes = n,
                    ("bytes", ["spill", "loads"]) => r.spill_load_bytes = n,
                    ("bytes", ["smem"]) => r.shared_bytes = n,
                    _ => {}
                }
            }
        }
    }
    records.extend(current);
    records
}

fn write_kernel_info(out: &Path, archs: &[u32], gpu: Option<&GpuBuild>) {
    let mut s = String::from("// Generated by build.rs: what nvcc built.\n");
    writeln!(
        s,
        "/// Archs the kernels were built for (SASS), empty without nvcc."
    )
    .unwrap();
    let built: &[u32] = if gpu.is_some() { archs } else { &[] };
    writeln!(s, "pub const CUDA_ARCHS: &[u32] = &{built:?};").unwrap();
    writeln!(s, "/// Version line of the nvcc that built the kernels.").unwrap();
    match gpu {
        Some(g) => writeln!(
            s,
            "pub const NVCC_VERSION: Option<&str> = Some({:?});",
            g.version
        )
        .unwrap(),
        None => writeln!(s, "pub const NVCC_VERSION: Option<&str> = None;").unwrap(),
    }
    writeln!(
        s,
        "/// Fatbins, one per kernels/*.cu: (file stem, image, kernel names)."
    )
    .unwrap();
    writeln!(
        s,
        "pub(crate) static MODULES: &[(&str, &[u8], &[&str])] = &["
    )
    .unwrap();
    for (stem, path, names) in gpu.map(|g| g.modules.as_slice()).unwrap_or_default() {
        writeln!(
            s,
            "    ({stem:?}, include_bytes!({:?}), &{names:?}),",
            path.display().to_string()
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(s, "/// The ptxas report of every kernel on every arch.").unwrap();
    writeln!(s, "pub static PTXAS: &[KernelResources] = &[").unwrap();
    for r in gpu.map(|g| g.records.as_slice()).unwrap_or_default() {
        writeln!(
            s,
            "    KernelResources {{ name: {:?}, arch: {}, registers: {}, spill_store_bytes: {}, spill_load_bytes: {}, shared_bytes: {}, stack_bytes: {}, barriers: {}, max_threads: {} }},",
            r.name, r.arch, r.registers, r.spill_store_bytes, r.spill_load_bytes, r.shared_bytes, r.stack_bytes, r.barriers, r.max_threads
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    fs::write(out.join("kernel_info.rs"), s).expect("writing kernel_info.rs");
}

/// Compiles the emulator and every kernel for the host; returns the names of
/// the kernels the emulator can launch.
///
/// The kernels are compiled with `-fsanitize=thread`: the compiler calls
/// `__tsan_read4(p)` and the like before each memory access, and the
/// emulator's memory checker (kernels/emu/memcheck.cpp) answers those calls;
/// no ThreadSanitizer runtime is linked. The emulator's own code is not
/// instrumented. Under `PLATYPUS_EMU_ASAN=1` everything is built with
/// AddressSanitizer instead (the two cannot be combined), without the memory
/// checker.
fn build_emulator(
    kernels: &Path,
    sources: &[PathBuf],
    include: Option<&Path>,
    out: &Path,
) -> Vec<String> {
    let asan = env::var("PLATYPUS_EMU_ASAN").is_ok_and(|v| v == "1");
    let memcheck = !asan;
    let base = || {
        let mut build = cc::Build::new();
        match include {
            Some(include) => build.include(include).include(include.join("cccl")),
            None => build.define("PLATYPUS_EMU_NO_CUDA_HEADERS", None),
        };
        build
            .cpp(true)
            .std("c++17")
            .include(kernels)
            .warnings(true)
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-unused-function")
            .flag_if_supported("-Wno-unknown-pragmas");
        if asan {
            build
                .flag("-fsanitize=address")
                .flag("-fno-omit-frame-pointer")
                .opt_level(1);
        }
        build
    };
    if asan {
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-cfg=platypus_emu_asan");
    }
    if memcheck {
        println!("cargo:rustc-cfg=platypus_emu_memcheck");
    }

    // The kernels, and the emulator's self-test kernels (barrier and
    // collective misuse, races), built for the host only.
    let mut build = base();
    if memcheck {
        // GCC's spelling; without it the (empty) __tsan_func_entry/exit hooks are called.
        build
            .flag("-fsanitize=thread")
            .flag_if_supported("--param=tsan-instrument-func-entry-exit=0");
    }
    let selftest = kernels.join("emu/selftest.cu");
    for src in sources.iter().chain(std::iter::once(&selftest)) {
        let stem = src.file_stem().unwrap().to_string_lossy();
        let wrapper = out.join(format!("emu_{stem}.cpp"));
        fs::write(&wrapper, format!("#include \"{}\"\n", src.display()))
            .expect("writing emulator wrapper");
        build.file(wrapper);
    }
    build.compile("platypus_emu");

    // The scheduler and memory checker, uninstrumented; linked after the
    // kernels that call into them.
    let mut runtime = base();
    if memcheck {
        runtime.define("PLATYPUS_EMU_MEMCHECK_BUILT", None);
    }
    runtime
        .file(kernels.join("emu/cuda_emu.cpp"))
        .file(kernels.join("emu/memcheck.cpp"))
        .compile("platypus_emu_runtime");

    let archive = out.join("libplatypus_emu.a");
    let nm = Command::new("nm")
        .arg("--defined-only")
        .arg(&archive)
        .output()
        .expect("running nm (binutils) on the emulator archive");
    let mut names: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|sym| sym.strip_prefix("platypus_emu_launch__"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn write_emu_table(out: &Path, names: &[String]) {
    let mut s =
        String::from("// Generated by build.rs: the kernels the host emulator can launch.\n");
    s.push_str("unsafe extern \"C\" {\n");
    for n in names {
        writeln!(s, "    fn platypus_emu_launch__{n}(cfg: *const PlatypusEmuLaunch, args: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;").unwrap();
    }
    s.push_str("}\n");
    s.push_str("/// (kernel name, entry point), sorted by name.\n");
    s.push_str("pub(crate) static EMU_KERNELS: &[(&str, EmuEntry)] = &[\n");
    for n in names {
        writeln!(s, "    ({n:?}, platypus_emu_launch__{n}),").unwrap();
    }
    s.push_str("];\n");
    fs::write(out.join("emu_kernels.rs"), s).expect("writing emu_kernels.rs");
}
