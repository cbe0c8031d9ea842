#include "common/kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/engine/routing.h"
#include "common/kernels/cpu/experts.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu/threads.h"
#include "common/kernels/cpu_ops.h"
#include "common/model/numeric.h"

#include <atomic>

namespace splitmoe::kernels {
namespace {

std::atomic<const OpsBackend*> g_cuda{nullptr};

const OpsBackend& Cuda() { return *g_cuda.load(std::memory_order_acquire); }

absl::Status Unsupported(const Device& device, absl::string_view op, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat(op, " on ", DeviceName(device), ": ", why));
}

// What every op asks of the device itself.
absl::Status CheckDevice(const Device& device, absl::string_view op) {
  if (!BackendAvailable(device.backend)) {
    return absl::UnimplementedError(absl::StrCat(
        op, " on ", DeviceName(device),
        ": this process has no CUDA backend (a GPU binary links splitmoe::ops_cuda and calls "
        "EnableCudaOps(); CMake builds it where it finds a CUDA toolkit)"));
  }
  if (device.backend == Backend::kCuda && (device.index < 0 || device.stream == nullptr)) {
    return Unsupported(device, op, "a CUDA device needs an index >= 0 and a stream");
  }
  return absl::OkStatus();
}

}  // namespace

std::string DeviceName(const Device& device) {
  return device.backend == Backend::kCpu ? std::string("cpu")
                                         : absl::StrCat("cuda:", device.index);
}

absl::StatusOr<Device> ParseDevice(absl::string_view name) {
  Device device;
  if (name == "cpu") return device;
  int index = -1;
  absl::string_view digits = name;
  if (!absl::ConsumePrefix(&digits, "cuda:") || digits.empty() || digits.size() > 4 ||
      digits.find_first_not_of("0123456789") != absl::string_view::npos ||
      !absl::SimpleAtoi(digits, &index)) {
    return absl::InvalidArgumentError(
        absl::StrCat("device must be cpu or cuda:N (N a device index), got '", name, "'"));
  }
  device.backend = Backend::kCuda;
  device.index = index;
  return device;
}

bool BackendAvailable(Backend backend) {
  return backend == Backend::kCpu || g_cuda.load(std::memory_order_acquire) != nullptr;
}

void SetOpsBackend(Backend backend, const OpsBackend* table) {
  if (backend == Backend::kCuda) g_cuda.store(table, std::memory_order_release);
}

// ---- RmsNorm

absl::Status Supports(const Device& device, const RmsNormParams& p) {
  if (absl::Status s = CheckDevice(device, "RmsNorm"); !s.ok()) return s;
  const int64_t xs = p.x_stride == 0 ? p.dim : p.x_stride;
  const int64_t os = p.out_stride == 0 ? p.dim : p.out_stride;
  if (p.rows < 0 || p.dim <= 0 || xs < p.dim || os < p.dim) {
    return Unsupported(device, "RmsNorm",
                       absl::StrCat(p.rows, " rows of ", p.dim, " values, strides ", xs, " and ",
                                    os, ": need rows >= 0, dim > 0, strides >= dim"));
  }
  if (p.rows > 0 && (p.x == nullptr || p.weight == nullptr || p.out == nullptr)) {
    return Unsupported(device, "RmsNorm", "null x, weight or out");
  }
  if (!(p.eps > 0.0f) || !std::isfinite(p.eps)) {
    return Unsupported(device, "RmsNorm", absl::StrCat("eps must be finite and > 0, got ", p.eps));
  }
  if (p.x == p.out && xs != os) {
    return Unsupported(device, "RmsNorm", "in place needs equal strides");
  }
  return absl::OkStatus();
}

absl::Status RmsNorm(const Device& device, const RmsNormParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  const int64_t xs = p.x_stride == 0 ? p.dim : p.x_stride;
  const int64_t os = p.out_stride == 0 ? p.dim : p.out_stride;
  if (device.backend == Backend::kCpu) {
    RmsNorm(p.x, p.rows, p.dim, xs, p.weight, p.eps, p.out, os);
    return absl::OkStatus();
  }
  return Cuda().rms_norm(device, p);
}

// ---- SwiGlu

