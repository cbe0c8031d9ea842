// `splitmoe expert`: an expert-service process. Loads only its shard's routed experts, serves
// ExpertCompute on its gRPC port (health, reflection), registers with the router and
// heartbeats; prints "listening HOST:PORT" once serving; runs until SIGINT/SIGTERM, then
// deregisters and stops.
#ifndef SPLITMOE_EXPERT_SERVICE_RUN_EXPERT_H_
#define SPLITMOE_EXPERT_SERVICE_RUN_EXPERT_H_

#include <string>

#include "absl/status/status.h"
#include "expert_service/expert_shard.h"

namespace splitmoe::expert_service {

struct ExpertOptions {
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string router;  // empty: serve without registering (tests)
  std::string metrics_listen;  // Prometheus /metrics on HOST:PORT; empty: not served
  ShardSpec shard;
  // Also serve batches as UCX active messages (`--moe-transport ucx`, the default); gRPC
  // ExpertCompute is always served.
  bool ucx = true;
  // `--busy-poll-us`: the experts actor polls for its next batch, and the UCX progress thread
  // for the next message, this long before sleeping (runtime/spin.h). 0: they sleep at once.
  absl::Duration busy_poll = absl::ZeroDuration();
};

absl::Status RunExpert(const ExpertOptions& options);

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_RUN_EXPERT_H_
