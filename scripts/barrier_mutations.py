#!/usr/bin/env python3
"""Deletes each synchronization site of the kernels, one at a time, and checks
that the emulated test suite then fails.

A site is one `__syncthreads()`, `__syncwarp(...)` or `cp_async_wait<N>()` in
kernels/*.cu and kernels/*.cuh (the emulator's own files are not kernels).
For each site the script writes a copy of the repository with that one call
removed into a scratch directory, builds the emulated kernels there (no nvcc:
the emulator only) and runs the emulated suites as the test command does,
under each schedule seed in turn until one fails. A mutant that passes every
run "survives": the suite cannot see that the site is missing.

    python3 scripts/barrier_mutations.py [--seeds 1,2] [--only attention.cu] [--list]

Prints one line per site and a summary; exits 1 if any mutant survives (or
could not be built). Proptest shrinking is off (the first failing case is
enough). Takes about 3 minutes per site on a 2-core machine.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = re.compile(r"__syncthreads\(\)|__syncwarp\([^()]*\)|cp_async_wait<[^<>]*>\(\)")
# The emulated suites of the test command, the quickest to fail first.
SUITES = ["--test", "emulated", "--test", "cosine_topk", "--test", "fixtures", "--lib"]


def kernel_files():
    d = os.path.join(ROOT, "kernels")
    return sorted(f for f in os.listdir(d) if f.endswith((".cu", ".cuh")))


def sites(only):
    """(file, line number, column, call text, source line) of every site."""
    found = []
    for name in kernel_files():
        if only and name != only:
            continue
        with open(os.path.join(ROOT, "kernels", name)) as f:
            for n, line in enumerate(f, 1):
                code = line.split("//")[0]
                for m in SITE.finditer(code):
                    found.append((name, n, m.start(), m.group(0), line.rstrip()))
    return found


def tracked_copy(dest):
    """The tracked files of the repository (as in the working tree) under dest."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for rel in filter(None, files):
        rel = rel.decode()
        src, dst = os.path.join(ROOT, rel), os.path.join(dest, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)


def mutate(path, line_no, col, call):
    """Removes `call` at (line_no, col); a statement `call;` goes whole."""
    with open(path) as f:
        lines = f.readlines()
    line = lines[line_no - 1]
    end = col + len(call)
    if line[end:end + 1] == ";":
        end += 1
    lines[line_no - 1] = line[:col] + line[end:]
    with open(path, "w") as f:
        f.writelines(lines)


def env_without_cuda(target):
    env = dict(os.environ)
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PLATYPUS_REQUIRE_CUDA"]:
        env.pop(var, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not os.path.isfile(os.path.join(p, "nvcc")))
    env["CARGO_TARGET_DIR"] = target
    env["PROPTEST_MAX_SHRINK_ITERS"] = "0"
    return env


def run_suites(work, env, seed):
    env = dict(env, PLATYPUS_EMU_SEED=str(seed))
    r = subprocess.run(["cargo", "test", "--quiet"] + SUITES, cwd=work, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    # The emulator's report (Display, or Debug where a test unwrapped it), else the failing test count.
    caught = [l.strip() for l in out.splitlines() if "failed on the emulator" in l or "Emulator {" in l]
    caught += [l.strip() for l in out.splitlines() if l.startswith("test result: FAILED")]
    return r.returncode, caught[:1], out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2", help="schedule seeds to try, in order (default 1,2: the test command's)")
    ap.add_argument("--only", help="only the sites of this kernels/ file")
    ap.add_argument("--list", action="store_true", help="list the sites and stop")
    ap.add_argument("--target", default=os.path.join(ROOT, "target", "mutants"), help="cargo target directory to reuse")
    args = ap.parse_args()
    found = sites(args.only)
    if args.list:
        for name, n, _, call, line in found:
            print(f"{name}:{n}: {call:<24} {line.strip()}")
        print(f"{len(found)} sites")
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s]
    env = env_without_cuda(args.target)
    scratch = tempfile.mkdtemp(prefix="platypus-mutants-")
    work = os.path.join(scratch, "repo")
    tracked_copy(work)
    # The fixtures sit beside the repository, as ../shared.
    shared = os.path.join(os.path.dirname(ROOT), "shared")
    if os.path.isdir(shared):
        os.symlink(shared, os.path.join(scratch, "shared"))
    start = time.time()
    survivors, broken = [], []
    try:
        # The unmutated tree must pass, or no failure below means anything.
        for seed in seeds:
            rc, _, out = run_suites(work, env, seed)
            if rc != 0:
                print(out[-4000:])
                print(f"the unmutated tree fails under seed {seed}: fix that first")
                return 1
        print(f"unmutated tree passes under seeds {seeds} ({time.time() - start:.0f} s)", flush=True)
        for i, (name, n, col, call, _) in enumerate(found, 1):
            t0 = time.time()
            path = os.path.join(work, "kernels", name)
            original = open(path).read()
            mutate(path, n, col, call)
            verdict = None
            try:
                for seed in seeds:
                    rc, caught, out = run_suites(work, env, seed)
                    if rc == 0:
                        continue
                    if "error[" in out or "error: failed to run custom build" in out:
                        verdict = "BUILD FAILED"
                        broken.append((name, n, call))
                    else:
                        verdict = f"caught (seed {seed}): {caught[0][:220] if caught else 'a test failed'}"
                    break
            finally:
                with open(path, "w") as f:
                    f.write(original)
            if verdict is None:
                verdict = "SURVIVED"
                survivors.append((name, n, call))
            print(f"[{i}/{len(found)}] {name}:{n} {call}: {verdict} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    caught = len(found) - len(survivors) - len(broken)
    print(f"{caught} of {len(found)} sites caught, {len(survivors)} survived, {len(broken)} did not build; {time.time() - start:.0f} s")
    for name, n, call in survivors:
        print(f"  survived: {name}:{n} {call}")
    return 0 if not survivors and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
