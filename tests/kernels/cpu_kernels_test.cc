// The CPU kernels over narrow weights and the batched paged MLA attention, each against a
// reference written here from the definitions (scalar conversions of common/model/numeric.h,
// plain loops, a two-pass softmax), on both the AVX-512 and the portable paths.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/engine/transformer.h"
#include "common/kernels/cpu/mla_attention.h"
#include "common/kernels/cpu/experts.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu_ops.h"
#include "common/model/numeric.h"
#include "gtest/gtest.h"

namespace splitmoe::kernels {
namespace {

using model::Matrix;
using model::WeightDType;

// A narrow weight owning its bytes, and the fp32 values it stands for (the loader's
// dequantisation: fp8 value times its block's scale, in fp32).
struct NarrowWeight {
  Matrix m;
  std::vector<float> reference;
};

NarrowWeight MakeWeight(WeightDType dtype, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  NarrowWeight w;
  w.m.rows = rows;
  w.m.cols = cols;
  w.m.dtype = dtype;
  w.reference.resize(static_cast<size_t>(rows * cols));
  auto bytes = std::make_shared<std::vector<uint8_t>>(
      static_cast<size_t>(rows * cols * model::WeightDTypeBytes(dtype)) + 1);
  uint8_t* base = bytes->data() + 1;  // deliberately unaligned, as safetensors data may be
  if (dtype == WeightDType::kBFloat16) {
    for (int64_t i = 0; i < rows * cols; ++i) {
      const uint16_t b = model::FloatToBf16(normal(rng) * 0.05f);
      std::memcpy(base + 2 * i, &b, 2);
      w.reference[i] = model::Bf16ToFloat(b);
    }
  } else {
    w.m.scale_inv.resize(static_cast<size_t>(w.m.scale_rows() * w.m.scale_cols()));
    for (float& s : w.m.scale_inv) s = std::ldexp(1.0f + 0.37f * normal(rng) * normal(rng), -9);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        // Every code but NaN, subnormals and signed zeros included.
        uint8_t code = static_cast<uint8_t>(rng() & 0xff);
        if ((code & 0x7f) == 0x7f) code ^= 1;
        base[r * cols + c] = code;
        const float scale = w.m.scale_inv[(r / model::kFp8BlockSize) * w.m.scale_cols() +
                                          c / model::kFp8BlockSize];
        w.reference[r * cols + c] = model::Fp8E4M3ToFloat(code) * scale;
      }
    }
  }
  w.m.raw = base;
  w.m.keep = bytes;
  return w;
}

std::vector<float> Activations(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = normal(rng);
  return x;
}

class NarrowKernelTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam() && !NarrowKernelsUseAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
    SetNarrowKernelsAvx512ForTest(GetParam());
  }
  void TearDown() override { SetNarrowKernelsAvx512ForTest(true); }
};

TEST_P(NarrowKernelTest, WidenedRowsAreExactlyTheLoadersValues) {
  for (WeightDType dtype : {WeightDType::kBFloat16, WeightDType::kFp8E4M3}) {
    NarrowWeight w = MakeWeight(dtype, 300, 291, 7);
    std::vector<float> out(300 * 291);
    WidenRows(w.m, 0, 300, out.data());
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_EQ(std::memcmp(&out[i], &w.reference[i], 4), 0)
          << model::WeightDTypeName(dtype) << " element " << i << ": " << out[i] << " vs "
          << w.reference[i];
    }
  }
}

TEST_P(NarrowKernelTest, Fp8NanCodesStayNan) {
  NarrowWeight w = MakeWeight(WeightDType::kFp8E4M3, 1, 20, 1);
  auto bytes = std::make_shared<std::vector<uint8_t>>(20, 0x38);  // 1.0
  (*bytes)[3] = 0x7f;
  (*bytes)[17] = 0xff;
  w.m.raw = bytes->data();
  w.m.keep = bytes;
  std::vector<float> out(20);
  WidenRows(w.m, 0, 1, out.data());
  EXPECT_TRUE(std::isnan(out[3]));
  EXPECT_TRUE(std::isnan(out[17]));
  EXPECT_EQ(out[0], w.m.scale_inv[0]);
  // Bit for bit the loader's values, the NaNs' signs included (0xff is -NaN).
  for (int c : {3, 17}) {
    const float ref = model::Fp8E4M3ToFloat((*bytes)[c]) * w.m.scale_inv[0];
    EXPECT_EQ(std::memcmp(&out[c], &ref, 4), 0) << "code " << int((*bytes)[c]);
  }
}

