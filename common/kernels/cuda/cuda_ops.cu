#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace splitmoe::kernels::cuda {

absl::Status CudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

absl::Status CublasError(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(s)));
}

namespace {

#define SPLITMOE_CUDA_RETURN_IF_ERROR(expr, what)                 \
  do {                                                            \
    const absl::Status splitmoe_cuda_s_ = CudaError((expr), what); \
    if (!splitmoe_cuda_s_.ok()) return splitmoe_cuda_s_;          \
  } while (0)

absl::Status Launched(const char* what) { return CudaError(cudaGetLastError(), what); }

unsigned Blocks(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 64));
}

// ---- element-wise ----

// One block per row; the sum of squares in double through shared memory and the scale as
// 1 / sqrt in double, as the CPU kernel computes them (fp32 mode must match it closely).
__global__ void RmsNormKernel(const float* x, int64_t dim, int64_t x_stride, const float* weight,
                              float eps, float* out, int64_t out_stride) {
  extern __shared__ double partial[];
  const float* xr = x + blockIdx.x * x_stride;
  float* o = out + blockIdx.x * out_stride;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(xr[i]) * xr[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float inv = static_cast<float>(1.0 / sqrt(partial[0] / static_cast<double>(dim) + eps));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * weight[i];
}

__global__ void SiluMulKernel(float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void EmbedKernel(const float* table, const int32_t* tokens, int64_t rows,
                            int64_t hidden, float* out) {
  const int64_t n = rows * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = table[static_cast<int64_t>(tokens[i / hidden]) * hidden + i % hidden];
  }
}

__global__ void AddKernel(float* h, const float* delta, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    h[i] += delta[i];
  }
}

// One block per row, the row on one thread: rows are gate scores (a few hundred experts).
__global__ void ScoresKernel(float* x, int64_t n, bool sigmoid) {
  if (threadIdx.x != 0) return;
  float* r = x + blockIdx.x * n;
  if (sigmoid) {
    for (int64_t i = 0; i < n; ++i) r[i] = 1.0f / (1.0f + expf(-r[i]));
    return;
  }
  // As kernels::SoftmaxInPlace: zeros when no finite maximum, the sum in double, one inverse.
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = r[i] > m ? r[i] : m;
  if (!isfinite(m)) {
    for (int64_t i = 0; i < n; ++i) r[i] = 0.0f;
    return;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += (r[i] = expf(r[i] - m));
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) r[i] *= inv;
}

__global__ void StoreLatentsKernel(const float* rows, int64_t n, int64_t latent_dim, int64_t start,
                                   const int32_t* block_table, int64_t block_tokens,
                                   int64_t block_stride, void* cache, bool bf16) {
  const int64_t total = n * latent_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pos = start + i / latent_dim, d = i % latent_dim;
    const int64_t at = static_cast<int64_t>(block_table[pos / block_tokens]) * block_stride +
                       (pos % block_tokens) * latent_dim + d;
    if (bf16) {
      static_cast<__nv_bfloat16*>(cache)[at] = __float2bfloat16_rn(rows[i]);
    } else {
      static_cast<float*>(cache)[at] = rows[i];
    }
  }
}

// One thread per (row, head, pair).
__global__ void RopeKernel(float* x, int64_t rows, int64_t heads, int64_t head_stride,
                           int64_t offset, int64_t pairs, const int32_t* positions,
                           const float* inv_freq) {
  const int64_t total = rows * heads * pairs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pair = i % pairs, head = (i / pairs) % heads, row = i / (pairs * heads);
    // fp32 angle as the CPU table (torch.outer in fp32); cos/sin in double like the CPU.
    const float angle = static_cast<float>(positions[row]) * inv_freq[pair];
    const float c = static_cast<float>(cos(static_cast<double>(angle)));
    const float s = static_cast<float>(sin(static_cast<double>(angle)));
    float* v = x + row * heads * head_stride + head * head_stride + offset + 2 * pair;
    const float a = v[0], b = v[1];
    v[0] = a * c - b * s;
    v[1] = a * s + b * c;
  }
}

__global__ void ToBf16Kernel(const float* in, int64_t n, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(in[i]);
  }
}

