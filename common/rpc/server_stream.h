// ServerStream: the sending half of a gRPC server-streaming call (the public Generate stream, a
// decode worker's token stream) as a handle any thread may write to. The handler creates it,
// returns its reactor to gRPC and hands the handle to an actor; the actor Write()s events and
// finally Finish()es. Writes are queued and issued one at a time (gRPC allows one outstanding
// write). When the client cancels or disconnects, `on_cancel` runs once (on a gRPC thread: it
// must only post a message) and every later Write returns false. gRPC deletes the reactor in
// OnDone; the handle stays valid (shared state), so writing after the call ended is harmless.
// Thread-safe.
//
//   auto [reactor, stream] = ServerStream<v1::GenerateEvent>::Create(
//       [ref, id] { ref.Send(ClientGone{id}); });
//   actor.Send(NewRequest{..., stream});
//   return reactor;
//   ... stream->Write(event); stream->Finish(grpc::Status::OK);
//
// A method the service registers raw (the generated WithRawCallbackMethod_* mixin, so that the
// handler parses the request itself and can answer a malformed one with a reason) gets its
// reactor from CreateRaw: the reactor speaks grpc::ByteBuffer and each T is serialised as it is
// written; the handle is the same ServerStream<T>, so whoever writes cannot tell.
#ifndef SPLITMOE_COMMON_RPC_SERVER_STREAM_H_
#define SPLITMOE_COMMON_RPC_SERVER_STREAM_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>

namespace splitmoe::rpc {

template <typename T>
class ServerStream : public std::enable_shared_from_this<ServerStream<T>> {
 public:
  using CancelFn = std::function<void()>;

  // The reactor to return from the service method, and the handle to write with.
  static std::pair<grpc::ServerWriteReactor<T>*, std::shared_ptr<ServerStream>> Create(
      CancelFn on_cancel) {
    return CreateWith<T>(std::move(on_cancel));
  }
  // The same for a method registered raw: the reactor writes serialised T.
  static std::pair<grpc::ServerWriteReactor<grpc::ByteBuffer>*, std::shared_ptr<ServerStream>>
  CreateRaw(CancelFn on_cancel) {
    return CreateWith<grpc::ByteBuffer>(std::move(on_cancel));
  }

  // A reader this far behind is not reading: the call is ended (RESOURCE_EXHAUSTED) rather than
  // letting the queue grow without bound.
  static constexpr size_t kMaxQueued = 1 << 16;

  // Queues `message`; false when the call is over (finished, cancelled or broken).
  bool Write(T message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finishing_ || reactor_ == nullptr || broken_) return false;
    if (queue_.size() >= kMaxQueued) {
      broken_ = finishing_ = true;
      queue_.clear();
      finish_status_ = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                    "the client is not reading its stream");
      PumpLocked();
      return false;
    }
    queue_.push_back(std::move(message));
    PumpLocked();
    return true;
  }

  // Ends the call with `status` once every queued message is out. Idempotent.
  void Finish(grpc::Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finishing_ || reactor_ == nullptr) return;
    finishing_ = true;
    finish_status_ = std::move(status);
    PumpLocked();
  }

  // True once the client cancelled, the call broke or it finished.
  bool closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return reactor_ == nullptr || broken_ || finishing_;
  }

 private:
  // What the stream drives: the reactor, whichever type it speaks on the wire.
  class Sink {
   public:
    virtual ~Sink() = default;
    // Starts writing `message` (valid until OnWriteDone); false when it cannot be serialised.
    virtual bool StartWriteMessage(const T* message) = 0;
    virtual void FinishCall(grpc::Status status) = 0;
  };

  template <typename Wire>
  class Reactor : public grpc::ServerWriteReactor<Wire>, public Sink {
   public:
    explicit Reactor(std::shared_ptr<ServerStream> stream) : stream_(std::move(stream)) {}
    bool StartWriteMessage(const T* message) override {
      if constexpr (std::is_same_v<Wire, T>) {
        this->StartWrite(message);
      } else {
        bool own_buffer = false;
        wire_.Clear();
        if (!grpc::SerializationTraits<T>::Serialize(*message, &wire_, &own_buffer).ok()) {
          return false;
        }
        this->StartWrite(&wire_);
      }
      return true;
    }
    void FinishCall(grpc::Status status) override { this->Finish(std::move(status)); }
    void OnWriteDone(bool ok) override {
      std::lock_guard<std::mutex> lock(stream_->mu_);
      stream_->writing_ = false;
      if (!ok) {
        stream_->broken_ = true;
        stream_->queue_.clear();
      }
      stream_->PumpLocked();
    }
    void OnCancel() override {
      CancelFn cancel;
      {
        std::lock_guard<std::mutex> lock(stream_->mu_);
        stream_->broken_ = true;
        stream_->queue_.clear();
        cancel = std::move(stream_->on_cancel_);
        stream_->on_cancel_ = nullptr;
        // A cancelled call still needs its Finish: gRPC calls OnDone only after it.
        if (!stream_->finish_issued_ && !stream_->writing_) {
          stream_->finish_issued_ = true;
          this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
        }
      }
      if (cancel) cancel();
    }
    void OnDone() override {
      {
        std::lock_guard<std::mutex> lock(stream_->mu_);
        stream_->reactor_ = nullptr;
      }
      delete this;
    }

   private:
    std::shared_ptr<ServerStream> stream_;
    grpc::ByteBuffer wire_;  // the message being written, when Wire is ByteBuffer
  };

  template <typename Wire>
  static std::pair<grpc::ServerWriteReactor<Wire>*, std::shared_ptr<ServerStream>> CreateWith(
      CancelFn on_cancel) {
    auto stream = std::shared_ptr<ServerStream>(new ServerStream(std::move(on_cancel)));
    auto* reactor = new Reactor<Wire>(stream);
    stream->reactor_ = reactor;
    reactor->StartSendInitialMetadata();  // the client sees the stream open before any event
    return {reactor, stream};
  }

  explicit ServerStream(CancelFn on_cancel) : on_cancel_(std::move(on_cancel)) {}

  void PumpLocked() {
    if (reactor_ == nullptr || writing_ || finish_issued_) return;
    if (broken_) {
      finish_issued_ = true;
      reactor_->FinishCall(finishing_ ? finish_status_
                                      : grpc::Status(grpc::StatusCode::CANCELLED,
                                                     "the stream broke (the client went away)"));
      return;
    }
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      if (!reactor_->StartWriteMessage(&current_)) {
        broken_ = finishing_ = finish_issued_ = true;
        queue_.clear();
        reactor_->FinishCall(
            grpc::Status(grpc::StatusCode::INTERNAL, "cannot serialise a stream message"));
        return;
      }
      writing_ = true;
      return;
    }
    if (finishing_) {
      finish_issued_ = true;
      reactor_->FinishCall(finish_status_);
    }
  }

  mutable std::mutex mu_;
  CancelFn on_cancel_;
  Sink* reactor_ = nullptr;  // null once gRPC is done with the call
  std::deque<T> queue_;
  T current_;
  bool writing_ = false;
  bool broken_ = false;
  bool finishing_ = false;
  bool finish_issued_ = false;
  grpc::Status finish_status_;
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_SERVER_STREAM_H_
