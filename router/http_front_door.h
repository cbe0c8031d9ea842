// The router's OpenAI-compatible HTTP front door (`router --http-listen HOST:PORT`,
// `up --http-port P`):
//   POST /v1/completions, POST /v1/chat/completions (JSON, or `stream: true` as server-sent
//   events ending in `data: [DONE]`), GET /v1/models, GET /health (200 when the cluster can
//   serve, 503 with the reason when not: router/readiness.h).
//
// HTTP/1.1 with keep-alive, served by Boost.Beast on Boost.Asio: asynchronous, so a connection
// costs a socket and a few buffers rather than a thread, and nothing waits on the network
// (cpp-httplib, Debian's other maintained choice, is a thread per connection and cannot see a
// client hang up until it writes to it). Each request becomes calls of the public Generate
// service through an in-process gRPC channel (router/openai_api.h translates), so HTTP and
// gRPC clients share one implementation of validation, tokenisation, chat templates, API keys
// (`Authorization: Bearer KEY`), stream caps and admission. While a request runs, the
// connection keeps a read open: a client that hangs up cancels its calls at once, which frees
// everything they held, as a cancelled gRPC call does. A stream's next event is read from the
// call only when the previous one is written to the socket, so a slow reader holds back its own
// stream (bounded memory) and a reader stalled past `write_timeout` is dropped.
#ifndef SPLITMOE_ROUTER_HTTP_FRONT_DOOR_H_
#define SPLITMOE_ROUTER_HTTP_FRONT_DOOR_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/tokenizer/tokenizer.h"
#include "router/openai_api.h"
#include "router/readiness.h"

namespace splitmoe::router {

struct HttpFrontDoorOptions {
  std::string listen;  // HOST:PORT (port 0: any)
  int threads = 2;
  size_t max_body_bytes = 4 << 20;
  int max_connections = 4096;
  // A connection idle this long between requests (or slow to send one) is closed.
  absl::Duration idle_timeout = absl::Seconds(60);
  // A client that accepts no bytes of its response for this long is dropped.
  absl::Duration write_timeout = absl::Seconds(60);
  openai::Defaults defaults;
  int64_t max_model_len = 0;  // shown by /v1/models
};

class HttpFrontDoor {
 public:
  // Listens and starts serving. `channel` reaches the router's public services (the
  // Generation service); `tokenizer` (may be null) names tokens in logprobs; `readiness`
  // answers /health. All must outlive the front door.
  static absl::StatusOr<std::unique_ptr<HttpFrontDoor>> Start(
      const HttpFrontDoorOptions& options, std::shared_ptr<grpc::Channel> channel,
      const tokenizer::Tokenizer* tokenizer, std::shared_ptr<Readiness> readiness);
  ~HttpFrontDoor();  // Stop()
  HttpFrontDoor(const HttpFrontDoor&) = delete;
  HttpFrontDoor& operator=(const HttpFrontDoor&) = delete;

  // HOST:PORT actually bound.
  const std::string& address() const;
  // Stops accepting, cancels the calls in flight, closes every connection and joins the
  // threads. Idempotent.
  void Stop();

  class Impl;

 private:
  explicit HttpFrontDoor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_HTTP_FRONT_DOOR_H_