__global__ void DequantFp8Kernel(const uint8_t* fp8, const float* scales, int64_t rows,
                                 int64_t cols, int64_t scale_cols, __nv_bfloat16* out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    __nv_fp8_e4m3 v;
    v.__x = fp8[i];
    out[i] = __float2bfloat16_rn(static_cast<float>(v) * scales[(r / 128) * scale_cols + c / 128]);
  }
}

// ---- expert selection: one block per token, the selection itself on one thread ----

// Index of the largest value among n not yet taken (ties: the lower index); -1 if none.
__device__ int ArgMaxUntaken(const float* v, const bool* taken, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || v[i] > v[best]) best = i;
  }
  return best;
}

__global__ void SelectExpertsKernel(const float* scores, const float* bias, GateParams p,
                                    int32_t* experts, float* weights) {
  extern __shared__ unsigned char smem[];
  float* choice = reinterpret_cast<float*>(smem);
  bool* taken = reinterpret_cast<bool*>(choice + p.n_experts);
  const int64_t t = blockIdx.x;
  const float* s = scores + t * p.n_experts;
  for (int e = threadIdx.x; e < p.n_experts; e += blockDim.x) {
    choice[e] = s[e] + (bias != nullptr ? bias[e] : 0.0f);
    taken[e] = false;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (p.use_groups) {
    const int per_group = p.n_experts / p.n_group;
    float group_score[64];
    bool group_taken[64];
    for (int g = 0; g < p.n_group; ++g) {
      const float* m = choice + g * per_group;
      int first = 0;
      for (int i = 1; i < per_group; ++i) first = m[i] > m[first] ? i : first;
      float score = m[first];
      if (p.top2_group_score && per_group > 1) {
        int second = first == 0 ? 1 : 0;
        for (int i = 0; i < per_group; ++i) {
          if (i != first && m[i] > m[second]) second = i;
        }
        score += m[second];
      }
      group_score[g] = score;
      group_taken[g] = false;
    }
    bool keep[64];
    for (int g = 0; g < p.n_group; ++g) keep[g] = false;
    for (int k = 0; k < p.topk_group; ++k) {
      const int g = ArgMaxUntaken(group_score, group_taken, p.n_group);
      if (g < 0) break;
      group_taken[g] = keep[g] = true;
    }
    for (int e = 0; e < p.n_experts; ++e) {
      if (!keep[e / per_group]) choice[e] = -INFINITY;
    }
  }
  float sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    const int e = ArgMaxUntaken(choice, taken, p.n_experts);
    taken[e] = true;
    experts[t * p.top_k + k] = e;
    weights[t * p.top_k + k] = s[e];  // the unbiased score
    sum += s[e];
  }
  for (int k = 0; k < p.top_k; ++k) {
    float w = weights[t * p.top_k + k];
    if (p.norm_topk_prob && p.top_k > 1) w /= sum;
    weights[t * p.top_k + k] = w * p.routed_scaling_factor;
  }
}

// ---- MLA decode attention ----

constexpr int kMlaHeadsPerCta = 8;  // one warp per head
constexpr int kMlaTile = 32;        // tokens per shared-memory tile
constexpr int kMlaMaxPerLane = 24;  // latent_dim <= 768

