// The engine against itself and against the definitions: the two attention forms agree,
// incremental decoding from the latent cache equals a full recompute, batching does not change
// results, and the cache holds exactly the latents. The engine against DeepSeek's semantics
// (the PyTorch reference) is golden_test.cc.
#include "common/engine/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common/engine/engine.h"
#include "common/engine/pooled_latent_cache.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu_ops.h"
#include "common/model/numeric.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::engine {
namespace {

using model::TinyModelOptions;

struct Loaded {
  std::unique_ptr<Engine> engine;
};

std::unique_ptr<Engine> LoadEngine(const std::string& dir,
                                   AttentionForm form = AttentionForm::kAbsorbed) {
  EngineOptions options;
  options.prefill_form = form;
  auto e = Engine::Load(dir, options);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

std::vector<int32_t> Prompt(int64_t n, int64_t vocab, int seed = 0) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i)
    t.push_back(static_cast<int32_t>((i * 7919 + 13 + seed * 101) % vocab));
  return t;
}

// Logits of every row of a single-sequence forward pass.
std::vector<float> AllLogits(Engine& e, const std::vector<int32_t>& tokens, AttentionForm form) {
  const auto& c = e.config();
  LatentCache cache(c.num_hidden_layers, c.latent_dim());
  std::vector<SequenceChunk> batch = {{tokens, &cache}};
  std::vector<float> hidden;
  absl::Status s = e.transformer().Forward(batch, form, &hidden);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<float> logits(tokens.size() * c.vocab_size);
  EXPECT_TRUE(
      e.transformer().Logits(hidden.data(), static_cast<int64_t>(tokens.size()), logits.data()).ok());
  return logits;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

class TransformerTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string ModelDir() {
    const std::string style = GetParam();
    return testing::TinyModel("tf_" + style, [&](TinyModelOptions& o) {
      if (style == "v3_fp8") {
        o.fp8 = true;
      } else {
        o.style = style;
      }
    });
  }
};

TEST_P(TransformerTest, NaiveAndAbsorbedFormsAgree) {
  auto e = LoadEngine(ModelDir());
  auto tokens = Prompt(37, e->config().vocab_size);
  auto absorbed = AllLogits(*e, tokens, AttentionForm::kAbsorbed);
  auto naive = AllLogits(*e, tokens, AttentionForm::kNaive);
  EXPECT_LT(MaxAbsDiff(absorbed, naive), 2e-4);
}

TEST_P(TransformerTest, IncrementalDecodeEqualsFullRecompute) {
  auto e = LoadEngine(ModelDir());
  const auto& c = e->config();
  auto tokens = Prompt(30, c.vocab_size, 1);
  auto full = AllLogits(*e, tokens, AttentionForm::kNaive);
  LatentCache cache(c.num_hidden_layers, c.latent_dim());
  const size_t prefill = 20;
  std::vector<int32_t> head(tokens.begin(), tokens.begin() + prefill);
  std::vector<float> hidden, logits(c.vocab_size);
  std::vector<SequenceChunk> batch = {{head, &cache}};
  SPLITMOE_ASSERT_OK(e->transformer().Forward(batch, AttentionForm::kAbsorbed, &hidden));
  for (size_t i = prefill; i < tokens.size(); ++i) {
    std::vector<int32_t> one = {tokens[i]};
    std::vector<SequenceChunk> step = {{one, &cache}};
    SPLITMOE_ASSERT_OK(e->transformer().Forward(step, AttentionForm::kAbsorbed, &hidden));
    EXPECT_TRUE(e->transformer().Logits(hidden.data(), 1, logits.data()).ok());
    std::vector<float> expect(full.begin() + i * c.vocab_size,
                              full.begin() + (i + 1) * c.vocab_size);
    EXPECT_LT(MaxAbsDiff(logits, expect), 2e-4) << "position " << i;
  }
  EXPECT_EQ(cache.length(), static_cast<int64_t>(tokens.size()));
}

