// One MoE layer's routed experts, in process against the direct data plane, in one run, on the
// bench model (hidden 1024, 64 experts top-6, 8 groups, 4 kept):
//   in process      engine::LocalMoeExecutor (selection + the experts' GEMMs, this process)
//   direct, UCX     expert_plane::DirectMoeExecutor: the same selection here, each shard's part
//                   to its expert service (`splitmoe expert` processes, 2 shards) as UCX active
//                   messages (`--moe-transport ucx`; UCX_TLS decides shared memory or tcp), fp32
//                   and bf16 on the wire
//   direct, gRPC    the same over the services' ExpertCompute streams (`--moe-transport grpc`)
// at batch 1, 16 and 128 tokens. Reports the median time per layer and the overhead over in
// process (the cost of the two crossings), and checks the outputs agree. Then the micro-batch
// overlap (engine/overlap.h): a step of 4 MoE layers over 16 tokens, each layer's attention-side
// work stood in by the layer's shared experts, run as one batch, as two micro-batches of 8 one
// after the other, and as the same two in ping-pong (one's shared experts while the other's
// routed experts are out); with `--expert-cpus` the expert services run on those cores only
// (taskset), so the attention side and the experts stop sharing cores, as on separate machines.
// Last, a prefill of one 1024-token prompt in 128-token chunks, chunk after chunk against the
// chunks pipelined (PrefillBatch with a PingPong: a chunk's experts behind the next chunk's
// attention), with its first token checked equal. The router only
// publishes the routing table; it is not on this path. Every process shares this machine's
// cores: the expert services compute on the same two cores as this one.
//
//   build/bench/moe_dispatch_bench [--reps 50] [--shards 2] [--model DIR] [--expert-cpus LIST]
//                                  [--busy-poll-us N]
//   taskset -c 0 build/bench/moe_dispatch_bench --expert-cpus 1     (sides on their own cores)
// (a tiny model, e.g. `splitmoe make-tiny`, leaves almost only the crossings to measure).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "bench/bench_model.h"
#include "common/engine/batch_decoder.h"
#include "common/engine/engine.h"
#include "common/engine/overlap.h"
#include "common/engine/routing.h"
#include "common/expert_plane/direct_moe.h"
#include "common/kernels/cpu/experts.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/process/subprocess.h"

