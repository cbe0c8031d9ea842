// Speculative decoding with the MTP module (BatchDecoder's draft_tokens): whatever the drafts,
// the output is the tokens and logprobs of one-token decoding — greedy and seeded, at every K,
// across prompt chunks, against stop ids, max_tokens and the end of the context, in a
// continuous batch with sequences that do not speculate, in ping-pong micro-batches — and an
// agreeing MTP module (make-tiny --mtp-draft agree) has most drafts accepted, a random one
// almost none.
#include <map>
#include <memory>

#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::engine {
namespace {

std::vector<int32_t> Prompt(int64_t n, int seed) {
  std::vector<int32_t> t = {0};
  for (int64_t i = 1; i < n; ++i) t.push_back(static_cast<int32_t>((i * 7919 + seed * 131) % 512));
  return t;
}

std::string AgreeingModel() {
  return testing::TinyModel("mtp_agree", [](model::TinyModelOptions& o) {
    o.mtp_draft = "agree";
    o.max_position_embeddings = 512;
  });
}
std::string RandomMtpModel() { return testing::TinyModel("mtp_random"); }
std::string AgreeingFp8Model() {
  return testing::TinyModel("mtp_agree_fp8", [](model::TinyModelOptions& o) {
    o.mtp_draft = "agree";
    o.fp8 = true;
  });
}

std::unique_ptr<Engine> Load(const std::string& dir, int64_t draft_tokens) {
  EngineOptions options;
  options.draft_tokens = draft_tokens;
  auto engine = Engine::Load(dir, options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

GenerateRequest Request(std::vector<int32_t> prompt, SamplingParams sampling, int64_t max_tokens) {
  GenerateRequest r;
  r.prompt = std::move(prompt);
  r.sampling = sampling;
  r.max_tokens = max_tokens;
  r.logprobs = 2;
  r.ignore_eos = true;
  return r;
}

void ExpectSameOutput(const GenerateResult& got, const GenerateResult& want) {
  ASSERT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.finish_reason, want.finish_reason);
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size());
  for (size_t i = 0; i < got.logprobs.size(); ++i) {
    EXPECT_NEAR(got.logprobs[i].logprob, want.logprobs[i].logprob, 1e-5) << "token " << i;
    ASSERT_EQ(got.logprobs[i].top.size(), want.logprobs[i].top.size());
    for (size_t k = 0; k < got.logprobs[i].top.size(); ++k)
      EXPECT_EQ(got.logprobs[i].top[k].first, want.logprobs[i].top[k].first);
  }
}

const SamplingParams kGreedy;
const SamplingParams kSeeded{.temperature = 0.8, .top_p = 0.9, .top_k = 0, .seed = 7};
const SamplingParams kHot{.temperature = 1.3, .top_p = 1.0, .top_k = 20, .seed = 99};

TEST(SpeculativeTest, SameTokensAsOneTokenDecodingAtEveryK) {
  for (const std::string& dir : {AgreeingModel(), RandomMtpModel(), AgreeingFp8Model()}) {
    auto plain = Load(dir, 0);
    ASSERT_NE(plain, nullptr);
    for (const SamplingParams& sampling : {kGreedy, kSeeded, kHot}) {
      for (const auto& prompt : {Prompt(5, 1), Prompt(300, 2)}) {  // 300: two prompt chunks
        const GenerateRequest r = Request(prompt, sampling, 40);
        auto want = plain->Generate(r, nullptr);
        ASSERT_TRUE(want.ok()) << want.status();
        for (int64_t k : {1, 3, 6}) {
          SCOPED_TRACE(dir + " K=" + std::to_string(k) + " T=" +
                       std::to_string(sampling.temperature) + " prompt " +
                       std::to_string(prompt.size()));
          auto spec = Load(dir, k);
          ASSERT_NE(spec, nullptr);
          auto got = spec->Generate(r, nullptr);
          ASSERT_TRUE(got.ok()) << got.status();
          ExpectSameOutput(*got, *want);
          EXPECT_GT(got->speculative.verify_passes, 0);
          // Every token but the prefill's came from a verification pass, but perhaps the last
          // (one token left: nothing to draft).
          const auto n = static_cast<int64_t>(got->tokens.size());
          EXPECT_LE(got->speculative.emitted + 1, n);
          EXPECT_GE(got->speculative.emitted + 2, n);
        }
      }
    }
  }
}

TEST(SpeculativeTest, AnAgreeingModuleIsMostlyAcceptedARandomOneAlmostNever) {
  const GenerateRequest r = Request(Prompt(12, 3), kGreedy, 64);
  auto agree = Load(AgreeingModel(), 2);
  auto random = Load(RandomMtpModel(), 2);
  ASSERT_NE(agree, nullptr);
  ASSERT_NE(random, nullptr);
  auto a = agree->Generate(r, nullptr);
  auto b = random->Generate(r, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GT(a->speculative.acceptance_rate(), 0.5) << a->speculative.accepted;
  EXPECT_GT(a->speculative.tokens_per_pass(), 1.8);
  EXPECT_LT(b->speculative.acceptance_rate(), 0.1);
  EXPECT_LE(a->speculative.drafted, 2 * a->speculative.verify_passes);
}

TEST(SpeculativeTest, StopIdsMaxTokensAndTheContextEndStopWhereOneTokenDecodingStops) {
  const std::string dir = AgreeingModel();  // max_position_embeddings 512
  auto plain = Load(dir, 0);
  auto spec = Load(dir, 4);
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(spec, nullptr);
  // max_tokens smaller than, equal to and just past a verification pass.
  for (int64_t max_tokens : {1, 2, 3, 5, 6, 7}) {
    const GenerateRequest r = Request(Prompt(9, 4), kGreedy, max_tokens);
    auto want = plain->Generate(r, nullptr);
    auto got = spec->Generate(r, nullptr);
    ASSERT_TRUE(want.ok() && got.ok());
    ExpectSameOutput(*got, *want);
  }
  // A stop id in the middle of accepted drafts ends the sequence on it.
  GenerateRequest r = Request(Prompt(9, 5), kGreedy, 40);
  auto full = plain->Generate(r, nullptr);
  ASSERT_TRUE(full.ok());
  for (size_t at : {size_t{3}, size_t{10}, size_t{17}}) {
    r.stop_token_ids = {full->tokens[at]};
    auto want = plain->Generate(r, nullptr);
    auto got = spec->Generate(r, nullptr);
    ASSERT_TRUE(want.ok() && got.ok());
    ExpectSameOutput(*got, *want);
    EXPECT_EQ(got->finish_reason, "stop");
  }
  // Up to the last position of the context: drafts never run past it.
  r = Request(Prompt(480, 6), kGreedy, 32);
  auto want = plain->Generate(r, nullptr);
  auto got = spec->Generate(r, nullptr);
  ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
  ExpectSameOutput(*got, *want);
}

TEST(SpeculativeTest, WithoutAnMtpModuleItDecodesOneTokenAStep) {
  const std::string dir = testing::TinyModel("no_mtp", [](model::TinyModelOptions& o) {
    o.mtp_layers = 0;
  });
  EngineOptions options;
  options.draft_tokens = 2;
  auto spec = Engine::Load(dir, options);  // a warning, not an error: the same tokens
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto plain = Load(dir, 0);
  const GenerateRequest r = Request(Prompt(7, 1), kSeeded, 20);
  auto got = (*spec)->Generate(r, nullptr);
  auto want = plain->Generate(r, nullptr);
  ASSERT_TRUE(got.ok() && want.ok());
  ExpectSameOutput(*got, *want);
  EXPECT_EQ(got->speculative.verify_passes, 0);
  options.draft_tokens = -1;
  EXPECT_EQ(Engine::Load(dir, options).status().code(), absl::StatusCode::kInvalidArgument);
  model::TinyModelOptions bad;
  bad.mtp_draft = "sometimes";
  EXPECT_EQ(model::WriteTinyModel(bad, testing::TempDir("bad_draft"), "").code(),
            absl::StatusCode::kInvalidArgument);
}

// A continuous batch where speculating and one-token sequences join at different steps, with and
// without ping-pong micro-batches: each gives what it gives alone.
void ExpectMixedBatchMatchesTheEngine(PingPong* overlap) {
  auto plain = Load(AgreeingModel(), 0);
  ASSERT_NE(plain, nullptr);
  Transformer& t = plain->transformer();
  const model::ModelConfig& c = plain->config();
  struct Case {
    std::vector<int32_t> prompt;
    SamplingParams sampling;
    int64_t max_tokens;
    int64_t join_step;
    bool speculate;
  };
  const std::vector<Case> cases = {
      {Prompt(3, 1), kGreedy, 30, 0, true},   {Prompt(70, 2), kSeeded, 12, 0, false},
      {Prompt(290, 3), kHot, 17, 2, true},    {Prompt(1, 4), kGreedy, 25, 3, false},
      {Prompt(20, 5), kSeeded, 21, 5, true},
  };
  std::vector<GenerateResult> want;
  for (const Case& k : cases) {
    auto out = plain->Generate(Request(k.prompt, k.sampling, k.max_tokens), nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    want.push_back(*out);
  }
  BatchDecoder decoder(&t, c.eos_token_id, overlap, /*draft_tokens=*/3);
  std::map<std::string, std::vector<DecodedToken>> got;
  size_t joined = 0;
  for (int64_t step = 0; joined < cases.size() || decoder.running() > 0; ++step) {
    for (size_t i = 0; i < cases.size(); ++i) {
      if (cases[i].join_step != step) continue;
      DecodeSequence s;
      s.id = "seq" + std::to_string(i);
      s.cache = std::make_unique<LatentCache>(c.num_hidden_layers, c.latent_dim());
      if (cases[i].speculate) s.mtp_cache = std::make_unique<LatentCache>(1, c.latent_dim());
      std::vector<PrefillItem> items(1);
      items[0].prompt = cases[i].prompt;
      items[0].cache = s.cache.get();
      items[0].mtp_cache = s.mtp_cache.get();
      items[0].sampling = cases[i].sampling;
      items[0].logprobs = 2;
      ASSERT_TRUE(PrefillBatch(t, items, AttentionForm::kAbsorbed).ok());
      ASSERT_TRUE(items[0].status.ok()) << items[0].status;
      items[0].first.id = s.id;
      got[s.id].push_back(items[0].first);
      s.prompt_tokens = static_cast<int64_t>(cases[i].prompt.size());
      s.next_token = items[0].first.token;
      s.sampling = cases[i].sampling;
      s.max_tokens = cases[i].max_tokens;
      s.ignore_eos = true;
      s.logprobs = 2;
      if (cases[i].speculate) {
        EXPECT_EQ(s.mtp_cache->length(), s.prompt_tokens - 1);
        s.mtp_tokens = {s.next_token};
        s.mtp_hidden = items[0].last_hidden;
      }
      ASSERT_TRUE(decoder.Add(std::move(s)).ok());
      ++joined;
    }
    auto out = decoder.Step();
    ASSERT_TRUE(out.ok()) << out.status();
    for (DecodedToken& tok : *out) got[tok.id].push_back(tok);
    decoder.TakeFinished();
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    const auto& tokens = got["seq" + std::to_string(i)];
    ASSERT_EQ(tokens.size(), want[i].tokens.size());
    for (size_t j = 0; j < tokens.size(); ++j) {
      EXPECT_EQ(tokens[j].token, want[i].tokens[j]) << "token " << j;
      EXPECT_NEAR(tokens[j].logprob->logprob, want[i].logprobs[j].logprob, 1e-5);
    }
    EXPECT_TRUE(tokens.back().finished);
  }
  EXPECT_GT(decoder.speculative_stats().accepted, 0);
}

TEST(SpeculativeTest, MixedContinuousBatchMatchesTheEngine) {
  ExpectMixedBatchMatchesTheEngine(nullptr);
}

TEST(SpeculativeTest, MixedBatchInPingPongMatchesTheEngine) {
  PingPong overlap;
  ExpectMixedBatchMatchesTheEngine(&overlap);
}

TEST(SpeculativeTest, AMismatchedMtpCacheIsRefused) {
  auto plain = Load(AgreeingModel(), 0);
  ASSERT_NE(plain, nullptr);
  const model::ModelConfig& c = plain->config();
  BatchDecoder decoder(&plain->transformer(), c.eos_token_id, nullptr, 2);
  DecodeSequence s;
  s.id = "x";
  s.cache = std::make_unique<LatentCache>(c.num_hidden_layers, c.latent_dim());
  s.cache->Commit(4);
  s.prompt_tokens = 4;
  s.next_token = 7;
  s.max_tokens = 8;
  s.mtp_cache = std::make_unique<LatentCache>(1, c.latent_dim());
  s.mtp_tokens = {7};
  s.mtp_hidden.assign(static_cast<size_t>(c.hidden_size), 0.0f);
  EXPECT_EQ(BatchDecoder::Check(s).code(), absl::StatusCode::kInvalidArgument);  // 0 + 1 != 4
  s.mtp_cache->Commit(3);
  s.mtp_hidden.resize(5);
  EXPECT_EQ(decoder.Add(std::move(s)).code(), absl::StatusCode::kInvalidArgument);  // hidden size
}

}  // namespace
}  // namespace splitmoe::engine
