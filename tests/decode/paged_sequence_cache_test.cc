// Decoding over the paged latent cache: prompts run into paged blocks (4 tokens per block, so
// sequences span many blocks), then continuous batching decodes from them. With fp32 blocks the
// tokens and logprobs equal the single-process engine's; with bf16 blocks they stay close; every
// block comes back when the sequences are released.
#include "decode/paged_sequence_cache.h"

#include <map>

#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/model/numeric.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::decode {
namespace {

struct DecodeRun {
  std::map<std::string, std::vector<engine::DecodedToken>> tokens;
};

DecodeRun DecodeOnPagedCache(engine::Engine& e, LatentDType dtype,
                             const std::vector<std::vector<int32_t>>& prompts, int64_t max_tokens) {
  const auto& c = e.config();
  PagedLatentCacheOptions options;
  options.layout = {c.num_hidden_layers, c.latent_dim(), /*block_tokens=*/4, dtype};
  options.num_blocks = 64;
  auto cache = PagedLatentCache::Create(options);
  EXPECT_TRUE(cache.ok()) << cache.status();
  engine::BatchDecoder decoder(&e.transformer(), c.eos_token_id);
  DecodeRun run;
  std::vector<SequenceId> ids;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto reservation = cache->Reserve(static_cast<int64_t>(prompts[i].size()));
    EXPECT_TRUE(reservation.ok()) << reservation.status();
    ids.push_back(reservation->id);
    engine::DecodeSequence s;
    s.id = "s" + std::to_string(i);
    auto view = std::make_unique<PagedSequenceCache>(&*cache, reservation->id, 0);
    auto first = engine::PrefillFirstToken(e.transformer(), prompts[i], view.get(), {}, 2,
                                           engine::AttentionForm::kAbsorbed);
    EXPECT_TRUE(first.ok()) << first.status();
    run.tokens[s.id].push_back(*first);
    s.cache = std::move(view);
    s.prompt_tokens = static_cast<int64_t>(prompts[i].size());
    s.next_token = first->token;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    s.logprobs = 2;
    EXPECT_TRUE(decoder.Add(std::move(s)).ok());
  }
  EXPECT_GT(cache->blocks_used(), 0);
  while (decoder.running() > 0) {
    auto step = decoder.Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (auto& t : *step) run.tokens[t.id].push_back(t);
  }
  decoder.TakeFinished();
  for (SequenceId id : ids) EXPECT_TRUE(cache->Release(id).ok());
  EXPECT_EQ(cache->blocks_used(), 0);
  return run;
}

TEST(PagedSequenceCacheTest, Fp32BlocksDecodeExactlyLikeTheEngine) {
  auto e = engine::Engine::Load(testing::TinyModel("paged", nullptr));
  ASSERT_TRUE(e.ok()) << e.status();
  std::vector<std::vector<int32_t>> prompts = {
      {0, 3}, {0, 9, 27, 81, 243, 218, 142, 426, 254, 250, 238}, {0}};
  DecodeRun run = DecodeOnPagedCache(**e, LatentDType::kFloat32, prompts, 9);
  for (size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = 9;
    r.ignore_eos = true;
    r.logprobs = 2;
    auto want = (*e)->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    const auto& got = run.tokens["s" + std::to_string(i)];
    ASSERT_EQ(got.size(), want->tokens.size());
    for (size_t j = 0; j < got.size(); ++j) {
      EXPECT_EQ(got[j].token, want->tokens[j]) << i << "/" << j;
      EXPECT_NEAR(got[j].logprob->logprob, want->logprobs[j].logprob, 1e-4);
    }
  }
}

TEST(PagedSequenceCacheTest, Bf16BlocksStayClose) {
  auto e = engine::Engine::Load(testing::TinyModel("paged", nullptr));
  ASSERT_TRUE(e.ok());
  std::vector<std::vector<int32_t>> prompts = {{0, 9, 27, 81, 243, 218, 142, 426, 254}};
  DecodeRun fp32 = DecodeOnPagedCache(**e, LatentDType::kFloat32, prompts, 8);
  DecodeRun bf16 = DecodeOnPagedCache(**e, LatentDType::kBFloat16, prompts, 8);
  const auto& a = fp32.tokens["s0"];
  const auto& b = bf16.tokens["s0"];
  ASSERT_EQ(a.size(), b.size());
  double max_diff = 0;
  int same = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    same += a[j].token == b[j].token;
    // Compare the logprob of the fp32 run's token where both runs still agree.
    if (a[j].token == b[j].token) {
      max_diff = std::max(
          max_diff, static_cast<double>(std::fabs(a[j].logprob->logprob - b[j].logprob->logprob)));
    }
  }
  std::printf("bf16 latent cache: %d of %zu greedy tokens equal to fp32, max logprob diff %.3g\n",
              same, a.size(), max_diff);
  EXPECT_GT(max_diff, 0.0);  // bf16 really stored
  EXPECT_LT(max_diff, 0.05);
  EXPECT_EQ(a[0].token, b[0].token);
}

// Rows read out of a view (what a writer would ship): the stored rows and those staged since, as
// fp32 — in bf16 both rounded as the blocks hold them — never a fresh empty staging row.
TEST(PagedSequenceCacheTest, ReadRowsGivesStoredAndStagedRows) {
  for (LatentDType dtype : {LatentDType::kFloat32, LatentDType::kBFloat16}) {
    PagedLatentCacheOptions options;
    options.layout = {2, 8, /*block_tokens=*/4, dtype};
    options.num_blocks = 8;
    auto cache = PagedLatentCache::Create(options);
    ASSERT_TRUE(cache.ok()) << cache.status();
    auto reservation = cache->Reserve(10);
    ASSERT_TRUE(reservation.ok()) << reservation.status();
    PagedSequenceCache view(&*cache, reservation->id, 0);
    ASSERT_TRUE(view.Reserve(10).ok());
    std::vector<float> rows(10 * 8);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.1f * static_cast<float>(i) + 1.0f / 3;
    ASSERT_TRUE(view.Store(kernels::Device{}, 1, 0, rows.data(), 6).ok());  // stored
    view.Commit(6);
    for (int64_t p = 6; p < 10; ++p) {  // written through Row(), not yet stored
      std::copy(rows.begin() + p * 8, rows.begin() + (p + 1) * 8, view.Row(1, p));
    }
    std::vector<float> got(7 * 8, -1.0f);
    ASSERT_TRUE(view.ReadRows(1, 3, 7, got.data()).ok());
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = rows[3 * 8 + i];
      EXPECT_EQ(got[i], dtype == LatentDType::kBFloat16
                            ? model::Bf16ToFloat(model::FloatToBf16(want))
                            : want)
          << "value " << i;
    }
    EXPECT_TRUE(cache->Release(reservation->id).ok());
  }
}

}  // namespace
}  // namespace splitmoe::decode
