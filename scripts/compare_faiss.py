#!/usr/bin/env python3
"""Side-by-side: platypus' CPU cosine top-k against FAISS IndexFlatIP.

Same data (Gaussian embeddings, fixed seed, saved as .npy), same k, same
thread count. FAISS searches L2-normalised copies with inner product (exact
cosine); platypus runs `platypus cosine-topk` (the release binary) on the
raw embeddings. Both times exclude file I/O and normalisation is inside
platypus' time. Also reports how many top-k lists agree exactly.

    python3 scripts/compare_faiss.py --queries 1000 --database 100000 --dim 384 --k 10 --threads 2

Installs numpy and faiss-cpu from PyPI into .tools/py when they are missing.
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, ".tools", "py")


def import_deps():
    sys.path.insert(0, TOOLS)
    try:
        import faiss  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--target", TOOLS, "numpy", "faiss-cpu"])
        importlib.invalidate_caches()
    import faiss
    import numpy
    return faiss, numpy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--database", type=int, default=100000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss, np = import_deps()

    rng = np.random.default_rng(args.seed)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    db = rng.standard_normal((args.database, args.dim), dtype=np.float32)

    faiss.omp_set_num_threads(args.threads)
    # FAISS timed two ways: the search alone, and normalise + add + search
    # (what platypus' time covers: it normalises both sets inside).
    start = time.perf_counter()
    qn, dbn = q.copy(), db.copy()
    faiss.normalize_L2(qn)
    faiss.normalize_L2(dbn)
    index = faiss.IndexFlatIP(args.dim)
    index.add(dbn)
    setup_secs = time.perf_counter() - start
    start = time.perf_counter()
    f_scores, f_idx = index.search(qn, args.k)
    faiss_secs = time.perf_counter() - start

    subprocess.check_call(["cargo", "build", "--quiet", "--release", "--bin", "platypus"], cwd=ROOT)
    # The binary cargo just built: CARGO_TARGET_DIR moves it out of target/.
    target_dir = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
    binary = os.path.join(target_dir, "release", "platypus")
    with tempfile.TemporaryDirectory() as tmp:
        qp, dbp, out = (os.path.join(tmp, n) for n in ("q.npy", "db.npy", "idx.npy"))
        np.save(qp, q)
        np.save(dbp, db)
        report = subprocess.check_output(
            [binary, "cosine-topk", "--queries", qp, "--database", dbp, "--k", str(args.k),
             "--out", out, "--threads", str(args.threads)], text=True)
        p_idx = np.load(out)
        p_scores = np.load(os.path.join(tmp, "idx.scores.npy"))
    platypus_secs = float(re.search(r"in ([0-9.]+) s", report).group(1))

    same = float(np.mean(np.all(p_idx.astype(np.int64) == f_idx, axis=1)))
    max_diff = float(np.max(np.abs(p_scores - f_scores)))
    print(f"data: {args.queries} queries x {args.database} rows, dim {args.dim}, k {args.k}, {args.threads} threads")
    faiss_total = faiss_secs + setup_secs
    print(f"faiss IndexFlatIP ({faiss.__version__}): search {faiss_secs:.3f} s ({args.queries / faiss_secs:.0f} queries/s), "
          f"with normalise + add {faiss_total:.3f} s")
    print(f"platypus cosine-topk (cpu), normalising inside: {platypus_secs:.3f} s, {args.queries / platypus_secs:.0f} queries/s")
    print(f"platypus / faiss time: {platypus_secs / faiss_secs:.2f} (search only), {platypus_secs / faiss_total:.2f} (with normalise + add)")
    print(f"identical top-{args.k} lists: {same:.4f}; max score difference {max_diff:.2e}")


if __name__ == "__main__":
    main()
