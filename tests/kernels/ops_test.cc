// The op interface (common/kernels/ops.h): each op on the CPU against a reference written here
// from its definition (double-precision loops), each capability check refusing what it names,
// and, where this build has CUDA and the machine a GPU, each op on the GPU against the CPU on the
// same inputs (the Cuda* cases: skipped, never passed, without a device; ctest runs them as the
// separate ops_cuda_test so a skip reads as a skip).
#include "common/kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/engine/routing.h"
#include "common/model/numeric.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

#ifdef SPLITMOE_OPS_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/ops_cuda.h"
#endif

namespace splitmoe::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Every op's inputs, the same on both backends.
struct Inputs {
  static constexpr int64_t kRows = 5, kDim = 200, kStride = 211;
  std::vector<float> x = Random(kRows * kStride, 1);
  std::vector<float> weight = Random(kDim, 2);
  std::vector<float> gate = Random(1000, 3, 4.0f), up = Random(1000, 4);
  // RoPE: 5 rows of 3 heads of 96 values, rotating [64, 96) at positions far apart.
  std::vector<float> heads = Random(kRows * 3 * 96, 5);
  std::vector<int32_t> positions = {0, 1, 17, 4095, 163839};
  std::vector<float> inv_freq = [] {
    std::vector<float> f(16);
    for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / 32));
    return f;
  }();
  model::Matrix w = [] {
    model::Matrix m;
    m.rows = 70;
    m.cols = 130;
    m.data = Random(70 * 130, 6, 0.1f);
    return m;
  }();
  std::vector<float> lx = Random(9 * 130, 7);
};

// MLA attention's inputs: one layer's pool of latent blocks (the FlashMLA layout) holding four
// sequences in shuffled blocks — a 5-token prompt, and one decode row each after 70, 130 and
// 1100 cached tokens (long enough that a device splits its context) — and their absorbed
// queries.
struct MlaCase {
  static constexpr int64_t kHeads = 3, kRank = 32, kRope = 16, kLat = 48, kBlock = 16,
                           kPoolBlocks = 96, kRows = 8;
  struct Seq {
    int64_t rows, start;
    std::vector<int32_t> blocks;  // indices into the pool
  };
  std::vector<Seq> seqs = {{5, 0, {}}, {1, 70, {}}, {1, 130, {}}, {1, 1100, {}}};
  std::vector<float> pool = Random(kPoolBlocks * kBlock * kLat, 11);
  std::vector<uint16_t> pool_bf16;
  std::vector<float> q = Random(kRows * kHeads * kLat, 13, 0.5f);
  std::vector<MlaSequence> storage;

  MlaCase() {
    std::vector<int32_t> order(kPoolBlocks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(12));
    size_t next = 0;
    for (Seq& s : seqs) {
      for (int64_t b = 0; b * kBlock < s.start + s.rows; ++b) s.blocks.push_back(order[next++]);
    }
    for (float v : pool) pool_bf16.push_back(model::FloatToBf16(v));
  }
  // The pool's blocks `stride` values apart (> kBlock * kLat), after `offset` values, the gaps
  // poisoned with NaN: one layer of a pool that interleaves the layers of each block, as the
  // decode worker's arena does.
  template <typename T>
  static std::vector<T> Strided(const std::vector<T>& packed, int64_t stride, int64_t offset,
                                T poison) {
    std::vector<T> out(static_cast<size_t>(kPoolBlocks * stride), poison);
    for (int64_t b = 0; b < kPoolBlocks; ++b) {
      std::copy(packed.begin() + b * kBlock * kLat, packed.begin() + (b + 1) * kBlock * kLat,
                out.begin() + b * stride + offset);
    }
    return out;
  }
  // The params over a pool at `base` (host or device memory) stored as `dtype`, its blocks
  // `stride` values apart (0: packed).
  MlaAttentionParams Params(const void* base, LatentStorage dtype, const float* qp, float* out,
                            int64_t stride = 0) {
    const int64_t elem = dtype == LatentStorage::kBFloat16 ? 2 : 4;
    const int64_t step = stride != 0 ? stride : kBlock * kLat;
    storage.clear();
    int64_t row = 0;
    for (const Seq& s : seqs) {
      MlaSequence m;
      m.latents.dtype = dtype;
      m.latents.block_tokens = kBlock;
      m.latents.keys = s.start + s.rows;
      for (int32_t b : s.blocks) {
        m.latents.blocks.push_back(static_cast<const char*>(base) + b * step * elem);
      }
      m.first_row = row;
      m.rows = s.rows;
      m.start = s.start;
      storage.push_back(std::move(m));
      row += s.rows;
    }
    MlaAttentionParams p;
    p.heads = kHeads;
    p.kv_lora_rank = kRank;
    p.rope_dim = kRope;
    p.softmax_scale = 0.3f;
    p.q = qp;
    p.out = out;
    p.sequences = storage;
    p.pool = base;
    p.pool_blocks = kPoolBlocks;
    p.pool_block_stride = stride;
    return p;
  }
  // Its definition in double: out = softmax(scale * q . k_t, t <= position) @ c_kv.
  std::vector<float> Reference(bool bf16) const {
    std::vector<float> out(kRows * kHeads * kRank);
    int64_t row = 0;
    for (const Seq& s : seqs) {
      for (int64_t t = 0; t < s.rows; ++t, ++row) {
        const int64_t keys = s.start + t + 1;
        for (int64_t h = 0; h < kHeads; ++h) {
          const float* qv = &q[(row * kHeads + h) * kLat];
          auto latent = [&](int64_t key, int64_t i) -> double {
            const int64_t at = (s.blocks[key / kBlock] * kBlock + key % kBlock) * kLat + i;
            return bf16 ? model::Bf16ToFloat(pool_bf16[at]) : pool[at];
          };
          std::vector<double> w(keys);
          double top = -1e300, sum = 0;
          for (int64_t k = 0; k < keys; ++k) {
            double dot = 0;
            for (int64_t i = 0; i < kLat; ++i) dot += qv[i] * latent(k, i);
            w[k] = 0.3 * dot;
            top = std::max(top, w[k]);
          }
          for (double& v : w) sum += (v = std::exp(v - top));
          for (int64_t i = 0; i < kRank; ++i) {
            double acc = 0;
            for (int64_t k = 0; k < keys; ++k) acc += w[k] / sum * latent(k, i);
            out[(row * kHeads + h) * kRank + i] = static_cast<float>(acc);
          }
        }
      }
    }
    return out;
  }
};

// Gate configurations of every selection mode: V2's group-limited softmax gate and V3's
// noaux_tc sigmoid gate with a bias (64 experts, 8 groups), and a greedy one.
std::vector<model::ModelConfig> GateConfigs() {
  model::ModelConfig v3;
  v3.n_routed_experts = 64;
  v3.num_experts_per_tok = 8;
  v3.n_group = 8;
  v3.topk_group = 4;
  v3.topk_method = model::TopkMethod::kNoauxTc;
  v3.scoring_func = model::ScoringFunc::kSigmoid;
  v3.norm_topk_prob = true;
  v3.routed_scaling_factor = 2.5;
  model::ModelConfig v2 = v3;
  v2.topk_method = model::TopkMethod::kGroupLimitedGreedy;
  v2.scoring_func = model::ScoringFunc::kSoftmax;
  v2.norm_topk_prob = false;
  v2.num_experts_per_tok = 6;
  v2.topk_group = 3;
  v2.routed_scaling_factor = 16.0;
  model::ModelConfig greedy = v2;
  greedy.topk_method = model::TopkMethod::kGreedy;
  greedy.n_group = 1;
  greedy.topk_group = 1;
  return {v3, v2, greedy};
}

// A BF16 weight held in place (a narrow model::Matrix), and its values as fp32.
struct Bf16Weight {
  std::vector<uint16_t> bits;
  model::Matrix m;       // narrow: reads `bits`
  model::Matrix widened; // fp32, the same values
  Bf16Weight(int64_t rows, int64_t cols, uint32_t seed, float scale) {
    const std::vector<float> values = Random(rows * cols, seed, scale);
    widened.rows = m.rows = rows;
    widened.cols = m.cols = cols;
    for (float v : values) {
      bits.push_back(model::FloatToBf16(v));
      widened.data.push_back(model::Bf16ToFloat(bits.back()));
    }
    m.dtype = model::WeightDType::kBFloat16;
    m.raw = reinterpret_cast<const uint8_t*>(bits.data());
  }
};