absl::Status Supports(const Device& device, const SwiGluParams& p) {
  if (absl::Status s = CheckDevice(device, "SwiGlu"); !s.ok()) return s;
  if (p.n < 0) return Unsupported(device, "SwiGlu", absl::StrCat("n must be >= 0, got ", p.n));
  if (p.n > 0 && (p.gate == nullptr || p.up == nullptr)) {
    return Unsupported(device, "SwiGlu", "null gate or up");
  }
  return absl::OkStatus();
}

absl::Status SwiGlu(const Device& device, const SwiGluParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.n == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    SiluMul(p.gate, p.up, p.n);
    return absl::OkStatus();
  }
  return Cuda().swiglu(device, p);
}

// ---- Rope

absl::Status Supports(const Device& device, const RopeParams& p) {
  if (absl::Status s = CheckDevice(device, "Rope"); !s.ok()) return s;
  if (p.rows < 0 || p.heads <= 0 || p.rope_dim <= 0 || p.rope_dim % 2 != 0 || p.offset < 0 ||
      p.offset + p.rope_dim > p.head_stride) {
    return Unsupported(device, "Rope",
                       absl::StrCat(p.rows, " rows of ", p.heads, " heads (stride ", p.head_stride,
                                    "), values [", p.offset, ", ", p.offset + p.rope_dim,
                                    "): need an even rope_dim inside each head"));
  }
  if (p.rows > 0 && (p.x == nullptr || p.positions == nullptr || p.inv_freq == nullptr)) {
    return Unsupported(device, "Rope", "null x, positions or inv_freq");
  }
  return absl::OkStatus();
}

absl::Status Rope(const Device& device, const RopeParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    for (int64_t r = 0; r < p.rows; ++r) {  // all refused before any row is rotated
      if (p.positions[r] < 0) {
        return Unsupported(device, "Rope", absl::StrCat("row ", r, ": position ", p.positions[r]));
      }
    }
    std::vector<float> cos_sin(static_cast<size_t>(p.rope_dim));
    for (int64_t r = 0; r < p.rows; ++r) {
      RopeCosSin(p.positions[r], p.inv_freq, p.rope_dim, cos_sin.data());
      for (int64_t h = 0; h < p.heads; ++h) {
        ApplyRope(p.x + (r * p.heads + h) * p.head_stride + p.offset, cos_sin.data(), p.rope_dim);
      }
    }
    return absl::OkStatus();
  }
  return Cuda().rope(device, p);
}

// ---- Linear

absl::Status Supports(const Device& device, const LinearParams& p) {
  if (absl::Status s = CheckDevice(device, "Linear"); !s.ok()) return s;
  if (p.w == nullptr || p.m < 0 || p.w->rows <= 0 || p.w->cols <= 0) {
    return Unsupported(device, "Linear", "need a weight of positive shape and m >= 0");
  }
  if (p.m > 0 && (p.x == nullptr || p.y == nullptr)) {
    return Unsupported(device, "Linear", "null x or y");
  }
  if (device.backend == Backend::kCpu) {
    const bool has_values = p.w->packed != nullptr || p.w->narrow() ||
                            static_cast<int64_t>(p.w->data.size()) == p.w->rows * p.w->cols;
    if (!has_values) {
      return Unsupported(device, "Linear",
                         absl::StrCat("the ", p.w->rows, " x ", p.w->cols,
                                      " weight holds no values in host memory"));
    }
    return absl::OkStatus();
  }
  return Cuda().supports_linear(device, p);
}

absl::Status Linear(const Device& device, const LinearParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.m == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    Linear(p.x, p.m, *p.w, p.y);
    return absl::OkStatus();
  }
  return Cuda().linear(device, p);
}

// ---- Embed

absl::Status Supports(const Device& device, const EmbedParams& p) {
  if (absl::Status s = CheckDevice(device, "Embed"); !s.ok()) return s;
  if (p.table == nullptr || p.rows < 0 || p.table->rows <= 0 || p.table->cols <= 0) {
    return Unsupported(device, "Embed", "need a table of positive shape and rows >= 0");
  }
  if (p.rows > 0 && (p.tokens == nullptr || p.out == nullptr)) {
    return Unsupported(device, "Embed", "null tokens or out");
  }
  if (device.backend == Backend::kCpu) {
    const bool has_values = p.table->narrow() || static_cast<int64_t>(p.table->data.size()) ==
                                                     p.table->rows * p.table->cols;
    if (!has_values) {
      return Unsupported(device, "Embed", "the table holds no rows in host memory");
    }
    return absl::OkStatus();
  }
  return Cuda().supports_embed(device, p);
}

