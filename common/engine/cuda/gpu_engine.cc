#include "common/engine/cuda/gpu_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/batch_decoder.h"
#include "common/engine/rope.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/ops_cuda.h"
#include "common/kernels/ops.h"
#include "common/model/checkpoint.h"
#include "common/model/weights.h"

namespace splitmoe::engine {
namespace {

namespace cu = kernels::cuda;

constexpr auto Cuda = cu::CudaError;
constexpr auto Blas = cu::CublasError;

constexpr int64_t kChunk = 256;  // prompt tokens per forward pass, as the CPU engine
constexpr int64_t kBlockTokens = 64;

// A weight matrix on the device, fp32 or BF16: its shape (`shape.rows` x `shape.cols`, no
// values on the host) and its values in device memory.
struct DevMatrix {
  model::Matrix shape;
  void* data = nullptr;
  model::WeightDType dtype = model::WeightDType::kFloat32;
  bool empty() const { return data == nullptr; }
};

struct DevLayer {
  bool is_moe = false;
  float* input_norm = nullptr;
  float* post_norm = nullptr;
  DevMatrix q_proj, q_a_proj, q_b_proj, kv_a_proj, o_proj;
  float* q_a_norm = nullptr;
  float* kv_a_norm = nullptr;
  DevMatrix kv_b;  // fp32 [heads * (nope + v), kv_lora_rank]: the absorbed W_UK / W_UV
  DevMatrix dense_gate, dense_up, dense_down;
  DevMatrix gate;              // fp32 [n_routed, hidden]
  float* gate_bias = nullptr;  // [n_routed] or null
  DevMatrix shared_gate, shared_up, shared_down;
  std::vector<const void*> experts_gate_up, experts_down;  // by expert id
  void* cache = nullptr;  // [blocks, 64, latent_dim], fp32 or BF16
};

}  // namespace

struct GpuEngine::Impl {
  model::ModelConfig config;
  GpuEngineOptions options;
  bool bf16 = false;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  std::vector<void*> owned;
  DevMatrix embed;  // fp32
  float* final_norm = nullptr;
  DevMatrix lm_head;
  std::vector<DevLayer> layers;
  float* inv_freq = nullptr;
  int64_t max_blocks = 0;  // cache blocks per layer: the sequence's block b is the pool's block b
  int32_t* identity_table = nullptr;  // [max_blocks]: the sequence's block table
  float softmax_scale = 1.0f;
  kernels::Device device;  // cuda:N with this engine's stream and cuBLAS handle

