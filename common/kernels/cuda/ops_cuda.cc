#include "common/kernels/cuda/ops_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/ops.h"

namespace splitmoe::kernels {
namespace {

// The device's stream, with the device made current on the calling thread (ops run on whatever
// thread computes: an executor, the ping-pong's other pass); cheap when it already is.
cudaStream_t StreamOf(const Device& d) {
  (void)cudaSetDevice(d.index);
  return static_cast<cudaStream_t>(d.stream);
}

// The device's cuBLAS handle, bound to its stream: an op's kernels and GEMMs run in one order.
absl::StatusOr<cublasHandle_t> BlasOn(const Device& d) {
  (void)cudaSetDevice(d.index);
  auto blas = static_cast<cublasHandle_t>(d.blas);
  SPLITMOE_RETURN_IF_ERROR(cuda::CublasError(cublasSetStream(blas, StreamOf(d)), "cublasSetStream"));
  return blas;
}

// Frees a host vector once `stream` has passed this point (a copy out of it enqueued before has
// then read it): the copies below read pageable memory, which the runtime may read after
// cudaMemcpyAsync returns. On failure to enqueue, waits for the stream instead.
void FreeAfter(cudaStream_t stream, std::vector<int32_t>* host) {
  auto release = [](void* p) { delete static_cast<std::vector<int32_t>*>(p); };
  if (cudaLaunchHostFunc(stream, release, host) != cudaSuccess) {
    (void)cudaStreamSynchronize(stream);
    delete host;
  }
}

absl::Status SupportsLinear(const Device& device, const LinearParams& p) {
  const std::string where = absl::StrCat("Linear on ", DeviceName(device), ": ");
  if (p.w_device == nullptr) return absl::InvalidArgumentError(where + "no weight in device memory");
  if (p.w_device_dtype != model::WeightDType::kFloat32 &&
      p.w_device_dtype != model::WeightDType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, model::WeightDTypeName(p.w_device_dtype),
        " device weights: the GPU holds fp32 or BF16 (FP8 checkpoints are widened, then "
        "rounded to BF16, on upload)"));
  }
  if (device.blas == nullptr) return absl::InvalidArgumentError(where + "no cuBLAS handle");
  return absl::OkStatus();
}

absl::Status SupportsEmbed(const Device& device, const EmbedParams& p) {
  if (p.table_device == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("Embed on ", DeviceName(device), ": no fp32 table in device memory"));
  }
  return absl::OkStatus();
}

// Values from one block of the pool to the next (MlaAttentionParams::pool_block_stride).
int64_t BlockStride(const MlaAttentionParams& p, int64_t block_tokens) {
  return p.pool_block_stride != 0 ? p.pool_block_stride
                                  : block_tokens * (p.kv_lora_rank + p.rope_dim);
}

