#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs what a fresh machine lacks,
# then runs the whole suite with the emulator's schedule seed 1, the
# emulated-kernel tests again with seed 2, again under AddressSanitizer (seed
# 3), and last in a build with no CUDA at all (CPU and emulator only, threads
# in index order). The memory checker is on in every emulated run but the
# AddressSanitizer one (the two instrumentations cannot be combined).
#
# Installs, only when missing:
#   - nvcc, CCCL headers, cuobjdump and nvdisasm from PyPI into .tools/cuda
#     (git-ignored), unless $NVCC points at a compiler already;
#   - libclang for bindgen, from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
path_without_cuda=$PATH

cuda_pkgs=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-cuda-cccl==13.3.5.0.6
           nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37)
if [ -z "${NVCC:-}" ]; then
    NVCC=$root/.tools/cuda/nvidia/cu13/bin/nvcc
    if [ ! -x "$NVCC" ]; then
        echo "== installing nvcc from PyPI into .tools/cuda"
        python3 -m pip install --quiet --disable-pip-version-check --target "$root/.tools/cuda" "${cuda_pkgs[@]}"
    fi
    export NVCC
fi
export PATH="$(dirname "$NVCC"):$PATH"

if ! ldconfig -p | grep -q 'libclang-[0-9.]*\.so\|libclang\.so'; then
    echo "== installing libclang (for bindgen) from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang1-14 >/dev/null
fi

emulated=(--lib --test emulated --test fixtures --test cosine_topk)

echo "== cargo test (NVCC=$NVCC), emulator schedule seed 1"
PLATYPUS_EMU_SEED=1 cargo test --all-targets -- --show-output
cargo test --doc

echo "== emulated kernels, schedule seed 2"
PLATYPUS_EMU_SEED=2 cargo test "${emulated[@]}"

echo "== emulated kernels under AddressSanitizer, schedule seed 3"
libasan=$(gcc -print-file-name=libasan.so)
PLATYPUS_EMU_SEED=3 PLATYPUS_EMU_ASAN=1 CARGO_TARGET_DIR="$root/target/asan" \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$libasan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1" \
    PROPTEST_CASES="${PROPTEST_CASES_ASAN:-16}" \
    cargo test "${emulated[@]}"

echo "== build without nvcc or CUDA headers: CPU and emulated devices only, index order"
env -u NVCC -u CUDA_HOME -u CUDA_PATH -u PLATYPUS_REQUIRE_CUDA -u PLATYPUS_EMU_SEED PATH="$path_without_cuda" \
    CARGO_TARGET_DIR="$root/target/nocuda" \
    cargo test "${emulated[@]}" --test errors --test ptxas --test launch_limits
