// End to end, real processes on loopback: a router and two expert services (`splitmoe router`,
// `splitmoe expert`), and an attention worker in this test process that holds no routed expert
// and computes every MoE layer by sending each expert service its tokens directly (the router
// only publishes the routing table). Its greedy and seeded generations must equal the
// single-process engine's; a killed expert service with no other replica must turn into a clear
// error naming its shard, never a hang. Run for each transport (`--moe-transport ucx|grpc` on the
// expert services and the worker alike); under grpc the expert services advertise no UCX
// address, and a worker that asks for UCX falls back to their gRPC streams.
#include <signal.h>

#include <map>

#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/model/checkpoint.h"
#include "common/process/subprocess.h"
#include "common/expert_plane/direct_moe.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/rpc/rpc.h"
#include "gtest/gtest.h"
#include "splitmoe/v1/internal.grpc.pb.h"
#include "tests/testing/test_models.h"

namespace splitmoe {
namespace {

std::string Binary() {
  const char* dir = std::getenv("SPLITMOE_BINARY_DIR");
  return std::string(dir ? dir : ".") + "/bin/splitmoe";
}

class MoeClusterTest : public ::testing::TestWithParam<expert_plane::MoeTransport> {
 protected:
  void SetUp() override {
    model_ = testing::TinyModel("cluster", nullptr);
    auto router = process::Subprocess::Start(
        "router", {Binary(), "router", "--model", model_, "--heartbeat-ms", "200"});
    ASSERT_TRUE(router.ok()) << router.status();
    router_ = std::move(*router);
    auto addr = router_->ReadLineMatching("listening ", absl::Seconds(60));
    ASSERT_TRUE(addr.ok()) << addr.status();
    router_address_ = *addr;
    for (int s = 0; s < 2; ++s) {
      auto expert = process::Subprocess::Start(
          "expert" + std::to_string(s),
          {Binary(), "expert", "--model", model_, "--router", router_address_, "--shard",
           std::to_string(s), "--num-shards", "2", "--moe-transport",
           std::string(expert_plane::MoeTransportName(GetParam()))});
      ASSERT_TRUE(expert.ok()) << expert.status();
      auto line = (*expert)->ReadLineMatching("listening ", absl::Seconds(60));
      ASSERT_TRUE(line.ok()) << line.status();
      experts_.push_back(std::move(*expert));
    }
    stub_ = v1::Registry::NewStub(
        grpc::CreateChannel(router_address_, grpc::InsecureChannelCredentials()));
    ASSERT_TRUE(WaitForHealthyExperts(2));
  }

  void TearDown() override {
    for (auto& e : experts_) e->Terminate(absl::Seconds(5));
    if (router_) {
      EXPECT_EQ(router_->Terminate(absl::Seconds(5)), "exited with code 0");
    }
  }

  v1::ClusterStatusResponse Status() {
    grpc::ClientContext ctx;
    v1::ClusterStatusResponse status;
    EXPECT_TRUE(stub_->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &status).ok());
    return status;
  }

  bool WaitForHealthyExperts(int want) {
    for (int i = 0; i < 100; ++i) {
      int healthy = 0;
      const v1::ClusterStatusResponse status = Status();
      for (const auto& w : status.workers())
        healthy += w.role() == v1::WORKER_ROLE_EXPERT && w.healthy();
      if (healthy == want) return true;
      absl::SleepFor(absl::Milliseconds(100));
    }
    return false;
  }

