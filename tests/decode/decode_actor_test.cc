// The decode worker's actor, driven message by message (ManualScheduler, virtual clock): a prompt
// whose latents a "writer" put into the reserved blocks decodes to exactly the engine's tokens;
// and the fences — a released reservation can never start, its blocks are not reused before the
// writer confirms or the deadline passes, a wrong generation is refused, unknown ids are
// INVALID_ARGUMENT, and every block comes back. Steps run on a ManualExecutor, so the tests also
// deliver messages while a step is in flight: a sequence started meanwhile joins the next step,
// one released meanwhile is stopped (blocks freed, its token dropped) when the step is done.
// Every test runs with one batch and with two micro-batches in ping-pong.
#include "decode/decode_worker.h"

#include <cstring>
#include <map>
#include <tuple>

#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/runtime/executor.h"
#include "common/runtime/manual_scheduler.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::decode {
namespace {

constexpr int64_t kBlockTokens = 16;

// (micro-batches, device): 1 or 2; the host arena's views, or the device arena's on the CPU
// device (decode/device_arena.h: the code a decode worker on a GPU runs, here in host memory).
class DecodeActorTest : public ::testing::TestWithParam<std::tuple<int, bool>> {
 protected:
  void SetUp() override {
    auto e = engine::Engine::Load(testing::TinyModel("decode_actor"));
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
    MakeActor(/*reserve_upfront=*/true);
  }

  // A fresh actor over a fresh cache of 12 blocks. The fencing tests reserve prompt + max_tokens
  // up front; the growth test lets the cache grow and preempt.
  void MakeActor(bool reserve_upfront) {
    actor_.reset();
    device_arena_.reset();
    events_.clear();
    const auto& c = engine_->config();
    PagedLatentCacheOptions options;
    options.layout = {c.num_hidden_layers, c.latent_dim(), kBlockTokens, LatentDType::kFloat32};
    options.num_blocks = 12;
    auto cache = PagedLatentCache::Create(options);
    ASSERT_TRUE(cache.ok()) << cache.status();
    layout_ = cache->layout();
    arena_ = cache->arena_base();  // stays put when the cache moves into the actor
    gauge_ = std::make_shared<LoadGauge>();
    DecodeActorOptions actor_options;
    actor_options.reclaim_grace = absl::Seconds(1);
    actor_options.micro_batches = std::get<0>(GetParam());
    if (std::get<1>(GetParam())) {
      auto arena = DeviceArena::Create(kernels::Device{}, layout_, arena_, cache->num_blocks());
      ASSERT_TRUE(arena.ok()) << arena.status();
      device_arena_ = std::move(*arena);
      actor_options.device_arena = device_arena_.get();
    }
    actor_options.reserve_upfront = reserve_upfront;
    auto executor = std::make_unique<runtime::ManualExecutor>();
    executor_ = executor.get();
    actor_ = std::make_unique<runtime::Actor<DecodeActor>>(
        "decode",
        std::make_unique<DecodeActor>(&engine_->transformer(), std::move(*cache), actor_options,
                                      gauge_, std::move(executor)),
        &scheduler_);
    actor_->Send(AddTokenSink{[this](const v1::TokenEvent& e) {
      events_.push_back(e);
      return true;
    }});
    scheduler_.RunUntilIdle();
  }

  // Messages and steps until nothing is left to do.
  void Settle() {
    while (scheduler_.RunUntilIdle() + executor_->RunAll() > 0) {
    }
  }

  // `arrival_us` 0: now; `ids`, when given, are the prompt's token ids (prefix matching).
  absl::StatusOr<v1::LatentDestination> Reserve(const std::string& id, int prompt, int max_tokens,
                                                int timeout_ms = 1000, int64_t arrival_us = 0,
                                                const std::vector<int32_t>* ids = nullptr) {
    v1::ReserveRequest r;
    r.set_request_id(id);
    r.set_prompt_tokens(prompt);
    r.set_max_tokens(max_tokens);
    r.set_timeout_ms(timeout_ms);
    r.set_arrival_us(arrival_us);
    if (ids != nullptr) r.mutable_prompt()->Add(ids->begin(), ids->end());
    absl::StatusOr<v1::LatentDestination> out = absl::UnknownError("no reply");
    actor_->Send(ReserveBlocks{r, [&out](absl::StatusOr<v1::ReserveResponse> resp) {
                                 if (resp.ok()) {
                                   out = resp->destination();
                                 } else {
                                   out = resp.status();
                                 }
                               }});
    scheduler_.RunUntilIdle();
    return out;
  }

