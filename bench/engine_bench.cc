// Speed baseline of the single-process engine on a bench-size generated model (hidden 1024,
// 64 routed experts), with the machine's own limits measured in the same run:
//   BM_PeakSgemm         fp32 GEMM 2048^3 (oneDNN): the GEMM rate this machine reaches
//   BM_MemoryRead        streaming read bandwidth over 1 GiB, every core
//   BM_LayerGemm/...     the engine's own GEMM shapes (prefill and decode), packed as the engine
//   runs them
//   BM_NarrowGemm/...    the same shapes with BF16 / FP8 weights (kernels/cpu/narrow_linear.h)
//   BM_Prefill/W/T       prompt tokens/s (one sequence of T tokens)
//   BM_Decode/W/B        generated tokens/s with B sequences decoding together (context 256)
// W: how the weights are held, 0 fp32 (widened at load, packed for oneDNN), 1 BF16 (the bench
// checkpoint's dtype, read in place), 2 FP8 E4M3 (an FP8 copy of the bench model, in place).
// Counters: GFLOPs, GBps, tokens_per_s, and fractions of the limits each figure measures just
// before and just after its own timed loop (of_gemm_peak against peak_GFLOPs, of_read_bw
// against read_GBps: the mean of the two measurements). Run:
//   build/bench/engine_bench --benchmark_counters_tabular=true
// SPLITMOE_BENCH_SMALL=1 uses a tiny model (the ctest smoke run).
#include <benchmark/benchmark.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/engine/engine.h"
#include "common/kernels/cpu/threads.h"
#include "common/kernels/cpu_ops.h"
#include "common/kernels/packed_linear.h"
#include "common/model/tiny.h"

