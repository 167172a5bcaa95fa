#!/usr/bin/env python3
"""Times Hugging Face's own MoE blocks with PyTorch on the CPU, for `cargo xtask bench-vs-torch`.

Rows are the CPU shapes of PERFORMANCE.md: `MixtralSparseMoeBlock` (Mixtral-like) and `OlmoeSparseMoeBlock`
(OLMoE-like), f32, inference mode, `torch.set_num_threads(N)`, each with transformers' `eager` and `grouped_mm`
experts implementations. Also measures the sgemm peak (`torch.mm` on (2048x1024)@(1024x3584)).

With `--backward` (or the request `{"op": "block_train", ...}`) each row times one training step instead: the
forward with autograd on (parameters and input requiring grad), `L = sum(output * cotangent)`, and
`L.backward()` — forward plus backward through transformers' own block, gradients set to None between runs.

Low-precision rows (`cargo xtask bench-vs-torch --dtypes bf16,int8`): `{"op": "block", ..., "dtype": "bf16"}` times
the same blocks converted to bf16 (`block.to(torch.bfloat16)`, bf16 input; both experts implementations, PyTorch's
own bf16 matmuls); `{"op": "block_int8", ...}` times the block's routing (f32) with its experts through PyTorch's
weight-only int8 CPU kernel, `torch.ops.aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])` (symmetric, one
scale per output row, like ours), with f32 and with bf16 activations, and checks the kernel against the same loop
on the dequantised weights (`check_max_rel`).

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


def make_block(kind, d, ffn, e, k, dtype="f32"):
    """One HF block with random weights (seed 0), cached per shape; `dtype` "bf16" converts it to bfloat16."""
    key = (kind, d, ffn, e, k, dtype)
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
    if dtype == "bf16":
        block = block.to(torch.bfloat16)
    elif dtype != "f32":
        raise ValueError(f"unknown dtype {dtype}")
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


def time_block(kind, d, ffn, e, k, t, repeats, dtype="f32"):
    block, cfg = make_block(kind, d, ffn, e, k, dtype)
    x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(1))
    if dtype == "bf16":
        x = x.to(torch.bfloat16)
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


def quantize_int8(w):
    """Symmetric int8 per output row of `w` [..., N, K]: (q int8, scales f32 [..., N]), s = max|w| / 127."""
    s = w.abs().amax(dim=-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), s.contiguous()


def int8_experts(block, x, q_gu, s_gu, q_dn, s_dn, mm):
    """The block's forward with its routing in f32 and its experts' products done by `mm(x, q [N, K], s [N])`
    (transformers' eager experts loop: one pair of products per expert hit)."""
    h = x.reshape(-1, x.shape[-1])
    _, top_w, top_i = block.gate(h.float())
    out = torch.zeros_like(h)
    n_experts = q_gu.shape[0]
    mask = torch.nn.functional.one_hot(top_i, num_classes=n_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = int(e[0])
        pos, tok = torch.where(mask[e])
        xe = h[tok]
        gate, up = mm(xe, q_gu[e], s_gu[e]).chunk(2, dim=-1)
        y = mm(torch.nn.functional.silu(gate) * up, q_dn[e], s_dn[e])
        out.index_add_(0, tok, (y * top_w[tok, pos, None].to(y.dtype)).to(out.dtype))
    return out


def time_block_int8(kind, d, ffn, e, k, t, repeats):
    """The block with int8 weight-only experts (`aten._weight_int8pack_mm`): medians in ms with f32 activations
    (`int8_f32`) and bf16 activations (`int8_bf16`), and `check_max_rel`, the f32 path's largest deviation from
    the same loop on the dequantised weights over the latter's largest magnitude."""
    block, _ = make_block(kind, d, ffn, e, k)
    gu, dn = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    q_gu, s_gu = quantize_int8(gu)
    q_dn, s_dn = quantize_int8(dn)
    x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(1))
    pack = torch.ops.aten._weight_int8pack_mm
    dq_gu, dq_dn = q_gu.float() * s_gu.unsqueeze(-1), q_dn.float() * s_dn.unsqueeze(-1)
    out = {}
    with torch.inference_mode():
        got = int8_experts(block, x, q_gu, s_gu, q_dn, s_dn, lambda a, q, s: pack(a, q, s))
        ref = int8_experts(
            block, x, dq_gu, s_gu, dq_dn, s_dn, lambda a, w, s: torch.nn.functional.linear(a, w)
        )
        out["check_max_rel"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        variants = {
            "int8_f32": (x, s_gu, s_dn),
            "int8_bf16": (x.to(torch.bfloat16), s_gu.to(torch.bfloat16), s_dn.to(torch.bfloat16)),
        }
        for name, (xv, sg, sd) in variants.items():
            try:
                out[name] = median_ms(
                    lambda: int8_experts(block, xv, q_gu, sg, q_dn, sd, lambda a, q, s: pack(a, q, s)), repeats
                )
            except Exception as err:  # the op missing in this torch build
                out[name] = None
                out[name + "_error"] = str(err).splitlines()[0][:200]
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
            elif req["op"] == "block":
                ans = time_block(
                    req["block"], req["d"], req["ffn"], req["e"], req["k"], req["t"], reps, req.get("dtype", "f32")
                )
            elif req["op"] in ("block_train", "block_int8"):
                timer = time_block_train if req["op"] == "block_train" else time_block_int8
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
