"""Tests of a built GPU bundle on a machine without a GPU: its size, what it
holds, and that run.sh runs to the end with every GPU step marked skipped,
runs the correctness step on the emulator when asked, and keeps the summary
of the steps that ran when one fails.

    PLATYPUS_BUNDLE=gpu-bundle python3 -m unittest discover -s scripts/gpu-bundle -p 'test_*.py'

(scripts/test.sh builds a bundle and sets PLATYPUS_BUNDLE.)
"""
import json
import os
import subprocess
import tempfile
import unittest

BUNDLE = os.environ.get("PLATYPUS_BUNDLE")
# The kernel benches in the order run.sh runs them.
BENCHES = ["rmsnorm", "rope", "elementwise", "lora", "attention", "cosine_topk", "head"]
STEPS = (["unpack", "info", "tests"] + [f"sanitizer-{t}" for t in ("memcheck", "racecheck", "synccheck", "initcheck")]
         + [f"bench-{b}" for b in BENCHES] + ["peers"])
# The kernels summary.py reports correctness for (tests/gpu.rs by name prefix).
KERNELS = ["rmsnorm", "rope", "elementwise", "attention", "lora", "cosine_topk", "head"]


def run(out, **env):
    """Runs the bundle's run.sh into `out`; returns (exit status, summary)."""
    proc = subprocess.run([os.path.join(BUNDLE, "run.sh"), out], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)
    with open(os.path.join(out, "summary.json")) as f:
        return proc.returncode, json.load(f), proc.stdout + proc.stderr


@unittest.skipUnless(BUNDLE, "PLATYPUS_BUNDLE is not set (scripts/test.sh sets it)")
class Bundle(unittest.TestCase):
    def test_size_and_contents(self):
        size = sum(os.path.getsize(os.path.join(BUNDLE, f)) for f in os.listdir(BUNDLE))
        self.assertLessEqual(size, 60 << 20)
        self.assertEqual(sorted(os.listdir(BUNDLE)), ["bin.tar.xz", "manifest.json", "peers.py", "run.sh", "summary.py"])
        with open(os.path.join(BUNDLE, "manifest.json")) as f:
            manifest = json.load(f)
        self.assertEqual(sorted(manifest["executables"]), sorted(
            ["platypus", "gpu-tests"] + [f"bench-{k}" for k in BENCHES]))
        self.assertEqual(manifest["sass_archs"], [80, 90])
        self.assertLessEqual(tuple(map(int, manifest["needs_glibc"].split("_")[1].split("."))), (2, 36))

    def test_without_a_gpu_every_gpu_step_is_skipped(self):
        with tempfile.TemporaryDirectory() as out:
            rc, s, log = run(out)
            self.assertEqual(rc, 0, log)
            self.assertEqual([st["name"] for st in s["steps"]], STEPS)
            status = {st["name"]: st["status"] for st in s["steps"]}
            self.assertEqual((status["unpack"], status["info"]), ("ok", "ok"), log)
            for name in STEPS[2:]:
                self.assertTrue(status[name].startswith("skipped: no GPU"), f"{name}: {status[name]}")
            # The planned time on a GPU: every step's limit, within 8 minutes.
            self.assertLessEqual(sum(st["limit_s"] for st in s["steps"]), 480)
            self.assertEqual(s["planned_seconds"], sum(st["limit_s"] for st in s["steps"]))
            self.assertIsNone(s["device"])
            self.assertEqual(s["bundle"]["sass_archs"], [80, 90])

    def test_emulated_correctness_step(self):
        with tempfile.TemporaryDirectory() as out:
            rc, s, log = run(out, PLATYPUS_BUNDLE_EMULATE="1")
            self.assertEqual(rc, 0, log)
            self.assertEqual(s["steps"][2]["status"], "ok", log)
            for kernel in KERNELS:
                k = s["kernels"][kernel]
                self.assertIs(k["correct"], True, kernel)
                self.assertGreater(k["checked_tensors"], 0, kernel)
                self.assertLessEqual(k["worst"]["max_error"], k["worst"]["allowed"], kernel)
            self.assertTrue(s["steps"][3]["status"].startswith("skipped: no GPU"))

    def test_a_failing_step_keeps_the_summary_and_the_run_goes_on(self):
        with tempfile.TemporaryDirectory() as out:
            # An arch the emulator does not know fails every emulated launch.
            rc, s, log = run(out, PLATYPUS_BUNDLE_EMULATE="1", PLATYPUS_EMU_ARCH="99")
            self.assertEqual(rc, 0, log)
            self.assertTrue(s["steps"][2]["status"].startswith("failed"), s["steps"][2])
            self.assertEqual([st["name"] for st in s["steps"]], STEPS)
            self.assertTrue(any(k["correct"] is False for k in s["kernels"].values()))


if __name__ == "__main__":
    unittest.main()
