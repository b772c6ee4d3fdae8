//! What nvcc built: every kernel for sm_80 and sm_90 without register
//! spills, and every GPU kernel also runnable on the host emulator.

use platypus::kernels::{self, PTXAS};

/// False (with the reason printed) when this build has no GPU kernels;
/// a failure when PLATYPUS_REQUIRE_CUDA=1 said it must have them.
fn built_with_nvcc() -> bool {
    if !PTXAS.is_empty() {
        return true;
    }
    assert!(
        std::env::var("PLATYPUS_REQUIRE_CUDA").map_or(true, |v| v != "1"),
        "PLATYPUS_REQUIRE_CUDA=1 but this build has no ptxas report"
    );
    eprintln!("SKIPPED: built without nvcc, no ptxas report to check");
    false
}

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
        "rope_bf16",
        "rope_f32",
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