// Grid (batch, head groups, splits). Each warp keeps its head's query in registers, streams the
// split's tokens through shared memory tile by tile, and keeps an online softmax (running max
// m, sum l, unnormalised output o). Writes (m, l, o) per (sequence, head, split).
__device__ inline float ToFloat(float v) { return v; }
__device__ inline float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void MlaDecodeKernel(const float* q, const T* cache, const int32_t* block_table,
                                const int32_t* seq_lens, MlaShape s, float scale, float* partial) {
  extern __shared__ __align__(16) unsigned char tile_bytes[];
  T* tile = reinterpret_cast<T*>(tile_bytes);  // [kMlaTile, latent_dim]
  const int b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y * kMlaHeadsPerCta + warp;
  const int split = blockIdx.z;
  const int len = seq_lens[b];
  const int per_split = ((len + s.splits - 1) / s.splits + kMlaTile - 1) / kMlaTile * kMlaTile;
  const int begin = split * per_split, end = min(len, begin + per_split);
  const bool active = head < s.heads;

  float qr[kMlaMaxPerLane];
  float o[kMlaMaxPerLane];
  const int per_lane = (s.latent_dim + 31) / 32;
  const int out_per_lane = (s.kv_lora_rank + 31) / 32;
#pragma unroll
  for (int j = 0; j < kMlaMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    qr[j] = (active && j < per_lane && d < s.latent_dim)
                ? q[(static_cast<int64_t>(b) * s.heads + head) * s.latent_dim + d]
                : 0.0f;
    o[j] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int t0 = begin; t0 < end; t0 += kMlaTile) {
    const int n = min(kMlaTile, end - t0);
    for (int i = threadIdx.x; i < n * s.latent_dim; i += blockDim.x) {
      const int tok = t0 + i / s.latent_dim, d = i % s.latent_dim;
      const int blk = block_table[static_cast<int64_t>(b) * s.max_blocks + tok / s.block_tokens];
      tile[i] = cache[static_cast<int64_t>(blk) * s.block_stride +
                      static_cast<int64_t>(tok % s.block_tokens) * s.latent_dim + d];
    }
    __syncthreads();
    if (active) {
      for (int t = 0; t < n; ++t) {
        const T* k = tile + t * s.latent_dim;
        float dot = 0.0f;
        // Compile-time trip counts keep qr[] and o[] in registers (a run-time index would move
        // them to local memory).
#pragma unroll
        for (int j = 0; j < kMlaMaxPerLane; ++j) {
          const int d = lane + 32 * j;
          if (j < per_lane && d < s.latent_dim) dot += qr[j] * ToFloat(k[d]);
        }
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float score = dot * scale;
        const float m_new = fmaxf(m, score);
        const float corr = expf(m - m_new);  // 0 on the first token (m = -inf)
        const float p = expf(score - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < kMlaMaxPerLane; ++j) {
          const int d = lane + 32 * j;
          const float v = (j < out_per_lane && d < s.kv_lora_rank) ? ToFloat(k[d]) : 0.0f;
          o[j] = o[j] * corr + p * v;
        }
        m = m_new;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  const int64_t stride = 2 + s.kv_lora_rank;
  float* w = partial + ((static_cast<int64_t>(b) * s.heads + head) * s.splits + split) * stride;
  if (lane == 0) {
    w[0] = m;
    w[1] = l;
  }
#pragma unroll
  for (int j = 0; j < kMlaMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    if (j < out_per_lane && d < s.kv_lora_rank) w[2 + d] = o[j];
  }
}

// Grid (batch, heads): merges the splits' online-softmax states.
__global__ void MlaCombineKernel(const float* partial, MlaShape s, float* out) {
  const int b = blockIdx.x, head = blockIdx.y;
  const int64_t stride = 2 + s.kv_lora_rank;
  const float* w = partial + (static_cast<int64_t>(b) * s.heads + head) * s.splits * stride;
  float big = -INFINITY;
  for (int k = 0; k < s.splits; ++k) big = fmaxf(big, w[k * stride]);
  float total = 0.0f;
  for (int k = 0; k < s.splits; ++k) {
    if (w[k * stride + 1] > 0.0f) total += w[k * stride + 1] * expf(w[k * stride] - big);
  }
  float* o = out + (static_cast<int64_t>(b) * s.heads + head) * s.kv_lora_rank;
  for (int d = threadIdx.x; d < s.kv_lora_rank; d += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < s.splits; ++k) {
      if (w[k * stride + 1] > 0.0f) acc += w[k * stride + 2 + d] * expf(w[k * stride] - big);
    }
    o[d] = total > 0.0f ? acc / total : 0.0f;
  }
}

// ---- MoE helpers ----

__device__ inline void Put(float v, float* out) { *out = v; }
__device__ inline void Put(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }

// rows[i] = x[index[i], :], converted to T.
template <typename T>
__global__ void GatherKernel(const float* x, const int32_t* index, int64_t n, int64_t hidden,
                             T* rows) {
  const int64_t total = n * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Put(x[index[i / hidden] * hidden + i % hidden], rows + i);
  }
}

// act[r, j] = silu(h[r, j]) * h[r, inter + j] for h [n, 2 * inter] fp32, converted to T.
template <typename T>
__global__ void SwiGluRowsKernel(const float* h, int64_t n, int64_t inter, T* act) {
  const int64_t total = n * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, j = i % inter;
    const float g = h[r * 2 * inter + j], u = h[r * 2 * inter + inter + j];
    Put(g / (1.0f + expf(-g)) * u, act + i);
  }
}