// kv_b_proj's per-head products by their definition, in double: kAbsorbQuery gives
// [q_nope[h] @ W_UK[h], q_pe[h]], kApplyValue x[h] @ W_UV[h]^T.
std::vector<float> MlaProjectReference(const MlaProjectParams& p, const std::vector<float>& kvb) {
  const int64_t H = p.heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim, kvr = p.kv_b->cols;
  const bool q = p.kind == MlaProjectParams::Kind::kAbsorbQuery;
  const int64_t in = q ? dn + dr : kvr, outw = q ? kvr + dr : dv;
  std::vector<float> out(p.rows * H * outw);
  for (int64_t t = 0; t < p.rows; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const float* x = p.x + (t * H + h) * in;
      float* o = out.data() + (t * H + h) * outw;
      if (q) {
        for (int64_t c = 0; c < kvr; ++c) {
          double acc = 0;
          for (int64_t r = 0; r < dn; ++r) acc += double(x[r]) * kvb[(h * (dn + dv) + r) * kvr + c];
          o[c] = static_cast<float>(acc);
        }
        for (int64_t i = 0; i < dr; ++i) o[kvr + i] = x[dn + i];
      } else {
        for (int64_t r = 0; r < dv; ++r) {
          double acc = 0;
          for (int64_t c = 0; c < kvr; ++c) acc += double(x[c]) * kvb[(h * (dn + dv) + dn + r) * kvr + c];
          o[r] = static_cast<float>(acc);
        }
      }
    }
  }
  return out;
}

// Six SwiGLU experts (hidden 40, inter 24) in BF16, expert 4 not held; 7 tokens' slots of
// top_k 3, some padded with kNoExpertSlot.
struct ExpertsCase {
  static constexpr int64_t kHidden = 40, kInter = 24, kExperts = 6, kTopK = 3;
  std::vector<std::unique_ptr<Bf16Weight>> parts;  // gate, up, down per expert
  std::vector<model::MlpWeights> narrow, wide;      // BF16 in place / the same values in fp32
  std::vector<const model::MlpWeights*> held_narrow, held_wide;
  int64_t tokens = 0;
  std::vector<float> x;
  std::vector<int32_t> slots;
  std::vector<float> weights;

  explicit ExpertsCase(int64_t n_tokens) : tokens(n_tokens) {
    narrow.resize(kExperts);
    wide.resize(kExperts);
    for (int64_t e = 0; e < kExperts; ++e) {
      for (int part = 0; part < 3; ++part) {
        const bool down = part == 2;
        parts.push_back(std::make_unique<Bf16Weight>(down ? kHidden : kInter,
                                                     down ? kInter : kHidden,
                                                     static_cast<uint32_t>(40 + 3 * e + part), 0.2f));
      }
      const size_t b = parts.size() - 3;
      narrow[e] = {parts[b]->m, parts[b + 1]->m, parts[b + 2]->m};
      wide[e] = {parts[b]->widened, parts[b + 1]->widened, parts[b + 2]->widened};
    }
    for (int64_t e = 0; e < kExperts; ++e) {
      held_narrow.push_back(e == 4 ? nullptr : &narrow[e]);
      held_wide.push_back(e == 4 ? nullptr : &wide[e]);
    }
    x = Random(tokens * kHidden, 41);
    std::mt19937 rng(42);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int32_t> ids = {0, 1, 2, 3, 5};
      std::shuffle(ids.begin(), ids.end(), rng);
      const int64_t used = 1 + t % kTopK;  // 1 to 3 experts, the rest padded
      for (int64_t i = 0; i < kTopK; ++i) {
        slots.push_back(i < used ? ids[i] : kNoExpertSlot);
        weights.push_back(i < used ? 0.1f + 0.3f * static_cast<float>(i) : 0.0f);
      }
    }
  }
  RoutedExpertsParams Params(bool bf16, float* out) const {
    RoutedExpertsParams p;
    p.x = x.data();
    p.tokens = tokens;
    p.hidden = kHidden;
    p.inter = kInter;
    p.top_k = kTopK;
    p.experts = slots.data();
    p.weights = weights.data();
    p.host = bf16 ? held_narrow : held_wide;
    p.out = out;
    return p;
  }
  // By the definition, in double.
  std::vector<float> Reference() const {
    std::vector<float> out(tokens * kHidden);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<double> acc(kHidden, 0.0);
      for (int64_t i = 0; i < kTopK; ++i) {
        const int32_t e = slots[t * kTopK + i];
        if (e == kNoExpertSlot) continue;
        const model::MlpWeights& w = wide[e];
        std::vector<double> act(kInter);
        for (int64_t j = 0; j < kInter; ++j) {
          double g = 0, u = 0;
          for (int64_t c = 0; c < kHidden; ++c) {
            g += double(x[t * kHidden + c]) * w.gate.data[j * kHidden + c];
            u += double(x[t * kHidden + c]) * w.up.data[j * kHidden + c];
          }
          act[j] = g / (1.0 + std::exp(-g)) * u;
        }
        for (int64_t c = 0; c < kHidden; ++c) {
          double d = 0;
          for (int64_t j = 0; j < kInter; ++j) d += act[j] * w.down.data[c * kInter + j];
          acc[c] += weights[t * kTopK + i] * d;
        }
      }
      for (int64_t c = 0; c < kHidden; ++c) out[t * kHidden + c] = static_cast<float>(acc[c]);
    }
    return out;
  }
};

TEST(OpsTest, ParseDeviceIsTheInverseOfDeviceName) {
  for (const char* name : {"cpu", "cuda:0", "cuda:3", "cuda:1234"}) {
    absl::StatusOr<Device> d = ParseDevice(name);
    ASSERT_TRUE(d.ok()) << name << ": " << d.status();
    EXPECT_EQ(DeviceName(*d), name);
  }
  EXPECT_EQ(ParseDevice("cuda:7")->backend, Backend::kCuda);
  EXPECT_EQ(ParseDevice("cuda:7")->index, 7);
  EXPECT_EQ(ParseDevice("cpu")->backend, Backend::kCpu);
  for (const char* bad : {"", "gpu", "cuda", "cuda:", "cuda:-1", "cuda:+1", "cuda:1x", "CPU",
                          "cuda: 1", "cuda:99999", "cpu:0", "cuda:0 "}) {
    absl::StatusOr<Device> d = ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << "'" << bad << "' was taken";
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(d.status().message()), ::testing::HasSubstr(absl::StrCat("'", bad, "'")));
  }
}

TEST(OpsTest, RmsNormMatchesItsDefinitionStridedAndInPlace) {
  Inputs in;
  const int64_t rows = Inputs::kRows, dim = Inputs::kDim, xs = Inputs::kStride, os = 203;
  std::vector<float> out(rows * os, std::nanf(""));
  ASSERT_TRUE(RmsNorm(Device{}, {in.x.data(), rows, dim, xs, in.weight.data(), 1e-6f, out.data(), os}).ok());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(in.x[r * xs + i]) * in.x[r * xs + i];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
    for (int64_t i = 0; i < dim; ++i)
      ASSERT_NEAR(out[r * os + i], in.x[r * xs + i] * inv * in.weight[i], 2e-6) << r << "," << i;
    for (int64_t i = dim; i < os; ++i) ASSERT_TRUE(std::isnan(out[r * os + i]));  // untouched
  }
  std::vector<float> inplace = in.x;
  ASSERT_TRUE(RmsNorm(Device{}, {inplace.data(), rows, dim, xs, in.weight.data(), 1e-6f,
                                 inplace.data(), xs}).ok());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) ASSERT_EQ(inplace[r * xs + i], out[r * os + i]);
}

