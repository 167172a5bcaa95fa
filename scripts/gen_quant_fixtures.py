#!/usr/bin/env python3
"""Fixtures for packed low-precision experts (issue 18), computed by transformers' own code: tests/fixtures/quant.

Writes, into ``--out DIR`` (default ``tests/fixtures/quant``):

* ``mxfp4_dequant.safetensors``: random MXFP4 ``blocks`` uint8 ``[E, R, C/32, 16]`` and E8M0 ``scales`` uint8
  ``[E, R, C/32]`` (every nibble; scale codes 0, 1, 126, 127, 128 and 254 present) and what transformers'
  ``integrations/mxfp4.py`` ``convert_moe_packed_tensors`` returns for them, ``[E, C, R]`` (it transposes), with
  ``dtype=torch.float32`` (``ref.dequant_f32``) and with its default ``torch.bfloat16`` (``ref.dequant_bf16``,
  widened to f32 for storage, exactly).
* ``fp8_dequant.safetensors``: two FP8 E4M3 weights ``[E, R, C]`` (``partial``: R, C not multiples of 128;
  ``full``: multiples) covering every non-NaN code, f32 ``weight_scale_inv`` ``[E, ceil(R/128), ceil(C/128)]``, and
  transformers' ``integrations/finegrained_fp8.py`` ``_dequantize_fp8_weight(w, s, [128, 128], torch.float32)``
  (``ref.<name>.dequant``). For the ``full`` weight ``Fp8Dequantize._dequantize_one`` (the load-time
  ``dequantize=True`` op) is checked here to give the same bits; for ``partial`` it infers the block size from the
  scale grid (``rows // grid_rows``) and is wrong, which is recorded in ``dequant.json``.
* ``dequant.json``: the two files above (bytes, sha256, tensors, notes).
* ``gpt_oss_mxfp4.safetensors`` and ``deepseek_v3_fp8.safetensors`` with ``manifest.json``: two cases in the golden
  fixture format of tests/fixtures/hf (unprefixed state dict + ``ref.*`` + manifest ``routing``), with the expert
  weights in their packed checkpoint form and ``routing.quantization_config`` as the checkpoints' config.json has
  it. The references are transformers' ``GptOssMLP`` / ``DeepseekV3MoE`` forward (f32, eager experts) on the
  weights dequantised by transformers' own code, computed by the ``refs_*`` functions of
  tests/fixtures/hf/generate.py (imported, not copied).

``--check DIR`` regenerates everything into a temporary directory and compares it byte for byte with ``DIR``.

Deterministic: CPU, one intra-op thread, fixed seeds (``--seed``, default 18), inputs copied into fresh memory.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_GENERATE = os.path.join(REPO, "tests", "fixtures", "hf", "generate.py")
MIN_MARGIN = 5e-4
FP8_BLOCK = [128, 128]
MXFP4_SCALE_CODES = [0, 1, 126, 127, 128, 254]


def load_hf_generate():
    """tests/fixtures/hf/generate.py as a module: its block builders and ``refs_*`` are the reference code."""
    spec = importlib.util.spec_from_file_location("hf_generate", HF_GENERATE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hf_generate"] = mod
    spec.loader.exec_module(mod)
    return mod


GEN = load_hf_generate()

from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(tensors: dict) -> dict:
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()}


def save(out_dir: str, name: str, tensors: dict, meta: dict) -> dict:
    path = os.path.join(out_dir, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"fixture": json.dumps(meta)})
    return {"file": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------------- packing helpers


def fp8_quantize_blocks(w: torch.Tensor):
    """DeepSeek-V3's block recipe on ``w`` ``[R, C]`` (f32): per 128 x 128 block (the last ones partial)
    ``s = amax / 448``, ``q = e4m3(w / s)`` (torch's cast, nearest even). Returns (q float8_e4m3fn [R, C],
    weight_scale_inv f32 [ceil(R/128), ceil(C/128)]). Only makes inputs: transformers dequantises them."""
    r, c = w.shape
    br, bc = FP8_BLOCK
    gr, gc = math.ceil(r / br), math.ceil(c / bc)
    pad = torch.zeros(gr * br, gc * bc, dtype=torch.float32)
    pad[:r, :c] = w
    amax = pad.abs().reshape(gr, br, gc, bc).amax(dim=(1, 3))
    s = (amax / 448.0).to(torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    full = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:r, :c]
    q = (w / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s


def fp8_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """transformers' own block-FP8 dequantisation (f32)."""
    return _dequantize_fp8_weight(q, s, FP8_BLOCK, torch.float32)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """transformers' own MXFP4 dequantisation: ``[E, R, G, 16]`` blocks -> ``[E, G*32, R]``; ``dtype=None`` takes
    its default (bf16)."""
    if dtype is None:
        return convert_moe_packed_tensors(blocks.clone(), scales.clone())
    return convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)


