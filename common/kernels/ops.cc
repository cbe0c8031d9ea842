#include "common/kernels/ops.h"

#include <cmath>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu_ops.h"

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
  if (absl::Status s = Supports(device, p); !s.ok()) return s;
  if (p.sequences.empty()) return absl::OkStatus();
  if (device.backend == Backend::kCpu) return MlaAttention(p);
  return Cuda().mla_attention(device, p);
}

}  // namespace splitmoe::kernels