TEST(OpsTest, SwiGluMatchesItsDefinition) {
  Inputs in;
  std::vector<float> g = in.gate;
  ASSERT_TRUE(SwiGlu(Device{}, {g.data(), in.up.data(), 1000}).ok());
  for (size_t i = 0; i < g.size(); ++i) {
    const double a = in.gate[i];
    ASSERT_NEAR(g[i], a / (1.0 + std::exp(-a)) * in.up[i], 1e-5 * (1 + std::fabs(g[i]))) << i;
  }
  // Every length's tail, gates far out on both sides (e^-|g| below fp32's normal range past
  // 87), within 4 ulp of the double definition.
  for (int64_t n = 1; n <= 19; ++n) {
    std::vector<float> gate = Random(n, 50 + static_cast<uint32_t>(n), 40.0f), up = Random(n, 51);
    gate[0] = n % 2 == 0 ? 95.0f : -95.0f;
    std::vector<float> out = gate;
    ASSERT_TRUE(SwiGlu(Device{}, {out.data(), up.data(), n}).ok());
    for (int64_t i = 0; i < n; ++i) {
      const double a = gate[i], want = a / (1.0 + std::exp(-a)) * up[i];
      ASSERT_NEAR(out[i], want, 4 * std::numeric_limits<float>::epsilon() * std::fabs(want) + 1e-37)
          << "n " << n << " at " << i << ", gate " << gate[i];
    }
  }
  // The special values: what g / (1 + e^-g) * up gives.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> special = {inf, -0.0f, 0.0f, std::nanf("")}, ones(4, 1.0f);
  ASSERT_TRUE(SwiGlu(Device{}, {special.data(), ones.data(), 4}).ok());
  EXPECT_EQ(special[0], inf);
  EXPECT_EQ(special[1], 0.0f);
  EXPECT_EQ(special[2], 0.0f);
  EXPECT_TRUE(std::isnan(special[3]));
}

TEST(OpsTest, RopeRotatesInterleavedPairsOfEveryHead) {
  Inputs in;
  std::vector<float> x = in.heads;
  ASSERT_TRUE(Rope(Device{}, {x.data(), Inputs::kRows, 3, 96, 64, 32, in.positions.data(),
                              in.inv_freq.data()}).ok());
  for (int64_t r = 0; r < Inputs::kRows; ++r) {
    for (int64_t h = 0; h < 3; ++h) {
      const int64_t base = (r * 3 + h) * 96;
      for (int64_t i = 0; i < 64; ++i) ASSERT_EQ(x[base + i], in.heads[base + i]);  // nope part
      for (int64_t i = 0; i < 16; ++i) {
        const double angle = static_cast<float>(in.positions[r]) * in.inv_freq[i];
        const double a = in.heads[base + 64 + 2 * i], b = in.heads[base + 64 + 2 * i + 1];
        ASSERT_NEAR(x[base + 64 + 2 * i], a * std::cos(angle) - b * std::sin(angle), 1e-5);
        ASSERT_NEAR(x[base + 64 + 2 * i + 1], a * std::sin(angle) + b * std::cos(angle), 1e-5);
      }
    }
  }
}

TEST(OpsTest, LinearMatchesItsDefinition) {
  Inputs in;
  std::vector<float> y(9 * 70);
  ASSERT_TRUE(Linear(Device{}, LinearParams{in.lx.data(), 9, &in.w, nullptr,
                                            model::WeightDType::kFloat32, y.data()}).ok());
  for (int64_t i = 0; i < 9; ++i) {
    for (int64_t j = 0; j < 70; ++j) {
      double ref = 0;
      for (int64_t c = 0; c < 130; ++c) ref += double(in.lx[i * 130 + c]) * in.w.data[j * 130 + c];
      ASSERT_NEAR(y[i * 70 + j], ref, 1e-4) << i << "," << j;
    }
  }
}

TEST(OpsTest, EmbedWidensTheTokensRowsAndRefusesOutsideTheTable) {
  // A BF16 table held in place (narrow): rows widened exactly.
  const int64_t rows = 11, cols = 40;
  std::vector<uint16_t> bits(rows * cols);
  std::vector<float> widened(rows * cols);
  std::vector<float> values = Random(rows * cols, 21);
  for (size_t i = 0; i < bits.size(); ++i) {
    bits[i] = model::FloatToBf16(values[i]);
    widened[i] = model::Bf16ToFloat(bits[i]);
  }
  model::Matrix table;
  table.rows = rows;
  table.cols = cols;
  table.dtype = model::WeightDType::kBFloat16;
  table.raw = reinterpret_cast<const uint8_t*>(bits.data());
  const std::vector<int32_t> tokens = {3, 0, 10, 3};
  std::vector<float> out(4 * cols, std::nanf(""));
  ASSERT_TRUE(Embed(Device{}, {tokens.data(), 4, &table, nullptr, out.data()}).ok());
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(out[r * cols + c], widened[tokens[r] * cols + c]);
  }
  const std::vector<int32_t> bad = {1, 11};
  std::vector<float> untouched(2 * cols, 7.0f);
  const absl::Status s = Embed(Device{}, {bad.data(), 2, &table, nullptr, untouched.data()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("row 1: token id 11 outside"));
  EXPECT_EQ(untouched, std::vector<float>(2 * cols, 7.0f));  // nothing written
}

TEST(OpsTest, AddMatchesItsDefinition) {
  std::vector<float> h = Random(333, 22), d = Random(333, 23), expect(333);
  for (size_t i = 0; i < h.size(); ++i) expect[i] = h[i] + d[i];
  ASSERT_TRUE(Add(Device{}, {h.data(), d.data(), 333}).ok());
  EXPECT_EQ(h, expect);
}

TEST(OpsTest, MlaAttentionMatchesItsDefinitionOverShuffledBlocks) {
  for (LatentStorage dtype : {LatentStorage::kFloat32, LatentStorage::kBFloat16}) {
    MlaCase c;
    const bool bf16 = dtype == LatentStorage::kBFloat16;
    std::vector<float> out(MlaCase::kRows * MlaCase::kHeads * MlaCase::kRank, std::nanf(""));
    const void* base = bf16 ? static_cast<const void*>(c.pool_bf16.data()) : c.pool.data();
    ASSERT_TRUE(MlaAttention(Device{}, c.Params(base, dtype, c.q.data(), out.data())).ok());
    const std::vector<float> ref = c.Reference(bf16);
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << (bf16 ? "bf16 " : "fp32 ") << i;
    }
  }
}

TEST(OpsTest, MlaAttentionReadsOneLayerOfAStridedPool) {
  MlaCase c;
  const int64_t block = MlaCase::kBlock * MlaCase::kLat, stride = 3 * block;
  const std::vector<float> strided = MlaCase::Strided(c.pool, stride, block, std::nanf(""));
  std::vector<float> out(MlaCase::kRows * MlaCase::kHeads * MlaCase::kRank, std::nanf(""));
  ASSERT_TRUE(MlaAttention(Device{}, c.Params(strided.data() + block, LatentStorage::kFloat32,
                                              c.q.data(), out.data(), stride))
                  .ok());
  const std::vector<float> ref = c.Reference(false);
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << i;
  }
}

TEST(OpsTest, ScoresAreASoftmaxOrASigmoidPerRow) {
  const std::vector<float> x = Random(3 * 50, 24, 3.0f);
  for (bool sigmoid : {false, true}) {
    std::vector<float> s = x;
    ASSERT_TRUE(Scores(Device{}, {s.data(), 3, 50, sigmoid}).ok());
    for (int64_t r = 0; r < 3; ++r) {
      double top = -1e300, sum = 0;
      for (int64_t e = 0; e < 50; ++e) top = std::max(top, double(x[r * 50 + e]));
      for (int64_t e = 0; e < 50; ++e) sum += std::exp(x[r * 50 + e] - top);
      for (int64_t e = 0; e < 50; ++e) {
        const double v = x[r * 50 + e];
        const double want = sigmoid ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v - top) / sum;
        ASSERT_NEAR(s[r * 50 + e], want, 1e-6) << sigmoid << " " << r << "," << e;
      }
    }
  }
}