// Every block of every sequence in `pool`, at a whole block stride from its start: the FlashMLA
// layout (or a strided one), where the kernel names a block by its index.
absl::Status SupportsMla(const Device& device, const MlaAttentionParams& p) {
  const std::string where = absl::StrCat("MlaAttention on ", DeviceName(device), ": ");
  const int64_t lat = p.kv_lora_rank + p.rope_dim;
  if (lat > 768) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "latent_dim ", lat, " > 768, the most the kernel holds per lane"));
  }
  if (!p.sequences.empty() && p.pool_block_stride != 0 &&
      p.pool_block_stride < p.sequences[0].latents.block_tokens * lat) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "a block stride of ", p.pool_block_stride, " values is less than a block's ",
        p.sequences[0].latents.block_tokens * lat));
  }
  if (p.pool == nullptr || p.pool_blocks <= 0) {
    return absl::InvalidArgumentError(
        where + "needs the pool the blocks lie in (pool, pool_blocks: the FlashMLA layout)");
  }
  if ((p.device_block_table == nullptr) != (p.device_seq_lens == nullptr) ||
      (p.device_block_table != nullptr && p.device_table_width <= 0)) {
    return absl::InvalidArgumentError(
        where + "a device block table needs its seq_lens and a width > 0, or neither");
  }
  int64_t row = 0;
  for (size_t i = 0; i < p.sequences.size(); ++i) {
    const MlaSequence& s = p.sequences[i];
    const LatentBlocks& l = s.latents;
    const LatentBlocks& first = p.sequences[0].latents;
    if (l.dtype != first.dtype || l.block_tokens != first.block_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "sequence ", i, " differs from sequence 0 in block size or dtype (one pool)"));
    }
    if (s.first_row != row) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "sequence ", i, " starts at row ", s.first_row, ", not ", row,
          ": the sequences' rows must be 0 .. R-1 in order"));
    }
    row += s.rows;
    if (p.device_block_table != nullptr &&
        (s.start + s.rows + l.block_tokens - 1) / l.block_tokens > p.device_table_width) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "sequence ", i, " needs more blocks than the device table's width ",
          p.device_table_width));
    }
    const int64_t elem = l.dtype == LatentStorage::kBFloat16 ? 2 : 4;
    const int64_t block_bytes = BlockStride(p, l.block_tokens) * elem;
    for (int64_t b = 0; b * l.block_tokens < s.start + s.rows; ++b) {
      const std::ptrdiff_t off = static_cast<const char*>(l.blocks[static_cast<size_t>(b)]) -
                                 static_cast<const char*>(p.pool);
      if (off < 0 || off % block_bytes != 0 || off / block_bytes >= p.pool_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "sequence ", i, " block ", b, " is not a block of the pool"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status RmsNormCuda(const Device& device, const RmsNormParams& p) {
  const int64_t xs = p.x_stride == 0 ? p.dim : p.x_stride;
  const int64_t os = p.out_stride == 0 ? p.dim : p.out_stride;
  return cuda::RmsNormStridedDevice(p.x, p.rows, p.dim, xs, p.weight, p.eps, p.out, os,
                                    StreamOf(device));
}

absl::Status SwiGluCuda(const Device& device, const SwiGluParams& p) {
  return cuda::SiluMulDevice(p.gate, p.up, p.n, StreamOf(device));
}

absl::Status RopeCuda(const Device& device, const RopeParams& p) {
  return cuda::RopeDevice(p.x, p.rows, p.heads, p.head_stride, p.offset, p.rope_dim, p.positions,
                          p.inv_freq, StreamOf(device));
}

absl::Status LinearCuda(const Device& device, const LinearParams& p) {
  SPLITMOE_ASSIGN_OR_RETURN(cublasHandle_t blas, BlasOn(device));
  if (p.w_device_dtype == model::WeightDType::kFloat32) {
    return cuda::GemmF32(blas, p.x, p.m, p.w->cols, static_cast<const float*>(p.w_device),
                         p.w->rows, p.y);
  }
  // BF16: x rounded to BF16 in stream-ordered scratch, fp32 accumulation.
  __nv_bfloat16* xb = nullptr;
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(
      cudaMallocAsync(reinterpret_cast<void**>(&xb),
                      static_cast<size_t>(p.m * p.w->cols) * sizeof(__nv_bfloat16),
                      StreamOf(device)),
      "cudaMallocAsync"));
  absl::Status s = cuda::ToBf16Device(p.x, p.m * p.w->cols, xb, StreamOf(device));
  if (s.ok()) {
    s = cuda::GemmBf16(blas, xb, p.m, p.w->cols, static_cast<const __nv_bfloat16*>(p.w_device),
                       p.w->rows, p.y);
  }
  (void)cudaFreeAsync(xb, StreamOf(device));
  return s;
}

absl::Status EmbedCuda(const Device& device, const EmbedParams& p) {
  return cuda::EmbedDevice(p.table_device, p.tokens, p.rows, p.table->cols, p.out,
                           StreamOf(device));
}

absl::Status AddCuda(const Device& device, const AddParams& p) {
  return cuda::AddDevice(p.h, p.delta, p.n, StreamOf(device));
}

absl::Status ScoresCuda(const Device& device, const ScoresParams& p) {
  return cuda::ScoresDevice(p.x, p.rows, p.n, p.sigmoid, StreamOf(device));
}

absl::Status SelectExpertsCuda(const Device& device, const SelectExpertsParams& p) {
  const model::ModelConfig& c = *p.config;
  cuda::GateParams g;
  g.n_experts = static_cast<int32_t>(c.n_routed_experts);
  g.top_k = static_cast<int32_t>(c.num_experts_per_tok);
  g.n_group = static_cast<int32_t>(c.n_group);
  g.topk_group = static_cast<int32_t>(c.topk_group);
  g.use_groups = c.UsesGroups();
  g.top2_group_score = c.topk_method == model::TopkMethod::kNoauxTc;
  g.norm_topk_prob = c.norm_topk_prob;
  g.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return cuda::SelectExpertsDevice(p.scores, c.HasScoreBias() ? p.bias : nullptr, p.rows, g,
                                   p.experts, p.weights, StreamOf(device));
}

absl::Status SupportsMlaProject(const Device& device, const MlaProjectParams& p) {
  const std::string where = absl::StrCat("MlaProject on ", DeviceName(device), ": ");
  if (p.kv_b_device == nullptr) return absl::InvalidArgumentError(where + "no fp32 kv_b_proj in device memory");
  if (device.blas == nullptr) return absl::InvalidArgumentError(where + "no cuBLAS handle");
  return absl::OkStatus();
}

// Every head's product as one strided-batched SGEMM (head h's slice of kv_b_proj starts at
// h * (nope_dim + v_dim) rows); column-major views of the row-major buffers.
absl::Status MlaProjectCuda(const Device& device, const MlaProjectParams& p) {
  SPLITMOE_ASSIGN_OR_RETURN(cublasHandle_t blas, BlasOn(device));
  const int64_t heads = p.heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim;
  const int64_t kvr = p.kv_b->cols, qk = dn + dr, lat = kvr + dr;
  const float one = 1.0f, zero = 0.0f;
  if (p.kind == MlaProjectParams::Kind::kAbsorbQuery) {
    SPLITMOE_RETURN_IF_ERROR(cuda::CublasError(
        cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(kvr),
                                  static_cast<int>(p.rows), static_cast<int>(dn), &one,
                                  p.kv_b_device, static_cast<int>(kvr), (dn + dv) * kvr, p.x,
                                  static_cast<int>(heads * qk), qk, &zero, p.out,
                                  static_cast<int>(heads * lat), lat, static_cast<int>(heads)),
        "MlaProject: q_nope @ W_UK"));
    if (dr == 0) return absl::OkStatus();
    return cuda::CudaError(
        cudaMemcpy2DAsync(p.out + kvr, lat * sizeof(float), p.x + dn, qk * sizeof(float),
                          dr * sizeof(float), static_cast<size_t>(p.rows * heads),
                          cudaMemcpyDeviceToDevice, StreamOf(device)),
        "MlaProject: q_pe");
  }
  return cuda::CublasError(
      cublasSgemmStridedBatched(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(dv),
                                static_cast<int>(p.rows), static_cast<int>(kvr), &one,
                                p.kv_b_device + dn * kvr, static_cast<int>(kvr), (dn + dv) * kvr,
                                p.x, static_cast<int>(heads * kvr), kvr, &zero, p.out,
                                static_cast<int>(heads * dv), dv, static_cast<int>(heads)),
      "MlaProject: x @ W_UV^T");
}

