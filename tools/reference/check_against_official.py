#!/usr/bin/python3
"""Runs DeepSeek's official inference/model.py on CPU against deepseek_ref.py, both in float64.

  check_against_official.py --official PATH/TO/model.py --model DIR [--tokens N]

The official file is not vendored: pass a copy of deepseek-ai/DeepSeek-V3 `inference/model.py`.
Its triton `kernel` module is stubbed (weights are handed over already dequantised), F.rms_norm
(absent from torch 1.13) is replaced by its definition, and every explicit float32 in it (rotary
tables, softmax dtype) becomes float64 so the two agree to rounding (~1e-13), not to fp32 noise.
The weights are read here by separate code (FP8 decoded by bit arithmetic, dequantised product
rounded to fp32 as deepseek_ref defines it). Configs where the official code's semantics differ
from the HF fields (see README) are refused rather than compared.
"""
import argparse
import json
import os
import struct
import sys
import types
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_ref as R  # noqa: E402


def load_official(path):
    src = open(path).read().replace("torch.float32", "torch.float64").replace("x.float()", "x.double()")
    kernel = types.ModuleType("kernel")
    kernel.act_quant = kernel.weight_dequant = kernel.fp8_gemm = None
    sys.modules["kernel"] = kernel
    mod = types.ModuleType("official_model")
    exec(compile(src, path, "exec"), mod.__dict__)
    mod.RMSNorm.forward = lambda self, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
    return mod


def read_weights(d):
    """{HF name: float64 tensor}, dequantised; independent of deepseek_ref's reader."""
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    raw = {}
    for fn in files:
        data = open(os.path.join(d, fn), "rb").read()
        n = struct.unpack("<Q", data[:8])[0]
        for k, v in json.loads(data[8:8 + n]).items():
            if k == "__metadata__":
                continue
            b, dt = data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], v["dtype"]
            if dt == "BF16":
                a = (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dt == "F8_E4M3":
                c = np.frombuffer(b, np.uint8).astype(np.int64)
                e, m = (c >> 3) & 15, c & 7
                a = np.where(c & 0x80, -1.0, 1.0) * np.where(e == 0, np.ldexp(m * 1.0, -9), np.ldexp(8.0 + m, e - 10))
            else:
                a = np.frombuffer(b, {"F16": np.float16, "F32": np.float32}[dt])
            raw[k] = (dt, a.astype(np.float64).reshape(v["shape"]))
    out = {}
    for k, (dt, a) in raw.items():
        if dt == "F8_E4M3":
            o, i = a.shape
            a = (a * np.kron(raw[k + "_scale_inv"][1], np.ones((128, 128)))[:o, :i]).astype(np.float32)
        if not k.endswith("_scale_inv"):
            out[k] = torch.from_numpy(np.asarray(a, np.float64))
    return out


HF_TO_OFFICIAL = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                  "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
                  "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
                  "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head"}


