#!/usr/bin/python3
"""Writes a small random DeepSeek-V2/V3 checkpoint in the Hugging Face layout, for testing
deepseek_ref.py (and anything else that reads HF DeepSeek directories).

  make_test_checkpoint.py --out DIR [--style v2|v3] [--fp8] [--shards N] [--mtp] [--tie]
                          [--storage bf16|f16|f32] [--seed S]

v3: q_lora 48, sigmoid + noaux_tc (random e_score_correction_bias), n_group 4 / topk_group 2,
    1 shared expert, norm_topk_prob, routed_scaling_factor 2.5.
v2: no q_lora (q_proj), softmax + group_limited_greedy, n_group 2 / topk_group 1, 2 shared experts,
    no norm_topk_prob, routed_scaling_factor 1.5.
Both: hidden 64, 4 heads, kv_lora 32, nope 16, rope 8, v 16, 3 layers (first dense, intermediate
160 so FP8 has ragged multi-block scales), 8 routed experts of 32, top-3, vocab 512, YaRN factor 40
(original 4096, max_position 163840). --fp8 stores every projection inside the layers as
F8_E4M3 (round-to-nearest-even, saturating at +-448) with F32 128x128 `weight_scale_inv`.
"""
import argparse
import json
import math
import os
import struct

import numpy as np

BLOCK = 128


# ---- encoders ------------------------------------------------------------------------------------

