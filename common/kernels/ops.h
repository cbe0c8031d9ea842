// The engine's ops behind one interface for every backend, in the spirit of FlashMLA's params
// struct and single entry: per op a params struct, a capability check saying whether a backend
// runs those params (dtypes, shapes, where the pointers live), and one validated entry returning
// a Status. The CPU implementations are common/kernels/cpu_ops.h and common/kernels/cpu/; the
// CUDA ones common/kernels/cuda/cuda_ops.h, behind this interface in `splitmoe::ops_cuda`
// (cuda/ops_cuda.h), which a binary links and enables (EnableCudaOps()) only when it runs on a
// GPU, so CPU binaries never load the CUDA libraries. Without it a CUDA device is refused
// (Unimplemented), never silently run on the CPU.
//
//   kernels::Device cpu;                                   // or {Backend::kCuda, 0, stream, blas}
//   kernels::RmsNormParams p{.x = h, .rows = n, .dim = d, .weight = w, .eps = 1e-6f, .out = o};
//   SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(cpu, p));    // checks, then runs
//
// Pointers are in the memory of the params' device: host memory for Backend::kCpu, device
// memory for Backend::kCuda (then the op is asynchronous on `stream`). Each op's semantics are
// the CPU implementation's; tests/kernels/ops_test.cc runs every op on both backends against
// each other where a GPU is present (skipped, never passed, where not).
#ifndef SPLITMOE_COMMON_KERNELS_OPS_H_
#define SPLITMOE_COMMON_KERNELS_OPS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/kernels/cpu/mla_attention.h"
#include "absl/types/span.h"
#include "common/model/config.h"
#include "common/model/tensor.h"
#include "common/model/weights.h"

