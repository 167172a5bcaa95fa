#!/usr/bin/env python3
"""The PyTorch reference of moe-train's language model, for the training fixture and `cargo xtask bench-train-vs-torch`.

It implements the model contract of moe-train (the byte LM of `moe train --task charlm`: embedding, learned
positions, pre-norm blocks of RMSNorm, causal multi-head attention and an MoE FFN, a final RMSNorm and the tied
output projection) in plain PyTorch, without transformers, and trains it with `torch.optim.AdamW` (single-tensor
path), nanoGPT's warm-up + cosine schedule and `torch.nn.utils.clip_grad_norm_`, exactly as the contract says. The
MoE forward is the per-expert loop of transformers' Mixtral block: for each expert, gather its tokens, run the
expert, scatter-add weight * output.

Modes:
  python3 scripts/train_reference.py --dir DIR [--threads N]
      Reads DIR/config.json (serde JSON of moe-train's LmConfig and TrainConfig: {"model": .., "train": ..}),
      DIR/init.safetensors (every parameter by its moe-train name, f32) and DIR/batches.safetensors (`inputs`,
      `targets`: int32 [S, B, C]); trains S steps; writes DIR/reference.json
      {"torch", "threads", "steps", "ce": [S], "aux": [S], "loss": [S], "grad_norm": [S], "lr": [S],
       "aux_layers": [S][L]} and DIR/final.safetensors (the parameters after S steps).
      `ce` is the cross-entropy (nats per byte), `aux` the weighted sum of the aux losses
      (sum_l c * aux_l, so loss = ce + aux), `aux_layers` the unweighted aux loss of each layer, `grad_norm` the
      total gradient L2 norm before clipping, `lr` the learning rate of each step.
      Exact for the dense baseline and for softmax-topk with default options (MLP and SwiGLU banks).
  python3 scripts/train_reference.py --dir DIR --write-config dense|softmax-topk [--bank mlp|swiglu]
      Writes the contract's small example config to DIR/config.json.
  python3 scripts/train_reference.py --dir DIR --init-random SEED [--corpus PATH]
      Writes DIR/init.safetensors and DIR/batches.safetensors for DIR/config.json (seeded, the contract's names,
      shapes and inits; windows of a byte file, by default of a built-in text of English words): the script's
      own self-test input. The fixture of the Rust tests is made by `cargo xtask train-ref-fixture` instead
      (weights and batches from moe-train).
  python3 scripts/train_reference.py --self-test [--threads N]
      Checks the hand-written pieces against second implementations (F.scaled_dot_product_attention with
      is_causal, torch's RMSNorm, a dense-weighted MoE, transformers' Mixtral load-balancing formula, the AdamW
      update of moe-train/src/optim.rs written out), and that two runs are bit-identical.
  python3 scripts/train_reference.py --bench --router NAME --steps 60 --warmup 10 --threads 2 [--corpus PATH]
      Times training steps of the same model (random init, windows of a byte file or of the built-in text), only
      the steps after the warm-up, with torch's own fast pieces (F.scaled_dot_product_attention, F.rms_norm;
      `--contract-ops` for the written-out ones); prints one JSON line {"tokens_per_s", "step_ms_median",
      "steps", "threads", "router", ...}. Routers: dense, softmax-topk, switch-top1, noisy-topk, hash,
      expert-choice (the last four are close to moe-rs's defaults, not exact: the routing is a small part of a
      step). PEER is not implemented.

Needs `pip install torch safetensors` (CPU wheels are enough). Everything is float32.
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


def f32(x):
    """`x` rounded to the nearest float32, as a Python float (moe-train keeps its options in f32)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def example_config(kind, bank="mlp"):
    """The contract's small example configuration (dense baseline or softmax-topk)."""
    ffn_kind = {"kind": "dense"} if kind == "dense" else {"kind": "moe", "router": kind, "options": {}}
    return {
        "model": {
            "vocab": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "context": 16, "norm_eps": 1e-5,
            "ffn": {"kind": ffn_kind, "bank": bank, "experts": 4, "top_k": 2, "expert_width": 32},
        },
        "train": {
            "steps": 20, "batch": 4, "eval_interval": 10, "eval_batches": 2, "seed": 1, "bias_rate": 0.001,
            "aux_coef": None, "z_coef": None,
            "optim": {"lr": 0.001, "min_lr": 0.0001, "warmup": 5, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8,
                      "weight_decay": 0.1, "grad_clip": 1.0},
        },
    }