  absl::Status Release(uint64_t reservation, bool writer_done) {
    v1::ReleaseRequest r;
    r.set_reservation_id(reservation);
    r.set_writer_done(writer_done);
    r.set_reason("test");
    absl::Status out = absl::UnknownError("no reply");
    actor_->Send(ReleaseReservation{r, [&out](absl::Status s) { out = s; }});
    scheduler_.RunUntilIdle();
    return out;
  }

  // What a prefill worker does: runs the prompt and puts every layer's rows into the blocks.
  engine::DecodedToken WritePrompt(const v1::LatentDestination& d,
                                   const std::vector<int32_t>& prompt, int64_t logprobs,
                                   size_t from = 0) {
    const auto& c = engine_->config();
    engine::LatentCache local(c.num_hidden_layers, c.latent_dim());
    auto first = engine::PrefillFirstToken(engine_->transformer(), prompt, &local, {}, logprobs,
                                           engine::AttentionForm::kAbsorbed);
    EXPECT_TRUE(first.ok()) << first.status();
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      for (size_t p = from; p < prompt.size(); ++p) {  // rows before `from` are shared
        const int64_t block = d.blocks(static_cast<int>(p / kBlockTokens));
        std::memcpy(arena_ + layout_.RowOffset(static_cast<BlockId>(block), layer,
                                               static_cast<int64_t>(p % kBlockTokens)),
                    local.Row(layer, static_cast<int64_t>(p)), layout_.row_bytes());
      }
    }
    return *first;
  }

  absl::Status Start(const std::string& id, const v1::LatentDestination& d,
                     const std::vector<int32_t>& prompt, int32_t first, int max_tokens,
                     uint64_t generation) {
    v1::StartRequest r;
    r.set_request_id(id);
    r.set_reservation_id(d.reservation_id());
    r.set_generation(generation);
    *r.mutable_prompt() = {prompt.begin(), prompt.end()};
    r.set_first_token(first);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    r.mutable_sampling()->set_logprobs(2);
    absl::Status out = absl::UnknownError("no reply");
    actor_->Send(StartSequence{r, [&out](absl::Status s) { out = s; }});
    Settle();
    return out;
  }

  std::unique_ptr<engine::Engine> engine_;
  PagedLatentLayout layout_;
  uint8_t* arena_ = nullptr;
  std::shared_ptr<LoadGauge> gauge_;
  std::unique_ptr<DeviceArena> device_arena_;  // outlives the actor
  runtime::ManualScheduler scheduler_;
  runtime::ManualExecutor* executor_ = nullptr;  // owned by the actor
  std::unique_ptr<runtime::Actor<DecodeActor>> actor_;
  std::vector<v1::TokenEvent> events_;
};

TEST_P(DecodeActorTest, ShippedPromptsDecodeLikeTheEngine) {
  const std::vector<std::vector<int32_t>> prompts = {
      {0, 5, 9, 11, 13},
      {0, 100, 200, 300, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 70}};
  constexpr int kMax = 8;
  std::map<std::string, std::vector<std::pair<int32_t, float>>> got;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string id = "r" + std::to_string(i);
    auto d = Reserve(id, static_cast<int>(prompts[i].size()), kMax);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->latent_dim(), engine_->config().latent_dim());
    engine::DecodedToken first = WritePrompt(*d, prompts[i], 2);
    got[id].push_back({first.token, first.logprob->logprob});
    ASSERT_TRUE(Start(id, *d, prompts[i], first.token, kMax, d->generation()).ok());
  }
  EXPECT_EQ(gauge_->Get().sequences_running(), 0);  // Settle ran every step to the end
  for (const v1::TokenEvent& e : events_) got[e.request_id()].push_back({e.token(), e.logprob().logprob()});
  for (size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = kMax;
    r.ignore_eos = true;
    r.logprobs = 2;
    auto want = engine_->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    const auto& mine = got["r" + std::to_string(i)];
    ASSERT_EQ(mine.size(), want->tokens.size());
    for (size_t j = 0; j < mine.size(); ++j) {
      EXPECT_EQ(mine[j].first, want->tokens[j]) << "prompt " << i << " token " << j;
      EXPECT_NEAR(mine[j].second, want->logprobs[j].logprob, 1e-4);
    }
  }
  EXPECT_TRUE(events_.back().finished());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
  EXPECT_EQ(gauge_->Get().latent_tokens(), 25u);
  EXPECT_EQ(gauge_->Get().latent_bytes_received(),
            25u * layout_.num_layers * layout_.row_bytes());
}