namespace splitmoe::kernels {

enum class Backend { kCpu, kCuda };

// Where an op runs. For kCuda: the device index, and the stream (cudaStream_t) and cuBLAS
// handle (cublasHandle_t, bound to that stream) the op is enqueued on, as void* so this header
// needs no CUDA.
struct Device {
  Backend backend = Backend::kCpu;
  int index = 0;
  void* stream = nullptr;
  void* blas = nullptr;
};

// "cpu" or "cuda:N".
std::string DeviceName(const Device& device);
// The inverse of DeviceName (the `--device` flag): "cpu", or "cuda:N" with N a device index
// >= 0 (no stream or handle yet: the caller creates them on that device). Anything else:
// InvalidArgument naming what was given.
absl::StatusOr<Device> ParseDevice(absl::string_view name);
// Whether this process has the backend: the CPU always, CUDA once EnableCudaOps() ran.
bool BackendAvailable(Backend backend);

// out[r * out_stride + i] = x[r * x_stride + i] * rsqrt(mean_i(x[r, i]^2) + eps) * weight[i],
// i < dim, r < rows. out may alias x (same stride).
struct RmsNormParams {
  const float* x = nullptr;
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t x_stride = 0;  // 0: dim
  const float* weight = nullptr;
  float eps = 1e-6f;
  float* out = nullptr;
  int64_t out_stride = 0;  // 0: dim
};
absl::Status Supports(const Device& device, const RmsNormParams& p);
absl::Status RmsNorm(const Device& device, const RmsNormParams& p);

// SwiGLU: gate[i] = silu(gate[i]) * up[i], i < n.
struct SwiGluParams {
  float* gate = nullptr;
  const float* up = nullptr;
  int64_t n = 0;
};
absl::Status Supports(const Device& device, const SwiGluParams& p);
absl::Status SwiGlu(const Device& device, const SwiGluParams& p);

// DeepSeek's interleaved RoPE, in place: for each row r and head h, the pairs
// (v[2i], v[2i + 1]) of v = x + r * heads * head_stride + h * head_stride + offset, i < rope_dim
// / 2, rotate by angle = float(positions[r]) * inv_freq[i] (fp32, as the reference's
// torch.outer), cos and sin taken in double and rounded to fp32. Positions must be >= 0: the CPU
// refuses a negative one before rotating anything; a device cannot read them to check, so its
// callers pass positions they computed.
struct RopeParams {
  float* x = nullptr;
  int64_t rows = 0;
  int64_t heads = 1;
  int64_t head_stride = 0;
  int64_t offset = 0;
  int64_t rope_dim = 0;
  const int32_t* positions = nullptr;  // [rows]
  const float* inv_freq = nullptr;     // [rope_dim / 2]
};
absl::Status Supports(const Device& device, const RopeParams& p);
absl::Status Rope(const Device& device, const RopeParams& p);

// y[m, w.rows] = x[m, w.cols] @ w^T, y overwritten. On the CPU `w` holds the values (fp32,
// packed, BF16 or FP8 in place), activations and accumulation fp32. On CUDA `w` gives the shape
// and `w_device` the values in device memory as `w_device_dtype`: fp32 runs cuBLAS SGEMM (the
// reference mode); BF16 rounds x to BF16 for the GEMM's input and accumulates in fp32 (the
// GPU's bf16 mode, whose drift is measured against fp32, never the reference).
struct LinearParams {
  const float* x = nullptr;
  int64_t m = 0;
  const model::Matrix* w = nullptr;
  const void* w_device = nullptr;
  model::WeightDType w_device_dtype = model::WeightDType::kFloat32;
  float* y = nullptr;
};
absl::Status Supports(const Device& device, const LinearParams& p);
absl::Status Linear(const Device& device, const LinearParams& p);

// out[r, :] = table[tokens[r], :] as fp32, r < rows. On the CPU `table` holds the rows (any
// dtype, widened) and a token outside [0, table->rows) is refused before any row is written.
// On CUDA `table` gives the shape and `table_device` the fp32 rows in device memory; tokens are
// device memory there, which the host cannot read to check (as Rope's positions): callers pass
// tokens they checked.
struct EmbedParams {
  const int32_t* tokens = nullptr;
  int64_t rows = 0;
  const model::Matrix* table = nullptr;
  const float* table_device = nullptr;
  float* out = nullptr;
};
absl::Status Supports(const Device& device, const EmbedParams& p);
absl::Status Embed(const Device& device, const EmbedParams& p);

// h[i] += delta[i], i < n (the residual adds).
struct AddParams {
  float* h = nullptr;
  const float* delta = nullptr;
  int64_t n = 0;
};
absl::Status Supports(const Device& device, const AddParams& p);
absl::Status Add(const Device& device, const AddParams& p);

// Batched MLA attention in the absorbed form over the latents in place, every query row of
// every sequence at once: kernels/cpu/mla_attention.h's params and semantics (causal within
// each sequence). On the CPU the blocks are read wherever they lie. On CUDA q, out and every
// block are device memory and every block lies in `pool` (one layer's paged cache
// [pool_blocks, block_tokens, latent_dim], the FlashMLA layout, fp32 or BF16), the sequences'
// rows are 0 .. R-1 in order, and latent_dim = kv_lora_rank + rope_dim is at most 768.
absl::Status Supports(const Device& device, const MlaAttentionParams& p);
absl::Status MlaAttention(const Device& device, const MlaAttentionParams& p);

// The absorbed MLA's two per-head products with kv_b_proj [heads * (nope_dim + v_dim),
// kv_lora_rank], whose rows are per head W_UK (nope_dim rows) then W_UV (v_dim rows):
//   kAbsorbQuery: out [rows, heads, kv_lora_rank + rope_dim] = [q_nope[h] @ W_UK[h], q_pe[h]]
//                 from x = q [rows, heads, nope_dim + rope_dim] (the query MlaAttention takes);
//   kApplyValue:  out [rows, heads, v_dim] = x[h] @ W_UV[h]^T from x = MlaAttention's output
//                 [rows, heads, kv_lora_rank].
// On the CPU `kv_b` holds the values (fp32 read in place; BF16/FP8 streamed at decode sizes,
// else each head's rows widened once on the thread that runs that head). On CUDA `kv_b` gives
// the shape and `kv_b_device` the fp32 values in device memory (strided-batched SGEMM).
struct MlaProjectParams {
  enum class Kind { kAbsorbQuery, kApplyValue };
  Kind kind = Kind::kAbsorbQuery;
  const float* x = nullptr;
  int64_t rows = 0;
  int64_t heads = 0;
  int64_t nope_dim = 0;
  int64_t rope_dim = 0;
  int64_t v_dim = 0;
  const model::Matrix* kv_b = nullptr;
  const float* kv_b_device = nullptr;
  float* out = nullptr;
};
absl::Status Supports(const Device& device, const MlaProjectParams& p);
absl::Status MlaProject(const Device& device, const MlaProjectParams& p);

// Each row of x [rows, n] in place: softmax (entries of -inf get 0), or the logistic sigmoid
// when `sigmoid` — a MoE gate's scores under DeepSeek's scoring_func.
struct ScoresParams {
  float* x = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  bool sigmoid = false;
};
absl::Status Supports(const Device& device, const ScoresParams& p);
absl::Status Scores(const Device& device, const ScoresParams& p);

// Expert selection for `rows` tokens with DeepSeek's semantics (engine/routing.h
// SelectExperts: greedy, group-limited or noaux_tc, the bias for the choice only, ties to the
// lower index, then GateWeights): experts/weights [rows, num_experts_per_tok], in selection
// order. `scores` [rows, n_routed_experts] are the gate's (Scores); `bias` [n_routed_experts]
// (added for the choice under noaux_tc, ignored otherwise) or null (none).
struct SelectExpertsParams {
  const model::ModelConfig* config = nullptr;
  const float* scores = nullptr;
  const float* bias = nullptr;
  int64_t rows = 0;
  int32_t* experts = nullptr;
  float* weights = nullptr;
};
absl::Status Supports(const Device& device, const SelectExpertsParams& p);
absl::Status SelectExperts(const Device& device, const SelectExpertsParams& p);

// The routed experts of one MoE layer: out [tokens, hidden] = sum over each token's slots of
// weight * expert(x[token]), expert(x) = down(silu(gate x) * up x), with experts/weights
// [tokens, top_k] (a token's choice; kNoExpertSlot marks an empty slot, as a shard pads a token
// with fewer of its experts). Each token's experts are added in ascending id order, with no
// atomics: on a backend, a token's result does not depend on the batch around it. (The CPU and
// CUDA GEMMs sum in different orders, so the backends agree to rounding, not to the bit.)
// Experts are indexed by id, null where not held: on the CPU `host[e]` (fp32, packed, BF16 or
// FP8 in place); on CUDA `gate_up_device[e]` [2 * inter, hidden] (gate_proj rows, then up_proj
// rows) and `down_device[e]` [hidden, inter] in `device_dtype` (fp32, or BF16 with BF16
// activations at the GEMMs' inputs). Every backend refuses, before computing, a slot naming an
// expert out of range or not held, or a token naming one expert twice (CUDA reads the slots
// back to the host: they decide the grouping).
inline constexpr int32_t kNoExpertSlot = -1;
struct RoutedExpertsParams {
  const float* x = nullptr;
  int64_t tokens = 0;
  int64_t hidden = 0;
  int64_t inter = 0;
  int64_t top_k = 0;
  const int32_t* experts = nullptr;
  const float* weights = nullptr;
  absl::Span<const model::MlpWeights* const> host;
  absl::Span<const void* const> gate_up_device;
  absl::Span<const void* const> down_device;
  model::WeightDType device_dtype = model::WeightDType::kFloat32;
  float* out = nullptr;
};
absl::Status Supports(const Device& device, const RoutedExpertsParams& p);
absl::Status RoutedExperts(const Device& device, const RoutedExpertsParams& p);

// ---- Memory and streams of a device (host memory for the CPU)

// A device ready to run ops: for CUDA, the device made current and its own stream and cuBLAS
// handle (bound to the stream), destroyed with the context after its work is done. `exact_fp32`
// asks cuBLAS for its pedantic math (no TF32 or reduced-precision shortcut inside SGEMM: the
// fp32 mode that must match the CPU); off, the BF16 GEMMs take cuBLAS's default, faster math.
// The CPU needs nothing: its context is the plain Device.
class DeviceContext {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceContext>> Open(const Device& requested,
                                                             bool exact_fp32);
  ~DeviceContext();
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;
  const Device& device() const { return device_; }