def bench_config(router, args):
    """The bench model (`--bench`): the flags' sizes, moe-train's default optimizer."""
    cfg = example_config("dense" if router == "dense" else router, args.bank)
    m = cfg["model"]
    m.update(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context)
    m["ffn"].update(experts=args.experts, top_k=args.top_k, expert_width=args.expert_width)
    cfg["train"].update(steps=args.steps, batch=args.batch, seed=args.seed)
    cfg["train"]["optim"].update(warmup=100)
    return cfg


def check_config(cfg):
    """Validates a config dict; returns (model, train) or raises ValueError naming the field."""
    try:
        m, t = cfg["model"], cfg["train"]
        o = t["optim"]
        ffn = m["ffn"]
        kind = ffn["kind"]["kind"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"config.json lacks {e}: it must be {{'model': LmConfig, 'train': TrainConfig}}") from e
    if m["vocab"] != VOCAB:
        raise ValueError(f"model.vocab = {m['vocab']}: the reference is byte-level (256)")
    if m["d_model"] % m["n_heads"] != 0:
        raise ValueError(f"model.n_heads = {m['n_heads']} does not divide d_model = {m['d_model']}")
    if kind not in ("dense", "moe"):
        raise ValueError(f"model.ffn.kind.kind = {kind!r}: expected dense or moe")
    if ffn["bank"] not in ("mlp", "swiglu"):
        raise ValueError(f"model.ffn.bank = {ffn['bank']!r}: expected mlp or swiglu")
    if not 1 <= ffn["top_k"] <= max(ffn["experts"], 1):
        raise ValueError(f"model.ffn.top_k = {ffn['top_k']} is not in [1, experts = {ffn['experts']}]")
    for key in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):
        if not isinstance(o[key], (int, float)) or not math.isfinite(o[key]):
            raise ValueError(f"train.optim.{key} = {o[key]!r}: expected a finite number")
    return m, t


def router_name(model_cfg):
    kind = model_cfg["ffn"]["kind"]
    return "dense" if kind["kind"] == "dense" else kind["router"]


def lr_at(o, step, total):
    """moe-train's `optim::lr_at`: computed in f64 from the f32 options, then rounded to f32."""
    lr, min_lr, warmup = f32(o["lr"]), f32(o["min_lr"]), o["warmup"]
    if step < warmup:
        return f32(lr * (step + 1) / (warmup + 1))
    span = max(total - warmup, 0)
    if span == 0:
        return f32(lr)
    ratio = min(1.0, (step - warmup) / span)
    return f32(min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr))


# ---------------------------------------------------------------------------------------------------------------
# Routers: each returns (assignments, aux terms). Assignments: per expert, (token indices, weights) or None.
# Aux terms: [(coefficient, value)], summed into the loss as coefficient * value.
# ---------------------------------------------------------------------------------------------------------------


def _per_expert(idx, w, n_experts):
    """Per expert e: the tokens t and weights w[t, slot] of the slots with idx[t, slot] == e (Mixtral's loop)."""
    out = []
    for e in range(n_experts):
        tok, slot = torch.where(idx == e)
        out.append((tok, w[tok, slot]) if tok.numel() > 0 else None)
    return out


class SoftmaxTopK(nn.Module):
    """moe-routers' softmax-topk with default options: softmax over E, top k (ties: lower id), renormalised;
    aux lb_hf_topk = E * sum_e (count_e / T) * mean_t p[t, e], coefficient 0.01 (or aux_coefficient)."""

    exact = True

    def __init__(self, d, n_experts, k, options, aux_coef):
        super().__init__()
        unknown = set(options) - {"aux_coefficient", "k"}
        if unknown:
            raise ValueError(f"softmax-topk options {sorted(unknown)} are not in the reference (default options only)")
        self.gate = nn.Parameter(torch.empty(n_experts, d))
        self.k = int(options.get("k", k))
        self.coef = f32(aux_coef if aux_coef is not None else options.get("aux_coefficient", 1e-2))

    def forward(self, f, ids, train):
        del ids, train
        e = self.gate.shape[0]
        p = torch.softmax(f @ self.gate.t(), dim=-1)
        # A stable descending sort puts equal scores in ascending expert order: ties go to the lower id.
        idx = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, : self.k]
        sel = p.gather(1, idx)
        w = sel / sel.sum(dim=-1, keepdim=True)
        counts = F.one_hot(idx, e).sum(dim=(0, 1)).to(p.dtype)
        aux = e * torch.sum(counts / p.shape[0] * p.mean(dim=0))
        return _per_expert(idx, w, e), [(self.coef, aux)]


