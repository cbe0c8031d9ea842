// Continuous batching against the single-process engine: sequences of different lengths and
// sampling parameters, joining the batch at different steps and leaving when done, produce
// exactly the tokens (and logprobs) each would produce alone through Engine::Generate.
#include "common/engine/batch_decoder.h"

#include <atomic>
#include <cmath>
#include <map>
#include <memory>

#include "common/engine/engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::engine {
namespace {

struct Case {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens;
  int64_t join_step;
};

std::vector<int32_t> Prompt(int64_t n, int seed) {
  std::vector<int32_t> t = {0};
  for (int64_t i = 1; i < n; ++i) t.push_back(static_cast<int32_t>((i * 7919 + seed * 131) % 512));
  return t;
}

// Every sequence of a continuous batch gives what it gives alone; with `overlap`, steps run as
// two micro-batches in ping-pong.
void ExpectStaggeredRequestsMatchTheEngine(PingPong* overlap) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  std::vector<Case> cases = {
      {Prompt(3, 1), {}, 10, 0},
      {Prompt(70, 2), {.temperature = 0.8, .top_p = 0.9, .top_k = 0, .seed = 11}, 4, 0},
      {Prompt(300, 3),
       {.temperature = 1.2, .top_p = 1.0, .top_k = 5, .seed = 12},
       7,
       2},  // > one chunk
      {Prompt(1, 4), {}, 12, 3},
      {Prompt(20, 5), {.temperature = 0.5, .top_p = 0.7, .top_k = 0, .seed = 13}, 9, 5},
  };
  // What each request gives alone.
  std::vector<GenerateResult> want;
  for (const Case& k : cases) {
    GenerateRequest r;
    r.prompt = k.prompt;
    r.sampling = k.sampling;
    r.max_tokens = k.max_tokens;
    r.logprobs = 2;
    r.ignore_eos = true;
    auto out = e.Generate(r, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    want.push_back(*out);
  }
  BatchDecoder decoder(&e.transformer(), c.eos_token_id, overlap);
  std::map<std::string, std::vector<DecodedToken>> got;
  size_t joined = 0;
  for (int64_t step = 0; joined < cases.size() || decoder.running() > 0; ++step) {
    for (size_t i = 0; i < cases.size(); ++i) {
      if (cases[i].join_step != step) continue;
      DecodeSequence s;
      s.id = "seq" + std::to_string(i);
      s.cache = std::make_unique<LatentCache>(c.num_hidden_layers, c.latent_dim());
      auto first = PrefillFirstToken(e.transformer(), cases[i].prompt, s.cache.get(),
                                     cases[i].sampling, 2, AttentionForm::kAbsorbed);
      ASSERT_TRUE(first.ok()) << first.status();
      first->id = s.id;
      got[s.id].push_back(*first);
      s.prompt_tokens = static_cast<int64_t>(cases[i].prompt.size());
      s.next_token = first->token;
      s.sampling = cases[i].sampling;
      s.max_tokens = cases[i].max_tokens;
      s.ignore_eos = true;
      s.logprobs = 2;
      ASSERT_TRUE(decoder.Add(std::move(s)).ok());
      ++joined;
    }
    auto out = decoder.Step();
    ASSERT_TRUE(out.ok()) << out.status();
    for (DecodedToken& t : *out) got[t.id].push_back(t);
    for (DecodeSequence& done : decoder.TakeFinished()) EXPECT_NE(done.cache, nullptr);
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& tokens = got["seq" + std::to_string(i)];
    ASSERT_EQ(tokens.size(), want[i].tokens.size()) << "sequence " << i;
    for (size_t j = 0; j < tokens.size(); ++j) {
      EXPECT_EQ(tokens[j].token, want[i].tokens[j]) << "sequence " << i << " token " << j;
      EXPECT_NEAR(tokens[j].logprob->logprob, want[i].logprobs[j].logprob, 1e-4);
    }
    EXPECT_TRUE(tokens.back().finished);
    EXPECT_EQ(tokens.back().finish_reason, "length");
  }
}

TEST(BatchDecoderTest, MatchesTheEngineForStaggeredMixedRequests) {
  ExpectStaggeredRequestsMatchTheEngine(nullptr);
}

TEST(BatchDecoderTest, TwoMicroBatchesInPingPongMatchTheEngine) {
  PingPong overlap;
  ExpectStaggeredRequestsMatchTheEngine(&overlap);
}

TEST(BatchDecoderTest, CancelAndStopIds) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok());
  const auto& c = (*engine)->config();
  BatchDecoder decoder(&(*engine)->transformer(), c.eos_token_id);
  auto make = [&](const std::string& id, int seed) {
    DecodeSequence s;
    s.id = id;
    s.cache = std::make_unique<LatentCache>(c.num_hidden_layers, c.latent_dim());
    auto prompt = Prompt(8, seed);
    auto first = PrefillFirstToken((*engine)->transformer(), prompt, s.cache.get(), {}, -1,
                                   AttentionForm::kAbsorbed);
    EXPECT_TRUE(first.ok());
    s.prompt_tokens = 8;
    s.next_token = first->token;
    s.max_tokens = 50;
    s.ignore_eos = true;
    return s;
  };
  ASSERT_TRUE(decoder.Add(make("a", 1)).ok());
  EXPECT_EQ(decoder.Add(make("a", 2)).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(decoder.Step().ok());
  auto removed = decoder.Remove("a");
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(removed->cache->length(), 9);  // prompt + the first token fed back
  EXPECT_EQ(decoder.running(), 0u);
  EXPECT_EQ(decoder.Remove("a").status().code(), absl::StatusCode::kNotFound);
  // A stop id ends the sequence with "stop" the first time it is produced.
  DecodeSequence s = make("b", 3);
  BatchDecoder probe(&(*engine)->transformer(), c.eos_token_id);
  ASSERT_TRUE(probe.Add(make("p", 3)).ok());
  auto step = probe.Step();
  ASSERT_TRUE(step.ok());
  s.stop_token_ids = {(*step)[0].token};
  ASSERT_TRUE(decoder.Add(std::move(s)).ok());
  auto out = decoder.Step();
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE((*out)[0].finished);
  EXPECT_EQ((*out)[0].finish_reason, "stop");
  EXPECT_EQ(decoder.TakeFinished().size(), 1u);
}