namespace splitmoe {
namespace {

bool Small() { return std::getenv("SPLITMOE_BENCH_SMALL") != nullptr; }

model::TinyModelOptions BenchOptions() {
  if (!Small()) return model::BenchModelOptions();
  model::TinyModelOptions o;
  o.style = "v3";
  o.mtp_layers = 0;
  o.vocab_size = 1024;
  return o;
}

enum WeightMode { kFp32 = 0, kBf16 = 1, kFp8 = 2 };
const char* ModeName(int64_t mode) { return mode == kFp32 ? "fp32" : mode == kBf16 ? "bf16" : "fp8"; }

engine::Engine& BenchEngine(int64_t mode = kFp32) {
  static std::unique_ptr<engine::Engine> engines[3];
  std::unique_ptr<engine::Engine>& engine = engines[mode];
  if (engine) return *engine;
  engines[0].reset();  // one model resident at a time: the runs go mode by mode
  engines[1].reset();
  engines[2].reset();
  model::TinyModelOptions options = BenchOptions();
  options.fp8 = mode == kFp8;
  std::string dir = (std::filesystem::temp_directory_path() /
                     absl::StrCat(Small() ? "splitmoe_bench_small" : "splitmoe_bench_model",
                                  mode == kFp8 ? "_fp8" : ""))
                        .string();
  if (!std::filesystem::exists(dir + "/config.json")) {
    absl::Status s = model::WriteTinyModel(options, dir, "");
    if (!s.ok()) {
      std::fprintf(stderr, "make bench model: %s\n", s.ToString().c_str());
      std::exit(1);
    }
  }
  engine::EngineOptions eo;
  eo.weights = mode == kFp32 ? model::ResidentDType::kFloat32 : model::ResidentDType::kCheckpoint;
  auto e = engine::Engine::Load(dir, eo);
  if (!e.ok()) {
    std::fprintf(stderr, "load bench model: %s\n", e.status().ToString().c_str());
    std::exit(1);
  }
  engine = std::move(*e);
  return *engine;
}

// The machine's limits, measured where the figure compared with them is: the machines are
// shared and noisy (the read bandwidth alone varied 33-53 GB/s within minutes), so
// BM_Prefill and BM_Decode each take the limit just before and just after their own timed
// loop and compare with the mean of the two. BM_PeakSgemm and BM_MemoryRead report them alone.
struct Limits {
  double gemm_gflops = 0.0;  // fp32 GEMM 2048^3, oneDNN, every core
  double read_gbps = 0.0;    // streaming read, every core (MeasureReadBandwidth)
};

// The machine's fp32 GEMM peak: oneDNN (the faster library here) on a 2048^3 problem, every
// core; `reps` products, GFLOP/s.
double MeasureGemmPeak(int reps) {
  const int64_t n = Small() ? 256 : 2048;
  static model::Matrix* w = [n] {
    auto* m = new model::Matrix{n, n, std::vector<float>(n * n, 0.25f)};
    auto packed = kernels::PackedLinear::Create(*m);
    if (!packed.ok()) std::abort();
    m->packed = *packed;
    return m;
  }();
  static std::vector<float> a(n * n, 0.5f), c(n * n);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) {
    kernels::Linear(a.data(), n, *w, c.data());
    benchmark::DoNotOptimize(c.data());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * n * n * n * reps / seconds / 1e9;
}

// Sums a[begin, end) as the decode kernels read a weight (kernels/cpu/narrow_linear.cc): two
// streams far apart (the range's halves), 16 floats a step each, asked for 1 KiB ahead. The
// plain loop read 0.8-0.9 of this in stand-alone runs on fresh threads, so it would understate
// the limit.
__attribute__((target("avx512f"))) float SumAvx512(const float* a, size_t begin, size_t end) {
  const size_t half = (end - begin) / 2 / 16 * 16;
  const float* p = a + begin;
  const float* q = a + begin + half;
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (size_t i = 0; i < half; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + i) + 1024, _MM_HINT_T0);
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(q + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// Streaming read bandwidth with every core, one thread each (AVX-512: SumAvx512; else
// independent accumulators so the loop measures bandwidth, not add latency): the first `bytes`
// of a 1 GiB buffer, read until 1 GiB was read in all; GB/s. A figure is compared with the
// rate of a buffer of its own working set's size.
constexpr size_t kReadBufferBytes = size_t{1} << 30;
double MeasureReadBandwidth(size_t bytes) {
  const size_t buffer = Small() ? kReadBufferBytes / 16 : kReadBufferBytes;
  static std::vector<float> a(buffer / 4, 1.0f);
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const size_t n = std::max<size_t>(std::min(bytes, buffer) / 4, 1024);
  const int reps = static_cast<int>(std::max<size_t>(1, buffer / 4 / n));
  // On the kernels' own OpenMP threads: threads of its own would share the cores with that
  // pool's threads, which spin a while after each region (and read ~25% less here).
  const int64_t threads = kernels::CpuThreads();
  std::vector<float> sums(static_cast<size_t>(threads));
  const auto t0 = std::chrono::steady_clock::now();
  for (int rep = 0; rep < reps; ++rep) {
    kernels::ParallelFor(threads, [&](int64_t t) {
      const size_t begin = n / threads * t, end = n / threads * (t + 1);
      if (avx512) {
        sums[t] = SumAvx512(a.data(), begin, end);
        return;
      }
      float acc[32] = {};
      for (size_t i = begin; i + 32 <= end; i += 32)
        for (int j = 0; j < 32; ++j) acc[j] += a[i + j];
      float sum = 0;
      for (float v : acc) sum += v;
      sums[t] = sum;
    });
    benchmark::DoNotOptimize(sums.data());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(n * 4) * reps / seconds / 1e9;
}

// The limits a figure compares with: the GEMM peak (prefill), the read rate of `read_bytes`,
// its working set (decode at batch 1); 0 for a limit not asked for.
Limits MeasureLimits(bool gemm, size_t read_bytes) {
  return {gemm ? MeasureGemmPeak(3) : 0.0, read_bytes > 0 ? MeasureReadBandwidth(read_bytes) : 0.0};
}

// The mean of the limits taken before and after a figure.
Limits Mean(const Limits& before, const Limits& after) {
  return {(before.gemm_gflops + after.gemm_gflops) / 2, (before.read_gbps + after.read_gbps) / 2};
}

void BM_PeakSgemm(benchmark::State& state) {
  for (auto _ : state) state.counters["GFLOPs"] = MeasureGemmPeak(1);
}
BENCHMARK(BM_PeakSgemm)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_MemoryRead(benchmark::State& state) {
  MeasureReadBandwidth(kReadBufferBytes / 16);  // a warm-up (and the buffer's allocation), untimed
  for (auto _ : state) state.counters["GBps"] = MeasureReadBandwidth(kReadBufferBytes);
}
BENCHMARK(BM_MemoryRead)->Unit(benchmark::kMillisecond)->UseRealTime();

// [m, k] x [n, k]^T, the engine's Linear.
void BM_LayerGemm(benchmark::State& state) {
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  model::Matrix w{n, k, std::vector<float>(n * k, 0.01f)};
  auto packed = kernels::PackedLinear::Create(w);  // as the engine runs them
  if (!packed.ok()) state.SkipWithError("pack");
  w.packed = *packed;
  std::vector<float> x(m * k, 1.0f), y(m * n);
  for (auto _ : state) {
    kernels::Linear(x.data(), m, w, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * m * n * k * state.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
  state.counters["GBps_weights"] = benchmark::Counter(
      4.0 * n * k * state.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
// Prefill shapes (128 tokens): q_a, kv_a, expert up, dense up, lm_head; decode shapes (1 token).
BENCHMARK(BM_LayerGemm)
    ->Args({128, 1024, 384})
    ->Args({128, 1024, 288})
    ->Args({128, 1024, 512})
    ->Args({128, 1024, 2816})
    ->Args({1, 1024, 384})
    ->Args({1, 1024, 512})
    ->Args({1, 1024, 32768})
    ->Args({8, 1024, 512})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// BM_LayerGemm's shapes with the weight in BF16 (W=1) or FP8 (W=2), as the engine holds them.
void BM_NarrowGemm(benchmark::State& state) {
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2), mode = state.range(3);
  const model::WeightDType dtype =
      mode == kBf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFp8E4M3;
  const int64_t vbytes = model::WeightDTypeBytes(dtype);
  auto bytes = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(n * k * vbytes), 0x3a);
  model::Matrix w;
  w.rows = n;
  w.cols = k;
  w.dtype = dtype;
  w.raw = bytes->data();
  w.keep = bytes;
  if (dtype == model::WeightDType::kFp8E4M3)
    w.scale_inv.assign(static_cast<size_t>(w.scale_rows() * w.scale_cols()), 0.01f);
  std::vector<float> x(m * k, 1.0f), y(m * n);
  for (auto _ : state) {
    kernels::Linear(x.data(), m, w, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * m * n * k * state.iterations();
  const double weight_bytes = static_cast<double>(n * k * vbytes) * state.iterations();
  state.counters["GFLOPs"] =
      benchmark::Counter(flops, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["GBps_weights"] =
      benchmark::Counter(weight_bytes, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.SetLabel(ModeName(mode));
}
BENCHMARK(BM_NarrowGemm)
    ->ArgsProduct({{1, 8}, {1024}, {512, 32768}, {kBf16, kFp8}})
    ->ArgsProduct({{2, 3, 4}, {1024}, {32768}, {kBf16}})  // a speculative verification pass
    ->Args({128, 1024, 2816, kBf16})
    ->Args({48, 1024, 512, kBf16})  // a routed expert's share of a 512-token prefill
    ->Args({48, 512, 1024, kBf16})
    ->Args({48, 1024, 512, kFp8})
    ->Args({512, 1024, 512, kBf16})
    ->Args({512, 1024, 512, kFp8})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_Prefill(benchmark::State& state) {
  engine::Engine& e = BenchEngine(state.range(0));
  // Third argument: 0 the engine's default (auto: the expanded form for a prompt), 1 absorbed.
  const engine::AttentionForm form =
      state.range(2) == 1 ? engine::AttentionForm::kAbsorbed : engine::AttentionForm::kAuto;
  const auto& c = e.config();
  std::vector<int32_t> prompt(state.range(1));
  for (size_t i = 0; i < prompt.size(); ++i)
    prompt[i] = static_cast<int32_t>((i * 7919 + 11) % c.vocab_size);
  std::vector<float> hidden, logits(c.vocab_size);
  const Limits before = MeasureLimits(/*gemm=*/true, 0);
  for (auto _ : state) {
    engine::LatentCache cache(c.num_hidden_layers, c.latent_dim());
    std::vector<engine::SequenceChunk> batch = {{prompt, &cache}};
    if (!e.transformer().Forward(batch, form, &hidden).ok())
      state.SkipWithError("forward");
    if (!e.transformer().Logits(hidden.data() + (prompt.size() - 1) * c.hidden_size, 1,
                                logits.data()).ok())
      state.SkipWithError("logits");
  }
  const Limits limits = Mean(before, MeasureLimits(/*gemm=*/true, 0));
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(prompt.size()) * state.iterations(), benchmark::Counter::kIsRate);
  // FLOPs per token of the matrices a prompt token multiplies (every projection, the dense MLPs,
  // the shared expert and k routed experts; attention itself left out), as a fraction of the
  // GEMM peak measured above: the end-to-end efficiency.
  const auto& w = e.weights();
  double params = 0.0;
  auto add = [&](const model::Matrix& m) { params += static_cast<double>(m.rows * m.cols); };
  for (const auto& l : w.layers) {
    for (const model::Matrix* m : {&l.attn.q_proj, &l.attn.q_a_proj, &l.attn.q_b_proj,
                                   &l.attn.kv_a_proj, &l.attn.kv_b_proj, &l.attn.o_proj,
                                   &l.gate, &l.dense.gate, &l.dense.up, &l.dense.down,
                                   &l.shared.gate, &l.shared.up, &l.shared.down})
      add(*m);
    for (const auto& x : l.experts) {
      if (x) {
        params += static_cast<double>(c.num_experts_per_tok) *
                  static_cast<double>(x->gate.rows * x->gate.cols * 3);
        break;
      }
    }
  }
  const double gflop_per_token = 2.0 * params / 1e9;
  state.counters["GFLOP_per_token"] = gflop_per_token;
  state.counters["peak_GFLOPs"] = limits.gemm_gflops;
  state.counters["of_gemm_peak"] = benchmark::Counter(
      gflop_per_token * static_cast<double>(prompt.size()) * state.iterations() /
          limits.gemm_gflops,
      benchmark::Counter::kIsRate);
  state.SetLabel(absl::StrCat(ModeName(state.range(0)), state.range(2) == 1 ? " absorbed" : ""));
}
BENCHMARK(BM_Prefill)
    ->ArgsProduct({{kFp32, kBf16, kFp8}, {32, 128, 512}, {0}})
    ->Args({kBf16, 512, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Bytes one decode step of one sequence must read: every weight but the embeddings and the
// routed experts, plus k experts per MoE layer.
double ActiveWeightBytes(const engine::Engine& e) {
  uint64_t expert_bytes = 0, moe_layers = 0, one_expert = 0;
  for (const auto& layer : e.weights().layers) {
    if (!layer.is_moe) continue;
    ++moe_layers;
    for (const auto& x : layer.experts) {
      if (x) {
        expert_bytes += x->bytes();
        one_expert = x->bytes();
      }
    }
  }
  return static_cast<double>(e.weights().bytes() - expert_bytes - e.weights().embed.bytes() +
                             moe_layers * e.config().num_experts_per_tok * one_expert);
}

void BM_Decode(benchmark::State& state) {
  engine::Engine& e = BenchEngine(state.range(0));
  const auto& c = e.config();
  const int64_t batch_size = state.range(1), context = 256;
  std::vector<std::unique_ptr<engine::LatentCache>> caches;
  std::vector<float> hidden;
  for (int64_t b = 0; b < batch_size; ++b) {
    caches.push_back(std::make_unique<engine::LatentCache>(c.num_hidden_layers, c.latent_dim()));
    std::vector<int32_t> prompt(context);
    for (int64_t i = 0; i < context; ++i)
      prompt[i] = static_cast<int32_t>((i * 31 + b * 17) % c.vocab_size);
    std::vector<engine::SequenceChunk> one = {{prompt, caches.back().get()}};
    if (!e.transformer().Forward(one, engine::AttentionForm::kAuto, &hidden).ok())
      state.SkipWithError("prefill");
  }
  std::vector<std::vector<int32_t>> next(batch_size, std::vector<int32_t>{42});
  std::vector<float> logits(batch_size * c.vocab_size);
  // The read rate compared with is that of a buffer the size of the step's active weights.
  const double active = ActiveWeightBytes(e);
  const size_t read_bytes = batch_size == 1 ? static_cast<size_t>(active) : 0;
  const Limits before = MeasureLimits(/*gemm=*/false, read_bytes);
  for (auto _ : state) {
    state.PauseTiming();
    for (auto& cache : caches) cache->set_length(context);  // decode always at the same context
    std::vector<engine::SequenceChunk> batch;
    for (int64_t b = 0; b < batch_size; ++b) batch.push_back({next[b], caches[b].get()});
    state.ResumeTiming();
    if (!e.transformer().Forward(batch, engine::AttentionForm::kAbsorbed, &hidden).ok())
      state.SkipWithError("decode");
    if (!e.transformer().Logits(hidden.data(), batch_size, logits.data()).ok())
      state.SkipWithError("logits");
  }
  const Limits limits = Mean(before, MeasureLimits(/*gemm=*/false, read_bytes));
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(batch_size) * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["weight_GB"] = static_cast<double>(e.weights().bytes()) / 1e9;
  if (batch_size == 1) {
    state.counters["active_weight_MB"] = active / 1e6;
    state.counters["active_weight_GBps"] =
        benchmark::Counter(active * state.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
    state.counters["read_GBps"] = limits.read_gbps;
    state.counters["of_read_bw"] = benchmark::Counter(
        active * state.iterations() / (limits.read_gbps * 1e9), benchmark::Counter::kIsRate);
  }
  state.SetLabel(ModeName(state.range(0)));
}
BENCHMARK(BM_Decode)
    ->ArgsProduct({{kFp32, kBf16, kFp8}, {1, 8}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace splitmoe

BENCHMARK_MAIN();
