// The router's GenerationActor on the manual scheduler, against fake prefill and decode workers
// served over real gRPC on loopback: the test decides when each worker answers, so orderings a
// live cluster produces only now and then (a decode worker's tokens overtaking the prefill
// reply, a token stream breaking mid-request) are produced every time. A client reads the
// request's events through the real Generation service.
#include "router/generation_actor.h"

#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "common/runtime/manual_scheduler.h"
#include "gtest/gtest.h"
#include "router/generation_service.h"

namespace splitmoe::router {
namespace {

// A decode worker: grants every Reserve, records Release and Cancel, and streams the token
// events the test pushes.
class FakeDecode final : public v1::Decode::CallbackService {
 public:
  explicit FakeDecode(std::string id) : id_(std::move(id)) {}

  grpc::ServerUnaryReactor* Reserve(grpc::CallbackServerContext* ctx,
                                    const v1::ReserveRequest* request,
                                    v1::ReserveResponse* response) override {
    absl::MutexLock lock(&mu_);
    reserved_.push_back(*request);
    v1::LatentDestination* d = response->mutable_destination();
    d->set_reservation_id(reserved_.size());
    d->set_generation(1);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse*) override {
    absl::MutexLock lock(&mu_);
    released_.push_back(request->request_id());
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx, const v1::CancelRequest*,
                                   v1::CancelResponse*) override {
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* WritersGone(grpc::CallbackServerContext* ctx,
                                        const v1::WritersGoneRequest*,
                                        v1::WritersGoneResponse*) override {
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerWriteReactor<v1::TokenEvent>* StreamTokens(
      grpc::CallbackServerContext*, const v1::StreamTokensRequest*) override {
    absl::MutexLock lock(&mu_);
    stream_ = new Stream(this);
    return stream_;
  }

  // Writes one event on the open token stream (in order after those before it).
  void Push(v1::TokenEvent event) {
    absl::MutexLock lock(&mu_);
    ASSERT_NE(stream_, nullptr) << id_ << " has no token stream";
    stream_->queue.push_back(std::move(event));
    stream_->PumpLocked();
  }
  // Ends the token stream as a dying worker's would end.
  void BreakStream() {
    absl::MutexLock lock(&mu_);
    ASSERT_NE(stream_, nullptr);
    stream_->finish = true;
    stream_->PumpLocked();
  }
  bool stream_open() {
    absl::MutexLock lock(&mu_);
    return stream_ != nullptr;
  }
  std::vector<v1::ReserveRequest> reserved() {
    absl::MutexLock lock(&mu_);
    return reserved_;
  }
  std::vector<std::string> released() {
    absl::MutexLock lock(&mu_);
    return released_;
  }

 private:
  struct Stream : grpc::ServerWriteReactor<v1::TokenEvent> {
    explicit Stream(FakeDecode* owner) : owner(owner) { StartSendInitialMetadata(); }
    void PumpLocked() {
      if (writing || done) return;
      if (!queue.empty()) {
        current = std::move(queue.front());
        queue.pop_front();
        writing = true;
        StartWrite(&current);
      } else if (finish) {
        done = true;
        Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker died"));
      }
    }
    void OnWriteDone(bool ok) override {
      absl::MutexLock lock(&owner->mu_);
      writing = false;
      if (!ok) {
        done = true;
        Finish(grpc::Status::CANCELLED);
        return;
      }
      PumpLocked();
    }
    void OnDone() override {
      absl::MutexLock lock(&owner->mu_);
      if (owner->stream_ == this) owner->stream_ = nullptr;
      delete this;
    }
    void OnCancel() override {
      absl::MutexLock lock(&owner->mu_);
      if (!done) {
        done = true;
        Finish(grpc::Status::CANCELLED);
      }
    }
    FakeDecode* owner;
    std::deque<v1::TokenEvent> queue;
    v1::TokenEvent current;
    bool writing = false, finish = false, done = false;
  };

  const std::string id_;
  absl::Mutex mu_;
  Stream* stream_ = nullptr;
  std::vector<v1::ReserveRequest> reserved_;
  std::vector<std::string> released_;
};

// A prefill worker whose replies the test sends when it chooses.
class FakePrefill final : public v1::Prefill::CallbackService {
 public:
  grpc::ServerUnaryReactor* RunPrefill(grpc::CallbackServerContext* ctx,
                                       const v1::PrefillRequest* request,
                                       v1::PrefillResponse* response) override {
    absl::MutexLock lock(&mu_);
    calls_.push_back({*request, response, ctx->DefaultReactor()});
    return calls_.back().reactor;
  }
  size_t calls() {
    absl::MutexLock lock(&mu_);
    return calls_.size();
  }
  v1::PrefillRequest request(size_t i) {
    absl::MutexLock lock(&mu_);
    return calls_.at(i).request;
  }
  grpc::ServerUnaryReactor* CancelPrefill(grpc::CallbackServerContext* ctx,
                                          const v1::CancelPrefillRequest* request,
                                          v1::CancelPrefillResponse*) override {
    absl::MutexLock lock(&mu_);
    cancels_.push_back(*request);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  std::vector<v1::CancelPrefillRequest> cancels() {
    absl::MutexLock lock(&mu_);
    return cancels_;
  }
  // Answers call `i` with `first_token`.
  void Answer(size_t i, int32_t first_token) {
    absl::MutexLock lock(&mu_);
    Call& c = calls_.at(i);
    c.response->set_first_token(first_token);
    c.reactor->Finish(grpc::Status::OK);
  }

 private:
  struct Call {
    v1::PrefillRequest request;
    v1::PrefillResponse* response;
    grpc::ServerUnaryReactor* reactor;
  };
  absl::Mutex mu_;
  std::deque<Call> calls_;
  std::vector<v1::CancelPrefillRequest> cancels_;
};

v1::TokenEvent Token(const std::string& request_id, int32_t token, bool last = false) {
  v1::TokenEvent e;
  e.set_request_id(request_id);
  e.set_token(token);
  if (last) {
    e.set_finished(true);
    e.set_finish_reason("length");
  }
  return e;
}

model::ModelConfig Config() {
  model::ModelConfig c;
  c.vocab_size = 512;
  c.max_position_embeddings = 4096;
  c.eos_token_id = 1;
  return c;
}

class GenerationActorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::pair<grpc::Service*, rpc::RunningServer*> workers[] = {
        {&d1_, &d1_server_}, {&d2_, &d2_server_}, {&prefill_, &prefill_server_}};
    for (const auto& [service, server] : workers) {
      absl::StatusOr<rpc::RunningServer> s = rpc::StartServer("127.0.0.1:0", {service});
      ASSERT_TRUE(s.ok()) << s.status();
      *server = std::move(*s);
    }
    absl::StatusOr<rpc::RunningServer> s = rpc::StartServer("127.0.0.1:0", {&service_});
    ASSERT_TRUE(s.ok()) << s.status();
    front_ = std::move(*s);
    actor_.Send(UseServingWorkers{{{"d1", d1_server_.address, v1::WORKER_ROLE_DECODE},
                                   {"d2", d2_server_.address, v1::WORKER_ROLE_DECODE},
                                   {"p1", prefill_server_.address, v1::WORKER_ROLE_PREFILL}}});
    ASSERT_TRUE(PumpUntil([&] { return d1_.stream_open() && d2_.stream_open(); }));
    scheduler_.RunUntilIdle();  // TokenStreamUp from both
  }
  void TearDown() override {
    for (rpc::RunningServer* s : {&front_, &d1_server_, &d2_server_, &prefill_server_}) {
      if (s->server) s->server->Shutdown(std::chrono::system_clock::now());
    }
    actor_.Stop();
  }

  // Runs the actor's messages (they come from gRPC's threads too) until `done` or 10 s.
  bool PumpUntil(const std::function<bool()>& done) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!done()) {
      if (absl::Now() > deadline) return false;
      if (scheduler_.RunUntilIdle() == 0) absl::SleepFor(absl::Milliseconds(1));
    }
    scheduler_.RunUntilIdle();
    return true;
  }

