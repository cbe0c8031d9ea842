// The cluster against the single-process engine, in one run, on the same model and requests:
//   engine, sequential        Engine::Generate one request after another (the baseline)
//   cluster, 1 client         the same requests one at a time through `splitmoe up` (latency)
//   cluster, N clients        all requests at once (continuous batching on the decode worker)
// Reports time to first token (median), generated tokens/s, and the cluster/engine ratios, and
// checks that the cluster's tokens equal the engine's (greedy). Every process shares this
// machine's cores, so on a 2-core box the cluster pays for its processes; the ratios say what
// the split costs here, not what a multi-machine deployment would do.
//
//   build/bench/cluster_bench [--requests 8] [--prompt 128] [--tokens 32] [--experts 2]
//                             [--prefill-batch-tokens N] [--bias-update-rate U] [--skew]
//                             [--rebalance | --repeat]
//                             [--model DIR]   (default: the engine_bench model, written once)
// --skew draws every prompt from 4 token ids (a workload whose tokens keep choosing the same
// experts); --bias-update-rate runs the cluster with the router's online bias. Afterwards the
// router's MaxVio (since start and last window) is printed, and the share of generated tokens
// equal to the engine's (exact routing), position by position, measures what the bias costs.
// --rebalance then applies EPLB live (Registry.Rebalance: redundant copies of the hot experts,
// packed by the loads just observed), runs the N clients again, and prints the MaxVio over the
// expert shards (token-expert assignments each shard's replicas computed) before and after, the
// placement's expected MaxVio, and whether the tokens still equal the engine's; --repeat runs
// the second round without rebalancing (the control for the speed figure).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_model.h"
#include "absl/time/clock.h"
#include "common/engine/engine.h"
#include "common/model/tiny.h"
#include "common/process/subprocess.h"
#include "common/rpc/rpc.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe {
namespace {

struct Args {
  int requests = 8;
  int prompt = 128;
  int tokens = 32;
  int experts = 2;
  int prefill_batch_tokens = 0;  // 0: the prefill worker's default
  std::string model;
  std::string bias_update_rate;  // empty: off
  bool skew = false;
  bool rebalance = false;
  bool repeat = false;  // the second round without rebalancing: the control
};

struct Run {
  std::vector<int32_t> tokens;
  double ttft_ms = 0;
  double total_ms = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

Run ClusterGenerate(v1::Generation::Stub& stub, const std::vector<int32_t>& prompt, int tokens) {
  v1::GenerateRequest r;
  *r.mutable_token_ids()->mutable_ids() = {prompt.begin(), prompt.end()};
  r.mutable_stop()->set_max_tokens(tokens);
  r.mutable_stop()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  const absl::Time start = absl::Now();
  auto reader = stub.Generate(&ctx, r);
  Run run;
  v1::GenerateEvent e;
  while (reader->Read(&e)) {
    if (run.tokens.empty()) run.ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    run.tokens.insert(run.tokens.end(), e.token_ids().begin(), e.token_ids().end());
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) std::fprintf(stderr, "cluster request failed: %s\n", s.error_message().c_str());
  run.total_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  return run;
}

int Main(const Args& a) {
  const std::string model = a.model.empty() ? bench::BenchModelDir() : a.model;
  std::vector<std::vector<int32_t>> prompts;
  auto engine = engine::Engine::Load(model);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  const int64_t vocab = (*engine)->config().vocab_size;
  for (int i = 0; i < a.requests; ++i) {
    std::vector<int32_t> p;
    for (int t = 0; t < a.prompt; ++t) {
      p.push_back(a.skew ? static_cast<int32_t>((((i + t) * 2654435761u) >> 7) % 4 + 100)
                         : static_cast<int32_t>((i * 7919 + t * 104729) % vocab));
    }
    prompts.push_back(p);
  }

  // Engine, sequential. TTFT = time to the first token callback.
  std::vector<Run> base(prompts.size());
  const absl::Time e0 = absl::Now();
  for (size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = a.tokens;
    r.ignore_eos = true;
    const absl::Time s = absl::Now();
    bool first = true;
    auto out = (*engine)->Generate(r, [&](int32_t, absl::string_view) {
      if (first) base[i].ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - s);
      first = false;
    });
    base[i].tokens = out->tokens;
    base[i].total_ms = absl::ToDoubleMilliseconds(absl::Now() - s);
  }
  const double engine_s = absl::ToDoubleSeconds(absl::Now() - e0);
  engine->reset();  // free its memory and cores before the cluster starts

