#!/usr/bin/env python3
"""Times Hugging Face's own MoE blocks with PyTorch on a GPU, for scripts/cuda-device.sh.

Rows are the GPU shapes of PERFORMANCE.md that `moe bench --backend cuda` runs: the Mixtral-8x7B layer and the
Qwen3-30B-A3B layer in bf16, and the Mixtral-like layer in f32, each with transformers' `eager` and
`grouped_mm` experts implementations, timed with CUDA events (median of `--repeats` after a warm-up), inputs
already on the device. First (on cuda) a line with the card's measured ceilings (bf16 GEMM TFLOP/s, copy TB/s);
then one JSON object per row on stdout:
  {"shape": "mixtral8x7b", "dtype": "bf16", "t": 128, "eager": 2.9, "grouped_mm": 1.7}
(milliseconds; null with an "<impl>_error" entry when an implementation fails, e.g. out of memory).

  python3 scripts/torch_gpu_blocks.py                       # every row, on cuda
  python3 scripts/torch_gpu_blocks.py --device cpu --small  # a quick check of the script itself on the CPU
"""

import argparse
import json
import statistics
import sys
import time

import torch

# (name, block, d, ffn, E, k, dtype, T list)
SHAPES = [
    ("mixtral8x7b", "mixtral", 4096, 14336, 8, 2, "bf16", [1, 16, 128, 1024, 4096, 16384]),
    ("qwen3-30b-a3b", "qwen3_moe", 2048, 768, 128, 8, "bf16", [1, 16, 128, 1024, 4096, 16384]),
    ("mixtral-like", "mixtral", 1024, 3584, 8, 2, "f32", [128, 2048, 8192]),
]
SMALL = [("small", "mixtral", 64, 96, 4, 2, "f32", [16, 64]), ("small-qwen", "qwen3_moe", 64, 32, 8, 2, "f32", [16])]
IMPLS = ("eager", "grouped_mm")


def make_block(kind, d, ffn, e, k, dtype, device):
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=e, num_experts_per_tok=k)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=ffn, num_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    with torch.device(device):
        block = Block(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block, cfg


def median_ms(fn, repeats, device):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(repeats):
    """The card's bf16 GEMM rate (8192^3) and device-to-device copy bandwidth (4 GiB, bytes read + written)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), repeats, "cuda")
    src = torch.empty(1 << 30, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    cms = median_ms(lambda: dst.copy_(src), repeats, "cuda")
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {
        "ceilings": True,
        "device": torch.cuda.get_device_name(),
        "bf16_tflops": 2 * 8192**3 / ms / 1e9,
        "copy_tb_per_s": 2 * (1 << 32) / cms / 1e9,
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--small", action="store_true", help="tiny shapes, to check the script")
    args = p.parse_args()
    if args.device == "cuda":
        print(json.dumps(ceilings(args.repeats)), flush=True)
    for name, kind, d, ffn, e, k, dt, ts in SMALL if args.small else SHAPES:
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        try:
            block, cfg = make_block(kind, d, ffn, e, k, dtype, args.device)
        except Exception as err:  # out of memory, a missing block
            print(json.dumps({"shape": name, "dtype": dt, "error": str(err).splitlines()[0][:200]}), flush=True)
            continue
        for t in ts:
            x = torch.randn(1, t, d, device=args.device, dtype=dtype, generator=None)
            row = {"shape": name, "dtype": dt, "t": t}
            with torch.inference_mode():
                for impl in IMPLS:
                    cfg._experts_implementation = impl
                    try:
                        row[impl] = median_ms(lambda: block(x), args.repeats, args.device)
                    except Exception as err:
                        row[impl] = None
                        row[impl + "_error"] = str(err).splitlines()[0][:200]
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
            cfg._experts_implementation = "eager"
            print(json.dumps(row), flush=True)
        del block
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