 private:
  explicit DeviceContext(const Device& device) : device_(device) {}
  Device device_;
};

// `bytes` of a device's memory, zero-filled (so a buffer a kernel only partly writes reads the
// same on every backend), freed when the buffer goes: on CUDA in stream order on the device's
// stream, so work enqueued before may still use it. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  ~DeviceBuffer();
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  friend absl::StatusOr<DeviceBuffer> Allocate(const Device& device, size_t bytes);
  void Reset();  // frees what it holds
  Device device_;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};
absl::StatusOr<DeviceBuffer> Allocate(const Device& device, size_t bytes);
// Host memory `src` into device memory `dst`, after the device's earlier work; returns once the
// values are on the device (the host buffer may then go).
absl::Status CopyToDevice(const Device& device, void* dst, const void* src, size_t bytes);
// Device memory `src` into host memory `dst`, after the device's earlier work; returns once
// `dst` holds the values.
absl::Status CopyToHost(const Device& device, void* dst, const void* src, size_t bytes);
// As CopyToDevice and CopyToHost, but enqueued on the device's stream: they return at once, and
// the values land after the device's earlier work and before its later work. Both host buffers
// must stay valid, and an async copy's host `dst` unread, until Synchronize (or a synchronous
// copy) returns. They overlap with the host only from page-locked memory (PinHost); from
// pageable memory CUDA stages them synchronously. On the CPU they copy at once.
absl::Status CopyToDeviceAsync(const Device& device, void* dst, const void* src, size_t bytes);
absl::Status CopyToHostAsync(const Device& device, void* dst, const void* src, size_t bytes);
// Waits for every op enqueued on the device; the first asynchronous error, if any.
absl::Status Synchronize(const Device& device);
// Page-locks host memory [data, data + bytes) for the device's copies (cudaHostRegister), so
// copies from and to it run at the link's rate without a bounce buffer; UnpinHost undoes it.
// On the CPU both do nothing. The memory must stay allocated until UnpinHost.
absl::Status PinHost(const Device& device, void* data, size_t bytes);
void UnpinHost(const Device& device, void* data);