TEST_P(TransformerTest, BatchingChunksDoesNotChangeResults) {
  auto e = LoadEngine(ModelDir());
  const auto& c = e->config();
  auto a = Prompt(9, c.vocab_size, 2), b = Prompt(17, c.vocab_size, 3);
  auto la = AllLogits(*e, a, AttentionForm::kAbsorbed),
       lb = AllLogits(*e, b, AttentionForm::kAbsorbed);
  LatentCache ca(c.num_hidden_layers, c.latent_dim()), cb(c.num_hidden_layers, c.latent_dim());
  std::vector<SequenceChunk> batch = {{a, &ca}, {b, &cb}};
  std::vector<float> hidden;
  SPLITMOE_ASSERT_OK(e->transformer().Forward(batch, AttentionForm::kAbsorbed, &hidden));
  std::vector<float> logits((a.size() + b.size()) * c.vocab_size);
  EXPECT_TRUE(e->transformer()
                  .Logits(hidden.data(), static_cast<int64_t>(a.size() + b.size()), logits.data())
                  .ok());
  std::vector<float> got_a(logits.begin(), logits.begin() + a.size() * c.vocab_size);
  std::vector<float> got_b(logits.begin() + a.size() * c.vocab_size, logits.end());
  EXPECT_LT(MaxAbsDiff(got_a, la), 1e-4);
  EXPECT_LT(MaxAbsDiff(got_b, lb), 1e-4);
}

// The expanded form in query tiles (a prompt of several tiles, a chunk after cached rows) and
// kAuto's two forms in one batch (a prompt expanded beside a decode row absorbed) give the
// absorbed form's logits.
TEST_P(TransformerTest, ExpandedTilesAndMixedFormsAgreeWithAbsorbed) {
  auto e = LoadEngine(ModelDir());
  const auto& c = e->config();
  auto tokens = Prompt(150, c.vocab_size, 6);
  const auto full = AllLogits(*e, tokens, AttentionForm::kAbsorbed);
  EXPECT_LT(MaxAbsDiff(AllLogits(*e, tokens, AttentionForm::kNaive), full), 2e-4);

  // 70 tokens, then 80 more after them, both expanded.
  LatentCache cache(c.num_hidden_layers, c.latent_dim());
  std::vector<int32_t> head(tokens.begin(), tokens.begin() + 70), tail(tokens.begin() + 70, tokens.end());
  std::vector<float> hidden;
  std::vector<SequenceChunk> first = {{head, &cache}}, second = {{tail, &cache}};
  SPLITMOE_ASSERT_OK(e->transformer().Forward(first, AttentionForm::kNaive, &hidden));
  SPLITMOE_ASSERT_OK(e->transformer().Forward(second, AttentionForm::kNaive, &hidden));
  std::vector<float> logits(tail.size() * c.vocab_size);
  EXPECT_TRUE(e->transformer()
                  .Logits(hidden.data(), static_cast<int64_t>(tail.size()), logits.data())
                  .ok());
  EXPECT_LT(MaxAbsDiff(logits, std::vector<float>(full.begin() + 70 * c.vocab_size, full.end())),
            2e-4);

  // One kAuto batch: a decode row of a 21-token sequence (absorbed), then the 150-token prompt
  // (expanded).
  ASSERT_FALSE(ExpandedAttentionIsCheaper(c, 1, 20));
  ASSERT_TRUE(ExpandedAttentionIsCheaper(c, 150, 0));
  auto other = Prompt(21, c.vocab_size, 7);
  const auto other_full = AllLogits(*e, other, AttentionForm::kAbsorbed);
  LatentCache oc(c.num_hidden_layers, c.latent_dim()), pc(c.num_hidden_layers, c.latent_dim());
  std::vector<int32_t> other_head(other.begin(), other.begin() + 20), other_last = {other[20]};
  std::vector<SequenceChunk> prefill = {{other_head, &oc}};
  SPLITMOE_ASSERT_OK(e->transformer().Forward(prefill, AttentionForm::kAbsorbed, &hidden));
  std::vector<SequenceChunk> mixed = {{other_last, &oc}, {tokens, &pc}};
  SPLITMOE_ASSERT_OK(e->transformer().Forward(mixed, AttentionForm::kAuto, &hidden));
  logits.resize((1 + tokens.size()) * c.vocab_size);
  EXPECT_TRUE(e->transformer()
                  .Logits(hidden.data(), static_cast<int64_t>(1 + tokens.size()), logits.data())
                  .ok());
  EXPECT_LT(MaxAbsDiff(std::vector<float>(logits.begin(), logits.begin() + c.vocab_size),
                       std::vector<float>(other_full.end() - c.vocab_size, other_full.end())),
            2e-4);
  EXPECT_LT(MaxAbsDiff(std::vector<float>(logits.begin() + c.vocab_size, logits.end()), full), 2e-4);
}