TEST(OpsTest, SelectExpertsIsEachRowsSelectionWithTheBias) {
  for (const model::ModelConfig& c : GateConfigs()) {
    const int64_t rows = 9, n = c.n_routed_experts, k = c.num_experts_per_tok;
    std::vector<float> scores = Random(rows * n, 25);
    ScoresParams sp{scores.data(), rows, n, c.scoring_func == model::ScoringFunc::kSigmoid};
    ASSERT_TRUE(Scores(Device{}, sp).ok());
    const std::vector<float> bias = Random(n, 26, 0.5f);
    std::vector<int32_t> experts(rows * k, -7);
    std::vector<float> weights(rows * k);
    ASSERT_TRUE(SelectExperts(Device{}, {&c, scores.data(), bias.data(), rows, experts.data(),
                                         weights.data()}).ok());
    for (int64_t r = 0; r < rows; ++r) {
      const engine::ExpertChoice want = engine::SelectExperts(
          c, absl::MakeConstSpan(scores.data() + r * n, n), c.HasScoreBias()
                                                               ? absl::MakeConstSpan(bias)
                                                               : absl::Span<const float>());
      EXPECT_EQ(std::vector<int32_t>(experts.begin() + r * k, experts.begin() + (r + 1) * k),
                want.experts) << "row " << r;
      EXPECT_EQ(std::vector<float>(weights.begin() + r * k, weights.begin() + (r + 1) * k),
                want.weights) << "row " << r;
    }
  }
}

TEST(OpsTest, MlaProjectIsEachHeadsProductWithItsSliceOfKvB) {
  // 4 heads, nope 24, rope 8, v 20, rank 48; fp32 and BF16 weights, at a decode size (3 rows:
  // the streamed path for BF16) and a prefill size (40 rows: the heads side by side).
  const int64_t H = 4, dn = 24, dr = 8, dv = 20, kvr = 48;
  Bf16Weight kvb(H * (dn + dv), kvr, 31, 0.2f);
  using Kind = MlaProjectParams::Kind;
  for (const model::Matrix* w : {&kvb.widened, &kvb.m}) {
    for (int64_t rows : {3, 40}) {
      for (Kind kind : {Kind::kAbsorbQuery, Kind::kApplyValue}) {
        const int64_t in = kind == Kind::kAbsorbQuery ? dn + dr : kvr;
        const int64_t outw = kind == Kind::kAbsorbQuery ? kvr + dr : dv;
        const std::vector<float> x = Random(rows * H * in, 32);
        std::vector<float> out(rows * H * outw, std::nanf(""));
        const MlaProjectParams p{kind, x.data(), rows, H, dn, dr, dv, w, nullptr, out.data()};
        ASSERT_TRUE(MlaProject(Device{}, p).ok());
        const std::vector<float> ref = MlaProjectReference(p, kvb.widened.data);
        for (size_t i = 0; i < ref.size(); ++i) {
          ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::fabs(ref[i])))
              << (w->narrow() ? "bf16" : "fp32") << " rows " << rows << " kind "
              << static_cast<int>(kind) << " at " << i;
        }
      }
    }
  }
}

TEST(OpsTest, RoutedExpertsSumEachTokensExpertsAndSkipEmptySlots) {
  // 7 tokens (decode sizes: BF16 experts grouped) and 70 (prefill sizes), fp32 and BF16.
  for (int64_t tokens : {7, 70}) {
    ExpertsCase c(tokens);
    const std::vector<float> ref = c.Reference();
    for (bool bf16 : {false, true}) {
      std::vector<float> out(tokens * ExpertsCase::kHidden, std::nanf(""));
      ASSERT_TRUE(RoutedExperts(Device{}, c.Params(bf16, out.data())).ok());
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_NEAR(out[i], ref[i], 1e-5 * (1 + std::fabs(ref[i])))
            << tokens << " tokens, " << (bf16 ? "bf16" : "fp32") << " at " << i;
      }
    }
  }
  // Refused before anything is written: an expert not held, one out of range, one twice.
  ExpertsCase c(2);
  for (auto [slot, value, needle] :
       {std::tuple{1, 4, "expert 4 is not held"}, std::tuple{1, 6, "expert 6 is not held"},
        std::tuple{4, 0, "token 1 names expert"}}) {
    ExpertsCase bad(2);
    bad.slots = {0, 1, kNoExpertSlot, 0, 2, kNoExpertSlot};
    bad.slots[slot] = value;
    std::vector<float> out(2 * ExpertsCase::kHidden, 7.0f);
    const absl::Status s = RoutedExperts(Device{}, bad.Params(true, out.data()));
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr(needle)) << s;
    EXPECT_EQ(out, std::vector<float>(out.size(), 7.0f));
  }
  model::MlpWeights wrong = c.wide[0];
  std::swap(wrong.gate, wrong.down);
  std::vector<const model::MlpWeights*> held = c.held_wide;
  held[2] = &wrong;
  RoutedExpertsParams p = c.Params(false, nullptr);
  std::vector<float> out(2 * ExpertsCase::kHidden);
  p.out = out.data();
  p.host = held;
  EXPECT_THAT(std::string(RoutedExperts(Device{}, p).message()),
              ::testing::HasSubstr("expert 2 is not a 40 -> 24 -> 40 MLP"));
}

// StoreLatents' definition, written here: row r to value table[pos / bt] * stride +
// (pos % bt) * lat of the pool (stride 0: bt * lat, the packed blocks).
std::vector<float> StoreReference(const std::vector<float>& pool, const std::vector<float>& rows,
                                  int64_t lat, int64_t start, const std::vector<int32_t>& table,
                                  int64_t bt, bool bf16, int64_t stride = 0) {
  std::vector<float> out = pool;
  if (stride == 0) stride = bt * lat;
  for (size_t r = 0; r * lat < rows.size(); ++r) {
    const int64_t pos = start + static_cast<int64_t>(r);
    const int64_t at = int64_t{table[pos / bt]} * stride + pos % bt * lat;
    for (int64_t i = 0; i < lat; ++i) {
      const float v = rows[r * lat + i];
      out[at + i] = bf16 ? model::Bf16ToFloat(model::FloatToBf16(v)) : v;
    }
  }
  return out;
}

// The pool's values as fp32, whatever it stores.
std::vector<float> PoolValues(const void* pool, size_t n, bool bf16) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = bf16 ? model::Bf16ToFloat(static_cast<const uint16_t*>(pool)[i])
                  : static_cast<const float*>(pool)[i];
  }
  return out;
}

TEST(OpsTest, StoreLatentsWritesEachRowThroughTheBlockTable) {
  const int64_t lat = 24, bt = 4, pool_blocks = 9;
  const std::vector<int32_t> table = {7, 2, 5, 0, 8};  // shuffled: position order != pool order
  for (bool bf16 : {false, true}) {
    for (auto [start, n] : {std::pair<int64_t, int64_t>{0, 1}, {3, 9}, {6, 14}, {19, 1}}) {
      std::vector<float> rows = Random(static_cast<size_t>(n * lat), 11 + start);
      const size_t values = static_cast<size_t>(pool_blocks * bt * lat);
      auto buffer = Allocate(Device{}, values * (bf16 ? 2 : 4));
      ASSERT_TRUE(buffer.ok()) << buffer.status();
      EXPECT_EQ(PoolValues(buffer->data(), values, bf16), std::vector<float>(values, 0.0f))
          << "Allocate zero-fills";
      StoreLatentsParams p;
      p.rows = rows.data();
      p.n = n;
      p.latent_dim = lat;
      p.start = start;
      p.block_table = table.data();
      p.table_blocks = static_cast<int64_t>(table.size());
      p.block_tokens = bt;
      p.pool = buffer->data();
      p.pool_blocks = pool_blocks;
      p.dtype = bf16 ? LatentStorage::kBFloat16 : LatentStorage::kFloat32;
      ASSERT_TRUE(StoreLatents(Device{}, p).ok());
      EXPECT_EQ(PoolValues(buffer->data(), values, bf16),
                StoreReference(std::vector<float>(values, 0.0f), rows, lat, start, table, bt, bf16))
          << "start " << start << ", " << n << " rows, bf16 " << bf16;
    }
  }
  // Refusals: a table too short for the positions, an entry outside the pool.
  std::vector<float> rows(static_cast<size_t>(8 * lat), 1.0f);
  std::vector<float> pool(static_cast<size_t>(pool_blocks * bt * lat), 0.0f);
  StoreLatentsParams p;
  p.rows = rows.data();
  p.n = 8;
  p.latent_dim = lat;
  p.start = 17;
  p.block_table = table.data();
  p.table_blocks = static_cast<int64_t>(table.size());
  p.block_tokens = bt;
  p.pool = pool.data();
  p.pool_blocks = pool_blocks;
  absl::Status s = StoreLatents(Device{}, p);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("need 7 blocks; the table has 5")) << s;
  const std::vector<int32_t> bad = {1, 9};
  p.start = 0;
  p.block_table = bad.data();
  p.table_blocks = 2;
  s = StoreLatents(Device{}, p);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("table entry 1 is block 9, outside the pool's 9"))
      << s;
  EXPECT_EQ(pool, std::vector<float>(pool.size(), 0.0f)) << "nothing written on a refusal";
}