class SwitchTop1(nn.Module):
    """Switch top-1 (approximate, for the bench): multiplicative jitter 1e-2 in training, p = softmax, argmax with
    weight p_max, capacity ceil(T / E * 1.25) first come first served, HF Switch aux (0.01) and z-loss (1e-3)."""

    exact = False

    def __init__(self, d, n_experts, k, options, aux_coef):
        super().__init__()
        del k, options
        self.gate = nn.Parameter(torch.empty(n_experts, d))
        self.coef = aux_coef if aux_coef is not None else 1e-2

    def forward(self, f, ids, train):
        del ids
        e, t = self.gate.shape[0], f.shape[0]
        x = f * torch.empty_like(f).uniform_(1 - 1e-2, 1 + 1e-2) if train else f
        logits = x @ self.gate.t()
        p = torch.softmax(logits, dim=-1)
        pmax, idx = p.max(dim=-1)
        onehot = F.one_hot(idx, e)
        pos = (torch.cumsum(onehot, dim=0) * onehot).sum(dim=-1) - 1
        cap = math.ceil(t / e * 1.25)
        keep = pos < cap
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
        aux = e * torch.sum(onehot.to(p.dtype).mean(dim=0) * p.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return _per_expert(idx[:, None], pmax[:, None], e), [(self.coef, aux), (1e-3, z)]


class NoisyTopK(nn.Module):
    """Noisy top-k (Shazeer 2017; approximate, for the bench): sigma = softplus(x W_noise^T) + 1e-2 in training,
    top k of the noisy logits, softmax over the k; importance and load losses (cv^2), 0.01 each."""

    exact = False

    def __init__(self, d, n_experts, k, options, aux_coef):
        super().__init__()
        del options
        self.gate = nn.Parameter(torch.empty(n_experts, d))
        self.noise = nn.Parameter(torch.empty(n_experts, d))
        self.k = k
        self.coef = aux_coef if aux_coef is not None else 1e-2

    def forward(self, f, ids, train):
        del ids
        e, k = self.gate.shape[0], self.k
        clean = f @ self.gate.t()
        if train:
            std = F.softplus(f @ self.noise.t()) + 1e-2
            noisy = clean + torch.randn_like(clean) * std
        else:
            noisy = clean
        top_v, top_i = noisy.topk(min(k + 1, e), dim=-1)
        w = torch.softmax(top_v[:, :k], dim=-1)
        idx = top_i[:, :k]
        gates = torch.zeros_like(clean).scatter(1, idx, w)
        importance = gates.sum(dim=0)
        if train and k < e:
            thr_in, thr_out = top_v[:, k : k + 1], top_v[:, k - 1 : k]
            normal = torch.distributions.Normal(0.0, 1.0)
            p_in = normal.cdf((clean - thr_in) / std)
            p_out = normal.cdf((clean - thr_out) / std)
            load = torch.where(noisy > thr_in, p_in, p_out).sum(dim=0)
        else:
            load = (gates > 0).sum(dim=0).to(clean.dtype)

        def cv2(v):
            return v.var() / (v.mean() ** 2 + 1e-10)

        return _per_expert(idx, w, e), [(self.coef, cv2(importance)), (self.coef, cv2(load))]


class Hash(nn.Module):
    """Hash routing (approximate, for the bench): a fixed random table byte -> expert h, experts (h + j) mod E for
    j < k with weight 1/k (moe-train sizes hash with the model's k, as moe-rs's `hash:k=K`)."""

    exact = False

    def __init__(self, d, n_experts, k, options, aux_coef):
        super().__init__()
        del d, options, aux_coef
        g = torch.Generator().manual_seed(2)
        self.register_buffer("table", torch.randint(0, n_experts, (VOCAB,), generator=g))
        self.n_experts, self.k = n_experts, k

    def forward(self, f, ids, train):
        del train
        idx = (self.table[ids][:, None] + torch.arange(self.k)) % self.n_experts
        return _per_expert(idx, torch.full(idx.shape, 1.0 / self.k, dtype=f.dtype), self.n_experts), []


class ExpertChoice(nn.Module):
    """Expert choice (Zhou 2022; approximate, for the bench): each expert takes its top ceil(T * 2 / E) tokens by
    softmax score (over experts), weighted by the score. Not causal."""

    exact = False

    def __init__(self, d, n_experts, k, options, aux_coef):
        super().__init__()
        del k, aux_coef
        self.gate = nn.Parameter(torch.empty(n_experts, d))
        self.c = float(options.get("capacity_factor", 2.0))

    def forward(self, f, ids, train):
        del ids, train
        e, t = self.gate.shape[0], f.shape[0]
        s = torch.softmax(f @ self.gate.t(), dim=-1)
        cap = min(t, math.ceil(t * self.c / e))
        top_v, top_t = s.t().topk(cap, dim=-1)
        return [(top_t[i], top_v[i]) for i in range(e)], []


ROUTERS = {
    "softmax-topk": SoftmaxTopK,
    "switch-top1": SwitchTop1,
    "noisy-topk": NoisyTopK,
    "hash": Hash,
    "expert-choice": ExpertChoice,
}


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    """x / sqrt(mean_j x_j^2 + eps) * w, as the contract writes it."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


class Experts(nn.Module):
    """A bank of E experts: MLP (`w1` [E, F, d], `w2` [E, d, F], exact GELU) or SwiGLU (`gate_up` [E, 2F, d],
    `down` [E, d, F])."""

    def __init__(self, bank, n_experts, d, width):
        super().__init__()
        self.bank, self.width = bank, width
        if bank == "mlp":
            self.w1 = nn.Parameter(torch.empty(n_experts, width, d))
            self.w2 = nn.Parameter(torch.empty(n_experts, d, width))
        else:
            self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * width, d))
            self.down = nn.Parameter(torch.empty(n_experts, d, width))

    def expert(self, e, x):
        if self.bank == "mlp":
            return F.gelu(x @ self.w1[e].t()) @ self.w2[e].t()
        gu = x @ self.gate_up[e].t()
        return (F.silu(gu[:, : self.width]) * gu[:, self.width :]) @ self.down[e].t()


class Ffn(nn.Module):
    """The FFN of a block: the dense baseline (one expert of width k * F, weight 1) or an MoE layer."""

    def __init__(self, m, aux_coef):
        super().__init__()
        ffn, d = m["ffn"], m["d_model"]
        kind = ffn["kind"]
        if kind["kind"] == "dense":
            self.router = None
            self.experts = Experts(ffn["bank"], 1, d, ffn["top_k"] * ffn["expert_width"])
        else:
            name = kind["router"]
            if name not in ROUTERS:
                raise ValueError(f"router {name!r} is not in the reference (have: {', '.join(ROUTERS)})")
            opts = kind.get("options") or {}
            self.router = ROUTERS[name](d, ffn["experts"], ffn["top_k"], opts, aux_coef)
            # As moe-train's `ffn_shape`: one expert per token for switch-top1, so its experts are k·F wide.
            width = ffn["expert_width"] * (ffn["top_k"] if name == "switch-top1" else 1)
            self.experts = Experts(ffn["bank"], ffn["experts"], d, width)

    def forward(self, f, ids, train):
        if self.router is None:
            return self.experts.expert(0, f), []
        assign, aux = self.router(f, ids, train)
        out = torch.zeros_like(f)
        for e, a in enumerate(assign):
            if a is None:
                continue
            tok, w = a
            out.index_add_(0, tok, self.experts.expert(e, f[tok]) * w[:, None])
        return out, aux


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Parameter(torch.empty(3 * d, d))
        self.proj = nn.Parameter(torch.empty(d, d))

    def forward(self, a, batch, sdpa=False):
        t, d = a.shape
        c, h = t // batch, self.n_heads
        hd = d // h
        q, k, v = (a @ self.qkv.t()).split(d, dim=-1)
        q, k, v = (z.reshape(batch, c, h, hd).transpose(1, 2) for z in (q, k, v))
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            mask = torch.ones(c, c, dtype=torch.bool).tril()
            o = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
        return o.transpose(1, 2).reshape(t, d) @ self.proj.t()


class Block(nn.Module):
    def __init__(self, m, aux_coef):
        super().__init__()
        d = m["d_model"]
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.attn = Attention(d, m["n_heads"])
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.ffn = Ffn(m, aux_coef)


class Lm(nn.Module):
    """The language model; `named_parameters()` gives moe-train's names (`blocks.0.attn.qkv`, ...)."""

    def __init__(self, cfg):
        super().__init__()
        m, t = check_config(cfg)
        self.cfg = m
        self.eps = f32(m["norm_eps"])
        self.tok_emb = nn.Parameter(torch.empty(VOCAB, m["d_model"]))
        self.pos_emb = nn.Parameter(torch.empty(m["context"], m["d_model"]))
        self.blocks = nn.ModuleList(Block(m, t.get("aux_coef")) for _ in range(m["n_layers"]))
        self.norm = nn.Parameter(torch.ones(m["d_model"]))

    def forward(self, inputs, targets, train=True, alt=False):
        """Returns (ce, weighted aux sum, [unweighted aux per layer]). inputs, targets: [B, C] int64.

        `alt` swaps in second implementations (SDPA attention, torch's RMSNorm) for the self-test."""
        b, c = inputs.shape
        ids = inputs.reshape(-1)
        x = (self.tok_emb[inputs] + self.pos_emb[:c]).reshape(b * c, -1)
        norm = (lambda x, w: F.rms_norm(x, (x.shape[-1],), w, self.eps)) if alt else (
            lambda x, w: rmsnorm(x, w, self.eps))
        aux_total = torch.zeros(())
        aux_layers = []
        for blk in self.blocks:
            x = x + blk.attn(norm(x, blk.attn_norm), b, sdpa=alt)
            y, aux = blk.ffn(norm(x, blk.ffn_norm), ids, train)
            x = x + y
            for coef, val in aux:
                aux_total = aux_total + coef * val
            aux_layers.append(sum(float(v.detach()) for _, v in aux))
        logits = norm(x, self.norm) @ self.tok_emb.t()
        ce = F.cross_entropy(logits, targets.reshape(-1))
        return ce, aux_total, aux_layers


def init_params(model, seed):
    """The contract's init: N(0, 0.02) for embeddings, qkv, w1 / gate_up; N(0, 0.02 / sqrt(2L)) for proj and
    w2 / down; ones for norms; the routers' gates N(0, 1/d) (moe-core's `kit::init_gate` scale), W_noise 0."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.cfg["n_layers"]
    small = 0.02 / math.sqrt(2 * n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1:
                p.fill_(1.0)
            elif leaf == "gate" and ".router." in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            elif leaf == "noise":
                p.zero_()
            elif leaf in ("proj", "w2", "down"):
                p.normal_(0.0, small, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def load_params(model, path):
    """Copies every parameter from a safetensors file by name; errors name what is missing, extra or misshapen."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{path}: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape) or t.dtype != torch.float32:
                raise ValueError(f"{path}: {name} is {t.dtype} {list(t.shape)}, expected float32 {list(p.shape)}")
            p.copy_(t)


def make_optimizer(model, o):
    """torch AdamW, single-tensor path, two groups: ndim >= 2 decays, the rest (norms) does not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": f32(o["weight_decay"])}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=f32(o["lr"]), betas=(f32(o["beta1"]), f32(o["beta2"])), eps=f32(o["eps"]),
                             foreach=False, fused=False)


def train_step(model, opt, o, step, total, inputs, targets, fast=False):
    """One step: lr_at, zero grads, forward (train mode), backward, clip, AdamW. Returns the step's figures.

    `fast` runs torch's own fused pieces (SDPA attention, F.rms_norm): the same model, for the bench."""
    lr = lr_at(o, step, total)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    ce, aux, aux_layers = model(inputs, targets, train=True, alt=fast)
    loss = ce + aux
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    clip = f32(o["grad_clip"])
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    opt.step()
    ce, aux, loss = (float(v.detach()) for v in (ce, aux, loss))
    return {"ce": ce, "aux": aux, "loss": loss, "grad_norm": float(norm), "lr": lr,
            "aux_layers": aux_layers}


def load_batches(path, train_cfg, context):
    from safetensors.torch import load_file

    t = load_file(path)
    for key in ("inputs", "targets"):
        if key not in t:
            raise ValueError(f"{path} has no `{key}` tensor")
    inputs, targets = t["inputs"], t["targets"]
    if inputs.dtype != torch.int32 or targets.dtype != torch.int32 or inputs.ndim != 3 or inputs.shape != targets.shape:
        raise ValueError(f"{path}: inputs / targets must be int32 [S, B, C] of one shape, got {inputs.dtype} "
                         f"{list(inputs.shape)} and {targets.dtype} {list(targets.shape)}")
    s, b, c = inputs.shape
    if b != train_cfg["batch"] or c != context:
        raise ValueError(f"{path}: [S, B, C] = {[s, b, c]} but config.json says B = {train_cfg['batch']}, "
                         f"C = {context}")
    if s > train_cfg["steps"]:
        raise ValueError(f"{path} holds {s} batches, more than train.steps = {train_cfg['steps']}")
    for name, v in (("inputs", inputs), ("targets", targets)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= VOCAB):
            raise ValueError(f"{path}: {name} has a token outside [0, 256)")
    return inputs.long(), targets.long()


def read_config(d):
    with open(os.path.join(d, "config.json")) as fh:
        return json.load(fh)


def run_reference(d, threads):
    """`--dir DIR`: trains on DIR's init and batches, writes reference.json and final.safetensors."""
    from safetensors.torch import save_file

    cfg = read_config(d)
    model = Lm(cfg)
    load_params(model, os.path.join(d, "init.safetensors"))
    if not all(getattr(blk.ffn.router, "exact", True) for blk in model.blocks):
        print(f"warning: router {router_name(cfg['model'])} is approximate in the reference", file=sys.stderr)
    t = cfg["train"]
    inputs, targets = load_batches(os.path.join(d, "batches.safetensors"), t, cfg["model"]["context"])
    opt = make_optimizer(model, t["optim"])
    keys = ("ce", "aux", "loss", "grad_norm", "lr", "aux_layers")
    out = {k: [] for k in keys}
    for s in range(inputs.shape[0]):
        r = train_step(model, opt, t["optim"], s, t["steps"], inputs[s], targets[s])
        for k in keys:
            out[k].append(r[k])
    report = {"torch": torch.__version__, "threads": threads, "steps": int(inputs.shape[0]), **out}
    with open(os.path.join(d, "reference.json"), "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
              os.path.join(d, "final.safetensors"))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Random inputs, the bench
# ---------------------------------------------------------------------------------------------------------------


WORDS = ("the of and to a in that is was he for it with as his on be at by i this had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my now "
         "such like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people").split()


def builtin_text(seed, n_bytes):
    """A learnable byte text: seeded sentences of common English words (for --init-random without --corpus and
    the self-test; random bytes would teach nothing)."""
    g = torch.Generator().manual_seed(seed)
    out, size = [], 0
    while size < n_bytes:
        n = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        s = " ".join(WORDS[i] for i in idx)
        s = s[0].upper() + s[1:] + ". "
        out.append(s)
        size += len(s)
    return "".join(out).encode("ascii")[:n_bytes]


def random_batches(steps, batch, context, seed, corpus=None, uniform=False):
    """[S, B, C] inputs and targets: windows of C + 1 bytes of `corpus` (a bytes object; default
    [`builtin_text`]), or uniformly random bytes with `uniform`."""
    g = torch.Generator().manual_seed(seed)
    if uniform:
        w = torch.randint(0, VOCAB, (steps, batch, context + 1), generator=g)
    else:
        if corpus is None:
            corpus = builtin_text(seed, 1 << 16)
        if len(corpus) < context + 2:
            raise ValueError(f"the corpus has {len(corpus)} bytes, fewer than context + 2 = {context + 2}")
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        off = torch.randint(0, len(corpus) - context - 1, (steps, batch), generator=g)
        w = data[off[..., None] + torch.arange(context + 1)]
    return w[..., :-1].contiguous(), w[..., 1:].contiguous()


def write_random(d, seed, corpus_path):
    """`--init-random SEED`: init.safetensors and batches.safetensors for DIR/config.json."""
    from safetensors.torch import save_file

    cfg = read_config(d)
    model = Lm(cfg)
    init_params(model, seed)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, os.path.join(d, "init.safetensors"))
    corpus = open(corpus_path, "rb").read() if corpus_path else None
    t = cfg["train"]
    inputs, targets = random_batches(t["steps"], t["batch"], cfg["model"]["context"], seed + 1, corpus)
    save_file({"inputs": inputs.to(torch.int32), "targets": targets.to(torch.int32)},
              os.path.join(d, "batches.safetensors"))


