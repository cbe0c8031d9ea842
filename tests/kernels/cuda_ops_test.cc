// CUDA kernels against the CPU path, at DeepSeek-V3's real shapes (hidden 7168, 128 heads,
// kv_lora_rank 512 + rope 64, 256 experts in 8 groups keeping 4, top-8), on fresh random inputs,
// with every output poisoned (NaN) before the run so an unwritten element fails. Error bounds:
// fp32 element-wise ops 1e-5 relative; bf16-operand GEMMs and attention (inputs rounded to bf16
// exactly as the device sees them, fp32 accumulation) 1e-3 relative in norm. Without a GPU every
// case is skipped with the reason (ctest reports them as skipped, never as passed); the checks
// are run by scripts/gpu-check.sh on a GPU machine.
#include "common/kernels/cuda/cuda_ops.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>

#include "common/engine/routing.h"
#include "common/kernels/cpu_ops.h"
#include "common/model/config.h"
#include "common/model/numeric.h"
#include "gtest/gtest.h"

namespace splitmoe::kernels {
namespace {

// A device buffer for tests: filled from / read into host vectors; NaN-poisoned on request.
template <typename T>
class Device {
 public:
  explicit Device(size_t n) : n_(n) { EXPECT_EQ(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  explicit Device(const std::vector<T>& host) : Device(host.size()) { Put(host); }
  ~Device() { cudaFree(p_); }
  void Put(const std::vector<T>& host) {
    ASSERT_EQ(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  void Poison() { ASSERT_EQ(cudaMemset(p_, 0xFF, n_ * sizeof(T)), cudaSuccess); }  // NaN for floats
  std::vector<T> Get() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  T* get() { return p_; }

 private:
  size_t n_;
  T* p_ = nullptr;
};

std::vector<float> Random(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// bf16 as the device stores it (round to nearest even), back in fp32.
float Bf16Round(float x) { return model::Bf16ToFloat(model::FloatToBf16(x)); }
std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = model::FloatToBf16(v[i]);
  return out;
}
std::vector<float> RoundBf16(std::vector<float> v) {
  for (float& x : v) x = Bf16Round(x);
  return v;
}

// ||got - want|| / ||want||, NaN (an unwritten element) -> infinity.
double RelErr(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = cuda::DeviceCount();
    if (!n.ok() || *n == 0) {
      GTEST_SKIP() << "no CUDA device on this machine ("
                   << (n.ok() ? "0 devices" : n.status().ToString())
                   << "): GPU check owed, run scripts/gpu-check.sh on a GPU machine";
    }
    ASSERT_EQ(cublasCreate(&blas_), CUBLAS_STATUS_SUCCESS);
  }
  void TearDown() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
  }
  std::mt19937 rng_{std::random_device{}()};
  cublasHandle_t blas_ = nullptr;
};

TEST_F(CudaOpsTest, RmsNormMatchesCpu) {
  for (auto [rows, dim] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 7168}, {33, 512}, {5, 1536}, {0, 64}}) {
    std::vector<float> x = Random(rows * dim, rng_), w = Random(dim, rng_, 0.1f);
    for (float& v : w) v += 1.0f;
    std::vector<float> cpu(rows * dim), gpu(rows * dim, NAN);
    RmsNorm(x.data(), rows, dim, dim, w.data(), 1e-6f, cpu.data(), dim);
    ASSERT_TRUE(cuda::RmsNorm(x.data(), rows, dim, w.data(), 1e-6f, gpu.data()).ok());
    for (int64_t i = 0; i < rows * dim; ++i)
      ASSERT_NEAR(gpu[i], cpu[i], 1e-5f * (1 + std::fabs(cpu[i]))) << i;
  }
}

TEST_F(CudaOpsTest, SiluMulAndRopeMatchCpu) {
  const int64_t n = 3 * 18432;  // a token batch of V3's dense intermediate
  std::vector<float> g = Random(n, rng_), u = Random(n, rng_);
  Device<float> dg(g), du(u);
  ASSERT_TRUE(cuda::SiluMulDevice(dg.get(), du.get(), n, nullptr).ok());
  std::vector<float> got = dg.Get();
  SiluMul(g.data(), u.data(), n);
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], g[i], 1e-5f * (1 + std::fabs(g[i]))) << i;