TEST_P(DecodeActorTest, AReleasedReservationIsFencedUntilItsWriterIsDone) {
  const std::vector<int32_t> prompt(20, 7);  // two blocks of 16 (+ room for 4 more tokens)
  auto a = Reserve("a", 20, 4);
  ASSERT_TRUE(a.ok());
  const int used = gauge_->Get().cache_blocks_used();
  EXPECT_EQ(used, 2);
  // The router gives up on "a" while its writer may still be putting: no Start from now on, but
  // the blocks stay off the free list.
  ASSERT_TRUE(Release(a->reservation_id(), /*writer_done=*/false).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), used);
  EXPECT_EQ(gauge_->Get().cache_blocks_quarantined(), used);
  // New reservations never get a quarantined block.
  auto b = Reserve("b", 20, 4);
  ASSERT_TRUE(b.ok());
  for (int32_t blk : b->blocks()) {
    for (int32_t taken : a->blocks()) EXPECT_NE(blk, taken);
  }
  // The writer's late notification is refused, and counts as its confirmation: blocks return.
  absl::Status late = Start("a", *a, prompt, 1, 4, a->generation());
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition) << late;
  EXPECT_EQ(gauge_->Get().cache_blocks_quarantined(), 0);
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2);  // only b's
  // A Start or a writer's Release that names another request or generation is refused and
  // touches nothing: b keeps its blocks.
  absl::Status stale = Start("b", *b, prompt, 1, 4, b->generation() + 1);
  EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition) << stale;
  EXPECT_EQ(Start("not-b", *b, prompt, 1, 4, b->generation()).code(),
            absl::StatusCode::kFailedPrecondition);
  {
    v1::ReleaseRequest r;
    r.set_reservation_id(b->reservation_id());
    r.set_writer_done(true);
    r.set_request_id("someone-else");
    absl::Status out = absl::UnknownError("no reply");
    actor_->Send(ReleaseReservation{r, [&out](absl::Status s) { out = s; }});
    scheduler_.RunUntilIdle();
    EXPECT_EQ(out.code(), absl::StatusCode::kFailedPrecondition) << out;
  }
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2);
  ASSERT_TRUE(Release(b->reservation_id(), true).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);

  // A writer that never confirms: the blocks come back after the deadline plus the grace.
  auto c = Reserve("c", 20, 4, /*timeout_ms=*/1000);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(Release(c->reservation_id(), false).ok());
  scheduler_.AdvanceBy(absl::Milliseconds(1900));
  scheduler_.RunUntilIdle();
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2) << "reclaimed before deadline + grace";
  scheduler_.AdvanceBy(absl::Milliseconds(200));
  scheduler_.RunUntilIdle();
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);

  // A writer that confirms with its release: freed at once. Released again: still fine.
  auto d = Reserve("d", 20, 4);
  ASSERT_TRUE(d.ok());
  ASSERT_TRUE(Release(d->reservation_id(), true).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
  EXPECT_TRUE(Release(d->reservation_id(), true).ok());
  EXPECT_EQ(Release(999, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Start("zz", *d, prompt, 1, 4, 0).code(), absl::StatusCode::kFailedPrecondition);
  v1::LatentDestination unknown;
  unknown.set_reservation_id(12345);
  EXPECT_EQ(Start("zz", unknown, prompt, 1, 4, 0).code(), absl::StatusCode::kInvalidArgument);
  // Bad reservations: nothing taken.
  EXPECT_EQ(Reserve("e", 0, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Reserve("f", 20, 1000).status().code(), absl::StatusCode::kOutOfRange);  // > 12 blocks
  auto g = Reserve("g", 20, 100);  // 8 of the 12 blocks
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(Reserve("h", 20, 60).status().code(), absl::StatusCode::kResourceExhausted);  // 5 > 4
  ASSERT_TRUE(Release(g->reservation_id(), true).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
}

// A writer the router reports dead puts nothing more: its quarantined reservations are freed at
// once (not at deadline + grace), also when its Release arrives after the report; another
// writer's stay fenced.
// A router's token stream carries only its own requests' events (ids "<router id>-..."), and a
// reservation cannot be held longer than kMaxReservationTimeoutMs.
TEST_P(DecodeActorTest, TokensGoOnlyToTheOwningRouterAndReservationsAreBounded) {
  std::map<std::string, std::vector<std::string>> seen;
  for (const std::string router : {"ra", "rb"}) {
    actor_->Send(AddTokenSink{[&seen, router](const v1::TokenEvent& e) {
                                seen[router].push_back(e.request_id());
                                return true;
                              },
                              router});
  }
  scheduler_.RunUntilIdle();
  const std::vector<int32_t> prompt = {0, 5, 9};
  for (const std::string id : {"ra-1", "rb-7"}) {
    auto d = Reserve(id, 3, 4);
    ASSERT_TRUE(d.ok()) << d.status();
    engine::DecodedToken first = WritePrompt(*d, prompt, 2);
    ASSERT_TRUE(Start(id, *d, prompt, first.token, 4, d->generation()).ok());
  }
  ASSERT_EQ(seen["ra"].size(), 3u);  // max_tokens 4: the first came from the prefill
  ASSERT_EQ(seen["rb"].size(), 3u);
  for (const std::string& id : seen["ra"]) EXPECT_EQ(id, "ra-1");
  for (const std::string& id : seen["rb"]) EXPECT_EQ(id, "rb-7");
  EXPECT_TRUE(events_.empty()) << "the sink of no router saw another's tokens";
  EXPECT_EQ(RequestOwner("ra-1.2"), "ra");
  EXPECT_EQ(RequestOwner("plain"), "");
  EXPECT_EQ(Reserve("long", 3, 4, kMaxReservationTimeoutMs + 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Reserve("ok", 3, 4, kMaxReservationTimeoutMs).ok());
}

TEST_P(DecodeActorTest, ADeadWritersQuarantinedBlocksComeBackAtOnce) {
  auto release = [&](uint64_t id, const std::string& writer) {
    v1::ReleaseRequest r;
    r.set_reservation_id(id);
    r.set_reason("failover");
    r.set_writer_id(writer);
    absl::Status out = absl::UnknownError("no reply");
    actor_->Send(ReleaseReservation{r, [&out](absl::Status s) { out = s; }});
    scheduler_.RunUntilIdle();
    return out;
  };
  auto gone = [&](const std::vector<std::string>& writers) {
    v1::WritersGoneRequest r;
    *r.mutable_writer_ids() = {writers.begin(), writers.end()};
    int32_t freed = -1;
    actor_->Send(WritersGone{r, [&freed](absl::StatusOr<v1::WritersGoneResponse> resp) {
                               ASSERT_TRUE(resp.ok()) << resp.status();
                               freed = resp->reservations_freed();
                             }});
    scheduler_.RunUntilIdle();
    return freed;
  };
  auto a = Reserve("a", 20, 4, /*timeout_ms=*/60000);
  auto b = Reserve("b", 20, 4, 60000);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(release(a->reservation_id(), "PREFILL-1").ok());
  ASSERT_TRUE(release(b->reservation_id(), "PREFILL-2").ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_quarantined(), 4);
  EXPECT_EQ(gone({"PREFILL-1"}), 1);
  EXPECT_EQ(gauge_->Get().cache_blocks_quarantined(), 2);  // b's writer may still put
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2);
  // A Release naming a writer already reported dead frees at once.
  auto c = Reserve("c", 20, 4, 60000);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(release(c->reservation_id(), "PREFILL-1").ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2);
  // A reservation that was never released is not the report's to free.
  auto d = Reserve("d", 20, 4, 60000);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(gone({"PREFILL-2", ""}), 1);
  EXPECT_EQ(gauge_->Get().cache_blocks_quarantined(), 0);
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 2);  // d's
  ASSERT_TRUE(Release(d->reservation_id(), true).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
}

TEST_P(DecodeActorTest, ReleasingARunningSequenceStopsItAndTellsTheRouter) {
  const std::vector<int32_t> prompt = {0, 3, 4, 5};
  auto a = Reserve("a", 4, 50);
  ASSERT_TRUE(a.ok());
  engine::DecodedToken first = WritePrompt(*a, prompt, -1);
  v1::StartRequest r;
  r.set_request_id("a");
  r.set_reservation_id(a->reservation_id());
  r.set_generation(a->generation());
  *r.mutable_prompt() = {prompt.begin(), prompt.end()};
  r.set_first_token(first.token);
  r.mutable_sampling()->set_max_tokens(50);
  r.mutable_sampling()->set_ignore_eos(true);
  absl::Status started = absl::UnknownError("no reply");
  actor_->Send(StartSequence{r, [&started](absl::Status s) { started = s; }});
  ASSERT_TRUE(scheduler_.Step());  // Start only; steps follow as messages
  ASSERT_TRUE(started.ok()) << started;
  ASSERT_TRUE(scheduler_.Step());  // a RunStep: the step goes to the executor
  EXPECT_EQ(executor_->queued(), 1u);
  EXPECT_EQ(gauge_->Get().sequences_running(), 1);
  v1::ReleaseRequest release;
  release.set_reservation_id(a->reservation_id());
  absl::Status released = absl::UnknownError("no reply");
  actor_->Send(ReleaseReservation{release, [&](absl::Status s) { released = s; }});
  scheduler_.RunUntilIdle();
  // Answered at once, but the step still owns the blocks: nothing is freed or told yet.
  EXPECT_TRUE(released.ok()) << released;
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 4);
  EXPECT_TRUE(events_.empty());
  Settle();  // the step ends: the sequence is stopped, its token of that step dropped
  EXPECT_EQ(gauge_->Get().sequences_running(), 0);
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_TRUE(events_.back().finished());
  EXPECT_EQ(events_.back().finish_reason(), "cancelled");
  EXPECT_EQ(executor_->queued(), 0u);
}

// The cache grows: reservations take the prompt and one block, sequences take blocks as they
// decode, and when none is left the sequence that arrived last is preempted ("preempted" to its
// router, its blocks freed at once) while the others decode on, exactly as the engine does.
TEST_P(DecodeActorTest, TheCacheGrowsAndTheLastArrivalIsPreempted) {
  MakeActor(/*reserve_upfront=*/false);
  constexpr int kMax = 120;  // 20 + 120 tokens: 9 of the 12 blocks, so one sequence always fits
  std::vector<std::vector<int32_t>> prompts;
  std::vector<v1::LatentDestination> dests;
  std::vector<int32_t> firsts;
  EXPECT_EQ(Reserve("never", 20, 200).status().code(), absl::StatusCode::kOutOfRange);
  for (int i = 0; i < 3; ++i) {
    std::vector<int32_t> prompt(20);
    for (int t = 0; t < 20; ++t) prompt[t] = (t * 31 + i * 7) % 500;
    auto d = Reserve("g" + std::to_string(i), 20, kMax, 1000, /*arrival_us=*/1000 + i);
    ASSERT_TRUE(d.ok()) << d.status();  // g0 arrived first
    EXPECT_EQ(d->blocks_size(), 3);  // 20 + 16 tokens, not 20 + 120
    prompts.push_back(prompt);
    dests.push_back(*d);
    firsts.push_back(WritePrompt(*d, prompt, 2).token);
  }
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 9);
  // Admission keeps a block free per live sequence: 3 free, 2 needed + 3 kept.
  EXPECT_EQ(Reserve("late", 10, 5).status().code(), absl::StatusCode::kResourceExhausted);
  std::vector<absl::Status> started(3, absl::UnknownError("no reply"));
  for (int i = 0; i < 3; ++i) {
    v1::StartRequest r;
    r.set_request_id("g" + std::to_string(i));
    r.set_reservation_id(dests[i].reservation_id());
    r.set_generation(dests[i].generation());
    *r.mutable_prompt() = {prompts[i].begin(), prompts[i].end()};
    r.set_first_token(firsts[i]);
    r.mutable_sampling()->set_max_tokens(kMax);
    r.mutable_sampling()->set_ignore_eos(true);
    r.mutable_sampling()->set_logprobs(2);
    actor_->Send(StartSequence{r, [&started, i](absl::Status s) { started[i] = s; }});
  }
  Settle();
  for (const absl::Status& s : started) ASSERT_TRUE(s.ok()) << s;
  std::map<std::string, std::vector<int32_t>> tokens;
  std::map<std::string, std::string> ended;
  for (const v1::TokenEvent& e : events_) {
    if (e.token() >= 0) tokens[e.request_id()].push_back(e.token());
    if (e.finished()) ended[e.request_id()] = e.finish_reason();
  }
  // 3 x 140 tokens do not fit in 12 x 16: the later arrivals were preempted, the first never.
  EXPECT_EQ(ended["g0"], "length");
  EXPECT_EQ(ended["g2"], "preempted");
  EXPECT_GE(gauge_->Get().preemptions(), 1u);
  EXPECT_EQ(gauge_->Get().max_sequences_running(), 3);
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);  // every block came back
  EXPECT_EQ(gauge_->Get().sequences_running(), 0);
  // What each produced before it ended is what the engine produces (a preempted one's tokens
  // are a prefix: its router prefills prompt + them again and goes on).
  for (int i = 0; i < 3; ++i) {
    engine::GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = kMax;
    r.ignore_eos = true;
    auto want = engine_->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    const auto& mine = tokens["g" + std::to_string(i)];
    ASSERT_LE(mine.size() + 1, want->tokens.size());
    for (size_t j = 0; j < mine.size(); ++j)
      EXPECT_EQ(mine[j], want->tokens[j + 1]) << "sequence " << i << " token " << j;
    if (i == 0) EXPECT_EQ(mine.size() + 1, want->tokens.size());  // the prefill's first token
  }
}

