// ExpertRouter: the router's expert-router actor. For every MoeBatch from an attention worker it
// selects each token's experts with the model's own semantics (PlanDispatch, device-limited when
// asked), sends each expert service only its tokens on that service's stream, and when every
// service has answered adds the partial sums in service order and replies once. A service that
// fails or is missing fails the batch with a clear error; nothing waits forever. The expert
// clients' completions come back as ExpertServiceAnswered messages.
//
//   runtime::Actor<ExpertRouter> router("expert-router", std::make_unique<ExpertRouter>(config,
//   biases)); router.ref().Send(UsePlacement{placement, clients});   // from the registry actor
//   router.ref().Send(RouteMoeBatch{std::move(batch), reply});  // from the MoeDispatch stream
#ifndef SPLITMOE_ROUTER_EXPERT_ROUTER_H_
#define SPLITMOE_ROUTER_EXPERT_ROUTER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "common/model/config.h"
#include "common/runtime/actor.h"
#include "router/expert_client.h"
#include "router/moe_plan.h"
#include "router/registry.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::router {

// Command: route one attention worker's MoE batch; `reply` is the stream's (called once).
struct RouteMoeBatch {
  v1::MoeBatch batch;
  std::function<void(v1::MoeResult)> reply;
};
// Event: one expert service answered (or failed) part `index` of pending batch `pending`.
struct ExpertServiceAnswered {
  uint64_t pending = 0;
  size_t index = 0;
  absl::StatusOr<v1::ExpertResult> result;
};
// Command: the expert services to use from now on (from the registry actor).
struct UsePlacement {
  ServicePlacement placement;
  std::map<std::string, std::shared_ptr<ExpertClient>> clients;  // by worker id
};

class ExpertRouter {
 public:
  using Message = std::variant<RouteMoeBatch, ExpertServiceAnswered, UsePlacement>;
  using Reply = std::function<void(v1::MoeResult)>;

  // `biases[layer]`: the checkpoint's e_score_correction_bias of each MoE layer (main layers,
  // then MTP blocks), empty where the model has none. max_devices > 0: device-limited routing,
  // every token's experts on at most that many expert services.
  ExpertRouter(model::ModelConfig config, std::vector<std::vector<float>> biases,
               int32_t max_devices = 0)
      : config_(std::move(config)), biases_(std::move(biases)), max_devices_(max_devices) {}

  void Handle(RouteMoeBatch m, runtime::Context<Message>& ctx);
  void Handle(ExpertServiceAnswered m);
  void Handle(UsePlacement m);

 private:
  struct Pending {
    v1::MoeBatch batch;
    Reply reply;
    std::vector<ShardBatch> plan;
    std::vector<std::vector<float>> partial;  // per plan entry, once answered
    size_t remaining = 0;
    std::string error;
  };
  model::ModelConfig config_;
  std::vector<std::vector<float>> biases_;
  int32_t max_devices_ = 0;
  ServicePlacement placement_;
  std::map<std::string, std::shared_ptr<ExpertClient>> clients_;  // by worker id
  std::map<uint64_t, Pending> pending_;
  uint64_t next_id_ = 1;
  std::vector<uint64_t> expert_tokens_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_EXPERT_ROUTER_H_