  std::string model_;
  std::unique_ptr<process::Subprocess> router_;
  std::vector<std::unique_ptr<process::Subprocess>> experts_;
  std::string router_address_;
  std::unique_ptr<v1::Registry::Stub> stub_;
};

// The attention side of the model only: no routed expert in this process.
struct AttentionWorker {
  model::ModelConfig config;
  model::ModelWeights weights;
  std::unique_ptr<expert_plane::RoutingTableWatcher> watcher;
  std::unique_ptr<expert_plane::DirectMoeExecutor> moe;
  std::unique_ptr<engine::Transformer> transformer;
};

std::unique_ptr<AttentionWorker> MakeWorker(const std::string& dir, const std::string& router,
                                            v1::WireDtype dtype,
                                            expert_plane::MoeTransport transport,
                                            absl::Duration deadline = absl::Milliseconds(500)) {
  auto w = std::make_unique<AttentionWorker>();
  auto ckpt = model::Checkpoint::Open(dir);
  EXPECT_TRUE(ckpt.ok());
  w->config = (*ckpt)->config();
  model::LoadOptions options;
  options.routed_experts = false;
  auto weights = model::LoadWeights(**ckpt, options);
  EXPECT_TRUE(weights.ok()) << weights.status();
  w->weights = std::move(*weights);
  EXPECT_TRUE(engine::PackForInference(&w->weights).ok());
  w->watcher = expert_plane::RoutingTableWatcher::Start(router, "test");
  EXPECT_TRUE(w->watcher->WaitForTable(absl::Seconds(10)));
  expert_plane::DirectMoeOptions moe_options;
  moe_options.dtype = dtype;
  moe_options.give_up_after = absl::Seconds(10);
  moe_options.transport = transport;
  moe_options.deadline = deadline;
  auto moe = expert_plane::DirectMoeExecutor::Create(w->config, w->weights, w->watcher.get(),
                                                     moe_options);
  EXPECT_TRUE(moe.ok()) << moe.status();
  w->moe = std::move(*moe);
  w->transformer = std::make_unique<engine::Transformer>(w->config, w->weights, w->moe.get());
  return w;
}

TEST_P(MoeClusterTest, GenerationThroughTheRouterEqualsTheEngine) {
  auto engine = engine::Engine::Load(model_);
  ASSERT_TRUE(engine.ok());
  auto worker = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32, GetParam());
  for (const auto& w : worker->weights.layers) {
    for (const auto& e : w.experts)
      ASSERT_EQ(e, nullptr) << "attention worker holds a routed expert";
  }
  struct Case {
    std::vector<int32_t> prompt;
    engine::SamplingParams sampling;
  };
  std::vector<Case> cases = {
      {{0, 5, 9, 11}, {}},
      {{0, 100, 200, 300, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 70}, {}},
      {{0, 42}, {.temperature = 0.9, .top_p = 0.95, .top_k = 0, .seed = 5}}};
  const auto& c = worker->config;
  engine::BatchDecoder decoder(worker->transformer.get(), c.eos_token_id);
  std::map<std::string, std::vector<engine::DecodedToken>> got;
  for (size_t i = 0; i < cases.size(); ++i) {
    engine::DecodeSequence s;
    s.id = "s" + std::to_string(i);
    s.cache = std::make_unique<engine::LatentCache>(c.num_hidden_layers, c.latent_dim());
    auto first = engine::PrefillFirstToken(*worker->transformer, cases[i].prompt, s.cache.get(),
                                           cases[i].sampling, 1, engine::AttentionForm::kAbsorbed);
    ASSERT_TRUE(first.ok()) << first.status();
    got[s.id].push_back(*first);
    s.prompt_tokens = static_cast<int64_t>(cases[i].prompt.size());
    s.next_token = first->token;
    s.sampling = cases[i].sampling;
    s.max_tokens = 8;
    s.ignore_eos = true;
    s.logprobs = 1;
    ASSERT_TRUE(decoder.Add(std::move(s)).ok());
  }
  const absl::Time start = absl::Now();
  int steps = 0;
  while (decoder.running() > 0) {
    auto step = decoder.Step();
    ASSERT_TRUE(step.ok()) << step.status();
    ++steps;
    for (auto& t : *step) got[t.id].push_back(t);
  }
  // A figure, not a check: the cost of the expert round trips per decode step (all MoE layers).
  std::printf(
      "decode with direct expert dispatch (%s): %.2f ms per step of %zu sequences (%d steps)\n",
      std::string(expert_plane::MoeTransportName(GetParam())).c_str(),
      absl::ToDoubleMilliseconds(absl::Now() - start) / steps, cases.size(), steps);
  for (size_t i = 0; i < cases.size(); ++i) {
    engine::GenerateRequest r;
    r.prompt = cases[i].prompt;
    r.sampling = cases[i].sampling;
    r.max_tokens = 8;
    r.ignore_eos = true;
    r.logprobs = 1;
    auto want = (*engine)->Generate(r, nullptr);
    ASSERT_TRUE(want.ok());
    const auto& mine = got["s" + std::to_string(i)];
    ASSERT_EQ(mine.size(), want->tokens.size());
    for (size_t j = 0; j < mine.size(); ++j) {
      EXPECT_EQ(mine[j].token, want->tokens[j]) << "case " << i << " token " << j;
      EXPECT_NEAR(mine[j].logprob->logprob, want->logprobs[j].logprob, 1e-4);
    }
  }
  // Resident weights: the two expert services together hold exactly the routed experts.
  uint64_t expert_bytes = 0;
  const v1::ClusterStatusResponse status = Status();
  for (const auto& w : status.workers()) {
    expert_bytes += w.resident_weight_bytes();
    EXPECT_EQ(w.device(), "cpu") << w.worker_id();  // registered by the expert service itself
  }
  // BF16, held in the checkpoint's dtype: 2 bytes a value.
  const uint64_t one = 3ull * c.moe_intermediate_size * c.hidden_size * 2;
  const uint64_t moe_blocks =
      (c.num_hidden_layers - c.first_k_dense_replace) + c.num_nextn_predict_layers;
  EXPECT_EQ(expert_bytes, moe_blocks * c.n_routed_experts * one);
  EXPECT_GT(worker->moe->bytes_sent(), 0u);
  // Every part went over the transport asked for, and nothing failed over.
  const v1::MoeStats stats = worker->moe->Stats();
  const bool ucx = GetParam() == expert_plane::MoeTransport::kUcx;
  EXPECT_GT(ucx ? stats.parts_ucx() : stats.parts_grpc(), 0u);
  EXPECT_EQ(ucx ? stats.parts_grpc() : stats.parts_ucx(), 0u);
  EXPECT_EQ(stats.failovers(), 0u);
}

