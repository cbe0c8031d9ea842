// The prefill worker's actor on the manual scheduler, its batches on a ManualExecutor: prompts
// (without a destination: nothing shipped) get the engine's first token and prompt logprobs;
// prompts that arrive while a batch computes wait and form the next batch; a cancelled or bad
// prompt fails alone with a clear status; a prompt cancelled by name stops if it is here, and if
// it is not, its reservation is released as the writer at once and the prompt is refused should
// it arrive. With one batch and with two groups in ping-pong.
#include "prefill/prefill_worker.h"

#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/engine/batch_decoder.h"
#include "common/rpc/rpc.h"
#include "common/engine/engine.h"
#include "common/engine/pooled_latent_cache.h"
#include "common/runtime/executor.h"
#include "common/runtime/manual_scheduler.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::prefill {
namespace {

// A decode worker that records the releases it is sent.
class RecordingDecode final : public v1::Decode::CallbackService {
 public:
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse*) override {
    absl::MutexLock lock(&mu_);
    released_.push_back(*request);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  std::vector<v1::ReleaseRequest> released() {
    absl::MutexLock lock(&mu_);
    return released_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::ReleaseRequest> released_;
};

class PrefillActorTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    auto e = engine::Engine::Load(testing::TinyModel("prefill_actor"));
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
    gauge_ = std::make_shared<decode::LoadGauge>();
    auto executor = std::make_unique<runtime::ManualExecutor>();
    executor_ = executor.get();
    actor_ = std::make_unique<runtime::Actor<PrefillActor>>(
        "prefill",
        std::make_unique<PrefillActor>(&engine_->transformer(), /*transport=*/nullptr, gauge_,
                                       engine::AttentionForm::kAbsorbed, /*batch_tokens=*/2048,
                                       /*micro_batches=*/GetParam(), std::move(executor)),
        &scheduler_);
  }

  // Sends a prompt; its answer lands in `out`.
  void Send(const std::vector<int32_t>& prompt, absl::StatusOr<v1::PrefillResponse>* out,
            std::function<bool()> cancelled = nullptr) {
    v1::PrefillRequest r;
    r.set_request_id("r" + std::to_string(sent_++));
    *r.mutable_prompt() = {prompt.begin(), prompt.end()};
    r.mutable_sampling()->set_max_tokens(4);
    r.mutable_sampling()->set_logprobs(2);
    r.set_prompt_logprobs(1);
    *out = absl::UnknownError("no reply");
    actor_->Send(RunPrompt{r, std::move(cancelled), absl::Now(),
                           [out](absl::StatusOr<v1::PrefillResponse> resp) { *out = resp; }});
  }

  void Settle() {
    while (scheduler_.RunUntilIdle() + executor_->RunAll() > 0) {
    }
  }

  // The engine's first token and prompt logprobs for `prompt`.
  void ExpectEngine(const std::vector<int32_t>& prompt, const v1::PrefillResponse& got) {
    const auto& c = engine_->config();
    engine::LatentCache cache(c.num_hidden_layers, c.latent_dim());
    std::vector<std::optional<engine::TokenLogprob>> prompt_logprobs;
    auto first = engine::PrefillFirstToken(engine_->transformer(), prompt, &cache, {}, 2,
                                           engine::AttentionForm::kAbsorbed, nullptr,
                                           &prompt_logprobs, 1);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(got.first_token(), first->token);
    EXPECT_NEAR(got.first_token_logprob().logprob(), first->logprob->logprob, 1e-4);
    ASSERT_EQ(got.prompt_logprobs_size(), static_cast<int>(prompt.size()));
    for (size_t i = 1; i < prompt.size(); ++i) {
      EXPECT_NEAR(got.prompt_logprobs(static_cast<int>(i)).logprob().logprob(),
                  prompt_logprobs[i]->logprob, 1e-4)
          << "position " << i;
    }
  }

  std::unique_ptr<engine::Engine> engine_;
  std::shared_ptr<decode::LoadGauge> gauge_;
  runtime::ManualScheduler scheduler_;
  runtime::ManualExecutor* executor_ = nullptr;  // owned by the actor
  std::unique_ptr<runtime::Actor<PrefillActor>> actor_;
  int sent_ = 0;
};

