#!/usr/bin/env python3
"""PyTorch peer figures for platypus' CUDA benches.

Measures, with stock PyTorch on the same GPU, the operations that the Rust
benches measure, under the same bench ids, so that a summary script can put
the two figures side by side:

  ceiling      a bf16 matmul [8192,8192] @ [8192,8192]: the chip's practical
               matmul ceiling;
  copy         y.copy_(x) on a [16384, 8192] bf16 tensor;
  rmsnorm      F.rms_norm forward, and its input gradient (weight frozen);
  rope         Hugging Face Llama rotary embedding: cos/sin tables from
               inv_freq and the positions, then q*cos + rotate_half(q)*sin for
               q and k ("backward" is the same with sin negated);
  lora         base x @ W.T, PEFT's LoRA Linear forward (fp32 adapters, bf16
               base), base dy @ W, and the autograd backward of PEFT's forward;
  attention    F.scaled_dot_product_attention with the flash backend over the
               FlashAttention-2 paper grid, forward and forward+backward;
  cosine_topk  exact cosine top-k of 10 000 queries against 1 000 000 rows,
               with the database on the device or streamed from pinned host
               memory block by block.

How: inputs are made once per shape on the device (torch.randn with a fixed
seed), outside the timed region, and freed before the next shape. Each
measurement runs 2 warm-up calls, then timed batches (CUDA events on cuda,
perf_counter on cpu; a batch holds several calls when one call is short)
until about 0.3 s and at least 5 calls have been timed; the figure is the
median seconds per call. Work is counted by fixed formulas (bytes for
memory-bound operations, FLOPs for matmul-bound ones) that match the Rust
benches, and rate = work / seconds in GB/s or TFLOP/s.

Output: one JSON object per line, appended to --out and flushed at once, so
that a run killed by an outer `timeout` keeps every finished line:

  {"bench", "peer", "seconds", "work", "unit", "rate", "torch", "device"}
  {"bench", "error"}                 a measurement that raised (e.g. OOM)
  {"stopped": "budget", "after_s"}   --budget-s ran out; nothing more started
  {"skipped": reason}                no torch, or no CUDA under --device cuda

    python3 peers.py --out peers.jsonl [--device cuda|cpu] [--smoke]
                     [--budget-s 85] [--only PREFIX ...]

--smoke runs every code path at tiny shapes (seconds on a small CPU); its ids
name the tiny shapes, so they never collide with the full ones. Ids always
say "cuda": they name the platypus side they are compared with.
"""
import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Tuple

START = time.perf_counter()
SEED = 20240601

# Full shapes, as the Rust benches run them.
FULL = {
    "ceiling": 8192,
    "copy": (16384, 8192),
    "rmsnorm": [(16384, 4096), (16384, 8192)],
    "rope": dict(batch=4, seq=4096, heads=32, kv_heads=8, head_dim=128),
    "lora_tokens": 4096,
    "lora": [
        ("7b_q", 4096, 4096),
        ("7b_up", 4096, 11008),
        ("7b_down", 11008, 4096),
        ("13b_up", 5120, 13824),
        ("13b_down", 13824, 5120),
    ],
    # batch = tokens // seq, heads = width // head_dim
    "attention": dict(tokens=16384, width=2048, head_dims=[128, 64],
                      seqs=[512, 1024, 2048, 4096, 8192, 16384]),
    "cosine": dict(m=10000, n=1000000, d=384, k=10, block=131072),
    "min_time_s": 0.3,
}

# Tiny shapes for --smoke: the same code paths, seconds on a 2-core CPU.
SMOKE = {
    "ceiling": 64,
    "copy": (64, 128),
    "rmsnorm": [(32, 64), (32, 128)],
    "rope": dict(batch=2, seq=16, heads=4, kv_heads=2, head_dim=16),
    "lora_tokens": 32,
    "lora": [("7b_q", 64, 64), ("7b_down", 96, 64)],
    "attention": dict(tokens=128, width=64, head_dims=[16, 32], seqs=[32, 64]),
    "cosine": dict(m=20, n=3000, d=32, k=10, block=1024),
    "min_time_s": 0.05,
}