# ---------------------------------------------------------------------------------------------------- (a) MXFP4


def mxfp4_dequant_file(out_dir: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    E, R, C = 2, 24, 96
    blocks = torch.randint(0, 256, (E, R, C // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (E, R, C // 32), generator=g, dtype=torch.uint8)
    # Every nibble, low and high, in the first block; every special scale code somewhere.
    blocks[0, 0, 0, :8] = torch.tensor([(2 * i) | ((2 * i + 1) << 4) for i in range(8)], dtype=torch.uint8)
    blocks[0, 0, 0, 8:] = torch.tensor([(2 * i + 1) | ((2 * i) << 4) for i in range(8)], dtype=torch.uint8)
    for i, code in enumerate(MXFP4_SCALE_CODES):
        scales[i % E, 1 + i, i % (C // 32)] = code
        scales[(i + 1) % E, 2 * i + 3, (i + 1) % (C // 32)] = code
    out32 = mxfp4_dequant(blocks, scales, torch.float32)
    out16 = mxfp4_dequant(blocks, scales, None)  # its default, bf16
    assert out16.dtype == torch.bfloat16
    tensors = {
        "blocks": blocks,
        "scales": scales,
        "ref.dequant_f32": out32,
        "ref.dequant_bf16": out16.to(torch.float32),
    }
    entry = save(out_dir, "mxfp4_dequant.safetensors", tensors,
                 {"what": "mxfp4 dequant", "seed": seed})
    entry.update({
        "tensors": listing(tensors),
        "dims": [E, R, C],
        "source": "transformers.integrations.mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=...)",
        "notes": [
            "blocks [E, R, C/32, 16] uint8, column 2i of a 32-block in the LOW nibble of byte i; scales [E, R, C/32] "
            "uint8 E8M0 (value 2^(code-127)).",
            "ref.* are [E, C, R]: convert_moe_packed_tensors returns the unpacked [E, R, C] transposed (GPT-OSS's "
            "x @ W layout).",
            "ref.dequant_f32: dtype=torch.float32; ref.dequant_bf16: its default dtype=torch.bfloat16, widened to f32 "
            "exactly.",
            f"scale codes {MXFP4_SCALE_CODES} are present; code 254 times a nibble value >= 2 overflows to inf in f32 "
            "and bf16 alike (6 * 2^127 > f32 max).",
        ],
    })
    return entry


# ---------------------------------------------------------------------------------------------------- (b) FP8


def fp8_codes(g: torch.Generator, shape) -> torch.Tensor:
    """Random E4M3 codes (never NaN: 0x7F / 0xFF), the first 254 being every non-NaN code once."""
    valid = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    n = math.prod(shape)
    idx = torch.randint(0, valid.numel(), (n,), generator=g)
    codes = valid[idx]
    codes[: valid.numel()] = valid
    return codes.reshape(shape).view(torch.float8_e4m3fn)


def fp8_scales(g: torch.Generator, shape) -> torch.Tensor:
    """Positive f32 multipliers spread over 2^-14 .. 2^6, not powers of two (so the product rounds)."""
    return torch.exp2(torch.rand(shape, generator=g) * 20.0 - 14.0).to(torch.float32)


def fp8_dequant_file(out_dir: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    tensors, weights, notes = {}, {}, []
    for name, (E, R, C) in {"partial": (1, 136, 140), "full": (2, 128, 128)}.items():
        q = fp8_codes(g, (E, R, C))
        s = fp8_scales(g, (E, math.ceil(R / 128), math.ceil(C / 128)))
        ours_hf = fp8_dequant(q.clone(), s.clone())
        op = Fp8Dequantize(None)._dequantize_one(q.clone(), s.clone(), output_dtype=torch.float32)
        same = torch.equal(op.view(torch.int32), ours_hf.view(torch.int32))
        if name == "full":
            assert same, "Fp8Dequantize and _dequantize_fp8_weight differ on full blocks"
            notes.append("full: Fp8Dequantize._dequantize_one (load-time dequantize=True) gives the same bits as "
                         "_dequantize_fp8_weight (checked by the generator).")
        else:
            notes.append(
                f"partial: Fp8Dequantize._dequantize_one infers the block from the scale grid ({R}//{s.shape[1]} x "
                f"{C}//{s.shape[2]}) instead of 128 x 128 and differs from _dequantize_fp8_weight "
                f"(bit-identical: {same}); it is not recorded. _dequantize_fp8_weight takes the block size explicitly "
                "and handles partial blocks as DeepSeek-V3 defines them.")
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale_inv"] = s
        tensors[f"ref.{name}.dequant"] = ours_hf
        weights[name] = [E, R, C]
    entry = save(out_dir, "fp8_dequant.safetensors", tensors, {"what": "fp8 dequant", "seed": seed + 1})
    entry.update({
        "tensors": listing(tensors),
        "dims": weights,
        "block": FP8_BLOCK,
        "source": "transformers.integrations.finegrained_fp8._dequantize_fp8_weight(w, s, [128, 128], torch.float32)",
        "notes": [
            "<name>.weight [E, R, C] float8_e4m3fn (every non-NaN code present), <name>.weight_scale_inv [E, ceil(R/128), "
            "ceil(C/128)] f32 multipliers; ref.<name>.dequant [E, R, C] f32: W = e4m3(q) * s[r/128, c/128], one f32 "
            "rounding.",
            "the fp8 linear of transformers (fp8_linear) needs DeepGEMM or Triton (GPU); on a CPU the dequantisation "
            "paths are _dequantize_fp8_weight (used for its backward) and the Fp8Dequantize load op.",
            *notes,
        ],
    })
    return entry


# ---------------------------------------------------------------------------------------------------- (c) GPT-OSS


GPT_OSS_SPEC = dict(B=2, S=16, d=64, f=64, E=8, k=2, alpha=1.702, limit=2.0)
GPT_OSS_SCALES = (118, 124)


def gpt_oss_draw(seed: int, spec: dict):
    """Packed state (checkpoint names, unprefixed) and input, one torch stream: router.weight N(0, 1/d),
    router.bias N(0, 0.5^2), blocks uniform bytes, scales uniform in GPT_OSS_SCALES, biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    d, f, E = spec["d"], spec["f"], spec["E"]
    lo, hi = GPT_OSS_SCALES
    st = {}
    st["router.weight"] = torch.randn(E, d, generator=g) / math.sqrt(d)
    st["router.bias"] = torch.randn(E, generator=g) * 0.5
    st["experts.gate_up_proj_blocks"] = torch.randint(0, 256, (E, 2 * f, d // 32, 16), generator=g, dtype=torch.uint8)
    st["experts.gate_up_proj_scales"] = torch.randint(lo, hi + 1, (E, 2 * f, d // 32), generator=g, dtype=torch.uint8)
    st["experts.gate_up_proj_bias"] = torch.randn(E, 2 * f, generator=g) * 0.1
    st["experts.down_proj_blocks"] = torch.randint(0, 256, (E, d, f // 32, 16), generator=g, dtype=torch.uint8)
    st["experts.down_proj_scales"] = torch.randint(lo, hi + 1, (E, d, f // 32), generator=g, dtype=torch.uint8)
    st["experts.down_proj_bias"] = torch.randn(E, d, generator=g) * 0.1
    x = torch.randn(spec["B"], spec["S"], d, generator=g)
    return st, x


def gpt_oss_dequantised(st: dict) -> dict:
    """The f32 GptOssMLP state dict: transformers' convert_moe_packed_tensors on the packed experts."""
    return {
        "router.weight": st["router.weight"],
        "router.bias": st["router.bias"],
        "experts.gate_up_proj": mxfp4_dequant(st["experts.gate_up_proj_blocks"], st["experts.gate_up_proj_scales"],
                                              torch.float32),
        "experts.gate_up_proj_bias": st["experts.gate_up_proj_bias"],
        "experts.down_proj": mxfp4_dequant(st["experts.down_proj_blocks"], st["experts.down_proj_scales"],
                                           torch.float32),
        "experts.down_proj_bias": st["experts.down_proj_bias"],
    }


# ---------------------------------------------------------------------------------------------------- (d) DeepSeek-V3


DEEPSEEK_SPEC = dict(B=2, S=16, d=64, f=136, E=6, k=2, n_group=3, topk_group=2, rsf=2.5, n_shared=1)
PROJS = ("gate_proj", "up_proj", "down_proj")


def deepseek_draw(seed: int, spec: dict):
    """The hf generator's seeded f32 draw of DeepseekV3MoE (weights N(0, 1/fan_in)), each expert and shared
    projection then packed to FP8 with 128 x 128 block scales in checkpoint names (unprefixed)."""
    st32, x = GEN.seeded_state_and_input("deepseek_v3", spec, seed)
    f = spec["f"]
    packed = {"gate.weight": st32["gate.weight"], "gate.e_score_correction_bias": st32["gate.e_score_correction_bias"]}
    for e in range(spec["E"]):
        mats = {"gate_proj": st32["experts.gate_up_proj"][e, :f], "up_proj": st32["experts.gate_up_proj"][e, f:],
                "down_proj": st32["experts.down_proj"][e]}
        for p in PROJS:
            q, s = fp8_quantize_blocks(mats[p].contiguous())
            packed[f"experts.{e}.{p}.weight"], packed[f"experts.{e}.{p}.weight_scale_inv"] = q, s
    for p in PROJS:
        q, s = fp8_quantize_blocks(st32[f"shared_experts.{p}.weight"].contiguous())
        packed[f"shared_experts.{p}.weight"], packed[f"shared_experts.{p}.weight_scale_inv"] = q, s
    return packed, x


def deepseek_dequantised(st: dict, spec: dict) -> dict:
    """The f32 DeepseekV3MoE state dict: every FP8 linear through transformers' _dequantize_fp8_weight, the experts
    merged as transformers' conversion mapping does (stack over experts, cat gate and up on dim 1)."""
    deq = {k[: -len(".weight")]: fp8_dequant(st[k], st[k + "_scale_inv"])
           for k in st if k.endswith(".weight") and k + "_scale_inv" in st}
    E = spec["E"]
    return {
        "experts.gate_up_proj": torch.stack(
            [torch.cat([deq[f"experts.{e}.gate_proj"], deq[f"experts.{e}.up_proj"]], dim=0) for e in range(E)]),
        "experts.down_proj": torch.stack([deq[f"experts.{e}.down_proj"] for e in range(E)]),
        "gate.weight": st["gate.weight"],
        "gate.e_score_correction_bias": st["gate.e_score_correction_bias"],
        **{f"shared_experts.{p}.weight": deq[f"shared_experts.{p}"] for p in PROJS},
    }


# ---------------------------------------------------------------------------------------------------- block cases


BLOCK_CASES = {
    "gpt_oss_mxfp4": dict(
        family="gpt_oss", spec=GPT_OSS_SPEC, draw=gpt_oss_draw, dequantised=lambda st, spec: gpt_oss_dequantised(st),
        quantization_config={"quant_method": "mxfp4"},
        notes=[
            "expert weights in GPT-OSS's checkpoint form: experts.gate_up_proj_blocks [E, 2f, d/32, 16] uint8 (rows "
            "interleaved: 2j gate j, 2j+1 up j), experts.gate_up_proj_scales [E, 2f, d/32] uint8 E8M0, "
            "experts.down_proj_blocks [E, d, f/32, 16], experts.down_proj_scales [E, d, f/32]; biases and router f32.",
            "reference: transformers' convert_moe_packed_tensors(dtype=float32) on the packed tensors, loaded into "
            "GptOssMLP (strict), forward in f32; refs computed by tests/fixtures/hf/generate.py refs_gpt_oss.",
            f"scale codes drawn uniformly in {list(GPT_OSS_SCALES)} (inclusive), blocks uniform bytes.",
        ]),
    "deepseek_v3_fp8": dict(
        family="deepseek_v3", spec=DEEPSEEK_SPEC, draw=deepseek_draw, dequantised=deepseek_dequantised,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": FP8_BLOCK,
                             "activation_scheme": "dynamic"},
        notes=[
            "expert weights in DeepSeek-V3's checkpoint form, per expert: experts.{e}.{gate,up,down}_proj.weight "
            "float8_e4m3fn [out, in] and .weight_scale_inv f32 [ceil(out/128), ceil(in/128)] (a multiplier); the "
            "shared expert likewise (shared_experts.{gate,up,down}_proj.weight + weight_scale_inv, FP8 as in the real "
            "checkpoint); router gate.weight and gate.e_score_correction_bias f32.",
            "moe_intermediate_size 136 = 128 + 8: gate/up [136, 64] have 2 x 1 blocks, down [64, 136] 1 x 2, all but "
            "the first partial.",
            "weights: the hf generator's seeded f32 draw, packed with DeepSeek-V3's recipe (s = amax/448 per block, "
            "q = e4m3(w/s)); reference: transformers' _dequantize_fp8_weight on each linear, merged as its "
            "conversion mapping does, loaded into DeepseekV3MoE (strict), forward in f32; refs computed by "
            "tests/fixtures/hf/generate.py refs_deepseek_v3.",
        ]),
}


def block_case(out_dir: str, name: str, seed: int, max_attempts: int = 20) -> dict:
    c = BLOCK_CASES[name]
    fam, spec = c["family"], c["spec"]
    base = GEN.case_seed(name, seed)
    for attempt in range(max_attempts):
        s = (base + attempt) % (2**31 - 1)
        packed, x = c["draw"](s, spec)
        block, refs, stats = GEN.compute_case(fam, spec, c["dequantised"](packed, spec), x)
        margins = GEN.selection_margins(fam, block, refs, stats, spec)
        if min(margins.values()) >= MIN_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no draw with selection margins >= {MIN_MARGIN} in {max_attempts} attempts")
    meta = {"case": name, "hf_class": GEN.FAMILIES[fam].hf_class, "set": "quant",
            "torch": torch.__version__, "transformers": GEN.transformers.__version__}
    entry = save(out_dir, f"{name}.safetensors", {**packed, **refs}, meta)
    routing = {**GEN.FAMILIES[fam].routing(spec), "quantization_config": c["quantization_config"]}
    return {
        "name": name,
        "file": entry["file"],
        "bytes": entry["bytes"],
        "sha256": entry["sha256"],
        "hf_class": GEN.FAMILIES[fam].hf_class,
        "model_family": fam,
        "case_seed": s,
        "batch": spec["B"],
        "seq_len": spec["S"],
        "tokens": spec["B"] * spec["S"],
        "routing": routing,
        "state_dict": listing(packed),
        "ref": listing(refs),
        "stats": {**stats, "selection_margins": margins},
        "notes": list(GEN.FAMILIES[fam].notes) + c["notes"],
    }


def generate(out_dir: str, seed: int) -> None:
    GEN.setup_torch()
    os.makedirs(out_dir, exist_ok=True)
    dequant = {
        "seed": seed,
        "versions": GEN.versions(),
        "files": {"mxfp4": mxfp4_dequant_file(out_dir, seed), "fp8": fp8_dequant_file(out_dir, seed)},
    }
    with open(os.path.join(out_dir, "dequant.json"), "w") as f:
        f.write(json.dumps(dequant, indent=1) + "\n")
    cases = [block_case(out_dir, name, seed) for name in BLOCK_CASES]
    manifest = {**GEN.manifest_header("quant", seed), "dtype": "packed experts, f32 router and references",
                "cases": cases}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    for c in cases:
        print(f"{c['name']}: case_seed {c['case_seed']}, {c['bytes']} bytes, margins "
              + ", ".join(f"{k} {v:.4g}" for k, v in c["stats"]["selection_margins"].items()))
    print(f"wrote {out_dir}")


def check(fixture_dir: str, seed: int) -> int:
    """Regenerates into a temporary directory and compares every file byte for byte (the manifests' ``platform``
    line aside)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, seed)
        bad = 0
        for name in sorted(os.listdir(tmp)):
            a, b = os.path.join(tmp, name), os.path.join(fixture_dir, name)
            if name.endswith(".json"):
                ja, jb = json.load(open(a)), json.load(open(b))
                for j in (ja, jb):
                    j["versions"].pop("platform", None)
                same = ja == jb
            else:
                same = os.path.exists(b) and filecmp.cmp(a, b, shallow=False)
            print(f"  {name:32} {'identical' if same else 'DIFFERS'}")
            bad += not same
    print("all files reproduce" if bad == 0 else f"{bad} file(s) differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "quant"))
    ap.add_argument("--check", metavar="DIR", help="regenerate and compare with DIR byte for byte")
    ap.add_argument("--seed", type=int, default=18)
    a = ap.parse_args(argv)
    if a.check:
        return check(a.check, a.seed)
    generate(a.out, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