// An FP8 NaN code (0x7f, 0xff) makes its row's products NaN, on every path (the streaming
// kernels note NaN codes instead of patching each value), and only its row's.
TEST_P(NarrowKernelTest, Fp8NanCodesMakeTheirRowsProductsNan) {
  for (auto [n, k] : {std::pair<int64_t, int64_t>{40, 300}, {300, 1000}}) {
    NarrowWeight w = MakeWeight(WeightDType::kFp8E4M3, n, k, 11);
    // A copy, unaligned as MakeWeight's (its byte before raw included).
    auto bytes = std::make_shared<std::vector<uint8_t>>(w.m.raw - 1, w.m.raw + n * k);
    uint8_t* codes = bytes->data() + 1;
    codes[3 * k + 5] = 0x7f;           // row 3, first block
    codes[(n - 2) * k + k - 1] = 0xff;  // the next-to-last row, its last (tail) column
    w.m.raw = codes;
    w.m.keep = bytes;
    for (int64_t m : {1, 2, 3, 4, 8, 16, 17, 64}) {
      const std::vector<float> x = Activations(m * k, 9);
      std::vector<float> y(static_cast<size_t>(m * n));
      NarrowLinear(x.data(), m, w.m, y.data());
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t r = 0; r < n; ++r) {
          const bool nan_row = r == 3 || r == n - 2;
          EXPECT_EQ(std::isnan(y[i * n + r]), nan_row) << "m=" << m << " row " << r;
        }
      }
    }
  }
}

TEST_P(NarrowKernelTest, LinearMatchesTheFp32Product) {
  // Shapes off every vector width and tile: K not a multiple of 16, N not of 4, M across the
  // streaming (<= 16) and panel paths.
  for (WeightDType dtype : {WeightDType::kBFloat16, WeightDType::kFp8E4M3}) {
    // 301 x 1000 and 6 x 16384 are split across the threads with a tail of rows (and more
    // threads than tiles where the machine has them); the small ones run on one thread.
    for (auto [n, k] : {std::pair<int64_t, int64_t>{37, 200}, {300, 1000}, {257, 129}, {301, 1000},
                        {6, 16384}}) {
      NarrowWeight w = MakeWeight(dtype, n, k, static_cast<uint32_t>(n * k));
      for (int64_t m : {1, 2, 3, 4, 5, 8, 16, 17, 64, 130}) {
        std::vector<float> x = Activations(m * k, static_cast<uint32_t>(m));
        std::vector<float> y(static_cast<size_t>(m * n), std::nanf(""));
        NarrowLinear(x.data(), m, w.m, y.data());
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double ref = 0.0, mag = 0.0;
            for (int64_t c = 0; c < k; ++c) {
              ref += static_cast<double>(x[i * k + c]) * w.reference[j * k + c];
              mag += std::fabs(static_cast<double>(x[i * k + c]) * w.reference[j * k + c]);
            }
            // fp32 accumulation in another order: bounded by K ulps of the magnitude.
            ASSERT_NEAR(y[i * n + j], ref, 1e-6 * mag * std::sqrt(static_cast<double>(k)) + 1e-7)
                << model::WeightDTypeName(dtype) << " m=" << m << " n=" << n << " k=" << k
                << " at " << i << "," << j;
          }
        }
      }
    }
  }
}