TEST(OpsTest, StoreLatentsWritesOneLayerOfAStridedPool) {
  // Three layers per block, interleaved (the decode worker's arena): layer 1 is written, the
  // others stay as they were; a stride shorter than a block is refused.
  const int64_t lat = 24, bt = 4, pool_blocks = 9, stride = 3 * bt * lat;
  const std::vector<int32_t> table = {7, 2, 5, 0, 8};
  for (bool bf16 : {false, true}) {
    const std::vector<float> rows = Random(static_cast<size_t>(10 * lat), 23);
    const size_t values = static_cast<size_t>(pool_blocks * stride);
    auto buffer = Allocate(Device{}, values * (bf16 ? 2 : 4));
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    StoreLatentsParams p;
    p.rows = rows.data();
    p.n = 10;
    p.latent_dim = lat;
    p.start = 3;
    p.block_table = table.data();
    p.table_blocks = static_cast<int64_t>(table.size());
    p.block_tokens = bt;
    p.pool = static_cast<char*>(buffer->data()) + bt * lat * (bf16 ? 2 : 4);  // layer 1
    p.pool_blocks = pool_blocks;
    p.dtype = bf16 ? LatentStorage::kBFloat16 : LatentStorage::kFloat32;
    p.pool_block_stride = stride;
    ASSERT_TRUE(StoreLatents(Device{}, p).ok());
    std::vector<float> want =
        StoreReference(std::vector<float>(values - bt * lat, 0.0f), rows, lat, 3, table, bt, bf16,
                       stride);
    want.insert(want.begin(), static_cast<size_t>(bt * lat), 0.0f);
    EXPECT_EQ(PoolValues(buffer->data(), values, bf16), want) << "bf16 " << bf16;
    p.pool_block_stride = bt * lat - 1;
    EXPECT_THAT(StoreLatents(Device{}, p).message(),
                ::testing::HasSubstr("a block stride of 95 values is less than a block's 96"));
  }
}

TEST(OpsTest, CpuMemoryCopiesRoundTripAndCudaNeedsItsBackend) {
  auto context = DeviceContext::Open(Device{}, /*exact_fp32=*/true);
  ASSERT_TRUE(context.ok()) << context.status();
  const Device& cpu = (*context)->device();
  EXPECT_EQ(DeviceName(cpu), "cpu");
  const std::vector<float> host = Random(100, 5);
  auto buffer = Allocate(cpu, host.size() * sizeof(float));
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE(CopyToDevice(cpu, buffer->data(), host.data(), host.size() * sizeof(float)).ok());
  std::vector<float> back(host.size());
  ASSERT_TRUE(CopyToHost(cpu, back.data(), buffer->data(), back.size() * sizeof(float)).ok());
  EXPECT_EQ(back, host);
  EXPECT_TRUE(Synchronize(cpu).ok());
  std::vector<float> async_back(host.size());
  ASSERT_TRUE(CopyToDeviceAsync(cpu, buffer->data(), host.data(), host.size() * 4).ok());
  ASSERT_TRUE(CopyToHostAsync(cpu, async_back.data(), buffer->data(), host.size() * 4).ok());
  EXPECT_EQ(async_back, host);  // on the CPU, at once
  std::vector<float> pinned(64);
  EXPECT_TRUE(PinHost(cpu, pinned.data(), pinned.size() * sizeof(float)).ok());  // nothing to do
  UnpinHost(cpu, pinned.data());
  EXPECT_FALSE(PinHost(cpu, nullptr, 64).ok());
  DeviceBuffer moved = std::move(*buffer);
  EXPECT_EQ(buffer->data(), nullptr);
  EXPECT_EQ(moved.bytes(), host.size() * sizeof(float));
  if (!BackendAvailable(Backend::kCuda)) {
    Device gpu;
    gpu.backend = Backend::kCuda;
    auto refused = DeviceContext::Open(gpu, true);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented) << refused.status();
    EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("EnableCudaOps"));
  }
}

TEST(OpsTest, CapabilityChecksRefuseWhatTheyName) {
  Inputs in;
  std::vector<float> out(1000);
  auto refused = [](const absl::Status& s, const std::string& needle) {
    EXPECT_FALSE(s.ok()) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  };
  refused(RmsNorm(Device{}, {in.x.data(), 2, 200, 100, in.weight.data(), 1e-6f, out.data(), 0}),
          "strides >= dim");
  refused(RmsNorm(Device{}, {in.x.data(), 2, 200, 0, in.weight.data(), 0.0f, out.data(), 0}),
          "eps must be finite and > 0");
  refused(RmsNorm(Device{}, {in.x.data(), 2, 200, 0, nullptr, 1e-6f, out.data(), 0}), "null");
  refused(SwiGlu(Device{}, {out.data(), nullptr, 4}), "null gate or up");
  refused(Rope(Device{}, {out.data(), 1, 1, 96, 70, 32, in.positions.data(), in.inv_freq.data()}),
          "even rope_dim inside each head");
  const int32_t negative = -1;
  const int32_t* negative_token = &negative;
  refused(Embed(Device{}, {negative_token, 1, &in.w, nullptr, out.data()}), "token id -1 outside");
  refused(Add(Device{}, {out.data(), nullptr, 4}), "null h or delta");
  refused(Scores(Device{}, {out.data(), 2, 0, false}), "need rows >= 0, n > 0");
  refused(MlaProject(Device{}, {MlaProjectParams::Kind::kApplyValue, out.data(), 1, 3, 4, 2, 5,
                                &in.w, nullptr, out.data()}),
          "need heads * (nope_dim + v_dim) rows");
  {
    model::ModelConfig c = GateConfigs()[0];
    std::vector<int32_t> chosen(8);
    refused(SelectExperts(Device{}, {nullptr, out.data(), nullptr, 1, chosen.data(), out.data()}),
            "no model config");
    c.topk_group = 1;  // one group of 8 experts cannot give 9
    c.num_experts_per_tok = 9;
    refused(SelectExperts(Device{}, {&c, out.data(), nullptr, 1, chosen.data(), out.data()}),
            "cannot give 9 experts");
  }
  {
    MlaCase c;
    MlaAttentionParams mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    c.storage[2].latents.keys = 100;  // holds fewer keys than its row attends
    refused(MlaAttention(Device{}, mla), "attends 131 keys but its latents hold 100");
  }
  refused(Rope(Device{}, {out.data(), 1, 1, 96, 64, 32, &negative, in.inv_freq.data()}),
          "position -1");
  model::Matrix empty;
  empty.rows = 4;
  empty.cols = 4;
  refused(Linear(Device{}, LinearParams{in.lx.data(), 1, &empty, nullptr,
                                        model::WeightDType::kFloat32, out.data()}),
          "holds no values in host memory");
  // On CUDA: refused as unimplemented until the backend is enabled; then fp32 device weights
  // only through this entry, and a stream is required.
  Device gpu{Backend::kCuda, 0, reinterpret_cast<void*>(1), reinterpret_cast<void*>(1)};
  const absl::Status none = SwiGlu(gpu, {out.data(), out.data(), 4});
  EXPECT_EQ(none.code(), absl::StatusCode::kUnimplemented) << none;
  EXPECT_FALSE(BackendAvailable(Backend::kCuda));
#ifdef SPLITMOE_OPS_CUDA
  EnableCudaOps();
  EXPECT_TRUE(BackendAvailable(Backend::kCuda));
#endif
  if (BackendAvailable(Backend::kCuda)) {
    refused(Linear(gpu, LinearParams{in.lx.data(), 1, &in.w, in.w.data.data(),
                                     model::WeightDType::kFp8E4M3, out.data()}),
            "FP8 checkpoints are widened, then rounded to BF16");
    refused(Embed(gpu, {negative_token, 1, &in.w, nullptr, out.data()}), "no fp32 table");
    // MLA on a device: the blocks must be those of one pool (FlashMLA's layout), the rows in
    // order. Supports reads no block, so host pointers stand in for device ones here.
    MlaCase c;
    MlaAttentionParams mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    EXPECT_TRUE(Supports(gpu, mla).ok()) << Supports(gpu, mla);
    mla.pool = nullptr;
    refused(Supports(gpu, mla), "needs the pool the blocks lie in");
    mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    mla.pool_blocks = 3;
    refused(Supports(gpu, mla), "is not a block of the pool");
    mla = c.Params(c.pool.data() + 1, LatentStorage::kFloat32, c.q.data(), out.data());
    mla.pool = c.pool.data();
    refused(Supports(gpu, mla), "is not a block of the pool");
    mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    std::swap(c.storage[0], c.storage[1]);
    refused(Supports(gpu, mla), "rows must be 0 .. R-1 in order");
    mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    mla.rope_dim = 800;
    refused(Supports(gpu, mla), "> 768");
    mla = c.Params(c.pool.data(), LatentStorage::kFloat32, c.q.data(), out.data());
    const int32_t table[1] = {0};
    mla.device_block_table = table;
    refused(Supports(gpu, mla), "needs its seq_lens and a width > 0");
    mla.device_seq_lens = table;
    mla.device_table_width = 9;
    refused(Supports(gpu, mla), "needs more blocks than the device table's width 9");
    refused(SwiGlu(Device{Backend::kCuda, 0, nullptr, nullptr}, {out.data(), out.data(), 4}),
            "needs an index >= 0 and a stream");
    SetOpsBackend(Backend::kCuda, nullptr);  // back to a CPU-only process for the other cases
  }
  EXPECT_EQ(DeviceName(gpu), "cuda:0");
  EXPECT_EQ(DeviceName(Device{}), "cpu");
}

