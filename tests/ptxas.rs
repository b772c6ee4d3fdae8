//! What nvcc built: every kernel for sm_80 and sm_90 without register
//! spills, and every GPU kernel also runnable on the host emulator.

mod common;

use common::built_with_nvcc;
use platypus::kernels::{self, PTXAS};

#[test]
fn no_kernel_spills_on_sm80_or_sm90() {
    if !built_with_nvcc() {
        return;
    }
    let spilling: Vec<_> = PTXAS
        .iter()
        .filter(|r| matches!(r.arch, 80 | 90) && r.spill_bytes() > 0)
        .collect();
    assert!(
        spilling.is_empty(),
        "kernels spill registers: {spilling:#?}"
    );
}

#[test]
fn every_kernel_is_built_for_sm80_and_sm90_and_the_emulator() {
    if !built_with_nvcc() {
        return;
    }
    let emulated: Vec<&str> = platypus::emu::kernel_names().collect();
    let names: Vec<&str> = kernels::gpu_kernel_names().collect();
    for expected in [
        "rmsnorm_forward_bf16",
        "rmsnorm_backward_f16",
        "rmsnorm_dw_reduce_f32",
        "rmsnorm_add_forward_f16",
        "embedding_bf16_bf16",
        "embedding_f16_f32",
        "embedding_f32_bf16",
        "swiglu_forward_bf16",
        "swiglu_backward_f32",
        "layernorm_forward_f32",
        "layernorm_forward_bf16",
        "linear_forward_f16",
        "linear_gelu_forward_bf16",
        "rope_bf16",
        "rope_f32",
        "attention_forward_bf16_d128_causal",
        "attention_backward_dkdv_f16_d64",
        "lora_gemm_nt_wide_bf16",
        "lora_gemm_tn_short_f32out_f16",
        "lora_gemm_nt_wide_f32out_bf16",
        "lora_gemm_nt_wide_f32out_f16",
        "lora_merge_bf16",
        "cosine_prepare_f32",
        "cosine_topk_bf16",
        "cosine_threshold_f16",
        "cosine_merge",
        "cross_entropy_rows_f32",
        "cross_entropy_rows_f16",
        "cross_entropy_rows_bf16",
        "cross_entropy_grad_f16",
        "cross_entropy_grad_bf16",
        "adamw_sumsq",
        "adamw_step",
        "adamw_accumulate",
        "argmax_f32",
        "argmax_bf16",
        "sample_f16",
        "sample_bf16",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    for name in names {
        for arch in [80, 90] {
            assert!(
                PTXAS.iter().any(|r| r.name == name && r.arch == arch),
                "{name} has no sm_{arch} build"
            );
        }
        assert!(
            emulated.contains(&name),
            "{name} is not exported to the emulator (PLATYPUS_EXPORT_KERNEL)"
        );
    }
}

/// `cuobjdump`: beside $NVCC, else on PATH (scripts/test.sh installs it with nvcc).
fn cuobjdump() -> Option<std::path::PathBuf> {
    let beside_nvcc = std::env::var_os("NVCC")
        .map(std::path::PathBuf::from)
        .and_then(|nvcc| Some(nvcc.parent()?.join("cuobjdump")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("cuobjdump"));
    beside_nvcc.into_iter().chain(on_path).find(|p| p.is_file())
}

/// The SASS of every kernel in `kernels/{stem}.cu` for `arch`: (kernel, code).
fn sass(tool: &std::path::Path, stem: &str, arch: u32) -> Vec<(String, String)> {
    let image = kernels::fatbin(stem).expect("module built");
    let path = std::env::temp_dir().join(format!("platypus-{stem}-{}.fatbin", std::process::id()));
    std::fs::write(&path, image).unwrap();
    let out = std::process::Command::new(tool)
        .args(["-sass", "-arch", &format!("sm_{arch}")])
        .arg(&path)
        .output()
        .expect("running cuobjdump");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "cuobjdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("Function : ")
        .skip(1)
        .map(|f| {
            let (name, code) = f.split_once('\n').unwrap_or((f, ""));
            (name.trim().to_string(), code.to_string())
        })
        .collect()
}

#[test]
fn matrix_kernels_run_on_tensor_cores_without_stray_atomics() {
    if !built_with_nvcc() {
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(
            std::env::var("PLATYPUS_REQUIRE_CUDA").map_or(true, |v| v != "1"),
            "PLATYPUS_REQUIRE_CUDA=1 but cuobjdump was not found beside $NVCC or on PATH"
        );
        eprintln!("SKIPPED: no cuobjdump to read the SASS with");
        return;
    };
    // (module, which of its kernels are tensor-core products, which may use
    // atomics: the threshold search's slot counter and the bad-row flag)
    type Select = fn(&str) -> bool;
    let modules: [(&str, Select, Select); 6] = [
        (
            "attention",
            |name| !name.contains("delta") && !name.contains("write_cache"),
            |_| false,
        ),
        ("cross_entropy", |_| false, |_| false),
        ("adamw", |_| false, |_| false),
        ("sampling", |_| false, |_| false),
        ("lora", |name| name.contains("gemm"), |_| false),
        (
            "cosine",
            |name| name.contains("topk") || name.contains("threshold"),
            |name| name.contains("threshold") || name.contains("prepare"),
        ),
    ];
    for arch in [80, 90]
        .into_iter()
        .filter(|a| kernels::CUDA_ARCHS.contains(a))
    {
        for (module, is_product, may_use_atomics) in modules {
            let functions = sass(&tool, module, arch);
            assert!(!functions.is_empty(), "no {module} SASS for sm_{arch}");
            for (name, code) in &functions {
                // Deterministic: no global atomics or reductions but where named.
                for op in ["ATOMG", "RED.", "ATOM."] {
                    assert!(
                        may_use_atomics(name) || !code.contains(op),
                        "{name} (sm_{arch}) uses {op}"
                    );
                }
                if !is_product(name) {
                    continue;
                }
                for (op, what) in [
                    ("HMMA.16816.F32", "mma.sync m16n8k16"),
                    ("LDSM", "ldmatrix"),
                    ("LDGSTS", "cp.async"),
                ] {
                    assert!(code.contains(op), "{name} (sm_{arch}) has no {op} ({what})");
                }
            }
        }
    }
}
