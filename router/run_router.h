// `splitmoe router`: the router process, the cluster's front door and control plane. Serves the
// public Generation API and ClusterInfo (with health and reflection) on `listen`, and the internal
// Registry service (membership, status, the routing-table watch streams) on `internal_listen`
// with the internal plane's credentials (common/rpc/security.h); prints "listening HOST:PORT"
// (the public address), "internal HOST:PORT" and, with an HTTP front door, "http HOST:PORT"
// once serving, and runs until
// SIGINT/SIGTERM. Without `internal_listen` (an open development cluster only) both are served
// on `listen`. It is not on the MoE data path.
#ifndef SPLITMOE_ROUTER_RUN_ROUTER_H_
#define SPLITMOE_ROUTER_RUN_ROUTER_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace splitmoe::router {

struct RouterOptions {
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string internal_listen;  // empty: the internal services on `listen` (open clusters only)
  std::string api_keys_file;    // the public door's API keys (empty: none asked)
  int public_max_message_bytes = 4 << 20;
  // Concurrent calls one connection may have open on the public port, and Generate streams one
  // client (its API key, else its host) may have open across its connections.
  int max_streams_per_client = 1024;
  absl::Duration heartbeat_interval = absl::Milliseconds(300);
  int missed_heartbeats_allowed = 3;
  // Device-limited routing: each token's experts on at most this many expert shards (0: off;
  // -1: the model's topk_group for grouped models, off for the others).
  int32_t max_devices = -1;
  // Online per-expert bias (auxiliary-loss-free balancing); 0: off.
  float bias_update_rate = 0.0f;
  float bias_bound = 1.0f;
  // The `splitmoe up` that started this router (its Launcher service), shown in status.
  std::string launcher_address;
  // Front door: how long a request may wait for decode cache blocks, and the deadline of a
  // prompt's prefill and latent transfer.
  absl::Duration admission_timeout = absl::Minutes(10);
  absl::Duration prefill_timeout = absl::Seconds(60);
  // The OpenAI-compatible HTTP front door (router/http_front_door.h): HOST:PORT, empty for none;
  // it prints "http HOST:PORT" once serving.
  std::string http_listen;
  int http_threads = 2;
  // Prometheus /metrics on HOST:PORT (empty: not served); prints "metrics URL".
  std::string metrics_listen;
  // The model's name on the HTTP API (`model`); empty: the model directory's name.
  std::string served_model_name;
};

// Blocks until a termination signal; then stops serving and returns.
absl::Status RunRouter(const RouterOptions& options);

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_RUN_ROUTER_H_