absl::Status Embed(const Device& device, const EmbedParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    for (int64_t r = 0; r < p.rows; ++r) {  // all refused before any row is written
      if (p.tokens[r] < 0 || p.tokens[r] >= p.table->rows) {
        return Unsupported(device, "Embed",
                           absl::StrCat("row ", r, ": token id ", p.tokens[r],
                                        " outside the vocabulary [0, ", p.table->rows, ")"));
      }
    }
    for (int64_t r = 0; r < p.rows; ++r) {
      WidenRows(*p.table, p.tokens[r], 1, p.out + r * p.table->cols);
    }
    return absl::OkStatus();
  }
  return Cuda().embed(device, p);
}

// ---- Add

absl::Status Supports(const Device& device, const AddParams& p) {
  if (absl::Status s = CheckDevice(device, "Add"); !s.ok()) return s;
  if (p.n < 0) return Unsupported(device, "Add", absl::StrCat("n must be >= 0, got ", p.n));
  if (p.n > 0 && (p.h == nullptr || p.delta == nullptr)) {
    return Unsupported(device, "Add", "null h or delta");
  }
  return absl::OkStatus();
}

absl::Status Add(const Device& device, const AddParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.n == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    for (int64_t i = 0; i < p.n; ++i) p.h[i] += p.delta[i];
    return absl::OkStatus();
  }
  return Cuda().add(device, p);
}

// ---- MlaAttention

absl::Status Supports(const Device& device, const MlaAttentionParams& p) {
  if (absl::Status s = CheckDevice(device, "MlaAttention"); !s.ok()) return s;
  if (absl::Status s = CheckMlaAttention(p); !s.ok()) {
    return Unsupported(device, "MlaAttention", absl::StripPrefix(s.message(), "MlaAttention: "));
  }
  if (device.backend == Backend::kCpu) return absl::OkStatus();
  return Cuda().supports_mla(device, p);
}

absl::Status MlaAttention(const Device& device, const MlaAttentionParams& p) {
  // The CPU kernel checks its params itself (CheckMlaAttention, a walk over every block): not
  // twice per layer and step.
  if (device.backend == Backend::kCpu) return MlaAttention(p);
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.sequences.empty()) return absl::OkStatus();
  return Cuda().mla_attention(device, p);
}

// ---- Scores

absl::Status Supports(const Device& device, const ScoresParams& p) {
  if (absl::Status s = CheckDevice(device, "Scores"); !s.ok()) return s;
  if (p.rows < 0 || p.n <= 0) {
    return Unsupported(device, "Scores",
                       absl::StrCat(p.rows, " rows of ", p.n, ": need rows >= 0, n > 0"));
  }
  if (p.rows > 0 && p.x == nullptr) return Unsupported(device, "Scores", "null x");
  return absl::OkStatus();
}

absl::Status Scores(const Device& device, const ScoresParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    ScoreRows(p.x, p.rows, p.n, p.sigmoid);
    return absl::OkStatus();
  }
  return Cuda().scores(device, p);
}

// ---- SelectExperts

absl::Status Supports(const Device& device, const SelectExpertsParams& p) {
  if (absl::Status s = CheckDevice(device, "SelectExperts"); !s.ok()) return s;
  if (p.config == nullptr) return Unsupported(device, "SelectExperts", "no model config");
  const model::ModelConfig& c = *p.config;
  const int64_t n = c.n_routed_experts, k = c.num_experts_per_tok;
  if (n <= 0 || k <= 0 || k > n || p.rows < 0) {
    return Unsupported(device, "SelectExperts",
                       absl::StrCat(p.rows, " tokens choosing ", k, " of ", n,
                                    " experts: need 0 < k <= experts, rows >= 0"));
  }
  if (c.UsesGroups() && (c.n_group <= 0 || n % c.n_group != 0 || c.topk_group <= 0 ||
                         c.topk_group > c.n_group || k > c.topk_group * (n / c.n_group))) {
    return Unsupported(device, "SelectExperts",
                       absl::StrCat(n, " experts in ", c.n_group, " groups keeping ",
                                    c.topk_group, " cannot give ", k, " experts"));
  }
  if (p.rows > 0 && (p.scores == nullptr || p.experts == nullptr || p.weights == nullptr)) {
    return Unsupported(device, "SelectExperts", "null scores, experts or weights");
  }
  if (device.backend == Backend::kCuda && c.UsesGroups() && c.n_group > 64) {
    return Unsupported(device, "SelectExperts",
                       absl::StrCat(c.n_group, " groups: the kernel holds at most 64"));
  }
  return absl::OkStatus();
}