// slots[slot[i], :] = weight[i] * y[i, :] (each (token, k) slot written by exactly one row).
__global__ void ScatterSlotsKernel(const float* y, const int32_t* slot, const float* weight,
                                   int64_t n, int64_t hidden, float* slots) {
  const int64_t total = n * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / hidden, c = i % hidden;
    slots[static_cast<int64_t>(slot[r]) * hidden + c] = weight[r] * y[i];
  }
}

// out[t, :] = sum of slots[t * top_k + k, :] over k in ascending expert id (the order the CPU's
// LocalMoeExecutor adds experts in, so fp32 sums round the same way).
__global__ void ReduceSlotsKernel(const float* slots, const int32_t* experts, int64_t tokens,
                                  int64_t top_k, int64_t hidden, float* out) {
  const int64_t total = tokens * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / hidden, c = i % hidden;
    const int32_t* e = experts + t * top_k;
    float acc = 0.0f;
    int32_t last = -1;
    for (int64_t n = 0; n < top_k; ++n) {  // top_k is small: select the next larger id each time
      int64_t pick = -1;
      for (int64_t k = 0; k < top_k; ++k) {
        if (e[k] > last && (pick < 0 || e[k] < e[pick])) pick = k;
      }
      if (pick < 0) break;
      last = e[pick];
      acc += slots[(t * top_k + pick) * hidden + c];
    }
    out[i] = acc;
  }
}

}  // namespace

absl::StatusOr<int> DeviceCount() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) return 0;
  if (err != cudaSuccess) return CudaError(err, "cudaGetDeviceCount");
  return count;
}

absl::StatusOr<std::string> DeviceName(int index) {
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) return CudaError(err, "cudaGetDeviceProperties");
  return absl::StrCat(prop.name, ", sm_", prop.major, prop.minor, ", ", prop.totalGlobalMem >> 30,
                      " GiB");
}

absl::Status RmsNormDevice(const float* x, int64_t rows, int64_t dim, const float* weight,
                           float eps, float* out, cudaStream_t stream) {
  if (rows < 0 || dim <= 0)
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: bad shape [", rows, ", ", dim, "]"));
  if (rows == 0) return absl::OkStatus();
  constexpr int kThreads = 256;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, kThreads * sizeof(double), stream>>>(
      x, dim, dim, weight, eps, out, dim);
  return Launched("RmsNormKernel");
}

absl::Status RmsNormStridedDevice(const float* x, int64_t rows, int64_t dim, int64_t x_stride,
                                  const float* weight, float eps, float* out, int64_t out_stride,
                                  cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || x_stride < dim || out_stride < dim) {
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: bad shape [", rows, ", ", dim,
                                                   "] strides ", x_stride, "/", out_stride));
  }
  if (rows == 0) return absl::OkStatus();
  constexpr int kThreads = 256;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, kThreads * sizeof(double), stream>>>(
      x, dim, x_stride, weight, eps, out, out_stride);
  return Launched("RmsNormKernel");
}

absl::Status EmbedDevice(const float* table, const int32_t* tokens, int64_t rows, int64_t hidden,
                         float* out, cudaStream_t stream) {
  if (rows < 0 || hidden <= 0) return absl::InvalidArgumentError("Embed: bad shape");
  if (rows == 0) return absl::OkStatus();
  EmbedKernel<<<Blocks(rows * hidden, 256), 256, 0, stream>>>(table, tokens, rows, hidden, out);
  return Launched("EmbedKernel");
}

absl::Status AddDevice(float* h, const float* delta, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("Add: negative size");
  if (n == 0) return absl::OkStatus();
  AddKernel<<<Blocks(n, 256), 256, 0, stream>>>(h, delta, n);
  return Launched("AddKernel");
}

absl::Status ScoresDevice(float* x, int64_t rows, int64_t n, bool sigmoid, cudaStream_t stream) {
  if (rows < 0 || n <= 0) return absl::InvalidArgumentError("Scores: bad shape");
  if (rows == 0) return absl::OkStatus();
  ScoresKernel<<<static_cast<unsigned>(rows), 32, 0, stream>>>(x, n, sigmoid);
  return Launched("ScoresKernel");
}

