// Fuzzes the decode worker's request handling: the input is a program of Decode requests
// (Reserve, Start, Release, Cancel, WritersGone) and scheduling steps (deliver messages, run a
// decode step, move the virtual clock) played against a DecodeActor on the manual scheduler,
// with the tiny model (512-token vocabulary, 64-token context, 12 blocks of 16 tokens), the cache
// reserved up front or grown per step, the prefix cache on or off. The
// worker's request checks live inside its handlers (DecodeActor::Handle), so they are reached
// through the actor, as the gRPC service reaches them. Fields are mostly drawn near the values
// that pass the checks (the ids, generations and sizes of granted reservations) and sometimes
// arbitrary.
//
// Checked on every run: each request is answered exactly once and never with INTERNAL (a
// handler that dropped a reply); a granted reservation holds distinct blocks of the cache,
// enough for prompt + max_tokens (up front) or the prompt and the margin (grown), and a cached
// prefix shorter than the prompt; token events are for started requests and hold vocabulary
// ids; and after releasing everything and letting every deadline pass, every block is free again
// and nothing is running, reserved or quarantined.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/runtime/actor.h"
#include "common/runtime/executor.h"
#include "common/runtime/manual_scheduler.h"
#include "decode/decode_worker.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tiny_engine.h"

namespace splitmoe::fuzz {
namespace {

constexpr int64_t kBlockTokens = 16;
constexpr int64_t kNumBlocks = 12;
constexpr int kMaxOps = 64;

struct Granted {
  std::string request_id;
  uint64_t id = 0;
  uint64_t generation = 0;
  int32_t prompt = 0;
  int32_t max_tokens = 0;
};

class Harness {
 public:
  explicit Harness(FuzzedDataProvider& in) : in_(in) {
    engine::Engine& e = TinyEngine();
    const model::ModelConfig& c = e.config();
    vocab_ = c.vocab_size;
    decode::PagedLatentCacheOptions options;
    options.layout = {
        c.num_hidden_layers, c.latent_dim(), kBlockTokens,
        in.ConsumeBool() ? decode::LatentDType::kFloat32 : decode::LatentDType::kBFloat16};
    options.num_blocks = kNumBlocks;
    absl::StatusOr<decode::PagedLatentCache> cache = decode::PagedLatentCache::Create(options);
    if (!cache.ok()) Die(cache.status().ToString());
    gauge_ = std::make_shared<decode::LoadGauge>();
    decode::DecodeActorOptions actor_options;
    actor_options.reclaim_grace = absl::Seconds(1);
    actor_options.micro_batches = in.ConsumeBool() ? 2 : 1;
    actor_options.reserve_upfront = in.ConsumeBool();
    actor_options.reserve_margin_tokens = in.ConsumeIntegralInRange(0, 40);
    actor_options.prefix_cache = in.ConsumeBool();
    margin_ = actor_options.reserve_upfront ? 0
              : actor_options.reserve_margin_tokens > 0 ? actor_options.reserve_margin_tokens
                                                        : kBlockTokens;
    auto executor = std::make_unique<runtime::ManualExecutor>();
    executor_ = executor.get();
    actor_ = std::make_unique<runtime::Actor<decode::DecodeActor>>(
        "decode",
        std::make_unique<decode::DecodeActor>(&e.transformer(), std::move(*cache), actor_options,
                                              gauge_, std::move(executor)),
        &scheduler_);
    for (const char* router : {"", "r"}) {  // the owners of the ids RequestId() makes
      actor_->Send(decode::AddTokenSink{[this](const v1::TokenEvent& event) {
                                          OnEvent(event);
                                          return true;
                                        },
                                        router});
    }
    scheduler_.RunUntilIdle();
  }

  void Run() {
    for (int op = 0; op < kMaxOps && in_.remaining_bytes() > 0; ++op) {
      switch (in_.ConsumeIntegralInRange<int>(0, 8)) {
        case 0:
          Reserve();
          break;
        case 1:
          Start();
          break;
        case 2:
          Release();
          break;
        case 3:
          Cancel();
          break;
        case 4:
          WritersGone();
          break;
        case 5:
          scheduler_.RunUntilIdle();
          break;
        case 6:
          executor_->RunOne();
          break;
        case 7:
          scheduler_.AdvanceBy(absl::Milliseconds(in_.ConsumeIntegralInRange(0, 700000)));
          break;
        default:
          Settle();
          break;
      }
    }
    Settle();
    // Everything back: release every reservation ever granted (writer done), let deadlines pass.
    for (const Granted& g : granted_) {
      v1::ReleaseRequest r;
      r.set_reservation_id(g.id);
      r.set_writer_done(true);
      Send(decode::ReleaseReservation{r, Answer<void>("final release")});
    }
    Settle();
    scheduler_.AdvanceBy(absl::Minutes(30));
    Settle();
    FUZZ_CHECK(answered_ == asked_, asked_ << " requests, " << answered_ << " answers");
    const v1::WorkerLoad load = gauge_->Get();
    FUZZ_CHECK(load.cache_blocks_free() == kNumBlocks && load.cache_blocks_used() == 0 &&
                   load.cache_blocks_quarantined() == 0 && load.sequences_running() == 0 &&
                   load.requests_in_flight() == 0,
               "not everything came back: " << load.ShortDebugString());
  }