TEST_P(PrefillActorTest, PromptsThatArriveDuringABatchFormTheNextOne) {
  const std::vector<std::vector<int32_t>> prompts = {
      {0, 5, 9, 11, 13}, {0, 100, 200, 300, 7, 8, 9}, {0, 42}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}};
  std::vector<absl::StatusOr<v1::PrefillResponse>> out(prompts.size());
  Send(prompts[0], &out[0]);
  scheduler_.RunUntilIdle();
  ASSERT_EQ(executor_->queued(), 1u);  // the first batch: prompt 0 alone
  for (size_t i = 1; i < prompts.size(); ++i) Send(prompts[i], &out[i]);
  scheduler_.RunUntilIdle();
  EXPECT_EQ(executor_->queued(), 1u) << "a second batch started beside the first";
  for (const auto& o : out) EXPECT_EQ(o.status().code(), absl::StatusCode::kUnknown);  // no reply
  ASSERT_TRUE(executor_->RunOne());
  scheduler_.RunUntilIdle();  // prompt 0 answered; prompts 1-3 go as one batch
  ASSERT_TRUE(out[0].ok()) << out[0].status();
  EXPECT_EQ(executor_->queued(), 1u);
  EXPECT_EQ(gauge_->Get().tokens_processed(), 1u);
  Settle();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(out[i].ok()) << out[i].status();
    ExpectEngine(prompts[i], *out[i]);
  }
  EXPECT_EQ(gauge_->Get().tokens_processed(), prompts.size());
}

TEST_P(PrefillActorTest, ACancelledOrBadPromptFailsAlone) {
  std::vector<absl::StatusOr<v1::PrefillResponse>> out(4);
  Send({0, 5, 9}, &out[0], [] { return true; });  // the caller has gone
  Send({}, &out[1]);                               // empty
  Send({0, 7, 7, 7}, &out[2]);
  v1::PrefillRequest shipped;  // names a destination this worker cannot reach
  shipped.set_request_id("ship");
  shipped.add_prompt(0);
  shipped.add_prompt(3);
  shipped.mutable_destination()->set_layers(static_cast<int32_t>(engine_->config().num_hidden_layers));
  out[3] = absl::UnknownError("no reply");
  actor_->Send(RunPrompt{shipped, nullptr, absl::Now(),
                         [&](absl::StatusOr<v1::PrefillResponse> r) { out[3] = r; }});
  Settle();
  EXPECT_EQ(out[0].status().code(), absl::StatusCode::kCancelled) << out[0].status();
  EXPECT_EQ(out[1].status().code(), absl::StatusCode::kInvalidArgument) << out[1].status();
  ASSERT_TRUE(out[2].ok()) << out[2].status();
  ExpectEngine({0, 7, 7, 7}, *out[2]);
  EXPECT_FALSE(out[3].ok());
  EXPECT_NE(out[3].status().code(), absl::StatusCode::kUnknown) << out[3].status();
}

// The router cancels by name beside cancelling the call, which may never have arrived.
TEST_P(PrefillActorTest, ACancelByNameReleasesAsTheWriterWhetherOrNotThePromptArrived) {
  RecordingDecode decode;
  auto server = rpc::StartServer("127.0.0.1:0", {&decode});
  ASSERT_TRUE(server.ok()) << server.status();
  auto destination = [&](uint64_t reservation) {
    v1::LatentDestination d;
    d.set_decode_address(server->address);
    d.set_reservation_id(reservation);
    d.set_generation(3);
    d.set_layers(static_cast<int32_t>(engine_->config().num_hidden_layers));
    return d;
  };
  auto cancel = [&](const std::string& id, uint64_t reservation) {
    v1::CancelPrefillRequest c;
    c.set_request_id(id);
    *c.mutable_destination() = destination(reservation);
    auto out = std::make_shared<absl::StatusOr<v1::CancelPrefillResponse>>(
        absl::UnknownError("no reply"));
    actor_->Send(CancelPrompt{c, [out](absl::StatusOr<v1::CancelPrefillResponse> r) {
                                *out = std::move(r);
                              }});
    return out;
  };
  auto prompt = [&](const std::string& id, uint64_t reservation,
                    absl::StatusOr<v1::PrefillResponse>* out) {
    v1::PrefillRequest r;
    r.set_request_id(id);
    r.add_prompt(0);
    r.add_prompt(5);
    r.mutable_sampling()->set_max_tokens(4);
    *r.mutable_destination() = destination(reservation);
    *out = absl::UnknownError("no reply");
    actor_->Send(RunPrompt{r, nullptr, absl::Now(),
                           [out](absl::StatusOr<v1::PrefillResponse> resp) { *out = resp; }});
  };

  // Not seen here: released as the writer now, and refused when it arrives after all.
  auto unseen = cancel("late", 7);
  Settle();
  ASSERT_TRUE(unseen->ok()) << unseen->status();
  EXPECT_FALSE((*unseen)->seen());
  ASSERT_EQ(decode.released().size(), 1u);
  EXPECT_EQ(decode.released()[0].request_id(), "late");
  EXPECT_EQ(decode.released()[0].reservation_id(), 7u);
  EXPECT_EQ(decode.released()[0].generation(), 3u);
  EXPECT_TRUE(decode.released()[0].writer_done());
  absl::StatusOr<v1::PrefillResponse> late;
  prompt("late", 7, &late);
  Settle();
  EXPECT_EQ(late.status().code(), absl::StatusCode::kCancelled) << late.status();
  EXPECT_EQ(executor_->queued(), 0u);
  // The same request id in another attempt (a failover's reservation) is not refused: it runs
  // (and fails here, its destination unreachable without a transport), releasing as the writer.
  absl::StatusOr<v1::PrefillResponse> retry;
  prompt("late", 9, &retry);
  Settle();
  EXPECT_NE(retry.status().code(), absl::StatusCode::kCancelled) << retry.status();
  EXPECT_NE(retry.status().code(), absl::StatusCode::kUnknown) << retry.status();

  // Queued here: flagged, stopped before it computes, released as the writer once.
  absl::StatusOr<v1::PrefillResponse> queued;
  prompt("queued", 8, &queued);
  scheduler_.RunUntilIdle();
  auto seen = cancel("queued", 8);
  Settle();
  ASSERT_TRUE(seen->ok()) << seen->status();
  EXPECT_TRUE((*seen)->seen());
  EXPECT_EQ(queued.status().code(), absl::StatusCode::kCancelled) << queued.status();
  int queued_releases = 0;
  for (const v1::ReleaseRequest& r : decode.released()) {
    if (r.request_id() == "queued") {
      ++queued_releases;
      EXPECT_EQ(r.reservation_id(), 8u);
      EXPECT_TRUE(r.writer_done());
    }
  }
  EXPECT_EQ(queued_releases, 1);
  server->server->Shutdown();
}