absl::Status SelectExperts(const Device& device, const SelectExpertsParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) {
    const model::ModelConfig& c = *p.config;
    const auto n = static_cast<size_t>(c.n_routed_experts);
    const int64_t k = c.num_experts_per_tok;
    const absl::Span<const float> bias =
        p.bias == nullptr ? absl::Span<const float>() : absl::MakeConstSpan(p.bias, n);
    for (int64_t r = 0; r < p.rows; ++r) {
      engine::SelectExpertsInto(c, absl::MakeConstSpan(p.scores + r * c.n_routed_experts, n),
                                bias, p.experts + r * k, p.weights + r * k);
    }
    return absl::OkStatus();
  }
  return Cuda().select_experts(device, p);
}

// ---- MlaProject

absl::Status Supports(const Device& device, const MlaProjectParams& p) {
  if (absl::Status s = CheckDevice(device, "MlaProject"); !s.ok()) return s;
  const model::Matrix* w = p.kv_b;
  if (w == nullptr || p.rows < 0 || p.heads <= 0 || p.nope_dim <= 0 || p.rope_dim < 0 ||
      p.v_dim <= 0 || w->rows != p.heads * (p.nope_dim + p.v_dim) || w->cols <= 0) {
    return Unsupported(
        device, "MlaProject",
        absl::StrCat("kv_b_proj ", w == nullptr ? 0 : w->rows, " x ", w == nullptr ? 0 : w->cols,
                     " for ", p.heads, " heads of ", p.nope_dim, " + ", p.v_dim,
                     " rows: need heads * (nope_dim + v_dim) rows"));
  }
  if (p.rows > 0 && (p.x == nullptr || p.out == nullptr)) {
    return Unsupported(device, "MlaProject", "null x or out");
  }
  if (device.backend == Backend::kCpu) {
    const bool has_values =
        w->narrow() || static_cast<int64_t>(w->data.size()) == w->rows * w->cols;
    if (!has_values) {
      return Unsupported(device, "MlaProject", "kv_b_proj holds no values in host memory");
    }
    return absl::OkStatus();
  }
  return Cuda().supports_mla_project(device, p);
}

namespace {

// The CPU side: narrow weights at decode sizes stream every head's slice in one GroupedLinear;
// at prefill sizes the heads run side by side, each widening its own slice once.
absl::Status MlaProjectCpu(const MlaProjectParams& p) {
  const model::Matrix& kvb = *p.kv_b;
  const int64_t heads = p.heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim;
  const int64_t kvr = kvb.cols, qk = dn + dr, lat = kvr + dr, rows = p.rows;
  const bool grouped = Grouped(kvb, rows);
  const bool parallel_heads = kvb.narrow() && !grouped;
  auto for_heads = [&](const std::function<void(int64_t)>& body) {
    if (parallel_heads) {
      ParallelFor(heads, body);
    } else {
      for (int64_t h = 0; h < heads; ++h) body(h);
    }
  };
  std::vector<LinearTask> tasks;
  if (p.kind == MlaProjectParams::Kind::kAbsorbQuery) {
    if (grouped) {
      for (int64_t h = 0; h < heads; ++h) {
        tasks.push_back({p.x + h * qk, heads * qk, rows, &kvb, h * (dn + dv), dn,
                         /*transposed=*/true, p.out + h * lat, heads * lat});
      }
      if (absl::Status s = GroupedLinear(tasks); !s.ok()) return s;
    }
    for_heads([&](int64_t h) {
      if (!grouped) {
        Gemm(false, false, rows, kvr, dn, 1.0f, p.x + h * qk, heads * qk,
             WidenedRows(kvb, h * (dn + dv), dn), kvr, 0.0f, p.out + h * lat, heads * lat);
      }
      for (int64_t t = 0; t < rows; ++t) {
        std::memcpy(p.out + (t * heads + h) * lat + kvr, p.x + (t * heads + h) * qk + dn,
                    static_cast<size_t>(dr) * sizeof(float));
      }
    });
    return absl::OkStatus();
  }
  if (grouped) {
    for (int64_t h = 0; h < heads; ++h) {
      tasks.push_back({p.x + h * kvr, heads * kvr, rows, &kvb, h * (dn + dv) + dn, dv,
                       /*transposed=*/false, p.out + h * dv, heads * dv});
    }
    return GroupedLinear(tasks);
  }
  for_heads([&](int64_t h) {
    Gemm(false, true, rows, dv, kvr, 1.0f, p.x + h * kvr, heads * kvr,
         WidenedRows(kvb, h * (dn + dv) + dn, dv), kvr, 0.0f, p.out + h * dv, heads * dv);
  });
  return absl::OkStatus();
}

}  // namespace

