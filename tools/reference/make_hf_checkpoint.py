#!/usr/bin/python3
"""Writes a random DeepSeek-V2/V3 checkpoint in the Hugging Face layout, from Python.

This writer shares no code with `splitmoe make-tiny`: it serialises safetensors and
FP8 (E4M3, round-to-nearest-even, 128x128 block scales) on its own, and it covers
config shapes make-tiny never writes (F16/F32 storage, tied embeddings, no rope
scaling, moe_layer_freq 2, no shared expert, grouped greedy, odd dimensions, shards).
conformance_test.py uses it so the engine is checked on checkpoints it did not make.

Usage: make_hf_checkpoint.py --out DIR --variant NAME [--seed N]
"""
import argparse
import json
import os
import struct

import numpy as np

VARIANTS = {
    # name: config overrides, storage dtype, fp8, shards
    "v3_fp8_ragged": dict(cfg=dict(hidden_size=200, q_lora_rank=72, kv_lora_rank=40, qk_nope_head_dim=24,
                                   qk_rope_head_dim=8, v_head_dim=20, num_attention_heads=3,
                                   moe_intermediate_size=56, n_routed_experts=12, num_experts_per_tok=3,
                                   n_group=4, topk_group=2), dtype="BF16", fp8=True, shards=2),
    "v3_f32_tied": dict(cfg=dict(tie_word_embeddings=True, rope_scaling=None, num_nextn_predict_layers=0),
                        dtype="F32", fp8=False, shards=1),
    "v2_f16_freq2": dict(cfg=dict(style="v2", moe_layer_freq=2, num_hidden_layers=4, first_k_dense_replace=1,
                                  n_shared_experts=0), dtype="F16", fp8=False, shards=3),
    "v2_grouped_greedy_nolora": dict(cfg=dict(style="v2", topk_method="greedy", n_group=4, topk_group=2,
                                              norm_topk_prob=True, routed_scaling_factor=16.0),
                                     dtype="BF16", fp8=False, shards=1),
}


def base_config(style):
    v3 = style == "v3"
    return dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        vocab_size=1000, hidden_size=96, intermediate_size=176, moe_intermediate_size=40,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48 if v3 else None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1 if v3 else 2,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4 if v3 else 2, topk_group=2 if v3 else 1,
        topk_method="noaux_tc" if v3 else "group_limited_greedy", scoring_func="sigmoid" if v3 else "softmax",
        norm_topk_prob=v3, routed_scaling_factor=2.5 if v3 else 1.0, first_k_dense_replace=1, moe_layer_freq=1,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0 if v3 else 0.707, mscale_all_dim=1.0 if v3 else 0.707),
        tie_word_embeddings=False, num_nextn_predict_layers=1 if v3 else 0, bos_token_id=0, eos_token_id=1)