// ---- The same ops on a GPU against the CPU.

#ifdef SPLITMOE_OPS_CUDA
template <typename T>
struct GpuArray {
  T* p = nullptr;
  size_t n = 0;
  explicit GpuArray(const std::vector<T>& host) : n(host.size()) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T)),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~GpuArray() { cudaFree(p); }
  std::vector<T> Get() const {
    std::vector<T> host(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
};

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = cuda::DeviceCount();
    if (!n.ok() || *n == 0) GTEST_SKIP() << "no CUDA device: the GPU side of every op is owed";
    EnableCudaOps();
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
    ASSERT_EQ(cublasCreate(&blas_), CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cublasSetStream(blas_, stream_), CUBLAS_STATUS_SUCCESS);
    gpu_ = Device{Backend::kCuda, 0, stream_, blas_};
  }
  void TearDown() override {
    SetOpsBackend(Backend::kCuda, nullptr);  // each case starts from a CPU-only process
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  static void ExpectClose(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                          const std::string& what) {
    ASSERT_EQ(gpu.size(), cpu.size());
    double worst = 0;
    for (size_t i = 0; i < cpu.size(); ++i) {
      if (std::isnan(cpu[i])) continue;
      const double d = std::fabs(double(gpu[i]) - cpu[i]) / (1.0 + std::fabs(cpu[i]));
      if (!(d <= tol)) {  // NaN (an unwritten, poisoned value) fails too
        ADD_FAILURE() << what << ": value " << i << " is " << gpu[i] << " on the GPU, " << cpu[i]
                      << " on the CPU";
        return;
      }
      worst = std::max(worst, d);
    }
    EXPECT_LE(worst, tol) << what;
    std::printf("%s: max relative difference GPU vs CPU %.3g\n", what.c_str(), worst);
  }
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  Device gpu_;
};

TEST_F(CudaOpsTest, CudaRmsNormEqualsCpu) {
  Inputs in;
  const int64_t rows = Inputs::kRows, dim = Inputs::kDim, xs = Inputs::kStride;
  std::vector<float> cpu(rows * xs, std::nanf(""));
  ASSERT_TRUE(RmsNorm(Device{}, {in.x.data(), rows, dim, xs, in.weight.data(), 1e-6f, cpu.data(), xs}).ok());
  GpuArray<float> x(in.x), w(in.weight), out(std::vector<float>(rows * xs, std::nanf("")));
  ASSERT_TRUE(RmsNorm(gpu_, {x.p, rows, dim, xs, w.p, 1e-6f, out.p, xs}).ok());
  ExpectClose(out.Get(), cpu, 1e-5, "RmsNorm");
}

TEST_F(CudaOpsTest, CudaSwiGluEqualsCpu) {
  Inputs in;
  std::vector<float> cpu = in.gate;
  ASSERT_TRUE(SwiGlu(Device{}, {cpu.data(), in.up.data(), 1000}).ok());
  GpuArray<float> g(in.gate), u(in.up);
  ASSERT_TRUE(SwiGlu(gpu_, {g.p, u.p, 1000}).ok());
  ExpectClose(g.Get(), cpu, 1e-5, "SwiGlu");
}

TEST_F(CudaOpsTest, CudaRopeEqualsCpu) {
  Inputs in;
  std::vector<float> cpu = in.heads;
  ASSERT_TRUE(Rope(Device{}, {cpu.data(), Inputs::kRows, 3, 96, 64, 32, in.positions.data(),
                              in.inv_freq.data()}).ok());
  GpuArray<float> x(in.heads), f(in.inv_freq);
  GpuArray<int32_t> pos(in.positions);
  ASSERT_TRUE(Rope(gpu_, {x.p, Inputs::kRows, 3, 96, 64, 32, pos.p, f.p}).ok());
  ExpectClose(x.Get(), cpu, 1e-5, "Rope");
}

TEST_F(CudaOpsTest, CudaLinearEqualsCpu) {
  Inputs in;
  std::vector<float> cpu(9 * 70);
  ASSERT_TRUE(Linear(Device{}, LinearParams{in.lx.data(), 9, &in.w, nullptr,
                                            model::WeightDType::kFloat32, cpu.data()}).ok());
  GpuArray<float> x(in.lx), w(in.w.data), y(std::vector<float>(9 * 70));
  ASSERT_TRUE(Linear(gpu_, LinearParams{x.p, 9, &in.w, w.p, model::WeightDType::kFloat32, y.p}).ok());
  ExpectClose(y.Get(), cpu, 1e-5, "Linear");
}
TEST_F(CudaOpsTest, CudaLinearBf16IsWithinBf16RoundingOfCpuFp32) {
  // The GPU's bf16 mode: weights and activations rounded to BF16, fp32 accumulation. Against
  // the CPU's fp32 product of the same BF16 weights, the only drift is x's rounding (2^-9
  // relative per value): bounded here by 1e-2 of the row's norm.
  Inputs in;
  std::vector<uint16_t> bits;
  model::Matrix w = in.w;
  for (float& v : w.data) {
    bits.push_back(model::FloatToBf16(v));
    v = model::Bf16ToFloat(bits.back());
  }
  std::vector<float> cpu(9 * 70);
  ASSERT_TRUE(Linear(Device{}, LinearParams{in.lx.data(), 9, &w, nullptr,
                                            model::WeightDType::kFloat32, cpu.data()}).ok());
  GpuArray<float> x(in.lx), y(std::vector<float>(9 * 70));
  GpuArray<uint16_t> wb(bits);
  ASSERT_TRUE(Linear(gpu_, LinearParams{x.p, 9, &w, wb.p, model::WeightDType::kBFloat16, y.p}).ok());
  const std::vector<float> gpu = y.Get();
  for (int64_t r = 0; r < 9; ++r) {
    double diff = 0, norm = 0;
    for (int64_t j = 0; j < 70; ++j) {
      diff += std::pow(double(gpu[r * 70 + j]) - cpu[r * 70 + j], 2);
      norm += std::pow(double(cpu[r * 70 + j]), 2);
    }
    EXPECT_LE(std::sqrt(diff), 1e-2 * std::sqrt(norm)) << "row " << r;
  }
}