absl::Status StoreLatentsDevice(const float* rows, int64_t n, int64_t latent_dim, int64_t start,
                                const int32_t* block_table, int64_t block_tokens,
                                int64_t block_stride, void* cache, bool bf16,
                                cudaStream_t stream) {
  if (n < 0 || latent_dim <= 0 || start < 0 || block_tokens <= 0 ||
      block_stride < block_tokens * latent_dim) {
    return absl::InvalidArgumentError("StoreLatents: bad shape");
  }
  if (n == 0) return absl::OkStatus();
  StoreLatentsKernel<<<Blocks(n * latent_dim, 256), 256, 0, stream>>>(
      rows, n, latent_dim, start, block_table, block_tokens, block_stride, cache, bf16);
  return Launched("StoreLatentsKernel");
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
                     float* out) {
  if (rows < 0 || dim <= 0)
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: bad shape [", rows, ", ", dim, "]"));
  if (rows == 0) return absl::OkStatus();
  const size_t bytes = static_cast<size_t>(rows * dim) * sizeof(float);
  float *dx = nullptr, *dw = nullptr, *dout = nullptr;
  absl::Status status = CudaError(cudaMalloc(&dx, bytes), "cudaMalloc");
  if (status.ok()) status = CudaError(cudaMalloc(&dw, dim * sizeof(float)), "cudaMalloc");
  if (status.ok()) status = CudaError(cudaMalloc(&dout, bytes), "cudaMalloc");
  if (status.ok())
    status = CudaError(cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  if (status.ok())
    status = CudaError(cudaMemcpy(dw, weight, dim * sizeof(float), cudaMemcpyHostToDevice),
                       "cudaMemcpy");
  if (status.ok()) status = RmsNormDevice(dx, rows, dim, dw, eps, dout, nullptr);
  if (status.ok())
    status = CudaError(cudaMemcpy(out, dout, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(dx);
  cudaFree(dw);
  cudaFree(dout);
  return status;
}

absl::Status SiluMulDevice(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("SiluMul: negative size");
  if (n == 0) return absl::OkStatus();
  SiluMulKernel<<<Blocks(n, 256), 256, 0, stream>>>(gate, up, n);
  return Launched("SiluMulKernel");
}

absl::Status RopeDevice(float* x, int64_t rows, int64_t heads, int64_t head_stride,
                        int64_t offset, int64_t rope_dim, const int32_t* positions,
                        const float* inv_freq, cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || rope_dim <= 0 || rope_dim % 2 != 0 || offset < 0 ||
      offset + rope_dim > head_stride) {
    return absl::InvalidArgumentError(absl::StrCat("Rope: bad shape rows ", rows, " heads ", heads,
                                                   " stride ", head_stride, " offset ", offset,
                                                   " dim ", rope_dim));
  }
  const int64_t total = rows * heads * (rope_dim / 2);
  if (total == 0) return absl::OkStatus();
  RopeKernel<<<Blocks(total, 256), 256, 0, stream>>>(x, rows, heads, head_stride, offset,
                                                      rope_dim / 2, positions, inv_freq);
  return Launched("RopeKernel");
}

absl::Status ToBf16Device(const float* in, int64_t n, __nv_bfloat16* out, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("ToBf16: negative size");
  if (n == 0) return absl::OkStatus();
  ToBf16Kernel<<<Blocks(n, 256), 256, 0, stream>>>(in, n, out);
  return Launched("ToBf16Kernel");
}

absl::Status DequantFp8Device(const uint8_t* fp8, const float* scales, int64_t rows, int64_t cols,
                              __nv_bfloat16* out, cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return absl::InvalidArgumentError("DequantFp8: bad shape");
  if (rows == 0) return absl::OkStatus();
  DequantFp8Kernel<<<Blocks(rows * cols, 256), 256, 0, stream>>>(fp8, scales, rows, cols,
                                                                 (cols + 127) / 128, out);
  return Launched("DequantFp8Kernel");
}

absl::Status GemmF32(cublasHandle_t handle, const float* x, int64_t m, int64_t k, const float* w,
                     int64_t n, float* y) {
  if (m < 0 || k <= 0 || n <= 0 || m > INT32_MAX || k > INT32_MAX || n > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("GemmF32: bad shape ", m, "x", k, "x", n));
  }
  if (m == 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  return CublasError(cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                 static_cast<int>(m), static_cast<int>(k), &alpha, w,
                                 static_cast<int>(k), x, static_cast<int>(k), &beta, y,
                                 static_cast<int>(n)),
                     "cublasSgemm");
}

absl::Status GemmBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t m, int64_t k,
                      const __nv_bfloat16* w, int64_t n, float* y) {
  if (m < 0 || k <= 0 || n <= 0 || m > INT32_MAX || k > INT32_MAX || n > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("GemmBf16: bad shape ", m, "x", k, "x", n));
  }
  if (m == 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major Y[m, n] = X[m, k] W[n, k]^T is column-major Y^T[n, m] = W^T... : op(A) = W^T
  // where W is a k x n column-major matrix (lda k), B = X as k x m column-major (ldb k).
  return CublasError(
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                   static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x,
                   CUDA_R_16BF, static_cast<int>(k), &beta, y, CUDA_R_32F, static_cast<int>(n),
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

absl::Status SelectExpertsDevice(const float* scores, const float* bias, int64_t tokens,
                                 const GateParams& p, int32_t* experts, float* weights,
                                 cudaStream_t stream) {
  if (p.n_experts <= 0 || p.top_k <= 0 || p.top_k > p.n_experts || p.n_group <= 0 ||
      p.n_group > 64 || p.n_experts % p.n_group != 0 || p.topk_group <= 0 ||
      p.topk_group > p.n_group || tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("SelectExperts: bad parameters (", p.n_experts,
                                                   " experts, top ", p.top_k, ", ", p.n_group,
                                                   " groups keep ", p.topk_group, ")"));
  }
  if (tokens == 0) return absl::OkStatus();
  const size_t smem = p.n_experts * (sizeof(float) + sizeof(bool));
  SelectExpertsKernel<<<static_cast<unsigned>(tokens), 128, smem, stream>>>(scores, bias, p,
                                                                            experts, weights);
  return Launched("SelectExpertsKernel");
}

int64_t MlaWorkspaceFloats(const MlaShape& s) {
  return static_cast<int64_t>(s.batch) * s.heads * s.splits * (2 + s.kv_lora_rank);
}

namespace {
template <typename T>
absl::Status MlaDecodeImpl(const float* q, const T* cache, const int32_t* block_table,
                           const int32_t* seq_lens, const MlaShape& s, float softmax_scale,
                           float* workspace, float* out, cudaStream_t stream) {
  if (s.batch < 0 || s.heads <= 0 || s.latent_dim <= 0 || s.latent_dim > 32 * kMlaMaxPerLane ||
      s.kv_lora_rank <= 0 || s.kv_lora_rank > s.latent_dim || s.block_tokens <= 0 ||
      s.max_blocks <= 0 || s.splits < 1 || s.splits > 64 ||
      (s.block_stride != 0 && s.block_stride < int64_t{s.block_tokens} * s.latent_dim)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MlaDecode: bad shape (batch ", s.batch, ", heads ", s.heads, ", latent ", s.latent_dim,
        ", rank ", s.kv_lora_rank, ", block ", s.block_tokens, ", splits ", s.splits, ")"));
  }
  if (s.batch == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(kMlaTile) * s.latent_dim * sizeof(T);
  if (smem > 48 * 1024) {
    // fp32 tiles of 576 values need 72 KB: raise this kernel's dynamic shared-memory limit.
    absl::Status raised = CudaError(
        cudaFuncSetAttribute(MlaDecodeKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute");
    if (!raised.ok()) return raised;
  }
  const dim3 grid(static_cast<unsigned>(s.batch),
                  static_cast<unsigned>((s.heads + kMlaHeadsPerCta - 1) / kMlaHeadsPerCta),
                  static_cast<unsigned>(s.splits));
  MlaShape packed = s;  // the kernel reads the stride: 0 names the packed one
  if (packed.block_stride == 0) packed.block_stride = int64_t{s.block_tokens} * s.latent_dim;
  MlaDecodeKernel<T><<<grid, 32 * kMlaHeadsPerCta, smem, stream>>>(
      q, cache, block_table, seq_lens, packed, softmax_scale, workspace);
  absl::Status launched = Launched("MlaDecodeKernel");
  if (!launched.ok()) return launched;
  MlaCombineKernel<<<dim3(static_cast<unsigned>(s.batch), static_cast<unsigned>(s.heads)), 128, 0,
                     stream>>>(workspace, s, out);
  return Launched("MlaCombineKernel");
}
}  // namespace

absl::Status MlaDecodeDevice(const float* q, const __nv_bfloat16* cache,
                             const int32_t* block_table, const int32_t* seq_lens,
                             const MlaShape& s, float softmax_scale, float* workspace, float* out,
                             cudaStream_t stream) {
  return MlaDecodeImpl(q, cache, block_table, seq_lens, s, softmax_scale, workspace, out, stream);
}

absl::Status MlaDecodeDevice(const float* q, const float* cache, const int32_t* block_table,
                             const int32_t* seq_lens, const MlaShape& s, float softmax_scale,
                             float* workspace, float* out, cudaStream_t stream) {
  return MlaDecodeImpl(q, cache, block_table, seq_lens, s, softmax_scale, workspace, out, stream);
}

namespace {
absl::Status Gemm(cublasHandle_t h, const __nv_bfloat16* x, int64_t m, int64_t k,
                  const __nv_bfloat16* w, int64_t n, float* y) {
  return GemmBf16(h, x, m, k, w, n, y);
}
absl::Status Gemm(cublasHandle_t h, const float* x, int64_t m, int64_t k, const float* w,
                  int64_t n, float* y) {
  return GemmF32(h, x, m, k, w, n, y);
}

// W: the weights' and the GEMM inputs' type (bf16, or fp32 for the reference mode).
template <typename W>
absl::Status MoeExpertsImpl(cublasHandle_t handle, const float* x, const int32_t* experts,
                            const float* weights, const std::vector<const W*>& gate_up,
                            const std::vector<const W*>& down, const MoeShape& s, float* out,
                            cudaStream_t stream) {
  if (s.tokens < 0 || s.hidden <= 0 || s.inter <= 0 || s.top_k <= 0 || s.n_experts <= 0 ||
      static_cast<int32_t>(gate_up.size()) != s.n_experts ||
      static_cast<int32_t>(down.size()) != s.n_experts) {
    return absl::InvalidArgumentError("MoeExperts: bad shape or expert tables");
  }
  if (s.tokens == 0) return absl::OkStatus();
  // Every GEMM below must run on `stream`, with the kernels and the stream-ordered frees.
  absl::Status bound = CublasError(cublasSetStream(handle, stream), "cublasSetStream");
  if (!bound.ok()) return bound;
  const int64_t slots = static_cast<int64_t>(s.tokens) * s.top_k;
  // The selection decides the grouping: read it back (small) and group on the host.
  std::vector<int32_t> ids(static_cast<size_t>(slots));
  std::vector<float> w(static_cast<size_t>(slots));
  SPLITMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(ids.data(), experts, slots * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  SPLITMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(w.data(), weights, slots * sizeof(float), cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  SPLITMOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  std::vector<std::vector<int32_t>> by_expert(static_cast<size_t>(s.n_experts));
  for (int64_t i = 0; i < slots; ++i) {
    const int32_t e = ids[static_cast<size_t>(i)];
    if (e == kNoExpert) continue;  // an empty slot: contributes nothing (ReduceSlots skips it)
    const int64_t t = i / s.top_k;
    // The CPU's checks (kernels::RoutedExperts): every id held, none twice in a token (the
    // slot reduction would count a repeated expert once).
    if (e < 0 || e >= s.n_experts || gate_up[e] == nullptr || down[e] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("MoeExperts: token ", t, ": expert ", e,
                                                     " is not held (", s.n_experts,
                                                     " experts by id)"));
    }
    for (int64_t j = t * s.top_k; j < i; ++j) {
      if (ids[static_cast<size_t>(j)] == e) {
        return absl::InvalidArgumentError(
            absl::StrCat("MoeExperts: token ", t, " names expert ", e, " twice"));
      }
    }
    by_expert[static_cast<size_t>(e)].push_back(static_cast<int32_t>(i));
  }
  int64_t max_rows = 0;
  for (const auto& rows : by_expert) max_rows = std::max<int64_t>(max_rows, rows.size());

  // Scratch: slot outputs (zeroed: empty slots contribute nothing), per-expert rows.
  float *slot_out = nullptr, *h = nullptr, *y = nullptr, *row_w = nullptr;
  W *xe = nullptr, *act = nullptr;
  int32_t *token_index = nullptr, *slot_index = nullptr;
  auto alloc = [&](void** p, size_t bytes) {
    return CudaError(cudaMallocAsync(p, std::max<size_t>(bytes, 16), stream), "cudaMallocAsync");
  };
  absl::Status st = alloc(reinterpret_cast<void**>(&slot_out), slots * s.hidden * sizeof(float));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&h), max_rows * 2 * s.inter * sizeof(float));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&y), max_rows * s.hidden * sizeof(float));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&row_w), max_rows * sizeof(float));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&xe), max_rows * s.hidden * sizeof(W));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&act), max_rows * s.inter * sizeof(W));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&token_index), max_rows * sizeof(int32_t));
  if (st.ok()) st = alloc(reinterpret_cast<void**>(&slot_index), max_rows * sizeof(int32_t));
  if (st.ok()) {
    st = CudaError(cudaMemsetAsync(slot_out, 0, slots * s.hidden * sizeof(float), stream),
                   "cudaMemsetAsync");
  }
  std::vector<int32_t> tok, slot;
  std::vector<float> wt;
  for (int32_t e = 0; st.ok() && e < s.n_experts; ++e) {
    const auto& rows = by_expert[static_cast<size_t>(e)];
    if (rows.empty()) continue;  // every named expert is held: checked above
    const int64_t n = static_cast<int64_t>(rows.size());
    tok.assign(rows.size(), 0);
    slot.assign(rows.begin(), rows.end());
    wt.assign(rows.size(), 0.0f);
    for (size_t i = 0; i < rows.size(); ++i) {
      tok[i] = rows[i] / s.top_k;
      wt[i] = w[static_cast<size_t>(rows[i])];
    }
    // Host vectors are reused for the next expert: copy synchronously w.r.t. this stream.
    st = CudaError(cudaMemcpyAsync(token_index, tok.data(), n * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream),
                   "cudaMemcpyAsync");
    if (st.ok())
      st = CudaError(cudaMemcpyAsync(slot_index, slot.data(), n * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, stream),
                     "cudaMemcpyAsync");
    if (st.ok())
      st = CudaError(
          cudaMemcpyAsync(row_w, wt.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
    if (st.ok()) {
      GatherKernel<W><<<Blocks(n * s.hidden, 256), 256, 0, stream>>>(x, token_index, n, s.hidden,
                                                                       xe);
      st = Launched("GatherKernel");
    }
    if (st.ok()) st = Gemm(handle, xe, n, s.hidden, gate_up[e], 2 * s.inter, h);
    if (st.ok()) {
      SwiGluRowsKernel<W><<<Blocks(n * s.inter, 256), 256, 0, stream>>>(h, n, s.inter, act);
      st = Launched("SwiGluRowsKernel");
    }
    if (st.ok()) st = Gemm(handle, act, n, s.inter, down[e], s.hidden, y);
    if (st.ok()) {
      ScatterSlotsKernel<<<Blocks(n * s.hidden, 256), 256, 0, stream>>>(y, slot_index, row_w, n,
                                                                         s.hidden, slot_out);
      st = Launched("ScatterSlotsKernel");
    }
    if (st.ok()) st = CudaError(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  if (st.ok()) {
    ReduceSlotsKernel<<<Blocks(static_cast<int64_t>(s.tokens) * s.hidden, 256), 256, 0, stream>>>(
        slot_out, experts, s.tokens, s.top_k, s.hidden, out);
    st = Launched("ReduceSlotsKernel");
  }
  for (void* p : {static_cast<void*>(slot_out), static_cast<void*>(h), static_cast<void*>(y),
                  static_cast<void*>(row_w), static_cast<void*>(xe), static_cast<void*>(act),
                  static_cast<void*>(token_index), static_cast<void*>(slot_index)}) {
    if (p != nullptr) cudaFreeAsync(p, stream);
  }
  return st;
}
}  // namespace

absl::Status MoeExpertsDevice(cublasHandle_t handle, const float* x, const int32_t* experts,
                              const float* weights,
                              const std::vector<const __nv_bfloat16*>& gate_up,
                              const std::vector<const __nv_bfloat16*>& down, const MoeShape& s,
                              float* out, cudaStream_t stream) {
  return MoeExpertsImpl(handle, x, experts, weights, gate_up, down, s, out, stream);
}

absl::Status MoeExpertsF32Device(cublasHandle_t handle, const float* x, const int32_t* experts,
                                 const float* weights, const std::vector<const float*>& gate_up,
                                 const std::vector<const float*>& down, const MoeShape& s,
                                 float* out, cudaStream_t stream) {
  return MoeExpertsImpl(handle, x, experts, weights, gate_up, down, s, out, stream);
}

}  // namespace splitmoe::kernels::cuda