  // q_pe of 128 heads x 192 (nope 128 + rope 64), 7 rows at scattered positions.
  const int64_t rows = 7, heads = 128, stride = 192, offset = 128, dim = 64;
  std::vector<float> x = Random(rows * heads * stride, rng_), inv(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * i / dim) / 40.0f;
  std::vector<int32_t> pos = {0, 1, 17, 4095, 4096, 70000, 163839};
  Device<float> dx(x), dinv(inv);
  Device<int32_t> dpos(pos);
  ASSERT_TRUE(
      cuda::RopeDevice(dx.get(), rows, heads, stride, offset, dim, dpos.get(), dinv.get(), nullptr)
          .ok());
  got = dx.Get();
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> cs(dim);
    for (int64_t i = 0; i < dim / 2; ++i) {
      const float angle = static_cast<float>(pos[r]) * inv[i];
      cs[2 * i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      cs[2 * i + 1] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    for (int64_t h = 0; h < heads; ++h) ApplyRope(&x[(r * heads + h) * stride + offset], cs.data(), dim);
  }
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(got[i], x[i], 1e-5f * (1 + std::fabs(x[i]))) << i;
}

TEST_F(CudaOpsTest, Fp8DequantMatchesTheLoader) {
  const int64_t rows = 300, cols = 200;  // ragged 128x128 edge blocks
  std::vector<uint8_t> fp8(rows * cols);
  for (auto& b : fp8) b = static_cast<uint8_t>(rng_() & 0x7E);  // finite E4M3 values, both signs
  for (size_t i = 0; i < fp8.size(); i += 3) fp8[i] |= 0x80;
  std::vector<float> scales(3 * 2);
  for (float& s : scales) s = std::exp(Random(1, rng_)[0]);
  Device<uint8_t> d8(fp8);
  Device<float> ds(scales);
  Device<uint16_t> out(rows * cols);
  out.Poison();
  ASSERT_TRUE(cuda::DequantFp8Device(d8.get(), ds.get(), rows, cols,
                                     reinterpret_cast<__nv_bfloat16*>(out.get()), nullptr)
                  .ok());
  std::vector<uint16_t> got = out.Get();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float want =
          Bf16Round(model::Fp8E4M3ToFloat(fp8[r * cols + c]) * scales[(r / 128) * 2 + c / 128]);
      ASSERT_EQ(model::Bf16ToFloat(got[r * cols + c]), want) << r << "," << c;
    }
  }
}

TEST_F(CudaOpsTest, Bf16GemmMatchesFp64OnV3Shapes) {
  // (m, k, n): q_b for a decode batch, the MoE gate, o_proj's K, an expert-sized projection.
  for (auto [m, k, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {8, 1536, 24576}, {64, 7168, 256}, {256, 16384, 512}, {33, 7168, 4096}}) {
    std::vector<float> x = RoundBf16(Random(m * k, rng_)), w = RoundBf16(Random(n * k, rng_, 0.02f));
    Device<uint16_t> dx(ToBf16(x)), dw(ToBf16(w));
    Device<float> dy(m * n);
    dy.Poison();
    ASSERT_TRUE(cuda::GemmBf16(blas_, reinterpret_cast<__nv_bfloat16*>(dx.get()), m, k,
                               reinterpret_cast<__nv_bfloat16*>(dw.get()), n, dy.get())
                    .ok());
    std::vector<float> got = dy.Get();
    std::vector<double> want(m * n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t t = 0; t < k; ++t) acc += static_cast<double>(x[i * k + t]) * w[j * k + t];
        want[i * n + j] = acc;
      }
    EXPECT_LT(RelErr(got, want), 1e-3) << m << "x" << k << "x" << n;
  }
}

TEST_F(CudaOpsTest, ExpertSelectionMatchesTheEngine) {
  model::ModelConfig c;  // DeepSeek-V3's gate
  c.n_routed_experts = 256;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.topk_method = model::TopkMethod::kNoauxTc;
  c.scoring_func = model::ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  const int64_t tokens = 257;
  std::vector<float> scores(tokens * 256), bias = Random(256, rng_, 0.1f);
  for (float& s : scores) s = 1.0f / (1.0f + std::exp(-Random(1, rng_)[0]));
  // Exact ties of score + bias inside token 0 (the selection ranks the biased scores).
  for (int64_t e = 0; e + 1 < 256; e += 17) {
    scores[e] = scores[e + 1];
    bias[e] = bias[e + 1];
  }
  Device<float> ds(scores), db(bias);
  Device<int32_t> de(tokens * 8);
  Device<float> dw(tokens * 8);
  dw.Poison();
  cuda::GateParams p{.n_experts = 256, .top_k = 8, .n_group = 8, .topk_group = 4,
                     .use_groups = true, .top2_group_score = true, .norm_topk_prob = true,
                     .routed_scaling_factor = 2.5f};
  ASSERT_TRUE(cuda::SelectExpertsDevice(ds.get(), db.get(), tokens, p, de.get(), dw.get(), nullptr).ok());
  std::vector<int32_t> experts = de.Get();
  std::vector<float> weights = dw.Get();
  for (int64_t t = 0; t < tokens; ++t) {
    engine::ExpertChoice want = engine::SelectExperts(
        c, absl::MakeConstSpan(&scores[t * 256], 256), bias);
    for (int k = 0; k < 8; ++k) {
      ASSERT_EQ(experts[t * 8 + k], want.experts[k]) << "token " << t << " slot " << k;
      ASSERT_NEAR(weights[t * 8 + k], want.weights[k], 1e-6f);
    }
  }
}