TEST_F(CudaOpsTest, CudaEmbedAndAddEqualCpu) {
  Inputs in;  // in.w as a 70-row fp32 table
  const std::vector<int32_t> tokens = {69, 0, 5, 5, 31};
  std::vector<float> cpu(5 * 130);
  ASSERT_TRUE(Embed(Device{}, {tokens.data(), 5, &in.w, nullptr, cpu.data()}).ok());
  GpuArray<float> table(in.w.data), out(std::vector<float>(5 * 130));
  GpuArray<int32_t> t(tokens);
  ASSERT_TRUE(Embed(gpu_, {t.p, 5, &in.w, table.p, out.p}).ok());
  ExpectClose(out.Get(), cpu, 0.0, "Embed");
  std::vector<float> h = in.gate;
  ASSERT_TRUE(Add(Device{}, {h.data(), in.up.data(), 1000}).ok());
  GpuArray<float> dh(in.gate), du(in.up);
  ASSERT_TRUE(Add(gpu_, {dh.p, du.p, 1000}).ok());
  ExpectClose(dh.Get(), h, 0.0, "Add");
}

TEST_F(CudaOpsTest, CudaMlaAttentionEqualsCpuOverOnePool) {
  for (LatentStorage dtype : {LatentStorage::kFloat32, LatentStorage::kBFloat16}) {
    MlaCase c;
    const bool bf16 = dtype == LatentStorage::kBFloat16;
    const size_t n_out = MlaCase::kRows * MlaCase::kHeads * MlaCase::kRank;
    std::vector<float> cpu(n_out);
    const void* host = bf16 ? static_cast<const void*>(c.pool_bf16.data()) : c.pool.data();
    ASSERT_TRUE(MlaAttention(Device{}, c.Params(host, dtype, c.q.data(), cpu.data())).ok());
    GpuArray<float> pool(c.pool), q(c.q), out(std::vector<float>(n_out, std::nanf("")));
    GpuArray<uint16_t> pool_bf16(c.pool_bf16);
    const void* dev = bf16 ? static_cast<const void*>(pool_bf16.p) : pool.p;
    ASSERT_TRUE(MlaAttention(gpu_, c.Params(dev, dtype, q.p, out.p)).ok());
    ExpectClose(out.Get(), cpu, 1e-5, bf16 ? "MlaAttention bf16" : "MlaAttention fp32");
    // The same with the caller's block table on the device (what the GPU engine passes).
    int64_t width = 0;
    for (const MlaCase::Seq& sq : c.seqs) width = std::max<int64_t>(width, sq.blocks.size());
    std::vector<int32_t> table(MlaCase::kRows * width, 0), lens;
    int64_t row = 0;
    for (const MlaCase::Seq& sq : c.seqs) {
      for (int64_t t = 0; t < sq.rows; ++t, ++row) {
        lens.push_back(static_cast<int32_t>(sq.start + t + 1));
        std::copy(sq.blocks.begin(), sq.blocks.end(), table.begin() + row * width);
      }
    }
    GpuArray<int32_t> d_table(table), d_lens(lens);
    GpuArray<float> out2(std::vector<float>(n_out, std::nanf("")));
    MlaAttentionParams given = c.Params(dev, dtype, q.p, out2.p);
    given.device_block_table = d_table.p;
    given.device_seq_lens = d_lens.p;
    given.device_table_width = width;
    ASSERT_TRUE(MlaAttention(gpu_, given).ok());
    ExpectClose(out2.Get(), cpu, 1e-5, "MlaAttention, the caller's table");
  }
}
TEST_F(CudaOpsTest, CudaMlaAttentionReadsOneLayerOfAStridedPool) {
  // The decode worker's arena on a GPU: each block's layers together, so one layer's blocks lie
  // 3 blocks apart; the gaps are NaN, so a read outside the layer shows.
  for (LatentStorage dtype : {LatentStorage::kFloat32, LatentStorage::kBFloat16}) {
    MlaCase c;
    const bool bf16 = dtype == LatentStorage::kBFloat16;
    const int64_t block = MlaCase::kBlock * MlaCase::kLat, stride = 3 * block;
    const size_t n_out = MlaCase::kRows * MlaCase::kHeads * MlaCase::kRank;
    std::vector<float> cpu(n_out);
    const void* host = bf16 ? static_cast<const void*>(c.pool_bf16.data()) : c.pool.data();
    ASSERT_TRUE(MlaAttention(Device{}, c.Params(host, dtype, c.q.data(), cpu.data())).ok());
    GpuArray<float> pool(MlaCase::Strided(c.pool, stride, block, std::nanf("")));
    GpuArray<uint16_t> pool_bf16(
        MlaCase::Strided(c.pool_bf16, stride, block, model::FloatToBf16(std::nanf(""))));
    GpuArray<float> q(c.q), out(std::vector<float>(n_out, std::nanf("")));
    const void* layer1 = bf16 ? static_cast<const void*>(pool_bf16.p + block)
                              : static_cast<const void*>(pool.p + block);
    ASSERT_TRUE(MlaAttention(gpu_, c.Params(layer1, dtype, q.p, out.p, stride)).ok());
    ExpectClose(out.Get(), cpu, 1e-5, bf16 ? "strided MlaAttention bf16" : "strided MlaAttention");
  }
}