absl::Status MlaProject(const Device& device, const MlaProjectParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.rows == 0) return absl::OkStatus();
  if (device.backend == Backend::kCpu) return MlaProjectCpu(p);
  return Cuda().mla_project(device, p);
}

// ---- RoutedExperts

absl::Status Supports(const Device& device, const RoutedExpertsParams& p) {
  if (absl::Status s = CheckDevice(device, "RoutedExperts"); !s.ok()) return s;
  if (p.tokens < 0 || p.hidden <= 0 || p.inter <= 0 || p.top_k < 0) {
    return Unsupported(device, "RoutedExperts",
                       absl::StrCat(p.tokens, " tokens of ", p.hidden, " values, ", p.top_k,
                                    " slots, inter ", p.inter,
                                    ": need tokens >= 0, top_k >= 0, hidden and inter > 0"));
  }
  if (p.tokens > 0 && (p.x == nullptr || p.out == nullptr ||
                       (p.top_k > 0 && (p.experts == nullptr || p.weights == nullptr)))) {
    return Unsupported(device, "RoutedExperts", "null x, out, experts or weights");
  }
  if (device.backend == Backend::kCpu) {
    for (size_t e = 0; e < p.host.size(); ++e) {
      const model::MlpWeights* w = p.host[e];
      if (w != nullptr && (w->gate.rows != p.inter || w->gate.cols != p.hidden ||
                           w->up.rows != p.inter || w->up.cols != p.hidden ||
                           w->down.rows != p.hidden || w->down.cols != p.inter)) {
        return Unsupported(device, "RoutedExperts",
                           absl::StrCat("expert ", e, " is not a ", p.hidden, " -> ", p.inter,
                                        " -> ", p.hidden, " MLP"));
      }
    }
    return absl::OkStatus();
  }
  return Cuda().supports_routed_experts(device, p);
}

absl::Status RoutedExperts(const Device& device, const RoutedExpertsParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.tokens == 0) return absl::OkStatus();
  if (device.backend != Backend::kCpu) return Cuda().routed_experts(device, p);
  // Every slot checked before anything is computed; then (token, weight) grouped by expert, in
  // ascending id order, so each token's experts are added in that order.
  const auto n = static_cast<int64_t>(p.host.size());
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(n));
  std::vector<std::vector<float>> gate(static_cast<size_t>(n));
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t i = t * p.top_k; i < (t + 1) * p.top_k; ++i) {
      const int32_t e = p.experts[i];
      if (e == kNoExpertSlot) continue;
      if (e < 0 || e >= n || p.host[static_cast<size_t>(e)] == nullptr) {
        return Unsupported(device, "RoutedExperts",
                           absl::StrCat("token ", t, ": expert ", e, " is not held (", n,
                                        " experts by id)"));
      }
      for (int64_t j = t * p.top_k; j < i; ++j) {
        if (p.experts[j] == e) {
          return Unsupported(device, "RoutedExperts",
                             absl::StrCat("token ", t, " names expert ", e, " twice"));
        }
      }
      rows[static_cast<size_t>(e)].push_back(static_cast<int32_t>(t));
      gate[static_cast<size_t>(e)].push_back(p.weights[i]);
    }
  }
  std::fill(p.out, p.out + p.tokens * p.hidden, 0.0f);
  std::vector<ExpertRows> selected;
  for (int64_t e = 0; e < n; ++e) {
    if (!rows[static_cast<size_t>(e)].empty()) {
      selected.push_back({p.host[static_cast<size_t>(e)], rows[static_cast<size_t>(e)],
                          gate[static_cast<size_t>(e)]});
    }
  }
  return AccumulateExperts(selected, p.x, p.hidden, p.out);
}

