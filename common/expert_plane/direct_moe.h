// DirectMoeExecutor: the routed-expert part of every MoE layer of an attention worker (prefill or
// decode), computed by the expert pools directly — the router is not on the data path.
//
// For each Start() (one MoE layer of one forward pass):
//   1. Selection with the routing table in force (RoutingTableWatcher::Current()): the model's
//      gating through routing::PlanDispatch — group limits, the checkpoint's bias plus the
//      router's online bias for the selection only, the device limit M of the table.
//   2. Each shard's part goes to a live replica of the shard's pool, over UCX active messages
//      (`transport` kUcx, the default: ucx_expert.h) or the replica's gRPC ExpertCompute stream
//      (kGrpc, and for a replica that advertises no UCX address). A part with at least
//      `min_split_assignments` token-expert assignments is split by expert over the pool's
//      replicas (longest-processing-time packing of the experts' token counts), so one batch
//      keeps every replica busy; otherwise the part goes to the replica this worker has sent the
//      least work. All parts are sent before any answer is awaited: one round trip per layer,
//      every replica in parallel.
//   3. Failover: a part whose replica's stream breaks, or that misses its deadline
//      (`deadline` + `deadline_per_row` x rows: well under a second for a decode step), is resent
//      to another live replica of the same pool, and that replica is tried last for
//      `suspect_for`. The first good answer of a part wins; a late one is dropped. Outputs do not
//      depend on which replica answered. With no replica left to try, the call fails
//      UNAVAILABLE naming the shard (only requests that need that shard fail).
//   4. The partial sums are added in (shard, part) order.
// Counters (per-layer per-expert tokens, the devices-touched histogram, failovers) are kept for
// the heartbeat (Stats()), from which the router proves the device bound.
//
// Threading: Start sends a layer's parts and returns; the Pending's Wait waits for that layer's
// answers (inside a micro-batch pass it gives the compute to the other pass meanwhile:
// engine/overlap.h). Several layers may be in flight at once, from different threads; replies
// arrive on the expert clients' reader threads. Stats() and bytes_sent() may be read from any
// thread.
//
//   auto watcher = RoutingTableWatcher::Start(router);
//   SPLITMOE_ASSIGN_OR_RETURN(auto moe, DirectMoeExecutor::Create(config, attention_weights,
//                             watcher.get(), {.dtype = v1::WIRE_DTYPE_BF16}));
//   engine::Transformer model(config, attention_weights, moe.get());
#ifndef SPLITMOE_COMMON_EXPERT_PLANE_DIRECT_MOE_H_
#define SPLITMOE_COMMON_EXPERT_PLANE_DIRECT_MOE_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/engine/transformer.h"
#include "common/expert_plane/expert_client.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/expert_plane/ucx_expert.h"
#include "common/model/config.h"
#include "common/model/weights.h"
#include "common/routing/moe_plan.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::expert_plane {

// What carries MoE batches to the expert replicas (`--moe-transport ucx|grpc`).
enum class MoeTransport { kUcx, kGrpc };
absl::string_view MoeTransportName(MoeTransport transport);

struct DirectMoeOptions {
  v1::WireDtype dtype = v1::WIRE_DTYPE_FP32;
  MoeTransport transport = MoeTransport::kUcx;
  // A replica's part of a batch must answer within deadline + deadline_per_row x its rows, or
  // it is resent to another replica of the pool.
  absl::Duration deadline = absl::Milliseconds(500);
  absl::Duration deadline_per_row = absl::Milliseconds(2);
  // With no other replica to try, a part is waited for this long in all before the call fails.
  absl::Duration give_up_after = absl::Seconds(30);
  // A replica that failed or missed a deadline is tried last for this long.
  absl::Duration suspect_for = absl::Seconds(2);
  absl::Duration connect_timeout = absl::Seconds(1);
  // A shard's part with at least this many token-expert assignments is split over the pool.
  int64_t min_split_assignments = 32;
  // Latency against CPU (`--busy-poll-us`; runtime/spin.h): a layer's caller polls for its
  // answers this long before it sleeps, and the UCX link's progress thread keeps polling this
  // long after its last activity. 0: both sleep at once.
  absl::Duration busy_poll = absl::ZeroDuration();
};