 private:
  void Settle() {
    for (int rounds = 0; scheduler_.RunUntilIdle() + executor_->RunAll() > 0; ++rounds) {
      // Each round is a decode step: sequences end within the 64-token context.
      FUZZ_CHECK(rounds < 10000, "the actor never settles");
    }
  }

  template <typename M>
  void Send(M message) {
    ++asked_;
    FUZZ_CHECK(actor_->Send(std::move(message)), "the actor refused a message");
  }

  // A reply callback that counts the answer and checks it is not a dropped request.
  template <typename T>
  std::function<void(typename runtime::Reply<T>::Result)> Answer(const char* what) {
    return [this, what](typename runtime::Reply<T>::Result result) {
      ++answered_;
      absl::Status s;
      if constexpr (std::is_void_v<T>) {
        s = result;
      } else {
        s = result.status();
      }
      FUZZ_CHECK(!absl::IsInternal(s), what << " answered " << s);
    };
  }

  void OnEvent(const v1::TokenEvent& event) {
    FUZZ_CHECK(started_.count(event.request_id()) > 0,
               "a token event for " << event.request_id() << ", never started");
    if (event.finish_reason().empty()) {
      FUZZ_CHECK(event.token() >= 0 && event.token() < vocab_, "token " << event.token());
    }
  }

  // A few request ids, so that duplicates and owner prefixes ("<router>-...") occur.
  std::string RequestId() {
    static const char* const kIds[] = {"", "r-1", "r-2", "s-1", "r-1-x", "r"};
    return kIds[in_.ConsumeIntegralInRange<size_t>(0, std::size(kIds) - 1)];
  }
  std::string WriterId() {
    static const char* const kWriters[] = {"", "w0", "w1"};
    return kWriters[in_.ConsumeIntegralInRange<size_t>(0, std::size(kWriters) - 1)];
  }
  // Token i of one of three prompts that share their first 20 ids.
  int32_t Token(int32_t family, int32_t i) const {
    return static_cast<int32_t>((i < 20 ? i : i * (family + 2)) % vocab_);
  }
  // Near what the checks accept, sometimes anything.
  int32_t Small(int32_t lo, int32_t hi) {
    return in_.ConsumeIntegralInRange(0, 7) == 0 ? in_.ConsumeIntegral<int32_t>()
                                                 : in_.ConsumeIntegralInRange(lo, hi);
  }
  double Real(double usual) {
    switch (in_.ConsumeIntegralInRange(0, 3)) {
      case 0:
        return 0.0;
      case 1:
        return usual;
      case 2:
        return in_.ConsumeProbability<double>();
      default:
        return in_.ConsumeFloatingPoint<double>();
    }
  }
  // A granted reservation (most often) or nothing.
  const Granted* Pick() {
    if (granted_.empty() || in_.ConsumeIntegralInRange(0, 7) == 0) return nullptr;
    return &granted_[in_.ConsumeIntegralInRange<size_t>(0, granted_.size() - 1)];
  }

  void Reserve() {
    v1::ReserveRequest r;
    r.set_request_id(RequestId());
    r.set_prompt_tokens(Small(0, 70));
    r.set_max_tokens(Small(0, 70));
    // The prompt's ids (the prefix cache's key) most often, from a few shared prefixes.
    if (in_.ConsumeIntegralInRange(0, 3) != 0 && r.prompt_tokens() >= 0 && r.prompt_tokens() <= 70) {
      const int32_t family = in_.ConsumeIntegralInRange(0, 2);
      const int32_t count = in_.ConsumeIntegralInRange(0, 7) == 0
                                ? in_.ConsumeIntegralInRange(0, 70)
                                : r.prompt_tokens();
      for (int32_t i = 0; i < count; ++i) r.add_prompt(Token(family, i));
    }
    r.set_timeout_ms(in_.ConsumeBool() ? Small(0, 2000) : decode::kMaxReservationTimeoutMs);
    Send(decode::ReserveBlocks{r, [this, r](absl::StatusOr<v1::ReserveResponse> response) {
                                 ++answered_;
                                 if (!response.ok()) {
                                   FUZZ_CHECK(!absl::IsInternal(response.status()),
                                              "reserve answered " << response.status());
                                   return;
                                 }
                                 OnGranted(r, response->destination());
                               }});
  }

