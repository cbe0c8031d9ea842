#!/usr/bin/python3
"""Converts a DeepSeek-V2/V3 Hugging Face checkpoint directory (config.json + safetensors, as
`splitmoe make-tiny` writes them) into a GGUF file that llama.cpp loads as its `deepseek2`
architecture, so the peer engine can run the very same weights.

    /usr/bin/python3 tools/reference/make_gguf.py --model DIR --out FILE.gguf [--outtype f32|bf16]

Written from llama.cpp's loader (src/models/deepseek2.cpp, src/llama-model.cpp, llama-arch.cpp,
llama-vocab.cpp of the llama.cpp bundled with node-llama-cpp 3.22.1) and the GGUF v3 file format;
numpy only, no gguf-py, no torch.

What the file holds
  * Matrices: F32 (`--outtype f32`, BF16 checkpoint values widened exactly) or BF16 (the
    checkpoint's own bits; F32/F16 sources are rounded to nearest even). FP8 E4M3 checkpoints are
    dequantised with their 128x128 `weight_scale_inv` first. 1-D tensors (RMSNorm weights, the
    router's e_score_correction_bias) are always F32, as llama.cpp's converter writes them.
  * MLA in the split form llama.cpp wants for its absorbed attention: kv_b_proj
    [H*(nope+v), kv_lora] becomes attn_k_b (per head, the nope rows transposed: ggml ne
    {nope, kv_lora, H}) and attn_v_b (ggml ne {kv_lora, v, H}); head_count_kv 1, key_length
    kv_lora+rope, value_length kv_lora, key_length_mla nope+rope, value_length_mla v.
  * Routed experts stacked per layer into ffn_{gate,up,down}_exps; shared experts as *_shexp.
  * Routing: expert_gating_func 2 (sigmoid) or 1 (softmax), exp_probs_b.bias from
    e_score_correction_bias, expert_weights_norm = norm_topk_prob, expert_weights_scale =
    routed_scaling_factor, expert_group_count / expert_group_used_count = n_group / topk_group.
  * YaRN: rope.scaling.{type,factor,original_context_length,yarn_beta_fast,yarn_beta_slow} and
    yarn_log_multiplier = 0.1 * mscale_all_dim (llama.cpp divides it by 0.1 again for deepseek2).
  * A placeholder SentencePiece ("llama") vocabulary of vocab_size tokens: <s>, </s>, <unk>, the
    256 byte tokens <0x00>..<0xFF>, then "▁t<id>". It needs no merges; the benchmarks feed token
    ids, never text. bos/eos ids come from config.json.
  * MTP layers (num_nextn_predict_layers) are left out: llama.cpp's deepseek2 graph does not run
    them for scoring either.

Refused (llama.cpp's deepseek2 graph cannot express them exactly): grouped routing other than
noaux_tc (llama.cpp ranks groups by the sum of their top-2 scores, which is DeepSeek-V3's rule,
not V2's group max), YaRN with mscale != mscale_all_dim, moe_layer_freq != 1. Tied embeddings
(no lm_head.weight) are fine: llama.cpp then uses token_embd as the output matrix.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# gguf value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = range(10)
T_UINT64, T_INT64, T_FLOAT64 = 10, 11, 12

# ggml tensor types
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
# llama_ftype
FTYPE_ALL_F32, FTYPE_MOSTLY_BF16 = 0, 32

# llama_token_type
TOK_NORMAL, TOK_UNKNOWN, TOK_CONTROL, TOK_BYTE = 1, 2, 3, 6

GATING_SOFTMAX, GATING_SIGMOID = 1, 2

ARCH = "deepseek2"


# ---------------------------------------------------------------------------------------------
# safetensors reading

def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """Round to nearest even (NaN kept quiet), as torch and ggml do."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def fp8_e4m3_to_f32(b):
    table = np.zeros(256, dtype=np.float32)
    for v in range(256):
        s = -1.0 if v & 0x80 else 1.0
        e = (v >> 3) & 0xF
        m = v & 0x7
        if e == 0xF and m == 0x7:
            table[v] = np.nan
        elif e == 0:
            table[v] = s * (m / 8.0) * 2.0 ** -6
        else:
            table[v] = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return table[b]