absl::Status SupportsRoutedExperts(const Device& device, const RoutedExpertsParams& p) {
  const std::string where = absl::StrCat("RoutedExperts on ", DeviceName(device), ": ");
  if (p.gate_up_device.size() != p.down_device.size() || p.gate_up_device.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, p.gate_up_device.size(), " gate_up and ", p.down_device.size(),
        " down experts in device memory: need the same number, at least one"));
  }
  if (p.device_dtype != model::WeightDType::kFloat32 &&
      p.device_dtype != model::WeightDType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, model::WeightDTypeName(p.device_dtype), " experts: the GPU holds fp32 or BF16"));
  }
  if (device.blas == nullptr) return absl::InvalidArgumentError(where + "no cuBLAS handle");
  return absl::OkStatus();
}

absl::Status RoutedExpertsCuda(const Device& device, const RoutedExpertsParams& p) {
  const cuda::MoeShape shape{.tokens = static_cast<int32_t>(p.tokens),
                             .hidden = static_cast<int32_t>(p.hidden),
                             .inter = static_cast<int32_t>(p.inter),
                             .top_k = static_cast<int32_t>(p.top_k),
                             .n_experts = static_cast<int32_t>(p.gate_up_device.size())};
  if (p.top_k == 0) {  // no slots: nothing routed here (the grouped GEMM wants top_k > 0)
    return cuda::CudaError(cudaMemsetAsync(p.out, 0,
                                           static_cast<size_t>(p.tokens * p.hidden) * sizeof(float),
                                           StreamOf(device)),
                           "cudaMemsetAsync");
  }
  SPLITMOE_ASSIGN_OR_RETURN(cublasHandle_t blas, BlasOn(device));
  if (p.device_dtype == model::WeightDType::kBFloat16) {
    std::vector<const __nv_bfloat16*> gu, dn;
    for (const void* w : p.gate_up_device) gu.push_back(static_cast<const __nv_bfloat16*>(w));
    for (const void* w : p.down_device) dn.push_back(static_cast<const __nv_bfloat16*>(w));
    return cuda::MoeExpertsDevice(blas, p.x, p.experts, p.weights, gu, dn, shape, p.out,
                                  StreamOf(device));
  }
  std::vector<const float*> gu, dn;
  for (const void* w : p.gate_up_device) gu.push_back(static_cast<const float*>(w));
  for (const void* w : p.down_device) dn.push_back(static_cast<const float*>(w));
  return cuda::MoeExpertsF32Device(blas, p.x, p.experts, p.weights, gu, dn, shape, p.out,
                                   StreamOf(device));
}