  const std::string bin = bench::SplitmoeBinary();
  std::vector<std::string> argv = {bin, "up", "--model", model, "--experts",
                                   std::to_string(a.experts)};
  if (a.prefill_batch_tokens > 0) {
    argv.push_back("--prefill-batch-tokens");
    argv.push_back(std::to_string(a.prefill_batch_tokens));
  }
  if (!a.bias_update_rate.empty()) {
    argv.push_back("--bias-update-rate");
    argv.push_back(a.bias_update_rate);
  }
  auto up = process::Subprocess::Start("up", argv);
  if (!up.ok()) return 1;
  auto endpoint = (*up)->ReadLineMatching("ready grpc=", absl::Seconds(300));
  if (!endpoint.ok()) {
    std::fprintf(stderr, "%s\n", endpoint.status().ToString().c_str());
    return 1;
  }
  auto stub = v1::Generation::NewStub(grpc::CreateCustomChannel(
      *endpoint, grpc::InsecureChannelCredentials(), rpc::ClientChannelArguments()));
  (void)ClusterGenerate(*stub, prompts[0], 2);  // warm-up: streams and connections open

  std::vector<Run> one(prompts.size());
  const absl::Time c0 = absl::Now();
  for (size_t i = 0; i < prompts.size(); ++i) one[i] = ClusterGenerate(*stub, prompts[i], a.tokens);
  const double one_s = absl::ToDoubleSeconds(absl::Now() - c0);