// Prompts prefilled together (cross-request batching in the prefill worker) give each prompt
// exactly what it gets alone: the first token, its logprob, the prompt logprobs and the cached
// latents; an item stopped by the hook stops alone.
// Each prompt of a PrefillBatch gives what it gives alone; with `overlap`, as two groups in
// ping-pong.
// One PrefillItem per prompt, each writing its own fresh cache (kept in `caches`).
std::vector<PrefillItem> ItemsWithCaches(const model::ModelConfig& c,
                                         const std::vector<std::vector<int32_t>>& prompts,
                                         std::vector<std::unique_ptr<LatentCache>>* caches) {
  std::vector<PrefillItem> items(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    caches->push_back(std::make_unique<LatentCache>(c.num_hidden_layers, c.latent_dim()));
    items[i].prompt = prompts[i];
    items[i].cache = caches->back().get();
  }
  return items;
}

void ExpectPrefillBatchEqualsPrefillingAlone(PingPong* overlap) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  const std::vector<std::vector<int32_t>> prompts = {Prompt(5, 1), Prompt(300, 2), Prompt(17, 3),
                                                     Prompt(1, 4), Prompt(40, 5)};
  std::vector<std::unique_ptr<LatentCache>> caches;
  std::vector<PrefillItem> items = ItemsWithCaches(c, prompts, &caches);
  for (size_t i = 0; i < prompts.size(); ++i) {
    items[i].sampling = {.temperature = i % 2 ? 0.9 : 0.0, .top_p = 1.0, .top_k = 0, .seed = i};
    items[i].logprobs = 3;
    items[i].prompt_top_logprobs = 2;
  }
  std::map<size_t, int> calls;
  ASSERT_TRUE(PrefillBatch(e.transformer(), items, AttentionForm::kAbsorbed,
                           [&](size_t item, int64_t layer, int64_t, int64_t) {
                             ++calls[item];
                             // Item 4 is cancelled after its first layer.
                             return item == 4 && layer == 0 ? absl::CancelledError("stop")
                                                            : absl::OkStatus();
                           },
                           256, overlap)
                  .ok());
  EXPECT_EQ(items[4].status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls[4], 1);
  EXPECT_EQ(calls[1], 2 * c.num_hidden_layers);  // two chunks
  for (size_t i = 0; i + 1 < prompts.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(items[i].status.ok()) << items[i].status;
    LatentCache alone(c.num_hidden_layers, c.latent_dim());
    std::vector<std::optional<TokenLogprob>> lps;
    auto first = PrefillFirstToken(e.transformer(), prompts[i], &alone, items[i].sampling, 3,
                                   AttentionForm::kAbsorbed, nullptr, &lps, 2);
    ASSERT_TRUE(first.ok());
    EXPECT_EQ(items[i].first.token, first->token);
    EXPECT_NEAR(items[i].first.logprob->logprob, first->logprob->logprob, 1e-5);
    ASSERT_EQ(items[i].prompt_logprobs.size(), lps.size());
    for (size_t j = 1; j < lps.size(); ++j) {
      // The GEMMs' blocking depends on how many rows a pass has, so a batched row may differ
      // from the same row alone in its last bits: a few ULP, and an fp32 ULP at a logprob of
      // -50 is 3.8e-6 (seen: 1.1e-5 on an AMD EPYC). Tokens must still be identical.
      const double lp = lps[j]->logprob;
      EXPECT_NEAR(items[i].prompt_logprobs[j]->logprob, lp, 1e-5 + 1e-6 * std::fabs(lp));
      EXPECT_EQ(items[i].prompt_logprobs[j]->top[0].first, lps[j]->top[0].first);
    }
    ASSERT_EQ(caches[i]->length(), alone.length());
    double max_diff = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      for (int64_t v = 0; v < alone.length() * c.latent_dim(); ++v)
        max_diff = std::max(max_diff, static_cast<double>(std::fabs(caches[i]->Layer(l)[v] -
                                                                     alone.Layer(l)[v])));
    EXPECT_LT(max_diff, 1e-5);
  }
}

