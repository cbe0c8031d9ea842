#include "router/http_front_door.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/base/tcp_listen.h"
#include "common/rpc/security.h"
#include "nlohmann/json.hpp"
#include "splitmoe/v1/generation.grpc.pb.h"

namespace splitmoe::router {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using nlohmann::json;

namespace {

std::chrono::steady_clock::duration Chrono(absl::Duration d) {
  return std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

std::string StatusLine(int status) {
  const beast::string_view reason = http::obsolete_reason(http::int_to_status(status));
  return absl::StrCat("HTTP/1.1 ", status, " ", std::string(reason.data(), reason.size()),
                      "\r\n");
}

// One chunk of a chunked body (RFC 9112 7.1).
std::string Chunk(absl::string_view data) {
  return absl::StrCat(absl::Hex(data.size()), "\r\n", data, "\r\n");
}

std::string SseEvent(absl::string_view data) { return Chunk(absl::StrCat("data: ", data, "\n\n")); }

}  // namespace

class Session;

// One public Generate call through the in-process channel. Reads one event at a time: the next
// read starts when the session asks (Next), after it has written the last one. A hold keeps
// OnDone back until the session needs no more reads, so Next and Cancel are always safe before
// it. The call keeps its session alive until OnDone.
class GenerateCall final : public grpc::ClientReadReactor<v1::GenerateEvent> {
 public:
  GenerateCall(size_t index, uint64_t generation, std::shared_ptr<Session> session,
               std::atomic<int64_t>* in_flight)
      : index_(index), generation_(generation), session_(std::move(session)),
        in_flight_(in_flight) {}

  void Start(v1::Generation::Stub* stub, v1::GenerateRequest request,
             const std::vector<std::pair<std::string, std::string>>& metadata,
             std::shared_ptr<GenerateCall> self) {
    request_ = std::move(request);
    for (const auto& [key, value] : metadata) ctx_.AddMetadata(key, value);
    self_ = std::move(self);
    in_flight_->fetch_add(1);
    stub->async()->Generate(&ctx_, &request_, this);
    AddHold();
    read_pending_ = true;
    StartRead(&event_);
    StartCall();
  }

  void Next() {
    std::lock_guard<std::mutex> lock(mu_);
    if (hold_released_) return;
    read_pending_ = true;
    StartRead(&event_);
  }