// The prefix cache: a finished sequence's full blocks are kept; a reservation whose prompt ids
// start with the same tokens shares them in place (the writer writes only the rest), and decodes
// exactly as the engine does. A reservation without ids shares nothing.
TEST_P(DecodeActorTest, AFinishedSequencesBlocksAreSharedByTheNextPrompt) {
  MakeActor(/*reserve_upfront=*/false);
  auto reserve = [&](const std::string& id, const std::vector<int32_t>& prompt, bool with_ids) {
    return Reserve(id, static_cast<int>(prompt.size()), 4, 1000, 0, with_ids ? &prompt : nullptr);
  };
  std::vector<int32_t> a(40);
  for (int t = 0; t < 40; ++t) a[t] = (t * 13 + 5) % 500;
  auto da = reserve("a", a, true);
  ASSERT_TRUE(da.ok()) << da.status();
  EXPECT_EQ(da->cached_tokens(), 0);
  engine::DecodedToken first = WritePrompt(*da, a, 2);
  ASSERT_TRUE(Start("a", *da, a, first.token, 4, da->generation()).ok());  // runs to the end
  EXPECT_EQ(gauge_->Get().cache_blocks_cached(), 2);  // 43 rows: two whole blocks kept
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
  // b shares a's first 36 tokens: two blocks (32 tokens) are shared, the rest written.
  std::vector<int32_t> b(a.begin(), a.begin() + 36);
  b.push_back(7);
  auto db = reserve("b", b, true);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ(db->cached_tokens(), 32);
  EXPECT_EQ(db->blocks(0), da->blocks(0));
  EXPECT_EQ(db->blocks(1), da->blocks(1));
  events_.clear();
  engine::DecodedToken first_b = WritePrompt(*db, b, 2, /*from=*/32);
  ASSERT_TRUE(Start("b", *db, b, first_b.token, 4, db->generation()).ok());
  engine::GenerateRequest r;
  r.prompt = b;
  r.max_tokens = 4;
  r.ignore_eos = true;
  auto want = engine_->Generate(r, nullptr);
  ASSERT_TRUE(want.ok());
  std::vector<int32_t> got = {first_b.token};
  for (const v1::TokenEvent& e : events_) got.push_back(e.token());
  EXPECT_EQ(got, want->tokens);
  EXPECT_EQ(gauge_->Get().prefix_tokens_hit(), 32u);
  // Without the ids nothing is shared.
  auto dc = reserve("c", b, false);
  ASSERT_TRUE(dc.ok());
  EXPECT_EQ(dc->cached_tokens(), 0);
  ASSERT_TRUE(Release(dc->reservation_id(), true).ok());
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
}

