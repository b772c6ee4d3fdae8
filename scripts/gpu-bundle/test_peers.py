"""Tests of peers.py, run as a subprocess the way the GPU bundle runs it.

    python3 -m unittest scripts/gpu-bundle/test_peers.py

The smoke run (tiny shapes on the CPU) and the budget test need torch and are
skipped without it; the CUDA skip-path test needs a machine without CUDA (or
without torch) and is skipped on one with it.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers.py")
FAMILIES = {"ceiling", "copy", "rmsnorm", "rope", "lora", "attention", "cosine_topk"}
FIELDS = {"bench", "peer", "seconds", "work", "unit", "rate", "torch", "device"}
SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}


@functools.lru_cache(maxsize=None)
def probe():
    """(torch importable, CUDA available), asked of the interpreter that runs
    peers.py, in a child so this process does not load torch."""
    code = "import torch; print(int(torch.cuda.is_available()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return False, False
    return True, r.stdout.strip().endswith("1")


def has_torch():
    return probe()[0]


def run_peers(*args, timeout=900):
    """Run peers.py into a fresh file; return (exit code, parsed lines, raw)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peers.jsonl")
        r = subprocess.run([sys.executable, PEERS, "--out", out, *args],
                           capture_output=True, text=True, timeout=timeout)
        raw = ""
        if os.path.exists(out):
            with open(out) as f:
                raw = f.read()
    lines = [json.loads(line) for line in raw.splitlines()]
    return r, lines, raw


class SmokeRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not has_torch():
            raise unittest.SkipTest("torch is not importable")
        cls.proc, cls.lines, cls.raw = run_peers("--smoke", "--device", "cpu", "--budget-s", "600")

    def test_exits_zero_and_every_line_is_json(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-2000:])
        self.assertTrue(self.raw.endswith("\n"))
        self.assertGreater(len(self.lines), 0)
        for line in self.lines:
            self.assertIsInstance(line, dict)

    def test_no_errors_no_stop(self):
        bad = [x for x in self.lines if "error" in x or "stopped" in x or "skipped" in x]
        self.assertEqual(bad, [])

    def test_measurements_are_consistent(self):
        for m in self.lines:
            with self.subTest(bench=m.get("bench")):
                self.assertEqual(set(m), FIELDS)
                self.assertIn("/cuda/", m["bench"])
                self.assertIn(m["unit"], SCALE)
                self.assertIsInstance(m["work"], int)
                self.assertGreater(m["work"], 0)
                self.assertGreater(m["seconds"], 0)
                self.assertGreater(m["rate"], 0)
                expected = m["work"] / m["seconds"] / SCALE[m["unit"]]
                self.assertAlmostEqual(m["rate"] / expected, 1.0, places=9)
                self.assertEqual(m["device"], "cpu")
                self.assertTrue(m["peer"])

    def test_covers_every_family_in_order(self):
        families = [m["bench"].split("/")[0] for m in self.lines]
        self.assertEqual(set(families), FAMILIES)
        order = ["ceiling", "copy", "rmsnorm", "rope", "lora", "attention", "cosine_topk"]
        firsts = sorted(FAMILIES, key=families.index)
        self.assertEqual(firsts, order)

    def test_ids_are_unique_and_shaped(self):
        ids = [m["bench"] for m in self.lines]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertIn("ceiling/cuda/matmul_bf16/64x64x64", ids)
        self.assertIn("rope/cuda/backward/bf16/b2_s16_h4_kv2_d16", ids)
        self.assertIn("attention/cuda/forward_backward/bf16/b2_s64_h2_d32_causal", ids)
        self.assertIn("cosine_topk/cuda/streamed/bf16/m20_n3000_d32_k10", ids)
        kinds = {i.split("/")[2] for i in ids if i.startswith("lora/")}
        self.assertEqual(kinds, {"base_forward", "unfused_forward", "fused_forward",
                                 "base_backward", "fused_backward"})

    def test_one_figure_for_fused_and_unfused_forward(self):
        by_id = {m["bench"]: m for m in self.lines}
        for bench_id, m in by_id.items():
            if "/unfused_forward/" in bench_id:
                twin = by_id[bench_id.replace("/unfused_forward/", "/fused_forward/")]
                self.assertEqual(twin["seconds"], m["seconds"])
                self.assertEqual(twin["work"], m["work"])


@unittest.skipUnless(has_torch(), "torch is not importable")
class Options(unittest.TestCase):
    def test_budget_zero_stops_at_once(self):
        proc, lines, _ = run_peers("--smoke", "--device", "cpu", "--budget-s", "0")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0]["stopped"], "budget")
        self.assertGreaterEqual(lines[0]["after_s"], 0)

    def test_only_selects_by_prefix(self):
        proc, lines, _ = run_peers("--smoke", "--device", "cpu", "--only", "copy", "rope/cuda/back")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertEqual([m["bench"] for m in lines],
                         ["copy/cuda/bf16/64x128", "rope/cuda/backward/bf16/b2_s16_h4_kv2_d16"])


class CudaSkip(unittest.TestCase):
    def test_no_cuda_writes_one_skipped_line(self):
        torch_ok, cuda_ok = probe()
        if cuda_ok:
            self.skipTest("this machine has CUDA")
        proc, lines, _ = run_peers("--device", "cuda")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(set(lines[0]), {"skipped"})
        self.assertIsInstance(lines[0]["skipped"], str)
        self.assertIn("CUDA" if torch_ok else "torch", lines[0]["skipped"])
        self.assertIn('"skipped"', proc.stdout)


if __name__ == "__main__":
    unittest.main()