// A contiguous cache holding its latents rounded to BF16, as a BF16 pool stores them: the
// reference a BF16 pool must match to fp32 rounding.
class Bf16RoundingCache : public LatentCache {
 public:
  using LatentCache::LatentCache;
  absl::Status Store(const kernels::Device& device, int64_t layer, int64_t start,
                     const float* rows, int64_t n) override {
    std::vector<float> rounded(rows, rows + n * latent_dim());
    for (float& v : rounded) v = model::Bf16ToFloat(model::FloatToBf16(v));
    return LatentCache::Store(device, layer, start, rounded.data(), n);
  }
};

// The device-resident cache's code (a pool of blocks shared by sequences, rows stored through
// block tables, attention over the pool, the expanded form over gathered rows) run on the CPU:
// two sequences whose blocks interleave in one pool, prefilled in both forms and decoded in one
// batch, give the contiguous caches' logits (a BF16 pool: those of contiguous caches rounding
// their latents to BF16).
// Every block returns to the pool, and a prompt larger than the pool is refused.
TEST_P(TransformerTest, PooledCachesGiveTheContiguousCachesResults) {
  auto e = LoadEngine(ModelDir());
  const auto& c = e->config();
  const auto a = Prompt(20, c.vocab_size, 8), b = Prompt(33, c.vocab_size, 9);
  const int64_t steps = 10;
  // Every row's logits of: a and b prefilled in one batch in `form`, then `steps` decode steps of
  // both in one batch (teacher-forced: the same tokens for every cache).
  const auto fed = Prompt(steps, c.vocab_size, 11);
  auto run = [&](SequenceCache* ca, SequenceCache* cb, AttentionForm form) {
    std::vector<float> out, hidden, logits;
    std::vector<SequenceChunk> batch = {{a, ca}, {b, cb}};
    EXPECT_TRUE(e->transformer().Forward(batch, form, &hidden).ok());
    logits.resize((a.size() + b.size()) * c.vocab_size);
    EXPECT_TRUE(e->transformer()
                    .Logits(hidden.data(), static_cast<int64_t>(a.size() + b.size()), logits.data())
                    .ok());
    out = logits;
    for (int64_t step = 0; step < steps; ++step) {
      std::vector<int32_t> next_a = {fed[step]}, next_b = {fed[steps - 1 - step]};
      std::vector<SequenceChunk> decode = {{next_a, ca}, {next_b, cb}};
      EXPECT_TRUE(e->transformer().Forward(decode, AttentionForm::kAbsorbed, &hidden).ok());
      logits.resize(2 * c.vocab_size);
      EXPECT_TRUE(e->transformer().Logits(hidden.data(), 2, logits.data()).ok());
      out.insert(out.end(), logits.begin(), logits.end());
    }
    return out;
  };
  for (AttentionForm form : {AttentionForm::kAbsorbed, AttentionForm::kNaive}) {
    LatentCache la(c.num_hidden_layers, c.latent_dim()), lb(c.num_hidden_layers, c.latent_dim());
    const std::vector<float> want_fp32 = run(&la, &lb, form);
    Bf16RoundingCache ra(c.num_hidden_layers, c.latent_dim()),
        rb(c.num_hidden_layers, c.latent_dim());
    const std::vector<float> want_bf16 = run(&ra, &rb, form);
    for (auto dtype : {kernels::LatentStorage::kFloat32, kernels::LatentStorage::kBFloat16}) {
      const bool bf16 = dtype == kernels::LatentStorage::kBFloat16;
      const std::vector<float>& want = bf16 ? want_bf16 : want_fp32;
      LatentPoolOptions o;
      o.layers = c.num_hidden_layers;
      o.latent_dim = c.latent_dim();
      o.blocks = 16;
      o.block_tokens = 8;
      o.dtype = dtype;
      auto pool = LatentPool::Create(kernels::Device{}, o);
      ASSERT_TRUE(pool.ok()) << pool.status();
      std::vector<float> got;
      {
        PooledSequenceCache taken(pool->get());  // blocks 0-1 held elsewhere: ids start at 2
        ASSERT_TRUE(taken.Reserve(9).ok());
        PooledSequenceCache pa(pool->get()), pb(pool->get());
        got = run(&pa, &pb, form);
        EXPECT_EQ(pa.length(), static_cast<int64_t>(a.size()) + steps);
        // Rows read back out (what a prefill worker ships) are what the reference cache holds
        // (layer 0's, which no attention's rounding precedes, to the bit), and rows written in
        // (a prefix read back from elsewhere) read back the same.
        LatentCache& ref = bf16 ? static_cast<LatentCache&>(ra) : la;
        const int64_t lat = c.latent_dim(), keys = pa.length();
        std::vector<float> rows(static_cast<size_t>(keys * lat));
        ASSERT_TRUE(pa.ReadRows(0, 0, keys, rows.data()).ok());
        EXPECT_EQ(rows, std::vector<float>(ref.Layer(0), ref.Layer(0) + keys * lat));
        for (int64_t layer : {int64_t{0}, c.num_hidden_layers - 1}) {
          ASSERT_TRUE(pa.ReadRows(layer, 0, keys, rows.data()).ok());
          std::vector<float> part(static_cast<size_t>(13 * lat));
          ASSERT_TRUE(pa.ReadRows(layer, 5, 13, part.data()).ok());  // across a block's end
          EXPECT_EQ(part, std::vector<float>(rows.begin() + 5 * lat, rows.begin() + 18 * lat));
        }
        EXPECT_FALSE(pa.ReadRows(0, 0, pa.reserved_tokens() + 1, rows.data()).ok());
        {
          PooledSequenceCache copy(pool->get());
          ASSERT_TRUE(copy.Reserve(keys).ok());
          ASSERT_TRUE(pa.ReadRows(1, 0, keys, rows.data()).ok());
          ASSERT_TRUE(copy.WriteRows(1, 0, rows.data(), keys).ok());
          std::vector<float> back(rows.size());
          ASSERT_TRUE(copy.ReadRows(1, 0, keys, back.data()).ok());
          EXPECT_EQ(back, rows);
        }
        // a's blocks and b's interleave in the pool once they decode.
        EXPECT_EQ(pa.blocks().front(), 2);
        EXPECT_GT(pa.blocks().back(), pb.blocks().front());
        EXPECT_EQ((*pool)->free_blocks(), 16 - 2 - 4 - 6);
        // A prompt past the pool's room: refused, and nothing taken.
        PooledSequenceCache big(pool->get());
        const auto long_prompt = Prompt(40, c.vocab_size, 10);
        std::vector<SequenceChunk> too_big = {{long_prompt, &big}};
        std::vector<float> hidden;
        const absl::Status s = e->transformer().Forward(too_big, AttentionForm::kAbsorbed, &hidden);
        EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
        EXPECT_EQ((*pool)->free_blocks(), 4);
      }
      EXPECT_EQ((*pool)->free_blocks(), 16) << "every block back";
      // fp32: the contiguous caches' logits to rounding (blocks of 8, not 64, change the online
      // softmax's partial sums); BF16: those of caches holding the same rounded latents, to the
      // BF16 attention kernel's own summation order — far inside what rounding the latents
      // moves the logits by on these models (0.06-0.08; 1.8 on v2-greedy, where it flips an
      // expert).
      EXPECT_LT(MaxAbsDiff(got, want), bf16 ? 1e-3 : 1e-4)
          << (bf16 ? "bf16" : "fp32") << " pool, form " << static_cast<int>(form);
      if (bf16) {
        EXPECT_GT(MaxAbsDiff(got, want_fp32), 0.0) << "a BF16 pool rounds the latents";
      }
    }
  }
}

