// Batched MLA attention in the absorbed form over latents read in place: one call attends every
// query row of every sequence of a step (decode: one row per sequence) against that sequence's
// cached latents, wherever its cache keeps them (the engine's contiguous cache, the decode
// worker's paged blocks in fp32 or bf16). No context is copied: each block is read once per
// head group, bf16 rows widened block by block, with an online softmax (as FlashMLA and
// flash-decoding do) so scores never exist for the whole context at once.
//
// The op is a params struct and one validated entry returning a Status, as FlashMLA's
// mla_decode: `MlaAttention` checks the params (shapes, block coverage of the context,
// pointers) before touching memory. The CUDA backend implements the same params over the
// FlashMLA layout (kernels/cuda).
//
//   kernels::MlaAttentionParams p;
//   p.heads = 128; p.kv_lora_rank = 512; p.rope_dim = 64; p.softmax_scale = scale;
//   p.q = q_absorbed;            // [rows, heads, 576]: q_nope @ W_UK, then q_pe
//   p.out = o_latent;            // [rows, heads, 512]: softmax(q k^T) @ c_kv
//   p.sequences = sequences;     // each: its latents' blocks, its rows, its start position
//   SPLITMOE_RETURN_IF_ERROR(kernels::MlaAttention(p));
#ifndef SPLITMOE_COMMON_KERNELS_CPU_MLA_ATTENTION_H_
#define SPLITMOE_COMMON_KERNELS_CPU_MLA_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace splitmoe::kernels {

enum class LatentStorage { kFloat32, kBFloat16 };

// One sequence's latents of one layer, in place: rows [0, keys) of latent_dim values, row r at
// blocks[r / block_tokens] + (r % block_tokens) * latent_dim elements of `dtype`.
struct LatentBlocks {
  LatentStorage dtype = LatentStorage::kFloat32;
  int64_t block_tokens = 0;
  int64_t keys = 0;
  std::vector<const void*> blocks;
};

struct MlaSequence {
  LatentBlocks latents;
  int64_t first_row = 0;  // its first query row in q / out
  int64_t rows = 0;       // its query rows (tokens)
  int64_t start = 0;      // position of its first query token: token t sees keys [0, start + t]
};

struct MlaAttentionParams {
  int64_t heads = 0;
  int64_t kv_lora_rank = 0;
  int64_t rope_dim = 0;
  float softmax_scale = 1.0f;
  const float* q = nullptr;  // [total rows, heads, kv_lora_rank + rope_dim]
  float* out = nullptr;      // [total rows, heads, kv_lora_rank]
  absl::Span<const MlaSequence> sequences;
  // The pool every block lies in: one layer's cache [pool_blocks, block_tokens, latent_dim]
  // (FlashMLA's layout, where a block is named by its index in the pool). The CPU reads blocks
  // wherever they are and ignores it; a device backend (kernels/ops.h) needs it and derives
  // each sequence's block table from its block pointers.
  const void* pool = nullptr;
  int64_t pool_blocks = 0;
  // Values (of the blocks' dtype) from one block's start to the next's in the pool: 0 means
  // block_tokens * latent_dim, the FlashMLA layout. More when the pool interleaves other data
  // between one layer's blocks, as the decode worker's arena does (every layer of a block
  // together: decode/paged_latent_cache.h).
  int64_t pool_block_stride = 0;
  // Optional, for a device backend: each query row's block table [rows, device_table_width]
  // (indices into the pool) and key count [rows] in device memory (FlashMLA's block_table and
  // seq_lens), when the caller keeps them (one table serves every layer of a step). Null: the
  // backend derives them from the blocks and copies them per call. The CPU ignores them.
  const int32_t* device_block_table = nullptr;
  const int32_t* device_seq_lens = nullptr;
  int64_t device_table_width = 0;
};

// InvalidArgument naming the first bad field (and the sequence), else OK.
absl::Status CheckMlaAttention(const MlaAttentionParams& params);

// out = softmax(scale * q . k) @ c_kv per (row, head), causal within each sequence.
absl::Status MlaAttention(const MlaAttentionParams& params);

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_MLA_ATTENTION_H_
