#!/usr/bin/python3
"""An independent fp32 (or fp64) PyTorch reference of DeepSeek-V2/V3 inference.

The semantics are those of DeepSeek's official `inference/model.py`
(deepseek-ai/DeepSeek-V3), applied to a Hugging Face model directory
(config.json + safetensors). Nothing here comes from splitmoe's C++ code: the
safetensors/FP8 parsing and every layer are written from the reference's
definitions, so agreement between the two is evidence, not tautology.

Where the official code needs a mapping to HF names and configs:
  gate_proj/up_proj/down_proj = w1/w3/w2; kv_a_proj_with_mqa = wkv_a; ...
  mscale (reference)  = rope_scaling.mscale_all_dim (HF)
  Gate.bias           = mlp.gate.e_score_correction_bias, used iff topk_method == noaux_tc
                        (the reference keys it on dim == 7168, i.e. on being V3)
  weight normalisation follows norm_topk_prob (the reference: sigmoid models normalise)
  MTP (not in model.py): eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) with h_i the
  main model's final-normed hidden state, as vLLM and SGLang run DeepSeek-V3's MTP.

CLI (one JSON object on stdout):
  dsref.py score    --model DIR --prompt-tokens 1,2,3 [--top-logprobs K] [--attn naive|absorb] [--mtp] [--dtype float32|float64]
  dsref.py generate --model DIR --prompt-tokens ... --max-tokens N [--top-logprobs K]
  dsref.py selftest --model DIR
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Checkpoint reading


def _fp8_e4m3_table():
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7f/0xff NaN; no inf."""
    table = np.zeros(256, dtype=np.float64)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 0x7
        if e == 0xF and m == 0x7:
            table[b] = float("nan")
        elif e == 0:
            table[b] = sign * (m / 8.0) * 2.0 ** -6
        else:
            table[b] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return table


FP8_TABLE = _fp8_e4m3_table()


def read_safetensors(path):
    """Returns {name: (dtype, shape, bytes)} for one file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], data[base + begin:base + end])
    return out


def to_tensor(dtype, shape, raw):
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        arr = u.view(np.float32).astype(np.float64)
    elif dtype == "F16":
        arr = np.frombuffer(raw, dtype=np.float16).astype(np.float64)
    elif dtype == "F32":
        arr = np.frombuffer(raw, dtype=np.float32).astype(np.float64)
    elif dtype == "F8_E4M3":
        arr = FP8_TABLE[np.frombuffer(raw, dtype=np.uint8)]
    else:
        raise ValueError(f"unsupported dtype {dtype}")
    return torch.from_numpy(arr.reshape(shape).copy())


class Checkpoint:
    def __init__(self, model_dir):
        self.dir = model_dir
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        index = os.path.join(model_dir, "model.safetensors.index.json")
        files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
            else ["model.safetensors"]
        self.tensors = {}
        for name in files:
            for k, v in read_safetensors(os.path.join(model_dir, name)).items():
                self.tensors[k] = (name, v)

    def get(self, name, dtype):
        """The weight as `dtype`; FP8 weights dequantised with 128x128 weight_scale_inv blocks."""
        if name not in self.tensors:
            raise KeyError(f"{self.dir}: missing tensor {name}")
        fname, (dt, shape, raw) = self.tensors[name]
        w = to_tensor(dt, shape, raw)
        if dt == "F8_E4M3":
            sname = name + "_scale_inv"
            _, (sdt, sshape, sraw) = self.tensors[sname]
            s = to_tensor(sdt, sshape, sraw)
            s = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
            w = w * s
        return w.to(dtype)

    def has(self, name):
        return name in self.tensors


# ---------------------------------------------------------------------------------------------
# Model


class Args:
    """The reference's ModelArgs, filled from an HF config.json."""

    def __init__(self, c):
        self.vocab_size = c["vocab_size"]
        self.dim = c["hidden_size"]
        self.inter_dim = c.get("intermediate_size")
        self.moe_inter_dim = c.get("moe_intermediate_size")
        self.n_layers = c["num_hidden_layers"]
        self.n_dense_layers = c.get("first_k_dense_replace") or 0
        self.moe_layer_freq = c.get("moe_layer_freq") or 1
        self.n_heads = c["num_attention_heads"]
        self.n_routed_experts = c.get("n_routed_experts") or 0
        self.n_shared_experts = c.get("n_shared_experts") or 0
        self.n_activated_experts = c.get("num_experts_per_tok") or 0
        self.n_expert_groups = c.get("n_group") or 1
        self.n_limited_groups = c.get("topk_group") or 1
        self.topk_method = c.get("topk_method") or "greedy"
        self.score_func = c.get("scoring_func") or "softmax"
        self.norm_topk_prob = bool(c.get("norm_topk_prob", False))
        self.route_scale = c.get("routed_scaling_factor") or 1.0
        self.q_lora_rank = c.get("q_lora_rank") or 0
        self.kv_lora_rank = c["kv_lora_rank"]
        self.qk_nope_head_dim = c["qk_nope_head_dim"]
        self.qk_rope_head_dim = c["qk_rope_head_dim"]
        self.v_head_dim = c["v_head_dim"]
        self.rope_theta = c.get("rope_theta", 10000.0)
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.max_seq_len = c.get("max_position_embeddings", 4096)
        rs = c.get("rope_scaling") or {}
        self.rope_factor = rs.get("factor", 1.0)
        self.original_seq_len = rs.get("original_max_position_embeddings", self.max_seq_len)
        self.beta_fast = rs.get("beta_fast", 32)
        self.beta_slow = rs.get("beta_slow", 1)
        self.mscale = rs.get("mscale_all_dim", 0.0) or 0.0
        # As HF, and as the reference at its default max_seq_len of 16384: whenever configured.
        self.yarn = bool(rs)
        self.tie = bool(c.get("tie_word_embeddings", False))
        self.n_mtp = c.get("num_nextn_predict_layers") or 0
        self.eos = c.get("eos_token_id")
        if isinstance(self.eos, list):
            self.eos = self.eos[0]

    def is_moe(self, layer):
        return self.n_routed_experts > 0 and layer >= self.n_dense_layers and layer % self.moe_layer_freq == 0