class Checkpoint:
    """Lazy access to the tensors of one HF checkpoint directory (one file or shards + index)."""

    DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F8_E4M3": np.uint8}

    def __init__(self, model_dir):
        self.entries = {}  # name -> (path, dtype, shape, begin, end)
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        for name in files:
            path = os.path.join(model_dir, name)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            base = 8 + n
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in self.DTYPES:
                    raise SystemExit(f"{key}: unsupported safetensors dtype {info['dtype']}")
                b, e = info["data_offsets"]
                self.entries[key] = (path, info["dtype"], tuple(info["shape"]), base + b, base + e)
        self._maps = {}

    def __contains__(self, name):
        return name in self.entries

    def names(self):
        return self.entries.keys()

    def raw(self, name):
        path, dtype, shape, b, e = self.entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape)) if shape else 1
        arr = self._maps[path][b:e].view(self.DTYPES[dtype])
        assert arr.size == count, name
        return dtype, arr.reshape(shape)

    def f32(self, name):
        """The tensor as float32 (FP8 weights dequantised with their block scales)."""
        dtype, a = self.raw(name)
        if dtype == "BF16":
            return bf16_bits_to_f32(a)
        if dtype == "F8_E4M3":
            scale_name = name + "_scale_inv"
            if scale_name not in self:
                raise SystemExit(f"{name}: FP8 weight without {scale_name}")
            scales = self.f32(scale_name)
            rows, cols = a.shape
            w = fp8_e4m3_to_f32(a)
            s = np.repeat(np.repeat(scales, 128, axis=0), 128, axis=1)[:rows, :cols]
            return w * s
        return a.astype(np.float32)

    def bf16_bits(self, name):
        dtype, a = self.raw(name)
        if dtype == "BF16":
            return np.ascontiguousarray(a)
        return f32_to_bf16_bits(self.f32(name))


# ---------------------------------------------------------------------------------------------
# GGUF writing

class KV:
    def __init__(self):
        self.items = []  # (key, type, value, elem_type)

    def u32(self, k, v):
        self.items.append((k, T_UINT32, int(v), None))

    def f32(self, k, v):
        self.items.append((k, T_FLOAT32, float(v), None))

    def bool(self, k, v):
        self.items.append((k, T_BOOL, bool(v), None))

    def str(self, k, v):
        self.items.append((k, T_STRING, str(v), None))

    def arr(self, k, elem_type, values):
        self.items.append((k, T_ARRAY, values, elem_type))


def pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_scalar(t, v):
    if t == T_UINT32:
        return struct.pack("<I", v)
    if t == T_INT32:
        return struct.pack("<i", v)
    if t == T_FLOAT32:
        return struct.pack("<f", v)
    if t == T_BOOL:
        return struct.pack("<?", v)
    if t == T_STRING:
        return pack_string(v)
    raise ValueError(t)


def pack_kv(key, t, value, elem_type):
    out = [pack_string(key), struct.pack("<I", t)]
    if t == T_ARRAY:
        out.append(struct.pack("<IQ", elem_type, len(value)))
        if elem_type == T_STRING:
            out.extend(pack_string(s) for s in value)
        elif elem_type == T_FLOAT32:
            out.append(np.asarray(value, dtype="<f4").tobytes())
        elif elem_type == T_INT32:
            out.append(np.asarray(value, dtype="<i4").tobytes())
        else:
            out.extend(pack_scalar(elem_type, v) for v in value)
    else:
        out.append(pack_scalar(t, value))
    return b"".join(out)


def pad(n):
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


class Tensor:
    """One tensor of the output: its numpy shape (row-major; ggml ne is the reverse), its ggml
    type and a function producing its values (float32 array or, for BF16, uint16 bits)."""

    def __init__(self, name, shape, ggml_type, produce):
        self.name, self.shape, self.ggml_type, self.produce = name, tuple(shape), ggml_type, produce

    def nbytes(self):
        per = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}[self.ggml_type]
        return int(np.prod(self.shape)) * per


