// BidiStream: a gRPC callback-API server reactor for long-lived bidirectional streams
// (MoeDispatch, ExpertCompute) where every request gets exactly one reply, replies may come from
// any thread and in any order, and the handler only posts work (to an actor) and returns.
//
// Reads are kept flowing; writes are queued and issued one at a time (gRPC allows a single
// outstanding write). Lifetime: gRPC deletes the reactor in OnDone; replies arriving later go to
// a shared state whose `open` flag is false and are dropped, so a handler's reply callback can be
// called at any time, from any thread, without dangling. Thread-safe.
//
//   grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* Compute(
//       grpc::CallbackServerContext* ctx) override {
//     return new rpc::BidiStream<v1::ExpertBatch, v1::ExpertResult>(
//         [this](v1::ExpertBatch batch, rpc::BidiStream<...>::Reply reply) {
//           actor_.Send(ComputeBatch{std::move(batch), std::move(reply)});
//         });
//   }
#ifndef SPLITMOE_COMMON_RPC_BIDI_STREAM_H_
#define SPLITMOE_COMMON_RPC_BIDI_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

namespace splitmoe::rpc {

template <typename Request, typename Response>
class BidiStream : public grpc::ServerBidiReactor<Request, Response> {
 public:
  using Reply = std::function<void(Response)>;
  using Handler = std::function<void(Request, Reply)>;

  explicit BidiStream(Handler handler)
      : handler_(std::move(handler)), state_(std::make_shared<State>()) {
    state_->reactor = this;
    this->StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed or the call broke: finish once every reply went out
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->reads_done = true;
      MaybeFinishLocked();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      ++state_->pending_replies;
    }
    std::weak_ptr<State> weak = state_;
    handler_(std::move(request_), [weak](Response response) {
      if (auto state = weak.lock()) state->Enqueue(std::move(response));
    });
    request_ = Request();
    this->StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->queue.pop_front();
    state_->writing = false;
    if (!ok) {
      state_->broken = true;
      state_->queue.clear();
    }
    state_->WriteNextLocked();
    MaybeFinishLocked();
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->reactor = nullptr;
    }
    delete this;
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->broken = true;
    state_->reads_done = true;
    MaybeFinishLocked();
  }

 private:
  struct State {
    std::mutex mu;
    BidiStream* reactor = nullptr;  // null once gRPC is done with the call
    std::deque<Response> queue;     // front is being written when `writing`
    bool writing = false;
    bool reads_done = false;
    bool broken = false;
    bool finished = false;
    int64_t pending_replies = 0;

    void Enqueue(Response response) {
      std::lock_guard<std::mutex> lock(mu);
      --pending_replies;
      if (reactor == nullptr || broken) {
        if (reactor != nullptr) reactor->MaybeFinishLocked();
        return;
      }
      queue.push_back(std::move(response));
      WriteNextLocked();
      reactor->MaybeFinishLocked();
    }
    void WriteNextLocked() {
      if (writing || queue.empty() || reactor == nullptr || broken) return;
      writing = true;
      reactor->StartWrite(&queue.front());
    }
  };

  // Finish after the reads ended and every reply was written (or the stream broke).
  void MaybeFinishLocked() {
    State& s = *state_;
    if (s.finished || !s.reads_done || s.writing) return;
    if (!s.broken && (s.pending_replies > 0 || !s.queue.empty())) return;
    s.finished = true;
    this->Finish(s.broken ? grpc::Status(grpc::StatusCode::CANCELLED, "stream broken")
                          : grpc::Status::OK);
  }

  Handler handler_;
  std::shared_ptr<State> state_;
  Request request_;
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_BIDI_STREAM_H_