LORA_RANK = 16
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
RMS_EPS = 1e-5
ROPE_THETA = 10000.0


def emit(out, obj: Dict[str, Any]) -> None:
    """Append one JSON line to the output file, flush it, and echo it."""
    line = json.dumps(obj)
    out.write(line + "\n")
    out.flush()
    print(line, flush=True)


@dataclass
class Bench:
    """One measurement over a shape group's inputs.

    build(inputs) returns (call, peer): the call to time and a short text of
    what torch runs. The figure is written under every id in `ids` (one torch
    figure can be the peer of several platypus variants).
    """
    ids: Tuple[str, ...]
    work: int
    unit: str  # "GB/s" (work in bytes) or "TFLOP/s" (work in FLOPs)
    build: Callable[[Dict[str, Any]], Tuple[Callable[[], Any], str]]
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class Group:
    """Benches over one shape: inputs are made once, shared, then freed."""
    make_inputs: Callable[[], Dict[str, Any]]
    benches: List[Bench] = field(default_factory=list)


class Runner:
    def __init__(self, torch, args, out, shapes):
        self.torch = torch
        self.dev = torch.device(args.device)
        self.cuda = args.device == "cuda"
        self.out = out
        self.shapes = shapes
        self.only = args.only
        self.budget_s = args.budget_s
        self.min_time_s = shapes["min_time_s"]
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"

    # ---------------------------------------------------------------- helpers

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def generator(self):
        g = self.torch.Generator(device=self.dev)
        g.manual_seed(SEED)
        return g

    def randn(self, g, *shape, dtype=None, requires_grad=False):
        t = self.torch.randn(*shape, generator=g, device=self.dev,
                             dtype=dtype or self.torch.bfloat16)
        return t.requires_grad_(requires_grad)

    def selected(self, bench_id: str) -> bool:
        return not self.only or any(bench_id.startswith(p) for p in self.only)

    def over_budget(self) -> bool:
        return time.perf_counter() - START >= self.budget_s

    def time_batch(self, call, n: int) -> float:
        """Seconds for n back-to-back calls, measured on the device."""
        if self.cuda:
            begin = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(n):
                call()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        return time.perf_counter() - t0

    def median_seconds(self, call) -> float:
        """Median seconds per call: 2 warm-ups, then batches until the timed
        total reaches min_time_s and at least 5 calls were timed."""
        call()
        self.sync()
        estimate = max(self.time_batch(call, 1), 1e-7)  # second warm-up
        # Short calls go in batches of ~5 ms so event overhead is amortised.
        per_batch = max(1, min(1000, int(0.005 / estimate)))
        samples, calls, total = [], 0, 0.0
        while total < self.min_time_s or calls < 5:
            s = self.time_batch(call, per_batch)
            samples.append(s / per_batch)
            calls += per_batch
            total += s
        return statistics.median(samples)

    # ----------------------------------------------------------------- driver

    def run(self, groups) -> None:
        for group in groups:
            benches = [b for b in group.benches
                       if any(self.selected(i) for i in b.ids)]
            if not benches:
                continue
            if self.over_budget():
                return self.stop()
            inputs, msg = None, None
            try:
                inputs = group.make_inputs()
            except Exception as e:  # noqa: BLE001 - reported, then go on
                msg = describe(e)
            if msg is not None:
                self.free()  # outside `except`: the traceback holds tensors
                for b in benches:
                    for i in b.ids:
                        if self.selected(i):
                            emit(self.out, {"bench": i, "error": "making inputs: " + msg})
                continue
            for b in benches:
                if self.over_budget():
                    del inputs
                    self.free()
                    return self.stop()
                self.measure(b, inputs)
            del inputs
            self.free()

    def measure(self, b: Bench, inputs) -> None:
        ids = [i for i in b.ids if self.selected(i)]
        call, msg = None, None
        try:
            with b.context():
                call, peer = b.build(inputs)
                seconds = self.median_seconds(call)
        except Exception as e:  # noqa: BLE001 - reported, then go on
            msg = describe(e)
        call = None  # frees what the call holds (graphs, host copies)
        if msg is not None:
            self.free()  # outside `except`: the traceback holds tensors
            for i in ids:
                emit(self.out, {"bench": i, "error": msg})
            return
        scale = 1e9 if b.unit == "GB/s" else 1e12
        for i in ids:
            emit(self.out, {
                "bench": i,
                "peer": peer,
                "seconds": seconds,
                "work": int(b.work),
                "unit": b.unit,
                "rate": b.work / seconds / scale,
                "torch": self.torch.__version__,
                "device": self.device_name,
            })

    def stop(self) -> None:
        emit(self.out, {"stopped": "budget",
                        "after_s": round(time.perf_counter() - START, 3)})

    # ----------------------------------------------------------------- groups

    def groups(self):
        """Every shape group, cheapest families first."""
        yield from self.ceiling()
        yield from self.copy()
        yield from self.rmsnorm()
        yield from self.rope()
        yield from self.lora()
        yield from self.attention()
        yield from self.cosine_topk()

    def ceiling(self):
        n = self.shapes["ceiling"]

        def make():
            g = self.generator()
            return {"a": self.randn(g, n, n), "b": self.randn(g, n, n)}

        def build(t):
            a, b = t["a"], t["b"]
            return (lambda: a @ b), "torch matmul bf16"

        yield Group(make, [Bench((f"ceiling/cuda/matmul_bf16/{n}x{n}x{n}",),
                                 2 * n ** 3, "TFLOP/s", build)])

    def copy(self):
        rows, cols = self.shapes["copy"]

        def make():
            g = self.generator()
            x = self.randn(g, rows, cols)
            return {"x": x, "y": self.torch.empty_like(x)}

        def build(t):
            x, y = t["x"], t["y"]
            return (lambda: y.copy_(x)), "torch Tensor.copy_"

        yield Group(make, [Bench((f"copy/cuda/bf16/{rows}x{cols}",),
                                 2 * rows * cols * 2, "GB/s", build)])

    def rmsnorm(self):
        F = self.torch.nn.functional
        torch = self.torch
        for rows, hidden in self.shapes["rmsnorm"]:
            def make(rows=rows, hidden=hidden):
                g = self.generator()
                return {"x": self.randn(g, rows, hidden),
                        "w": self.randn(g, hidden),
                        "dy": self.randn(g, rows, hidden)}

            def forward(t, hidden=hidden):
                x, w = t["x"], t["w"]
                return (lambda: F.rms_norm(x, (hidden,), w, RMS_EPS)), "torch F.rms_norm"

            def backward(t, hidden=hidden):
                x = t["x"].detach().requires_grad_(True)
                y = F.rms_norm(x, (hidden,), t["w"], RMS_EPS)
                dy = t["dy"]
                return ((lambda: torch.autograd.grad(y, x, dy, retain_graph=True)),
                        "torch F.rms_norm autograd (input grad)")

            shape = f"bf16/{rows}x{hidden}"
            yield Group(make, [
                Bench((f"rmsnorm/cuda/forward/{shape}",),
                      2 * (2 * rows * hidden + hidden), "GB/s", forward),
                Bench((f"rmsnorm/cuda/backward/{shape}",),
                      2 * (3 * rows * hidden + hidden), "GB/s", backward),
            ])

    def rope(self):
        torch = self.torch
        s = self.shapes["rope"]
        b, seq, h, kv, d = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]
        tokens = b * seq
        q_elems, k_elems = tokens * h * d, tokens * kv * d

        def make():
            g = self.generator()
            positions = torch.arange(seq, device=self.dev, dtype=torch.int32)
            inv_freq = 1.0 / (ROPE_THETA ** (
                torch.arange(0, d, 2, device=self.dev, dtype=torch.int64).float() / d))
            return {"q": self.randn(g, b, seq, h, d), "k": self.randn(g, b, seq, kv, d),
                    "positions": positions.expand(b, seq).contiguous(),
                    "inv_freq": inv_freq}

        def rotate_half(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        def tables(inv_freq, positions, dtype):
            # As LlamaRotaryEmbedding.forward: freqs = pos (x) inv_freq in fp32,
            # emb = cat(freqs, freqs), cos/sin cast to the activations' dtype.
            freqs = positions[..., None].float() * inv_freq  # [b, s, d/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)

        def rotation(sign):
            def build(t):
                q, k, positions, inv_freq = t["q"], t["k"], t["positions"], t["inv_freq"]

                def call():
                    cos, sin = tables(inv_freq, positions, q.dtype)
                    if sign < 0:
                        sin = -sin
                    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # over heads
                    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
                return call, "torch eager HF-Llama rotate_half rope (tables + rotation)"
            return build

        shape = f"bf16/b{b}_s{seq}_h{h}_kv{kv}_d{d}"
        work = 2 * 2 * (q_elems + k_elems) + 4 * tokens
        yield Group(make, [
            Bench((f"rope/cuda/forward/{shape}",), work, "GB/s", rotation(+1)),
            Bench((f"rope/cuda/backward/{shape}",), work, "GB/s", rotation(-1)),
        ])

    def lora(self):
        torch = self.torch
        F = torch.nn.functional
        t = self.shapes["lora_tokens"]
        r = LORA_RANK
        scale = LORA_ALPHA / LORA_RANK

        def peft_forward(x, W, A, B):
            # PEFT LoRA Linear.forward (>= 0.12) with bf16 base, fp32 adapters:
            # the input is cast to the adapter dtype, then dropout, A, B.
            result = F.linear(x, W)
            xl = F.dropout(x.to(torch.float32), LORA_DROPOUT, training=True)
            result = result + F.linear(F.linear(xl, A), B) * scale
            return result.to(torch.bfloat16)

        for name, i, o in self.shapes["lora"]:
            def make(i=i, o=o):
                g = self.generator()
                f32 = torch.float32
                return {"x": self.randn(g, t, i), "W": self.randn(g, o, i),
                        "A": self.randn(g, r, i, dtype=f32) / i ** 0.5,
                        "B": self.randn(g, o, r, dtype=f32) / r ** 0.5,
                        "dy": self.randn(g, t, o)}

            def base_forward(v):
                x, W = v["x"], v["W"]
                return (lambda: F.linear(x, W)), "torch F.linear bf16"

            def forward(v):
                x, W, A, B = v["x"], v["W"], v["A"], v["B"]

                def call():
                    with torch.no_grad():
                        return peft_forward(x, W, A, B)
                return call, "torch PEFT LoRA Linear forward (bf16 base, fp32 adapters)"

            def base_backward(v):
                dy, W = v["dy"], v["W"]
                return (lambda: dy @ W), "torch matmul bf16 (dy @ W)"

            def backward(v):
                x = v["x"].detach().requires_grad_(True)
                A = v["A"].detach().requires_grad_(True)
                B = v["B"].detach().requires_grad_(True)
                out = peft_forward(x, v["W"], A, B)
                dy = v["dy"]
                return ((lambda: torch.autograd.grad(out, (x, A, B), dy, retain_graph=True)),
                        "torch autograd of PEFT LoRA Linear (dx, dA, dB; W frozen)")

            suffix = f"bf16/{name}_t{t}_in{i}_out{o}_r{r}"
            base = 2 * t * i * o
            adapter = 2 * t * r * (i + o)
            yield Group(make, [
                Bench((f"lora/cuda/base_forward/{suffix}",), base, "TFLOP/s", base_forward),
                Bench((f"lora/cuda/unfused_forward/{suffix}", f"lora/cuda/fused_forward/{suffix}"),
                      base + adapter, "TFLOP/s", forward),
                Bench((f"lora/cuda/base_backward/{suffix}",), base, "TFLOP/s", base_backward),
                Bench((f"lora/cuda/fused_backward/{suffix}",),
                      base + 2 * adapter, "TFLOP/s", backward),
            ])

    def attention(self):
        torch = self.torch
        F = torch.nn.functional
        s = self.shapes["attention"]
        if self.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def context():
                return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
            peer = "torch sdpa flash"
        else:
            context = contextlib.nullcontext
            peer = "torch sdpa (default cpu backend)"

        for d in s["head_dims"]:
            for causal in (False, True):
                for seq in s["seqs"]:
                    batch, heads = s["tokens"] // seq, s["width"] // d

                    def make(batch=batch, seq=seq, heads=heads, d=d):
                        g = self.generator()
                        # Contiguous [batch, seq, heads, d]; SDPA sees
                        # [batch, heads, seq, d] views.
                        return {n: self.randn(g, batch, seq, heads, d)
                                for n in ("q", "k", "v", "dout")}

                    def forward(t, causal=causal):
                        q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))

                        def call():
                            with torch.no_grad():
                                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        return call, peer

                    def forward_backward(t, causal=causal):
                        q, k, v = (t[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
                        dout = t["dout"].transpose(1, 2)

                        def call():
                            q.grad = k.grad = v.grad = None
                            out = F.scaled_dot_product_attention(
                                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                is_causal=causal)
                            out.backward(dout)
                        return call, peer + " fwd+bwd"

                    flops = 4 * batch * heads * seq * seq * d
                    if causal:
                        flops //= 2
                    shape = f"bf16/b{batch}_s{seq}_h{heads}_d{d}" + ("_causal" if causal else "")
                    yield Group(make, [
                        Bench((f"attention/cuda/forward/{shape}",), flops, "TFLOP/s",
                              forward, context),
                        Bench((f"attention/cuda/forward_backward/{shape}",), flops * 7 // 2,
                              "TFLOP/s", forward_backward, context),
                    ])

    def cosine_topk(self):
        torch = self.torch
        F = torch.nn.functional
        c = self.shapes["cosine"]
        m, n, d, k = c["m"], c["n"], c["d"], c["k"]

        oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

        def normalise(x):
            return F.normalize(x.float(), dim=1).to(torch.bfloat16)

        def search(queries, db, block):
            """Exact cosine top-k of every query over db, block by block; db
            may live on the host (each block is then copied over first)."""
            qn = normalise(queries)
            best_s = best_i = None
            for start in range(0, db.shape[0], block):
                rows = db[start:start + block].to(self.dev, non_blocking=True)
                scores = qn @ normalise(rows).T
                s, i = torch.topk(scores.float(), k, dim=1)
                i += start
                if best_s is not None:
                    s, pos = torch.topk(torch.cat((best_s, s), dim=1), k, dim=1)
                    i = torch.gather(torch.cat((best_i, i), dim=1), 1, pos)
                best_s, best_i = s, i
            return best_s, best_i

        def make():
            g = self.generator()
            return {"q": self.randn(g, m, d), "db": self.randn(g, n, d)}

        def builder(streamed):
            def build(t):
                queries, db = t["q"], t["db"]
                if streamed:
                    host = torch.empty(db.shape, dtype=db.dtype, pin_memory=self.cuda)
                    host.copy_(db)
                    db = host
                # Out of memory: smaller blocks, never a smaller problem.
                block = c["block"]
                while True:
                    try:
                        search(queries, db, block)
                        self.sync()
                        break
                    except oom:
                        if block <= 4096:
                            raise
                    block //= 2
                    self.free()
                where = ("resident" if not streamed else
                         "pinned host, copied per block" if self.cuda else "host copy")
                return ((lambda: search(queries, db, block)),
                        f"torch normalize + matmul + topk, db {where}, blocks of {block}")
            return build

        shape = f"bf16/m{m}_n{n}_d{d}_k{k}"
        work = 2 * m * n * d
        yield Group(make, [
            Bench((f"cosine_topk/cuda/resident/{shape}",), work, "TFLOP/s", builder(False)),
            Bench((f"cosine_topk/cuda/streamed/{shape}",), work, "TFLOP/s", builder(True)),
        ])


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, same code paths")
    p.add_argument("--budget-s", type=float, default=85.0,
                   help="start no new measurement after this many seconds")
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="PREFIX",
                   help="run only bench ids starting with one of these")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.out, "a") as out:
        try:
            import torch
        except Exception as e:  # noqa: BLE001 - any import failure is a skip
            emit(out, {"skipped": f"torch cannot be imported: {type(e).__name__}: {e}"})
            return 0
        if args.device == "cuda" and not torch.cuda.is_available():
            emit(out, {"skipped": f"CUDA is not available to torch {torch.__version__}"})
            return 0
        runner = Runner(torch, args, out, SMOKE if args.smoke else FULL)
        runner.run(runner.groups())
    return 0


if __name__ == "__main__":
    sys.exit(main())