  ~Impl() {
    cudaSetDevice(options.device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    for (void* p : owned) cudaFree(p);
    if (blas != nullptr) cublasDestroy(blas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  absl::StatusOr<void*> Alloc(size_t bytes) {
    void* p = nullptr;
    SPLITMOE_RETURN_IF_ERROR(Cuda(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "cudaMalloc"));
    owned.push_back(p);
    return p;
  }
  absl::StatusOr<float*> UploadF32(const float* host, size_t n) {
    SPLITMOE_ASSIGN_OR_RETURN(void* p, Alloc(n * sizeof(float)));
    SPLITMOE_RETURN_IF_ERROR(
        Cuda(cudaMemcpy(p, host, n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy"));
    return static_cast<float*>(p);
  }
  absl::StatusOr<void*> UploadMatrix(const float* host, int64_t rows, int64_t cols, bool as_bf16) {
    const size_t n = static_cast<size_t>(rows * cols);
    SPLITMOE_ASSIGN_OR_RETURN(float* f, UploadF32(host, n));
    if (!as_bf16) return static_cast<void*>(f);
    SPLITMOE_ASSIGN_OR_RETURN(void* b, Alloc(n * sizeof(__nv_bfloat16)));
    SPLITMOE_RETURN_IF_ERROR(
        cu::ToBf16Device(f, static_cast<int64_t>(n), static_cast<__nv_bfloat16*>(b), stream));
    SPLITMOE_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
    owned.erase(std::find(owned.begin(), owned.end(), static_cast<void*>(f)));
    cudaFree(f);
    return b;
  }
  // `m` on the device, BF16 in the bf16 mode unless `keep_fp32` (the embedding, the gate and
  // kv_b_proj, which stay fp32 in both modes).
  absl::StatusOr<DevMatrix> Upload(const model::Matrix& m, bool keep_fp32 = false) {
    DevMatrix d;
    if (m.empty()) return d;
    if (m.data.empty()) {
      return absl::FailedPreconditionError("GPU upload needs unpacked weights (a packed matrix)");
    }
    d.shape.rows = m.rows;
    d.shape.cols = m.cols;
    const bool as_bf16 = bf16 && !keep_fp32;
    d.dtype = as_bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
    SPLITMOE_ASSIGN_OR_RETURN(d.data, UploadMatrix(m.data.data(), m.rows, m.cols, as_bf16));
    return d;
  }
  absl::StatusOr<float*> UploadVec(const std::vector<float>& v) {
    if (v.empty()) return static_cast<float*>(nullptr);
    return UploadF32(v.data(), v.size());
  }

  // y[m, w.rows] = x[m, w.cols] @ w^T (kernels::Linear on this device).
  absl::Status Linear(const float* x, int64_t m, const DevMatrix& w, float* y) {
    return kernels::Linear(device, {x, m, &w.shape, w.data, w.dtype, y});
  }
  absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float* out,
                       int64_t stride = 0) {
    return kernels::RmsNorm(device, {x, rows, dim, stride, weight,
                                     static_cast<float>(config.rms_norm_eps), out, stride});
  }

  // Stream-ordered scratch, freed when the forward pass ends.
  struct Scratch {
    cudaStream_t stream;
    std::vector<void*> ptrs;
    ~Scratch() {
      for (void* p : ptrs) cudaFreeAsync(p, stream);
    }
    absl::StatusOr<float*> Floats(int64_t n) {
      void* p = nullptr;
      SPLITMOE_RETURN_IF_ERROR(Cuda(
          cudaMallocAsync(&p, static_cast<size_t>(std::max<int64_t>(n, 4)) * sizeof(float), stream),
          "cudaMallocAsync"));
      ptrs.push_back(p);
      return static_cast<float*>(p);
    }
    absl::StatusOr<int32_t*> Ints(int64_t n) {
      void* p = nullptr;
      SPLITMOE_RETURN_IF_ERROR(Cuda(
          cudaMallocAsync(&p, static_cast<size_t>(std::max<int64_t>(n, 4)) * sizeof(int32_t),
                          stream),
          "cudaMallocAsync"));
      ptrs.push_back(p);
      return static_cast<int32_t*>(p);
    }
  };

  absl::Status Mlp(const DevMatrix& gate, const DevMatrix& up, const DevMatrix& down,
                   const float* x, int64_t n, float* out, Scratch& scratch) {
    const int64_t inter = gate.shape.rows;
    SPLITMOE_ASSIGN_OR_RETURN(float* g, scratch.Floats(n * inter));
    SPLITMOE_ASSIGN_OR_RETURN(float* u, scratch.Floats(n * inter));
    SPLITMOE_RETURN_IF_ERROR(Linear(x, n, gate, g));
    SPLITMOE_RETURN_IF_ERROR(Linear(x, n, up, u));
    SPLITMOE_RETURN_IF_ERROR(kernels::SwiGlu(device, {g, u, n * inter}));
    return Linear(g, n, down, out);
  }

  // Runs `tokens` (positions start ..) through every layer; the last row's logits to the host.
  absl::Status Forward(absl::Span<const int32_t> tokens, int64_t start, std::vector<float>* logits) {
    const model::ModelConfig& c = config;
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t hidden = c.hidden_size, heads = c.num_attention_heads;
    const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    const int64_t qk = c.qk_head_dim(), kvr = c.kv_lora_rank, lat = c.latent_dim();
    Scratch scratch{stream, {}};
    SPLITMOE_ASSIGN_OR_RETURN(int32_t* d_tokens, scratch.Ints(n));
    SPLITMOE_ASSIGN_OR_RETURN(int32_t* d_pos, scratch.Ints(n));
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(start + i);
    // The attention's block table, one for every layer (the same blocks of each layer's pool):
    // row i sees blocks 0 .. and keys [0, start + i].
    const int64_t blocks = (start + n + kBlockTokens - 1) / kBlockTokens;
    std::vector<int32_t> table(static_cast<size_t>(n * blocks)), lens(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      lens[i] = static_cast<int32_t>(start + i + 1);
      for (int64_t b = 0; b < blocks; ++b) table[i * blocks + b] = static_cast<int32_t>(b);
    }
    SPLITMOE_ASSIGN_OR_RETURN(int32_t* d_table, scratch.Ints(n * blocks));
    SPLITMOE_ASSIGN_OR_RETURN(int32_t* d_lens, scratch.Ints(n));
    SPLITMOE_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_table, table.data(), table.size() * 4,
                                                  cudaMemcpyHostToDevice, stream),
                                  "cudaMemcpyAsync"));
    SPLITMOE_RETURN_IF_ERROR(Cuda(
        cudaMemcpyAsync(d_lens, lens.data(), n * 4, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync"));
    SPLITMOE_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_tokens, tokens.data(), n * 4,
                                                  cudaMemcpyHostToDevice, stream),
                                  "cudaMemcpyAsync"));
    SPLITMOE_RETURN_IF_ERROR(Cuda(
        cudaMemcpyAsync(d_pos, pos.data(), n * 4, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync"));

    SPLITMOE_ASSIGN_OR_RETURN(float* h, scratch.Floats(n * hidden));
    SPLITMOE_ASSIGN_OR_RETURN(float* xn, scratch.Floats(n * hidden));
    SPLITMOE_ASSIGN_OR_RETURN(float* delta, scratch.Floats(n * hidden));
    SPLITMOE_ASSIGN_OR_RETURN(float* q, scratch.Floats(n * heads * qk));
    SPLITMOE_ASSIGN_OR_RETURN(float* kv, scratch.Floats(n * lat));
    SPLITMOE_ASSIGN_OR_RETURN(float* qf, scratch.Floats(n * heads * lat));
    SPLITMOE_ASSIGN_OR_RETURN(float* olat, scratch.Floats(n * heads * kvr));
    SPLITMOE_ASSIGN_OR_RETURN(float* o, scratch.Floats(n * heads * dv));
    SPLITMOE_ASSIGN_OR_RETURN(float* qa, scratch.Floats(n * std::max<int64_t>(c.q_lora_rank, 1)));
    // The sequence's latents, as blocks of each layer's pool (block b is the pool's block b).
    std::vector<kernels::MlaSequence> sequence(1);
    kernels::MlaSequence& seq = sequence[0];
    seq.latents.dtype = bf16 ? kernels::LatentStorage::kBFloat16 : kernels::LatentStorage::kFloat32;
    seq.latents.block_tokens = kBlockTokens;
    seq.latents.keys = start + n;
    seq.latents.blocks.resize(static_cast<size_t>((start + n + kBlockTokens - 1) / kBlockTokens));
    seq.rows = n;
    seq.start = start;
    kernels::MlaAttentionParams mla;
    mla.heads = heads;
    mla.kv_lora_rank = kvr;
    mla.rope_dim = dr;
    mla.softmax_scale = softmax_scale;
    mla.q = qf;
    mla.out = olat;
    mla.sequences = sequence;
    mla.pool_blocks = max_blocks;
    mla.device_block_table = d_table;
    mla.device_seq_lens = d_lens;
    mla.device_table_width = blocks;
    const int64_t block_bytes = kBlockTokens * lat * (bf16 ? 2 : 4);
    SPLITMOE_RETURN_IF_ERROR(kernels::Embed(device, {d_tokens, n, &embed.shape,
                                                     static_cast<const float*>(embed.data), h}));
    using Kind = kernels::MlaProjectParams::Kind;

    for (DevLayer& w : layers) {
      SPLITMOE_RETURN_IF_ERROR(RmsNorm(h, n, hidden, w.input_norm, xn));
      // Queries and the new latents.
      if (c.q_lora_rank > 0) {
        SPLITMOE_RETURN_IF_ERROR(Linear(xn, n, w.q_a_proj, qa));
        SPLITMOE_RETURN_IF_ERROR(RmsNorm(qa, n, c.q_lora_rank, w.q_a_norm, qa));
        SPLITMOE_RETURN_IF_ERROR(Linear(qa, n, w.q_b_proj, q));
      } else {
        SPLITMOE_RETURN_IF_ERROR(Linear(xn, n, w.q_proj, q));
      }
      SPLITMOE_RETURN_IF_ERROR(Linear(xn, n, w.kv_a_proj, kv));
      SPLITMOE_RETURN_IF_ERROR(RmsNorm(kv, n, kvr, w.kv_a_norm, kv, lat));
      SPLITMOE_RETURN_IF_ERROR(kernels::Rope(device, {kv, n, 1, lat, kvr, dr, d_pos, inv_freq}));
      SPLITMOE_RETURN_IF_ERROR(kernels::Rope(device, {q, n, heads, qk, dn, dr, d_pos, inv_freq}));
      SPLITMOE_RETURN_IF_ERROR(cu::StoreLatentsDevice(kv, n, lat, start, identity_table,
                                                      kBlockTokens, w.cache, bf16, stream));
      // Absorbed queries qf [n, heads, lat] = [q_nope @ W_UK[h], q_pe].
      SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
          device, {Kind::kAbsorbQuery, q, n, heads, dn, dr, dv, &w.kv_b.shape,
                   static_cast<const float*>(w.kv_b.data), qf}));
      // Attention over the cache (kernels::MlaAttention): prompt position i sees the cache up
      // to itself.
      mla.pool = w.cache;
      for (size_t b = 0; b < seq.latents.blocks.size(); ++b) {
        seq.latents.blocks[b] = static_cast<const char*>(w.cache) + b * block_bytes;
      }
      SPLITMOE_RETURN_IF_ERROR(kernels::MlaAttention(device, mla));
      // o [n, heads, dv] = olat[h] @ W_UV[h]^T, then o_proj.
      SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
          device, {Kind::kApplyValue, olat, n, heads, dn, dr, dv, &w.kv_b.shape,
                   static_cast<const float*>(w.kv_b.data), o}));
      SPLITMOE_RETURN_IF_ERROR(Linear(o, n, w.o_proj, delta));
      SPLITMOE_RETURN_IF_ERROR(kernels::Add(device, {h, delta, n * hidden}));

      SPLITMOE_RETURN_IF_ERROR(RmsNorm(h, n, hidden, w.post_norm, xn));
      if (!w.is_moe) {
        SPLITMOE_RETURN_IF_ERROR(Mlp(w.dense_gate, w.dense_up, w.dense_down, xn, n, delta, scratch));
      } else {
        const int64_t experts = c.n_routed_experts, k = c.num_experts_per_tok;
        SPLITMOE_ASSIGN_OR_RETURN(float* scores, scratch.Floats(n * experts));
        SPLITMOE_ASSIGN_OR_RETURN(int32_t* chosen, scratch.Ints(n * k));
        SPLITMOE_ASSIGN_OR_RETURN(float* weights, scratch.Floats(n * k));
        SPLITMOE_RETURN_IF_ERROR(Linear(xn, n, w.gate, scores));
        SPLITMOE_RETURN_IF_ERROR(kernels::Scores(
            device, {scores, n, experts, c.scoring_func == model::ScoringFunc::kSigmoid}));
        SPLITMOE_RETURN_IF_ERROR(
            kernels::SelectExperts(device, {&c, scores, w.gate_bias, n, chosen, weights}));
        kernels::RoutedExpertsParams routed;
        routed.x = xn;
        routed.tokens = n;
        routed.hidden = hidden;
        routed.inter = c.moe_intermediate_size;
        routed.top_k = k;
        routed.experts = chosen;
        routed.weights = weights;
        routed.gate_up_device = w.experts_gate_up;
        routed.down_device = w.experts_down;
        routed.device_dtype = bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
        routed.out = delta;
        SPLITMOE_RETURN_IF_ERROR(kernels::RoutedExperts(device, routed));
        if (!w.shared_gate.empty()) {
          SPLITMOE_ASSIGN_OR_RETURN(float* shared, scratch.Floats(n * hidden));
          SPLITMOE_RETURN_IF_ERROR(
              Mlp(w.shared_gate, w.shared_up, w.shared_down, xn, n, shared, scratch));
          SPLITMOE_RETURN_IF_ERROR(kernels::Add(device, {delta, shared, n * hidden}));
        }
      }
      SPLITMOE_RETURN_IF_ERROR(kernels::Add(device, {h, delta, n * hidden}));
    }
    // The last row: final norm, output head, logits to the host.
    float* last = h + (n - 1) * hidden;
    SPLITMOE_RETURN_IF_ERROR(RmsNorm(last, 1, hidden, final_norm, xn));
    SPLITMOE_ASSIGN_OR_RETURN(float* d_logits, scratch.Floats(c.vocab_size));
    SPLITMOE_RETURN_IF_ERROR(Linear(xn, 1, lm_head, d_logits));
    logits->resize(static_cast<size_t>(c.vocab_size));
    SPLITMOE_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(logits->data(), d_logits,
                                                  c.vocab_size * sizeof(float),
                                                  cudaMemcpyDeviceToHost, stream),
                                  "cudaMemcpyAsync"));
    return Cuda(cudaStreamSynchronize(stream), "forward");
  }
};

