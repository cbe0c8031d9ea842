#!/usr/bin/python3
"""deepseek_ref.py: an independent fp32 (optionally fp64) PyTorch oracle for DeepSeek-V2/V3 inference.

Semantics are those of DeepSeek's official `inference/model.py` (deepseek-ai/DeepSeek-V3), applied
to a Hugging Face model directory (config.json + safetensors, parsed here without the `safetensors`
package). Weights are upcast from BF16/F16/F32/FP8-E4M3 (with 128x128 block `weight_scale_inv`) and
every operation runs in the chosen dtype. Mapping from the official code:
  gate_proj/up_proj/down_proj = w1/w3/w2, q_a_proj/q_a_layernorm/q_b_proj = wq_a/q_norm/wq_b,
  kv_a_proj_with_mqa/kv_a_layernorm/kv_b_proj = wkv_a/kv_norm/wkv_b, o_proj = wo,
  rope_scaling.{factor,original_max_position_embeddings,beta_fast,beta_slow,mscale_all_dim}
      = rope_factor, original_seq_len, beta_fast, beta_slow, mscale,
  mlp.gate.e_score_correction_bias = Gate.bias (used iff topk_method == "noaux_tc"),
  weights normalised iff norm_topk_prob and top_k > 1 (the official code: iff sigmoid);
  routed_scaling_factor (route_scale) is always applied;
  YaRN (frequency correction + softmax_scale * m^2, no cos/sin scaling) whenever rope_scaling is yarn
  (--yarn-rule extended: only if max_position_embeddings > original_max_position_embeddings).
MTP (absent from model.py): x_i = eh_proj([enorm(embed_mtp(t_{i+1})); hnorm(h_i)]), h_i the main
model's final-normed hidden state, then one decoder block and shared_head.{norm,head}.

CLI (prints one JSON object; every subcommand also takes [--dtype float32|float64] [--yarn-rule R]):
  deepseek_ref.py score    --model DIR --prompt-tokens 1,2,3 [--top-logprobs K] [--attn naive|absorb] [--mtp]
  deepseek_ref.py generate --model DIR --prompt-tokens 1,2 --max-tokens N [--top-logprobs K]
  deepseek_ref.py selftest --model DIR
Python: m = load_model(dir[, torch.float64]); logits = m.forward(tokens)  # [T, vocab]
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch


class RefError(Exception):
    """A checkpoint or config problem; the CLI prints it and exits 1."""


# ================================================================================================
# Checkpoint reading: safetensors headers, dtype decoding, FP8 block dequantisation.

def _fp8_e4m3fn_table():
    """float8_e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals; 0x7F/0xFF NaN."""
    t = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 0x7
        if e == 0xF and m == 0x7:
            t[b] = np.nan
        elif e == 0:
            t[b] = sign * (m / 8.0) * 2.0 ** -6
        else:
            t[b] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


FP8_E4M3FN = _fp8_e4m3fn_table()
_RAW = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4),
        "F64": (np.float64, 8), "F8_E4M3": (np.uint8, 1)}


class Checkpoint:
    """All tensors of a model directory: name -> (file, dtype, shape, absolute byte offset)."""

    def __init__(self, model_dir, block=(128, 128)):
        self.dir, self.block, self.tensors, self.used = model_dir, block, {}, set()
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise RefError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        for fn in files:
            self._read_header(os.path.join(model_dir, fn))
        for name, fn in (weight_map or {}).items():
            if name not in self.tensors or os.path.basename(self.tensors[name][0]) != fn:
                raise RefError(f"{index}: weight_map puts {name} in {fn}, which does not hold it")

    def _read_header(self, path):
        if not os.path.exists(path):
            raise RefError(f"{path}: missing shard")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise RefError(f"{path}: header length {n} exceeds file size {size}")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if dt not in _RAW:
                raise RefError(f"{path}: tensor {name} has unsupported dtype {dt}")
            if end - begin != _RAW[dt][1] * math.prod(shape) or 8 + n + end > size:
                raise RefError(f"{path}: tensor {name} has bad data_offsets {begin},{end} for {dt}{shape}")
            if name in self.tensors:
                raise RefError(f"{path}: tensor {name} also in {self.tensors[name][0]}")
            self.tensors[name] = (path, dt, shape, 8 + n + begin)

    def has(self, name):
        return name in self.tensors

    def _float32(self, name):
        """The stored tensor decoded to float32 numpy (FP8 left as its codes' values, unscaled)."""
        path, dt, shape, off = self.tensors[name]
        raw = np.fromfile(path, dtype=_RAW[dt][0], count=math.prod(shape), offset=off)
        if dt == "BF16":
            a = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dt == "F8_E4M3":
            a = FP8_E4M3FN[raw]
        else:
            a = raw.astype(np.float32)
        return a.reshape(shape)

    def get(self, name, shape, dtype):
        """Tensor `name`, checked against `shape`, dequantised and converted to torch `dtype`."""
        if name not in self.tensors:
            files = sorted({os.path.basename(t[0]) for t in self.tensors.values()})
            raise RefError(f"{self.dir}: missing tensor {name} (not in {', '.join(files)})")
        path, dt, have, _ = self.tensors[name]
        if have != list(shape):
            raise RefError(f"{path}: tensor {name} has shape {have}, expected {list(shape)}")
        a = self._float32(name)
        self.used.add(name)
        if dt == "F8_E4M3":  # dequantised weight = fp8 * scale_inv[i // 128, j // 128], in fp32
            sname = name + "_scale_inv"
            (bo, bi), (o, i) = self.block, shape
            if sname not in self.tensors:
                raise RefError(f"{path}: FP8 tensor {name} has no {sname}")
            spath, sdt, sshape, _ = self.tensors[sname]
            if sshape != [-(-o // bo), -(-i // bi)] or sdt != "F32":
                raise RefError(f"{spath}: tensor {sname} is {sdt}{sshape}, expected F32"
                               f"{[-(-o // bo), -(-i // bi)]}")
            s = self._float32(sname).repeat(bo, 0)[:o].repeat(bi, 1)[:, :i]
            self.used.add(sname)
            a = a * s
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


# ================================================================================================
# Config

class Config:
    """The HF DeepSeek-V2/V3 config fields this reference uses (defaults as HF's config classes)."""

    def __init__(self, c, path="config.json", yarn_rule="configured"):
        def req(k):
            if c.get(k) is None:
                raise RefError(f"{path}: missing {k}")
            return c[k]
        self.vocab, self.dim = req("vocab_size"), req("hidden_size")
        self.inter, self.n_layers = req("intermediate_size"), req("num_hidden_layers")
        self.n_heads, self.kv_rank = req("num_attention_heads"), req("kv_lora_rank")
        self.q_rank = c.get("q_lora_rank") or 0
        self.nope, self.rope, self.v = req("qk_nope_head_dim"), req("qk_rope_head_dim"), req("v_head_dim")
        self.n_routed = c.get("n_routed_experts") or 0
        self.moe_inter = c.get("moe_intermediate_size") or 0
        self.n_shared = c.get("n_shared_experts") or 0
        self.top_k = c.get("num_experts_per_tok") or 0
        self.n_group = c.get("n_group") or 1
        self.topk_group = c.get("topk_group") or 1
        self.topk_method = {"gready": "greedy"}.get(c.get("topk_method"), c.get("topk_method") or "greedy")
        self.scoring = c.get("scoring_func", "softmax")
        self.norm_topk = bool(c.get("norm_topk_prob", False))
        self.route_scale = float(c.get("routed_scaling_factor") or 1.0)
        self.first_dense = c.get("first_k_dense_replace") or 0
        self.moe_freq = c.get("moe_layer_freq") or 1
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.theta = float(c.get("rope_theta", 10000.0))
        self.max_pos = c.get("max_position_embeddings", 4096)
        self.tie = bool(c.get("tie_word_embeddings", False))
        self.n_mtp = c.get("num_nextn_predict_layers") or 0
        eos = c.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.block = tuple((c.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise RefError(f"{path}: unsupported topk_method {self.topk_method}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise RefError(f"{path}: unsupported scoring_func {self.scoring}")
        if self.n_routed and (self.n_routed % self.n_group or self.top_k > self.n_routed):
            raise RefError(f"{path}: n_routed_experts {self.n_routed} vs n_group {self.n_group} / top-k {self.top_k}")
        # YaRN: the official code applies it iff max_seq_len (a runtime argument, default 16384)
        # > original_seq_len. "configured": whenever rope_scaling is yarn (HF; the official code at
        # its default length; splitmoe's docs/architecture.md). "extended": iff
        # max_position_embeddings > original_max_position_embeddings.
        rs = c.get("rope_scaling") or {}
        kind = rs.get("type", rs.get("rope_type"))
        if rs and kind != "yarn":
            raise RefError(f"{path}: unsupported rope_scaling type {kind}")
        self.factor = float(rs.get("factor", 1.0))
        self.orig_max_pos = rs.get("original_max_position_embeddings", 4096)
        self.beta_fast, self.beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
        self.mscale_all_dim = float(rs.get("mscale_all_dim", 0.0) or 0.0)
        if yarn_rule not in ("configured", "extended"):
            raise ValueError(f"yarn_rule must be configured or extended, not {yarn_rule}")
        self.yarn = bool(rs) and (yarn_rule == "configured" or self.max_pos > self.orig_max_pos)

    def is_moe(self, i):
        return bool(self.n_routed) and i >= self.first_dense and i % self.moe_freq == 0


def rope_freqs(cfg, dtype):
    """[rope/2] rotary frequencies, with the YaRN correction when cfg.yarn, computed as the official
    precompute_freqs_cis does (there in fp32; here in `dtype`)."""
    dim, base = cfg.rope, cfg.theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    if cfg.yarn:
        def corr_dim(rot):
            return dim * math.log(cfg.orig_max_pos / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.factor * (1 - smooth) + freqs * smooth
    return freqs


def softmax_scale(cfg):
    scale = (cfg.nope + cfg.rope) ** -0.5
    if cfg.yarn and cfg.factor > 1:
        m = 0.1 * cfg.mscale_all_dim * math.log(cfg.factor) + 1.0
        scale *= m * m
    return scale


# ================================================================================================
# Layers (x: [T, dim] rows = token positions; all weights [out, in])

def rms_norm(x, w, eps):  # x [..., n], w [n]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, cos, sin):  # x [T, H, R] with (even, odd) pairs as complex numbers; cos/sin [T, R/2]
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def mlp(p, x):  # p = (gate_proj, up_proj, down_proj); x [T, dim] -> [T, dim]
    w1, w3, w2 = p
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def topk_indices(x, k):  # x [..., n] -> [..., k] indices of the k largest, ties -> smaller index
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


class Model:
    """Weights of a DeepSeek-V2/V3 model plus forward functions. Caches are lists (one per layer) of
    {"kv": [S, kv_lora_rank] = kv_norm(c_kv), "pe": [S, rope] = rotated k_pe}."""

    def __init__(self, model_dir, dtype=torch.float32, yarn_rule="configured"):
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise RefError(f"{model_dir}: no config.json")
        with open(path) as f:
            self.cfg = cfg = Config(json.load(f), path, yarn_rule)
        self.dtype = dtype
        self.ckpt = ck = Checkpoint(model_dir, cfg.block)
        V, D = cfg.vocab, cfg.dim
        self.embed = ck.get("model.embed_tokens.weight", [V, D], dtype)
        self.layers = [self._load_block(f"model.layers.{i}.", cfg.is_moe(i)) for i in range(cfg.n_layers)]
        self.norm = ck.get("model.norm.weight", [D], dtype)
        self.head = self.embed if cfg.tie else ck.get("lm_head.weight", [V, D], dtype)
        self.freqs = rope_freqs(cfg, dtype)
        self.scale = softmax_scale(cfg)
        self._mtp = None
        mtp_pre = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.n_mtp))
        unused = sorted(n for n in ck.tensors if n not in ck.used and not n.startswith(mtp_pre))
        if unused:
            print(f"deepseek_ref: warning: {len(unused)} tensors unused, e.g. {unused[:3]}", file=sys.stderr)

    def _load_block(self, pre, moe):
        c, ck, dt = self.cfg, self.ckpt, self.dtype
        D, H, C, qk = c.dim, c.n_heads, c.kv_rank, c.nope + c.rope

        def w(name, *shape):
            return ck.get(pre + name, shape, dt)
        a = {"kv_a": w("self_attn.kv_a_proj_with_mqa.weight", C + c.rope, D),
             "kv_norm": w("self_attn.kv_a_layernorm.weight", C),
             "kv_b": w("self_attn.kv_b_proj.weight", H * (c.nope + c.v), C),
             "o": w("self_attn.o_proj.weight", D, H * c.v)}
        if c.q_rank:
            a.update(q_a=w("self_attn.q_a_proj.weight", c.q_rank, D),
                     q_norm=w("self_attn.q_a_layernorm.weight", c.q_rank),
                     q_b=w("self_attn.q_b_proj.weight", H * qk, c.q_rank))
        else:
            a["q"] = w("self_attn.q_proj.weight", H * qk, D)

        def ffn(prefix, inter):  # -> (gate_proj, up_proj, down_proj)
            return (w(prefix + "gate_proj.weight", inter, D), w(prefix + "up_proj.weight", inter, D),
                    w(prefix + "down_proj.weight", D, inter))
        if moe:
            E, I = c.n_routed, c.moe_inter
            f = {"gate": w("mlp.gate.weight", E, D),
                 "bias": w("mlp.gate.e_score_correction_bias", E) if c.topk_method == "noaux_tc" else None,
                 "experts": [ffn(f"mlp.experts.{e}.", I) for e in range(E)],
                 "shared": ffn("mlp.shared_experts.", c.n_shared * I) if c.n_shared else None}
        else:
            f = {"dense": ffn("mlp.", c.inter)}
        return {"attn_norm": w("input_layernorm.weight", D), "ffn_norm": w("post_attention_layernorm.weight", D),
                "attn": a, "ffn": f}

    # ---- attention -----------------------------------------------------------------------------
    def _rope_table(self, pos):  # pos [T] int64 -> cos, sin [T, rope/2]; angles t * f in dtype as the official outer()
        ang = pos.to(self.dtype)[:, None] * self.freqs[None, :]
        return ang.cos(), ang.sin()

    def mla(self, p, x, pos, cache, attn):
        """x [T, D] (normed), pos [T] absolute positions; cache {"kv","pe"} is extended in place
        (None: attend over this call's tokens only). Causal: query at p sees keys at <= p."""
        c = self.cfg
        T, H, dn, dr, dv, C = x.shape[0], c.n_heads, c.nope, c.rope, c.v, c.kv_rank
        q = x @ p["q"].T if "q" in p else rms_norm(x @ p["q_a"].T, p["q_norm"], c.eps) @ p["q_b"].T
        q_nope, q_pe = q.view(T, H, dn + dr).split([dn, dr], dim=-1)           # [T,H,dn], [T,H,dr]
        cos, sin = self._rope_table(pos)
        q_pe = rotate(q_pe, cos, sin)
        c_kv, k_pe = (x @ p["kv_a"].T).split([C, dr], dim=-1)                   # [T,C], [T,dr]
        kv = rms_norm(c_kv, p["kv_norm"], c.eps)                                # [T,C]
        pe = rotate(k_pe[:, None, :], cos, sin)[:, 0]                           # [T,dr]
        if cache is not None:
            cache["kv"] = kv = torch.cat([cache["kv"], kv])                     # [S,C]
            cache["pe"] = pe = torch.cat([cache["pe"], pe])                     # [S,dr]
            kpos = torch.arange(kv.shape[0])
        else:
            kpos = pos
        wkv_b = p["kv_b"].view(H, dn + dv, C)
        if attn == "naive":
            k_nope, v = (kv @ p["kv_b"].T).view(-1, H, dn + dv).split([dn, dv], dim=-1)  # [S,H,dn], [S,H,dv]
            k = torch.cat([k_nope, pe[:, None, :].expand(-1, H, dr)], dim=-1)         # [S,H,dn+dr]
            scores = torch.einsum("thd,shd->ths", torch.cat([q_nope, q_pe], dim=-1), k)
        elif attn == "absorb":
            q_lat = torch.einsum("thd,hdc->thc", q_nope, wkv_b[:, :dn])               # [T,H,C]
            scores = torch.einsum("thc,sc->ths", q_lat, kv) + torch.einsum("thr,sr->ths", q_pe, pe)
        else:
            raise ValueError(f"attn must be naive or absorb, not {attn}")
        mask = kpos[None, :] > pos[:, None]                                     # [T,S]
        probs = (scores * self.scale).masked_fill(mask[:, None, :], float("-inf")).softmax(dim=-1)
        if attn == "naive":
            o = torch.einsum("ths,shd->thd", probs, v)                          # [T,H,dv]
        else:
            o = torch.einsum("thc,hdc->thd", torch.einsum("ths,sc->thc", probs, kv), wkv_b[:, dn:])
        return o.reshape(T, H * dv) @ p["o"].T                                  # [T,D]

    # ---- feed-forward --------------------------------------------------------------------------
    def route(self, f, x):
        """x [T, D] -> routing weights [T, k], expert ids [T, k]."""
        c = self.cfg
        T, E, G = x.shape[0], c.n_routed, c.n_group
        logits = x @ f["gate"].T                                                # [T,E]
        scores = logits.softmax(dim=-1) if c.scoring == "softmax" else logits.sigmoid()
        sel = scores + f["bias"] if f["bias"] is not None else scores
        if G > 1 and c.topk_method != "greedy":
            grouped = sel.view(T, G, E // G)
            if c.topk_method == "noaux_tc":
                gscore = grouped.gather(-1, topk_indices(grouped, 2)).sum(-1)   # [T,G] top-2 sum
            else:
                gscore = grouped.amax(-1)                                       # [T,G] max
            drop = torch.ones(T, G, dtype=torch.bool).scatter(1, topk_indices(gscore, c.topk_group), False)
            sel = grouped.masked_fill(drop[:, :, None], float("-inf")).view(T, E)
        ids = topk_indices(sel, c.top_k)                                        # [T,k]
        w = scores.gather(1, ids)                                               # unbiased
        if c.norm_topk and c.top_k > 1:
            w = w / w.sum(-1, keepdim=True)
        return w * c.route_scale, ids

    def moe(self, f, x):  # x [T, D] -> [T, D]
        w, ids = self.route(f, x)
        y = torch.zeros_like(x)
        for e in ids.unique().tolist():
            t, j = torch.where(ids == e)
            y.index_add_(0, t, mlp(f["experts"][e], x[t]) * w[t, j, None])
        return y + mlp(f["shared"], x) if f["shared"] is not None else y

    def block(self, p, x, pos, cache, attn):
        x = x + self.mla(p["attn"], rms_norm(x, p["attn_norm"], self.cfg.eps), pos, cache, attn)
        h = rms_norm(x, p["ffn_norm"], self.cfg.eps)
        return x + (mlp(p["ffn"]["dense"], h) if "dense" in p["ffn"] else self.moe(p["ffn"], h))

    # ---- whole model ---------------------------------------------------------------------------
    def new_cache(self):
        z = torch.zeros
        return [{"kv": z(0, self.cfg.kv_rank, dtype=self.dtype), "pe": z(0, self.cfg.rope, dtype=self.dtype)}
                for _ in self.layers]

    def hidden(self, tokens, start=0, cache=None, attn="absorb"):
        """tokens [T] at positions start.. -> final-normed hidden states [T, D]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab):
            raise RefError(f"token id out of range [0, {self.cfg.vocab})")
        if cache is not None and cache[0]["kv"].shape[0] != start:
            raise ValueError(f"cache holds {cache[0]['kv'].shape[0]} positions, start is {start}")
        x = self.embed[tokens]
        pos = torch.arange(start, start + tokens.numel())
        for i, p in enumerate(self.layers):
            x = self.block(p, x, pos, cache[i] if cache is not None else None, attn)
        return rms_norm(x, self.norm, self.cfg.eps)

    @torch.no_grad()
    def forward(self, tokens, start=0, cache=None, attn="absorb"):
        """tokens [T] -> logits [T, vocab] (row i predicts the token after tokens[i])."""
        return self.hidden(tokens, start, cache, attn) @ self.head.T

    def mtp(self):
        """The first MTP module (layer index num_hidden_layers), loaded on first use."""
        c = self.cfg
        if c.n_mtp < 1:
            raise RefError("config.json: num_nextn_predict_layers is 0; no MTP module")
        if self._mtp is None:
            L, V, D, pre = c.n_layers, c.vocab, c.dim, f"model.layers.{c.n_layers}."
            g = self.ckpt.get
            self._mtp = {"embed": g(pre + "embed_tokens.weight", [V, D], self.dtype),
                         "enorm": g(pre + "enorm.weight", [D], self.dtype),
                         "hnorm": g(pre + "hnorm.weight", [D], self.dtype),
                         "eh_proj": g(pre + "eh_proj.weight", [D, 2 * D], self.dtype),
                         "norm": g(pre + "shared_head.norm.weight", [D], self.dtype),
                         "head": g(pre + "shared_head.head.weight", [V, D], self.dtype),
                         "block": self._load_block(pre, c.is_moe(L))}
        return self._mtp

    @torch.no_grad()
    def mtp_forward(self, tokens, h=None, attn="absorb"):
        """tokens [n] -> MTP logits [n-1, vocab]; row i (position i) predicts tokens[i+2].
        h: the main model's final-normed hidden states [>= n-1, D] (computed if None)."""
        m, eps = self.mtp(), self.cfg.eps
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        n = tokens.numel()
        if h is None:
            h = self.hidden(tokens, attn=attn)
        e = rms_norm(m["embed"][tokens[1:]], m["enorm"], eps)                  # [n-1,D]
        x = torch.cat([e, rms_norm(h[:n - 1], m["hnorm"], eps)], dim=-1) @ m["eh_proj"].T
        x = self.block(m["block"], x, torch.arange(n - 1), None, attn)
        return rms_norm(x, m["norm"], eps) @ m["head"].T


def load_model(model_dir, dtype=torch.float32, yarn_rule="configured"):
    return Model(model_dir, dtype, yarn_rule)


def forward(model, tokens, attn="absorb"):
    """Module-level convenience: full-sequence logits [T, vocab]."""
    return model.forward(tokens, attn=attn)


# ================================================================================================
# Output helpers and subcommands

def log_probs(logits):  # [T, V] -> float64 numpy log-softmax
    return torch.log_softmax(logits.to(torch.float64), dim=-1).numpy()


def top(row, k):  # row [V] float64 -> [[id, lp], ...] by descending lp, ties -> smaller id
    order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
    return [[int(i), float(row[i])] for i in order]


def entry(row, token, k):
    return {"token": int(token), "logprob": float(row[token]), "top_logprobs": top(row, k)}


def score(model, tokens, k=5, attn="absorb", with_mtp=False):
    h = model.hidden(tokens, attn=attn)
    lp = log_probs(h @ model.head.T)
    out = {"prompt_tokens": list(tokens),
           "prompt_logprobs": [None] + [entry(lp[i - 1], tokens[i], k) for i in range(1, len(tokens))]}
    if with_mtp:
        mtp_lp = log_probs(model.mtp_forward(tokens, h, attn)) if len(tokens) >= 2 else []
        out["mtp_logprobs"] = [entry(mtp_lp[i], tokens[i + 2], k) for i in range(len(tokens) - 2)]
    return out


@torch.no_grad()
def generate(model, prompt, max_tokens, k=5, attn="absorb", trace=None):
    """Greedy decoding with a latent (absorbed-form) cache. trace: list to receive each step's logits."""
    if not prompt:
        raise RefError("empty prompt")
    cache = model.new_cache()
    logits = model.forward(prompt, 0, cache, attn)[-1]
    toks, lps, finish = [], [], "length"
    for step in range(max_tokens):
        if trace is not None:
            trace.append(logits)
        row = log_probs(logits[None])[0]
        tok = top(row, 1)[0][0]
        toks.append(tok)
        lps.append(entry(row, tok, k))
        if tok in model.cfg.eos:
            finish = "stop"
            break
        if step + 1 < max_tokens:
            logits = model.forward([tok], len(prompt) + step, cache, attn)[0]
    return {"tokens": toks, "logprobs": lps, "finish_reason": finish}


def selftest(model_dir, dtype, yarn_rule="configured"):
    m = load_model(model_dir, dtype, yarn_rule)
    V = m.cfg.vocab
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, V, (12,), generator=g).tolist()
    res, ok = {}, True

    def check(name, value, tol):
        nonlocal ok
        res[name] = value
        ok = ok and value < tol

    with torch.no_grad():
        naive, absorb = log_probs(m.forward(prompt, attn="naive")), log_probs(m.forward(prompt, attn="absorb"))
        check("naive_vs_absorb_max_logprob_diff", float(np.abs(naive - absorb).max()), 1e-4)
        # Chunked prefill through the cache == one pass.
        cache = m.new_cache()
        chunks = torch.cat([m.forward(prompt[:5], 0, cache), m.forward(prompt[5:], 5, cache)])
        check("chunked_vs_full_max_logprob_diff", float(np.abs(log_probs(chunks) - absorb).max()), 1e-4)
        # Incremental decode (naive and absorbed use of the same latent cache) == full recompute.
        for attn in ("absorb", "naive"):
            trace = []
            toks = generate(m, prompt, 8, 0, attn, trace)["tokens"]
            inc = torch.stack(trace)                                            # [steps, V]
            full = m.forward(prompt + toks[:-1])[len(prompt) - 1:len(prompt) - 1 + len(trace)]
            check(f"incremental_{attn}_vs_full_max_logit_diff", float((inc - full).abs().max()), 1e-4)
            check(f"incremental_{attn}_vs_full_max_logprob_diff",
                  float(np.abs(log_probs(inc) - log_probs(full)).max()), 1e-4)
        res["generated"] = toks
        if m.cfg.n_mtp >= 1 and m.ckpt.has(f"model.layers.{m.cfg.n_layers}.eh_proj.weight"):
            a, b = (log_probs(m.mtp_forward(prompt, attn=x)) for x in ("naive", "absorb"))
            check("mtp_naive_vs_absorb_max_logprob_diff", float(np.abs(a - b).max()), 1e-4)
        if dtype != torch.float64:  # informational: how far fp32 is from fp64
            hi = log_probs(load_model(model_dir, torch.float64, yarn_rule).forward(prompt))
            res["fp32_vs_fp64_max_logprob_diff"] = float(np.abs(absorb - hi).max())
    res["ok"] = ok
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("score", "generate", "selftest"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--dtype", choices=["float32", "float64"], default="float32")
        s.add_argument("--yarn-rule", choices=["configured", "extended"], default="configured",
                       help="YaRN whenever rope_scaling is yarn, or only if max_position_embeddings > original")
        if name != "selftest":
            s.add_argument("--prompt-tokens", required=True)
            s.add_argument("--top-logprobs", type=int, default=5)
        if name == "score":
            s.add_argument("--attn", choices=["naive", "absorb"], default="absorb")
            s.add_argument("--mtp", action="store_true")
        if name == "generate":
            s.add_argument("--max-tokens", type=int, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    dtype = getattr(torch, a.dtype)
    try:
        if a.cmd == "selftest":
            out = selftest(a.model, dtype, a.yarn_rule)
        else:
            toks = [int(t) for t in a.prompt_tokens.split(",") if t.strip()]
            m = load_model(a.model, dtype, a.yarn_rule)
            with torch.no_grad():
                if a.cmd == "score":
                    out = score(m, toks, a.top_logprobs, a.attn, a.mtp)
                else:
                    out = generate(m, toks, a.max_tokens, a.top_logprobs)
    except RefError as e:
        print(f"deepseek_ref: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0 if a.cmd != "selftest" or out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