def write_gguf(path, kv, tensors):
    header = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv.items))]
    header.extend(pack_kv(*item) for item in kv.items)
    offset = 0
    for t in tensors:
        ne = list(reversed(t.shape))
        header.append(pack_string(t.name))
        header.append(struct.pack("<I", len(ne)))
        header.append(struct.pack(f"<{len(ne)}Q", *ne))
        header.append(struct.pack("<IQ", t.ggml_type, offset))
        offset += t.nbytes() + pad(t.nbytes())
    head = b"".join(header)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(b"\0" * pad(len(head)))
        for t in tensors:
            data = t.produce()
            want = np.float32 if t.ggml_type == GGML_F32 else np.uint16
            data = np.ascontiguousarray(data, dtype=want)
            if data.shape != t.shape:
                raise SystemExit(f"{t.name}: produced {data.shape}, declared {t.shape}")
            f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
            f.write(b"\0" * pad(t.nbytes()))
    os.replace(tmp, path)
    return offset + len(head) + pad(len(head))


# ---------------------------------------------------------------------------------------------
# the model

def metadata(cfg, outtype):
    kv = KV()
    a = ARCH
    L = cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_lora = cfg["kv_lora_rank"]
    q_lora = cfg.get("q_lora_rank")
    vocab = cfg["vocab_size"]

    kv.str("general.architecture", a)
    kv.str("general.name", "splitmoe bench model")
    kv.u32("general.alignment", ALIGNMENT)
    kv.u32("general.file_type", FTYPE_ALL_F32 if outtype == "f32" else FTYPE_MOSTLY_BF16)

    kv.u32(f"{a}.vocab_size", vocab)
    kv.u32(f"{a}.context_length", cfg.get("max_position_embeddings", 4096))
    kv.u32(f"{a}.embedding_length", cfg["hidden_size"])
    kv.u32(f"{a}.block_count", L)
    kv.u32(f"{a}.feed_forward_length", cfg["intermediate_size"])
    kv.u32(f"{a}.leading_dense_block_count", cfg.get("first_k_dense_replace", 0))
    kv.u32(f"{a}.attention.head_count", H)
    kv.u32(f"{a}.attention.head_count_kv", 1)  # absorbed MLA is MQA over the latent
    kv.f32(f"{a}.attention.layer_norm_rms_epsilon", cfg.get("rms_norm_eps", 1e-6))
    if q_lora:
        kv.u32(f"{a}.attention.q_lora_rank", q_lora)
    kv.u32(f"{a}.attention.kv_lora_rank", kv_lora)
    kv.u32(f"{a}.attention.key_length", kv_lora + rope)
    kv.u32(f"{a}.attention.value_length", kv_lora)
    kv.u32(f"{a}.attention.key_length_mla", nope + rope)
    kv.u32(f"{a}.attention.value_length_mla", vdim)
    kv.u32(f"{a}.rope.dimension_count", rope)
    kv.f32(f"{a}.rope.freq_base", cfg.get("rope_theta", 10000.0))

    n_exp = cfg.get("n_routed_experts") or 0
    kv.u32(f"{a}.expert_feed_forward_length", cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    kv.u32(f"{a}.expert_shared_count", cfg.get("n_shared_experts") or 0)
    if n_exp:
        kv.u32(f"{a}.expert_count", n_exp)
        kv.u32(f"{a}.expert_used_count", cfg["num_experts_per_tok"])
        scoring = cfg.get("scoring_func", "softmax")
        if scoring not in ("sigmoid", "softmax"):
            raise SystemExit(f"scoring_func {scoring!r}: llama.cpp's deepseek2 has sigmoid and softmax")
        kv.u32(f"{a}.expert_gating_func", GATING_SIGMOID if scoring == "sigmoid" else GATING_SOFTMAX)
        kv.f32(f"{a}.expert_weights_scale", cfg.get("routed_scaling_factor", 1.0))
        # llama.cpp only normalises when the key is true (and top-1 softmax never needs it)
        kv.bool(f"{a}.expert_weights_norm", bool(cfg.get("norm_topk_prob", False)))
        n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
        if n_group > 1:
            if cfg.get("topk_method") != "noaux_tc":
                raise SystemExit(
                    f"topk_method {cfg.get('topk_method')!r} with n_group {n_group}: llama.cpp ranks "
                    "groups by the sum of their top-2 scores (noaux_tc), not by the group max")
            if topk_group >= n_group:
                raise SystemExit("llama.cpp needs topk_group < n_group (use n_group 1 instead)")
            kv.u32(f"{a}.expert_group_count", n_group)
            kv.u32(f"{a}.expert_group_used_count", topk_group)
        if cfg.get("moe_layer_freq", 1) != 1:
            raise SystemExit("moe_layer_freq != 1: llama.cpp's deepseek2 makes every layer past "
                             "leading_dense_block_count an MoE layer")

    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise SystemExit(f"rope_scaling type {kind!r}: only yarn is converted")
        mscale, mscale_all = rs.get("mscale", 1.0), rs.get("mscale_all_dim", 0.0)
        # llama.cpp's rope attn factor for deepseek2 is 1 exactly when mscale == mscale_all_dim
        if mscale_all and mscale != mscale_all:
            raise SystemExit(f"yarn mscale {mscale} != mscale_all_dim {mscale_all}: not expressible in llama.cpp")
        kv.str(f"{a}.rope.scaling.type", "yarn")
        kv.f32(f"{a}.rope.scaling.factor", rs["factor"])
        kv.u32(f"{a}.rope.scaling.original_context_length", rs["original_max_position_embeddings"])
        kv.f32(f"{a}.rope.scaling.yarn_beta_fast", rs.get("beta_fast", 32.0))
        kv.f32(f"{a}.rope.scaling.yarn_beta_slow", rs.get("beta_slow", 1.0))
        if mscale_all:
            kv.f32(f"{a}.rope.scaling.yarn_log_multiplier", 0.1 * mscale_all)

    # placeholder SentencePiece vocabulary
    tokens, scores, types = [], [], []
    specials = {0: ("<s>", TOK_CONTROL), 1: ("</s>", TOK_CONTROL), 2: ("<unk>", TOK_UNKNOWN)}
    for i in range(vocab):
        if i in specials:
            text, ty = specials[i]
        elif 3 <= i < 3 + 256:
            text, ty = f"<0x{i - 3:02X}>", TOK_BYTE
        else:
            text, ty = f"\u2581t{i}", TOK_NORMAL
        tokens.append(text)
        types.append(ty)
        scores.append(-float(i))
    kv.str("tokenizer.ggml.model", "llama")
    kv.str("tokenizer.ggml.pre", "default")
    kv.arr("tokenizer.ggml.tokens", T_STRING, tokens)
    kv.arr("tokenizer.ggml.scores", T_FLOAT32, scores)
    kv.arr("tokenizer.ggml.token_type", T_INT32, types)
    bos, eos = cfg.get("bos_token_id", 0), cfg.get("eos_token_id", 1)
    kv.u32("tokenizer.ggml.bos_token_id", bos if bos is not None else 0)
    kv.u32("tokenizer.ggml.eos_token_id", eos if eos is not None else 1)
    kv.u32("tokenizer.ggml.unknown_token_id", 2)
    kv.bool("tokenizer.ggml.add_bos_token", False)
    kv.bool("tokenizer.ggml.add_eos_token", False)
    return kv


def tensors(cfg, ck, outtype):
    mat_type = GGML_F32 if outtype == "f32" else GGML_BF16
    L = cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    nope, vdim = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    n_exp = cfg.get("n_routed_experts") or 0
    dense = cfg.get("first_k_dense_replace", 0)
    out = []
    used = set()

    def shape_of(src):
        return ck.entries[src][2]

    def vector(dst, src):  # 1-D, always F32
        used.add(src)
        out.append(Tensor(dst, shape_of(src), GGML_F32, lambda: ck.f32(src)))

    def matrix(dst, src):
        used.add(src)
        if mat_type == GGML_F32:
            out.append(Tensor(dst, shape_of(src), GGML_F32, lambda: ck.f32(src)))
        else:
            out.append(Tensor(dst, shape_of(src), GGML_BF16, lambda: ck.bf16_bits(src)))

    def convert(a):  # float32 array -> the output type
        return a if mat_type == GGML_F32 else f32_to_bf16_bits(a)

    def get(name):
        if name not in ck:
            raise SystemExit(f"the checkpoint has no {name}")
        return name

    matrix("token_embd.weight", get("model.embed_tokens.weight"))
    vector("output_norm.weight", get("model.norm.weight"))
    if "lm_head.weight" in ck:
        matrix("output.weight", "lm_head.weight")
    for i in range(L):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", get(p + "input_layernorm.weight"))
        if cfg.get("q_lora_rank"):
            matrix(b + "attn_q_a.weight", get(p + "self_attn.q_a_proj.weight"))
            vector(b + "attn_q_a_norm.weight", get(p + "self_attn.q_a_layernorm.weight"))
            matrix(b + "attn_q_b.weight", get(p + "self_attn.q_b_proj.weight"))
        else:
            matrix(b + "attn_q.weight", get(p + "self_attn.q_proj.weight"))
        matrix(b + "attn_kv_a_mqa.weight", get(p + "self_attn.kv_a_proj_with_mqa.weight"))
        vector(b + "attn_kv_a_norm.weight", get(p + "self_attn.kv_a_layernorm.weight"))
        kvb = get(p + "self_attn.kv_b_proj.weight")
        used.add(kvb)
        kv_lora = shape_of(kvb)[1]
        assert shape_of(kvb)[0] == H * (nope + vdim), kvb

        def k_b(kvb=kvb, kv_lora=kv_lora):  # per head [nope, kv_lora] -> [kv_lora, nope]
            w = ck.f32(kvb).reshape(H, nope + vdim, kv_lora)
            return convert(np.ascontiguousarray(w[:, :nope, :].transpose(0, 2, 1)))

        def v_b(kvb=kvb, kv_lora=kv_lora):  # per head [v, kv_lora]
            w = ck.f32(kvb).reshape(H, nope + vdim, kv_lora)
            return convert(np.ascontiguousarray(w[:, nope:, :]))

        out.append(Tensor(b + "attn_k_b.weight", (H, kv_lora, nope), mat_type, k_b))
        out.append(Tensor(b + "attn_v_b.weight", (H, vdim, kv_lora), mat_type, v_b))
        matrix(b + "attn_output.weight", get(p + "self_attn.o_proj.weight"))
        vector(b + "ffn_norm.weight", get(p + "post_attention_layernorm.weight"))
        if i < dense or not n_exp:
            for w in ("gate", "up", "down"):
                matrix(b + f"ffn_{w}.weight", get(p + f"mlp.{w}_proj.weight"))
            continue
        matrix(b + "ffn_gate_inp.weight", get(p + "mlp.gate.weight"))
        bias = p + "mlp.gate.e_score_correction_bias"
        if bias in ck:
            vector(b + "exp_probs_b.bias", bias)
        for w in ("gate", "up", "down"):
            names = [get(p + f"mlp.experts.{e}.{w}_proj.weight") for e in range(n_exp)]
            used.update(names)
            rows, cols = shape_of(names[0])

            def stacked(names=names):
                if mat_type == GGML_BF16:
                    return np.stack([ck.bf16_bits(n) for n in names])
                return np.stack([ck.f32(n) for n in names])

            out.append(Tensor(b + f"ffn_{w}_exps.weight", (n_exp, rows, cols), mat_type, stacked))
        if cfg.get("n_shared_experts"):
            for w in ("gate", "up", "down"):
                matrix(b + f"ffn_{w}_shexp.weight", get(p + f"mlp.shared_experts.{w}_proj.weight"))

    # Everything the checkpoint holds must have gone somewhere, except MTP layers and FP8 scales.
    mtp_from = L
    left = []
    for n in ck.names():
        if n in used or n.endswith("_scale_inv"):
            continue
        if n.startswith("model.layers."):
            if int(n.split(".")[2]) >= mtp_from:
                continue
        left.append(n)
    if left:
        raise SystemExit("tensors not converted: " + ", ".join(sorted(left)[:10]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="the GGUF file to write")
    ap.add_argument("--outtype", choices=["f32", "bf16"], default="bf16")
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    ck = Checkpoint(args.model)
    kv = metadata(cfg, args.outtype)
    ts = tensors(cfg, ck, args.outtype)
    size = write_gguf(args.out, kv, ts)
    print(f"wrote {args.out}: {len(ts)} tensors, {len(kv.items)} keys, {size / 1e9:.2f} GB ({args.outtype})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