// The staged executor (a host executor behind a Transformer on a device: inputs copied out,
// the sum copied back) changes nothing but where the buffers are: on the CPU device, the same
// logits as the executor it wraps, prefill and decode.
TEST_P(TransformerTest, StagedExecutorGivesItsHostExecutorsResults) {
  auto e = LoadEngine(ModelDir());
  const auto& c = e->config();
  LocalMoeExecutor local(c, e->weights());
  StagedMoeExecutor staged(&local, kernels::Device{}, c);
  Transformer through_staging(c, e->weights(), &staged);
  const auto tokens = Prompt(23, c.vocab_size, 12);
  for (AttentionForm form : {AttentionForm::kAbsorbed, AttentionForm::kNaive}) {
    LatentCache want_cache(c.num_hidden_layers, c.latent_dim()),
        got_cache(c.num_hidden_layers, c.latent_dim());
    std::vector<float> want, got;
    std::vector<SequenceChunk> a = {{tokens, &want_cache}}, b = {{tokens, &got_cache}};
    SPLITMOE_ASSERT_OK(e->transformer().Forward(a, form, &want));
    SPLITMOE_ASSERT_OK(through_staging.Forward(b, form, &got));
    EXPECT_EQ(got, want);
    const std::vector<int32_t> next = {tokens[3]};
    std::vector<SequenceChunk> da = {{next, &want_cache}}, db = {{next, &got_cache}};
    SPLITMOE_ASSERT_OK(e->transformer().Forward(da, AttentionForm::kAbsorbed, &want));
    SPLITMOE_ASSERT_OK(through_staging.Forward(db, AttentionForm::kAbsorbed, &got));
    EXPECT_EQ(got, want);
  }
}