// A worker that asks for UCX reaches replicas that serve gRPC only over gRPC (and replicas that
// serve both over UCX), with the same outputs.
TEST_P(MoeClusterTest, UcxWorkerUsesWhatEachReplicaServes) {
  auto ucx = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32,
                        expert_plane::MoeTransport::kUcx);
  auto grpc = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32,
                         expert_plane::MoeTransport::kGrpc);
  const auto& c = ucx->config;
  std::vector<int32_t> prompt = {0, 3, 1, 4, 1, 5, 9, 2, 6};
  std::vector<float> a, b;
  engine::LatentCache ca(c.num_hidden_layers, c.latent_dim()),
      cb(c.num_hidden_layers, c.latent_dim());
  std::vector<engine::SequenceChunk> ba = {{prompt, &ca}}, bb = {{prompt, &cb}};
  ASSERT_TRUE(ucx->transformer->Forward(ba, engine::AttentionForm::kAbsorbed, &a).ok());
  ASSERT_TRUE(grpc->transformer->Forward(bb, engine::AttentionForm::kAbsorbed, &b).ok());
  ASSERT_EQ(a, b);  // the same partial sums, bit for bit, whatever carried them
  const v1::MoeStats stats = ucx->moe->Stats();
  if (GetParam() == expert_plane::MoeTransport::kUcx) {
    EXPECT_GT(stats.parts_ucx(), 0u);
    EXPECT_EQ(stats.parts_grpc(), 0u);
  } else {
    EXPECT_EQ(stats.parts_ucx(), 0u);
    EXPECT_GT(stats.parts_grpc(), 0u);
  }
  EXPECT_EQ(grpc->moe->Stats().parts_ucx(), 0u);
}