  model::ModelConfig config_ = Config();
  runtime::ManualScheduler scheduler_;
  runtime::Actor<GenerationActor> actor_{
      "generation", std::make_unique<GenerationActor>(config_, nullptr, GenerationOptions{}, nullptr),
      &scheduler_};
  GenerationService service_{config_, nullptr, "tiny", "{}", actor_.ref()};
  FakeDecode d1_{"d1"}, d2_{"d2"};
  FakePrefill prefill_;
  rpc::RunningServer d1_server_, d2_server_, prefill_server_, front_;
};

// A decode worker dies mid-request; on the other decode worker the new attempt's first tokens
// arrive before its prefill reply (its decode worker starts the sequence before the prefill
// worker answers the router). The client still gets every token once, in order.
TEST_F(GenerationActorTest, AfterAFailoverTokensThatOvertakeThePrefillReplyWaitForIt) {
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(front_.address,
                                                           grpc::InsecureChannelCredentials()));
  v1::GenerateRequest request;
  request.set_request_id("r1");
  request.mutable_token_ids()->add_ids(5);
  request.mutable_token_ids()->add_ids(6);
  request.mutable_stop()->set_max_tokens(6);
  absl::Mutex mu;
  std::vector<int32_t> got_tokens;
  auto got = [&] {
    absl::MutexLock lock(&mu);
    return got_tokens;
  };
  grpc::Status finished;
  absl::Notification client_done;
  grpc::ClientContext client_ctx;
  std::thread client([&] {
    auto reader = stub->Generate(&client_ctx, request);
    v1::GenerateEvent event;
    while (reader->Read(&event)) {
      absl::MutexLock lock(&mu);
      got_tokens.insert(got_tokens.end(), event.token_ids().begin(), event.token_ids().end());
    }
    finished = reader->Finish();
    client_done.Notify();
  });
  // Whatever way the test ends, the client's call ends and its thread is joined.
  struct JoinOnExit {
    grpc::ClientContext& ctx;
    std::thread& thread;
    ~JoinOnExit() {
      if (!thread.joinable()) return;
      ctx.TryCancel();
      thread.join();
    }
  } join_client{client_ctx, client};