// The absorbed attention of the CPU engine, in double, over the bf16 cache values.
std::vector<double> MlaReference(const std::vector<float>& q, const std::vector<float>& cache,
                                 const std::vector<int32_t>& table, const std::vector<int32_t>& lens,
                                 const cuda::MlaShape& s, float scale) {
  std::vector<double> out(static_cast<size_t>(s.batch) * s.heads * s.kv_lora_rank);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const float* qh = &q[(static_cast<size_t>(b) * s.heads + h) * s.latent_dim];
      std::vector<double> score(lens[b]);
      double mx = -INFINITY;
      auto row = [&](int t) {
        const int blk = table[b * s.max_blocks + t / s.block_tokens];
        return &cache[(static_cast<size_t>(blk) * s.block_tokens + t % s.block_tokens) * s.latent_dim];
      };
      for (int t = 0; t < lens[b]; ++t) {
        double dot = 0;
        for (int d = 0; d < s.latent_dim; ++d) dot += static_cast<double>(qh[d]) * row(t)[d];
        score[t] = dot * scale;
        mx = std::max(mx, score[t]);
      }
      double sum = 0;
      for (double& v : score) sum += (v = std::exp(v - mx));
      double* o = &out[(static_cast<size_t>(b) * s.heads + h) * s.kv_lora_rank];
      for (int t = 0; t < lens[b]; ++t)
        for (int d = 0; d < s.kv_lora_rank; ++d) o[d] += score[t] / sum * row(t)[d];
    }
  }
  return out;
}

TEST_F(CudaOpsTest, MlaDecodeOverPagedCacheMatchesTheCpuMath) {
  struct Config {
    bool bf16;
    int heads, latent, rank;
  };
  // V3 in bf16 and fp32 (a 72 KB shared tile: the raised limit), and the tiny model's odd shape
  // (latent 80, not a multiple of 32; 4 heads, not a multiple of the 8-head groups).
  for (const Config& cfg : std::vector<Config>{{true, 128, 576, 512}, {false, 128, 576, 512},
                                               {false, 4, 80, 64}}) {
    for (int splits : {1, 4, 16}) {
      cuda::MlaShape s;
      s.batch = 4;
      s.heads = cfg.heads;
      s.latent_dim = cfg.latent;
      s.kv_lora_rank = cfg.rank;
      s.block_tokens = 64;
      s.splits = splits;
      const std::vector<int32_t> lens = {1, 63, 700, 4100};
      s.max_blocks = (4100 + 63) / 64;
      const int num_blocks = 4 * s.max_blocks + 3;
      // Shuffled block ids: sequences' blocks are scattered through the cache.
      std::vector<int32_t> ids(num_blocks);
      for (int i = 0; i < num_blocks; ++i) ids[i] = i;
      std::shuffle(ids.begin(), ids.end(), rng_);
      std::vector<int32_t> table(s.batch * s.max_blocks);
      for (size_t i = 0; i < table.size(); ++i) table[i] = ids[i];
      std::vector<float> cache =
          Random(static_cast<size_t>(num_blocks) * 64 * cfg.latent, rng_);
      if (cfg.bf16) cache = RoundBf16(cache);
      std::vector<float> q = Random(static_cast<size_t>(s.batch) * s.heads * cfg.latent, rng_);
      const float scale = 1.0f / std::sqrt(192.0f);
      Device<float> dq(q), dws(cuda::MlaWorkspaceFloats(s)), dout(s.batch * s.heads * cfg.rank);
      Device<int32_t> dtable(table), dlens(lens);
      dout.Poison();
      if (cfg.bf16) {
        Device<uint16_t> dcache(ToBf16(cache));
        ASSERT_TRUE(cuda::MlaDecodeDevice(dq.get(), reinterpret_cast<__nv_bfloat16*>(dcache.get()),
                                          dtable.get(), dlens.get(), s, scale, dws.get(),
                                          dout.get(), nullptr)
                        .ok());
        const double err = RelErr(dout.Get(), MlaReference(q, cache, table, lens, s, scale));
        EXPECT_LT(err, 1e-4) << "bf16 cache, splits " << splits;  // fp32 math on exact inputs
      } else {
        Device<float> dcache(cache);
        ASSERT_TRUE(cuda::MlaDecodeDevice(dq.get(), dcache.get(), dtable.get(), dlens.get(), s,
                                          scale, dws.get(), dout.get(), nullptr)
                        .ok());
        const double err = RelErr(dout.Get(), MlaReference(q, cache, table, lens, s, scale));
        EXPECT_LT(err, 1e-4) << "fp32 cache, latent " << cfg.latent << ", splits " << splits;
      }
    }
  }
}

