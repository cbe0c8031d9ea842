// The router's request metrics (Prometheus, common/metrics): requests by outcome, time to first
// token, time per output token, end-to-end latency, prompt and output tokens. Updated by the
// Generation service (requests refused before they start) and the generation actor (the rest).
#ifndef SPLITMOE_ROUTER_ROUTER_METRICS_H_
#define SPLITMOE_ROUTER_ROUTER_METRICS_H_

#include <grpcpp/grpcpp.h>

#include "absl/time/time.h"

namespace splitmoe::router {

// A request ended: "ok" (finished), "cancelled" (the client left) or "error" with its status.
void CountRequestOk();
void CountRequestCancelled();
void CountRequestError(grpc::StatusCode code);

void ObserveTimeToFirstToken(absl::Duration d);
void CountOutputToken();
void ObserveTimePerOutputToken(absl::Duration d);
// A request finished: its latency, prompt and output token counts.
void ObserveEndToEnd(absl::Duration d, int32_t prompt_tokens, int32_t output_tokens);

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_ROUTER_METRICS_H_