def bench(args):
    """`--bench`: times the training steps after the warm-up; prints one JSON line."""
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    torch.manual_seed(args.seed)
    cfg = bench_config(args.router, args)
    model = Lm(cfg)
    init_params(model, args.seed)
    m, t = cfg["model"], cfg["train"]
    corpus = open(args.corpus, "rb").read() if args.corpus else None
    inputs, targets = random_batches(t["steps"], t["batch"], m["context"], args.seed + 1, corpus)
    opt = make_optimizer(model, t["optim"])
    times, losses = [], []
    for s in range(t["steps"]):
        t0 = time.perf_counter()
        r = train_step(model, opt, t["optim"], s, t["steps"], inputs[s], targets[s], fast=not args.contract_ops)
        dt = time.perf_counter() - t0
        losses.append(r["loss"])
        if s >= args.warmup:
            times.append(dt)
    tokens = t["batch"] * m["context"] * len(times)
    # tokens_per_s: over the timed steps' total time, as moe train reports it; the median-based rate resists
    # the stalls of a busy machine.
    per_step = t["batch"] * m["context"]
    print(json.dumps({"tokens_per_s": tokens / sum(times), "step_ms_median": 1e3 * statistics.median(times),
                      "tokens_per_s_median_step": per_step / statistics.median(times),
                      "steps": len(times), "warmup": args.warmup, "threads": torch.get_num_threads(),
                      "router": args.router, "torch": torch.__version__, "sdpa": not args.contract_ops,
                      "loss_first": losses[0],
                      "loss_last": losses[-1]}))


