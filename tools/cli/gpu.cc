// `splitmoe generate --model DIR --device cuda:N [--precision fp32|bf16]`: the engine on a GPU.
// In a build without CUDA the flag is refused with a clear error.
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/kernels/ops.h"
#include "common/tokenizer/tokenizer.h"
#include "tools/cli/cluster.h"
#include "tools/cli/generate_common.h"
#ifdef SPLITMOE_HAVE_CUDA
#include "common/engine/cuda/gpu_engine.h"
#endif

namespace splitmoe::cli {

absl::Status GenerateOnDevice(const Flags& f, const std::string& device) {
  SPLITMOE_ASSIGN_OR_RETURN(kernels::Device parsed, kernels::ParseDevice(device));
  const int index = parsed.index;
#ifndef SPLITMOE_HAVE_CUDA
  return absl::FailedPreconditionError(
      "this splitmoe was built without a CUDA toolkit: --device cuda:N is not available");
#else
  SPLITMOE_ASSIGN_OR_RETURN(const bool bf16, Bf16PrecisionFlag(f));
  if (!f.GetAll("stop").empty()) {
    return absl::UnimplementedError("--stop is not supported with --device cuda yet");
  }
  const std::string dir = f.Get("model");
  std::unique_ptr<tokenizer::Tokenizer> tok;
  auto loaded = tokenizer::Tokenizer::LoadFromDir(dir);
  if (loaded.ok()) tok = std::move(*loaded);
  SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateRequest req, GenerateRequestFromFlags(f, tok.get()));
  engine::GpuEngineOptions options;
  options.device = index;
  options.precision = bf16 ? engine::GpuPrecision::kBf16 : engine::GpuPrecision::kFp32;
  SPLITMOE_ASSIGN_OR_RETURN(auto gpu, engine::GpuEngine::Load(dir, options));
  SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateResult r, gpu->Generate(req));
  if (tok != nullptr) {
    auto text = tok->Decode(r.tokens, true);
    if (text.ok()) r.text = *text;
  }
  PrintGenerateJson(r);
  return absl::OkStatus();
#endif
}

}  // namespace splitmoe::cli