  std::vector<Run> many(prompts.size());
  std::vector<std::thread> threads;
  const absl::Time m0 = absl::Now();
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] { many[i] = ClusterGenerate(*stub, prompts[i], a.tokens); });
  }
  for (auto& t : threads) t.join();
  const double many_s = absl::ToDoubleSeconds(absl::Now() - m0);
  absl::SleepFor(absl::Milliseconds(800));  // the last heartbeats carry the last counters
  auto registry = v1::Registry::NewStub(grpc::CreateCustomChannel(
      *endpoint, grpc::InsecureChannelCredentials(), rpc::ClientChannelArguments()));
  auto get_status = [&] {
    v1::ClusterStatusResponse out;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    (void)registry->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &out);
    return out;
  };
  v1::ClusterStatusResponse status = get_status();
  std::vector<Run> after(a.rebalance || a.repeat ? prompts.size() : 0);
  v1::RebalanceResponse plan;
  double after_s = 0, switch_ms = 0;
  if (a.rebalance) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::Status st = registry->Rebalance(&ctx, v1::RebalanceRequest(), &plan);
    if (!st.ok()) {
      std::fprintf(stderr, "rebalance: %s\n", st.error_message().c_str());
      return 1;
    }
    const absl::Time r0 = absl::Now();
    while (get_status().routing().placement_id() != plan.placement().id()) {
      if (absl::Now() - r0 > absl::Seconds(120)) {
        std::fprintf(stderr, "the placement was not in force after 120 s\n");
        return 1;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    switch_ms = absl::ToDoubleMilliseconds(absl::Now() - r0);
  }
  if (a.rebalance || a.repeat) {
    std::vector<std::thread> again;
    const absl::Time a0 = absl::Now();
    for (size_t i = 0; i < prompts.size(); ++i) {
      again.emplace_back([&, i] { after[i] = ClusterGenerate(*stub, prompts[i], a.tokens); });
    }
    for (auto& t : again) t.join();
    after_s = absl::ToDoubleSeconds(absl::Now() - a0);
    absl::SleepFor(absl::Milliseconds(800));
  }
  const v1::ClusterStatusResponse rebalanced = !after.empty() ? get_status() : status;
  (*up)->Terminate(absl::Seconds(20));

  int mismatches = 0;
  int64_t same = 0, total = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    mismatches += one[i].tokens != base[i].tokens;
    mismatches += many[i].tokens != base[i].tokens;
    if (!after.empty()) mismatches += after[i].tokens != base[i].tokens;
    for (const Run* r : {&one[i], &many[i]}) {
      for (size_t j = 0; j < base[i].tokens.size(); ++j) {
        same += j < r->tokens.size() && r->tokens[j] == base[i].tokens[j];
        ++total;
      }
    }
  }
  auto ttfts = [](const std::vector<Run>& runs) {
    std::vector<double> v;
    for (const Run& r : runs) v.push_back(r.ttft_ms);
    return Median(v);
  };
  const double generated = static_cast<double>(a.requests) * a.tokens;
  std::printf("model %s: %d requests x (%d prompt + %d generated tokens), %d expert services\n",
              model.c_str(), a.requests, a.prompt, a.tokens, a.experts);
  std::printf("| path | median TTFT ms | generated tokens/s | vs engine |\n|---|---|---|---|\n");
  std::printf("| engine, sequential | %.1f | %.1f | 1.00 |\n", ttfts(base), generated / engine_s);
  std::printf("| cluster, 1 client at a time | %.1f | %.1f | %.2f |\n", ttfts(one),
              generated / one_s, engine_s / one_s);
  std::printf("| cluster, %d clients at once | %.1f | %.1f | %.2f |\n", a.requests, ttfts(many),
              generated / many_s, engine_s / many_s);
  std::printf("token mismatches against the engine: %d requests; %.4f of generated tokens equal\n",
              mismatches, total > 0 ? static_cast<double>(same) / total : 1.0);
  const v1::RoutingStatus& r = status.routing();
  std::printf("routing: MaxVio %.3f since start, %.3f last window; online bias rate %s, %llu "
              "updates; max devices %d (most seen %d)\n",
              r.max_vio(), r.max_vio_window(),
              a.bias_update_rate.empty() ? "off" : a.bias_update_rate.c_str(),
              static_cast<unsigned long long>(r.bias_updates()), r.max_devices(),
              r.max_devices_observed());
  if (a.repeat) {
    std::printf("control, no rebalance: observed MaxVio over shards %.3f (first round) -> %.3f "
                "(both rounds); %d clients again: %.1f tokens/s (before %.1f)\n",
                status.routing().shard_max_vio(), rebalanced.routing().shard_max_vio(),
                a.requests, generated / after_s, generated / many_s);
  }
  if (a.rebalance) {
    std::printf("EPLB: placement %llu (%s, %d MoE layers) in force %.0f ms after the call; "
                "expected MaxVio per shard %.3f -> %.3f; observed MaxVio over shards %.3f "
                "(before, since start) -> %.3f (since the switch); %d clients again: %.1f "
                "tokens/s (before %.1f)\n",
                static_cast<unsigned long long>(plan.placement().id()), plan.mode().c_str(),
                plan.placement().layers_size(), switch_ms, plan.expected_max_vio_before(),
                plan.expected_max_vio_after(), status.routing().shard_max_vio(),
                rebalanced.routing().shard_max_vio(), a.requests, generated / after_s,
                generated / many_s);
  }
  // With the online bias the routing differs from the engine's by design: not a failure.
  return mismatches == 0 || !a.bias_update_rate.empty() ? 0 : 2;
}

}  // namespace
}  // namespace splitmoe

int main(int argc, char** argv) {
  splitmoe::Args a;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--rebalance" || flag == "--repeat") {
      (flag == "--rebalance" ? a.rebalance : a.repeat) = true;
      --i;
      continue;
    }
    if (flag == "--skew") {
      a.skew = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) return 2;
    const std::string value = argv[i + 1];
    if (flag == "--requests") a.requests = std::atoi(value.c_str());
    else if (flag == "--prompt") a.prompt = std::atoi(value.c_str());
    else if (flag == "--tokens") a.tokens = std::atoi(value.c_str());
    else if (flag == "--experts") a.experts = std::atoi(value.c_str());
    else if (flag == "--model") a.model = value;
    else if (flag == "--prefill-batch-tokens") a.prefill_batch_tokens = std::atoi(value.c_str());
    else if (flag == "--bias-update-rate") a.bias_update_rate = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (a.requests < 1 || a.prompt < 1 || a.tokens < 1 || a.experts < 1) return 2;
  return splitmoe::Main(a);
}
