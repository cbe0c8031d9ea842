// ExpertRouter: the state and handlers of the router's expert-router actor. For every MoeBatch
// from an attention worker it selects each token's experts with the model's own semantics
// (PlanDispatch), sends each expert service only its tokens on that service's stream, and
// when every service has answered adds the partial sums in service order and replies once.
// A service that fails or is missing fails the batch with a clear error; nothing waits forever.
// All methods run on the actor's thread (the `post` function given at construction puts the
// expert clients' completions back on it).
//
//   ExpertRouter router(config, biases, post);
//   router.SetPlacement(placement, clients);     // from the registry actor, on changes
//   router.OnBatch(std::move(batch), reply);     // from the MoeDispatch stream handler
#ifndef SPLITMOE_ROUTER_EXPERT_ROUTER_H_
#define SPLITMOE_ROUTER_EXPERT_ROUTER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/model/config.h"
#include "router/expert_client.h"
#include "router/moe_plan.h"
#include "router/registry.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::router {

using PostFn = std::function<bool(std::function<void()>)>;

class ExpertRouter {
 public:
  using Reply = std::function<void(v1::MoeResult)>;

  // `biases[layer]`: the checkpoint's e_score_correction_bias of each MoE layer (main layers,
  // then MTP blocks), empty where the model has none.
  // max_devices > 0: device-limited routing, every token's experts on at most that many
  // expert services.
  ExpertRouter(model::ModelConfig config, std::vector<std::vector<float>> biases, PostFn post,
               int32_t max_devices = 0)
      : config_(std::move(config)),
        biases_(std::move(biases)),
        post_(std::move(post)),
        max_devices_(max_devices) {}

  void SetPlacement(ServicePlacement placement,
                    std::map<std::string, std::shared_ptr<ExpertClient>> clients);
  void OnBatch(v1::MoeBatch batch, Reply reply);

  // Routed tokens per expert since start (for status and load balancing).
  const std::vector<uint64_t>& expert_tokens() const { return expert_tokens_; }

 private:
  struct Pending {
    v1::MoeBatch batch;
    Reply reply;
    std::vector<ShardBatch> plan;
    std::vector<std::vector<float>> partial;  // per plan entry, once answered
    size_t remaining = 0;
    std::string error;
  };
  void OnShardResult(uint64_t pending_id, size_t index, absl::StatusOr<v1::ExpertResult> result);

  model::ModelConfig config_;
  std::vector<std::vector<float>> biases_;
  PostFn post_;
  int32_t max_devices_ = 0;
  ServicePlacement placement_;
  std::map<std::string, std::shared_ptr<ExpertClient>> clients_;  // by worker id
  std::map<uint64_t, Pending> pending_;
  uint64_t next_id_ = 1;
  std::vector<uint64_t> expert_tokens_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_EXPERT_ROUTER_H_