// A row's result does not depend on the rows that come with it, wherever the weight is
// streamed (M up to kBf16StreamMaxRows for BF16, kNarrowStreamMaxRows for FP8: decode,
// speculative verification, small batches): each row of x against each weight row is summed in
// one order by every tile, the one-row streams included. So batch 1 equals batch 8 and a
// verification pass equals one-token decoding, bit for bit. (Above those M, the widened panels
// and oneDNN sum in another order.)
TEST_P(NarrowKernelTest, StreamedRowsAreTheSameBitsAtEveryM) {
  for (WeightDType dtype : {WeightDType::kBFloat16, WeightDType::kFp8E4M3}) {
    const int64_t max_m = dtype == WeightDType::kBFloat16 && NarrowKernelsUseAvx512()
                              ? kBf16StreamMaxRows
                              : kNarrowStreamMaxRows;
    for (auto [n, k] : {std::pair<int64_t, int64_t>{301, 1000}, {37, 200}, {6, 16384},
                        {25, 9}, {40, 264}}) {
      NarrowWeight w = MakeWeight(dtype, n, k, static_cast<uint32_t>(n + k));
      const std::vector<float> x = Activations(max_m * k, 5);
      std::vector<float> one(static_cast<size_t>(max_m * n));
      for (int64_t i = 0; i < max_m; ++i) NarrowLinear(x.data() + i * k, 1, w.m, one.data() + i * n);
      for (int64_t m : {int64_t{2}, int64_t{3}, int64_t{4}, int64_t{7}, int64_t{8}, max_m}) {
        std::vector<float> y(static_cast<size_t>(m * n));
        NarrowLinear(x.data(), m, w.m, y.data());
        ASSERT_EQ(std::memcmp(y.data(), one.data(), y.size() * sizeof(float)), 0)
            << model::WeightDTypeName(dtype) << " m=" << m << " n=" << n << " k=" << k;
      }
      // The same rows as GroupedLinear tasks.
      std::vector<float> g(static_cast<size_t>(8 * n));
      const LinearTask task{x.data(), k, 8, &w.m, 0, n, false, g.data(), n};
      ASSERT_TRUE(GroupedLinear({&task, 1}).ok());
      ASSERT_EQ(std::memcmp(g.data(), one.data(), g.size() * sizeof(float)), 0)
          << model::WeightDTypeName(dtype) << " grouped, n=" << n << " k=" << k;
    }
  }
}