// kAuto at DeepSeek-V3's shapes: decode rows and short drafts absorbed, prompts expanded, a short
// chunk after a long cached prefix absorbed.
TEST(AttentionFormTest, AutoPicksExpandedForPromptsAndAbsorbedForDecode) {
  model::ModelConfig v3;
  v3.num_attention_heads = 128;
  v3.kv_lora_rank = 512;
  v3.qk_nope_head_dim = 128;
  v3.qk_rope_head_dim = 64;
  v3.v_head_dim = 128;
  EXPECT_FALSE(ExpandedAttentionIsCheaper(v3, 1, 0));
  EXPECT_FALSE(ExpandedAttentionIsCheaper(v3, 1, 4096));
  EXPECT_FALSE(ExpandedAttentionIsCheaper(v3, 4, 4096));  // a verification pass of 3 drafts
  EXPECT_TRUE(ExpandedAttentionIsCheaper(v3, 512, 0));
  EXPECT_TRUE(ExpandedAttentionIsCheaper(v3, 4096, 0));
  EXPECT_TRUE(ExpandedAttentionIsCheaper(v3, 512, 4096));
  EXPECT_FALSE(ExpandedAttentionIsCheaper(v3, 16, 16384));  // a short suffix after a cached prefix
}

INSTANTIATE_TEST_SUITE_P(Styles, TransformerTest,
                         ::testing::Values("v3", "v2", "v2-greedy", "v3_fp8"));

TEST(LatentCacheTest, HoldsExactlyTheLatentsOfEachToken) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  const auto& c = e->config();
  const auto& w = e->weights();
  LatentCache cache(c.num_hidden_layers, c.latent_dim());
  EXPECT_EQ(cache.latent_dim(), c.kv_lora_rank + c.qk_rope_head_dim);
  EXPECT_EQ(cache.bytes_per_token(),
            c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4);
  std::vector<int32_t> tokens = {5, 9, 11};
  std::vector<SequenceChunk> batch = {{tokens, &cache}};
  std::vector<float> hidden;
  SPLITMOE_ASSERT_OK(e->transformer().Forward(batch, AttentionForm::kAbsorbed, &hidden));
  // Layer 0 sees the embeddings: its cache row must be [kv_norm(c_kv), rope(k_pe)] of them.
  const int64_t h = c.hidden_size, kvr = c.kv_lora_rank, dr = c.qk_rope_head_dim;
  RopeTable rope(c);
  for (int64_t p = 0; p < 3; ++p) {
    std::vector<float> emb(h), xn(h), kv(c.latent_dim()), expect(c.latent_dim()), cs(dr);
    kernels::WidenRows(w.embed, tokens[p], 1, emb.data());
    kernels::RmsNorm(emb.data(), 1, h, h, w.layers[0].input_norm.data(), 1e-6f,
                     xn.data(), h);
    kernels::Linear(xn.data(), 1, w.layers[0].attn.kv_a_proj, kv.data());
    kernels::RmsNorm(kv.data(), 1, kvr, kvr, w.layers[0].attn.kv_a_norm.data(), 1e-6f,
                     expect.data(), kvr);
    std::copy(kv.begin() + kvr, kv.end(), expect.begin() + kvr);
    rope.CosSin(p, cs.data());
    kernels::ApplyRope(expect.data() + kvr, cs.data(), dr);
    const float* row = cache.Row(0, p);
    for (int64_t i = 0; i < c.latent_dim(); ++i)
      EXPECT_NEAR(row[i], expect[i], 1e-5) << p << "," << i;
  }
}