TEST(BatchDecoderTest, PrefillBatchEqualsPrefillingAlone) {
  ExpectPrefillBatchEqualsPrefillingAlone(nullptr);
}

TEST(BatchDecoderTest, PrefillBatchInTwoPingPongGroupsEqualsPrefillingAlone) {
  PingPong overlap;
  ExpectPrefillBatchEqualsPrefillingAlone(&overlap);
}

// A prompt with an id outside the vocabulary or longer than the context fails alone with
// INVALID_ARGUMENT; the prompts batched with it give what they give alone (found by
// tests/fuzz/prefill_request_fuzz: one bad prompt used to fail its whole prefill batch).
void ExpectABadPromptFailsAlone(PingPong* overlap) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  std::vector<int32_t> too_long = Prompt(c.max_position_embeddings + 1, 9);
  const std::vector<std::vector<int32_t>> prompts = {
      Prompt(5, 1), {3, -1, 4}, Prompt(7, 2), {2, static_cast<int32_t>(c.vocab_size)}, too_long};
  std::vector<std::unique_ptr<LatentCache>> caches;
  std::vector<PrefillItem> items = ItemsWithCaches(c, prompts, &caches);
  ASSERT_TRUE(PrefillBatch(e.transformer(), items, AttentionForm::kAbsorbed, nullptr, 256, overlap)
                  .ok());
  for (size_t i : {1, 3, 4}) {
    EXPECT_EQ(items[i].status.code(), absl::StatusCode::kInvalidArgument) << i;
  }
  EXPECT_NE(items[1].status.message().find("token id -1 outside the vocabulary"),
            std::string::npos) << items[1].status;
  EXPECT_NE(items[4].status.message().find("exceeds the context of"), std::string::npos)
      << items[4].status;
  for (size_t i : {0, 2}) {
    ASSERT_TRUE(items[i].status.ok()) << i << ": " << items[i].status;
    LatentCache alone(c.num_hidden_layers, c.latent_dim());
    auto first = PrefillFirstToken(e.transformer(), prompts[i], &alone, {}, -1,
                                   AttentionForm::kAbsorbed);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(items[i].first.token, first->token) << i;
  }
}

TEST(BatchDecoderTest, ABadPromptFailsAlone) { ExpectABadPromptFailsAlone(nullptr); }