TEST_P(NarrowKernelTest, GroupedLinearMatchesTheFp32ProductsInBothForms) {
  // Several tasks in one call, as a decode step issues them: slices of weight rows at offsets
  // that cut fp8 scale blocks, strided x and y, both forms, M from 1 to the streaming limit,
  // columns off the 16- and 64-wide vectors.
  for (WeightDType dtype : {WeightDType::kBFloat16, WeightDType::kFp8E4M3}) {
    NarrowWeight a = MakeWeight(dtype, 300, 200, 11);
    NarrowWeight b = MakeWeight(dtype, 260, 1000, 12);
    for (int64_t m : {1, 3, 4, 7, 16}) {
      struct Case {
        const NarrowWeight* w;
        int64_t row0, rows;
        bool transposed;
        int64_t ldx, ldy;
      };
      const std::vector<Case> cases = {
          {&a, 0, 300, false, 200, 300},  {&a, 37, 101, false, 211, 130},
          {&b, 130, 129, false, 1000, 129}, {&a, 64, 64, true, 70, 205},
          {&b, 3, 250, true, 250, 1000},  {&a, 200, 100, true, 100, 200}};
      std::vector<std::vector<float>> xs, ys;
      std::vector<LinearTask> tasks;
      for (size_t t = 0; t < cases.size(); ++t) {
        const Case& c = cases[t];
        xs.push_back(Activations(m * c.ldx, static_cast<uint32_t>(m * 10 + t)));
        ys.emplace_back(static_cast<size_t>(m * c.ldy), std::nanf(""));
      }
      for (size_t t = 0; t < cases.size(); ++t) {
        const Case& c = cases[t];
        tasks.push_back({xs[t].data(), c.ldx, m, &c.w->m, c.row0, c.rows, c.transposed,
                         ys[t].data(), c.ldy});
      }
      // Tasks with nothing to do: no rows of x (y untouched), no weight rows (the transposed
      // form's empty sums are zeros).
      std::vector<float> untouched(8, 7.0f), zeros(static_cast<size_t>(m * 200), 7.0f);
      tasks.push_back({xs[0].data(), 200, 0, &a.m, 0, 300, false, untouched.data(), 300});
      tasks.push_back({xs[0].data(), 200, m, &a.m, 5, 0, true, zeros.data(), 200});
      ASSERT_TRUE(GroupedLinear(tasks).ok());
      for (float v : untouched) ASSERT_EQ(v, 7.0f);
      for (float v : zeros) ASSERT_EQ(v, 0.0f);
      for (size_t t = 0; t < cases.size(); ++t) {
        const Case& c = cases[t];
        const int64_t k = c.w->m.cols;
        const int64_t in = c.transposed ? c.rows : k, out = c.transposed ? k : c.rows;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < out; ++j) {
            double ref = 0.0, mag = 0.0;
            for (int64_t r = 0; r < in; ++r) {
              const float wv = c.transposed ? c.w->reference[(c.row0 + r) * k + j]
                                            : c.w->reference[(c.row0 + j) * k + r];
              const double p = static_cast<double>(xs[t][i * c.ldx + r]) * wv;
              ref += p;
              mag += std::fabs(p);
            }
            ASSERT_NEAR(ys[t][i * c.ldy + j], ref,
                        1e-6 * mag * std::sqrt(static_cast<double>(in)) + 1e-7)
                << model::WeightDTypeName(dtype) << " task " << t << " m=" << m << " at " << i
                << "," << j;
          }
          // Nothing written past the task's own columns.
          for (int64_t j = out; j < c.ldy; ++j) ASSERT_TRUE(std::isnan(ys[t][i * c.ldy + j]));
        }
      }
    }
  }
}

TEST_P(NarrowKernelTest, GroupedLinearRefusesWhatItDoesNotRun) {
  NarrowWeight w = MakeWeight(WeightDType::kBFloat16, 64, 64, 3);
  std::vector<float> x(64 * 64), y(64 * 64);
  LinearTask ok{x.data(), 64, 4, &w.m, 0, 64, false, y.data(), 64};
  EXPECT_TRUE(GroupedLinear({ok}).ok());
  LinearTask too_many_rows = ok;
  too_many_rows.m = kNarrowStreamMaxRows + 1;
  LinearTask past_the_weight = ok;
  past_the_weight.row0 = 1;
  LinearTask short_stride = ok;
  short_stride.ldy = 10;
  Matrix fp32;
  fp32.rows = fp32.cols = 64;
  fp32.data.assign(64 * 64, 1.0f);
  LinearTask not_narrow = ok;
  not_narrow.w = &fp32;
  for (const LinearTask& bad : {too_many_rows, past_the_weight, short_stride, not_narrow}) {
    EXPECT_FALSE(GroupedLinearSupports(bad));
    absl::Status s = GroupedLinear({ok, bad});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("task 1"), std::string::npos) << s;
  }
}