def _fp8_positive_values():
    """Values of codes 0x00..0x7E of float8_e4m3fn (increasing; 0x7F is NaN)."""
    v = []
    for b in range(0x7F):
        e, m = b >> 3, b & 7
        v.append((m / 8.0) * 2.0 ** -6 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.array(v, dtype=np.float64)


FP8_POS = _fp8_positive_values()


def encode_fp8(x):
    """float array -> uint8 float8_e4m3fn codes, round-to-nearest-even, saturating at +-448."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(FP8_POS, a), 1, 0x7E)  # FP8_POS[hi-1] < a <= FP8_POS[hi]
    lo = hi - 1
    dlo, dhi = a - FP8_POS[lo], FP8_POS[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | (np.signbit(x).astype(np.int64) << 7)).astype(np.uint8)


def encode_bf16(x):
    """float32 -> bf16 bits (uint16), round-to-nearest-even."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def quantize_fp8(w):
    """w [out, in] float32 -> (codes uint8 [out, in], scale_inv float32 [ceil(out/128), ceil(in/128)])."""
    o, i = w.shape
    so, si = -(-o // BLOCK), -(-i // BLOCK)
    scale = np.ones((so, si), dtype=np.float32)
    for r in range(so):
        for c in range(si):
            amax = np.abs(w[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK]).max()
            scale[r, c] = amax / 448.0 if amax > 0 else 1.0
    full = scale.repeat(BLOCK, 0)[:o].repeat(BLOCK, 1)[:, :i]
    return encode_fp8(w.astype(np.float32) / full), scale


def write_safetensors(path, tensors):
    """tensors: {name: (dtype string, numpy array of the stored element type)}."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dt, arr = tensors[name]
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    return off


# ---- model description ---------------------------------------------------------------------------

def make_config(style, mtp, tie, fp8):
    c = {"architectures": ["DeepseekV3ForCausalLM" if style == "v3" else "DeepseekV2ForCausalLM"],
         "model_type": "deepseek_v3" if style == "v3" else "deepseek_v2",
         "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 32,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
         "q_lora_rank": 48 if style == "v3" else None, "kv_lora_rank": 32,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
         "n_shared_experts": 1 if style == "v3" else 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
         "n_group": 4 if style == "v3" else 2, "topk_group": 2 if style == "v3" else 1,
         "topk_method": "noaux_tc" if style == "v3" else "group_limited_greedy",
         "scoring_func": "sigmoid" if style == "v3" else "softmax",
         "norm_topk_prob": style == "v3", "routed_scaling_factor": 2.5 if style == "v3" else 1.5,
         "first_k_dense_replace": 1, "moe_layer_freq": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1,
                          "mscale": 1.0 if style == "v3" else 0.707,
                          "mscale_all_dim": 1.0 if style == "v3" else 0.707},
         "max_position_embeddings": 163840, "tie_word_embeddings": tie,
         "num_nextn_predict_layers": 1 if mtp else 0, "bos_token_id": 0, "eos_token_id": 1,
         "hidden_act": "silu", "torch_dtype": "bfloat16"}
    if fp8:
        c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                    "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    return c


def make_weights(c, rng):
    """-> ({name: float32 array}, set of names that are projections (FP8-quantisable))."""
    V, D, H = c["vocab_size"], c["hidden_size"], c["num_attention_heads"]
    qk, C, R = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    E, I = c["n_routed_experts"], c["moe_intermediate_size"]
    w, proj = {}, set()

    def lin(name, o, i, gain=1.0):
        w[name] = (rng.standard_normal((o, i)) * gain / math.sqrt(i)).astype(np.float32)
        proj.add(name)

    def norm(name, n):
        w[name] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def ffn(pre, inter):
        lin(pre + "gate_proj.weight", inter, D)
        lin(pre + "up_proj.weight", inter, D)
        lin(pre + "down_proj.weight", D, inter)

    def block(i):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight", D)
        norm(p + "post_attention_layernorm.weight", D)
        a = p + "self_attn."
        if c["q_lora_rank"]:
            lin(a + "q_a_proj.weight", c["q_lora_rank"], D)
            norm(a + "q_a_layernorm.weight", c["q_lora_rank"])
            lin(a + "q_b_proj.weight", H * qk, c["q_lora_rank"])
        else:
            lin(a + "q_proj.weight", H * qk, D)
        lin(a + "kv_a_proj_with_mqa.weight", C + R, D)
        norm(a + "kv_a_layernorm.weight", C)
        lin(a + "kv_b_proj.weight", H * (c["qk_nope_head_dim"] + c["v_head_dim"]), C)
        lin(a + "o_proj.weight", D, H * c["v_head_dim"])
        if i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0:
            w[p + "mlp.gate.weight"] = (rng.standard_normal((E, D)) / math.sqrt(D)).astype(np.float32)
            if c["topk_method"] == "noaux_tc":
                w[p + "mlp.gate.e_score_correction_bias"] = (0.1 * rng.standard_normal(E)).astype(np.float32)
            for e in range(E):
                ffn(p + f"mlp.experts.{e}.", I)
            if c["n_shared_experts"]:
                ffn(p + "mlp.shared_experts.", c["n_shared_experts"] * I)
        else:
            ffn(p + "mlp.", c["intermediate_size"])

    w["model.embed_tokens.weight"] = rng.standard_normal((V, D)).astype(np.float32)
    L = c["num_hidden_layers"]
    for i in range(L):
        block(i)
    norm("model.norm.weight", D)
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = (rng.standard_normal((V, D)) * 3 / math.sqrt(D)).astype(np.float32)
    if c["num_nextn_predict_layers"]:
        p = f"model.layers.{L}."
        block(L)
        w[p + "embed_tokens.weight"] = w["model.embed_tokens.weight"].copy()
        norm(p + "enorm.weight", D)
        norm(p + "hnorm.weight", D)
        lin(p + "eh_proj.weight", D, 2 * D)
        norm(p + "shared_head.norm.weight", D)
        w[p + "shared_head.head.weight"] = (rng.standard_normal((V, D)) * 3 / math.sqrt(D)).astype(np.float32)
    return w, proj


def encode_all(w, proj, fp8, storage):
    """float32 weights -> {name: (dtype, stored array)}."""
    out = {}
    for name, a in w.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = ("F32", a)
        elif fp8 and name in proj:
            q, s = quantize_fp8(a)
            out[name] = ("F8_E4M3", q)
            out[name + "_scale_inv"] = ("F32", s)
        elif storage == "bf16":
            out[name] = ("BF16", encode_bf16(a))
        elif storage == "f16":
            out[name] = ("F16", a.astype(np.float16))
        else:
            out[name] = ("F32", a)
    return out


def main():
    ap = argparse.ArgumentParser(description="random tiny DeepSeek checkpoint in HF layout")
    ap.add_argument("--out", required=True)
    ap.add_argument("--style", choices=["v2", "v3"], default="v3")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--tie", action="store_true", help="tie_word_embeddings (no lm_head.weight)")
    ap.add_argument("--storage", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = make_config(a.style, a.mtp, a.tie, a.fp8)
    w, proj = make_weights(cfg, np.random.default_rng(a.seed))
    tensors = encode_all(w, proj, a.fp8, a.storage)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for stale in os.listdir(a.out):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(a.out, stale))
    if a.shards <= 1:
        write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
        return
    # Round-robin over names, so a weight and its scale_inv usually land in different shards.
    names, weight_map, total = sorted(tensors), {}, 0
    for k in range(a.shards):
        fn = f"model-{k + 1:05d}-of-{a.shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::a.shards]}
        total += write_safetensors(os.path.join(a.out, fn), part)
        weight_map.update({n: fn for n in part})
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


if __name__ == "__main__":
    main()
