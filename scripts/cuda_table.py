#!/usr/bin/env python3
"""Prints the GPU table of scripts/cuda-device.sh: our `moe bench --backend cuda` rows beside PyTorch's HF
blocks timed in the same run, with the floor of PERFORMANCE.md (the larger of weight bytes / copy bandwidth and
FLOPs / bf16 GEMM rate, both measured in that run).

  python3 scripts/cuda_table.py TORCH_JSONL OURS_JSON...
"""

import json
import sys


def main():
    torch_rows, ceil = {}, None
    with open(sys.argv[1]) as f:
        for line in f:
            r = json.loads(line)
            if r.get("ceilings"):
                ceil = r
            elif "t" in r:
                torch_rows[(r["shape"], r["dtype"], r["t"])] = r
    print("| shape | dtype | T | ours ms | eager ms | grouped_mm ms | torch best / ours | ours TFLOP/s | weights GB/s | floor ms | ours / floor |")
    print("| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for path in sys.argv[2:]:
        with open(path) as f:
            rep = json.load(f)
        shape, dtype = rep["shape"], rep["dtype"]
        d, ffn, k = rep["d_model"], rep["ffn"], rep["top_k"]
        bpw = 2 if dtype in ("bf16", "f16") else 4
        for row in rep["rows"]:
            t, ms = row["tokens"], row["median_ms"]
            flops = 2 * t * k * 3 * d * ffn
            wbytes = row["experts_hit"] * 3 * d * ffn * bpw
            tr = torch_rows.get((shape, dtype, t), {})
            best = min([v for v in (tr.get("eager"), tr.get("grouped_mm")) if v is not None], default=None)
            floor = None
            if ceil and dtype == "bf16":
                floor = max(wbytes / (ceil["copy_tb_per_s"] * 1e12), flops / (ceil["bf16_tflops"] * 1e12)) * 1e3
            fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
            print(
                f"| {shape} | {dtype} | {t} | {ms:.3f} | {fmt(tr.get('eager'))} | {fmt(tr.get('grouped_mm'))} | "
                f"{fmt(best / ms if best else None, 2)} | {flops / ms / 1e9:.1f} | {row['weight_gb_per_s']:.0f} | "
                f"{fmt(floor)} | {fmt(ms / floor if floor else None, 2)} |"
            )
    if ceil:
        print(f"\nceilings measured in this run on {ceil['device']} (torch {ceil['torch']}): bf16 GEMM "
              f"{ceil['bf16_tflops']:.0f} TFLOP/s, device copy {ceil['copy_tb_per_s']:.2f} TB/s")


if __name__ == "__main__":
    main()
