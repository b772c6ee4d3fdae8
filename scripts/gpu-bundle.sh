#!/usr/bin/env bash
# Makes the GPU bundle: everything the first minutes on a GPU machine need,
# built and packed here, so that machine runs it without cargo, rustc, the
# crate registry or a network.
#
#   scripts/gpu-bundle.sh [OUT_DIR]        (default: gpu-bundle/, git-ignored)
#
# Builds in release with nvcc (SASS for sm_80 and sm_90, PTX of sm_80) the
# `platypus` binary, the GPU test executable (tests/gpu.rs) and every kernel bench
# (not the host bench: it measures the CPU),
# strips them, checks their shared libraries, and writes OUT_DIR:
#   run.sh         the runner (gpu-bundle/run.sh OUT_DIR, on the GPU machine)
#   bin.tar.xz     the executables: platypus, gpu-tests, bench-NAME (they
#                  embed the same fatbins, which xz's window packs once)
#   summary.py     makes the run's summary.json
#   peers.py       PyTorch's figures for the same work
#   manifest.json  commit, nvcc, archs, executables and their sizes
# The whole folder must stay under 60 MiB (the device machine takes 64 MiB
# with the working tree); this script fails if it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-$root/gpu-bundle}
limit_bytes=$((60 * 1024 * 1024))

. scripts/cuda-tools.sh

target=$root/target/gpu-bundle
mkdir -p "$target"
echo "== building the bundle's executables (release, sm_80 + sm_90, in $target)"
PLATYPUS_CUDA_ARCHS="80;90" PLATYPUS_REQUIRE_CUDA=1 CARGO_TARGET_DIR=$target \
    cargo build --release --bin platypus --test gpu \
    --bench rmsnorm --bench rope --bench attention --bench lora --bench cosine_topk \
    --bench elementwise --bench head \
    --message-format=json-render-diagnostics >"$target/artifacts.json"

stage=$(mktemp -d "$target/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/bin" "$stage/bundle"
# Executables by target: the binary keeps its name, the test is gpu-tests,
# each bench bench-NAME.
python3 - "$target/artifacts.json" "$stage/bin" <<'EOF'
import json, shutil, sys
artifacts, dest = sys.argv[1:]
names = {}
for line in open(artifacts):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"][0], m["target"]["name"]
    name = {"bin": name, "test": name + "-tests", "bench": "bench-" + name}[kind]
    names[name] = m["executable"]
for name, path in sorted(names.items()):
    shutil.copy(path, f"{dest}/{name}")
print("executables:", ", ".join(sorted(names)))
EOF
strip "$stage"/bin/*

# Shared libraries: only the C/C++ runtime of any Linux; libcuda is loaded at
# run time (cudarc's dynamic loading), so it must not be linked.
allowed='^(linux-vdso\.so\.1|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libm\.so\.6|libc\.so\.6|/lib64/ld-linux-x86-64\.so\.2)$'
for exe in "$stage"/bin/*; do
    unusual=$(ldd "$exe" | awk '{print $1}' | grep -Ev "$allowed" || true)
    if [ -n "$unusual" ]; then
        echo "gpu-bundle: $(basename "$exe") links unexpected libraries: $unusual" >&2
        exit 1
    fi
done
# The newest glibc and libstdc++ symbol versions any executable needs (this
# machine's are the floor of the machines it runs on).
glibc=$(objdump -T "$stage"/bin/* | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
glibcxx=$(objdump -T "$stage"/bin/* | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)

echo "== packing"
tar -C "$stage/bin" -cf - . | xz -T1 -1 --lzma2=preset=1,dict=192MiB >"$stage/bundle/bin.tar.xz"
cp scripts/gpu-bundle/run.sh scripts/gpu-bundle/summary.py scripts/gpu-bundle/peers.py "$stage/bundle/"
python3 - "$stage" "$glibc" "$glibcxx" "$NVCC" <<'EOF'
import json, os, subprocess, sys, time
stage, glibc, glibcxx, nvcc = sys.argv[1:]
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
bins = sorted(os.listdir(f"{stage}/bin"))
manifest = {
    "commit": git("rev-parse", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
    "sass_archs": [80, 90],
    "ptx_arch": 80,
    "needs_glibc": glibc,
    "needs_libstdcxx": glibcxx,
    "executables": {b: os.path.getsize(f"{stage}/bin/{b}") for b in bins},
    "archive_bytes": os.path.getsize(f"{stage}/bundle/bin.tar.xz"),
}
with open(f"{stage}/bundle/manifest.json", "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
EOF

size=$(du -sb "$stage/bundle" | cut -f1)
if [ "$size" -gt "$limit_bytes" ]; then
    echo "gpu-bundle: $size bytes, over the 60 MiB limit" >&2
    exit 1
fi
rm -rf "$out"
mv "$stage/bundle" "$out"
echo "gpu-bundle: $out, $size bytes ($(du -sh "$out" | cut -f1)); needs $glibc, $glibcxx; run it with: $out/run.sh OUT_DIR"