TEST(BatchDecoderTest, ABadPromptFailsAloneInPingPongGroups) {
  PingPong overlap;
  ExpectABadPromptFailsAlone(&overlap);
}

// Local experts that take `delay` to answer, waiting outside the compute as remote experts do
// (ComputeReleased), and fail the `fail_at`-th call when asked.
class SlowExperts : public MoeExecutor {
 public:
  SlowExperts(const model::ModelConfig& c, const model::ModelWeights& w, absl::Duration delay)
      : local_(c, w), delay_(delay) {}
  void FailAt(int call) { fail_at_ = call; }
  std::unique_ptr<Pending> Start(int64_t layer, const float* x, const float* scores, int64_t rows,
                                 float* out) override {
    class Slow : public Pending {
     public:
      Slow(std::unique_ptr<Pending> inner, absl::Duration delay, bool fail)
          : inner_(std::move(inner)), delay_(delay), fail_(fail) {}
      absl::Status Wait() override {
        {
          ComputeReleased away;
          absl::SleepFor(delay_);
        }
        absl::Status s = inner_->Wait();
        return fail_ ? absl::UnavailableError("expert shard 0 went away") : s;
      }

     private:
      std::unique_ptr<Pending> inner_;
      absl::Duration delay_;
      bool fail_;
    };
    const bool fail = ++calls_ == fail_at_;
    return std::make_unique<Slow>(local_.Start(layer, x, scores, rows, out), delay_, fail);
  }

 private:
  LocalMoeExecutor local_;
  absl::Duration delay_;
  std::atomic<int> calls_{0};
  int fail_at_ = -1;
};

// One prompt through PrefillBatch on `model` with a fresh cache: PrefillBatch's status and the
// item (its own status, first token).
std::pair<absl::Status, PrefillItem> PrefillOne(Transformer& model, const std::vector<int32_t>& prompt,
                                                int64_t chunk_tokens, PingPong* overlap,
                                                const BatchLayerDoneFn& hook = nullptr) {
  const auto& c = model.config();
  LatentCache cache(c.num_hidden_layers, c.latent_dim());
  std::vector<PrefillItem> items(1);
  items[0].prompt = prompt;
  items[0].cache = &cache;
  absl::Status s =
      PrefillBatch(model, items, AttentionForm::kAbsorbed, hook, chunk_tokens, overlap);
  items[0].cache = nullptr;  // gone with this scope
  return {s, std::move(items[0])};
}

// A long prompt prefilled as a wavefront of chunks (two passes in ping-pong, a chunk's MoE
// round trip behind the next chunk's attention) gives exactly what it gives chunk after chunk:
// the first token, its logprob, every prompt logprob and every cached latent, bit for bit; every
// layer of every chunk is handed to the hook once; and the passes really overlap.
TEST(BatchDecoderTest, APipelinedLongPromptEqualsItsChunksInTurn) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  SlowExperts experts(c, e.weights(), absl::Milliseconds(1));
  Transformer remote(c, e.weights(), &experts);
  const std::vector<int32_t> prompt = Prompt(700, 9);
  constexpr int64_t kChunk = 64;  // 11 rounds, the last ragged
  auto run = [&](PingPong* overlap, LatentCache* cache,
                 std::map<std::pair<int64_t, int64_t>, int64_t>* rows) {
    std::vector<PrefillItem> items(1);
    items[0].prompt = prompt;
    items[0].cache = cache;
    items[0].sampling = {.temperature = 0.7, .top_p = 1.0, .top_k = 0, .seed = 3};
    items[0].logprobs = 2;
    items[0].prompt_top_logprobs = 2;
    EXPECT_TRUE(PrefillBatch(remote, items, AttentionForm::kAbsorbed,
                             [&](size_t, int64_t layer, int64_t first, int64_t count) {
                               (*rows)[{layer, first}] += count;
                               return absl::OkStatus();
                             },
                             kChunk, overlap)
                    .ok());
    EXPECT_TRUE(items[0].status.ok()) << items[0].status;
    return items[0];
  };
  LatentCache in_turn(c.num_hidden_layers, c.latent_dim()), piped(c.num_hidden_layers, c.latent_dim());
  std::map<std::pair<int64_t, int64_t>, int64_t> rows_in_turn, rows_piped;
  const PrefillItem want = run(nullptr, &in_turn, &rows_in_turn);
  PingPong overlap;
  const PrefillItem got = run(&overlap, &piped, &rows_piped);
  EXPECT_GT(overlap.handoffs(), 0u);
  std::printf("pipelined prefill of %zu tokens in %lld-token chunks: %llu handoffs\n",
              prompt.size(), static_cast<long long>(kChunk),
              static_cast<unsigned long long>(overlap.handoffs()));
  EXPECT_EQ(rows_piped, rows_in_turn);
  EXPECT_EQ(rows_piped.size(), static_cast<size_t>(11 * c.num_hidden_layers));
  EXPECT_EQ(got.first.token, want.first.token);
  EXPECT_EQ(got.first.logprob->logprob, want.first.logprob->logprob);
  ASSERT_EQ(got.prompt_logprobs.size(), want.prompt_logprobs.size());
  for (size_t j = 1; j < want.prompt_logprobs.size(); ++j) {
    ASSERT_EQ(got.prompt_logprobs[j]->logprob, want.prompt_logprobs[j]->logprob) << j;
  }
  ASSERT_EQ(piped.length(), static_cast<int64_t>(prompt.size()));
  ASSERT_EQ(in_turn.length(), piped.length());
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t v = 0; v < piped.length() * c.latent_dim(); ++v) {
      ASSERT_EQ(piped.Layer(l)[v], in_turn.Layer(l)[v]) << "layer " << l << " value " << v;
    }
  }
}

