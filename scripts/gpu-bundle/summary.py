#!/usr/bin/env python3
"""Builds OUT_DIR/summary.json from what the GPU bundle's steps left in
OUT_DIR/steps. run.sh calls it after every step, so the summary always says
what has run so far, even if a later step hangs or the machine goes away.

    python3 summary.py BUNDLE_DIR OUT_DIR

Reads (each optional):
  BUNDLE_DIR/manifest.json        what was built (commit, nvcc, archs, sizes)
  steps/NAME.status.json          each step's status, seconds and time limit
  steps/info.json                 `platypus info --json`
  steps/tests.log                 the GPU test binary's output (libtest)
  steps/tests.report.jsonl        max error of every checked tensor
  steps/sanitizer-TOOL.log        compute-sanitizer's output per tool
  steps/bench.jsonl               the benches' results (PLATYPUS_BENCH_JSON)
  steps/peers.jsonl               PyTorch's figures for the same bench ids

Writes summary.json (through a temporary file and a rename):
  steps    [{name, status, seconds, limit_s}] in the order they ran; seconds
           and planned_seconds: their sums
  device   the GPU from `platypus info`, or null
  ceilings the chip's measured bf16 matmul TFLOP/s and copy GB/s (or the
           H200 figures the issue gives, marked as assumed)
  kernels  per kernel: correct (true / false / null if not run), the tests
           and their outcome, the worst checked tensor (error against what
           its check allows), sanitizer findings per tool (the tool's error
           total and its report lines naming this kernel), and each bench:
           our rate, % of the ceiling and of the spec peak, the peer's
           rate and ours / peer's (> 1: we are faster)
"""
import json
import os
import re
import sys

KERNELS = ["rmsnorm", "rope", "elementwise", "attention", "lora", "cosine_topk", "head"]
# Test functions of tests/gpu.rs by name prefix.
TEST_PREFIX = {
    "rmsnorm": "rmsnorm",
    "rope": "rope",
    "attention": "attention",
    "lora": "lora",
    "cosine": "cosine_topk",
    "elementwise": "elementwise",
    "head": "head",
}
SANITIZER_TOOLS = ["memcheck", "racecheck", "synccheck", "initcheck"]
# Ceilings the issue gives for an H200, used when the run measured none.
H200_CEILINGS = {"matmul_bf16_tflops": 790.0, "copy_gbps": 4300.0}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_lines(path):
    """JSON objects of a JSON-lines file; a torn last line is skipped."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return rows


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def steps(step_dir):
    found = []
    for name in os.listdir(step_dir) if os.path.isdir(step_dir) else []:
        if name.endswith(".status.json"):
            status = read_json(os.path.join(step_dir, name))
            if status:
                found.append(status)
    return sorted(found, key=lambda s: s.get("order", 0))


def device(info):
    if not info or not info.get("devices"):
        return None
    d = info["devices"][0]
    return dict(d, driver=info.get("driver"))


def tests(log):
    """{test name: "ok" | "ignored" | "FAILED: first panic line"} from libtest output."""
    if log is None:
        return {}
    outcome = {}
    for m in re.finditer(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", log, re.M):
        outcome[m.group(1)] = m.group(2)
    # Failure details: "---- NAME stdout ----" then the panic message.
    for m in re.finditer(r"^---- (\S+) stdout ----\n(.*?)(?=^---- |\nfailures:|\Z)", log, re.M | re.S):
        panic = re.search(r"panicked at [^\n]*\n([^\n]*)", m.group(2))
        if m.group(1) in outcome and panic:
            outcome[m.group(1)] = "FAILED: " + panic.group(1).strip()
    return outcome


def kernel_of_test(name):
    for prefix, kernel in TEST_PREFIX.items():
        if name.startswith(prefix + "_"):
            return kernel
    return None


# Kernel-name prefixes of each kernel's GPU functions (as compute-sanitizer names them).
KERNEL_FUNCTION_PREFIX = {k: k + "_" for k in KERNELS} | {
    "cosine_topk": "cosine_",
    # rmsnorm_add_forward_* counts as rmsnorm's and elementwise's.
    "elementwise": "(?:embedding|swiglu|rmsnorm_add)_",
    "head": "(?:cross_entropy|argmax|sample)_",
}


def sanitizer(log, status, kernel):
    """Findings of one compute-sanitizer run: its error total, and how many
    of its report lines name one of `kernel`'s GPU functions."""
    if status is None:
        return None
    if status["status"].startswith("skipped"):
        return status["status"]
    log = log or ""
    prefix = KERNEL_FUNCTION_PREFIX[kernel]
    named = sum(1 for line in log.splitlines() if line.startswith("=========") and re.search(rf"\b{prefix}\w*", line))
    summary = re.search(r"ERROR SUMMARY: (\d+) error", log)
    if summary:
        return {"errors": int(summary.group(1)), "lines_naming_this_kernel": named, "status": status["status"]}
    last = [l for l in log.splitlines() if l.strip()][-1:]
    return {"errors": None, "status": status["status"], "note": last[0] if last else "no output"}


