"""Tests of summary.py on step outputs written as the bundle's tools write
them (libtest, compute-sanitizer, the benches' and peers' JSON lines), so
the parsing a GPU run depends on is tested before any GPU minute is spent.

    python3 -m unittest discover -s scripts/gpu-bundle -p 'test_*.py'
"""
import json
import os
import tempfile
import unittest

import summary

TESTS_LOG = """
running 3 tests
test rmsnorm_matches_cpu_on_the_gpu ... ok
test lora_matches_cpu_on_the_gpu ... FAILED
test model_shape_checks_hold_on_the_emulator ... ok

successes:

---- rmsnorm_matches_cpu_on_the_gpu stdout ----
AttnModelCase { batch: 1 }: device 0.4 s, reference 3.1 s

successes:
    rmsnorm_matches_cpu_on_the_gpu
    model_shape_checks_hold_on_the_emulator

failures:

---- lora_matches_cpu_on_the_gpu stdout ----

thread 'lora_matches_cpu_on_the_gpu' (4711) panicked at tests/gpu.rs:250:19:
lora LoraCase { tokens: 4096 }: dx: max error 0.5 of its scale, allowed 0.015625
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    lora_matches_cpu_on_the_gpu

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 41.20s
"""

RACECHECK_LOG = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at attention_forward_bf16_d64+0x1a30
=========     and Read access at attention_forward_bf16_d64+0x1b00 [12 hazards]
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
========= ERROR SUMMARY: 3 errors
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def lines(path, rows):
    write(path, "".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')


class SummaryOfAGpuRun(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.out = self.dir.name
        steps = os.path.join(self.out, "steps")
        os.mkdir(steps)
        self.steps = steps
        for order, (name, status) in enumerate(
            [("info", "ok"), ("tests", "failed (exit 101)"), ("sanitizer-memcheck", "ok"),
             ("sanitizer-racecheck", "failed (exit 99)"), ("sanitizer-synccheck", "failed (exit 1)"),
             ("bench-lora", "timed out after 45 s")], 1):
            write(os.path.join(steps, f"{name}.status.json"),
                  json.dumps({"name": name, "status": status, "seconds": 1.0, "limit_s": 45, "order": order}))
        write(os.path.join(steps, "info.json"), json.dumps({
            "driver": 13000, "no_driver": None,
            "devices": [{"ordinal": 0, "name": "NVIDIA H200", "compute_capability": [9, 0],
                         "total_memory": 150 << 30, "multiprocessors": 132}]}))
        write(os.path.join(steps, "tests.log"), TESTS_LOG)
        lines(os.path.join(steps, "tests.report.jsonl"), [
            {"kernel": "rmsnorm", "case": "bf16 rows 7", "tensor": "y", "max_error": 0.001, "allowed": 0.016},
            {"kernel": "rmsnorm", "case": "bf16 rows 4096", "tensor": "dx", "max_error": 0.008, "allowed": 0.016},
        ])
        write(os.path.join(steps, "sanitizer-memcheck.log"), "========= ERROR SUMMARY: 0 errors\n")
        write(os.path.join(steps, "sanitizer-racecheck.log"), RACECHECK_LOG)
        write(os.path.join(steps, "sanitizer-synccheck.log"), "========= Error: Device not supported\n")
        lora = "bf16/7b_q_t4096_in4096_out4096_r16"
        lines(os.path.join(steps, "bench.jsonl"), [
            {"bench": "copy/cuda/bf16/16384x8192", "seconds": 1.25e-4, "work": 536870912, "unit": "GB/s",
             "rate": 4000.0, "percent_of_peak": 83.3},
            {"bench": "rmsnorm/cuda/forward/bf16/16384x4096", "seconds": 8e-5, "work": 268443648,
             "unit": "GB/s", "rate": 3200.0, "percent_of_peak": 66.7},
            {"bench": f"lora/cuda/base_forward/{lora}", "seconds": 2e-4, "work": 1, "unit": "TFLOP/s", "rate": 600.0},
            {"bench": f"lora/cuda/fused_forward/{lora}", "seconds": 2.2e-4, "work": 1, "unit": "TFLOP/s", "rate": 550.0},
            {"bench": "cosine_topk/cuda/resident/bf16/m10000_n1000000_d384_k10", "seconds": 0.02, "work": 1,
             "unit": "TFLOP/s", "rate": 384.0},
        ])
        lines(os.path.join(steps, "peers.jsonl"), [
            {"bench": "ceiling/cuda/matmul_bf16/8192x8192x8192", "peer": "torch matmul bf16", "seconds": 0.0014,
             "work": 1, "unit": "TFLOP/s", "rate": 780.0},
            {"bench": "rmsnorm/cuda/forward/bf16/16384x4096", "peer": "torch F.rms_norm", "seconds": 1.6e-4,
             "work": 1, "unit": "GB/s", "rate": 1600.0},
            {"bench": f"lora/cuda/fused_forward/{lora}", "error": "CUDA out of memory"},
            {"stopped": "budget", "after_s": 60.2},
        ])
        self.summary = summary.summarize(self.out, self.out)

    def tearDown(self):
        self.dir.cleanup()

    def test_it_is_written_and_lists_the_steps_in_order(self):
        with open(os.path.join(self.out, "summary.json")) as f:
            self.assertEqual(json.load(f), self.summary)
        self.assertEqual([s["name"] for s in self.summary["steps"]][:2], ["info", "tests"])
        self.assertEqual((self.summary["seconds"], self.summary["planned_seconds"]), (6.0, 270))
        self.assertEqual(self.summary["device"]["multiprocessors"], 132)

    def test_tests_give_correctness_per_kernel(self):
        k = self.summary["kernels"]
        self.assertIs(k["rmsnorm"]["correct"], True)
        self.assertIs(k["lora"]["correct"], False)
        self.assertIn("dx: max error 0.5", k["lora"]["tests"]["lora_matches_cpu_on_the_gpu"])
        self.assertIsNone(k["rope"]["correct"], "a kernel with no test run is unknown, not correct")
        self.assertEqual(k["rmsnorm"]["worst"]["case"], "bf16 rows 4096")
        self.assertEqual(k["rmsnorm"]["checked_tensors"], 2)
        self.assertIn("model_shape_checks_hold_on_the_emulator", self.summary["other_tests"])

    def test_sanitizer_findings(self):
        s = self.summary["kernels"]["attention"]["sanitizer"]
        self.assertEqual(s["memcheck"]["errors"], 0)
        self.assertEqual(s["racecheck"]["errors"], 3)
        self.assertEqual(s["racecheck"]["lines_naming_this_kernel"], 2)
        lora = self.summary["kernels"]["lora"]["sanitizer"]["racecheck"]
        self.assertEqual(lora["lines_naming_this_kernel"], 0)
        self.assertIsNone(s["synccheck"]["errors"])
        self.assertIn("Device not supported", s["synccheck"]["note"])
        self.assertIsNone(s["initcheck"], "a tool that did not run has no finding")

    def test_ceilings_are_the_measured_ones(self):
        c = self.summary["ceilings"]
        self.assertEqual(c["copy_gbps"]["value"], 4000.0)
        self.assertEqual(c["matmul_bf16_tflops"]["value"], 780.0)

    def test_benches_with_ceiling_peer_and_ratio(self):
        rms = self.summary["kernels"]["rmsnorm"]["benches"][0]
        self.assertAlmostEqual(rms["percent_of_ceiling"], 80.0)
        self.assertEqual(rms["peer"]["rate"], 1600.0)
        self.assertAlmostEqual(rms["ratio_to_peer"], 2.0)
        lora = {b["bench"].split("/")[2]: b for b in self.summary["kernels"]["lora"]["benches"]}
        self.assertAlmostEqual(lora["fused_forward"]["overhead_over_base"], 0.1)
        self.assertEqual(lora["fused_forward"]["peer"], {"error": "CUDA out of memory"})
        cos = self.summary["kernels"]["cosine_topk"]["benches"][0]
        self.assertAlmostEqual(cos["queries_per_s"], 500000.0)
        self.assertEqual(self.summary["peer_notes"], [{"stopped": "budget", "after_s": 60.2}])


class SummaryWithoutAGpu(unittest.TestCase):
    def test_assumed_ceilings_only_for_an_h200_and_nothing_correct(self):
        with tempfile.TemporaryDirectory() as out:
            os.mkdir(os.path.join(out, "steps"))
            s = summary.summarize(out, out)
            self.assertIsNone(s["device"])
            self.assertEqual(s["ceilings"], {})
            self.assertTrue(all(k["correct"] is None for k in s["kernels"].values()))


if __name__ == "__main__":
    unittest.main()