namespace splitmoe {
namespace {

double MedianMs(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int reps, int shards, std::string dir, const std::string& expert_cpus,
         int64_t busy_poll_us) {
  if (dir.empty()) dir = bench::BenchModelDir();
  auto e = engine::Engine::Load(dir);
  if (!e.ok()) {
    std::fprintf(stderr, "%s\n", e.status().ToString().c_str());
    return 1;
  }
  const model::ModelConfig& c = (*e)->config();
  const std::string bin = bench::SplitmoeBinary();
  auto router = process::Subprocess::Start("router", {bin, "router", "--model", dir,
                                                      "--heartbeat-ms", "200"});
  if (!router.ok()) return 1;
  auto address = (*router)->ReadLineMatching("listening ", absl::Seconds(60));
  if (!address.ok()) return 1;
  std::vector<std::unique_ptr<process::Subprocess>> experts;
  for (int s = 0; s < shards; ++s) {
    std::vector<std::string> args = {bin, "expert", "--model", dir, "--router", *address,
                                     "--shard", std::to_string(s), "--num-shards",
                                     std::to_string(shards), "--busy-poll-us",
                                     std::to_string(busy_poll_us)};
    if (!expert_cpus.empty()) args.insert(args.begin(), {"/usr/bin/taskset", "-c", expert_cpus});
    auto x = process::Subprocess::Start(absl::StrCat("expert", s), args);
    if (!x.ok() || !(*x)->ReadLineMatching("listening ", absl::Seconds(120)).ok()) return 1;
    experts.push_back(std::move(*x));
  }
  auto watcher = expert_plane::RoutingTableWatcher::Start(*address, "bench");
  if (!watcher->WaitForTable(absl::Seconds(30))) {
    std::fprintf(stderr, "no routing table\n");
    return 1;
  }
  engine::LocalMoeExecutor local(c, (*e)->weights());
  auto make = [&](expert_plane::MoeTransport transport, v1::WireDtype dtype) {
    expert_plane::DirectMoeOptions o;
    o.transport = transport;
    o.dtype = dtype;
    o.busy_poll = absl::Microseconds(busy_poll_us);
    auto moe = expert_plane::DirectMoeExecutor::Create(c, (*e)->weights(), watcher.get(), o);
    if (!moe.ok()) {
      std::fprintf(stderr, "%s\n", moe.status().ToString().c_str());
      std::exit(1);
    }
    return std::move(*moe);
  };
  auto ucx = make(expert_plane::MoeTransport::kUcx, v1::WIRE_DTYPE_FP32);
  auto ucx_bf16 = make(expert_plane::MoeTransport::kUcx, v1::WIRE_DTYPE_BF16);
  auto grpc = make(expert_plane::MoeTransport::kGrpc, v1::WIRE_DTYPE_FP32);
  expert_plane::DirectMoeExecutor& fp32 = *ucx;  // the overlap runs on the default transport

  const int64_t layer = c.first_k_dense_replace;  // the first MoE layer
  const model::LayerWeights& w = (*e)->weights().layers[static_cast<size_t>(layer)];
  const int64_t h = c.hidden_size, n = c.n_routed_experts;
  const char* tls = std::getenv("UCX_TLS");
  std::printf("model %s: MoE layer %lld, %d expert shards, median of %d calls in a row, "
              "UCX_TLS=%s, --busy-poll-us %lld%s\n",
              dir.c_str(), static_cast<long long>(layer), shards, reps, tls ? tls : "(all)",
              static_cast<long long>(busy_poll_us),
              expert_cpus.empty() ? ", all on the same cores" : ", experts on their own cores");
  std::printf("| batch | in process ms | UCX fp32 ms | overhead us | UCX bf16 ms | overhead us "
              "| gRPC fp32 ms | overhead us | max |diff| UCX fp32 |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t rows : {1, 16, 128}) {
    std::vector<float> x(static_cast<size_t>(rows * h)), scores(static_cast<size_t>(rows * n));
    for (float& v : x) v = g(rng);
    engine::GateScores(c, x.data(), rows, w.gate, scores.data());
    std::vector<float> a(x.size()), b(x.size()), d(x.size()), g2(x.size());
    // Each path runs its calls in a row, as a forward pass calls MoE layer after MoE layer
    // (the first 3 warm up: connections, pages); the paths take turns in rounds of 10 so that
    // a noisy moment of the machine falls on all of them.
    std::vector<double> t_local, t_fp32, t_bf16, t_grpc;
    auto time = [&](engine::MoeExecutor& moe, float* out, std::vector<double>* t, int n) {
      for (int r = 0; r < n; ++r) {
        absl::Time t0 = absl::Now();
        absl::Status s = moe.RoutedExperts(layer, x.data(), scores.data(), rows, out);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          std::exit(1);
        }
        t->push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
      }
    };
    std::vector<double> warm;
    for (engine::MoeExecutor* moe :
         std::initializer_list<engine::MoeExecutor*>{&local, ucx.get(), ucx_bf16.get(), grpc.get()})
      time(*moe, b.data(), &warm, 3);
    for (int done = 0; done < reps; done += 10) {
      const int n = std::min(10, reps - done);
      time(local, a.data(), &t_local, n);
      time(*ucx, b.data(), &t_fp32, n);
      time(*ucx_bf16, d.data(), &t_bf16, n);
      time(*grpc, g2.data(), &t_grpc, n);
    }
    double diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, double{std::fabs(a[i] - b[i])});
    if (b != g2) {
      std::fprintf(stderr, "UCX and gRPC disagree at batch %lld\n", static_cast<long long>(rows));
      return 1;
    }
    const double l = MedianMs(t_local), f = MedianMs(t_fp32), bf = MedianMs(t_bf16),
                 gr = MedianMs(t_grpc);
    std::printf("| %lld | %.3f | %.3f | %.0f | %.3f | %.0f | %.3f | %.0f | %.2g |\n",
                static_cast<long long>(rows), l, f, (f - l) * 1000, bf, (bf - l) * 1000, gr,
                (gr - l) * 1000, diff);
  }