// Rows [n, latent_dim] of fp32 latents written into one layer's paged cache `pool`
// [pool_blocks, block_tokens, latent_dim] (fp32, or BF16 rounded to nearest even: what the
// attention then reads), at positions start .. start + n - 1 of a sequence whose blocks are
// block_table[0 .. table_blocks) (indices into the pool; device memory on CUDA, which the host
// cannot read to check: its callers pass tables they built). The paged caches' store, as vLLM's
// reshape_and_cache.
struct StoreLatentsParams {
  const float* rows = nullptr;
  int64_t n = 0;
  int64_t latent_dim = 0;
  int64_t start = 0;
  const int32_t* block_table = nullptr;
  int64_t table_blocks = 0;
  int64_t block_tokens = 0;
  void* pool = nullptr;
  int64_t pool_blocks = 0;
  LatentStorage dtype = LatentStorage::kFloat32;
  // Values from one block's start to the next's: 0 means block_tokens * latent_dim (the FlashMLA
  // layout); at least that (MlaAttentionParams::pool_block_stride).
  int64_t pool_block_stride = 0;
};
absl::Status Supports(const Device& device, const StoreLatentsParams& p);
absl::Status StoreLatents(const Device& device, const StoreLatentsParams& p);

// The implementations of a backend other than the CPU, run after the params were checked (the
// generic checks here, then the backend's own `supports`). Installed by the backend's library
// (cuda/ops_cuda.h); process-wide, set once before use.
struct OpsBackend {
  absl::Status (*supports_linear)(const Device&, const LinearParams&) = nullptr;
  absl::Status (*rms_norm)(const Device&, const RmsNormParams&) = nullptr;
  absl::Status (*swiglu)(const Device&, const SwiGluParams&) = nullptr;
  absl::Status (*rope)(const Device&, const RopeParams&) = nullptr;
  absl::Status (*linear)(const Device&, const LinearParams&) = nullptr;
  absl::Status (*supports_embed)(const Device&, const EmbedParams&) = nullptr;
  absl::Status (*embed)(const Device&, const EmbedParams&) = nullptr;
  absl::Status (*add)(const Device&, const AddParams&) = nullptr;
  absl::Status (*supports_mla)(const Device&, const MlaAttentionParams&) = nullptr;
  absl::Status (*mla_attention)(const Device&, const MlaAttentionParams&) = nullptr;
  absl::Status (*scores)(const Device&, const ScoresParams&) = nullptr;
  absl::Status (*select_experts)(const Device&, const SelectExpertsParams&) = nullptr;
  absl::Status (*supports_mla_project)(const Device&, const MlaProjectParams&) = nullptr;
  absl::Status (*mla_project)(const Device&, const MlaProjectParams&) = nullptr;
  absl::Status (*supports_routed_experts)(const Device&, const RoutedExpertsParams&) = nullptr;
  absl::Status (*routed_experts)(const Device&, const RoutedExpertsParams&) = nullptr;
  absl::Status (*store_latents)(const Device&, const StoreLatentsParams&) = nullptr;
  // Memory and streams (DeviceContext, DeviceBuffer, the copies).
  absl::Status (*open)(Device* device, bool exact_fp32) = nullptr;
  void (*close)(const Device& device) = nullptr;
  absl::StatusOr<void*> (*allocate)(const Device& device, size_t bytes) = nullptr;
  void (*free)(const Device& device, void* data) = nullptr;
  absl::Status (*copy_to_device)(const Device&, void* dst, const void* src, size_t bytes) = nullptr;
  absl::Status (*copy_to_host)(const Device&, void* dst, const void* src, size_t bytes) = nullptr;
  absl::Status (*copy_to_device_async)(const Device&, void* dst, const void* src,
                                       size_t bytes) = nullptr;
  absl::Status (*copy_to_host_async)(const Device&, void* dst, const void* src,
                                     size_t bytes) = nullptr;
  absl::Status (*synchronize)(const Device& device) = nullptr;
  absl::Status (*pin_host)(const Device& device, void* data, size_t bytes) = nullptr;
  void (*unpin_host)(const Device& device, void* data) = nullptr;
};
void SetOpsBackend(Backend backend, const OpsBackend* table);

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_OPS_H_
