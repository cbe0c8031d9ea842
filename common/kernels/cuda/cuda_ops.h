// The CUDA backend of the engine's kernels. Built only where CMake finds a CUDA toolkit; the CPU
// build never includes this header. Every op has the CPU op's semantics (common/kernels/cpu_ops.h,
// common/engine/routing.h, the absorbed MLA of common/engine/transformer.cc) and is checked
// against it by tests/kernels/cuda_ops_test.cc on a GPU machine (scripts/gpu-check.sh); without a
// GPU those checks are skipped and owed, never passed.
//
// Two layers:
//  - device ops: pointers in device memory, asynchronous on a stream, arguments checked on the
//    host (InvalidArgument), launch errors returned (Internal). Activations are fp32; weights
//    are BF16 (or FP8 E4M3 dequantised to BF16 on load); GEMMs run on cuBLAS with fp32
//    accumulation.
//  - host conveniences (RmsNorm below): copy in, run, copy out — for tests and small tools.
//
//   SPLITMOE_ASSIGN_OR_RETURN(int devices, kernels::cuda::DeviceCount());
//   SPLITMOE_RETURN_IF_ERROR(kernels::cuda::RmsNorm(x, rows, dim, weight, eps, out));  // host
#ifndef SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_
#define SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitmoe::kernels::cuda {

// A CUDA runtime or cuBLAS result as a Status: OK, or Internal naming `what` and the error.
absl::Status CudaError(cudaError_t err, const char* what);
absl::Status CublasError(cublasStatus_t s, const char* what);

// Number of visible CUDA devices; 0 (not an error) when the driver finds none.
absl::StatusOr<int> DeviceCount();
// "NVIDIA H200, sm_90, 139 GiB" for device `index`.
absl::StatusOr<std::string> DeviceName(int index);

// Host memory in and out: out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight.
absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
                     float* out);

// ---- device ops (all pointers in device memory) ----

// out[r, :] = RMSNorm(x[r, :]) * weight; rows x dim fp32. `out` may equal `x`.
absl::Status RmsNormDevice(const float* x, int64_t rows, int64_t dim, const float* weight,
                           float eps, float* out, cudaStream_t stream);

// Strided rows: out[r * out_stride + i] = RMSNorm(x[r * x_stride + i], i < dim) * weight[i].
absl::Status RmsNormStridedDevice(const float* x, int64_t rows, int64_t dim, int64_t x_stride,
                                  const float* weight, float eps, float* out, int64_t out_stride,
                                  cudaStream_t stream);

// out[r, :] = table[tokens[r], :] (fp32 embedding rows).
absl::Status EmbedDevice(const float* table, const int32_t* tokens, int64_t rows, int64_t hidden,
                         float* out, cudaStream_t stream);

// h[i] += delta[i], i < n.
absl::Status AddDevice(float* h, const float* delta, int64_t n, cudaStream_t stream);

// Each row of x [rows, n] in place: softmax (or the logistic sigmoid when `sigmoid`).
absl::Status ScoresDevice(float* x, int64_t rows, int64_t n, bool sigmoid, cudaStream_t stream);

// Writes rows [n, latent_dim] (fp32) of one sequence at positions start .. start + n - 1 into a
// paged cache layer [num_blocks, block_tokens, latent_dim] of fp32 (`bf16` false) or BF16,
// through the sequence's block table; block b starts `block_stride` values after block b - 1
// (block_tokens * latent_dim when the layer's blocks are packed).
absl::Status StoreLatentsDevice(const float* rows, int64_t n, int64_t latent_dim, int64_t start,
                                const int32_t* block_table, int64_t block_tokens,
                                int64_t block_stride, void* cache, bool bf16,
                                cudaStream_t stream);

// gate[i] = silu(gate[i]) * up[i] for i < n (the SwiGLU of every MLP).
absl::Status SiluMulDevice(float* gate, const float* up, int64_t n, cudaStream_t stream);

// Rotates, in place, values [offset, offset + rope_dim) of every one of `heads` vectors of each
// row (row r holds heads vectors of `head_stride` floats) by position positions[r], with
// DeepSeek's interleaved pairs and the (YaRN-corrected) frequencies inv_freq[rope_dim / 2].
absl::Status RopeDevice(float* x, int64_t rows, int64_t heads, int64_t head_stride,
                        int64_t offset, int64_t rope_dim, const int32_t* positions,
                        const float* inv_freq, cudaStream_t stream);

// fp32 -> bf16 (round to nearest even), n values.
absl::Status ToBf16Device(const float* in, int64_t n, __nv_bfloat16* out, cudaStream_t stream);

// FP8 E4M3 weight [rows, cols] with 128x128 block scales [ceil(rows/128), ceil(cols/128)]
// (weight_scale_inv: value = fp8 * scale) -> BF16 [rows, cols].
absl::Status DequantFp8Device(const uint8_t* fp8, const float* scales, int64_t rows, int64_t cols,
                              __nv_bfloat16* out, cudaStream_t stream);