TEST(EngineTest, GreedyGenerationMatchesTeacherForcedArgmax) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  GenerateRequest req;
  req.prompt = Prompt(11, e->config().vocab_size, 4);
  req.max_tokens = 12;
  req.logprobs = 3;
  req.ignore_eos = true;
  auto out = e->Generate(req, nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->tokens.size(), 12u);
  EXPECT_EQ(out->finish_reason, "length");
  std::vector<int32_t> all = req.prompt;
  all.insert(all.end(), out->tokens.begin(), out->tokens.end());
  auto score = e->Score(all, 3, /*with_mtp=*/false);
  ASSERT_TRUE(score.ok()) << score.status();
  for (size_t i = 0; i < out->tokens.size(); ++i) {
    const auto& lp = *score->prompt_logprobs[req.prompt.size() + i];
    EXPECT_EQ(lp.top[0].first, out->tokens[i]) << i;
    EXPECT_NEAR(lp.logprob, out->logprobs[i].logprob, 1e-4) << i;
  }
}

TEST(EngineTest, ChunkedPrefillEqualsOnePass) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  const auto& c = e->config();
  auto tokens = Prompt(Engine::kPrefillChunkTokens * 2 + 37, c.vocab_size, 9);
  auto one_pass = AllLogits(*e, tokens, AttentionForm::kAbsorbed);
  auto score = e->Score(tokens, 1, /*with_mtp=*/true);
  ASSERT_TRUE(score.ok()) << score.status();
  ASSERT_EQ(score->mtp_logprobs.size(), tokens.size() - 2);
  for (size_t i = 1; i < tokens.size(); ++i) {
    std::vector<float> row(one_pass.begin() + (i - 1) * c.vocab_size, one_pass.begin() + i * c.vocab_size);
    TokenLogprob want = ComputeLogprob(row, tokens[i], 1);
    ASSERT_NEAR(score->prompt_logprobs[i]->logprob, want.logprob, 1e-4) << "position " << i;
  }
}

TEST(EngineTest, SeededSamplingIsReproducible) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  GenerateRequest req;
  req.prompt = Prompt(5, e->config().vocab_size, 5);
  req.max_tokens = 10;
  req.ignore_eos = true;
  req.sampling.temperature = 1.5;
  req.sampling.top_p = 0.95;
  req.sampling.seed = 1234;
  auto a = e->Generate(req, nullptr);
  auto b = e->Generate(req, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  std::set<std::vector<int32_t>> distinct;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    req.sampling.seed = seed;
    auto r = e->Generate(req, nullptr);
    ASSERT_TRUE(r.ok());
    distinct.insert(r->tokens);
  }
  EXPECT_GT(distinct.size(), 1u);  // temperature 1.5 on a tiny model: seeds must matter
}

// A device this process cannot run on is refused when the engine loads, by name.
TEST(EngineTest, RefusesADeviceItCannotRun) {
  const std::string dir = testing::TinyModel("tf_v3", nullptr);
  EngineOptions options;
  options.device = "tpu:0";
  auto bad = Engine::Load(dir, options);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  EXPECT_THAT(std::string(bad.status().message()), ::testing::HasSubstr("cpu or cuda:N"));
  if (!kernels::BackendAvailable(kernels::Backend::kCuda)) {
    options.device = "cuda:0";
    auto no_cuda = Engine::Load(dir, options);
    EXPECT_EQ(no_cuda.status().code(), absl::StatusCode::kUnimplemented) << no_cuda.status();
    EXPECT_THAT(std::string(no_cuda.status().message()), ::testing::HasSubstr("EnableCudaOps"));
  }
}