# ---------------------------------------------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------------------------------------------


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _dense_moe_loss(model, inputs, targets):
    """The loss with every MoE layer computed densely (all experts on all tokens, weighted by a [T, E] matrix
    built from the router's top-k) and the Mixtral load-balancing formula of transformers written out."""
    b, c = inputs.shape
    x = (model.tok_emb[inputs] + model.pos_emb[:c]).reshape(b * c, -1)
    aux_total = torch.zeros(())
    for blk in model.blocks:
        x = x + blk.attn(F.rms_norm(x, (x.shape[-1],), blk.attn_norm, model.eps), b, sdpa=True)
        f = F.rms_norm(x, (x.shape[-1],), blk.ffn_norm, model.eps)
        ex = blk.ffn.experts
        n_e = ex.w1.shape[0] if ex.bank == "mlp" else ex.gate_up.shape[0]
        outs = torch.stack([ex.expert(e, f) for e in range(n_e)], dim=1)  # [T, E, d]
        r = blk.ffn.router
        if r is None:
            x = x + outs[:, 0]
            continue
        logits = f @ r.gate.t()
        routing = torch.softmax(logits, dim=-1)
        top_w, top_i = torch.topk(routing, r.k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        dense_w = torch.zeros_like(routing).scatter(1, top_i, top_w)
        x = x + (dense_w[:, :, None] * outs).sum(dim=1)
        # transformers' load_balancing_loss_func (no attention mask): expert_mask [T, k, E].
        expert_mask = F.one_hot(top_i, n_e)
        tokens_per_expert = expert_mask.float().mean(dim=0)
        router_prob_per_expert = routing.mean(dim=0)
        aux_total = aux_total + r.coef * n_e * torch.sum(tokens_per_expert * router_prob_per_expert[None])
    rms = nn.RMSNorm(x.shape[-1], eps=model.eps)
    rms.weight = model.norm  # the model's own parameter, so its gradient is compared too
    logits = rms(x) @ model.tok_emb.t()
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, targets.reshape(-1, 1)).mean()
    return ce, aux_total


