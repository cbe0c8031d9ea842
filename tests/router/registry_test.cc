// The router's control plane: the routing table the registry derives from its members (pools of
// replicas per shard, versions, a shard that lost every replica), the MoE statistics it adds up
// from heartbeats, the online bias, and the registry actor's publication of table versions to
// watchers (on the manual scheduler).
#include "router/registry.h"

#include <numeric>

#include "common/runtime/actor.h"
#include "common/runtime/manual_scheduler.h"
#include "gtest/gtest.h"
#include "router/registry_actor.h"

namespace splitmoe::router {
namespace {

model::ModelConfig Config(model::TopkMethod method = model::TopkMethod::kNoauxTc) {
  model::ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.topk_method = method;
  c.scoring_func = model::ScoringFunc::kSigmoid;
  return c;
}

v1::RegisterRequest Expert(int32_t shard, std::vector<int32_t> experts, const std::string& addr) {
  v1::RegisterRequest r;
  r.set_role(v1::WORKER_ROLE_EXPERT);
  r.set_address(addr);
  r.set_shard(shard);
  *r.mutable_experts() = {experts.begin(), experts.end()};
  return r;
}

const absl::Time kT0 = absl::FromUnixSeconds(1000);

WorkerRegistry Make(RoutingOptions routing = {}, model::ModelConfig c = Config()) {
  absl::StatusOr<WorkerRegistry> r =
      WorkerRegistry::Create(c, absl::Milliseconds(100), 3, "", std::move(routing));
  EXPECT_TRUE(r.ok()) << r.status();
  return std::move(*r);
}

TEST(RegistryTest, ReplicasOfAShardFormOnePoolAndEveryChangeIsANewVersion) {
  WorkerRegistry r = Make({.max_devices = 2, .router_id = "r1"});
  ASSERT_TRUE(r.Register(Expert(0, {0, 1, 2, 3}, "a:1"), kT0).ok());
  EXPECT_TRUE(r.RefreshTable());
  EXPECT_FALSE(r.RefreshTable());  // nothing changed: same version
  EXPECT_EQ(r.table().version(), 1u);
  EXPECT_FALSE(r.TableComplete());  // experts 4..7 have no shard yet
  ASSERT_TRUE(r.Register(Expert(1, {7, 6, 5, 4}, "b:1"), kT0).ok());
  ASSERT_TRUE(r.Register(Expert(0, {3, 2, 1, 0}, "c:1"), kT0).ok());
  EXPECT_TRUE(r.RefreshTable());
  const v1::RoutingTable& t = r.table();
  EXPECT_EQ(t.version(), 2u);
  EXPECT_EQ(t.router_id(), "r1");
  EXPECT_EQ(t.max_devices(), 2);
  EXPECT_EQ(std::vector<int32_t>(t.expert_to_shard().begin(), t.expert_to_shard().end()),
            (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  ASSERT_EQ(t.pools_size(), 2);
  EXPECT_EQ(t.pools(0).replicas_size(), 2);
  EXPECT_EQ(t.pools(0).replicas(0).address(), "a:1");
  EXPECT_EQ(t.pools(0).replicas(1).address(), "c:1");
  EXPECT_EQ(t.pools(1).replicas_size(), 1);
  EXPECT_TRUE(r.TableComplete());
  EXPECT_TRUE(t.online_bias().empty());  // the bias is off
}

TEST(RegistryTest, WorkerIdsDifferAcrossRouterIncarnations) {
  WorkerRegistry first = Make({.router_id = "100-1"});
  WorkerRegistry second = Make({.router_id = "200-2"});
  absl::StatusOr<v1::RegisterResponse> a = first.Register(Expert(0, {0, 1}, "a:1"), kT0);
  absl::StatusOr<v1::RegisterResponse> b = second.Register(Expert(0, {0, 1}, "b:1"), kT0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->worker_id(), b->worker_id());
  // A worker of the first router heartbeating to the second is told to register again.
  v1::HeartbeatRequest beat;
  beat.set_worker_id(a->worker_id());
  EXPECT_FALSE(second.Heartbeat(beat, kT0).known());
}

TEST(RegistryTest, AReplicaWithOtherExpertsIsRefused) {
  WorkerRegistry r = Make();
  ASSERT_TRUE(r.Register(Expert(0, {0, 1, 2, 3}, "a:1"), kT0).ok());
  absl::StatusOr<v1::RegisterResponse> other = r.Register(Expert(0, {0, 1, 2}, "b:1"), kT0);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other.status().message().find("shard 0"), std::string::npos) << other.status();
  absl::StatusOr<v1::RegisterResponse> overlap = r.Register(Expert(1, {3, 4}, "c:1"), kT0);
  EXPECT_EQ(overlap.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(overlap.status().message().find("expert 3"), std::string::npos) << overlap.status();
}

TEST(RegistryTest, AShardWhoseReplicasAllDiedStaysMappedWithAnEmptyPool) {
  WorkerRegistry r = Make();
  absl::StatusOr<v1::RegisterResponse> a = r.Register(Expert(0, {0, 1, 2, 3}, "a:1"), kT0);
  absl::StatusOr<v1::RegisterResponse> b = r.Register(Expert(1, {4, 5, 6, 7}, "b:1"), kT0);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(r.RefreshTable());
  // b heartbeats, a goes silent past 3 intervals.
  v1::HeartbeatRequest beat;
  beat.set_worker_id(b->worker_id());
  EXPECT_TRUE(r.Heartbeat(beat, kT0 + absl::Milliseconds(250)).known());
  EXPECT_EQ(r.Sweep(kT0 + absl::Milliseconds(350)), std::vector<std::string>{a->worker_id()});
  ASSERT_TRUE(r.RefreshTable());
  EXPECT_EQ(r.table().expert_to_shard(0), 0);  // still shard 0's: requests for it fail by name
  EXPECT_EQ(r.table().pools(0).replicas_size(), 0);
  EXPECT_FALSE(r.TableComplete());
  v1::ClusterStatusResponse status = r.Status(kT0 + absl::Milliseconds(350));
  ASSERT_EQ(status.pools_size(), 2);
  ASSERT_EQ(status.pools(0).replicas_size(), 1);
  EXPECT_FALSE(status.pools(0).replicas(0).healthy());
}

// A worker whose connection broke is out of service at once and, its load cleared, unlisted
// once silent for kForgetAfter; a heartbeat from it then asks it to register again.
TEST(RegistryTest, ALostConnectionTakesAWorkerOutAtOnceAndItIsForgotten) {
  WorkerRegistry r = Make();
  v1::RegisterRequest request;
  request.set_role(v1::WORKER_ROLE_DECODE);
  request.set_address("d:1");
  auto d = r.Register(request, kT0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(r.Healthy(v1::WORKER_ROLE_DECODE).size(), 1u);
  EXPECT_TRUE(r.ConnectionLost(d->worker_id()));
  EXPECT_FALSE(r.ConnectionLost(d->worker_id()));  // once
  EXPECT_FALSE(r.ConnectionLost("nobody"));
  EXPECT_TRUE(r.Healthy(v1::WORKER_ROLE_DECODE).empty());
  EXPECT_EQ(r.Status(kT0).workers_size(), 1);  // listed, out of service, for a while
  EXPECT_TRUE(r.Sweep(kT0 + absl::Milliseconds(300)).empty());
  EXPECT_EQ(r.Status(kT0).workers_size(), 1);
  (void)r.Sweep(kT0 + absl::Milliseconds(300) + WorkerRegistry::kForgetAfter + absl::Milliseconds(1));
  EXPECT_EQ(r.Status(kT0).workers_size(), 0);
  v1::HeartbeatRequest beat;
  beat.set_worker_id(d->worker_id());
  EXPECT_FALSE(r.Heartbeat(beat, kT0 + absl::Seconds(20)).known());
}

v1::HeartbeatRequest Stats(const std::string& id, const std::vector<uint64_t>& layer1,
                           const std::vector<uint64_t>& devices) {
  v1::HeartbeatRequest beat;
  beat.set_worker_id(id);
  v1::MoeStats* s = beat.mutable_load()->mutable_moe();
  v1::MoeLayerTokens* l = s->add_layers();
  l->set_layer(1);
  *l->mutable_expert_tokens() = {layer1.begin(), layer1.end()};
  *s->mutable_devices_touched() = {devices.begin(), devices.end()};
  return beat;
}

TEST(RegistryTest, MoeStatisticsAddUpDifferencesOfCumulativeReports) {
  WorkerRegistry r = Make();
  v1::RegisterRequest decode;
  decode.set_role(v1::WORKER_ROLE_DECODE);
  decode.set_address("d:1");
  absl::StatusOr<v1::RegisterResponse> d = r.Register(decode, kT0);
  ASSERT_TRUE(d.ok());
  r.Heartbeat(Stats(d->worker_id(), {4, 0, 0, 0, 0, 0, 0, 0}, {0, 2, 1}), kT0);
  r.Heartbeat(Stats(d->worker_id(), {6, 2, 0, 0, 0, 0, 0, 0}, {0, 3, 2}), kT0);  // cumulative
  v1::ClusterStatusResponse s = r.Status(kT0);
  ASSERT_EQ(s.routing().expert_tokens_size(), 2);  // layers 1 and 2 (layer 0 is dense)
  EXPECT_EQ(s.routing().expert_tokens(0).layer(), 1);
  EXPECT_EQ(s.routing().expert_tokens(0).expert_tokens(0), 6u);
  EXPECT_EQ(s.routing().expert_tokens(0).expert_tokens(1), 2u);
  EXPECT_EQ(s.routing().devices_per_token(1), 3u);
  EXPECT_EQ(s.routing().devices_per_token(2), 2u);
  EXPECT_EQ(s.routing().max_devices_observed(), 2);
  // Layer 1: max 6 over a mean of 1 -> MaxVio 5 (layer 2 saw nothing and does not count).
  EXPECT_DOUBLE_EQ(s.routing().max_vio(), 5.0);
  // The stats never show up in the stored worker load.
  for (const auto& w : s.workers()) EXPECT_FALSE(w.load().has_moe());
  // A new process at the same address (fewer batches): all it reports is new, even the counters
  // that already passed the old process's values.
  v1::HeartbeatRequest first = Stats(d->worker_id(), {6, 2, 0, 0, 0, 0, 0, 0}, {0, 3, 2});
  first.mutable_load()->mutable_moe()->set_batches(10);
  r.Heartbeat(first, kT0);
  v1::HeartbeatRequest restarted = Stats(d->worker_id(), {9, 0, 0, 0, 0, 0, 0, 0}, {0, 1, 0});
  restarted.mutable_load()->mutable_moe()->set_batches(1);
  r.Heartbeat(restarted, kT0);
  s = r.Status(kT0);
  EXPECT_EQ(s.routing().expert_tokens(0).expert_tokens(0), 15u);  // 6 + 9
  EXPECT_EQ(s.routing().devices_per_token(1), 4u);                 // 3 + 1
}

TEST(RegistryTest, OnlineBiasMovesTowardTheIdleExpertsReCentredAndBounded) {
  WorkerRegistry r = Make({.bias_update_rate = 0.1f, .bias_bound = 0.25f});
  v1::RegisterRequest decode;
  decode.set_role(v1::WORKER_ROLE_DECODE);
  decode.set_address("d:1");
  absl::StatusOr<v1::RegisterResponse> d = r.Register(decode, kT0);
  ASSERT_TRUE(d.ok());
  ASSERT_TRUE(r.RefreshTable());
  const uint64_t v0 = r.table().version();
  std::vector<uint64_t> load = {10, 10, 10, 10, 10, 10, 10, 10};
  for (int window = 1; window <= 5; ++window) {
    load[0] += 30;  // expert 0 is hot in every window
    load[7] += 0;   // expert 7 is cold
    for (int e = 1; e < 7; ++e) load[e] += 5;
    r.Heartbeat(Stats(d->worker_id(), load, {}), kT0);
    r.CloseBalancingWindow();
  }
  ASSERT_TRUE(r.RefreshTable());
  EXPECT_GT(r.table().version(), v0);
  ASSERT_EQ(r.table().online_bias_size(), 2);
  const auto& b = r.table().online_bias(0).bias();
  EXPECT_EQ(r.table().online_bias(0).layer(), 1);
  EXPECT_LT(b[0], 0.0f);
  EXPECT_GT(b[7], 0.0f);
  EXPECT_GE(b[0], -0.25f);  // bounded
  EXPECT_LE(b[7], 0.25f);
  // Layer 2 saw no traffic: its bias stays zero.
  for (float v : r.table().online_bias(1).bias()) EXPECT_EQ(v, 0.0f);
  const v1::ClusterStatusResponse s = r.Status(kT0);
  EXPECT_EQ(s.routing().bias_updates(), 5u);
  EXPECT_GT(s.routing().max_vio_window(), 0.0);
  r.ResetBias();
  ASSERT_TRUE(r.RefreshTable());
  for (float v : r.table().online_bias(0).bias()) EXPECT_EQ(v, 0.0f);
}

TEST(RegistryTest, OnlineBiasNeedsAModelThatSelectsWithABias) {
  absl::StatusOr<WorkerRegistry> r = WorkerRegistry::Create(
      Config(model::TopkMethod::kGreedy), absl::Milliseconds(100), 3, "",
      {.bias_update_rate = 0.01f});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("--bias-update-rate"), std::string::npos) << r.status();
}

// ---- the registry actor on the manual scheduler ----

struct Watcher {
  std::vector<v1::RoutingTable> seen;
  bool open = true;
  std::function<bool(const v1::RoutingTable&)> Write() {
    return [this](const v1::RoutingTable& t) {
      if (!open) return false;
      seen.push_back(t);
      return true;
    };
  }
};

// EPLB through the registry: a dry run changes nothing; a real one is announced as
// next_placement, the table switches only once every live replica holds it (pools then list only
// replicas that hold it), and with a device limit below the shard count every home stays.
TEST(RegistryTest, RebalanceSwitchesOnlyOnceEveryReplicaHoldsThePlacement) {
  for (int32_t m : {0, 1}) {
    SCOPED_TRACE(::testing::Message() << "max devices " << m);
    WorkerRegistry r = Make({.max_devices = m, .router_id = "r1"});
    auto a = r.Register(Expert(0, {0, 1, 2, 3}, "a:1"), kT0);
    auto b = r.Register(Expert(1, {4, 5, 6, 7}, "b:1"), kT0);
    auto c = r.Register(Expert(1, {4, 5, 6, 7}, "c:1"), kT0);
    v1::RegisterRequest decode;
    decode.set_role(v1::WORKER_ROLE_DECODE);
    decode.set_address("d:1");
    auto d = r.Register(decode, kT0);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok());
    ASSERT_TRUE(r.RefreshTable());
    // Expert 5 carries almost everything in layer 1.
    r.Heartbeat(Stats(d->worker_id(), {1, 1, 1, 1, 1, 90, 1, 1}, {0, 96}), kT0);
    v1::RebalanceRequest dry;
    dry.set_dry_run(true);
    auto plan = r.Rebalance(dry);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->mode(), m == 1 ? "homes kept" : "packed");
    EXPECT_GT(plan->expected_max_vio_before(), plan->expected_max_vio_after());
    EXPECT_FALSE(r.RefreshTable()) << "a dry run changed the table";
    EXPECT_EQ(r.table().next_placement().id(), 0u);

    auto applied = r.Rebalance({});
    ASSERT_TRUE(applied.ok()) << applied.status();
    const uint64_t id = applied->placement().id();
    EXPECT_NE(id, 0u);
    ASSERT_EQ(applied->placement().layers_size(), 2);  // MoE layers 1 and 2
    const v1::LayerPlacement& l1 = applied->placement().layers(0);
    EXPECT_EQ(l1.layer(), 1);
    ASSERT_EQ(l1.experts_size(), 8);
    EXPECT_EQ(l1.experts(5).shards_size(), 2) << "the hot expert got the redundant copy";
    if (m == 1) {
      for (int e = 0; e < 8; ++e) EXPECT_EQ(l1.experts(e).shards(0), e / 4) << "home moved";
    }
    ASSERT_TRUE(r.RefreshTable());
    EXPECT_EQ(r.table().next_placement().id(), id);
    EXPECT_EQ(r.table().placement().id(), 0u);
    auto ready = [&](const absl::StatusOr<v1::RegisterResponse>& w, std::vector<uint64_t> ids) {
      v1::HeartbeatRequest beat;
      beat.set_worker_id(w->worker_id());
      *beat.mutable_load()->mutable_placements_ready() = {ids.begin(), ids.end()};
      r.Heartbeat(beat, kT0);
    };
    ready(a, {0, id});
    ready(b, {0, id});
    EXPECT_TRUE(r.TakePlacementProgress());
    r.RefreshTable();
    EXPECT_EQ(r.table().placement().id(), 0u) << "switched while c still loads";
    ready(c, {0, id});
    EXPECT_TRUE(r.TakePlacementProgress());
    ASSERT_TRUE(r.RefreshTable());
    EXPECT_EQ(r.table().placement().id(), id);
    EXPECT_EQ(r.table().next_placement().id(), 0u);
    EXPECT_EQ(r.Status(kT0).routing().placement_id(), id);
    // A replica that joins now serves only once it holds the placement in force.
    auto late = r.Register(Expert(1, {4, 5, 6, 7}, "e:1"), kT0);
    ASSERT_TRUE(late.ok());
    r.RefreshTable();
    EXPECT_EQ(r.table().pools(1).replicas_size(), 2);
    ready(late, {0, id});
    r.RefreshTable();
    EXPECT_EQ(r.table().pools(1).replicas_size(), 3);
  }
}

TEST(RegistryActorTest, WatchersGetTheTableOnceCompleteThenEveryNewVersion) {
  runtime::ManualScheduler scheduler;
  runtime::Actor<RegistryActor> actor(
      "registry",
      std::make_unique<RegistryActor>(Make(), absl::Milliseconds(100), absl::Hours(1),
                                      runtime::ActorRef<GenerationActor::Message>()),
      &scheduler);
  Watcher early, late;
  actor.ref().Send(AddTableWatcher{early.Write()});
  std::vector<std::string> ids;
  auto reg = [&](v1::RegisterRequest request) {
    actor.ref().Send(RegisterWorker{std::move(request),
                                    [&](absl::StatusOr<v1::RegisterResponse> r) {
                                      ASSERT_TRUE(r.ok()) << r.status();
                                      ids.push_back(r->worker_id());
                                    }});
    scheduler.RunUntilIdle();
  };
  scheduler.RunUntilIdle();
  reg(Expert(0, {0, 1, 2, 3}, "a:1"));
  // Not complete (experts 4..7 unplaced) and not settled by time: nothing published, so a
  // worker that outlived a previous router keeps its old table.
  EXPECT_TRUE(early.seen.empty());
  reg(Expert(1, {4, 5, 6, 7}, "b:1"));
  ASSERT_EQ(early.seen.size(), 1u);
  EXPECT_EQ(early.seen[0].pools(1).replicas_size(), 1);
  // A watcher that subscribes now gets the current version at once.
  actor.ref().Send(AddTableWatcher{late.Write()});
  scheduler.RunUntilIdle();
  ASSERT_EQ(late.seen.size(), 1u);
  EXPECT_EQ(late.seen[0].version(), early.seen[0].version());
  // A new replica: a new version to both; a closed stream is dropped.
  late.open = false;
  reg(Expert(1, {4, 5, 6, 7}, "c:1"));
  ASSERT_EQ(early.seen.size(), 2u);
  EXPECT_GT(early.seen[1].version(), early.seen[0].version());
  EXPECT_EQ(early.seen[1].pools(1).replicas_size(), 2);
  // A replica leaves (drain): a version without it.
  actor.ref().Send(DeregisterWorker{ids[1], [](absl::Status s) { EXPECT_TRUE(s.ok()); }});
  scheduler.RunUntilIdle();
  ASSERT_EQ(early.seen.size(), 3u);
  ASSERT_EQ(early.seen[2].pools(1).replicas_size(), 1);
  EXPECT_EQ(early.seen[2].pools(1).replicas(0).address(), "c:1");
  EXPECT_EQ(late.seen.size(), 1u);
}

TEST(RegistryActorTest, AnIncompleteTableIsPublishedOnceTheSettleTimeHasPassed) {
  runtime::ManualScheduler scheduler;
  runtime::Actor<RegistryActor> actor(
      "registry",
      std::make_unique<RegistryActor>(Make(), absl::Milliseconds(100), absl::Milliseconds(1),
                                      runtime::ActorRef<GenerationActor::Message>(), nullptr,
                                      absl::Now() - absl::Seconds(1)),
      &scheduler);
  Watcher w;
  actor.ref().Send(AddTableWatcher{w.Write()});
  actor.ref().Send(RegisterWorker{Expert(0, {0, 1, 2, 3}, "a:1"),
                                  [](absl::StatusOr<v1::RegisterResponse> r) {
                                    EXPECT_TRUE(r.ok());
                                  }});
  scheduler.RunUntilIdle();
  ASSERT_EQ(w.seen.size(), 1u);
  EXPECT_EQ(w.seen[0].expert_to_shard(7), -1);
}

// A rebalance needs every expert on a live shard, and a shard that joins afterwards (the
// placement was made for fewer) sends the table back to the default placement.
TEST(RegistryTest, RebalanceNeedsEveryShardAndANewShardResetsThePlacement) {
  WorkerRegistry r = Make({.router_id = "r1"});
  ASSERT_TRUE(r.Register(Expert(0, {0, 1, 2, 3}, "a:1"), kT0).ok());
  r.RefreshTable();
  EXPECT_EQ(r.Rebalance({}).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(r.Register(Expert(1, {4, 5, 6, 7}, "b:1"), kT0).ok());
  r.RefreshTable();
  v1::RebalanceRequest too_many;
  too_many.set_redundant_experts(1 << 30);
  EXPECT_EQ(r.Rebalance(too_many).status().code(), absl::StatusCode::kInvalidArgument);
  auto applied = r.Rebalance({});
  ASSERT_TRUE(applied.ok()) << applied.status();
  r.RefreshTable();
  EXPECT_NE(r.table().next_placement().id(), 0u);
  // Shard 2 appears (experts 8.. do not exist in this model, so it claims none).
  ASSERT_TRUE(r.Register(Expert(2, {}, "c:1"), kT0).ok());
  r.RefreshTable();
  EXPECT_EQ(r.table().next_placement().id(), 0u);
  EXPECT_EQ(r.table().placement().id(), 0u);
}

// The actor's part of a live rebalance: Rebalance publishes the next placement; the heartbeat
// of the last replica to load it publishes the switched table.
TEST(RegistryActorTest, ARebalanceIsPublishedThenSwitchedByTheLastReadyHeartbeat) {
  runtime::ManualScheduler scheduler;
  runtime::Actor<RegistryActor> actor(
      "registry",
      std::make_unique<RegistryActor>(Make(), absl::Milliseconds(100), absl::Hours(1),
                                      runtime::ActorRef<GenerationActor::Message>()),
      &scheduler);
  Watcher watcher;
  actor.ref().Send(AddTableWatcher{watcher.Write()});
  std::vector<std::string> ids;
  for (auto request : {Expert(0, {0, 1, 2, 3}, "a:1"), Expert(1, {4, 5, 6, 7}, "b:1")}) {
    actor.ref().Send(RegisterWorker{request, [&](absl::StatusOr<v1::RegisterResponse> r) {
                                      ASSERT_TRUE(r.ok()) << r.status();
                                      ids.push_back(r->worker_id());
                                    }});
  }
  scheduler.RunUntilIdle();
  const size_t before = watcher.seen.size();
  uint64_t id = 0;
  actor.ref().Send(RebalanceExperts{{}, [&](absl::StatusOr<v1::RebalanceResponse> r) {
                                      ASSERT_TRUE(r.ok()) << r.status();
                                      id = r->placement().id();
                                    }});
  scheduler.RunUntilIdle();
  ASSERT_NE(id, 0u);
  ASSERT_EQ(watcher.seen.size(), before + 1);
  EXPECT_EQ(watcher.seen.back().next_placement().id(), id);
  auto ready = [&](const std::string& worker) {
    v1::HeartbeatRequest beat;
    beat.set_worker_id(worker);
    beat.mutable_load()->add_placements_ready(0);
    beat.mutable_load()->add_placements_ready(id);
    actor.ref().Send(WorkerHeartbeat{beat, [](absl::StatusOr<v1::HeartbeatResponse>) {}});
    scheduler.RunUntilIdle();
  };
  ready(ids[0]);
  EXPECT_EQ(watcher.seen.size(), before + 1) << "published a switch while b still loads";
  ready(ids[1]);
  ASSERT_EQ(watcher.seen.size(), before + 2);
  EXPECT_EQ(watcher.seen.back().placement().id(), id);
  EXPECT_EQ(watcher.seen.back().next_placement().id(), 0u);
}

// A worker of another model is refused without either fingerprint in the message: they say
// nothing to an operator and tell a caller what the router serves.
TEST(RegistryTest, AWorkerOfAnotherModelIsRefusedWithoutTheFingerprints) {
  const std::string ours = "0123456789abcdef0123456789abcdef";
  const std::string theirs = "fedcba9876543210fedcba9876543210";
  absl::StatusOr<WorkerRegistry> r =
      WorkerRegistry::Create(Config(), absl::Milliseconds(100), 3, ours, RoutingOptions{});
  ASSERT_TRUE(r.ok()) << r.status();
  v1::RegisterRequest request = Expert(0, {0, 1, 2, 3}, "a:1");
  request.set_model_fingerprint(theirs);
  absl::StatusOr<v1::RegisterResponse> refused = r->Register(request, kT0);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string message(refused.status().message());
  EXPECT_NE(message.find("worker at a:1 serves another model"), std::string::npos) << message;
  EXPECT_EQ(message.find(ours), std::string::npos) << message;
  EXPECT_EQ(message.find(theirs), std::string::npos) << message;
  request.set_model_fingerprint(ours);
  EXPECT_TRUE(r->Register(request, kT0).ok());
}

}  // namespace
}  // namespace splitmoe::router
