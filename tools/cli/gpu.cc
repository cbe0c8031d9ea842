// `--device cuda:N`: this binary's CUDA backend, enabled only when a command asks for a GPU (so
// a CPU run never loads the CUDA libraries), and refused with a clear error in a build without
// CUDA.
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/kernels/ops.h"
#include "tools/cli/cluster.h"
#ifdef SPLITMOE_HAVE_CUDA
#include "common/kernels/cuda/ops_cuda.h"
#endif

namespace splitmoe::cli {

absl::Status EnableDevice(const std::string& device) {
  SPLITMOE_ASSIGN_OR_RETURN(kernels::Device parsed, kernels::ParseDevice(device));
  if (parsed.backend == kernels::Backend::kCpu) return absl::OkStatus();
#ifndef SPLITMOE_HAVE_CUDA
  return absl::FailedPreconditionError(absl::StrCat(
      "this splitmoe was built without a CUDA toolkit: --device ", device, " is not available"));
#else
  kernels::EnableCudaOps();
  return absl::OkStatus();
#endif
}

}  // namespace splitmoe::cli