TEST_P(MoeClusterTest, StatusCommandShowsTheCluster) {
  FILE* pipe = ::popen((Binary() + " status --endpoint " + router_address_ + " 2>&1").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  EXPECT_EQ(::pclose(pipe), 0) << out;
  EXPECT_NE(out.find("workers: 2"), std::string::npos) << out;
  EXPECT_NE(out.find("shard 0 (8 experts)"), std::string::npos) << out;
  EXPECT_NE(out.find("shard 1 (8 experts)"), std::string::npos) << out;
  EXPECT_EQ(out.find("OUT OF SERVICE"), std::string::npos) << out;
}

TEST_P(MoeClusterTest, Bf16WireStaysCloseToFp32) {
  auto fp32 = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32, GetParam());
  auto bf16 = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_BF16, GetParam());
  const auto& c = fp32->config;
  std::vector<int32_t> prompt = {0, 17, 33, 49, 65, 81};
  std::vector<float> a, b;
  engine::LatentCache ca(c.num_hidden_layers, c.latent_dim()),
      cb(c.num_hidden_layers, c.latent_dim());
  std::vector<engine::SequenceChunk> ba = {{prompt, &ca}}, bb = {{prompt, &cb}};
  ASSERT_TRUE(fp32->transformer->Forward(ba, engine::AttentionForm::kAbsorbed, &a).ok());
  ASSERT_TRUE(bf16->transformer->Forward(bb, engine::AttentionForm::kAbsorbed, &b).ok());
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i)
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
  std::printf("bf16 wire: max |hidden difference| %.3g over %zu values\n", max_diff, a.size());
  EXPECT_GT(max_diff, 0.0);  // bf16 really is on the wire
  EXPECT_LT(max_diff, 0.1);
  EXPECT_LT(bf16->moe->bytes_sent(), fp32->moe->bytes_sent());
}

TEST_P(MoeClusterTest, AKilledExpertServiceIsAClearErrorNotAHang) {
  auto worker = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32, GetParam());
  const auto& c = worker->config;
  experts_[1]->Signal(SIGKILL);
  (void)experts_[1]->Terminate(absl::Seconds(2));
  std::vector<int32_t> prompt = {0, 1, 2, 3, 4, 5, 6, 7};
  const absl::Time start = absl::Now();
  absl::Status status;
  // The first calls may still reach a half-dead stream; every call must end, with an error.
  for (int i = 0; i < 3; ++i) {
    engine::LatentCache cache(c.num_hidden_layers, c.latent_dim());
    std::vector<engine::SequenceChunk> batch = {{prompt, &cache}};
    std::vector<float> hidden;
    status = worker->transformer->Forward(batch, engine::AttentionForm::kAbsorbed, &hidden);
    if (!status.ok()) break;
  }
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("expert shard 1"), std::string::npos) << status;
  EXPECT_LT(absl::Now() - start, absl::Seconds(15));
  // The router takes the silent service out of service.
  bool out = false;
  for (int i = 0; i < 50 && !out; ++i) {
    const v1::ClusterStatusResponse status = Status();
    for (const auto& w : status.workers())
      out |= w.role() == v1::WORKER_ROLE_EXPERT && !w.healthy();
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_TRUE(out);
}

// A replica killed while the worker is connected to it is noticed by its broken connection, at
// once, not by the per-batch deadline (30 s here): over UCX through the gRPC stream kept open
// beside the UCX endpoint, since UCX over shared memory notices no dead peer of its own.
TEST_P(MoeClusterTest, AReplicaKilledWhileConnectedIsNoticedByItsConnection) {
  auto worker = MakeWorker(model_, router_address_, v1::WIRE_DTYPE_FP32, GetParam(),
                           absl::Seconds(30));
  const auto& c = worker->config;
  std::vector<int32_t> prompt = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  auto forward = [&] {
    engine::LatentCache cache(c.num_hidden_layers, c.latent_dim());
    std::vector<engine::SequenceChunk> batch = {{prompt, &cache}};
    std::vector<float> hidden;
    return worker->transformer->Forward(batch, engine::AttentionForm::kAbsorbed, &hidden);
  };
  ASSERT_TRUE(forward().ok());  // both replicas connected
  experts_[1]->Signal(SIGKILL);
  (void)experts_[1]->Terminate(absl::Seconds(2));
  const absl::Time start = absl::Now();
  absl::Status status = forward();
  const absl::Duration took = absl::Now() - start;
  std::printf("a killed replica noticed after %.0f ms (%s)\n", absl::ToDoubleMilliseconds(took),
              std::string(expert_plane::MoeTransportName(GetParam())).c_str());
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("expert shard 1"), std::string::npos) << status;
  EXPECT_LT(took, absl::Seconds(5));
}

INSTANTIATE_TEST_SUITE_P(Transports, MoeClusterTest,
                         ::testing::Values(expert_plane::MoeTransport::kUcx,
                                           expert_plane::MoeTransport::kGrpc),
                         [](const auto& info) {
                           return std::string(expert_plane::MoeTransportName(info.param));
                         });

}  // namespace
}  // namespace splitmoe