TEST(EngineTest, RefusesBadRequests) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  GenerateRequest ok;
  ok.prompt = {1, 2, 3};
  auto expect_invalid = [&](GenerateRequest r, const std::string& needle) {
    auto out = e->Generate(r, nullptr);
    ASSERT_FALSE(out.ok()) << needle;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(out.status().message().find(needle), std::string::npos) << out.status();
  };
  GenerateRequest r = ok;
  r.prompt.clear();
  expect_invalid(r, "empty prompt");
  r = ok;
  r.prompt.push_back(100000);
  expect_invalid(r, "100000");
  r = ok;
  r.max_tokens = e->config().max_position_embeddings;
  expect_invalid(r, "exceeds the context");
  r = ok;
  r.sampling.temperature = -1;
  expect_invalid(r, "temperature");
  r = ok;
  r.sampling.top_p = 0;
  expect_invalid(r, "top_p");
  r = ok;
  r.max_tokens = 0;
  expect_invalid(r, "max_tokens");
  EXPECT_FALSE(e->Score({}, 5, false).ok());
  EXPECT_FALSE(e->Score({-1}, 5, false).ok());
}

TEST(EngineTest, StopsAtStopTokenIds) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  GenerateRequest req;
  req.prompt = Prompt(6, e->config().vocab_size, 6);
  req.max_tokens = 8;
  req.ignore_eos = true;
  auto free_run = e->Generate(req, nullptr);
  ASSERT_TRUE(free_run.ok());
  req.stop_token_ids = {free_run->tokens[3]};
  auto stopped = e->Generate(req, nullptr);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->finish_reason, "stop");
  auto first = std::find(free_run->tokens.begin(), free_run->tokens.end(), free_run->tokens[3]);
  EXPECT_EQ(stopped->tokens.size(), static_cast<size_t>(first - free_run->tokens.begin()) + 1);
}

TEST(EngineTest, MtpPredictsTwoAhead) {
  auto e = LoadEngine(testing::TinyModel("tf_v3", nullptr));
  ASSERT_EQ(e->transformer().mtp_modules(), 1);
  auto tokens = Prompt(10, e->config().vocab_size, 7);
  auto r = e->Score(tokens, 2, /*with_mtp=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->mtp_logprobs.size(), tokens.size() - 2);
  for (size_t i = 0; i < r->mtp_logprobs.size(); ++i) {
    EXPECT_EQ(r->mtp_logprobs[i].token, tokens[i + 2]);
    EXPECT_TRUE(std::isfinite(r->mtp_logprobs[i].logprob));
    EXPECT_LE(r->mtp_logprobs[i].logprob, 0.0f);
  }
}

// Greedy decoding is only meaningful when the next-token distributions are peaked.
TEST(TinyModelTest, FullVocabularyModelHasPeakedDistributions) {
  auto e = LoadEngine(
      testing::TinyModel("full_vocab", [](TinyModelOptions& o) { o.vocab_size = 129280; }));
  auto tokens = Prompt(24, e->config().vocab_size, 8);
  auto r = e->Score(tokens, 2, false);
  ASSERT_TRUE(r.ok());
  double top1 = 0, gap = 0;
  for (size_t i = 1; i < tokens.size(); ++i) {
    top1 += std::exp(r->prompt_logprobs[i]->top[0].second);
    gap += r->prompt_logprobs[i]->top[0].second - r->prompt_logprobs[i]->top[1].second;
  }
  top1 /= static_cast<double>(tokens.size() - 1);
  gap /= static_cast<double>(tokens.size() - 1);
  std::printf(
      "mean top-1 probability %.3f, mean top1-top2 logprob gap %.3f (uniform would be %.2e)\n",
      top1, gap, 1.0 / 129280);
  EXPECT_GT(top1, 0.2);
  EXPECT_GT(gap, 0.3);
}

}  // namespace
}  // namespace splitmoe::engine