TEST_F(CudaOpsTest, CudaScoresAndSelectExpertsEqualCpu) {
  for (const model::ModelConfig& c : GateConfigs()) {
    const int64_t rows = 33, n = c.n_routed_experts, k = c.num_experts_per_tok;
    const bool sigmoid = c.scoring_func == model::ScoringFunc::kSigmoid;
    const std::vector<float> logits = Random(rows * n, 27, 2.0f), bias = Random(n, 28, 0.5f);
    std::vector<float> scores = logits;
    ASSERT_TRUE(Scores(Device{}, {scores.data(), rows, n, sigmoid}).ok());
    GpuArray<float> d_scores(logits);
    ASSERT_TRUE(Scores(gpu_, {d_scores.p, rows, n, sigmoid}).ok());
    ExpectClose(d_scores.Get(), scores, 1e-6, sigmoid ? "Scores sigmoid" : "Scores softmax");
    // The selection from the same (CPU) scores: the same experts, weights within rounding.
    std::vector<int32_t> experts(rows * k);
    std::vector<float> weights(rows * k);
    ASSERT_TRUE(SelectExperts(Device{}, {&c, scores.data(), bias.data(), rows, experts.data(),
                                         weights.data()}).ok());
    GpuArray<float> s(scores), b(bias), w(std::vector<float>(rows * k));
    GpuArray<int32_t> e(std::vector<int32_t>(rows * k, -1));
    ASSERT_TRUE(SelectExperts(gpu_, {&c, s.p, b.p, rows, e.p, w.p}).ok());
    EXPECT_EQ(e.Get(), experts);
    ExpectClose(w.Get(), weights, 1e-6, "SelectExperts weights");
  }
}
TEST_F(CudaOpsTest, CudaMlaProjectEqualsCpu) {
  const int64_t H = 4, dn = 24, dr = 8, dv = 20, kvr = 48, rows = 5;
  Bf16Weight kvb(H * (dn + dv), kvr, 31, 0.2f);
  GpuArray<float> w(kvb.widened.data);
  using Kind = MlaProjectParams::Kind;
  for (Kind kind : {Kind::kAbsorbQuery, Kind::kApplyValue}) {
    const int64_t in = kind == Kind::kAbsorbQuery ? dn + dr : kvr;
    const int64_t outw = kind == Kind::kAbsorbQuery ? kvr + dr : dv;
    const std::vector<float> x = Random(rows * H * in, 33);
    std::vector<float> cpu(rows * H * outw);
    ASSERT_TRUE(MlaProject(Device{}, {kind, x.data(), rows, H, dn, dr, dv, &kvb.widened, nullptr,
                                      cpu.data()}).ok());
    GpuArray<float> dx(x), out(std::vector<float>(rows * H * outw, std::nanf("")));
    ASSERT_TRUE(MlaProject(gpu_, {kind, dx.p, rows, H, dn, dr, dv, &kvb.widened, w.p, out.p}).ok());
    ExpectClose(out.Get(), cpu, 1e-5,
                kind == Kind::kAbsorbQuery ? "MlaProject W_UK" : "MlaProject W_UV");
  }
}
TEST_F(CudaOpsTest, CudaRoutedExpertsEqualCpu) {
  // fp32 experts: the CPU's sums within 1e-4 of each value (summation order only); BF16 (with
  // BF16 activations at the GEMMs' inputs) within 2e-2 of the norm, as gpu_experts_test.
  ExpertsCase c(37);
  const int64_t H = ExpertsCase::kHidden, I = ExpertsCase::kInter;
  std::vector<float> cpu(c.tokens * H);
  ASSERT_TRUE(RoutedExperts(Device{}, c.Params(false, cpu.data())).ok());
  for (bool bf16 : {false, true}) {
    std::vector<std::unique_ptr<GpuArray<float>>> f32;
    std::vector<std::unique_ptr<GpuArray<uint16_t>>> b16;
    std::vector<const void*> gate_up, down;
    for (int64_t e = 0; e < ExpertsCase::kExperts; ++e) {
      if (e == 4) {
        gate_up.push_back(nullptr);
        down.push_back(nullptr);
        continue;
      }
      const model::MlpWeights& w = c.wide[e];
      std::vector<float> gu = w.gate.data;
      gu.insert(gu.end(), w.up.data.begin(), w.up.data.end());
      for (const std::vector<float>* m : {static_cast<const std::vector<float>*>(&gu), &w.down.data}) {
        if (bf16) {
          std::vector<uint16_t> bits;
          for (float v : *m) bits.push_back(model::FloatToBf16(v));  // exact: BF16 values
          b16.push_back(std::make_unique<GpuArray<uint16_t>>(bits));
          (m == &gu ? gate_up : down).push_back(b16.back()->p);
        } else {
          f32.push_back(std::make_unique<GpuArray<float>>(*m));
          (m == &gu ? gate_up : down).push_back(f32.back()->p);
        }
      }
    }
    GpuArray<float> x(c.x), w(c.weights), out(std::vector<float>(c.tokens * H, std::nanf("")));
    GpuArray<int32_t> slots(c.slots);
    RoutedExpertsParams p = c.Params(false, out.p);
    p.x = x.p;
    p.experts = slots.p;
    p.weights = w.p;
    p.host = {};
    p.gate_up_device = gate_up;
    p.down_device = down;
    p.device_dtype = bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
    ASSERT_TRUE(RoutedExperts(gpu_, p).ok());
    const std::vector<float> got = out.Get();
    if (!bf16) {
      ExpectClose(got, cpu, 1e-4, "RoutedExperts fp32");
    } else {
      double diff = 0, norm = 0;
      for (size_t i = 0; i < cpu.size(); ++i) {
        diff += std::pow(double(got[i]) - cpu[i], 2);
        norm += std::pow(double(cpu[i]), 2);
      }
      EXPECT_LE(std::sqrt(diff), 2e-2 * std::sqrt(norm));
      std::printf("RoutedExperts bf16: relative norm difference %.3g\n", std::sqrt(diff / norm));
    }
  }
}
TEST_F(CudaOpsTest, CudaStoreLatentsAndCopiesEqualCpu) {
  const int64_t lat = 576, bt = 64, pool_blocks = 6;
  const std::vector<int32_t> table = {4, 1, 5};
  const int64_t start = 50, n = 100;  // crosses two block boundaries
  const std::vector<float> rows = Random(static_cast<size_t>(n * lat), 17);
  for (bool bf16 : {false, true}) {
    const size_t values = static_cast<size_t>(pool_blocks * bt * lat);
    const size_t bytes = values * (bf16 ? 2 : 4);
    auto cpu_pool = Allocate(Device{}, bytes);
    auto gpu_pool = Allocate(gpu_, bytes);
    auto gpu_rows = Allocate(gpu_, rows.size() * 4);
    auto gpu_table = Allocate(gpu_, table.size() * 4);
    ASSERT_TRUE(cpu_pool.ok() && gpu_pool.ok() && gpu_rows.ok() && gpu_table.ok());
    ASSERT_TRUE(CopyToDevice(gpu_, gpu_rows->data(), rows.data(), rows.size() * 4).ok());
    ASSERT_TRUE(CopyToDevice(gpu_, gpu_table->data(), table.data(), table.size() * 4).ok());
    StoreLatentsParams p;
    p.rows = rows.data();
    p.n = n;
    p.latent_dim = lat;
    p.start = start;
    p.block_table = table.data();
    p.table_blocks = 3;
    p.block_tokens = bt;
    p.pool = cpu_pool->data();
    p.pool_blocks = pool_blocks;
    p.dtype = bf16 ? LatentStorage::kBFloat16 : LatentStorage::kFloat32;
    ASSERT_TRUE(StoreLatents(Device{}, p).ok());
    p.rows = gpu_rows->as<float>();
    p.block_table = gpu_table->as<int32_t>();
    p.pool = gpu_pool->data();
    ASSERT_TRUE(StoreLatents(gpu_, p).ok());
    std::vector<char> back(bytes);
    ASSERT_TRUE(CopyToHost(gpu_, back.data(), gpu_pool->data(), bytes).ok());
    EXPECT_EQ(PoolValues(back.data(), values, bf16), PoolValues(cpu_pool->data(), values, bf16))
        << "bf16 " << bf16 << " (Allocate zero-fills on both)";
    // One layer of a strided pool (two layers per block): the same as the CPU's store.
    auto cpu_strided = Allocate(Device{}, 2 * bytes);
    auto gpu_strided = Allocate(gpu_, 2 * bytes);
    ASSERT_TRUE(cpu_strided.ok() && gpu_strided.ok());
    const int64_t elem = bf16 ? 2 : 4;
    p.pool_block_stride = 2 * bt * lat;
    p.rows = rows.data();
    p.block_table = table.data();
    p.pool = static_cast<char*>(cpu_strided->data()) + bt * lat * elem;
    ASSERT_TRUE(StoreLatents(Device{}, p).ok());
    p.rows = gpu_rows->as<float>();
    p.block_table = gpu_table->as<int32_t>();
    p.pool = static_cast<char*>(gpu_strided->data()) + bt * lat * elem;
    ASSERT_TRUE(StoreLatents(gpu_, p).ok());
    std::vector<char> back2(2 * bytes);
    ASSERT_TRUE(CopyToHost(gpu_, back2.data(), gpu_strided->data(), 2 * bytes).ok());
    EXPECT_EQ(PoolValues(back2.data(), 2 * values, bf16),
              PoolValues(cpu_strided->data(), 2 * values, bf16))
        << "strided, bf16 " << bf16;
    p.pool_block_stride = 0;
  }
  ASSERT_TRUE(Synchronize(gpu_).ok());
}

TEST_F(CudaOpsTest, CudaDeviceContextOpensAndCloses) {
  Device want;
  want.backend = Backend::kCuda;
  auto context = DeviceContext::Open(want, /*exact_fp32=*/true);
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_NE((*context)->device().stream, nullptr);
  EXPECT_NE((*context)->device().blas, nullptr);
  // Page-locked host memory, copied to and from asynchronously: the values are there once the
  // device is synchronized.
  const Device& gpu = (*context)->device();
  std::vector<float> host = Random(4096, 3), back(4096, 0.0f);
  ASSERT_TRUE(PinHost(gpu, host.data(), host.size() * sizeof(float)).ok());
  ASSERT_TRUE(PinHost(gpu, back.data(), back.size() * sizeof(float)).ok());
  auto on = Allocate(gpu, host.size() * sizeof(float));
  ASSERT_TRUE(on.ok());
  ASSERT_TRUE(CopyToDeviceAsync(gpu, on->data(), host.data(), host.size() * sizeof(float)).ok());
  ASSERT_TRUE(CopyToHostAsync(gpu, back.data(), on->data(), back.size() * sizeof(float)).ok());
  ASSERT_TRUE(Synchronize(gpu).ok());
  EXPECT_EQ(back, host);
  UnpinHost(gpu, host.data());
  UnpinHost(gpu, back.data());
  want.index = 4096;
  EXPECT_EQ(DeviceContext::Open(want, true).status().code(),
            absl::StatusCode::kFailedPrecondition);
}
#else
TEST(CudaOpsTest, CudaBackendNotBuilt) {
  GTEST_SKIP() << "this build has no CUDA backend: the GPU side of every op is owed";
}
#endif

}  // namespace
}  // namespace splitmoe::kernels