  void OnGranted(const v1::ReserveRequest& r, const v1::LatentDestination& d) {
    FUZZ_CHECK(r.prompt_tokens() > 0 && r.max_tokens() > 0, "granted " << r.ShortDebugString());
    const int64_t tokens = int64_t{r.prompt_tokens()} + r.max_tokens();
    FUZZ_CHECK(tokens <= TinyEngine().config().max_position_embeddings,
               "granted past the context: " << r.ShortDebugString());
    FUZZ_CHECK(r.prompt_size() == 0 || r.prompt_size() == r.prompt_tokens(),
               "granted with " << r.prompt_size() << " ids for " << r.prompt_tokens());
    // Up front: the whole sequence; growing: the prompt and the margin (more comes per step).
    const int64_t covered =
        int64_t{r.prompt_tokens()} + (margin_ == 0 ? r.max_tokens()
                                                   : std::min<int64_t>(r.max_tokens(), margin_));
    FUZZ_CHECK(d.blocks_size() * kBlockTokens >= covered,
               d.blocks_size() << " blocks for " << covered << " tokens");
    FUZZ_CHECK(d.cached_tokens() >= 0 && d.cached_tokens() < r.prompt_tokens() &&
                   (r.prompt_size() > 0 || d.cached_tokens() == 0),
               "cached " << d.cached_tokens() << " of " << r.ShortDebugString());
    std::set<int64_t> blocks;
    for (int64_t b : d.blocks()) {
      FUZZ_CHECK(b >= 0 && b < kNumBlocks, "block " << b << " outside the cache");
      FUZZ_CHECK(blocks.insert(b).second, "block " << b << " granted twice");
    }
    granted_.push_back(
        {r.request_id(), d.reservation_id(), d.generation(), r.prompt_tokens(), r.max_tokens()});
  }

  void Start() {
    const Granted* g = Pick();
    v1::StartRequest r;
    const bool own = g != nullptr && in_.ConsumeIntegralInRange(0, 7) != 0;
    r.set_request_id(own ? g->request_id : RequestId());
    r.set_reservation_id(g != nullptr ? g->id : in_.ConsumeIntegral<uint64_t>());
    r.set_generation(own ? g->generation : in_.ConsumeIntegral<uint64_t>());
    const int32_t prompt = own && in_.ConsumeBool() ? g->prompt : in_.ConsumeIntegralInRange(0, 70);
    const int32_t family = in_.ConsumeIntegralInRange(0, 2);
    for (int32_t i = 0; i < prompt; ++i) r.add_prompt(Token(family, i));
    r.set_first_token(Small(0, static_cast<int32_t>(vocab_)));
    v1::SamplingParamsInternal* s = r.mutable_sampling();
    s->set_temperature(Real(0.7));
    s->set_top_p(Real(0.9));
    s->set_top_k(Small(0, 8));
    s->set_seed(in_.ConsumeIntegral<uint64_t>());
    s->set_max_tokens(own && in_.ConsumeBool() ? g->max_tokens : Small(0, 70));
    for (int i = in_.ConsumeIntegralInRange(0, 2); i > 0; --i) {
      s->add_stop_token_ids(Small(0, static_cast<int32_t>(vocab_)));
    }
    s->set_ignore_eos(in_.ConsumeBool());
    s->set_logprobs(Small(0, 5));
    started_.insert(r.request_id());
    Send(decode::StartSequence{r, Answer<void>("start")});
  }

  void Release() {
    const Granted* g = Pick();
    v1::ReleaseRequest r;
    r.set_reservation_id(g != nullptr ? g->id : in_.ConsumeIntegral<uint64_t>());
    r.set_writer_done(in_.ConsumeBool());
    if (g != nullptr && in_.ConsumeBool()) {
      r.set_request_id(in_.ConsumeBool() ? g->request_id : RequestId());
      r.set_generation(in_.ConsumeBool() ? g->generation : in_.ConsumeIntegral<uint64_t>());
    }
    r.set_writer_id(WriterId());
    r.set_reason("fuzz");
    Send(decode::ReleaseReservation{r, Answer<void>("release")});
  }

  void Cancel() {
    const Granted* g = Pick();
    Send(
        decode::CancelSequence{g != nullptr ? g->request_id : RequestId(), Answer<void>("cancel")});
  }

  void WritersGone() {
    v1::WritersGoneRequest r;
    for (int i = in_.ConsumeIntegralInRange(0, 2); i > 0; --i) r.add_writer_ids(WriterId());
    Send(decode::WritersGone{r, [this](absl::StatusOr<v1::WritersGoneResponse> response) {
                               ++answered_;
                               FUZZ_CHECK(response.ok(), "writers gone: " << response.status());
                             }});
  }

  FuzzedDataProvider& in_;
  int64_t vocab_ = 0;
  int64_t margin_ = 0;  // tokens past the prompt a reservation covers (0: all of max_tokens)
  runtime::ManualScheduler scheduler_;           // before the actor: destroyed after it
  runtime::ManualExecutor* executor_ = nullptr;  // owned by the actor
  std::shared_ptr<decode::LoadGauge> gauge_;
  std::unique_ptr<runtime::Actor<decode::DecodeActor>> actor_;
  std::vector<Granted> granted_;
  std::set<std::string> started_;
  int64_t asked_ = 0, answered_ = 0;
};

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  (void)splitmoe::fuzz::TinyEngine();  // written and loaded before the first input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > splitmoe::fuzz::kMaxInputBytes) return -1;
  FuzzedDataProvider in(data, size);
  splitmoe::fuzz::Harness harness(in);
  harness.Run();
  return 0;
}
