#!/usr/bin/env bash
# The GPU bundle's runner: proves and times every kernel on the GPU of the
# machine it runs on, in under 8 minutes, with nothing but what the bundle
# carries (no cargo, no network). Made by scripts/gpu-bundle.sh.
#
#   gpu-bundle/run.sh OUT_DIR
#
# Steps, in order, each under its own time limit (`timeout`), each one's
# result in OUT_DIR/summary.json as soon as it ends (summary.py explains the
# fields); logs and raw results in OUT_DIR/steps:
#   unpack     the executables (bin.tar.xz) into a scratch folder
#   info       `platypus info --json` (device, SMs, memory, driver), nvidia-smi
#   tests      the GPU correctness tests (PLATYPUS_REQUIRE_GPU=1), every kernel
#              against the CPU reference and the emulator, small and model shapes
#   sanitizer  compute-sanitizer memcheck, racecheck, synccheck, initcheck over
#              the tests' small shapes (PLATYPUS_GPU_QUICK=1)
#   benches    rmsnorm (+ copy bandwidth), rope, elementwise (embedding, SwiGLU,
#              add + RMSNorm), lora, attention, cosine_topk, head (fused
#              cross-entropy, argmax, sampling)
#   peers      the same work through the machine's PyTorch (peers.py)
# Without a GPU every GPU step is recorded as "skipped: no GPU (...)" and the
# script exits 0. PLATYPUS_BUNDLE_EMULATE=1 runs the tests step on the host
# emulator instead (small shapes), to try the plumbing on a machine without
# a GPU. The exit status is 0 whenever the summary was written: read it.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1/steps" || exit 2
out=$(cd "$1" && pwd)
steps=$out/steps
scratch=$(mktemp -d "${TMPDIR:-/tmp}/platypus-gpu-bundle.XXXXXX") || exit 2
trap 'rm -rf "$scratch"' EXIT
bin=$scratch/bin
order=0

# record NAME STATUS SECONDS LIMIT: the step's status file, then the summary.
record() {
    order=$((order + 1))
    python3 - "$steps/$1.status.json" "$1" "$2" "$3" "$4" "$order" <<'EOF'
import json, sys
path, name, status, seconds, limit, order = sys.argv[1:]
with open(path, "w") as f:
    json.dump({"name": name, "status": status, "seconds": round(float(seconds), 1),
               "limit_s": int(limit), "order": int(order)}, f)
EOF
    python3 "$here/summary.py" "$here" "$out" || echo "run.sh: summary.py failed" >&2
    echo "== $1: $2 ($3 s of $4)"
}

# step NAME LIMIT COMMAND...: runs COMMAND under `timeout`, output in steps/NAME.log.
step() {
    local name=$1 limit=$2 status
    shift 2
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" >"$steps/$name.log" 2>&1
    local rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after $limit s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" $((SECONDS - start)) "$limit"
    return $rc
}

skip() { # NAME LIMIT REASON
    record "$1" "skipped: $3" 0 "$2"
}

# Unpacking: xz, or Python's lzma where there is no xz.
unpack() {
    mkdir -p "$bin"
    if command -v xz >/dev/null; then
        xz -dc "$here/bin.tar.xz" | tar -x -C "$bin"
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
            "$here/bin.tar.xz" "$bin"
    fi
}
export here scratch bin steps
export -f unpack
step unpack 10 bash -c unpack || exit 1

# 1. The device.
info() {
    "$bin/platypus" info --json >"$steps/info.json" && "$bin/platypus" info || return 1
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu --format=csv
    fi
}
export -f info
step info 15 bash -c info
gpu=$(python3 -c '
import json, sys
info = json.load(open(sys.argv[1]))
print(len(info.get("devices") or []))' "$steps/info.json" 2>/dev/null || echo 0)
no_gpu="no GPU ($("$bin/platypus" info --json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin).get("no_driver") or "no CUDA device")' 2>/dev/null || echo "platypus info failed"))"

# 2. Correctness. The emulator here is only an oracle: its memory checker is off.
tests=(env PLATYPUS_GPU_REPORT="$steps/tests.report.jsonl" PLATYPUS_EMU_MEMCHECK=0 "$bin/gpu-tests" --test-threads 4 --show-output)
rm -f "$steps/tests.report.jsonl"
if [ "$gpu" -gt 0 ]; then
    step tests 90 env PLATYPUS_REQUIRE_GPU=1 "${tests[@]}"
elif [ "${PLATYPUS_BUNDLE_EMULATE:-}" = 1 ]; then
    step tests 90 env PLATYPUS_GPU_TEST_DEVICE=emulated "${tests[@]}"
else
    skip tests 90 "$no_gpu"
fi

# 3. compute-sanitizer over the small shapes (the host-only emulator checks skipped).
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
for tool in memcheck racecheck synccheck initcheck; do
    if [ "$gpu" -eq 0 ]; then
        skip "sanitizer-$tool" 18 "$no_gpu"
    elif [ -z "$sanitizer" ]; then
        skip "sanitizer-$tool" 18 "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    else
        step "sanitizer-$tool" 18 env PLATYPUS_GPU_QUICK=1 PLATYPUS_EMU_MEMCHECK=0 \
            "$sanitizer" --tool "$tool" --error-exitcode 99 \
            "$bin/gpu-tests" --test-threads 1 --skip model_shape_checks
    fi
done

# 4. The benches, GPU groups only (criterion's filter), short measurements.
export CRITERION_HOME=$scratch/criterion PLATYPUS_BENCH_JSON=$steps/bench.jsonl
rm -f "$PLATYPUS_BENCH_JSON"
for bench in rmsnorm:25 rope:15 elementwise:20 lora:40 attention:70 cosine_topk:35 head:20; do
    name=${bench%:*} limit=${bench#*:}
    if [ "$gpu" -eq 0 ]; then
        skip "bench-$name" "$limit" "$no_gpu"
    else
        step "bench-$name" "$limit" "$bin/bench-$name" --bench --warm-up-time 0.2 \
            --measurement-time 0.5 --sample-size 10 --noplot cuda
    fi
done

# 5. The peers: the same work through PyTorch.
rm -f "$steps/peers.jsonl"
if [ "$gpu" -eq 0 ]; then
    skip peers 65 "$no_gpu"
else
    step peers 65 python3 "$here/peers.py" --out "$steps/peers.jsonl" --budget-s 55
fi

echo "summary: $out/summary.json"
