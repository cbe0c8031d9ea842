// Which BLAS for the CPU engine: OpenBLAS sgemm/sgemv against oneDNN's fp32 matmul (weights
// reordered once into the layout oneDNN prefers, primitive created once) on the engine's own
// shapes, measured in one run. docs/performance.md records the outcome; the engine uses
// OpenBLAS. Built only where oneDNN (libdnnl-dev) is found.
//   build/bench/blas_choice_bench --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

#include "common/kernels/cpu_ops.h"

namespace splitmoe {
namespace {

void BM_OpenBlas(benchmark::State& state) {
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  model::Matrix w{n, k, std::vector<float>(n * k, 0.01f)};
  std::vector<float> x(m * k, 1.0f), y(m * n);
  for (auto _ : state) {
    kernels::Linear(x.data(), m, w, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * m * n * k * state.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}

void BM_OneDnn(benchmark::State& state) {
  using dnnl::memory;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  memory::desc src_md({m, k}, memory::data_type::f32, memory::format_tag::ab);
  memory::desc wei_any({k, n}, memory::data_type::f32, memory::format_tag::any);
  memory::desc wei_plain({k, n}, memory::data_type::f32,
                         memory::format_tag::ba);  // [n, k] row-major = W^T
  memory::desc dst_md({m, n}, memory::data_type::f32, memory::format_tag::ab);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_any, dst_md),
                                  eng);  // oneDNN 2.x API
  std::vector<float> x(m * k, 1.0f), w(n * k, 0.01f), y(m * n);
  memory src(src_md, eng, x.data()), dst(dst_md, eng, y.data()), wplain(wei_plain, eng, w.data());
  memory wei(pd.weights_desc(), eng);
  dnnl::reorder(wplain, wei).execute(strm, wplain, wei);
  dnnl::matmul mm(pd);
  for (auto _ : state) {
    mm.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    strm.wait();
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * m * n * k * state.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}

#define SHAPES                        \
  Args({128, 1024, 384})              \
      ->Args({128, 1024, 512})        \
      ->Args({128, 1024, 2816})       \
      ->Args({512, 1024, 512})        \
      ->Args({1, 1024, 384})          \
      ->Args({1, 1024, 512})          \
      ->Args({8, 1024, 512})          \
      ->Args({1, 1024, 32768})        \
      ->Args({2048, 2048, 2048})      \
      ->Unit(benchmark::kMicrosecond) \
      ->UseRealTime()
BENCHMARK(BM_OpenBlas)->SHAPES;
BENCHMARK(BM_OneDnn)->SHAPES;

}  // namespace
}  // namespace splitmoe

BENCHMARK_MAIN();