// One kernel batch entry per query row: its sequence's block table (block indices in the pool)
// and the keys it sees (causal) — the caller's, when it keeps them on the device, else built
// here and copied with the workspace's allocation.
absl::Status MlaCuda(const Device& device, const MlaAttentionParams& p) {
  cudaStream_t stream = StreamOf(device);
  const LatentBlocks& first = p.sequences[0].latents;
  const int64_t lat = p.kv_lora_rank + p.rope_dim, bt = first.block_tokens;
  const bool bf16 = first.dtype == LatentStorage::kBFloat16;
  const int64_t block_bytes = BlockStride(p, bt) * (bf16 ? 2 : 4);
  int64_t rows = 0, max_blocks = 1, max_keys = 1;
  for (const MlaSequence& s : p.sequences) {
    rows += s.rows;
    max_blocks = std::max(max_blocks, (s.start + s.rows + bt - 1) / bt);
    max_keys = std::max(max_keys, s.start + s.rows);
  }
  const bool given = p.device_block_table != nullptr;
  const int64_t width = given ? p.device_table_width : max_blocks;
  cuda::MlaShape shape;
  shape.batch = static_cast<int32_t>(rows);
  shape.heads = static_cast<int32_t>(p.heads);
  shape.latent_dim = static_cast<int32_t>(lat);
  shape.kv_lora_rank = static_cast<int32_t>(p.kv_lora_rank);
  shape.block_tokens = static_cast<int32_t>(bt);
  shape.block_stride = BlockStride(p, bt);
  shape.max_blocks = static_cast<int32_t>(width);
  shape.splits = static_cast<int32_t>(std::clamp<int64_t>(max_keys / 512, 1, 64));
  const size_t ws_bytes = static_cast<size_t>(cuda::MlaWorkspaceFloats(shape)) * sizeof(float);
  const size_t int_bytes = given ? 0 : static_cast<size_t>(rows * (width + 1)) * sizeof(int32_t);
  char* scratch = nullptr;
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(
      cudaMallocAsync(reinterpret_cast<void**>(&scratch), ws_bytes + int_bytes, stream),
      "cudaMallocAsync"));
  auto* ws = reinterpret_cast<float*>(scratch);
  const int32_t* table = p.device_block_table;
  const int32_t* lens = p.device_seq_lens;
  absl::Status s;
  if (!given) {
    auto* ints = new std::vector<int32_t>(static_cast<size_t>(rows * (width + 1)), 0);
    int32_t* host_table = ints->data();
    int32_t* host_lens = ints->data() + rows * width;
    for (const MlaSequence& q : p.sequences) {
      const int64_t blocks = (q.start + q.rows + bt - 1) / bt;
      for (int64_t t = 0; t < q.rows; ++t) {
        const int64_t r = q.first_row + t;
        host_lens[r] = static_cast<int32_t>(q.start + t + 1);
        for (int64_t b = 0; b < blocks; ++b) {
          host_table[r * width + b] = static_cast<int32_t>(
              (static_cast<const char*>(q.latents.blocks[static_cast<size_t>(b)]) -
               static_cast<const char*>(p.pool)) / block_bytes);
        }
      }
    }
    auto* d_ints = reinterpret_cast<int32_t*>(scratch + ws_bytes);
    s = cuda::CudaError(
        cudaMemcpyAsync(d_ints, ints->data(), int_bytes, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
    FreeAfter(stream, ints);
    table = d_ints;
    lens = d_ints + rows * width;
  }
  if (s.ok() && bf16) {
    s = cuda::MlaDecodeDevice(p.q, static_cast<const __nv_bfloat16*>(p.pool), table, lens, shape,
                              p.softmax_scale, ws, p.out, stream);
  } else if (s.ok()) {
    s = cuda::MlaDecodeDevice(p.q, static_cast<const float*>(p.pool), table, lens, shape,
                              p.softmax_scale, ws, p.out, stream);
  }
  (void)cudaFreeAsync(scratch, stream);
  return s;
}

absl::Status StoreLatentsCuda(const Device& device, const StoreLatentsParams& p) {
  const int64_t stride =
      p.pool_block_stride != 0 ? p.pool_block_stride : p.block_tokens * p.latent_dim;
  return cuda::StoreLatentsDevice(p.rows, p.n, p.latent_dim, p.start, p.block_table,
                                  p.block_tokens, stride, p.pool,
                                  p.dtype == LatentStorage::kBFloat16, StreamOf(device));
}

absl::Status OpenCuda(Device* device, bool exact_fp32) {
  SPLITMOE_ASSIGN_OR_RETURN(const int count, cuda::DeviceCount());
  if (device->index >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        DeviceName(*device), " requested, ", count, " CUDA devices visible"));
  }
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(cudaSetDevice(device->index), "cudaSetDevice"));
  // Each step's activations come from the stream-ordered pool and go back to it: keep what it
  // holds rather than handing it to the driver at every synchronisation (the default threshold,
  // 0), which would map and unmap memory every step.
  cudaMemPool_t pool = nullptr;
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(cudaDeviceGetDefaultMemPool(&pool, device->index),
                                           "cudaDeviceGetDefaultMemPool"));
  uint64_t keep = UINT64_MAX;
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
      "cudaMemPoolSetAttribute"));
  cudaStream_t stream = nullptr;
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(cudaStreamCreate(&stream), "cudaStreamCreate"));
  cublasHandle_t blas = nullptr;
  absl::Status s = cuda::CublasError(cublasCreate(&blas), "cublasCreate");
  if (s.ok()) s = cuda::CublasError(cublasSetStream(blas, stream), "cublasSetStream");
  if (s.ok() && exact_fp32) {
    s = cuda::CublasError(cublasSetMathMode(blas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  }
  if (!s.ok()) {
    if (blas != nullptr) cublasDestroy(blas);
    cudaStreamDestroy(stream);
    return s;
  }
  device->stream = stream;
  device->blas = blas;
  return absl::OkStatus();
}

void CloseCuda(const Device& device) {
  (void)cudaSetDevice(device.index);
  (void)cudaStreamSynchronize(StreamOf(device));
  cublasDestroy(static_cast<cublasHandle_t>(device.blas));
  cudaStreamDestroy(StreamOf(device));
}

absl::StatusOr<void*> AllocateCuda(const Device& device, size_t bytes) {
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(cudaSetDevice(device.index), "cudaSetDevice"));
  void* p = nullptr;
  SPLITMOE_RETURN_IF_ERROR(
      cuda::CudaError(cudaMallocAsync(&p, bytes, StreamOf(device)), "cudaMallocAsync"));
  absl::Status s = cuda::CudaError(cudaMemsetAsync(p, 0, bytes, StreamOf(device)), "cudaMemsetAsync");
  if (!s.ok()) {
    (void)cudaFreeAsync(p, StreamOf(device));
    return s;
  }
  return p;
}