GpuEngine::GpuEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuEngine::~GpuEngine() = default;

const model::ModelConfig& GpuEngine::config() const { return impl_->config; }

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::Load(const std::string& model_dir,
                                                           const GpuEngineOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(int devices, kernels::cuda::DeviceCount());
  if (options.device < 0 || options.device >= devices) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda:", options.device, " requested, ", devices, " CUDA devices visible"));
  }
  if (options.max_context <= 0) return absl::InvalidArgumentError("max_context must be > 0");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->bf16 = options.precision == GpuPrecision::kBf16;
  SPLITMOE_RETURN_IF_ERROR(Cuda(cudaSetDevice(options.device), "cudaSetDevice"));
  SPLITMOE_RETURN_IF_ERROR(Cuda(cudaStreamCreate(&impl->stream), "cudaStreamCreate"));
  SPLITMOE_RETURN_IF_ERROR(Blas(cublasCreate(&impl->blas), "cublasCreate"));
  SPLITMOE_RETURN_IF_ERROR(Blas(cublasSetStream(impl->blas, impl->stream), "cublasSetStream"));
  kernels::EnableCudaOps();
  impl->device = {kernels::Backend::kCuda, options.device, impl->stream, impl->blas};
  // fp32 means fp32: no TF32 or reduced-precision shortcut inside SGEMM (the bf16 mode keeps the
  // default math, which is faster for its BF16 GEMMs).
  if (!impl->bf16) {
    SPLITMOE_RETURN_IF_ERROR(
        Blas(cublasSetMathMode(impl->blas, CUBLAS_PEDANTIC_MATH), "math mode"));
  }

  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  impl->config = ckpt->config();
  const model::ModelConfig& c = impl->config;
  if (c.latent_dim() > 768) {
    return absl::UnimplementedError(
        absl::StrCat("latent_dim ", c.latent_dim(), " > 768 is not supported by the MLA kernel"));
  }
  model::LoadOptions load;
  load.mtp = false;
  // The upload below converts from fp32 host copies (to fp32 or bf16 on the device).
  load.resident = model::ResidentDType::kFloat32;
  SPLITMOE_ASSIGN_OR_RETURN(model::ModelWeights w, model::LoadWeights(*ckpt, load));
  Impl& d = *impl;
  SPLITMOE_ASSIGN_OR_RETURN(d.embed, d.Upload(w.embed, /*keep_fp32=*/true));
  SPLITMOE_ASSIGN_OR_RETURN(d.final_norm, d.UploadVec(w.final_norm));
  SPLITMOE_ASSIGN_OR_RETURN(d.lm_head, d.Upload(w.lm_head));
  RopeTable rope(c);
  SPLITMOE_ASSIGN_OR_RETURN(d.inv_freq, d.UploadVec(rope.inv_freq()));
  d.softmax_scale = static_cast<float>(c.SoftmaxScale());
  d.max_blocks = (options.max_context + kBlockTokens - 1) / kBlockTokens;
  std::vector<int32_t> table(static_cast<size_t>(d.max_blocks));
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
  SPLITMOE_ASSIGN_OR_RETURN(void* t, d.Alloc(table.size() * sizeof(int32_t)));
  d.identity_table = static_cast<int32_t*>(t);
  SPLITMOE_RETURN_IF_ERROR(Cuda(cudaMemcpy(t, table.data(), table.size() * sizeof(int32_t),
                                           cudaMemcpyHostToDevice),
                                "cudaMemcpy"));
  const size_t cache_bytes = static_cast<size_t>(d.max_blocks * kBlockTokens * c.latent_dim()) *
                             (d.bf16 ? 2 : 4);
  for (const model::LayerWeights& l : w.layers) {
    DevLayer dl;
    dl.is_moe = l.is_moe;
    SPLITMOE_ASSIGN_OR_RETURN(dl.input_norm, d.UploadVec(l.input_norm));
    SPLITMOE_ASSIGN_OR_RETURN(dl.post_norm, d.UploadVec(l.post_attention_norm));
    SPLITMOE_ASSIGN_OR_RETURN(dl.q_proj, d.Upload(l.attn.q_proj));
    SPLITMOE_ASSIGN_OR_RETURN(dl.q_a_proj, d.Upload(l.attn.q_a_proj));
    SPLITMOE_ASSIGN_OR_RETURN(dl.q_b_proj, d.Upload(l.attn.q_b_proj));
    SPLITMOE_ASSIGN_OR_RETURN(dl.kv_a_proj, d.Upload(l.attn.kv_a_proj));
    SPLITMOE_ASSIGN_OR_RETURN(dl.o_proj, d.Upload(l.attn.o_proj));
    SPLITMOE_ASSIGN_OR_RETURN(dl.q_a_norm, d.UploadVec(l.attn.q_a_norm));
    SPLITMOE_ASSIGN_OR_RETURN(dl.kv_a_norm, d.UploadVec(l.attn.kv_a_norm));
    SPLITMOE_ASSIGN_OR_RETURN(dl.kv_b, d.Upload(l.attn.kv_b_proj, /*keep_fp32=*/true));
    if (!l.is_moe) {
      SPLITMOE_ASSIGN_OR_RETURN(dl.dense_gate, d.Upload(l.dense.gate));
      SPLITMOE_ASSIGN_OR_RETURN(dl.dense_up, d.Upload(l.dense.up));
      SPLITMOE_ASSIGN_OR_RETURN(dl.dense_down, d.Upload(l.dense.down));
    } else {
      SPLITMOE_ASSIGN_OR_RETURN(dl.gate, d.Upload(l.gate, /*keep_fp32=*/true));
      SPLITMOE_ASSIGN_OR_RETURN(dl.gate_bias, d.UploadVec(l.gate_bias));
      SPLITMOE_ASSIGN_OR_RETURN(dl.shared_gate, d.Upload(l.shared.gate));
      SPLITMOE_ASSIGN_OR_RETURN(dl.shared_up, d.Upload(l.shared.up));
      SPLITMOE_ASSIGN_OR_RETURN(dl.shared_down, d.Upload(l.shared.down));
      for (const auto& e : l.experts) {
        if (e == nullptr) {
          dl.experts_gate_up.push_back(nullptr);
          dl.experts_down.push_back(nullptr);
          continue;
        }
        // gate_proj rows, then up_proj rows: [2 * inter, hidden].
        std::vector<float> gu(e->gate.data);
        gu.insert(gu.end(), e->up.data.begin(), e->up.data.end());
        SPLITMOE_ASSIGN_OR_RETURN(void* g, d.UploadMatrix(gu.data(), 2 * e->gate.rows,
                                                          e->gate.cols, d.bf16));
        SPLITMOE_ASSIGN_OR_RETURN(void* dn, d.UploadMatrix(e->down.data.data(), e->down.rows,
                                                           e->down.cols, d.bf16));
        dl.experts_gate_up.push_back(g);
        dl.experts_down.push_back(dn);
      }
    }
    SPLITMOE_ASSIGN_OR_RETURN(dl.cache, d.Alloc(cache_bytes));
    d.layers.push_back(std::move(dl));
  }
  return std::unique_ptr<GpuEngine>(new GpuEngine(std::move(impl)));
}