def ceilings(benches, peers, dev):
    found = {}
    for b in benches:
        if b["bench"].startswith("copy/"):
            found["copy_gbps"] = {"value": b["rate"], "source": "measured: " + b["bench"]}
    for p in peers:
        if p.get("bench", "").startswith("ceiling/") and "rate" in p:
            found["matmul_bf16_tflops"] = {"value": p["rate"], "source": "measured: torch " + p["bench"]}
        if p.get("bench", "").startswith("copy/") and "rate" in p and "copy_gbps" not in found:
            found["copy_gbps"] = {"value": p["rate"], "source": "measured: torch " + p["bench"]}
    if dev and "H200" in dev.get("name", ""):
        for key, value in H200_CEILINGS.items():
            found.setdefault(key, {"value": value, "source": "assumed: the H200 figure of issue 11"})
    return found


def bench_rows(kernel, benches, peers, ceiling):
    peer_of = {p["bench"]: p for p in peers if "bench" in p}
    rows = []
    for b in benches:
        if not b["bench"].startswith(kernel + "/"):
            continue
        key = "copy_gbps" if b["unit"] == "GB/s" else "matmul_bf16_tflops"
        row = {
            "bench": b["bench"],
            "rate": b["rate"],
            "unit": b["unit"],
            "seconds": b["seconds"],
            "percent_of_ceiling": 100.0 * b["rate"] / ceiling[key]["value"] if key in ceiling else None,
            "percent_of_peak": b.get("percent_of_peak"),
        }
        if kernel == "cosine_topk":
            m = re.search(r"/m(\d+)_", b["bench"])
            if m:
                row["queries_per_s"] = int(m.group(1)) / b["seconds"]
        peer = peer_of.get(b["bench"])
        if peer and "rate" in peer:
            row["peer"] = {"what": peer.get("peer"), "rate": peer["rate"], "seconds": peer["seconds"]}
            row["ratio_to_peer"] = b["rate"] / peer["rate"] if peer["rate"] else None
        elif peer and "error" in peer:
            row["peer"] = {"error": peer["error"]}
        rows.append(row)
    if kernel == "lora":
        # Fused LoRA over the base GEMM alone, per shape and direction.
        secs = {r["bench"]: r["seconds"] for r in rows}
        for r in rows:
            for part in ("forward", "backward"):
                base = r["bench"].replace(f"/fused_{part}/", f"/base_{part}/")
                if f"/fused_{part}/" in r["bench"] and base in secs:
                    r["overhead_over_base"] = r["seconds"] / secs[base] - 1.0
    return rows


def summarize(bundle_dir, out_dir):
    step_dir = os.path.join(out_dir, "steps")
    status = {s["name"]: s for s in steps(step_dir)}
    info = read_json(os.path.join(step_dir, "info.json"))
    dev = device(info)
    benches = read_lines(os.path.join(step_dir, "bench.jsonl"))
    peers = read_lines(os.path.join(step_dir, "peers.jsonl"))
    ceiling = ceilings(benches, peers, dev)
    outcome = tests(read_text(os.path.join(step_dir, "tests.log")))
    reports = read_lines(os.path.join(step_dir, "tests.report.jsonl"))
    kernels = {}
    for kernel in KERNELS:
        mine = {t: o for t, o in outcome.items() if kernel_of_test(t) == kernel}
        checked = [r for r in reports if r.get("kernel") == kernel]
        worst = max(checked, key=lambda r: r["max_error"] / r["allowed"] if r["allowed"] else 0, default=None)
        kernels[kernel] = {
            "correct": all(o == "ok" for o in mine.values()) if mine else None,
            "tests": mine,
            "checked_tensors": len(checked),
            "worst": worst,
            "sanitizer": {
                tool: sanitizer(
                    read_text(os.path.join(step_dir, f"sanitizer-{tool}.log")), status.get(f"sanitizer-{tool}"), kernel
                )
                for tool in SANITIZER_TOOLS
            },
            "benches": bench_rows(kernel, benches, peers, ceiling),
        }
    other = {t: o for t, o in outcome.items() if kernel_of_test(t) is None}
    summary = {
        "bundle": read_json(os.path.join(bundle_dir, "manifest.json")),
        "steps": list(status.values()),
        "seconds": sum(st.get("seconds", 0) for st in status.values()),
        "planned_seconds": sum(st.get("limit_s", 0) for st in status.values()),
        "device": dev,
        "ceilings": ceiling,
        "kernels": kernels,
        "other_tests": other,
        "peer_notes": [p for p in peers if "skipped" in p or "stopped" in p],
    }
    tmp = os.path.join(out_dir, ".summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: summary.py BUNDLE_DIR OUT_DIR")
    summarize(sys.argv[1], sys.argv[2])