  // The first attempt: reserved on one decode worker (either: both are idle), prefilled, two
  // tokens.
  ASSERT_TRUE(PumpUntil([&] { return prefill_.calls() == 1; }));
  ASSERT_EQ(d1_.reserved().size() + d2_.reserved().size(), 1u);
  FakeDecode& first = d1_.reserved().empty() ? d2_ : d1_;
  FakeDecode& second = &first == &d1_ ? d2_ : d1_;
  const std::string first_attempt = first.reserved()[0].request_id();
  prefill_.Answer(0, 10);
  first.Push(Token(first_attempt, 11));
  first.Push(Token(first_attempt, 12));
  ASSERT_TRUE(PumpUntil([&] { return got().size() == 3; })) << got().size();

  // It dies: the request moves to the other, re-prefilled from prompt + the three tokens.
  first.BreakStream();
  ASSERT_TRUE(PumpUntil([&] { return prefill_.calls() == 2; }));
  ASSERT_EQ(second.reserved().size(), 1u);
  const std::string second_attempt = second.reserved()[0].request_id();
  EXPECT_NE(second_attempt, first_attempt);
  EXPECT_EQ(second.reserved()[0].prompt_tokens(), 5);
  EXPECT_EQ(second.reserved()[0].max_tokens(), 3);
  const v1::PrefillRequest again = prefill_.request(1);
  EXPECT_EQ(std::vector<int32_t>(again.prompt().begin(), again.prompt().end()),
            (std::vector<int32_t>{5, 6, 10, 11, 12}));
  EXPECT_EQ(again.sampling().max_tokens(), 3);

  // Its tokens for the new attempt overtake the prefill reply, the last one included.
  second.Push(Token(second_attempt, 14));
  second.Push(Token(second_attempt, 15, /*last=*/true));
  // Both reach the actor (two messages) and wait there.
  size_t handled = 0;
  for (absl::Time deadline = absl::Now() + absl::Seconds(10); handled < 2 && absl::Now() < deadline;) {
    const size_t ran = scheduler_.RunUntilIdle();
    handled += ran;
    if (ran == 0) absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_GE(handled, 2u);
  absl::SleepFor(absl::Milliseconds(100));  // were anything sent to the client, it would be here
  EXPECT_EQ(got().size(), 3u) << "tokens of the new attempt went out before its first token";
  prefill_.Answer(1, 13);
  ASSERT_TRUE(PumpUntil([&] { return client_done.HasBeenNotified(); }));
  client.join();
  EXPECT_TRUE(finished.ok()) << finished.error_message();
  EXPECT_EQ(got(), (std::vector<int32_t>{10, 11, 12, 13, 14, 15}));
  // The first attempt's blocks on the dead worker were given back.
  std::vector<std::string> released = first.released();
  EXPECT_NE(std::find(released.begin(), released.end(), first_attempt), released.end());
}

// A client that goes while its prompt is being prefilled: the router cancels the prefill call
// and, by name, the prompt on the prefill worker (the call's cancel does not reach a worker the
// call never reached; the name does, and the worker then releases as the writer), and releases
// the reservation on the decode worker as not its writer.
TEST_F(GenerationActorTest, ACancelDuringPrefillCancelsThePromptByNameOnThePrefillWorker) {
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(front_.address,
                                                           grpc::InsecureChannelCredentials()));
  v1::GenerateRequest request;
  request.set_request_id("gone");
  request.mutable_token_ids()->add_ids(5);
  request.mutable_stop()->set_max_tokens(4);
  grpc::ClientContext client_ctx;
  std::thread client([&] {
    auto reader = stub->Generate(&client_ctx, request);
    v1::GenerateEvent event;
    while (reader->Read(&event)) {
    }
    (void)reader->Finish();
  });
  ASSERT_TRUE(PumpUntil([&] { return prefill_.calls() == 1; }));
  FakeDecode& decode = d1_.reserved().empty() ? d2_ : d1_;
  ASSERT_EQ(decode.reserved().size(), 1u);
  const std::string attempt = decode.reserved()[0].request_id();
  client_ctx.TryCancel();
  client.join();
  ASSERT_TRUE(PumpUntil([&] {
    const std::vector<std::string> released = decode.released();
    return !prefill_.cancels().empty() &&
           std::find(released.begin(), released.end(), attempt) != released.end();
  }));
  const v1::CancelPrefillRequest cancel = prefill_.cancels()[0];
  EXPECT_EQ(cancel.request_id(), attempt);
  EXPECT_EQ(cancel.request_id(), prefill_.request(0).request_id());
  EXPECT_EQ(cancel.destination().reservation_id(),
            prefill_.request(0).destination().reservation_id());
  EXPECT_EQ(cancel.destination().generation(), prefill_.request(0).destination().generation());
  EXPECT_EQ(cancel.destination().decode_address(),
            prefill_.request(0).destination().decode_address());
  prefill_.Answer(0, 10);  // a server reactor ends only when finished, cancelled or not
}

}  // namespace
}  // namespace splitmoe::router