// AccumulateExperts over narrow experts equals adding one expert at a time
// (AccumulateExpert), bit for bit, on each of its paths: decode sizes (grouped), prefill
// sizes with experts enough for every thread (side by side), few experts (one at a time).
TEST_P(NarrowKernelTest, AccumulateExpertsEqualsOneExpertAtATime) {
  const int64_t hidden = 256, inter = 128;
  for (WeightDType dtype : {WeightDType::kBFloat16, WeightDType::kFp8E4M3}) {
    std::vector<NarrowWeight> keep;
    std::vector<model::MlpWeights> experts(12);
    for (size_t e = 0; e < experts.size(); ++e) {
      keep.push_back(MakeWeight(dtype, inter, hidden, static_cast<uint32_t>(100 + 3 * e)));
      experts[e].gate = keep.back().m;
      keep.push_back(MakeWeight(dtype, inter, hidden, static_cast<uint32_t>(101 + 3 * e)));
      experts[e].up = keep.back().m;
      keep.push_back(MakeWeight(dtype, hidden, inter, static_cast<uint32_t>(102 + 3 * e)));
      experts[e].down = keep.back().m;
    }
    for (auto [tokens, used] : {std::pair<int64_t, size_t>{6, 12}, {200, 12}, {200, 2}}) {
      const std::vector<float> x = Activations(tokens * hidden, static_cast<uint32_t>(tokens));
      std::vector<std::vector<int32_t>> rows(used);
      std::vector<std::vector<float>> weights(used);
      std::mt19937 rng(static_cast<uint32_t>(tokens + used));
      for (int64_t t = 0; t < tokens; ++t) {
        for (size_t k = 0; k < 2; ++k) {  // two experts per token
          const size_t e = (static_cast<size_t>(t) * 5 + k * 7 + rng() % 3) % used;
          rows[e].push_back(static_cast<int32_t>(t));
          weights[e].push_back(0.25f + 0.5f * static_cast<float>(rng() % 100) / 100.0f);
        }
      }
      std::vector<ExpertRows> selected;
      std::vector<float> expected(static_cast<size_t>(tokens * hidden), 0.0f);
      for (size_t e = 0; e < used; ++e) {
        if (rows[e].empty()) continue;
        selected.push_back({&experts[e], rows[e], weights[e]});
        AccumulateExpert(experts[e], x.data(), hidden, rows[e], weights[e], expected.data());
      }
      std::vector<float> got(static_cast<size_t>(tokens * hidden), 0.0f);
      ASSERT_TRUE(AccumulateExperts(selected, x.data(), hidden, got.data()).ok());
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(std::memcmp(&got[i], &expected[i], 4), 0)
            << model::WeightDTypeName(dtype) << " tokens=" << tokens << " experts=" << used
            << " at " << i << ": " << got[i] << " vs " << expected[i];
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, NarrowKernelTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "Avx512" : "Portable"; });

// --- MlaAttention

struct PagedLatents {
  std::vector<std::vector<uint8_t>> blocks;  // each block_tokens rows
  LatentBlocks view;
  std::vector<float> rows;  // [keys, lat] as the attention sees them (bf16-rounded if bf16)
};

PagedLatents MakeLatents(int64_t keys, int64_t lat, int64_t block_tokens, bool bf16,
                         uint32_t seed) {
  PagedLatents p;
  std::vector<float> values = Activations(keys * lat, seed);
  p.rows.resize(values.size());
  p.view.dtype = bf16 ? LatentStorage::kBFloat16 : LatentStorage::kFloat32;
  p.view.block_tokens = block_tokens;
  p.view.keys = keys;
  const int64_t vb = bf16 ? 2 : 4;
  const int64_t nblocks = (keys + block_tokens - 1) / block_tokens;
  p.blocks.resize(static_cast<size_t>(nblocks));
  // Blocks in reverse order of allocation, as a paged cache hands them out.
  for (int64_t b = nblocks - 1; b >= 0; --b) {
    p.blocks[b].assign(static_cast<size_t>(block_tokens * lat * vb), 0xee);
  }
  for (int64_t r = 0; r < keys; ++r) {
    uint8_t* dst = p.blocks[r / block_tokens].data() + (r % block_tokens) * lat * vb;
    for (int64_t v = 0; v < lat; ++v) {
      float x = values[r * lat + v];
      if (bf16) {
        const uint16_t b = model::FloatToBf16(x);
        std::memcpy(dst + 2 * v, &b, 2);
        x = model::Bf16ToFloat(b);
      } else {
        std::memcpy(dst + 4 * v, &x, 4);
      }
      p.rows[r * lat + v] = x;
    }
  }
  for (auto& b : p.blocks) p.view.blocks.push_back(b.data());
  return p;
}

// Units in the last place between a and b (both finite, same sign).
int64_t UlpDistance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::abs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

TEST(SoftmaxTest, VectorExpIsWithinTwoUlpOfStdExp) {
  // Every 1/4096 of [-87, 0] and random points, then the edges.
  std::vector<float> x;
  for (int64_t i = 0; i <= 87 * 4096; ++i) x.push_back(-static_cast<float>(i) / 4096.0f);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-87.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) x.push_back(u(rng));
  std::vector<float> e(x.size());
  ExpNonPositiveForTest(x.data(), static_cast<int64_t>(x.size()), e.data());
  int64_t worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float want = std::exp(x[i]);
    ASSERT_TRUE(std::isfinite(e[i]) && e[i] > 0.0f) << x[i];
    worst = std::max(worst, UlpDistance(e[i], want));
    ASSERT_LE(UlpDistance(e[i], want), 2) << "e^" << x[i] << ": " << e[i] << " vs " << want;
  }
  RecordProperty("worst_ulp", static_cast<int>(worst));
  const float edges[] = {0.0f, -0.0f, -87.5f, -1000.0f, -std::numeric_limits<float>::infinity(),
                         std::nanf("")};
  float out[6];
  ExpNonPositiveForTest(edges, 6, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], 0.0f);
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[4], 0.0f);
  EXPECT_TRUE(std::isnan(out[5]));
}