  void Cancel() {
    bool release = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      ctx_.TryCancel();
      if (!read_pending_ && !hold_released_) release = hold_released_ = true;
    }
    if (release) RemoveHold();
  }

  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  const size_t index_;
  const uint64_t generation_;
  std::shared_ptr<Session> session_;
  std::atomic<int64_t>* in_flight_;
  grpc::ClientContext ctx_;
  v1::GenerateRequest request_;
  v1::GenerateEvent event_;
  std::mutex mu_;
  bool read_pending_ = false;
  bool hold_released_ = false;
  // Set by Cancel: a read that still completes with an event (it was done before the cancel
  // reached it) is dropped and the hold released, since nobody will ask for the next one.
  bool cancelled_ = false;
  std::shared_ptr<GenerateCall> self_;
};

class HttpFrontDoor::Impl {
 public:
  Impl(HttpFrontDoorOptions options, std::shared_ptr<grpc::Channel> channel,
       const tokenizer::Tokenizer* tokenizer, std::shared_ptr<Readiness> readiness)
      : options_(std::move(options)),
        channel_(std::move(channel)),
        stub_(v1::Generation::NewStub(channel_)),
        tokenizer_(tokenizer),
        readiness_(std::move(readiness)),
        seed_(std::random_device{}() ^ static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()))) {}

  absl::Status Listen();
  void Run();
  void Stop();

  const HttpFrontDoorOptions& options() const { return options_; }
  v1::Generation::Stub* stub() { return stub_.get(); }
  const tokenizer::Tokenizer* tokenizer() const { return tokenizer_; }
  Readiness* readiness() { return readiness_.get(); }
  std::atomic<int64_t>* calls_in_flight() { return &calls_in_flight_; }
  std::atomic<int>* connections() { return &connections_; }
  uint64_t NextSeed() { return seed_.fetch_add(0x9e3779b97f4a7c15ULL); }
  const std::string& address() const { return address_; }

 private:
  void Accept();

  // Declared so that the io_context (whose destruction releases the sessions still queued
  // in it) goes before what the sessions use.
  HttpFrontDoorOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
  const tokenizer::Tokenizer* tokenizer_;
  std::shared_ptr<Readiness> readiness_;
  std::atomic<int64_t> calls_in_flight_{0};
  std::atomic<int> connections_{0};
  std::atomic<uint64_t> seed_;
  std::mutex sessions_mu_;
  std::list<std::weak_ptr<Session>> sessions_;
  bool stopped_ = false;
  std::string address_;
  net::io_context ioc_;
  // The acceptor's operations and its close (Stop) run on one strand.
  net::strand<net::io_context::executor_type> accept_strand_{net::make_strand(ioc_)};
  tcp::acceptor acceptor_{accept_strand_};
  net::steady_timer accept_retry_{accept_strand_};
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpFrontDoor::Impl* door)
      : stream_(std::move(socket)), door_(door) {
    door_->connections()->fetch_add(1);
    beast::error_code ec;
    const tcp::endpoint peer = stream_.socket().remote_endpoint(ec);
    if (!ec) peer_host_ = peer.address().to_string();
  }
  ~Session() { door_->connections()->fetch_sub(1); }

  void Start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->ReadRequest(); });
  }
  // From any thread: close the connection and cancel its calls; then `done`.
  void Shutdown(std::function<void()> done) {
    net::post(stream_.get_executor(), [self = shared_from_this(), done = std::move(done)] {
      self->Close();
      done();
    });
  }
  // From a call's reactor (any thread).
  void PostEvent(size_t index, uint64_t generation, v1::GenerateEvent event) {
    net::post(stream_.get_executor(),
              [self = shared_from_this(), index, generation, e = std::move(event)]() mutable {
                self->OnCallEvent(index, generation, std::move(e));
              });
  }
  void PostDone(size_t index, uint64_t generation, grpc::Status status) {
    net::post(stream_.get_executor(),
              [self = shared_from_this(), index, generation, s = std::move(status)]() {
                self->OnCallDone(index, generation, s);
              });
  }

 private:
  // A request in progress: its calls (one per choice) and the response being built.
  struct Generation {
    uint64_t serial = 0;
    openai::ApiRequest request;
    std::optional<openai::ResponseBuilder> builder;
    std::vector<std::shared_ptr<GenerateCall>> calls;
    std::vector<bool> done;
    size_t done_count = 0;
    std::vector<size_t> waiting;  // calls whose next read waits for the writes to drain
    bool headers_sent = false;
    bool failed = false;
  };

  void ReadRequest() {
    if (closed_) return;
    parser_.emplace();
    parser_->body_limit(door_->options().max_body_bytes);
    parser_->header_limit(64 * 1024);
    stream_.expires_after(Chrono(door_->options().idle_timeout));
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnRequest(ec);
                     });
  }

  void OnRequest(beast::error_code ec) {
    if (closed_) return;  // closed (hang-up, Stop) while the request was read
    stream_.expires_never();
    head_ = false;  // set by Handle for a HEAD request; an unreadable one gets its body
    if (ec == http::error::body_limit) {
      keep_alive_ = false;
      ReplyError(413, "request_too_large",
                 absl::StrCat("the request body is larger than ",
                              door_->options().max_body_bytes, " bytes"));
      return;
    }
    if (ec) {
      if (ec != http::error::end_of_stream && ec != beast::error::timeout &&
          ec != net::error::operation_aborted && ec != net::error::connection_reset &&
          ec != net::error::eof) {
        keep_alive_ = false;
        ReplyError(400, "", absl::StrCat("malformed HTTP request: ", ec.message()));
        return;
      }
      Close();
      return;
    }
    Handle(parser_->release());
  }

  void Handle(http::request<http::string_body> req) {
    keep_alive_ = req.keep_alive();
    std::string path(req.target().data(), req.target().size());
    if (size_t q = path.find('?'); q != std::string::npos) path.resize(q);
    std::optional<absl::string_view> authorization;
    if (auto it = req.find(http::field::authorization); it != req.end()) {
      authorization_ = std::string(it->value().data(), it->value().size());
      authorization = authorization_;
    } else {
      authorization_.clear();
    }
    head_ = req.method() == http::verb::head;
    const bool get = req.method() == http::verb::get || head_;
    const bool post = req.method() == http::verb::post;
    if (path == "/health") {
      if (!get) return ReplyError(405, "", "use GET /health");
      Readiness* readiness = door_->readiness();
      const bool ready = readiness != nullptr && readiness->ready();
      json body = {{"status", ready ? "ok" : "unavailable"}};
      if (!ready) body["reason"] = readiness != nullptr ? readiness->reason() : "starting";
      return Reply(ready ? 200 : 503, "application/json", openai::Dump(body));
    }
    if (path == "/v1/models") {
      if (!get) return ReplyError(405, "", "use GET /v1/models");
      if (grpc::Status key = rpc::CheckAuthorization(authorization); !key.ok()) {
        return ReplyStatus(static_cast<absl::StatusCode>(key.error_code()), key.error_message());
      }
      const auto& o = door_->options();
      json model = {{"id", o.defaults.model_name},
                    {"object", "model"},
                    {"created", absl::ToUnixSeconds(absl::Now())},
                    {"owned_by", "splitmoe"},
                    {"root", o.defaults.model_name},
                    {"max_model_len", o.max_model_len}};
      return Reply(200, "application/json",
                   openai::Dump({{"object", "list"}, {"data", json::array({model})}}));
    }
    const bool completions = path == "/v1/completions";
    const bool chat = path == "/v1/chat/completions";
    if (!completions && !chat) {
      return ReplyError(404, "", absl::StrCat("no route for ", path));
    }
    if (!post) return ReplyError(405, "", absl::StrCat("use POST ", path));
    if (grpc::Status key = rpc::CheckAuthorization(authorization); !key.ok()) {
      return ReplyStatus(static_cast<absl::StatusCode>(key.error_code()), key.error_message());
    }
    absl::StatusOr<openai::ApiRequest> request = openai::ParseRequest(
        chat ? openai::Endpoint::kChat : openai::Endpoint::kCompletions, req.body(),
        door_->options().defaults, door_->NextSeed());
    if (!request.ok()) return ReplyStatus(request.status().code(), request.status().message());
    StartGeneration(std::move(*request));
  }

  void StartGeneration(openai::ApiRequest request) {
    if (closed_) return;
    gen_ = std::make_unique<Generation>();
    gen_->serial = ++generation_serial_;
    gen_->request = std::move(request);
    gen_->builder.emplace(gen_->request, door_->options().defaults.model_name,
                          door_->tokenizer());
    const size_t n = gen_->request.generates.size();
    gen_->done.assign(n, false);
    std::vector<std::pair<std::string, std::string>> metadata;
    // Only when keys are asked for (then it was checked to be exactly "Bearer <a key>"): any
    // other header value could hold bytes gRPC refuses in metadata.
    if (rpc::ApiKeysRequired() && !authorization_.empty()) {
      metadata.emplace_back("authorization", authorization_);
    }
    if (!peer_host_.empty()) metadata.emplace_back("x-splitmoe-http-client", peer_host_);
    for (size_t i = 0; i < n; ++i) {
      auto call = std::make_shared<GenerateCall>(i, gen_->serial, shared_from_this(),
                                                 door_->calls_in_flight());
      gen_->calls.push_back(call);
      call->Start(door_->stub(), std::move(gen_->request.generates[i]), metadata, call);
    }
    WatchPeer();
  }

  void OnCallEvent(size_t index, uint64_t serial, v1::GenerateEvent event) {
    if (gen_ == nullptr || gen_->serial != serial || index >= gen_->calls.size()) return;
    if (closed_ || gen_->failed) return;  // being cancelled
    GenerateCall* call = gen_->calls[index].get();
    std::vector<std::string> chunks = gen_->builder->Add(index, event);
    if (!gen_->request.stream) {
      call->Next();
      return;
    }
    if (!gen_->headers_sent) SendStreamHeaders();
    for (const std::string& chunk : chunks) Send(SseEvent(chunk));
    if (out_.empty() && !writing_) {
      call->Next();
    } else {
      gen_->waiting.push_back(index);
    }
  }

  void OnCallDone(size_t index, uint64_t serial, const grpc::Status& status) {
    if (gen_ == nullptr || gen_->serial != serial || index >= gen_->calls.size()) return;
    if (!gen_->done[index]) {
      gen_->done[index] = true;
      ++gen_->done_count;
    }
    if (closed_ || gen_->failed) return;
    if (!status.ok()) {
      gen_->failed = true;
      for (auto& call : gen_->calls) call->Cancel();
      const openai::ApiError error = openai::ErrorFrom(
          static_cast<absl::StatusCode>(status.error_code()), status.error_message());
      if (!gen_->headers_sent) return ReplyApiError(error);
      Send(SseEvent(openai::ErrorBody(error)));
      Send(SseEvent("[DONE]"));
      Send("0\r\n\r\n");
      EndResponse();
      return;
    }
    if (gen_->done_count < gen_->calls.size()) return;
    if (gen_->request.stream) {
      if (!gen_->headers_sent) SendStreamHeaders();
      if (gen_->request.include_usage) Send(SseEvent(gen_->builder->UsageChunk()));
      Send(SseEvent("[DONE]"));
      Send("0\r\n\r\n");
      EndResponse();
    } else {
      Reply(200, "application/json", gen_->builder->Response());
    }
  }

  void SendStreamHeaders() {
    gen_->headers_sent = true;
    Send(absl::StrCat(StatusLine(200),
                      "Content-Type: text/event-stream; charset=utf-8\r\n"
                      "Cache-Control: no-cache\r\n"
                      "Transfer-Encoding: chunked\r\n"
                      "X-Request-Id: ",
                      gen_->request.id, "\r\n", "Connection: ",
                      keep_alive_ ? "keep-alive" : "close", "\r\n\r\n"));
  }

  void Reply(int status, absl::string_view content_type, absl::string_view body) {
    // A HEAD request gets the headers a GET would (RFC 9110 9.3.2), no body.
    Send(absl::StrCat(StatusLine(status), "Content-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: ",
                      keep_alive_ ? "keep-alive" : "close", "\r\n\r\n",
                      head_ ? absl::string_view() : body));
    EndResponse();
  }
  void ReplyApiError(const openai::ApiError& error) {
    Reply(error.http_status, "application/json", openai::ErrorBody(error));
  }
  void ReplyStatus(absl::StatusCode code, absl::string_view message) {
    ReplyApiError(openai::ErrorFrom(code, message));
  }
  void ReplyError(int status, absl::string_view code, absl::string_view message) {
    openai::ApiError e;
    e.http_status = status;
    e.message = std::string(message);
    e.type = "invalid_request_error";
    e.code = std::string(code);
    ReplyApiError(e);
  }

  // The response is complete once the queued bytes are out.
  void EndResponse() {
    response_complete_ = true;
    PumpWrites();
  }

  void Send(std::string bytes) {
    if (closed_) return;
    out_.push_back(std::move(bytes));
    PumpWrites();
  }

  void PumpWrites() {
    if (closed_ || writing_) return;
    if (out_.empty()) {
      if (response_complete_) ResponseDone();
      return;
    }
    writing_ = true;
    stream_.expires_after(Chrono(door_->options().write_timeout));
    net::async_write(stream_, net::buffer(out_.front()),
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnWritten(ec);
                     });
  }

  void OnWritten(beast::error_code ec) {
    writing_ = false;
    if (closed_) {
      out_.clear();  // the write's buffer was kept for it until now
      return;
    }
    stream_.expires_never();
    if (ec) {
      Close();
      return;
    }
    out_.pop_front();
    if (out_.empty() && gen_ != nullptr && !gen_->failed) {
      std::vector<size_t> waiting;
      waiting.swap(gen_->waiting);
      for (size_t i : waiting) gen_->calls[i]->Next();
    }
    PumpWrites();
  }

  void ResponseDone() {
    response_complete_ = false;
    // Every call of a finished response has ended or is cancelled (a failed one).
    gen_.reset();
    if (!keep_alive_) {
      Linger();
      return;
    }
    if (watching_) {
      resume_after_watch_ = true;
      beast::error_code ignored;
      stream_.socket().cancel(ignored);
      return;
    }
    ReadRequest();
  }

  // The last response is out and the connection ends: stop sending, then read and discard what
  // the client still sends (a body we refused) for a moment, so that closing does not reset the
  // connection before the client has read the response (RFC 9112 9.6).
  void Linger() {
    lingering_ = true;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(std::chrono::seconds(2));
    Drain(16 << 20);
  }
  void Drain(size_t budget) {
    if (closed_ || watching_) {
      if (!closed_) {  // the watch read is still pending: cancel it, then close
        beast::error_code ignored;
        stream_.socket().cancel(ignored);
      }
      return;
    }
    buffer_.consume(buffer_.size());
    stream_.async_read_some(buffer_.prepare(65536),
                            [self = shared_from_this(), budget](beast::error_code ec, size_t n) {
                              if (ec || n >= budget) return self->Close();
                              self->Drain(budget - n);
                            });
  }

  // While a request runs: a read that completes only if the client sends more (kept for the
  // next request) or hangs up (its calls are cancelled).
  void WatchPeer() {
    if (closed_ || watching_) return;
    watching_ = true;
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              self->OnPeerRead(ec, n);
                            });
  }

  void OnPeerRead(beast::error_code ec, size_t n) {
    watching_ = false;
    if (lingering_) {  // Linger cancelled this read to drain instead
      if (ec && ec != net::error::operation_aborted) return Close();
      return Drain(16 << 20);
    }
    if (!ec) buffer_.commit(n);
    if (resume_after_watch_ && (!ec || ec == net::error::operation_aborted)) {
      resume_after_watch_ = false;
      ReadRequest();
      return;
    }
    if (ec) {
      if (ec != net::error::operation_aborted || gen_ != nullptr) Close();
      return;
    }
    // A pipelined request waits in the buffer; keep watching unless it grows past a bound.
    if (gen_ != nullptr && buffer_.size() < 64 * 1024) WatchPeer();
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    if (gen_ != nullptr) {
      for (auto& call : gen_->calls) call->Cancel();
    }
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
    // A write in progress still reads its buffer (the front): it goes when the write completes.
    if (writing_ && !out_.empty()) {
      out_.erase(out_.begin() + 1, out_.end());
    } else {
      out_.clear();
    }
  }

  beast::tcp_stream stream_;
  HttpFrontDoor::Impl* door_;
  std::string peer_host_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string authorization_;
  std::deque<std::string> out_;
  bool writing_ = false;
  bool response_complete_ = false;
  bool keep_alive_ = true;
  bool head_ = false;
  bool lingering_ = false;
  bool closed_ = false;
  bool watching_ = false;
  bool resume_after_watch_ = false;
  uint64_t generation_serial_ = 0;
  std::unique_ptr<Generation> gen_;
};