// ---- Memory and streams

absl::StatusOr<std::unique_ptr<DeviceContext>> DeviceContext::Open(const Device& requested,
                                                                    bool exact_fp32) {
  Device device = requested;
  device.stream = nullptr;
  device.blas = nullptr;
  if (device.backend == Backend::kCpu) return std::unique_ptr<DeviceContext>(new DeviceContext(device));
  if (!BackendAvailable(device.backend)) {
    return CheckDevice(device, "DeviceContext::Open");  // Unimplemented, saying why
  }
  if (device.index < 0) return Unsupported(device, "DeviceContext::Open", "negative index");
  if (absl::Status s = Cuda().open(&device, exact_fp32); !s.ok()) return s;
  return std::unique_ptr<DeviceContext>(new DeviceContext(device));
}

DeviceContext::~DeviceContext() {
  // A process that turned its backend off since (tests do) can no longer close it: leak.
  const OpsBackend* cuda = g_cuda.load(std::memory_order_acquire);
  if (device_.backend == Backend::kCuda && cuda != nullptr) cuda->close(device_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    device_ = other.device_;
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { Reset(); }

void DeviceBuffer::Reset() {
  if (data_ == nullptr) return;
  if (device_.backend == Backend::kCpu) {
    std::free(data_);
  } else if (const OpsBackend* cuda = g_cuda.load(std::memory_order_acquire); cuda != nullptr) {
    cuda->free(device_, data_);
  }  // else: the backend was turned off since (tests do); leak rather than call into nothing
  data_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<DeviceBuffer> Allocate(const Device& device, size_t bytes) {
  if (absl::Status s = CheckDevice(device, "Allocate"); !s.ok()) return s;
  DeviceBuffer buffer;
  buffer.device_ = device;
  buffer.bytes_ = bytes;
  const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  if (device.backend == Backend::kCpu) {
    buffer.data_ = std::aligned_alloc(64, rounded);
    if (buffer.data_ == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("Allocate on cpu: ", bytes, " bytes"));
    }
    std::memset(buffer.data_, 0, rounded);
    return buffer;
  }
  absl::StatusOr<void*> data = Cuda().allocate(device, rounded);
  if (!data.ok()) return data.status();
  buffer.data_ = *data;
  return buffer;
}

namespace {

// A copy between host and device memory, checked; `backend_copy` is the CUDA table's entry.
absl::Status Copy(const Device& device, void* dst, const void* src, size_t bytes,
                  absl::string_view op,
                  absl::Status (*OpsBackend::*backend_copy)(const Device&, void*, const void*,
                                                            size_t)) {
  if (absl::Status s = CheckDevice(device, op); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  if (dst == nullptr || src == nullptr) return Unsupported(device, op, "null pointer");
  if (device.backend == Backend::kCpu) {
    std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  return (Cuda().*backend_copy)(device, dst, src, bytes);
}

}  // namespace

absl::Status CopyToDevice(const Device& device, void* dst, const void* src, size_t bytes) {
  return Copy(device, dst, src, bytes, "CopyToDevice", &OpsBackend::copy_to_device);
}

absl::Status CopyToHost(const Device& device, void* dst, const void* src, size_t bytes) {
  return Copy(device, dst, src, bytes, "CopyToHost", &OpsBackend::copy_to_host);
}

absl::Status CopyToDeviceAsync(const Device& device, void* dst, const void* src, size_t bytes) {
  return Copy(device, dst, src, bytes, "CopyToDeviceAsync", &OpsBackend::copy_to_device_async);
}

absl::Status CopyToHostAsync(const Device& device, void* dst, const void* src, size_t bytes) {
  return Copy(device, dst, src, bytes, "CopyToHostAsync", &OpsBackend::copy_to_host_async);
}

absl::Status Synchronize(const Device& device) {
  if (absl::Status s = CheckDevice(device, "Synchronize"); !s.ok()) return s;
  if (device.backend == Backend::kCpu) return absl::OkStatus();
  return Cuda().synchronize(device);
}

absl::Status PinHost(const Device& device, void* data, size_t bytes) {
  if (absl::Status s = CheckDevice(device, "PinHost"); !s.ok()) return s;
  if (data == nullptr || bytes == 0) return Unsupported(device, "PinHost", "no memory named");
  if (device.backend == Backend::kCpu) return absl::OkStatus();
  return Cuda().pin_host(device, data, bytes);
}

void UnpinHost(const Device& device, void* data) {
  if (device.backend == Backend::kCpu || data == nullptr || !CheckDevice(device, "UnpinHost").ok())
    return;
  Cuda().unpin_host(device, data);
}

// ---- StoreLatents

absl::Status Supports(const Device& device, const StoreLatentsParams& p) {
  if (absl::Status s = CheckDevice(device, "StoreLatents"); !s.ok()) return s;
  if (p.n < 0 || p.latent_dim <= 0 || p.start < 0 || p.block_tokens <= 0 || p.pool_blocks <= 0) {
    return Unsupported(device, "StoreLatents",
                       absl::StrCat(p.n, " rows of ", p.latent_dim, " from position ", p.start,
                                    " into ", p.pool_blocks, " blocks of ", p.block_tokens,
                                    ": need n >= 0, latent_dim > 0, start >= 0, blocks > 0"));
  }
  if (p.n > 0 && (p.rows == nullptr || p.block_table == nullptr || p.pool == nullptr)) {
    return Unsupported(device, "StoreLatents", "null rows, block_table or pool");
  }
  if (p.pool_block_stride != 0 && p.pool_block_stride < p.block_tokens * p.latent_dim) {
    return Unsupported(device, "StoreLatents",
                       absl::StrCat("a block stride of ", p.pool_block_stride,
                                    " values is less than a block's ",
                                    p.block_tokens * p.latent_dim));
  }
  const int64_t needed = (p.start + p.n + p.block_tokens - 1) / p.block_tokens;
  if (p.n > 0 && needed > p.table_blocks) {
    return Unsupported(device, "StoreLatents",
                       absl::StrCat("positions up to ", p.start + p.n - 1, " need ", needed,
                                    " blocks; the table has ", p.table_blocks));
  }
  return absl::OkStatus();
}

absl::Status StoreLatents(const Device& device, const StoreLatentsParams& p) {
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.n == 0) return absl::OkStatus();
  if (device.backend != Backend::kCpu) return Cuda().store_latents(device, p);
  const int64_t first = p.start / p.block_tokens, last = (p.start + p.n - 1) / p.block_tokens;
  for (int64_t b = first; b <= last; ++b) {
    if (p.block_table[b] < 0 || p.block_table[b] >= p.pool_blocks) {
      return Unsupported(device, "StoreLatents",
                         absl::StrCat("table entry ", b, " is block ", p.block_table[b],
                                      ", outside the pool's ", p.pool_blocks));
    }
  }
  const int64_t stride =
      p.pool_block_stride != 0 ? p.pool_block_stride : p.block_tokens * p.latent_dim;
  for (int64_t r = 0; r < p.n; ++r) {
    const int64_t pos = p.start + r;
    // Values from the pool's start to the row's.
    const int64_t at = int64_t{p.block_table[pos / p.block_tokens]} * stride +
                       pos % p.block_tokens * p.latent_dim;
    const float* src = p.rows + r * p.latent_dim;
    if (p.dtype == LatentStorage::kFloat32) {
      std::memcpy(static_cast<float*>(p.pool) + at, src,
                  static_cast<size_t>(p.latent_dim) * sizeof(float));
    } else {
      uint16_t* dst = static_cast<uint16_t*>(p.pool) + at;
      for (int64_t i = 0; i < p.latent_dim; ++i) dst[i] = model::FloatToBf16(src[i]);
    }
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::kernels