def freqs_cis(args, positions):
    """precompute_freqs_cis of the reference, for the given absolute positions."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        def corr_dim(rot):
            return dim * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(args.beta_fast)), 0)
        high = min(math.ceil(corr_dim(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.tensor(positions, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def rope(x, fc):
    """apply_rotary_emb: consecutive pairs as complex numbers. x [..., T, H, D] or [T, D]."""
    dtype = x.dtype
    wide = x.double() if dtype == torch.float64 else x.float()  # fp32 as the reference; fp64 mode stays fp64
    xc = torch.view_as_complex(wide.reshape(*x.shape[:-1], -1, 2).contiguous())
    shape = [1] * xc.dim()
    shape[0], shape[-1] = fc.shape[0], fc.shape[1]
    y = torch.view_as_real(xc * fc.to(xc.dtype).view(*shape)).flatten(-2)
    return y.to(dtype)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Model:
    def __init__(self, model_dir, dtype=torch.float32):
        ck = Checkpoint(model_dir)
        self.args = a = Args(ck.config)
        self.dtype = dtype
        g = lambda n: ck.get(n, dtype)  # noqa: E731
        self.embed = g("model.embed_tokens.weight")
        self.norm = g("model.norm.weight")
        self.head = self.embed if a.tie else g("lm_head.weight")
        self.layers = [self._block(g, i) for i in range(a.n_layers)]
        self.mtp = None
        p = f"model.layers.{a.n_layers}."
        if a.n_mtp > 0 and ck.has(p + "eh_proj.weight"):
            self.mtp = dict(embed=g(p + "embed_tokens.weight"), enorm=g(p + "enorm.weight"),
                            hnorm=g(p + "hnorm.weight"), eh_proj=g(p + "eh_proj.weight"),
                            head_norm=g(p + "shared_head.norm.weight"), head=g(p + "shared_head.head.weight"),
                            block=self._block(g, a.n_layers))
        self.softmax_scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
        if a.yarn and a.rope_factor > 1:
            m = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0
            self.softmax_scale *= m * m

    def _block(self, g, i):
        a, p = self.args, f"model.layers.{i}."
        b = dict(attn_norm=g(p + "input_layernorm.weight"), ffn_norm=g(p + "post_attention_layernorm.weight"))
        s = p + "self_attn."
        if a.q_lora_rank:
            b.update(wq_a=g(s + "q_a_proj.weight"), q_norm=g(s + "q_a_layernorm.weight"), wq_b=g(s + "q_b_proj.weight"))
        else:
            b.update(wq=g(s + "q_proj.weight"))
        b.update(wkv_a=g(s + "kv_a_proj_with_mqa.weight"), kv_norm=g(s + "kv_a_layernorm.weight"),
                 wkv_b=g(s + "kv_b_proj.weight"), wo=g(s + "o_proj.weight"))
        mlp = lambda q: (g(q + "gate_proj.weight"), g(q + "up_proj.weight"), g(q + "down_proj.weight"))  # noqa
        if a.is_moe(i):
            b["gate"] = g(p + "mlp.gate.weight")
            b["bias"] = g(p + "mlp.gate.e_score_correction_bias") if a.topk_method == "noaux_tc" else None
            b["experts"] = [mlp(f"{p}mlp.experts.{e}.") for e in range(a.n_routed_experts)]
            b["shared"] = mlp(p + "mlp.shared_experts.") if a.n_shared_experts else None
        else:
            b["dense"] = mlp(p + "mlp.")
        return b

    # -- layers ---------------------------------------------------------------------------------

    @staticmethod
    def _mlp(w, x):
        w1, w3, w2 = w
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def _gate(self, b, x):
        """Gate.forward: weights [T, k], indices [T, k]."""
        a = self.args
        scores = F.linear(x, b["gate"])
        scores = scores.softmax(dim=-1) if a.score_func == "softmax" else scores.sigmoid()
        original = scores
        if b["bias"] is not None:
            scores = scores + b["bias"]
        if a.n_expert_groups > 1 and a.topk_method != "greedy":
            s = scores.view(x.size(0), a.n_expert_groups, -1)
            group = s.amax(dim=-1) if b["bias"] is None else s.topk(2, dim=-1)[0].sum(dim=-1)
            idx = group.topk(a.n_limited_groups, dim=-1)[1]
            mask = torch.ones(x.size(0), a.n_expert_groups, dtype=torch.bool).scatter_(1, idx, False)
            scores = s.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, a.n_activated_experts, dim=-1)[1]
        weights = original.gather(1, indices)
        if a.norm_topk_prob and a.n_activated_experts > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * a.route_scale, indices

    def _moe(self, b, x):
        weights, indices = self._gate(b, x)
        y = torch.zeros_like(x)
        for e in range(self.args.n_routed_experts):
            idx, top = torch.where(indices == e)
            if idx.numel():
                y[idx] += self._mlp(b["experts"][e], x[idx]) * weights[idx, top, None]
        if b["shared"] is not None:
            y = y + self._mlp(b["shared"], x)
        return y

    def _attn(self, b, x, start, cache, naive):
        """MLA over x [T, dim] at positions start..; cache = dict(kv=[S, r], pe=[S, rope]) grows."""
        a = self.args
        T = x.size(0)
        H, dn, dr, dv, r = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        fc = freqs_cis(a, list(range(start, start + T)))
        if a.q_lora_rank:
            q = F.linear(rms_norm(F.linear(x, b["wq_a"]), b["q_norm"], a.eps), b["wq_b"])
        else:
            q = F.linear(x, b["wq"])
        q = q.view(T, H, dn + dr)
        q_nope, q_pe = torch.split(q, [dn, dr], dim=-1)
        q_pe = rope(q_pe, fc)
        kv = F.linear(x, b["wkv_a"])
        kv, k_pe = torch.split(kv, [r, dr], dim=-1)
        k_pe = rope(k_pe, fc)
        cache["kv"] = torch.cat([cache["kv"], rms_norm(kv, b["kv_norm"], a.eps)])
        cache["pe"] = torch.cat([cache["pe"], k_pe])
        S = cache["kv"].size(0)
        mask = torch.full((T, S), float("-inf"), dtype=x.dtype).triu_(start + 1)
        wkv_b = b["wkv_b"].view(H, dn + dv, r)
        if naive:
            kvx = F.linear(cache["kv"], b["wkv_b"]).view(S, H, dn + dv)
            k_nope, v = torch.split(kvx, [dn, dv], dim=-1)
            k = torch.cat([k_nope, cache["pe"].unsqueeze(1).expand(S, H, dr)], dim=-1)
            qq = torch.cat([q_nope, q_pe], dim=-1)
            scores = torch.einsum("shd,thd->sht", qq, k) * self.softmax_scale
            scores = (scores + mask.unsqueeze(1)).softmax(dim=-1)
            out = torch.einsum("sht,thd->shd", scores, v)
        else:
            q_abs = torch.einsum("shd,hdc->shc", q_nope, wkv_b[:, :dn])
            scores = (torch.einsum("shc,tc->sht", q_abs, cache["kv"]) +
                      torch.einsum("shr,tr->sht", q_pe, cache["pe"])) * self.softmax_scale
            scores = (scores + mask.unsqueeze(1)).softmax(dim=-1)
            out = torch.einsum("sht,tc->shc", scores, cache["kv"])
            out = torch.einsum("shc,hdc->shd", out, wkv_b[:, -dv:])
        return F.linear(out.flatten(1), b["wo"])

    def _run_block(self, b, h, start, cache, naive):
        a = self.args
        h = h + self._attn(b, rms_norm(h, b["attn_norm"], a.eps), start, cache, naive)
        xn = rms_norm(h, b["ffn_norm"], a.eps)
        return h + (self._moe(b, xn) if "gate" in b else self._mlp(b["dense"], xn))

    def new_cache(self):
        a = self.args
        empty = lambda: dict(kv=torch.zeros(0, a.kv_lora_rank, dtype=self.dtype),  # noqa: E731
                             pe=torch.zeros(0, a.qk_rope_head_dim, dtype=self.dtype))
        return [empty() for _ in range(a.n_layers)]

    @torch.no_grad()
    def forward(self, tokens, start=0, caches=None, naive=False):
        """Final-normed hidden states [T, dim] and logits [T, vocab] for tokens at start.."""
        caches = caches if caches is not None else self.new_cache()
        h = self.embed[torch.tensor(tokens)]
        for b, cache in zip(self.layers, caches):
            h = self._run_block(b, h, start, cache, naive)
        h = rms_norm(h, self.norm, self.args.eps)
        return h, F.linear(h, self.head)

    @torch.no_grad()
    def mtp_logits(self, tokens, hidden, naive=False):
        """MTP module 0: row i (i < n-2) predicts tokens[i+2] from hidden[i] and tokens[i+1]."""
        m, a = self.mtp, self.args
        nxt = torch.tensor(tokens[1:-1])
        x = torch.cat([rms_norm(m["embed"][nxt], m["enorm"], a.eps),
                       rms_norm(hidden[:len(tokens) - 2], m["hnorm"], a.eps)], dim=-1)
        h = F.linear(x, m["eh_proj"])
        cache = dict(kv=torch.zeros(0, a.kv_lora_rank, dtype=self.dtype),
                     pe=torch.zeros(0, a.qk_rope_head_dim, dtype=self.dtype))
        h = self._run_block(m["block"], h, 0, cache, naive)
        return F.linear(rms_norm(h, m["head_norm"], a.eps), m["head"])


# ---------------------------------------------------------------------------------------------
# CLI


def logprob_entry(logits_row, token, k):
    lp = torch.log_softmax(logits_row.double(), dim=-1)
    # Descending logprob, ties to the lower id (stable sort on -lp).
    order = torch.sort(-lp, stable=True)[1][:k]
    return {"token": int(token), "logprob": float(lp[token]),
            "top_logprobs": [[int(i), float(lp[i])] for i in order]}


def cmd_score(model, tokens, k, naive, mtp):
    hidden, logits = model.forward(tokens, naive=naive)
    out = {"prompt_tokens": tokens,
           "prompt_logprobs": [None] + [logprob_entry(logits[i - 1], tokens[i], k) for i in range(1, len(tokens))]}
    if mtp:
        if model.mtp is None:
            raise SystemExit("the model has no MTP module")
        ml = model.mtp_logits(tokens, hidden, naive) if len(tokens) >= 3 else []
        out["mtp_logprobs"] = [logprob_entry(ml[i], tokens[i + 2], k) for i in range(len(tokens) - 2)]
    return out


def cmd_generate(model, tokens, max_tokens, k):
    caches = model.new_cache()
    _, logits = model.forward(tokens, 0, caches)
    last, pos = logits[-1], len(tokens)
    out, lps, finish = [], [], "length"
    for _ in range(max_tokens):
        lp = torch.log_softmax(last.double(), dim=-1)
        tok = int(torch.sort(-lp, stable=True)[1][0])  # argmax, ties to the lower id
        out.append(tok)
        lps.append(logprob_entry(last, tok, k))
        if tok == model.args.eos:
            finish = "stop"
            break
        _, logits = model.forward([tok], pos, caches)
        last, pos = logits[-1], pos + 1
    return {"tokens": out, "logprobs": lps, "finish_reason": finish}


def cmd_selftest(model):
    tokens = [0] + [(i * 7919 + 3) % model.args.vocab_size for i in range(1, 40)]
    _, full_naive = model.forward(tokens, naive=True)
    _, full_absorb = model.forward(tokens, naive=False)
    caches = model.new_cache()
    _, inc = model.forward(tokens[:30], 0, caches)
    steps = [inc[-1]]
    for i in range(30, 40):
        _, l = model.forward([tokens[i]], i, caches)
        steps.append(l[-1])
    inc_diff = max(float((steps[j] - full_absorb[29 + j]).abs().max()) for j in range(len(steps) - 1))
    return {"naive_vs_absorb_max_abs_logit_diff": float((full_naive - full_absorb).abs().max()),
            "incremental_vs_full_max_abs_logit_diff": inc_diff}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["score", "generate", "selftest"])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", default="")
    p.add_argument("--top-logprobs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--attn", choices=["naive", "absorb"], default="absorb")
    p.add_argument("--mtp", action="store_true")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = Model(args.model, getattr(torch, args.dtype))
    tokens = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    if args.command == "score":
        out = cmd_score(model, tokens, args.top_logprobs, args.attn == "naive", args.mtp)
    elif args.command == "generate":
        out = cmd_generate(model, tokens, args.max_tokens, args.top_logprobs)
    else:
        out = cmd_selftest(model)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
