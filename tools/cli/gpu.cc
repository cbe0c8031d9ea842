// `splitmoe generate --model DIR --device cuda:N [--precision fp32|bf16]`: the engine on a GPU.
// In a build without CUDA the flag is refused with a clear error.
#include <iostream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tools/cli/cluster.h"
#ifdef SPLITMOE_HAVE_CUDA
#include "common/engine/cuda/gpu_engine.h"
#endif

namespace splitmoe::cli {

absl::Status GenerateOnDevice(const Flags& f, const std::string& device) {
  int index = 0;
  if (device.rfind("cuda:", 0) != 0 || !absl::SimpleAtoi(device.substr(5), &index) || index < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda:N, got '", device, "'"));
  }
#ifndef SPLITMOE_HAVE_CUDA
  return absl::FailedPreconditionError(
      "this splitmoe was built without a CUDA toolkit: --device cuda:N is not available");
#else
  const std::string precision = f.Get("precision", "fp32");
  if (precision != "fp32" && precision != "bf16") {
    return absl::InvalidArgumentError("--precision must be fp32 or bf16");
  }
  if (!f.GetAll("stop").empty()) {
    return absl::UnimplementedError("--stop is not supported with --device cuda yet");
  }
  const std::string dir = f.Get("model");
  std::unique_ptr<tokenizer::Tokenizer> tok;
  auto loaded = tokenizer::Tokenizer::LoadFromDir(dir);
  if (loaded.ok()) tok = std::move(*loaded);
  engine::GenerateRequest req;
  if (f.Has("prompt-tokens") == f.Has("prompt")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT and --prompt-tokens IDS");
  }
  if (f.Has("prompt-tokens")) {
    SPLITMOE_ASSIGN_OR_RETURN(req.prompt, f.GetIntList("prompt-tokens"));
  } else {
    if (tok == nullptr) return absl::FailedPreconditionError("--prompt needs tokenizer.json");
    SPLITMOE_ASSIGN_OR_RETURN(req.prompt, tok->Encode(f.Get("prompt"), true));
  }
  SPLITMOE_ASSIGN_OR_RETURN(req.max_tokens, f.GetInt("max-tokens", 16));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.temperature, f.GetDouble("temperature", 0.0));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.top_p, f.GetDouble("top-p", 1.0));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.top_k, f.GetInt("top-k", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 0));
  req.sampling.seed = static_cast<uint64_t>(seed);
  SPLITMOE_ASSIGN_OR_RETURN(req.logprobs, f.GetInt("logprobs", -1));
  if (f.Has("stop-token-ids")) {
    SPLITMOE_ASSIGN_OR_RETURN(req.stop_token_ids, f.GetIntList("stop-token-ids"));
  }
  req.ignore_eos = f.Has("ignore-eos");
  engine::GpuEngineOptions options;
  options.device = index;
  options.precision =
      precision == "bf16" ? engine::GpuPrecision::kBf16 : engine::GpuPrecision::kFp32;
  SPLITMOE_ASSIGN_OR_RETURN(auto gpu, engine::GpuEngine::Load(dir, options));
  SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateResult r, gpu->Generate(req));
  if (tok != nullptr) {
    auto text = tok->Decode(r.tokens, true);
    if (text.ok()) r.text = *text;
  }
  nlohmann::json lps = nlohmann::json::array();
  for (const auto& lp : r.logprobs) {
    nlohmann::json top = nlohmann::json::array();
    for (const auto& [id, value] : lp.top) top.push_back({id, value});
    lps.push_back({{"token", lp.token}, {"logprob", lp.logprob}, {"top_logprobs", top}});
  }
  nlohmann::json out = {{"tokens", r.tokens},
                        {"text", r.text},
                        {"logprobs", lps},
                        {"finish_reason", r.finish_reason}};
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return absl::OkStatus();
#endif
}

}  // namespace splitmoe::cli