void FreeCuda(const Device& device, void* data) {
  (void)cudaSetDevice(device.index);
  (void)cudaFreeAsync(data, StreamOf(device));
}

absl::Status CopyToDeviceCuda(const Device& device, void* dst, const void* src, size_t bytes) {
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, StreamOf(device)),
      "cudaMemcpyAsync to the device"));
  // The source is pageable host memory the caller may free on return.
  return cuda::CudaError(cudaStreamSynchronize(StreamOf(device)), "cudaStreamSynchronize");
}

absl::Status CopyToHostCuda(const Device& device, void* dst, const void* src, size_t bytes) {
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, StreamOf(device)),
      "cudaMemcpyAsync to the host"));
  return cuda::CudaError(cudaStreamSynchronize(StreamOf(device)), "cudaStreamSynchronize");
}

absl::Status CopyToDeviceAsyncCuda(const Device& device, void* dst, const void* src,
                                   size_t bytes) {
  return cuda::CudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, StreamOf(device)),
      "cudaMemcpyAsync to the device");
}

absl::Status CopyToHostAsyncCuda(const Device& device, void* dst, const void* src,
                                 size_t bytes) {
  return cuda::CudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, StreamOf(device)),
      "cudaMemcpyAsync to the host");
}

absl::Status SynchronizeCuda(const Device& device) {
  return cuda::CudaError(cudaStreamSynchronize(StreamOf(device)), "cudaStreamSynchronize");
}

