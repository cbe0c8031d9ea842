#include "router/router_metrics.h"

#include <string>

#include "absl/strings/ascii.h"
#include "absl/status/status.h"
#include "common/metrics/metrics.h"

namespace splitmoe::router {
namespace {

constexpr char kRequests[] = "splitmoe_requests_total";
constexpr char kRequestsHelp[] = "Generate requests (gRPC and HTTP) by outcome";

prometheus::Counter& Requests(const std::string& outcome, const std::string& code) {
  return metrics::Counter(kRequests, kRequestsHelp, {{"outcome", outcome}, {"code", code}});
}

// Output tokens per request: 1 .. 32K.
const std::vector<double>& TokenBuckets() {
  static const std::vector<double> b = {1, 4, 16, 64, 256, 1024, 4096, 16384, 32768};
  return b;
}

}  // namespace

void CountRequestOk() {
  static prometheus::Counter& c = Requests("ok", "OK");
  c.Increment();
}

void CountRequestCancelled() {
  static prometheus::Counter& c = Requests("cancelled", "CANCELLED");
  c.Increment();
}

void CountRequestError(grpc::StatusCode code) {
  const std::string name = absl::AsciiStrToUpper(
      absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
  Requests("error", name).Increment();
}

void ObserveTimeToFirstToken(absl::Duration d) {
  static prometheus::Histogram& h = metrics::Histogram(
      "splitmoe_time_to_first_token_seconds",
      "From the router receiving a request to its first token leaving it",
      metrics::LatencyBuckets());
  h.Observe(absl::ToDoubleSeconds(d));
}

void CountOutputToken() {
  static prometheus::Counter& c = metrics::Counter(
      "splitmoe_output_tokens_total", "Tokens generated and sent to clients");
  c.Increment();
}

void ObserveTimePerOutputToken(absl::Duration d) {
  static prometheus::Histogram& h = metrics::Histogram(
      "splitmoe_time_per_output_token_seconds", "Between consecutive tokens of a request",
      metrics::LatencyBuckets());
  h.Observe(absl::ToDoubleSeconds(d));
}

void ObserveEndToEnd(absl::Duration d, int32_t prompt_tokens, int32_t output_tokens) {
  static prometheus::Histogram& e2e = metrics::Histogram(
      "splitmoe_e2e_request_latency_seconds", "From the router receiving a request to its end",
      metrics::LatencyBuckets());
  static prometheus::Counter& prompt = metrics::Counter(
      "splitmoe_prompt_tokens_total", "Prompt tokens of finished requests");
  static prometheus::Histogram& per_request = metrics::Histogram(
      "splitmoe_request_output_tokens", "Tokens generated per finished request", TokenBuckets());
  e2e.Observe(absl::ToDoubleSeconds(d));
  prompt.Increment(prompt_tokens);
  per_request.Observe(output_tokens);
}

}  // namespace splitmoe::router