def _adamw_by_hand(params, grads_per_step, o, lrs):
    """moe-train/src/optim.rs's AdamW written out in f32 tensor ops (clip factor 1)."""
    ps = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    b1, b2, eps, wd = f32(o["beta1"]), f32(o["beta2"]), f32(o["eps"]), f32(o["weight_decay"])
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = f32(math.sqrt(1.0 - b2 ** t))
        step_size = f32(lr / bc1)
        for p, g, m, v in zip(ps, grads, ms, vs):
            if p.ndim >= 2:
                p.mul_(f32(1.0 - lr * wd))
            m.add_((g - m) * f32(1.0 - b1))
            v.copy_(b2 * v + f32(1.0 - b2) * g * g)
            p.sub_(step_size * (m / (v.sqrt() / bc2_sqrt + eps)))
    return ps


def run_f64(d):
    """The losses of DIR's run in float64 (same init, batches, schedule): how far float32 rounding moves them."""
    cfg = read_config(d)
    model = Lm(cfg)
    load_params(model, os.path.join(d, "init.safetensors"))
    model.double()
    t = cfg["train"]
    inputs, targets = load_batches(os.path.join(d, "batches.safetensors"), t, cfg["model"]["context"])
    opt = make_optimizer(model, t["optim"])
    return [train_step(model, opt, t["optim"], s, t["steps"], inputs[s], targets[s])["loss"]
            for s in range(inputs.shape[0])]


