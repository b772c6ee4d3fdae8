# Sourced by scripts/test.sh and scripts/gpu-bundle.sh (from the repository
# root, with $root set to it): sets NVCC and PATH, installing what a fresh
# machine lacks, only when missing:
#   - nvcc, CCCL headers, cuobjdump and nvdisasm from PyPI into .tools/cuda
#     (git-ignored), unless $NVCC points at a compiler already;
#   - libclang for bindgen, from Debian.
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