// y[m, n] = x[m, k] @ w[n, k]^T, all fp32 (cuBLAS SGEMM in its default, non-TF32, math mode).
absl::Status GemmF32(cublasHandle_t handle, const float* x, int64_t m, int64_t k, const float* w,
                     int64_t n, float* y);

// y[m, n] (fp32) = x[m, k] (bf16) @ w[n, k]^T (bf16, row-major as stored in checkpoints), fp32
// accumulation on cuBLAS. `handle` must be bound to `stream` by the caller.
absl::Status GemmBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t m, int64_t k,
                      const __nv_bfloat16* w, int64_t n, float* y);

// Expert selection, DeepSeek semantics (engine::SelectExperts + GateWeights), one token per
// block: `scores` [tokens, n_experts] after softmax/sigmoid, `bias` [n_experts] (noaux_tc) or
// null; groups when n_group > 1 (group score: max, or the sum of the top two with a bias);
// ties to the lower index. experts/weights [tokens, top_k].
struct GateParams {
  int32_t n_experts = 0;
  int32_t top_k = 0;
  int32_t n_group = 1;
  int32_t topk_group = 1;
  bool use_groups = false;
  bool top2_group_score = false;  // noaux_tc
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
};
absl::Status SelectExpertsDevice(const float* scores, const float* bias, int64_t tokens,
                                 const GateParams& params, int32_t* experts, float* weights,
                                 cudaStream_t stream);

// Absorbed MLA decode attention over a paged latent cache in the FlashMLA layout: one layer's
// cache is [num_blocks, block_tokens, latent_dim] BF16, where each token's latent_dim values are
// kv_lora_rank values of c_kv (the values and the first part of the keys) followed by the rope
// key. For each sequence b and head h:
//   s_t = softmax_scale * q[b, h, :] . cache[token t, :]        t < seq_lens[b]
//   out[b, h, :] = sum_t softmax(s)_t * cache[token t, :kv_lora_rank]
// q [batch, heads, latent_dim] fp32 (q_nope already multiplied by W_UK, then q_pe);
// out [batch, heads, kv_lora_rank] fp32; block_table [batch, max_blocks] int32.
// Long contexts are split across blocks (flash-decoding) and combined; `workspace` must hold
// MlaWorkspaceFloats(...) floats.
struct MlaShape {
  int32_t batch = 0;
  int32_t heads = 0;
  int32_t latent_dim = 576;
  int32_t kv_lora_rank = 512;
  int32_t block_tokens = 64;
  int64_t block_stride = 0;  // values from one block to the next; 0: block_tokens * latent_dim
  int32_t max_blocks = 0;  // columns of block_table
  int32_t splits = 1;      // context splits per (sequence, head group); 1..64
};
int64_t MlaWorkspaceFloats(const MlaShape& shape);
absl::Status MlaDecodeDevice(const float* q, const __nv_bfloat16* cache,
                             const int32_t* block_table, const int32_t* seq_lens,
                             const MlaShape& shape, float softmax_scale, float* workspace,
                             float* out, cudaStream_t stream);
// The same over an fp32 cache (the GPU engine's fp32 reference mode).
absl::Status MlaDecodeDevice(const float* q, const float* cache, const int32_t* block_table,
                             const int32_t* seq_lens, const MlaShape& shape, float softmax_scale,
                             float* workspace, float* out, cudaStream_t stream);

// Routed experts of one MoE layer as a grouped GEMM: every expert runs once over the tokens it
// received. x [tokens, hidden] fp32; choice: experts/weights [tokens, top_k] (device);
// gate_up[e]: [2 * inter, hidden] (gate_proj rows, then up_proj rows); down[e]: [hidden, inter],
// both BF16 (or fp32 in MoeExpertsF32Device, whose activations then stay fp32), indexed by
// expert id (device pointers, null for experts this process does not hold: no slot may name
// them). out [tokens, hidden] = sum over each token's experts of weight * expert(x)
// (deterministic: each token's experts summed in ascending id order, as the CPU's
// AccumulateExperts, no atomics). A slot holding kNoExpert is empty: a token routed to fewer
// than top_k experts of this process pads its row with it. The slots are read back to the host
// (they decide the grouping) and checked as the CPU checks them: an id out of range or not held
// here, or named twice by one token, is refused before any GEMM.
inline constexpr int32_t kNoExpert = -1;
struct MoeShape {
  int32_t tokens = 0;
  int32_t hidden = 0;
  int32_t inter = 0;
  int32_t top_k = 0;
  int32_t n_experts = 0;
};
absl::Status MoeExpertsDevice(cublasHandle_t handle, const float* x, const int32_t* experts,
                              const float* weights, const std::vector<const __nv_bfloat16*>& gate_up,
                              const std::vector<const __nv_bfloat16*>& down, const MoeShape& shape,
                              float* out, cudaStream_t stream);
absl::Status MoeExpertsF32Device(cublasHandle_t handle, const float* x, const int32_t* experts,
                                 const float* weights, const std::vector<const float*>& gate_up,
                                 const std::vector<const float*>& down, const MoeShape& shape,
                                 float* out, cudaStream_t stream);

}  // namespace splitmoe::kernels::cuda

#endif  // SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_
