#include "common/kernels/cpu/experts.h"

#include <cstring>
#include <vector>

#include "common/base/status_macros.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu/threads.h"
#include "common/kernels/cpu_ops.h"

namespace splitmoe::kernels {
namespace {

// ys[r] = expert(x[rows[r]]) for r < rows.size(); ys [rows.size(), hidden].
void RunExpert(const model::MlpWeights& expert, const float* x, int64_t hidden,
               absl::Span<const int32_t> rows, float* ys) {
  const auto n = static_cast<int64_t>(rows.size());
  const int64_t inter = expert.gate.rows;
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(ys + i * hidden, x + rows[i] * hidden, hidden * sizeof(float));
  std::vector<float> g(static_cast<size_t>(n * inter)), u(static_cast<size_t>(n * inter));
  Linear(ys, n, expert.gate, g.data());
  Linear(ys, n, expert.up, u.data());
  SiluMul(g.data(), u.data(), n * inter);
  Linear(g.data(), n, expert.down, ys);
}

// out[rows[r]] += weight[r] * ys[r].
void AddWeighted(absl::Span<const int32_t> rows, absl::Span<const float> weight, const float* ys,
                 int64_t hidden, float* out) {
  for (size_t r = 0; r < rows.size(); ++r) {
    float* o = out + rows[r] * hidden;
    const float* y = ys + static_cast<int64_t>(r) * hidden;
    for (int64_t j = 0; j < hidden; ++j) o[j] += weight[r] * y[j];
  }
}

}  // namespace

void AccumulateExpert(const model::MlpWeights& expert, const float* x, int64_t hidden,
                      absl::Span<const int32_t> rows, absl::Span<const float> weight, float* out) {
  std::vector<float> ys(rows.size() * static_cast<size_t>(hidden));
  RunExpert(expert, x, hidden, rows, ys.data());
  AddWeighted(rows, weight, ys.data(), hidden, out);
}

absl::Status AccumulateExperts(absl::Span<const ExpertRows> experts, const float* x,
                               int64_t hidden, float* out) {
  bool grouped = !experts.empty();
  int64_t total = 0;
  for (const ExpertRows& e : experts) {
    const auto n = static_cast<int64_t>(e.rows.size());
    grouped = grouped && Grouped(e.expert->gate, n) && Grouped(e.expert->up, n) &&
              Grouped(e.expert->down, n) && e.expert->gate.rows == experts[0].expert->gate.rows;
    total += n;
  }
  if (!grouped) {
    bool narrow = true;
    for (const ExpertRows& e : experts) {
      narrow = narrow && e.expert->gate.narrow() && e.expert->up.narrow() && e.expert->down.narrow();
    }
    // Side by side only where there are experts enough to keep every thread busy; else one
    // expert at a time, each over all the threads.
    if (!narrow || static_cast<int64_t>(experts.size()) < 2 * CpuThreads()) {
      for (const ExpertRows& e : experts) {
        if (!e.rows.empty()) AccumulateExpert(*e.expert, x, hidden, e.rows, e.weight, out);
      }
      return absl::OkStatus();
    }
    // Prefill over narrow weights: experts side by side, each on one thread (its weight panels
    // widened once, its GEMMs on that thread), into their own rows of ys; then the weighted
    // sums in expert order, the same sums as one expert at a time. In waves of at most
    // kWaveFloats outputs, so a long batch holds a bounded buffer.
    constexpr int64_t kWaveFloats = int64_t{16} << 20;  // 64 MiB
    std::vector<float> ys;
    size_t begin = 0;
    while (begin < experts.size()) {
      size_t end = begin;
      std::vector<int64_t> first = {0};
      while (end < experts.size() &&
             (end == begin ||
              (first.back() + static_cast<int64_t>(experts[end].rows.size())) * hidden <=
                  kWaveFloats)) {
        first.push_back(first.back() + static_cast<int64_t>(experts[end].rows.size()));
        ++end;
      }
      ys.resize(static_cast<size_t>(first.back() * hidden));
      ParallelFor(static_cast<int64_t>(end - begin), [&](int64_t i) {
        const ExpertRows& e = experts[begin + static_cast<size_t>(i)];
        if (!e.rows.empty()) RunExpert(*e.expert, x, hidden, e.rows, ys.data() + first[i] * hidden);
      });
      for (size_t i = begin; i < end; ++i) {
        AddWeighted(experts[i].rows, experts[i].weight, ys.data() + first[i - begin] * hidden,
                    hidden, out);
      }
      begin = end;
    }
    return absl::OkStatus();
  }
  const int64_t inter = experts[0].expert->gate.rows;
  std::vector<float> xs(static_cast<size_t>(total * hidden));
  std::vector<float> g(static_cast<size_t>(total * inter)), u(static_cast<size_t>(total * inter));
  std::vector<LinearTask> tasks;
  tasks.reserve(2 * experts.size());
  int64_t off = 0;
  for (const ExpertRows& e : experts) {
    const auto n = static_cast<int64_t>(e.rows.size());
    if (n == 0) continue;
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(xs.data() + (off + i) * hidden, x + e.rows[i] * hidden, hidden * sizeof(float));
    tasks.push_back(
        Task(xs.data() + off * hidden, hidden, n, e.expert->gate, g.data() + off * inter, inter));
    tasks.push_back(
        Task(xs.data() + off * hidden, hidden, n, e.expert->up, u.data() + off * inter, inter));
    off += n;
  }
  SPLITMOE_RETURN_IF_ERROR(GroupedLinear(tasks));
  SiluMul(g.data(), u.data(), total * inter);
  tasks.clear();
  off = 0;
  for (const ExpertRows& e : experts) {
    const auto n = static_cast<int64_t>(e.rows.size());
    if (n == 0) continue;
    tasks.push_back(
        Task(g.data() + off * inter, inter, n, e.expert->down, xs.data() + off * hidden, hidden));
    off += n;
  }
  SPLITMOE_RETURN_IF_ERROR(GroupedLinear(tasks));
  off = 0;
  for (const ExpertRows& e : experts) {
    AddWeighted(e.rows, e.weight, xs.data() + off * hidden, hidden, out);
    off += static_cast<int64_t>(e.rows.size());
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::kernels