def fp8_codes():
    vals = []
    for b in range(0x7F):  # non-negative finite codes, ascending
        e, m = (b >> 3) & 0xF, b & 7
        vals.append((m / 8.0) * 2.0 ** -6 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.array(vals)


FP8_POS = fp8_codes()


def to_fp8(x):
    """Nearest E4M3 code, ties to the even code, saturating at 448."""
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(FP8_POS, a), 1, len(FP8_POS) - 1)
    lo = hi - 1
    d_lo, d_hi = a - FP8_POS[lo], FP8_POS[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def encode(arr, dtype):
    if dtype == "F32":
        return arr.astype(np.float32).tobytes()
    if dtype == "F16":
        return arr.astype(np.float16).tobytes()
    bits = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # bf16, round to nearest even
    return bits.astype(np.uint16).tobytes()


def tensors(c, rng):
    """(name, array, quantizable) for every tensor of the config, HF names."""
    h, H = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def w(rows, cols, scale=1.0):
        return rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    def mlp(p, inter):
        return [(p + "gate_proj.weight", w(inter, h), True), (p + "up_proj.weight", w(inter, h), True),
                (p + "down_proj.weight", w(h, inter, 0.5), True)]

    def block(i):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out = [(p + "input_layernorm.weight", norm(h), False), (p + "post_attention_layernorm.weight", norm(h), False)]
        if c["q_lora_rank"]:
            r = c["q_lora_rank"]
            out += [(a + "q_a_proj.weight", w(r, h), True), (a + "q_a_layernorm.weight", norm(r), False),
                    (a + "q_b_proj.weight", w(H * qk, r), True)]
        else:
            out += [(a + "q_proj.weight", w(H * qk, h), True)]
        out += [(a + "kv_a_proj_with_mqa.weight", w(c["kv_lora_rank"] + c["qk_rope_head_dim"], h), True),
                (a + "kv_a_layernorm.weight", norm(c["kv_lora_rank"]), False),
                (a + "kv_b_proj.weight", w(H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), True),
                (a + "o_proj.weight", w(h, H * c["v_head_dim"], 0.5), True)]
        moe = i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0
        if moe:
            out += [(p + "mlp.gate.weight", w(c["n_routed_experts"], h, 2.0), False)]
            if c["topk_method"] == "noaux_tc":
                out += [(p + "mlp.gate.e_score_correction_bias", 0.05 * rng.standard_normal(c["n_routed_experts"]),
                         "F32")]
            for e in range(c["n_routed_experts"]):
                out += mlp(f"{p}mlp.experts.{e}.", c["moe_intermediate_size"])
            if c["n_shared_experts"]:
                out += mlp(p + "mlp.shared_experts.", c["n_shared_experts"] * c["moe_intermediate_size"])
        else:
            out += mlp(p + "mlp.", c["intermediate_size"])
        return out

    embed = rng.standard_normal((c["vocab_size"], h))
    out = [("model.embed_tokens.weight", embed, False)]
    for i in range(c["num_hidden_layers"]):
        out += block(i)
    out += [("model.norm.weight", norm(h), False)]
    if not c["tie_word_embeddings"]:
        out += [("lm_head.weight", w(c["vocab_size"], h, 10.0), False)]
    for k in range(c["num_nextn_predict_layers"]):
        L = c["num_hidden_layers"] + k
        p = f"model.layers.{L}."
        out += [(p + "embed_tokens.weight", embed, False), (p + "enorm.weight", norm(h), False),
                (p + "hnorm.weight", norm(h), False), (p + "eh_proj.weight", w(h, 2 * h), True)]
        out += block(L)
        out += [(p + "shared_head.norm.weight", norm(h), False),
                (p + "shared_head.head.weight", w(c["vocab_size"], h, 10.0), False)]
    return out


def write_file(path, items):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, dtype, shape, raw in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    v = VARIANTS[args.variant]
    cfg = dict(v["cfg"])
    c = base_config(cfg.pop("style", "v3"))
    c.update(cfg)
    rng = np.random.default_rng(args.seed)
    items = []
    for name, arr, quant in tensors(c, rng):
        if quant == "F32":
            items.append((name, "F32", arr.shape, arr.astype(np.float32).tobytes()))
        elif quant and v["fp8"]:
            rows, cols = arr.shape
            sr, sc = -(-rows // 128), -(-cols // 128)
            scale = np.ones((sr, sc))
            for i in range(sr):
                for j in range(sc):
                    amax = np.abs(arr[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
                    scale[i, j] = amax / 448.0 if amax > 0 else 1.0
            full = np.repeat(np.repeat(scale, 128, 0)[:rows], 128, 1)[:, :cols]
            items.append((name, "F8_E4M3", arr.shape, to_fp8(arr / full).tobytes()))
            items.append((name + "_scale_inv", "F32", scale.shape, scale.astype(np.float32).tobytes()))
        else:
            items.append((name, v["dtype"], arr.shape, encode(arr, v["dtype"])))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    shards = v["shards"]
    if shards == 1:
        write_file(os.path.join(args.out, "model.safetensors"), items)
        return
    per = -(-len(items) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = items[s * per:(s + 1) * per]
        write_file(os.path.join(args.out, fname), chunk)
        weight_map.update({it[0]: fname for it in chunk})
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


if __name__ == "__main__":
    main()