TEST_P(DecodeActorTest, ASequenceStartedDuringAStepJoinsTheNextOne) {
  const std::vector<int32_t> pa = {0, 3, 4, 5}, pb = {0, 9, 8, 7, 6, 5};
  constexpr int kMax = 6;
  auto a = Reserve("a", 4, kMax);
  auto b = Reserve("b", 6, kMax);
  ASSERT_TRUE(a.ok() && b.ok());
  engine::DecodedToken fa = WritePrompt(*a, pa, 2), fb = WritePrompt(*b, pb, 2);
  auto start = [&](const std::string& id, const v1::LatentDestination& d,
                   const std::vector<int32_t>& prompt, int32_t first, absl::Status* out) {
    v1::StartRequest r;
    r.set_request_id(id);
    r.set_reservation_id(d.reservation_id());
    r.set_generation(d.generation());
    *r.mutable_prompt() = {prompt.begin(), prompt.end()};
    r.set_first_token(first);
    r.mutable_sampling()->set_max_tokens(kMax);
    r.mutable_sampling()->set_ignore_eos(true);
    r.mutable_sampling()->set_logprobs(2);
    actor_->Send(StartSequence{r, [out](absl::Status s) { *out = s; }});
  };
  absl::Status sa = absl::UnknownError("no reply"), sb = absl::UnknownError("no reply");
  start("a", *a, pa, fa.token, &sa);
  scheduler_.RunUntilIdle();  // a's first step is on the executor
  ASSERT_TRUE(sa.ok()) << sa;
  ASSERT_EQ(executor_->queued(), 1u);
  start("b", *b, pb, fb.token, &sb);
  scheduler_.RunUntilIdle();  // answered while the step is in flight
  ASSERT_TRUE(sb.ok()) << sb;
  EXPECT_EQ(executor_->queued(), 1u) << "a second step started beside the first";
  EXPECT_EQ(gauge_->Get().sequences_running(), 2);
  ASSERT_TRUE(executor_->RunOne());
  scheduler_.RunUntilIdle();  // a's token; the next step has both
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].request_id(), "a");
  Settle();
  std::map<std::string, std::vector<int32_t>> got = {{"a", {fa.token}}, {"b", {fb.token}}};
  for (const v1::TokenEvent& e : events_) got[e.request_id()].push_back(e.token());
  for (const auto& [id, prompt] : {std::pair{std::string("a"), pa}, std::pair{std::string("b"), pb}}) {
    engine::GenerateRequest r;
    r.prompt = prompt;
    r.max_tokens = kMax;
    r.ignore_eos = true;
    auto want = engine_->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got[id], want->tokens) << id;
  }
  EXPECT_EQ(gauge_->Get().cache_blocks_used(), 0);
  EXPECT_EQ(gauge_->Get().sequences_running(), 0);
}

INSTANTIATE_TEST_SUITE_P(MicroBatchesAndDevice, DecodeActorTest,
                         ::testing::Combine(::testing::Values(1, 2), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<int, bool>>& p) {
                           return std::string(std::get<0>(p.param) == 1 ? "OneBatch"
                                                                        : "PingPong") +
                                  (std::get<1>(p.param) ? "DeviceArena" : "HostArena");
                         });

}  // namespace
}  // namespace splitmoe::decode