def self_test(threads):
    """Second implementations and determinism; prints what it measured, exits 1 on a failure."""
    failures = []

    def check(name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    for kind, bank in (("dense", "mlp"), ("softmax-topk", "mlp"), ("softmax-topk", "swiglu"), ("dense", "swiglu")):
        cfg = example_config(kind, bank)
        model = Lm(cfg)
        init_params(model, 7)
        t = cfg["train"]
        inputs, targets = random_batches(1, t["batch"], cfg["model"]["context"], 8, uniform=True)
        ce, aux, _ = model(inputs[0], targets[0])
        ce2, aux2 = _dense_moe_loss(model, inputs[0], targets[0])
        ce_v, ce2_v, aux_v, aux2_v = (float(v.detach()) for v in (ce, ce2, aux, aux2))
        same_aux = kind == "dense" or _rel(aux_v, aux2_v) < 1e-6
        check(f"{kind}/{bank} loss at init vs SDPA + RMSNorm + dense MoE + HF lb formula",
              _rel(ce_v, ce2_v) < 1e-6 and same_aux,
              f"ce {ce_v:.7f} vs {ce2_v:.7f}, aux {aux_v:.7g} vs {aux2_v:.7g}")
        check(f"{kind}/{bank} ce at init ~ ln 256", abs(ce_v - math.log(256)) < 0.05,
              f"{ce_v:.4f} vs {math.log(256):.4f}")
        g1 = torch.autograd.grad(ce + aux, list(model.parameters()))
        g2 = torch.autograd.grad(ce2 + aux2, list(model.parameters()))
        worst = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) for a, b in zip(g1, g2))
        check(f"{kind}/{bank} gradients vs the second implementation", worst < 1e-4,
              f"max |diff| / max |g| over tensors = {worst:.2e}")

    cfg = example_config("softmax-topk")
    o = cfg["train"]["optim"]
    model = Lm(cfg)
    init_params(model, 3)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    opt = make_optimizer(model, o)
    grads, lrs = [], []
    gen = torch.Generator().manual_seed(4)
    for s in range(3):
        lr = lr_at(o, s, cfg["train"]["steps"])
        for group in opt.param_groups:
            group["lr"] = lr
        gs = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        grads.append(gs)
        lrs.append(lr)
    mine = _adamw_by_hand(start, grads, o, lrs)
    worst = max(float((a - b.detach()).abs().max()) for a, b in zip(mine, params))
    check("torch AdamW (foreach=False) vs optim.rs's update, 3 steps", worst < 1e-6, f"max |diff| = {worst:.2e}")
    lr_cfg = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 10}
    check("lr_at as optim.rs's test", abs(lr_at(lr_cfg, 0, 100) - 1e-3 / 11) < 1e-9
          and abs(lr_at(lr_cfg, 10, 100) - 1e-3) < 1e-9 and abs(lr_at(lr_cfg, 100, 100) - 1e-4) < 1e-9,
          f"{lr_at(lr_cfg, 0, 100):.4g}, {lr_at(lr_cfg, 10, 100):.4g}, {lr_at(lr_cfg, 100, 100):.4g}")

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dense", "softmax-topk"):
            d = os.path.join(tmp, kind)
            os.makedirs(d)
            with open(os.path.join(d, "config.json"), "w") as fh:
                json.dump(example_config(kind), fh)
            write_random(d, 11, None)
            a = run_reference(d, threads)
            b = run_reference(d, threads)
            check(f"{kind}: two runs bit-identical ({threads} threads)", a["loss"] == b["loss"]
                  and a["grad_norm"] == b["grad_norm"], f"losses {a['loss'][0]:.6f} -> {a['loss'][-1]:.6f}")
            check(f"{kind}: 20 steps lower the loss", a["loss"][-1] < a["loss"][0],
                  f"{a['loss'][0]:.4f} -> {a['loss'][-1]:.4f}, clipped steps "
                  f"{sum(g > 1.0 for g in a['grad_norm'])} of {len(a['grad_norm'])}")
            f64 = run_f64(d)
            worst = max(_rel(x, y) for x, y in zip(a["loss"], f64))
            check(f"{kind}: float32 vs float64 loss curve (the rounding noise under the 1e-4 tolerance)",
                  worst < 1e-5, f"max relative gap {worst:.2e}")
            other = 1 if threads != 1 else 2
            torch.set_num_threads(other)
            c = run_reference(d, other)
            torch.set_num_threads(threads)
            worst = max(_rel(x, y) for x, y in zip(c["loss"], a["loss"]))
            check(f"{kind}: {other} vs {threads} threads", worst < 1e-5, f"max relative loss gap {worst:.2e}")
    if failures:
        print(f"self-test: {len(failures)} failed: {failures}")
        sys.exit(1)
    print("self-test: all passed")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="a reference directory (config.json, init.safetensors, batches.safetensors)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the bench's default 2)")
    p.add_argument("--write-config", choices=("dense", "softmax-topk"))
    p.add_argument("--init-random", type=int, metavar="SEED")
    p.add_argument("--corpus", help="a byte file: batches are windows of it (--init-random, --bench)")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--router", default="softmax-topk", choices=("dense", *ROUTERS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="bench: untimed first steps (not the lr warm-up)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--contract-ops", action="store_true",
                   help="bench: the attention and RMSNorm as the contract writes them, not torch's SDPA / rms_norm")
    p.add_argument("--bank", default="mlp", choices=("mlp", "swiglu"))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=256)
    args = p.parse_args()
    threads = args.threads if args.threads > 0 else None
    if threads is None:
        p.error("--threads must be >= 1")
    torch.set_num_threads(threads)
    try:
        if args.self_test:
            self_test(threads)
        elif args.bench:
            bench(args)
        elif args.dir is None:
            p.error("give --dir DIR, --self-test or --bench")
        elif args.write_config:
            os.makedirs(args.dir, exist_ok=True)
            with open(os.path.join(args.dir, "config.json"), "w") as fh:
                json.dump(example_config(args.write_config, args.bank), fh, indent=1)
                fh.write("\n")
        elif args.init_random is not None:
            write_random(args.dir, args.init_random, args.corpus)
        else:
            r = run_reference(args.dir, threads)
            print(f"{args.dir}: {r['steps']} steps, loss {r['loss'][0]:.6f} -> {r['loss'][-1]:.6f}, "
                  f"torch {r['torch']}, {threads} threads")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