TEST(SoftmaxTest, MatchesTheDoubleSoftmaxAtEveryLength) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 6.0f);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n = 1; n <= 70; ++n) {
    std::vector<float> x(static_cast<size_t>(n) + 3, 123.0f);  // 3 guards after the row
    for (int64_t i = 0; i < n; ++i) x[i] = normal(rng);
    if (n > 2) x[n / 2] = -inf;  // masked: probability 0
    double max = -inf, sum = 0.0;
    for (int64_t i = 0; i < n; ++i) max = std::max<double>(max, x[i]);
    for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - max);
    std::vector<float> y = x;
    SoftmaxInPlace(y.data(), n);
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::exp(static_cast<double>(x[i]) - max) / sum;
      // x - max is rounded to fp32 first (as by any fp32 softmax): |x - max| ulps of it.
      const double bound =
          std::isinf(x[i]) ? 0.0 : (1e-6 + 1.2e-7 * std::fabs(static_cast<double>(x[i]) - max)) * want;
      EXPECT_NEAR(y[i], want, bound + 1e-30) << "n=" << n << " i=" << i;
      total += y[i];
    }
    EXPECT_NEAR(total, 1.0, 1e-6) << n;
    if (n > 2) EXPECT_EQ(y[n / 2], 0.0f);
    for (int j = 0; j < 3; ++j) EXPECT_EQ(y[n + j], 123.0f) << "wrote past the row, n=" << n;
  }
  std::vector<float> masked(9, -inf);
  SoftmaxInPlace(masked.data(), 9);
  for (float v : masked) EXPECT_EQ(v, 0.0f);
  // The scalar rules: nothing to do at n = 0; +inf (a max that is not finite) gives zeros; a
  // NaN entry is skipped by the max and makes every probability NaN.
  float untouched = 5.0f;
  SoftmaxInPlace(&untouched, 0);
  EXPECT_EQ(untouched, 5.0f);
  for (int64_t n : {3, 11}) {
    std::vector<float> with_inf(static_cast<size_t>(n), 1.0f);
    with_inf[1] = inf;
    SoftmaxInPlace(with_inf.data(), n);
    for (float v : with_inf) EXPECT_EQ(v, 0.0f) << n;
    std::vector<float> with_nan(static_cast<size_t>(n), 1.0f);
    with_nan[n - 1] = std::nanf("");
    SoftmaxInPlace(with_nan.data(), n);
    for (float v : with_nan) EXPECT_TRUE(std::isnan(v)) << n;
  }
}