// Many pipelined prefills with experts that answer at once or nearly: every interleaving of
// the two passes' waits (for the chunk before, for the experts) ends, with the same token.
TEST(BatchDecoderTest, PipelinedPrefillsNeverDeadlock) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  const std::vector<int32_t> prompt = Prompt(200, 6);
  PingPong overlap;
  int32_t first = -1;
  for (int run = 0; run < 60; ++run) {
    SlowExperts experts(c, e.weights(), absl::Microseconds(run % 3 == 0 ? 0 : 20 * (run % 7)));
    Transformer remote(c, e.weights(), &experts);
    auto [status, item] = PrefillOne(remote, prompt, 16, &overlap);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_TRUE(item.status.ok()) << item.status;
    if (first < 0) first = item.first.token;
    EXPECT_EQ(item.first.token, first) << "run " << run;
  }
}

// A failure in the middle of a pipelined prefill (an expert call of round 3) ends both passes
// with it, and a prompt stopped by the hook stops alone: nothing hangs.
TEST(BatchDecoderTest, APipelinedPrefillStopsOnAFailureWithoutHanging) {
  auto engine = Engine::Load(testing::TinyModel("batch", nullptr));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const auto& c = e.config();
  const std::vector<int32_t> prompt = Prompt(500, 4);
  const int64_t moe_layers = c.num_hidden_layers - c.first_k_dense_replace;
  {
    SlowExperts experts(c, e.weights(), absl::Microseconds(200));
    experts.FailAt(static_cast<int>(3 * moe_layers + 1));
    Transformer remote(c, e.weights(), &experts);
    PingPong overlap;
    auto [status, item] = PrefillOne(remote, prompt, 64, &overlap);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
    EXPECT_EQ(item.status.code(), absl::StatusCode::kUnavailable) << item.status;
  }
  {
    SlowExperts experts(c, e.weights(), absl::Microseconds(200));
    Transformer remote(c, e.weights(), &experts);
    PingPong overlap;
    int calls = 0;
    auto [status, item] = PrefillOne(remote, prompt, 64, &overlap,
                                     [&](size_t, int64_t, int64_t first, int64_t) {
                                       ++calls;
                                       return first >= 128
                                                  ? absl::CancelledError("client went away")
                                                  : absl::OkStatus();
                                     });
    EXPECT_TRUE(status.ok()) << status;  // the prompt's own status says why
    EXPECT_EQ(item.status.code(), absl::StatusCode::kCancelled);
    EXPECT_LE(calls, 2 * c.num_hidden_layers + 2);  // rounds 0 and 1, and round 2's first layer
  }
}

}  // namespace
}  // namespace splitmoe::engine