  // The overlap: one decode-like step of kLayers MoE layers over 16 tokens.
  {
    constexpr int64_t kRows = 16, kHalf = 8, kLayers = 4;
    std::vector<float> x(static_cast<size_t>(kRows * h)), scores(static_cast<size_t>(kRows * n));
    for (float& v : x) v = g(rng);
    engine::GateScores(c, x.data(), kRows, w.gate, scores.data());
    const model::MlpWeights& shared = w.shared;
    // One micro-batch's layer: the shared experts here, the routed ones at the services.
    auto layer_of = [&](int64_t first, int64_t rows, float* out) -> absl::Status {
      std::unique_ptr<engine::MoeExecutor::Pending> routed =
          fp32.Start(layer, x.data() + first * h, scores.data() + first * n, rows, out);
      std::vector<float> s(static_cast<size_t>(rows * h), 0.0f);
      std::vector<int32_t> idx(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) idx[static_cast<size_t>(r)] = static_cast<int32_t>(r);
      if (c.n_shared_experts > 0) {
        kernels::AccumulateExpert(shared, x.data() + first * h, h, idx,
                                 std::vector<float>(static_cast<size_t>(rows), 1.0f), s.data());
      }
      return routed->Wait();
    };
    std::vector<float> out(static_cast<size_t>(kRows * h));
    engine::PingPong overlap;
    std::vector<double> t_one, t_seq, t_pp;
    absl::Status st;
    for (int r = 0; r < reps + 3 && st.ok(); ++r) {
      absl::Time t0 = absl::Now();
      for (int l = 0; l < kLayers && st.ok(); ++l) st = layer_of(0, kRows, out.data());
      absl::Time t1 = absl::Now();
      for (int l = 0; l < kLayers && st.ok(); ++l) {
        st = layer_of(0, kHalf, out.data());
        if (st.ok()) st = layer_of(kHalf, kHalf, out.data() + kHalf * h);
      }
      absl::Time t2 = absl::Now();
      absl::Status sa, sb;
      overlap.Run([&] { for (int l = 0; l < kLayers && sa.ok(); ++l) sa = layer_of(0, kHalf, out.data()); },
                  [&] {
                    for (int l = 0; l < kLayers && sb.ok(); ++l)
                      sb = layer_of(kHalf, kHalf, out.data() + kHalf * h);
                  });
      absl::Time t3 = absl::Now();
      if (st.ok()) st = sa.ok() ? sb : sa;
      if (r < 3) continue;
      t_one.push_back(absl::ToDoubleMilliseconds(t1 - t0));
      t_seq.push_back(absl::ToDoubleMilliseconds(t2 - t1));
      t_pp.push_back(absl::ToDoubleMilliseconds(t3 - t2));
    }
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      return 1;
    }
    const double one = MedianMs(t_one), seq = MedianMs(t_seq), pp = MedianMs(t_pp);
    std::printf("\nmicro-batch overlap: %lld MoE layers x %lld tokens (shared experts here, routed "
                "at the services%s)\n| one batch of 16 ms | 2 x 8 in turn ms | 2 x 8 ping-pong ms "
                "| ping-pong / in turn | ping-pong / one batch | handoffs per step |\n"
                "|---|---|---|---|---|---|\n| %.3f | %.3f | %.3f | %.2f | %.2f | %.1f |\n",
                static_cast<long long>(kLayers), static_cast<long long>(kRows),
                expert_cpus.empty() ? ", same cores" : ", services on their own cores", one, seq,
                pp, pp / seq, pp / one,
                static_cast<double>(overlap.handoffs()) / static_cast<double>(reps + 3));
  }
  // Prefill of one long prompt, its chunks one after the other or pipelined as a wavefront
  // (engine::PrefillBatch with a PingPong: a chunk's routed experts are out while the next
  // chunk's attention runs), the routed experts at the services over UCX.
  {
    constexpr int64_t kPromptTokens = 1024, kChunk = 128;
    engine::Transformer remote(c, (*e)->weights(), ucx.get());
    std::vector<int32_t> prompt(kPromptTokens);
    for (int64_t i = 0; i < kPromptTokens; ++i) {
      prompt[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);
    }
    engine::PingPong overlap;
    std::vector<double> t_turn, t_piped;
    int32_t first[2] = {0, 0};
    const int runs = std::max(3, reps / 20);
    for (int r = 0; r < runs + 1; ++r) {  // the first warms up
      for (int piped = 0; piped < 2; ++piped) {
        engine::LatentCache cache(c.num_hidden_layers, c.latent_dim());
        std::vector<engine::PrefillItem> items(1);
        items[0].prompt = prompt;
        items[0].cache = &cache;
        absl::Time t0 = absl::Now();
        absl::Status s = engine::PrefillBatch(remote, items, engine::AttentionForm::kAuto,
                                              nullptr, kChunk, piped ? &overlap : nullptr);
        const double ms = absl::ToDoubleMilliseconds(absl::Now() - t0);
        if (!s.ok() || !items[0].status.ok()) {
          std::fprintf(stderr, "prefill: %s %s\n", s.ToString().c_str(),
                       items[0].status.ToString().c_str());
          return 1;
        }
        first[piped] = items[0].first.token;
        if (r > 0) (piped ? t_piped : t_turn).push_back(ms);
      }
    }
    if (first[0] != first[1]) {
      std::fprintf(stderr, "pipelined prefill chose another first token\n");
      return 1;
    }
    const double turn = MedianMs(t_turn), piped = MedianMs(t_piped);
    std::printf("\nprefill of %lld tokens in %lld-token chunks, routed experts over UCX (median "
                "of %d)\n| chunks in turn ms | pipelined ms | pipelined / in turn | handoffs "
                "per prefill |\n|---|---|---|---|\n| %.1f | %.1f | %.2f | %.1f |\n",
                static_cast<long long>(kPromptTokens), static_cast<long long>(kChunk), runs, turn,
                piped, piped / turn,
                static_cast<double>(overlap.handoffs()) / static_cast<double>(runs + 1));
  }
  watcher.reset();
  for (auto& x : experts) x->Terminate(absl::Seconds(10));
  (*router)->Terminate(absl::Seconds(5));
  return 0;
}

}  // namespace
}  // namespace splitmoe

int main(int argc, char** argv) {
  int reps = 50, shards = 2;
  int64_t busy_poll_us = 0;
  std::string model, expert_cpus;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--reps") reps = std::atoi(argv[i + 1]);
    else if (flag == "--shards") shards = std::atoi(argv[i + 1]);
    else if (flag == "--model") model = argv[i + 1];
    else if (flag == "--expert-cpus") expert_cpus = argv[i + 1];
    else if (flag == "--busy-poll-us") busy_poll_us = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (reps < 1 || shards < 1) return 2;
  return splitmoe::Main(reps, shards, model, expert_cpus, busy_poll_us);
}
