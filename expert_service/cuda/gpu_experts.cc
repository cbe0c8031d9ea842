#include "expert_service/cuda/gpu_experts.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/ops_cuda.h"
#include "common/kernels/ops.h"
#include "expert_service/expert_shard.h"

namespace splitmoe::expert_service {
namespace {

namespace cu = kernels::cuda;

// m's values as fp32 rows: as held, or widened from BF16/FP8 (exact).
absl::Status Widen(const model::Matrix& m, const std::string& name, float* out) {
  if (m.narrow()) {
    kernels::WidenRows(m, 0, m.rows, out);
    return absl::OkStatus();
  }
  if (static_cast<int64_t>(m.data.size()) != m.rows * m.cols) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": the GPU upload needs the values unpacked (", m.rows, " x ", m.cols,
                     ", ", m.data.size(), " held)"));
  }
  std::memcpy(out, m.data.data(), m.data.size() * sizeof(float));
  return absl::OkStatus();
}

class CudaExperts final : public DeviceExperts {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceExperts>> Load(const model::ModelConfig& config,
                                                             const model::ModelWeights& weights,
                                                             const ShardSpec& spec) {
    std::unique_ptr<CudaExperts> d(new CudaExperts());
    d->device_ = spec.device.index;
    d->bf16_ = spec.device_bf16;
    d->hidden_ = config.hidden_size;
    d->inter_ = config.moe_intermediate_size;
    d->n_experts_ = config.n_routed_experts;
    SPLITMOE_ASSIGN_OR_RETURN(int count, cu::DeviceCount());
    if (d->device_ < 0 || d->device_ >= count) {
      return absl::FailedPreconditionError(absl::StrCat(
          "experts on cuda:", d->device_, ": this machine has ", count, " CUDA device(s)"));
    }
    SPLITMOE_RETURN_IF_ERROR(cu::CudaError(cudaSetDevice(d->device_), "cudaSetDevice"));
    SPLITMOE_RETURN_IF_ERROR(cu::CudaError(cudaStreamCreate(&d->stream_), "cudaStreamCreate"));
    SPLITMOE_RETURN_IF_ERROR(cu::CublasError(cublasCreate(&d->blas_), "cublasCreate"));
    SPLITMOE_RETURN_IF_ERROR(cu::CublasError(cublasSetStream(d->blas_, d->stream_), "cublasSetStream"));
    kernels::EnableCudaOps();
    // The reference mode gives fp32 products: no TF32 (cuBLAS's default math may use it).
    if (!d->bf16_) {
      SPLITMOE_RETURN_IF_ERROR(
          cu::CublasError(cublasSetMathMode(d->blas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode"));
    }
    const int64_t main = config.num_hidden_layers;
    for (int64_t l = 0; l < main + static_cast<int64_t>(weights.mtp.size()); ++l) {
      const model::LayerWeights& layer =
          l < main ? weights.layers[static_cast<size_t>(l)]
                   : weights.mtp[static_cast<size_t>(l - main)].block;
      SPLITMOE_RETURN_IF_ERROR(d->UploadLayer(l, layer));
    }
    return std::unique_ptr<DeviceExperts>(std::move(d));
  }

  ~CudaExperts() override {
    cudaSetDevice(device_);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (void* p : owned_) cudaFree(p);
    for (void* p : {static_cast<void*>(x_), static_cast<void*>(out_), static_cast<void*>(ids_),
                    static_cast<void*>(w_)}) {
      if (p != nullptr) cudaFree(p);
    }
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  uint64_t resident_bytes() const override { return bytes_; }

  absl::Status Compute(int64_t layer, absl::Span<const float> hidden, int64_t tokens,
                       int64_t top_k, absl::Span<const int32_t> ids,
                       absl::Span<const float> w, absl::Span<float> out) override {
    if (layer < 0 || layer >= static_cast<int64_t>(layers_.size()) ||
        layers_[static_cast<size_t>(layer)].gate_up.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
    }
    std::fill(out.begin(), out.end(), 0.0f);
    if (tokens == 0 || top_k == 0) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    SPLITMOE_RETURN_IF_ERROR(cu::CudaError(cudaSetDevice(device_), "cudaSetDevice"));
    SPLITMOE_RETURN_IF_ERROR(Reserve(tokens * hidden_, tokens * top_k));
    const size_t x_bytes = static_cast<size_t>(tokens * hidden_) * sizeof(float);
    const size_t slots = ids.size();
    absl::Status s = cu::CudaError(
        cudaMemcpyAsync(x_, hidden.data(), x_bytes, cudaMemcpyHostToDevice, stream_), "copy in");
    if (s.ok()) {
      s = cu::CudaError(cudaMemcpyAsync(ids_, ids.data(), slots * sizeof(int32_t),
                                        cudaMemcpyHostToDevice, stream_),
                        "copy in");
    }
    if (s.ok()) {
      s = cu::CudaError(
          cudaMemcpyAsync(w_, w.data(), slots * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "copy in");
    }
    const Tables& table = layers_[static_cast<size_t>(layer)];
    if (s.ok()) {
      kernels::RoutedExpertsParams p;
      p.x = x_;
      p.tokens = tokens;
      p.hidden = hidden_;
      p.inter = inter_;
      p.top_k = top_k;
      p.experts = ids_;
      p.weights = w_;
      p.gate_up_device = table.gate_up;
      p.down_device = table.down;
      p.device_dtype = bf16_ ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
      p.out = out_;
      s = kernels::RoutedExperts(kernels::Device{kernels::Backend::kCuda, device_, stream_, blas_}, p);
    }
    if (s.ok()) {
      s = cu::CudaError(
          cudaMemcpyAsync(out.data(), out_, x_bytes, cudaMemcpyDeviceToHost, stream_), "copy out");
    }
    // Whatever failed, nothing may still use the buffers when the lock is let go.
    const absl::Status synced = cu::CudaError(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return s.ok() ? synced : s;
  }

 private:
  // One layer's experts by id (null where not held); empty for a dense layer.
  struct Tables {
    std::vector<const void*> gate_up, down;
  };

  CudaExperts() = default;

  absl::StatusOr<void*> Alloc(size_t bytes) {
    void* p = nullptr;
    SPLITMOE_RETURN_IF_ERROR(cu::CudaError(cudaMalloc(&p, std::max<size_t>(bytes, 16)),
                                           "cudaMalloc (expert weights)"));
    owned_.push_back(p);
    bytes_ += bytes;
    return p;
  }

  // rows x cols fp32 host values to the device, as fp32 or BF16 (round to nearest even).
  absl::StatusOr<const void*> Upload(const std::vector<float>& host, int64_t rows, int64_t cols) {
    const size_t n = static_cast<size_t>(rows * cols);
    if (!bf16_) {
      SPLITMOE_ASSIGN_OR_RETURN(void* p, Alloc(n * sizeof(float)));
      SPLITMOE_RETURN_IF_ERROR(cu::CudaError(
          cudaMemcpy(p, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy"));
      return static_cast<const void*>(p);
    }
    SPLITMOE_ASSIGN_OR_RETURN(void* p, Alloc(n * sizeof(__nv_bfloat16)));
    // fp32 values staged in the batch buffer x_ (grown to the largest matrix, kept for batches).
    SPLITMOE_RETURN_IF_ERROR(Grow(&x_, &x_cap_, static_cast<int64_t>(n)));
    absl::Status s = cu::CudaError(
        cudaMemcpy(x_, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    if (s.ok()) {
      s = cu::ToBf16Device(x_, static_cast<int64_t>(n), static_cast<__nv_bfloat16*>(p), stream_);
    }
    const absl::Status synced = cu::CudaError(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    SPLITMOE_RETURN_IF_ERROR(s);
    SPLITMOE_RETURN_IF_ERROR(synced);
    return static_cast<const void*>(p);
  }

  absl::Status UploadLayer(int64_t l, const model::LayerWeights& layer) {
    Tables& t = layers_.emplace_back();
    if (!layer.is_moe) return absl::OkStatus();
    t.gate_up.assign(static_cast<size_t>(n_experts_), nullptr);
    t.down.assign(static_cast<size_t>(n_experts_), nullptr);
    if (static_cast<int64_t>(layer.experts.size()) > n_experts_) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": ", layer.experts.size(),
                                                     " experts for ", n_experts_, " routed"));
    }
    std::vector<float> gu, dn;
    for (size_t e = 0; e < layer.experts.size(); ++e) {
      const model::MlpWeights* x = layer.experts[e].get();
      if (x == nullptr) continue;
      const std::string name = absl::StrCat("layer ", l, " expert ", e);
      if (x->gate.rows != inter_ || x->gate.cols != hidden_ || x->up.rows != inter_ ||
          x->up.cols != hidden_ || x->down.rows != hidden_ || x->down.cols != inter_) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, ": gate ", x->gate.rows, "x", x->gate.cols, ", up ", x->up.rows, "x",
            x->up.cols, ", down ", x->down.rows, "x", x->down.cols, "; the config says inter ",
            inter_, ", hidden ", hidden_));
      }
      // gate_proj rows, then up_proj rows: [2 * inter, hidden].
      gu.resize(static_cast<size_t>(2 * inter_ * hidden_));
      SPLITMOE_RETURN_IF_ERROR(Widen(x->gate, name + " gate_proj", gu.data()));
      SPLITMOE_RETURN_IF_ERROR(Widen(x->up, name + " up_proj", gu.data() + inter_ * hidden_));
      dn.resize(static_cast<size_t>(hidden_ * inter_));
      SPLITMOE_RETURN_IF_ERROR(Widen(x->down, name + " down_proj", dn.data()));
      SPLITMOE_ASSIGN_OR_RETURN(t.gate_up[e], Upload(gu, 2 * inter_, hidden_));
      SPLITMOE_ASSIGN_OR_RETURN(t.down[e], Upload(dn, hidden_, inter_));
    }
    return absl::OkStatus();
  }

  // The staging buffers hold `x_floats` activations and `slots` selections (grow only).
  absl::Status Reserve(int64_t x_floats, int64_t slots) {
    SPLITMOE_RETURN_IF_ERROR(Grow(&x_, &x_cap_, x_floats));
    SPLITMOE_RETURN_IF_ERROR(Grow(&out_, &out_cap_, x_floats));
    SPLITMOE_RETURN_IF_ERROR(Grow(&ids_, &ids_cap_, slots));
    return Grow(&w_, &w_cap_, slots);
  }
  // *p holds at least `want` values (reallocated, contents lost, when it held fewer).
  template <typename T>
  static absl::Status Grow(T** p, int64_t* cap, int64_t want) {
    if (want <= *cap) return absl::OkStatus();
    if (*p != nullptr) cudaFree(*p);
    *p = nullptr;
    *cap = 0;
    SPLITMOE_RETURN_IF_ERROR(cu::CudaError(
        cudaMalloc(reinterpret_cast<void**>(p), static_cast<size_t>(want) * sizeof(T)),
        "cudaMalloc (staging)"));
    *cap = want;
    return absl::OkStatus();
  }

  int device_ = 0;
  bool bf16_ = false;
  int64_t hidden_ = 0, inter_ = 0, n_experts_ = 0;
  std::vector<Tables> layers_;  // main layers, then MTP blocks
  std::vector<void*> owned_;
  uint64_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::mutex mu_;  // one batch at a time on the stream and the staging buffers
  float* x_ = nullptr;
  float* out_ = nullptr;
  int32_t* ids_ = nullptr;
  float* w_ = nullptr;
  int64_t x_cap_ = 0, out_cap_ = 0, ids_cap_ = 0, w_cap_ = 0;
};

}  // namespace

void EnableCudaExperts() { SetCudaExpertsLoader(&CudaExperts::Load); }

}  // namespace splitmoe::expert_service