// Splits `part` by expert into at most `groups` shares of near-equal token-expert assignments
// (longest processing time first: experts by descending count, each to the lightest share; ties
// towards the lower expert id and the lower share). Every (row, expert, weight) of `part` lands
// in exactly one share, in the row's selection order; shares with nothing are dropped.
std::vector<routing::ShardBatch> SplitByExpert(const routing::ShardBatch& part, int32_t groups);

class DirectMoeExecutor : public engine::MoeExecutor {
 public:
  // `weights` supplies the checkpoint's selection bias of each MoE layer (gate_bias); it and
  // `watcher` must outlive the executor. Unavailable when the UCX transport was asked for and
  // cannot start.
  static absl::StatusOr<std::unique_ptr<DirectMoeExecutor>> Create(
      const model::ModelConfig& config, const model::ModelWeights& weights,
      const RoutingTableWatcher* watcher, DirectMoeOptions options = {});
  ~DirectMoeExecutor() override;

  // Plans and sends the layer's parts; the returned Pending waits for the answers (failing
  // over as needed) and adds them up. Start and Wait may be called from several threads at once
  // (the two micro-batches of a decode step).
  std::unique_ptr<Pending> Start(int64_t layer, const float* x, const float* scores, int64_t rows,
                                 float* out) override;

  // Cumulative counters since start (failovers and parts per transport included in Stats()).
  v1::MoeStats Stats() const;
  uint64_t bytes_sent() const { return bytes_sent_.load(); }
  const DirectMoeOptions& options() const { return options_; }

 private:
  DirectMoeExecutor(const model::ModelConfig& config, const model::ModelWeights& weights,
                    const RoutingTableWatcher* watcher, DirectMoeOptions options);
  struct Replica {
    std::shared_ptr<ExpertChannel> client;
    absl::Time suspect_until = absl::InfinitePast();
    uint64_t assignments_sent = 0;
  };
  // The table's pools by shard id, the combined selection bias per layer (built once per
  // table version).
  struct View {
    std::shared_ptr<const v1::RoutingTable> table;
    std::vector<int32_t> expert_to_shard;
    std::vector<const v1::ExpertPool*> pools;  // by shard id; null where no pool
    std::vector<std::vector<float>> bias;      // [layers][n_routed] or empty
    // EPLB placement in force (id 0: none): per layer (empty: expert_to_shard) each expert's
    // primary shard and all its copies.
    uint64_t placement_id = 0;
    std::vector<std::vector<int32_t>> primary;               // [layers][n_routed]
    std::vector<std::vector<std::vector<int32_t>>> copies;   // [layers][n_routed] -> shards
  };
  class Call;
  std::shared_ptr<const View> ViewOf(std::shared_ptr<const v1::RoutingTable> table);
  // Selection, parts, and the first send of each; an error means nothing was sent.
  absl::Status Prepare(Call& call, const float* x, const float* scores);
  // Replicas of `pool` in the order to try them: healthy before suspect, least work first.
  std::vector<const v1::ExpertReplica*> Candidates(const v1::ExpertPool& pool, absl::Time now);
  // The channel to `replica` (connected on first use): UCX where asked for and the replica
  // advertises it, else its gRPC stream.
  absl::StatusOr<std::shared_ptr<ExpertChannel>> Client(const v1::ExpertReplica& replica);
  void MarkSuspect(const std::string& address, absl::Time now);
  void Count(int64_t layer, const std::vector<routing::ShardBatch>& plan, int64_t rows);

  model::ModelConfig config_;
  const model::ModelWeights& weights_;
  const RoutingTableWatcher* watcher_;
  DirectMoeOptions options_;
  std::atomic<uint64_t> next_batch_id_{1};
  std::mutex view_mu_;  // guards view_
  std::shared_ptr<const View> view_;

  // Declared before replicas_: the channels it carries close before it does.
  std::unique_ptr<UcxExpertLink> ucx_;
  std::mutex replicas_mu_;  // guards replicas_ (the caller's thread and the destructor)
  std::map<std::string, Replica> replicas_;  // by address

  mutable std::mutex stats_mu_;  // guards stats_
  v1::MoeStats stats_;
  std::atomic<uint64_t> bytes_sent_{0}, failovers_{0}, parts_ucx_{0}, parts_grpc_{0};
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_DIRECT_MOE_H_
