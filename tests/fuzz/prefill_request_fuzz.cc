// Fuzzes the prefill worker's request handling: the input is the wire bytes of a
// Prefill.Prefill request (v1::PrefillRequest), sent to a PrefillActor (the tiny model: 512-token
// vocabulary, 64-token context; no UCX transport, so a request with a destination is refused
// before any latent is shipped) together with a known-good prompt in the same batch. The
// worker's checks (PrefillActor::Prepare, and LayoutOf for destinations) are private to
// prefill_worker.cc, so they are reached through the actor, as the gRPC service reaches them.
//
// Checked: both requests are answered exactly once, never with INTERNAL; the good prompt
// succeeds whatever the other one holds (a bad prompt fails alone); an accepted request's first
// token is in the vocabulary, with at most the alternatives asked for, and prompt logprobs for
// every prompt position when asked for.
#include <cstdint>
#include <memory>
#include <string>

#include "common/runtime/actor.h"
#include "common/runtime/executor.h"
#include "common/runtime/manual_scheduler.h"
#include "prefill/prefill_worker.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tiny_engine.h"

namespace splitmoe::fuzz {
namespace {

// Prompts above this many ids are skipped: the work per input stays bounded.
constexpr int kMaxPromptIds = 2048;

void CheckAccepted(const v1::PrefillRequest& r, const v1::PrefillResponse& response) {
  const int64_t vocab = TinyEngine().config().vocab_size;
  FUZZ_CHECK(!r.prompt().empty(), "an empty prompt was prefilled");
  FUZZ_CHECK(!r.has_destination(), "a destination was accepted without a transport");
  for (int32_t id : r.prompt())
    FUZZ_CHECK(id >= 0 && id < vocab, "prompt id " << id << " accepted");
  FUZZ_CHECK(response.first_token() >= 0 && response.first_token() < vocab,
             "first token " << response.first_token());
  FUZZ_CHECK(response.first_token_logprob().top_size() <= std::max(0, r.sampling().logprobs()),
             response.first_token_logprob().top_size()
                 << " alternatives for logprobs " << r.sampling().logprobs());
  if (r.prompt_logprobs() > 0) {
    FUZZ_CHECK(response.prompt_logprobs_size() == r.prompt_size(),
               response.prompt_logprobs_size()
                   << " prompt logprobs for " << r.prompt_size() << " tokens");
  }
}

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  (void)splitmoe::fuzz::TinyEngine();  // written and loaded before the first input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fuzz = splitmoe::fuzz;
  namespace v1 = splitmoe::v1;
  namespace runtime = splitmoe::runtime;
  if (size > fuzz::kMaxInputBytes) return -1;
  v1::PrefillRequest request;
  // Not a request: gRPC would have refused the bytes before the service saw them.
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;
  if (request.prompt_size() > fuzz::kMaxPromptIds) return -1;

  v1::PrefillRequest good;
  good.set_request_id("good");
  for (int32_t id : {0, 5, 9, 11}) good.add_prompt(id);
  good.mutable_sampling()->set_max_tokens(4);
  good.mutable_sampling()->set_logprobs(1);

  splitmoe::engine::Engine& engine = fuzz::TinyEngine();
  runtime::ManualScheduler scheduler;
  auto executor = std::make_unique<runtime::ManualExecutor>();
  runtime::ManualExecutor* steps = executor.get();
  // Two micro-batches in ping-pong for an odd first prompt id, one batch otherwise.
  const int micro_batches = !request.prompt().empty() && (request.prompt(0) & 1) ? 2 : 1;
  runtime::Actor<splitmoe::prefill::PrefillActor> actor(
      "prefill",
      std::make_unique<splitmoe::prefill::PrefillActor>(
          &engine.transformer(), /*transport=*/nullptr,
          std::make_shared<splitmoe::decode::LoadGauge>(),
          splitmoe::engine::AttentionForm::kAbsorbed, /*batch_tokens=*/2048, micro_batches,
          std::move(executor)),
      &scheduler);
  int answers = 0;
  actor.Send(splitmoe::prefill::RunPrompt{
      request, nullptr, absl::Now(), [&](absl::StatusOr<v1::PrefillResponse> response) {
        ++answers;
        if (response.ok()) {
          fuzz::CheckAccepted(request, *response);
        } else {
          FUZZ_CHECK(!absl::IsInternal(response.status()), "answered " << response.status());
        }
      }});
  actor.Send(splitmoe::prefill::RunPrompt{
      good, nullptr, absl::Now(), [&](absl::StatusOr<v1::PrefillResponse> response) {
        ++answers;
        FUZZ_CHECK(response.ok(),
                   "the good prompt failed beside the fuzzed one: " << response.status());
        fuzz::CheckAccepted(good, *response);
      }});
  while (scheduler.RunUntilIdle() + steps->RunAll() > 0) {
  }
  FUZZ_CHECK(answers == 2, answers << " answers to 2 requests");
  return 0;
}