def build(M, d, attn, n_tokens):
    c = json.load(open(os.path.join(d, "config.json")))
    cfg = R.Config(c)
    why = [msg for bad, msg in [
        (cfg.moe_freq != 1, "moe_layer_freq != 1"),
        ((cfg.scoring == "sigmoid") != (cfg.norm_topk and cfg.top_k > 1), "norm_topk_prob not iff sigmoid"),
        (cfg.topk_method == "greedy" and cfg.n_group > 1, "greedy with n_group > 1"),
        (not cfg.yarn and n_tokens > cfg.orig_max_pos, "too many tokens")] if bad]
    if why:
        sys.exit(f"{d}: not comparable with the official code: {', '.join(why)}")
    M.attn_impl = attn
    a = M.ModelArgs(
        max_batch_size=1, max_seq_len=max(cfg.orig_max_pos + 1, n_tokens) if cfg.yarn else cfg.orig_max_pos,
        vocab_size=cfg.vocab, dim=cfg.dim, inter_dim=cfg.inter, moe_inter_dim=cfg.moe_inter, n_layers=cfg.n_layers,
        n_dense_layers=cfg.first_dense if cfg.n_routed else cfg.n_layers, n_heads=cfg.n_heads,
        n_routed_experts=cfg.n_routed or 1, n_shared_experts=cfg.n_shared, n_activated_experts=cfg.top_k or 1,
        n_expert_groups=cfg.n_group if cfg.topk_method != "greedy" else 1, n_limited_groups=cfg.topk_group,
        score_func=cfg.scoring, route_scale=cfg.route_scale, q_lora_rank=cfg.q_rank, kv_lora_rank=cfg.kv_rank,
        qk_nope_head_dim=cfg.nope, qk_rope_head_dim=cfg.rope, v_head_dim=cfg.v, original_seq_len=cfg.orig_max_pos,
        rope_theta=cfg.theta, rope_factor=cfg.factor, beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow,
        mscale=cfg.mscale_all_dim)
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the complex freqs_cis buffer is rebuilt below
        t = M.Transformer(a).to(torch.float64)
    t.freqs_cis = M.precompute_freqs_cis(a)  # .to(float64) dropped the complex buffer's imaginary part
    for mod in t.modules():
        if isinstance(mod, M.Gate) and cfg.topk_method == "noaux_tc":
            mod.bias = torch.nn.Parameter(torch.zeros(cfg.n_routed))
    sd = {}
    for k, v in read_weights(d).items():
        if k.startswith(f"model.layers.{cfg.n_layers}."):
            continue  # MTP: not in model.py
        n = k[len("model."):] if k.startswith("model.") else k
        n = n.replace("self_attn", "attn").replace("mlp", "ffn").replace("e_score_correction_bias", "bias")
        key = n.split(".")[-2]
        sd[n.replace(key, HF_TO_OFFICIAL.get(key, key))] = v
    if cfg.tie:
        sd["head.weight"] = sd["embed.weight"]
    own = t.state_dict()
    sd = {k: v for k, v in sd.items() if k not in own or own[k].numel()}  # e.g. shared experts when n_shared is 0
    missing, unexpected = t.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("_cache") and own[m].numel()]
    if missing or unexpected:
        sys.exit(f"{d}: official model state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return t


@torch.inference_mode()
def logits_all(t, toks, start=0):
    """The official Transformer.forward, keeping every position (it returns only the last)."""
    x, T = torch.tensor([toks]), len(toks)
    h = t.embed(x)
    mask = torch.full((T, T), float("-inf")).triu_(1) if T > 1 else None
    for layer in t.layers:
        h = layer(h, start, t.freqs_cis[start:start + T], mask)
    return t.head(t.norm(h))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="path to DeepSeek-V3 inference/model.py")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    M = load_official(a.official)
    ref64, ref32 = R.load_model(a.model, torch.float64), R.load_model(a.model)
    toks = torch.randint(0, ref64.cfg.vocab, (a.tokens,), generator=torch.Generator().manual_seed(7)).tolist()
    lp64, lp32 = R.log_probs(ref64.forward(toks)), R.log_probs(ref32.forward(toks))
    res, half = {}, a.tokens // 2
    for attn in ("naive", "absorb"):
        full = R.log_probs(logits_all(build(M, a.model, attn, a.tokens), toks))
        t = build(M, a.model, attn, a.tokens)  # official incremental decode: prefill half, then 1 by 1
        logits_all(t, toks[:half])
        inc = R.log_probs(torch.stack([logits_all(t, [toks[i]], i)[0] for i in range(half, a.tokens)]))
        res[f"official_{attn}_vs_ref64"] = float(np.abs(full - lp64).max())
        res[f"official_{attn}_incremental_vs_ref64"] = float(np.abs(inc - lp64[half:]).max())
        res[f"official_{attn}_vs_ref32"] = float(np.abs(full - lp32).max())
    res["ok"] = all(v < 1e-9 for k, v in res.items() if k.endswith("ref64"))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
