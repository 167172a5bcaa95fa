#!/usr/bin/env python3
"""Times Hugging Face's own MoE blocks with PyTorch on the CPU, for `cargo xtask bench-vs-torch`.

Rows are the CPU shapes of PERFORMANCE.md: `MixtralSparseMoeBlock` (Mixtral-like) and `OlmoeSparseMoeBlock`
(OLMoE-like), f32, inference mode, `torch.set_num_threads(N)`, each with transformers' `eager` and `grouped_mm`
experts implementations. Also measures the sgemm peak (`torch.mm` on (2048x1024)@(1024x3584)).

With `--backward` (or the request `{"op": "block_train", ...}`) each row times one training step instead: the
forward with autograd on (parameters and input requiring grad), `L = sum(output * cotangent)`, and
`L.backward()` — forward plus backward through transformers' own block, gradients set to None between runs.

Two ways to run it:
  python3 scripts/bench_vs_torch.py --threads 2            # one pass over every row, a table
  python3 scripts/bench_vs_torch.py --threads 2 --serve    # a worker: one JSON request per stdin line,
                                                           # one JSON answer per stdout line (used by xtask)
Requests: {"op": "sgemm", "repeats": 9} or {"op": "block", "block": "mixtral", "d": 1024, "ffn": 3584, "e": 8,
"k": 2, "t": 128, "repeats": 9}. Answers carry medians in milliseconds per implementation.

Needs `pip install torch transformers` (CPU wheels are enough).
"""

import argparse
import json
import statistics
import sys
import time

import torch

ROWS = [
    ("mixtral", 1024, 3584, 8, 2, 16),
    ("mixtral", 1024, 3584, 8, 2, 128),
    ("mixtral", 1024, 3584, 8, 2, 512),
    ("mixtral", 1024, 3584, 8, 2, 2048),
    ("olmoe", 2048, 1408, 64, 6, 128),
    ("olmoe", 2048, 1408, 64, 6, 512),
    ("olmoe", 2048, 1408, 64, 6, 2048),
]
IMPLS = ("eager", "grouped_mm")
_BLOCKS = {}


def make_block(kind, d, ffn, e, k):
    """One HF block with random weights (seed 0), cached per shape."""
    key = (kind, d, ffn, e, k)
    if key in _BLOCKS:
        return _BLOCKS[key]
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=e, num_experts_per_tok=k)
    elif kind == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        cfg = OlmoeConfig(hidden_size=d, intermediate_size=ffn, num_experts=e, num_experts_per_tok=k)
    else:
        raise ValueError(f"unknown block {kind}")
    cfg._experts_implementation = "eager"
    block = Block(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    _BLOCKS.clear()  # keep one block's weights in memory at a time
    _BLOCKS[key] = (block, cfg)
    return block, cfg


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_block(kind, d, ffn, e, k, t, repeats):
    block, cfg = make_block(kind, d, ffn, e, k)
    x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.inference_mode():
        for impl in IMPLS:
            cfg._experts_implementation = impl
            try:
                out[impl] = median_ms(lambda: block(x), repeats)
            except Exception as err:  # an implementation missing in this torch build
                out[impl] = None
                out[impl + "_error"] = str(err).splitlines()[0][:200]
    cfg._experts_implementation = "eager"
    return out


def time_block_train(kind, d, ffn, e, k, t, repeats):
    """Forward + backward (autograd through the HF block) medians in ms per experts implementation."""
    block, cfg = make_block(kind, d, ffn, e, k)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, t, d, generator=gen).requires_grad_(True)
    cot = torch.randn(1, t, d, generator=gen)
    for p in block.parameters():
        p.requires_grad_(True)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * cot).sum().backward()

    res = {}
    with torch.enable_grad():
        for impl in IMPLS:
            cfg._experts_implementation = impl
            try:
                res[impl] = median_ms(step, repeats)
            except Exception as err:  # an implementation without a backward in this torch build
                res[impl] = None
                res[impl + "_error"] = str(err).splitlines()[0][:200]
    cfg._experts_implementation = "eager"
    block.zero_grad(set_to_none=True)
    for p in block.parameters():
        p.requires_grad_(False)
    return res


def time_sgemm(repeats):
    a = torch.randn(2048, 1024)
    b = torch.randn(1024, 3584)
    with torch.inference_mode():
        ms = median_ms(lambda: torch.mm(a, b), repeats, warmup=3)
    return {"ms": ms, "gflops": 2 * 2048 * 1024 * 3584 / ms / 1e6}


def serve(args):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            reps = int(req.get("repeats", args.repeats))
            if req["op"] == "sgemm":
                ans = time_sgemm(reps)
            elif req["op"] in ("block", "block_train"):
                timer = time_block if req["op"] == "block" else time_block_train
                ans = timer(req["block"], req["d"], req["ffn"], req["e"], req["k"], req["t"], reps)
            elif req["op"] == "info":
                ans = {}
            else:
                raise ValueError(f"unknown op {req['op']}")
            ans["ok"] = True
        except Exception as err:
            ans = {"ok": False, "error": str(err)}
        ans["torch"] = torch.__version__
        ans["threads"] = torch.get_num_threads()
        print(json.dumps(ans), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin, one per line")
    p.add_argument("--backward", action="store_true", help="time forward + backward (autograd) instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve(args)
        return
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    s = time_sgemm(args.repeats)
    print(f"sgemm (2048x1024)@(1024x3584): {s['ms']:.2f} ms, {s['gflops']:.1f} GFLOP/s")
    print("| block | d | ffn | E | k | T | eager ms | grouped_mm ms | best GFLOP/s |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --: |")
    for kind, d, ffn, e, k, t in ROWS:
        timer = time_block_train if args.backward else time_block
        r = timer(kind, d, ffn, e, k, t, args.repeats)
        best = min(v for v in (r["eager"], r["grouped_mm"]) if v is not None)
        gf = (3 if args.backward else 1) * 2 * t * k * 3 * d * ffn / best / 1e6
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
        print(f"| {kind} | {d} | {ffn} | {e} | {k} | {t} | {fmt(r['eager'])} | {fmt(r['grouped_mm'])} | {gf:.1f} |")


if __name__ == "__main__":
    main()