void GenerateCall::OnReadDone(bool ok) {
  v1::GenerateEvent event;
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    read_pending_ = false;
    if (ok && !cancelled_) {
      event.Swap(&event_);
    } else {
      ok = false;
      if (!hold_released_) release = hold_released_ = true;
    }
  }
  if (ok) session_->PostEvent(index_, generation_, std::move(event));
  if (release) RemoveHold();
}

void GenerateCall::OnDone(const grpc::Status& status) {
  session_->PostDone(index_, generation_, status);
  session_.reset();
  std::atomic<int64_t>* in_flight = in_flight_;
  std::shared_ptr<GenerateCall> self = std::move(self_);
  self.reset();  // the session's reference (if any) keeps this alive
  in_flight->fetch_sub(1);
}

absl::Status HttpFrontDoor::Impl::Listen() {
  SPLITMOE_ASSIGN_OR_RETURN(address_, ListenTcp(acceptor_, options_.listen, "--http-listen"));
  return absl::OkStatus();
}

void HttpFrontDoor::Impl::Run() {
  work_.emplace(net::make_work_guard(ioc_));
  Accept();
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    threads_.emplace_back([this] { ioc_.run(); });
  }
}

void HttpFrontDoor::Impl::Accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](beast::error_code ec,
                                                        tcp::socket socket) {
    if (ec == net::error::operation_aborted || !acceptor_.is_open()) return;
    if (ec) {
      // Out of descriptors and the like: say so and try again shortly, not in a busy loop.
      SPLITMOE_LOG(WARNING, "http") << "accept failed: " << ec.message();
      accept_retry_.expires_after(std::chrono::milliseconds(100));
      accept_retry_.async_wait([this](beast::error_code wait) {
        if (!wait && acceptor_.is_open()) Accept();
      });
      return;
    }
    {
      if (connections_.load() >= options_.max_connections) {
        // Over the cap: a 503 and close, rather than a silent reset.
        static constexpr char kBusyBody[] =
            "{\"error\":{\"message\":\"too many connections\",\"type\":\"server_error\","
            "\"param\":null,\"code\":\"too_many_connections\"}}";
        const std::string busy = absl::StrCat(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            "Connection: close\r\nContent-Length: ",
            sizeof(kBusyBody) - 1, "\r\n\r\n", kBusyBody);
        beast::error_code ignored;
        net::write(socket, net::buffer(busy), ignored);
        socket.close(ignored);
      } else {
        auto session = std::make_shared<Session>(std::move(socket), this);
        {
          std::lock_guard<std::mutex> lock(sessions_mu_);
          if (stopped_) return;
          sessions_.remove_if([](const std::weak_ptr<Session>& s) { return s.expired(); });
          sessions_.push_back(session);
        }
        session->Start();
      }
    }
    Accept();
  });
}