absl::Status PinHostCuda(const Device& device, void* data, size_t bytes) {
  SPLITMOE_RETURN_IF_ERROR(cuda::CudaError(cudaSetDevice(device.index), "cudaSetDevice"));
  const cudaError_t e = cudaHostRegister(data, bytes, cudaHostRegisterDefault);
  // A refusal is not sticky, but it stays the thread's last error, which the next kernel
  // launch's check would report as its own: clear it.
  if (e != cudaSuccess) (void)cudaGetLastError();
  return cuda::CudaError(e, "cudaHostRegister");
}

void UnpinHostCuda(const Device& device, void* data) {
  (void)cudaSetDevice(device.index);
  (void)cudaHostUnregister(data);
}

static_assert(cuda::kNoExpert == kNoExpertSlot, "one empty-slot marker");

const OpsBackend kCudaOps = {
    .supports_linear = SupportsLinear,
    .rms_norm = RmsNormCuda,
    .swiglu = SwiGluCuda,
    .rope = RopeCuda,
    .linear = LinearCuda,
    .supports_embed = SupportsEmbed,
    .embed = EmbedCuda,
    .add = AddCuda,
    .supports_mla = SupportsMla,
    .mla_attention = MlaCuda,
    .scores = ScoresCuda,
    .select_experts = SelectExpertsCuda,
    .supports_mla_project = SupportsMlaProject,
    .mla_project = MlaProjectCuda,
    .supports_routed_experts = SupportsRoutedExperts,
    .routed_experts = RoutedExpertsCuda,
    .store_latents = StoreLatentsCuda,
    .open = OpenCuda,
    .close = CloseCuda,
    .allocate = AllocateCuda,
    .free = FreeCuda,
    .copy_to_device = CopyToDeviceCuda,
    .copy_to_host = CopyToHostCuda,
    .copy_to_device_async = CopyToDeviceAsyncCuda,
    .copy_to_host_async = CopyToHostAsyncCuda,
    .synchronize = SynchronizeCuda,
    .pin_host = PinHostCuda,
    .unpin_host = UnpinHostCuda,
};

}  // namespace

void EnableCudaOps() { SetOpsBackend(Backend::kCuda, &kCudaOps); }

}  // namespace splitmoe::kernels