TEST(MlaAttentionTest, BatchedPagedAttentionMatchesTwoPassSoftmax) {
  const int64_t heads = 5, kvr = 24, dr = 8, lat = kvr + dr;
  const float scale = 0.17f;
  struct Seq {
    int64_t start, rows, block_tokens;
    bool bf16;
  };
  // Decode rows (1 token), a chunk of several causal rows, a single key, blocks that end
  // exactly at the context and blocks longer than it.
  const std::vector<Seq> shapes = {{0, 1, 4, false},  {37, 1, 16, true}, {8, 5, 3, false},
                                   {63, 1, 64, true}, {100, 3, 7, true}, {15, 1, 16, false}};
  std::vector<PagedLatents> latents;
  std::vector<MlaSequence> sequences;
  int64_t rows = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Seq& s = shapes[i];
    latents.push_back(MakeLatents(s.start + s.rows, lat, s.block_tokens, s.bf16,
                                  static_cast<uint32_t>(10 + i)));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    sequences.push_back({latents[i].view, rows, shapes[i].rows, shapes[i].start});
    rows += shapes[i].rows;
  }
  std::vector<float> q = Activations(rows * heads * lat, 99);
  std::vector<float> out(static_cast<size_t>(rows * heads * kvr), std::nanf(""));
  MlaAttentionParams p;
  p.heads = heads;
  p.kv_lora_rank = kvr;
  p.rope_dim = dr;
  p.softmax_scale = scale;
  p.q = q.data();
  p.out = out.data();
  p.sequences = sequences;
  ASSERT_TRUE(MlaAttention(p).ok());
  for (size_t i = 0; i < shapes.size(); ++i) {
    const MlaSequence& s = sequences[i];
    const std::vector<float>& kv = latents[i].rows;
    for (int64_t t = 0; t < s.rows; ++t) {
      const int64_t valid = s.start + t + 1;
      for (int64_t h = 0; h < heads; ++h) {
        const float* qv = &q[((s.first_row + t) * heads + h) * lat];
        std::vector<double> score(static_cast<size_t>(valid));
        double mx = -1e300, sum = 0.0;
        for (int64_t j = 0; j < valid; ++j) {
          double d = 0.0;
          for (int64_t v = 0; v < lat; ++v) d += static_cast<double>(qv[v]) * kv[j * lat + v];
          score[j] = d * scale;
          mx = std::max(mx, score[j]);
        }
        for (double& x : score) sum += (x = std::exp(x - mx));
        for (int64_t v = 0; v < kvr; ++v) {
          double o = 0.0;
          for (int64_t j = 0; j < valid; ++j) o += score[j] / sum * kv[j * lat + v];
          ASSERT_NEAR(out[((s.first_row + t) * heads + h) * kvr + v], o, 2e-5)
              << "sequence " << i << " token " << t << " head " << h << " value " << v;
        }
      }
    }
  }
}

TEST(MlaAttentionTest, BadParamsAreRefusedWithTheirName) {
  PagedLatents l = MakeLatents(10, 16, 4, false, 1);
  std::vector<float> q(2 * 2 * 16), out(2 * 2 * 12);
  std::vector<MlaSequence> seqs = {{l.view, 0, 1, 9}};
  MlaAttentionParams p;
  p.heads = 2;
  p.kv_lora_rank = 12;
  p.rope_dim = 4;
  p.q = q.data();
  p.out = out.data();
  p.sequences = seqs;
  EXPECT_TRUE(MlaAttention(p).ok());
  seqs[0].start = 10;  // 11 keys, the blocks hold 10
  absl::Status s = MlaAttention(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sequence 0 attends 11 keys"), std::string::npos) << s;
  seqs[0].start = 9;
  seqs[0].latents.blocks[1] = nullptr;
  s = MlaAttention(p);
  EXPECT_NE(s.message().find("block 1 is null"), std::string::npos) << s;
  seqs[0].latents = l.view;
  p.heads = 0;
  EXPECT_EQ(MlaAttention(p).code(), absl::StatusCode::kInvalidArgument);
  p.heads = 2;
  p.out = nullptr;
  EXPECT_EQ(MlaAttention(p).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace splitmoe::kernels