TEST_F(CudaOpsTest, GroupedExpertsMatchTheCpuExperts) {
  const int hidden = 7168, inter = 2048, n_experts = 16, top_k = 8, tokens = 12;
  std::vector<std::vector<float>> gu(n_experts), dn(n_experts);
  std::vector<std::unique_ptr<Device<uint16_t>>> dgu, ddn;
  std::vector<const __nv_bfloat16*> gate_up(n_experts), down(n_experts);
  for (int e = 0; e < n_experts; ++e) {
    gu[e] = RoundBf16(Random(2 * inter * hidden, rng_, 0.02f));
    dn[e] = RoundBf16(Random(hidden * inter, rng_, 0.02f));
    dgu.push_back(std::make_unique<Device<uint16_t>>(ToBf16(gu[e])));
    ddn.push_back(std::make_unique<Device<uint16_t>>(ToBf16(dn[e])));
    gate_up[e] = reinterpret_cast<__nv_bfloat16*>(dgu.back()->get());
    down[e] = reinterpret_cast<__nv_bfloat16*>(ddn.back()->get());
  }
  gate_up[5] = down[5] = nullptr;  // an expert held elsewhere: no token here names it
  std::vector<float> x = Random(tokens * hidden, rng_);
  std::vector<int32_t> experts(tokens * top_k);
  std::vector<float> weights = Random(tokens * top_k, rng_, 0.3f);
  for (int t = 0; t < tokens; ++t) {
    std::vector<int32_t> all;
    for (int e = 0; e < n_experts; ++e) {
      if (e != 5) all.push_back(e);
    }
    std::shuffle(all.begin(), all.end(), rng_);
    for (int k = 0; k < top_k; ++k) experts[t * top_k + k] = all[k];
  }
  Device<float> dx(x), dw(weights), dout(tokens * hidden);
  Device<int32_t> de(experts);
  dout.Poison();
  cuda::MoeShape shape{.tokens = tokens, .hidden = hidden, .inter = inter, .top_k = top_k,
                       .n_experts = n_experts};
  ASSERT_TRUE(cuda::MoeExpertsDevice(blas_, dx.get(), de.get(), dw.get(), gate_up, down, shape,
                                     dout.get(), nullptr)
                  .ok());
  // The reference: bf16-rounded activations into each GEMM (as on the device), double sums.
  std::vector<double> want(tokens * hidden, 0.0);
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> xt(x.begin() + t * hidden, x.begin() + (t + 1) * hidden);
    xt = RoundBf16(xt);
    for (int k = 0; k < top_k; ++k) {
      const int e = experts[t * top_k + k];
      std::vector<float> act(inter);
      for (int j = 0; j < inter; ++j) {
        double g = 0, u = 0;
        for (int i = 0; i < hidden; ++i) {
          g += static_cast<double>(gu[e][static_cast<size_t>(j) * hidden + i]) * xt[i];
          u += static_cast<double>(gu[e][static_cast<size_t>(inter + j) * hidden + i]) * xt[i];
        }
        act[j] = Bf16Round(static_cast<float>(g / (1 + std::exp(-g)) * u));
      }
      for (int i = 0; i < hidden; ++i) {
        double y = 0;
        for (int j = 0; j < inter; ++j) y += static_cast<double>(dn[e][static_cast<size_t>(i) * inter + j]) * act[j];
        want[t * hidden + i] += weights[t * top_k + k] * y;
      }
    }
  }
  EXPECT_LT(RelErr(dout.Get(), want), 2e-3);
  // Refused before any GEMM, as on the CPU: a slot naming the expert not held, a token naming
  // one expert twice.
  for (auto [slot, id, needle] : {std::tuple{3, 5, "expert 5 is not held"},
                                  std::tuple{top_k + 1, -1, "names expert"}}) {
    std::vector<int32_t> bad = experts;
    bad[slot] = id == -1 ? bad[top_k] : id;  // token 1's first expert again
    Device<int32_t> dbad(bad);
    const absl::Status s = cuda::MoeExpertsDevice(blas_, dx.get(), dbad.get(), dw.get(), gate_up,
                                                  down, shape, dout.get(), nullptr);
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  }
}

}  // namespace
}  // namespace splitmoe::kernels