absl::StatusOr<GenerateResult> GpuEngine::Generate(const GenerateRequest& request) {
  Impl& d = *impl_;
  const model::ModelConfig& c = d.config;
  SPLITMOE_RETURN_IF_ERROR(Cuda(cudaSetDevice(d.options.device), "cudaSetDevice"));
  if (!request.stop.empty()) {
    return absl::InvalidArgumentError("stop strings are not supported by the GPU engine yet");
  }
  RequestShape shape = ShapeOf(request, /*has_tokenizer=*/false);
  shape.max_context = d.options.max_context;  // the device cache's size
  SPLITMOE_RETURN_IF_ERROR(CheckRequest(c, shape));
  std::vector<float> logits;
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t len = std::min(kChunk, n - begin);
    SPLITMOE_RETURN_IF_ERROR(d.Forward(
        absl::MakeConstSpan(request.prompt.data() + begin, static_cast<size_t>(len)), begin,
        &logits));
  }
  GenerateResult result;
  result.finish_reason = "length";
  for (int64_t i = 0; i < request.max_tokens; ++i) {
    const int64_t position = n + i;
    const int32_t token = SampleToken(logits, request.sampling, position);
    result.tokens.push_back(token);
    if (request.logprobs >= 0) result.logprobs.push_back(ComputeLogprob(logits, token, request.logprobs));
    const std::string finish = FinishReason(token, i + 1, request.max_tokens, c.eos_token_id,
                                            request.ignore_eos, request.stop_token_ids);
    if (!finish.empty()) {
      result.finish_reason = finish;
      break;
    }
    const int32_t next[1] = {token};
    SPLITMOE_RETURN_IF_ERROR(d.Forward(absl::MakeConstSpan(next, 1), position, &logits));
  }
  return result;
}

}  // namespace splitmoe::engine