// The prompts' local caches from a pool (what a prefill worker on a GPU computes with; here the
// same code on the CPU): the engine's first tokens and prompt logprobs, and every block back.
TEST_P(PrefillActorTest, PooledLocalCachesGiveTheEnginesAnswers) {
  const auto& c = engine_->config();
  engine::LatentPoolOptions o;
  o.layers = c.num_hidden_layers;
  o.latent_dim = c.latent_dim();
  o.blocks = 8;
  o.block_tokens = 4;
  auto pool = engine::LatentPool::Create(kernels::Device{}, o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  engine::LatentPool* p = pool->get();
  auto executor = std::make_unique<runtime::ManualExecutor>();
  executor_ = executor.get();
  actor_ = std::make_unique<runtime::Actor<PrefillActor>>(
      "prefill",
      std::make_unique<PrefillActor>(
          &engine_->transformer(), /*transport=*/nullptr, gauge_,
          engine::AttentionForm::kAbsorbed, /*batch_tokens=*/2048, GetParam(),
          std::move(executor),
          [p](bool) -> absl::StatusOr<std::unique_ptr<engine::SequenceCache>> {
            return std::make_unique<engine::PooledSequenceCache>(p);
          }),
      &scheduler_);
  const std::vector<std::vector<int32_t>> prompts = {{0, 5, 9, 11, 13}, {0, 100, 200, 300, 7, 8, 9}};
  std::vector<absl::StatusOr<v1::PrefillResponse>> out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) Send(prompts[i], &out[i]);
  Settle();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(out[i].ok()) << out[i].status();
    ExpectEngine(prompts[i], *out[i]);
  }
  // A prompt larger than the pool: refused alone, by name.
  absl::StatusOr<v1::PrefillResponse> big;
  Send(std::vector<int32_t>(40, 3), &big);
  Settle();
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  EXPECT_EQ(p->free_blocks(), 8) << "every block back";
  actor_.reset();  // before the pool
}

TEST_P(PrefillActorTest, StoppingWithABatchInFlightAnswersEveryPrompt) {
  absl::StatusOr<v1::PrefillResponse> a, b;
  Send({0, 1, 2}, &a);
  scheduler_.RunUntilIdle();
  Send({0, 3, 4}, &b);
  scheduler_.RunUntilIdle();
  ASSERT_EQ(executor_->queued(), 1u);
  actor_.reset();  // the batch never ran: both prompts are answered, not lost
  EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable) << a.status();
  EXPECT_EQ(b.status().code(), absl::StatusCode::kUnavailable) << b.status();
}

INSTANTIATE_TEST_SUITE_P(MicroBatches, PrefillActorTest, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return p.param == 1 ? std::string("OneBatch")
                                               : std::string("PingPong");
                         });

}  // namespace
}  // namespace splitmoe::prefill