void HttpFrontDoor::Impl::Stop() {
  std::list<std::weak_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(sessions_mu_);
    if (stopped_) return;
    stopped_ = true;
    sessions.swap(sessions_);
  }
  net::post(accept_strand_, [this] {
    beast::error_code ignored;
    acceptor_.close(ignored);
    accept_retry_.cancel();
  });
  // Every session closed (its calls cancelled) first; then the calls end before the threads go
  // (their last callbacks post to the sessions' strands).
  std::atomic<int> closing{0};
  for (auto& weak : sessions) {
    if (auto s = weak.lock()) {
      closing.fetch_add(1);
      s->Shutdown([&closing] { closing.fetch_sub(1); });
    }
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((closing.load() > 0 || calls_in_flight_.load() > 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (closing.load() > 0 || calls_in_flight_.load() > 0) {
    SPLITMOE_LOG(ERROR, "http").With("calls", calls_in_flight_.load())
        << "calls still open 10 s after stopping";
  }
  work_.reset();
  ioc_.stop();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

HttpFrontDoor::HttpFrontDoor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpFrontDoor::~HttpFrontDoor() { Stop(); }

absl::StatusOr<std::unique_ptr<HttpFrontDoor>> HttpFrontDoor::Start(
    const HttpFrontDoorOptions& options, std::shared_ptr<grpc::Channel> channel,
    const tokenizer::Tokenizer* tokenizer, std::shared_ptr<Readiness> readiness) {
  auto impl = std::make_unique<Impl>(options, std::move(channel), tokenizer, std::move(readiness));
  SPLITMOE_RETURN_IF_ERROR(impl->Listen());
  impl->Run();
  return std::unique_ptr<HttpFrontDoor>(new HttpFrontDoor(std::move(impl)));
}

const std::string& HttpFrontDoor::address() const { return impl_->address(); }
void HttpFrontDoor::Stop() {
  if (impl_ != nullptr) impl_->Stop();
}

}  // namespace splitmoe::router
